//! Safe by default, under the layer orders users write, over real sockets: a layer below
//! that adds `Vary` (tower-http's compression) never turns one key into several runs at
//! once; a scope that finds no identity never widens sharing; the unscoped cache keeps a
//! response to an authorized request from other callers of its flight (RFC 9111 §3.5);
//! a retry during abandoned idempotent work joins it; safe methods pass through the
//! idempotency layer.
#![cfg(all(feature = "http-cache", feature = "idempotency"))]

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::Request;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::Barrier;
use tower_coalesce::http::{HttpCoalesceLayer, Metrics, OnMismatch, key};
use tower_coalesce::http_cache::HttpCacheLayer;
use tower_coalesce::idempotency::IdempotencyLayer;
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};

use support::{Counter, Runs, eventually, header};

/// A body long enough for tower-http's compression to compress it (over 32 bytes).
fn receipt(run: usize) -> String {
    format!(
        "payment run {run}: {}",
        "charged 10.00 EUR to card 4242; ".repeat(4)
    )
}

/// One answer of the server.
#[derive(Debug)]
struct Answer {
    /// What the caller sent: its `Accept-Encoding` (or `Authorization`), if any.
    sent: Option<String>,
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `n` requests at once (released together by a barrier, from `n` connections):
/// request `i` carries the header `name` with the value `value(i)`, if any.
async fn at_once(
    n: usize,
    request: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder + Send + Sync + 'static,
    name: &'static str,
    value: impl Fn(usize) -> Option<String>,
) -> Vec<Answer> {
    let barrier = Arc::new(Barrier::new(n));
    let request = Arc::new(request);
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let sent = value(i);
            let (barrier, request) = (barrier.clone(), request.clone());
            tokio::spawn(async move {
                // A client per caller: a connection each, no pooling between them.
                let client = reqwest::Client::new();
                let mut req = request(&client);
                if let Some(value) = &sent {
                    req = req.header(name, value.as_str());
                }
                barrier.wait().await;
                let res = req.send().await.expect("the server answers");
                let (status, headers) = (res.status(), res.headers().clone());
                let body = res.bytes().await.expect("a whole body");
                Answer {
                    sent,
                    status,
                    headers,
                    body,
                }
            })
        })
        .collect();
    let mut answers = Vec::with_capacity(n);
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

fn gzip_for_odd(i: usize) -> Option<String> {
    (i % 2 == 1).then(|| "gzip".to_owned())
}

// ===== 1. A layer below that adds `Vary` =====

/// `POST /payments` under compression *below* the layer that `add_layer` applies, whose
/// counters are `metrics`: the first run waits until the other nine callers have joined
/// it.
fn payments_compressed_below(
    runs: Runs,
    metrics: Metrics,
    add_layer: impl FnOnce(Router) -> Router,
) -> Router {
    let handler = move || {
        let (runs, metrics) = (runs.clone(), metrics.clone());
        async move {
            let n = runs.enter();
            if n == 1 {
                eventually("nine callers to join", || metrics.callers_joined() == 9).await;
            }
            runs.leave();
            (StatusCode::CREATED, receipt(n))
        }
    };
    let app = Router::new()
        .route("/payments", post(handler))
        .layer(CompressionLayer::new()); // below: it runs on each run's response
    add_layer(app)
}

/// 10 POSTs with one key, half of them `Accept-Encoding: gzip`: one run, whose variant
/// gets it; the other variant gets a `422` that names the header.
async fn ten_payments(app: Router, runs: &Runs) -> (Vec<Answer>, String) {
    let url = format!("http://{}/payments", support::serve(app).await);
    let answers = at_once(10, pay(url.clone()), "accept-encoding", gzip_for_odd).await;
    assert_eq!(runs.started.get(), 1, "one key ran more than once");
    let (created, refused): (Vec<_>, Vec<_>) = answers
        .iter()
        .partition(|a| a.status == StatusCode::CREATED);
    assert_eq!(created.len(), 5, "the leader's variant: {answers:?}");
    assert_eq!(refused.len(), 5, "the other variant: {answers:?}");
    for answer in &created {
        assert_eq!(
            answer.sent, created[0].sent,
            "a caller got another variant's response"
        );
    }
    for answer in &refused {
        assert_ne!(answer.sent, created[0].sent);
        assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            answer.text().contains("accept-encoding"),
            "the 422 names the varied header: {}",
            answer.text()
        );
    }
    (answers, url)
}

