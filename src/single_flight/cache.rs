//! Single-flight caching: a [`Group`] whose results are kept for a while.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use super::group::{DefaultHashBuilder, Group};

/// How long a cached value may be used, counted from when its work completed.
///
/// The windows follow HTTP's `max-age`, `stale-while-revalidate` and `stale-if-error`
/// (RFC 9111, RFC 5861): both stale windows start when the value stops being fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lifetimes {
    /// How long the value is served as it is, without running the work.
    pub fresh: Duration,
    /// After `fresh`: how long the value is still served at once while one refresh runs in
    /// the background.
    pub stale_while_revalidate: Duration,
    /// After `fresh`: how long the value is served in place of an error from the work.
    pub stale_if_error: Duration,
}

impl Lifetimes {
    /// Fresh for `fresh`, never stale.
    pub fn fresh_for(fresh: Duration) -> Self {
        Lifetimes {
            fresh,
            ..Lifetimes::default()
        }
    }

    /// The longest the value can be of any use.
    pub(crate) fn usable(&self) -> Duration {
        // Saturating: lifetimes are the user's, and `Duration::MAX` means "forever".
        self.fresh
            .saturating_add(self.stale_while_revalidate.max(self.stale_if_error))
    }

    /// Where a value of this `age` stands; the one reading of the windows, for the core
    /// cache and the HTTP cache alike.
    pub(crate) fn state(&self, age: Duration) -> Freshness {
        let stale = age.saturating_sub(self.fresh);
        if age < self.fresh {
            Freshness::Fresh
        } else if stale < self.stale_while_revalidate {
            Freshness::Revalidate
        } else if stale < self.stale_if_error {
            Freshness::IfError
        } else {
            Freshness::Expired
        }
    }
}

/// Where a kept value stands: [`Lifetimes::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Freshness {
    Fresh,
    /// Within `stale-while-revalidate`: served at once, refreshed in the background.
    Revalidate,
    /// Past it but within `stale-if-error`: served only in place of an error.
    IfError,
    Expired,
}

/// How a caller came by its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CacheStatus {
    /// A fresh cached value; nothing ran.
    Hit,
    /// A stale cached value, served at once while a refresh runs, or in place of an error.
    Stale,
    /// No usable value: this caller ran the work.
    Miss,
    /// No usable value: this caller joined the work another caller had started.
    Coalesced,
}

/// The answer of [`Cache::fetch`]: the result and where it came from.
#[derive(Debug, Clone)]
pub struct Fetched<V, E> {
    result: Result<V, E>,
    status: CacheStatus,
    age: Duration,
}

impl<V, E> Fetched<V, E> {
    /// How the value was come by.
    pub fn status(&self) -> CacheStatus {
        self.status
    }

    /// How long ago the work that produced the result completed (zero unless cached).
    pub fn age(&self) -> Duration {
        self.age
    }

    /// The result.
    pub fn result(&self) -> &Result<V, E> {
        &self.result
    }

    /// Takes the result.
    pub fn into_result(self) -> Result<V, E> {
        self.result
    }
}

/// One cached result and its clock. Kept by value, not behind an `Arc`: a hit clones it
/// (the clone of `V` and two words), as a bare moka `get` clones `V`.
#[derive(Clone)]
struct Slot<V, E> {
    result: Result<V, E>,
    stored: Instant,
    lifetimes: Lifetimes,
    /// Which insertion this is, with a shared store: its store key's entry in
    /// [`Shared::keys`] is dropped with this slot only, not with a newer one.
    #[cfg(feature = "http-cache")]
    seq: u64,
}

impl<V, E> Slot<V, E> {
    fn state(&self, now: Instant) -> Freshness {
        // A cached error has no stale windows (`negative_ttl` is freshness only).
        self.lifetimes
            .state(now.saturating_duration_since(self.stored))
    }
}

/// A flight's licence to store its result: revoked by [`Cache::invalidate`], under the lock
/// that storing takes too, so that no result of a flight started before an invalidation is
/// stored after it.
#[derive(Default)]
struct Ticket {
    revoked: Mutex<bool>,
}

const DEFAULT_LIFETIMES: Lifetimes = Lifetimes {
    fresh: Duration::from_secs(60),
    stale_while_revalidate: Duration::ZERO,
    stale_if_error: Duration::ZERO,
};

