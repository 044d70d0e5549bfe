//! The in-process store, the default of the idempotency and cache presets.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::{Store, StoreKey, StoredResponse};
use crate::BoxError;

/// The in-process store: a [moka] cache whose entries expire after the TTL they were put
/// with, bounded by the bytes it holds (the least recently used go first when it is full).
///
/// [moka]: https://docs.rs/moka
///
/// Clones share the cache.
#[derive(Clone)]
pub struct MemoryStore {
    cache: moka::future::Cache<StoreKey, (Arc<StoredResponse>, Duration)>,
}

/// The default byte limit of a [`MemoryStore`]: 64 MiB.
pub const DEFAULT_MEMORY_LIMIT: usize = 64 * 1024 * 1024;

impl MemoryStore {
    /// A store that holds at most about `bytes` of responses (by
    /// [`StoredResponse::weight`]).
    pub fn with_limit(bytes: usize) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(u64::try_from(bytes).unwrap_or(u64::MAX))
            .weigher(|_key, (response, _ttl): &(Arc<StoredResponse>, Duration)| {
                u32::try_from(response.weight()).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            // Oldest out first when full; moka's default (TinyLFU) may refuse new entries
            // instead, and a refused entry is a retry that runs twice.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        MemoryStore { cache }
    }

    /// The number of responses held (moka counts lazily; call after
    /// [`run_pending_tasks`](Self::run_pending_tasks) for an exact figure).
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// The bytes held, by [`StoredResponse::weight`].
    pub fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    /// Runs moka's pending evictions and expirations now.
    pub async fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks().await;
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_limit(DEFAULT_MEMORY_LIMIT)
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.cache.entry_count())
            .field("bytes", &self.cache.weighted_size())
            .finish()
    }
}

/// Expires each entry after the TTL it was put with.
struct PerEntryTtl;

impl moka::Expiry<StoreKey, (Arc<StoredResponse>, Duration)> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &StoreKey,
        (_, ttl): &(Arc<StoredResponse>, Duration),
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(*ttl)
    }
}

impl Store for MemoryStore {
    async fn get(&self, key: &StoreKey) -> Result<Option<Arc<StoredResponse>>, BoxError> {
        Ok(self.cache.get(key).await.map(|(response, _)| response))
    }

    async fn put(
        &self,
        key: StoreKey,
        response: Arc<StoredResponse>,
        ttl: Duration,
    ) -> Result<(), BoxError> {
        self.cache.insert(key, (response, ttl)).await;
        Ok(())
    }
}
