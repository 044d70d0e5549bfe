//! Instances as separate processes on one PostgreSQL: a key runs once across four of them,
//! and when the process that runs it is killed (`SIGKILL`: nothing released, nothing said),
//! another takes over once the lease expires, with a higher fencing token, and answers
//! every remaining caller.
//!
//! The instances are this test binary run again: `instance_process` serves the app when
//! `TOWER_COALESCE_INSTANCE_PG` is set, and does nothing otherwise. The handler records
//! each run, with its fencing token, in a table every process sees.
#![cfg(all(feature = "postgres", feature = "idempotency"))]

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use axum::routing;
use axum::{Extension, Router};
use support::postgres::{database_url, pool, store, table};
use support::processes::{Instance, fire, kill_the_leader_mid_run};
use tower_coalesce::idempotency::IdempotencyLayer;
use tower_coalesce::store::FencingToken;

const PG: &str = "TOWER_COALESCE_INSTANCE_PG";
const TABLE: &str = "TOWER_COALESCE_INSTANCE_TABLE";
const LEASE_MS: &str = "TOWER_COALESCE_INSTANCE_LEASE_MS";
/// When set, the first run of the key never ends (until its process is killed).
const HANG_FIRST: &str = "TOWER_COALESCE_INSTANCE_HANG_FIRST";
const POLL: Duration = Duration::from_millis(200);

/// The instance's `main`, when the parent test runs this binary as an instance.
#[test]
fn instance_process() {
    let Ok(url) = std::env::var(PG) else {
        return;
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(serve_instance(url));
}

async fn serve_instance(url: String) {
    let env = |name| std::env::var(name).unwrap();
    let (table, hang_first) = (env(TABLE), std::env::var(HANG_FIRST).is_ok());
    let lease = Duration::from_millis(env(LEASE_MS).parse().unwrap());
    let pool = pool(&url).await;
    let store = store(&pool, &table, lease, POLL).await;
    let record = format!("INSERT INTO {table}_runs (fence) VALUES ($1) RETURNING id");
    let handler = move |fence: Extension<FencingToken>, body: String| {
        let (pool, record) = (pool.clone(), record.clone());
        async move {
            let fence = fence.0.get() as i64;
            let n: i32 = sqlx::query_scalar(&record)
                .bind(fence)
                .fetch_one(&pool)
                .await
                .unwrap();
            println!("running {n}");
            if hang_first && n == 1 {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let pid = std::process::id();
            (
                StatusCode::CREATED,
                format!("{body}: run {n}, by process {pid}"),
            )
        }
    };
    let app = Router::new()
        .route("/orders", routing::post(handler))
        .layer(IdempotencyLayer::new().store(store));
    println!("listening {}", support::serve(app).await);
    std::future::pending::<()>().await;
}

/// The store's table (made by the first instance's migration) and the runs table.
async fn tables(url: &str) -> (sqlx::PgPool, String) {
    let (pool, table) = (pool(url).await, table());
    let runs = format!("CREATE TABLE {table}_runs (id serial PRIMARY KEY, fence bigint)");
    sqlx::query(&runs).execute(&pool).await.unwrap();
    (pool, table)
}

fn spawn(url: &str, table: &str, lease: Duration, hang_first: bool) -> Instance {
    let mut env = vec![
        (PG, url.to_owned()),
        (TABLE, table.to_owned()),
        (LEASE_MS, lease.as_millis().to_string()),
    ];
    if hang_first {
        env.push((HANG_FIRST, "1".to_owned()));
    }
    Instance::spawn("instance_process", &env)
}

/// The fencing tokens of the runs, in order.
async fn fences(pool: &sqlx::PgPool, table: &str) -> Vec<i64> {
    sqlx::query_scalar(&format!("SELECT fence FROM {table}_runs ORDER BY id"))
        .fetch_all(pool)
        .await
        .unwrap()
}

/// 4 processes x 50 concurrent requests with one key: one run, 200 identical answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_processes_run_a_key_once() {
    let Some(url) = database_url() else {
        return;
    };
    let (pool, table) = tables(&url).await;
    let instances: Vec<Instance> = (0..4)
        .map(|_| spawn(&url, &table, Duration::from_secs(5), false))
        .collect();

    let answers = futures::future::join_all(fire(instances.iter().map(|i| i.addr), 50, "k")).await;
    let answers: Vec<_> = answers.into_iter().map(|a| a.unwrap().unwrap()).collect();

    assert_eq!(
        fences(&pool, &table).await.len(),
        1,
        "runs across four processes"
    );
    assert_eq!(answers[0].0, StatusCode::CREATED);
    assert!(answers[0].1.starts_with("2 apples: run 1, by process "));
    assert!(answers.iter().all(|a| *a == answers[0]));
}

/// The process running the key is killed mid-run. Its 50 callers lose their connections;
/// the other 150 get the answer of one other process, which ran the key once the lease
/// (1 s) expired, with a higher fencing token: within the lease and a poll interval
/// (200 ms) of the kill, plus slack for process scheduling on a loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_running_process_is_killed_another_takes_over_after_the_lease() {
    let Some(url) = database_url() else {
        return;
    };
    let (pool, table) = tables(&url).await;
    let lease = Duration::from_secs(1);
    let instances: Vec<Instance> = (0..4).map(|_| spawn(&url, &table, lease, true)).collect();

    let (survivors, takeover, _instances) = kill_the_leader_mid_run(instances).await;

    let fences = fences(&pool, &table).await;
    assert_eq!(fences.len(), 2, "the killed run and one takeover");
    assert!(
        fences[1] > fences[0],
        "the takeover's token is higher: {fences:?}"
    );
    assert_eq!(survivors.len(), 150);
    assert_eq!(survivors[0].0, StatusCode::CREATED);
    assert!(survivors[0].1.starts_with("2 apples: run 2, by process "));
    assert!(survivors.iter().all(|a| *a == survivors[0]));
    assert!(
        takeover < lease + POLL + Duration::from_secs(2),
        "took {takeover:?}"
    );
}
