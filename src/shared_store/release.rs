//! What the stores shared by several instances have in common for their leases: tokens
//! that no other lease has, and the local flights that wait for a key's release message.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use crate::BoxError;

/// Renews a lease of `lease` every third of it, by `renew` (`Ok(true)`: renewed,
/// `Ok(false)`: the lease was lost), until the lease is lost or the task is aborted (the
/// guard completes or drops). A failed renewal is retried at the next tick.
pub(crate) async fn renew_every_third<F, Fut>(lease: std::time::Duration, mut renew: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, BoxError>>,
{
    let mut every = tokio::time::interval(lease / 3);
    every.tick().await;
    loop {
        every.tick().await;
        match renew().await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    "an idempotency lease expired while its request ran; another instance \
                     may run the request too"
                );
                return;
            }
            Err(error) => tracing::warn!(%error, "renewing an idempotency lease failed; retrying"),
        }
    }
}

/// A token no other lease, in this process or another, ever has: 64 random bits per
/// process (the OS-seeded `RandomState`), the time, and a counter.
pub(crate) fn token() -> String {
    static PROCESS: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let process = *PROCESS.get_or_init(|| RandomState::new().hash_one(std::process::id()));
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{process:016x}-{nanos:x}-{n:x}")
}

/// The local flights that wait for a release, by channel. Whatever receives the store's
/// release messages wakes them when one arrives on their channel.
#[derive(Default)]
pub(crate) struct Waiters {
    channels: Mutex<HashMap<String, Waiting>>,
}

struct Waiting {
    notify: Arc<Notify>,
    count: usize,
}

impl Waiters {
    /// Registers interest in `channel` until the returned guard drops.
    pub(crate) fn register(self: &Arc<Self>, channel: &str) -> Registration {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let waiting = channels
            .entry(channel.to_owned())
            .or_insert_with(|| Waiting {
                notify: Arc::new(Notify::new()),
                count: 0,
            });
        waiting.count += 1;
        Registration {
            notify: waiting.notify.clone(),
            waiters: self.clone(),
            channel: channel.to_owned(),
        }
    }

    /// Wakes the flights waiting on `channel`. Must not block, and doesn't (a short lock).
    pub(crate) fn wake(&self, channel: &str) {
        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(waiting) = channels.get(channel) {
            waiting.notify.notify_waiters();
        }
    }

    /// Wakes every waiting flight: their messages may have been lost (a connection that
    /// dropped), so each looks again on its own.
    pub(crate) fn wake_all(&self) {
        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        for waiting in channels.values() {
            waiting.notify.notify_waiters();
        }
    }

    #[cfg(all(test, feature = "redis"))]
    pub(crate) fn is_empty(&self) -> bool {
        self.channels.lock().unwrap().is_empty()
    }
}

pub(crate) struct Registration {
    pub(crate) notify: Arc<Notify>,
    waiters: Arc<Waiters>,
    channel: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut channels = self
            .waiters
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(waiting) = channels.get_mut(&self.channel) {
            waiting.count -= 1;
            if waiting.count == 0 {
                channels.remove(&self.channel);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique() {
        let tokens: std::collections::HashSet<_> = (0..10_000).map(|_| token()).collect();
        assert_eq!(tokens.len(), 10_000);
    }
}
