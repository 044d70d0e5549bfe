//! Instances of an app on a Redis Cluster of three masters: a key runs once across four
//! instances, keys spread over every master with each key's names in one slot, fencing
//! tokens increase across a takeover, and a master killed mid-flight hangs nothing and
//! recovers. The first three use the cluster `.ci/redis-cluster.sh` starts
//! (`REDIS_CLUSTER_URLS`); the one that kills a master starts a cluster of its own.
#![cfg(all(feature = "redis", feature = "idempotency"))]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::{Extension, Router, routing};
use futures::future::join_all;
use support::instances::{
    Answer, Instance, fire, instance, micros_since_1970, one_run_for_fifty_callers_each, post,
    post_body, sum,
};
use support::redis::{Cluster, cluster_urls, connect_cluster, prefix};
use support::{Counter, Gate, eventually};
use tower_coalesce::http::Metrics;
use tower_coalesce::idempotency::{IdempotencyLayer, OnStoreError};
use tower_coalesce::redis::RedisStore;
use tower_coalesce::store::{FencingToken, Fingerprint, Store, StoreKey, StoredResponse};

const TIMEOUT: Duration = Duration::from_secs(1);

async fn store(urls: &[String], prefix: &str) -> RedisStore {
    connect_cluster(urls, TIMEOUT).await.with_prefix(prefix)
}

/// The names under `prefix` on each master, by the master's port.
async fn names_by_master(urls: &[String], prefix: &str) -> HashMap<String, Vec<String>> {
    let mut found = HashMap::new();
    for url in urls {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let names: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        found.insert(url.clone(), names);
    }
    found
}

/// 4 instances x 50 concurrent requests with one key on the cluster: one run, 200
/// identical answers, 150 of them replays. The same key with another body is refused on
/// every instance (the first principle across instances), and nothing errs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_instances_run_a_key_once_for_all_two_hundred_callers_on_a_cluster() {
    let Some(urls) = cluster_urls() else {
        return;
    };
    let (runs, gate, prefix) = (Counter::default(), Gate::closed(), prefix());
    let mut instances = Vec::new();
    for _ in 0..4 {
        let store = store(&urls, &prefix).await;
        instances.push(instance(store, OnStoreError::FailClosed, &runs, &gate).await);
    }

    let answers = one_run_for_fifty_callers_each(&instances, &runs, &gate, "order-42").await;
    let first = &answers[0];
    for instance in &instances {
        let other = post_body(instance.addr, "order-42", "3 pears").await;
        assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY, "{other:?}");
        assert_ne!(other.body, first.body);
    }
    assert_eq!(runs.get(), 1);
    assert_eq!(sum(&instances, Metrics::store_errors), 0);
}

/// Sixty keys, each posted at once to four instances: each runs once, and their responses
/// are kept on all three masters, each key's response and fencing-token counter on one
/// master (a script touching two slots would have failed with CROSSSLOT).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_spread_over_every_master_and_each_runs_once() {
    let Some(urls) = cluster_urls() else {
        return;
    };
    let (runs, open, prefix) = (Counter::default(), Gate::closed(), prefix());
    open.open();
    let mut instances = Vec::new();
    for _ in 0..4 {
        let store = store(&urls, &prefix).await;
        instances.push(instance(store, OnStoreError::FailClosed, &runs, &open).await);
    }
    let keys: Vec<String> = (0..60).map(|i| format!("order-{i}")).collect();
    let requests: Vec<_> = keys.iter().map(|key| fire(&instances, key, 2)).collect();
    for (key, requests) in keys.iter().zip(requests) {
        let answers: Vec<Answer> = join_all(requests)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert!(answers.iter().all(|a| a.status == StatusCode::CREATED));
        assert!(
            answers.iter().all(|a| a.body == answers[0].body),
            "{key}: {answers:?}"
        );
    }
    assert_eq!(runs.get(), 60, "one run per key");
    assert_eq!(sum(&instances, Metrics::store_errors), 0);

    let by_master = names_by_master(&urls, &prefix).await;
    let mut responses = 0;
    for (master, names) in &by_master {
        let kept: Vec<&String> = names.iter().filter(|n| !n.contains("fence:")).collect();
        assert!(
            !kept.is_empty(),
            "no response kept on {master}: {by_master:?}"
        );
        responses += kept.len();
        // The fencing-token counter of every response kept here is here too.
        for name in kept {
            let fence = name.replacen(&prefix, &format!("{prefix}fence:"), 1);
            assert!(names.contains(&fence), "{fence} is not beside {name}");
        }
    }
    assert_eq!(responses, 60, "{by_master:?}");
}