type EntriesBuilder<K, V, E> =
    moka::sync::CacheBuilder<K, Slot<V, E>, moka::sync::Cache<K, Slot<V, E>>>;

type LifetimesOf<V> = Arc<dyn Fn(&V) -> Lifetimes + Send + Sync>;

/// A single-flight cache: [`get_with`](Cache::get_with) runs the work once per key for all
/// concurrent callers, as [`Group::run`] does, and keeps the result for its
/// [`Lifetimes`], with stale-while-revalidate and stale-if-error.
///
/// - A miss runs the work once, however many callers: they share one flight, with the
///   group's guarantees (a cancelled caller hands the work over, a panic reaches every
///   waiter, waiting costs no CPU).
/// - A fresh value is returned at once; nothing runs.
/// - A value within `stale_while_revalidate` is returned at once too, and the first such
///   caller starts exactly one refresh on a tokio task.
/// - Past that, callers wait for a new flight; if its work fails while the old value is
///   within `stale_if_error`, they get the old value instead of the error.
/// - Errors are not cached unless [`CacheBuilder::negative_ttl`] says for how long.
/// - With [`eager_refresh`](CacheBuilder::eager_refresh), a hit late in its freshness starts
///   one refresh in the background, so that a value in demand never goes stale; with
///   [`soft_timeout`](CacheBuilder::soft_timeout) and
///   [`hard_timeout`](CacheBuilder::hard_timeout), a caller waits for slow work only so
///   long before it gets the stale value or an error, while the work completes in the
///   background (FusionCache's eager refresh and factory timeouts).
/// - [`invalidate`](Cache::invalidate) removes a key: the next call runs fresh even while
///   a flight for it is running, and that flight's result is not stored.
///
/// Entries live in a [moka](https://docs.rs/moka) cache, bounded by count or by weight.
/// Clones share the entries and the flights.
///
/// Freshness is measured on tokio's clock, so that tests can pause and advance time; the
/// background refresh needs a tokio runtime.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tower_coalesce::single_flight::{Cache, CacheStatus, Lifetimes};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let reports: Cache<u32, String> = Cache::builder()
///     .max_capacity(10_000)
///     .lifetimes(Lifetimes {
///         fresh: Duration::from_secs(30),
///         stale_while_revalidate: Duration::from_secs(60),
///         stale_if_error: Duration::ZERO,
///     })
///     .build();
///
/// let first = reports.get_with(7, || async { "report 7".to_string() }).await;
/// let again = reports.fetch(7, || async { unreachable!("fresh: nothing runs") }).await;
/// assert_eq!(first, "report 7");
/// assert_eq!(again.status(), CacheStatus::Hit);
/// # }
/// ```
pub struct Cache<K, V, E = Infallible> {
    inner: Arc<Inner<K, V, E>>,
}

struct Inner<K, V, E> {
    entries: moka::sync::Cache<K, Slot<V, E>, DefaultHashBuilder>,
    flights: Group<K, Result<V, E>>,
    tickets: DashMap<K, Arc<Ticket>, DefaultHashBuilder>,
    lifetimes: LifetimesOf<V>,
    negative_ttl: Option<Duration>,
    timing: Timing<E>,
    #[cfg(feature = "http-cache")]
    shared: Option<Shared<K, V>>,
}

/// The second level, and what keeps the first in sync with it.
#[cfg(feature = "http-cache")]
struct Shared<K, V> {
    tier: Arc<dyn super::shared::Tier<K, V>>,
    /// The keys of the first level's entries and running flights by their store keys,
    /// which changes name.
    keys: Arc<DashMap<crate::store::StoreKey, Filing<K>, DefaultHashBuilder>>,
    /// The next slot's `seq`.
    next_seq: std::sync::atomic::AtomicU64,
    /// Whether the first fetch started listening to the changes (on the runtime that runs
    /// it: a cache may be built outside of one).
    listening: std::sync::Once,
}

/// A key in [`Shared::keys`], and the `seq`s of the slots and flights filed under it: each
/// takes its own out when it goes, so that none takes another's (moka tells of an
/// invalidated slot lazily, maybe after the key was kept again).
#[cfg(feature = "http-cache")]
struct Filing<K> {
    key: K,
    seqs: Vec<u64>,
}

