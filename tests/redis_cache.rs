//! The HTTP cache shared by several instances through a real `redis-server`: a miss runs
//! on one instance while the others wait for it, a stale entry is refreshed once between
//! them while every instance answers it stale, a varied entry reaches only its own
//! variant, and Redis going away never hangs a request.
//!
//! Each instance has its own service stack and its own Redis connection, in one test
//! process. The shared server comes from `REDIS_URL` (`.ci/run` starts one); the test that
//! stops its server starts one of its own.
#![cfg(all(feature = "redis", feature = "http-cache"))]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::get;
use futures::future::join_all;
use support::redis::{Server, free_port, prefix, redis_url};
use support::{Counter, Gate, eventually, header, serve};
use tower_coalesce::http::Metrics;
use tower_coalesce::http_cache::HttpCacheLayer;
use tower_coalesce::redis::RedisStore;

fn open_gate() -> Gate {
    let gate = Gate::closed();
    gate.open();
    gate
}

/// A report route: counts its runs and answers `run {n}` with `cache_control`, after
/// `delay`; runs after the first pass `gate` first.
fn report(runs: &Counter, gate: &Gate, cache_control: &'static str, delay: Duration) -> Router {
    let (runs, gate) = (runs.clone(), gate.clone());
    Router::new().route(
        "/api/report/{id}",
        get(move || {
            let (runs, gate) = (runs.clone(), gate.clone());
            async move {
                let n = runs.incr();
                if n > 0 {
                    gate.pass().await;
                }
                tokio::time::sleep(delay).await;
                ([("cache-control", cache_control)], format!("run {n}"))
            }
        }),
    )
}

struct Instance {
    addr: SocketAddr,
    metrics: Metrics,
}

async fn instance(store: RedisStore, app: Router) -> Instance {
    let cache = HttpCacheLayer::new().unscoped().store(store);
    let metrics = cache.metrics();
    let addr = serve(app.layer(cache)).await;
    Instance { addr, metrics }
}