/// A dropped leader's lease is taken over by another instance on the cluster, with a
/// higher fencing token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fencing_tokens_strictly_increase_across_a_takeover_on_a_cluster() {
    let Some(urls) = cluster_urls() else {
        return;
    };
    let prefix = prefix();
    let long = Duration::from_secs(30);
    let store = || async {
        store(&urls, &prefix)
            .await
            .with_lease(long)
            .with_poll_interval(long)
    };
    support::instances::assert_fencing_across_a_takeover(store().await, store().await).await;
}

/// The fencing token of every run, in order (`None`: a run without a lease).
#[derive(Clone, Default)]
struct Fences(Arc<Mutex<Vec<Option<u64>>>>);

impl Fences {
    fn get(&self) -> Vec<Option<u64>> {
        self.0.lock().unwrap().clone()
    }
}

/// The route of the instances whose master is killed: runs count themselves and record
/// their fencing token, and the first run waits for `gate`.
fn fenced_route(runs: &Counter, gate: &Gate, fences: &Fences) -> Router {
    let (runs, gate, fences) = (runs.clone(), gate.clone(), fences.clone());
    Router::new().route(
        "/orders",
        routing::post(move |fence: Option<Extension<FencingToken>>| {
            let (runs, gate, fences) = (runs.clone(), gate.clone(), fences.clone());
            async move {
                let n = runs.incr() + 1;
                fences.0.lock().unwrap().push(fence.map(|f| f.0.get()));
                if n == 1 {
                    gate.pass().await;
                }
                (
                    StatusCode::CREATED,
                    [("x-run", n.to_string())],
                    format!("order created by run {n}"),
                )
            }
        }),
    )
}

/// A layer on the cluster with short timeouts, lease and poll interval, so that a dead
/// master shows within a test's patience.
async fn failing_layer(
    urls: &[String],
    prefix: &str,
    policy: OnStoreError,
) -> IdempotencyLayer<tower_coalesce::http::scope::DefaultScope, RedisStore> {
    let store = connect_cluster(urls, Duration::from_millis(300))
        .await
        .with_prefix(prefix)
        .with_lease(Duration::from_secs(3))
        .with_poll_interval(Duration::from_millis(200));
    IdempotencyLayer::new().store(store).on_store_error(policy)
}