/// When the cache runs the work early, and how long callers wait for it.
struct Timing<E> {
    /// A hit at least this far into its freshness (a fraction of it) starts a refresh.
    eager_refresh: Option<f64>,
    soft_timeout: Option<Duration>,
    /// The hard timeout, and the error it answers.
    hard_timeout: Option<(Duration, TimedOutError<E>)>,
}

type TimedOutError<E> = Arc<dyn Fn(TimedOut) -> E + Send + Sync>;

impl<E> Default for Timing<E> {
    fn default() -> Self {
        Timing {
            eager_refresh: None,
            soft_timeout: None,
            hard_timeout: None,
        }
    }
}

/// The error of a caller that waited for the work past the
/// [hard timeout](CacheBuilder::hard_timeout), with no stale value to stand in. The work
/// goes on in the background, and its result is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut {
    after: Duration,
}

impl TimedOut {
    /// How long the caller waited.
    pub fn after(&self) -> Duration {
        self.after
    }
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the cached work did not complete within its hard timeout of {:?}",
            self.after
        )
    }
}

impl std::error::Error for TimedOut {}

/// Configures a [`Cache`]: [`Cache::builder`].
#[must_use]
pub struct CacheBuilder<K, V, E> {
    entries: EntriesBuilder<K, V, E>,
    lifetimes: LifetimesOf<V>,
    /// The lifetimes, when every value has the same.
    constant: Option<Lifetimes>,
    negative_ttl: Option<Duration>,
    timing: Timing<E>,
    #[cfg(feature = "http-cache")]
    shared: Option<Arc<dyn super::shared::Tier<K, V>>>,
}

