//! Idempotency replay across instances through a real Redis, and what happens when Redis
//! stops and comes back. The shared server comes from `REDIS_URL` (`.ci/run` starts one);
//! the stop-and-restart test starts a `redis-server` of its own. Under `CI=true` these tests
//! fail rather than skip when Redis is missing.
#![cfg(all(feature = "redis", feature = "idempotency"))]

mod support;

use support::redis::{Server, free_port, prefix, redis_url};

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing;
use tower_coalesce::idempotency::IdempotencyLayer;
use tower_coalesce::redis::RedisStore;

/// One instance of the app: its own service stack, its own Redis connection.
async fn instance(store: RedisStore) -> (SocketAddr, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = runs.clone();
        move |body: Bytes| async move {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            (
                StatusCode::CREATED,
                format!("run {n} for {}", String::from_utf8_lossy(&body)),
            )
        }
    };
    let app = Router::new()
        .route("/orders", routing::post(handler))
        .layer(IdempotencyLayer::new().store(store));
    (support::serve(app).await, runs)
}

async fn post(addr: SocketAddr, key: &str, body: &str) -> (StatusCode, bool, String) {
    let answer = support::instances::post_body(addr, key, body).await;
    (answer.status, answer.replayed, answer.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_response_completed_on_one_instance_is_replayed_by_the_others() {
    let Some(url) = redis_url() else { return };
    let prefix = prefix();
    let mut instances = Vec::new();
    for _ in 0..3 {
        let store = RedisStore::connect(&url)
            .await
            .unwrap()
            .with_prefix(prefix.clone());
        instances.push(instance(store).await);
    }

    let first = post(instances[0].0, "order-1", "2 apples").await;
    assert_eq!((first.0, first.1), (StatusCode::CREATED, false));
    for (addr, _) in &instances[1..] {
        let retry = post(*addr, "order-1", "2 apples").await;
        assert_eq!(retry, (StatusCode::CREATED, true, first.2.clone()));
        let reused = post(*addr, "order-1", "3 apples").await;
        assert_eq!(reused.0, StatusCode::UNPROCESSABLE_ENTITY);
    }
    let runs: Vec<_> = instances
        .iter()
        .map(|(_, r)| r.load(Ordering::SeqCst))
        .collect();
    assert_eq!(runs, [1, 0, 0]);
}

/// Redis stops: requests are still served, each within the command timeout (the layer
/// fails open and runs them), and nothing is replayed. Redis comes back on the same port:
/// the connection manager reconnects and replay works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_are_served_while_redis_is_down_and_replayed_again_once_it_is_back() {
    let port = free_port();
    let Some(server) = Server::start(port) else {
        return;
    };
    let store = server.connect().await;
    let (addr, runs) = instance(store).await;

    assert_eq!(post(addr, "before", "x").await.0, StatusCode::CREATED);
    assert!(
        post(addr, "before", "x").await.1,
        "not replayed while redis is up"
    );

    drop(server);
    for i in 0..3 {
        let start = Instant::now();
        let (status, replayed, _) = post(addr, "during", "x").await;
        assert_eq!(
            (status, replayed),
            (StatusCode::CREATED, false),
            "request {i}"
        );
        // Two commands (the lookup twice, the put) at 200 ms each, at most.
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "took {:?}",
            start.elapsed()
        );
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        4,
        "every request ran while redis was down"
    );

    let _server = Server::start(port).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut key = 0;
    loop {
        key += 1;
        let key = format!("after-{key}");
        post(addr, &key, "x").await;
        if post(addr, &key, "x").await.1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replay did not come back after redis restarted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The store's contract, against a real Redis and without the layer: get and put; a lease
/// taken by one connection is held elsewhere for another; completing it stores the
/// response and frees the key, which the next lease finds stored; a dropped guard releases
/// without storing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_gets_puts_and_leases() {
    use tower_coalesce::store::Lease;
    use tower_coalesce::store::{Fingerprint, Store, StoreKey, StoredResponse};

    let Some(url) = redis_url() else { return };
    let prefix = prefix();
    let connect = || async {
        RedisStore::connect(&url)
            .await
            .unwrap()
            .with_prefix(prefix.clone())
    };
    let (one, other) = (connect().await, connect().await);
    let response = || {
        Arc::new(StoredResponse::new(
            StatusCode::CREATED,
            axum::http::Version::HTTP_11,
            axum::http::HeaderMap::new(),
            Bytes::from_static(b"created"),
            Fingerprint::from_bytes([1; 32]),
        ))
    };
    let ttl = Duration::from_secs(60);

    let put_key = StoreKey::from_bytes([1; 32]);
    assert!(one.get(&put_key).await.unwrap().is_none());
    one.put(put_key.clone(), response(), ttl).await.unwrap();
    let found = other.get(&put_key).await.unwrap().expect("stored");
    assert_eq!(found.body(), response().body());

    let key = StoreKey::from_bytes([2; 32]);
    let Lease::Held(guard) = one.lease(&key).await.unwrap() else {
        panic!("a fresh key's lease is free");
    };
    assert!(matches!(
        other.lease(&key).await.unwrap(),
        Lease::HeldElsewhere
    ));
    guard.complete(Some((response(), ttl))).await.unwrap();
    let Lease::Stored(stored) = other.lease(&key).await.unwrap() else {
        panic!("a completed key is stored");
    };
    assert_eq!(stored.status(), StatusCode::CREATED);

    let dropped = StoreKey::from_bytes([3; 32]);
    let Lease::Held(guard) = one.lease(&dropped).await.unwrap() else {
        panic!("a fresh key's lease is free");
    };
    drop(guard);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match other.lease(&dropped).await.unwrap() {
            Lease::Held(_) => break,
            Lease::HeldElsewhere if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            other => panic!("the dropped lease was not released: {other:?}"),
        }
    }

    // `complete` dropped while it waits (every caller of the flight left mid-store): the
    // response is stored and the lease released all the same, long before the lease (5 s
    // by default) would expire.
    let interrupted = StoreKey::from_bytes([4; 32]);
    let Lease::Held(guard) = one.lease(&interrupted).await.unwrap() else {
        panic!("a fresh key's lease is free");
    };
    let mut completing = Box::pin(guard.complete(Some((response(), ttl))));
    assert!(futures::poll!(completing.as_mut()).is_pending());
    drop(completing);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match other.lease(&interrupted).await.unwrap() {
            Lease::Stored(stored) => {
                assert_eq!(stored.body(), response().body());
                break;
            }
            Lease::HeldElsewhere if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            other => panic!("an interrupted completion stored and released nothing: {other:?}"),
        }
    }
}
