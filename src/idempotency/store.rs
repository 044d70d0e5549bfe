//! Where completed responses are kept, and the in-memory default.

use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode, Version};
use sha2::{Digest, Sha256};

use super::lease::Lease;
#[cfg(doc)]
use super::lease::LeaseGuard;
use crate::BoxError;

/// Storage of completed responses by idempotency key, and, for a store shared by several
/// instances, the lease that decides which instance runs a key.
///
/// Inside a key's flight (one per key and process), the layer:
/// 1. takes the key's [`lease`](Self::lease). A store that has leases looks the response up
///    in the same step and answers [`Lease::Stored`]; one that has none answers
///    [`Lease::NotShared`], and the layer looks the response up with [`get`](Self::get).
///    A stored response is replayed. If another instance holds the lease, the layer waits
///    for [`released`](Self::released) and starts over;
/// 2. calls the inner service, and stores the response before the flight completes (and,
///    holding a lease, before releasing it: [`LeaseGuard::complete`]), so that whoever
///    waited finds it stored. Without a lease it stores it with [`put`](Self::put).
///
/// A store error is logged, and then the layer either runs the request as if nothing were
/// stored (it fails open, the default) or answers `503`; see
/// [`IdempotencyLayer::on_store_error`](super::IdempotencyLayer::on_store_error). A failed
/// store of the response means that a later retry runs again.
///
/// [`MemoryStore`] is the in-process default, and keeps the defaults of `lease` and
/// `released`; [`RedisStore`](crate::redis) overrides them.
pub trait IdempotencyStore: Clone + Send + Sync + 'static {
    /// Returns the response stored under `key`, if any and not expired.
    fn get(
        &self,
        key: &StoreKey,
    ) -> impl Future<Output = Result<Option<Arc<StoredResponse>>, BoxError>> + Send;

    /// Stores `response` under `key` for `ttl`.
    fn put(
        &self,
        key: StoreKey,
        response: Arc<StoredResponse>,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Looks `key` up and, if nothing is stored, takes its lease, which says that this
    /// instance runs the request.
    ///
    /// The default answers [`Lease::NotShared`]: a store that only one process uses needs
    /// no lease, the process's flights are enough, and the layer calls [`get`](Self::get).
    fn lease(&self, key: &StoreKey) -> impl Future<Output = Result<Lease, BoxError>> + Send {
        let _ = key;
        std::future::ready(Ok(Lease::NotShared))
    }

    /// Completes when the lease on `key` that another instance holds may have been
    /// released, or expired; the layer then looks the key up and tries the lease again.
    /// It must complete within a bounded time even if no release is ever seen (a lost
    /// message, a dead instance).
    ///
    /// Only called after [`lease`](Self::lease) answered [`Lease::HeldElsewhere`]; the
    /// default completes at once.
    fn released(&self, key: &StoreKey) -> impl Future<Output = ()> + Send {
        let _ = key;
        std::future::ready(())
    }
}

/// The key a response is stored under: a SHA-256 of the caller's scope and the
/// idempotency key, so that stores keep neither credentials nor raw keys, and every process
/// computes the same key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StoreKey([u8; 32]);

impl StoreKey {
    pub(crate) fn new<Scope: Hash>(scope: &Option<Scope>, key: &[u8]) -> Self {
        let mut hasher = Sha256Hasher(Sha256::new());
        scope.hash(&mut hasher);
        hasher.0.update(b"\0key\0");
        hasher.0.update(key);
        StoreKey(hasher.0.finalize().into())
    }

    /// A key from its 32 bytes, as a store that keeps them gives them back (and for tests
    /// of a store).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        StoreKey(bytes)
    }

    /// The key's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreKey(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// Feeds `Hash` impls into SHA-256, so that any scope type gives stable bytes.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        unreachable!("only the digest of a Sha256Hasher is read")
    }
}

/// A hash of what a request asks for: its method, path and body. A key reused with another
/// fingerprint is refused with `422`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub(crate) fn of(method: &http::Method, path: &str, body: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        for part in [method.as_str().as_bytes(), path.as_bytes()] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        hasher.update(body);
        Fingerprint(hasher.finalize().into())
    }

    /// Rebuilds a fingerprint read back from a store.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Fingerprint(bytes)
    }

    /// The fingerprint's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// A completed response as stored: status, version, headers and body, and the fingerprint
/// of the request that produced it.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
    fingerprint: Fingerprint,
}

impl StoredResponse {
    /// Assembles a stored response, for stores that read one back.
    pub fn new(
        status: StatusCode,
        version: Version,
        headers: HeaderMap,
        body: Bytes,
        fingerprint: Fingerprint,
    ) -> Self {
        StoredResponse {
            status,
            version,
            headers,
            body,
            fingerprint,
        }
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The HTTP version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The fingerprint of the request that produced the response.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Roughly the bytes the response holds, for byte budgets.
    pub fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 32)
            .sum();
        self.body.len() + headers + std::mem::size_of::<Self>()
    }
}

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

/// The default byte budget of a [`MemoryStore`]: 64 MiB.
pub const DEFAULT_MEMORY_BUDGET: u64 = 64 * 1024 * 1024;

impl MemoryStore {
    /// A store that holds at most about `bytes` of responses (by
    /// [`StoredResponse::weight`]).
    pub fn with_budget(bytes: u64) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(bytes)
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
        Self::with_budget(DEFAULT_MEMORY_BUDGET)
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

impl IdempotencyStore for MemoryStore {
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
