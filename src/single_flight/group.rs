use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::panic::{self, AssertUnwindSafe};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;

use super::flight::{Flight, Join, panic_message};
use super::future::Run;
use crate::sync::Arc;

/// The registry of flights: one entry per key whose work is running.
pub(crate) type Flights<K, T, S> = DashMap<K, Arc<Entry<K, T>>, S>;

/// The hasher of a [`Group`]'s registry unless [`Group::with_hasher`] says otherwise: aHash,
/// seeded at random per process and per group.
///
/// Keys come from clients (ids, idempotency keys), so the default must not let a client
/// that picks keys make them collide: SipHash (std's `RandomState`) resists that but costs
/// about 25 ns per call on short keys; aHash is designed to resist it too (an attacker who
/// does not know the random key can't make collisions) at a fraction of the cost; foldhash,
/// faster still, says itself that it does not resist attackers who observe it. For keys
/// no client chooses, any `BuildHasher` will do: [`Group::with_hasher`].
pub type DefaultHashBuilder = ahash::RandomState;

/// A flight and the key it is registered under, so that whichever caller ends the flight
/// can free the key without every caller holding a copy of it.
pub(crate) struct Entry<K, T> {
    pub(crate) key: K,
    pub(crate) flight: Flight<T>,
}

/// A registry of in-flight work, keyed by `K`, whose callers share one result of type `T`.
///
/// See the [module docs](crate::single_flight) for the guarantees and an example.
///
/// Cloning a `Group` is cheap and the clone shares the registry: callers of either clone
/// coalesce with each other. Two groups made with [`Group::new`] never do.
///
/// `S` hashes keys into the registry: [`DefaultHashBuilder`] unless the group is made with
/// [`Group::with_hasher`].
pub struct Group<K, T, S = DefaultHashBuilder> {
    flights: Arc<Flights<K, T, S>>,
}

impl<K, T> Group<K, T>
where
    K: Hash + Eq + Clone,
    T: Clone,
{
    /// Creates an empty group, hashing keys with [`DefaultHashBuilder`].
    pub fn new() -> Self {
        Self::with_hasher(DefaultHashBuilder::new())
    }
}

impl<K, T, S> Group<K, T, S>
where
    K: Hash + Eq + Clone,
    T: Clone,
    S: BuildHasher + Clone,
{
    /// Creates an empty group that hashes keys with `hasher`: a faster one for keys that no
    /// client chooses (see [`DefaultHashBuilder`] for why the default is what it is).
    ///
    /// ```
    /// use tower_coalesce::single_flight::Group;
    ///
    /// let group: Group<u64, String, std::hash::RandomState> =
    ///     Group::with_hasher(std::hash::RandomState::new());
    /// ```
    pub fn with_hasher(hasher: S) -> Self {
        Group {
            flights: Arc::new(DashMap::with_hasher(hasher)),
        }
    }

    /// Runs the future made by `make` once for every caller that uses `key` while it runs.
    ///
    /// If a flight for `key` is running, the caller joins it and `make` is not called.
    /// Otherwise the caller becomes the leader of a new flight: `make` is called once,
    /// right away, and its future becomes the flight's work. The key is claimed when
    /// `run` is called, not when the returned [`Run`] is first polled, so that callers are
    /// coalesced in the order in which they call `run`.
    ///
    /// The returned future resolves to an [`Outcome`] holding a clone of the result.
    ///
    /// # Cancellation
    ///
    /// Dropping the returned future leaves the flight. The work goes on as long as any
    /// caller waits for it, whoever started it; when the last caller leaves, the work is
    /// dropped where it stands and the key is free for a new flight.
    ///
    /// # Panics
    ///
    /// If `make` or the work panics, every caller of that flight panics: the caller whose
    /// task was polling the work resumes the original panic, the others panic with its
    /// message. The key is free afterwards, and the next call starts a fresh flight.
    pub fn run<F, Fut>(&self, key: K, make: F) -> Run<K, T, S>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        self.run_if(key, make, |_, _| true)
            .expect("a caller admitted to every flight is never refused")
    }

    /// [`run`](Self::run), with a say on joining: when a flight for `key` is running,
    /// `admit` is given the key that flight was registered with (the key of its leader,
    /// which may differ from `key` in what `Eq` ignores) and the followers waiting on it
    /// now. If it returns `false`, the caller does not join, `make` is not called, and
    /// `run_if` returns `None`: a caller turned away never counts as having joined.
    ///
    /// `admit` runs under the registry's shard lock and the flight's lock: keep it short,
    /// and never call into the group from it.
    pub(crate) fn run_if<F, Fut, A>(&self, key: K, make: F, admit: A) -> Option<Run<K, T, S>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T> + Send + 'static,
        A: FnOnce(&K, usize) -> bool,
    {
        let entry = match self.flights.entry(key) {
            MapEntry::Occupied(occupied) => {
                let joined = occupied
                    .get()
                    .flight
                    .try_join_if(|followers| admit(occupied.key(), followers));
                match joined {
                    Join::Joined(waiter) => {
                        return Some(Run::new(
                            occupied.get().clone(),
                            self.flights.clone(),
                            waiter,
                        ));
                    }
                    Join::Refused => return None,
                    Join::Ended => {}
                }
                // The registered flight has ended but its key is not freed yet: replace it,
                // key and all, so that the registered key is always the running leader's.
                // Its last caller frees the key only if the entry is still its own.
                let (entry, waiter) = Entry::new(occupied.key().clone());
                occupied.replace_entry(entry.clone());
                (entry, waiter)
            }
            MapEntry::Vacant(vacant) => {
                let (entry, waiter) = Entry::new(vacant.key().clone());
                vacant.insert(entry.clone());
                (entry, waiter)
            }
        };
        // The registry's shard lock is released here: `make` is user code and must be free
        // to call into this group again.
        let (entry, waiter) = entry;
        match panic::catch_unwind(AssertUnwindSafe(make)) {
            Ok(work) => {
                entry.flight.start(Box::pin(work));
                Some(Run::new(entry, self.flights.clone(), waiter))
            }
            Err(payload) => {
                entry.flight.fail_start(panic_message(payload.as_ref()));
                release(&self.flights, &entry);
                panic::resume_unwind(payload)
            }
        }
    }

    /// Forgets the flight running for `key`, if any, as Go's `singleflight.Group.Forget`: the
    /// next [`run`](Self::run) with `key` starts a new flight instead of joining it. Callers
    /// already waiting on the forgotten flight keep waiting for it and get its result; its
    /// work is neither cancelled nor restarted. Returns whether a flight was forgotten.
    ///
    /// ```
    /// use tower_coalesce::single_flight::Group;
    ///
    /// let group: Group<&str, u32> = Group::new();
    /// let before = group.run("report", || std::future::pending());
    /// assert!(group.forget(&"report"));
    /// let after = group.run("report", || async { 2 });
    /// assert!(before.is_leader() && after.is_leader(), "two flights, one per side");
    /// ```
    pub fn forget(&self, key: &K) -> bool {
        self.flights.remove(key).is_some()
    }

    /// The number of keys with a flight in progress.
    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }
}

