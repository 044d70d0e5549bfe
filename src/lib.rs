//! Request coalescing for Tower services: concurrent requests with equal keys share one
//! run of the handler, and every caller gets the same response.
//!
//! Identical requests that arrive together (a double click, several tabs, a client retry)
//! each run the same handler; a handler that checks whether a row exists and inserts it
//! otherwise then fails on the unique index for all but one of them
//! (`duplicate key value violates unique constraint`). For an axum or hyper app the fix is
//! one layer, [`HttpCoalesceLayer`]: the first request with a key runs the handler, the
//! requests with the same key (and the same caller, method, path and body) that arrive
//! while it runs wait for it, and each gets its own copy of the one response.
//!
#![cfg_attr(feature = "http", doc = "```")]
#![cfg_attr(not(feature = "http"), doc = "```ignore")]
//! use axum::{Json, Router, http::StatusCode, routing::post};
//! use tower_coalesce::http::{HttpCoalesceLayer, key};
//!
//! async fn create_client(Json(client): Json<serde_json::Value>) -> StatusCode {
//!     // SELECT 1 FROM clients WHERE id = $1; INSERT INTO clients .. if there is none
//!     StatusCode::CREATED
//! }
//!
//! let app: Router = Router::new()
//!     .route("/api/clients", post(create_client))
//!     // Concurrent creates of one client id (the body's "id") run once.
//!     .layer(HttpCoalesceLayer::new(key::json("/id")));
//! ```
//!
//! # Modules
//!
//! - `http` (feature `http`, on by default): [`HttpCoalesceLayer`], for HTTP services such
//!   as axum routers: the response body read once and shared, keys from the request head
//!   or body (`http::key`), flights scoped to the caller's identity (`http::scope`),
//!   never shared between requests whose method, path, query or body differ.
//! - `idempotency` (feature `idempotency`): `IdempotencyLayer`, the same engine with the
//!   `Idempotency-Key` rules: completed responses replayed to later retries.
//! - `http_cache` (feature `http-cache`): `HttpCacheLayer`, an HTTP cache on the same engine
//!   (Cache-Control, Vary, 304s, stale-while-revalidate), misses coalesced.
//! - `store`: where responses are kept and, for a store several instances share
//!   (`redis::RedisStore`, `postgres::PostgresStore`), which instance runs a key.
//! - [`coalesce`]: [`CoalesceLayer`], the Tower middleware for any service whose responses
//!   and errors are `Clone`.
//! - [`single_flight`]: the core, usable without Tower: [`Group::run`], and
//!   `single_flight::Cache` (feature `cache`).
//!
//! # Without HTTP
//!
//! ```
//! use std::convert::Infallible;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_coalesce::coalesce::CoalesceLayer;
//!
//! #[derive(Clone)]
//! struct CreateClient {
//!     client_id: String,
//! }
//!
//! async fn create_client(req: CreateClient) -> Result<String, Infallible> {
//!     // SELECT ... WHERE id = $1; INSERT ... if missing
//!     Ok(format!("client {}", req.client_id))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Infallible> {
//! let svc = ServiceBuilder::new()
//!     // Requests with the same client id share one call; `None` would pass a request through.
//!     .layer(CoalesceLayer::new(|req: &CreateClient| Some(req.client_id.clone())))
//!     .service_fn(create_client);
//!
//! let response = svc.oneshot(CreateClient { client_id: "c-1".into() }).await?;
//! assert_eq!(response, "client c-1");
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//!
//! - One inner call per flight, however many callers join it, under real races.
//! - The call belongs to the flight, not to the caller that started it: a cancelled caller
//!   never cancels it for the others nor makes it run twice; when every caller is gone the
//!   call is dropped and the key freed.
//! - A panic in the call reaches every waiter of that flight; the key works again after it.
//! - Waiting callers are woken once, when the result is there (no busy polling).
//!
//! # Features
//!
//! - `http` (default): the `http` module. Without it the crate depends on no HTTP crate.
//! - `cache`: `single_flight::Cache`, single-flight caching: results kept for their
//!   lifetimes, stale-while-revalidate, stale-if-error, negative caching (moka, tokio).
//! - `idempotency`: the `idempotency` module, the `Idempotency-Key` preset of the HTTP
//!   layer, and `store::MemoryStore` (moka) to replay completed responses.
//! - `http-cache`: the `http_cache` module, an HTTP cache on the same engine (Cache-Control,
//!   Vary, Age, Cache-Status, 304s, stale-while-revalidate, stale-if-error).
//! - `redis`: `RedisStore`, a store shared by several instances: one run per key across all
//!   of them.
//! - `postgres`: `PostgresStore`, the same on the PostgreSQL the app already has (sqlx).
//! - `metrics`: the layers' counters exported through the `metrics` facade.
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88 (edition 2024). Raising it is not a breaking change.
//!
//! [`CoalesceLayer`]: crate::coalesce::CoalesceLayer
//! [`Group::run`]: crate::single_flight::Group::run
#![cfg_attr(
    feature = "http",
    doc = "[`HttpCoalesceLayer`]: crate::http::HttpCoalesceLayer"
)]
#![cfg_attr(
    not(feature = "http"),
    doc = "[`HttpCoalesceLayer`]: https://docs.rs/tower-coalesce/latest/tower_coalesce/http/struct.HttpCoalesceLayer.html"
)]
#![forbid(unsafe_code)]
#![warn(
    missing_debug_implementations,
    missing_docs,
    rust_2018_idioms,
    unreachable_pub
)]
#![deny(rustdoc::broken_intra_doc_links)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[macro_use]
mod macros;

pub mod coalesce;
// The guide's examples use every feature: it is built with all of them (as docs.rs does).
#[cfg(all(feature = "http", any(fuzzing, test)))]
#[doc(hidden)]
pub mod fuzz;
#[cfg(all(
    feature = "http-cache",
    feature = "idempotency",
    feature = "metrics",
    feature = "postgres",
    feature = "redis"
))]
pub mod guide;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
#[cfg(feature = "http-cache")]
#[cfg_attr(docsrs, doc(cfg(feature = "http-cache")))]
pub mod http_cache;
#[cfg(feature = "idempotency")]
#[cfg_attr(docsrs, doc(cfg(feature = "idempotency")))]
pub mod idempotency;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
#[cfg(any(feature = "redis", feature = "postgres"))]
mod shared_store;
pub mod single_flight;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod store;
mod sync;

// Every Rust snippet of the README is compiled as a doc test, so that none of them rots.
#[cfg(all(
    doctest,
    feature = "http-cache",
    feature = "idempotency",
    feature = "metrics",
    feature = "postgres",
    feature = "redis"
))]
#[doc = include_str!("../README.md")]
struct ReadmeSnippets;

/// Alias for a type-erased error type.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
