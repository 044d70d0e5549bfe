//! The campaign's own store servers, from the installed binaries, in temporary directories
//! on free ports of 127.0.0.1: a PostgreSQL cluster (as the `postgres` user under root, as
//! `initdb` requires), single Redis servers (with or without an append-only file), and a
//! Redis Cluster of three masters. The campaign restarts them as faults.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type Error = tower_coalesce::BoxError;

pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

/// A PostgreSQL cluster, stopped (immediately) on drop.
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Postgres {
    pub fn start() -> Result<Postgres, Error> {
        let bin = pg_bin().ok_or("PostgreSQL is not installed (/usr/lib/postgresql/*/bin)")?;
        let dir = tempfile::tempdir()?;
        if is_root() {
            let status = Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path())
                .status()?;
            if !status.success() {
                return Err("chown postgres failed".into());
            }
        }
        let server = Postgres {
            bin,
            dir,
            port: free_port(),
        };
        let data = server.data();
        server.run("initdb", &["-D", &data, "-U", "postgres", "-A", "trust"])?;
        server.start_again()?;
        Ok(server)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<(), Error> {
        let program = self.bin.join(program);
        let mut command = if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            Command::new(&program)
        };
        let status = command
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !status.success() {
            return Err(format!("{} {args:?} failed", program.display()).into());
        }
        Ok(())
    }

    pub fn start_again(&self) -> Result<(), Error> {
        // `fsync` stays on: a restart must keep what was committed, as in production.
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c max_connections=300",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        let data = self.data();
        self.run(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-w", "-o", &options, "start"],
        )
    }

    /// A crash: `pg_ctl stop -m immediate` (committed work is recovered from the WAL).
    pub fn kill(&self) -> Result<(), Error> {
        let data = self.data();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"])
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

fn pg_bin() -> Option<PathBuf> {
    let mut bins: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let version = path.file_name()?.to_str()?.parse().ok()?;
            Some((version, path.join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    bins.sort();
    bins.pop().map(|(_, bin)| bin)
}

/// A `redis-server`, killed on drop.
pub struct Redis {
    dir: PathBuf,
    pub port: u16,
    /// Append-only file with `appendfsync always`: what was answered survives a crash.
    pub aof: bool,
    cluster: bool,
    child: Option<Child>,
}

impl Redis {
    pub fn start(dir: &Path, aof: bool) -> Result<Redis, Error> {
        Self::start_node(dir, aof, false, free_port())
    }

    fn start_node(dir: &Path, aof: bool, cluster: bool, port: u16) -> Result<Redis, Error> {
        let dir = dir.join(port.to_string());
        std::fs::create_dir_all(&dir)?;
        let mut redis = Redis {
            dir,
            port,
            aof,
            cluster,
            child: None,
        };
        redis.start_again()?;
        Ok(redis)
    }

    /// Starts the server (again, after [`kill`](Self::kill)) and waits until it answers.
    pub fn start_again(&mut self) -> Result<(), Error> {
        let mut command = Command::new("redis-server");
        command
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.aof {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        if self.cluster {
            command.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ]);
        }
        self.child = Some(
            command
                .spawn()
                .map_err(|e| format!("redis-server can't be started: {e}"))?,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.ping() {
            if Instant::now() > deadline {
                return Err(format!("redis-server on {} did not start", self.port).into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// A crash: `SIGKILL`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn ping(&self) -> bool {
        self.cli(&["ping"]).is_some_and(|out| out.trim() == "PONG")
    }

    /// `redis-cli -p port args...`, its output if it ran.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of three masters (no replicas), each with an append-only file.
pub struct Cluster {
    pub nodes: Vec<Redis>,
}

impl Cluster {
    pub fn start(dir: &Path) -> Result<Cluster, Error> {
        let mut nodes = Vec::new();
        while nodes.len() < 3 {
            // The cluster bus listens 10000 above the node's port.
            let port = free_port();
            if port > 55535 || std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_err() {
                continue;
            }
            nodes.push(Redis::start_node(dir, true, true, port)?);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !created.success() {
            return Err("redis-cli --cluster create failed".into());
        }
        let cluster = Cluster { nodes };
        cluster.wait_ok()?;
        Ok(cluster)
    }

    /// Waits until every node sees all slots served.
    pub fn wait_ok(&self) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &self.nodes {
            while !node
                .cli(&["cluster", "info"])
                .is_some_and(|info| info.contains("cluster_state:ok"))
            {
                if Instant::now() > deadline {
                    return Err("the Redis Cluster did not come up".into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    pub fn urls(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(Redis::url).collect();
        urls.join(",")
    }
}
