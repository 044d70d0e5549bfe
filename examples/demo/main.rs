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

/// The duplicate-key bug on a real database, without and with the coalescing layer.
#[derive(clap::Parser)]
#[command(name = "demo")]
struct Args {
    /// Identical POSTs fired at once in each round, one connection each.
    #[arg(long, default_value_t = 50, value_parser = at_least_one())]
    callers: usize,
    /// Rounds per mode, each with a new client id.
    #[arg(long, default_value_t = 5, value_parser = at_least_one())]
    rounds: usize,
    /// Milliseconds between the lookup and the insert in the handler: the race window.
    #[arg(long = "gap-ms", default_value = "10", value_parser = parse_millis)]
    gap: Duration,
}

fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

fn parse_millis(value: &str) -> Result<Duration, std::num::ParseIntError> {
    value.parse().map(Duration::from_millis)
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
    let args = <Args as clap::Parser>::parse();
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
        let (p50, p99) = (
            app::percentile(&mut t.latencies, 0.50),
            app::percentile(&mut t.latencies, 0.99),
        );
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
