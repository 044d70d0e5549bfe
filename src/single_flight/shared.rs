//! The second level of a [`Cache`](super::Cache): a [`Store`] that several instances share
//! (Redis, PostgreSQL), under the cache's own moka entries. See
//! [`CacheBuilder::shared`](super::CacheBuilder::shared).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue, StatusCode, Version};
use tokio::sync::broadcast;

use crate::BoxError;
use crate::http::key::EncodeKey;
use crate::store::{
    Change, Completion, Fingerprint, Lease, LeaseGuard, Store, StoreKey, StoredResponse,
};

/// How a [`Cache`](super::Cache) with a shared store writes its values as bytes, and reads
/// them back: serde with the format of your choice, or by hand.
///
/// ```
/// use tower_coalesce::single_flight::Codec;
///
/// struct Utf8;
///
/// impl Codec<String> for Utf8 {
///     fn encode(&self, value: &String) -> Vec<u8> {
///         value.as_bytes().to_vec()
///     }
///     fn decode(&self, bytes: &[u8]) -> Result<String, tower_coalesce::BoxError> {
///         Ok(String::from_utf8(bytes.to_vec())?)
///     }
/// }
/// ```
pub trait Codec<V>: Send + Sync + 'static {
    /// The bytes of `value`.
    fn encode(&self, value: &V) -> Vec<u8>;

    /// The value of `bytes`, as [`encode`](Self::encode) wrote them; an error for anything
    /// else (a value of another version of the app, say), which the cache takes for a miss.
    fn decode(&self, bytes: &[u8]) -> Result<V, BoxError>;
}

/// What the cache does with its second level, free of the store's and codec's types.
pub(crate) trait Tier<K, V>: Send + Sync {
    /// The value kept for `key`, if `fresh(value, age)` says it may answer; else the
    /// lease to run the work (`None`: the store has none, or failed).
    fn find<'a>(
        &'a self,
        key: &'a K,
        fresh: &'a (dyn Fn(&V, Duration) -> bool + Send + Sync),
    ) -> BoxFuture<'a, Found<V>>;

    /// Keeps the work's `value` (if any) for `ttl`, releases the lease, and announces the
    /// key.
    fn keep<'a>(
        &'a self,
        key: &'a K,
        lease: Option<LeaseGuard>,
        value: Option<(&'a V, Duration)>,
    ) -> BoxFuture<'a, ()>;

    /// Removes `key`'s value and announces it.
    fn forget(&self, key: &K) -> BoxFuture<'static, ()>;

    /// The store key of `key`: changes name keys so.
    fn store_key(&self, key: &K) -> StoreKey;

    fn changes(&self) -> Option<broadcast::Receiver<Change>>;
}

/// What [`Tier::find`] found.
pub(crate) enum Found<V> {
    /// A fresh value, kept this long ago.
    Value(V, Duration),
    /// None: run the work, holding this lease if there is one.
    Run(Option<LeaseGuard>),
}

/// The second level on a [`Store`], with a [`Codec`]; keys are named `name` and the key.
pub(crate) struct StoreTier<St, C> {
    pub(crate) name: Arc<str>,
    pub(crate) store: St,
    pub(crate) codec: C,
}

/// The header a shared value carries its keeping time in (milliseconds since 1970), for
/// its age on the other instances.
const KEPT_AT: &str = "kept-at";

impl<St: Store, C> StoreTier<St, C> {
    fn key_of<K: EncodeKey>(&self, key: &K) -> StoreKey {
        StoreKey::new(Some(&self.name.as_bytes()), key)
    }

    /// The value under `key` and its age, if it is one of ours and fresh.
    async fn fresh<V>(
        &self,
        key: &StoreKey,
        fresh: &(dyn Fn(&V, Duration) -> bool + Send + Sync),
    ) -> Result<Option<(V, Duration)>, BoxError>
    where
        C: Codec<V>,
    {
        let Some(kept) = self.store.get(key).await? else {
            return Ok(None);
        };
        let kept_at = kept
            .headers()
            .get(KEPT_AT)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .ok_or("a shared cache value without its keeping time")?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let age = now.saturating_sub(Duration::from_millis(kept_at));
        let value = self.codec.decode(kept.body())?;
        Ok(fresh(&value, age).then_some((value, age)))
    }
}

