//! Several instances of an app, each with its own service stack and its own Redis
//! connection, in one test process: a key runs once across all of them, a dropped leader
//! hands over at once, and Redis going away never hangs a request. Each test starts a
//! `redis-server` of its own (`.ci/run` installs it), so that it can count the commands
//! sent, or stop the server. Under `CI=true` a missing `redis-server` fails the tests.
#![cfg(all(feature = "redis", feature = "idempotency"))]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use futures::future::join_all;
use support::instances::{
    Answer, Instance, fire, instance, one_run_for_fifty_callers_each, post, routes, sum,
};
use support::redis::{Server, command_calls, free_port, prefix};
use support::{Counter, Gate, eventually};
use tower_coalesce::http::Metrics;
use tower_coalesce::http::{HttpCoalesceLayer, key};
use tower_coalesce::idempotency::{IdempotencyLayer, OnStoreError};
use tower_coalesce::redis::RedisStore;

/// 4 instances x 50 concurrent requests with one key: one run, 200 identical answers (the
/// 150 of the three instances that waited are replays of the stored response), and Redis
/// sees a handful of commands per instance, not one per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_instances_run_a_key_once_for_all_two_hundred_callers() {
    let Some(server) = Server::start(free_port()) else {
        return;
    };
    let (runs, gate, prefix) = (Counter::default(), Gate::closed(), prefix());
    let mut instances = Vec::new();
    for _ in 0..4 {
        let store = server.connect().await.with_prefix(prefix.clone());
        instances.push(instance(store, OnStoreError::FailOpen, &runs, &gate).await);
    }
    let before = command_calls(&server).await;

    one_run_for_fifty_callers_each(&instances, &runs, &gate, "order-42").await;
    assert_eq!(sum(&instances, Metrics::store_errors), 0);

    // Let the waiting instances' unsubscribes land before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = command_calls(&server).await;
    let mut sent: Vec<(String, u64)> = after
        .iter()
        .map(|(name, calls)| (name.clone(), calls - before.get(name).copied().unwrap_or(0)))
        .filter(|(name, calls)| *calls > 0 && name != "info")
        .collect();
    sent.sort();
    // Redis counts the commands that scripts call too; the store itself sends only
    // scripts (EVALSHA), EXISTS and (UN)SUBSCRIBE, never a bare GET, SET, DEL or PUBLISH.
    let in_scripts = ["get", "set", "del", "publish", "pexpire", "time"];
    let (scripted, sent): (Vec<_>, Vec<_>) = sent
        .into_iter()
        .partition(|(name, _)| in_scripts.contains(&name.as_str()));
    let total: u64 = sent.iter().map(|(_, calls)| calls).sum();
    eprintln!(
        "redis commands for one key on 4 instances (200 requests): {total} sent {sent:?}, \
         calling {scripted:?}"
    );
    assert!(
        total <= 4 * 5,
        "{total} commands for one key on 4 instances: {sent:?}"
    );
}

/// A store whose lease and poll interval (30 s) are longer than any test: whatever wakes a
/// waiting instance sooner is the release message.
async fn long_lease_store(server: &Server, prefix: &str) -> RedisStore {
    let long = Duration::from_secs(30);
    server
        .connect()
        .await
        .with_prefix(prefix)
        .with_lease(long)
        .with_poll_interval(long)
}

