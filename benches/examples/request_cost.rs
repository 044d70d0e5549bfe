//! What one request costs in process, counted rather than timed: the axum app of
//! `benches/http.rs` bare and behind the layer, called one request at a time.
//!
//!     cargo run --release --manifest-path benches/Cargo.toml --example request_cost -- header 100000
//!
//! The first argument picks the app (`bare`, `header`: keyed by `Idempotency-Key`, `json`:
//! keyed by the body's id, `floor`: the least a layer that shares responses does, see
//! `benches/support/floor.rs`), the second how many requests to time after the counted ones.
//! It prints the allocations and bytes allocated per request (the client's request
//! included, alike for every app), then the time per request. Under
//! `valgrind --tool=callgrind` the difference of two runs with different counts gives the
//! instructions per request; under `perf record` (built with
//! `CARGO_PROFILE_RELEASE_DEBUG=line-tables-only`), where the time goes.

use std::alloc::System;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::routing::post;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tower::ServiceExt;
use tower_coalesce::http::{HttpCoalesceLayer, key};

#[path = "../support/floor.rs"]
mod floor;

#[global_allocator]
static COUNTED: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn app() -> Router {
    Router::new().route(
        "/api/clients",
        post(|| async { r#"{"id":"c-1","name":"Ada"}"# }),
    )
}

fn main() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "header".into());
    let timed: u64 = std::env::args()
        .nth(2)
        .map_or(100_000, |n| n.parse().expect("a number of requests"));
    // `with_state(())` turns the routes into services once, as `axum::serve` does.
    let app = match which.as_str() {
        "bare" => app().with_state(()),
        "header" => app()
            .layer(HttpCoalesceLayer::new(key::idempotency_key()))
            .with_state(()),
        "json" => app()
            .layer(HttpCoalesceLayer::new(key::json("/id")))
            .with_state(()),
        "floor" => app().layer(floor::layer()).with_state(()),
        other => panic!("no app {other:?}: bare, header, json or floor"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let next = AtomicU64::new(0);
    let one = || {
        let id = format!("key-{}", next.fetch_add(1, Ordering::Relaxed));
        let body = format!(
            r#"{{"id":"{id}","name":"Ada Lovelace","email":"ada@example.com","plan":"team"}}"#
        );
        let request = http::Request::post("/api/clients")
            .header("content-type", "application/json")
            .header("idempotency-key", &id)
            .body(axum::body::Body::from(body))
            .unwrap();
        let app = app.clone();
        async move {
            let response = app.oneshot(request).await.unwrap();
            assert!(response.status().is_success());
            axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
        }
    };
    runtime.block_on(async {
        for _ in 0..1000 {
            one().await;
        }
        let counted = 1000;
        let region = Region::new(COUNTED);
        for _ in 0..counted {
            one().await;
        }
        let stats = region.change();
        println!(
            "{which}: {:.1} allocations, {:.0} bytes per request",
            stats.allocations as f64 / counted as f64,
            stats.bytes_allocated as f64 / counted as f64
        );
        let started = std::time::Instant::now();
        for _ in 0..timed {
            one().await;
        }
        let per_request = started.elapsed().as_secs_f64() * 1e6 / timed as f64;
        println!("{which}: {per_request:.3} µs per request");
    });
}
