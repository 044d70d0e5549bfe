//! Side-by-side costs of coalescing, in one run:
//!
//! - `distinct_keys`: one call per key, nothing to share: the overhead a coalescer adds to
//!   every request that does not overlap with another. Baseline: a bare `DashMap` insert +
//!   remove, the least any registry does, with each hasher (`Group`'s default is aHash).
//! - `fan_in_1000`: 1000 tasks call with one key at once; the work completes once every
//!   caller has registered. One round = spawn, share, join. Executions per round are
//!   counted and printed at the end: anything above 1.00 is duplicated work. Two shapes of
//!   work: `released`, which sleeps until the round's release wakes it once, and `yielding`,
//!   which yields to the scheduler until every caller has registered, so that it is polled
//!   many times before it completes (as a database call over a socket is woken many times).
//!   A third shape, `entered`, is an independent harness's: each task counts itself as
//!   entered before it calls, and the work yields until every caller has entered, then 8
//!   more times. `no_coalescer_floor` is the runtime's own cost of a round: the callers wait
//!   for the release without any coalescer, and the work never runs (0 executions; under
//!   `entered`, the first caller yields as the work would, then releases the others).
//!
//! Run with `cargo bench --manifest-path benches/Cargo.toml --bench coalesce`; compare within one run.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{Future, ready};
use std::hash::BuildHasher;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[path = "support/fanin.rs"]
mod fanin;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use dashmap::DashMap;
use fanin::Dedup;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_coalesce::coalesce::CoalesceLayer;
use tower_coalesce::single_flight::Group;

const FAN_IN: usize = 1000;

/// The obvious hand-rolled coalescer: a mutex around a map of shared boxed futures.
#[derive(Clone, Default)]
struct HandRolled {
    map: Arc<Mutex<HashMap<u64, Shared<BoxFuture<'static, u64>>>>>,
}

impl HandRolled {
    async fn work(&self, key: u64, fut: impl Future<Output = u64> + Send + 'static) -> u64 {
        let (shared, leader) = {
            let mut map = self.map.lock().unwrap();
            match map.get(&key) {
                Some(shared) => (shared.clone(), false),
                None => {
                    let shared = fut.boxed().shared();
                    map.insert(key, shared.clone());
                    (shared, true)
                }
            }
        };
        let value = shared.await;
        if leader {
            self.map.lock().unwrap().remove(&key);
        }
        value
    }
}

fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn multi_thread() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap()
}

