//! Redis for the tests: the shared server from `REDIS_URL` (`.ci/run` starts one), servers of
//! a test's own (to stop and restart them), and a fresh key prefix per test.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tower_coalesce::redis::RedisStore;

/// `REDIS_URL`, or else a `redis-server` of this test process's own, started on first use
/// and shared by its tests (killed once the process ends). Without either the test fails,
/// saying what to install.
pub fn redis_url() -> Option<String> {
    if let Some(url) = std::env::var("REDIS_URL")
        .ok()
        .filter(|url| !url.is_empty())
    {
        return Some(url);
    }
    static SHARED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let url = SHARED.get_or_init(|| {
        let server = Server::start(free_port()).expect("redis-server starts");
        let url = server.url();
        super::when_this_process_ends(&format!("kill {}", server.child.id()));
        std::mem::forget(server);
        url
    });
    Some(url.clone())
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
        Self::start_with(port, |_| {})
    }

    /// A server on `port` with the options `configure` adds.
    fn start_with(port: u16, configure: impl FnOnce(&mut Command)) -> Option<Server> {
        let mut command = Command::new("redis-server");
        command
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null());
        configure(&mut command);
        match command.spawn() {
            Ok(child) => Some(Server { child, port }),
            Err(error) => panic!(
                "redis-server can't be started ({error}): `bash .ci/test` installs it, or \
                 set REDIS_URL"
            ),
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

/// `REDIS_CLUSTER_URLS` (comma-separated, `.ci/redis-cluster.sh` starts one), or else a
/// cluster of this test process's own (three masters), started on first use and shared by
/// its tests (killed and removed once the process ends).
pub fn cluster_urls() -> Option<Vec<String>> {
    if let Some(urls) = std::env::var("REDIS_CLUSTER_URLS")
        .ok()
        .filter(|u| !u.is_empty())
    {
        return Some(urls.split(',').map(str::to_owned).collect());
    }
    static SHARED: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let urls = SHARED.get_or_init(|| {
        let cluster = Cluster::start().expect("a Redis Cluster starts");
        let urls = cluster.urls();
        let pids: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| n.child.id().to_string())
            .collect();
        let dir = cluster.dir.path().display().to_string();
        super::when_this_process_ends(&format!("kill {}; rm -rf {dir}", pids.join(" ")));
        std::mem::forget(cluster);
        urls
    });
    Some(urls.clone())
}

/// Connects a store to the cluster at `urls`, retrying while the cluster comes up.
pub async fn connect_cluster(urls: &[String], timeout: Duration) -> RedisStore {
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match RedisStore::connect_cluster_with_timeout(&urls, timeout).await {
            Ok(store) => return store,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(error) => panic!("the redis cluster did not come up: {error}"),
        }
    }
}

/// A free port for a cluster node: its cluster bus listens 10000 above it.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55535 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

/// A Redis Cluster of the test's own (three masters, no persistence), to kill and restart
/// its nodes; every node is killed on drop.
pub struct Cluster {
    dir: tempfile::TempDir,
    replicas: usize,
    pub nodes: Vec<Server>,
    killed: Vec<usize>,
}

impl Cluster {
    /// Three masters and no replicas.
    pub fn start() -> Option<Cluster> {
        Self::start_with_replicas(0)
    }

