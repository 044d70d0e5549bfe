//! The HTTP cache on Redis beside the in-memory cache, in one run, on the Redis at
//! `REDIS_URL` (skipped without it). In process, without sockets, so that the difference is
//! the store's alone.
//!
//! - `hit`: one GET of a kept entry: a moka lookup (`memory`), one Redis `GET` and the
//!   decoding of the stored response (`redis`), or the near cache's copy in front of Redis
//!   (`hybrid`); beside `tower-http-cache` 0.6 on Redis and on its multi-tier backend
//!   (moka in front of Redis, promoted after 3 hits, with no invalidation across
//!   instances), on the same response.
//! - `four_instances_miss`: 4 instances (a layer and a connection each) x 25 concurrent
//!   GETs of a new path per round, a handler of 1 ms: in memory each instance runs the
//!   miss once (4 runs), on Redis one instance runs it for all (1 run); the runs per round
//!   are printed.
//!
//! Run with `REDIS_URL=redis://127.0.0.1:6379 cargo bench --manifest-path benches/Cargo.toml --bench redis_cache`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use futures::future::join_all;
use http::{Request, Response};
use http_body_util::{BodyExt, Either, Full};
use tokio::runtime::Runtime;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt, service_fn};
use tower_coalesce::http::ResponseBody;
use tower_coalesce::http_cache::HttpCacheLayer;
use tower_coalesce::redis::RedisStore;
use tower_coalesce::store::{MemoryStore, Store};

type Svc = BoxCloneSyncService<Request<Full<Bytes>>, Bytes, Infallible>;

fn instance<St: Store>(store: St, runs: Arc<AtomicU64>, delay: Duration) -> Svc {
    layered(HttpCacheLayer::new().unscoped().store(store), runs, delay)
}

/// An instance with a near cache of 16 MiB in front of `store`.
fn hybrid<St: Store>(store: St, runs: Arc<AtomicU64>) -> Svc {
    let cache = HttpCacheLayer::new()
        .unscoped()
        .store(store)
        .near_cache(16 << 20);
    layered(cache, runs, Duration::ZERO)
}

fn layered<St: Store>(
    cache: HttpCacheLayer<tower_coalesce::http::scope::Unscoped, St>,
    runs: Arc<AtomicU64>,
    delay: Duration,
) -> Svc {
    let handler = service_fn(move |_: Request<Either<Full<Bytes>, Full<Bytes>>>| {
        runs.fetch_add(1, Ordering::Relaxed);
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok::<_, Infallible>(report())
        }
    });
    let svc =
        cache
            .layer(handler)
            .and_then(|response: Response<ResponseBody<Full<Bytes>>>| async move {
                assert!(response.status().is_success(), "{}", response.status());
                Ok(response.into_body().collect().await.unwrap().to_bytes())
            });
    BoxCloneSyncService::new(svc)
}

/// The response every handler here answers: kept an hour.
fn report() -> Response<Full<Bytes>> {
    let body = Full::new(Bytes::from_static(b"{\"report\":7,\"total\":997000}"));
    Response::builder()
        .header("cache-control", "max-age=3600")
        .body(body)
        .unwrap()
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path).body(Full::new(Bytes::new())).unwrap()
}

async fn redis(url: &str, prefix: &str) -> RedisStore {
    RedisStore::connect(url)
        .await
        .unwrap()
        .with_prefix(prefix)
        .with_poll_interval(Duration::from_millis(100))
}