impl<K, V, E> Cache<K, V, E>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    /// A builder; its defaults: at most 10,000 entries, fresh for 60 s, no stale windows,
    /// errors not cached.
    pub fn builder() -> CacheBuilder<K, V, E> {
        CacheBuilder {
            entries: moka::sync::Cache::builder().max_capacity(10_000),
            lifetimes: constant(DEFAULT_LIFETIMES),
            constant: Some(DEFAULT_LIFETIMES),
            negative_ttl: None,
            timing: Timing::default(),
            #[cfg(feature = "http-cache")]
            shared: None,
        }
    }

    /// Returns the value for `key`, running the future made by `make` only when no usable
    /// value is cached (see the [type docs](Cache) for what usable means), once for every
    /// caller of `key` while it runs.
    ///
    /// `make` is called at most once per call, and only when this caller starts a flight or
    /// a background refresh.
    pub async fn try_get_with<F, Fut>(&self, key: K, make: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
    {
        self.fetch(key, make).await.into_result()
    }

    /// [`try_get_with`](Self::try_get_with), telling how the result was come by and its age.
    pub async fn fetch<F, Fut>(&self, key: K, make: F) -> Fetched<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
    {
        #[cfg(feature = "http-cache")]
        self.inner.listen();
        let now = Instant::now();
        let mut fallback = None;
        if let Some(slot) = self.inner.entries.get(&key) {
            match slot.state(now) {
                Freshness::Fresh => {
                    if self.inner.due_early(&slot, now) {
                        self.refresh(key, make, now.saturating_duration_since(slot.stored));
                    }
                    return served(slot, CacheStatus::Hit, now);
                }
                Freshness::Revalidate => {
                    self.refresh(key, make, now.saturating_duration_since(slot.stored));
                    return served(slot, CacheStatus::Stale, now);
                }
                Freshness::IfError => fallback = Some(slot),
                Freshness::Expired => {}
            }
        }

        let run = self
            .inner
            .flights
            .run(key.clone(), || self.flight(key, make(), None));
        let leader = run.is_leader();
        let result = match self.inner.wait_limit(fallback.is_some()) {
            None => run.await.into_value(),
            Some(limit) => {
                let mut run = Box::pin(run);
                match tokio::time::timeout(limit, run.as_mut()).await {
                    Ok(outcome) => outcome.into_value(),
                    Err(_) => {
                        // The work goes on, for the callers still waiting and to keep its
                        // result; this caller has the stale value, or the timeout's error.
                        tokio::spawn(run);
                        match fallback {
                            Some(slot) => return served(slot, CacheStatus::Stale, Instant::now()),
                            None => Err(self.inner.timed_out(limit)),
                        }
                    }
                }
            }
        };
        match (result, fallback) {
            (Err(_), Some(slot)) => served(slot, CacheStatus::Stale, Instant::now()),
            (result, _) => Fetched {
                result,
                status: if leader {
                    CacheStatus::Miss
                } else {
                    CacheStatus::Coalesced
                },
                age: Duration::ZERO,
            },
        }
    }

    /// Removes the value of `key`; the next call runs the work, even while a flight for
    /// `key` is running. Callers already waiting on that flight get its result, which is
    /// not stored.
    ///
    /// With a [shared store](CacheBuilder::shared), the value is removed from the store too,
    /// and the other instances drop theirs, by a task of its own (when called within a
    /// Tokio runtime).
    pub fn invalidate(&self, key: &K) {
        self.inner.invalidate(key);
        #[cfg(feature = "http-cache")]
        if let (Some(shared), Ok(runtime)) =
            (&self.inner.shared, tokio::runtime::Handle::try_current())
        {
            runtime.spawn(shared.tier.forget(key));
        }
    }

    /// The number of cached entries (moka's estimate: evictions are applied lazily).
    pub fn entry_count(&self) -> u64 {
        self.inner.entries.entry_count()
    }

    /// Wraps the work of a new flight: it takes a ticket first and stores the result after.
    fn flight<Fut>(
        &self,
        key: K,
        work: Fut,
        refreshing: Option<Duration>,
    ) -> impl Future<Output = Result<V, E>> + Send + use<K, V, E, Fut>
    where
        Fut: Future<Output = Result<V, E>> + Send + 'static,
    {
        let ticket = Arc::new(Ticket::default());
        self.inner.tickets.insert(key.clone(), ticket.clone());
        // A change another instance announces while the flight reads the store may be of
        // what it reads: the flight hears of it (its ticket is revoked), as a kept value does.
        #[cfg(feature = "http-cache")]
        let watched = self.inner.watch(&key);
        let inner = self.inner.clone();
        async move {
            // Taken out however the flight ends: one whose callers all went is dropped
            // unfinished.
            let registered = {
                let (inner, key, ticket) = (inner.clone(), key.clone(), ticket.clone());
                OnDrop(Some(move || {
                    inner
                        .tickets
                        .remove_if(&key, |_, registered| Arc::ptr_eq(registered, &ticket));
                    #[cfg(feature = "http-cache")]
                    inner.unwatch(watched);
                }))
            };
            let result = inner.run(&key, work, &ticket, refreshing).await;
            drop(registered);
            result
        }
    }

    /// Starts a refresh of `key` on a tokio task, unless a flight for `key` runs already: the
    /// flight is the refresh, so that exactly one runs, and the first stale call after a
    /// failed one starts the next.
    ///
    /// `age`: the age of the value it refreshes; with a shared store, only a younger value
    /// kept there (another instance's refresh) stands for this refresh.
    fn refresh<F, Fut>(&self, key: K, make: F, age: Duration)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
    {
        let run = self
            .inner
            .flights
            .run(key.clone(), || self.flight(key, make(), Some(age)));
        if run.is_leader() {
            tokio::spawn(run);
        }
    }
}

impl<K, V> Cache<K, V, Infallible>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Returns the value for `key`, running the future made by `make` only when no usable
    /// value is cached, once for every caller of `key` while it runs. For work that can
    /// fail, see [`try_get_with`](Self::try_get_with).
    pub async fn get_with<F, Fut>(&self, key: K, make: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let work = |fut: Fut| async move { Ok::<_, Infallible>(fut.await) };
        match self.try_get_with(key, || work(make())).await {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }
}

