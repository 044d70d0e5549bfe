//! Waiting under control, over real HTTP (axum on 127.0.0.1, reqwest) and, for timeouts,
//! with tokio's paused clock: duplicate policies, the follower wait timeout, the follower
//! cap, and responses that are not to be shared.
#![cfg(feature = "http")]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use futures::future::join_all;
use tokio::sync::Notify;
use tower_coalesce::http::{
    DoNotShare, Fallback, HttpCoalesceLayer, OnDuplicate, Role, Unshared, key, policy,
};

use support::eventually;

/// A handler whose first run waits for `release`; later runs answer at once. It counts its
/// runs and the most runs at the same time.
#[derive(Clone, Default)]
struct Handler {
    runs: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    most_at_once: Arc<AtomicUsize>,
    release: Arc<Notify>,
}

impl Handler {
    async fn run(&self) -> usize {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        if n == 1 {
            self.release.notified().await;
        } else {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        n
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    fn router(
        &self,
        layer: HttpCoalesceLayer<key::HeaderKey>,
        mark: Option<&'static str>,
    ) -> Router {
        let handler = self.clone();
        let route = post(move || {
            let handler = handler.clone();
            async move {
                let n = handler.run().await;
                let body = format!("run {n}");
                match mark {
                    Some("do-not-share") => (axum::Extension(DoNotShare), body).into_response(),
                    Some(cache_control) => {
                        ([("cache-control", cache_control)], body).into_response()
                    }
                    None => body.into_response(),
                }
            }
        });
        Router::new()
            .route("/x", route)
            .layer(layer.role_header(true))
    }
}

#[derive(Debug)]
struct Received {
    status: StatusCode,
    role: Option<String>,
    retry_after: Option<String>,
    body: String,
}

async fn send(client: &reqwest::Client, addr: SocketAddr) -> Received {
    let res = client
        .post(format!("http://{addr}/x"))
        .header("idempotency-key", "k")
        .send()
        .await
        .unwrap();
    let header = |name| support::header(&res, name);
    let (role, retry_after) = (header("coalesce-role"), header("retry-after"));
    Received {
        status: res.status(),
        role,
        retry_after,
        body: res.text().await.unwrap(),
    }
}

/// Starts the leader, waits until its handler runs, then sends `n` duplicates and waits
/// until `settled` holds; then releases the leader and returns the leader's response and
/// the duplicates'.
async fn leader_and_duplicates(
    handler: &Handler,
    addr: SocketAddr,
    n: usize,
    settled: impl Fn() -> bool,
) -> (Received, Vec<Received>) {
    let client = reqwest::Client::new();
    let leader = tokio::spawn({
        let client = client.clone();
        async move { send(&client, addr).await }
    });
    eventually("the leader to run", || handler.runs() == 1).await;
    let duplicates: Vec<_> = (0..n)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { send(&client, addr).await })
        })
        .collect();
    eventually("the duplicates to settle", settled).await;
    handler.release.notify_one();
    let leader = leader.await.unwrap();
    let duplicates = join_all(duplicates)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    (leader, duplicates)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_conflict_policy_answers_duplicates_409_at_once() {
    let handler = Handler::default();
    let layer = HttpCoalesceLayer::new(key::idempotency_key()).on_duplicate(OnDuplicate::Conflict);
    let metrics = layer.metrics();
    let addr = support::serve(handler.router(layer, None)).await;

    // The duplicates are answered while the leader is still held: no waiting.
    let (leader, duplicates) =
        leader_and_duplicates(&handler, addr, 10, || metrics.duplicates_refused() == 10).await;
    assert_eq!(
        (leader.status, leader.body.as_str()),
        (StatusCode::OK, "run 1")
    );
    for dup in &duplicates {
        assert_eq!(dup.status, StatusCode::CONFLICT);
        assert_eq!(dup.retry_after.as_deref(), Some("1"));
        assert!(dup.body.contains("in progress"), "{}", dup.body);
    }
    assert_eq!(handler.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pass_through_policy_runs_every_duplicate() {
    let handler = Handler::default();
    let layer =
        HttpCoalesceLayer::new(key::idempotency_key()).on_duplicate(OnDuplicate::PassThrough);
    let addr = support::serve(handler.router(layer, None)).await;

    let (leader, duplicates) =
        leader_and_duplicates(&handler, addr, 10, || handler.runs() == 11).await;
    assert_eq!(leader.body, "run 1");
    for dup in &duplicates {
        assert_eq!(dup.status, StatusCode::OK);
        assert_eq!(dup.role.as_deref(), Some("own"));
        assert_ne!(dup.body, "run 1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_over_the_cap_are_turned_away_at_once() {
    let handler = Handler::default();
    let layer = HttpCoalesceLayer::new(key::idempotency_key()).max_followers(5);
    let metrics = layer.metrics();
    let addr = support::serve(handler.router(layer, None)).await;

    let (leader, duplicates) = leader_and_duplicates(&handler, addr, 20, || {
        metrics.callers_joined() + metrics.followers_shed() == 20
    })
    .await;
    assert_eq!(leader.body, "run 1");
    let served: Vec<_> = duplicates
        .iter()
        .filter(|d| d.status == StatusCode::OK)
        .collect();
    let shed: Vec<_> = duplicates
        .iter()
        .filter(|d| d.status == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    assert!(
        served.len() <= 5,
        "{} followers waited for a cap of 5",
        served.len()
    );
    assert_eq!(served.len() + shed.len(), 20);
    assert_eq!(metrics.followers_shed() as usize, shed.len());
    for d in served {
        assert_eq!(d.body, "run 1");
    }
    for d in shed {
        assert_eq!(d.retry_after.as_deref(), Some("1"));
    }
    assert_eq!(handler.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_that_wait_too_long_get_503_and_the_flight_goes_on() {
    let handler = Handler::default();
    let layer =
        HttpCoalesceLayer::new(key::idempotency_key()).follower_timeout(Duration::from_millis(50));
    let metrics = layer.metrics();
    let addr = support::serve(handler.router(layer, None)).await;

    let (leader, duplicates) =
        leader_and_duplicates(&handler, addr, 10, || metrics.followers_timed_out() == 10).await;
    assert_eq!(
        (leader.status, leader.body.as_str()),
        (StatusCode::OK, "run 1")
    );
    for dup in &duplicates {
        assert_eq!(dup.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(dup.retry_after.as_deref(), Some("1"));
    }
    assert_eq!(handler.runs(), 1);
    assert_eq!(metrics.callers_cancelled(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_that_wait_too_long_may_run_on_their_own() {
    let handler = Handler::default();
    let layer = HttpCoalesceLayer::new(key::idempotency_key())
        .follower_timeout(Duration::from_millis(50))
        .fallback(Fallback::PassThrough);
    let addr = support::serve(handler.router(layer, None)).await;

    let (leader, duplicates) =
        leader_and_duplicates(&handler, addr, 10, || handler.runs() == 11).await;
    assert_eq!(leader.body, "run 1");
    for dup in &duplicates {
        assert_eq!(
            (dup.status, dup.role.as_deref()),
            (StatusCode::OK, Some("own"))
        );
        assert_ne!(dup.body, "run 1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_response_marked_do_not_share_goes_to_its_leader_and_followers_run_their_own() {
    for unshared in [Unshared::Concurrently, Unshared::OneAfterAnother] {
        let handler = Handler::default();
        let layer = HttpCoalesceLayer::new(key::idempotency_key()).unshared(unshared);
        let metrics = layer.metrics();
        let addr = support::serve(handler.router(layer, Some("do-not-share"))).await;

        let (leader, duplicates) =
            leader_and_duplicates(&handler, addr, 10, || metrics.callers_joined() == 10).await;
        assert_eq!(
            (leader.body.as_str(), leader.role.as_deref()),
            ("run 1", Some("leader"))
        );
        let mut bodies: Vec<_> = duplicates.iter().map(|d| d.body.clone()).collect();
        bodies.sort();
        bodies.dedup();
        assert_eq!(bodies.len(), 10, "every follower got a response of its own");
        assert!(duplicates.iter().all(|d| d.role.as_deref() == Some("own")));
        assert_eq!(handler.runs(), 11);
        assert_eq!(metrics.responses_not_shared(), 1);
        let most = handler.most_at_once.load(Ordering::SeqCst);
        if unshared == Unshared::OneAfterAnother {
            assert_eq!(most, 1, "followers ran at once");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_control_private_is_not_shared_under_not_private() {
    let handler = Handler::default();
    let layer = HttpCoalesceLayer::new(key::idempotency_key()).share_when(policy::not_private);
    let metrics = layer.metrics();
    let addr = support::serve(handler.router(layer, Some("private, max-age=0"))).await;
    let (_, duplicates) =
        leader_and_duplicates(&handler, addr, 5, || metrics.callers_joined() == 5).await;
    assert!(duplicates.iter().all(|d| d.body != "run 1"));
    assert_eq!(handler.runs(), 6);

    // Without the predicate, the same response is shared.
    let handler = Handler::default();
    let layer = HttpCoalesceLayer::new(key::idempotency_key());
    let metrics = layer.metrics();
    let addr = support::serve(handler.router(layer, Some("private, max-age=0"))).await;
    let (_, duplicates) =
        leader_and_duplicates(&handler, addr, 5, || metrics.callers_joined() == 5).await;
    assert!(duplicates.iter().all(|d| d.body == "run 1"));
}

/// The wait timeout on tokio's paused clock: no real time passes, and the followers give up
/// exactly when the clock reaches the timeout, not before.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_wait_timeout_fires_on_the_clock_and_not_before() {
    use http::Request;
    use http_body_util::Full;
    use tower::{ServiceExt, service_fn};

    let runs = Arc::new(AtomicUsize::new(0));
    let layer =
        HttpCoalesceLayer::new(key::idempotency_key()).follower_timeout(Duration::from_secs(30));
    let metrics = layer.metrics();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(service_fn({
            let runs = runs.clone();
            move |_req: Request<tower_coalesce::http::RequestBody<Full<bytes::Bytes>>>| {
                runs.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok::<_, Infallible>(http::Response::new(Full::new(bytes::Bytes::from("late"))))
                }
            }
        }));
    let req = || {
        Request::post("/x")
            .header("idempotency-key", "k")
            .body(Full::default())
            .unwrap()
    };
    let start = tokio::time::Instant::now();
    let leader = tokio::spawn(svc.clone().oneshot(req()));
    tokio::task::yield_now().await;
    let followers: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot(req())))
        .collect();
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(
        metrics.followers_timed_out(),
        0,
        "gave up before the timeout"
    );
    for follower in followers {
        let res = follower.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(res.extensions().get::<Role>().is_none());
    }
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    assert_eq!(metrics.followers_timed_out(), 5);
    assert!(!leader.is_finished(), "the flight goes on for its leader");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
