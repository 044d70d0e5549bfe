//! The one HTTP engine over real sockets: requests with one key and different bodies are
//! never merged, keys read from JSON bodies, the fingerprint's query, oversized bodies
//! refused before they are read, abandoned idempotent work finished, and a keyed layer that
//! sees no keys says so.
#![cfg(feature = "idempotency")]

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{Method, StatusCode, Uri};
use axum::routing::post;
use futures::future::join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_coalesce::http::{HttpCoalesceLayer, Metrics, OnMismatch, key};
use tower_coalesce::idempotency::IdempotencyLayer;

use support::{Counter, DropFlag, Runs, eventually};

/// `/api/clients/c-1` (`POST`, `PUT` or `PATCH`) with the client id in a header; the
/// handler echoes the method, path, query and body it received.
/// The first run waits until every other caller has either joined it, queued behind it or
/// been refused, so that all requests overlap it; later runs take 50 ms.
fn echo_app(layer: HttpCoalesceLayer<key::HeaderKey>, runs: Runs, others: u64) -> Router {
    let metrics = layer.metrics();
    let handler = move |method: Method, uri: Uri, body: Bytes| {
        let (runs, metrics) = (runs.clone(), metrics.clone());
        async move {
            let n = runs.enter();
            if n == 1 {
                eventually("every caller to meet the first flight", || {
                    metrics.callers_joined()
                        + metrics.mismatches_queued()
                        + metrics.mismatches_rejected()
                        == others
                })
                .await;
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            runs.leave();
            let body = String::from_utf8_lossy(&body);
            format!("run {n} echoes {method} {uri} {body}")
        }
    };
    Router::new()
        .route(
            "/api/clients/c-1",
            post(handler.clone()).put(handler.clone()).patch(handler),
        )
        .layer(layer)
}

async fn post_body(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
    body: String,
) -> (StatusCode, String) {
    let mut req = client.post(url).body(body);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let res = req.send().await.unwrap();
    (res.status(), res.text().await.unwrap())
}

/// 4 bodies x 25 concurrent callers with one client id, against `echo_app`: each caller's
/// request (as the handler echoes it), status and answer.
async fn four_bodies_at_once(
    layer: HttpCoalesceLayer<key::HeaderKey>,
    runs: &Runs,
) -> Vec<(String, StatusCode, String)> {
    let bodies =
        ["A", "B", "C", "D"].map(|name| (Method::POST, "", format!("{{\"name\":\"{name}\"}}")));
    four_requests_at_once(layer, runs, bodies).await
}

/// 4 requests (method, query, body) x 25 concurrent callers with one client id, against
/// `echo_app`.
async fn four_requests_at_once(
    layer: HttpCoalesceLayer<key::HeaderKey>,
    runs: &Runs,
    requests: [(Method, &'static str, String); 4],
) -> Vec<(String, StatusCode, String)> {
    let app = echo_app(layer, runs.clone(), 99);
    let addr = support::serve(app).await;
    let client = reqwest::Client::new();
    let answers = join_all((0..100).map(|i| {
        let (method, query, body) = requests[i % 4].clone();
        let path = format!("/api/clients/c-1{query}");
        let (request, url) = (
            format!("{method} {path} {body}"),
            format!("http://{addr}{path}"),
        );
        let request_builder = client
            .request(method, url)
            .header("x-client-id", "c-1")
            .body(body);
        tokio::spawn(async move {
            let res = request_builder.send().await.unwrap();
            (request, res.status(), res.text().await.unwrap())
        })
    }))
    .await;
    answers.into_iter().map(Result::unwrap).collect()
}

/// 4 bodies x 25 concurrent callers, one key: each gets the answer to its own body, the
/// handler runs once per body and never twice at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_with_four_bodies_runs_each_body_once_in_turn_and_never_mixes_answers() {
    let runs = Runs::default();
    let layer = HttpCoalesceLayer::new(key::header("x-client-id"));
    let metrics = layer.metrics();
    let answers = four_bodies_at_once(layer, &runs).await;
    each_request_once_in_turn(answers, &runs, &metrics);
}

/// The same with one body and requests that differ only in their query or their method.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_with_other_queries_or_methods_runs_each_once_in_turn_and_never_mixes_answers() {
    let runs = Runs::default();
    let layer = HttpCoalesceLayer::new(key::header("x-client-id"));
    let metrics = layer.metrics();
    let body = || "{}".to_owned();
    let requests = [
        (Method::POST, "", body()),
        (Method::POST, "?page=2", body()),
        (Method::PUT, "", body()),
        (Method::PATCH, "?page=2", body()),
    ];
    let answers = four_requests_at_once(layer, &runs, requests).await;
    each_request_once_in_turn(answers, &runs, &metrics);
}

/// Every caller got the answer to its own request, each of the 4 ran once, one at a time.
fn each_request_once_in_turn(
    answers: Vec<(String, StatusCode, String)>,
    runs: &Runs,
    metrics: &Metrics,
) {
    let mut run_of_request = HashMap::new();
    for (request, status, text) in answers {
        assert_eq!(status, StatusCode::OK);
        let (run, echoed) = text.split_once(" echoes ").unwrap();
        assert_eq!(
            echoed, request,
            "a caller received the answer to another request"
        );
        // Every caller of one request got the answer of one run.
        assert_eq!(
            *run_of_request.entry(request).or_insert(run.to_owned()),
            run
        );
    }
    assert_eq!(runs.started.get(), 4, "one run per request");
    assert_eq!(runs.most_at_once(), 1, "two runs of one key at once");
    assert!(metrics.mismatches_queued() >= 75);
}

/// The same under `OnMismatch::Reject`: the first body runs once for its 25 callers, the 75
/// others get `422` at once, and nobody receives another body's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_reject_other_bodies_get_422_and_nobody_gets_another_bodys_answer() {
    let runs = Runs::default();
    let layer = HttpCoalesceLayer::new(key::header("x-client-id")).on_mismatch(OnMismatch::Reject);
    let metrics = layer.metrics();
    let answers = four_bodies_at_once(layer, &runs).await;
    let mut served = HashMap::<String, usize>::new();
    let mut rejected = 0;
    for (request, status, text) in answers {
        match status {
            StatusCode::OK => {
                assert_eq!(text.split_once(" echoes ").unwrap().1, request);
                *served.entry(request).or_default() += 1;
            }
            StatusCode::UNPROCESSABLE_ENTITY => {
                assert!(text.contains("\"status\":422"), "{text}");
                rejected += 1;
            }
            other => panic!("unexpected {other}: {text}"),
        }
    }
    assert_eq!(runs.started.get(), 1);
    assert_eq!(served.len(), 1, "only the first body ran: {served:?}");
    assert_eq!(served.values().sum::<usize>(), 25);
    assert_eq!(rejected, 75);
    assert_eq!(metrics.mismatches_rejected(), 75);
}

