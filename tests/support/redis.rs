//! Redis for the tests: the shared server from `REDIS_URL` (`.ci/run` starts one), servers of
//! a test's own (to stop and restart them), and a fresh key prefix per test.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tower_coalesce::redis::RedisStore;

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|ci| ci == "true")
}

/// `REDIS_URL`, or `None` (skip) outside CI; under `CI=true` a missing Redis fails the test.
pub fn redis_url() -> Option<String> {
    match std::env::var("REDIS_URL")
        .ok()
        .filter(|url| !url.is_empty())
    {
        Some(url) => Some(url),
        None if in_ci() => {
            panic!("CI=true but REDIS_URL is not set: the Redis tests must run in CI")
        }
        None => {
            eprintln!("skipped: set REDIS_URL=redis://... to run the Redis tests");
            None
        }
    }
}

/// A fresh key prefix per test run, so that runs never see each other's keys.
pub fn prefix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("tower-coalesce-test:{nanos}:")
}

pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A `redis-server` of the test's own on `port`, killed on drop.
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    pub fn start(port: u16) -> Option<Server> {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn();
        match child {
            Ok(child) => Some(Server { child, port }),
            Err(_) if in_ci() => panic!("CI=true but redis-server can't be started"),
            Err(_) => {
                eprintln!("skipped: redis-server is not on PATH");
                None
            }
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Connects a store, retrying while the server starts.
    pub async fn connect(&self) -> RedisStore {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match RedisStore::connect_with_timeout(&self.url(), Duration::from_millis(200)).await {
                Ok(store) => return store,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(error) => panic!("redis-server did not come up: {error}"),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
