use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Counters of an [`HttpCoalesceLayer`](super::HttpCoalesceLayer), shared by every service
/// it builds; read them, or export them to the metrics system you use.
///
/// ```
/// use tower_coalesce::http::{HttpCoalesceLayer, key};
///
/// let layer = HttpCoalesceLayer::new(key::idempotency_key());
/// let metrics = layer.metrics();
/// // ... serve ...
/// assert_eq!(metrics.flights_started(), 0);
/// ```
///
/// Counts are monotonic and relaxed: each is exact, but two read one after the other may
/// not be from the same instant.
#[derive(Clone, Default)]
pub struct Metrics {
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    flights_started: AtomicU64,
    callers_joined: AtomicU64,
    callers_cancelled: AtomicU64,
    bodies_over_limit: AtomicU64,
    keys_missing: AtomicU64,
    replayed: AtomicU64,
    followers_timed_out: AtomicU64,
    followers_shed: AtomicU64,
    duplicates_refused: AtomicU64,
    duplicates_passed_through: AtomicU64,
    responses_not_shared: AtomicU64,
    flights_waiting_elsewhere: AtomicU64,
    store_errors: AtomicU64,
    requests_without_key: AtomicU64,
    mismatches_queued: AtomicU64,
    mismatches_rejected: AtomicU64,
    cache_hits: AtomicU64,
    cache_stale: AtomicU64,
    cache_refreshes: AtomicU64,
    // Whether the first request without a key has been logged at WARN.
    warned_without_key: AtomicBool,
}

impl Metrics {
    /// Flights started: requests that found no flight for their key and called the inner
    /// service.
    pub fn flights_started(&self) -> u64 {
        self.counters.flights_started.load(Ordering::Relaxed)
    }

    /// Callers that joined a running flight instead of calling the inner service.
    pub fn callers_joined(&self) -> u64 {
        self.counters.callers_joined.load(Ordering::Relaxed)
    }

    /// Keyed callers whose response future was dropped before it completed (clients that
    /// disconnected, timeouts above the layer).
    pub fn callers_cancelled(&self) -> u64 {
        self.counters.callers_cancelled.load(Ordering::Relaxed)
    }

    /// Flights whose response body was over the body limit, so that followers got a `503`.
    pub fn bodies_over_limit(&self) -> u64 {
        self.counters.bodies_over_limit.load(Ordering::Relaxed)
    }

    /// Requests refused with `400` because they had no key and the layer requires one.
    pub fn keys_missing(&self) -> u64 {
        self.counters.keys_missing.load(Ordering::Relaxed)
    }

    /// Requests whose key maker found no key, whether they passed through or were refused.
    /// On a layer where every request should have a key, a count above zero means a
    /// misconfiguration: see [`HttpCoalesceLayer::require_key`](super::HttpCoalesceLayer::require_key).
    pub fn requests_without_key(&self) -> u64 {
        self.counters.requests_without_key.load(Ordering::Relaxed)
    }

    /// Counts a request without a key; `true` for the first one, which is logged louder.
    pub(crate) fn request_without_key(&self) -> bool {
        self.counters
            .requests_without_key
            .fetch_add(1, Ordering::Relaxed);
        // Read before written: once warned, the flag's cache line stays shared instead of
        // bouncing between cores with every request without a key.
        let warned = &self.counters.warned_without_key;
        !warned.load(Ordering::Relaxed) && !warned.swap(true, Ordering::Relaxed)
    }

    /// Requests that found their key's flight running for another request and waited for
    /// it to end before running ([`OnMismatch::Queue`](super::OnMismatch::Queue)).
    pub fn mismatches_queued(&self) -> u64 {
        self.counters.mismatches_queued.load(Ordering::Relaxed)
    }