fn distinct_keys(c: &mut Criterion) {
    let mut group = c.benchmark_group("distinct_keys");
    let rt = current_thread();
    let next = AtomicU64::new(0);
    let key = || next.fetch_add(1, Ordering::Relaxed);

    // The floor of any registry, with each hasher a group can use.
    fn floor<S: BuildHasher + Clone>(
        group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
        name: &str,
        hasher: S,
        key: &dyn Fn() -> u64,
    ) {
        let map: DashMap<u64, (), S> = DashMap::with_hasher(hasher);
        group.bench_function(name, |b| {
            b.iter(|| {
                let k = key();
                map.insert(k, ());
                black_box(map.remove(&k));
            })
        });
    }
    floor(
        &mut group,
        "dashmap_insert_remove_siphash",
        std::hash::RandomState::new(),
        &key,
    );
    floor(
        &mut group,
        "dashmap_insert_remove_ahash",
        ahash::RandomState::new(),
        &key,
    );
    floor(
        &mut group,
        "dashmap_insert_remove_foldhash",
        foldhash::fast::RandomState::default(),
        &key,
    );

    let bare = service_fn(|k: u64| ready(Ok::<_, Infallible>(k)));
    group.bench_function("bare_service", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = bare;
            async move { svc.ready().await.unwrap().call(key()).await.unwrap() }
        })
    });

    // One service called again and again, as the group is: the layer's own cost.
    let coalesce = CoalesceLayer::new(|k: &u64| Some(*k)).layer(bare);
    let one = std::cell::RefCell::new(coalesce.clone());
    group.bench_function("coalesce_layer", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = one.borrow_mut();
            // Always ready (followers never call the inner service): no await needed.
            let ready =
                svc.poll_ready(&mut std::task::Context::from_waker(std::task::Waker::noop()));
            assert!(ready.is_ready());
            svc.call(key()).map(Result::unwrap)
        })
    });
    // A clone per request, as axum and hyper do: the clone shares the registry (one `Arc`).
    group.bench_function("coalesce_layer_cloned", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = coalesce.clone();
            async move { svc.ready().await.unwrap().call(key()).await.unwrap() }
        })
    });

    let unkeyed = CoalesceLayer::new(|_: &u64| None::<u64>).layer(bare);
    group.bench_function("coalesce_layer_unkeyed", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = unkeyed.clone();
            async move { svc.ready().await.unwrap().call(key()).await.unwrap() }
        })
    });

    let ours: Group<u64, u64> = Group::new();
    group.bench_function("single_flight_group", |b| {
        b.to_async(&rt).iter(|| {
            let k = key();
            ours.run(k, move || ready(k)).map(|o| o.into_value())
        })
    });
    let sip: Group<u64, u64, std::hash::RandomState> = Group::with_hasher(Default::default());
    group.bench_function("single_flight_group_siphash", |b| {
        b.to_async(&rt).iter(|| {
            let k = key();
            sip.run(k, move || ready(k)).map(|o| o.into_value())
        })
    });
    let fold: Group<u64, u64, foldhash::fast::RandomState> = Group::with_hasher(Default::default());
    group.bench_function("single_flight_group_foldhash", |b| {
        b.to_async(&rt).iter(|| {
            let k = key();
            fold.run(k, move || ready(k)).map(|o| o.into_value())
        })
    });

    let hand = HandRolled::default();
    group.bench_function("hand_rolled_mutex_shared", |b| {
        b.to_async(&rt).iter(|| {
            let k = key();
            hand.work(k, ready(k))
        })
    });

    let sfa = singleflight_async::SingleFlight::<u64, u64>::new();
    group.bench_function("singleflight_async", |b| {
        b.to_async(&rt).iter(|| {
            let k = key();
            sfa.work(k, move || ready(k))
        })
    });

    let asf = async_singleflight::UnaryGroup::<u64, u64>::new();
    group.bench_function("async_singleflight", |b| {
        b.to_async(&rt).iter(|| {
            let k = key();
            let asf = &asf;
            async move { asf.work(&k, ready(k)).await }
        })
    });

    let moka = moka::future::Cache::<u64, u64>::new(10_000);
    group.bench_function("moka_get_with", |b| {
        b.to_async(&rt).iter(|| {
            let k = key();
            let moka = &moka;
            async move {
                let v = moka.get_with(k, ready(k)).await;
                moka.invalidate(&k).await;
                v
            }
        })
    });
    group.finish();
}

/// One fan-in round: `FAN_IN` tasks, each polls its call once (so it is registered with the
/// coalescer) and checks in; the last to check in releases the work.
type Caller = Arc<dyn Fn(Arc<Round>, Arc<AtomicUsize>) -> BoxFuture<'static, u64> + Send + Sync>;

/// Resets a contender between rounds (moka caches what it computed).
type AfterRound = Box<dyn Fn() + Send>;

/// One fan-in round's signals: the release (closed once every caller has polled its call
/// once), the callers entered so far (under `entered`), and whether the floor's first
/// caller is taken.
struct Round {
    release: Semaphore,
    entered: AtomicUsize,
    floor_first: std::sync::atomic::AtomicBool,
}

