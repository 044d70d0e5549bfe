//! Idempotency keys: coalesce concurrent duplicates, then replay the completed response.
//!
//! Coalescing helps only requests that overlap in time. A client that times out and retries
//! a `POST` a second later, or a front end that sends the same create after the first one
//! finished, still creates twice. [`IdempotencyLayer`] closes that gap for requests that
//! carry an `Idempotency-Key` header, as the IETF draft
//! (draft-ietf-httpapi-idempotency-key-header) and Stripe describe:
//!
//! 1. While the first request with a key runs, duplicates join its flight, as with
//!    [`HttpCoalesceLayer`](crate::http::HttpCoalesceLayer): one execution.
//! 2. Its response is stored (before the flight completes, so that no duplicate can slip
//!    between the two) for a TTL, 24 hours by default.
//! 3. A later request with the key gets the stored response replayed, marked with
//!    `Idempotent-Replayed: true`, without reaching the inner service.
//!
//! Unlike middlewares that check the store, call, and then store (where two concurrent
//! duplicates both run), this one coalesces first and stores second.
//!
//! # The rules
//!
//! | request | answer | inner service called |
//! | --- | --- | --- |
//! | `GET`, `HEAD`, `OPTIONS` or `TRACE` (under [`skip_safe_methods`](IdempotencyLayer::skip_safe_methods), the default) | passed through untouched, key or not | yes |
//! | no key, `require_key(true)` (default) | `400`, problem+json | no |
//! | no key, `require_key(false)` | passed through | yes |
//! | key empty, over 255 bytes, not visible ASCII, or sent twice | `400`, problem+json | no |
//! | key, but the [scope](crate::http::scope) finds no identity (an auth layer that runs after this one) | `400` (or, under `require_key(false)`, run on its own, never shared or replayed) | no / yes |
//! | body over the limit | `413`, problem+json | no |
//! | same key (and scope), same method, path and body, running | joins the flight (or `409` under [`on_duplicate`](IdempotencyLayer::on_duplicate), `503` beyond [`max_followers`](IdempotencyLayer::max_followers) or after [`follower_timeout`](IdempotencyLayer::follower_timeout)) | no |
//! | same key, running on another instance (shared store) | waits for it, then replayed (the same `409` / `503` rules) | no |
//! | same key, completed and stored | stored response replayed | no |
//! | store down or timed out | runs as if nothing were stored, or `503` under [`OnStoreError::FailClosed`] | yes / no |
//! | same key, different method, path, query or body, or a response (running or stored) that `Vary`s on a header this request sends otherwise | `422`, problem+json naming the varied headers | no |
//!
//! What is stored: successful and client-error responses (`2xx`, `3xx`, `4xx`). Not
//! stored, so that a retry runs again: server errors (`5xx`), errors of the inner service,
//! flights whose callers all left, bodies over the limit or ending in an error or with
//! trailers. The key is scoped to the caller's identity as in the HTTP layer
//! ([`http::scope`](crate::http::scope)): one user's key never replays another user's
//! response. The store key is a SHA-256 of the scope and key, so stores hold neither raw
//! keys nor credentials.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, routing::post};
//! use tower_coalesce::idempotency::IdempotencyLayer;
//!
//! async fn create_payment() -> &'static str { "payment p-1 created" }
//!
//! let app: Router = Router::new()
//!     .route("/payments", post(create_payment))
//!     .layer(IdempotencyLayer::new().require_key(true).replay(Duration::from_secs(3600)));
//! ```
//!
//! # Storage
//!
//! Responses are kept by a [`Store`](crate::store::Store): by default a
//! [`MemoryStore`](crate::store::MemoryStore) (moka, bounded by bytes, least recently used out
//! first), or one that several instances share: [`RedisStore`](crate::redis) (feature
//! `redis`; a single Redis or a Redis Cluster) or [`PostgresStore`](crate::postgres)
//! (feature `postgres`; with an [atomic mode](crate::postgres::PostgresStore::atomic) that
//! commits the handler's writes with the kept response). A shared store also hands out a
//! [`lease`](crate::store::Lease) per key, so that one instance runs it and the others wait
//! for its stored response; keeping a response under a lease is fenced, so one key has one
//! answer across instances, stalls and crashes.
//!
//! A store that fails or times out is logged, and then the request runs anyway (the
//! default) or gets `503`: see [`OnStoreError`].

mod layer;

pub use self::layer::{DEFAULT_REPLAY_TTL, IdempotencyLayer};
pub use crate::http::OnStoreError;

/// The service [`IdempotencyLayer`] builds: [`HttpCoalesce`](crate::http::HttpCoalesce)
/// keyed by the idempotency key header.
pub type Idempotency<S, I = crate::http::scope::DefaultScope, St = crate::store::MemoryStore> =
    crate::http::HttpCoalesce<S, crate::http::key::HeaderKey, I, St>;
