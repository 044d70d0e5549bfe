//! Coalescing for HTTP services: one call, one buffered response, a copy for every caller.
//!
//! [`HttpCoalesceLayer`] is [`CoalesceLayer`](crate::coalesce::CoalesceLayer) for services
//! that take an `http::Request` and return an `http::Response`, such as axum routers and
//! hyper services. A response body is a stream that can be read once, so the layer reads the
//! leader's body into memory (up to a [limit](HttpCoalesceLayer::body_limit)) and hands every
//! caller of the flight its own `Response` with the same head and the same bytes.
//!
//! Three things differ from the plain layer:
//!
//! - **Keys** come from the request head: a header such as `Idempotency-Key`, the method and
//!   path, a path parameter, a tuple of these, or a closure over
//!   [`Parts`](http::request::Parts). See [`key`].
//! - **Scopes**: a flight is shared only by callers of the same identity (by default, the
//!   same `Authorization` and `Cookie` headers), so one user never receives a response
//!   made for another. See [`scope`].
//! - **Answers instead of errors**: what the layer itself refuses becomes a response with
//!   an RFC 9457 problem+json body (`400` for a missing key under
//!   [`require_key`](HttpCoalesceLayer::require_key), `503` for a follower whose flight's
//!   response was too large to share), so the error type stays the inner service's:
//!   `Infallible` for axum.
//!
//! # Example
//!
//! Concurrent `POST /api/clients` with the same `Idempotency-Key`, from the same user,
//! create the client once; every one of them gets the same `201`:
//!
//! ```
//! use axum::{Router, routing::post};
//! use tower_coalesce::http::{HttpCoalesceLayer, key};
//!
//! async fn create_client() -> (http::StatusCode, &'static str) {
//!     // look the client up, insert it if it is missing...
//!     (http::StatusCode::CREATED, r#"{"id":"c-1"}"#)
//! }
//!
//! let app: Router = Router::new()
//!     .route("/api/clients", post(create_client))
//!     .layer(HttpCoalesceLayer::new(key::idempotency_key()));
//! ```
//!
//! And configured: keyed by a client id header, refusing requests without it, scoped by an
//! API key header, with a 64 KiB limit and a response header naming each caller's role:
//!
//! ```
//! use tower::ServiceBuilder;
//! use tower_coalesce::http::{HttpCoalesceLayer, Role, key, scope};
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
//!     .service_fn(|_req: Request<Full<Bytes>>| async {
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
//! assert_eq!(metrics.keys_missing(), 1);
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
//! # Observability
//!
//! With `tracing` at `DEBUG`, each flight runs in a `coalesce_flight` span, and the layer
//! logs flights started and completed and callers joining and cancelling. Keys carry user ids,
//! so logs name a key by a hash of it, seeded per process. [`Metrics`] counts the same events.

pub(crate) mod body;
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

pub use self::body::ResponseBody;
pub use self::layer::{DEFAULT_BODY_LIMIT, HttpCoalesceLayer};
pub use self::metrics::Metrics;
pub use self::policy::{DoNotShare, Fallback, OnDuplicate, Unshared};
pub use self::role::Role;
pub use self::service::HttpCoalesce;
