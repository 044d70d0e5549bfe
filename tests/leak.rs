//! A million distinct-key flights, a third of them cancelled after one poll, leave the
//! registry empty and resident memory flat.

mod support;

use std::time::Duration;

use futures::FutureExt;
use futures::future::join_all;
use tower_coalesce::single_flight::Group;

async fn round(group: &Group<u64, u64>, first: u64, batch: u64) {
    let runs = (first..first + batch).map(|key| {
        let run = group.run(key, move || async move {
            tokio::task::yield_now().await;
            key
        });
        async move {
            if key % 3 == 0 {
                // Polled once (the work starts and parks), then cancelled.
                assert!(run.now_or_never().is_none());
                None
            } else {
                Some(run.await.into_value())
            }
        }
    });
    for (value, key) in join_all(runs).await.into_iter().zip(first..) {
        assert!(value.is_none_or(|v| v == key));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_flights_leave_no_trace() {
    const TOTAL: u64 = 1_000_000;
    const BATCH: u64 = 10_000;
    let group = Group::new();

    // Warm up allocator pools and the registry's capacity before the baseline.
    for first in (0..TOTAL / 10).step_by(BATCH as usize) {
        round(&group, first, BATCH).await;
    }
    assert_eq!(group.in_flight(), 0);
    let baseline = support::rss_kib();

    for first in (TOTAL / 10..TOTAL).step_by(BATCH as usize) {
        round(&group, first, BATCH).await;
        assert_eq!(
            group.in_flight(),
            0,
            "flights left behind after keys {first}.."
        );
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let grown = support::rss_kib().saturating_sub(baseline);
    // 900k flights of ~300 bytes each would be ~270 MiB if any leaked; allow 16 MiB of noise.
    assert!(
        grown < 16 * 1024,
        "resident memory grew by {grown} KiB over 900k flights"
    );
    eprintln!("baseline {baseline} KiB, grown {grown} KiB");
}
