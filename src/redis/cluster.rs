//! A Redis Cluster connection that is replaced when it stops answering altogether.
//!
//! redis-rs runs a cluster connection's commands through one driver task. The fault
//! campaign (a node restarted while every connection was killed, seed 2026 of
//! `--store cluster --fault-every-ms 1000`) wedged that task, in redis 1.2.2 and in 1.8.2
//! alike: its recovery waited for the lock of its connection map, which a request it no
//! longer polled had been granted, and from then on every command of the instance timed
//! out, for good, while the cluster itself was fine and the other instances used it. So
//! when the commands have timed out, and nothing answered, for a while, a new connection
//! is made from the same client, and the commands go to it from then on.
//!
//! What counts is a command that got no answer: it timed out, or its caller stopped
//! waiting (the layer's own deadline may come first). An error the connection returns
//! (refused, `CLUSTERDOWN`, a failover's `MOVED`) shows that its driver runs, as does any
//! answer. Replacing a
//! connection that was only slow costs one reconnection; its flights that waited for a
//! release message then poll for it, as after any reconnection. The wedged task is left
//! behind (nothing can stop it from outside): a task and its sockets, once per wedge.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;

/// How many command timeouts' worth of time without any answer makes a connection taken
/// for wedged: long enough that a failover (which answers errors meanwhile) or a burst of
/// slow commands does not trigger it.
const WEDGED_AFTER: u32 = 3;

/// The cluster connection of a store, and what it takes to replace it.
pub(super) struct Cluster {
    client: ClusterClient,
    timeout: Duration,
    current: RwLock<ClusterConnection>,
    /// Since when commands have gone unanswered with no answer in between (`None`:
    /// answering); `silent` says whether it is `Some`, so that an answer, on every
    /// command, takes no lock.
    silent_since: Mutex<Option<Instant>>,
    silent: AtomicBool,
    replacing: AtomicBool,
    /// Channels subscribed for the life of the store (the cache's changes), subscribed
    /// again on a replacement.
    kept_subscriptions: Mutex<Vec<String>>,
}

impl Cluster {
    pub(super) fn new(
        client: ClusterClient,
        conn: ClusterConnection,
        timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Cluster {
            client,
            timeout,
            current: RwLock::new(conn),
            silent_since: Mutex::new(None),
            silent: AtomicBool::new(false),
            replacing: AtomicBool::new(false),
            kept_subscriptions: Mutex::new(Vec::new()),
        })
    }

    /// The connection to send a command on (a handle: clones share the driver).
    pub(super) fn conn(&self) -> ClusterConnection {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A command got an answer (an error reply counts): the connection's driver runs.
    pub(super) fn answered(&self) {
        if self.silent.load(Ordering::Acquire) {
            let mut silent = lock(&self.silent_since);
            *silent = None;
            self.silent.store(false, Ordering::Release);
        }
    }

    /// A command sent at `sent` got no answer: it timed out, or its caller stopped waiting
    /// (the layer's own deadline may come first). Once no command has had an answer for
    /// [`WEDGED_AFTER`] timeouts, the connection is replaced (one replacement at a time,
    /// in a task).
    pub(super) fn unanswered(self: &Arc<Self>, sent: Instant) {
        let since = {
            let mut silent = lock(&self.silent_since);
            // The first unanswered command's time stands until an answer, or a failed
            // replacement, resets it: the next try comes as long after that one.
            let since = silent.unwrap_or(sent);
            *silent = Some(since);
            self.silent.store(true, Ordering::Release);
            since
        };
        if since.elapsed() < self.timeout * WEDGED_AFTER
            || self.replacing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let cluster = self.clone();
        tokio::spawn(async move {
            cluster.replace().await;
            cluster.replacing.store(false, Ordering::Release);
        });
    }

    /// Subscribes `channel` (sharded) for the life of the store: again on every
    /// replacement of the connection.
    pub(super) async fn subscribe_for_good(&self, channel: &str) -> redis::RedisResult<()> {
        {
            let mut kept = lock(&self.kept_subscriptions);
            if !kept.iter().any(|c| c == channel) {
                kept.push(channel.to_owned());
            }
        }
        self.conn().ssubscribe(channel).await
    }

    async fn replace(&self) {
        let made = tokio::time::timeout(self.timeout, self.client.get_async_connection()).await;
        let mut conn = match made {
            Ok(Ok(conn)) => conn,
            Ok(Err(error)) => {
                tracing::warn!(%error, "the Redis Cluster connection stopped answering; a new one failed");
                *lock(&self.silent_since) = Some(Instant::now());
                return;
            }
            Err(_) => {
                tracing::warn!(
                    "the Redis Cluster connection stopped answering; a new one timed out"
                );
                *lock(&self.silent_since) = Some(Instant::now());
                return;
            }
        };
        let channels = lock(&self.kept_subscriptions).clone();
        for channel in channels {
            // Its confirmation tells the cache's listeners that changes may have been lost.
            let subscribed = tokio::time::timeout(self.timeout, conn.ssubscribe(&channel)).await;
            if !matches!(subscribed, Ok(Ok(()))) {
                tracing::warn!(
                    channel,
                    "subscribing the new Redis Cluster connection failed"
                );
            }
        }
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = conn;
        self.answered();
        tracing::warn!(
            "the Redis Cluster connection stopped answering while commands timed out for {:?}; replaced it",
            self.timeout * WEDGED_AFTER
        );
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
