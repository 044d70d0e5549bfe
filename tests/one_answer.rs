//! One key, one answer, under the faults that broke it (issue 32), over real sockets, on
//! PostgreSQL and on Redis:
//!
//! - a leader stalled past its lease does not replace the answer of the instance that took
//!   the key over: its own caller gets that answer too, and so does every retry;
//! - a keep that fails for a moment (the store's connections reset) is retried while the
//!   lease holds, so the answer given is the one kept, and a retry elsewhere replays it
//!   instead of running the key again;
//! - the key's own request is not refused with `422` because a reuse of its key (another
//!   body) happened to be in flight.
#![cfg(all(feature = "idempotency", feature = "redis", feature = "postgres"))]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing;
use support::instances::post_to;
use support::proxy::Proxy;
use tower_coalesce::http::Metrics;
use tower_coalesce::idempotency::{IdempotencyLayer, OnStoreError};
use tower_coalesce::postgres::PostgresStore;
use tower_coalesce::redis::RedisStore;

/// The store every instance of a test shares.
#[derive(Clone)]
enum Backend {
    Postgres { url: String, table: String },
    Redis { url: String, prefix: String },
}

impl Backend {
    async fn postgres() -> Option<Backend> {
        let url = support::postgres::database_url()?;
        let table = support::postgres::table();
        let pool = support::postgres::pool(&url).await;
        let store = PostgresStore::builder().table(&table).build(pool).await;
        store.unwrap().migrate().await.unwrap();
        Some(Backend::Postgres { url, table })
    }

    fn redis() -> Option<Backend> {
        let url = support::redis::redis_url()?;
        let prefix = support::redis::prefix();
        Some(Backend::Redis { url, prefix })
    }

    /// The server's address, for a proxy in front of it.
    fn upstream(&self) -> SocketAddr {
        let url = match self {
            Backend::Postgres { url, .. } | Backend::Redis { url, .. } => url,
        };
        let host_port = url.rsplit('@').next().unwrap();
        let host_port = host_port.trim_start_matches("redis://");
        let host_port = host_port.split('/').next().unwrap();
        host_port.parse().unwrap()
    }

    /// The store's URL, through `via` (a proxy) if given.
    fn url(&self, via: Option<SocketAddr>) -> String {
        let url = match self {
            Backend::Postgres { url, .. } | Backend::Redis { url, .. } => url.clone(),
        };
        match via {
            Some(proxy) => url.replace(&self.upstream().to_string(), &proxy.to_string()),
            None => url,
        }
    }

    /// An instance's app: `/payments` under the idempotency layer on this store (through
    /// `via`), with `lease`, a poll of 100 ms, `timeout` on every store call, and `policy`.
    async fn app(
        &self,
        via: Option<SocketAddr>,
        lease: Duration,
        timeout: Duration,
        policy: OnStoreError,
        routes: Router,
    ) -> Router {
        self.app_with_metrics(via, lease, timeout, policy, routes)
            .await
            .0
    }

    /// [`app`](Self::app), and its layer's counters.
    async fn app_with_metrics(
        &self,
        via: Option<SocketAddr>,
        lease: Duration,
        timeout: Duration,
        policy: OnStoreError,
        routes: Router,
    ) -> (Router, Metrics) {
        let poll = Duration::from_millis(100);
        let layer = IdempotencyLayer::new().on_store_error(policy);
        match self {
            Backend::Postgres { table, .. } => {
                let url = self.url(via);
                let store = support::postgres::store_at(&url, table, timeout, lease).await;
                let layer = layer.store(store);
                let metrics = layer.metrics();
                (routes.layer(layer), metrics)
            }
            Backend::Redis { prefix, .. } => {
                let store = RedisStore::connect_with_timeout(&self.url(via), timeout)
                    .await
                    .unwrap()
                    .with_prefix(prefix.clone())
                    .with_lease(lease)
                    .with_poll_interval(poll);
                let layer = layer.store(store);
                let metrics = layer.metrics();
                (routes.layer(layer), metrics)
            }
        }
    }
}

/// What a run does before it answers, given its number (from 1), on the handler's thread.
type Hook = Arc<dyn Fn(usize) + Send + Sync>;

