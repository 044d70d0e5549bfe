//! The shared part of a flight: the slot where a flight's callers meet once a second caller
//! has joined, and the join/leave/complete protocol around it.
//!
//! This is kept free of the key registry so that it can be model-checked with loom
//! (`RUSTFLAGS="--cfg coalesce_loom" cargo test --lib --release loom`).
//!
//! # The protocol
//!
//! A flight begins with its leader alone: the leader keeps its boxed work in its own
//! [`Waiter`] and polls it there, and nothing here exists (see `group.rs`). Most flights end
//! like that. When a second caller joins, it makes a [`Flight`] in which the leader is the
//! *driver* (waiter 0, holding the work) and itself a parked waiter. From then on:
//!
//! - the work completes: the driver stores the outcome where waiters read it without the
//!   lock, and hands it on as a tree: it wakes the first [`HAND_OFF`] parked waiters, and
//!   each waiter, when it reads the outcome (or is dropped), wakes the next [`HAND_OFF`] of
//!   its own, so that N waiters are woken in about log(N) steps by as many tasks, rather
//!   than all at once by the driver's (which makes a multi-thread runtime unpark its other
//!   workers once per woken task); a waiter that is dropped instead passes its share on;
//! - the work panics: the driver stores the message and wakes everybody;
//! - the driver leaves (its future is dropped): it puts the work into the flight and wakes
//!   exactly one parked waiter, which finds nobody driving and takes over the *same* future;
//!   the work is neither lost nor started again;
//! - the last waiter leaves: the work is dropped and the flight is marked abandoned so
//!   that no new caller joins it.
//!
//! The driver polls the work with its own waker, without taking the flight's lock: work that
//! wakes a thousand times before it completes costs its driver a thousand polls, not a
//! thousand lock round trips. Every other waiter parks its waker in `wakers` and is not
//! polled again until something happens to the flight, so waiters never busy-poll: a flight
//! of N callers costs N wakes in all.
//!
//! `Work::Running(None)` marks "held by the driver"; `Running(Some(..))` is work handed
//! back by a driver that left, for the next waiter polled to take.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::mem;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::Ordering::SeqCst;
use std::task::{Context, Poll, Waker, ready};
use std::thread;

use slab::Slab;

use crate::sync::{AtomicUsize, Mutex, MutexGuard, Once};

/// How many parked waiters each one wakes once the outcome is there (the driver wakes the
/// first ones): the fan-out of the hand-off tree. One under loom, so that the models'
/// few waiters make a chain of it.
#[cfg(not(coalesce_loom))]
pub(crate) const HAND_OFF: usize = 4;
#[cfg(coalesce_loom)]
pub(crate) const HAND_OFF: usize = 1;

/// The work of a flight, boxed so that any waiter can move it out and poll it.
pub(crate) type BoxWork<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

pub(crate) struct Flight<T> {
    state: Mutex<State<T>>,
    /// The outcome once the work completed, read without the lock, and the hand-off tree.
    ended: Once<Ended<T>>,
    /// Once the work completed: the waiters that have not read the outcome yet.
    unread: AtomicUsize,
}

/// A completed flight's outcome, handed on as a tree: the waiters parked at completion, in
/// the order of the hand-off, each with a slot its copy of the outcome is put in before it
/// is woken. Waiter `i` fills and wakes waiters `(i + 1) * HAND_OFF ..`, up to `HAND_OFF`
/// of them; the driver the first ones. Each slot's lock is taken by two tasks, the waiter
/// and its parent, never by all of them.
struct Ended<T> {
    /// The outcome, for a waiter with no slot (it was not parked at completion) or whose
    /// copy is not there yet (it was polled before its parent passed it on).
    source: Mutex<T>,
    slots: Vec<Mutex<Option<T>>>,
    wakers: Vec<Waker>,
    /// A parked waiter's index in `wakers`, plus one, by its slot in the slab (0: none).
    index_of_slot: Vec<u32>,
}