/// A `POST` of payment `pay-1` to `url`.
fn pay(url: String) -> impl Fn(&reqwest::Client) -> reqwest::RequestBuilder + Clone {
    move |client: &reqwest::Client| {
        client
            .post(&url)
            .header("idempotency-key", "pay-1")
            .body("amount=10")
    }
}

/// Under `OnMismatch::Reject` and nothing kept (no store, no replay), a `Vary` difference
/// is a `422` too, never a second run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_under_compression_below_runs_a_key_once_without_a_store() {
    let runs = Runs::default();
    let layer = HttpCoalesceLayer::new(key::idempotency_key()).on_mismatch(OnMismatch::Reject);
    let metrics = layer.metrics();
    let app = payments_compressed_below(runs.clone(), metrics.clone(), |app| app.layer(layer));
    ten_payments(app, &runs).await;
    assert_eq!(metrics.mismatches_rejected(), 5);
}

/// 10 POSTs with one key and one body, half of them `Accept-Encoding: gzip`: one payment,
/// the leader's variant gets it, the other variant gets a `422` that names the header
/// (never a second run), and a later retry of that variant is refused the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_under_compression_below_runs_a_key_once_and_names_the_varied_header() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new();
    let metrics = layer.metrics();
    let app = payments_compressed_below(runs.clone(), metrics.clone(), |app| app.layer(layer));
    let (answers, url) = ten_payments(app, &runs).await;
    let (created, refused): (Vec<_>, Vec<_>) = answers
        .iter()
        .partition(|a| a.status == StatusCode::CREATED);
    let leader_sent = &created[0].sent;
    let post = pay(url);
    assert_eq!(metrics.flights_started(), 1);

    // The retry of the other variant after the run: refused, not run, not replayed.
    let client = reqwest::Client::new();
    let mut retry = post(&client);
    if let Some(gzip) = refused[0].sent.as_deref() {
        retry = retry.header("accept-encoding", gzip);
    }
    let retry = retry.send().await.unwrap();
    assert_eq!(retry.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(retry.text().await.unwrap().contains("accept-encoding"));
    // And the leader's variant is replayed.
    let mut again = post(&client);
    if let Some(gzip) = leader_sent.as_deref() {
        again = again.header("accept-encoding", gzip);
    }
    let again = again.send().await.unwrap();
    assert_eq!(
        header(&again, "idempotent-replayed").as_deref(),
        Some("true")
    );
    assert_eq!(runs.started.get(), 1);
}

/// The order the docs give, compression *above* the idempotency layer: one run, and every
/// caller gets the same payment in its own encoding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_under_compression_above_shares_one_run_with_every_encoding() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new();
    let metrics = layer.metrics();
    let handler = {
        let (runs, metrics) = (runs.clone(), metrics.clone());
        move || {
            let (runs, metrics) = (runs.clone(), metrics.clone());
            async move {
                let n = runs.enter();
                eventually("nine callers to join", || metrics.callers_joined() == 9).await;
                runs.leave();
                (StatusCode::CREATED, receipt(n))
            }
        }
    };
    let app = Router::new()
        .route("/payments", post(handler))
        .layer(layer)
        .layer(CompressionLayer::new()); // above: it runs on each caller's copy
    let url = format!("http://{}/payments", support::serve(app).await);
    let post = move |client: &reqwest::Client| {
        client
            .post(&url)
            .header("idempotency-key", "pay-1")
            .body("amount=10")
    };
    let answers = at_once(10, post, "accept-encoding", gzip_for_odd).await;
    assert_eq!(runs.started.get(), 1);
    for answer in &answers {
        assert_eq!(answer.status, StatusCode::CREATED);
        let encoding = answer
            .headers
            .get("content-encoding")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(encoding, answer.sent, "each caller gets its own encoding");
    }
    let plain = answers.iter().find(|a| a.sent.is_none()).unwrap();
    assert_eq!(plain.text(), receipt(1));
}

