//! The HTTP layer over loopback, side by side with the bare axum app, in one run:
//!
//! - `http_not_coalesced`: batches of 64 concurrent POSTs with a small JSON body that never
//!   share a flight, over pooled HTTP/1.1 connections to one server, where the same handler
//!   is mounted bare, behind the layer keyed by the `Idempotency-Key` header, behind the
//!   layer keyed by the id in the JSON body (`key::json`), behind a layer whose key the
//!   requests don't carry, and behind the floor of any layer that shares responses
//!   (`support/floor.rs`: reads the body, registers the key, buffers the response, and
//!   promises nothing). Every variant gets the same requests (a distinct id in the body
//!   and in the header), so the ratio of the layer's time to the bare handler's is its
//!   overhead on ordinary traffic; keyed requests pay for reading the body (its SHA-256
//!   fingerprint only with a store, or when a response varies).
//! - `json_key`: the key of that body, `key::json("/id")` (one pass to the value, the rest
//!   skipped) beside what it did before, a `serde_json::Value` of the whole body and
//!   `Value::pointer`; and `key::form` on the same fields as a form.
//! - `http_fan_in_100`: 100 concurrent same-key POSTs to a handler that takes 2 ms (a
//!   database round trip), bare and with the layer. Handler executions per batch are
//!   counted and printed at the end.
//!
//! Client and server share the machine; compare within one run.
//! Run with `cargo bench --manifest-path benches/Cargo.toml --bench http`.

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

#[path = "support/floor.rs"]
mod floor;

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