async fn fan_in_round(caller: Caller, executions: Arc<AtomicUsize>) {
    let round = Arc::new(Round {
        release: Semaphore::new(0),
        entered: AtomicUsize::new(0),
        floor_first: std::sync::atomic::AtomicBool::new(false),
    });
    let checked_in = Arc::new(AtomicUsize::new(0));
    let entered_shape = shape() == Shape::Entered;
    let tasks: Vec<_> = (0..FAN_IN)
        .map(|_| {
            let (caller, round, checked_in, executions) = (
                caller.clone(),
                round.clone(),
                checked_in.clone(),
                executions.clone(),
            );
            tokio::spawn(async move {
                if entered_shape {
                    // Entered before the call, as that harness counts.
                    round.entered.fetch_add(1, Ordering::AcqRel);
                    return caller(round, executions).await;
                }
                let mut call = caller(round.clone(), executions);
                let first = futures::poll!(&mut call);
                if checked_in.fetch_add(1, Ordering::AcqRel) + 1 == FAN_IN {
                    round.release.close();
                }
                match first {
                    std::task::Poll::Ready(v) => v,
                    std::task::Poll::Pending => call.await,
                }
            })
        })
        .collect();
    for task in tasks {
        black_box(task.await.unwrap());
    }
}

/// The shared work: counts itself, then waits for the round's release (a closed semaphore),
/// yielding or not, or yields until every caller has entered and 8 times more.
async fn work(round: Arc<Round>, executions: Arc<AtomicUsize>) -> u64 {
    executions.fetch_add(1, Ordering::Relaxed);
    match shape() {
        Shape::Entered => yield_until_entered(&round).await,
        // Polled again and again until the release: the driver's cost per poll adds up.
        Shape::Yielding => {
            while !round.release.is_closed() {
                tokio::task::yield_now().await;
            }
        }
        // Closing releases every waiter, also the work of a late duplicate execution.
        Shape::Released => {
            let _ = round.release.acquire().await;
        }
    }
    42
}

async fn yield_until_entered(round: &Round) {
    while round.entered.load(Ordering::Acquire) < FAN_IN {
        tokio::task::yield_now().await;
    }
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

/// The shapes of work of the fan-in rounds (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Released,
    Yielding,
    Entered,
}

const SHAPES: [(Shape, &str); 3] = [
    (Shape::Released, "released"),
    (Shape::Yielding, "yielding"),
    (Shape::Entered, "entered"),
];

/// Which shape of work the fan-in rounds run now (an index into `SHAPES`).
static SHAPE: AtomicUsize = AtomicUsize::new(0);

fn shape() -> Shape {
    SHAPES[SHAPE.load(Ordering::Relaxed)].0
}

