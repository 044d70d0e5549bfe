//! The Redis mode beside local-only (the in-memory store), in one run, on the Redis at
//! `REDIS_URL` (skipped without it). Services are called in process, without sockets, so
//! that the difference is Redis's alone; the handler answers at once.
//!
//! - `one_caller`: a fresh key, one caller: what Redis adds to a request that coalesces
//!   with nothing (a lookup-or-lease script, then a store-and-release script: two round
//!   trips).
//! - `fan_in_50`: a fresh key, 50 concurrent callers on one instance: Redis is paid once
//!   per key per instance, so per caller it nearly vanishes.
//! - `four_instances_one_key`: 4 instances (a layer and a connection each) x 50 callers of
//!   one fresh key. Local-only runs the key four times; Redis once.
//! - `four_instances_distinct_keys`: 400 requests with distinct keys over 4 instances at
//!   once: throughput when nothing coalesces.
//!
//! Each on local-only, on the Redis at `REDIS_URL`, and on the Redis Cluster at
//! `REDIS_CLUSTER_URLS` (comma-separated) if it is set.
//!
//! Run with `REDIS_URL=redis://127.0.0.1:6379 cargo bench --bench redis --features redis`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::future::join_all;
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use tokio::runtime::Runtime;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt, service_fn};
use tower_coalesce::idempotency::IdempotencyLayer;
use tower_coalesce::idempotency::store::{IdempotencyStore, MemoryStore};
use tower_coalesce::redis::RedisStore;

type Svc = BoxCloneSyncService<Request<Full<Bytes>>, Response<()>, Infallible>;

fn instance<St: IdempotencyStore>(store: St) -> Svc {
    let handler = service_fn(|_: Request<Either<Full<Bytes>, Full<Bytes>>>| async {
        let mut response = Response::new(Full::new(Bytes::from_static(b"order created")));
        *response.status_mut() = StatusCode::CREATED;
        Ok::<_, Infallible>(response)
    });
    let svc = IdempotencyLayer::new().store(store).layer(handler);
    BoxCloneSyncService::new(svc.map_response(|response| {
        assert!(response.status().is_success(), "{}", response.status());
        response.map(drop)
    }))
}

fn fresh_key() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let run = std::process::id();
    format!("bench-{run}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn request(key: &str) -> Request<Full<Bytes>> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"2 apples")))
        .unwrap()
}

/// `callers` concurrent calls of one fresh key on each instance.
async fn fan_in(instances: &[Svc], callers: usize) {
    let key = &fresh_key();
    let calls = instances
        .iter()
        .flat_map(|svc| (0..callers).map(move |_| tokio::spawn(svc.clone().oneshot(request(key)))));
    for done in join_all(calls.collect::<Vec<_>>()).await {
        done.unwrap().unwrap();
    }
}

async fn distinct(instances: &[Svc], per_instance: usize) {
    let calls = instances.iter().flat_map(|svc| {
        (0..per_instance).map(move |_| tokio::spawn(svc.clone().oneshot(request(&fresh_key()))))
    });
    for done in join_all(calls.collect::<Vec<_>>()).await {
        done.unwrap().unwrap();
    }
}

fn benches(c: &mut Criterion) {
    let Some(url) = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()) else {
        eprintln!("skipped: set REDIS_URL=redis://... to run the Redis benchmark");
        return;
    };
    let rt: Runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let prefix = format!("tower-coalesce-bench:{}:", std::process::id());
    let redis = |n: usize| -> Vec<Svc> {
        rt.block_on(async {
            let mut out = Vec::new();
            for _ in 0..n {
                let store = RedisStore::connect(&url).await.unwrap();
                out.push(instance(store.with_prefix(prefix.clone())));
            }
            out
        })
    };
    let local =
        |n: usize| -> Vec<Svc> { (0..n).map(|_| instance(MemoryStore::default())).collect() };
    let mut setups = vec![("local_only", local(4)), ("redis", redis(4))];
    // A Redis Cluster beside it, if there is one: each key's scripts go to its slot's master.
    if let Some(urls) = std::env::var("REDIS_CLUSTER_URLS")
        .ok()
        .filter(|u| !u.is_empty())
    {
        let nodes: Vec<&str> = urls.split(',').collect();
        let cluster = rt.block_on(async {
            let mut out = Vec::new();
            for _ in 0..4 {
                let store = RedisStore::connect_cluster(&nodes).await.unwrap();
                out.push(instance(store.with_prefix(prefix.clone())));
            }
            out
        });
        setups.push(("redis_cluster", cluster));
    }

    let mut group = c.benchmark_group("one_caller");
    for (name, instances) in &setups {
        group.bench_function(*name, |b| {
            b.to_async(&rt).iter(|| fan_in(&instances[..1], 1))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("fan_in_50");
    group.throughput(Throughput::Elements(50));
    for (name, instances) in &setups {
        group.bench_function(*name, |b| {
            b.to_async(&rt).iter(|| fan_in(&instances[..1], 50))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("four_instances_one_key");
    group.throughput(Throughput::Elements(200));
    for (name, instances) in &setups {
        group.bench_function(*name, |b| b.to_async(&rt).iter(|| fan_in(instances, 50)));
    }
    group.finish();

    let mut group = c.benchmark_group("four_instances_distinct_keys");
    group.throughput(Throughput::Elements(400));
    for (name, instances) in &setups {
        group.bench_function(*name, |b| b.to_async(&rt).iter(|| distinct(instances, 100)));
    }
    group.finish();
}

criterion_group!(redis_mode, benches);
criterion_main!(redis_mode);