impl<K, V, E> Inner<K, V, E>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    /// Whether a fresh hit on `slot` starts a refresh: it is past the eager-refresh
    /// fraction of its freshness (a cached error never is).
    fn due_early(&self, slot: &Slot<V, E>, now: Instant) -> bool {
        let Some(fraction) = self.timing.eager_refresh else {
            return false;
        };
        let age = now.saturating_duration_since(slot.stored);
        slot.result.is_ok() && age >= slot.lifetimes.fresh.mul_f64(fraction)
    }

    /// How long a caller waits for a flight before it takes the stale value (`fallback`:
    /// it has one; the soft timeout) or fails (the hard one); `None`: until it ends.
    fn wait_limit(&self, fallback: bool) -> Option<Duration> {
        let soft = self.timing.soft_timeout.filter(|_| fallback);
        let hard = self.timing.hard_timeout.as_ref().map(|(hard, _)| *hard);
        match (soft, hard) {
            (Some(soft), Some(hard)) => Some(soft.min(hard)),
            (soft, hard) => soft.or(hard),
        }
    }

    fn timed_out(&self, after: Duration) -> E {
        let (_, error) = self
            .timing
            .hard_timeout
            .as_ref()
            .expect("only the hard timeout fails a caller without a stale value");
        error(TimedOut { after })
    }

    /// Keeps the result of a flight, completed `age` ago (a value another instance kept).
    fn store(&self, key: &K, result: &Result<V, E>, ticket: &Ticket, age: Duration) {
        let lifetimes = match result {
            Ok(value) => (self.lifetimes)(value),
            Err(_) => match self.negative_ttl {
                Some(ttl) => Lifetimes::fresh_for(ttl),
                None => return,
            },
        };
        if lifetimes.usable().is_zero() {
            return;
        }
        // An error never replaces a value that may still stand in for it.
        if result.is_err()
            && let Some(old) = self.entries.get(key)
            && !matches!(old.state(Instant::now()), Freshness::Expired)
        {
            return;
        }
        let revoked = lock(&ticket.revoked);
        if *revoked {
            return;
        }
        let now = Instant::now();
        let slot = Slot {
            result: result.clone(),
            stored: now.checked_sub(age).unwrap_or(now),
            lifetimes,
            #[cfg(feature = "http-cache")]
            seq: self.watch(key).map_or(0, |(_, seq)| seq),
        };
        self.entries.insert(key.clone(), slot);
    }

    /// Files `key` under its store key with a new `seq`, with a shared store: a change that
    /// names the store key then drops the key's value, or revokes the ticket of the flight
    /// that would keep it.
    #[cfg(feature = "http-cache")]
    fn watch(&self, key: &K) -> Option<(crate::store::StoreKey, u64)> {
        let shared = self.shared.as_ref()?;
        let seq = shared
            .next_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let store_key = shared.tier.store_key(key);
        let mut filing = shared
            .keys
            .entry(store_key.clone())
            .or_insert_with(|| Filing {
                key: key.clone(),
                seqs: Vec::new(),
            });
        filing.seqs.push(seq);
        Some((store_key, seq))
    }

    /// Takes out what [`watch`](Self::watch) filed.
    #[cfg(feature = "http-cache")]
    fn unwatch(&self, watched: Option<(crate::store::StoreKey, u64)>) {
        if let (Some(shared), Some((store_key, seq))) = (&self.shared, watched) {
            unfile(&shared.keys, store_key, seq);
        }
    }

    /// Runs a flight's work and keeps its result; with a shared store, the store's value
    /// may stand for the work (`refreshing`: the age of the value a refresh replaces).
    async fn run<Fut>(
        &self,
        key: &K,
        work: Fut,
        ticket: &Ticket,
        refreshing: Option<Duration>,
    ) -> Result<V, E>
    where
        Fut: Future<Output = Result<V, E>>,
    {
        #[cfg(feature = "http-cache")]
        if let Some(shared) = &self.shared {
            return self
                .shared_flight(shared, key, work, ticket, refreshing)
                .await;
        }
        #[cfg(not(feature = "http-cache"))]
        let _ = refreshing;
        let result = work.await;
        self.store(key, &result, ticket, Duration::ZERO);
        result
    }

    /// Drops `key` here: its value, and the licence of its running flight to keep its
    /// result.
    fn invalidate(&self, key: &K) {
        if let Some((_, ticket)) = self.tickets.remove(key) {
            *lock(&ticket.revoked) = true;
        }
        self.flights.forget(key);
        self.entries.invalidate(key);
    }

    /// Drops every value here, as [`invalidate`](Self::invalidate) does each.
    #[cfg(feature = "http-cache")]
    fn invalidate_all(&self) {
        for ticket in self.tickets.iter() {
            *lock(&ticket.revoked) = true;
        }
        self.entries.invalidate_all();
    }

    /// A flight of a cache with a shared store: the store's fresh value if there is one
    /// (another instance's), else the work, under the key's lease when the store has
    /// leases; its value is then kept in the store too.
    #[cfg(feature = "http-cache")]
    async fn shared_flight<Fut>(
        &self,
        shared: &Shared<K, V>,
        key: &K,
        work: Fut,
        ticket: &Ticket,
        refreshing: Option<Duration>,
    ) -> Result<V, E>
    where
        Fut: Future<Output = Result<V, E>>,
    {
        use super::shared::Found;
        // A refresh takes only a value kept after the one it refreshes (by another
        // instance's refresh); 5 ms for the milliseconds the keeping time is written in.
        let newer =
            |age: Duration| refreshing.is_none_or(|old| age + Duration::from_millis(5) < old);
        let fresh =
            |value: &V, age| (self.lifetimes)(value).state(age) == Freshness::Fresh && newer(age);
        match shared.tier.find(key, &fresh).await {
            Found::Value(value, age) => {
                let result = Ok(value);
                self.store(key, &result, ticket, age);
                result
            }
            Found::Run(lease) => {
                let result = work.await;
                self.store(key, &result, ticket, Duration::ZERO);
                let kept = result.as_ref().ok().and_then(|value| {
                    let usable = (self.lifetimes)(value).usable();
                    (!usable.is_zero()).then_some((value, usable))
                });
                shared.tier.keep(key, lease, kept).await;
                result
            }
        }
    }

    /// Starts listening to the shared store's changes, once: a task that drops the values
    /// other instances changed, and every value when changes may have been lost.
    #[cfg(feature = "http-cache")]
    fn listen(self: &Arc<Self>) {
        let Some(shared) = &self.shared else {
            return;
        };
        shared.listening.call_once(|| {
            let Some(mut changes) = shared.tier.changes() else {
                return;
            };
            let inner = Arc::downgrade(self);
            tokio::spawn(async move {
                use tokio::sync::broadcast::error::RecvError;
                loop {
                    let change = changes.recv().await;
                    let Some(inner) = inner.upgrade() else { return };
                    let Some(shared) = &inner.shared else { return };
                    match change {
                        Ok(crate::store::Change::Keys(keys)) => {
                            for key in keys.iter() {
                                if let Some((_, filing)) = shared.keys.remove(key) {
                                    inner.invalidate(&filing.key);
                                }
                            }
                        }
                        Ok(_) | Err(RecvError::Lagged(_)) => inner.invalidate_all(),
                        Err(RecvError::Closed) => {
                            inner.invalidate_all();
                            return;
                        }
                    }
                }
            });
        });
    }
}