fn fan_in(c: &mut Criterion) {
    let rt = multi_thread();
    let mut group = c.benchmark_group("fan_in_1000");
    group.sample_size(20);
    let mut report = Vec::new();

    let mut contenders: Vec<(&str, Caller, Option<AfterRound>)> = Vec::new();

    let ours: Group<u64, u64> = Group::new();
    contenders.push((
        "single_flight_group",
        Arc::new(move |r, e| ours.run(1, || work(r, e)).map(|o| o.into_value()).boxed()),
        None,
    ));

    let layer_svc = CoalesceLayer::new(|_: &(Arc<Round>, Arc<AtomicUsize>)| Some(1u64)).layer(
        service_fn(|(r, e): (Arc<Round>, Arc<AtomicUsize>)| work(r, e).map(Ok::<_, Infallible>)),
    );
    contenders.push((
        "coalesce_layer",
        Arc::new(move |r, e| {
            let svc = layer_svc.clone();
            async move { svc.oneshot((r, e)).await.unwrap() }.boxed()
        }),
        None,
    ));

    let hand = HandRolled::default();
    contenders.push((
        "hand_rolled_mutex_shared",
        Arc::new(move |r, e| {
            let hand = hand.clone();
            async move { hand.work(1, work(r, e)).await }.boxed()
        }),
        None,
    ));

    // Not a coalescer: each caller waits for the round's release itself and the work never
    // runs. What a round costs the runtime alone (spawning, waking, joining 1000 tasks),
    // the least any coalescer can take.
    contenders.push((
        "no_coalescer_floor",
        Arc::new(|r: Arc<Round>, _| {
            async move {
                if shape() == Shape::Entered && !r.floor_first.swap(true, Ordering::AcqRel) {
                    yield_until_entered(&r).await;
                    r.release.close();
                } else {
                    let _ = r.release.acquire().await;
                }
                42
            }
            .boxed()
        }),
        None,
    ));

    let sfa = Arc::new(singleflight_async::SingleFlight::<u64, u64>::new());
    contenders.push((
        "singleflight_async",
        Arc::new(move |r, e| {
            let sfa = sfa.clone();
            async move { sfa.work(1, || work(r, e)).await }.boxed()
        }),
        None,
    ));

    let asf = Arc::new(async_singleflight::UnaryGroup::<u64, u64>::new());
    contenders.push((
        "async_singleflight",
        Arc::new(move |r, e| {
            let asf = asf.clone();
            async move { asf.work(&1, work(r, e)).await }.boxed()
        }),
        None,
    ));

    let moka = moka::future::Cache::<u64, u64>::new(10);
    let moka_reset = moka.clone();
    contenders.push((
        "moka_get_with",
        Arc::new(move |r, e| {
            let moka = moka.clone();
            async move { moka.get_with(1, work(r, e)).await }.boxed()
        }),
        // moka caches: forget the value after each round so that the next one runs again.
        Some(Box::new(move || moka_reset.invalidate_all())),
    ));

    for ((name, caller, after_round), (index, shape)) in contenders.iter().flat_map(|c| {
        SHAPES
            .iter()
            .enumerate()
            .map(move |(i, (_, shape))| (c, (i, shape)))
    }) {
        SHAPE.store(index, Ordering::Relaxed);
        let executions = Arc::new(AtomicUsize::new(0));
        let rounds = Arc::new(AtomicUsize::new(0));
        let name = format!("{name}/{shape}");
        group.bench_function(BenchmarkId::from_parameter(&name), |b| {
            b.to_async(&rt).iter(|| {
                rounds.fetch_add(1, Ordering::Relaxed);
                let round = fan_in_round(caller.clone(), executions.clone());
                let after = after_round.as_ref();
                async move {
                    round.await;
                    if let Some(after) = after {
                        after();
                    }
                }
            })
        });
        // Nothing to report for a contender a filter left out.
        let rounds = rounds.load(Ordering::Relaxed);
        if rounds > 0 {
            let per_round = executions.load(Ordering::Relaxed) as f64 / rounds as f64;
            report.push(format!("{name:>26}: {per_round:.3} executions per round"));
        }
    }
    group.finish();

    // Criterion runs each contender in a block of its own, so drift in the machine (and the
    // runtime warming up) lands on whoever runs when. Rounds interleaved contender by
    // contender, in a rotating order, and their medians give ratios that hold from run to
    // run.
    let rounds = 61;
    let shapes = SHAPES.len();
    let mut times: Vec<Vec<std::time::Duration>> = vec![Vec::new(); contenders.len() * shapes];
    for round in 0..rounds {
        for turn in 0..times.len() {
            let which = (round + turn) % times.len();
            let (_, caller, after_round) = &contenders[which / shapes];
            SHAPE.store(which % shapes, Ordering::Relaxed);
            let start = std::time::Instant::now();
            rt.block_on(fan_in_round(caller.clone(), Arc::new(AtomicUsize::new(0))));
            times[which].push(start.elapsed());
            if let Some(after) = after_round {
                after();
            }
        }
    }
    // The median, and the 90th percentile: rounds on this machine fall into a fast and a
    // slow mode (tokio waking its other worker once per woken task, see benches/README.md), and the
    // share of slow rounds moves the mean, so both are shown.
    let quantile = |t: &[std::time::Duration], q: f64| t[((t.len() - 1) as f64 * q) as usize];
    times.iter_mut().for_each(|t| t.sort());
    let peer = contenders
        .iter()
        .position(|(name, ..)| *name == "singleflight_async")
        .expect("the peer runs");
    eprintln!(
        "\nfan_in_1000 interleaved, {rounds} rounds, median and p90 (ratios to singleflight_async):"
    );
    for (i, (name, ..)) in contenders.iter().enumerate() {
        for (k, (_, shape)) in SHAPES.iter().enumerate() {
            let (j, theirs) = (shapes * i + k, &times[shapes * peer + k]);
            let [median, p90] = [0.5, 0.9].map(|q| quantile(&times[j], q));
            let [r50, r90] = [0.5, 0.9]
                .map(|q| quantile(&times[j], q).as_secs_f64() / quantile(theirs, q).as_secs_f64());
            eprintln!(
                "{:>40}: {median:>9.1?} ({r50:.2}x)  p90 {p90:>9.1?} ({r90:.2}x)",
                format!("{name}/{shape}"),
            );
        }
    }
    if report.is_empty() {
        return;
    }
    eprintln!("\nfan_in_1000 executions per round (1.000 = no duplicated work):");
    for line in report {
        eprintln!("{line}");
    }
}

