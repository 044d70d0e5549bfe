//! An HTTP cache on the coalescing engine (feature `http-cache`): `GET` and `HEAD`
//! responses kept for as long as their `Cache-Control` says, with the flights of the
//! [`http`](crate::http) layer in front, so that a miss runs once however many requests
//! want it, and an expiry is never a stampede.
//!
//! What [`HttpCacheLayer`] does, by RFC 9111 (caching), RFC 5861 (the stale directives),
//! RFC 9110 (conditional requests) and RFC 9211 (`Cache-Status`):
//!
//! - **Keeps** a response for `s-maxage`, else `max-age`, else `Expires` minus `Date` (or
//!   [`default_ttl`](HttpCacheLayer::default_ttl), never for a `5xx`), capped by
//!   [`max_ttl`](HttpCacheLayer::max_ttl); a `CDN-Cache-Control` field (RFC 9213, or the
//!   fields of [`targeted_cache_control`](HttpCacheLayer::targeted_cache_control)) replaces
//!   `Cache-Control` and `Expires` for this cache when it is valid. Never `no-store`,
//!   `no-cache`, `Set-Cookie`, `private` (unless [`private`](HttpCacheLayer::private) is on
//!   and the scope is one identity), `Vary: *`, `206` or `304` responses, nor a response to
//!   a request with `Authorization` that doesn't say `public`, `s-maxage` or
//!   `must-revalidate`. `must-understand` keeps a status the cache knows despite
//!   `no-store`. Dates are read as nginx and Varnish read them (any case, a wrong weekday);
//!   an `Age` sent as a list counts its first value.
//! - **Keys** entries by scope, method, path and query, and serves an entry only to a
//!   request that sent the same values of the headers its `Vary` names.
//! - **Answers** a fresh entry at once, with `Age` and `Cache-Status: tower-coalesce; hit`.
//!   A request whose `If-None-Match` (or `If-Modified-Since`) matches gets `304`; one
//!   `bytes` range of a kept `200` gets `206` (`If-Range` honoured; a miss asks the service
//!   for the whole response, which is kept).
//! - **Revalidates**: an entry with an `ETag` or `Last-Modified` is kept 10 minutes past
//!   its freshness; a request for it then sends the service its validators, and a `304`
//!   freshens the entry with the `304`'s headers (RFC 9111 §4.3.4) for every caller of the
//!   flight, without the body crossing again. A `304` for another representation is a `502`
//!   that says so.
//! - **Stale-while-revalidate**: within it, every request gets the stale entry at once
//!   (`Cache-Status: ...; hit; detail=stale-while-revalidate`) and exactly one refresh runs
//!   in the background, as a flight.
//! - **Stale-if-error**: past that, requests wait for one new run (coalesced); if it fails
//!   (an error or a `5xx`) within `stale-if-error`, they get the stale entry instead.
//! - **Misses** go through the engine's flight: one run for every concurrent request of
//!   the key (`Cache-Status: ...; fwd=miss`, with `collapsed` for those who joined).
//!   Request `Cache-Control: no-cache` or `max-age=0` skip the lookup and go through the
//!   flight too (`fwd=request`); `no-store` runs on its own.
//! - **Followers get only what the cache would serve them**: a flight's response reaches a
//!   request that waited on it only if the cache would keep that response and serve it to
//!   that request (storable, fresh, the same `Vary` values, RFC 9111 §3.5 for its
//!   `Authorization`), as nginx's cache lock and Varnish's waiting list do. The others run
//!   on their own; a follower with another `Authorization` waits for a flight of its own, and
//!   a response made for an `Authorization` the cache may not keep is shared only among the
//!   callers that sent that same `Authorization`.
//! - **Hit-for-pass and hit-for-miss**: a response that may not be shared (`Set-Cookie`,
//!   `private`, `no-store`) goes to its own caller only, and for
//!   [`hit_for_pass`](HttpCacheLayer::hit_for_pass) the requests of its key go straight to
//!   the service instead of queueing behind each other's flights; a response the cache
//!   would not keep for anyone (no freshness, `no-cache`) does the same for 10 seconds
//!   (at most `hit_for_pass`), after which a flight may keep the key's next response. Use
//!   [`HttpCoalesceLayer`](crate::http::HttpCoalesceLayer) to coalesce responses that are
//!   not to be cached.
//!
//! - **Variants**: a response that varies (`Vary: Accept-Encoding`, say) is kept once per
//!   variant, up to 8 per key, so that clients that alternate don't evict each other.
//! - **Invalidation**: a `POST`, `PUT`, `PATCH` or `DELETE` that succeeds (`2xx`, `3xx`)
//!   drops the entries of its URI, and of its response's `Location` and `Content-Location`
//!   on the same origin (RFC 9111 §4.4), for every scope and variant, before its caller
//!   gets the answer. Other unsafe requests pass through untouched.
//! - **Purges**: [`Purger::purge`] drops a URI's entries, [`Purger::purge_tag`] the
//!   entries whose response named a tag in `Surrogate-Key` (space-separated) or
//!   `Cache-Tag` (comma-separated); from [`HttpCacheLayer::purger`]. A `PURGE` route, and
//!   who may call it, is the app's.
//!
//! Responses are kept in a [`MemoryStore`](crate::store::MemoryStore) (moka, bounded
//! by [`memory_limit`](HttpCacheLayer::memory_limit)), or in the [`store`](HttpCacheLayer::store) you
//! give.
//!
//! # Conformance
//!
//! Against the public HTTP caching test suite ([cache-tests.fyi](https://cache-tests.fyi)),
//! with the defaults, behind `examples/cache_proxy.rs` (a caching reverse proxy on this
//! layer): 154 of its 163 required tests and 74 of its 107 optimal ones, first among the
//! caches it publishes results for (Traffic Server 132 and 70, nginx 99 and 59, Varnish 119
//! and 45); `.ci/cache-tests` runs it. Every required test that nginx or Varnish passes, this
//! cache passes. The nine it fails:
//!
//! - `headers-store-Set-Cookie`: a response with `Set-Cookie` is never kept, by choice (it
//!   is personal), as nginx and Varnish do by default;
//! - `stale-close-*` (4): a stale response is not served when the origin is unreachable
//!   unless the response allowed it (`stale-if-error`);
//! - `interim-not-cached`: `1xx` interim responses are the proxy's to relay, and hyper's
//!   server sends none but `100 Continue`;
//! - `freshness-max-age-s-maxage-private*` (2), `cc-resp-immutable-stale`: browser-only
//!   tests, not run against a proxy.
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
//! - a purge, or an unsafe request's invalidation, on one instance removes the entries
//!   from the store: every instance misses them next.
//!
//! Ages are read from the `Date` the keeping instance stamped: the instances' clocks must
//! agree to well under a second. A store error (Redis down or slow) is logged and counted
//! ([`Metrics::store_errors`](crate::http::Metrics::store_errors)), and the request runs as
//! if nothing were kept: the cache never fails a request that the service could answer.
//! Hit-for-pass is kept per instance, and a purge races a run that started before it (the
//! run's response is kept after the purge, as in Varnish). Responses that are not kept
//! (errors, `5xx` without freshness) are not shared across instances either: an instance
//! that waited for one runs its own, as a retry would.

