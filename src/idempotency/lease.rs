//! Leases: which instance runs a key when several share a store.
//!
//! Within one process the layer's flights already run each key once. A store shared by
//! several processes (Redis) also hands out a lease per key, so that one instance runs the
//! request and the others wait for its stored response. See
//! [`IdempotencyStore::lease`](super::store::IdempotencyStore::lease).

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use tokio::task::JoinHandle;

use crate::BoxError;

/// The answer of [`IdempotencyStore::lease`](super::store::IdempotencyStore::lease).
#[derive(Debug)]
#[non_exhaustive]
pub enum Lease {
    /// The store is not shared with other processes: run the request, there is nothing to
    /// hold. The default, and the answer of [`MemoryStore`](super::store::MemoryStore).
    NotShared,
    /// This instance holds the lease: run the request, store its response, then release.
    Held(LeaseGuard),
    /// Another instance holds the lease: wait for it to release, then look up its response.
    HeldElsewhere,
}

type Release = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

/// A lease this instance holds: it is renewed in the background while the guard lives, and
/// released by [`release`](Self::release), or, should the guard be dropped without it (the
/// request's callers all left, or the inner service panicked), by a task spawned on drop.
///
/// A store builds it from the future that releases the lease and the task that renews it.
#[must_use = "a lease is held until it is released or dropped"]
pub struct LeaseGuard {
    release: Option<Release>,
    renewer: Option<JoinHandle<()>>,
}

impl LeaseGuard {
    /// A guard that runs `release` once, and aborts `renewer` first.
    ///
    /// `release` is not polled before [`release`](Self::release) or the drop.
    pub fn new<F>(release: F, renewer: JoinHandle<()>) -> Self
    where
        F: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        LeaseGuard {
            release: Some(Box::pin(release)),
            renewer: Some(renewer),
        }
    }

    /// Stops renewing, and releases the lease.
    pub async fn release(mut self) -> Result<(), BoxError> {
        self.stop_renewing();
        match self.release.take() {
            Some(release) => release.await,
            None => Ok(()),
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
        let Some(release) = self.release.take() else {
            return;
        };
        // Without a runtime (it is shutting down) the lease simply expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
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
            .field("released", &self.release.is_none())
            .finish()
    }
}
