//! The HTTP cache beside the bare axum app, in one run:
//!
//! - `http_cache_loopback`: one GET at a time over a kept-alive HTTP/1.1 connection: the
//!   bare app whose handler takes 1 ms (a report query), the bare app whose handler answers
//!   at once (the floor: loopback, hyper, axum), and the cached 1 ms handler on a hit.
//! - `http_cache_in_process`: the same without sockets, through `tower::ServiceExt::oneshot`:
//!   the bare instant handler, and a cache hit (lookup, `Age`, `Cache-Status`, body clone).
//! - `http_cache_vs_tower_http_cache`: this cache and `tower-http-cache` 0.6 (in-memory
//!   backend, moka too) around one `service_fn` handler, in process: a hit, and a miss
//!   fan-in of 100 concurrent requests for a new key per round (work that takes 1 ms),
//!   with the handler's runs per round printed for each.
//!
//! Run with `cargo bench --manifest-path benches/Cargo.toml --bench http_cache`; compare within one run.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;
use tower_coalesce::http_cache::HttpCacheLayer;

fn app(delay: Duration) -> Router {
    Router::new().route(
        "/api/report/{id}",
        get(move || async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            (
                [("cache-control", "max-age=3600")],
                "{\"report\":7,\"orders\":2000,\"total\":997000}",
            )
        }),
    )
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn loopback(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .build()
        .unwrap();
    let (slow, instant, cached) = rt.block_on(async {
        (
            serve(app(Duration::from_millis(1))).await,
            serve(app(Duration::ZERO)).await,
            serve(app(Duration::from_millis(1)).layer(HttpCacheLayer::new().unscoped())).await,
        )
    });
    let mut group = c.benchmark_group("http_cache_loopback");
    for (name, addr) in [
        ("bare_handler_1ms", slow),
        ("bare_handler_instant", instant),
        ("cache_hit_handler_1ms", cached),
    ] {
        let url = format!("http://{addr}/api/report/7");
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                let res = client.get(&url).send().await.unwrap();
                res.bytes().await.unwrap()
            })
        });
    }
    group.finish();
}

fn in_process(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bare = app(Duration::ZERO);
    let cached = app(Duration::from_millis(1)).layer(HttpCacheLayer::new().unscoped());
    let request = || {
        axum::http::Request::get("/api/report/7")
            .body(Body::empty())
            .unwrap()
    };
    rt.block_on(cached.clone().oneshot(request())).unwrap();
    let mut group = c.benchmark_group("http_cache_in_process");
    group.bench_function("bare_handler_instant", |b| {
        b.to_async(&rt)
            .iter(|| async { bare.clone().oneshot(request()).await.unwrap() })
    });
    group.bench_function("cache_hit", |b| {
        b.to_async(&rt)
            .iter(|| async { cached.clone().oneshot(request()).await.unwrap() })
    });
    group.finish();
}

/// The handler of the peer comparison: a `service_fn` over any request body, counting its
/// runs, answering after `delay`.
fn report_fn<B>(
    runs: Arc<AtomicU64>,
    delay: Duration,
) -> impl tower::Service<
    http::Request<B>,
    Response = http::Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Future<Output = Result<http::Response<Full<Bytes>>, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_req: http::Request<B>| {
        runs.fetch_add(1, Ordering::Relaxed);
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let response = http::Response::builder()
                .header("cache-control", "max-age=3600")
                .body(Full::new(Bytes::from_static(
                    b"{\"report\":7,\"orders\":2000,\"total\":997000}",
                )))
                .unwrap();
            Ok(response)
        }
    })
}

fn vs_tower_http_cache(c: &mut Criterion) {
    use tower::Layer;
    use tower_http_cache::prelude::{CacheLayer, InMemoryBackend};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let request = |path: &str| {
        http::Request::get(path)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let ours = |runs: &Arc<AtomicU64>, delay| {
        HttpCacheLayer::new()
            .unscoped()
            .layer(report_fn(runs.clone(), delay))
    };
    let theirs = |runs: &Arc<AtomicU64>, delay| {
        CacheLayer::builder(InMemoryBackend::new(100_000))
            .ttl(Duration::from_secs(3600))
            .respect_cache_control(true)
            .build()
            .layer(report_fn(runs.clone(), delay))
    };

    let mut group = c.benchmark_group("http_cache_vs_tower_http_cache");
    let runs = Arc::new(AtomicU64::new(0));
    let (our_hit, their_hit) = (ours(&runs, Duration::ZERO), theirs(&runs, Duration::ZERO));
    rt.block_on(async {
        our_hit.clone().oneshot(request("/r/7")).await.unwrap();
        their_hit.clone().oneshot(request("/r/7")).await.unwrap();
    });
    group.bench_function("hit/tower_coalesce", |b| {
        b.to_async(&rt).iter(|| async {
            let res = our_hit.clone().oneshot(request("/r/7")).await.unwrap();
            res.into_body().collect().await.unwrap().to_bytes()
        })
    });
    group.bench_function("hit/tower_http_cache", |b| {
        b.to_async(&rt).iter(|| async {
            let res = their_hit.clone().oneshot(request("/r/7")).await.unwrap();
            res.into_body().collect().await.unwrap().to_bytes()
        })
    });

    let delay = Duration::from_millis(1);
    let runs = Arc::new(AtomicU64::new(0));
    miss_fan_in(&mut group, &rt, "tower_coalesce", ours(&runs, delay), &runs);
    let runs = Arc::new(AtomicU64::new(0));
    miss_fan_in(
        &mut group,
        &rt,
        "tower_http_cache",
        theirs(&runs, delay),
        &runs,
    );
    group.finish();
}

/// Rounds of 100 concurrent requests for a new key each (every round a miss), through
/// `service`; prints the handler's runs per round.
fn miss_fan_in<S, B>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    name: &str,
    service: S,
    runs: &AtomicU64,
) where
    S: tower::Service<http::Request<Full<Bytes>>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: std::fmt::Debug,
{
    const CALLERS: usize = 100;
    let round = AtomicU64::new(0);
    group.bench_function(format!("miss_fan_in_{CALLERS}/{name}"), |b| {
        b.to_async(rt).iter(|| {
            let path = format!("/r/{}", round.fetch_add(1, Ordering::Relaxed));
            let calls: Vec<_> = (0..CALLERS)
                .map(|_| {
                    let (service, req) = (service.clone(), http::Request::get(&path));
                    let req = req.body(Full::new(Bytes::new())).unwrap();
                    tokio::spawn(async move {
                        let res = service.oneshot(req).await.unwrap();
                        res.into_body().collect().await.unwrap();
                    })
                })
                .collect();
            async move {
                for call in calls {
                    call.await.unwrap();
                }
            }
        })
    });
    let rounds = round.load(Ordering::Relaxed).max(1);
    println!(
        "{name}: {:.3} handler runs per {CALLERS}-caller miss ({rounds} rounds)",
        runs.load(Ordering::Relaxed) as f64 / rounds as f64
    );
}

criterion_group!(benches, loopback, in_process, vs_tower_http_cache);
criterion_main!(benches);