impl<K, T> Entry<K, T>
where
    T: Clone,
{
    fn new(key: K) -> (Arc<Self>, super::flight::Waiter<T>) {
        let (flight, waiter) = Flight::new();
        (Arc::new(Entry { key, flight }), waiter)
    }
}

/// Frees the key of a flight that has ended, unless a newer flight holds it already.
pub(crate) fn release<K, T, S>(flights: &Flights<K, T, S>, entry: &Arc<Entry<K, T>>)
where
    K: Hash + Eq,
    S: BuildHasher + Clone,
{
    flights.remove_if(&entry.key, |_, registered| Arc::ptr_eq(registered, entry));
}

impl<K, T, S> Default for Group<K, T, S>
where
    K: Hash + Eq + Clone,
    T: Clone,
    S: BuildHasher + Clone + Default,
{
    fn default() -> Self {
        Self::with_hasher(S::default())
    }
}

impl<K, T, S> Clone for Group<K, T, S> {
    fn clone(&self) -> Self {
        Group {
            flights: self.flights.clone(),
        }
    }
}

impl<K, T, S> fmt::Debug for Group<K, T, S>
where
    K: Hash + Eq,
    S: BuildHasher + Clone,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group")
            .field("in_flight", &self.flights.len())
            .finish()
    }
}

/// The result of a [`Run`]: the value and how the caller came by it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome<T> {
    value: T,
    shared: bool,
    leader: bool,
}

impl<T> Outcome<T> {
    pub(crate) fn new(value: T, shared: bool, leader: bool) -> Self {
        Outcome {
            value,
            shared,
            leader,
        }
    }

    /// The result of the flight's work.
    pub fn value(&self) -> &T {
        &self.value
    }

    /// Takes the result of the flight's work.
    pub fn into_value(self) -> T {
        self.value
    }

    /// Whether more than one caller joined the flight, as the `shared` result of Go's
    /// `singleflight.Group.Do`. A follower's outcome is always shared; the leader's is
    /// shared if anyone joined while the work ran, even a caller who later left.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Whether this caller started the flight (called `make`), rather than joined it.
    pub fn is_leader(&self) -> bool {
        self.leader
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_counts_followers_only_and_a_refused_caller_never_joins() {
        let group: Group<u8, u8> = Group::new();
        let at_most_one = |_: &u8, followers: usize| followers < 1;
        let leader = group.run(1, std::future::pending);
        let follower = group.run_if(1, std::future::pending, at_most_one).unwrap();
        assert!(group.run_if(1, std::future::pending, at_most_one).is_none());
        assert_eq!(leader.waiters(), 2, "the refused caller did not join");

        // The leader leaving frees no follower place: the cap counts followers only.
        drop(leader);
        assert!(group.run_if(1, std::future::pending, at_most_one).is_none());
        drop(follower);
        // Every caller gone: the next one leads a new flight, admitted without asking.
        let next = group.run_if(1, std::future::pending, |_, _| false).unwrap();
        assert!(next.is_leader());
    }
}
