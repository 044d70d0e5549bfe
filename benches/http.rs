//! The HTTP layer over loopback, side by side with the bare axum app, in one run:
//!
//! - `http_not_coalesced`: batches of 64 concurrent POSTs that never share a flight, over
//!   pooled HTTP/1.1 connections, against the bare app, the layer with a distinct
//!   `Idempotency-Key` per request, and the layer with requests that carry no key. The
//!   ratio of the layer's time to the bare app's is its overhead on ordinary traffic.
//! - `http_fan_in_100`: 100 concurrent same-key POSTs to a handler that takes 2 ms (a
//!   database round trip), bare and with the layer. Handler executions per batch are
//!   counted and printed at the end.
//!
//! Client and server share the machine; compare within one run.
//! Run with `cargo bench --bench http`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::future::join_all;
use tokio::runtime::Runtime;
use tower::ServiceExt;
use tower_coalesce::http::{HttpCoalesceLayer, key};

const BATCH: usize = 64;
const FAN_IN: usize = 100;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .pool_max_idle_per_host(FAN_IN * 2)
        .build()
        .unwrap()
}

/// A create handler that answers at once with a small JSON body.
fn app(executions: Arc<AtomicUsize>, delay: Duration) -> Router {
    Router::new().route(
        "/api/clients",
        post(move || {
            let executions = executions.clone();
            async move {
                executions.fetch_add(1, Ordering::Relaxed);
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                r#"{"id":"c-1","name":"Ada"}"#
            }
        }),
    )
}

async fn batch(
    client: &reqwest::Client,
    url: &str,
    n: usize,
    key: impl Fn(usize) -> Option<String>,
) {
    join_all((0..n).map(|i| {
        let mut req = client.post(url);
        if let Some(key) = key(i) {
            req = req.header("idempotency-key", key);
        }
        async move {
            let res = req.send().await.unwrap();
            assert!(res.status().is_success());
            res.bytes().await.unwrap();
        }
    }))
    .await;
}

fn not_coalesced(c: &mut Criterion) {
    let rt = runtime();
    let executions = Arc::new(AtomicUsize::new(0));
    let (bare, layered) = rt.block_on(async {
        let bare = serve(app(executions.clone(), Duration::ZERO)).await;
        let layered = app(executions.clone(), Duration::ZERO)
            .layer(HttpCoalesceLayer::new(key::idempotency_key()));
        (bare, serve(layered).await)
    });
    let client = client();
    let next_key = AtomicU64::new(0);

    let mut group = c.benchmark_group("http_not_coalesced");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.measurement_time(Duration::from_secs(8));
    // Alternate the three so that drift in the machine hits them alike.
    for round in 0..2 {
        let bare_url = format!("http://{bare}/api/clients");
        let layered_url = format!("http://{layered}/api/clients");
        group.bench_function(format!("bare_axum/{round}"), |b| {
            b.to_async(&rt)
                .iter(|| batch(&client, &bare_url, BATCH, |_| None))
        });
        group.bench_function(format!("layer_distinct_keys/{round}"), |b| {
            b.to_async(&rt).iter(|| {
                let base = next_key.fetch_add(BATCH as u64, Ordering::Relaxed);
                batch(&client, &layered_url, BATCH, move |i| {
                    Some(format!("key-{}", base + i as u64))
                })
            })
        });
        group.bench_function(format!("layer_unkeyed/{round}"), |b| {
            b.to_async(&rt)
                .iter(|| batch(&client, &layered_url, BATCH, |_| None))
        });
    }
    group.finish();

    // Criterion's estimates above drift by more than the layer costs when client and server
    // share two cores. Interleaving the three batch by batch, in a rotating order, lets the
    // drift hit them alike: the ratios of the sums are the figures to read.
    let urls = [
        format!("http://{bare}/api/clients"),
        format!("http://{layered}/api/clients"),
        format!("http://{layered}/api/clients"),
    ];
    let mut totals = [Duration::ZERO; 3];
    rt.block_on(async {
        for round in 0..1500 {
            for turn in 0..3 {
                let which = (round + turn) % 3;
                let base = next_key.fetch_add(BATCH as u64, Ordering::Relaxed);
                let keyed = which != 2;
                let start = std::time::Instant::now();
                batch(&client, &urls[which], BATCH, move |i| {
                    keyed.then(|| format!("key-{}", base + i as u64))
                })
                .await;
                totals[which] += start.elapsed();
            }
        }
    });
    let per_request = |t: Duration| t.as_secs_f64() * 1e6 / (1500 * BATCH) as f64;
    println!(
        "http_not_coalesced interleaved, per request: bare {:.1} µs, layer distinct keys {:.1} µs \
         ({:.3}x), layer unkeyed {:.1} µs ({:.3}x)",
        per_request(totals[0]),
        per_request(totals[1]),
        totals[1].as_secs_f64() / totals[0].as_secs_f64(),
        per_request(totals[2]),
        totals[2].as_secs_f64() / totals[0].as_secs_f64(),
    );
}