impl<T: Clone> Ended<T> {
    fn new(value: T, parked: Slab<Waker>) -> Self {
        let mut index_of_slot = vec![0; parked.capacity()];
        let mut wakers = Vec::with_capacity(parked.len());
        for (slot, waker) in parked {
            if slot >= index_of_slot.len() {
                index_of_slot.resize(slot + 1, 0);
            }
            wakers.push(waker);
            index_of_slot[slot] = u32::try_from(wakers.len()).unwrap_or(u32::MAX);
        }
        let slots = wakers.iter().map(|_| Mutex::new(None)).collect();
        Ended {
            source: Mutex::new(value),
            slots,
            wakers,
            index_of_slot,
        }
    }

    /// A waiter's copy of the outcome: the one its parent passed on, or one of the source.
    fn copy_for(&self, index: Option<usize>) -> T {
        let passed = index.and_then(|i| lock(&self.slots[i]).take());
        passed.unwrap_or_else(|| lock(&self.source).clone())
    }

    /// Hands copies of `value` to the waiters from `first` (up to `HAND_OFF` of them), and
    /// wakes them.
    fn pass_on(&self, value: &T, first: usize) {
        let end = first.saturating_add(HAND_OFF).min(self.wakers.len());
        for slot in &self.slots[first.min(end)..end] {
            *lock(slot) = Some(value.clone());
        }
        self.wake(first);
    }
}

impl<T> Ended<T> {
    /// The index in the tree of the waiter parked in `slot`, if it was parked.
    fn index(&self, slot: Option<usize>) -> Option<usize> {
        let index = self.index_of_slot.get(slot?).copied()?;
        (index > 0).then(|| index as usize - 1)
    }

    /// Wakes the waiters from `first`, up to `HAND_OFF` of them, without handing them
    /// copies: they take theirs from the source.
    fn wake(&self, first: usize) {
        let end = first.saturating_add(HAND_OFF).min(self.wakers.len());
        for waker in &self.wakers[first.min(end)..end] {
            waker.wake_by_ref();
        }
    }

