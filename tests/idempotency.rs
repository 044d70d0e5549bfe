//! Idempotency-Key replay over real HTTP: an axum app on 127.0.0.1, reqwest as the client.
#![cfg(feature = "idempotency")]

mod support;

#[path = "../examples/demo/app.rs"]
mod app;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use futures::future::join_all;
use tower_coalesce::idempotency::IdempotencyLayer;

/// `POST /orders`: counts its runs, echoes the body, and answers with `status` (500 makes
/// it a server error). Each answer is unique, so that a replay can't pass for a new run.
fn orders(layer: IdempotencyLayer, status: Arc<AtomicUsize>) -> (Router, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = runs.clone();
        move |body: Bytes| async move {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            let status = StatusCode::from_u16(status.load(Ordering::SeqCst) as u16).unwrap();
            let body = format!("run {n} for {}", String::from_utf8_lossy(&body));
            (status, [("x-run", n.to_string())], body)
        }
    };
    let router = Router::new().route("/orders", post(handler)).layer(layer);
    (router, runs)
}

#[derive(Debug, PartialEq)]
struct Received {
    status: StatusCode,
    replayed: bool,
    run: Option<String>,
    body: Bytes,
}

async fn post_order(
    client: &reqwest::Client,
    addr: SocketAddr,
    key: Option<&str>,
    body: &str,
) -> Received {
    let mut req = client
        .post(format!("http://{addr}/orders"))
        .body(body.to_owned());
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    let res = req.send().await.unwrap();
    Received {
        status: res.status(),
        replayed: res
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true"),
        run: support::header(&res, "x-run"),
        body: res.bytes().await.unwrap(),
    }
}

