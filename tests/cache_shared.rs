//! `single_flight::Cache` with a shared second level on a real `redis-server` of each
//! test's own: two instances (a cache and a connection each) run a key once between them,
//! read each other's values, and drop theirs when the other invalidates or refreshes one.
#![cfg(all(feature = "redis", feature = "http-cache"))]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::redis::{Server, free_port, kill_connections, prefix, subscribed};
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

/// Two caches sharing a Redis of the test's own, with `lifetimes`, refreshed early after
/// `eager` of their freshness if given; and the channel of their changes.
async fn two_caches<E: Clone + Send + Sync + 'static>(
    lifetimes: Lifetimes,
    eager: Option<f64>,
) -> Option<(Server, String, [Cache<u32, String, E>; 2])> {
    let server = Server::start(free_port())?;
    let prefix = prefix();
    let mut caches = Vec::new();
    for _ in 0..2 {
        let store = server.connect().await.with_prefix(prefix.as_str());
        let mut builder = Cache::builder()
            .lifetimes(lifetimes)
            .shared("reports", store, Utf8);
        if let Some(fraction) = eager {
            builder = builder.eager_refresh(fraction);
        }
        caches.push(builder.build());
    }
    let changes = format!("{prefix}changes");
    Some((server, changes, caches.try_into().ok().unwrap()))
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
async fn two_instances_run_a_key_once_between_them_and_read_each_others_values() {
    let Some((_server, _, [a, b])) =
        two_caches(Lifetimes::fresh_for(Duration::from_secs(60)), None).await
    else {
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
    // Kept here now. (A's announcement of its value may reach B during B's read: B, unable
    // to tell whether it read the value before or after that change, doesn't keep it, and
    // reads it again.)
    let mut fetched = b.fetch(2, || async { panic!("kept by A") }).await;
    for _ in 0..2 {
        if fetched.status() == CacheStatus::Hit {
            break;
        }
        fetched = b.fetch(2, || async { panic!("kept by A") }).await;
    }
    assert_eq!(fetched.status(), CacheStatus::Hit);
    assert_eq!(fetched.into_result().unwrap(), "v1");
    assert_eq!(runs.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_or_a_refresh_on_one_instance_reaches_the_other_within_50_ms() {
    let fresh = Lifetimes::fresh_for(Duration::from_secs(2));
    let Some((server, changes, [a, b])) = two_caches(fresh, Some(0.1)).await else {
        return;
    };
    let runs = Counter::default();
    assert_eq!(a.get_with(1, || work(&runs, Duration::ZERO)).await, "v0");
    assert_eq!(b.get_with(1, || work(&runs, Duration::ZERO)).await, "v0");
    // Each listens from its first fetch on, by a task of its own.
    subscribed(&[server.url()], &changes, 2).await;

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
    // (B's announcement of v1 may reach A after A read v1 and drop A's copy: A's next
    // fetch then reads it from the store again, a miss, and the one after is the hit.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..2 {
        let refresh = work(&runs, Duration::ZERO);
        let fetched = a.fetch(1, || async { Ok(refresh.await) }).await;
        assert_eq!(fetched.result().as_ref().unwrap(), "v1");
        if fetched.status() == CacheStatus::Hit {
            break;
        }
    }
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

/// A loss of messages drops every value (moka evicts them lazily, later); a value kept again
/// meanwhile still hears of the changes that name it. (The late eviction of the old value
/// made the cache forget the new one's store key: changes to it were missed, and the value
/// served until it expired.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_kept_again_after_a_loss_still_hears_of_its_changes() {
    let Some((server, changes, [a, b])) =
        two_caches(Lifetimes::fresh_for(Duration::from_secs(60)), None).await
    else {
        return;
    };
    let runs = Counter::default();
    for round in 0..5 {
        let key = round;
        let first = format!("v{}", runs.get());
        assert_eq!(a.get_with(key, || work(&runs, Duration::ZERO)).await, first);
        assert_eq!(b.get_with(key, || work(&runs, Duration::ZERO)).await, first);
        subscribed(&[server.url()], &changes, 2).await;

        // The connections drop: each reconnects, subscribes again and drops every value.
        kill_connections(&server).await;
        subscribed(&[server.url()], &changes, 2).await;
        let started = Instant::now();
        loop {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "B never held the value again"
            );
            let fetched = b.fetch(key, || async { panic!("A kept it") }).await;
            assert_eq!(fetched.into_result().unwrap(), first);
            if b.fetch(key, || async { panic!("kept here") })
                .await
                .status()
                != CacheStatus::Hit
            {
                continue;
            }
            // B holds the value it read again; a dropped copy of it is evicted meanwhile.
            if started.elapsed() > Duration::from_millis(100) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for _ in 0..200 {
            let hit = b.fetch(key, || async { panic!("kept here") }).await;
            assert_eq!(hit.status(), CacheStatus::Hit);
        }

        a.invalidate(&key);
        let started = Instant::now();
        loop {
            let value = b.get_with(key, || work(&runs, Duration::ZERO)).await;
            if value != first {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_millis(50),
                "round {round}: B kept {first}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// A value kept as a fallback for errors still hears of its changes after a flight for it
/// failed: the flight's filing under the store key goes, the value's stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_fallback_still_hears_of_its_changes_after_a_failed_refresh() {
    let lifetimes = Lifetimes {
        fresh: Duration::from_millis(300),
        stale_if_error: Duration::from_secs(60),
        ..Lifetimes::default()
    };
    let Some((server, changes, [a, b])) = two_caches::<String>(lifetimes, None).await else {
        return;
    };
    let ok = |value: &str| {
        let value = value.to_owned();
        || async move { Ok::<_, String>(value) }
    };
    let down = || async { Err::<String, _>("down".to_owned()) };
    // Each subscribes on its first fetch; its subscription's confirmation drops what it
    // holds (changes may have been missed): B's copy of key 0 is gone once it came.
    for cache in [&a, &b] {
        cache.try_get_with(0, ok("warm-up")).await.unwrap();
    }
    subscribed(&[server.url()], &changes, 2).await;
    eventually_async("B's subscription confirmed", || async {
        b.fetch(0, ok("warm-up")).await.status() != CacheStatus::Hit
    })
    .await;

    assert_eq!(a.try_get_with(1, ok("v0")).await.unwrap(), "v0");
    // B reads A's value, and keeps it (unless A's announcement of it came during the read).
    eventually_async("B holds A's value", || async {
        let fetched = b.fetch(1, ok("not run")).await;
        fetched.status() == CacheStatus::Hit && fetched.into_result().unwrap() == "v0"
    })
    .await;

    // Stale now: B's refresh fails, and B answers its stale value instead.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let fetched = b.fetch(1, down).await;
    assert_eq!(fetched.status(), CacheStatus::Stale);
    assert_eq!(fetched.into_result().unwrap(), "v0");

    // A drops the value: within 50 ms B's fallback goes too, so B's errors are errors
    // again. (Nothing asks B meanwhile: a fetch's flight would file the key anew.)
    a.invalidate(&1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fetched = b.fetch(1, down).await;
    assert_eq!(
        fetched.into_result(),
        Err("down".to_owned()),
        "B kept its stale copy past the change"
    );
}

/// Waits (for at most 10 s) until `condition` holds.
async fn eventually_async<F: Future<Output = bool>>(what: &str, condition: impl Fn() -> F) {
    let started = Instant::now();
    while !condition().await {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