/// The master holding a key is killed (`SIGKILL`, no replica, no persistence) while the key
/// runs on one instance and two others wait for it. Nothing hangs: the running instance
/// answers its callers with its response (it could not keep it); the waiting instance that
/// fails open runs the request itself, the one that fails closed answers 503, each within
/// a second or two. The master restarts empty; the instances reconnect, the key runs once
/// across them again, and its fencing token is still higher than before the kill although
/// the master lost its counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_killed_mid_flight_hangs_nothing_and_the_cluster_recovers() {
    let Some(mut cluster) = Cluster::start() else {
        return;
    };
    let urls = cluster.urls();
    cluster.wait_ok().await;
    let prefix = prefix();
    // The first run waits for `gate`; every run records its fencing token.
    let (runs, gate) = (Counter::default(), Gate::closed());
    let fences = Fences::default();
    let route = fenced_route(&runs, &gate, &fences);
    let mut instances = Vec::new();
    for policy in [
        OnStoreError::FailOpen,
        OnStoreError::FailOpen,
        OnStoreError::FailClosed,
    ] {
        let layer = failing_layer(&urls, &prefix, policy).await;
        let metrics = layer.metrics();
        let addr = support::serve(route.clone().layer(layer)).await;
        instances.push(Instance { addr, metrics });
    }
    let (leader, fails_open, fails_closed) = (&instances[0], &instances[1], &instances[2]);

    let leading = fire(std::slice::from_ref(leader), "order-1", 5);
    runs.reach(1).await;
    let waiting_open = fire(std::slice::from_ref(fails_open), "order-1", 5);
    let waiting_closed = fire(std::slice::from_ref(fails_closed), "order-1", 5);
    eventually("both other instances wait on the lease", || {
        sum(&instances, Metrics::flights_waiting_elsewhere) == 2
    })
    .await;
    let before = fences.get()[0].expect("a token");

    // The master holding the key's lease.
    let by_master = names_by_master(&urls, &prefix).await;
    let master = urls
        .iter()
        .position(|url| by_master[url].iter().any(|n| n.contains("lease:")))
        .expect("the lease is on a master");
    cluster.kill(master);
    let killed = Instant::now();
    gate.open();

    let answers = |requests| async move {
        join_all(requests)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect::<Vec<Answer>>()
    };
    let (led, opened, closed) = tokio::join!(
        answers(leading),
        answers(waiting_open),
        answers(waiting_closed)
    );
    let took = killed.elapsed();
    eprintln!("every caller answered {took:?} after the master was killed");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    for answer in &led {
        assert_eq!(
            (answer.status, answer.run.as_deref()),
            (StatusCode::CREATED, Some("1"))
        );
    }
    for answer in &opened {
        assert_eq!(
            (answer.status, answer.run.as_deref()),
            (StatusCode::CREATED, Some("2")),
            "the fail-open instance runs the request itself, once for its five callers"
        );
    }
    for answer in &closed {
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(runs.get(), 2);
    assert!(sum(&instances, Metrics::store_errors) >= 3);

    // The master comes back, without its data.
    cluster.restart(master);
    cluster.wait_ok().await;
    let recovered = Instant::now();
    let answer = loop {
        let answer = post(fails_closed.addr, "order-1").await;
        if answer.status != StatusCode::SERVICE_UNAVAILABLE {
            break answer;
        }
        assert!(
            recovered.elapsed() < Duration::from_secs(20),
            "the instances did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "reconnected {:?} after the cluster was ok",
        recovered.elapsed()
    );
    // The response kept before was lost with the master's data: the key runs again, once,
    // and its response is replayed by the other instances.
    assert_eq!(
        (answer.status, answer.run.as_deref()),
        (StatusCode::CREATED, Some("3"))
    );
    // Every instance has its connections back before the replays: one that fails open and
    // has not reconnected yet runs a request itself, as it should (seen once in CI, on a
    // loaded machine). A request with a key of its own tells, by the instance's store
    // errors.
    for (i, instance) in instances.iter().enumerate() {
        for attempt in 0.. {
            let errors = instance.metrics.store_errors();
            let probe = post(instance.addr, &format!("probe-{i}-{attempt}")).await;
            if probe.status == StatusCode::CREATED && instance.metrics.store_errors() == errors {
                break;
            }
            assert!(
                recovered.elapsed() < Duration::from_secs(20),
                "instance {i} did not reconnect"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let ran = runs.get();
    let replays = answers(fire(&instances, "order-1", 3)).await;
    let errors: Vec<u64> = instances.iter().map(|i| i.metrics.store_errors()).collect();
    for replay in &replays {
        assert_eq!(
            (replay.replayed, &replay.body),
            (true, &answer.body),
            "store errors by instance: {errors:?}"
        );
    }
    assert_eq!(runs.get(), ran, "the replays run nothing");

    let fences = fences.get();
    assert_eq!(fences[1], None, "a run without a lease has no token");
    let after = fences[2].expect("a token");
    assert!(
        after > before,
        "the token after the master lost its counter ({after}) is above the one before ({before})"
    );
    assert!(before > micros_since_1970() - 60_000_000);
}

/// No nodes, a node nobody listens on, a URL that is none, a Redis that is not a cluster:
/// a clear error, promptly.
#[tokio::test]
async fn connecting_to_no_cluster_is_a_prompt_error() {
    let timeout = Duration::from_millis(300);
    let nowhere = format!("redis://127.0.0.1:{}", support::redis::free_port());
    let single = support::redis::redis_url().unwrap();
    let attempts = vec![
        vec![],
        vec![nowhere.as_str()],
        vec!["not a url"],
        vec![single.as_str()],
    ];
    for nodes in attempts {
        let start = Instant::now();
        let error = RedisStore::connect_cluster_with_timeout(&nodes, timeout)
            .await
            .expect_err("no cluster there");
        let took = start.elapsed();
        eprintln!("{nodes:?}: {error} after {took:?}");
        assert!(took < Duration::from_secs(2), "{nodes:?} took {took:?}");
        assert!(!error.to_string().is_empty());
    }
}

/// A cluster node given to the single-node `connect` is refused with a pointer to
/// `connect_cluster`, rather than serving its own slots and failing the others' keys.
#[tokio::test]
async fn a_cluster_node_is_refused_by_the_single_node_connect() {
    let Some(urls) = cluster_urls() else {
        return;
    };
    let error = RedisStore::connect(&urls[0])
        .await
        .expect_err("a cluster node");
    assert!(error.to_string().contains("connect_cluster"), "{error}");
}

/// Posts `key` until the answer is not a 503 (the cluster is failing over), each request
/// within 2 s and all within 20 s: that answer, and how many 503s came before it.
async fn until_available(addr: std::net::SocketAddr, key: &str) -> (Answer, usize) {
    let start = Instant::now();
    let mut unavailable = 0;
    loop {
        let sent = Instant::now();
        let answer = post(addr, key).await;
        assert!(sent.elapsed() < Duration::from_secs(2), "a request hung");
        if answer.status != StatusCode::SERVICE_UNAVAILABLE {
            return (answer, unavailable);
        }
        unavailable += 1;
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "unavailable for 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The index in `urls` of the replica of the master at `master`.
async fn replica_of(urls: &[String], master: &str) -> usize {
    let client = redis::Client::open(master).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut conn)
        .await
        .unwrap();
    let port = info
        .lines()
        .find_map(|line| line.strip_prefix("slave0:"))
        .and_then(|line| line.split(',').find_map(|f| f.strip_prefix("port=")))
        .expect("the master has a replica");
    urls.iter()
        .position(|url| url.ends_with(&format!(":{port}")))
        .expect("the replica is a node of the cluster")
}

/// `ROLE` of the node at `url`: `master` or `slave`.
async fn role(url: &str) -> String {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await.unwrap();
    redis::from_redis_value(role[0].clone()).unwrap()
}

/// A cluster of three masters with a replica each. A key runs and its response is kept;
/// then the master holding it is killed. Nothing hangs: until its replica has taken over,
/// the instances (`FailClosed`) answer 503 within the command timeout, or replay the key
/// from the replica (the cluster client sends the lookup there; a lease can't be taken on
/// it). If the response never reached the replica (replication is asynchronous), the key
/// runs once more, with a higher fencing token. Once the replica is the master, the
/// instances follow it without a restart of anything: a key in its slots runs on one
/// instance with a fencing token above the killed master's, and is replayed by the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_master_fails_over_to_its_replica_and_the_instances_follow() {
    let Some(mut cluster) = Cluster::start_with_replicas(1) else {
        return;
    };
    let urls = cluster.urls();
    cluster.wait_ok().await;
    let prefix = prefix();
    let (runs, open, fences) = (Counter::default(), Gate::closed(), Fences::default());
    open.open();
    let mut instances = Vec::new();
    for _ in 0..2 {
        let layer = failing_layer(&urls, &prefix, OnStoreError::FailClosed).await;
        let metrics = layer.metrics();
        let addr = support::serve(fenced_route(&runs, &open, &fences).layer(layer)).await;
        instances.push(Instance { addr, metrics });
    }

    let first = post(instances[0].addr, "order-1").await;
    assert_eq!(
        (first.status, first.run.as_deref()),
        (StatusCode::CREATED, Some("1"))
    );
    // The master that keeps it, and that master's replica.
    let by_node = names_by_master(&urls, &prefix).await;
    let mut master = None;
    for (i, url) in urls.iter().enumerate() {
        if !by_node[url].is_empty() && role(url).await == "master" {
            master = Some(i);
        }
    }
    let master = master.expect("a master keeps the response");
    let replica = replica_of(&urls, &urls[master]).await;
    cluster.kill(master);
    let killed = Instant::now();

    let (after, unavailable) = until_available(instances[1].addr, "order-1").await;
    eprintln!(
        "order-1 answered {:?} after the kill ({unavailable} prompt 503s before), replayed: {}",
        killed.elapsed(),
        after.replayed
    );
    assert_eq!(after.status, StatusCode::CREATED);
    if after.replayed {
        assert_eq!(after.body, first.body);
        assert_eq!(runs.get(), 1);
    } else {
        assert_eq!((runs.get(), after.run.as_deref()), (2, Some("2")));
    }

    // The replica takes over; find a key in its slots (its key count grows).
    cluster.wait_ok().await;
    eprintln!("failed over {:?} after the kill", killed.elapsed());
    let keys_on = |url: String| {
        let prefix = prefix.clone();
        async move { names_by_master(std::slice::from_ref(&url), &prefix).await[&url].len() }
    };
    let mut moved = None;
    for i in 0..60 {
        let (before, key) = (keys_on(urls[replica].clone()).await, format!("probe-{i}"));
        let (answer, _) = until_available(instances[0].addr, &key).await;
        assert_eq!(answer.status, StatusCode::CREATED);
        if keys_on(urls[replica].clone()).await > before {
            moved = Some((key, answer));
            break;
        }
    }
    let (key, answer) = moved.expect("a key in the failed-over slots");
    let fences = fences.get();
    let token = |run: &str| fences[run.parse::<usize>().unwrap() - 1].expect("a token");
    let (killed_token, new_token) = (token("1"), token(answer.run.as_deref().unwrap()));
    assert!(
        new_token > killed_token,
        "token {new_token} on the new master, {killed_token} on the killed one"
    );
    // The other instance may still have to find the new master (503s until it has).
    let (replay, _) = until_available(instances[1].addr, &key).await;
    assert_eq!((replay.replayed, &replay.body), (true, &answer.body));
}

/// A cluster connection whose driver stopped running for good is replaced. (The fault
/// campaign wedged redis-rs's cluster connection so, after a node restart while every
/// connection was killed: from then on every command of that instance timed out, while the
/// cluster served the others.) Here the connection is made on a runtime that is then no
/// longer driven, so its driver never runs again: the first commands time out, and once
/// none has had an answer for three timeouts the store makes a new connection and answers
/// from then on.
#[test]
fn a_cluster_connection_that_stopped_answering_for_good_is_replaced() {
    let Some(urls) = cluster_urls() else {
        return;
    };
    let timeout = Duration::from_millis(200);
    let frozen = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = frozen
        .block_on(connect_cluster(&urls, timeout))
        .with_prefix(prefix());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let key = StoreKey::from_bytes([9; 32]);
        let first = store.get(&key).await;
        assert!(
            first
                .as_ref()
                .is_err_and(|e| e.to_string().contains("timed out")),
            "the frozen connection answered: {first:?}"
        );
        let started = Instant::now();
        let answered = loop {
            match store.get(&key).await {
                Ok(found) => break found,
                Err(_) => {
                    assert!(
                        started.elapsed() < Duration::from_secs(10),
                        "still no answer after 10 s"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        assert!(answered.is_none());
        // The new connection does the store's work: a response kept and read back.
        let response = Arc::new(StoredResponse::new(
            StatusCode::CREATED,
            axum::http::Version::HTTP_11,
            axum::http::HeaderMap::new(),
            "kept".into(),
            Fingerprint::from_bytes([1; 32]),
        ));
        store
            .put(key.clone(), response.clone(), Duration::from_secs(60))
            .await
            .unwrap();
        let read = store.get(&key).await.unwrap().expect("kept");
        assert_eq!(read.body(), response.body());
    });
    frozen.shutdown_background();
}
