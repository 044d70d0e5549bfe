//! An HTTP cache on the coalescing engine (feature `http-cache`): `GET` and `HEAD`
//! responses kept for as long as their `Cache-Control` says, with the flights of the
//! [`http`](crate::http) layer in front, so that a miss runs once however many requests
//! want it, and an expiry is never a stampede.
//!
//! What [`HttpCacheLayer`] does, by RFC 9111 (caching), RFC 5861 (the stale directives),
//! RFC 9110 (conditional requests) and RFC 9211 (`Cache-Status`):
//!
//! - **Keeps** a response for `s-maxage`, else `max-age`, else `Expires` minus `Date` (or
//!   [`default_ttl`](HttpCacheLayer::default_ttl)), capped by
//!   [`max_ttl`](HttpCacheLayer::max_ttl). Never `no-store`, `no-cache`, `Set-Cookie`,
//!   `private` (unless [`private`](HttpCacheLayer::private) is on and the scope is one
//!   identity), `Vary: *`, `206`, `304` or `5xx` responses, nor a response to a request
//!   with `Authorization` that doesn't say `public`, `s-maxage` or `must-revalidate`.
//! - **Keys** entries by scope, method, path and query, and serves an entry only to a
//!   request that sent the same values of the headers its `Vary` names.
//! - **Answers** a fresh entry at once, with `Age` and `Cache-Status: tower-coalesce; hit`.
//!   A request whose `If-None-Match` (or `If-Modified-Since`) matches gets `304`.
//! - **Stale-while-revalidate**: within it, every request gets the stale entry at once
//!   (`Cache-Status: ...; hit; detail=stale-while-revalidate`) and exactly one refresh runs
//!   in the background, as a flight.
//! - **Stale-if-error**: past that, requests wait for one new run (coalesced); if it fails
//!   (an error or a `5xx`) within `stale-if-error`, they get the stale entry instead.
//! - **Misses** go through the engine's flight: one run for every concurrent request of
//!   the key (`Cache-Status: ...; fwd=miss`, with `collapsed` for those who joined).
//!   Request `Cache-Control: no-cache` or `max-age=0` skip the lookup and go through the
//!   flight too (`fwd=request`); `no-store` runs on its own.
//! - **Hit-for-pass**: a response that may not be shared (`Set-Cookie`, `private`,
//!   `no-store`) goes to its own caller only, and for
//!   [`hit_for_pass`](HttpCacheLayer::hit_for_pass) the requests of its key go straight to
//!   the service instead of queueing behind each other's flights.
//!
//! Responses are kept in a [`MemoryStore`](crate::idempotency::store::MemoryStore) (moka, bounded
//! by [`budget`](HttpCacheLayer::budget)), one entry per key: a response that varies keeps
//! the variant last fetched. Other methods pass through untouched.
//!
//! # Example
//!
//! ```
//! use axum::{Router, routing::get};
//! use tower_coalesce::http_cache::HttpCacheLayer;
//!
//! async fn report() -> ([(&'static str, &'static str); 1], &'static str) {
//!     // SELECT ... GROUP BY ... (slow)
//!     ([("cache-control", "max-age=30, stale-while-revalidate=300")], "the report")
//! }
//!
//! let app: Router = Router::new()
//!     .route("/api/report/{id}", get(report))
//!     // Public data: one cache for everyone.
//!     .layer(HttpCacheLayer::new().unscoped());
//! ```

mod layer;
pub(crate) mod rules;
mod stage;

pub use self::layer::{
    DEFAULT_HIT_FOR_PASS, DEFAULT_MAX_TTL, HttpCache, HttpCacheLayer, SafeMethods,
};
pub(crate) use self::stage::{CacheState, keep, lease, serve};
