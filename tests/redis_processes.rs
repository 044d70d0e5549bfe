//! Instances as separate processes on one Redis: a key runs once across four of them, and
//! when the process that runs it is killed (`SIGKILL`: nothing released, nothing said),
//! another takes over once the lease expires and answers every remaining caller.
//!
//! The instances are this test binary run again: `instance_process` serves the app when
//! `TOWER_COALESCE_INSTANCE_REDIS` is set, and does nothing otherwise. The handler counts
//! its runs in Redis (`INCR`), the one counter every process sees.
#![cfg(feature = "redis")]

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing;
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

/// An instance process, killed on drop; its stdout lines arrive on `lines`.
struct Instance {
    child: Child,
    addr: SocketAddr,
    lines: mpsc::Receiver<String>,
}

impl Instance {
    fn spawn(server: &Server, prefix: &str, lease: Duration, hang_first: bool) -> Instance {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([
                "instance_process",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(REDIS, server.url())
            .env(PREFIX, prefix)
            .env(LEASE_MS, lease.as_millis().to_string())
            .env(POLL_MS, POLL.as_millis().to_string())
            .stdout(Stdio::piped());
        if hang_first {
            command.env(HANG_FIRST, "1");
        }
        let mut child = command.spawn().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        // Killed on drop from here on, should the wait below fail.
        let mut instance = Instance {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            lines: mpsc::channel().1,
        };
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let _ = send.send(line);
            }
        });
        // libtest prints `test instance_process ... ` before the test's own output.
        instance.addr = loop {
            let line = lines
                .recv_timeout(Duration::from_secs(30))
                .expect("the instance process did not start listening");
            if let Some((_, addr)) = line.split_once("listening ") {
                break addr.parse().unwrap();
            }
        };
        instance.lines = lines;
        instance
    }

    /// Whether the instance printed `line` within `within`.
    fn said(&self, line: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(said) if said == line => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const POLL: Duration = Duration::from_millis(200);

async fn post(addr: SocketAddr, key: &str) -> Result<(StatusCode, String), reqwest::Error> {
    let res = reqwest::Client::new()
        .post(format!("http://{addr}/orders"))
        .header("idempotency-key", key)
        .body("2 apples")
        .timeout(Duration::from_secs(30))
        .send()
        .await?;
    Ok((res.status(), res.text().await?))
}

fn fire(
    addrs: impl Iterator<Item = SocketAddr>,
    n: usize,
    key: &str,
) -> Vec<tokio::task::JoinHandle<Result<(StatusCode, String), reqwest::Error>>> {
    addrs
        .flat_map(|addr| std::iter::repeat_n(addr, n))
        .map(|addr| {
            let key = key.to_owned();
            tokio::spawn(async move { post(addr, &key).await })
        })
        .collect()
}

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
        .map(|_| Instance::spawn(&server, &prefix, Duration::from_secs(5), false))
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
    let mut instances: Vec<Instance> = (0..4)
        .map(|_| Instance::spawn(&server, &prefix, lease, true))
        .collect();

    let requests: Vec<_> = instances
        .iter()
        .map(|i| fire(std::iter::once(i.addr), 50, "k"))
        .collect();
    let leader = loop {
        if let Some(i) = instances
            .iter()
            .position(|i| i.said("running 1", Duration::from_millis(50)))
        {
            break i;
        }
    };
    // Long enough for the others' callers to arrive and wait, and for a renewal or two.
    tokio::time::sleep(Duration::from_millis(700)).await;

    let killed = Instant::now();
    drop(instances.remove(leader));
    let mut survivors = Vec::new();
    for (i, requests) in requests.into_iter().enumerate() {
        let answers = futures::future::join_all(requests).await;
        if i == leader {
            assert!(answers.iter().all(|a| a.as_ref().unwrap().is_err()));
        } else {
            survivors.extend(answers.into_iter().map(|a| a.unwrap().unwrap()));
        }
    }
    let takeover = killed.elapsed();
    eprintln!("all 150 survivors answered {takeover:?} after the kill");

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