    /// The share of the hand-off of the waiter at `index`: its children in the tree.
    fn children(index: usize) -> usize {
        (index + 1).saturating_mul(HAND_OFF)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A clone that panicked leaves nothing half-updated: recover the lock.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct State<T> {
    work: Work<T>,
    /// Id of the waiter that holds the work; `None` means the next waiter that is polled
    /// takes it over.
    driver: Option<u64>,
    /// Waiters that have neither received the outcome nor been dropped.
    waiters: usize,
    /// Whether the leader is one of them: followers are `waiters` less the leader.
    leader_waiting: bool,
    /// Callers that ever joined; also the id of the next one.
    callers: u64,
    /// Wakers of waiters that wait for somebody else to drive.
    wakers: Slab<Waker>,
}

enum Work<T> {
    /// `None` while the leader is still building the work or while a driver holds it;
    /// `Some` until a waiter takes it (at the start, or after a driver left).
    Running(Option<BoxWork<T>>),
    /// The outcome is in `Flight::ended`.
    Done,
    Panicked(String),
    Abandoned,
}

/// A caller's place in a flight, and the work while this caller drives it. Not `Clone`:
/// each caller leaves exactly once.
pub(crate) struct Waiter<T> {
    id: u64,
    slot: Option<usize>,
    finished: bool,
    work: Option<BoxWork<T>>,
}

impl<T> Waiter<T> {
    pub(crate) fn is_leader(&self) -> bool {
        self.id == 0
    }
}

/// The answer of [`Flight::try_join_if`].
pub(crate) enum Join<T> {
    Joined(Waiter<T>),
    /// The flight runs, and the caller was not admitted to it.
    Refused,
    /// The flight has ended: the caller must start a new one.
    Ended,
}

/// What a finished waiter takes away.
pub(crate) struct Finished<T> {
    pub(crate) value: T,
    /// This waiter ended the flight and must free its key in the registry.
    pub(crate) release_key: bool,
}

/// The work panicked while this waiter drove it: it must free the key, then resume the
/// panic with the original payload.
pub(crate) struct DriverPanicked(pub(crate) Box<dyn Any + Send + 'static>);

impl<T: Clone> Flight<T> {
    /// The flight a second caller makes when it joins a leader that drives its work alone:
    /// the leader (waiter 0) drives and holds the work; the returned waiter is the joiner's.
    pub(crate) fn joined() -> (Self, Waiter<T>) {
        let flight = Flight {
            state: Mutex::new(State {
                work: Work::Running(None),
                driver: Some(0),
                waiters: 2,
                leader_waiting: true,
                callers: 2,
                wakers: Slab::new(),
            }),
            ended: Once::new(),
            unread: AtomicUsize::new(0),
        };
        (flight, Waiter::new(1))
    }

    /// Joins a running flight if `admit`, given the followers waiting now, says so.
    ///
    /// The decision and the join happen under one lock, so that a cap on followers is
    /// exact and a caller turned away never counts as having joined.
    pub(crate) fn try_join_if(&self, admit: impl FnOnce(usize) -> bool) -> Join<T> {
        let mut state = self.lock();
        if !matches!(state.work, Work::Running(_)) {
            return Join::Ended;
        }
        let followers = state.waiters - usize::from(state.leader_waiting);
        if !admit(followers) {
            return Join::Refused;
        }
        let id = state.callers;
        state.callers += 1;
        state.waiters += 1;
        Join::Joined(Waiter::new(id))
    }

    /// Joins a running flight; `None` if it has already ended.
    #[cfg(all(test, coalesce_loom))]
    pub(crate) fn try_join(&self) -> Option<Waiter<T>> {
        match self.try_join_if(|_| true) {
            Join::Joined(waiter) => Some(waiter),
            Join::Refused | Join::Ended => None,
        }
    }

    pub(crate) fn poll(
        &self,
        waiter: &mut Waiter<T>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Finished<T>, DriverPanicked>> {
        assert!(!waiter.finished, "flight polled after completion");
        let Some(work) = waiter.work.as_mut() else {
            // The outcome, if it is there, without the lock.
            if let Some(finished) = self.read_ended(waiter) {
                return Poll::Ready(Ok(finished));
            }
            // Not driving: take the work over if it was handed back, else wait.
            let mut state = self.lock();
            let may_drive = state.driver.is_none_or(|id| id == waiter.id);
            match &mut state.work {
                Work::Running(work @ Some(_)) if may_drive => {
                    waiter.work = work.take();
                    state.driver = Some(waiter.id);
                }
                Work::Running(_) => {
                    state.park(waiter, cx.waker());
                    return Poll::Pending;
                }
                Work::Done => {
                    drop(state);
                    let finished = self.read_ended(waiter);
                    return Poll::Ready(Ok(finished.expect("the outcome is set before `Done`")));
                }
                Work::Panicked(message) => {
                    let message = format!("the shared work of this flight panicked: {message}");
                    state.leave(waiter);
                    drop(state);
                    panic!("{message}");
                }
                Work::Abandoned => unreachable!("a flight with a live waiter is never abandoned"),
            }
            drop(state);
            return self.poll(waiter, cx);
        };

        let polled = ready!(poll_work(work, cx));
        let spent = waiter.work.take();
        Poll::Ready(self.complete(waiter, polled, spent))
    }

    /// The driver hands in what its work came to: the outcome is stored and every waiter
    /// woken. Used by a driver that polled the work here, and by a leader that polled it
    /// alone and found, once done, that others had joined.
    pub(crate) fn complete(
        &self,
        waiter: &mut Waiter<T>,
        polled: thread::Result<T>,
        spent: Option<BoxWork<T>>,
    ) -> Result<Finished<T>, DriverPanicked> {
        let mut state = self.lock();
        match polled {
            Ok(value) => {
                state.leave(waiter);
                let parked = mem::take(&mut state.wakers);
                self.unread.store(state.waiters, SeqCst);
                self.ended.set(Ended::new(value.clone(), parked));
                state.work = Work::Done;
                drop(state);
                // The spent work and the wakers run code that is not ours: outside the lock.
                drop(spent);
                self.ended.with(|ended| ended.pass_on(&value, 0));
                Ok(Finished {
                    value,
                    release_key: true,
                })
            }
            Err(payload) => {
                state.work = Work::Panicked(panic_message(payload.as_ref()));
                state.leave(waiter);
                wake_all(state, spent);
                Err(DriverPanicked(payload))
            }
        }
    }
}

/// Polls the work, catching a panic. Catching is sound because panicked work is never
/// polled again: it is dropped and only its message is kept.
pub(crate) fn poll_work<T>(work: &mut BoxWork<T>, cx: &mut Context<'_>) -> Poll<thread::Result<T>> {
    match panic::catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx))) {
        Ok(Poll::Pending) => Poll::Pending,
        Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
        Err(payload) => Poll::Ready(Err(payload)),
    }
}

impl<T: Clone> Flight<T> {
    /// The outcome, if the work completed: read without the lock, and this waiter's share
    /// of the hand-off passed on.
    fn read_ended(&self, waiter: &mut Waiter<T>) -> Option<Finished<T>> {
        let value = self.ended.with(|ended| {
            let index = ended.index(waiter.slot);
            let value = ended.copy_for(index);
            if let Some(index) = index {
                ended.pass_on(&value, Ended::<T>::children(index));
            }
            value
        })?;
        self.ended_read(waiter);
        Some(Finished {
            value,
            release_key: false,
        })
    }
}

impl<T> Flight<T> {
    /// The waiters that have neither read the outcome nor left.
    pub(crate) fn waiters(&self) -> usize {
        let state = self.lock();
        match state.work {
            Work::Done => self.unread.load(SeqCst),
            _ => state.waiters,
        }
    }