/// 200 concurrent `POST /api/clients` with the client id only in the JSON body, 5 rounds:
/// one run per round, and the handler still parses the whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_in_the_json_body_runs_once_per_round_and_the_handler_reads_the_whole_body() {
    let layer = HttpCoalesceLayer::new(key::json("/client/id"));
    let metrics = layer.metrics();
    let runs = Counter::default();
    let handler = {
        let (runs, metrics) = (runs.clone(), metrics.clone());
        move |axum::Json(client): axum::Json<serde_json::Value>| {
            let (runs, metrics) = (runs.clone(), metrics.clone());
            async move {
                let n = runs.incr() + 1;
                let target = 199 * n as u64;
                eventually("199 followers", || metrics.callers_joined() >= target).await;
                format!(
                    "run {n} created {} named {}",
                    client["client"]["id"], client["name"]
                )
            }
        }
    };
    let router = Router::new()
        .route("/api/clients", post(handler))
        .layer(layer);
    let url = format!("http://{}/api/clients", support::serve(router).await);
    let client = reqwest::Client::new();
    for round in 1..=5 {
        let body = format!(
            r#"{{"client":{{"id":"c-{round}"}},"name":"Ada","notes":"{}"}}"#,
            "x".repeat(2000)
        );
        let answers = join_all((0..200).map(|_| {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                post_body(&client, &url, &[("content-type", "application/json")], body).await
            })
        }))
        .await;
        for answer in answers {
            let (status, text) = answer.unwrap();
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                text,
                format!("run {round} created \"c-{round}\" named \"Ada\"")
            );
        }
        assert_eq!(runs.get(), round);
    }
    assert_eq!(metrics.requests_without_key(), 0);
}

fn idempotent_orders(layer: IdempotencyLayer) -> (Router, Counter) {
    let runs = Counter::default();
    let handler = {
        let runs = runs.clone();
        move |body: Bytes| async move {
            let n = runs.incr() + 1;
            (
                StatusCode::CREATED,
                format!("run {n}: {}", String::from_utf8_lossy(&body)),
            )
        }
    };
    (
        Router::new().route("/pay", post(handler)).layer(layer),
        runs,
    )
}

