use std::fmt;

use tower::Layer;

use super::HttpCoalesce;
use super::metrics::Metrics;
use super::scope::{DefaultScope, Unscoped};
use crate::single_flight::LazyGroup;

/// Applies [`HttpCoalesce`] to an HTTP service: concurrent requests with equal keys, from
/// the same caller identity, share one call and one buffered response.
///
/// Defaults, each changed by the method of the same name:
/// - [`scope`](Self::scope): [`DefaultScope`], the `Authorization` and `Cookie` headers;
/// - [`body_limit`](Self::body_limit): 1 MiB ([`DEFAULT_BODY_LIMIT`]);
/// - [`require_key`](Self::require_key): off, requests without a key pass through;
/// - [`role_header`](Self::role_header): off.
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

#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    pub(crate) body_limit: usize,
    pub(crate) require_key: bool,
    pub(crate) role_header: bool,
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
            .finish()
    }
}
