//! Atomic mode of `PostgresStore` (issue 33), over real sockets on a real PostgreSQL: the
//! handler writes in the flight's transaction, and its writes commit with the kept
//! response or not at all.
//!
//! - a leader stalled past its lease: its writes roll back, the instance that took over
//!   commits; one row, one answer for every caller and retry;
//! - a leader cut off from PostgreSQL when it keeps: a `503`, no row, and the retry runs
//!   cleanly (one row);
//! - a `5xx` rolls back (a retry runs again), a `4xx` commits with its kept answer.
#![cfg(all(feature = "idempotency", feature = "postgres"))]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Extension, Router};
use sqlx::PgPool;
use support::instances::post_to;
use support::proxy::Proxy;
use tower_coalesce::idempotency::{IdempotencyLayer, OnStoreError};
use tower_coalesce::postgres::{PostgresStore, Tx};

/// What a run does after its write and before it answers, given its number (from 1).
type Hook = Arc<dyn Fn(usize) -> StatusCode + Send + Sync>;

/// `POST /payments`: inserts `(key, run)` into `{table}_rows` (no unique constraint: the
/// layer alone keeps it to one row) through the flight's transaction, calls `hook`, and
/// answers with its status and `charged on {name}, run {n}`.
fn routes(name: &'static str, table: &str, runs: Arc<AtomicUsize>, hook: Hook) -> Router {
    let insert: Arc<str> = format!("INSERT INTO {table}_rows (key, run) VALUES ($1, $2)").into();
    let handler = move |Extension(tx): Extension<Tx>, headers: HeaderMap, _: Bytes| {
        let (runs, hook, insert) = (runs.clone(), hook.clone(), insert.clone());
        async move {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            let key = headers["idempotency-key"].to_str().unwrap().to_owned();
            let run = format!("{name}-{n}");
            let mut tx = tx.lock().await.unwrap();
            sqlx::query(&insert)
                .bind(&key)
                .bind(&run)
                .execute(&mut *tx)
                .await
                .unwrap();
            drop(tx);
            let status = hook(n);
            (status, format!("charged on {name}, run {n}"))
        }
    };
    Router::new().route("/payments", post(handler))
}

fn answer(status: StatusCode) -> Hook {
    Arc::new(move |_| status)
}

/// An instance on `url` (through a proxy, or not): the idempotency layer on an atomic store
/// of `table`, lease 1 s, poll 100 ms, `timeout` per call, failing closed.
async fn app(url: &str, table: &str, timeout: Duration, routes: Router) -> Router {
    let lease = Duration::from_secs(1);
    let store = support::postgres::store_at(url, table, timeout, lease)
        .await
        .atomic();
    let layer = IdempotencyLayer::new()
        .store(store)
        .on_store_error(OnStoreError::FailClosed);
    routes.layer(layer)
}

/// The shared database: a fresh store table and its rows table.
async fn setup() -> Option<(String, String, PgPool)> {
    let url = support::postgres::database_url()?;
    let table = support::postgres::table();
    let pool = support::postgres::pool(&url).await;
    let store = PostgresStore::builder().table(&table).build(pool.clone());
    store.await.unwrap().migrate().await.unwrap();
    let rows = format!("CREATE TABLE {table}_rows (key text NOT NULL, run text NOT NULL)");
    sqlx::query(&rows).execute(&pool).await.unwrap();
    Some((url, table, pool))
}

async fn rows(pool: &PgPool, table: &str, key: &str) -> Vec<String> {
    let select = format!("SELECT run FROM {table}_rows WHERE key = $1 ORDER BY run");
    sqlx::query_scalar(&select)
        .bind(key)
        .fetch_all(pool)
        .await
        .unwrap()
}

