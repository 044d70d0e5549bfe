//! Single-flight execution: concurrent callers with the same key share one run of the work.
//!
//! This is the core of the crate, free of Tower: plain async code can use it directly. The
//! [`Coalesce`](crate::coalesce::Coalesce) middleware is built on it.
//!
//! A [`Group`] maps keys to *flights*. The first caller of a key starts a flight with its
//! work; callers that arrive with the same key while the work runs join that flight instead
//! of running the work again. When the work completes, every caller receives a clone of its
//! output and the key is freed at once: a group coalesces, it does not cache. To keep results
//! for a while, with stale-while-revalidate and stale-if-error, use a `Cache` (feature
//! `cache`), which runs its misses and refreshes as the flights of a group.
//!
//! # Example
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use tower_coalesce::single_flight::Group;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let group: Group<&str, u64> = Group::new();
//! let executions = Arc::new(AtomicUsize::new(0));
//!
//! let calls = (0..3).map(|_| {
//!     let executions = executions.clone();
//!     group.run("client-42", move || async move {
//!         executions.fetch_add(1, Ordering::SeqCst);
//!         tokio::task::yield_now().await;
//!         42
//!     })
//! });
//! let outcomes = futures::future::join_all(calls).await;
//!
//! assert_eq!(executions.load(Ordering::SeqCst), 1);
//! assert!(outcomes.iter().all(|o| *o.value() == 42 && o.is_shared()));
//! assert_eq!(outcomes.iter().filter(|o| o.is_leader()).count(), 1);
//! # }
//! ```
//!
//! # Concurrent calls on the same key
//!
//! For as long as a flight runs, every [`Group::run`] with its key joins it; the work runs
//! once, whatever the number of callers, and each caller gets a clone of its output
//! (`T: Clone`; wrap large values in an [`Arc`](std::sync::Arc)). Errors are values like any
//! other: a `Result` output is shared with the callers of that flight and not remembered,
//! so the next call after it runs the work again. Calls with distinct keys never wait on
//! each other.
//!
//! A caller that arrives just as a flight completes either joins it and receives its
//! output, or starts a new flight; it never sees a missing or stale result.
//!
//! # Cancellation
//!
//! The work belongs to the flight, not to the caller that started it. The leader drives it
//! (polls it, from its own [`Run`]); if the driver's future is dropped, another waiting
//! caller takes over the same work, which is neither restarted nor lost. When the last
//! caller of a flight is dropped, the work is dropped and the key is free again.
//!
//! Callers that wait while another drives are not polled until the work completes or the
//! driver leaves: waiting costs no CPU. The flip side: the work's waker reaches its driver
//! only, so a driver that is kept but not polled (made and set aside, or parked after losing
//! a `select!`) holds its flight up until it is polled or dropped, as with any design where
//! a caller's task drives the work. Await a leader's `Run` as you would any future, and drop
//! a `Run` you no longer wait for: that hands the work over at once.
//!
//! ```
//! # use tower_coalesce::single_flight::Group;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let group: Group<&str, u8> = Group::new();
//! let leader = group.run("k", || async { 7 });
//! let follower = group.run("k", || async { unreachable!("joined: not made") });
//! // Awaiting the follower alone would wait for the leader; drop the leader instead and the
//! // follower runs the same work.
//! drop(leader);
//! assert_eq!(follower.await.into_value(), 7);
//! # }
//! ```
//!
//! # Panics
//!
//! A panic in the work reaches every waiter of that flight: the caller whose task was
//! polling the work resumes the original panic, and the others panic with its message
//! (`the shared work of this flight panicked: ...`), so that no waiter hangs. The key is free
//! afterwards and the next call starts a fresh flight; nobody retries the work silently.

#[cfg(feature = "cache")]
mod cache;
mod flight;
pub mod future;
mod group;
mod registry;
#[cfg(feature = "http-cache")]
mod shared;

#[cfg(feature = "http-cache")]
pub(crate) use self::cache::Freshness;
#[cfg(feature = "cache")]
pub use self::cache::{Cache, CacheBuilder, CacheStatus, Fetched, Lifetimes, TimedOut};
#[cfg(feature = "http")]
pub(crate) use self::flight::BoxWork;
pub use self::future::Run;
pub use self::group::{DefaultHashBuilder, Group, Outcome};
pub(crate) use self::registry::LazyGroup;
#[cfg(feature = "http-cache")]
#[cfg_attr(docsrs, doc(cfg(feature = "http-cache")))]
pub use self::shared::Codec;