/// 50 identical POSTs at once through the coalescing layer, with `below` applied under it;
/// request `i` sends the header `name` with `value(i)`. The first run waits for the 49
/// others to join it, the second for the 24 callers of the other variant to join it in
/// turn.
async fn fifty_posts_over(
    below: impl FnOnce(Router) -> Router,
    name: &'static str,
    value: fn(usize) -> Option<String>,
) -> (Runs, Vec<Answer>) {
    let runs = Runs::default();
    let layer = HttpCoalesceLayer::new(key::header("x-client-id"));
    let metrics = layer.metrics();
    let handler = {
        let (runs, metrics) = (runs.clone(), metrics.clone());
        move || {
            let (runs, metrics) = (runs.clone(), metrics.clone());
            async move {
                let n = runs.enter();
                let joined = match n {
                    1 => 49,
                    _ => 49 + 24,
                };
                eventually("the callers of this run to join", || {
                    metrics.callers_joined() >= joined
                })
                .await;
                runs.leave();
                (StatusCode::CREATED, receipt(n))
            }
        }
    };
    let app = below(Router::new().route("/api/clients", post(handler))).layer(layer);
    let url = format!("http://{}/api/clients", support::serve(app).await);
    let post = move |client: &reqwest::Client| {
        client
            .post(&url)
            .header("x-client-id", "c-1")
            .body(r#"{"name":"ACME"}"#)
    };
    let answers = at_once(50, post, name, value).await;
    (runs, answers)
}

/// One run per variant, one after the other, and every caller of a variant got that
/// variant's run, whose response header `name` is `own(sent)`.
fn assert_one_run_per_variant_in_turn(
    runs: &Runs,
    answers: &[Answer],
    name: &str,
    own: impl Fn(&Option<String>) -> Option<String>,
) {
    assert_eq!(runs.started.get(), 2, "one run per variant");
    assert_eq!(runs.most_at_once(), 1, "two runs of one key at once");
    let mut run_of_variant = HashMap::new();
    for answer in answers {
        assert_eq!(answer.status, StatusCode::CREATED);
        let got = answer
            .headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            got,
            own(&answer.sent),
            "a caller got another variant's response"
        );
        let run = answer.body.clone();
        assert_eq!(
            *run_of_variant
                .entry(answer.sent.clone())
                .or_insert(run.clone()),
            run
        );
    }
    assert_eq!(run_of_variant.len(), 2);
}

/// The coalescing layer under compression below: 50 identical POSTs, half gzip. One run
/// per variant, one after the other (never beside each other): 2 runs, not 26.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalescing_under_compression_below_runs_each_variant_once_and_in_turn() {
    let compress = |router: Router| router.layer(CompressionLayer::new());
    let (runs, answers) = fifty_posts_over(compress, "accept-encoding", gzip_for_odd).await;
    assert_one_run_per_variant_in_turn(&runs, &answers, "content-encoding", Clone::clone);
}

/// The same under CORS below (`Vary: origin`): two origins, two runs in turn, and each
/// caller gets the `Access-Control-Allow-Origin` of its own origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalescing_under_cors_below_runs_each_origin_once_and_in_turn() {
    let cors =
        |router: Router| router.layer(CorsLayer::new().allow_origin(AllowOrigin::mirror_request()));
    let origin = |i: usize| Some(["https://a.example", "https://b.example"][i % 2].to_owned());
    let (runs, answers) = fifty_posts_over(cors, "origin", origin).await;
    assert_one_run_per_variant_in_turn(
        &runs,
        &answers,
        "access-control-allow-origin",
        Clone::clone,
    );
}

// ===== 2. A scope that finds no identity =====

#[derive(Clone)]
struct UserId(String);

/// Authenticates by `x-api-key` and says who the caller is in an extension.
async fn auth(mut request: Request, next: Next) -> Response {
    let user = match request.headers().get("x-api-key").map(|v| v.as_bytes()) {
        Some(b"alice-key") => "alice",
        Some(b"bob-key") => "bob",
        _ => return StatusCode::UNAUTHORIZED.into_response(),
    };
    request.extensions_mut().insert(UserId(user.to_owned()));
    next.run(request).await
}

