//! The HTTP cache beside the bare axum app, in one run:
//!
//! - `http_cache_loopback`: one GET at a time over a kept-alive HTTP/1.1 connection: the
//!   bare app whose handler takes 1 ms (a report query), the bare app whose handler answers
//!   at once (the floor: loopback, hyper, axum), and the cached 1 ms handler on a hit.
//! - `http_cache_in_process`: the same without sockets, through `tower::ServiceExt::oneshot`:
//!   the bare instant handler, and a cache hit (lookup, `Age`, `Cache-Status`, body clone).
//!
//! Run with `cargo bench --bench http_cache --features http-cache`; compare within one run.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use criterion::{Criterion, criterion_group, criterion_main};
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

criterion_group!(benches, loopback, in_process);
criterion_main!(benches);