    /// A waiter leaves a completed flight without reading the outcome: it wakes its share
    /// of the hand-off, which take their copies from the source. `false` if the flight has
    /// not completed.
    fn leave_ended(&self, waiter: &mut Waiter<T>) -> bool {
        let passed = self.ended.with(|ended| {
            if let Some(index) = ended.index(waiter.slot) {
                ended.wake(Ended::<T>::children(index));
            }
        });
        if passed.is_none() {
            return false;
        }
        self.ended_read(waiter);
        true
    }

    /// A waiter is done with a completed flight (it read the outcome, or left after it).
    fn ended_read(&self, waiter: &mut Waiter<T>) {
        waiter.finished = true;
        waiter.slot = None;
        self.unread.fetch_sub(1, SeqCst);
    }

    /// A waiter goes away before it read the outcome (its future was dropped). Returns
    /// `true` when it was the last one: the work has been dropped and the caller must free
    /// the key.
    pub(crate) fn leave(&self, waiter: &mut Waiter<T>) -> bool {
        if waiter.finished || self.leave_ended(waiter) {
            return false;
        }
        let held = waiter.work.take();
        let mut state = self.lock();
        if matches!(state.work, Work::Done) {
            // Completed since the look above: its share of the hand-off goes on.
            drop(state);
            self.leave_ended(waiter);
            return false;
        }
        state.leave(waiter);
        if !matches!(state.work, Work::Running(_)) {
            // Panicked: the message outlives its readers, nothing to hand over.
            return false;
        }
        if state.waiters == 0 {
            let work = mem::replace(&mut state.work, Work::Abandoned);
            drop(state);
            // Nobody is left to receive the result: drop the work now rather than let it
            // run for nobody. Outside the lock, because its destructor is user code.
            drop((work, held));
            return true;
        }
        if let Some(work) = held {
            // The driver leaves: the work goes back into the flight for a waiter to take.
            state.work = Work::Running(Some(work));
        }
        // If this waiter drove the work, or was woken to take it over, pass the duty on to
        // one parked waiter; it finds nobody driving and takes the same future.
        if state.driver.is_none_or(|id| id == waiter.id) {
            state.driver = None;
            wake_one(state);
        }
        false
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing but waker clones runs under this lock and no state is left half-updated
        // across them, so a poisoned lock still holds a consistent state; recover it rather
        // than turn one panic into many.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<T> State<T> {
    fn park(&mut self, waiter: &mut Waiter<T>, waker: &Waker) {
        match waiter.slot.and_then(|slot| self.wakers.get_mut(slot)) {
            Some(parked) => parked.clone_from(waker),
            None => waiter.slot = Some(self.wakers.insert(waker.clone())),
        }
    }

    fn leave(&mut self, waiter: &mut Waiter<T>) {
        waiter.finished = true;
        self.waiters -= 1;
        if waiter.is_leader() {
            self.leader_waiting = false;
        }
        // After completion the slab was drained and nobody parks again, so a stale slot
        // finds nothing here.
        if let Some(slot) = waiter.slot.take() {
            self.wakers.try_remove(slot);
        }
    }
}

impl<T> Waiter<T> {
    /// The leader's place: it holds its work from the start.
    pub(crate) fn leader(work: Option<BoxWork<T>>) -> Self {
        Waiter {
            work,
            ..Waiter::new(0)
        }
    }