fn upstream(url: &str) -> SocketAddr {
    let host_port = url.rsplit('@').next().unwrap().split('/').next().unwrap();
    host_port.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_leaders_writes_roll_back_and_the_instance_that_took_over_commits() {
    let Some((url, table, pool)) = setup().await else {
        return;
    };
    let timeout = Duration::from_secs(1);
    let runs = Arc::new(AtomicUsize::new(0));
    // A's first run writes, then its whole instance stalls for 3 s, past its 1 s lease.
    let stall: Hook = Arc::new(|n| {
        if n == 1 {
            std::thread::sleep(Duration::from_secs(3));
        }
        StatusCode::CREATED
    });
    let a = {
        let (url, table, runs) = (url.clone(), table.clone(), runs.clone());
        support::instance_on_own_thread(move || {
            Box::pin(async move {
                let routes = routes("A", &table, runs, stall);
                app(&url, &table, timeout, routes).await
            })
        })
    };
    let b = routes("B", &table, runs.clone(), answer(StatusCode::CREATED));
    let b = support::serve(app(&url, &table, timeout, b).await).await;

    let first = tokio::spawn(post_to(a, "/payments", "k-stall", "100 EUR"));
    support::eventually("A's run started", || runs.load(Ordering::SeqCst) == 1).await;
    let second = post_to(b, "/payments", "k-stall", "100 EUR").await;
    let first = first.await.unwrap();
    assert_eq!(
        (second.status, second.body.as_str()),
        (StatusCode::CREATED, "charged on B, run 2")
    );
    assert_eq!(
        (first.status, &first.body),
        (StatusCode::CREATED, &second.body),
        "the stalled leader's caller gets the answer that is kept"
    );
    assert_eq!(
        rows(&pool, &table, "k-stall").await,
        ["B-2"],
        "the stalled leader's write was rolled back"
    );
    for addr in [a, b] {
        let retry = post_to(addr, "/payments", "k-stall", "100 EUR").await;
        assert_eq!((retry.status, retry.replayed), (StatusCode::CREATED, true));
        assert_eq!(retry.body, second.body);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(rows(&pool, &table, "k-stall").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_when_it_keeps_answers_503_and_nothing_lands() {
    let Some((url, table, pool)) = setup().await else {
        return;
    };
    let timeout = Duration::from_millis(300);
    let proxy = Proxy::start(upstream(&url)).await;
    let runs = Arc::new(AtomicUsize::new(0));
    // A's run writes, then every connection of A's is reset (its transaction's included)
    // and new ones refused for 500 ms: its keep and commit can't happen.
    let cut: Hook = {
        let proxy = proxy.handle();
        Arc::new(move |_| {
            proxy.outage(Duration::from_millis(500));
            StatusCode::CREATED
        })
    };
    let via = url.replace(&upstream(&url).to_string(), &proxy.addr.to_string());
    let a = routes("A", &table, runs.clone(), cut);
    let a = support::serve(app(&via, &table, timeout, a).await).await;
    let b = routes("B", &table, runs.clone(), answer(StatusCode::CREATED));
    let b = support::serve(app(&url, &table, timeout, b).await).await;

    let first = post_to(a, "/payments", "k-cut", "5 EUR").await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE, "{first:?}");
    assert!(first.body.contains("nothing it did was kept"), "{first:?}");
    assert!(
        rows(&pool, &table, "k-cut").await.is_empty(),
        "A's write landed"
    );
    // The retry runs cleanly (once A's lease is released or lapsed), and is then replayed.
    let retry = post_to(b, "/payments", "k-cut", "5 EUR").await;
    assert_eq!(
        (retry.status, retry.body.as_str()),
        (StatusCode::CREATED, "charged on B, run 2")
    );
    assert_eq!(rows(&pool, &table, "k-cut").await, ["B-2"]);
    let again = post_to(a, "/payments", "k-cut", "5 EUR").await;
    assert_eq!((again.status, again.replayed), (StatusCode::CREATED, true));
    assert_eq!(again.body, retry.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_error_rolls_back_and_a_client_error_commits_with_its_answer() {
    let Some((url, table, pool)) = setup().await else {
        return;
    };
    let runs = Arc::new(AtomicUsize::new(0));
    // Run 1 fails (500), run 2 succeeds; run 3 (another key) refuses with a 409.
    let by_run: Hook = Arc::new(|n| match n {
        1 => StatusCode::INTERNAL_SERVER_ERROR,
        2 => StatusCode::CREATED,
        _ => StatusCode::CONFLICT,
    });
    let routes = routes("A", &table, runs.clone(), by_run);
    let a = support::serve(app(&url, &table, Duration::from_secs(1), routes).await).await;

    let failed = post_to(a, "/payments", "k-5xx", "1 EUR").await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        rows(&pool, &table, "k-5xx").await.is_empty(),
        "a 500's write landed"
    );
    let retried = post_to(a, "/payments", "k-5xx", "1 EUR").await;
    assert_eq!(
        (retried.status, retried.body.as_str()),
        (StatusCode::CREATED, "charged on A, run 2")
    );
    assert_eq!(rows(&pool, &table, "k-5xx").await, ["A-2"]);

    let refused = post_to(a, "/payments", "k-4xx", "2 EUR").await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    assert_eq!(rows(&pool, &table, "k-4xx").await, ["A-3"]);
    let replayed = post_to(a, "/payments", "k-4xx", "2 EUR").await;
    assert_eq!(
        (replayed.status, replayed.replayed, &replayed.body),
        (StatusCode::CONFLICT, true, &refused.body)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}