fn status(code: u16) -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(code as usize))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_after_completion_is_replayed_without_running_the_handler() {
    let (router, runs) = orders(IdempotencyLayer::new(), status(201));
    let addr = support::serve(router).await;
    let client = reqwest::Client::new();

    let first = post_order(&client, addr, Some("order-1"), "2 apples").await;
    assert_eq!((first.status, first.replayed), (StatusCode::CREATED, false));
    for _ in 0..3 {
        let retry = post_order(&client, addr, Some("order-1"), "2 apples").await;
        assert!(retry.replayed);
        assert_eq!(
            (retry.status, &retry.run, &retry.body),
            (first.status, &first.run, &first.body)
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Another key is another request.
    let other = post_order(&client, addr, Some("order-2"), "2 apples").await;
    assert_eq!(other.run.as_deref(), Some("2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_key_with_another_body_is_refused_with_422() {
    let (router, runs) = orders(IdempotencyLayer::new(), status(201));
    let addr = support::serve(router).await;
    let client = reqwest::Client::new();

    post_order(&client, addr, Some("k"), "2 apples").await;
    let reused = post_order(&client, addr, Some("k"), "3 apples").await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    let problem: serde_json::Value = serde_json::from_slice(&reused.body).unwrap();
    assert_eq!(problem["status"], 422);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_and_malformed_keys_get_400_and_never_reach_the_handler() {
    let (router, runs) = orders(IdempotencyLayer::new().require_key(true), status(201));
    let addr = support::serve(router).await;
    let client = reqwest::Client::new();

    let too_long = "k".repeat(256);
    for key in [
        None,
        Some(""),
        Some("   "),
        Some(too_long.as_str()),
        Some("a\tb"),
    ] {
        let res = post_order(&client, addr, key, "x").await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST, "key {key:?}");
        // In the preset's own words: the header as clients write it, not our "coalescing".
        let problem: serde_json::Value = serde_json::from_slice(&res.body).unwrap();
        assert_eq!(
            problem["title"],
            "Idempotency-Key header missing or malformed"
        );
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("Idempotency-Key header")
        );
    }
    let twice = client
        .post(format!("http://{addr}/orders"))
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .send()
        .await
        .unwrap();
    assert_eq!(twice.status(), StatusCode::BAD_REQUEST);
    assert_eq!(runs.load(Ordering::SeqCst), 0);

    // The preset requires a key; with `require_key(false)`, a request without one passes
    // through, every time.
    let (router, runs) = orders(IdempotencyLayer::new(), status(201));
    let addr = support::serve(router).await;
    let res = post_order(&client, addr, None, "x").await;
    assert_eq!(res.status, StatusCode::BAD_REQUEST);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let (router, runs) = orders(IdempotencyLayer::new().require_key(false), status(201));
    let addr = support::serve(router).await;
    post_order(&client, addr, None, "x").await;
    post_order(&client, addr, None, "x").await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_error_is_not_stored_and_the_retry_runs_again() {
    let code = status(500);
    let (router, runs) = orders(IdempotencyLayer::new(), code.clone());
    let addr = support::serve(router).await;
    let client = reqwest::Client::new();

    let failed = post_order(&client, addr, Some("k"), "x").await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    code.store(201, Ordering::SeqCst);
    let retry = post_order(&client, addr, Some("k"), "x").await;
    assert_eq!((retry.status, retry.replayed), (StatusCode::CREATED, false));
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    // A client error is an outcome, and is replayed.
    code.store(409, Ordering::SeqCst);
    let conflict = post_order(&client, addr, Some("k2"), "x").await;
    let replayed = post_order(&client, addr, Some("k2"), "x").await;
    assert_eq!(
        (replayed.status, replayed.replayed),
        (StatusCode::CONFLICT, true)
    );
    assert_eq!(replayed.body, conflict.body);
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_response_runs_again() {
    let layer = IdempotencyLayer::new().replay(Duration::from_millis(300));
    let (router, runs) = orders(layer, status(201));
    let addr = support::serve(router).await;
    let client = reqwest::Client::new();

    post_order(&client, addr, Some("k"), "x").await;
    assert!(post_order(&client, addr, Some("k"), "x").await.replayed);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after = post_order(&client, addr, Some("k"), "x").await;
    assert!(!after.replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_user_never_replays_another_users_response() {
    let (router, runs) = orders(IdempotencyLayer::new(), status(201));
    let addr = support::serve(router).await;
    let client = reqwest::Client::new();
    let as_user = |token: &'static str| {
        client
            .post(format!("http://{addr}/orders"))
            .header("idempotency-key", "same")
            .header("authorization", token)
            .body("x")
            .send()
    };
    let alice = as_user("Bearer alice").await.unwrap();
    let bob = as_user("Bearer bob").await.unwrap();
    assert!(bob.headers().get("idempotent-replayed").is_none());
    assert_ne!(alice.bytes().await.unwrap(), bob.bytes().await.unwrap());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// The first request and its retries race, some while the first runs and some just after
/// it completed: every one of them gets the first run's response.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_racing_its_retries_runs_once() {
    for round in 0..60 {
        let (router, runs) = orders(IdempotencyLayer::new(), status(201));
        let addr = support::serve(router).await;
        let client = reqwest::Client::new();
        let key = format!("race-{round}");
        let responses = join_all((0..20).map(|i| {
            let (client, key) = (client.clone(), key.clone());
            async move {
                // Stagger the retries across the first run's lifetime and beyond it.
                tokio::time::sleep(Duration::from_micros(200 * i)).await;
                post_order(&client, addr, Some(&key), "x").await
            }
        }))
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 1, "round {round}");
        for res in &responses {
            assert_eq!(res.status, StatusCode::CREATED);
            assert_eq!(res.body, responses[0].body);
        }
    }
}

/// The demo's create on SQLite: 50 concurrent POSTs, then 50 retries a second later, all
/// with one idempotency key: one row, one handler run, and the same answer for all 100.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_and_late_retries_make_one_row() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("clients.db").display()
    );
    let state = app::AppState::new(app::connect(&url).await.unwrap(), Duration::from_millis(20));
    let layer = IdempotencyLayer::new();
    let metrics = layer.metrics();
    let router = app::routes().layer(layer).with_state(state.clone());
    let base = format!("http://{}", support::serve(router).await);

    let key = [("idempotency-key", "create-client-7".to_owned())];
    let first = app::fire_with(&base, "client-7", 50, &key).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let retries = app::fire_with(&base, "client-7", 50, &key).await;

    assert_eq!(state.rows("client-7").await, 1);
    assert_eq!(state.executions(), 1);
    for r in first.iter().chain(&retries) {
        assert_eq!(r.status, StatusCode::CREATED);
        assert_eq!(r.body, first[0].body);
    }
    // Every request but the first joined its flight or was replayed, and all 50 retries
    // were replayed. A retry can be both: retries that arrive together share one lookup
    // of the store.
    assert_eq!(metrics.flights_started(), 1);
    assert!(metrics.callers_joined() + metrics.responses_replayed() >= 99);
    assert!(metrics.responses_replayed() >= 50);
}

/// While the first request with a key is held: a `Conflict` policy answers duplicates 409,
/// a cap turns the extra duplicates away, a wait timeout gives up on them; after the first
/// completes, a retry is replayed either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_of_a_running_request_are_refused_shed_or_timed_out_as_configured() {
    use tower_coalesce::http::OnDuplicate;

    // A name, what it does to the layer, and what the refused duplicates get.
    type Config = (
        &'static str,
        fn(IdempotencyLayer) -> IdempotencyLayer,
        StatusCode,
    );
    let configs: [Config; 3] = [
        (
            "conflict",
            |l| l.on_duplicate(OnDuplicate::Conflict),
            StatusCode::CONFLICT,
        ),
        (
            "cap",
            |l| l.max_followers(2),
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        (
            "timeout",
            |l| l.follower_timeout(Duration::from_millis(50)),
            StatusCode::SERVICE_UNAVAILABLE,
        ),
    ];
    for (name, configure, refused) in configs {
        let layer = configure(IdempotencyLayer::new());
        let metrics = layer.metrics();
        let release = Arc::new(tokio::sync::Notify::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let handler = {
            let (release, runs) = (release.clone(), runs.clone());
            move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                release.notified().await;
                (StatusCode::CREATED, "created")
            }
        };
        let addr = support::serve(Router::new().route("/orders", post(handler)).layer(layer)).await;
        let client = reqwest::Client::new();

        let first = tokio::spawn({
            let client = client.clone();
            async move { post_order(&client, addr, Some("k"), "x").await }
        });
        support::eventually("the first request to run", || {
            runs.load(Ordering::SeqCst) == 1
        })
        .await;
        let duplicates = join_all((0..6).map(|_| {
            let client = client.clone();
            async move { post_order(&client, addr, Some("k"), "x").await }
        }));
        let duplicates = if name == "cap" {
            // The two that may wait are answered only once the first completes.
            let duplicates = tokio::spawn(duplicates);
            support::eventually("four to be turned away", || metrics.followers_shed() == 4).await;
            release.notify_one();
            duplicates.await.unwrap()
        } else {
            let duplicates = duplicates.await;
            release.notify_one();
            duplicates
        };
        let first = first.await.unwrap();
        assert_eq!(first.status, StatusCode::CREATED, "{name}");
        let refused_count = duplicates.iter().filter(|d| d.status == refused).count();
        let served = duplicates
            .iter()
            .filter(|d| d.status == StatusCode::CREATED)
            .count();
        match name {
            "cap" => assert_eq!((refused_count, served), (4, 2), "{name}"),
            _ => assert_eq!(refused_count, 6, "{name}"),
        }
        let retry = post_order(&client, addr, Some("k"), "x").await;
        assert_eq!(
            (retry.status, retry.replayed),
            (StatusCode::CREATED, true),
            "{name}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{name}");
    }
}

/// A store whose lookups take 100 ms: a flight that only looks up a completed key lasts
/// long enough for a retry to arrive while it runs.
#[derive(Clone, Default)]
struct SlowLookups(tower_coalesce::store::MemoryStore);

impl tower_coalesce::store::Store for SlowLookups {
    async fn get(
        &self,
        key: &tower_coalesce::store::StoreKey,
    ) -> Result<Option<Arc<tower_coalesce::store::StoredResponse>>, tower_coalesce::BoxError> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.0.get(key).await
    }

    async fn put(
        &self,
        key: tower_coalesce::store::StoreKey,
        response: Arc<tower_coalesce::store::StoredResponse>,
        ttl: Duration,
    ) -> Result<(), tower_coalesce::BoxError> {
        self.0.put(key, response, ttl).await
    }
}

/// Under `OnDuplicate::Conflict`, two retries of a completed request that arrive together
/// are both replayed: the second joins the first's flight, which only looks the key up, and
/// is not refused as if the request were still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_conflict_concurrent_retries_of_a_completed_request_are_replayed() {
    use tower_coalesce::http::OnDuplicate;

    let layer = IdempotencyLayer::new()
        .store(SlowLookups::default())
        .on_duplicate(OnDuplicate::Conflict);
    let metrics = layer.metrics();
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = runs.clone();
        move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            (StatusCode::CREATED, "created")
        }
    };
    let addr = support::serve(Router::new().route("/orders", post(handler)).layer(layer)).await;
    let client = reqwest::Client::new();

    let first = post_order(&client, addr, Some("k"), "x").await;
    assert_eq!((first.status, first.replayed), (StatusCode::CREATED, false));
    let retries = join_all((0..2).map(|i| {
        let client = client.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(30 * i)).await;
            post_order(&client, addr, Some("k"), "x").await
        }
    }))
    .await;
    for retry in &retries {
        assert_eq!((retry.status, retry.replayed), (StatusCode::CREATED, true));
    }
    assert_eq!(metrics.callers_joined() + metrics.duplicates_refused(), 0);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// The placement the docs give: on the guarded handlers (`MethodRouter::route_layer`), an
/// unknown path is the router's 404 and a method the route doesn't serve its 405; a keyed
/// request still runs and a keyless one still gets 400. Over a socket, as a client sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_guarded_handlers_wrong_paths_and_methods_get_the_routers_404_and_405() {
    let app = Router::new()
        .route("/health", axum::routing::get(|| async { "ok" }))
        .route(
            "/payments",
            post(|| async { (StatusCode::CREATED, "paid") }).route_layer(IdempotencyLayer::new()),
        );
    let base = format!("http://{}", support::serve(app).await);
    let client = reqwest::Client::new();
    let status = |method: reqwest::Method, path: &str, key: Option<&str>| {
        let mut req = client.request(method, format!("{base}{path}"));
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    use reqwest::Method;
    assert_eq!(status(Method::POST, "/health", None).await, 405);
    assert_eq!(status(Method::DELETE, "/payments", None).await, 405);
    assert_eq!(status(Method::POST, "/nope", None).await, 404);
    assert_eq!(status(Method::GET, "/health", None).await, 200);
    assert_eq!(status(Method::POST, "/payments", None).await, 400);
    assert_eq!(status(Method::POST, "/payments", Some("k-1")).await, 201);
}