    /// Three masters with `replicas` each. With replicas, a node is taken for failed after
    /// one second unreachable (`cluster-node-timeout`), so that a replica takes over soon.
    pub fn start_with_replicas(replicas: usize) -> Option<Cluster> {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for _ in 0..3 * (1 + replicas) {
            nodes.push(Self::node(&dir, free_cluster_port(), replicas)?);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        let cli = |port: u16, args: &[&str]| {
            Command::new("redis-cli")
                .args(["-p", &port.to_string()])
                .args(args)
                .output()
                .expect("redis-cli is not on PATH")
        };
        // Every node answers before the cluster is made of them.
        for node in &nodes {
            while cli(node.port, &["ping"]).stdout != b"PONG\n" {
                assert!(
                    Instant::now() < deadline,
                    "node {} did not answer",
                    node.port
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        loop {
            let created = Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(&addrs)
                .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
                .output()
                .expect("redis-cli is not on PATH");
            if created.status.success() {
                break;
            }
            // A create that failed half way (on a loaded machine) leaves nodes that know of
            // each other or hold slots, which the next create refuses: start them afresh.
            assert!(
                Instant::now() < deadline,
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&created.stdout),
                String::from_utf8_lossy(&created.stderr)
            );
            for node in &nodes {
                cli(node.port, &["flushall"]);
                cli(node.port, &["cluster", "reset", "hard"]);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(Cluster {
            dir,
            replicas,
            nodes,
            killed: Vec::new(),
        })
    }

    fn node(dir: &tempfile::TempDir, port: u16, replicas: usize) -> Option<Server> {
        let config = dir.path().join(format!("nodes-{port}.conf"));
        Server::start_with(port, |command| {
            command
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(config)
                .arg("--dir")
                .arg(dir.path());
            if replicas > 0 {
                command.args(["--cluster-node-timeout", "1000"]);
            }
        })
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Server::url).collect()
    }

    /// Kills node `i` (`SIGKILL`: its data is lost, there is no persistence).
    pub fn kill(&mut self, i: usize) {
        let _ = self.nodes[i].child.kill();
        let _ = self.nodes[i].child.wait();
        self.killed.push(i);
    }

    /// Starts node `i` again on its port, from its cluster config: same id, same slots.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i] = Self::node(&self.dir, self.nodes[i].port, self.replicas).unwrap();
        self.killed.retain(|&k| k != i);
    }

    /// Waits until every live node says the cluster serves all its slots, and every live
    /// replica is in sync with its master (a replica still in its first sync can't take
    /// over a dead master).
    pub async fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let live = (0..self.nodes.len()).filter(|i| !self.killed.contains(i));
        for node in live.map(|i| &self.nodes[i]) {
            loop {
                let ready = async {
                    let client = redis::Client::open(node.url()).ok()?;
                    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                    let cluster: String = redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut conn)
                        .await
                        .ok()?;
                    let replication: String = redis::cmd("INFO")
                        .arg("replication")
                        .query_async(&mut conn)
                        .await
                        .ok()?;
                    Some(
                        cluster.contains("cluster_state:ok")
                            && (replication.contains("role:master")
                                || replication.contains("master_link_status:up")),
                    )
                };
                if ready.await == Some(true) {
                    break;
                }
                assert!(Instant::now() < deadline, "the cluster did not recover");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Calls per command since the server started, from `INFO commandstats`.
pub async fn command_calls(server: &Server) -> HashMap<String, u64> {
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.split(',').find_map(|s| s.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

/// Waits (for at most 10 s) until `n` connections have subscribed to `channel`, counted by
/// the servers at `urls` (`PUBSUB NUMSUB` plus `SHARDNUMSUB`, summed over the nodes of a
/// cluster): a store subscribes by a task of its own, and a message published before that
/// is not delivered, so a sleep "long enough" fails on a loaded machine.
pub async fn subscribed(urls: &[String], channel: &str, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut conns = Vec::new();
    for url in urls {
        let client = redis::Client::open(url.as_str()).unwrap();
        conns.push(client.get_multiplexed_async_connection().await.unwrap());
    }
    loop {
        let mut count = 0;
        for conn in &mut conns {
            for sub in ["NUMSUB", "SHARDNUMSUB"] {
                let (_, subscribers): (String, i64) = redis::cmd("PUBSUB")
                    .arg(sub)
                    .arg(channel)
                    .query_async(conn)
                    .await
                    .unwrap();
                count += subscribers;
            }
        }
        if count >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{count} of {n} subscribers to {channel} after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Kills every client connection of `server` (stores reconnect and report changes lost).
pub async fn kill_connections(server: &Server) {
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for kind in ["pubsub", "normal"] {
        let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg(kind)
            .query_async(&mut conn)
            .await;
    }
}