/// The same apps called in process, without sockets: the layer's own CPU cost per request,
/// which the loopback figures blur with the network stack's.
fn in_process(c: &mut Criterion) {
    let rt = runtime();
    let executions = Arc::new(AtomicUsize::new(0));
    let bare = app(executions.clone(), Duration::ZERO);
    let layered = app(executions.clone(), Duration::ZERO)
        .layer(HttpCoalesceLayer::new(key::idempotency_key()));
    let next_key = AtomicU64::new(0);
    let request = |key: Option<u64>| {
        let mut req = http::Request::post("/api/clients");
        if let Some(key) = key {
            req = req.header("idempotency-key", format!("key-{key}"));
        }
        req.body(axum::body::Body::empty()).unwrap()
    };
    async fn call(app: &Router, req: http::Request<axum::body::Body>) {
        let res = app.clone().oneshot(req).await.unwrap();
        axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
    }

    let mut group = c.benchmark_group("http_in_process");
    group.bench_function("bare_axum", |b| {
        b.to_async(&rt).iter(|| {
            let key = next_key.fetch_add(1, Ordering::Relaxed);
            call(&bare, request(Some(key)))
        })
    });
    group.bench_function("layer_distinct_keys", |b| {
        b.to_async(&rt).iter(|| {
            let key = next_key.fetch_add(1, Ordering::Relaxed);
            call(&layered, request(Some(key)))
        })
    });
    group.bench_function("layer_unkeyed", |b| {
        b.to_async(&rt).iter(|| call(&layered, request(None)))
    });
    group.finish();
}

fn fan_in(c: &mut Criterion) {
    let rt = runtime();
    let bare_runs = Arc::new(AtomicUsize::new(0));
    let layered_runs = Arc::new(AtomicUsize::new(0));
    let delay = Duration::from_millis(2);
    let (bare, layered) = rt.block_on(async {
        let bare = serve(app(bare_runs.clone(), delay)).await;
        let layered =
            app(layered_runs.clone(), delay).layer(HttpCoalesceLayer::new(key::idempotency_key()));
        (bare, serve(layered).await)
    });
    let client = client();
    let batches = [AtomicU64::new(0), AtomicU64::new(0)];

    let mut group = c.benchmark_group("http_fan_in_100");
    group.sample_size(30);
    let bare_url = format!("http://{bare}/api/clients");
    let layered_url = format!("http://{layered}/api/clients");
    group.bench_function("bare_axum_2ms_handler", |b| {
        b.to_async(&rt).iter(|| {
            batches[0].fetch_add(1, Ordering::Relaxed);
            batch(&client, &bare_url, FAN_IN, |_| Some("same".into()))
        })
    });
    group.bench_function("layer_2ms_handler", |b| {
        b.to_async(&rt).iter(|| {
            batches[1].fetch_add(1, Ordering::Relaxed);
            batch(&client, &layered_url, FAN_IN, |_| Some("same".into()))
        })
    });
    group.finish();

    for (name, runs, batches) in [
        ("bare axum", &bare_runs, &batches[0]),
        ("layer", &layered_runs, &batches[1]),
    ] {
        let (runs, batches) = (
            runs.load(Ordering::Relaxed),
            batches.load(Ordering::Relaxed),
        );
        println!(
            "http_fan_in_100 {name}: {:.2} handler executions per batch of {FAN_IN} ({runs} in {batches} batches)",
            runs as f64 / batches as f64
        );
    }
}

criterion_group!(benches, in_process, not_coalesced, fan_in);
criterion_main!(benches);
