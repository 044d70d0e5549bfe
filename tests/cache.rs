//! `single_flight::Cache`: one run per miss under real races, hits that run nothing,
//! stale-while-revalidate with exactly one refresh, stale-if-error within its bound, errors
//! cached only when asked, and invalidation that beats a running flight. Lifetimes are
//! tested on tokio's paused clock.
#![cfg(feature = "cache")]

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::Barrier;
use tower_coalesce::single_flight::{Cache, CacheStatus, Lifetimes};

use support::{Counter, Gate, eventually};

const CALLERS: usize = 500;

fn lifetimes(fresh: u64, swr: u64, sie: u64) -> Lifetimes {
    Lifetimes {
        fresh: Duration::from_secs(fresh),
        stale_while_revalidate: Duration::from_secs(swr),
        stale_if_error: Duration::from_secs(sie),
    }
}

/// `CALLERS` tasks call `fetch` on `key` at once; the work counts its runs and waits for
/// `gate`. Returns the statuses and values once `gate` is opened.
async fn fan_in(
    cache: &Cache<u32, String>,
    key: u32,
    runs: &Counter,
    gate: &Gate,
) -> Vec<(CacheStatus, String)> {
    let start = Arc::new(Barrier::new(CALLERS));
    let handles: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (cache, start, runs, gate) =
                (cache.clone(), start.clone(), runs.clone(), gate.clone());
            tokio::spawn(async move {
                start.wait().await;
                let fetched = cache
                    .fetch(key, move || async move {
                        let n = runs.incr();
                        gate.pass().await;
                        Ok(format!("value {key} run {n}"))
                    })
                    .await;
                (fetched.status(), fetched.into_result().unwrap())
            })
        })
        .collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_miss_with_500_concurrent_callers_runs_once_and_a_hit_runs_nothing() {
    let cache: Cache<u32, String> = Cache::builder().build();
    for key in 0..10 {
        let (runs, gate) = (Counter::default(), Gate::closed());
        let opener = {
            let (runs, gate) = (runs.clone(), gate.clone());
            tokio::spawn(async move {
                runs.reach(1).await;
                // Give every caller time to join before the work completes.
                tokio::time::sleep(Duration::from_millis(20)).await;
                gate.open();
            })
        };
        let answers = fan_in(&cache, key, &runs, &gate).await;
        opener.await.unwrap();
        assert_eq!(runs.get(), 1, "key {key}: one run for {CALLERS} callers");
        assert!(
            answers
                .iter()
                .all(|(_, v)| *v == format!("value {key} run 0"))
        );
        let misses = answers
            .iter()
            .filter(|(s, _)| *s == CacheStatus::Miss)
            .count();
        let rest = answers
            .iter()
            .filter(|(s, _)| matches!(s, CacheStatus::Coalesced | CacheStatus::Hit))
            .count();
        assert_eq!((misses, rest), (1, CALLERS - 1), "key {key}");

        // A second fan-in on the now cached key: every caller hits, nothing runs.
        let answers = fan_in(&cache, key, &runs, &gate).await;
        assert_eq!(runs.get(), 1, "key {key}: a hit runs nothing");
        assert!(answers.iter().all(|(s, _)| *s == CacheStatus::Hit));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_while_revalidate_callers_never_wait_and_exactly_one_refresh_runs() {
    for round in 0..10 {
        let cache: Cache<u32, String> = Cache::builder()
            .lifetimes(Lifetimes {
                fresh: Duration::from_millis(30),
                stale_while_revalidate: Duration::from_secs(60),
                stale_if_error: Duration::ZERO,
            })
            .build();
        cache.get_with(1, || async { "old".to_string() }).await;
        tokio::time::sleep(Duration::from_millis(40)).await;

        // The refresh waits for a gate that opens only after every caller has its answer:
        // a caller that waited for the refresh would never return.
        let (runs, gate) = (Counter::default(), Gate::closed());
        let answers = fan_in(&cache, 1, &runs, &gate).await;
        assert!(
            answers
                .iter()
                .all(|(s, v)| *s == CacheStatus::Stale && v == "old"),
            "round {round}: every caller got the stale value at once"
        );
        assert_eq!(runs.get(), 1, "round {round}: exactly one refresh");

        gate.open();
        let c = cache.clone();
        eventually("the refresh is stored", || {
            c.fetch(1, || async { unreachable!() })
                .now_or_never()
                .is_some_and(|f| f.status() == CacheStatus::Hit)
        })
        .await;
        let fetched = cache.fetch(1, || async { unreachable!() }).await;
        assert_eq!(fetched.into_result().unwrap(), "value 1 run 0");
        assert_eq!(runs.get(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn values_expire_on_the_clock_and_a_stale_value_refreshes_in_the_background() {
    let cache: Cache<&str, u32> = Cache::builder().lifetimes(lifetimes(10, 20, 0)).build();
    let runs = Counter::default();
    let work = |runs: &Counter| {
        let runs = runs.clone();
        move || async move { runs.incr() as u32 }
    };
    assert_eq!(cache.get_with("k", work(&runs)).await, 0);

    tokio::time::advance(Duration::from_secs(9)).await;
    let fetched = cache.fetch("k", || async { unreachable!() }).await;
    assert_eq!(
        (fetched.status(), fetched.age()),
        (CacheStatus::Hit, Duration::from_secs(9))
    );

    // Stale: served at once, one refresh on a task, which the next call sees.
    tokio::time::advance(Duration::from_secs(2)).await;
    let fetched = cache
        .fetch("k", || work(&runs)().map(Ok))
        .now_or_never()
        .expect("a stale answer never waits");
    assert_eq!(
        (fetched.status(), fetched.into_result()),
        (CacheStatus::Stale, Ok(0))
    );
    tokio::task::yield_now().await;
    let fetched = cache.fetch("k", || async { unreachable!() }).await;
    assert_eq!(
        (fetched.status(), fetched.into_result()),
        (CacheStatus::Hit, Ok(1))
    );

    // Past fresh + stale-while-revalidate: a miss that waits for the work.
    tokio::time::advance(Duration::from_secs(31)).await;
    let fetched = cache.fetch("k", || work(&runs)().map(Ok)).await;
    assert_eq!(
        (fetched.status(), fetched.into_result()),
        (CacheStatus::Miss, Ok(2))
    );
}

#[tokio::test(start_paused = true)]
async fn stale_if_error_serves_the_old_value_until_its_bound_then_the_error() {
    let cache: Cache<&str, &str, String> = Cache::builder().lifetimes(lifetimes(10, 0, 30)).build();
    let fail = || async { Err::<&str, _>("database down".to_string()) };
    assert_eq!(
        cache.try_get_with("k", || async { Ok("old") }).await,
        Ok("old")
    );

    tokio::time::advance(Duration::from_secs(15)).await;
    let fetched = cache.fetch("k", fail).await;
    assert_eq!(
        (fetched.status(), fetched.into_result()),
        (CacheStatus::Stale, Ok("old")),
        "within stale-if-error, the error is replaced by the old value"
    );

    tokio::time::advance(Duration::from_secs(26)).await; // 41 s: past 10 + 30
    let fetched = cache.fetch("k", fail).await;
    assert_eq!(
        (fetched.status(), fetched.into_result()),
        (CacheStatus::Miss, Err("database down".to_string()))
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_background_refresh_keeps_the_stale_value_and_is_tried_again() {
    let cache: Cache<&str, &str, String> = Cache::builder().lifetimes(lifetimes(10, 60, 0)).build();
    cache
        .try_get_with("k", || async { Ok("old") })
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(11)).await;

    let runs = Counter::default();
    for attempt in 1..=3 {
        let r = runs.clone();
        let fetched = cache
            .fetch("k", move || async move {
                r.incr();
                Err::<&str, _>("down".to_string())
            })
            .await;
        assert_eq!(fetched.into_result(), Ok("old"));
        tokio::task::yield_now().await; // the refresh task runs and fails
        assert_eq!(
            runs.get(),
            attempt,
            "one refresh per stale call once the last failed"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn errors_are_not_cached_unless_asked_then_for_their_own_ttl() {
    let runs = Counter::default();
    let fail = |runs: &Counter| {
        let runs = runs.clone();
        move || async move {
            runs.incr();
            Err::<u32, _>("not found".to_string())
        }
    };

    let plain: Cache<u32, u32, String> = Cache::builder().build();
    plain.try_get_with(1, fail(&runs)).await.unwrap_err();
    plain.try_get_with(1, fail(&runs)).await.unwrap_err();
    assert_eq!(runs.get(), 2, "an error is shared with its flight only");

    let negative: Cache<u32, u32, String> = Cache::builder()
        .negative_ttl(Duration::from_secs(5))
        .build();
    negative.try_get_with(1, fail(&runs)).await.unwrap_err();
    let fetched = negative.fetch(1, fail(&runs)).await;
    assert_eq!(
        (fetched.status(), fetched.into_result()),
        (CacheStatus::Hit, Err("not found".to_string()))
    );
    assert_eq!(runs.get(), 3);
    tokio::time::advance(Duration::from_secs(6)).await;
    negative.try_get_with(1, fail(&runs)).await.unwrap_err();
    assert_eq!(runs.get(), 4, "the negative entry expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalidate_runs_the_next_call_fresh_and_the_forgotten_flight_is_not_stored() {
    for round in 0..20 {
        let cache: Cache<u32, String> = Cache::builder().build();
        let (gate, started) = (Gate::closed(), Counter::default());
        let (g, s) = (gate.clone(), started.clone());
        let before = tokio::spawn({
            let cache = cache.clone();
            async move {
                cache
                    .get_with(1, move || async move {
                        s.incr();
                        g.pass().await;
                        "before".to_string()
                    })
                    .await
            }
        });
        started.reach(1).await;

        cache.invalidate(&1);
        let after = cache.get_with(1, || async { "after".to_string() }).await;
        assert_eq!(after, "after", "round {round}: the next call ran fresh");

        gate.open();
        assert_eq!(
            before.await.unwrap(),
            "before",
            "its waiters keep the old flight"
        );
        let fetched = cache.fetch(1, || async { unreachable!() }).await;
        assert_eq!(
            (fetched.status(), fetched.into_result().unwrap()),
            (CacheStatus::Hit, "after".to_string()),
            "round {round}: the forgotten flight's result was not stored"
        );
    }
}

#[tokio::test]
async fn lifetimes_read_from_the_value() {
    // A token that says itself how long it is good for.
    let cache: Cache<&str, (u32, Duration)> = Cache::builder()
        .lifetimes_with(|(_, ttl)| Lifetimes::fresh_for(*ttl))
        .build();
    cache
        .get_with("short", || async { (1, Duration::ZERO) })
        .await;
    cache
        .get_with("long", || async { (2, Duration::from_secs(60)) })
        .await;
    let short = cache
        .fetch("short", || async { Ok((3, Duration::ZERO)) })
        .await;
    let long = cache.fetch("long", || async { unreachable!() }).await;
    assert_eq!(
        short.status(),
        CacheStatus::Miss,
        "zero lifetimes: not stored"
    );
    assert_eq!(long.status(), CacheStatus::Hit);
}

#[tokio::test]
async fn lifetimes_of_forever_are_kept_without_overflow() {
    let forever = Lifetimes {
        fresh: Duration::MAX,
        stale_while_revalidate: Duration::MAX,
        stale_if_error: Duration::from_secs(1),
    };
    let constant: Cache<u8, u8> = Cache::builder().lifetimes(forever).build();
    constant.get_with(1, || async { 10 }).await;
    let per_value: Cache<u8, u8> = Cache::builder().lifetimes_with(move |_| forever).build();
    per_value.get_with(1, || async { 20 }).await;
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(10 * 365 * 24 * 60 * 60)).await;
    let constant = constant.fetch(1, || async { unreachable!() }).await;
    let per_value = per_value.fetch(1, || async { unreachable!() }).await;
    assert_eq!(constant.status(), CacheStatus::Hit);
    assert_eq!(per_value.status(), CacheStatus::Hit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_miss_reaches_every_waiter_and_the_key_works_after() {
    let cache: Cache<u32, u32> = Cache::builder().build();
    let gate = Gate::closed();
    let waiters: Vec<_> = (0..20)
        .map(|_| {
            let (cache, gate) = (cache.clone(), gate.clone());
            tokio::spawn(async move {
                cache
                    .get_with(1, move || async move {
                        gate.pass().await;
                        panic!("report query failed")
                    })
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    gate.open();
    for waiter in waiters {
        assert!(waiter.await.unwrap_err().is_panic());
    }
    assert_eq!(cache.get_with(1, || async { 7 }).await, 7);
}

/// Work that counts its runs and answers `v{run}` after `delay` (on the paused clock).
fn slow(runs: &Counter, delay: Duration) -> impl Future<Output = Result<String, Failed>> + use<> {
    let runs = runs.clone();
    async move {
        let n = runs.incr();
        tokio::time::sleep(delay).await;
        Ok(format!("v{n}"))
    }
}

/// An error type that a hard timeout can become.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failed {
    TimedOut(Duration),
}

impl From<tower_coalesce::single_flight::TimedOut> for Failed {
    fn from(timed_out: tower_coalesce::single_flight::TimedOut) -> Self {
        Failed::TimedOut(timed_out.after())
    }
}

#[tokio::test(start_paused = true)]
async fn an_eager_refresh_replaces_a_value_in_demand_before_it_goes_stale() {
    let cache: Cache<u32, String, Failed> = Cache::builder()
        .lifetimes(lifetimes(10, 0, 0))
        .eager_refresh(0.8)
        .build();
    let runs = Counter::default();
    let fetch = || cache.fetch(1, || slow(&runs, Duration::ZERO));
    assert_eq!(fetch().await.status(), CacheStatus::Miss);
    tokio::time::advance(Duration::from_secs(7)).await;
    let early = fetch().await;
    assert_eq!(
        (early.status(), early.result()),
        (CacheStatus::Hit, &Ok("v0".into()))
    );
    assert_eq!(runs.get(), 1, "before 80% of its freshness: no refresh");

    tokio::time::advance(Duration::from_secs(2)).await;
    let due = fetch().await;
    assert_eq!(due.status(), CacheStatus::Hit, "answered at once");
    assert_eq!(due.into_result(), Ok("v0".into()));
    for _ in 0..50 {
        assert_eq!(fetch().await.status(), CacheStatus::Hit);
    }
    eventually("the refresh ran", || runs.get() == 2).await;
    tokio::task::yield_now().await;
    let refreshed = fetch().await;
    assert_eq!(refreshed.into_result(), Ok("v1".into()));
    assert_eq!(runs.get(), 2, "one refresh for the 51 hits past the mark");
    // 2 s later the refreshed value is nowhere near its own mark, nor stale.
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(fetch().await.status(), CacheStatus::Hit);
    assert_eq!(runs.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn past_the_soft_timeout_the_stale_value_answers_and_the_work_completes_behind() {
    let cache: Cache<u32, String, Failed> = Cache::builder()
        .lifetimes(lifetimes(1, 0, 60))
        .soft_timeout(Duration::from_millis(100))
        .build();
    let runs = Counter::default();
    cache.fetch(1, || slow(&runs, Duration::ZERO)).await;
    tokio::time::advance(Duration::from_secs(2)).await;

    let started = tokio::time::Instant::now();
    let stale = cache.fetch(1, || slow(&runs, Duration::from_secs(1))).await;
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    assert_eq!(
        (stale.status(), stale.into_result()),
        (CacheStatus::Stale, Ok("v0".into()))
    );
    // Nobody waits for it any more, and it still completes and is kept.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let kept = cache.fetch(1, || slow(&runs, Duration::ZERO)).await;
    assert_eq!(
        (kept.status(), kept.into_result()),
        (CacheStatus::Hit, Ok("v1".into()))
    );
    assert_eq!(runs.get(), 2);

    // Without a stale value the soft timeout does not apply: the caller waits.
    let started = tokio::time::Instant::now();
    let fetched = cache.fetch(2, || slow(&runs, Duration::from_secs(1))).await;
    assert_eq!(fetched.into_result(), Ok("v2".into()));
    assert_eq!(started.elapsed(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn past_the_hard_timeout_a_caller_without_a_stale_value_gets_an_error_and_the_work_is_kept() {
    let cache: Cache<u32, String, Failed> = Cache::builder()
        .lifetimes(lifetimes(1, 0, 60))
        .soft_timeout(Duration::from_secs(5))
        .hard_timeout(Duration::from_millis(300))
        .build();
    let runs = Counter::default();
    let started = tokio::time::Instant::now();
    let (first, second) = tokio::join!(
        cache.fetch(1, || slow(&runs, Duration::from_secs(1))),
        cache.fetch(1, || slow(&runs, Duration::from_secs(1))),
    );
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    let timed_out = Err(Failed::TimedOut(Duration::from_millis(300)));
    assert_eq!(first.into_result(), timed_out);
    assert_eq!(second.into_result(), timed_out);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let kept = cache.fetch(1, || slow(&runs, Duration::ZERO)).await;
    assert_eq!(
        (kept.status(), kept.into_result()),
        (CacheStatus::Hit, Ok("v0".into()))
    );
    assert_eq!(runs.get(), 1, "one run, completed in the background");

    // With a stale value, the hard timeout (under the soft one here) answers it instead.
    tokio::time::advance(Duration::from_secs(2)).await;
    let stale = cache
        .fetch(1, || slow(&runs, Duration::from_secs(10)))
        .await;
    assert_eq!(
        (stale.status(), stale.into_result()),
        (CacheStatus::Stale, Ok("v0".into()))
    );
}