/// `tower-http-cache` on the same Redis: its Redis backend, and its multi-tier backend
/// (moka, then Redis).
async fn peers(url: &str) -> (Svc, Svc) {
    use tower_http_cache::backend::multi_tier::MultiTierBackend;
    use tower_http_cache::backend::redis::RedisBackend;
    use tower_http_cache::prelude::{CacheLayer, InMemoryBackend};

    let client = redis::Client::open(url).unwrap();
    let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
    let namespace = format!("tower-http-cache-bench:{}", std::process::id());
    let backend = || RedisBackend::new(conn.clone()).with_namespace(namespace.clone());
    let handler = || service_fn(|_: Request<Full<Bytes>>| async { Ok::<_, Infallible>(report()) });
    let redis_only = CacheLayer::builder(backend())
        .ttl(Duration::from_secs(3600))
        .respect_cache_control(true)
        .build()
        .layer(handler());
    let tiers = MultiTierBackend::new(InMemoryBackend::new(100_000), backend());
    let multi_tier = CacheLayer::builder(tiers)
        .ttl(Duration::from_secs(3600))
        .respect_cache_control(true)
        .build()
        .layer(handler());
    (
        BoxCloneSyncService::new(redis_only.map_err(|e| panic!("{e}")).and_then(collect)),
        BoxCloneSyncService::new(multi_tier.map_err(|e| panic!("{e}")).and_then(collect)),
    )
}

async fn collect<B>(response: Response<B>) -> Result<Bytes, Infallible>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    assert!(response.status().is_success(), "{}", response.status());
    Ok(response.into_body().collect().await.unwrap().to_bytes())
}

fn benches(c: &mut Criterion) {
    let Some(url) = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()) else {
        eprintln!("skipped: set REDIS_URL=redis://... to run the Redis cache benchmarks");
        return;
    };
    let rt = Runtime::new().unwrap();
    let prefix = format!("tower-coalesce-bench:{}:", std::process::id());

    let mut group = c.benchmark_group("redis_cache_hit");
    let runs = Arc::new(AtomicU64::new(0));
    let memory = instance(MemoryStore::default(), runs.clone(), Duration::ZERO);
    let shared = instance(
        rt.block_on(redis(&url, &prefix)),
        runs.clone(),
        Duration::ZERO,
    );
    let near = hybrid(rt.block_on(redis(&url, &prefix)), runs.clone());
    let (peer_redis, peer_tiers) = rt.block_on(peers(&url));
    for (name, svc) in [
        ("memory", &memory),
        ("redis", &shared),
        ("hybrid", &near),
        ("tower_http_cache_redis", &peer_redis),
        ("tower_http_cache_multi_tier", &peer_tiers),
    ] {
        // The miss, then enough hits for the multi-tier backend to promote the entry.
        for _ in 0..4 {
            rt.block_on(svc.clone().oneshot(get("/r/hit"))).unwrap();
        }
        group.bench_function(name, |b| {
            b.to_async(&rt)
                .iter(|| async { svc.clone().oneshot(get("/r/hit")).await.unwrap() })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("redis_cache_four_instances_miss");
    group.sample_size(20);
    const INSTANCES: usize = 4;
    const CALLERS: usize = 25;
    let delay = Duration::from_millis(1);
    for name in ["memory", "redis"] {
        let runs = Arc::new(AtomicU64::new(0));
        let instances: Vec<Svc> = (0..INSTANCES)
            .map(|_| match name {
                "memory" => instance(MemoryStore::default(), runs.clone(), delay),
                _ => instance(rt.block_on(redis(&url, &prefix)), runs.clone(), delay),
            })
            .collect();
        let round = AtomicU64::new(0);
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                let path = format!("/r/{name}-{}", round.fetch_add(1, Ordering::Relaxed));
                let calls = instances.iter().flat_map(|svc| {
                    (0..CALLERS).map(|_| {
                        let (svc, req) = (svc.clone(), get(&path));
                        tokio::spawn(async move { svc.oneshot(req).await.unwrap() })
                    })
                });
                let calls: Vec<_> = calls.collect();
                async move {
                    for answer in join_all(calls).await {
                        answer.unwrap();
                    }
                }
            })
        });
        let rounds = round.load(Ordering::Relaxed).max(1);
        println!(
            "{name}: {:.3} handler runs per round of {INSTANCES} instances x {CALLERS} callers \
             ({rounds} rounds)",
            runs.load(Ordering::Relaxed) as f64 / rounds as f64
        );
    }
    group.finish();
}

criterion_group!(redis_cache, benches);
criterion_main!(redis_cache);
