use std::fmt;
use std::time::Duration;

use http::HeaderName;
use tower::Layer;

use super::Idempotency;
use crate::http::HttpCoalesce;
use crate::http::OnMismatch;
use crate::http::engine::{Config, Engine};
use crate::http::key::{self, HeaderKey};
use crate::http::scope::DefaultScope;
use crate::store::MemoryStore;

/// Applies [`Idempotency`] to an HTTP service: requests with an `Idempotency-Key` header
/// are coalesced while the first one runs, and replayed from the store once it completed.
///
/// This is [`HttpCoalesceLayer`](crate::http::HttpCoalesceLayer)'s engine with strict
/// defaults, each changed by the method of the same name:
/// - [`header`](Self::header): the key is the `Idempotency-Key` header;
/// - [`skip_safe_methods`](Self::skip_safe_methods): on, `GET`, `HEAD`, `OPTIONS` and
///   `TRACE` pass through untouched, key or not;
/// - [`require_key`](Self::require_key): on, a request without a valid key gets `400`,
///   and so does one whose [scope](Self::scope) finds no identity;
/// - [`on_mismatch`](Self::on_mismatch): [`OnMismatch::Reject`], a key reused with another
///   method, path, query or body, or with other values of a header the key's response
///   `Vary`s on, gets `422`;
/// - [`store`](Self::store): a [`MemoryStore`] of 64 MiB;
/// - [`replay`](Self::replay): completed responses are
///   replayed for 24 hours;
/// - [`finish_abandoned`](Self::finish_abandoned): on, a request whose clients all left
///   still completes, and its response is kept for the retry;
/// - [`scope`](Self::scope): [`DefaultScope`], the `Authorization` and `Cookie` headers;
/// - [`body_limit`](Self::body_limit) and [`request_body_limit`](Self::request_body_limit):
///   1 MiB.
///
/// Every service the layer (or a clone of it) builds shares one registry, one store and
/// one set of [`Metrics`](crate::http::Metrics).
///
/// See the [module docs](crate::idempotency) for an example.
#[derive(Clone)]
pub struct IdempotencyLayer<I = DefaultScope, St = MemoryStore> {
    pub(crate) engine: Engine<HeaderKey, I, St>,
}

/// The default of [`IdempotencyLayer::replay`]: 24 hours.
pub const DEFAULT_REPLAY_TTL: Duration = Duration::from_secs(24 * 60 * 60);

impl IdempotencyLayer {
    /// A layer with the defaults listed above.
    pub fn new() -> Self {
        let header = HeaderName::from_static("idempotency-key");
        let config = Config {
            require_key: true,
            on_mismatch: OnMismatch::Reject,
            has_store: true,
            replay: Some(DEFAULT_REPLAY_TTL),
            finish_abandoned: true,
            key_header: Some(header.clone()),
            skip_safe_methods: true,
            name: "the idempotency layer",
            ..Config::default()
        };
        let engine = Engine::new(
            key::header(header),
            DefaultScope::default(),
            MemoryStore::default(),
            config,
        );
        IdempotencyLayer { engine }
    }
}

impl Default for IdempotencyLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<I, St> IdempotencyLayer<I, St> {
    define_engine_setters!();

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
        let name = name
            .try_into()
            .expect("invalid idempotency key header name");
        self.engine.config.key_header = Some(name.clone());
        self.engine.make_key = key::header(name);
        self
    }

    /// Whether requests with a safe method (`GET`, `HEAD`, `OPTIONS`, `TRACE`) pass through
    /// untouched, with a key or without: on by default. The Idempotency-Key draft and
    /// Stripe apply keys to methods that are not idempotent; with this on, the layer can
    /// sit on a whole router (`GET /health`, CORS preflights) without refusing its reads.
    ///
    /// Unknown paths and methods are a router's business: apply the layer to the handlers
    /// it guards with axum's `MethodRouter::route_layer`, so that a `POST` to an unknown
    /// path gets the router's `404` and a method the route doesn't serve its `405`, rather
    /// than this layer's `400` for a missing key. `Router::route_layer` gives the `404`
    /// but runs on every method of a matched path (`DELETE /payments` on a `POST`-only
    /// route gets `400`); `Router::layer` runs on every request, matched or not.
    ///
    /// ```
    /// use axum::{Router, routing::{get, post}};
    /// use tower_coalesce::idempotency::IdempotencyLayer;
    ///
    /// let app: Router = Router::new()
    ///     .route("/health", get(|| async { "ok" }))
    ///     .route("/payments", post(|| async { "paid" }).route_layer(IdempotencyLayer::new()));
    /// ```
    pub fn skip_safe_methods(mut self, skip: bool) -> Self {
        self.engine.config.skip_safe_methods = skip;
        self
    }

    /// Scopes keys by another identity; see [`http::scope`](crate::http::scope).
    pub fn scope<NewScope>(self, scope: NewScope) -> IdempotencyLayer<NewScope, St> {
        IdempotencyLayer {
            engine: self.engine.with_scope(scope),
        }
    }

    /// Keeps responses in `store` instead of the default [`MemoryStore`]; a store shared
    /// by several instances ([`RedisStore`](crate::redis),
    /// [`PostgresStore`](crate::postgres)) also runs each key once across all of them.
    pub fn store<NewStore>(self, store: NewStore) -> IdempotencyLayer<I, NewStore> {
        IdempotencyLayer {
            engine: self.engine.with_store(store),
        }
    }
}

impl<S, I: Clone, St: Clone> Layer<S> for IdempotencyLayer<I, St> {
    type Service = Idempotency<S, I, St>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpCoalesce::from_engine(inner, self.engine.clone())
    }
}

impl<I, St> fmt::Debug for IdempotencyLayer<I, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("engine", &self.engine)
            .finish()
    }
}
