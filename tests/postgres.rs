//! `PostgresStore`, several instances of an app in one test process on one PostgreSQL: a
//! key runs once across all of them, distinct keys each run once, a dropped leader hands
//! over at once (the release message) with a higher fencing token, PostgreSQL killed and
//! restarted loses no kept response and hangs no request, and the table stays bounded
//! under a flood of distinct keys.
//!
//! The shared server comes from `DATABASE_URL` (`.ci/run` starts one); the restart test
//! starts a server of its own. Under `CI=true` a missing server fails the tests.
#![cfg(all(feature = "postgres", feature = "idempotency"))]

mod support;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use futures::StreamExt;
use futures::future::join_all;
use support::instances::{
    assert_fencing_across_a_takeover, fire, instance, micros_since_1970,
    one_run_for_fifty_callers_each, post,
};
use support::postgres::{Server, database_url, pool, rows, store, table};
use support::{Counter, Gate, eventually, eventually_async};
use tower_coalesce::idempotency::OnStoreError;
use tower_coalesce::postgres::PostgresStore;
use tower_coalesce::store::Lease;
use tower_coalesce::store::{Store, StoreKey, StoredResponse};

const LEASE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(500);
/// How long a response kept by a test's own store call is kept.
const TTL: Duration = Duration::from_secs(30);

/// 4 instances x 50 concurrent requests with one key: one run, 200 identical answers (the
/// 150 of the instances that waited are replays of the kept response).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_instances_run_a_key_once_for_all_two_hundred_callers() {
    let Some(url) = database_url() else {
        return;
    };
    let (pool, table) = (pool(&url).await, table());
    let (runs, gate) = (Counter::default(), Gate::closed());
    let mut instances = Vec::new();
    for _ in 0..4 {
        let store = store(&pool, &table, LEASE, POLL).await;
        instances.push(instance(store, OnStoreError::FailClosed, &runs, &gate).await);
    }
    one_run_for_fifty_callers_each(&instances, &runs, &gate, "order-42").await;
    let errors: u64 = instances.iter().map(|i| i.metrics.store_errors()).sum();
    assert_eq!(errors, 0);
}

/// 60 distinct keys, each posted to the 4 instances at once: 60 runs, every caller of a
/// key answered by its one run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_keys_over_four_instances_run_sixty_times() {
    let Some(url) = database_url() else {
        return;
    };
    let (pool, table) = (pool(&url).await, table());
    let (runs, gate) = (Counter::default(), Gate::closed());
    gate.open();
    let mut instances = Vec::new();
    for _ in 0..4 {
        let store = store(&pool, &table, LEASE, POLL).await;
        instances.push(instance(store, OnStoreError::FailClosed, &runs, &gate).await);
    }
    let requests: Vec<_> = (0..60)
        .map(|k| (k, fire(&instances, &format!("order-{k}"), 1)))
        .collect();
    for (k, requests) in requests {
        let answers: Vec<_> = join_all(requests)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert!(
            answers.iter().all(|a| a.status == StatusCode::CREATED
                && a.run == answers[0].run
                && a.body == answers[0].body),
            "key {k}: {answers:?}"
        );
    }
    assert_eq!(runs.get(), 60);
    assert_eq!(rows(&pool, &table).await, 60);
}

/// The stalled instance's only caller disconnects: the lease is released with a message,
/// and the other instance takes over at once (lease and poll interval are 30 s), with a
/// higher fencing token; tokens are at least the database clock in microseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_leader_hands_over_at_once_with_a_higher_fencing_token() {
    let Some(url) = database_url() else {
        return;
    };
    let (_, _, stalled, other) = two_unhurried_stores(&url).await;
    assert_fencing_across_a_takeover(stalled, other).await;
}

/// Two stores on a new table of the server at `url`, whose leases and poll intervals are
/// 30 s: within a test, only a release message wakes a waiting one.
async fn two_unhurried_stores(url: &str) -> (sqlx::PgPool, String, PostgresStore, PostgresStore) {
    let (pool, table) = (pool(url).await, table());
    let long = Duration::from_secs(30);
    let a = store(&pool, &table, long, long).await;
    let b = store(&pool, &table, long, long).await;
    (pool, table, a, b)
}

