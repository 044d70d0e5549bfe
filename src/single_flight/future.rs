//! Future types

use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::panic;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use super::flight::{DriverPanicked, Waiter};
use super::group::{DefaultHashBuilder, Entry, Flights, Outcome, release};
use crate::sync::Arc;

/// A caller's wait on a flight, returned by [`Group::run`](super::Group::run).
///
/// Dropping it leaves the flight; see `run` for what that does to the work.
#[must_use = "futures do nothing unless you `.await` or poll them"]
// NOTE: the bound is needed by the `Drop` impl, which frees the key of an abandoned flight.
pub struct Run<K, T, S = DefaultHashBuilder>
where
    K: Hash + Eq,
    S: BuildHasher + Clone,
{
    entry: Arc<Entry<K, T>>,
    flights: Arc<Flights<K, T, S>>,
    waiter: Waiter<T>,
}

impl<K, T, S> Run<K, T, S>
where
    K: Hash + Eq,
    S: BuildHasher + Clone,
{
    pub(crate) fn new(
        entry: Arc<Entry<K, T>>,
        flights: Arc<Flights<K, T, S>>,
        waiter: Waiter<T>,
    ) -> Self {
        Run {
            entry,
            flights,
            waiter,
        }
    }

    /// Whether this caller started the flight (called `make`), rather than joined it.
    pub fn is_leader(&self) -> bool {
        self.waiter.is_leader()
    }

    /// The callers waiting on the flight now, this one included.
    pub fn waiters(&self) -> usize {
        self.entry.flight.waiters()
    }
}

impl<K, T, S> Future for Run<K, T, S>
where
    K: Hash + Eq,
    S: BuildHasher + Clone,
    T: Clone,
{
    type Output = Outcome<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        match ready!(this.entry.flight.poll(&mut this.waiter, cx)) {
            Ok(finished) => {
                if finished.release_key {
                    release(&this.flights, &this.entry);
                }
                let leader = this.waiter.is_leader();
                Poll::Ready(Outcome::new(finished.value, finished.shared, leader))
            }
            Err(DriverPanicked(payload)) => {
                release(&this.flights, &this.entry);
                panic::resume_unwind(payload)
            }
        }
    }
}

impl<K, T, S> Drop for Run<K, T, S>
where
    K: Hash + Eq,
    S: BuildHasher + Clone,
{
    fn drop(&mut self) {
        if self.entry.flight.leave(&mut self.waiter) {
            release(&self.flights, &self.entry);
        }
    }
}

impl<K, T, S> fmt::Debug for Run<K, T, S>
where
    K: Hash + Eq,
    S: BuildHasher + Clone,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Run")
            .field("leader", &self.waiter.is_leader())
            .finish_non_exhaustive()
    }
}
