//! The duplicate-key bug across instances, and its fix with the database the app has.
//!
//! N instances of the demo's app (`POST /api/clients`: look the client up, insert it if
//! missing) run as N processes on one PostgreSQL, each with the coalescing layer. The same
//! create is sent to all of them at once, for several rounds: first with the layer alone,
//! which coalesces within each process only (one run per instance, and all but one die on
//! the primary key), then with `PostgresStore`, which runs each key once across all of
//! them. Every number printed is counted. A third row runs the store's atomic mode (the
//! handler's writes and the kept answer in one transaction) while the first instance
//! pauses its whole process past its lease in every round, right after its insert: the
//! other instances take the key over, the paused run's insert rolls back, and there is
//! one row and one answer all the same.
//!
//!     DATABASE_URL=postgres://... cargo run --release --example instances --features postgres
//!     ... -- --instances 4 --callers 100 --rounds 5

#[path = "demo/app.rs"]
mod app;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tower_coalesce::postgres::PostgresStore;

/// The duplicate-key bug across instances of an app, without and with `PostgresStore`.
#[derive(clap::Parser)]
#[command(name = "instances")]
struct Args {
    /// Instances of the app, each a process of its own.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=32))]
    instances: u64,
    /// Identical POSTs fired at once in each round, spread over the instances.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..))]
    callers: u64,
    /// Rounds per mode, each with a new client id.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// Milliseconds between the lookup and the insert in the handler: the race window.
    #[arg(long = "gap-ms", default_value_t = 10)]
    gap_ms: u64,
    /// Run as one instance (used by the demo itself): `local`, `store` or `atomic`.
    #[arg(long, hide = true)]
    serve: Option<String>,
    /// Milliseconds an instance pauses its whole process (`SIGSTOP`) after each insert, in
    /// atomic mode (the demo gives it to its first instance).
    #[arg(long = "pause-ms", hide = true, default_value_t = 0)]
    pause_ms: u64,
}

/// The lease of the atomic row: short, so that the pause outlasts it.
const ATOMIC_LEASE: Duration = Duration::from_millis(500);