/// The driver's own cost per poll of the work: one caller, work that yields 100 times before
/// it completes (so it is polled 101 times), on a current-thread runtime.
fn driver_polls(c: &mut Criterion) {
    async fn yields_100(k: u64) -> u64 {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        k
    }
    let mut group = c.benchmark_group("driver_polls_101");
    let rt = current_thread();
    let bare = AtomicU64::new(0);
    group.bench_function("bare_future", |b| {
        b.to_async(&rt)
            .iter(|| yields_100(bare.fetch_add(1, Ordering::Relaxed)))
    });
    let ours: Group<u64, u64> = Group::new();
    group.bench_function("single_flight_group", |b| {
        b.to_async(&rt).iter(|| {
            let k = bare.fetch_add(1, Ordering::Relaxed);
            ours.run(k, move || yields_100(k)).map(|o| o.into_value())
        })
    });
    let sfa = singleflight_async::SingleFlight::<u64, u64>::new();
    group.bench_function("singleflight_async", |b| {
        b.to_async(&rt).iter(|| {
            let k = bare.fetch_add(1, Ordering::Relaxed);
            sfa.work(k, move || yields_100(k))
        })
    });
    group.finish();
}

impl Dedup for HandRolled {
    fn call<F>(&self, key: u64, work: F) -> impl Future<Output = u64> + Send
    where
        F: Future<Output = u64> + Send + 'static,
    {
        self.work(key, work)
    }
}

impl Dedup for singleflight_async::SingleFlight<u64, u64> {
    fn call<F>(&self, key: u64, work: F) -> impl Future<Output = u64> + Send
    where
        F: Future<Output = u64> + Send + 'static,
    {
        self.work(key, move || work)
    }
}

/// Issue 36's round, exactly as the independent harness wrote it.
async fn fanin_round<D: Dedup>(d: Arc<D>, key: u64, fan: usize, execs: Arc<AtomicUsize>) {
    let entered = Arc::new(AtomicUsize::new(0));
    let mut hs = Vec::with_capacity(fan);
    for _ in 0..fan {
        let (d, entered, execs) = (d.clone(), entered.clone(), execs.clone());
        hs.push(tokio::spawn(async move {
            entered.fetch_add(1, Ordering::SeqCst);
            let e2 = entered.clone();
            d.call(key, async move {
                execs.fetch_add(1, Ordering::SeqCst);
                while e2.load(Ordering::SeqCst) < fan {
                    tokio::task::yield_now().await;
                }
                for _ in 0..8 {
                    tokio::task::yield_now().await;
                }
                key
            })
            .await
        }));
    }
    for h in hs {
        assert_eq!(h.await.unwrap(), key);
    }
}

