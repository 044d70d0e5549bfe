//! The shared stores beside local-only (the in-memory store), in one run: Redis, a Redis
//! Cluster and PostgreSQL, each where its server is given. Services are called in process,
//! without sockets, so that the difference is the store's alone; the handler answers at
//! once.
//!
//! - `one_caller`: a fresh key, one caller: what the store adds to a request that coalesces
//!   with nothing (a lookup-or-lease, then a store-and-release: two round trips). On Redis
//!   and the cluster it is also measured turn about, and the ratio printed.
//! - `fan_in_50`: a fresh key, 50 concurrent callers on one instance: the store is paid
//!   once per key per instance, so per caller it nearly vanishes.
//! - `four_instances_one_key`: 4 instances (a layer and a connection each) x 50 callers of
//!   one fresh key. Local-only runs the key four times; a shared store once.
//! - `four_instances_distinct_keys`: 400 requests with distinct keys over 4 instances at
//!   once: throughput when nothing coalesces.
//!
//! - `atomic_flight` (PostgreSQL only): a fresh key, one caller, a handler that inserts one
//!   row: with no shared store (the row through the pool), with the plain `PostgresStore`
//!   (the same), and in its atomic mode (the row through the flight's transaction, which
//!   the kept response then commits with). Also measured turn about, with the ratios
//!   printed.
//!
//! Each on local-only; on the Redis at `REDIS_URL` (keeping nothing on disk), the durable
//! Redis at `REDIS_DURABLE_URL` (`appendonly yes`, `appendfsync always`) and the Redis
//! Cluster at `REDIS_CLUSTER_URLS` (comma-separated) with the feature `redis`; on the
//! PostgreSQL at `DATABASE_URL` with the feature `postgres`.
//!
//! `bash benches/stores.sh` starts PostgreSQL (`fsync` on) and both Redis servers and runs
//! this bench against them.

use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::future::join_all;
use tokio::runtime::Runtime;
use tower::{ServiceExt, service_fn};
use tower_coalesce::store::{MemoryStore, Store};

#[path = "support/orders.rs"]
mod orders;
use orders::{Order, Svc, created, request};

/// An instance on `store` whose handler answers at once.
fn instance<St: Store>(store: St) -> Svc {
    orders::instance(store, service_fn(|_: Order| async { Ok(created()) }))
}