/// `POST /pay?amount=100` and then `?amount=200` with one key are two requests: the second
/// is refused, never answered with the first one's response.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_query_is_part_of_what_a_key_stands_for() {
    let (router, runs) = idempotent_orders(IdempotencyLayer::new());
    let addr = support::serve(router).await;
    let client = reqwest::Client::new();
    let key = [("idempotency-key", "pay-1")];
    let first = post_body(
        &client,
        &format!("http://{addr}/pay?amount=100"),
        &key,
        String::new(),
    )
    .await;
    assert_eq!(first.0, StatusCode::CREATED);
    let other = post_body(
        &client,
        &format!("http://{addr}/pay?amount=200"),
        &key,
        String::new(),
    )
    .await;
    assert_eq!(other.0, StatusCode::UNPROCESSABLE_ENTITY);
    let again = post_body(
        &client,
        &format!("http://{addr}/pay?amount=100"),
        &key,
        String::new(),
    )
    .await;
    assert_eq!(again, first, "the same request is replayed");
    assert_eq!(runs.get(), 1);
}

/// A body whose `Content-Length` is over the limit is refused before a byte of it is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_declared_oversize_body_gets_413_before_it_is_sent() {
    let (router, runs) = idempotent_orders(IdempotencyLayer::new().request_body_limit(1024));
    let addr = support::serve(router).await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"POST /pay HTTP/1.1\r\nhost: x\r\nidempotency-key: big\r\n\
              content-length: 10000000\r\n\r\n",
        )
        .await
        .unwrap();
    // No body follows: an answer can only come from the declared length.
    let mut head = vec![0; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut head))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert_eq!(runs.get(), 0);
}

/// A client that streams an oversize body without looking for an early answer (curl,
/// most upload code): it sends all of it, then reads. The `413` went out at once, and the
/// layer reads and drops the rest of the body, so the client's writes succeed and it
/// reads the `413` (a connection closed with the body unread is reset: a broken pipe or
/// a reset instead of the answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_still_sending_an_oversize_body_reads_its_413() {
    let (router, runs) = idempotent_orders(IdempotencyLayer::new().request_body_limit(1024));
    let addr = support::serve(router).await;
    for declared in [true, false] {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut read, mut write) = stream.into_split();
        let size = 8 << 20;
        let head = match declared {
            true => format!(
                "POST /pay HTTP/1.1\r\nhost: x\r\nidempotency-key: big\r\n\
                 content-length: {size}\r\n\r\n"
            ),
            false => "POST /pay HTTP/1.1\r\nhost: x\r\nidempotency-key: big\r\n\
                      transfer-encoding: chunked\r\n\r\n"
                .to_owned(),
        };
        write.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..size / chunk.len() {
            if declared {
                write
                    .write_all(&chunk)
                    .await
                    .expect("the whole body is taken");
            } else {
                write
                    .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .await
                    .unwrap();
                write
                    .write_all(&chunk)
                    .await
                    .expect("the whole body is taken");
                write.write_all(b"\r\n").await.unwrap();
            }
        }
        if !declared {
            write.write_all(b"0\r\n\r\n").await.unwrap();
        }
        let mut answer = Vec::new();
        let mut buf = vec![0; 4096];
        // The head and the problem body: read until the JSON closes.
        while !answer.ends_with(b"}") {
            let n = tokio::time::timeout(Duration::from_secs(10), read.read(&mut buf))
                .await
                .expect("answered")
                .expect("the answer, not a reset");
            assert!(
                n > 0,
                "closed before the answer: {:?}",
                String::from_utf8_lossy(&answer)
            );
            answer.extend_from_slice(&buf[..n]);
        }
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }
    assert_eq!(runs.get(), 0);
}

/// A streamed body (no declared length) is refused as soon as it crosses the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_streamed_oversize_body_gets_413() {
    let (router, runs) = idempotent_orders(IdempotencyLayer::new().request_body_limit(1024));
    let addr = support::serve(router).await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = b"POST /pay HTTP/1.1\r\nhost: x\r\nidempotency-key: streamed\r\n\
                        transfer-encoding: chunked\r\n\r\n"
        .to_vec();
    for _ in 0..4 {
        request.extend_from_slice(b"200\r\n");
        request.extend_from_slice(&[b'x'; 512]);
        request.extend_from_slice(b"\r\n");
    }
    // 2 KiB sent, no last chunk: the limit, not the end of the body, must end the read.
    stream.write_all(&request).await.unwrap();
    let mut head = vec![0; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut head))
        .await
        .expect("answered once the limit was crossed")
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert_eq!(runs.get(), 0);
}