    /// The leader's work, while it drives alone.
    pub(crate) fn work(&mut self) -> Option<&mut BoxWork<T>> {
        self.work.as_mut()
    }

    /// Takes the leader's work out (it completed, or the leader leaves alone).
    pub(crate) fn take_work(&mut self) -> Option<BoxWork<T>> {
        self.work.take()
    }

    fn new(id: u64) -> Self {
        Waiter {
            id,
            slot: None,
            finished: false,
            work: None,
        }
    }
}

impl<T> fmt::Debug for Waiter<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Waiter")
            .field("id", &self.id)
            .field("driving", &self.work.is_some())
            .finish_non_exhaustive()
    }
}

/// Wakes one parked waiter, after releasing the lock.
fn wake_one<T>(state: MutexGuard<'_, State<T>>) {
    let waker = state.wakers.iter().next().map(|(_, w)| w.clone());
    drop(state);
    if let Some(waker) = waker {
        waker.wake();
    }
}

/// Wakes every parked waiter once the work panicked. The spent work is dropped and the
/// wakers are woken after releasing the lock: both run code that is not ours.
fn wake_all<T>(mut state: MutexGuard<'_, State<T>>, spent: Option<BoxWork<T>>) {
    let wakers = mem::take(&mut state.wakers);
    drop(state);
    drop(spent);
    wakers.into_iter().for_each(|(_, w)| w.wake());
}

pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "Box<dyn Any>".to_owned()
    }
}

/// Model checks of the protocol: `RUSTFLAGS="--cfg coalesce_loom" cargo test --lib --release loom`.
#[cfg(all(test, coalesce_loom))]
pub(crate) mod loom_tests {
    use std::future::{Future, poll_fn};
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    use loom::sync::{Arc, Mutex};
    use loom::thread;

    use super::{Flight, Join, Waiter};

    /// An event the work waits for, set from another thread.
    #[derive(Clone, Default)]
    pub(crate) struct Signal(Arc<(AtomicBool, Mutex<Option<Waker>>)>);

    impl Signal {
        pub(crate) fn set(&self) {
            self.0.0.store(true, SeqCst);
            if let Some(waker) = self.0.1.lock().unwrap().take() {
                waker.wake();
            }
        }
    }

    impl Future for Signal {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            *self.0.1.lock().unwrap() = Some(cx.waker().clone());
            if self.0.0.load(SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    /// Work that waits for `signal`, counts its completions and its drops.
    pub(crate) fn work(
        signal: Signal,
        done: Arc<AtomicUsize>,
        dropped: Arc<AtomicUsize>,
    ) -> super::BoxWork<u32> {
        struct OnDrop(Arc<AtomicUsize>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                self.0.fetch_add(1, SeqCst);
            }
        }
        Box::pin(async move {
            let _on_drop = OnDrop(dropped);
            signal.await;
            done.fetch_add(1, SeqCst);
            7
        })
    }

    fn wait(flight: &Flight<u32>, waiter: &mut Waiter<u32>) -> u32 {
        loom::future::block_on(poll_fn(|cx| flight.poll(waiter, cx)))
            .unwrap_or_else(|_| panic!("the work does not panic here"))
            .value
    }

    /// The leader drives its work alone, then hands the result to the flight that others
    /// joined meanwhile, as `Run` does.
    pub(crate) fn lead(flight: &Flight<u32>, leader: &mut Waiter<u32>) -> u32 {
        let polled = loom::future::block_on(poll_fn(|cx| {
            super::poll_work(leader.work().expect("the leader holds its work"), cx)
        }));
        let spent = leader.take_work();
        flight
            .complete(leader, polled, spent)
            .unwrap_or_else(|_| panic!("the work does not panic here"))
            .value
    }

