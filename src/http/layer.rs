use std::fmt;
use std::time::Duration;

use tower::Layer;

use super::HttpCoalesce;
use super::metrics::Metrics;
use super::policy::{Fallback, OnDuplicate, SharePredicate, Unshared};
use super::scope::{DefaultScope, Unscoped};
use crate::single_flight::LazyGroup;

/// Applies [`HttpCoalesce`] to an HTTP service: concurrent requests with equal keys, from
/// the same caller identity, share one call and one buffered response.
///
/// Defaults, each changed by the method of the same name:
/// - [`scope`](Self::scope): [`DefaultScope`], the `Authorization` and `Cookie` headers;
/// - [`body_limit`](Self::body_limit): 1 MiB ([`DEFAULT_BODY_LIMIT`]);
/// - [`require_key`](Self::require_key): off, requests without a key pass through;
/// - [`role_header`](Self::role_header): off;
/// - [`on_duplicate`](Self::on_duplicate): share the running flight's response;
/// - [`follower_timeout`](Self::follower_timeout) and [`max_followers`](Self::max_followers):
///   none, with a `503` [`fallback`](Self::fallback) once set;
/// - [`share_when`](Self::share_when): every response is shared unless marked
///   [`DoNotShare`](super::DoNotShare).
///
/// # One registry per layer
///
/// Every service this layer (or a clone of it) builds shares one registry of flights and
/// one set of [`Metrics`]; separate layers never coalesce with each other. This differs
/// from [`CoalesceLayer`](crate::coalesce::CoalesceLayer), whose every `layer` call makes a
/// registry, because HTTP servers apply layers more often than users think: axum builds a
/// `Router` without state anew for every connection, and `Router::layer` applies the layer
/// to every route. A flight key therefore always includes the request's method and path
/// (as well as its scope): the same key on two routes never shares a response.
///
/// See the [module docs](crate::http) for an example.
#[derive(Clone)]
pub struct HttpCoalesceLayer<K, I = DefaultScope> {
    make_key: K,
    scope: I,
    config: Config,
    metrics: Metrics,
    flights: LazyGroup,
}

/// The default of [`HttpCoalesceLayer::body_limit`]: 1 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) body_limit: usize,
    pub(crate) require_key: bool,
    pub(crate) role_header: bool,
    pub(crate) on_duplicate: OnDuplicate,
    pub(crate) follower_timeout: Option<Duration>,
    pub(crate) max_followers: Option<usize>,
    pub(crate) fallback: Fallback,
    pub(crate) share: SharePredicate,
    pub(crate) unshared: Unshared,
}

impl<K> HttpCoalesceLayer<K> {
    /// Creates a layer that coalesces requests by the key `make_key` returns: one of the
    /// ready-made [`key`](super::key)s, a tuple of them, or a closure
    /// `Fn(&http::request::Parts) -> Option<Key>`.
    pub fn new(make_key: K) -> Self {
        HttpCoalesceLayer {
            make_key,
            scope: DefaultScope::default(),
            config: Config {
                body_limit: DEFAULT_BODY_LIMIT,
                require_key: false,
                role_header: false,
                on_duplicate: OnDuplicate::Share,
                follower_timeout: None,
                max_followers: None,
                fallback: Fallback::ServiceUnavailable,
                share: SharePredicate::default_marker(),
                unshared: Unshared::Concurrently,
            },
            metrics: Metrics::default(),
            flights: LazyGroup::default(),
        }
    }
}

impl<K, I> HttpCoalesceLayer<K, I> {
    /// Scopes flights by another identity: requests share a flight only if their scopes
    /// are equal. See [`scope`](super::scope) for the choices.
    pub fn scope<NewScope>(self, scope: NewScope) -> HttpCoalesceLayer<K, NewScope> {
        HttpCoalesceLayer {
            make_key: self.make_key,
            scope,
            config: self.config,
            metrics: self.metrics,
            flights: self.flights,
        }
    }

    /// Lets callers with equal keys share flights **whoever they are**.
    ///
    /// One caller may then receive a response made for another: use this only where
    /// responses hold nothing private to a caller. See [`Unscoped`].
    pub fn unscoped(self) -> HttpCoalesceLayer<K, Unscoped> {
        self.scope(Unscoped)
    }