/// An instance that died without a word holds a lease (written as its lease statement
/// would, then never renewed nor released): another takes the key over once the lease has
/// expired, within the lease and a poll interval, with a higher fencing token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_that_is_never_released_is_taken_over_when_it_expires() {
    let Some(url) = database_url() else {
        return;
    };
    let (pool, table) = (pool(&url).await, table());
    let (lease, poll) = (Duration::from_millis(600), Duration::from_millis(100));
    let other = store(&pool, &table, lease, poll).await;
    let key = StoreKey::from_bytes([7; 32]);
    let dead_fence = micros_since_1970() as i64;
    sqlx::query(&format!(
        "INSERT INTO {table} (key, lease_token, lease_until, fence)
         VALUES ($1, 'dead', now() + interval '600 milliseconds', $2)"
    ))
    .bind(&key.as_bytes()[..])
    .bind(dead_fence)
    .execute(&pool)
    .await
    .unwrap();

    let started = Instant::now();
    let taken = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match other.lease(&key).await.unwrap() {
                Lease::Held(guard) => break guard,
                Lease::HeldElsewhere => other.released(&key).await,
                other => panic!("{other:?}"),
            }
        }
    })
    .await
    .expect("the dead lease was never taken over");
    let waited = started.elapsed();
    assert!(waited >= lease - Duration::from_millis(100), "{waited:?}");
    assert!(
        waited < lease + poll + Duration::from_millis(500),
        "{waited:?}"
    );
    assert!(taken.fence().unwrap().get() > dead_fence as u64);
    taken.complete(None).await.unwrap();
}

/// A release message (`pg_notify`) goes out only for a key another instance waits for:
/// the waiter marks the row (`wanted`) and is woken by the message at once (lease and poll
/// are 30 s); a key nobody else waited for sends none, since every notifying commit in the
/// cluster queues on one lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_message_goes_out_only_for_a_key_another_instance_waits_for() {
    let Some(url) = database_url() else {
        return;
    };
    let (pool, table) = (pool(&url).await, table());
    let long = Duration::from_secs(30);
    let (runs, gate) = (Counter::default(), Gate::closed());
    let a = instance(
        store(&pool, &table, long, long).await,
        OnStoreError::FailClosed,
        &runs,
        &gate,
    )
    .await;
    let b = instance(
        store(&pool, &table, long, long).await,
        OnStoreError::FailClosed,
        &runs,
        &gate,
    )
    .await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener.listen(&format!("{table}_released")).await.unwrap();

    let first = tokio::spawn(post(a.addr, "waited-for"));
    runs.reach(1).await;
    let second = tokio::spawn(post(b.addr, "waited-for"));
    // B waits on A's lease and has said so on the row.
    let wanted = format!("SELECT count(*) > 0 FROM {table} WHERE wanted");
    eventually_async("B waits", || async {
        sqlx::query_scalar::<_, bool>(&wanted)
            .fetch_one(&pool)
            .await
            .unwrap()
    })
    .await;
    let released = Instant::now();
    gate.open();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert!(
        released.elapsed() < Duration::from_secs(10),
        "{:?}",
        released.elapsed()
    );
    assert!(second.replayed, "{second:?}");
    assert_eq!((first.body, runs.get()), (second.body, 1));
    let message = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await;
    assert!(
        matches!(message, Ok(Ok(_))),
        "the waited-for key's release: {message:?}"
    );

    // Keys nobody else waits for: run, kept, replayed, and not a message.
    for key in ["alone-1", "alone-2", "alone-3", "alone-1"] {
        assert_eq!(post(a.addr, key).await.status, StatusCode::CREATED);
    }
    assert_eq!(runs.get(), 4);
    let message = tokio::time::timeout(Duration::from_secs(1), listener.recv()).await;
    assert!(
        message.is_err(),
        "a release nobody waited for was sent: {message:?}"
    );
}