/// A slow create whose client gave up: under the idempotency preset it runs to the end, its
/// response is kept, and the retry is replayed instead of running a half-done create again.
/// Under the plain coalescing layer the abandoned work is dropped where it stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abandoned_idempotent_work_completes_and_the_retry_is_replayed() {
    for finish in [true, false] {
        let (started, completed, dropped) =
            (Counter::default(), Counter::default(), Counter::default());
        let handler = {
            let (started, completed, dropped) =
                (started.clone(), completed.clone(), dropped.clone());
            move || {
                let (started, completed, dropped) =
                    (started.clone(), completed.clone(), dropped.clone());
                async move {
                    let flag = DropFlag(dropped);
                    let n = started.incr() + 1;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    completed.incr();
                    std::mem::forget(flag);
                    (StatusCode::CREATED, format!("order {n}"))
                }
            }
        };
        let layer = IdempotencyLayer::new().finish_abandoned(finish);
        let router = Router::new().route("/orders", post(handler)).layer(layer);
        let addr = support::serve(router).await;
        let send = |timeout: Duration| {
            reqwest::Client::new()
                .post(format!("http://{addr}/orders"))
                .header("idempotency-key", "slow-1")
                .timeout(timeout)
                .send()
        };
        assert!(
            send(Duration::from_millis(50)).await.is_err(),
            "the client gave up"
        );
        if finish {
            completed.reach(1).await;
            let retry = send(Duration::from_secs(5)).await.unwrap();
            assert_eq!(retry.status(), StatusCode::CREATED);
            assert_eq!(
                support::header(&retry, "idempotent-replayed").as_deref(),
                Some("true")
            );
            assert_eq!(retry.text().await.unwrap(), "order 1");
            assert_eq!(started.get(), 1);
        } else {
            dropped.reach(1).await;
            assert_eq!(completed.get(), 0, "the abandoned work was dropped");
            let retry = send(Duration::from_secs(5)).await.unwrap();
            assert_eq!(retry.text().await.unwrap(), "order 2");
        }
    }
}

/// tower-http's `TimeoutLayer` above the layer, in one `ServiceBuilder`: it needs the
/// response body to be `Default`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timeout_layer_sits_above_the_layer_in_one_service_builder() {
    let router = Router::new()
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "too late"
            }),
        )
        .layer(
            tower::ServiceBuilder::new()
                .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    Duration::from_millis(100),
                ))
                .layer(HttpCoalesceLayer::new(key::idempotency_key())),
        );
    let addr = support::serve(router).await;
    let res = reqwest::Client::new()
        .post(format!("http://{addr}/slow"))
        .header("idempotency-key", "k")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
}

/// A layer keyed by an extension that the auth layer inserts, with the auth layer in the
/// wrong place (inside): every request comes without a key. The layer counts them, passes
/// them through, and under `require_key` refuses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_that_is_never_there_is_counted_and_refused_under_require_key() {
    #[derive(Clone)]
    struct UserId(String);
    let by_user =
        |parts: &http::request::Parts| parts.extensions.get::<UserId>().map(|u| u.0.clone());
    for require in [false, true] {
        let layer = HttpCoalesceLayer::new(by_user).require_key(require);
        let metrics: Metrics = layer.metrics();
        let router = Router::new()
            .route("/me", post(|| async { "ok" }))
            // axum applies `.layer` calls outside-in: this coalescing layer runs first, before
            // the auth layer below has put the user id in.
            .layer(axum::middleware::from_fn(
                |mut req: axum::extract::Request, next: axum::middleware::Next| async move {
                    req.extensions_mut().insert(UserId("u-1".into()));
                    next.run(req).await
                },
            ))
            .layer(layer);
        let addr: SocketAddr = support::serve(router).await;
        let client = reqwest::Client::new();
        for _ in 0..3 {
            let res = client
                .post(format!("http://{addr}/me"))
                .send()
                .await
                .unwrap();
            let expected = if require {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::OK
            };
            assert_eq!(res.status(), expected);
        }
        assert_eq!(metrics.requests_without_key(), 3);
        assert_eq!(
            metrics.requests_refused_without_key(),
            if require { 3 } else { 0 }
        );
    }
}

