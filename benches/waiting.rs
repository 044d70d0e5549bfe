//! A slow flight with many waiting followers: a handler that takes 2 s, one leader and
//! 1000 followers on one key, in process. For each configuration (no controls, a cap of 100
//! followers, a 200 ms wait timeout; both answer 503) it prints the heap bytes live while
//! the followers wait (counted by an instrumented allocator, not sampled) and the
//! followers' latencies and statuses.
//!
//! Run with `cargo bench --manifest-path benches/Cargo.toml --bench waiting`.

use std::alloc::System;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tower::{ServiceExt, service_fn};
use tower_coalesce::http::{HttpCoalesceLayer, RequestBody, key};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const FOLLOWERS: usize = 1000;

type Layer = HttpCoalesceLayer<key::HeaderKey>;

/// A configuration: its name, and what it does to the default layer.
type Config = (&'static str, fn(Layer) -> Layer);

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let configs: [Config; 3] = [
        ("no controls", |l| l),
        ("max_followers(100)", |l| l.max_followers(100)),
        ("follower_timeout(200ms)", |l| {
            l.follower_timeout(Duration::from_millis(200))
        }),
    ];
    println!("1 leader + {FOLLOWERS} followers, handler takes 2 s, 1 KiB response:");
    for (name, configure) in configs {
        rt.block_on(measure(
            name,
            configure(HttpCoalesceLayer::new(key::idempotency_key())),
        ));
    }
}

async fn measure(name: &str, layer: Layer) {
    let metrics = layer.metrics();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(
            |_req: Request<RequestBody<Full<Bytes>>>| async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let body = Bytes::from(vec![b'x'; 1024]);
                Ok::<_, Infallible>(Response::new(Full::new(body)))
            },
        ));

    // Results come back over a channel (sized up front) and the join handles are dropped,
    // so that a finished caller's task is freed at once, as a served request would be.
    let (tx, mut rx) = tokio::sync::mpsc::channel(FOLLOWERS + 1);
    let region = Region::new(GLOBAL);
    let start = Instant::now();
    for _ in 0..=FOLLOWERS {
        let (svc, tx) = (svc.clone(), tx.clone());
        tokio::spawn(async move {
            let req = Request::post("/reports")
                .header("idempotency-key", "k")
                .body(Full::new(Bytes::from_static(b"{\"month\":11}")))
                .unwrap();
            let res = svc.oneshot(req).await.unwrap();
            let _ = tx.send((start.elapsed(), res.status().as_u16())).await;
        });
    }
    drop(tx);
    // Measured once every follower has joined or been turned away, while they wait.
    while (metrics.callers_joined() + metrics.followers_shed()) < FOLLOWERS as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let change = region.change();
    let live = change.bytes_allocated as isize - change.bytes_deallocated as isize
        + change.bytes_reallocated;

    let mut latencies = Vec::with_capacity(FOLLOWERS + 1);
    let mut statuses = BTreeMap::new();
    while let Some((latency, status)) = rx.recv().await {
        latencies.push(latency);
        *statuses.entry(status).or_insert(0) += 1;
    }
    latencies.sort();
    let at = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "{name:>24}: heap live while waiting {:>7.1} KiB ({:>4} B per caller); latency p50 {:>9.1?} \
         p99 {:>9.1?} max {:>9.1?}; statuses {statuses:?}; shed {}, timed out {}",
        live as f64 / 1024.0,
        live / (FOLLOWERS as isize + 1),
        at(0.5),
        at(0.99),
        latencies.last().unwrap(),
        metrics.followers_shed(),
        metrics.followers_timed_out(),
    );
}