    /// Sets the largest response body, in bytes, that a flight buffers to share.
    ///
    /// A flight whose response body is larger (by its size hint, or once that many bytes
    /// have arrived) stops buffering. Its leader still receives the whole response: the
    /// bytes read so far, then the rest of the body as it streams. Each follower receives
    /// `503 Service Unavailable` with `Retry-After: 1` and a problem+json body, and
    /// [`Metrics::bodies_over_limit`] counts the flight. Nobody receives a truncated body.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.config.body_limit = bytes;
        self
    }

    /// Whether requests without a key are refused rather than passed through.
    ///
    /// When on, a request whose key maker returns `None` (for [`key::header`], also a
    /// repeated, empty, over-long or non-ASCII header) gets `400 Bad Request` with a
    /// problem+json body (RFC 9457), and never reaches the inner service.
    ///
    /// [`key::header`]: super::key::header
    pub fn require_key(mut self, require: bool) -> Self {
        self.config.require_key = require;
        self
    }

    /// Whether responses to keyed requests carry a `coalesce-role: leader` or
    /// `coalesce-role: follower` header. The [`Role`](super::Role) extension is always set.
    pub fn role_header(mut self, enable: bool) -> Self {
        self.config.role_header = enable;
        self
    }

    /// What a request does when a flight for its key is already running: wait and share
    /// its response ([`OnDuplicate::Share`], the default), get `409 Conflict` at once
    /// ([`OnDuplicate::Conflict`]), or call the inner service itself
    /// ([`OnDuplicate::PassThrough`], for read-only routes only).
    ///
    /// ```
    /// use tower_coalesce::http::{HttpCoalesceLayer, OnDuplicate, key};
    ///
    /// // Clients of this route retry on 409 rather than wait.
    /// let layer = HttpCoalesceLayer::new(key::idempotency_key())
    ///     .on_duplicate(OnDuplicate::Conflict);
    /// ```
    pub fn on_duplicate(mut self, policy: OnDuplicate) -> Self {
        self.config.on_duplicate = policy;
        self
    }

    /// How long a follower waits for its flight at most. When it has waited that long, it
    /// leaves the flight (which goes on for the others) and gets the
    /// [`fallback`](Self::fallback). No limit by default.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_coalesce::http::{Fallback, HttpCoalesceLayer, key};
    ///
    /// // A read-only report: after 2 s of waiting, compute it yourself.
    /// let layer = HttpCoalesceLayer::new(key::method_path_and_query())
    ///     .follower_timeout(Duration::from_secs(2))
    ///     .fallback(Fallback::PassThrough);
    /// ```
    pub fn follower_timeout(mut self, timeout: Duration) -> Self {
        self.config.follower_timeout = Some(timeout);
        self
    }

    /// How many followers may wait for one flight. A caller that would be one more gets
    /// the [`fallback`](Self::fallback) at once: the layer sheds load rather than queue
    /// without bound. No limit by default.
    ///
    /// ```
    /// use tower_coalesce::http::{HttpCoalesceLayer, key};
    ///
    /// let layer = HttpCoalesceLayer::new(key::idempotency_key()).max_followers(100);
    /// ```
    pub fn max_followers(mut self, max: usize) -> Self {
        self.config.max_followers = Some(max);
        self
    }

    /// What a follower gets when it stops waiting (wait timeout) or is turned away
    /// (follower cap): `503` with `Retry-After: 1` ([`Fallback::ServiceUnavailable`], the
    /// default), or a call of its own ([`Fallback::PassThrough`], for read-only routes).
    pub fn fallback(mut self, fallback: Fallback) -> Self {
        self.config.fallback = fallback;
        self
    }

    /// Decides from the response head whether a flight's response may be shared. A
    /// response it refuses goes to the leader only, streamed as it is; each follower then
    /// calls the inner service itself (see [`unshared`](Self::unshared)). By default only
    /// responses with the [`DoNotShare`](super::DoNotShare) extension are refused;
    /// [`policy::not_private`](super::policy::not_private) also refuses
    /// `Cache-Control: private` and `no-store`.
    ///
    /// ```
    /// use tower_coalesce::http::{HttpCoalesceLayer, key, policy};
    ///
    /// let layer = HttpCoalesceLayer::new(key::method_and_path()).share_when(policy::not_private);
    /// ```
    pub fn share_when<P>(mut self, predicate: P) -> Self
    where
        P: Fn(&http::response::Parts) -> bool + Send + Sync + 'static,
    {
        self.config.share = SharePredicate::custom(predicate);
        self
    }

    /// Whether the followers of a flight whose response is not shared call the inner
    /// service all at once ([`Unshared::Concurrently`], the default) or one after another
    /// ([`Unshared::OneAfterAnother`]).
    pub fn unshared(mut self, unshared: Unshared) -> Self {
        self.config.unshared = unshared;
        self
    }

    /// The counters of every service this layer builds.
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    pub(crate) fn into_service<S>(self, inner: S) -> HttpCoalesce<S, K, I> {
        HttpCoalesce {
            inner,
            make_key: self.make_key,
            scope: self.scope,
            config: self.config,
            metrics: self.metrics,
            flights: self.flights,
        }
    }
}

impl<S, K, I> Layer<S> for HttpCoalesceLayer<K, I>
where
    K: Clone,
    I: Clone,
{
    type Service = HttpCoalesce<S, K, I>;

    fn layer(&self, inner: S) -> Self::Service {
        self.clone().into_service(inner)
    }
}

impl<K, I> fmt::Debug for HttpCoalesceLayer<K, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCoalesceLayer")
            .field("make_key", &std::any::type_name::<K>())
            .field("scope", &std::any::type_name::<I>())
            .field("body_limit", &self.config.body_limit)
            .field("require_key", &self.config.require_key)
            .field("role_header", &self.config.role_header)
            .field("on_duplicate", &self.config.on_duplicate)
            .field("follower_timeout", &self.config.follower_timeout)
            .field("max_followers", &self.config.max_followers)
            .field("fallback", &self.config.fallback)
            .field("share", &self.config.share)
            .field("unshared", &self.config.unshared)
            .finish()
    }
}
