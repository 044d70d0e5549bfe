//! N concurrent identical "create client" calls, without and then with the coalescing layer.
//!
//! The handler does what the apps in the write-ups do: look the client up, and insert it if
//! it is missing. The "database" here is an in-memory table with a primary-key check and a
//! configurable delay between the lookup and the insert (the network round trip that opens
//! the race window). Every number printed is counted, not assumed.
//!
//!     cargo run --example demo               # 50 callers, 5 ms between check and insert
//!     cargo run --example demo -- 200 10     # 200 callers, 10 ms
//!
//! (The PostgreSQL and SQLite version of this demonstration replaces it in a later change.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_coalesce::coalesce::CoalesceLayer;

#[derive(Clone, Debug)]
struct CreateClient {
    id: String,
    name: String,
}

/// A table with a primary key: a second insert of an id fails like Postgres' 23505.
#[derive(Default)]
struct Clients {
    rows: Mutex<HashMap<String, String>>,
    handler_runs: AtomicUsize,
}

impl Clients {
    async fn create(&self, req: CreateClient, gap: Duration) -> Result<String, String> {
        self.handler_runs.fetch_add(1, Ordering::SeqCst);
        if let Some(name) = self.rows.lock().unwrap().get(&req.id) {
            return Ok(name.clone());
        }
        tokio::time::sleep(gap).await; // the round trip between SELECT and INSERT
        let mut rows = self.rows.lock().unwrap();
        if rows.contains_key(&req.id) {
            return Err(format!(
                "duplicate key value violates unique constraint \"clients_pkey\" (23505): {}",
                req.id
            ));
        }
        rows.insert(req.id, req.name.clone());
        Ok(req.name)
    }
}

async fn fire<S>(svc: S, callers: usize, id: &str) -> (usize, usize)
where
    S: Service<CreateClient, Response = String, Error = String> + Clone + Send + 'static,
    S::Future: Send,
{
    let req = CreateClient {
        id: id.into(),
        name: "Ada".into(),
    };
    let calls: Vec<_> = (0..callers)
        .map(|_| tokio::spawn(svc.clone().oneshot(req.clone())))
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for call in calls {
        match call.await.expect("caller task") {
            Ok(_) => ok += 1,
            Err(_) => failed += 1,
        }
    }
    (ok, failed)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let callers: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(50);
    let gap = Duration::from_millis(args.next().map(|a| a.parse()).transpose()?.unwrap_or(5));
    println!("{callers} concurrent identical creates, {gap:?} between lookup and insert\n");
    println!(
        "{:<16} {:>9} {:>9} {:>9} {:>14} {:>6}",
        "", "requests", "ok", "errors", "handler runs", "rows"
    );

    for (label, coalesced) in [("without layer", false), ("with layer", true)] {
        let db = Arc::new(Clients::default());
        let handler = {
            let db = db.clone();
            service_fn(move |req: CreateClient| {
                let db = db.clone();
                async move { db.create(req, gap).await }
            })
        };
        let (ok, failed) = if coalesced {
            let svc = ServiceBuilder::new()
                .layer(CoalesceLayer::new(|req: &CreateClient| {
                    Some(req.id.clone())
                }))
                .service(handler);
            fire(svc, callers, "qg2X9STk79i").await
        } else {
            fire(handler, callers, "qg2X9STk79i").await
        };
        let rows = db.rows.lock().unwrap().len();
        let runs = db.handler_runs.load(Ordering::SeqCst);
        println!("{label:<16} {callers:>9} {ok:>9} {failed:>9} {runs:>14} {rows:>6}");
    }
    Ok(())
}