/// The README's `nest` trap: a layer on the outer router sees the full path, so a path
/// parameter pattern must include the nest's prefix; without it, every request lacks a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn path_params_under_nest_need_the_prefix_in_the_pattern() {
    for (pattern, expected) in [
        ("/api/clients/{id}", StatusCode::OK),
        ("/clients/{id}", StatusCode::BAD_REQUEST),
    ] {
        let layer = HttpCoalesceLayer::new(key::path_param(pattern, "id")).require_key(true);
        let metrics = layer.metrics();
        let router = Router::new()
            .nest(
                "/api",
                Router::new().route("/clients/{id}", axum::routing::put(|| async { "updated" })),
            )
            .layer(layer);
        let addr = support::serve(router).await;
        let res = reqwest::Client::new()
            .put(format!("http://{addr}/api/clients/c-1"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), expected, "pattern {pattern}");
        assert_eq!(
            metrics.requests_without_key(),
            u64::from(expected != StatusCode::OK)
        );
    }
}

/// A handler whose response varies on `Accept-Encoding`, as one under a compression layer
/// placed below the coalescing layer does; it answers with what it was asked.
fn negotiated(
    layer_runs: Runs,
    metrics: Metrics,
    joined: &'static [u64],
) -> impl Clone
+ Fn(
    axum::http::HeaderMap,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = axum::response::Response> + Send>> {
    move |headers: axum::http::HeaderMap| {
        let (runs, metrics) = (layer_runs.clone(), metrics.clone());
        Box::pin(async move {
            let n = runs.enter();
            // Run n waits until `joined[n - 1]` callers have joined runs so far.
            if let Some(&joined) = joined.get(n - 1) {
                eventually("every follower joined", || {
                    metrics.callers_joined() >= joined
                })
                .await;
            }
            runs.leave();
            let asked = headers
                .get("accept-encoding")
                .map_or("none", |v| v.to_str().unwrap())
                .to_owned();
            axum::response::IntoResponse::into_response((
                [("vary", "accept-encoding")],
                format!("encoded for {asked}"),
            ))
        })
    }
}

/// 20 concurrent callers with one key and body, half accepting gzip and half identity: the
/// response varies on `Accept-Encoding`, so only callers that asked what the leader asked
/// share it; the others wait, and share one run of their own after it. Nobody gets
/// another's encoding.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_response_that_varies_is_shared_only_with_callers_that_sent_the_same_header() {
    let runs = Runs::default();
    let layer = HttpCoalesceLayer::new(key::header("x-client-id"));
    // The first run waits for the 19 others, the second for the 9 of the other variant.
    let handler = negotiated(runs.clone(), layer.metrics(), &[19, 19 + 9]);
    let router = Router::new().route("/report", post(handler)).layer(layer);
    let url = format!("http://{}/report", support::serve(router).await);
    let client = reqwest::Client::new();
    let answers = join_all((0..20).map(|i| {
        let (client, url) = (client.clone(), url.clone());
        let encoding = if i % 2 == 0 { "gzip" } else { "identity" };
        tokio::spawn(async move {
            let headers = [("x-client-id", "c-1"), ("accept-encoding", encoding)];
            (
                encoding,
                post_body(&client, &url, &headers, "{}".into()).await,
            )
        })
    }))
    .await;
    for answer in answers {
        let (encoding, (status, text)) = answer.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(text, format!("encoded for {encoding}"));
    }
    // The leader's run, and one for the 10 callers that asked otherwise, after it.
    assert_eq!(runs.started.get(), 2);
    assert_eq!(runs.most_at_once(), 1);
}

/// The same for replay: a kept response that varies on `Accept-Encoding` is replayed only to
/// a retry that sends the same `Accept-Encoding`; another retry with the key is refused with
/// `422` under the idempotency preset, never given the other encoding.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kept_response_that_varies_is_replayed_only_to_the_same_header() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new();
    let handler = negotiated(runs.clone(), layer.metrics(), &[]);
    let router = Router::new().route("/report", post(handler)).layer(layer);
    let url = format!("http://{}/report", support::serve(router).await);
    let client = reqwest::Client::new();
    let send = |encoding: &'static str| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let headers = [("idempotency-key", "r-1"), ("accept-encoding", encoding)];
            post_body(&client, &url, &headers, "{}".into()).await
        }
    };
    assert_eq!(
        send("gzip").await,
        (StatusCode::OK, "encoded for gzip".into())
    );
    let other = send("identity").await;
    assert_eq!(other.0, StatusCode::UNPROCESSABLE_ENTITY, "{}", other.1);
    assert_eq!(
        send("gzip").await,
        (StatusCode::OK, "encoded for gzip".into())
    );
    assert_eq!(runs.started.get(), 1);
}
