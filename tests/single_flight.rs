//! The single-flight core under real concurrency: multi-thread runtime, hundreds of tasks
//! released together by a barrier, every test repeated.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::Barrier;
use tower_coalesce::single_flight::Group;

use support::{Counter, DropFlag, Gate};

const CALLERS: usize = 300;
const ROUNDS: usize = 20;

/// Starts `CALLERS` tasks that call `run` on one key at the same instant, waits until all of
/// them have joined, and returns their handles.
async fn join_all_callers<T: Clone + Send + 'static>(
    group: &Group<u32, T>,
    work: impl Fn() -> futures::future::BoxFuture<'static, T> + Send + Sync + 'static,
) -> Vec<tokio::task::JoinHandle<tower_coalesce::single_flight::Outcome<T>>> {
    let start = Arc::new(Barrier::new(CALLERS));
    let joined = Counter::default();
    let work = Arc::new(work);
    let handles = (0..CALLERS)
        .map(|_| {
            let (group, start, joined, work) =
                (group.clone(), start.clone(), joined.clone(), work.clone());
            tokio::spawn(async move {
                start.wait().await;
                let run = group.run(7, || work());
                joined.incr();
                run.await
            })
        })
        .collect();
    joined.reach(CALLERS).await;
    handles
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_callers_of_one_key_run_the_work_once() {
    for _ in 0..ROUNDS {
        let group = Group::new();
        let executions = Counter::default();
        let gate = Gate::closed();
        let (e, g) = (executions.clone(), gate.clone());
        let handles = join_all_callers(&group, move || {
            let (e, g) = (e.clone(), g.clone());
            async move {
                let n = e.incr();
                g.pass().await;
                n
            }
            .boxed()
        })
        .await;
        gate.open();

        let mut leaders = 0;
        for handle in handles {
            let outcome = handle.await.unwrap();
            assert_eq!(
                *outcome.value(),
                0,
                "every caller gets the one execution's value"
            );
            assert!(outcome.is_shared());
            leaders += usize::from(outcome.is_leader());
        }
        assert_eq!(executions.get(), 1);
        assert_eq!(leaders, 1);
        assert_eq!(group.in_flight(), 0, "a finished flight frees its key");
    }
}

/// Callers keep arriving while flights complete: each one either joins a running flight or
/// starts a new one, and never joins a flight that had ended before it called: every caller
/// of an execution called before that execution's leader had its outcome back (by then the
/// key is free). A result may have been produced a moment before a caller called: the work
/// returns its value before the flight closes, and a caller may join in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_arriving_as_a_flight_completes_get_a_fresh_result() {
    for _ in 0..ROUNDS {
        let group: Group<u32, (u64, u64)> = Group::new();
        let clock = Arc::new(AtomicU64::new(0));
        let executions = Counter::default();
        let start = Arc::new(Barrier::new(CALLERS));
        let handles: Vec<_> = (0..CALLERS)
            .map(|_| {
                let (group, clock, executions, start) = (
                    group.clone(),
                    clock.clone(),
                    executions.clone(),
                    start.clone(),
                );
                tokio::spawn(async move {
                    start.wait().await;
                    let called_at = clock.fetch_add(1, Ordering::SeqCst);
                    let stamp = clock.clone();
                    let outcome = group
                        .run(7, || async move {
                            let id = executions.incr() as u64;
                            tokio::task::yield_now().await;
                            (id, stamp.fetch_add(1, Ordering::SeqCst))
                        })
                        .await;
                    let returned_at = clock.fetch_add(1, Ordering::SeqCst);
                    (called_at, returned_at, outcome)
                })
            })
            .collect();

        let mut leaders = 0;
        let mut calls = Vec::new();
        let mut leader_returned = std::collections::HashMap::new();
        for handle in handles {
            let (called_at, returned_at, outcome) =
                tokio::time::timeout(Duration::from_secs(10), handle)
                    .await
                    .expect("no caller hangs")
                    .unwrap();
            let (execution, _) = *outcome.value();
            if outcome.is_leader() {
                leaders += 1;
                leader_returned.insert(execution, returned_at);
            }
            calls.push((execution, called_at));
        }
        for (execution, called_at) in calls {
            let ended = leader_returned[&execution];
            assert!(
                called_at < ended,
                "a caller joined execution {execution} after its flight ended ({called_at} >= {ended})"
            );
        }
        let executions_seen: std::collections::HashSet<_> = leader_returned.keys().collect();
        assert_eq!(leaders, executions.get(), "one leader per execution");
        assert_eq!(
            executions_seen.len(),
            executions.get(),
            "every execution reached its callers"
        );
        assert_eq!(group.in_flight(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distinct_keys_never_wait_on_each_other() {
    let group: Group<&str, &str> = Group::new();
    let (gate, started) = (Gate::closed(), Counter::default());
    let (g, s) = (gate.clone(), started.clone());
    let blocked = tokio::spawn({
        let group = group.clone();
        async move {
            let work = || async move {
                s.incr();
                g.pass().await;
                "a"
            };
            group.run("a", work).await
        }
    });
    started.reach(1).await;
    for _ in 0..100 {
        let b = tokio::time::timeout(Duration::from_secs(5), group.run("b", || async { "b" }))
            .await
            .expect("key b must not wait for key a");
        assert_eq!(*b.value(), "b");
        assert!(!b.is_shared());
    }
    assert_eq!(group.in_flight(), 1);
    gate.open();
    assert_eq!(*blocked.await.unwrap().value(), "a");
    assert_eq!(group.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_error_is_shared_by_its_flight_and_not_remembered() {
    for _ in 0..ROUNDS {
        let group = Group::new();
        let executions = Counter::default();
        let gate = Gate::closed();
        let (e, g) = (executions.clone(), gate.clone());
        let handles = join_all_callers(&group, move || {
            let (e, g) = (e.clone(), g.clone());
            async move {
                e.incr();
                g.pass().await;
                Err::<u32, String>("insert failed".into())
            }
            .boxed()
        })
        .await;
        gate.open();
        for handle in handles {
            assert_eq!(
                handle.await.unwrap().into_value(),
                Err("insert failed".into())
            );
        }
        assert_eq!(executions.get(), 1);

        let retry = group.run(7, || async { Ok(1) }).await;
        assert!(
            retry.is_leader() && !retry.is_shared(),
            "the retry ran on its own"
        );
        assert_eq!(retry.into_value(), Ok(1), "the error was not cached");
    }
}

/// The leader's task is aborted mid-flight: the same work finishes for the followers, it is
/// neither dropped half-way nor started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_leader_leaves_the_work_to_its_followers() {
    for _ in 0..ROUNDS {
        let group: Group<u32, usize> = Group::new();
        let (executions, dropped_early, gate) =
            (Counter::default(), Counter::default(), Gate::closed());
        let make = {
            let (executions, dropped_early, gate) =
                (executions.clone(), dropped_early.clone(), gate.clone());
            move || {
                let (executions, dropped_early, gate) =
                    (executions.clone(), dropped_early.clone(), gate.clone());
                async move {
                    let n = executions.incr();
                    let flag = DropFlag(dropped_early);
                    gate.pass().await;
                    std::mem::forget(flag); // completed: not an early drop
                    n + 100
                }
            }
        };

        let leader = tokio::spawn({
            let (group, make) = (group.clone(), make.clone());
            async move { group.run(7, make).await }
        });
        executions.reach(1).await; // the leader's task is driving the work
        let joined = Counter::default();
        let followers: Vec<_> = (0..50)
            .map(|_| {
                let (group, make, joined) = (group.clone(), make.clone(), joined.clone());
                tokio::spawn(async move {
                    let run = group.run(7, make);
                    joined.incr();
                    run.await
                })
            })
            .collect();
        // Every follower has joined before the leader goes (`run` joins synchronously).
        joined.reach(50).await;
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled());
        gate.open();

        for follower in followers {
            let outcome = tokio::time::timeout(Duration::from_secs(10), follower)
                .await
                .expect("a follower was stranded by the leader's cancellation")
                .unwrap();
            assert_eq!(*outcome.value(), 100);
        }
        assert_eq!(executions.get(), 1, "the work was started a second time");
        assert_eq!(dropped_early.get(), 0, "the work was dropped half-way");
        assert_eq!(group.in_flight(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_work_is_dropped_when_every_caller_is_gone() {
    for _ in 0..ROUNDS {
        let group: Group<u32, usize> = Group::new();
        let (started, dropped, joined) =
            (Counter::default(), Counter::default(), Counter::default());
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let (group, started, dropped, joined) = (
                    group.clone(),
                    started.clone(),
                    dropped.clone(),
                    joined.clone(),
                );
                tokio::spawn(async move {
                    let run = group.run(7, move || async move {
                        started.incr();
                        let _flag = DropFlag(dropped);
                        std::future::pending::<usize>().await
                    });
                    joined.incr();
                    run.await
                })
            })
            .collect();
        joined.reach(20).await;
        started.reach(1).await;
        for caller in &callers {
            caller.abort();
        }
        for caller in callers {
            assert!(caller.await.unwrap_err().is_cancelled());
        }
        assert_eq!(dropped.get(), 1, "the work was left running for nobody");
        assert_eq!(group.in_flight(), 0, "an abandoned flight keeps its key");
        let next = group.run(7, || async { 5 }).await;
        assert!(next.is_leader() && *next.value() == 5);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panic_reaches_every_waiter_and_frees_the_key() {
    for _ in 0..ROUNDS {
        let group = Group::new();
        let gate = Gate::closed();
        let g = gate.clone();
        let handles = join_all_callers(&group, move || {
            let g = g.clone();
            async move {
                g.pass().await;
                panic!("insert exploded");
            }
            .boxed()
        })
        .await;
        gate.open();
        for handle in handles {
            let err = tokio::time::timeout(Duration::from_secs(10), handle)
                .await
                .expect("a waiter hangs after the work panicked")
                .unwrap_err();
            let payload = err.into_panic();
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap();
            assert!(message.contains("insert exploded"), "{message}");
        }
        assert_eq!(group.in_flight(), 0);
        assert_eq!(*group.run(7, || async { 1u8 }).await.value(), 1);
    }
}

#[tokio::test]
async fn a_panic_while_making_the_work_reaches_the_leader_and_frees_the_key() {
    let group: Group<u32, u8> = Group::new();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(group.run(1, || -> std::future::Ready<u8> { panic!("no work today") }));
    }));
    assert!(caught.is_err());
    assert_eq!(group.in_flight(), 0);
    assert_eq!(*group.run(1, || async { 3 }).await.value(), 3);
}

/// The leader drives its own work: a follower polled before its leader waits (parked, not
/// polled again) and is served once the leader runs; a leader dropped before it was ever
/// polled hands the same work to its follower, which runs it once.
#[tokio::test]
async fn an_unpolled_leader_drives_once_polled_and_hands_its_work_over_when_dropped() {
    let group: Group<u32, u8> = Group::new();
    let leader = group.run(1, || async { 9 });
    let mut follower = group.run(1, || async { unreachable!("joined, not made") });
    assert!(futures::poll!(&mut follower).is_pending());
    let leader = leader.await;
    assert!(leader.is_leader() && leader.is_shared() && *leader.value() == 9);
    let outcome = tokio::time::timeout(Duration::from_secs(5), follower)
        .await
        .expect("the leader's completion wakes its follower");
    assert!(!outcome.is_leader() && *outcome.value() == 9);

    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let leader = group.run(2, move || async move {
        counted.fetch_add(1, Ordering::SeqCst);
        tokio::task::yield_now().await;
        7
    });
    let mut follower = group.run(2, || async { unreachable!("joined, not made") });
    assert!(futures::poll!(&mut follower).is_pending());
    drop(leader);
    let outcome = tokio::time::timeout(Duration::from_secs(5), follower)
        .await
        .expect("the follower takes the work over");
    assert_eq!(*outcome.value(), 7);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(group.in_flight(), 0);
}

/// A caller that joins while the leader is still making its work (from inside `make`) gets
/// the work's result, or the panic of `make`; the key is free afterwards either way.
#[tokio::test]
async fn a_caller_joining_while_the_work_is_made_gets_its_result_or_the_panic() {
    let group: Group<u32, u8> = Group::new();
    let mut joined = None;
    let leader = group.run(1, || {
        joined = Some(group.run(1, || async { unreachable!("joined, not made") }));
        async { 5 }
    });
    let joined = joined.expect("made inside make");
    assert!(leader.is_leader() && !joined.is_leader());
    let (leader, joined) = tokio::join!(leader, joined);
    assert_eq!((*leader.value(), *joined.value()), (5, 5));
    assert!(leader.is_shared() && joined.is_shared());
    assert_eq!(group.in_flight(), 0);

    let mut joined = None;
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(group.run(2, || -> std::future::Ready<u8> {
            joined = Some(group.run(2, || async { unreachable!("joined, not made") }));
            panic!("no work today")
        }));
    }));
    assert!(caught.is_err(), "the leader resumes the panic of make");
    let follower = joined.expect("made inside make");
    let panicked = tokio::spawn(follower)
        .await
        .expect_err("the follower panics too");
    let message = panicked.into_panic();
    let message = message.downcast_ref::<String>().expect("a message");
    assert!(message.contains("no work today"), "{message}");
    assert_eq!(group.in_flight(), 0);
    assert_eq!(*group.run(2, || async { 3 }).await.value(), 3);
}

/// `forget` while the leader drives alone and a follower waits: the next call starts a
/// flight of its own, and the forgotten flight still serves its follower, whether its
/// leader completes it or leaves it to the follower.
#[tokio::test]
async fn a_forgotten_flight_still_serves_the_callers_that_joined_it() {
    let group: Group<u32, u8> = Group::new();
    for leader_leaves in [false, true] {
        let (gate, runs) = (Gate::closed(), Counter::default());
        let (pass, count) = (gate.clone(), runs.clone());
        let mut leader = group.run(1, move || async move {
            count.incr();
            pass.pass().await;
            1
        });
        assert!(futures::poll!(&mut leader).is_pending(), "driving alone");
        let mut follower = group.run(1, || async { unreachable!("joined, not made") });
        assert!(futures::poll!(&mut follower).is_pending());
        assert!(group.forget(&1));
        let fresh = group.run(1, || async { 2 });
        assert!(fresh.is_leader());
        assert_eq!(fresh.await.into_value(), 2);

        gate.open();
        let both = async {
            if leader_leaves {
                drop(leader);
                follower.await
            } else {
                let (leader, follower) = tokio::join!(leader, follower);
                assert_eq!(*leader.value(), 1);
                follower
            }
        };
        let follower = tokio::time::timeout(Duration::from_secs(5), both)
            .await
            .expect("the forgotten flight's follower is served");
        assert_eq!(*follower.value(), 1, "leader_leaves: {leader_leaves}");
        assert_eq!(runs.get(), 1);
        assert_eq!(group.in_flight(), 0);
    }
}

#[test]
fn group_and_run_are_send_sync_and_clone() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Group<String, Result<String, String>>>();
    send::<tower_coalesce::single_flight::Run<String, String>>();
    let _ = Group::<u8, u8>::new().clone();
}
