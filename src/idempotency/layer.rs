use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use tower::Layer;

use super::Idempotency;
use super::store::MemoryStore;
use crate::http::scope::DefaultScope;
use crate::http::{Metrics, OnDuplicate};
use crate::single_flight::LazyGroup;

/// Applies [`Idempotency`] to an HTTP service: requests with an `Idempotency-Key` header
/// are coalesced while the first one runs, and replayed from the store once it completed.
///
/// Defaults, each changed by the method of the same name:
/// - [`header`](Self::header): `Idempotency-Key`;
/// - [`require_key`](Self::require_key): off, requests without the header pass through;
/// - [`ttl`](Self::ttl): 24 hours;
/// - [`body_limit`](Self::body_limit): 1 MiB, for the request body that is fingerprinted
///   and for the response body that is stored;
/// - [`scope`](Self::scope): [`DefaultScope`], the `Authorization` and `Cookie` headers;
/// - [`store`](Self::store): a [`MemoryStore`] of 64 MiB.
///
/// Every service the layer (or a clone of it) builds shares one registry, one store and
/// one set of [`Metrics`].
///
/// See the [module docs](crate::idempotency) for an example.
#[derive(Clone)]
pub struct IdempotencyLayer<I = DefaultScope, St = MemoryStore> {
    pub(crate) config: Config,
    pub(crate) scope: I,
    pub(crate) store: St,
    pub(crate) metrics: Metrics,
    pub(crate) flights: LazyGroup,
}

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) header: HeaderName,
    pub(crate) require_key: bool,
    pub(crate) ttl: Duration,
    pub(crate) body_limit: usize,
    pub(crate) on_duplicate: OnDuplicate,
    pub(crate) follower_timeout: Option<Duration>,
    pub(crate) max_followers: Option<usize>,
    pub(crate) on_store_error: OnStoreError,
}

/// What a request does when the idempotency store fails or times out (Redis down or slow).
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

impl IdempotencyLayer {
    /// A layer with the defaults listed above.
    pub fn new() -> Self {
        IdempotencyLayer {
            config: Config {
                header: HeaderName::from_static("idempotency-key"),
                require_key: false,
                ttl: Duration::from_secs(24 * 60 * 60),
                body_limit: crate::http::DEFAULT_BODY_LIMIT,
                on_duplicate: OnDuplicate::Share,
                follower_timeout: None,
                max_followers: None,
                on_store_error: OnStoreError::FailOpen,
            },
            scope: DefaultScope::default(),
            store: MemoryStore::default(),
            metrics: Metrics::default(),
            flights: LazyGroup::default(),
        }
    }
}

impl Default for IdempotencyLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<I, St> IdempotencyLayer<I, St> {
    /// Reads the key from the header `name` instead of `Idempotency-Key`.
    ///
    /// # Panics
    ///
    /// If `name` is not a valid header name.
    pub fn header<N>(mut self, name: N) -> Self
    where
        N: TryInto<HeaderName>,
        N::Error: fmt::Debug,
    {
        self.config.header = name
            .try_into()
            .expect("invalid idempotency key header name");
        self
    }

    /// Whether a request without the header is refused with `400` (problem+json) rather
    /// than passed through.
    pub fn require_key(mut self, require: bool) -> Self {
        self.config.require_key = require;
        self
    }

    /// How long a completed response is replayed.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }

    /// The largest request body that is read to fingerprint it (larger: `413`), and the
    /// largest response body that is shared and stored (larger: the leader receives it,
    /// followers get `503`, and nothing is stored).
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.config.body_limit = bytes;
        self
    }

    /// What a request does while the first request with its key runs: wait and share its
    /// response ([`OnDuplicate::Share`], the default), or get `409 Conflict` at once
    /// ([`OnDuplicate::Conflict`]), the IETF draft's answer for clients that retry.
    ///
    /// ```
    /// use tower_coalesce::http::OnDuplicate;
    /// use tower_coalesce::idempotency::IdempotencyLayer;
    ///
    /// let layer = IdempotencyLayer::new().on_duplicate(OnDuplicate::Conflict);
    /// ```
    ///
    /// # Panics
    ///
    /// On [`OnDuplicate::PassThrough`]: running duplicates is what idempotency keys exist
    /// to prevent.
    pub fn on_duplicate(mut self, policy: OnDuplicate) -> Self {
        assert!(
            policy != OnDuplicate::PassThrough,
            "OnDuplicate::PassThrough would run duplicate requests: not for idempotency keys"
        );
        self.config.on_duplicate = policy;
        self
    }

    /// How long a duplicate waits for the first request at most; then it gets `503` with
    /// `Retry-After: 1`, and the first request goes on. No limit by default.
    ///
    /// With a store shared by several instances, it also bounds how long an instance waits
    /// for the instance that runs the key; then every caller of the key on the waiting
    /// instance gets the `503`. Without it, an instance waits as long as the other's
    /// request runs (and renews its lease).
    pub fn follower_timeout(mut self, timeout: Duration) -> Self {
        self.config.follower_timeout = Some(timeout);
        self
    }

    /// How many duplicates may wait for the first request; more get `503` with
    /// `Retry-After: 1` at once. No limit by default.
    pub fn max_followers(mut self, max: usize) -> Self {
        self.config.max_followers = Some(max);
        self
    }

    /// What a request does when the store fails or times out: run anyway
    /// ([`OnStoreError::FailOpen`], the default) or answer `503`
    /// ([`OnStoreError::FailClosed`]).
    ///
    /// ```
    /// use tower_coalesce::idempotency::{IdempotencyLayer, OnStoreError};
    ///
    /// let layer = IdempotencyLayer::new().on_store_error(OnStoreError::FailClosed);
    /// ```
    pub fn on_store_error(mut self, policy: OnStoreError) -> Self {
        self.config.on_store_error = policy;
        self
    }

    /// Scopes keys by another identity; see [`http::scope`](crate::http::scope).
    pub fn scope<NewScope>(self, scope: NewScope) -> IdempotencyLayer<NewScope, St> {
        IdempotencyLayer {
            config: self.config,
            scope,
            store: self.store,
            metrics: self.metrics,
            flights: self.flights,
        }
    }

    /// Keeps responses in `store` instead of the default [`MemoryStore`].
    pub fn store<NewStore>(self, store: NewStore) -> IdempotencyLayer<I, NewStore> {
        IdempotencyLayer {
            config: self.config,
            scope: self.scope,
            store,
            metrics: self.metrics,
            flights: self.flights,
        }
    }

    /// The counters of every service this layer builds.
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }
}

impl<S, I: Clone, St: Clone> Layer<S> for IdempotencyLayer<I, St> {
    type Service = Idempotency<S, I, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            layer: Arc::new(self.clone()),
        }
    }
}

impl<I, St> fmt::Debug for IdempotencyLayer<I, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("config", &self.config)
            .field("scope", &std::any::type_name::<I>())
            .field("store", &std::any::type_name::<St>())
            .finish()
    }
}
