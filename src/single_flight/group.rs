use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;

use super::flight::{BoxWork, DriverPanicked, Flight, Join, Waiter};
use super::future::Run;
use crate::sync::Arc;

/// The registry of flights: one slot per key whose work is running.
pub(crate) struct Flights<K, T, S> {
    slots: DashMap<K, Slot<K, T>, S>,
    /// Shared flights that [`Group::forget`] took out of `slots` while their leader still
    /// drove alone: the leader finds them here by id when it completes or leaves.
    forgotten: Mutex<Forgotten<K, T>>,
}

/// Shared flights taken out of the registry by `forget`, by flight id.
type Forgotten<K, T> = Vec<(u64, Arc<Entry<K, T>>)>;

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

/// What the registry keeps for one running flight.
///
/// A flight starts with its leader alone, driving the work in its own [`Run`]: then the slot
/// is all there is, no allocation but the work's box. The shared [`Entry`] is made only when
/// a second caller joins.
pub(crate) struct Slot<K, T> {
    /// Tells this flight from a later one under the same key (after [`Group::forget`], or
    /// after the flight ended), so that a caller only ever frees its own.
    id: u64,
    shared: Option<Arc<Entry<K, T>>>,
    /// The leader still drives in its own `Run` and will look for `shared` here (or in
    /// `forgotten`) when it completes or leaves.
    leader_outside: bool,
}

// The slot is copied into and out of the map on every flight: keep it three words (loom's
// `Arc` is larger).
#[cfg(not(coalesce_loom))]
const _: () = assert!(std::mem::size_of::<Slot<u64, u64>>() <= 24);

/// A shared flight and the key it is registered under, so that whichever caller ends the
/// flight can free the key without every caller holding a copy of it.
pub(crate) struct Entry<K, T> {
    pub(crate) key: K,
    pub(crate) flight: Flight<T>,
}

/// The answer of [`Slot::join`].
pub(crate) enum SlotJoin<K, T> {
    /// `made`: this caller is the first to join and made the shared flight, which the slot
    /// must now hold.
    Joined {
        entry: Arc<Entry<K, T>>,
        waiter: Waiter<T>,
        made: bool,
    },
    /// The flight runs, and the caller was not admitted to it.
    Refused,
    /// The flight has ended: the caller must start a new one in its place.
    Ended,
}

impl<K: Clone, T: Clone> Slot<K, T> {
    pub(crate) fn alone(id: u64) -> Self {
        Slot {
            id,
            shared: None,
            leader_outside: true,
        }
    }

    /// A caller joins this slot's flight if `admit`, given the followers waiting now, says so;
    /// the first one to join makes the shared flight. `key` is the key the slot is
    /// registered under.
    pub(crate) fn join(&self, key: &K, admit: impl FnOnce(usize) -> bool) -> SlotJoin<K, T> {
        if let Some(entry) = &self.shared {
            return match entry.flight.try_join_if(admit) {
                Join::Joined(waiter) => SlotJoin::Joined {
                    entry: entry.clone(),
                    waiter,
                    made: false,
                },
                Join::Refused => SlotJoin::Refused,
                Join::Ended => SlotJoin::Ended,
            };
        }
        if !admit(0) {
            return SlotJoin::Refused;
        }
        let (flight, waiter) = Flight::joined();
        let entry = Arc::new(Entry {
            key: key.clone(),
            flight,
        });
        SlotJoin::Joined {
            entry,
            waiter,
            made: true,
        }
    }
}

impl<K, T> Slot<K, T> {
    /// The leader that drove alone is done with this slot: its flight completed (the slot is
    /// removed) or it leaves (the slot stays for the followers that took the work over, if
    /// any). Returns the shared flight if others joined.
    pub(crate) fn leader_leaves(&mut self) -> Option<Arc<Entry<K, T>>> {
        self.leader_outside = false;
        self.shared.clone()
    }
}

impl<K, T> SlotJoin<K, T> {
    /// Keeps the shared flight this join made (if it did) in `slot`, the slot it joined.
    pub(crate) fn kept_in(self, slot: &mut Slot<K, T>) -> Self {
        if let SlotJoin::Joined {
            entry, made: true, ..
        } = &self
        {
            slot.shared = Some(entry.clone());
        }
        self
    }
}