#[tokio::main]
async fn main() -> Result<(), tower_coalesce::BoxError> {
    let args = <Args as clap::Parser>::parse();
    let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
        eprintln!(
            "this demo needs PostgreSQL: DATABASE_URL=postgres://user@host/db cargo run \
             --release --example instances --features postgres"
        );
        std::process::exit(2);
    };
    if let Some(mode) = &args.serve {
        return match mode.as_str() {
            "atomic" => atomic::serve(&url, &args).await,
            mode => serve(&url, mode == "store", &args).await,
        };
    }

    println!(
        "POST /api/clients: {} identical creates at once over {} instances (processes), {} \
         rounds (a new client id each)",
        args.callers, args.instances, args.rounds
    );
    println!(
        "each instance: SELECT the id; if none, wait {} ms, then INSERT; the coalescing layer \
         keyed by the body's id",
        args.gap_ms
    );
    println!();
    println!(
        "{:<34} {:>8} {:>6} {:>6} {:>6} {:>6} {:>8} {:>13} {:>9}   database error seen",
        "", "requests", "2xx", "500", "other", "rows", "answers", "handler runs", "p50"
    );
    let store = PostgresStore::connect(&url).await?;
    store.migrate().await?;
    drop(store);
    for (label, mode) in [
        ("layer, no store", "local"),
        ("layer + PostgresStore", "store"),
        ("... atomic, one instance paused", "atomic"),
    ] {
        let pool = app::connect(&url).await?; // a fresh `clients` table
        let instances = Instances::spawn(mode, &args)?;
        let paused = mode == "atomic";
        let bases: Vec<String> = instances
            .addrs
            .iter()
            .map(|a| format!("http://{a}"))
            .collect();
        let (mut ok, mut errors, mut other, mut rows) = (0, 0, 0, 0);
        let (mut latencies, mut first_error) = (Vec::new(), None);
        let mut answers = 0;
        for round in 0..args.rounds {
            // Ids of the row's own: the rows share the store, which keeps a response for
            // the instances that waited (its handover window) after the row ends.
            let id = format!("{mode}-client-{round}");
            // The paused row: the first instance gets the create first and pauses after its
            // insert; the same create then goes to the other instances.
            let first = paused.then(|| {
                let (base, id) = (bases[0].clone(), id.clone());
                tokio::spawn(async move { app::fire(&base, &id, 1).await })
            });
            if paused {
                until_paused(&bases[0]).await;
            }
            // While it is paused, the others get it (a connection to the paused one would
            // wait for it to resume).
            let others = if paused { &bases[1..] } else { &bases[..] };
            let mut received = app::fire_across(others, &id, args.callers as usize, &[]).await;
            if let Some(first) = first {
                received.extend(first.await?);
            }
            let mut bodies = std::collections::HashSet::new();
            for received in received {
                latencies.push(received.latency);
                if received.status.is_success() {
                    bodies.insert(received.body.clone());
                }
                match received.status {
                    status if status.is_success() => ok += 1,
                    StatusCode::INTERNAL_SERVER_ERROR => {
                        errors += 1;
                        first_error.get_or_insert_with(|| {
                            String::from_utf8_lossy(&received.body).into_owned()
                        });
                    }
                    _ => other += 1,
                }
            }
            let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM clients WHERE id = $1")
                .bind(&id)
                .fetch_one(&pool)
                .await?;
            rows += count;
            answers += bodies.len();
        }
        let runs = instances.executions(&bases).await?;
        let p50 = app::percentile(&mut latencies, 0.50);
        let requests = (args.callers + u64::from(paused)) * args.rounds;
        println!(
            "{:<34} {:>8} {:>6} {:>6} {:>6} {:>6} {:>8} {:>13} {:>6.1} ms   {}",
            label,
            requests,
            ok,
            errors,
            other,
            rows,
            answers,
            runs,
            p50.as_secs_f64() * 1e3,
            first_error.as_deref().unwrap_or("none"),
        );
    }
    println!(
        "\nWithout a store each instance coalesces its own callers only: up to one run per \
         instance and round, racing on the primary key. With PostgresStore the instances \
         take the key's lease in the database: one run per round, the others replay it. In \
         atomic mode, the first instance paused for {} ms past its {} ms lease after each \
         insert: another instance took the key over (two runs a round), the paused run's \
         insert rolled back with its transaction, and every caller got the one answer kept.",
        ATOMIC_PAUSE.as_millis(),
        ATOMIC_LEASE.as_millis()
    );
    Ok(())
}

/// One instance: the demo's app, with the layer, and with `PostgresStore` if `store`; it
/// also answers `GET /executions` with its handler runs.
async fn serve(url: &str, store: bool, args: &Args) -> Result<(), tower_coalesce::BoxError> {
    let state = app::AppState::new(app::pool(url).await?, Duration::from_millis(args.gap_ms));
    let routes = app::routes().route(
        "/executions",
        get(|State(state): State<app::AppState>| async move { state.executions().to_string() }),
    );
    let layer = app::coalesce_layer();
    let router = if store {
        let store = PostgresStore::connect(url).await?;
        routes.layer(layer.store(store)).with_state(state)
    } else {
        routes.layer(layer).with_state(state)
    };
    println!("listening {}", app::serve(router).await);
    std::future::pending::<()>().await;
    Ok(())
}

