//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Semaphore;

/// Holds work back until the test opens it, so that every caller joins the flight first.
#[derive(Clone)]
pub struct Gate(Arc<Semaphore>);

impl Gate {
    pub fn closed() -> Self {
        Gate(Arc::new(Semaphore::new(0)))
    }

    pub async fn pass(&self) {
        self.0
            .acquire()
            .await
            .expect("gate closed for good")
            .forget();
    }

    pub fn open(&self) {
        self.0.add_permits(Semaphore::MAX_PERMITS / 2);
    }
}

/// Counts events across tasks.
#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicUsize>);

impl Counter {
    pub fn incr(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst)
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Waits (yielding, never sleeping long) until the count reaches `n`.
    pub async fn reach(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.get() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "count stuck at {} of {n}",
                self.get()
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
}

/// Runs of a handler, and how many ran at once at most.
#[derive(Clone, Default)]
pub struct Runs {
    pub started: Counter,
    running: Arc<AtomicUsize>,
    most_at_once: Arc<AtomicUsize>,
}

impl Runs {
    /// A run starts; returns its number, from 1.
    pub fn enter(&self) -> usize {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        self.started.incr() + 1
    }

    pub fn leave(&self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
    }

    /// The most runs there were at once.
    pub fn most_at_once(&self) -> usize {
        self.most_at_once.load(Ordering::SeqCst)
    }
}

/// Increments a counter when dropped: tells whether work was dropped before completing.
pub struct DropFlag(pub Counter);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.incr();
    }
}

/// Waits (sleeping 1 ms at a time, for at most 10 s) until `condition` holds.
pub async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// [`eventually`] for a condition that has to be awaited (a query), asked every 10 ms.
#[allow(dead_code, reason = "not every test binary asks a database")]
pub async fn eventually_async<F: std::future::Future<Output = bool>>(
    what: &str,
    mut condition: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Resident set size in KiB, from `/proc/self/statm`.
pub fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("linux /proc");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

/// Serves `app` on a fresh port of 127.0.0.1 until the test's runtime ends.
pub async fn serve(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Serves an app on a runtime of its own, on a thread of its own (one worker): a handler
/// that blocks that thread stalls the whole instance, its lease renewals and its store
/// connections included, as a long GC pause or a frozen VM would.
pub fn instance_on_own_thread(
    make: impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = axum::Router> + Send>> + Send + 'static,
) -> std::net::SocketAddr {
    let (send, addr) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let app = make().await;
            send.send(serve(app).await).unwrap();
            std::future::pending::<()>().await
        });
    });
    addr.recv_timeout(std::time::Duration::from_secs(20))
        .unwrap()
}

/// A response header as text, if present (and visible ASCII: a test response's are).
pub fn header(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers()
        .get(name)
        .map(|value| value.to_str().unwrap().to_owned())
}

#[cfg(all(any(feature = "redis", feature = "postgres"), feature = "idempotency"))]
pub mod instances;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(all(any(feature = "redis", feature = "postgres"), feature = "idempotency"))]
pub mod processes;
#[cfg(any(feature = "redis", feature = "postgres"))]
pub mod proxy;
#[cfg(feature = "redis")]
pub mod redis;

/// Runs per `Accept-Encoding` value, of [`varied_report`].
pub type RunsByEncoding = Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>;

/// `GET /report`: `as [{accept-encoding}]`, kept 300 s, `Vary: accept-encoding`; counts its
/// runs per encoding in `runs`.
pub fn varied_report(runs: &RunsByEncoding) -> axum::Router {
    let runs = runs.clone();
    axum::Router::new().route(
        "/report",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let encoding = headers
                .get("accept-encoding")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            *runs.lock().unwrap().entry(encoding.clone()).or_default() += 1;
            async move {
                (
                    [
                        ("cache-control", "max-age=300"),
                        ("vary", "accept-encoding"),
                    ],
                    format!("as [{encoding}]"),
                )
            }
        }),
    )
}

/// Runs `script` (sh) once this test process has ended, however it ends: the cleanup of a
/// server the process shares between its tests, which no destructor would run (a static is
/// never dropped).
#[allow(dead_code)]
#[allow(
    clippy::zombie_processes,
    reason = "the watcher outlives this process by design: it is never waited for"
)]
pub fn when_this_process_ends(script: &str) {
    let pid = std::process::id();
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {script}"
        ))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("sh is on PATH");
}