/// `POST /payments`: counts its runs in `runs` (shared by every instance), calls `hook`,
/// and answers `201 charged on {name}, run {n}, for {body}`.
fn routes(name: &'static str, runs: Arc<AtomicUsize>, hook: Hook) -> Router {
    let handler = move |body: Bytes| {
        let (runs, hook) = (runs.clone(), hook.clone());
        async move {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            hook(n);
            let body = String::from_utf8_lossy(&body).into_owned();
            (
                StatusCode::CREATED,
                format!("charged on {name}, run {n}, for {body}"),
            )
        }
    };
    Router::new().route("/payments", routing::post(handler))
}

fn no_hook() -> Hook {
    Arc::new(|_| {})
}

/// Instance A takes the key and stalls (its thread blocked) for 3 s, past its 1 s lease;
/// instance B's caller waits, B takes the key over and answers. When A wakes, its run
/// completes too, but what is kept is B's: A's caller gets B's answer, and so does every
/// retry, on either instance.
async fn stalled_leader(backend: Backend) {
    let lease = Duration::from_secs(1);
    let timeout = Duration::from_secs(1);
    let runs = Arc::new(AtomicUsize::new(0));
    let stall: Hook = Arc::new(|n| {
        if n == 1 {
            std::thread::sleep(Duration::from_secs(3));
        }
    });
    let a = {
        let (backend, runs) = (backend.clone(), runs.clone());
        support::instance_on_own_thread(move || {
            Box::pin(async move {
                let routes = routes("A", runs, stall);
                let policy = OnStoreError::FailClosed;
                backend.app(None, lease, timeout, policy, routes).await
            })
        })
    };
    let routes_b = routes("B", runs.clone(), no_hook());
    let b = support::serve(
        backend
            .app(None, lease, timeout, OnStoreError::FailClosed, routes_b)
            .await,
    )
    .await;

    let first = tokio::spawn(post_to(a, "/payments", "k-stall", "100 EUR"));
    // A holds the lease (its run started) before B's caller arrives.
    support::eventually("A's run started", || runs.load(Ordering::SeqCst) == 1).await;
    let second = post_to(b, "/payments", "k-stall", "100 EUR").await;
    let first = first.await.unwrap();
    assert_eq!(second.status, StatusCode::CREATED, "{second:?}");
    assert!(
        second.body.starts_with("charged on B, run 2"),
        "B took the key over: {second:?}"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "A's stall outlived its lease"
    );
    assert_eq!(
        first.body, second.body,
        "the stalled leader's caller got its own run's answer, not the one kept"
    );
    assert_eq!(first.status, StatusCode::CREATED);
    for addr in [a, b, a, b] {
        let retry = post_to(addr, "/payments", "k-stall", "100 EUR").await;
        assert_eq!(
            (retry.status, retry.replayed, &retry.body),
            (StatusCode::CREATED, true, &second.body),
            "a retry on {addr}"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_leader_does_not_replace_the_answer_of_the_instance_that_took_over_postgres() {
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    stalled_leader(backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_leader_does_not_replace_the_answer_of_the_instance_that_took_over_redis() {
    let Some(backend) = Backend::redis() else {
        return;
    };
    stalled_leader(backend).await;
}

/// Instance A, failing closed, whose store is behind a proxy, and whose every run starts
/// an outage of its store of `outage` (connections reset, new ones refused) before it
/// answers: its keep is what the outage meets. Its address, and the runs counter.
async fn cut_off_after_each_run(
    backend: &Backend,
    proxy: &Proxy,
    lease: Duration,
    outage: Duration,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let timeout = Duration::from_millis(250);
    let runs = Arc::new(AtomicUsize::new(0));
    let hook: Hook = {
        let proxy = proxy.handle();
        Arc::new(move |_| proxy.outage(outage))
    };
    let a = routes("A", runs.clone(), hook);
    let policy = OnStoreError::FailClosed;
    let a = backend.app(Some(proxy.addr), lease, timeout, policy, a);
    (support::serve(a.await).await, runs)
}

/// Instance A's run cuts it off from its store for 500 ms, so its first attempts to keep
/// the answer fail; the lease (1.5 s) outlasts the outage. The answer A gives must be the
/// one kept: a retry on instance B replays it, and the key ran once.
async fn keep_survives_a_short_outage(backend: Backend) {
    let lease = Duration::from_millis(1500);
    let proxy = Proxy::start(backend.upstream()).await;
    let outage = Duration::from_millis(500);
    let (a, runs) = cut_off_after_each_run(&backend, &proxy, lease, outage).await;
    let b = routes("B", runs.clone(), no_hook());
    let policy = OnStoreError::FailClosed;
    let timeout = Duration::from_millis(250);
    let b = support::serve(backend.app(None, lease, timeout, policy, b).await).await;

    let first = post_to(a, "/payments", "k-outage", "7 EUR").await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert_eq!(first.body, "charged on A, run 1, for 7 EUR");
    let retry = post_to(b, "/payments", "k-outage", "7 EUR").await;
    assert_eq!(
        (retry.status, retry.replayed, &retry.body),
        (StatusCode::CREATED, true, &first.body),
        "the answer A gave was not kept: the retry on B ran the key again"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keep_that_fails_for_a_moment_is_retried_while_the_lease_holds_postgres() {
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    keep_survives_a_short_outage(backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keep_that_fails_for_a_moment_is_retried_while_the_lease_holds_redis() {
    let Some(backend) = Backend::redis() else {
        return;
    };
    keep_survives_a_short_outage(backend).await;
}

/// The store is 150 ms away (a proxy's latency). The key's request is answered and kept;
/// then a reuse of the key with another body arrives, and while its flight looks the key
/// up, the key's own request is retried. The reuse gets `422`; the retry must get its
/// kept answer, not the reuse's `422`.
async fn the_owner_of_a_key_is_not_refused_for_a_reuse_in_flight(backend: Backend) {
    let proxy = Proxy::start(backend.upstream()).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let (lease, timeout) = (Duration::from_secs(5), Duration::from_secs(2));
    let app = routes("A", runs.clone(), no_hook());
    let policy = OnStoreError::FailClosed;
    let (a, metrics) = backend
        .app_with_metrics(Some(proxy.addr), lease, timeout, policy, app)
        .await;
    let a = support::serve(a).await;
    proxy.set_latency(Duration::from_millis(150));

    let first = post_to(a, "/payments", "k-owner", "5 EUR").await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let sent = proxy.sent();
    let reuse = tokio::spawn(post_to(a, "/payments", "k-owner", "500 EUR"));
    // The retry comes once the reuse's flight has sent its lookup, which takes 300 ms.
    support::eventually("the reuse's lookup sent", || proxy.sent() > sent).await;
    let retry = post_to(a, "/payments", "k-owner", "5 EUR").await;
    let reuse = reuse.await.unwrap();
    assert_eq!(reuse.status, StatusCode::UNPROCESSABLE_ENTITY, "{reuse:?}");
    assert_eq!(
        (retry.status, retry.replayed, &retry.body),
        (StatusCode::CREATED, true, &first.body),
        "the key's own request was refused for the reuse in flight"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // The race was met: the retry found the reuse's flight running and waited for it,
    // then led its own flight, which replayed.
    assert_eq!(metrics.mismatches_queued(), 1);
    assert_eq!(metrics.responses_replayed(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_owner_of_a_key_is_not_refused_for_a_reuse_in_flight_postgres() {
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    the_owner_of_a_key_is_not_refused_for_a_reuse_in_flight(backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_owner_of_a_key_is_not_refused_for_a_reuse_in_flight_redis() {
    let Some(backend) = Backend::redis() else {
        return;
    };
    the_owner_of_a_key_is_not_refused_for_a_reuse_in_flight(backend).await;
}

/// Like the short outage above, but the store stays out of reach (3 s) for longer than
/// the lease (1 s): the answer can't be kept, so under `FailClosed` A's caller gets a `503`
/// that says the request ran and its outcome was not recorded, never a `201` that no retry
/// would see.
async fn an_answer_that_cannot_be_kept_is_not_given(backend: Backend) {
    let proxy = Proxy::start(backend.upstream()).await;
    let (lease, outage) = (Duration::from_secs(1), Duration::from_secs(3));
    let (a, runs) = cut_off_after_each_run(&backend, &proxy, lease, outage).await;
    let answer = post_to(a, "/payments", "k-long-outage", "9 EUR").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{answer:?}");
    assert!(answer.body.contains("Outcome not recorded"), "{answer:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_that_cannot_be_kept_is_not_given_postgres() {
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    an_answer_that_cannot_be_kept_is_not_given(backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_that_cannot_be_kept_is_not_given_redis() {
    let Some(backend) = Backend::redis() else {
        return;
    };
    an_answer_that_cannot_be_kept_is_not_given(backend).await;
}
