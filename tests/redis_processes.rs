//! Instances as separate processes on one Redis: a key runs once across four of them, and
//! when the process that runs it is killed (`SIGKILL`: nothing released, nothing said),
//! another takes over once the lease expires and answers every remaining caller.
//!
//! The instances are this test binary run again: `instance_process` serves the app when
//! `TOWER_COALESCE_INSTANCE_REDIS` is set, and does nothing otherwise. The handler counts
//! its runs in Redis (`INCR`), the one counter every process sees.
#![cfg(all(feature = "redis", feature = "idempotency"))]

mod support;

use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing;
use support::processes::{Instance, fire, kill_the_leader_mid_run};
use support::redis::{Server, free_port, prefix};
use tower_coalesce::idempotency::IdempotencyLayer;
use tower_coalesce::redis::RedisStore;

const REDIS: &str = "TOWER_COALESCE_INSTANCE_REDIS";
const PREFIX: &str = "TOWER_COALESCE_INSTANCE_PREFIX";
const LEASE_MS: &str = "TOWER_COALESCE_INSTANCE_LEASE_MS";
const POLL_MS: &str = "TOWER_COALESCE_INSTANCE_POLL_MS";
/// When set, the first run of the key never ends (until its process is killed).
const HANG_FIRST: &str = "TOWER_COALESCE_INSTANCE_HANG_FIRST";

/// The instance's `main`, when the parent test runs this binary as an instance.
#[test]
fn instance_process() {
    let Ok(url) = std::env::var(REDIS) else {
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
    let millis = |name| Duration::from_millis(env(name).parse().unwrap());
    let (prefix, hang_first) = (env(PREFIX), std::env::var(HANG_FIRST).is_ok());
    let store = RedisStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(prefix.clone())
        .with_lease(millis(LEASE_MS))
        .with_poll_interval(millis(POLL_MS));
    let counter = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let handler = move |body: String| {
        let (mut counter, runs) = (counter.clone(), format!("{prefix}runs"));
        async move {
            let n: u64 = redis::cmd("INCR")
                .arg(runs)
                .query_async(&mut counter)
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

/// An instance process on `server`, with `lease`; its first run hangs if `hang_first`.
fn spawn(server: &Server, prefix: &str, lease: Duration, hang_first: bool) -> Instance {
    let mut env = vec![
        (REDIS, server.url()),
        (PREFIX, prefix.to_owned()),
        (LEASE_MS, lease.as_millis().to_string()),
        (POLL_MS, POLL.as_millis().to_string()),
    ];
    if hang_first {
        env.push((HANG_FIRST, "1".to_owned()));
    }
    Instance::spawn("instance_process", &env)
}

const POLL: Duration = Duration::from_millis(200);

async fn runs(server: &Server, prefix: &str) -> u64 {
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let runs: Option<u64> = redis::cmd("GET")
        .arg(format!("{prefix}runs"))
        .query_async(&mut conn)
        .await
        .unwrap();
    runs.unwrap_or(0)
}

/// 4 processes x 50 concurrent requests with one key: one run, 200 identical answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_processes_run_a_key_once() {
    let Some(server) = Server::start(free_port()) else {
        return;
    };
    let prefix = prefix();
    let instances: Vec<Instance> = (0..4)
        .map(|_| spawn(&server, &prefix, Duration::from_secs(5), false))
        .collect();

    let answers = futures::future::join_all(fire(instances.iter().map(|i| i.addr), 50, "k")).await;
    let answers: Vec<_> = answers.into_iter().map(|a| a.unwrap().unwrap()).collect();

    assert_eq!(
        runs(&server, &prefix).await,
        1,
        "runs across four processes"
    );
    assert_eq!(answers[0].0, StatusCode::CREATED);
    assert!(answers[0].1.starts_with("2 apples: run 1, by process "));
    assert!(answers.iter().all(|a| *a == answers[0]));
}

/// The process running the key is killed mid-run. Its 50 callers lose their connections;
/// the other 150 get the answer of one other process, which ran the key once the lease
/// (1 s) expired: within the lease and a poll interval (200 ms) of the kill, plus slack
/// for process scheduling on a loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_running_process_is_killed_another_takes_over_after_the_lease() {
    let Some(server) = Server::start(free_port()) else {
        return;
    };
    let (prefix, lease) = (prefix(), Duration::from_secs(1));
    let instances: Vec<Instance> = (0..4)
        .map(|_| spawn(&server, &prefix, lease, true))
        .collect();

    let (survivors, takeover, _instances) = kill_the_leader_mid_run(instances).await;

    assert_eq!(
        runs(&server, &prefix).await,
        2,
        "the killed run and one takeover"
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