//! # Near cache
//!
//! Sharing the store makes every hit a round trip (a Redis `GET`: 30-130 us on loopback,
//! against 2 us in memory). [`near_cache`](HttpCacheLayer::near_cache) keeps copies of the
//! store's fresh entries in the instance's memory (moka, bounded by bytes) in front of it,
//! so that a hit costs what a hit in memory costs, and keeps them in sync across the
//! instances, as FusionCache's backplane does:
//!
//! - a copy is made from a fresh entry, and lives for what is left of its freshness, and
//!   at most [`near_cache_ttl`](HttpCacheLayer::near_cache_ttl) (60 s by default). Stale
//!   entries (`stale-while-revalidate`, `stale-if-error`) are always read from the store;
//! - an instance that keeps, refreshes or purges an entry announces its key on the
//!   store's backplane (Redis pub/sub on one channel, `prefix + "changes"`; sharded pub/sub
//!   on a cluster; PostgreSQL `NOTIFY`), and every other instance drops its copy when the
//!   message arrives (a few milliseconds; 3 ms on loopback in the tests);
//! - a copy read from the store while a drop was on its way is not kept;
//! - when the connection drops (and once it is subscribed again), messages may have been
//!   lost: every copy is dropped.
//!
//! **The staleness bound.** While the backplane is up, a copy outlives a change on
//! another instance by the message's delivery. If messages stop without the connection
//! noticing (a network partition that TCP has not yet reported), a copy is served at most
//! until its entry stops being fresh, and never longer than `near_cache_ttl`: the same
//! answer a cache that had no backplane at all would give within the response's own
//! `max-age`. A near cache in front of a store that no other instance shares has nothing
//! to keep in sync, and costs memory for nothing.

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
let cache = HttpCacheLayer::new()
    .unscoped()
    .store(store)
    .near_cache(64 * 1024 * 1024); // hits from memory, kept in sync by the backplane
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