fn served<V, E>(slot: Slot<V, E>, status: CacheStatus, now: Instant) -> Fetched<V, E> {
    Fetched {
        result: slot.result,
        status,
        age: now.saturating_duration_since(slot.stored),
    }
}

/// Takes `seq` out of the filing of `store_key`, and the filing with its last one.
#[cfg(feature = "http-cache")]
fn unfile<K>(
    keys: &DashMap<crate::store::StoreKey, Filing<K>, DefaultHashBuilder>,
    store_key: crate::store::StoreKey,
    seq: u64,
) {
    if let dashmap::Entry::Occupied(mut filing) = keys.entry(store_key) {
        filing.get_mut().seqs.retain(|filed| *filed != seq);
        if filing.get().seqs.is_empty() {
            filing.remove();
        }
    }
}

/// Runs its function when dropped.
struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

fn lock(revoked: &Mutex<bool>) -> std::sync::MutexGuard<'_, bool> {
    // A poisoned flag is still a flag: it is only ever set.
    revoked
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn constant<V>(lifetimes: Lifetimes) -> LifetimesOf<V> {
    Arc::new(move |_| lifetimes)
}

impl<K, V, E> CacheBuilder<K, V, E>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    /// At most `entries` entries, or at most that total weight with [`weigher`](Self::weigher).
    pub fn max_capacity(mut self, entries: u64) -> Self {
        self.entries = self.entries.max_capacity(entries);
        self
    }

    /// Weighs each value (its size in bytes, say), so that
    /// [`max_capacity`](Self::max_capacity) bounds the total weight. A cached error weighs 1.
    pub fn weigher(mut self, weigh: impl Fn(&K, &V) -> u32 + Send + Sync + 'static) -> Self {
        self.entries = self
            .entries
            .weigher(move |key, slot: &Slot<V, E>| match &slot.result {
                Ok(value) => weigh(key, value),
                Err(_) => 1,
            });
        self
    }

    /// Values are fresh for `ttl`, with no stale windows.
    pub fn time_to_live(self, ttl: Duration) -> Self {
        self.lifetimes(Lifetimes::fresh_for(ttl))
    }

    /// The same lifetimes for every value.
    pub fn lifetimes(mut self, lifetimes: Lifetimes) -> Self {
        self.lifetimes = constant(lifetimes);
        self.constant = Some(lifetimes);
        self
    }

    /// The lifetimes of each value, read from the value (an HTTP response's `Cache-Control`,
    /// a token's expiry). A value whose lifetimes are all zero is not stored.
    pub fn lifetimes_with(mut self, of: impl Fn(&V) -> Lifetimes + Send + Sync + 'static) -> Self {
        self.lifetimes = Arc::new(of);
        self.constant = None;
        self
    }

    /// Caches errors too, fresh for `ttl` (negative caching); by default an error is shared
    /// with the callers of its flight only. An error never replaces a value that may still be
    /// served stale.
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = Some(ttl);
        self
    }

    /// Refreshes a value early: a hit at least `fraction` of the way into its freshness
    /// (0.8: in its last fifth) starts one refresh in the background, as a stale hit does,
    /// so that a value in steady demand is replaced before it goes stale and no caller ever
    /// waits for it. The hit itself is answered at once. A refresh that fails leaves the
    /// value as it was, and the next hit past the mark tries again (one flight at a time).
    /// Off by default.
    ///
    /// # Panics
    ///
    /// If `fraction` is not between 0 and 1 (both excluded).
    pub fn eager_refresh(mut self, fraction: f64) -> Self {
        assert!(
            fraction > 0.0 && fraction < 1.0,
            "eager_refresh takes a fraction of the freshness, between 0 and 1: {fraction}"
        );
        self.timing.eager_refresh = Some(fraction);
        self
    }

    /// How long a caller waits for the work when a stale value could stand in for it
    /// (within `stale_if_error`): past `timeout` it gets the stale value
    /// ([`CacheStatus::Stale`]), and the work goes on in the background; its result is
    /// kept when it completes. Off by default: callers wait for the work.
    pub fn soft_timeout(mut self, timeout: Duration) -> Self {
        self.timing.soft_timeout = Some(timeout);
        self
    }

    /// The longest a caller waits for the work: past `timeout` it gets the stale value if
    /// there is one, and else the error `E::from(`[`TimedOut`]`)`; the work goes on in the
    /// background and its result is kept when it completes. Off by default.
    pub fn hard_timeout(mut self, timeout: Duration) -> Self
    where
        E: From<TimedOut>,
    {
        self.timing.hard_timeout = Some((timeout, Arc::new(E::from)));
        self
    }

    /// A second level under the cache's own entries: `store`, which several instances
    /// share ([`RedisStore`](crate::redis::RedisStore),
    /// [`PostgresStore`](crate::postgres::PostgresStore)), the values written by `codec`
    /// under keys named `name` and the key (so that two caches share a store apart).
    ///
    /// - A miss here looks the store up: a fresh value kept by another instance answers
    ///   (with its age), and the work does not run.
    /// - Otherwise one instance runs the work, under the key's lease, while the others wait
    ///   for its release and read its value; the value is kept in the store for as long as
    ///   it is usable.
    /// - An instance that keeps a value announces it, and the others drop theirs (the
    ///   store's backplane: Redis pub/sub, PostgreSQL `NOTIFY`); when changes may have been
    ///   lost (a dropped connection), every value here is dropped. A read of the store that
    ///   a change of its key overtakes is answered but not kept (it may be of the value
    ///   before the change). A value here never outlives its own lifetimes.
    /// - Errors stay with the instance (and its `negative_ttl`); a store that fails is
    ///   logged, and the work runs here.
    ///
    /// Ages across instances are read from the keeping instance's clock: the clocks must
    /// agree to well under the values' freshness. Feature `http-cache` (the stores are
    /// those of the HTTP layers).
    #[cfg(feature = "http-cache")]
    #[cfg_attr(docsrs, doc(cfg(feature = "http-cache")))]
    pub fn shared<St, C>(mut self, name: &str, store: St, codec: C) -> Self
    where
        K: crate::http::key::EncodeKey,
        St: crate::store::Store,
        C: super::shared::Codec<V>,
    {
        self.shared = Some(Arc::new(super::shared::StoreTier {
            name: name.into(),
            store,
            codec,
        }));
        self
    }

    /// Builds the cache.
    pub fn build(self) -> Cache<K, V, E> {
        // Moka drops an entry once it can be of no more use; freshness itself is judged on
        // tokio's clock by `Slot::state`. When every value has the same lifetimes, moka's
        // plain time-to-live does it: a hit then costs what a bare moka `get` costs, where a
        // per-entry expiry costs some 30 ns more per read (benches/cache.rs).
        let entries = match self.constant {
            Some(lifetimes) => {
                let ttl = lifetimes
                    .usable()
                    .max(self.negative_ttl.unwrap_or_default());
                self.entries.time_to_live(moka_ttl(ttl))
            }
            None => self.entries.expire_after(Expire),
        };
        #[cfg(feature = "http-cache")]
        let shared = self.shared.map(|tier| Shared {
            tier,
            keys: Arc::new(DashMap::with_hasher(DefaultHashBuilder::new())),
            next_seq: std::sync::atomic::AtomicU64::new(0),
            listening: std::sync::Once::new(),
        });
        // The keys of the values a change may name are forgotten with the values, each
        // slot's filing with its slot (see `Filing`).
        #[cfg(feature = "http-cache")]
        let entries = match &shared {
            Some(shared) => {
                let (tier, keys) = (shared.tier.clone(), shared.keys.clone());
                entries.eviction_listener(move |key, slot: Slot<V, E>, _| {
                    unfile(&keys, tier.store_key(&key), slot.seq);
                })
            }
            None => entries,
        };
        let entries = entries.build_with_hasher(DefaultHashBuilder::new());
        Cache {
            inner: Arc::new(Inner {
                entries,
                flights: Group::new(),
                tickets: DashMap::with_hasher(DefaultHashBuilder::new()),
                lifetimes: self.lifetimes,
                negative_ttl: self.negative_ttl,
                timing: self.timing,
                #[cfg(feature = "http-cache")]
                shared,
            }),
        }
    }
}