fn fresh_key() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let run = std::process::id();
    format!("bench-{run}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// `callers` concurrent calls of one fresh key on each instance.
async fn fan_in(instances: &[Svc], callers: usize) {
    let key = &fresh_key();
    let calls = instances
        .iter()
        .flat_map(|svc| (0..callers).map(move |_| tokio::spawn(svc.clone().oneshot(request(key)))));
    for done in join_all(calls.collect::<Vec<_>>()).await {
        done.unwrap().unwrap();
    }
}

async fn distinct(instances: &[Svc], per_instance: usize) {
    let calls = instances.iter().flat_map(|svc| {
        (0..per_instance).map(move |_| tokio::spawn(svc.clone().oneshot(request(&fresh_key()))))
    });
    for done in join_all(calls.collect::<Vec<_>>()).await {
        done.unwrap().unwrap();
    }
}

fn benches(c: &mut Criterion) {
    let rt: Runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let local =
        |n: usize| -> Vec<Svc> { (0..n).map(|_| instance(MemoryStore::default())).collect() };
    let mut setups = vec![("local_only", local(4))];
    #[cfg(feature = "redis")]
    setups.extend(redis(&rt));
    #[cfg(feature = "postgres")]
    setups.extend(postgres(&rt));
    if setups.len() == 1 {
        eprintln!(
            "skipped: no shared store (REDIS_URL with --features redis, DATABASE_URL with --features postgres)"
        );
        return;
    }

    let mut group = c.benchmark_group("one_caller");
    for (name, instances) in &setups {
        group.bench_function(*name, |b| {
            b.to_async(&rt).iter(|| fan_in(&instances[..1], 1))
        });
    }
    group.finish();
    // The same on one Redis and on the cluster, turn about: on a shared machine loopback
    // latency drifts from one criterion measurement to the next by more than the
    // difference between the two.
    #[cfg(feature = "redis")]
    {
        let by_name = |wanted| setups.iter().find(|(name, _)| *name == wanted);
        if let (Some((_, single)), Some((_, cluster))) =
            (by_name("redis"), by_name("redis_cluster"))
        {
            rt.block_on(interleaved(&single[0], &cluster[0]));
        }
    }

    #[cfg(feature = "postgres")]
    if let Some(flights) = atomic_flights(&rt) {
        let mut group = c.benchmark_group("atomic_flight");
        for (name, svc) in &flights {
            group.bench_function(*name, |b| {
                b.to_async(&rt)
                    .iter(|| svc.clone().oneshot(request(&fresh_key())))
            });
        }
        group.finish();
        rt.block_on(turn_about(&flights));
    }

    let mut group = c.benchmark_group("fan_in_50");
    group.throughput(Throughput::Elements(50));
    for (name, instances) in &setups {
        group.bench_function(*name, |b| {
            b.to_async(&rt).iter(|| fan_in(&instances[..1], 50))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("four_instances_one_key");
    group.throughput(Throughput::Elements(200));
    for (name, instances) in &setups {
        group.bench_function(*name, |b| b.to_async(&rt).iter(|| fan_in(instances, 50)));
    }
    group.finish();

    let mut group = c.benchmark_group("four_instances_distinct_keys");
    group.throughput(Throughput::Elements(400));
    for (name, instances) in &setups {
        group.bench_function(*name, |b| b.to_async(&rt).iter(|| distinct(instances, 100)));
    }
    group.finish();

    rt.block_on(stores_turn_about(&setups));
}

/// The two shapes that compare the stores, each store in turn within every round (so that
/// the machine's drift lands on all of them alike), 30 rounds: the mean time of a batch of
/// 400 distinct keys over 4 instances (as a throughput) and of 4 instances x 50 callers of
/// one key, with the ratios to the Redis that keeps nothing on disk.
async fn stores_turn_about(setups: &[(&'static str, Vec<Svc>)]) {
    let rounds: u32 = 30;
    let mut distinct_took = vec![std::time::Duration::ZERO; setups.len()];
    let mut fan_in_took = vec![std::time::Duration::ZERO; setups.len()];
    for round in 0..rounds {
        for turn in 0..setups.len() {
            let which = (round as usize + turn) % setups.len();
            let instances = &setups[which].1;
            let started = std::time::Instant::now();
            distinct(instances, 100).await;
            distinct_took[which] += started.elapsed();
            let started = std::time::Instant::now();
            fan_in(instances, 50).await;
            fan_in_took[which] += started.elapsed();
        }
    }
    let redis = setups.iter().position(|(name, _)| *name == "redis");
    println!("\nstores, turn about ({rounds} rounds; ratios to redis):");
    for (i, (name, _)) in setups.iter().enumerate() {
        let per_second = 400.0 * rounds as f64 / distinct_took[i].as_secs_f64();
        let batch = fan_in_took[i] / rounds;
        let ratio = |took: &[std::time::Duration]| {
            redis.map_or(f64::NAN, |r| took[i].as_secs_f64() / took[r].as_secs_f64())
        };
        println!(
            "{name:>18}: distinct keys {per_second:>8.0}/s ({:.2}x)  4 instances x 50 callers {batch:>9.2?} ({:.2}x)",
            1.0 / ratio(&distinct_took),
            ratio(&fan_in_took),
        );
    }
}

/// One caller's flights on `single` and on `cluster`, one after the other, 2,000 each,
/// three times: prints the mean of each and the ratio.
#[cfg(feature = "redis")]
async fn interleaved(single: &Svc, cluster: &Svc) {
    for _ in 0..3 {
        let mut took = [std::time::Duration::ZERO; 2];
        for i in 0..4000 {
            let svc = if i % 2 == 0 { single } else { cluster };
            let started = std::time::Instant::now();
            svc.clone().oneshot(request(&fresh_key())).await.unwrap();
            took[i % 2] += started.elapsed();
        }
        let us = |d: std::time::Duration| d.as_secs_f64() * 1e6 / 2000.0;
        println!(
            "one_caller interleaved: redis {:.1} us, redis_cluster {:.1} us: {:.2}x",
            us(took[0]),
            us(took[1]),
            took[1].as_secs_f64() / took[0].as_secs_f64()
        );
    }
}

/// 4 instances on the Redis at `REDIS_URL`, 4 on the durable Redis at `REDIS_DURABLE_URL`
/// (`appendfsync always`), and 4 on the cluster at `REDIS_CLUSTER_URLS`, where they are set.
#[cfg(feature = "redis")]
fn redis(rt: &Runtime) -> Vec<(&'static str, Vec<Svc>)> {
    use tower_coalesce::redis::RedisStore;

    let env = |name| std::env::var(name).ok().filter(|u: &String| !u.is_empty());
    let prefix = format!("tower-coalesce-bench:{}:", std::process::id());
    let mut setups = Vec::new();
    // The Redis that keeps nothing on disk, and the durable reference beside it.
    for (name, var) in [
        ("redis", "REDIS_URL"),
        ("redis_aof_always", "REDIS_DURABLE_URL"),
    ] {
        if let Some(url) = env(var) {
            let instances = rt.block_on(async {
                let mut out = Vec::new();
                for _ in 0..4 {
                    let store = RedisStore::connect(&url).await.unwrap();
                    out.push(instance(store.with_prefix(prefix.clone())));
                }
                out
            });
            setups.push((name, instances));
        }
    }
    // A Redis Cluster beside it, if there is one: each key's scripts go to its slot's master.
    if let Some(urls) = env("REDIS_CLUSTER_URLS") {
        let nodes: Vec<&str> = urls.split(',').collect();
        let instances = rt.block_on(async {
            let mut out = Vec::new();
            for _ in 0..4 {
                let store = RedisStore::connect_cluster(&nodes).await.unwrap();
                out.push(instance(store.with_prefix(prefix.clone())));
            }
            out
        });
        setups.push(("redis_cluster", instances));
    }
    setups
}

/// 4 instances on the PostgreSQL at `DATABASE_URL`, each with a pool of its own, on a
/// table of this run.
#[cfg(feature = "postgres")]
fn postgres(rt: &Runtime) -> Vec<(&'static str, Vec<Svc>)> {
    use tower_coalesce::postgres::PostgresStore;

    let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
        return Vec::new();
    };
    let table = format!("tc_bench_{}", std::process::id());
    let instances = rt.block_on(async {
        let mut out = Vec::new();
        for _ in 0..4 {
            let store = PostgresStore::builder()
                .table(&table)
                .connect(&url)
                .await
                .unwrap();
            store.migrate().await.unwrap();
            out.push(instance(store));
        }
        out
    });
    vec![("postgres", instances)]
}

/// One instance each of: no shared store, the plain `PostgresStore`, and its atomic mode,
/// with a handler that inserts one row (through the flight's transaction in atomic mode,
/// else through the pool), on tables of this run.
#[cfg(feature = "postgres")]
fn atomic_flights(rt: &Runtime) -> Option<Vec<(&'static str, Svc)>> {
    use tower_coalesce::postgres::PostgresStore;

    let url = std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())?;
    let (table, rows) = (
        format!("tc_bench_atomic_{}", std::process::id()),
        format!("tc_bench_rows_{}", std::process::id()),
    );
    let insert: std::sync::Arc<str> = format!("INSERT INTO {rows} (key) VALUES ($1)").into();
    Some(rt.block_on(async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .unwrap();
        sqlx::query(&format!("CREATE TABLE {rows} (key text NOT NULL)"))
            .execute(&pool)
            .await
            .unwrap();
        let store = |pool: sqlx::PgPool| {
            let table = table.clone();
            async move {
                let store = PostgresStore::builder()
                    .table(table)
                    .build(pool)
                    .await
                    .unwrap();
                store.migrate().await.unwrap();
                store
            }
        };
        let plain = store(pool.clone()).await;
        let atomic = store(pool.clone()).await.atomic();
        let no_store = MemoryStore::default();
        vec![
            ("no_store", writing(no_store, pool.clone(), insert.clone())),
            ("postgres", writing(plain, pool.clone(), insert.clone())),
            ("postgres_atomic", writing(atomic, pool, insert)),
        ]
    }))
}

/// An instance on `store` whose handler inserts one row, `insert` with the key: through the
/// flight's transaction in atomic mode, else through `pool`.
#[cfg(feature = "postgres")]
fn writing<St: Store>(store: St, pool: sqlx::PgPool, insert: std::sync::Arc<str>) -> Svc {
    use tower_coalesce::postgres::Tx;

    let handler = service_fn(move |req: Order| {
        let (pool, insert) = (pool.clone(), insert.clone());
        async move {
            let key = req.headers()["idempotency-key"]
                .to_str()
                .unwrap()
                .to_owned();
            let insert = sqlx::query(&insert).bind(key);
            match req.extensions().get::<Tx>() {
                Some(tx) => insert.execute(&mut *tx.lock().await.unwrap()).await,
                None => insert.execute(&pool).await,
            }
            .unwrap();
            Ok(created())
        }
    });
    orders::instance(store, handler)
}

/// The atomic flights, one after the other, 1,000 each, three times: prints each mean
/// and its ratio to the plain store's.
#[cfg(feature = "postgres")]
async fn turn_about(flights: &[(&'static str, Svc)]) {
    for _ in 0..3 {
        let mut took = vec![std::time::Duration::ZERO; flights.len()];
        for i in 0..1000 * flights.len() {
            let svc = &flights[i % flights.len()].1;
            let started = std::time::Instant::now();
            svc.clone().oneshot(request(&fresh_key())).await.unwrap();
            took[i % flights.len()] += started.elapsed();
        }
        let us = |d: std::time::Duration| d.as_secs_f64() * 1e6 / 1000.0;
        let plain = took[1].as_secs_f64();
        let line: Vec<String> = flights
            .iter()
            .zip(&took)
            .map(|((name, _), took)| {
                format!(
                    "{name} {:.1} us ({:.2}x postgres)",
                    us(*took),
                    took.as_secs_f64() / plain
                )
            })
            .collect();
        println!("atomic_flight turn about: {}", line.join(", "));
    }
}

criterion_group!(stores, benches);
criterion_main!(stores);