/// The first app's setup with the auth middleware in the wrong order: *inside* the
/// coalescing layer, so the scope runs before the extension is there.
fn auth_below(require_key: bool, runs: Runs) -> (Router, Metrics) {
    let layer = HttpCoalesceLayer::new(key::header("x-client-id"))
        .scope(|parts: &Parts| parts.extensions.get::<UserId>().map(|u| u.0.clone()))
        .require_key(require_key);
    let metrics = layer.metrics();
    let handler = {
        let (runs, metrics) = (runs.clone(), metrics.clone());
        move |axum::Extension(UserId(user)): axum::Extension<UserId>| {
            let (runs, metrics) = (runs.clone(), metrics.clone());
            async move {
                let n = runs.enter();
                // Both callers meet here: as a run each, or one run and one follower.
                eventually("both callers", || {
                    runs.started.get() + metrics.callers_joined() as usize >= 2
                })
                .await;
                runs.leave();
                format!("{user}'s client (run {n})")
            }
        }
    };
    let app = Router::new()
        .route("/api/clients", post(handler))
        .layer(middleware::from_fn(auth)) // TRAP: runs after the coalescing layer
        .layer(layer);
    (app, metrics)
}

fn alice_or_bob(i: usize) -> Option<String> {
    Some(["alice-key", "bob-key"][i % 2].to_owned())
}

/// Alice and Bob at once, same key and body, the scope finds no identity: never each
/// other's answer. Each runs on its own, and both are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_that_finds_no_identity_does_not_share() {
    let runs = Runs::default();
    let (app, metrics) = auth_below(false, runs.clone());
    let url = format!("http://{}/api/clients", support::serve(app).await);
    let post =
        move |client: &reqwest::Client| client.post(&url).header("x-client-id", "c-1").body("{}");
    let answers = at_once(2, post, "x-api-key", alice_or_bob).await;
    for answer in &answers {
        assert_eq!(answer.status, StatusCode::OK);
        let user = answer.sent.as_deref().unwrap().trim_end_matches("-key");
        assert!(
            answer.text().starts_with(&format!("{user}'s client")),
            "{user} got {}",
            answer.text()
        );
    }
    assert_eq!(runs.started.get(), 2);
    assert_eq!(metrics.callers_joined(), 0);
    assert_eq!(metrics.requests_without_identity(), 2);
}

/// The same under `require_key(true)`: refused with a `400` that says why, the handler
/// never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_key_refuses_a_request_the_scope_cannot_identify() {
    let runs = Runs::default();
    let (app, metrics) = auth_below(true, runs.clone());
    let url = format!("http://{}/api/clients", support::serve(app).await);
    let post =
        move |client: &reqwest::Client| client.post(&url).header("x-client-id", "c-1").body("{}");
    let answers = at_once(2, post, "x-api-key", alice_or_bob).await;
    for answer in &answers {
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        assert!(answer.text().contains("identity"), "{}", answer.text());
    }
    assert_eq!(runs.started.get(), 0);
    assert_eq!(metrics.requests_without_identity(), 2);
}

/// The cache with its default scope, in an app that authenticates by `x-api-key`: Bob
/// never gets Alice's cached report, one after the other or at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_scope_does_not_share_requests_with_a_credential_it_does_not_read() {
    let runs = Runs::default();
    let cache = HttpCacheLayer::new();
    let metrics = cache.metrics();
    let handler = {
        let runs = runs.clone();
        move |headers: HeaderMap| {
            let runs = runs.clone();
            async move {
                let n = runs.enter();
                tokio::time::sleep(Duration::from_millis(20)).await;
                runs.leave();
                let user = headers["x-api-key"].to_str().unwrap().to_owned();
                (
                    [("cache-control", "max-age=60")],
                    format!("report of {user} ({n})"),
                )
            }
        }
    };
    let app = Router::new().route("/report", get(handler)).layer(cache);
    let url = format!("http://{}/report", support::serve(app).await);
    let client = reqwest::Client::new();
    for user in ["alice-key", "bob-key", "alice-key"] {
        let res = client
            .get(&url)
            .header("x-api-key", user)
            .send()
            .await
            .unwrap();
        assert!(
            res.text()
                .await
                .unwrap()
                .starts_with(&format!("report of {user}"))
        );
    }
    let get = move |client: &reqwest::Client| client.get(&url);
    for answer in at_once(10, get, "x-api-key", alice_or_bob).await {
        let user = answer.sent.as_deref().unwrap();
        assert!(answer.text().starts_with(&format!("report of {user}")));
    }
    assert_eq!(metrics.requests_without_identity(), 13);
    assert_eq!(metrics.cache_hits(), 0);
}

