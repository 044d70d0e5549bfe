//! Where a slow round of issue 36's fan-in goes: the round of `benches/coalesce.rs`
//! (`fanin_round`, 1000 callers of one fresh key, 2 workers), 2,000 times on `Group` and on
//! `CoalesceLayer`, with the time the round's `block_on` took to spawn its 1000 tasks beside
//! the round's. Prints p50, p90, p99 and the mean of the rounds, how many took over 3 ms,
//! and in how many of those the spawning was the larger part.
//!
//!     cargo run --release --manifest-path benches/Cargo.toml --example fanin_phases
//!
//! `MODE=group` or `MODE=tower` runs one of the two.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use fanin::{Dedup, tower_face};
use tower_coalesce::single_flight::Group;

#[path = "../support/fanin.rs"]
mod fanin;

const FAN_IN: usize = 1000;
const ROUNDS: usize = 2000;

/// The bench's round, timing its spawning; answers (round, spawning) in microseconds.
fn round<D: Dedup>(rt: &tokio::runtime::Runtime, d: &Arc<D>, key: u64) -> (u64, u64) {
    let start = Instant::now();
    let d = d.clone();
    let spawned = rt.block_on(async move {
        let entered = Arc::new(AtomicUsize::new(0));
        let mut hs = Vec::with_capacity(FAN_IN);
        for _ in 0..FAN_IN {
            let (d, entered) = (d.clone(), entered.clone());
            hs.push(tokio::spawn(async move {
                entered.fetch_add(1, Ordering::SeqCst);
                let e2 = entered.clone();
                d.call(key, async move {
                    while e2.load(Ordering::SeqCst) < FAN_IN {
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
        let spawned = start.elapsed();
        for h in hs {
            assert_eq!(h.await.unwrap(), key);
        }
        spawned
    });
    (
        start.elapsed().as_micros() as u64,
        spawned.as_micros() as u64,
    )
}

fn probe<D: Dedup>(d: Arc<D>, label: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let rounds: Vec<(u64, u64)> = (0..ROUNDS as u64).map(|key| round(&rt, &d, key)).collect();
    let mut took: Vec<u64> = rounds.iter().map(|r| r.0).collect();
    took.sort_unstable();
    let slow: Vec<_> = rounds.iter().filter(|r| r.0 > 3000).collect();
    let spawning = slow.iter().filter(|r| r.1 * 2 > r.0).count();
    println!(
        "{label:>6}: p50 {} p90 {} p99 {} mean {} us; {} rounds over 3 ms, spawning the larger \
         part in {spawning}; spawning {} us on average",
        took[ROUNDS / 2],
        took[ROUNDS * 9 / 10],
        took[ROUNDS * 99 / 100],
        took.iter().sum::<u64>() / ROUNDS as u64,
        slow.len(),
        rounds.iter().map(|r| r.1).sum::<u64>() / ROUNDS as u64,
    );
}

fn main() {
    let mode = std::env::var("MODE").unwrap_or_default();
    for _ in 0..2 {
        if mode != "tower" {
            probe(Arc::new(Group::<u64, u64>::new()), "group");
        }
        if mode != "group" {
            probe(Arc::new(tower_face()), "tower");
        }
    }
}