/// The leading instance's only caller disconnects while its request runs: its flight is
/// dropped (under `finish_abandoned(false)`), and the lease released at once, so the other instance takes over long before
/// the lease (30 s) would expire, woken by the release message (its poll interval is 30 s
/// too, so nothing else could wake it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_leader_releases_its_lease_and_another_instance_takes_over_at_once() {
    let Some(server) = Server::start(free_port()) else {
        return;
    };
    let prefix = prefix();
    let store = || long_lease_store(&server, &prefix);
    let runs = Counter::default();
    // The first instance's run never passes its gate; the second's does. The first drops
    // abandoned work (the preset would finish it, holding the lease until it completes).
    let layer = IdempotencyLayer::new()
        .store(store().await)
        .finish_abandoned(false);
    let leader = Instance {
        metrics: layer.metrics(),
        addr: support::serve(routes(runs.clone(), Gate::closed()).layer(layer)).await,
    };
    let open = Gate::closed();
    open.open();
    let other = instance(store().await, OnStoreError::FailOpen, &runs, &open).await;

    let doomed = tokio::spawn(post(leader.addr, "order-7"));
    runs.reach(1).await;
    let waiting = fire(std::slice::from_ref(&other), "order-7", 10);
    eventually("the other instance waits on the leader", || {
        other.metrics.flights_waiting_elsewhere() == 1
    })
    .await;

    let dropped = Instant::now();
    doomed.abort();
    let answers = join_all(waiting).await;
    let takeover = dropped.elapsed();
    eprintln!("takeover after the leader's flight was dropped: {takeover:?}");
    assert!(takeover < Duration::from_secs(10), "took {takeover:?}");
    assert_eq!(runs.get(), 2);
    for answer in answers {
        let answer = answer.unwrap();
        assert_eq!(
            (answer.status, answer.run.as_deref()),
            (StatusCode::CREATED, Some("2"))
        );
    }
}

/// Each lease comes with the key's next fencing token, as a request extension: the run on
/// the instance that took over has a higher token than the stalled run it replaced, while
/// every token is at least the server's clock. A handler keeping the highest token per row
/// (`UPDATE .. WHERE fence < $token`) refuses the stalled writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fencing_tokens_strictly_increase_across_a_takeover() {
    let Some(server) = Server::start(free_port()) else {
        return;
    };
    let prefix = prefix();
    let store = || long_lease_store(&server, &prefix);
    support::instances::assert_fencing_across_a_takeover(store().await, store().await).await;
}

