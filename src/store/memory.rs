//! The in-process store, the default of the idempotency and cache presets.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};
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
    /// The HTTP cache's groups (a URI's entries, a tag's), for purges.
    groups: moka::sync::Cache<StoreKey, Arc<Mutex<Group>>>,
}

/// The keys of a group, and how long the group is kept: as long as its longest-kept entry.
#[derive(Default)]
struct Group {
    keys: HashSet<StoreKey>,
    ttl: Duration,
}

/// The most keys the groups of one store hold together; past it, the groups least recently
/// added to go first (their entries then outlive a purge, until they expire).
const GROUP_KEYS_LIMIT: u64 = 1 << 20;

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
        let groups = moka::sync::Cache::builder()
            .max_capacity(GROUP_KEYS_LIMIT)
            .weigher(|_key, group: &Arc<Mutex<Group>>| {
                let keys = lock(group).keys.len();
                u32::try_from(keys).unwrap_or(u32::MAX).max(1)
            })
            .expire_after(GroupTtl)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        MemoryStore { cache, groups }
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

/// Expires each entry after the TTL it was put with (the HTTP cache's near copies too).
pub(crate) struct PerEntryTtl;

impl moka::Expiry<StoreKey, (Arc<StoredResponse>, Duration)> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &StoreKey,
        (_, ttl): &(Arc<StoredResponse>, Duration),
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(*ttl)
    }

    // A key kept anew expires by its new TTL (moka's default keeps the old expiry: a
    // refreshed entry would go when the one it replaced was due).
    fn expire_after_update(
        &self,
        _key: &StoreKey,
        (_, ttl): &(Arc<StoredResponse>, Duration),
        _now: std::time::Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(*ttl)
    }
}

/// Expires a group after the longest TTL of its keys, as it was when the group was made
/// (a group added to later is made again by `add_to_group`, with the longer TTL).
struct GroupTtl;

impl moka::Expiry<StoreKey, Arc<Mutex<Group>>> for GroupTtl {
    fn expire_after_create(
        &self,
        _key: &StoreKey,
        group: &Arc<Mutex<Group>>,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(lock(group).ttl)
    }

    fn expire_after_update(
        &self,
        _key: &StoreKey,
        group: &Arc<Mutex<Group>>,
        _now: std::time::Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(lock(group).ttl)
    }
}

fn lock(group: &Mutex<Group>) -> std::sync::MutexGuard<'_, Group> {
    group.lock().unwrap_or_else(|e| e.into_inner())
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

    async fn remove(&self, key: &StoreKey) -> Result<bool, BoxError> {
        Ok(self.cache.remove(key).await.is_some())
    }

    async fn add_to_group(
        &self,
        group: &StoreKey,
        key: &StoreKey,
        ttl: Duration,
    ) -> Result<(), BoxError> {
        let entry = self.groups.get_with_by_ref(group, Arc::default);
        {
            let mut members = lock(&entry);
            members.keys.insert(key.clone());
            members.ttl = members.ttl.max(ttl);
        }
        // Inserted again: to restart its expiry with the longest TTL, to weigh it anew, and
        // to put it back if a purge took the group between the lookup and the lock.
        self.groups.insert(group.clone(), entry);
        Ok(())
    }

    async fn take_group(&self, group: &StoreKey) -> Result<Vec<StoreKey>, BoxError> {
        Ok(self
            .groups
            .remove(group)
            .map(|entry| lock(&entry).keys.drain().collect())
            .unwrap_or_default())
    }
}