/// A new flight id, unique in the process. Taken from a block per thread, so that ids cost
/// no atomic operation on the hot path.
fn next_id() -> u64 {
    const BLOCK: u64 = 1 << 20;
    static BLOCKS: AtomicU64 = AtomicU64::new(0);
    thread_local!(static NEXT: Cell<(u64, u64)> = const { Cell::new((0, 0)) });
    NEXT.with(|next| {
        let (mut id, mut end) = next.get();
        if id == end {
            id = BLOCKS.fetch_add(BLOCK, Ordering::Relaxed);
            end = id + BLOCK;
        }
        next.set((id + 1, end));
        id
    })
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
            flights: Arc::new(Flights {
                slots: DashMap::with_hasher(hasher),
                forgotten: Mutex::new(Vec::new()),
            }),
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
    /// The leader's `Run` drives the work: await it (or drop it) as you would any future;
    /// a leader made and set aside without being polled holds its followers up.
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
        self.run_boxed_if(key, || Box::pin(make()), admit)
    }

    /// [`run_if`](Self::run_if) with work that `make` boxes: made and boxed in one place,
    /// a large future can be written into its box where it is made rather than moved
    /// there (the HTTP engine's flights are over a kilobyte).
    pub(crate) fn run_boxed_if<F, A>(&self, key: K, make: F, admit: A) -> Option<Run<K, T, S>>
    where
        F: FnOnce() -> BoxWork<T>,
        A: FnOnce(&K, usize) -> bool,
    {
        // A caller joining a shared flight needs only the shard's read lock, so that a
        // burst of callers joins from every worker at once, serialized by the flight's own
        // lock alone. With the write lock, one worker joining its callers back to back
        // kept the other parked on the shard for up to 0.1 ms in a 1000-caller burst: long
        // enough for the flight to end, and for the starved caller to run the work again.
        // The write lock is for the leader and for the first follower, which makes the
        // shared flight.
        // `admit` is asked once: by the flight joined, on either path.
        let mut once = Some(admit);
        let mut admit = |registered: &K, n| once.take().is_some_and(|admit| admit(registered, n));
        if let Some(slot) = self.flights.slots.get(&key)
            && let Some(entry) = &slot.shared
        {
            match entry.flight.try_join_if(|n| admit(slot.key(), n)) {
                Join::Joined(waiter) => {
                    return Some(Run::follower(self.flights.clone(), entry.clone(), waiter));
                }
                Join::Refused => return None,
                // Ended, not yet freed: replaced below.
                Join::Ended => {}
            }
        }
        let (key, id) = match self.flights.slots.entry(key) {
            MapEntry::Occupied(mut occupied) => {
                let registered = occupied.key();
                let joined = occupied.get().join(registered, |n| admit(registered, n));
                match joined.kept_in(occupied.get_mut()) {
                    SlotJoin::Joined { entry, waiter, .. } => {
                        return Some(Run::follower(self.flights.clone(), entry, waiter));
                    }
                    SlotJoin::Refused => return None,
                    SlotJoin::Ended => {}
                }
                // The registered flight has ended but its key is not freed yet: replace it,
                // key and all, so that the registered key is always the running leader's.
                // Its last caller frees the key only if the slot is still its own. The
                // leader finds its slot with the old key, which is equal to its own.
                let id = next_id();
                let (old_key, _ended) = occupied.replace_entry(Slot::alone(id));
                (old_key, id)
            }
            MapEntry::Vacant(vacant) => {
                let id = next_id();
                let key = vacant.key().clone();
                vacant.insert(Slot::alone(id));
                (key, id)
            }
        };
        // The registry's shard lock is released here: `make` is user code and must be free
        // to call into this group again.
        match panic::catch_unwind(AssertUnwindSafe(make)) {
            Ok(work) => {
                let leader = Waiter::leader(Some(work));
                Some(Run::leader(self.flights.clone(), key, id, leader))
            }
            Err(payload) => {
                // Callers that joined while the work was being made get the panic too.
                let Some(entry) = self.flights.leader_done(&key, id) else {
                    panic::resume_unwind(payload)
                };
                let failed = entry
                    .flight
                    .complete(&mut Waiter::leader(None), Err(payload), None);
                match failed {
                    Err(DriverPanicked(payload)) => panic::resume_unwind(payload),
                    Ok(_) => unreachable!("a panic completes a flight with a panic"),
                }
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
        self.flights
            .slots
            .remove_if(key, |_, slot| {
                // Under the shard lock, so that a leader that misses its slot from now on
                // finds its shared flight in `forgotten`.
                if let (true, Some(entry)) = (slot.leader_outside, &slot.shared) {
                    self.flights.forgotten().push((slot.id, entry.clone()));
                }
                true
            })
            .is_some()
    }

    /// The number of keys with a flight in progress.
    pub fn in_flight(&self) -> usize {
        self.flights.slots.len()
    }
}

impl<K, T, S> Flights<K, T, S>
where
    K: Hash + Eq,
    S: BuildHasher + Clone,
{
    /// The leader that drove alone has completed: frees its key and returns the shared
    /// flight if anyone joined, for the outcome to be handed to it.
    pub(crate) fn leader_done(&self, key: &K, id: u64) -> Option<Arc<Entry<K, T>>> {
        match self.slots.remove_if(key, |_, slot| slot.id == id) {
            Some((_, mut slot)) => slot.leader_leaves(),
            None => self.take_forgotten(id),
        }
    }

    /// The leader that drove alone leaves before completion: frees its key if nobody
    /// joined, else returns the shared flight, to hand the work over to its followers.
    pub(crate) fn leader_leaves(&self, key: &K, id: u64) -> Option<Arc<Entry<K, T>>> {
        let (mut mine, mut shared) = (false, None);
        self.slots.remove_if_mut(key, |_, slot| {
            mine = slot.id == id;
            if mine {
                shared = slot.leader_leaves();
            }
            mine && shared.is_none()
        });
        if mine {
            shared
        } else {
            self.take_forgotten(id)
        }
    }

    /// The shared flight of a leader that drives alone, if anyone joined it.
    pub(crate) fn shared_of(&self, key: &K, id: u64) -> Option<Arc<Entry<K, T>>> {
        match self.slots.get(key) {
            Some(slot) if slot.id == id => slot.shared.clone(),
            _ => self
                .forgotten()
                .iter()
                .find(|(forgotten, _)| *forgotten == id)
                .map(|(_, entry)| entry.clone()),
        }
    }

    fn take_forgotten(&self, id: u64) -> Option<Arc<Entry<K, T>>> {
        let mut forgotten = self.forgotten();
        let at = forgotten
            .iter()
            .position(|(forgotten, _)| *forgotten == id)?;
        Some(forgotten.swap_remove(at).1)
    }

    fn forgotten(&self) -> MutexGuard<'_, Forgotten<K, T>> {
        self.forgotten
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Frees the key of a shared flight that has ended, unless a newer flight holds it already.
pub(crate) fn release<K, T, S>(flights: &Flights<K, T, S>, entry: &Arc<Entry<K, T>>)
where
    K: Hash + Eq,
    S: BuildHasher + Clone,
{
    flights.slots.remove_if(&entry.key, |_, slot| {
        slot.shared
            .as_ref()
            .is_some_and(|registered| Arc::ptr_eq(registered, entry))
    });
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
            .field("in_flight", &self.flights.slots.len())
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

/// Model checks of the slot protocol (a loom mutex stands in for the map's shard lock):
/// `RUSTFLAGS="--cfg coalesce_loom" cargo test --lib --release loom`.
#[cfg(all(test, coalesce_loom))]
mod loom_tests {
    use std::future::poll_fn;
    use std::task::{Context, Poll};

    use loom::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use loom::sync::{Arc, Mutex};
    use loom::thread;

    use super::super::flight::loom_tests::{Signal, work};
    use super::super::flight::{Waiter, poll_work};
    use super::{Entry, Slot, SlotJoin};

    type Shard = Arc<Mutex<Option<Slot<u8, u32>>>>;

    /// A caller joins through the shard (making the shared flight if it is the first) and
    /// waits as `Run` does, freeing the key if it ends the flight. `None`: no slot, so the
    /// caller would start a flight of its own.
    fn join_and_wait(shard: &Shard) -> Option<u32> {
        let (entry, mut waiter) = {
            let mut guard = shard.lock().unwrap();
            let slot = guard.as_mut()?;
            match slot.join(&0, |_| true).kept_in(slot) {
                SlotJoin::Joined { entry, waiter, .. } => (entry, waiter),
                SlotJoin::Refused | SlotJoin::Ended => unreachable!("a registered flight runs"),
            }
        };
        let finished = loom::future::block_on(poll_fn(|cx| entry.flight.poll(&mut waiter, cx)))
            .unwrap_or_else(|_| panic!("the work does not panic here"));
        if finished.release_key {
            release(shard, &entry);
        }
        Some(finished.value)
    }

    fn release(shard: &Shard, entry: &Arc<Entry<u8, u32>>) {
        let mut guard = shard.lock().unwrap();
        let mine = guard
            .as_ref()
            .and_then(|slot| slot.shared.as_ref())
            .is_some_and(|registered| Arc::ptr_eq(registered, entry));
        if mine {
            *guard = None;
        }
    }

    /// The leader completes alone while a caller joins: the caller either joins before the
    /// slot is removed (making the shared flight, or joining it) and gets the result, or
    /// finds the key free. Never stranded: loom reports a deadlock if the result is not
    /// handed over.
    #[test]
    fn loom_a_join_racing_the_lone_leaders_completion_is_served_or_finds_the_key_free() {
        loom::model(|| {
            let (signal, done, dropped) = (Signal::default(), Arc::default(), Arc::default());
            signal.set();
            let shard: Shard = Arc::new(Mutex::new(Some(Slot::alone(1))));
            let mut leader = Waiter::leader(Some(work(signal, Arc::clone(&done), dropped)));

            let s = shard.clone();
            let joiner = thread::spawn(move || join_and_wait(&s));
            let polled = loom::future::block_on(poll_fn(|cx| {
                poll_work(leader.work().expect("the leader holds its work"), cx)
            }));
            let spent = leader.take_work();
            let shared = shard
                .lock()
                .unwrap()
                .take()
                .expect("only the leader removes its slot")
                .leader_leaves();
            let value = match shared {
                None => polled.unwrap_or_else(|_| panic!("no panic here")),
                Some(entry) => match entry.flight.complete(&mut leader, polled, spent) {
                    Ok(finished) => finished.value,
                    Err(_) => panic!("no panic here"),
                },
            };
            assert_eq!(value, 7);
            assert!(joiner.join().unwrap().is_none_or(|v| v == 7));
            assert_eq!(done.load(SeqCst), 1);
            assert!(shard.lock().unwrap().is_none(), "the key is free");
        });
    }

    /// The leader leaves (after one poll) while a caller may be joining: with no joiner the
    /// slot goes and the work is dropped; with one, it takes the same work over and runs it
    /// once. Either way the key ends free and the work is dropped exactly once.
    #[test]
    fn loom_a_leaving_lone_leader_frees_the_key_or_hands_its_work_to_a_joiner() {
        loom::model(|| {
            let signal = Signal::default();
            let (done, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            let shard: Shard = Arc::new(Mutex::new(Some(Slot::alone(1))));
            let mut leader =
                Waiter::leader(Some(work(signal.clone(), done.clone(), dropped.clone())));
            let waker = futures::task::noop_waker();
            let first = poll_work(leader.work().unwrap(), &mut Context::from_waker(&waker));
            assert!(matches!(first, Poll::Pending));

            let s = shard.clone();
            let joiner = thread::spawn(move || join_and_wait(&s));
            signal.set();
            let shared = {
                let mut guard = shard.lock().unwrap();
                let shared = guard.as_mut().expect("the leader's slot").leader_leaves();
                if shared.is_none() {
                    *guard = None;
                }
                shared
            };
            match shared {
                None => drop(leader),
                Some(entry) => {
                    if entry.flight.leave(&mut leader) {
                        release(&shard, &entry);
                    }
                }
            }
            let joined = joiner.join().unwrap();
            assert!(joined.is_none_or(|v| v == 7));
            assert_eq!(done.load(SeqCst), usize::from(joined.is_some()));
            assert_eq!(dropped.load(SeqCst), 1);
            assert!(shard.lock().unwrap().is_none(), "the key is free");
        });
    }
}