/// A release message carries the response the release kept, up to 3900 bytes: the waiting
/// instance has it from the message (the poll interval is 30 s, so it is not a look after
/// the poll), equal to what was kept, without looking it up; a larger response is looked
/// up as before (`None`). The instance registered for the release before its lease
/// statement, so the release is heard whether it comes while the instance waits or before
/// it began to (with no statement of its own in between). A waiter that registered after a
/// release never takes its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_message_carries_a_small_kept_response_to_the_waiting_instance() {
    let Some(url) = database_url() else {
        return;
    };
    let (pool, table, a, b) = two_unhurried_stores(&url).await;
    let response = |body: Vec<u8>| {
        std::sync::Arc::new(StoredResponse::new(
            StatusCode::CREATED,
            axum::http::Version::HTTP_11,
            axum::http::HeaderMap::from_iter([(
                axum::http::header::LOCATION,
                axum::http::HeaderValue::from_static("/orders/7"),
            )]),
            bytes::Bytes::from(body),
            tower_coalesce::store::Fingerprint::from_bytes([3; 32]),
        ))
    };
    let cases = [(1u8, 13, true), (2, 3800, true), (3, 4000, false)];
    for ((n, size, carried), released_first) in cases
        .into_iter()
        .flat_map(|case| [(case, false), (case, true)])
    {
        let key = StoreKey::from_bytes([n + 10 * u8::from(released_first); 32]);
        let Lease::Held(guard) = a.lease(&key).await.unwrap() else {
            panic!("A takes the fresh key's lease")
        };
        assert!(matches!(b.lease(&key).await.unwrap(), Lease::HeldElsewhere));
        // B's lease statement said on the row that it waits.
        let wanted = format!("SELECT wanted FROM {table} WHERE key = $1");
        let marked: bool = sqlx::query_scalar(&wanted)
            .bind(&key.as_bytes()[..])
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(marked, "B's lost lease marks the row");
        let kept = response(vec![b'x'; size]);
        let waiting =
            |b: PostgresStore, key: StoreKey| async move { b.released_response(&key).await };
        let started = Instant::now();
        let answer = match released_first {
            false => {
                let waiting = tokio::spawn(waiting(b.clone(), key.clone()));
                tokio::time::sleep(Duration::from_millis(20)).await;
                guard.complete(Some((kept.clone(), TTL))).await.unwrap();
                tokio::time::timeout(Duration::from_secs(10), waiting)
                    .await
                    .map(Result::unwrap)
            }
            true => {
                guard.complete(Some((kept.clone(), TTL))).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
                tokio::time::timeout(Duration::from_secs(10), waiting(b.clone(), key.clone())).await
            }
        };
        let answer = answer.expect("woken by the release message");
        assert!(started.elapsed() < Duration::from_secs(10));
        match (answer, carried) {
            (Some(answer), true) => {
                assert_eq!(answer.status(), kept.status());
                assert_eq!(answer.headers(), kept.headers());
                assert_eq!(answer.body(), kept.body());
                assert_eq!(answer.fingerprint(), kept.fingerprint());
            }
            (None, false) => {}
            (answer, _) => panic!("{size} bytes, released first {released_first}: {answer:?}"),
        }
        // A waiter that comes after the release finds no lease, and no answer of it.
        assert!(b.released_response(&key).await.is_none());
    }
}

