//! Controls over waiting: what a duplicate does, how long and how many followers wait,
//! and which responses are not shared.

use std::fmt;
use std::sync::Arc;

use http::header::CACHE_CONTROL;
use http::response::Parts;

/// What a request does when a flight for its key is already running; see
/// [`HttpCoalesceLayer::on_duplicate`](super::HttpCoalesceLayer::on_duplicate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnDuplicate {
    /// Wait for the flight and receive a copy of its response (the default).
    #[default]
    Share,
    /// Answer `409 Conflict` at once, with a problem+json body saying that an identical
    /// request is in progress, as the IETF Idempotency-Key draft allows: for clients that
    /// prefer to retry.
    Conflict,
    /// Call the inner service as if there were no flight. For safe, read-only routes only:
    /// on a create, this brings back the duplicate inserts the layer exists to stop.
    PassThrough,
}

/// What a request does when a flight for its key (and scope) is running for a *different*
/// request: another method, path, query or body. See
/// [`HttpCoalesceLayer::on_mismatch`](super::HttpCoalesceLayer::on_mismatch).
///
/// A caller never receives the response to a request other than its own, whichever is
/// chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnMismatch {
    /// Wait for the running flight to end, then run (or join a flight of the same
    /// request): requests with one key run one after another, never at once, so that two
    /// different updates of one record are both applied, in the order they got their turn.
    /// The default of [`HttpCoalesceLayer`](super::HttpCoalesceLayer).
    ///
    /// With [`replay`](super::HttpCoalesceLayer::replay), a request whose key has another
    /// request's response kept runs, and its response is kept instead. On a store shared by
    /// several instances it runs without the key's lease (the store answered with the kept
    /// response rather than the lease), so two instances may run such a request at once;
    /// use `Reject` where keys are reused for different requests across instances.
    #[default]
    Queue,
    /// Answer `422 Unprocessable Content`, with a problem+json body saying that the key was
    /// used for another request: the IETF Idempotency-Key draft's answer, and the default of
    /// [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer).
    ///
    /// Without [`replay`](super::HttpCoalesceLayer::replay), at once, to a request whose key
    /// has another request's flight running. With it, the key's answer is the response
    /// kept for it: a request that finds another request's flight running waits for that
    /// flight to end, and then gets what is kept, if it is its own (a replay), or the `422`.
    /// So the key's own request is never refused because a reuse of its key (itself about
    /// to be refused) happened to be running.
    Reject,
}

/// What a follower gets when it stops waiting: after the
/// [wait timeout](super::HttpCoalesceLayer::follower_timeout), or at once when the flight
/// has [as many followers as allowed](super::HttpCoalesceLayer::max_followers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fallback {
    /// `503 Service Unavailable` with `Retry-After: 1` and a problem+json body (the
    /// default).
    #[default]
    ServiceUnavailable,
    /// The follower calls the inner service itself. For safe, read-only routes only; the
    /// flight goes on for the others either way.
    PassThrough,
}

/// How the followers of a flight whose response is [not to be shared](DoNotShare) get
/// responses of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unshared {
    /// Every follower calls the inner service at once (the default).
    #[default]
    Concurrently,
    /// The followers call the inner service one after another.
    OneAfterAnother,
}

/// What a request does when the store fails or times out (Redis down or slow).
///
/// Whichever is chosen, no request waits longer than the store's own timeouts, and a store
/// that fails while the response is being stored doesn't lose the response: the callers
/// get it, and only the replay is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnStoreError {
    /// Log a warning and run the request as if nothing were stored and no other instance
    /// ran it: requests still coalesce within this instance, but an instance no longer
    /// sees the others' flights, and a retry of a completed request runs again. The
    /// default: the store is an optimisation of availability, not a dependency of it.
    #[default]
    FailOpen,
    /// Answer `503 Service Unavailable` with `Retry-After: 1` and a problem+json body, and
    /// don't run the request: for operations where running twice is worse than not at all.
    FailClosed,
}

/// A response extension that keeps a response from being shared.
///
/// A handler inserts it into a response that only its own caller may receive (a response
/// with data of the request's caller that the scope does not capture, or one that must be
/// produced fresh for each caller). The leader receives the response; each follower of the
/// flight then calls the inner service itself, concurrently or one after another (see
/// [`Unshared`]). A predicate on the response head can make the same choice:
/// [`HttpCoalesceLayer::share_when`](super::HttpCoalesceLayer::share_when).
///
/// ```
/// use axum::response::IntoResponse;
/// use tower_coalesce::http::DoNotShare;
///
/// async fn handler() -> impl IntoResponse {
///     (axum::Extension(DoNotShare), "for this caller only")
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoNotShare;

/// A predicate for [`share_when`](super::HttpCoalesceLayer::share_when) that does not share
/// responses marked `Cache-Control: private` or `no-store`, nor those with [`DoNotShare`].
pub fn not_private(parts: &Parts) -> bool {
    let private = parts
        .headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|directive| directive.trim().to_ascii_lowercase())
        .any(|d| d == "private" || d.starts_with("private=") || d == "no-store");
    !private && parts.extensions.get::<DoNotShare>().is_none()
}

/// The predicate that decides whether a response head may be shared.
#[derive(Clone)]
pub(crate) struct SharePredicate(Option<Arc<PartsPredicate>>);

type PartsPredicate = dyn Fn(&Parts) -> bool + Send + Sync;

impl SharePredicate {
    pub(crate) fn default_marker() -> Self {
        SharePredicate(None)
    }

    pub(crate) fn custom(f: impl Fn(&Parts) -> bool + Send + Sync + 'static) -> Self {
        SharePredicate(Some(Arc::new(f)))
    }

    pub(crate) fn allows(&self, parts: &Parts) -> bool {
        match &self.0 {
            // The default looks for the marker only: no other response changes behaviour.
            None => parts.extensions.get::<DoNotShare>().is_none(),
            Some(f) => f(parts),
        }
    }
}

impl fmt::Debug for SharePredicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "custom"
        } else {
            "DoNotShare marker"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_no_store_responses_are_not_shared() {
        let head = |cc: Option<&str>| {
            let mut res = http::Response::builder();
            if let Some(cc) = cc {
                res = res.header("cache-control", cc);
            }
            res.body(()).unwrap().into_parts().0
        };
        assert!(not_private(&head(None)));
        assert!(not_private(&head(Some("max-age=60, public"))));
        assert!(!not_private(&head(Some("max-age=60, Private"))));
        assert!(!not_private(&head(Some("private=\"set-cookie\""))));
        assert!(!not_private(&head(Some("no-store"))));
    }
}
