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

/// What [`LeaseGuard::complete`] did: whether the response given is the key's kept answer.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Completion {
    /// The response given (if any) is kept, and the lease released: no later lease was
    /// taken on the key since this one.
    Kept,
    /// A later lease was taken on the key (this one lapsed, and another instance took the
    /// key over): the response given is not kept, since it must never replace what a later
    /// lease keeps. The key's answer is the response kept under that lease, if one is kept
    /// yet (`None`: its run has not completed, or kept nothing).
    Superseded(Option<Arc<StoredResponse>>),
    /// Nothing was kept, and the run's own writes were not committed either: a store that
    /// commits them with the response in one transaction
    /// ([`PostgresStore::atomic`](crate::postgres::PostgresStore::atomic)) rolled it back
    /// (a response not to keep, a lost lease) or could not commit it. The layer answers a
    /// `503` in place of a response that says the work was done.
    Discarded,
}

type Attempt = Pin<Box<dyn Future<Output = Result<Completion, BoxError>> + Send>>;
type Complete = Arc<dyn Fn(Option<(Arc<StoredResponse>, Duration)>) -> Attempt + Send + Sync>;

/// A lease this instance holds: it is renewed in the background while the guard lives, and
/// ended by [`complete`](Self::complete), which stores the response and releases the
/// lease (one round trip for Redis). Should the guard be dropped instead (the request's
/// callers all left, or the inner service panicked), a task spawned on drop releases the
/// lease without storing anything.
///
/// A store builds it from a function that stores (if given a response) and releases, and
/// the task that renews the lease. The function must be *fenced*: it keeps the response
/// only if no later lease was taken on the key (the key's fencing token is still this
/// lease's), and otherwise answers [`Completion::Superseded`] with what the later lease
/// kept. It may be called again after an error (see [`keep_trying_for`](Self::keep_trying_for)),
/// so it must be safe to repeat.
#[must_use = "a lease is held until it is completed or dropped"]
pub struct LeaseGuard {
    complete: Option<Complete>,
    renewer: Option<JoinHandle<()>>,
    fence: Option<FencingToken>,
    keep_trying: Duration,
    /// What the run gets as request extensions besides the fencing token (the flight's
    /// transaction, in atomic mode).
    extensions: http::Extensions,
    atomic: bool,
}

/// The first pause between two attempts to complete, doubled after each failure up to
/// [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(25);
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(250);

impl LeaseGuard {
    /// A guard that completes by `complete` (see the type's docs for what it must do), and
    /// aborts `renewer` once completed.
    pub fn new<C, F>(complete: C, renewer: JoinHandle<()>) -> Self
    where
        C: Fn(Option<(Arc<StoredResponse>, Duration)>) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Completion, BoxError>> + Send + 'static,
    {
        LeaseGuard {
            complete: Some(Arc::new(move |response| Box::pin(complete(response)))),
            renewer: Some(renewer),
            fence: None,
            keep_trying: Duration::ZERO,
            extensions: http::Extensions::new(),
            atomic: false,
        }
    }

    /// Hands `extension` to the run as a request extension: what a store's run needs of
    /// the lease, such as the transaction the response is kept in.
    pub fn with_extension<T: Clone + Send + Sync + 'static>(mut self, extension: T) -> Self {
        self.extensions.insert(extension);
        self
    }

    /// Says that the store keeps the response in the run's own transaction: a response
    /// that is not kept rolls back what the run wrote ([`Completion::Discarded`]), so a
    /// run whose response the layer can't keep must not be answered as done.
    pub fn atomic(mut self) -> Self {
        self.atomic = true;
        self
    }

    /// Whether the store keeps the response in the run's own transaction.
    pub fn is_atomic(&self) -> bool {
        self.atomic
    }

    /// The extensions for the run (taken once).
    pub(crate) fn take_extensions(&mut self) -> http::Extensions {
        std::mem::take(&mut self.extensions)
    }

    /// Gives the lease the fencing token `fence`, which the store took with it: the layer
    /// hands it to the inner service as a request extension ([`FencingToken`]).
    pub fn with_fence(mut self, fence: u64) -> Self {
        self.fence = Some(FencingToken(fence));
        self
    }

    /// Retries a completion that failed (the store unreachable, a timeout) for up to
    /// `period` after the first attempt, renewing the lease meanwhile: a short store outage
    /// then delays the answer instead of leaving it unkept (and the key to run again once
    /// the lease lapses). The stores set it to their lease. Without it, one attempt.
    pub fn keep_trying_for(mut self, period: Duration) -> Self {
        self.keep_trying = period;
        self
    }

    /// The lease's fencing token, if the store hands them out.
    pub fn fence(&self) -> Option<FencingToken> {
        self.fence
    }

    /// Stores `response` for its TTL if there is one and releases the lease, so that the
    /// instances waiting for it find the response; unless a later lease was taken on the
    /// key meanwhile ([`Completion::Superseded`]). A failed attempt is retried as
    /// [`keep_trying_for`](Self::keep_trying_for) says, the lease renewed until the last;
    /// the error is the last attempt's.
    pub async fn complete(
        mut self,
        response: Option<(Arc<StoredResponse>, Duration)>,
    ) -> Result<Completion, BoxError> {
        let Some(complete) = self.complete.take() else {
            return Ok(Completion::Kept);
        };
        let renewer = self.renewer.take();
        let keep_trying = self.keep_trying;
        let completion = async move {
            let result = attempts(&*complete, response, keep_trying).await;
            if let Some(renewer) = renewer {
                renewer.abort();
            }
            result
        };
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

/// Calls `complete` until it answers, or `keep_trying` has passed since the first call.
async fn attempts(
    complete: &(dyn Fn(Option<(Arc<StoredResponse>, Duration)>) -> Attempt + Send + Sync),
    response: Option<(Arc<StoredResponse>, Duration)>,
    keep_trying: Duration,
) -> Result<Completion, BoxError> {
    let until = tokio::time::Instant::now() + keep_trying;
    let mut pause = FIRST_RETRY_PAUSE;
    loop {
        let error = match complete(response.clone()).await {
            Ok(completion) => return Ok(completion),
            Err(error) => error,
        };
        let now = tokio::time::Instant::now();
        if now + pause > until {
            return Err(error);
        }
        tracing::debug!(%error, "keeping a response failed; trying again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_RETRY_PAUSE);
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
            .field("keep_trying", &self.keep_trying)
            .field("atomic", &self.atomic)
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