/// Two flights of one key on one instance told to wait by their lease statements at once:
/// neither takes the other's registration for the release (made before the other's
/// statement, not its own); both register again and look whether the lease is still held,
/// so a release that came before is not waited for until the poll interval (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_flights_told_to_wait_at_once_still_hear_an_earlier_release() {
    let Some(url) = database_url() else {
        return;
    };
    let (_, _, a, b) = two_unhurried_stores(&url).await;
    let key = StoreKey::from_bytes([42; 32]);
    let Lease::Held(guard) = a.lease(&key).await.unwrap() else {
        panic!("A takes the fresh key's lease")
    };
    for _ in 0..2 {
        assert!(matches!(b.lease(&key).await.unwrap(), Lease::HeldElsewhere));
    }
    guard.complete(None).await.unwrap();
    let started = Instant::now();
    for _ in 0..2 {
        let answer = tokio::time::timeout(Duration::from_secs(10), b.released_response(&key)).await;
        assert!(matches!(answer, Ok(None)), "{answer:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A lease is committed without waiting for the disk (it is soft state), so PostgreSQL
/// killed right after a leader took one, while its handler runs, may lose it, and another
/// instance may then take the key over after the restart. Whether the lease was lost or
/// not, the key has one answer: every `201` any caller gets is the same, and so is every
/// retry on either instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_lost_in_a_crash_still_leaves_the_key_one_answer() {
    let Some(server) = Server::start() else {
        return;
    };
    let (pool, table) = (server.pool().await, table());
    let (runs, gate) = (Counter::default(), Gate::closed());
    let (lease, poll) = (Duration::from_secs(2), Duration::from_millis(100));
    let a = instance(
        store(&pool, &table, lease, poll).await,
        OnStoreError::FailClosed,
        &runs,
        &gate,
    )
    .await;
    let b = instance(
        store(&pool, &table, lease, poll).await,
        OnStoreError::FailClosed,
        &runs,
        &gate,
    )
    .await;

    let first = tokio::spawn(post(a.addr, "order-crash"));
    runs.reach(1).await;
    server.kill();
    server.start_again();
    // B's caller either waits on A's lease (it survived) or takes the key over (it did not).
    let second = tokio::spawn(post(b.addr, "order-crash"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    gate.open();
    let answers = [first.await.unwrap(), second.await.unwrap()];
    let kept = loop {
        let retry = post(b.addr, "order-crash").await;
        if retry.replayed {
            break retry;
        }
        assert_ne!(
            retry.status,
            StatusCode::CREATED,
            "a fresh 201 for a key that ran: {retry:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for answer in answers
        .iter()
        .filter(|answer| answer.status == StatusCode::CREATED)
    {
        assert_eq!(
            (&answer.body, &answer.run),
            (&kept.body, &kept.run),
            "{answers:?}"
        );
    }
    for addr in [a.addr, b.addr] {
        let retry = post(addr, "order-crash").await;
        assert_eq!((retry.replayed, &retry.body), (true, &kept.body));
    }
    assert!((1..=2).contains(&runs.get()), "{}", runs.get());
}

/// PostgreSQL killed (`pg_ctl stop -m immediate`) and started again: requests during the
/// outage are answered promptly (the `FailClosed` instance `503`, the `FailOpen` one runs
/// them), the response kept before the crash is replayed after it, and keys coalesce
/// across instances again, woken by release messages on the listener's new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_restart_loses_no_kept_response_and_hangs_no_request() {
    let Some(server) = Server::start() else {
        return;
    };
    let (pool, table) = (server.pool().await, table());
    let (runs, gate) = (Counter::default(), Gate::closed());
    gate.open();
    let long = Duration::from_secs(30);
    let closed = instance(
        store(&pool, &table, long, long).await,
        OnStoreError::FailClosed,
        &runs,
        &gate,
    )
    .await;
    let open = instance(
        store(&pool, &table, long, long).await,
        OnStoreError::FailOpen,
        &runs,
        &gate,
    )
    .await;
    let kept = post(closed.addr, "order-1").await;
    assert_eq!(
        (kept.status, kept.run.as_deref()),
        (StatusCode::CREATED, Some("1"))
    );

    server.kill();
    let down = Instant::now();
    let refused = post(closed.addr, "order-2").await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    let ran = post(open.addr, "order-3").await;
    assert_eq!(ran.status, StatusCode::CREATED);
    assert!(
        down.elapsed() < Duration::from_secs(5),
        "{:?}",
        down.elapsed()
    );

    server.start_again();
    let replayed = loop {
        let answer = post(open.addr, "order-1").await;
        if answer.replayed {
            break answer;
        }
        assert!(down.elapsed() < Duration::from_secs(30), "{answer:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(replayed.body, kept.body);
    assert_eq!(replayed.run, kept.run);

    // Coalescing across instances again: a key held by one instance, waited on by the
    // other, which is woken by the release message (lease and poll are 30 s), so the
    // listener has a connection again.
    let gate = Gate::closed();
    let runs = Counter::default();
    let held = instance(
        store(&pool, &table, long, long).await,
        OnStoreError::FailClosed,
        &runs,
        &gate,
    )
    .await;
    let first = tokio::spawn(post(held.addr, "order-4"));
    runs.reach(1).await;
    let second = tokio::spawn(post(closed.addr, "order-4"));
    eventually("the other instance waits on the lease", || {
        closed.metrics.flights_waiting_elsewhere() >= 1
    })
    .await;
    let released = Instant::now();
    gate.open();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert!(released.elapsed() < Duration::from_secs(10));
    assert_eq!(runs.get(), 1);
    assert!(second.replayed);
    assert_eq!(first.body, second.body);
}

/// The store's own pool (`connect`) pings no connection before a statement: after
/// PostgreSQL restarted, every idle connection is dead, and the statements that find them
/// go on to live ones rather than fail. Each store call right after the restart answers
/// (the group take, which runs once, on a connection that answered a ping; the lookup, the
/// lease and the completion of a request through the layer, which is `FailClosed`: a
/// failed statement would be a `503`), and the response kept before the restart is
/// replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_restart_dead_connections_are_reconnects_not_failed_statements() {
    let Some(server) = Server::start() else {
        return;
    };
    let table = table();
    let connect = || async {
        let store = PostgresStore::builder()
            .table(&table)
            .connect(&server.url())
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store
    };
    let (store, runs, gate) = (connect().await, Counter::default(), Gate::closed());
    gate.open();
    let app = instance(connect().await, OnStoreError::FailClosed, &runs, &gate).await;
    let kept = post(app.addr, "order-1").await;
    assert_eq!(kept.status, StatusCode::CREATED);
    // Every connection of both pools open and idle: eight statements at once on each.
    let key = StoreKey::from_bytes([9; 32]);
    let lookups = (0..8).map(|_| store.get(&key));
    assert!(join_all(lookups).await.iter().all(Result::is_ok));
    let warm: Vec<String> = (0..8).map(|k| format!("warm-{k}")).collect();
    join_all(warm.iter().map(|key| post(app.addr, key))).await;
    // The HTTP cache's group take (not safe to repeat: it deletes what it answers).
    let group = StoreKey::from_bytes([8; 32]);
    let ttl = Duration::from_secs(60);
    store.add_to_group(&group, &key, ttl).await.unwrap();

    server.kill();
    server.start_again();
    drop(server.pool().await); // Up again: takes connections.

    assert_eq!(
        store.take_group(&group).await.unwrap(),
        std::slice::from_ref(&key)
    );
    assert!(matches!(store.get(&key).await, Ok(None)));
    let fresh = post(app.addr, "order-2").await;
    assert_eq!(fresh.status, StatusCode::CREATED, "{fresh:?}");
    let replayed = post(app.addr, "order-1").await;
    assert_eq!((replayed.replayed, &replayed.body), (true, &kept.body));
    assert_eq!(app.metrics.store_errors(), 0);
}

/// 100,000 distinct keys kept for 1 s: once they have expired, the sweeps (every 200 ms,
/// in batches) empty the table, and every expired key reads as missing at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_distinct_keys_is_swept_once_expired() {
    let Some(url) = database_url() else {
        return;
    };
    let (pool, table) = (pool(&url).await, table());
    let store = PostgresStore::builder()
        .table(&table)
        .sweep_interval(Duration::from_millis(200))
        .timeout(Duration::from_secs(10))
        .build(pool.clone())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let response = std::sync::Arc::new(StoredResponse::new(
        StatusCode::CREATED,
        axum::http::Version::HTTP_11,
        axum::http::HeaderMap::new(),
        bytes::Bytes::from_static(b"created"),
        tower_coalesce::store::Fingerprint::from_bytes([1; 32]),
    ));
    let keys = 100_000u32;
    let started = Instant::now();
    futures::stream::iter(0..keys)
        .map(|i| {
            let (store, response) = (store.clone(), response.clone());
            let mut key = [0; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            async move {
                let ttl = Duration::from_secs(1);
                store.put(StoreKey::from_bytes(key), response, ttl).await
            }
        })
        .buffer_unordered(16)
        .for_each(|put| async { put.unwrap() })
        .await;
    eprintln!("{keys} keys kept in {:?}", started.elapsed());
    assert!(rows(&pool, &table).await > 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = rows(&pool, &table).await;
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} rows left");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("table empty {:?} after the first put", started.elapsed());
    assert!(
        store
            .get(&StoreKey::from_bytes([0; 32]))
            .await
            .unwrap()
            .is_none()
    );
}

/// A missing table is an error that says how to make it; a bad table name is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_and_a_bad_name_are_clear_errors() {
    let Some(url) = database_url() else {
        return;
    };
    let pool = pool(&url).await;
    let store = PostgresStore::builder()
        .table(table())
        .build(pool.clone())
        .await
        .unwrap();
    let error = store.get(&StoreKey::from_bytes([0; 32])).await.unwrap_err();
    assert!(error.to_string().contains("migrate"), "{error}");
    let error = PostgresStore::builder()
        .table("users; DROP TABLE users")
        .build(pool.clone())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("table name"), "{error}");
    // Two migrations at once, and again: no error.
    let store = PostgresStore::builder()
        .table(table())
        .build(pool.clone())
        .await
        .unwrap();
    let (a, b) = tokio::join!(store.migrate(), store.migrate());
    a.unwrap();
    b.unwrap();
    store.migrate().await.unwrap();
}

/// The HTTP cache on `PostgresStore`: a miss on two instances at once runs once, and the
/// other instance answers from the kept response.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_http_cache_runs_a_miss_once_across_instances() {
    let Some(url) = database_url() else {
        return;
    };
    let (pool, table) = (pool(&url).await, table());
    let runs = Counter::default();
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let runs = runs.clone();
        let handler = move || {
            let n = runs.incr() + 1;
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                ([("cache-control", "max-age=60")], format!("report {n}"))
            }
        };
        let cache = tower_coalesce::http_cache::HttpCacheLayer::new()
            .unscoped()
            .store(store(&pool, &table, LEASE, POLL).await);
        let app = axum::Router::new()
            .route("/report", axum::routing::get(handler))
            .layer(cache);
        addrs.push(support::serve(app).await);
    }
    let get = |addr: std::net::SocketAddr| async move {
        let res = reqwest::get(format!("http://{addr}/report")).await.unwrap();
        let status = support::header(&res, "cache-status").unwrap();
        (res.text().await.unwrap(), status)
    };
    let answers = join_all((0..20).map(|i| get(addrs[i % 2]))).await;
    assert_eq!(runs.get(), 1);
    assert!(
        answers.iter().all(|(body, _)| body == "report 1"),
        "{answers:?}"
    );
    let (body, status) = get(addrs[1]).await;
    assert_eq!(body, "report 1");
    assert!(status.contains("; hit"), "{status}");
}