    pub(crate) fn mismatch_queued(&self) {
        self.counters
            .mismatches_queued
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Requests answered `422` because their key belongs to another request.
    pub fn mismatches_rejected(&self) -> u64 {
        self.counters.mismatches_rejected.load(Ordering::Relaxed)
    }

    pub(crate) fn mismatch_rejected(&self) {
        self.counters
            .mismatches_rejected
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Responses replayed from a store (kept by [`replay`](super::HttpCoalesceLayer::replay),
    /// or handed over by another instance).
    pub fn responses_replayed(&self) -> u64 {
        self.counters.replayed.load(Ordering::Relaxed)
    }

    pub(crate) fn replayed(&self) {
        self.counters.replayed.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests answered from the HTTP cache with a fresh response (304s included).
    pub fn cache_hits(&self) -> u64 {
        self.counters.cache_hits.load(Ordering::Relaxed)
    }

    /// Requests answered from the HTTP cache with a stale response: within
    /// `stale-while-revalidate`, or in place of an error under `stale-if-error`.
    pub fn cache_stale(&self) -> u64 {
        self.counters.cache_stale.load(Ordering::Relaxed)
    }

    /// Background refreshes the HTTP cache started (one per key at a time).
    pub fn cache_refreshes(&self) -> u64 {
        self.counters.cache_refreshes.load(Ordering::Relaxed)
    }

    #[cfg_attr(not(feature = "http-cache"), allow(dead_code))]
    pub(crate) fn cache_answered(&self, fresh: bool) {
        let counter = match fresh {
            true => &self.counters.cache_hits,
            false => &self.counters.cache_stale,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    #[cfg_attr(not(feature = "http-cache"), allow(dead_code))]
    pub(crate) fn cache_refreshed(&self) {
        self.counters
            .cache_refreshes
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Followers that stopped waiting at the wait timeout.
    pub fn followers_timed_out(&self) -> u64 {
        self.counters.followers_timed_out.load(Ordering::Relaxed)
    }

    pub(crate) fn follower_timed_out(&self) {
        self.counters
            .followers_timed_out
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Callers turned away because their flight had as many followers as allowed.
    pub fn followers_shed(&self) -> u64 {
        self.counters.followers_shed.load(Ordering::Relaxed)
    }

    pub(crate) fn follower_shed(&self) {
        self.counters.followers_shed.fetch_add(1, Ordering::Relaxed);
    }

    /// Duplicates answered `409 Conflict` under `OnDuplicate::Conflict`.
    pub fn duplicates_refused(&self) -> u64 {
        self.counters.duplicates_refused.load(Ordering::Relaxed)
    }

    pub(crate) fn duplicate_refused(&self) {
        self.counters
            .duplicates_refused
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Duplicates sent to the inner service under `OnDuplicate::PassThrough`.
    pub fn duplicates_passed_through(&self) -> u64 {
        self.counters
            .duplicates_passed_through
            .load(Ordering::Relaxed)
    }

    pub(crate) fn duplicate_passed_through(&self) {
        self.counters
            .duplicates_passed_through
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Flights whose response was not to be shared, so that their followers ran on their own.
    pub fn responses_not_shared(&self) -> u64 {
        self.counters.responses_not_shared.load(Ordering::Relaxed)
    }

    pub(crate) fn response_not_shared(&self) {
        self.counters
            .responses_not_shared
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Idempotency flights that found the key's lease held by another instance, and waited
    /// for its response (Redis mode).
    pub fn flights_waiting_elsewhere(&self) -> u64 {
        self.counters
            .flights_waiting_elsewhere
            .load(Ordering::Relaxed)
    }

    pub(crate) fn flight_waiting_elsewhere(&self) {
        self.counters
            .flights_waiting_elsewhere
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Idempotency store calls that failed or timed out.
    pub fn store_errors(&self) -> u64 {
        self.counters.store_errors.load(Ordering::Relaxed)
    }

    pub(crate) fn store_error(&self) {
        self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn flight_started(&self) {
        self.counters
            .flights_started
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn caller_joined(&self) {
        self.counters.callers_joined.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn caller_cancelled(&self) {
        self.counters
            .callers_cancelled
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn body_over_limit(&self) {
        self.counters
            .bodies_over_limit
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn key_missing(&self) {
        self.counters.keys_missing.fetch_add(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("flights_started", &self.flights_started())
            .field("callers_joined", &self.callers_joined())
            .field("callers_cancelled", &self.callers_cancelled())
            .field("bodies_over_limit", &self.bodies_over_limit())
            .field("keys_missing", &self.keys_missing())
            .field("responses_replayed", &self.responses_replayed())
            .field("followers_timed_out", &self.followers_timed_out())
            .field("followers_shed", &self.followers_shed())
            .field("duplicates_refused", &self.duplicates_refused())
            .field(
                "duplicates_passed_through",
                &self.duplicates_passed_through(),
            )
            .field("responses_not_shared", &self.responses_not_shared())
            .field(
                "flights_waiting_elsewhere",
                &self.flights_waiting_elsewhere(),
            )
            .field("store_errors", &self.store_errors())
            .field("requests_without_key", &self.requests_without_key())
            .field("mismatches_queued", &self.mismatches_queued())
            .field("mismatches_rejected", &self.mismatches_rejected())
            .field("cache_hits", &self.cache_hits())
            .field("cache_stale", &self.cache_stale())
            .field("cache_refreshes", &self.cache_refreshes())
            .finish()
    }
}