/// Two instances on the shared Redis, under a prefix of their own.
async fn two_instances(app: Router) -> Option<[Instance; 2]> {
    let url = redis_url()?;
    let prefix = prefix();
    let mut instances = Vec::new();
    for _ in 0..2 {
        let store = RedisStore::connect(&url)
            .await
            .unwrap()
            .with_prefix(prefix.as_str())
            .with_poll_interval(Duration::from_millis(200));
        instances.push(instance(store, app.clone()).await);
    }
    Some(instances.try_into().ok().unwrap())
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// `per_instance` concurrent GETs of `path` on each instance: `Cache-Status` and body.
async fn fan_in(instances: &[Instance], path: &str, per_instance: usize) -> Vec<(String, String)> {
    let client = client();
    let calls = instances.iter().flat_map(|instance| {
        let url = format!("http://{}{path}", instance.addr);
        let client = client.clone();
        (0..per_instance).map(move |_| {
            let request = client.get(&url);
            async move {
                let res = request.send().await.unwrap();
                assert_eq!(res.status(), 200);
                let status = header(&res, "cache-status").unwrap_or_default();
                (status, res.text().await.unwrap())
            }
        })
    });
    join_all(calls).await
}

async fn fetch(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (String, String) {
    let mut request = client().get(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let res = request.send().await.unwrap();
    let status = header(&res, "cache-status").unwrap_or_default();
    (status, res.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_miss_runs_once_across_instances_and_then_hits_on_every_one() {
    let runs = Counter::default();
    let app = report(
        &runs,
        &open_gate(),
        "max-age=60",
        Duration::from_millis(300),
    );
    let Some(instances) = two_instances(app).await else {
        return;
    };

    let answers = fan_in(&instances, "/api/report/1", 100).await;
    assert_eq!(runs.get(), 1, "one run for 200 requests on two instances");
    assert!(
        answers.iter().all(|(_, body)| body == "run 0"),
        "{answers:?}"
    );
    let waited: u64 = instances
        .iter()
        .map(|i| i.metrics.flights_waiting_elsewhere())
        .sum();
    assert_eq!(
        waited, 1,
        "the other instance's flight waited for the lease"
    );

    for instance in &instances {
        let (status, body) = fetch(instance.addr, "/api/report/1", &[]).await;
        assert!(status.starts_with("tower-coalesce; hit"), "{status}");
        assert_eq!(body, "run 0");
    }
    // Another query is another request: never answered by this entry.
    let (status, body) = fetch(instances[1].addr, "/api/report/1?year=2025", &[]).await;
    assert!(status.contains("fwd=miss"), "{status}");
    assert_eq!(body, "run 1");
    assert_eq!(runs.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_entry_is_refreshed_once_across_instances_while_all_answer_stale() {
    let (runs, gate) = (Counter::default(), Gate::closed());
    // Fresh for 2 s: ages are whole seconds, and a refreshed entry must stay fresh while the
    // other instance's flight looks at it.
    let app = report(
        &runs,
        &gate,
        "max-age=2, stale-while-revalidate=60",
        Duration::ZERO,
    );
    let Some(instances) = two_instances(app).await else {
        return;
    };
    let path = "/api/report/2";
    assert_eq!(fetch(instances[0].addr, path, &[]).await.1, "run 0");
    tokio::time::sleep(Duration::from_millis(3100)).await;

    // The refresh is held until every stale answer is in: a caller that waited for it
    // would never be answered.
    let answers = fan_in(&instances, path, 100).await;
    for (status, body) in &answers {
        assert_eq!(body, "run 0");
        assert!(status.contains("stale-while-revalidate"), "{status}");
    }
    // Each instance started a refresh of its own; one of them runs, the other waits for it.
    for instance in &instances {
        eventually("each instance starts its refresh", || {
            instance.metrics.cache_refreshes() == 1
        })
        .await;
    }
    assert_eq!(runs.get(), 2, "one refresh between the two instances");

    gate.open();
    for instance in &instances {
        let addr = instance.addr;
        let mut refreshed = false;
        for _ in 0..100 {
            if fetch(addr, path, &[]).await.1 == "run 1" {
                refreshed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refreshed, "the refreshed entry reaches every instance");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        runs.get(),
        2,
        "the waiting instance found the refresh, ran none"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_entry_kept_by_another_instance_answers_only_its_own_variant() {
    let runs = Counter::default();
    let counted = runs.clone();
    let app = Router::new().route(
        "/greeting",
        get(move |headers: HeaderMap| {
            let runs = counted.clone();
            async move {
                runs.incr();
                let language = headers
                    .get("accept-language")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_owned();
                (
                    [("cache-control", "max-age=60"), ("vary", "accept-language")],
                    format!("greeting in {language}"),
                )
            }
        }),
    );
    let Some(instances) = two_instances(app).await else {
        return;
    };
    let en = [("accept-language", "en")];
    let fr = [("accept-language", "fr")];
    assert_eq!(
        fetch(instances[0].addr, "/greeting", &en).await.1,
        "greeting in en"
    );
    let (status, body) = fetch(instances[1].addr, "/greeting", &en).await;
    assert_eq!(body, "greeting in en");
    assert!(status.contains("; hit"), "{status}");
    let (status, body) = fetch(instances[1].addr, "/greeting", &fr).await;
    assert_eq!(body, "greeting in fr", "never the other language's entry");
    assert!(status.contains("fwd=vary-miss"), "{status}");
    assert_eq!(runs.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_going_away_answers_every_request_from_the_service_without_hanging() {
    let Some(server) = Server::start(free_port()) else {
        return;
    };
    let runs = Counter::default();
    let app = report(&runs, &open_gate(), "max-age=60", Duration::ZERO);
    let store = server.connect().await.with_prefix(prefix());
    let instance = instance(store, app).await;
    assert_eq!(fetch(instance.addr, "/api/report/3", &[]).await.1, "run 0");
    drop(server);

    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        fetch(instance.addr, "/api/report/4", &[]),
    )
    .await
    .expect("a request hung with Redis gone");
    assert_eq!(answer.1, "run 1");
    assert!(instance.metrics.store_errors() >= 1);
}
