//! The duplicate-key bug across instances, and its fix with the database the app has.
//!
//! N instances of the demo's app (`POST /api/clients`: look the client up, insert it if
//! missing) run as N processes on one PostgreSQL, each with the coalescing layer. The same
//! create is sent to all of them at once, for several rounds: first with the layer alone,
//! which coalesces within each process only (one run per instance, and all but one die on
//! the primary key), then with `PostgresStore`, which runs each key once across all of
//! them. Every number printed is counted.
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
    /// Run as one instance (used by the demo itself): `local` or `store`.
    #[arg(long, hide = true)]
    serve: Option<String>,
}

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
        return serve(&url, mode == "store", &args).await;
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
        "{:<22} {:>8} {:>6} {:>6} {:>6} {:>6} {:>13} {:>9}   database error seen",
        "", "requests", "2xx", "500", "other", "rows", "handler runs", "p50"
    );
    let store = PostgresStore::connect(&url).await?;
    store.migrate().await?;
    drop(store);
    for (label, mode) in [
        ("layer, no store", "local"),
        ("layer + PostgresStore", "store"),
    ] {
        let pool = app::connect(&url).await?; // a fresh `clients` table
        let instances = Instances::spawn(mode, &args)?;
        let bases: Vec<String> = instances
            .addrs
            .iter()
            .map(|a| format!("http://{a}"))
            .collect();
        let (mut ok, mut errors, mut other, mut rows) = (0, 0, 0, 0);
        let (mut latencies, mut first_error) = (Vec::new(), None);
        for round in 0..args.rounds {
            let id = format!("client-{round}");
            for received in app::fire_across(&bases, &id, args.callers as usize, &[]).await {
                latencies.push(received.latency);
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
        }
        let runs = instances.executions(&bases).await?;
        let p50 = app::percentile(&mut latencies, 0.50);
        println!(
            "{:<22} {:>8} {:>6} {:>6} {:>6} {:>6} {:>13} {:>6.1} ms   {}",
            label,
            args.callers * args.rounds,
            ok,
            errors,
            other,
            rows,
            runs,
            p50.as_secs_f64() * 1e3,
            first_error.as_deref().unwrap_or("none"),
        );
    }
    println!(
        "\nWithout a store each instance coalesces its own callers only: up to one run per \
         instance and round, racing on the primary key. With PostgresStore the instances \
         take the key's lease in the database: one run per round, the others replay it."
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
        for _ in 0..args.instances {
            let mut child = Command::new(std::env::current_exe()?)
                .args(["--serve", mode, "--gap-ms", &args.gap_ms.to_string()])
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
