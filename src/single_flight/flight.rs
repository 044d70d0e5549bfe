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
//! - the work completes (or panics): the driver stores the outcome and wakes everybody;
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
use std::task::{Context, Poll, Waker, ready};
use std::thread;

use slab::Slab;

use crate::sync::{Mutex, MutexGuard};

/// The work of a flight, boxed so that any waiter can move it out and poll it.
pub(crate) type BoxWork<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

pub(crate) struct Flight<T> {
    state: Mutex<State<T>>,
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
    /// The value is taken, not cloned, by the last waiter to read it.
    Done(Option<T>),
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
                Work::Done(_) => return Poll::Ready(Ok(state.read_outcome(waiter))),
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
                state.work = Work::Done(Some(value));
                let mut finished = state.read_outcome(waiter);
                finished.release_key = true;
                wake_all(state, spent);
                Ok(finished)
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

impl<T> Flight<T> {
    /// The waiters that have neither read the outcome nor left.
    pub(crate) fn waiters(&self) -> usize {
        self.lock().waiters
    }

    /// A waiter goes away before it read the outcome (its future was dropped). Returns
    /// `true` when it was the last one: the work has been dropped and the caller must free
    /// the key.
    pub(crate) fn leave(&self, waiter: &mut Waiter<T>) -> bool {
        if waiter.finished {
            return false;
        }
        let held = waiter.work.take();
        let mut state = self.lock();
        state.leave(waiter);
        if !matches!(state.work, Work::Running(_)) {
            // Done or panicked: the outcome outlives its readers, nothing to hand over.
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

impl<T: Clone> State<T> {
    fn read_outcome(&mut self, waiter: &mut Waiter<T>) -> Finished<T> {
        self.leave(waiter);
        let last = self.waiters == 0;
        let Work::Done(value) = &mut self.work else {
            unreachable!("outcome read before the work completed");
        };
        let value = if last {
            value.take().expect("the last reader takes the value")
        } else {
            value
                .clone()
                .expect("the value stays until the last reader")
        };
        Finished {
            value,
            release_key: false,
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

/// Wakes every parked waiter once the flight has ended. The spent work is dropped and
/// the wakers are woken after releasing the lock: both run code that is not ours.
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