/// Redis stops. Under `FailOpen` each instance runs its requests (coalesced within the
/// instance) and answers; under `FailClosed` it answers 503 and runs nothing; either way
/// within the command timeouts. Redis comes back on the same port: the instances reconnect,
/// and a key runs once across them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_redis_down_requests_fail_open_or_closed_promptly_and_coalesce_again_after() {
    let port = free_port();
    let Some(server) = Server::start(port) else {
        return;
    };
    let prefix = prefix();
    let (runs, open) = (Counter::default(), Gate::closed());
    open.open();
    let mut instances = Vec::new();
    for policy in [OnStoreError::FailOpen, OnStoreError::FailClosed] {
        let store = server.connect().await.with_prefix(prefix.clone());
        instances.push(instance(store, policy, &runs, &open).await);
    }
    let (fails_open, fails_closed) = (instances[0].addr, instances[1].addr);

    drop(server);
    for i in 0..3 {
        let key = format!("during-{i}");
        let start = Instant::now();
        let answer = post(fails_open, &key).await;
        assert_eq!(answer.status, StatusCode::CREATED, "fail open, request {i}");
        let answer = post(fails_closed, &key).await;
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "fail closed, request {i}"
        );
        assert!(answer.body.contains("Idempotency store unavailable"));
        // A few commands at 200 ms each, at most, on each instance.
        let took = start.elapsed();
        assert!(took < Duration::from_secs(3), "request {i} took {took:?}");
    }
    assert_eq!(
        runs.get(),
        3,
        "only the fail-open instance ran, once per key"
    );
    assert!(sum(&instances, Metrics::store_errors) >= 6);

    let _server = Server::start(port).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut attempt = 0;
    while post(fails_closed, &format!("probe-{attempt}")).await.status != StatusCode::CREATED {
        attempt += 1;
        assert!(
            Instant::now() < deadline,
            "no recovery after redis restarted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let runs_before = runs.get();
    let answers = join_all(fire(&instances, "after", 10)).await;
    let answers: Vec<Answer> = answers.into_iter().map(Result::unwrap).collect();
    assert!(answers.iter().all(|a| a.status == StatusCode::CREATED));
    assert!(answers.iter().all(|a| a.body == answers[0].body));
    assert_eq!(
        runs.get() - runs_before,
        1,
        "one run across both instances again"
    );
}

/// Redis dies while an instance runs a key that another instance waits for. The running
/// instance can neither store the response nor release the lease, and still answers its
/// callers (the response is not lost, only its replay). The waiting instance stops waiting
/// within its poll interval and the command timeouts: under `FailClosed` its callers get
/// `503`, and the key ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_dying_mid_flight_loses_no_response_and_hangs_no_waiter() {
    let Some(server) = Server::start(free_port()) else {
        return;
    };
    let (prefix, runs, gate) = (prefix(), Counter::default(), Gate::closed());
    let leader = instance(
        server.connect().await.with_prefix(prefix.clone()),
        OnStoreError::FailOpen,
        &runs,
        &gate,
    )
    .await;
    let other = instance(
        server.connect().await.with_prefix(prefix.clone()),
        OnStoreError::FailClosed,
        &runs,
        &gate,
    )
    .await;

    let running = fire(std::slice::from_ref(&leader), "order-9", 10);
    runs.reach(1).await;
    let waiting = fire(std::slice::from_ref(&other), "order-9", 10);
    eventually("the other instance waits on the leader", || {
        other.metrics.flights_waiting_elsewhere() == 1
    })
    .await;

    drop(server);
    let stopped = Instant::now();
    gate.open();
    for answer in join_all(running).await {
        let answer = answer.unwrap();
        assert_eq!(
            (answer.status, answer.run.as_deref()),
            (StatusCode::CREATED, Some("1"))
        );
    }
    for answer in join_all(waiting).await {
        assert_eq!(answer.unwrap().status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let took = stopped.elapsed();
    eprintln!("every caller answered {took:?} after redis died");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(runs.get(), 1);
    assert!(
        leader.metrics.store_errors() >= 1,
        "the put or release failed"
    );
}

/// Any key maker crosses instances, not only idempotency keys: 4 instances of an app keyed
/// by a client id header (no `Idempotency-Key`) run a burst of 200 requests once. Without
/// `replay`, the response is only handed over: once the handover window has passed, the same
/// request runs again. With `replay`, it is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_key_runs_once_across_instances_and_is_kept_only_with_replay() {
    let Some(server) = Server::start(free_port()) else {
        return;
    };
    for replay in [false, true] {
        let (runs, gate, prefix) = (Counter::default(), Gate::closed(), prefix());
        let mut instances = Vec::new();
        for _ in 0..4 {
            let store = server.connect().await.with_prefix(prefix.clone());
            let mut layer = HttpCoalesceLayer::new(key::header("x-client-id"))
                .store(store)
                .handover(Duration::from_millis(300));
            if replay {
                layer = layer.replay(Duration::from_secs(60));
            }
            let metrics = layer.metrics();
            let router = routes(runs.clone(), gate.clone()).layer(layer);
            instances.push(Instance {
                addr: support::serve(router).await,
                metrics,
            });
        }
        let send = |addr: SocketAddr| async move {
            let res = reqwest::Client::new()
                .post(format!("http://{addr}/orders"))
                .header("x-client-id", "c-9")
                .body("2 apples")
                .send()
                .await
                .unwrap();
            (res.status(), support::header(&res, "x-run"))
        };
        let requests: Vec<_> = instances
            .iter()
            .flat_map(|i| std::iter::repeat_n(i.addr, 50))
            .map(|addr| tokio::spawn(send(addr)))
            .collect();
        eventually("every caller joined its instance's flight", || {
            sum(&instances, Metrics::callers_joined) == 4 * 49
                && sum(&instances, Metrics::flights_waiting_elsewhere) == 3
        })
        .await;
        gate.open();
        for answer in join_all(requests).await {
            assert_eq!(answer.unwrap(), (StatusCode::CREATED, Some("1".to_owned())));
        }
        assert_eq!(
            runs.get(),
            1,
            "runs across the four instances (replay: {replay})"
        );

        // Later than the handover window: kept only under `replay`.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let later = send(instances[2].addr).await;
        if replay {
            assert_eq!(later, (StatusCode::CREATED, Some("1".to_owned())));
            assert_eq!(runs.get(), 1);
        } else {
            assert_eq!(later, (StatusCode::CREATED, Some("2".to_owned())));
            assert_eq!(runs.get(), 2);
        }
    }
}