/// PostgreSQL slow (the table locked by another transaction): every call gives up at the
/// store's timeout, and the request is answered then, `503` under `FailClosed` or run under
/// `FailOpen`, never held for the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_postgres_costs_a_timeout_never_a_hang() {
    let Some(url) = database_url() else {
        return;
    };
    let (pool, table) = (pool(&url).await, table());
    let (runs, gate) = (Counter::default(), Gate::closed());
    gate.open();
    let timeout = Duration::from_millis(300);
    let slow_store = || async {
        let store = PostgresStore::builder()
            .table(&table)
            .timeout(timeout)
            .build(pool.clone())
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store
    };
    let closed = instance(slow_store().await, OnStoreError::FailClosed, &runs, &gate).await;
    let open = instance(slow_store().await, OnStoreError::FailOpen, &runs, &gate).await;

    let mut lock = pool.begin().await.unwrap();
    sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        .execute(&mut *lock)
        .await
        .unwrap();
    let started = Instant::now();
    let (refused, ran) = tokio::join!(post(closed.addr, "order-1"), post(open.addr, "order-2"));
    let took = started.elapsed();
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ran.status, StatusCode::CREATED);
    assert!(took < timeout * 4, "{took:?}");
    lock.rollback().await.unwrap();

    // Once the lock is gone, the store answers again.
    assert_eq!(
        post(closed.addr, "order-3").await.status,
        StatusCode::CREATED
    );
}
