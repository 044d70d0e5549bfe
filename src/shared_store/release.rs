//! What the stores shared by several instances have in common for their leases: tokens
//! that no other lease has, and the local flights that wait for a key's release message.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
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
/// release messages wakes them when one arrives on their channel, with the response the
/// release kept when the message carries it.
#[derive(Default)]
pub(crate) struct Waiters {
    channels: Mutex<HashMap<String, Waiting>>,
}

struct Waiting {
    notify: Arc<Notify>,
    count: usize,
    /// How many releases were heard on the channel while someone waited on it, and the
    /// response the last one carried: a flight takes it only if it came after the flight
    /// registered (an earlier release's answer may be another lease's).
    releases: u64,
    answer: Option<Bytes>,
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
                releases: 0,
                answer: None,
            });
        waiting.count += 1;
        Registration {
            notify: waiting.notify.clone(),
            waiters: self.clone(),
            channel: channel.to_owned(),
            releases: waiting.releases,
        }
    }

    /// Wakes the flights waiting on `channel`, with the response the release kept if its
    /// message carried it. Must not block, and doesn't (a short lock).
    pub(crate) fn wake(&self, channel: &str, answer: Option<Bytes>) {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(waiting) = channels.get_mut(channel) {
            waiting.releases += 1;
            waiting.answer = answer;
            waiting.notify.notify_waiters();
        }
    }

    /// Wakes every waiting flight: their messages may have been lost (a connection that
    /// dropped), so each looks again on its own.
    pub(crate) fn wake_all(&self) {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        for waiting in channels.values_mut() {
            waiting.releases += 1;
            waiting.answer = None;
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
    /// The channel's releases when this registered.
    #[cfg_attr(
        not(any(feature = "postgres", test)),
        allow(dead_code, reason = "only PostgreSQL's release messages carry answers")
    )]
    releases: u64,
}

impl Registration {
    #[cfg_attr(
        not(any(feature = "postgres", test)),
        allow(dead_code, reason = "only PostgreSQL's release messages carry answers")
    )]
    /// The response the last release heard since this registered kept, if its message
    /// carried one. Several releases since (a key released, leased again and released)
    /// answer the last one's: the key's answer as of the last release.
    pub(crate) fn answer(&self) -> Option<Bytes> {
        self.since_registered(|waiting| waiting.answer.clone())
            .flatten()
    }

    /// Whether a release was heard on the channel since this registered.
    #[cfg_attr(
        not(any(feature = "postgres", test)),
        allow(
            dead_code,
            reason = "only PostgreSQL registers before its lease statement"
        )
    )]
    pub(crate) fn heard(&self) -> bool {
        self.since_registered(|_| ()).is_some()
    }

    /// `read` of the channel, if a release was heard on it since this registered.
    fn since_registered<T>(&self, read: impl FnOnce(&Waiting) -> T) -> Option<T> {
        let channels = self
            .waiters
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let waiting = channels.get(&self.channel)?;
        (waiting.releases > self.releases).then(|| read(waiting))
    }
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

    /// A flight takes the answer of a release heard after it registered, never one heard
    /// before (another lease's); a release without an answer, or every flight woken at
    /// once after a lost connection, leaves it to look the key up.
    #[test]
    fn a_flight_takes_only_the_answer_of_a_release_after_it_registered() {
        let waiters = Arc::new(Waiters::default());
        let early = waiters.register("key");
        waiters.wake("key", Some(Bytes::from_static(b"first")));
        let late = waiters.register("key");
        assert_eq!(early.answer().as_deref(), Some(&b"first"[..]));
        assert_eq!(late.answer(), None, "a release before it registered");
        waiters.wake("key", Some(Bytes::from_static(b"second")));
        assert_eq!(late.answer().as_deref(), Some(&b"second"[..]));
        waiters.wake("key", None);
        assert_eq!(late.answer(), None, "a release that carried none");
        waiters.wake("key", Some(Bytes::from_static(b"third")));
        waiters.wake_all();
        assert_eq!(late.answer(), None, "woken for a lost connection");
        waiters.wake("other", Some(Bytes::from_static(b"other")));
        assert_eq!(early.answer(), None);
        drop((early, late));
        assert!(waiters.channels.lock().unwrap().is_empty());
    }

    #[test]
    fn tokens_are_unique() {
        let tokens: std::collections::HashSet<_> = (0..10_000).map(|_| token()).collect();
        assert_eq!(tokens.len(), 10_000);
    }
}
