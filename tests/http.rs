//! The HTTP layer end to end: an axum app served on 127.0.0.1, a real HTTP client,
//! HTTP/1.1 and HTTP/2 (prior knowledge), many concurrent requests.
#![cfg(feature = "http")]

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use futures::StreamExt;
use futures::future::join_all;
use tower_coalesce::http::{HttpCoalesceLayer, Metrics, key};
use tower_http::catch_panic::CatchPanicLayer;

use support::eventually;

#[derive(Clone, Copy, Debug)]
enum Version {
    Http1,
    Http2,
}

const VERSIONS: [Version; 2] = [Version::Http1, Version::Http2];

fn client(version: Version) -> reqwest::Client {
    let builder = reqwest::Client::builder().no_proxy();
    match version {
        Version::Http1 => builder.http1_only(),
        Version::Http2 => builder.http2_prior_knowledge(),
    }
    .build()
    .unwrap()
}

/// What the handlers see: how often they ran, and the layer's counters.
#[derive(Clone)]
struct App {
    executions: Arc<AtomicUsize>,
    metrics: Metrics,
    /// Followers each flight waits for before it answers, so that all requests overlap.
    followers: usize,
    panic: Arc<AtomicBool>,
}

impl App {
    fn new(metrics: Metrics, followers: usize) -> Self {
        App {
            executions: Arc::new(AtomicUsize::new(0)),
            metrics,
            followers,
            panic: Arc::new(AtomicBool::new(false)),
        }
    }

    fn executions(&self) -> usize {
        self.executions.load(Ordering::SeqCst)
    }

    /// Counts a run and waits until the expected number of followers have joined.
    async fn run(&self) -> usize {
        let n = self.executions.fetch_add(1, Ordering::SeqCst) + 1;
        // Every flight of a test has the same number of followers.
        let target = n * self.followers;
        let metrics = self.metrics.clone();
        eventually("followers to join", || {
            metrics.callers_joined() as usize >= target
        })
        .await;
        n
    }
}