/// One run of the harness: `rounds` rounds of 1000 callers, a fresh key each; the time of
/// each round.
fn harness_run<D: Dedup>(
    rt: &Runtime,
    d: &Arc<D>,
    next_key: &AtomicU64,
    rounds: usize,
    execs: &Arc<AtomicUsize>,
) -> Vec<std::time::Duration> {
    (0..rounds)
        .map(|_| {
            let key = next_key.fetch_add(1, Ordering::Relaxed);
            let start = std::time::Instant::now();
            rt.block_on(fanin_round(d.clone(), key, FAN_IN, execs.clone()));
            start.elapsed()
        })
        .collect()
}

/// Issue 36's harness, in one run: 2 tokio workers, runs of 40 rounds of 1000 callers,
/// contenders interleaved run by run in a rotating order; the mean of each run (what the
/// harness reports), and p50, p90, p99 of all rounds, with ratios to `singleflight-async`
/// and to the hand-rolled map of `Shared`.
fn fanin_harness(_: &mut Criterion) {
    let rt = multi_thread();
    let runs = 9;
    let rounds = 40;
    let next_key = AtomicU64::new(0);
    let group = Arc::new(Group::<u64, u64>::new());
    let tower = Arc::new(fanin::tower_face());
    let hand = Arc::new(HandRolled::default());
    let sfa = Arc::new(singleflight_async::SingleFlight::<u64, u64>::new());
    let names = [
        "single_flight_group",
        "coalesce_layer",
        "hand_rolled_mutex_shared",
        "singleflight_async",
    ];
    let execs: Vec<Arc<AtomicUsize>> = names.iter().map(|_| Arc::default()).collect();
    let mut times: Vec<Vec<std::time::Duration>> = vec![Vec::new(); names.len()];
    let mut means: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for run in 0..runs {
        for turn in 0..names.len() {
            let which = (run + turn) % names.len();
            let e = &execs[which];
            let t = match which {
                0 => harness_run(&rt, &group, &next_key, rounds, e),
                1 => harness_run(&rt, &tower, &next_key, rounds, e),
                2 => harness_run(&rt, &hand, &next_key, rounds, e),
                _ => harness_run(&rt, &sfa, &next_key, rounds, e),
            };
            let mean = t.iter().sum::<std::time::Duration>().as_secs_f64() / t.len() as f64;
            means[which].push(mean);
            times[which].extend(t);
        }
    }
    let quantile =
        |t: &[std::time::Duration], q: f64| t[((t.len() - 1) as f64 * q) as usize].as_secs_f64();
    times.iter_mut().for_each(|t| t.sort());
    means
        .iter_mut()
        .for_each(|m| m.sort_by(|a, b| a.partial_cmp(b).unwrap()));
    let stats: Vec<[f64; 4]> = (0..names.len())
        .map(|i| {
            [
                means[i][means[i].len() / 2],
                quantile(&times[i], 0.5),
                quantile(&times[i], 0.9),
                quantile(&times[i], 0.99),
            ]
        })
        .collect();
    eprintln!(
        "\nfanin_harness (issue 36), {runs} runs x {rounds} rounds of {FAN_IN} callers, 2 workers: \
         median of the runs' means, p50, p90, p99 of all rounds, in us; ratios to \
         singleflight_async / to hand_rolled_mutex_shared"
    );
    for (i, name) in names.iter().enumerate() {
        let cells: Vec<String> = ["mean", "p50", "p90", "p99"]
            .iter()
            .enumerate()
            .map(|(k, label)| {
                format!(
                    "{label} {:>7.0} ({:.2}x / {:.2}x)",
                    stats[i][k] * 1e6,
                    stats[i][k] / stats[3][k],
                    stats[i][k] / stats[2][k]
                )
            })
            .collect();
        let per_round = execs[i].load(Ordering::Relaxed) as f64 / (runs * rounds) as f64;
        eprintln!(
            "{name:>26}: {}  executions per round {per_round:.3}",
            cells.join("  ")
        );
    }
}

criterion_group!(benches, distinct_keys, driver_polls, fan_in, fanin_harness);
criterion_main!(benches);
