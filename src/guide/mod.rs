//! The guide: what the README summarises, chapter by chapter, every example compiled.
//!
//! 1. [Your first app](first_app): the three traps (auth, nested routers, closures) and
//!    where the layer goes among compression, CORS, auth and timeouts.
//! 2. [Tower, axum and hyper](tower): the layer without HTTP, on axum and on hyper, and
//!    the knobs of waiting (timeouts, caps, turns).
//! 3. [Idempotency keys](idempotency): replay after completion, conflicts, abandoned work.
//! 4. [Several instances](instances): one run per key across instances on Redis, a Redis
//!    Cluster or PostgreSQL, leases and fencing, and atomic mode.
//! 5. [Metrics](metrics): the counters, Prometheus, and the Grafana dashboard.
//! 6. [Guarantees](guarantees): what holds under races, panics, cancellation and faults
//!    (the seeded fault campaign), the limits, and the fuzzed parsers.
//!
//! The HTTP cache has its chapter in its own module: [`http_cache`](crate::http_cache).
//! Benchmarks and their tables: `benches/README.md` in the repository.

#[doc = include_str!("first_app.md")]
pub mod first_app {}

#[doc = include_str!("tower.md")]
pub mod tower {}

#[doc = include_str!("idempotency.md")]
pub mod idempotency {}

#[doc = include_str!("instances.md")]
pub mod instances {}

#[doc = include_str!("metrics.md")]
pub mod metrics {}

#[doc = include_str!("guarantees.md")]
pub mod guarantees {}