/// `POST /api/clients`: a create whose response differs on every run, so that a copy of
/// one run's response can't be mistaken for another run's.
async fn create_client(State(app): State<App>) -> Response {
    let n = app.run().await;
    if app.panic.load(Ordering::SeqCst) {
        panic!("handler failed on purpose");
    }
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    (
        StatusCode::CREATED,
        [
            ("x-execution", n.to_string()),
            ("x-nonce", nonce.to_string()),
        ],
        format!(r#"{{"id":"c-1","execution":{n},"nonce":{nonce}}}"#),
    )
        .into_response()
}

fn app(layer: HttpCoalesceLayer<key::HeaderKey>, followers: usize) -> (Router, App) {
    let state = App::new(layer.metrics(), followers);
    let router = Router::new()
        .route("/api/clients", post(create_client))
        .layer(layer)
        .layer(CatchPanicLayer::new())
        .with_state(state.clone());
    (router, state)
}

#[derive(Debug, PartialEq)]
struct Received {
    status: StatusCode,
    headers: BTreeMap<String, String>,
    body: Bytes,
}

async fn send(client: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> Received {
    let mut req = client.post(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let res = req.send().await.expect("request failed");
    let status = res.status();
    let headers = res
        .headers()
        .iter()
        // The server stamps `date` on each response as it writes it.
        .filter(|(name, _)| *name != "date")
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
        .collect();
    let body = res.bytes().await.expect("body failed");
    Received {
        status,
        headers,
        body,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_same_key_posts_run_the_handler_once() {
    for version in VERSIONS {
        let (router, app) = app(
            HttpCoalesceLayer::new(key::idempotency_key()).role_header(true),
            199,
        );
        let url = format!("http://{}/api/clients", support::serve(router).await);
        let client = client(version);

        for round in 1..=3 {
            let key = format!("key-{round}");
            let headers = [
                ("idempotency-key", key.as_str()),
                ("authorization", "Bearer u1"),
            ];
            let responses = join_all((0..200).map(|_| send(&client, &url, &headers))).await;

            assert_eq!(app.executions(), round, "{version:?}");
            let leaders = responses
                .iter()
                .filter(|r| r.headers["coalesce-role"] == "leader")
                .count();
            assert_eq!(leaders, 1, "{version:?}");
            let strip_role = |r: &Received| {
                let mut headers = r.headers.clone();
                headers.remove("coalesce-role");
                (r.status, headers, r.body.clone())
            };
            let first = strip_role(&responses[0]);
            assert_eq!(first.0, StatusCode::CREATED);
            assert_eq!(first.1["x-execution"], round.to_string());
            for response in &responses {
                assert_eq!(strip_role(response), first, "{version:?}");
            }
        }
        let metrics = &app.metrics;
        assert_eq!(metrics.flights_started(), 3);
        assert_eq!(metrics.callers_joined(), 3 * 199);
        assert_eq!(metrics.callers_cancelled(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distinct_keys_and_unkeyed_requests_are_not_coalesced() {
    for version in VERSIONS {
        let (router, app) = app(HttpCoalesceLayer::new(key::idempotency_key()), 0);
        let url = format!("http://{}/api/clients", support::serve(router).await);
        let client = client(version);

        let keys: Vec<String> = (0..50).map(|i| format!("k{i}")).collect();
        let keyed = join_all(keys.iter().map(|k| {
            let headers = [("idempotency-key", k.as_str())];
            let (client, url) = (&client, &url);
            async move { send(client, url, &headers).await }
        }));
        let unkeyed = join_all((0..50).map(|_| send(&client, &url, &[])));
        let (keyed, unkeyed) = tokio::join!(keyed, unkeyed);

        assert_eq!(app.executions(), 100, "{version:?}");
        assert_eq!(app.metrics.flights_started(), 50);
        assert_eq!(app.metrics.callers_joined(), 0);
        let mut executions: Vec<_> = keyed
            .iter()
            .chain(&unkeyed)
            .map(|r| r.headers["x-execution"].clone())
            .collect();
        executions.sort();
        executions.dedup();
        assert_eq!(executions.len(), 100, "every request ran on its own");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_key_from_two_identities_runs_twice() {
    // Both flights wait for both followers, so that neither ends before its follower came.
    let layer = HttpCoalesceLayer::new(key::idempotency_key());
    let app = App::new(layer.metrics(), 0);
    let router = Router::new()
        .route(
            "/api/clients",
            post(|State(app): State<App>| async move {
                let metrics = app.metrics.clone();
                eventually("both followers", || metrics.callers_joined() == 2).await;
                create_client(State(app)).await
            }),
        )
        .layer(layer)
        .with_state(app.clone());
    let url = format!("http://{}/api/clients", support::serve(router).await);
    let client = client(Version::Http1);

    let as_user = |token: &'static str| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let headers = [("idempotency-key", "same"), ("authorization", token)];
            send(&client, &url, &headers).await
        }
    };
    // Two callers per identity, so that each identity's flight has one follower.
    let responses = join_all([
        as_user("Bearer alice"),
        as_user("Bearer alice"),
        as_user("Bearer bob"),
        as_user("Bearer bob"),
    ])
    .await;

    assert_eq!(app.executions(), 2);
    assert_eq!(responses[0].body, responses[1].body);
    assert_eq!(responses[2].body, responses[3].body);
    assert_ne!(
        responses[0].body, responses[2].body,
        "bob got alice's response"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_required_key_that_is_missing_or_malformed_gets_a_400_problem() {
    let (router, app) = app(
        HttpCoalesceLayer::new(key::idempotency_key()).require_key(true),
        0,
    );
    let url = format!("http://{}/api/clients", support::serve(router).await);
    let client = client(Version::Http1);

    let too_long = "k".repeat(256);
    for headers in [
        &[][..],
        &[("idempotency-key", "")][..],
        &[("idempotency-key", "a\tb")][..],
        &[("idempotency-key", too_long.as_str())][..],
    ] {
        let res = send(&client, &url, headers).await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST);
        assert_eq!(res.headers["content-type"], "application/problem+json");
        let problem: serde_json::Value = serde_json::from_slice(&res.body).unwrap();
        assert_eq!(problem["status"], 400);
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("Idempotency-Key")
        );
    }
    assert_eq!(app.executions(), 0);
    assert_eq!(app.metrics.requests_refused_without_key(), 4);

    let ok = send(&client, &url, &[("idempotency-key", "k")]).await;
    assert_eq!(ok.status, StatusCode::CREATED);
}

/// Every caller has a connection of its own, and the router has no state: axum builds such
/// a router (and applies its layers) anew for each connection, and the flights must still
/// be shared across connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disconnected_clients_leave_the_others_served_by_one_execution() {
    for version in VERSIONS {
        // The flight waits for 20 followers, then for the test to cancel some callers.
        let layer = HttpCoalesceLayer::new(key::idempotency_key());
        let metrics = layer.metrics();
        let release = Arc::new(tokio::sync::Notify::new());
        let executions = Arc::new(AtomicUsize::new(0));
        let handler = {
            let (release, executions) = (release.clone(), executions.clone());
            move || async move {
                let n = executions.fetch_add(1, Ordering::SeqCst) + 1;
                release.notified().await;
                format!("execution {n}")
            }
        };
        let router = Router::new()
            .route("/api/clients", post(handler))
            .layer(layer);
        let url = format!("http://{}/api/clients", support::serve(router).await);
        // Every caller on its own client, so that aborting one closes its connection (or,
        // on HTTP/2, resets its stream) and nobody else's.
        let call = |url: String| async move {
            let client = client(version);
            send(&client, &url, &[("idempotency-key", "k")]).await
        };

        let leader = tokio::spawn(call(url.clone()));
        eventually("the leader to start", || {
            executions.load(Ordering::SeqCst) == 1
        })
        .await;
        let followers: Vec<_> = (0..20).map(|_| tokio::spawn(call(url.clone()))).collect();
        eventually("followers to join", || metrics.callers_joined() == 20).await;

        leader.abort();
        for follower in &followers[..5] {
            follower.abort();
        }
        eventually("the server to see 6 disconnects", || {
            metrics.callers_cancelled() == 6
        })
        .await;
        release.notify_waiters();

        for follower in followers.into_iter().skip(5) {
            let res = follower.await.unwrap();
            assert_eq!(res.status, StatusCode::OK, "{version:?}");
            assert_eq!(res.body, "execution 1", "{version:?}");
        }
        assert_eq!(executions.load(Ordering::SeqCst), 1, "{version:?}");
        assert_eq!(metrics.flights_started(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panicking_handler_gives_every_caller_a_500_and_the_key_works_afterwards() {
    for version in VERSIONS {
        let (router, app) = app(HttpCoalesceLayer::new(key::idempotency_key()), 49);
        let url = format!("http://{}/api/clients", support::serve(router).await);
        let client = client(version);
        let headers = [("idempotency-key", "k")];

        app.panic.store(true, Ordering::SeqCst);
        let responses = join_all((0..50).map(|_| send(&client, &url, &headers))).await;
        assert_eq!(app.executions(), 1, "{version:?}");
        for res in &responses {
            assert_eq!(res.status, StatusCode::INTERNAL_SERVER_ERROR, "{version:?}");
        }

        app.panic.store(false, Ordering::SeqCst);
        let responses = join_all((0..50).map(|_| send(&client, &url, &headers))).await;
        assert_eq!(app.executions(), 2, "{version:?}");
        for res in &responses {
            assert_eq!(res.status, StatusCode::CREATED, "{version:?}");
            assert_eq!(res.body, responses[0].body);
        }
    }
}

/// A body of `len` bytes in chunks of `chunk`, streamed with a yield between chunks and
/// no length known up front.
fn streaming_body(len: usize, chunk: usize) -> Body {
    let chunks = (0..len.div_ceil(chunk)).map(move |i| {
        let start = i * chunk;
        let bytes: Vec<u8> = (start..(start + chunk).min(len)).map(|b| b as u8).collect();
        Ok::<_, std::io::Error>(Bytes::from(bytes))
    });
    let stream = futures::stream::iter(chunks).then(|chunk| async move {
        tokio::task::yield_now().await;
        chunk
    });
    Body::from_stream(stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_over_limit_body_goes_whole_to_the_leader_and_followers_get_503() {
    const LIMIT: usize = 64 * 1024;
    const LEN: usize = 5 * LIMIT + 123;
    let expected: Vec<u8> = (0..LEN).map(|b| b as u8).collect();

    // Streamed (the limit is found while reading) and sized (found from the length).
    for streamed in [true, false] {
        let layer = HttpCoalesceLayer::new(key::idempotency_key())
            .body_limit(LIMIT)
            .role_header(true);
        let state = App::new(layer.metrics(), 9);
        let router = Router::new()
            .route(
                "/big",
                post(move |State(app): State<App>| async move {
                    app.run().await;
                    if streamed {
                        streaming_body(LEN, 4096)
                    } else {
                        Body::from((0..LEN).map(|b| b as u8).collect::<Vec<u8>>())
                    }
                }),
            )
            .layer(layer)
            .with_state(state.clone());
        let url = format!("http://{}/big", support::serve(router).await);
        let client = client(Version::Http1);

        let responses =
            join_all((0..10).map(|_| send(&client, &url, &[("idempotency-key", "big")]))).await;
        let (leaders, followers): (Vec<_>, Vec<_>) = responses
            .into_iter()
            .partition(|r| r.headers["coalesce-role"] == "leader");

        assert_eq!(state.executions(), 1);
        assert_eq!(leaders.len(), 1);
        assert_eq!(leaders[0].status, StatusCode::OK);
        assert_eq!(leaders[0].body.len(), LEN, "streamed: {streamed}");
        assert!(leaders[0].body == expected, "the leader's body was altered");
        for follower in &followers {
            assert_eq!(follower.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(follower.headers["retry-after"], "1");
            assert_eq!(follower.headers["content-type"], "application/problem+json");
        }
        assert_eq!(state.metrics.bodies_over_limit(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unkeyed_requests_pass_through_without_a_role() {
    let layer = HttpCoalesceLayer::new(key::idempotency_key()).role_header(true);
    let router = Router::new()
        .route(
            "/echo",
            post(|headers: HeaderMap, body: Bytes| async move {
                (
                    StatusCode::ACCEPTED,
                    [("x-seen", headers.len().to_string())],
                    body,
                )
            }),
        )
        .layer(layer);
    let url = format!("http://{}/echo", support::serve(router).await);
    let res = client(Version::Http1)
        .post(&url)
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert!(res.headers().get("coalesce-role").is_none());
    assert_eq!(res.bytes().await.unwrap(), "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_key_on_two_routes_never_shares_a_response() {
    let layer = HttpCoalesceLayer::new(key::idempotency_key());
    let state = App::new(layer.metrics(), 1);
    let orders = Arc::new(AtomicUsize::new(0));
    let router = Router::new()
        .route("/api/clients", post(create_client))
        .route("/api/orders", {
            let orders = orders.clone();
            post(move || async move {
                orders.fetch_add(1, Ordering::SeqCst);
                "order"
            })
        })
        .layer(layer)
        .with_state(state.clone());
    let base = format!("http://{}", support::serve(router).await);
    let (clients_url, orders_url) = (format!("{base}/api/clients"), format!("{base}/api/orders"));
    let client = client(Version::Http1);
    let headers = [("idempotency-key", "same")];
    let (clients_a, clients_b, order) = tokio::join!(
        send(&client, &clients_url, &headers),
        send(&client, &clients_url, &headers),
        send(&client, &orders_url, &headers),
    );
    assert_eq!(state.executions(), 1);
    assert_eq!(orders.load(Ordering::SeqCst), 1);
    assert_eq!(clients_a.body, clients_b.body);
    assert_eq!(order.body, "order");
}

// ===== The service without a server: errors and trailers =====

mod service {
    use std::convert::Infallible;
    use std::error::Error as _;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use futures::future::join_all;
    use http::{HeaderMap, Request, Response};
    use http_body::Frame;
    use http_body_util::{BodyExt, Full, StreamBody};
    use tower::{ServiceExt, service_fn};
    use tower_coalesce::BoxError;
    use tower_coalesce::http::error::SharedError;
    use tower_coalesce::http::{HttpCoalesceLayer, Metrics, RequestBody, Role, key};

    use super::support::Gate;

    fn req() -> Request<Full<Bytes>> {
        Request::post("/x")
            .header("idempotency-key", "k")
            .body(Full::default())
            .unwrap()
    }

    /// Calls `svc` 50 times at once with one key, opens `gate` once all have joined one
    /// flight, and returns the results.
    async fn fan_in<S>(svc: S, gate: Gate, metrics: Metrics) -> Vec<Result<S::Response, S::Error>>
    where
        S: tower::Service<Request<Full<Bytes>>> + Clone + Send + 'static,
        S::Future: Send,
        S::Response: Send + 'static,
        S::Error: std::fmt::Debug + Send + 'static,
    {
        let handles: Vec<_> = (0..50)
            .map(|_| tokio::spawn(svc.clone().oneshot(req())))
            .collect();
        super::eventually("49 callers to join", || metrics.callers_joined() == 49).await;
        gate.open();
        let results = join_all(handles).await;
        results.into_iter().map(Result::unwrap).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_inner_box_error_reaches_every_caller_with_its_source() {
        let (gate, calls) = (Gate::closed(), Arc::new(AtomicUsize::new(0)));
        let layer = HttpCoalesceLayer::new(key::idempotency_key());
        let metrics = layer.metrics();
        let svc = tower::ServiceBuilder::new().layer(layer).service({
            let (gate, calls) = (gate.clone(), calls.clone());
            service_fn(move |_req: Request<RequestBody<Full<Bytes>>>| {
                let (gate, calls) = (gate.clone(), calls.clone());
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    gate.pass().await;
                    Err::<Response<Full<Bytes>>, BoxError>(Box::new(std::io::Error::other(
                        "db down",
                    )))
                }
            })
        });
        for result in fan_in(svc, gate, metrics).await {
            let error = result.unwrap_err();
            let shared = error.downcast_ref::<SharedError>().expect("a SharedError");
            assert_eq!(shared.to_string(), "db down");
            let source = shared.source().unwrap().downcast_ref::<std::io::Error>();
            assert_eq!(source.unwrap().kind(), std::io::ErrorKind::Other);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn trailers_and_a_failing_body_reach_every_caller() {
        for fail in [false, true] {
            let (gate, calls) = (Gate::closed(), Arc::new(AtomicUsize::new(0)));
            let inner = {
                let (gate, calls) = (gate.clone(), calls.clone());
                service_fn(move |_req: Request<RequestBody<Full<Bytes>>>| {
                    let (gate, calls) = (gate.clone(), calls.clone());
                    async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        gate.pass().await;
                        let mut trailers = HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        let last = if fail {
                            Err(std::io::Error::other("connection to upstream lost"))
                        } else {
                            Ok(Frame::trailers(trailers))
                        };
                        let frames = vec![
                            Ok(Frame::data(Bytes::from_static(b"part one, "))),
                            Ok(Frame::data(Bytes::from_static(b"part two"))),
                            last,
                        ];
                        let body = StreamBody::new(futures::stream::iter(frames));
                        Ok::<_, Infallible>(Response::new(body))
                    }
                })
            };
            let layer = HttpCoalesceLayer::new(key::idempotency_key());
            let metrics = layer.metrics();
            let svc = tower::ServiceBuilder::new().layer(layer).service(inner);
            let responses = fan_in(svc, gate, metrics).await;
            assert_eq!(calls.load(Ordering::SeqCst), 1);
            let mut leaders = 0;
            for response in responses {
                let response = response.unwrap();
                leaders += usize::from(response.extensions().get::<Role>() == Some(&Role::Leader));
                let mut body = response.into_body();
                let mut data = Vec::new();
                let mut end = None;
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(frame) => match frame.into_data() {
                            Ok(bytes) => data.extend_from_slice(&bytes),
                            Err(frame) => end = Some(Ok(frame.into_trailers().unwrap())),
                        },
                        Err(error) => end = Some(Err(error.to_string())),
                    }
                }
                assert_eq!(data, b"part one, part two");
                match end.expect("the body's end") {
                    Ok(trailers) => {
                        assert!(!fail);
                        assert_eq!(trailers["grpc-status"], "0");
                    }
                    Err(error) => {
                        assert!(fail);
                        assert_eq!(error, "connection to upstream lost");
                    }
                }
            }
            assert_eq!(leaders, 1);
        }
    }
}
