//! The in-memory store stays within its byte limit: 100,000 distinct keys with 4 KiB
//! responses (400 MiB if all were kept) through a 16 MiB store, oldest evicted first.
//! A binary of its own, so that its resident memory is its own.
#![cfg(feature = "idempotency")]

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt, service_fn};
use tower_coalesce::idempotency::IdempotencyLayer;
use tower_coalesce::store::MemoryStore;

const KEYS: usize = 100_000;
const BODY: usize = 4096;
const LIMIT: usize = 16 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_responses_stay_within_the_byte_budget() {
    let store = MemoryStore::with_limit(LIMIT);
    let runs = Arc::new(AtomicUsize::new(0));
    let mut svc = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::new().store(store.clone()))
        .service(service_fn({
            let runs = runs.clone();
            move |_req: Request<_>| {
                let n = runs.fetch_add(1, Ordering::Relaxed);
                // Each body distinct, so that nothing is shared by accident.
                let body = vec![(n % 251) as u8; BODY];
                async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
            }
        }));
    let mut call = async |key: usize| {
        let req = Request::post("/upload")
            .header("idempotency-key", format!("key-{key}"))
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap();
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        let replayed = res.headers().contains_key("idempotent-replayed");
        let len = res.into_body().collect().await.unwrap().to_bytes().len();
        assert_eq!(len, BODY);
        replayed
    };

    let before = support::rss_kib();
    for key in 0..KEYS {
        assert!(!call(key).await);
    }
    store.run_pending_tasks().await;
    let grown = support::rss_kib().saturating_sub(before) * 1024;
    eprintln!(
        "{KEYS} responses of {BODY} B: store holds {} entries, {} B (limit {LIMIT}); RSS grew {} KiB",
        store.entry_count(),
        store.weighted_size(),
        grown / 1024
    );
    assert!(store.weighted_size() <= LIMIT as u64);
    assert!(store.entry_count() < KEYS as u64 / 10);
    // Unbounded, the bodies alone would be 400 MiB; allow the limit and allocator slack.
    assert!(
        grown < 3 * LIMIT as u64,
        "RSS grew {grown} B for a {LIMIT} B limit"
    );

    // Oldest out first: the newest keys are replayed, the oldest run again.
    assert_eq!(runs.load(Ordering::Relaxed), KEYS);
    assert!(call(KEYS - 1).await, "the newest response was evicted");
    assert!(!call(0).await, "the oldest response was kept");
    assert_eq!(runs.load(Ordering::Relaxed), KEYS + 1);
}
