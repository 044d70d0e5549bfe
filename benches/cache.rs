//! `single_flight::Cache` beside moka, in one run:
//!
//! - `hit`: a cached key, read 1000 times per iteration from a 10,000-entry cache. Baselines:
//!   a bare moka `sync::Cache::get` (what `Cache` keeps its entries in) and moka's
//!   `future::Cache::get`. The difference is what freshness and stale windows cost on a hit:
//!   a clock read, and a clone of the value.
//! - `miss_fan_in_1000`: 1000 callers of one new key at once, the work yielding until all of
//!   them have called; baseline moka's `future::Cache::get_with`, which also runs it once.
//!
//! Run with `cargo bench --manifest-path benches/Cargo.toml --bench cache`; compare within one run.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use futures::FutureExt;
use tower_coalesce::single_flight::Cache;

const ENTRIES: u64 = 10_000;
const READS: u64 = 1000;
const FAN_IN: usize = 1000;

fn value(key: u64) -> Arc<str> {
    Arc::from(format!("report {key}"))
}

fn hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    // Inside the runtime, as in a server: tokio's clock is read there.
    let _entered = rt.enter();

    let ours: Cache<u64, Arc<str>> = Cache::builder()
        .max_capacity(ENTRIES)
        .time_to_live(Duration::from_secs(3600))
        .build();
    let moka_sync: moka::sync::Cache<u64, Arc<str>> = moka::sync::Cache::builder()
        .max_capacity(ENTRIES)
        .time_to_live(Duration::from_secs(3600))
        .build();
    let moka_future: moka::future::Cache<u64, Arc<str>> = moka::future::Cache::builder()
        .max_capacity(ENTRIES)
        .time_to_live(Duration::from_secs(3600))
        .build();
    for key in 0..ENTRIES {
        let fill = ours.get_with(key, move || async move { value(key) });
        fill.now_or_never().unwrap();
        moka_sync.insert(key, value(key));
        moka_future.insert(key, value(key)).now_or_never().unwrap();
    }

    let mut group = c.benchmark_group("hit");
    group.throughput(criterion::Throughput::Elements(READS));
    group.bench_function("moka_sync_get", |b| {
        b.iter(|| {
            for key in 0..READS {
                black_box(moka_sync.get(&(key * 7 % ENTRIES)));
            }
        })
    });
    group.bench_function("moka_future_get", |b| {
        b.iter(|| {
            for key in 0..READS {
                black_box(moka_future.get(&(key * 7 % ENTRIES)).now_or_never());
            }
        })
    });
    group.bench_function("cache_get_with", |b| {
        b.iter(|| {
            for key in 0..READS {
                let read = ours.get_with(key * 7 % ENTRIES, || async { unreachable!() });
                black_box(read.now_or_never());
            }
        })
    });
    group.finish();
}

fn miss_fan_in(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let next = AtomicU64::new(0);
    let runs = Arc::new(AtomicU64::new(0));
    let mut group = c.benchmark_group("miss_fan_in_1000");

    // The work yields until every caller has called, so that all 1000 meet one miss.
    async fn work(runs: Arc<AtomicU64>, key: u64) -> Arc<str> {
        runs.fetch_add(1, Ordering::Relaxed);
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        value(key)
    }

    let ours: Cache<u64, Arc<str>> = Cache::builder().max_capacity(ENTRIES).build();
    group.bench_function("cache_get_with", |b| {
        b.to_async(&rt).iter(|| {
            let key = next.fetch_add(1, Ordering::Relaxed);
            let calls = (0..FAN_IN).map(|_| {
                let runs = runs.clone();
                ours.get_with(key, move || work(runs, key))
            });
            futures::future::join_all(calls)
        })
    });
    let ours_runs = runs.swap(0, Ordering::Relaxed);
    let ours_rounds = next.swap(0, Ordering::Relaxed);

    let moka_future: moka::future::Cache<u64, Arc<str>> =
        moka::future::Cache::builder().max_capacity(ENTRIES).build();
    group.bench_function("moka_future_get_with", |b| {
        b.to_async(&rt).iter(|| {
            let key = next.fetch_add(1, Ordering::Relaxed);
            let calls = (0..FAN_IN).map(|_| moka_future.get_with(key, work(runs.clone(), key)));
            futures::future::join_all(calls)
        })
    });
    group.finish();
    eprintln!(
        "runs per round: cache_get_with {:.2}, moka_future_get_with {:.2}",
        ours_runs as f64 / ours_rounds.max(1) as f64,
        runs.load(Ordering::Relaxed) as f64 / next.load(Ordering::Relaxed).max(1) as f64,
    );
}

criterion_group!(benches, hit, miss_fan_in);
criterion_main!(benches);
