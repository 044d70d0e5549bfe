//! A cache stampede for real, and what coalescing and the cache do to it.
//!
//! An axum app serves `GET /api/report/{id}`: an aggregate over every order (no index on
//! purpose: a real scan of many rows, as reports are), with
//! `Cache-Control: max-age=1, stale-while-revalidate=30`. The demo fills the entry, waits
//! until it has expired, and then fires N requests for it at once, three times: without a
//! layer, with coalescing only (`HttpCoalesceLayer`), and with the cache (`HttpCacheLayer`,
//! stale-while-revalidate). It prints the database queries run (counted by the handler)
//! and the latencies the clients saw.
//!
//! With `--instances 4` the requests spread over 4 instances of the app (a server and a
//! layer each, as 4 processes behind a load balancer would be); built with the feature
//! `redis` and given `REDIS_URL`, a fourth run shares one cache between the instances:
//! Redis, with a near cache in front on each instance.
//!
//!     cargo run --release --example stampede --features http-cache                  # SQLite file
//!     DATABASE_URL=postgres://... cargo run --release --example stampede --features http-cache
//!     cargo run --release --example stampede --features http-cache -- --requests 300 --rows 50000
//!     REDIS_URL=redis://... cargo run --release --example stampede --features http-cache,redis -- --instances 4

#[path = "demo/app.rs"]
mod app;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sqlx::{AnyPool, Row};
use tower_coalesce::http::{HttpCoalesceLayer, key};
use tower_coalesce::http_cache::HttpCacheLayer;

/// Clients multiplex their requests over this many HTTP/2 connections, so that a thousand
/// requests need no thousand file descriptors.
const CONNECTIONS: usize = 10;

fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

/// A cached report at the moment it expires, without a layer, with coalescing, with the cache.
#[derive(clap::Parser)]
#[command(name = "stampede")]
struct Args {
    /// Requests fired at once at the expiry.
    #[arg(long, default_value_t = 1000, value_parser = at_least_one())]
    requests: usize,
    /// Orders in the table the report scans (no index: the scan is the cost).
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    rows: u64,
    /// Instances of the app the requests spread over.
    #[arg(long, default_value_t = 1, value_parser = at_least_one())]
    instances: usize,
}

#[derive(Clone)]
struct AppState {
    pool: AnyPool,
    queries: Arc<AtomicUsize>,
}

/// Connects and fills `orders` with `rows` rows over 100 reports.
async fn connect(url: &str, rows: u64) -> Result<AnyPool, sqlx::Error> {
    let pool = app::pool(url).await?;
    sqlx::query("DROP TABLE IF EXISTS orders")
        .execute(&pool)
        .await?;
    sqlx::query("CREATE TABLE orders (id INTEGER PRIMARY KEY, report_id INTEGER NOT NULL, amount INTEGER NOT NULL)")
        .execute(&pool)
        .await?;
    // No index on report_id: the report scans every order, as an aggregate over a big
    // table does.
    sqlx::query(
        "WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < $1) \
         INSERT INTO orders (id, report_id, amount) SELECT n, n % 100, n % 997 FROM seq",
    )
    .bind(rows as i64)
    .execute(&pool)
    .await?;
    Ok(pool)
}

