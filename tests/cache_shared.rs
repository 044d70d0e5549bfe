//! `single_flight::Cache` with a shared second level on a real `redis-server` of each
//! test's own: two instances (a cache and a connection each) run a key once between them,
//! read each other's values, and drop theirs when the other invalidates or refreshes one.
#![cfg(all(feature = "redis", feature = "http-cache"))]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::redis::{Server, free_port, prefix};
use support::{Counter, eventually};
use tokio::sync::Barrier;
use tower_coalesce::BoxError;
use tower_coalesce::single_flight::{Cache, CacheStatus, Codec, Lifetimes};

struct Utf8;

impl Codec<String> for Utf8 {
    fn encode(&self, value: &String) -> Vec<u8> {
        value.as_bytes().to_vec()
    }

    fn decode(&self, bytes: &[u8]) -> Result<String, BoxError> {
        Ok(String::from_utf8(bytes.to_vec())?)
    }
}

/// Two caches sharing a Redis of the test's own, fresh for `fresh`, refreshed early after
/// `eager` of it if given.
async fn two_caches(
    fresh: Duration,
    eager: Option<f64>,
) -> Option<(Server, [Cache<u32, String>; 2])> {
    let server = Server::start(free_port())?;
    let prefix = prefix();
    let mut caches = Vec::new();
    for _ in 0..2 {
        let store = server.connect().await.with_prefix(prefix.as_str());
        let mut builder = Cache::builder()
            .lifetimes(Lifetimes::fresh_for(fresh))
            .shared("reports", store, Utf8);
        if let Some(fraction) = eager {
            builder = builder.eager_refresh(fraction);
        }
        caches.push(builder.build());
    }
    Some((server, caches.try_into().ok().unwrap()))
}

fn work(runs: &Counter, delay: Duration) -> impl Future<Output = String> + use<> {
    let runs = runs.clone();
    async move {
        let n = runs.incr();
        tokio::time::sleep(delay).await;
        format!("v{n}")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Redis (redis-server; .ci/run installs it)"]
async fn two_instances_run_a_key_once_between_them_and_read_each_others_values() {
    let Some((_server, [a, b])) = two_caches(Duration::from_secs(60), None).await else {
        return;
    };
    let runs = Counter::default();
    // 20 callers on each instance at once, for a new key: one run in all.
    let start = Arc::new(Barrier::new(40));
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let (cache, start, runs) = (
                if i % 2 == 0 { a.clone() } else { b.clone() },
                start.clone(),
                runs.clone(),
            );
            tokio::spawn(async move {
                start.wait().await;
                cache
                    .get_with(1, || work(&runs, Duration::from_millis(200)))
                    .await
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), "v0");
    }
    assert_eq!(runs.get(), 1, "one run for two instances");

    // A value one instance kept answers the other, which runs nothing.
    assert_eq!(a.get_with(2, || work(&runs, Duration::ZERO)).await, "v1");
    let from_a = b.fetch(2, || async { panic!("kept by A") }).await;
    assert_eq!(from_a.into_result().unwrap(), "v1");
    let hit = b.fetch(2, || async { panic!("kept here now") }).await;
    assert_eq!(hit.status(), CacheStatus::Hit);
    assert_eq!(runs.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis (redis-server; .ci/run installs it)"]
async fn an_invalidation_or_a_refresh_on_one_instance_reaches_the_other_within_50_ms() {
    let fresh = Duration::from_secs(2);
    let Some((_server, [a, b])) = two_caches(fresh, Some(0.1)).await else {
        return;
    };
    let runs = Counter::default();
    assert_eq!(a.get_with(1, || work(&runs, Duration::ZERO)).await, "v0");
    assert_eq!(b.get_with(1, || work(&runs, Duration::ZERO)).await, "v0");
    tokio::time::sleep(Duration::from_millis(100)).await; // both listen by now

    a.invalidate(&1);
    let started = Instant::now();
    loop {
        let value = b.get_with(1, || work(&runs, Duration::ZERO)).await;
        if value != "v0" {
            assert_eq!(value, "v1", "B ran it anew");
            break;
        }
        assert!(started.elapsed() < Duration::from_millis(50), "B kept v0");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        a.get_with(1, || work(&runs, Duration::ZERO)).await,
        "v1",
        "A reads B's"
    );

    // Past a tenth of its freshness, a hit on A refreshes it; B drops its copy and reads A's.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.get_with(1, || work(&runs, Duration::ZERO)).await, "v1");
    eventually("A refreshed", || runs.get() == 3).await;
    let started = Instant::now();
    loop {
        let fetched = b.fetch(1, || async { panic!("A kept it") }).await;
        if fetched.result().as_ref().unwrap() == "v2" {
            break;
        }
        assert!(started.elapsed() < Duration::from_millis(50), "B kept v1");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(runs.get(), 3);
}