impl<K, V, St, C> Tier<K, V> for StoreTier<St, C>
where
    K: EncodeKey + Sync,
    V: Send + Sync,
    St: Store,
    C: Codec<V>,
{
    fn find<'a>(
        &'a self,
        key: &'a K,
        fresh: &'a (dyn Fn(&V, Duration) -> bool + Send + Sync),
    ) -> BoxFuture<'a, Found<V>> {
        Box::pin(async move {
            let key = self.key_of(key);
            match find(self, &key, fresh).await {
                Ok(found) => found,
                Err(error) => {
                    // Failing open, as the HTTP layers do: the work runs here.
                    tracing::warn!(%error, "the cache's shared store failed; running the work");
                    Found::Run(None)
                }
            }
        })
    }

    fn keep<'a>(
        &'a self,
        key: &'a K,
        lease: Option<LeaseGuard>,
        value: Option<(&'a V, Duration)>,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let key = self.key_of(key);
            let value = value.map(|(value, ttl)| (Arc::new(self.stored(value)), ttl));
            let kept = value.is_some();
            let done = match (lease, value) {
                // A later lease holds the key (this one lapsed): its value is the newer one,
                // and this one is not kept.
                (Some(lease), value) => lease
                    .complete(value)
                    .await
                    .map(|completion| kept && matches!(completion, Completion::Kept)),
                (None, Some((value, ttl))) => {
                    self.store.put(key.clone(), value, ttl).await.map(|()| true)
                }
                (None, None) => Ok(false),
            };
            let done = match done {
                Ok(true) => self.store.announce(std::slice::from_ref(&key)).await,
                done => done.map(drop),
            };
            if let Err(error) = done {
                tracing::warn!(%error, "keeping a value in the cache's shared store failed");
            }
        })
    }

    fn forget(&self, key: &K) -> BoxFuture<'static, ()> {
        let (key, store) = (self.key_of(key), self.store.clone());
        Box::pin(async move {
            let removed = store.remove(&key).await;
            let done = match removed {
                Ok(_) => store.announce(std::slice::from_ref(&key)).await,
                Err(error) => Err(error),
            };
            if let Err(error) = done {
                tracing::warn!(%error, "removing a value from the cache's shared store failed");
            }
        })
    }

    fn store_key(&self, key: &K) -> StoreKey {
        self.key_of(key)
    }

    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        self.store.changes()
    }
}

impl<St, C> StoreTier<St, C> {
    /// A value as the store keeps it: a response whose body is the value's bytes.
    fn stored<V>(&self, value: &V) -> StoredResponse
    where
        C: Codec<V>,
    {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut headers = HeaderMap::new();
        headers.insert(KEPT_AT, HeaderValue::from(now.as_millis() as u64));
        StoredResponse::new(
            StatusCode::OK,
            Version::HTTP_11,
            headers,
            Bytes::from(self.codec.encode(value)),
            Fingerprint::from_bytes([0; 32]),
        )
    }
}

/// A fresh value, or the lease to run the work: one instance runs a key while the others
/// wait for its release and read its value.
async fn find<V, St: Store, C: Codec<V>>(
    tier: &StoreTier<St, C>,
    key: &StoreKey,
    fresh: &(dyn Fn(&V, Duration) -> bool + Send + Sync),
) -> Result<Found<V>, BoxError> {
    loop {
        if let Some((value, age)) = tier.fresh(key, fresh).await? {
            return Ok(Found::Value(value, age));
        }
        // Whatever is kept (a stale value is why the work runs).
        match tier.store.refresh_lease(key).await? {
            Lease::Held(guard) => {
                // Another instance may have kept it between the lookup and the lease.
                return Ok(match tier.fresh(key, fresh).await? {
                    Some((value, age)) => Found::Value(value, age),
                    None => Found::Run(Some(guard)),
                });
            }
            Lease::HeldElsewhere => tier.store.released(key).await,
            _ => return Ok(Found::Run(None)),
        }
    }
}
