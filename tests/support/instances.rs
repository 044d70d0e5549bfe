//! Instances of one app in one test process, each with its own service stack and its own
//! store: the route, a request and its answer, and a fan of concurrent requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing;
use axum::{Extension, Router};
use tower_coalesce::http::Metrics;
use tower_coalesce::idempotency::{IdempotencyLayer, OnStoreError};
use tower_coalesce::store::FencingToken;
use tower_coalesce::store::Store;

use super::{Counter, Gate};

/// The route of every instance, without its layer: the handler counts its runs, and passes
/// `gate` before it answers.
pub fn routes(runs: Counter, gate: Gate) -> Router {
    let handler = move || {
        let (runs, gate) = (runs.clone(), gate.clone());
        async move {
            let n = runs.incr() + 1;
            gate.pass().await;
            (
                StatusCode::CREATED,
                [("x-run", n.to_string())],
                format!("order created by run {n}"),
            )
        }
    };
    Router::new().route("/orders", routing::post(handler))
}

pub struct Instance {
    pub addr: SocketAddr,
    pub metrics: Metrics,
}

pub async fn instance<St: Store>(
    store: St,
    policy: OnStoreError,
    runs: &Counter,
    gate: &Gate,
) -> Instance {
    let layer = IdempotencyLayer::new().store(store).on_store_error(policy);
    let metrics = layer.metrics();
    let addr = super::serve(routes(runs.clone(), gate.clone()).layer(layer)).await;
    Instance { addr, metrics }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: StatusCode,
    pub run: Option<String>,
    pub replayed: bool,
    pub body: String,
}

pub async fn post(addr: SocketAddr, key: &str) -> Answer {
    post_body(addr, key, "2 apples").await
}

pub async fn post_body(addr: SocketAddr, key: &str, body: &str) -> Answer {
    post_to(addr, "/orders", key, body).await
}

/// A POST of `body` to `path` with the `Idempotency-Key` `key`.
pub async fn post_to(addr: SocketAddr, path: &str, key: &str, body: &str) -> Answer {
    let res = reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .header("idempotency-key", key)
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let run = super::header(&res, "x-run");
    let replayed = super::header(&res, "idempotent-replayed").is_some();
    Answer {
        status: res.status(),
        run,
        replayed,
        body: res.text().await.unwrap(),
    }
}

/// `n` concurrent posts of `key` to each instance, each on a task (and connection) of its own.
pub fn fire(instances: &[Instance], key: &str, n: usize) -> Vec<tokio::task::JoinHandle<Answer>> {
    instances
        .iter()
        .flat_map(|i| std::iter::repeat_n(i.addr, n))
        .map(|addr| {
            let key = key.to_owned();
            tokio::spawn(async move { post(addr, &key).await })
        })
        .collect()
}

pub fn sum(instances: &[Instance], count: impl Fn(&Metrics) -> u64) -> u64 {
    instances.iter().map(|i| count(&i.metrics)).sum()
}

/// 50 concurrent requests with `key` on each instance, held at `gate` until every caller is
/// in (49 joined per instance, and the other instances waiting on the one that runs it):
/// one run, the same answer for every caller, and the callers of every instance but the
/// running one answered by replays. The answers.
pub async fn one_run_for_fifty_callers_each(
    instances: &[Instance],
    runs: &Counter,
    gate: &Gate,
    key: &str,
) -> Vec<Answer> {
    let requests = fire(instances, key, 50);
    let n = instances.len() as u64;
    super::eventually("every caller joined its instance's flight", || {
        sum(instances, Metrics::callers_joined) == n * 49
            && sum(instances, Metrics::flights_waiting_elsewhere) == n - 1
    })
    .await;
    gate.open();
    let answers: Vec<Answer> = futures::future::join_all(requests)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();

    assert_eq!(runs.get(), 1, "runs across the instances");
    let first = &answers[0];
    assert_eq!(
        (first.status, first.run.as_deref()),
        (StatusCode::CREATED, Some("1"))
    );
    for answer in &answers {
        assert_eq!(
            (&answer.status, &answer.run, &answer.body),
            (&first.status, &first.run, &first.body)
        );
    }
    let replays = answers.iter().filter(|a| a.replayed).count();
    assert_eq!(replays as u64, (n - 1) * 50);
    assert_eq!(sum(instances, Metrics::flights_started), 1);
    answers
}

/// Each lease comes with the key's next fencing token, as a request extension: the run on
/// the instance that took over (`other`) has a higher token than the stalled run it
/// replaced (on `stalled`), and every token is at least the server's clock in microseconds
/// (so tokens survive a Redis that lost its counters; the test's clock is the server's).
/// Both stores share one Redis (or PostgreSQL), with leases and poll intervals (30 s)
/// longer than the test: the other instance takes over at once, woken by the release
/// message.
pub async fn assert_fencing_across_a_takeover<St: Store>(stalled: St, other: St) {
    // The handler records its token, then passes `gate`.
    let fences = Arc::new(std::sync::Mutex::new(Vec::<Option<u64>>::new()));
    let route = |gate: Gate| {
        let fences = fences.clone();
        Router::new().route(
            "/orders",
            routing::post(move |fence: Option<Extension<FencingToken>>| {
                let (fences, gate) = (fences.clone(), gate.clone());
                async move {
                    fences.lock().unwrap().push(fence.map(|f| f.0.get()));
                    gate.pass().await;
                    StatusCode::CREATED
                }
            }),
        )
    };
    let stalled_layer = IdempotencyLayer::new()
        .store(stalled)
        .finish_abandoned(false);
    let stalled = super::serve(route(Gate::closed()).layer(stalled_layer)).await;
    let open = Gate::closed();
    open.open();
    let layer = IdempotencyLayer::new().store(other);
    let metrics = layer.metrics();
    let other = super::serve(route(open).layer(layer)).await;

    let doomed = tokio::spawn(post(stalled, "order-9"));
    super::eventually("the first run starts", || fences.lock().unwrap().len() == 1).await;
    let waiting = tokio::spawn(post(other, "order-9"));
    super::eventually("the other instance waits on the lease", || {
        metrics.flights_waiting_elsewhere() == 1
    })
    .await;
    let dropped = std::time::Instant::now();
    doomed.abort();
    assert_eq!(waiting.await.unwrap().status, StatusCode::CREATED);
    // Woken by the release message: the lease and the poll interval are far longer.
    let takeover = dropped.elapsed();
    assert!(takeover < Duration::from_secs(10), "took {takeover:?}");
    assert_eq!(metrics.lease_takeovers(), 1, "a lease taken after waiting");
    assert_eq!(post(other, "order-10").await.status, StatusCode::CREATED);

    let fences = fences.lock().unwrap().clone();
    let tokens: Vec<u64> = fences.iter().map(|f| f.expect("a token per run")).collect();
    assert_eq!(tokens.len(), 3, "{fences:?}");
    assert!(
        tokens[1] > tokens[0],
        "the takeover's token is higher: {tokens:?}"
    );
    // Tokens are at least the server's clock in microseconds (so they survive a Redis
    // that lost its counters); this test's clock is the server's.
    let minute_ago = micros_since_1970() - 60_000_000;
    assert!(tokens.iter().all(|&t| t > minute_ago), "{tokens:?}");
}

/// The clock in microseconds since 1970, as fencing tokens count at least.
pub fn micros_since_1970() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    since.as_micros() as u64
}