/// Lets moka drop an entry once it can be of no more use, when lifetimes differ per value.
struct Expire;

impl<K, V, E> moka::Expiry<K, Slot<V, E>> for Expire {
    fn expire_after_create(
        &self,
        _: &K,
        slot: &Slot<V, E>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(moka_ttl(slot.lifetimes.usable()))
    }

    fn expire_after_update(
        &self,
        _: &K,
        slot: &Slot<V, E>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(moka_ttl(slot.lifetimes.usable()))
    }
}

/// How long moka keeps an entry that may be used for `usable`: at least 1 ms (moka's
/// expiry works in whole ticks), and at most its own limit of 1000 years, past which moka
/// panics; `Duration::MAX` (forever) is a fair thing for a user to ask.
fn moka_ttl(usable: Duration) -> Duration {
    const MOKA_LIMIT: Duration = Duration::from_secs(1000 * 365 * 24 * 60 * 60);
    usable.clamp(Duration::from_millis(1), MOKA_LIMIT)
}

impl<K, V, E> fmt::Debug for CacheBuilder<K, V, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("negative_ttl", &self.negative_ttl)
            .finish_non_exhaustive()
    }
}

impl<K, V, E> Clone for Cache<K, V, E> {
    fn clone(&self) -> Self {
        Cache {
            inner: self.inner.clone(),
        }
    }
}

impl<K, V, E> fmt::Debug for Cache<K, V, E>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("entries", &self.inner.entries.entry_count())
            .field("in_flight", &self.inner.flights.in_flight())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flight whose only caller goes away is dropped unfinished: its ticket goes with it
    /// (and, with a shared store, its filing under the store key).
    #[tokio::test]
    async fn a_flight_dropped_unfinished_leaves_no_ticket() {
        let cache: Cache<u32, String> = Cache::builder().build();
        let fetch = cache.get_with(1, std::future::pending::<String>);
        let gone = tokio::time::timeout(Duration::from_millis(10), fetch).await;
        assert!(gone.is_err(), "the work never completes");
        assert!(
            cache.inner.tickets.is_empty(),
            "the ticket outlived its flight"
        );
    }
}