// ===== 3. The unscoped cache and `Authorization` =====

/// `.unscoped()`, and a response without `public`, `s-maxage` or `must-revalidate`: alice
/// leads, and 59 callers join her flight, a third as alice, a third as bob, a third
/// anonymous. Every caller gets a response made for its own `Authorization` (or an
/// anonymous one, which holds nothing of anyone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unscoped_cache_never_shares_a_response_to_an_authorized_request_in_flight() {
    let runs = Runs::default();
    let cache = HttpCacheLayer::new().unscoped();
    let metrics = cache.metrics();
    let handler = {
        let (runs, metrics) = (runs.clone(), metrics.clone());
        move |headers: HeaderMap| {
            let (runs, metrics) = (runs.clone(), metrics.clone());
            async move {
                let n = runs.enter();
                if n == 1 {
                    eventually("59 callers to join", || metrics.callers_joined() >= 59).await;
                } else {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                runs.leave();
                let who = headers
                    .get("authorization")
                    .map_or("anonymous", |v| v.to_str().unwrap())
                    .to_owned();
                (
                    [("cache-control", "max-age=60")],
                    format!("report for {who}"),
                )
            }
        }
    };
    let app = Router::new().route("/report", get(handler)).layer(cache);
    let url = format!("http://{}/report", support::serve(app).await);
    let alice = {
        let url = url.clone();
        tokio::spawn(async move {
            let res = reqwest::Client::new()
                .get(&url)
                .header("authorization", "Bearer alice")
                .send()
                .await
                .unwrap();
            res.text().await.unwrap()
        })
    };
    runs.started.reach(1).await;
    let get = move |client: &reqwest::Client| client.get(&url);
    let who = |i: usize| match i % 3 {
        0 => Some("Bearer alice".to_owned()),
        1 => Some("Bearer bob".to_owned()),
        _ => None,
    };
    let answers = at_once(59, get, "authorization", who).await;
    assert_eq!(alice.await.unwrap(), "report for Bearer alice");
    let mut wrong = Vec::new();
    for answer in &answers {
        assert_eq!(answer.status, StatusCode::OK);
        let own = answer.sent.as_deref().unwrap_or("anonymous");
        let text = answer.text();
        // A response to an authorized request answers that user only, and an anonymous
        // one (not `public`) no request with `Authorization` (RFC 9111 §3.5 both ways).
        if text != format!("report for {own}") {
            wrong.push((own, text));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} callers got another's: {wrong:?}",
        wrong.len()
    );
    assert!(runs.started.get() <= 3, "one run per identity at most");
    assert_eq!(runs.most_at_once(), 1, "runs of one key at once");
}

// ===== 3b. The cache's followers get only what the cache would keep and serve them =====

/// 20 requests for a report whose user is named by the header `name` (one the default
/// scope doesn't know) or by `Authorization`, for the users `who` gives; the handler
/// answers with `response`, and its first run waits until the other 19 joined its flight.
/// With `first`, that user's request is sent alone and leads, then 19 at once; else 20 at
/// once. The answers that are not their own request's.
async fn per_user_race<L>(
    layer: L,
    metrics: Metrics,
    name: &'static str,
    response: &'static [(&'static str, &'static str)],
    first: Option<Option<&'static str>>,
    who: impl Fn(usize) -> Option<String>,
) -> (Vec<(String, String)>, Runs)
where
    L: tower::Layer<axum::routing::Route> + Clone + Send + Sync + 'static,
    L::Service:
        tower::Service<Request, Error = std::convert::Infallible> + Clone + Send + Sync + 'static,
    <L::Service as tower::Service<Request>>::Response: IntoResponse + 'static,
    <L::Service as tower::Service<Request>>::Future: Send + 'static,
{
    let runs = Runs::default();
    let handler = {
        let (runs, metrics) = (runs.clone(), metrics.clone());
        move |headers: HeaderMap| {
            let (runs, metrics) = (runs.clone(), metrics.clone());
            async move {
                if runs.enter() == 1 {
                    eventually("19 callers to join", || metrics.callers_joined() >= 19).await;
                }
                runs.leave();
                let user = headers
                    .get(name)
                    .map_or("anonymous", |v| v.to_str().unwrap())
                    .to_owned();
                let mut map = HeaderMap::new();
                for (n, v) in response {
                    map.append(*n, v.parse().unwrap());
                }
                (map, format!("report for {user}"))
            }
        }
    };
    let app = Router::new().route("/report", get(handler)).layer(layer);
    let url = format!("http://{}/report", support::serve(app).await);
    let mut answers = Vec::new();
    let leader = first.map(|user| {
        let (client, url) = (reqwest::Client::new(), url.clone());
        tokio::spawn(async move {
            let mut req = client.get(&url);
            if let Some(user) = user {
                req = req.header(name, user);
            }
            let res = req.send().await.unwrap();
            let (status, headers) = (res.status(), res.headers().clone());
            let body = res.bytes().await.unwrap();
            let sent = user.map(str::to_owned);
            Answer {
                sent,
                status,
                headers,
                body,
            }
        })
    });
    if leader.is_some() {
        runs.started.reach(1).await;
    }
    let n = if leader.is_some() { 19 } else { 20 };
    answers.extend(at_once(n, move |c| c.get(&url), name, who).await);
    if let Some(leader) = leader {
        answers.push(leader.await.unwrap());
    }
    let wrong = answers
        .iter()
        .filter_map(|answer| {
            let own = answer.sent.clone().unwrap_or_else(|| "anonymous".into());
            let text = answer.text();
            (text != format!("report for {own}")).then_some((own, text))
        })
        .collect();
    (wrong, runs)
}