async fn report(State(state): State<AppState>, Path(id): Path<i64>) -> Response {
    state.queries.fetch_add(1, Ordering::SeqCst);
    let row = sqlx::query(
        "SELECT COUNT(*) AS orders, SUM(amount) AS total FROM orders WHERE report_id = $1",
    )
    .bind(id)
    .fetch_one(&state.pool)
    .await;
    match row {
        Ok(row) => {
            let orders: i64 = row.get("orders");
            let total: i64 = row.try_get("total").unwrap_or(0);
            (
                [("cache-control", "max-age=1, stale-while-revalidate=30")],
                format!("{{\"report\":{id},\"orders\":{orders},\"total\":{total}}}"),
            )
                .into_response()
        }
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

#[derive(Clone, PartialEq)]
enum Mode {
    Bare,
    Coalescing,
    Cache,
    /// One cache for every instance: Redis (at this URL, under this prefix), with a near
    /// cache on each.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Shared(String, String),
}

async fn serve(state: AppState, mode: &Mode) -> std::net::SocketAddr {
    let routes = Router::new()
        .route("/api/report/{id}", get(report))
        .with_state(state);
    let app = match mode {
        Mode::Bare => routes,
        // Public data: one flight for everyone, whoever asks.
        Mode::Coalescing => {
            routes.layer(HttpCoalesceLayer::new(key::method_path_and_query()).unscoped())
        }
        Mode::Cache => routes.layer(HttpCacheLayer::new().unscoped()),
        #[cfg(feature = "redis")]
        Mode::Shared(url, prefix) => {
            let store = tower_coalesce::redis::RedisStore::connect(url)
                .await
                .expect("Redis at REDIS_URL")
                .with_prefix(prefix.as_str());
            let cache = HttpCacheLayer::new()
                .unscoped()
                .store(store)
                .near_cache(16 << 20);
            routes.layer(cache)
        }
        #[cfg(not(feature = "redis"))]
        Mode::Shared(..) => unreachable!("a shared cache needs the feature redis"),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

struct Burst {
    ok: usize,
    stale: usize,
    queries: usize,
    latencies: Vec<Duration>,
    /// The first failed answer: its status and body.
    failure: Option<String>,
}

async fn burst(mode: &Mode, args: &Args) -> Burst {
    let state = AppState {
        pool: POOL.get().unwrap().clone(),
        queries: Arc::default(),
    };
    let mut reports = Vec::new();
    for _ in 0..args.instances {
        let addr = serve(state.clone(), mode).await;
        reports.push(format!("http://{addr}/api/report/7"));
    }
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            reqwest::Client::builder()
                .http2_prior_knowledge()
                .no_proxy()
                .build()
                .unwrap()
        })
        .collect();
    // Fill the entry (and open the connections), then let it expire: max-age=1, and ages
    // count in whole seconds from `Date`.
    for client in &clients {
        for report in &reports {
            client
                .get(report)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let before = state.queries.load(Ordering::SeqCst);

    let barrier = Arc::new(tokio::sync::Barrier::new(args.requests));
    let calls: Vec<_> = (0..args.requests)
        .map(|i| {
            let (client, url, barrier) = (
                clients[i % CONNECTIONS].clone(),
                reports[i % reports.len()].clone(),
                barrier.clone(),
            );
            tokio::spawn(async move {
                barrier.wait().await;
                let start = Instant::now();
                let res = client.get(&url).send().await.expect("request failed");
                let stale = res
                    .headers()
                    .get("cache-status")
                    .is_some_and(|v| v.to_str().unwrap_or("").contains("stale"));
                let status = res.status();
                let body = res.bytes().await.expect("body failed");
                let failure = (!status.is_success())
                    .then(|| format!("{status}: {}", String::from_utf8_lossy(&body)));
                (failure, stale, start.elapsed())
            })
        })
        .collect();
    let mut out = Burst {
        ok: 0,
        stale: 0,
        queries: 0,
        latencies: Vec::new(),
        failure: None,
    };
    for call in calls {
        let (failure, stale, latency) = call.await.unwrap();
        out.ok += failure.is_none() as usize;
        if out.failure.is_none() {
            out.failure = failure;
        }
        out.stale += stale as usize;
        out.latencies.push(latency);
    }
    // A background refresh counts too: wait until it has run.
    tokio::time::sleep(Duration::from_millis(500)).await;
    out.queries = state.queries.load(Ordering::SeqCst) - before;
    out
}

static POOL: std::sync::OnceLock<AnyPool> = std::sync::OnceLock::new();

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = <Args as clap::Parser>::parse();
    let temp = tempfile::tempdir()?;
    let (url, database) = match std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) {
        Some(url) => (url, "PostgreSQL (DATABASE_URL)".to_owned()),
        None => {
            let path = temp.path().join("stampede.db");
            let shown = format!("SQLite file {}", path.display());
            (format!("sqlite://{}?mode=rwc", path.display()), shown)
        }
    };
    let pool = connect(&url, args.rows).await?;
    let one = Instant::now();
    sqlx::query("SELECT COUNT(*), SUM(amount) FROM orders WHERE report_id = 7")
        .fetch_one(&pool)
        .await?;
    let query_time = one.elapsed();
    POOL.set(pool).ok();

    println!(
        "GET /api/report/7: {} requests at once over {} instance(s), the moment its cached \
         entry has expired",
        args.requests, args.instances
    );
    println!(
        "database: {database}, {} orders, one report query {:.1} ms (a scan, no index)",
        args.rows,
        query_time.as_secs_f64() * 1e3
    );
    println!("response: Cache-Control: max-age=1, stale-while-revalidate=30");
    println!();
    println!(
        "{:<22} {:>8} {:>6} {:>11} {:>7} {:>10} {:>10}",
        "", "requests", "2xx", "db queries", "stale", "p50", "p99"
    );
    let mut failures = Vec::new();
    let mut modes = vec![
        ("no layer", Mode::Bare),
        ("coalescing only", Mode::Coalescing),
        ("cache (SWR)", Mode::Cache),
    ];
    let redis = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty());
    match redis {
        Some(url) if cfg!(feature = "redis") => {
            let prefix = format!("stampede:{}:", std::process::id());
            modes.push(("shared cache (Redis)", Mode::Shared(url, prefix)));
        }
        _ if args.instances > 1 => println!(
            "(a cache shared by the instances needs REDIS_URL and the feature redis; \
             without, each instance caches and refreshes on its own)\n"
        ),
        _ => {}
    }
    for (label, mode) in &modes {
        let mut b = burst(mode, &args).await;
        let (p50, p99) = (
            app::percentile(&mut b.latencies, 0.50),
            app::percentile(&mut b.latencies, 0.99),
        );
        println!(
            "{:<22} {:>8} {:>6} {:>11} {:>7} {:>7.2} ms {:>7.2} ms",
            label,
            args.requests,
            b.ok,
            b.queries,
            b.stale,
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
        );
        if let Some(failure) = b.failure {
            failures.push(format!(
                "{label}: {} failed, the first with {failure}",
                args.requests - b.ok
            ));
        }
    }
    for failure in failures {
        println!("{failure}");
    }
    println!(
        "\ndb queries: report queries the handler ran for the burst (a background refresh \
         included). stale: answers served from the expired entry while one refresh ran."
    );
    Ok(())
}