    /// Leader and follower on two threads, the work released by a third: both get the one
    /// result, the work completes once.
    #[test]
    fn loom_leader_and_follower_share_one_completion() {
        loom::model(|| {
            let (signal, done, dropped) = (Signal::default(), Arc::default(), Arc::default());
            let (flight, mut follower) = Flight::joined();
            let flight = Arc::new(flight);
            let mut leader = Waiter::leader(Some(work(
                signal.clone(),
                Arc::clone(&done),
                Arc::clone(&dropped),
            )));

            let f = flight.clone();
            let t = thread::spawn(move || wait(&f, &mut follower));
            let s = thread::spawn(move || signal.set());
            assert_eq!(lead(&flight, &mut leader), 7);
            assert_eq!(t.join().unwrap(), 7);
            s.join().unwrap();
            assert_eq!(done.load(SeqCst), 1);
            assert_eq!(dropped.load(SeqCst), 1);
            assert_eq!(flight.waiters(), 0);
        });
    }

    /// The leader leaves while the follower waits: the follower takes over the same work and
    /// is never stranded (loom reports a deadlock if it is never woken).
    #[test]
    fn loom_a_leaving_driver_hands_the_work_over() {
        loom::model(|| {
            let (signal, done, dropped) = (Signal::default(), Arc::default(), Arc::default());
            let (flight, mut follower) = Flight::joined();
            let flight = Arc::new(flight);
            let mut leader = Waiter::leader(Some(work(
                signal.clone(),
                Arc::clone(&done),
                Arc::clone(&dropped),
            )));

            // The leader drives once, then is cancelled unless that poll completed the work.
            let f = flight.clone();
            let l = thread::spawn(move || {
                let waker = futures::task::noop_waker();
                let work = leader.work().unwrap();
                match super::poll_work(work, &mut Context::from_waker(&waker)) {
                    Poll::Ready(polled) => {
                        let spent = leader.take_work();
                        assert!(f.complete(&mut leader, polled, spent).is_ok());
                    }
                    Poll::Pending => assert!(!f.leave(&mut leader), "the follower still waits"),
                }
            });
            let s = thread::spawn(move || signal.set());
            assert_eq!(wait(&flight, &mut follower), 7);
            l.join().unwrap();
            s.join().unwrap();
            assert_eq!(done.load(SeqCst), 1);
        });
    }

