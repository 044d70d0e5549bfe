use std::fmt;
use std::time::Duration;

use tower::Layer;

use super::HttpCoalesce;
use super::engine::{Config, Engine};
use super::scope::{DefaultScope, Unscoped};
use crate::store::NoStore;

/// Applies [`HttpCoalesce`] to an HTTP service: concurrent identical requests (equal keys,
/// equal scopes, equal method, path, query and body) share one call and one buffered
/// response.
///
/// Defaults, each changed by the method of the same name:
/// - [`scope`](Self::scope): [`DefaultScope`], the `Authorization` and `Cookie` headers;
/// - [`body_limit`](Self::body_limit) and [`request_body_limit`](Self::request_body_limit):
///   1 MiB ([`DEFAULT_BODY_LIMIT`]);
/// - [`require_key`](Self::require_key): off, requests without a key pass through;
/// - [`role_header`](Self::role_header): off;
/// - [`on_duplicate`](Self::on_duplicate): share the running flight's response;
/// - [`on_mismatch`](Self::on_mismatch): a different request with the key waits for its
///   turn ([`OnMismatch::Queue`](super::OnMismatch::Queue));
/// - [`follower_timeout`](Self::follower_timeout) and [`max_followers`](Self::max_followers):
///   none, with a `503` [`fallback`](Self::fallback) once set;
/// - [`share_when`](Self::share_when): every response is shared unless marked
///   [`DoNotShare`](super::DoNotShare);
/// - [`store`](Self::store): none, flights are shared within this process; with a store
///   shared by several instances (Redis), one run per key across all of them;
/// - [`replay`](Self::replay): off, nothing is kept once a flight ends;
/// - [`finish_abandoned`](Self::finish_abandoned): off.
///
/// [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer) is the same engine with
/// strict defaults.
///
/// # What it costs
///
/// A keyed request's body is read into memory (up to the request body limit) before the
/// inner service is called, so that requests with one key and different bodies are never
/// merged; the inner service then receives the buffered body. For routes that take large
/// uploads or stream their request bodies, give them no key (leave them out of the layer
/// with `route_layer` on the other routes, or use a key maker that returns `None` for
/// them): requests without a key pass through unread.
///
/// # One registry per layer
///
/// Every service this layer (or a clone of it) builds shares one registry of flights and
/// one set of [`Metrics`](super::Metrics); separate layers never coalesce with each other.
/// This differs from [`CoalesceLayer`](crate::coalesce::CoalesceLayer), whose every
/// `layer` call makes a registry, because HTTP servers apply layers more often than users
/// think: axum builds a `Router` without state anew for every connection, and
/// `Router::layer` applies the layer to every route. A flight is therefore identified by the
/// request's method, path, query and body as well as its key and scope: the same key on two
/// routes never shares a response (the second request waits for its turn, by default).
///
/// See the [module docs](crate::http) for an example.
#[derive(Clone)]
pub struct HttpCoalesceLayer<K, I = DefaultScope, St = NoStore> {
    pub(crate) engine: Engine<K, I, St>,
}

/// The default of [`HttpCoalesceLayer::body_limit`] and
/// [`HttpCoalesceLayer::request_body_limit`]: 1 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

/// The default of [`HttpCoalesceLayer::handover`]: 2 s.
pub const DEFAULT_HANDOVER: Duration = Duration::from_secs(2);

impl<K> HttpCoalesceLayer<K> {
    /// Creates a layer that coalesces requests by the key `make_key` returns: one of the
    /// ready-made [`key`](super::key)s, a tuple of them, or a closure
    /// `Fn(&http::request::Parts) -> Option<Key>`.
    pub fn new(make_key: K) -> Self {
        HttpCoalesceLayer {
            engine: Engine::new(
                make_key,
                DefaultScope::default(),
                NoStore,
                Config::default(),
            ),
        }
    }
}

impl<K, I, St> HttpCoalesceLayer<K, I, St> {
    define_engine_setters!();

    /// Scopes flights by another identity: requests share a flight only if their scopes
    /// are equal. See [`scope`](super::scope) for the choices.
    pub fn scope<NewScope>(self, scope: NewScope) -> HttpCoalesceLayer<K, NewScope, St> {
        HttpCoalesceLayer {
            engine: self.engine.with_scope(scope),
        }
    }

    /// Lets callers with equal keys share flights **whoever they are**.
    ///
    /// One caller may then receive a response made for another: use this only where
    /// responses hold nothing private to a caller. See [`Unscoped`].
    pub fn unscoped(self) -> HttpCoalesceLayer<K, Unscoped, St> {
        self.scope(Unscoped)
    }

    /// Runs each key once across every instance that shares `store`, and keeps what
    /// [`replay`](Self::replay) asks for there.
    ///
    /// A store shared by several instances ([`RedisStore`](crate::redis), feature `redis`)
    /// hands out a lease per key: the instance that holds it runs the request, the others
    /// wait for its response (which it stores for the [handover](Self::handover) window
    /// only, unless `replay` keeps it longer). A store of one process
    /// (`MemoryStore`, feature `idempotency`) only keeps responses for replay. See
    /// [`Store`](crate::store::Store).
    pub fn store<NewStore>(self, store: NewStore) -> HttpCoalesceLayer<K, I, NewStore> {
        HttpCoalesceLayer {
            engine: self.engine.with_store(store),
        }
    }
}

impl<S, K, I, St> Layer<S> for HttpCoalesceLayer<K, I, St>
where
    K: Clone,
    I: Clone,
    St: Clone,
{
    type Service = HttpCoalesce<S, K, I, St>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpCoalesce::from_engine(inner, self.engine.clone())
    }
}

impl<K, I, St> fmt::Debug for HttpCoalesceLayer<K, I, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCoalesceLayer")
            .field("engine", &self.engine)
            .finish()
    }
}
