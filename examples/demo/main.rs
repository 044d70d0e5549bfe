//! The duplicate-key bug for real, and the one-line fix.
//!
//! An axum app whose `POST /api/clients` looks the client up and inserts it if missing,
//! on a real database, is served on 127.0.0.1. The demo fires N identical POSTs at it at
//! once, from N connections, for several rounds (a new client id each round): first
//! without the coalescing layer, then with it. Every number printed is counted.
//!
//!     cargo run --example demo                      # SQLite file in a temp dir
//!     DATABASE_URL=postgres://... cargo run --example demo
//!     cargo run --example demo -- --callers 100 --rounds 10 --gap-ms 0

#[path = "app.rs"]
mod app;

use std::time::Duration;

use axum::http::StatusCode;

struct Args {
    callers: usize,
    rounds: usize,
    gap: Duration,
}

fn args() -> Args {
    let mut args = Args {
        callers: 50,
        rounds: 5,
        gap: Duration::from_millis(10),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value: u64 = it
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| usage(&flag));
        match flag.as_str() {
            "--callers" => args.callers = value.max(1) as usize,
            "--rounds" => args.rounds = value.max(1) as usize,
            "--gap-ms" => args.gap = Duration::from_millis(value),
            _ => usage(&flag),
        }
    }
    args
}

fn usage(flag: &str) -> ! {
    eprintln!("bad argument {flag:?}; usage: demo [--callers N] [--rounds N] [--gap-ms N]");
    std::process::exit(2)
}

/// One line of the table.
#[derive(Default)]
struct Tally {
    requests: usize,
    ok: usize,
    server_errors: usize,
    other: usize,
    rows: i64,
    executions: usize,
    latencies: Vec<Duration>,
    first_error: Option<String>,
}

impl Tally {
    fn percentile(&mut self, p: f64) -> Duration {
        self.latencies.sort();
        let i = ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[i - 1]
    }
}

async fn run(url: &str, coalesce: bool, args: &Args) -> Result<Tally, sqlx::Error> {
    let pool = app::connect(url).await?;
    let state = app::AppState::new(pool, args.gap);
    let addr = app::serve(app::router(
        state.clone(),
        coalesce.then(app::coalesce_layer),
    ))
    .await;
    let base = format!("http://{addr}");
    let mut tally = Tally::default();
    for round in 0..args.rounds {
        let id = format!("client-{round}");
        for received in app::fire(&base, &id, args.callers).await {
            tally.requests += 1;
            tally.latencies.push(received.latency);
            if received.status.is_success() {
                tally.ok += 1;
            } else if received.status == StatusCode::INTERNAL_SERVER_ERROR {
                tally.server_errors += 1;
                tally
                    .first_error
                    .get_or_insert_with(|| String::from_utf8_lossy(&received.body).into_owned());
            } else {
                tally.other += 1;
            }
        }
        tally.rows += state.rows(&id).await;
    }
    tally.executions = state.executions();
    Ok(tally)
}

/// The URL without its password, for printing.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _password)) => {
                    format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
                }
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = args();
    let temp = tempfile::tempdir()?;
    let (url, database) = match std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) {
        Some(url) => {
            let shown = format!("PostgreSQL at {}", redact(&url));
            (url, shown)
        }
        None => {
            let path = temp.path().join("demo.db");
            let shown = format!("SQLite file {}", path.display());
            (format!("sqlite://{}?mode=rwc", path.display()), shown)
        }
    };

    println!(
        "POST /api/clients: {} identical creates at once, {} rounds (a new client id each)",
        args.callers, args.rounds
    );
    println!("database: {database}");
    println!(
        "handler: SELECT the id; if none, wait {} ms, then INSERT. The wait stands for the round trip \
         to a remote database, which a local one does not have; --gap-ms 0 removes it.",
        args.gap.as_millis()
    );
    println!();
    println!(
        "{:<14} {:>8} {:>6} {:>6} {:>6} {:>6} {:>13} {:>9} {:>9}   database error seen",
        "", "requests", "2xx", "500", "other", "rows", "handler runs", "p50", "p99"
    );
    let mut late = 0;
    for (label, coalesce) in [("without layer", false), ("with layer", true)] {
        let mut t = run(&url, coalesce, &args).await?;
        if coalesce {
            late = t.executions.saturating_sub(args.rounds);
        }
        let (p50, p99) = (t.percentile(0.50), t.percentile(0.99));
        println!(
            "{:<14} {:>8} {:>6} {:>6} {:>6} {:>6} {:>13} {:>6.1} ms {:>6.1} ms   {}",
            label,
            t.requests,
            t.ok,
            t.server_errors,
            t.other,
            t.rows,
            t.executions,
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            t.first_error.as_deref().unwrap_or("none"),
        );
    }
    if late > 0 {
        println!(
            "\n{late} request(s) with the layer arrived after their round's flight had completed: \
             they ran the handler again, found the row and answered 200. Coalescing joins requests \
             that overlap in time; it does not remember results."
        );
    }
    Ok(())
}