fn two_customers(i: usize) -> Option<String> {
    Some(["customer-a", "customer-b"][i % 2].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flights_response_the_cache_would_not_keep_reaches_no_follower() {
    // The new user's case: the handler picks the user by a header the default scope
    // doesn't know, and answers without Cache-Control (fresh for nobody). Then `private`,
    // `no-store`, and `Vary` on that header: each follower gets its own user's report.
    let cases: [&'static [(&'static str, &'static str)]; 4] = [
        &[],
        &[("cache-control", "private, max-age=60")],
        &[("cache-control", "no-store")],
        &[("cache-control", "max-age=60"), ("vary", "x-customer-key")],
    ];
    for response in cases {
        let cache = HttpCacheLayer::new();
        let metrics = cache.metrics();
        let (wrong, runs) = per_user_race(
            cache,
            metrics,
            "x-customer-key",
            response,
            None,
            two_customers,
        )
        .await;
        assert!(
            wrong.is_empty(),
            "{response:?}: {} wrong: {wrong:?}",
            wrong.len()
        );
        assert!(runs.started.get() >= 2, "{response:?}: both users ran");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_whose_response_the_cache_would_not_keep_runs_its_next_requests_on_their_own() {
    // Hit-for-miss: after a response without freshness, requests of its key don't queue
    // behind one another's flights (each runs, none collapsed) until the window ends.
    let runs = Runs::default();
    let handler = {
        let runs = runs.clone();
        move || {
            let runs = runs.clone();
            async move {
                runs.enter();
                tokio::time::sleep(Duration::from_millis(100)).await;
                runs.leave();
                "no freshness"
            }
        }
    };
    let app = Router::new()
        .route("/report", get(handler))
        .layer(HttpCacheLayer::new().unscoped());
    let url = format!("http://{}/report", support::serve(app).await);
    reqwest::get(&url).await.unwrap();
    let answers = at_once(10, move |c| c.get(&url), "x-unused", |_| None).await;
    for answer in &answers {
        let status = answer.headers["cache-status"].to_str().unwrap();
        assert!(!status.contains("collapsed"), "{status}");
    }
    assert_eq!(runs.started.get(), 11);
    assert!(
        runs.most_at_once() > 1,
        "they ran side by side, not one after another"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_authorized_flights_response_reaches_no_anonymous_follower_and_back() {
    // Under `.unscoped()`, a response that doesn't say `public` (or `s-maxage`,
    // `must-revalidate`): made for Alice, it reaches no anonymous follower; made for an
    // anonymous leader, no follower that sends `Authorization`.
    for first in [Some("Bearer alice"), None] {
        let cache = HttpCacheLayer::new().unscoped();
        let metrics = cache.metrics();
        let response = &[("cache-control", "max-age=60")];
        let others = move |_| match first {
            Some(_) => None,
            None => Some("Bearer bob".to_owned()),
        };
        let (wrong, _) = per_user_race(
            cache,
            metrics,
            "authorization",
            response,
            Some(first),
            others,
        )
        .await;
        assert!(
            wrong.is_empty(),
            "{first:?} first: {} wrong: {wrong:?}",
            wrong.len()
        );
    }
}

// ===== 4. A retry during abandoned idempotent work =====

/// The client times out, the work goes on; the retry that arrives before it ends joins
/// it, and the one after is replayed: one payment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_during_abandoned_work_joins_it_instead_of_running_again() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new();
    let metrics = layer.metrics();
    let gate = support::Gate::closed();
    let handler = {
        let (runs, gate) = (runs.clone(), gate.clone());
        move || {
            let (runs, gate) = (runs.clone(), gate.clone());
            async move {
                let n = runs.enter();
                gate.pass().await;
                runs.leave();
                (StatusCode::CREATED, format!("payment run {n}"))
            }
        }
    };
    let app = Router::new().route("/payments", post(handler)).layer(layer);
    let url = format!("http://{}/payments", support::serve(app).await);
    let pay = |timeout: Option<Duration>| {
        let mut req = reqwest::Client::new()
            .post(&url)
            .header("idempotency-key", "pay-7")
            .body("amount=10");
        if let Some(timeout) = timeout {
            req = req.timeout(timeout);
        }
        req.send()
    };
    assert!(pay(Some(Duration::from_millis(100))).await.is_err());
    eventually("the server to see the client leave", || {
        metrics.callers_cancelled() == 1
    })
    .await;
    let retry = tokio::spawn(pay(None));
    eventually("the retry to join or run", || {
        metrics.callers_joined() == 1 || runs.started.get() == 2
    })
    .await;
    gate.open();
    let retry = retry.await.unwrap().unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(retry.text().await.unwrap(), "payment run 1");
    let later = pay(None).await.unwrap();
    assert_eq!(
        header(&later, "idempotent-replayed").as_deref(),
        Some("true")
    );
    assert_eq!(later.text().await.unwrap(), "payment run 1");
    assert_eq!(runs.started.get(), 1, "the key ran twice");
}

/// A small xorshift: repeatable "random" timeouts and run lengths.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// 1,000 callers over 100 keys, arriving over 300 ms, 30% of them giving up after
/// 5-40 ms while runs take 20-100 ms: every key runs exactly once, and every caller that
/// waited got that run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborting_callers_over_many_keys_never_run_a_key_twice() {
    let ran: Arc<std::sync::Mutex<HashMap<String, usize>>> = Arc::default();
    let layer = IdempotencyLayer::new();
    let metrics = layer.metrics();
    let handler = {
        let ran = ran.clone();
        move |headers: HeaderMap| {
            let ran = ran.clone();
            async move {
                let key = headers["idempotency-key"].to_str().unwrap().to_owned();
                let n = {
                    let mut ran = ran.lock().unwrap();
                    let n = ran.entry(key.clone()).or_default();
                    *n += 1;
                    *n
                };
                let millis = headers["x-run-ms"].to_str().unwrap().parse().unwrap();
                tokio::time::sleep(Duration::from_millis(millis)).await;
                (StatusCode::CREATED, format!("{key} run {n}"))
            }
        }
    };
    let app = Router::new().route("/payments", post(handler)).layer(layer);
    let url = format!("http://{}/payments", support::serve(app).await);
    let client = reqwest::Client::new();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let barrier = Arc::new(Barrier::new(1000));
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let key = format!("pay-{}", i % 100);
            let arrive = Duration::from_millis(rng.below(300));
            let run_ms = 20 + rng.below(80);
            let timeout = (rng.below(10) < 3).then(|| Duration::from_millis(5 + rng.below(35)));
            let req = client
                .post(&url)
                .header("idempotency-key", &key)
                .header("x-run-ms", run_ms.to_string())
                .body("amount=10");
            let req = match timeout {
                Some(timeout) => req.timeout(timeout),
                None => req,
            };
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                tokio::time::sleep(arrive).await;
                let answer = match req.send().await {
                    Ok(res) => res.text().await.ok(),
                    Err(_) => None,
                };
                (key, answer)
            })
        })
        .collect();
    let (mut answered, mut of_later_runs) = (0, 0);
    for task in tasks {
        let (key, answer) = task.await.unwrap();
        if let Some(answer) = answer {
            answered += 1;
            if answer != format!("{key} run 1") {
                of_later_runs += 1;
            }
        }
    }
    eventually("the abandoned runs to end", || {
        metrics.flights_in_flight() == 0
    })
    .await;
    let ran = ran.lock().unwrap();
    let twice: Vec<_> = ran.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{} keys ran more than once, {of_later_runs} callers got a later run: {twice:?}",
        twice.len()
    );
    assert_eq!(of_later_runs, 0);
    assert_eq!(ran.len(), 100);
    assert!(answered >= 600, "{answered} callers answered");
}

