//! The near cache: copies of a shared store's fresh entries in this process's memory, so
//! that a hit costs no round trip, dropped as soon as another instance announces a change
//! to them (the store's backplane), and never kept past their freshness.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, Weak};
use std::time::Duration;

use tokio::sync::broadcast::{self, error::RecvError};

use crate::store::{Change, StoreKey, StoredResponse};

/// The default of [`HttpCacheLayer::near_cache_ttl`](super::HttpCacheLayer::near_cache_ttl):
/// the longest a copy stays near, however long it is fresh.
pub const DEFAULT_NEAR_TTL: Duration = Duration::from_secs(60);

/// The near cache's byte limit when only its TTL was set: 16 MiB.
pub(crate) const DEFAULT_NEAR_BYTES: usize = 16 * 1024 * 1024;

type Entry = (Arc<StoredResponse>, Duration);

pub(crate) struct Near {
    entries: moka::sync::Cache<StoreKey, Entry>,
    /// Counts the drops: a copy read from the store before a drop is not kept after it
    /// (see [`fill`](Self::fill)).
    epoch: AtomicU64,
    max_ttl: Duration,
    /// Subscribes to the store's changes: called by the first lookup, on the runtime that
    /// serves requests (a layer may be built outside of one).
    changes: Mutex<Option<Subscribe>>,
    /// Whether the first lookup did; every later one reads only this (an atomic load, not
    /// the lock: this is on every hit).
    listening: Once,
}

/// Subscribes to a store's changes ([`Store::changes`](crate::store::Store::changes)).
pub(crate) type Subscribe = Box<dyn FnOnce() -> Option<broadcast::Receiver<Change>> + Send>;

impl Near {
    pub(crate) fn new(bytes: usize, max_ttl: Duration, changes: Option<Subscribe>) -> Arc<Self> {
        let entries = moka::sync::Cache::builder()
            .max_capacity(u64::try_from(bytes).unwrap_or(u64::MAX))
            .weigher(|_key, (response, _): &Entry| {
                u32::try_from(response.weight()).unwrap_or(u32::MAX)
            })
            .expire_after(crate::store::PerEntryTtl)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        Arc::new(Near {
            entries,
            epoch: AtomicU64::new(0),
            max_ttl,
            changes: Mutex::new(changes),
            listening: Once::new(),
        })
    }

    /// The copy of `key`'s entry, if there is one.
    pub(crate) fn get(self: &Arc<Self>, key: &StoreKey) -> Option<Arc<StoredResponse>> {
        self.listening.call_once(|| self.listen());
        self.entries.get(key).map(|(response, _)| response)
    }

    /// The drop count, to read before a store lookup whose answer may [`fill`](Self::fill).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Keeps a copy of `response`, read from the store when the drop count was `epoch`,
    /// for `fresh` (its freshness left) at most.
    ///
    /// A drop between the read and now means the copy may be older than the change that
    /// dropped it: it is not kept. Checked after the insert too, so that a drop that
    /// counts between the check and the insert still removes it (it counts before it
    /// removes).
    pub(crate) fn fill(
        &self,
        key: &StoreKey,
        response: Arc<StoredResponse>,
        fresh: Duration,
        epoch: u64,
    ) {
        let ttl = fresh.min(self.max_ttl);
        if ttl.is_zero() || self.epoch() != epoch {
            return;
        }
        self.entries.insert(key.clone(), (response, ttl));
        if self.epoch() != epoch {
            self.entries.invalidate(key);
        }
    }

    /// Drops the copies of `keys`.
    pub(crate) fn drop_keys(&self, keys: &[StoreKey]) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for key in keys {
            self.entries.invalidate(key);
        }
    }

    /// Drops every copy.
    pub(crate) fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.entries.invalidate_all();
    }

    /// Starts listening to the store's changes, once: a task that drops the copies other
    /// instances changed, and every copy when messages may have been lost. It ends with the
    /// near cache (at the next message) or with the store.
    ///
    /// Copies made before the subscription is confirmed may miss changes: the store's
    /// confirmation comes as a [`Change::Lost`], which drops them.
    fn listen(self: &Arc<Self>) {
        let subscribe = self
            .changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(subscribe) = subscribe else {
            return;
        };
        let Some(mut changes) = subscribe() else {
            return;
        };
        let near: Weak<Near> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let change = changes.recv().await;
                let Some(near) = near.upgrade() else { return };
                match change {
                    Ok(Change::Keys(keys)) => near.drop_keys(&keys),
                    Ok(Change::Lost) | Err(RecvError::Lagged(_)) => {
                        tracing::debug!("cache changes may have been lost; near cache cleared");
                        near.clear();
                    }
                    Err(RecvError::Closed) => {
                        // The store is gone: nothing will tell of changes any more.
                        near.clear();
                        return;
                    }
                }
            }
        });
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }
}

impl std::fmt::Debug for Near {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Near")
            .field("entries", &self.entries.entry_count())
            .field("bytes", &self.entries.weighted_size())
            .field("max_ttl", &self.max_ttl)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode, Version};

    use super::*;
    use crate::store::Fingerprint;

    fn response() -> Arc<StoredResponse> {
        Arc::new(StoredResponse::new(
            StatusCode::OK,
            Version::HTTP_11,
            HeaderMap::new(),
            Bytes::from_static(b"kept"),
            Fingerprint::from_bytes([0; 32]),
        ))
    }

    async fn settles(near: &Near, len: u64) {
        for _ in 0..1000 {
            if near.len() == len {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the near cache holds {} copies, not {len}", near.len());
    }

    #[tokio::test]
    async fn changes_drop_their_copies_and_a_loss_drops_every_copy() {
        let (sender, changes) = broadcast::channel(16);
        let near = Near::new(
            1 << 20,
            Duration::from_secs(60),
            Some(Box::new(|| Some(changes))),
        );
        let keys: Vec<StoreKey> = (0..3).map(|n| StoreKey::from_bytes([n; 32])).collect();
        assert!(near.get(&keys[0]).is_none(), "starts listening");
        for key in &keys {
            near.fill(key, response(), Duration::from_secs(30), near.epoch());
        }
        assert_eq!(near.len(), 3);
        sender.send(Change::Keys(keys[..1].into())).unwrap();
        settles(&near, 2).await;
        assert!(near.get(&keys[1]).is_some());
        sender.send(Change::Lost).unwrap();
        settles(&near, 0).await;
    }

    #[test]
    fn a_copy_read_before_a_drop_is_not_kept_and_none_outlives_its_freshness() {
        let near = Near::new(1 << 20, Duration::from_millis(50), None);
        let key = StoreKey::from_bytes([1; 32]);
        let read_at = near.epoch();
        near.drop_keys(std::slice::from_ref(&key));
        near.fill(&key, response(), Duration::from_secs(30), read_at);
        assert!(near.get(&key).is_none(), "read before the drop");
        near.fill(&key, response(), Duration::ZERO, near.epoch());
        assert!(near.get(&key).is_none(), "no freshness left");
        near.fill(&key, response(), Duration::from_secs(30), near.epoch());
        assert!(near.get(&key).is_some());
        std::thread::sleep(Duration::from_millis(80));
        assert!(near.get(&key).is_none(), "past the near cache's own TTL");
    }
}
