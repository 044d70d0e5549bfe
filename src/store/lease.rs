//! Leases: which instance runs a key when several share a store.
//!
//! Within one process the layer's flights already run each key once. A store shared by
//! several processes (Redis) also hands out a lease per key, so that one instance runs the
//! request and the others wait for its stored response. See
//! [`Store::lease`](super::Store::lease).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::StoredResponse;
use crate::BoxError;

/// The answer of [`Store::lease`](super::Store::lease).
#[derive(Debug)]
#[non_exhaustive]
pub enum Lease {
    /// The store is not shared with other processes: run the request, there is nothing to
    /// hold. The default, and the answer of `MemoryStore` and [`NoStore`](super::NoStore).
    NotShared,
    /// This instance holds the lease: run the request, store its response, then release.
    Held(LeaseGuard),
    /// Another instance holds the lease: wait for it to release, then look up its response.
    HeldElsewhere,
    /// The key's response is stored already: replay it. A store that hands out leases
    /// looks the response up in the same step (one round trip instead of two), so it must
    /// answer this rather than take a lease on a completed key.
    Stored(Arc<StoredResponse>),
}

type Completion = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;
type Complete = Box<dyn FnOnce(Option<(Arc<StoredResponse>, Duration)>) -> Completion + Send>;

/// A lease this instance holds: it is renewed in the background while the guard lives, and
/// ended by [`complete`](Self::complete), which stores the response and releases the
/// lease (one round trip for Redis). Should the guard be dropped instead (the request's
/// callers all left, or the inner service panicked), a task spawned on drop releases the
/// lease without storing anything.
///
/// A store builds it from a function that stores (if given a response) and releases, and
/// the task that renews the lease.
#[must_use = "a lease is held until it is completed or dropped"]
pub struct LeaseGuard {
    complete: Option<Complete>,
    renewer: Option<JoinHandle<()>>,
    fence: Option<FencingToken>,
}

impl LeaseGuard {
    /// A guard that calls `complete` once, after aborting `renewer`.
    pub fn new<C, F>(complete: C, renewer: JoinHandle<()>) -> Self
    where
        C: FnOnce(Option<(Arc<StoredResponse>, Duration)>) -> F + Send + 'static,
        F: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        LeaseGuard {
            complete: Some(Box::new(move |response| Box::pin(complete(response)))),
            renewer: Some(renewer),
            fence: None,
        }
    }

    /// Gives the lease the fencing token `fence`, which the store took with it: the layer
    /// hands it to the inner service as a request extension ([`FencingToken`]).
    pub fn with_fence(mut self, fence: u64) -> Self {
        self.fence = Some(FencingToken(fence));
        self
    }

    /// The lease's fencing token, if the store hands them out.
    pub fn fence(&self) -> Option<FencingToken> {
        self.fence
    }

    /// Stops renewing, stores `response` for its TTL if there is one, and releases the
    /// lease, so that the instances waiting for it find the response.
    pub async fn complete(
        mut self,
        response: Option<(Arc<StoredResponse>, Duration)>,
    ) -> Result<(), BoxError> {
        self.stop_renewing();
        let Some(complete) = self.complete.take() else {
            return Ok(());
        };
        let completion = complete(response);
        // On a task of its own, so that it runs to the end even if this future is dropped
        // while it waits (every caller left mid-store): the lease would otherwise be neither
        // stored nor released, and the other instances would wait for it to expire.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => runtime
                .spawn(completion)
                .await
                .unwrap_or_else(|error| Err(error.into())),
            Err(_) => completion.await,
        }
    }

    fn stop_renewing(&mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.stop_renewing();
        let Some(complete) = self.complete.take() else {
            return;
        };
        // Without a runtime (it is shutting down) the lease simply expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let release = complete(None);
            runtime.spawn(async move {
                if let Err(error) = release.await {
                    tracing::warn!(%error, "releasing a dropped lease failed; it will expire");
                }
            });
        }
    }
}

impl fmt::Debug for LeaseGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("completed", &self.complete.is_none())
            .field("fence", &self.fence)
            .finish()
    }
}

/// A number that grows with every lease taken on a key, across all instances: the request
/// extension the inner service finds when the layer runs it under a lease of a shared store
/// ([`RedisStore`](crate::redis)).
///
/// A lease is a deadline, not a fence: an instance that stalls past its lease (a long GC
/// pause, a partition) may wake up and write after another instance took the key over. A
/// handler that writes to a database can refuse such a stale writer by keeping the highest
/// token it has seen with the row, and writing only with a higher one:
///
/// ```sql
/// UPDATE clients SET name = $2, fence = $3 WHERE id = $1 AND fence < $3
/// -- 0 rows: a newer run of this key has written already; this one is stale.
/// ```
///
/// ```
/// use axum::Extension;
/// use tower_coalesce::store::FencingToken;
///
/// async fn create_client(fence: Option<Extension<FencingToken>>) -> String {
///     // None without a shared store: one process's flights need no fence.
///     let fence = fence.map_or(0, |Extension(token)| token.get());
///     format!("written with fence {fence}")
/// }
/// ```
///
/// Tokens of one key strictly increase; tokens of different keys are unrelated. With
/// `RedisStore`, a token is one more than the key's last (kept 24 hours after its last
/// lease) and at least the Redis clock in microseconds, so tokens go on increasing after
/// Redis lost the last one (a restart without persistence, a failover), as long as the
/// Redis clock did not go back by more than the time since. A run without a lease (a
/// store error under `FailOpen`) has no token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    /// The token's number.
    pub fn get(self) -> u64 {
        self.0
    }
}