// ===== 5. Smaller defects =====

/// `IdempotencyLayer` on a whole router: `GET /health` and `OPTIONS` pass through
/// untouched; with `route_layer`, an unknown path is the router's `404`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_methods_pass_through_the_idempotency_layer() {
    let health = Counter::default();
    let app = |layer_on_routes: bool| {
        let health = health.clone();
        let router = Router::new()
            .route(
                "/health",
                get(move || {
                    health.incr();
                    async { "ok" }
                }),
            )
            .route(
                "/payments",
                post(|| async { (StatusCode::CREATED, "paid") }),
            );
        if layer_on_routes {
            router.route_layer(IdempotencyLayer::new())
        } else {
            router.layer(IdempotencyLayer::new())
        }
    };
    let client = reqwest::Client::new();
    let base = format!("http://{}", support::serve(app(false)).await);
    for _ in 0..2 {
        // With a key too: a GET is never replayed.
        let res = client
            .get(format!("{base}/health"))
            .header("idempotency-key", "k-1")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(header(&res, "idempotent-replayed"), None);
    }
    assert_eq!(health.get(), 2);
    let res = client.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let options = client
        .request(reqwest::Method::OPTIONS, format!("{base}/payments"))
        .send()
        .await
        .unwrap();
    assert_ne!(options.status(), StatusCode::BAD_REQUEST);
    assert_eq!(options.status(), StatusCode::METHOD_NOT_ALLOWED);
    let keyless = client
        .post(format!("{base}/payments"))
        .send()
        .await
        .unwrap();
    assert_eq!(keyless.status(), StatusCode::BAD_REQUEST);

    let base = format!("http://{}", support::serve(app(true)).await);
    let unknown = client.post(format!("{base}/nope")).send().await.unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let keyless = client
        .post(format!("{base}/payments"))
        .send()
        .await
        .unwrap();
    assert_eq!(keyless.status(), StatusCode::BAD_REQUEST);
}