/// Waits until the instance at `base` stops answering (it paused), for at most 5 s.
async fn until_paused(base: &str) {
    let client = reqwest::Client::new();
    for _ in 0..100 {
        let health = client
            .get(format!("{base}/health"))
            .timeout(Duration::from_millis(50))
            .send()
            .await;
        if health.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How long the atomic row's first instance pauses: past its lease, so that another
/// instance takes the key over.
const ATOMIC_PAUSE: Duration = Duration::from_millis(1500);

/// The atomic row's instance: the same create (look the client up, insert it if missing),
/// in the flight's transaction.
mod atomic {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use axum::http::StatusCode;
    use axum::routing::{get, post};
    use axum::{Extension, Json, Router};
    use tower_coalesce::http::OnStoreError;
    use tower_coalesce::postgres::{PostgresStore, Tx};

    use super::{ATOMIC_LEASE, Args, app};

    static RUNS: AtomicUsize = AtomicUsize::new(0);

    pub async fn serve(url: &str, args: &Args) -> Result<(), tower_coalesce::BoxError> {
        let store = PostgresStore::connect(url)
            .await?
            .with_lease(ATOMIC_LEASE)
            .with_poll_interval(Duration::from_millis(100))
            .atomic();
        let (gap, pause) = (args.gap_ms, args.pause_ms);
        let create = post(move |tx: Extension<Tx>, client: Json<app::Client>| {
            create(tx, client, gap, pause)
        });
        let layer = app::coalesce_layer()
            .store(store)
            .on_store_error(OnStoreError::FailClosed);
        let router = Router::new()
            .route("/api/clients", create.layer(layer))
            .route("/health", get(|| async { "ok" }))
            .route(
                "/executions",
                get(|| async { RUNS.load(Ordering::SeqCst).to_string() }),
            );
        println!("listening {}", app::serve(router).await);
        std::future::pending::<()>().await;
        Ok(())
    }

    async fn create(
        Extension(tx): Extension<Tx>,
        Json(new): Json<app::Client>,
        gap: u64,
        pause: u64,
    ) -> (StatusCode, String) {
        RUNS.fetch_add(1, Ordering::SeqCst);
        let mut tx = match tx.lock().await {
            Ok(tx) => tx,
            Err(error) => return (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
        };
        let found: Result<Option<String>, _> =
            sqlx::query_scalar("SELECT name FROM clients WHERE id = $1")
                .bind(&new.id)
                .fetch_optional(&mut *tx)
                .await;
        match found {
            Ok(Some(name)) => return (StatusCode::OK, format!("{} exists: {name}", new.id)),
            Ok(None) => {}
            Err(error) => return (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(gap)).await;
        let inserted = sqlx::query("INSERT INTO clients (id, name) VALUES ($1, $2)")
            .bind(&new.id)
            .bind(&new.name)
            .execute(&mut *tx)
            .await;
        if let Err(error) = inserted {
            return (StatusCode::INTERNAL_SERVER_ERROR, error.to_string());
        }
        if pause > 0 {
            pause_this_process(pause);
        }
        // Each instance's answer names it: two answers given would be told apart.
        let by = std::process::id();
        (
            StatusCode::CREATED,
            format!("{} created by process {by}", new.id),
        )
    }

    /// Stops this whole process (`SIGSTOP`), as a long GC pause or a frozen VM would, and
    /// has a shell resume it (`SIGCONT`) after `ms`.
    fn pause_this_process(ms: u64) {
        let pid = std::process::id();
        let resume = format!("sleep {}; kill -CONT {pid}", ms as f64 / 1000.0);
        if std::process::Command::new("sh")
            .args(["-c", &resume])
            .spawn()
            .is_ok()
        {
            let _ = std::process::Command::new("kill")
                .args(["-STOP", &pid.to_string()])
                .status();
        }
    }
}

/// The instance processes, killed on drop.
struct Instances {
    children: Vec<Child>,
    addrs: Vec<String>,
}

impl Instances {
    fn spawn(mode: &str, args: &Args) -> std::io::Result<Instances> {
        let mut instances = Instances {
            children: Vec::new(),
            addrs: Vec::new(),
        };
        for i in 0..args.instances {
            // In atomic mode the first instance pauses after each insert.
            let pause = match (mode, i) {
                ("atomic", 0) => ATOMIC_PAUSE.as_millis() as u64,
                _ => 0,
            };
            let mut child = Command::new(std::env::current_exe()?)
                .args(["--serve", mode, "--gap-ms", &args.gap_ms.to_string()])
                .args(["--pause-ms", &pause.to_string()])
                .stdout(Stdio::piped())
                .spawn()?;
            let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
            instances.children.push(child);
            let mut line = String::new();
            stdout.read_line(&mut line)?;
            let Some(addr) = line.trim().strip_prefix("listening ") else {
                return Err(std::io::Error::other(format!(
                    "an instance did not start: {line:?}"
                )));
            };
            instances.addrs.push(addr.to_owned());
        }
        Ok(instances)
    }

    /// Handler runs, summed over the instances.
    async fn executions(&self, bases: &[String]) -> Result<u64, reqwest::Error> {
        let client = reqwest::Client::new();
        let mut runs = 0;
        for base in bases {
            let text = client
                .get(format!("{base}/executions"))
                .send()
                .await?
                .text()
                .await?;
            runs += text.parse::<u64>().unwrap_or(0);
        }
        Ok(runs)
    }
}

impl Drop for Instances {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
