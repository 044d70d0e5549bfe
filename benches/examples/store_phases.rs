//! Where a round of `four_instances_one_key` (`benches/stores.rs`: 4 instances x 50
//! callers of one fresh key) goes on each shared store: from the round's start to the one
//! run of the handler (the spawning, the local coalescing, the lease), from there to the
//! last answer of the instance that ran it (the completion: the kept response, committed),
//! and from there to the last answer of the instances that waited (the release message).
//! The stores take turns round by round, so that the machine's drift lands on all alike.
//!
//!     bash -c 'PG_FSYNC=on source .ci/postgres.sh; source .ci/redis.sh; \
//!       start_redis_server REDIS_DURABLE_URL --save "" --appendonly yes --appendfsync always; \
//!       cargo run --release --manifest-path benches/Cargo.toml --example store_phases -- 4'
//!
//! The stores are the ones given, as for the bench: `REDIS_URL`, `REDIS_DURABLE_URL`,
//! `DATABASE_URL` (with `fsync` on, as the bench's `stores.sh` starts it). The argument is
//! how many instances share each store (4, the bench's, unless given): with 1, no instance
//! waits for another, so no release message is sent. Prints, per store, the median and p90
//! of each phase in microseconds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tower::{ServiceExt, service_fn};
use tower_coalesce::store::Store;

#[path = "../support/orders.rs"]
mod orders;
use orders::{Order, Svc, created, request};

const ROUNDS: usize = 300;
const CALLERS: usize = 50;

/// When, and on which instance, the handler ran in this round.
type Ran = Arc<Mutex<Option<(Instant, usize)>>>;

/// The bench's instance, whose handler also says when and where it ran.
fn instance<St: Store>(store: St, index: usize, ran: Ran) -> Svc {
    let handler = service_fn(move |_: Order| {
        let previous = ran.lock().unwrap().replace((Instant::now(), index));
        assert!(previous.is_none(), "the key ran twice");
        async { Ok(created()) }
    });
    orders::instance(store, handler)
}

/// One round: (start to the handler, handler to the running instance's last answer, that
/// to the last answer of all), in microseconds.
async fn round(instances: &[Svc], ran: &Ran, key: &str) -> [u64; 3] {
    *ran.lock().unwrap() = None;
    let start = Instant::now();
    let mut calls = Vec::new();
    for (index, svc) in instances.iter().enumerate() {
        for _ in 0..CALLERS {
            let (svc, request) = (svc.clone(), request(key));
            calls.push(tokio::spawn(async move {
                svc.oneshot(request).await.unwrap();
                (index, Instant::now())
            }));
        }
    }
    let mut last = vec![start; instances.len()];
    for call in calls {
        let (index, done) = call.await.unwrap();
        last[index] = last[index].max(done);
    }
    let (handler, runner) = ran.lock().unwrap().expect("the key ran once");
    let runner_done = last[runner];
    let all_done = last.iter().max().copied().unwrap();
    let us = |d: Duration| d.as_micros() as u64;
    [
        us(handler - start),
        us(runner_done.saturating_duration_since(handler)),
        us(all_done.saturating_duration_since(runner_done)),
    ]
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let env = |name| std::env::var(name).ok().filter(|u: &String| !u.is_empty());
    let instances_per_store: usize = match std::env::args().nth(1) {
        Some(n) => n.parse().expect("the first argument is how many instances"),
        None => 4,
    };
    let mut setups: Vec<(&str, Vec<Svc>, Ran)> = Vec::new();
    rt.block_on(async {
        let prefix = format!("tower-coalesce-phases:{}:", std::process::id());
        for (name, var) in [
            ("redis", "REDIS_URL"),
            ("redis_aof_always", "REDIS_DURABLE_URL"),
        ] {
            if let Some(url) = env(var) {
                let ran = Ran::default();
                let mut instances = Vec::new();
                for index in 0..instances_per_store {
                    let store = tower_coalesce::redis::RedisStore::connect(&url)
                        .await
                        .unwrap();
                    instances.push(instance(
                        store.with_prefix(prefix.clone()),
                        index,
                        ran.clone(),
                    ));
                }
                setups.push((name, instances, ran));
            }
        }
        if let Some(url) = env("DATABASE_URL") {
            let table = format!("tc_phases_{}", std::process::id());
            let ran = Ran::default();
            let mut instances = Vec::new();
            for index in 0..instances_per_store {
                let store = tower_coalesce::postgres::PostgresStore::builder()
                    .table(&table)
                    .connect(&url)
                    .await
                    .unwrap();
                store.migrate().await.unwrap();
                instances.push(instance(store, index, ran.clone()));
            }
            setups.push(("postgres", instances, ran));
        }
    });
    assert!(
        !setups.is_empty(),
        "no store given: REDIS_URL, REDIS_DURABLE_URL, DATABASE_URL"
    );
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut phases = vec![Vec::new(); setups.len()];
    rt.block_on(async {
        for r in 0..ROUNDS {
            for turn in 0..setups.len() {
                let which = (r + turn) % setups.len();
                let (_, instances, ran) = &setups[which];
                let key = format!(
                    "phases-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                );
                let took = round(instances, ran, &key).await;
                // The first rounds warm the connections up.
                if r >= 20 {
                    phases[which].push(took);
                }
            }
        }
    });
    println!(
        "phases of a {instances_per_store} x {CALLERS} round, µs, median / p90 ({} rounds each):",
        ROUNDS - 20
    );
    for ((name, _, _), phases) in setups.iter().zip(&phases) {
        let column = |i: usize| {
            let mut v: Vec<u64> = phases.iter().map(|p| p[i]).collect();
            v.sort_unstable();
            (percentile(&v, 0.5), percentile(&v, 0.9))
        };
        let mut total: Vec<u64> = phases.iter().map(|p| p.iter().sum()).collect();
        total.sort_unstable();
        let (a, b, c) = (column(0), column(1), column(2));
        println!(
            "{name:>17}: to the run {:>5} / {:>5}   run to its instance's answers {:>5} / {:>5}   to the waiting instances' {:>5} / {:>5}   round {:>5} / {:>5}",
            a.0,
            a.1,
            b.0,
            b.1,
            c.0,
            c.1,
            percentile(&total, 0.5),
            percentile(&total, 0.9)
        );
    }
}