/// `max-age=99999999999999999999` is valid grammar: the largest value, capped by
/// `max_ttl` (RFC 9111 §1.2.2), not 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_max_age_is_the_largest_not_zero() {
    let runs = Counter::default();
    let handler = {
        let runs = runs.clone();
        move || {
            runs.incr();
            async {
                (
                    [("cache-control", "max-age=99999999999999999999")],
                    "report",
                )
            }
        }
    };
    let app = Router::new()
        .route("/report", get(handler))
        .layer(HttpCacheLayer::new().unscoped());
    let url = format!("http://{}/report", support::serve(app).await);
    let client = reqwest::Client::new();
    let first = client.get(&url).send().await.unwrap();
    assert_eq!(first.text().await.unwrap(), "report");
    let second = client.get(&url).send().await.unwrap();
    let status = header(&second, "cache-status").unwrap();
    assert!(status.contains("; hit"), "{status}");
    // `ttl` is the freshness left: `max_ttl`, one day, not the 3e12 years asked for.
    let ttl: i64 = status.rsplit("ttl=").next().unwrap().parse().unwrap();
    assert!((86_000..=86_400).contains(&ttl), "{status}");
    assert_eq!(runs.get(), 1);
}

/// A key read from the JSON body, missing from it: the `400` speaks of the body, not of
/// an `Idempotency-Key` header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_body_key_is_explained_as_one() {
    let app = Router::new()
        .route("/api/clients", post(|| async { "created" }))
        .layer(HttpCoalesceLayer::new(key::json("/id")).require_key(true));
    let url = format!("http://{}/api/clients", support::serve(app).await);
    let res = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .body(r#"{"name":"ACME"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let text = res.text().await.unwrap();
    assert!(text.contains("body"), "{text}");
    assert!(!text.contains("Idempotency-Key"), "{text}");
}
