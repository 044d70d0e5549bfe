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
//! Responses are kept in a [`MemoryStore`](crate::store::MemoryStore) (moka, bounded
//! by [`memory_limit`](HttpCacheLayer::memory_limit)), or in the [`store`](HttpCacheLayer::store) you
//! give, one entry per key: a response that varies keeps the variant last fetched. Other
//! methods pass through untouched.
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
//!
//! # Across instances
//!
//! With a store that several instances share,
//! [`RedisStore`](crate::redis::RedisStore) (feature `redis`), the cache is one cache for
//! them all:
//!
//! - every request looks the key up in the store (one `GET`), so a response kept by one
//!   instance answers every instance;
//! - a miss takes the key's lease before it runs: one instance runs it, and the others'
//!   flights wait for its release (a pub/sub message) and answer with what it kept;
//! - a stale entry within `stale-while-revalidate` is answered stale at once on every
//!   instance, and each instance starts its refresh flight; the flight takes the key's lease
//!   whatever is kept ([`refresh_lease`](crate::store::Store::refresh_lease)),
//!   and once it holds it, looks again: an entry another instance refreshed meanwhile
//!   answers, and the lease goes back. So one refresh runs across all the instances.
//!
//! Ages are read from the `Date` the keeping instance stamped: the instances' clocks must
//! agree to well under a second. A store error (Redis down or slow) is logged and counted
//! ([`Metrics::store_errors`](crate::http::Metrics::store_errors)), and the request runs as
//! if nothing were kept: the cache never fails a request that the service could answer.
//! Hit-for-pass is kept per instance. Responses that are not kept (`5xx`, errors) are not
//! shared across instances either: an instance that waited for one runs its own, as a
//! retry would.

// Compiled only where `RedisStore` exists.
#![cfg_attr(
    feature = "redis",
    doc = r#"
```no_run
use tower_coalesce::http_cache::HttpCacheLayer;
use tower_coalesce::redis::RedisStore;

# async fn build() -> Result<(), tower_coalesce::BoxError> {
let store = RedisStore::connect("redis://127.0.0.1:6379")
    .await?
    .with_prefix("myapp:cache:");
let cache = HttpCacheLayer::new().unscoped().store(store);
# Ok(())
# }
```
"#
)]

mod layer;
mod near;
mod purge;
pub(crate) mod rules;
mod stage;

pub use self::layer::{
    DEFAULT_HIT_FOR_PASS, DEFAULT_MAX_TTL, HttpCache, HttpCacheLayer, SafeMethods,
};
pub use self::near::DEFAULT_NEAR_TTL;
pub use self::purge::Purger;
