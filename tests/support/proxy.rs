//! A TCP proxy between an instance and its store, with faults the test (or the fault
//! campaign) turns on and off: latency, a blackhole (nothing is forwarded until it ends,
//! as a network partition that heals: TCP delivers what was held), connections reset,
//! and new connections refused.
//!
//! Shared by the integration tests and the fault campaign (`examples/campaign`), which
//! includes this file by path.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The faults in force.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Added before each chunk is forwarded, each way.
    pub latency: Duration,
    /// Nothing is forwarded while set; held data goes on when it ends.
    pub blackhole: bool,
    /// New connections are closed at once while set.
    pub refuse: bool,
    /// Bumped to close every open connection.
    generation: u64,
}

/// A proxy to one upstream address, stopped on drop.
pub struct Proxy {
    pub addr: SocketAddr,
    faults: Arc<watch::Sender<Faults>>,
    /// Reads from the clients' side, of every connection: a store call on its way.
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let faults = Arc::new(watch::Sender::new(Faults::default()));
        let sent = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept(listener, upstream, faults.clone(), sent.clone()));
        Proxy {
            addr,
            faults,
            sent,
            task,
        }
    }

    /// How many reads the proxy took from its clients so far: it grows when an instance
    /// sends its store a call (before the latency, if any, delays it).
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    pub fn set_latency(&self, latency: Duration) {
        self.faults.send_modify(|f| f.latency = latency);
    }

    pub fn set_blackhole(&self, on: bool) {
        self.faults.send_modify(|f| f.blackhole = on);
    }

    pub fn set_refuse(&self, on: bool) {
        self.faults.send_modify(|f| f.refuse = on);
    }

    /// Closes every open connection now.
    pub fn reset(&self) {
        self.faults.send_modify(|f| f.generation += 1);
    }

    /// No faults; open connections stay.
    pub fn heal(&self) {
        self.faults.send_modify(|f| {
            f.latency = Duration::ZERO;
            f.blackhole = false;
            f.refuse = false;
        });
    }

    /// A handle that can set the faults from another runtime or thread.
    pub fn handle(&self) -> ProxyHandle {
        ProxyHandle(self.faults.clone())
    }
}

/// Sets a proxy's faults from anywhere (`watch` needs no runtime to send).
#[derive(Clone)]
pub struct ProxyHandle(Arc<watch::Sender<Faults>>);

impl ProxyHandle {
    pub fn reset_and_refuse(&self, refuse: bool) {
        self.0.send_modify(|f| {
            f.generation += 1;
            f.refuse = refuse;
        });
    }

    pub fn set_refuse(&self, on: bool) {
        self.0.send_modify(|f| f.refuse = on);
    }

    /// An outage of `period`: every open connection reset now, new ones refused until
    /// it ends (a thread ends it, so that it can start from a blocked runtime too).
    pub fn outage(&self, period: Duration) {
        self.reset_and_refuse(true);
        let proxy = self.clone();
        std::thread::spawn(move || {
            std::thread::sleep(period);
            proxy.set_refuse(false);
        });
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.reset();
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    faults: Arc<watch::Sender<Faults>>,
    sent: Arc<AtomicU64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let faults = faults.subscribe();
        if faults.borrow().refuse {
            drop(client);
            continue;
        }
        tokio::spawn(connection(client, upstream, faults, sent.clone()));
    }
}

/// One connection: both directions pumped until either side closes or the proxy resets.
async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    mut faults: watch::Receiver<Faults>,
    sent: Arc<AtomicU64>,
) {
    let generation = faults.borrow().generation;
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let (up, down) = (faults.clone(), faults.clone());
    let pumps = async {
        tokio::select! {
            _ = pump(client_read, server_write, up, Some(sent)) => {}
            _ = pump(server_read, client_write, down, None) => {}
        }
    };
    let reset = async {
        while faults.changed().await.is_ok() {
            if faults.borrow().generation != generation {
                return;
            }
        }
        std::future::pending::<()>().await
    };
    // Either way both halves drop here, and both sockets close.
    tokio::select! {
        _ = pumps => {}
        _ = reset => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut faults: watch::Receiver<Faults>,
    reads: Option<Arc<AtomicU64>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(reads) = &reads {
            reads.fetch_add(1, Ordering::SeqCst);
        }
        let latency = loop {
            let now = *faults.borrow_and_update();
            if !now.blackhole {
                break now.latency;
            }
            if faults.changed().await.is_err() {
                return;
            }
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
