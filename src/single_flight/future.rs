//! Future types

use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::mem;
use std::panic;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use super::flight::{DriverPanicked, Waiter, poll_work};
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
    flights: Arc<Flights<K, T, S>>,
    waiter: Waiter<T>,
    role: Role<K, T>,
}

// Nothing in a `Run` is ever pinned: the work is boxed, and the key is plain data.
impl<K, T, S> Unpin for Run<K, T, S>
where
    K: Hash + Eq,
    S: BuildHasher + Clone,
{
}

enum Role<K, T> {
    /// The leader, driving its work in `waiter` as if alone. Whether anyone joined is found
    /// out from its slot (`key`, `id`) only when it completes or leaves.
    Leading { key: K, id: u64 },
    /// A caller that joined: it waits on (or drives) the shared flight.
    Joined(Arc<Entry<K, T>>),
    /// The outcome was read, or the caller left.
    Done,
}

impl<K, T, S> Run<K, T, S>
where
    K: Hash + Eq,
    S: BuildHasher + Clone,
{
    pub(crate) fn leader(
        flights: Arc<Flights<K, T, S>>,
        key: K,
        id: u64,
        waiter: Waiter<T>,
    ) -> Self {
        Run {
            flights,
            waiter,
            role: Role::Leading { key, id },
        }
    }

    pub(crate) fn follower(
        flights: Arc<Flights<K, T, S>>,
        entry: Arc<Entry<K, T>>,
        waiter: Waiter<T>,
    ) -> Self {
        Run {
            flights,
            waiter,
            role: Role::Joined(entry),
        }
    }

    /// Whether this caller started the flight (called `make`), rather than joined it.
    pub fn is_leader(&self) -> bool {
        self.waiter.is_leader()
    }

    /// The callers waiting on the flight now, this one included.
    pub fn waiters(&self) -> usize {
        match &self.role {
            Role::Leading { key, id } => self
                .flights
                .shared_of(key, *id)
                .map_or(1, |entry| entry.flight.waiters()),
            Role::Joined(entry) => entry.flight.waiters(),
            Role::Done => 0,
        }
    }
}

impl<K, T, S> Run<K, T, S>
where
    K: Hash + Eq,
    S: BuildHasher + Clone,
    T: Clone,
{
    /// The leader's work completed (or panicked) while it drove alone: frees the key and
    /// hands the outcome to the callers that joined, if any.
    fn lead_to_the_end(&mut self, polled: std::thread::Result<T>) -> Outcome<T> {
        let Role::Leading { key, id } = mem::replace(&mut self.role, Role::Done) else {
            unreachable!("only a leader drives alone");
        };
        let spent = self.waiter.take_work();
        let Some(entry) = self.flights.leader_done(&key, id) else {
            // Nobody joined: no clone, no wake, and the key is already free.
            drop(spent);
            return match polled {
                Ok(value) => Outcome::new(value, false, true),
                Err(payload) => panic::resume_unwind(payload),
            };
        };
        match entry.flight.complete(&mut self.waiter, polled, spent) {
            // A shared flight has two callers or more: the outcome is shared.
            Ok(finished) => Outcome::new(finished.value, true, true),
            Err(DriverPanicked(payload)) => panic::resume_unwind(payload),
        }
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
        let entry = match &this.role {
            Role::Leading { .. } => {
                let work = this.waiter.work().expect("a leader holds its work");
                let polled = ready!(poll_work(work, cx));
                return Poll::Ready(this.lead_to_the_end(polled));
            }
            Role::Joined(entry) => entry,
            Role::Done => panic!("`Run` polled after completion"),
        };
        let polled = ready!(entry.flight.poll(&mut this.waiter, cx));
        let Role::Joined(entry) = mem::replace(&mut this.role, Role::Done) else {
            unreachable!("matched above");
        };
        match polled {
            Ok(finished) => {
                if finished.release_key {
                    release(&this.flights, &entry);
                }
                Poll::Ready(Outcome::new(finished.value, true, false))
            }
            Err(DriverPanicked(payload)) => {
                release(&this.flights, &entry);
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
        let entry = match mem::replace(&mut self.role, Role::Done) {
            Role::Done => return,
            Role::Joined(entry) => entry,
            Role::Leading { key, id } => match self.flights.leader_leaves(&key, id) {
                Some(entry) => entry,
                // Nobody joined: the key is free; the work is dropped with the waiter.
                None => return,
            },
        };
        if entry.flight.leave(&mut self.waiter) {
            release(&self.flights, &entry);
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
