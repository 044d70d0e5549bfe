//! Coalescing for HTTP services: one call, one buffered response, a copy for every caller.
//!
//! [`HttpCoalesceLayer`] is [`CoalesceLayer`](crate::coalesce::CoalesceLayer) for services
//! that take an `http::Request` and return an `http::Response`, such as axum routers and
//! hyper services. A response body is a stream that can be read once, so the layer reads the
//! leader's body into memory (up to a [limit](HttpCoalesceLayer::body_limit)) and hands every
//! caller of the flight its own `Response` with the same head and the same bytes.
//!
//! One engine serves every request, in four steps:
//!
//! 1. **Admit.** The key comes from the request head (a header such as `Idempotency-Key`,
//!    the method and path, a path parameter) or from the body ([`key::json`],
//!    [`key::form`]), alone or in tuples, or from a closure over
//!    [`Parts`]; see [`key`]. A request without one passes through
//!    unread. A keyed request's body is read (up to a
//!    [limit](HttpCoalesceLayer::request_body_limit), else `413`), and the request gets a
//!    *fingerprint*: its method, path, query and body.
//! 2. **Join or lead.** Requests share a flight only with the same key, the same identity
//!    (the [`scope`], by default the `Authorization` and `Cookie` headers) and the same
//!    fingerprint: **a caller never receives the response to another request**. A different
//!    request with the key waits for the running one and then runs, or gets `422`
//!    ([`OnMismatch`]). A response that names request headers in `Vary` goes only to
//!    callers (and replays) whose values for them are the leader's; the others wait for a
//!    run of their own variant, or get `422` ([see below](#layer-order)). A request whose
//!    scope finds no identity shares with nobody. With a [store](HttpCoalesceLayer::store) shared by several instances
//!    (Redis), the flight also takes the key's lease, so that one instance runs it.
//! 3. **Run.** The leader's request calls the inner service; its response is buffered, and
//!    kept in the store if [`replay`](HttpCoalesceLayer::replay) asks for it.
//! 4. **Answer.** Every caller gets its copy, a replay, or the layer's own answer: an RFC
//!    9457 problem+json response (`400` for a missing key under
//!    [`require_key`](HttpCoalesceLayer::require_key), `409`, `413`, `422`, `503`), so
//!    that the error type stays the inner service's: `Infallible` for axum.
//!
//! [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer) (feature `idempotency`) is the
//! same engine with strict defaults: a required `Idempotency-Key`, `422` for a reused key,
//! and 24 hours of replay.
//!
//! # Example
//!
//! Concurrent `POST /api/clients` with the same client id in their JSON body, from the same
//! user, create the client once; every one of them gets the same `201`:
//!
//! ```
//! use axum::{Router, routing::post};
//! use tower_coalesce::http::{HttpCoalesceLayer, key};
//!
//! async fn create_client(body: String) -> (http::StatusCode, String) {
//!     // look the client up, insert it if it is missing...
//!     (http::StatusCode::CREATED, body)
//! }
//!
//! let app: Router = Router::new()
//!     .route("/api/clients", post(create_client))
//!     .layer(HttpCoalesceLayer::new(key::json("/id")));
//! ```
//!
//! And configured: keyed by a client id header, refusing requests without it, scoped by an
//! API key header, with a 64 KiB limit and a response header naming each caller's role:
//!
//! ```
//! use tower::ServiceBuilder;
//! use tower_coalesce::http::{HttpCoalesceLayer, RequestBody, Role, key, scope};
//! # use std::convert::Infallible;
//! # use http::{Request, Response};
//! # use http_body_util::{BodyExt, Full};
//! # use bytes::Bytes;
//! # use tower::{Service, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let layer = HttpCoalesceLayer::new(key::header("x-client-id"))
//!     .scope(scope::headers(["x-api-key"]))
//!     .require_key(true)
//!     .body_limit(64 * 1024)
//!     .role_header(true);
//! let metrics = layer.metrics();
//!
//! let mut svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .service_fn(|_req: Request<RequestBody<Full<Bytes>>>| async {
//!         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("created"))))
//!     });
//!
//! let req = Request::post("/api/clients")
//!     .header("x-client-id", "c-1")
//!     .header("x-api-key", "k-1")
//!     .body(Full::default())?;
//! let res = svc.ready().await?.call(req).await?;
//! assert_eq!(res.extensions().get::<Role>(), Some(&Role::Leader));
//! assert_eq!(res.headers()["coalesce-role"], "leader");
//! assert_eq!(res.into_body().collect().await?.to_bytes(), "created");
//!
//! let no_key = Request::post("/api/clients").body(Full::default())?;
//! let res = svc.ready().await?.call(no_key).await?;
//! assert_eq!(res.status(), 400);
//! assert_eq!(metrics.flights_started(), 1);
//! assert_eq!(metrics.requests_refused_without_key(), 1);
//! # Ok(())
//! # }
//! ```
//!
//! # Concurrent calls on the same key
//!
//! The guarantees of [`single_flight`](crate::single_flight) hold: one inner call per
//! flight, a call that outlives any one caller (a disconnected client cancels nothing for the
//! others), a panic that reaches every waiter of its flight, and waiters woken once. A
//! flight ends when its response body has been read to the end (or to the limit), so the
//! body is read once, whatever happens to the leader's connection.
//!
//! Requests with one key and different fingerprints run one after another, never at once
//! (or the later ones get `422`, under [`OnMismatch::Reject`]): two different updates of one
//! record are both applied, in turn.
//!
//! # What it costs
//!
//! Keyed request bodies are read into memory before the inner service is called (that is
//! how different bodies are told apart). Callers in one process compare method, path,
//! query and body as they are; the SHA-256 fingerprint of them is made where a store keeps
//! responses, a cache's stage runs, or a response varies on headers. For
//! upload or streaming routes, leave them without a key: see
//! [`HttpCoalesceLayer`]'s docs.
//!
//! # Waiting under control
//!
//! By default a duplicate waits for its flight however long it runs, with however many
//! others. Per layer (so per route, if you layer routes separately), a duplicate can instead
//! get `409 Conflict` at once or run on its own ([`OnDuplicate`]); followers can be given a
//! [wait timeout](HttpCoalesceLayer::follower_timeout) and a
//! [cap](HttpCoalesceLayer::max_followers), after which they get `503` or run on their own
//! ([`Fallback`]); and a response can be kept from being shared ([`DoNotShare`],
//! [`share_when`](HttpCoalesceLayer::share_when)).
//!
//! # A key that is never there
//!
//! A keyed layer that sees requests without a key counts them
//! ([`Metrics::requests_without_key`]) and logs the first one at `WARN`. The two usual
//! causes: a key read from an extension that a layer *inside* this one inserts (axum applies
//! `.layer` calls outside-in: the last one added runs first), and a
//! [`key::path_param`] pattern under `Router::nest`, which sees the path without the nest's
//! prefix. [`require_key(true)`](HttpCoalesceLayer::require_key) turns both into `400`s.
//!
//! A scope that finds no identity (a closure reading an extension that the auth layer
//! has not inserted yet) is the same mistake in another place: such a request is shared
//! with nobody, counted ([`Metrics::requests_without_identity`]) and logged at `WARN`
//! once, and refused with `400` under `require_key(true)`. See [`scope`].
//!
//! # Layer order
//!
//! Layers that make a response depend on request headers belong **above** this one
//! (with axum: added after it), so that they run on every caller's copy:
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, http::StatusCode, routing::post};
//! use tower_coalesce::http::{HttpCoalesceLayer, key};
//! use tower_http::{compression::CompressionLayer, cors::CorsLayer, timeout::TimeoutLayer};
//!
//! let app: Router = Router::new()
//!     .route("/api/clients", post(|| async { "created" }))
//!     .layer(HttpCoalesceLayer::new(key::json("/id")))
//!     // Above the coalescing layer: each caller's copy is compressed for that caller,
//!     // gets the CORS headers of its Origin, and a caller that times out leaves its
//!     // flight without cancelling it for the others.
//!     .layer(CompressionLayer::new())
//!     .layer(CorsLayer::permissive())
//!     .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, Duration::from_secs(10)));
//! ```
//!
//! Below it, tower-http's `CompressionLayer` adds `Vary: accept-encoding` and `CorsLayer`
//! `Vary: origin` to the one response of a flight, which then answers only the callers
//! that sent the leader's values. The others are never given it: they wait and share one
//! run of their own variant (one variant at a time), or, under [`OnMismatch::Reject`] (the
//! idempotency preset), get a `422` that names the header, since a second run of the key
//! is what that preset promises never to do. The layer logs a `WARN` the first time.
//!
//! # Observability
//!
//! With `tracing` at `DEBUG`, each keyed request runs in a `coalesce` span that says who
//! served it, so that a trace of a slow request shows that it waited on another's flight
//! (with `tracing-opentelemetry`, these are span attributes):
//!
//! | field | value |
//! | --- | --- |
//! | `http.request.method`, `url.path`, `http.response.status_code` | OpenTelemetry's HTTP attributes |
//! | `coalesce.layer` | `the coalescing layer`, `the idempotency layer`, `the cache layer` |
//! | `coalesce.role` | `leader`, `follower`, `own` (served by a call of its own), `replay`, `hit`, `stale`, `refused` (the layer's own `4xx`/`5xx`) |
//! | `coalesce.flight_id` | the flight it led: unique in the process |
//! | `coalesce.waited_on` | the flight it followed |
//! | `coalesce.cache` | the cache's verdict: `hit`, `stale`, `miss` |
//!
//! Each flight runs in a `coalesce_flight` span, a child of its leader's, with its
//! `coalesce.flight_id` and `coalesce.elsewhere = true` when it waited for another
//! instance's run of the key (then its answer is that instance's). The layer logs flights
//! started and completed and callers joining and cancelling. Keys carry user ids, so logs
//! name a key by a hash of it, seeded per process, and spans name none. [`Metrics`] counts
//! the same events; `dashboards/grafana.json` in the repository charts them.

pub(crate) mod body;
pub(crate) mod engine;
pub mod error;
pub(crate) mod flown;
pub mod future;
pub mod key;
mod layer;
mod metrics;
pub mod policy;
pub(crate) mod problem;
mod role;
pub mod scope;
mod service;
pub(crate) mod stage;

/// The request head that keys and scopes read, re-exported so that an app need not depend
/// on `http` to name it.
pub use http::request::Parts;

pub use self::body::ResponseBody;
pub use self::layer::{DEFAULT_BODY_LIMIT, DEFAULT_HANDOVER, HttpCoalesceLayer};
pub use self::metrics::Metrics;
pub use self::policy::{DoNotShare, Fallback, OnDuplicate, OnMismatch, OnStoreError, Unshared};
pub use self::role::Role;
pub use self::service::HttpCoalesce;

/// The request body the inner service receives: a keyed request's body, read by the layer
/// (`Either::Left`), or the body of a request passed through unread (`Either::Right`). Both
/// are `http_body::Body`s with `Bytes` data, as axum handlers and routers accept.
pub type RequestBody<B> = http_body_util::Either<http_body_util::Full<bytes::Bytes>, B>;