    /// Both callers leave concurrently: exactly one of them sees the flight abandoned, and the
    /// work is dropped exactly once, without completing.
    #[test]
    fn loom_the_last_caller_to_leave_drops_the_work() {
        loom::model(|| {
            let (done, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            let (flight, mut follower) = Flight::joined();
            let flight = Arc::new(flight);
            let mut leader =
                Waiter::leader(Some(work(Signal::default(), done.clone(), dropped.clone())));
            // The leader's first poll (the work waits for a signal nobody sets).
            let waker = futures::task::noop_waker();
            let first = super::poll_work(leader.work().unwrap(), &mut Context::from_waker(&waker));
            assert!(first.is_pending());

            let f = flight.clone();
            let t = thread::spawn(move || {
                let waker = futures::task::noop_waker();
                let _ = f.poll(&mut follower, &mut Context::from_waker(&waker));
                f.leave(&mut follower)
            });
            let mine = flight.leave(&mut leader);
            let theirs = t.join().unwrap();
            assert!(mine ^ theirs, "exactly one caller frees the key");
            assert_eq!(done.load(SeqCst), 0);
            assert_eq!(dropped.load(SeqCst), 1);
            assert!(
                flight.try_join().is_none(),
                "an abandoned flight takes no joiners"
            );
        });
    }

    /// A caller joining while the work completes either joins and gets the result, or is
    /// refused and starts afresh; never stranded.
    #[test]
    fn loom_a_join_racing_completion_is_served_or_refused() {
        loom::model(|| {
            let (done, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            let signal = Signal::default();
            signal.set();
            let (flight, mut follower) = Flight::joined();
            let flight = Arc::new(flight);
            let mut leader = Waiter::leader(Some(work(signal, done.clone(), dropped)));

            let f = flight.clone();
            let t = thread::spawn(move || f.try_join().map(|mut w| wait(&f, &mut w)));
            let f = flight.clone();
            let first = thread::spawn(move || wait(&f, &mut follower));
            assert_eq!(lead(&flight, &mut leader), 7);
            assert!(t.join().unwrap().is_none_or(|v| v == 7));
            assert_eq!(first.join().unwrap(), 7);
            assert_eq!(done.load(SeqCst), 1);
        });
    }

    /// Checks `model` with at most 3 preemptions per execution (loom's advice for models of
    /// this size): the hand-off models run three threads that each take several locks, and
    /// unbounded they took 13 minutes of CI, bounded well under a second. Bounded, each
    /// still deadlocks on its bug: a dropped waiter that does not pass its share on, a
    /// reader that does not hand the outcome to its children.
    fn bounded(model: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(model);
    }

    /// Two followers wait; the work completes and the outcome is handed on down the chain
    /// (one waiter wakes the next, under loom): the first follower is dropped instead of
    /// reading it, in every interleaving, and the second is still woken and served (loom
    /// reports a deadlock if it is stranded).
    #[test]
    fn loom_a_follower_dropped_mid_hand_off_passes_its_share_on() {
        bounded(|| {
            let (signal, done, dropped) = (Signal::default(), Arc::default(), Arc::default());
            let (flight, mut first) = Flight::joined();
            let flight = Arc::new(flight);
            let mut second = match flight.try_join() {
                Some(waiter) => waiter,
                None => unreachable!("the flight runs"),
            };
            let mut leader = Waiter::leader(Some(work(signal.clone(), Arc::clone(&done), dropped)));

            let f = flight.clone();
            let dropping = thread::spawn(move || {
                // Parks (or finds the outcome), then goes away without reading it.
                let waker = futures::task::noop_waker();
                match f.poll(&mut first, &mut Context::from_waker(&waker)) {
                    Poll::Pending => assert!(!f.leave(&mut first)),
                    Poll::Ready(finished) => assert!(finished.is_ok()),
                }
            });
            let f = flight.clone();
            let reading = thread::spawn(move || wait(&f, &mut second));
            signal.set();
            assert_eq!(lead(&flight, &mut leader), 7);
            assert_eq!(reading.join().unwrap(), 7);
            dropping.join().unwrap();
            assert_eq!(done.load(SeqCst), 1);
            assert_eq!(flight.waiters(), 0);
        });
    }

    /// Two followers read the outcome handed down the chain, whatever the order they are
    /// polled in: both get it, and the count of unread waiters ends at zero.
    #[test]
    fn loom_the_outcome_goes_down_the_hand_off_to_every_follower() {
        bounded(|| {
            let (signal, done, dropped) = (Signal::default(), Arc::default(), Arc::default());
            signal.set();
            let (flight, mut first) = Flight::joined();
            let flight = Arc::new(flight);
            let mut second = match flight.try_join() {
                Some(waiter) => waiter,
                None => unreachable!("the flight runs"),
            };
            let mut leader = Waiter::leader(Some(work(signal, Arc::clone(&done), dropped)));
            let f = flight.clone();
            let a = thread::spawn(move || wait(&f, &mut first));
            let f = flight.clone();
            let b = thread::spawn(move || wait(&f, &mut second));
            assert_eq!(lead(&flight, &mut leader), 7);
            assert_eq!(a.join().unwrap(), 7);
            assert_eq!(b.join().unwrap(), 7);
            assert_eq!(flight.waiters(), 0);
        });
    }

    /// A flight capped at one follower has one; its leader leaves while another caller asks
    /// to join: the caller is refused in every interleaving (the leader leaving frees no
    /// follower place), and the work completes once for the follower.
    #[test]
    fn loom_a_follower_cap_counts_followers_only_while_the_leader_leaves() {
        loom::model(|| {
            let (signal, done, dropped) = (Signal::default(), Arc::default(), Arc::default());
            let (flight, mut follower) = Flight::joined();
            let flight = Arc::new(flight);
            let mut leader = Waiter::leader(Some(work(signal.clone(), Arc::clone(&done), dropped)));
            let f = flight.clone();
            let leaving = thread::spawn(move || {
                f.leave(&mut leader);
            });
            let f = flight.clone();
            let late = thread::spawn(move || matches!(f.try_join_if(|n| n < 1), Join::Joined(_)));
            assert!(!late.join().unwrap(), "a second follower was admitted");
            signal.set();
            assert_eq!(wait(&flight, &mut follower), 7);
            leaving.join().unwrap();
            assert_eq!(done.load(SeqCst), 1);
        });
    }
}