/// A create's body, 90 bytes, with the client id `id`.
fn body(id: &str) -> String {
    format!(r#"{{"id":"{id}","name":"Ada Lovelace","email":"ada@example.com","plan":"team"}}"#)
}

async fn batch(
    client: &reqwest::Client,
    url: &str,
    n: usize,
    key: impl Fn(usize) -> Option<String>,
) {
    join_all((0..n).map(|i| {
        let key = key(i);
        let mut req = client
            .post(url)
            .header("content-type", "application/json")
            .body(body(key.as_deref().unwrap_or("c-0")));
        if let Some(key) = key {
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

/// One server for every variant of the loopback comparison, so that they share its
/// connections, accept loop and routing: the same create handler at `/bare`, and behind
/// the layer keyed by the `Idempotency-Key` header (`/hkey`), by the JSON body's id
/// (`/json`), and by a header the requests don't carry (`/none`: passed through unread);
/// and behind the floor layer (`/floor`).
fn variants(executions: Arc<AtomicUsize>) -> Router {
    let create = |executions: &Arc<AtomicUsize>| app(executions.clone(), Duration::ZERO);
    Router::new()
        .nest("/bare", create(&executions))
        .nest(
            "/hkey",
            create(&executions).layer(HttpCoalesceLayer::new(key::idempotency_key())),
        )
        .nest(
            "/json",
            create(&executions).layer(HttpCoalesceLayer::new(key::json("/id"))),
        )
        .nest(
            "/none",
            create(&executions).layer(HttpCoalesceLayer::new(key::header("x-absent-key"))),
        )
        .nest("/floor", create(&executions).layer(floor::layer()))
}

fn not_coalesced(c: &mut Criterion) {
    let rt = runtime();
    let executions = Arc::new(AtomicUsize::new(0));
    let server = rt.block_on(serve(variants(executions.clone())));
    let client = client();
    let next_key = AtomicU64::new(0);
    let names = ["bare", "hkey", "json", "none", "floor"];
    let urls = names.map(|name| format!("http://{server}/{name}/api/clients"));
    // Every variant gets the same requests: a distinct id in the body and the same one in
    // an `Idempotency-Key` header, so that the only difference is the layer.
    let keys = |next_key: &AtomicU64| {
        let base = next_key.fetch_add(BATCH as u64, Ordering::Relaxed);
        move |i: usize| Some(format!("key-{}", base + i as u64))
    };

    let mut group = c.benchmark_group("http_not_coalesced");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.measurement_time(Duration::from_secs(8));
    for (name, url) in names.iter().zip(&urls) {
        group.bench_function(*name, |b| {
            b.to_async(&rt)
                .iter(|| batch(&client, url, BATCH, keys(&next_key)))
        });
    }
    group.finish();

    // Criterion's estimates above drift by more than the layer costs when client and server
    // share two cores. Interleaving the variants batch by batch, in a rotating order, lets
    // the drift hit them alike: the ratios of the sums are the figures to read.
    let rounds = 1200;
    let mut totals = [Duration::ZERO; 5];
    rt.block_on(async {
        for round in 0..rounds {
            for turn in 0..5 {
                let which = (round + turn) % 5;
                let start = std::time::Instant::now();
                batch(&client, &urls[which], BATCH, keys(&next_key)).await;
                totals[which] += start.elapsed();
            }
        }
    });
    let per_request = |t: Duration| t.as_secs_f64() * 1e6 / (rounds * BATCH) as f64;
    let figures: Vec<String> = ["bare", "header key", "json body key", "unkeyed", "floor"]
        .iter()
        .zip(totals)
        .map(|(name, total)| {
            format!(
                "{name} {:.1} µs ({:.3}x)",
                per_request(total),
                total.as_secs_f64() / totals[0].as_secs_f64()
            )
        })
        .collect();
    println!(
        "http_not_coalesced interleaved, per request: {}",
        figures.join(", ")
    );
    // The goals of issue 36 are stated against the floor: the ratios to it, from the same sums.
    let to_floor = |which: usize| totals[which].as_secs_f64() / totals[4].as_secs_f64();
    println!(
        "http_not_coalesced interleaved, to the floor: header key {:.3}x, json body key {:.3}x",
        to_floor(1),
        to_floor(2)
    );
}

/// The key of a create's body: `key::json` beside parsing the body into a `Value`.
fn json_key(c: &mut Criterion) {
    let json = body("c-1734");
    let form = "id=c-1734&name=Ada+Lovelace&email=ada%40example.com&plan=team";
    let (by_json, by_form) = (key::json("/id"), key::form("id"));
    assert_eq!(by_json.key_of(json.as_bytes()).as_deref(), Some("c-1734"));
    let mut group = c.benchmark_group("json_key");
    group.bench_function("key_json", |b| {
        b.iter(|| by_json.key_of(std::hint::black_box(json.as_bytes())))
    });
    group.bench_function("value_then_pointer", |b| {
        b.iter(|| {
            let body = std::hint::black_box(json.as_bytes());
            let value: serde_json::Value = serde_json::from_slice(body).ok()?;
            match value.pointer("/id")? {
                serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            }
        })
    });
    group.bench_function("key_form", |b| {
        b.iter(|| by_form.key_of(std::hint::black_box(form.as_bytes())))
    });
    group.finish();
}

/// The same apps called in process, without sockets: the layer's own CPU cost per request,
/// which the loopback figures blur with the network stack's; the floor layer beside them.
fn in_process(c: &mut Criterion) {
    let rt = runtime();
    let executions = Arc::new(AtomicUsize::new(0));
    // `with_state(())` turns the routes into services once, as `axum::serve` does; a
    // `Router` called without it applies its layers again on every request.
    let bare = app(executions.clone(), Duration::ZERO).with_state(());
    let layered = app(executions.clone(), Duration::ZERO)
        .layer(HttpCoalesceLayer::new(key::idempotency_key()))
        .with_state(());
    let json = app(executions.clone(), Duration::ZERO)
        .layer(HttpCoalesceLayer::new(key::json("/id")))
        .with_state(());
    let floor = app(executions.clone(), Duration::ZERO)
        .layer(floor::layer())
        .with_state(());
    let next_key = AtomicU64::new(0);
    let request = |key: Option<u64>| {
        let id = format!("key-{}", key.unwrap_or(0));
        let mut req =
            http::Request::post("/api/clients").header("content-type", "application/json");
        if key.is_some() {
            req = req.header("idempotency-key", &id);
        }
        req.body(axum::body::Body::from(body(&id))).unwrap()
    };
    async fn call(app: &Router, req: http::Request<axum::body::Body>) {
        let res = app.clone().oneshot(req).await.unwrap();
        axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
    }

    let mut group = c.benchmark_group("http_in_process");
    for (name, app, keyed) in [
        ("bare_axum", &bare, true),
        ("layer_header_key", &layered, true),
        ("layer_json_body_key", &json, true),
        ("layer_unkeyed", &layered, false),
        ("floor", &floor, true),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                let key = next_key.fetch_add(1, Ordering::Relaxed);
                call(app, request(keyed.then_some(key)))
            })
        });
    }
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
        if batches == 0 {
            // Left out by a filter.
            continue;
        }
        println!(
            "http_fan_in_100 {name}: {:.2} handler executions per batch of {FAN_IN} ({runs} in {batches} batches)",
            runs as f64 / batches as f64
        );
    }
}

criterion_group!(benches, json_key, in_process, not_coalesced, fan_in);
criterion_main!(benches);
