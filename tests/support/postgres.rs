//! PostgreSQL for the tests: the shared server from `DATABASE_URL` (`.ci/run` starts one),
//! servers of a test's own (to kill and restart them), and a fresh table per test.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tower_coalesce::postgres::PostgresStore;

/// `DATABASE_URL`, or else a throwaway server of this test process's own, started from the
/// installed binaries on first use and shared by its tests (stopped and removed once the
/// process ends). Without either the test fails, saying what to install: a test that did
/// not run is not reported as passed.
pub fn database_url() -> Option<String> {
    if let Some(url) = std::env::var("DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty())
    {
        return Some(url);
    }
    static SHARED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let url = SHARED.get_or_init(|| {
        let server = Server::start_or_fail();
        let url = server.url();
        // Its cleanup outlives it: the process's end stops the server and removes it.
        let stop =
            server.command_line("pg_ctl", &["-D", &server.data(), "-m", "immediate", "stop"]);
        let dir = server.dir.path().display().to_string();
        super::when_this_process_ends(&format!("{stop}; rm -rf {dir}"));
        std::mem::forget(server);
        url
    });
    Some(url.clone())
}

/// A fresh table name per test run, so that runs never see each other's rows.
pub fn table() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("tc_test_{nanos}")
}

pub async fn pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(16)
        .connect(url)
        .await
        .expect("PostgreSQL at DATABASE_URL")
}

/// A store on `table` (created), with `lease` and `poll` (the poll interval).
pub async fn store(pool: &PgPool, table: &str, lease: Duration, poll: Duration) -> PostgresStore {
    let store = PostgresStore::builder()
        .table(table)
        .build(pool.clone())
        .await
        .unwrap()
        .with_lease(lease)
        .with_poll_interval(poll);
    store.migrate().await.unwrap();
    store
}

/// A store on `table` (made already) at `url`, as an instance of its own would make it: a
/// pool of 8 whose connections wait at most `timeout`, every call `timeout`, `lease`, and a
/// poll of 100 ms.
pub async fn store_at(url: &str, table: &str, timeout: Duration, lease: Duration) -> PostgresStore {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(timeout)
        .connect(url)
        .await
        .unwrap();
    PostgresStore::builder()
        .table(table)
        .timeout(timeout)
        .build(pool)
        .await
        .unwrap()
        .with_lease(lease)
        .with_poll_interval(Duration::from_millis(100))
}

/// The rows of `table`.
pub async fn rows(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A PostgreSQL server of the test's own, in a temporary directory on a free port of
/// 127.0.0.1, stopped (immediately) and removed on drop. As root, it runs as the
/// `postgres` user (`initdb` refuses root), as `.ci/postgres.sh` does.
pub struct Server {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Server {
    /// A server of the test's own; fails the test where PostgreSQL is not installed.
    pub fn start() -> Option<Server> {
        Some(Self::start_or_fail())
    }

    fn start_or_fail() -> Server {
        let Some(bin) = pg_bin() else {
            panic!(
                "PostgreSQL's binaries are not installed (/usr/lib/postgresql/*/bin): \
                 `bash .ci/test` installs them, or set DATABASE_URL"
            );
        };
        let dir = tempfile::tempdir().unwrap();
        if is_root() {
            chown_postgres(dir.path());
        }
        let port = free_port();
        let server = Server { bin, dir, port };
        server.run(
            "initdb",
            &["-D", &server.data(), "-U", "postgres", "-A", "trust"],
        );
        server.start_again();
        server
    }

    /// The shell command that runs one of PostgreSQL's programs as [`command`] does.
    fn command_line(&self, program: &str, args: &[&str]) -> String {
        let program = self.bin.join(program).display().to_string();
        let runuser = if is_root() {
            "runuser -u postgres -- "
        } else {
            ""
        };
        format!("{runuser}{program} {} >/dev/null 2>&1", args.join(" "))
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// Runs one of PostgreSQL's programs, as `postgres` if this is root.
    fn run(&self, program: &str, args: &[&str]) {
        let status = self.command(program, args).status().unwrap();
        assert!(status.success(), "{program} {args:?} failed");
    }

    /// One of PostgreSQL's programs with `args`, as `postgres` if this is root, quiet.
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let program = self.bin.join(program);
        let mut command = if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            Command::new(&program)
        };
        command
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    }

    /// Starts the server (again), and waits until it accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-w",
                "-o",
                &options,
                "start",
            ],
        );
    }

    /// Kills the server as a crash would: `pg_ctl stop -m immediate` (no shutdown
    /// checkpoint; what was committed is recovered from the WAL at the next start).
    pub fn kill(&self) {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A pool on this server, retrying while it starts.
    pub async fn pool(&self) -> PgPool {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let options = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(1));
            match options.connect(&self.url()).await {
                Ok(pool) => return pool,
                Err(error) if Instant::now() > deadline => panic!("{error}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let data = self.data();
        let stop = ["-D", data.as_str(), "-m", "immediate", "stop"];
        let _ = self.command("pg_ctl", &stop).status();
    }
}

/// The newest `/usr/lib/postgresql/*/bin` with `initdb`, as Debian installs it.
fn pg_bin() -> Option<PathBuf> {
    let mut bins: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    bins.sort_by_key(|bin| {
        let version = bin
            .parent()
            .and_then(|v| v.file_name()?.to_str()?.parse().ok());
        version.unwrap_or(0u32)
    });
    bins.pop()
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn is_root() -> bool {
    // `id -u` rather than libc: the tests have no libc dependency.
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

fn chown_postgres(path: &std::path::Path) {
    let status = Command::new("chown")
        .arg("postgres:postgres")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}
