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
///
/// # Exported through the `metrics` facade
///
/// With the feature `metrics`, every count is also sent to the recorder your app installs
/// ([`metrics-exporter-prometheus`](https://docs.rs/metrics-exporter-prometheus), or any
/// other), with no glue, under these names (`route` is added to each when the layer has a
/// [`metrics_route`](super::HttpCoalesceLayer::metrics_route)):
///
/// | name | labels | counts |
/// | --- | --- | --- |
/// | `coalesce_requests_total` | `role="leader"` | flights that called the service (background cache refreshes included) |
/// | | `role="follower"` | callers that joined a running flight |
/// | | `role="bypass"` | requests passed through: no key, no identity, or a duplicate under `OnDuplicate::PassThrough` |
/// | | `role="rejected"` | requests the layer refused: `400` missing key or identity, `409` in flight, `422` other request's key, follower cap |
/// | | `role="timed_out"` | followers that stopped waiting at the wait timeout |
/// | | `role="replayed"` | responses replayed from the store |
/// | | `role="hit"`, `role="stale"` | answers of the HTTP cache, fresh or stale |
/// | `coalesce_wait_duration_seconds` | | histogram of followers' waits (the leader's time is the service's own) |
/// | `coalesce_inflight_flights` | | gauge of flights running now |
/// | `coalesce_idempotency_conflicts_total` | `reason="in_flight"` / `"fingerprint"` | `409`s and `422`s |
/// | `coalesce_lease_takeovers_total` | | leases taken after waiting for another instance (Redis, PostgreSQL) |
/// | `coalesce_keeps_superseded_total` | | responses not kept because another instance took the key over meanwhile |
/// | `coalesce_store_errors_total` | | store calls that failed or timed out |
/// | `coalesce_flights_waiting_elsewhere_total`, `coalesce_callers_cancelled_total`, `coalesce_mismatches_queued_total`, `coalesce_responses_not_shared_total`, `coalesce_bodies_over_limit_total`, `coalesce_cache_refreshes_total`, `coalesce_cache_near_hits_total`, `coalesce_cache_purged_total` | | as the methods of the same names |
///
/// The roles are events, not a partition: a follower that times out counts as `follower`
/// and as `timed_out`. Recorders are looked up on each event, so one installed after the
/// layer was built still receives everything.
#[derive(Clone, Default)]
pub struct Metrics {
    counters: Arc<Counters>,
    /// The `route` label of what is exported, if the layer names its route.
    #[cfg(feature = "metrics")]
    route: Option<&'static str>,
}

#[derive(Default)]
struct Counters {
    flights_started: AtomicU64,
    callers_joined: AtomicU64,
    callers_cancelled: AtomicU64,
    bodies_over_limit: AtomicU64,
    requests_refused_without_key: AtomicU64,
    replayed: AtomicU64,
    followers_timed_out: AtomicU64,
    followers_shed: AtomicU64,
    duplicates_refused: AtomicU64,
    duplicates_passed_through: AtomicU64,
    responses_not_shared: AtomicU64,
    flights_waiting_elsewhere: AtomicU64,
    store_errors: AtomicU64,
    requests_without_key: AtomicU64,
    requests_without_identity: AtomicU64,
    mismatches_queued: AtomicU64,
    mismatches_rejected: AtomicU64,
    cache_hits: AtomicU64,
    cache_stale: AtomicU64,
    cache_refreshes: AtomicU64,
    cache_near_hits: AtomicU64,
    cache_purged: AtomicU64,
    lease_takeovers: AtomicU64,
    keeps_superseded: AtomicU64,
    flights_in_flight: AtomicU64,
    // Whether the first request without a key has been logged at WARN.
    warned_without_key: AtomicBool,
    // The same for the first request without an identity, and the first response that
    // varied on a header its followers sent otherwise.
    warned_without_identity: AtomicBool,
    warned_varied: AtomicBool,
}

impl Metrics {
    /// The name of every series the `metrics` feature exports, as the table above lists
    /// them (a dashboard or an alert can be checked against it; the crate's own Grafana
    /// dashboard is).
    pub const EXPORTED: [&'static str; 15] = [
        "coalesce_requests_total",
        "coalesce_wait_duration_seconds",
        "coalesce_inflight_flights",
        "coalesce_idempotency_conflicts_total",
        "coalesce_lease_takeovers_total",
        "coalesce_keeps_superseded_total",
        "coalesce_store_errors_total",
        "coalesce_flights_waiting_elsewhere_total",
        "coalesce_callers_cancelled_total",
        "coalesce_mismatches_queued_total",
        "coalesce_responses_not_shared_total",
        "coalesce_bodies_over_limit_total",
        "coalesce_cache_refreshes_total",
        "coalesce_cache_near_hits_total",
        "coalesce_cache_purged_total",
    ];

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
    pub fn requests_refused_without_key(&self) -> u64 {
        self.counters
            .requests_refused_without_key
            .load(Ordering::Relaxed)
    }

    /// Requests whose key maker found no key, whether they passed through or were refused.
    /// On a layer where every request should have a key, a count above zero means a
    /// misconfiguration: see [`HttpCoalesceLayer::require_key`](super::HttpCoalesceLayer::require_key).
    pub fn requests_without_key(&self) -> u64 {
        self.counters.requests_without_key.load(Ordering::Relaxed)
    }

    /// Counts a request without a key, which `passes` through unless it is refused; `true`
    /// for the first one, which is logged louder.
    pub(crate) fn request_without_key(&self, passes: bool) -> bool {
        self.counters
            .requests_without_key
            .fetch_add(1, Ordering::Relaxed);
        if passes {
            self.export(REQUESTS, Some(("role", "bypass")));
        }
        first(&self.counters.warned_without_key)
    }

    /// Keyed requests whose [scope](super::scope) found no identity: they were not
    /// shared with anyone (run on their own, never replayed), or refused with `400` under
    /// [`require_key`](super::HttpCoalesceLayer::require_key). A count above zero usually
    /// means the layer that says who the caller is runs after this one, or that requests
    /// carry a credential the scope does not read (see
    /// [`DefaultScope`](super::scope::DefaultScope)).
    pub fn requests_without_identity(&self) -> u64 {
        self.counters
            .requests_without_identity
            .load(Ordering::Relaxed)
    }

    /// Counts a request without an identity; `true` for the first one, which is logged
    /// louder.
    pub(crate) fn request_without_identity(&self, passes: bool) -> bool {
        self.counters
            .requests_without_identity
            .fetch_add(1, Ordering::Relaxed);
        let role = if passes { "bypass" } else { "rejected" };
        self.export(REQUESTS, Some(("role", role)));
        first(&self.counters.warned_without_identity)
    }

    /// `true` the first time a response of this layer's flights varied on a header that a
    /// follower sent otherwise: logged louder, once.
    pub(crate) fn first_varied(&self) -> bool {
        first(&self.counters.warned_varied)
    }

    /// Requests that found their key's flight running for another request and waited for
    /// it to end before running ([`OnMismatch::Queue`](super::OnMismatch::Queue)), or,
    /// with replay, before being answered from what is kept
    /// ([`OnMismatch::Reject`](super::OnMismatch::Reject)).
    pub fn mismatches_queued(&self) -> u64 {
        self.counters.mismatches_queued.load(Ordering::Relaxed)
    }

    pub(crate) fn mismatch_queued(&self) {
        self.counters
            .mismatches_queued
            .fetch_add(1, Ordering::Relaxed);
        self.export("coalesce_mismatches_queued_total", None);
    }

    /// Requests answered `422` because their key belongs to another request.
    pub fn mismatches_rejected(&self) -> u64 {
        self.counters.mismatches_rejected.load(Ordering::Relaxed)
    }

    pub(crate) fn mismatch_rejected(&self) {
        self.counters
            .mismatches_rejected
            .fetch_add(1, Ordering::Relaxed);
        self.export(REQUESTS, Some(("role", "rejected")));
        self.export(CONFLICTS, Some(("reason", "fingerprint")));
    }

    /// Responses replayed from a store (kept by [`replay`](super::HttpCoalesceLayer::replay),
    /// or handed over by another instance).
    pub fn responses_replayed(&self) -> u64 {
        self.counters.replayed.load(Ordering::Relaxed)
    }

    pub(crate) fn replayed(&self) {
        self.counters.replayed.fetch_add(1, Ordering::Relaxed);
        self.export(REQUESTS, Some(("role", "replayed")));
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
        self.export(
            REQUESTS,
            Some(("role", if fresh { "hit" } else { "stale" })),
        );
    }

    /// Of [`cache_hits`](Self::cache_hits), those answered from the near cache's copy,
    /// without a store lookup.
    pub fn cache_near_hits(&self) -> u64 {
        self.counters.cache_near_hits.load(Ordering::Relaxed)
    }

    /// Entries the HTTP cache dropped from its store by purges and by the invalidations of
    /// unsafe requests.
    pub fn cache_purged(&self) -> u64 {
        self.counters.cache_purged.load(Ordering::Relaxed)
    }

    #[cfg_attr(not(feature = "http-cache"), allow(dead_code))]
    pub(crate) fn cache_near_hit(&self) {
        self.counters
            .cache_near_hits
            .fetch_add(1, Ordering::Relaxed);
        self.export("coalesce_cache_near_hits_total", None);
    }

    #[cfg_attr(not(feature = "http-cache"), allow(dead_code))]
    pub(crate) fn cache_purged_entries(&self, entries: usize) {
        self.counters
            .cache_purged
            .fetch_add(entries as u64, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!("coalesce_cache_purged_total", self.labels(None))
            .increment(entries as u64);
    }

    #[cfg_attr(not(feature = "http-cache"), allow(dead_code))]
    pub(crate) fn cache_refreshed(&self) {
        self.counters
            .cache_refreshes
            .fetch_add(1, Ordering::Relaxed);
        self.export("coalesce_cache_refreshes_total", None);
    }

    /// Followers that stopped waiting at the wait timeout.
    pub fn followers_timed_out(&self) -> u64 {
        self.counters.followers_timed_out.load(Ordering::Relaxed)
    }

    pub(crate) fn follower_timed_out(&self) {
        self.counters
            .followers_timed_out
            .fetch_add(1, Ordering::Relaxed);
        self.export(REQUESTS, Some(("role", "timed_out")));
    }

    /// Callers turned away because their flight had as many followers as allowed.
    pub fn followers_shed(&self) -> u64 {
        self.counters.followers_shed.load(Ordering::Relaxed)
    }

    pub(crate) fn follower_shed(&self) {
        self.counters.followers_shed.fetch_add(1, Ordering::Relaxed);
        self.export(REQUESTS, Some(("role", "rejected")));
    }

    /// Duplicates answered `409 Conflict` under `OnDuplicate::Conflict`.
    pub fn duplicates_refused(&self) -> u64 {
        self.counters.duplicates_refused.load(Ordering::Relaxed)
    }

    pub(crate) fn duplicate_refused(&self) {
        self.counters
            .duplicates_refused
            .fetch_add(1, Ordering::Relaxed);
        self.export(REQUESTS, Some(("role", "rejected")));
        self.export(CONFLICTS, Some(("reason", "in_flight")));
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
        self.export(REQUESTS, Some(("role", "bypass")));
    }

    /// Flights whose response was not to be shared, so that their followers ran on their own.
    pub fn responses_not_shared(&self) -> u64 {
        self.counters.responses_not_shared.load(Ordering::Relaxed)
    }

    pub(crate) fn response_not_shared(&self) {
        self.counters
            .responses_not_shared
            .fetch_add(1, Ordering::Relaxed);
        self.export("coalesce_responses_not_shared_total", None);
    }

    /// Idempotency flights that found the key's lease held by another instance, and waited
    /// for its response (a shared store: Redis, PostgreSQL).
    pub fn flights_waiting_elsewhere(&self) -> u64 {
        self.counters
            .flights_waiting_elsewhere
            .load(Ordering::Relaxed)
    }

    pub(crate) fn flight_waiting_elsewhere(&self) {
        self.counters
            .flights_waiting_elsewhere
            .fetch_add(1, Ordering::Relaxed);
        self.export("coalesce_flights_waiting_elsewhere_total", None);
    }

    /// Idempotency store calls that failed or timed out.
    pub fn store_errors(&self) -> u64 {
        self.counters.store_errors.load(Ordering::Relaxed)
    }

    pub(crate) fn store_error(&self) {
        self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
        self.export("coalesce_store_errors_total", None);
    }

    pub(crate) fn flight_started(&self) {
        self.counters
            .flights_started
            .fetch_add(1, Ordering::Relaxed);
        self.export(REQUESTS, Some(("role", "leader")));
    }

    pub(crate) fn caller_joined(&self) {
        self.counters.callers_joined.fetch_add(1, Ordering::Relaxed);
        self.export(REQUESTS, Some(("role", "follower")));
    }

    pub(crate) fn caller_cancelled(&self) {
        self.counters
            .callers_cancelled
            .fetch_add(1, Ordering::Relaxed);
        self.export("coalesce_callers_cancelled_total", None);
    }

    pub(crate) fn body_over_limit(&self) {
        self.counters
            .bodies_over_limit
            .fetch_add(1, Ordering::Relaxed);
        self.export("coalesce_bodies_over_limit_total", None);
    }

    pub(crate) fn key_missing(&self) {
        self.counters
            .requests_refused_without_key
            .fetch_add(1, Ordering::Relaxed);
        self.export(REQUESTS, Some(("role", "rejected")));
    }
}

impl Metrics {
    /// Leases taken after waiting for another instance that held them: it released the key
    /// without a response kept, or died and its lease expired (a shared store: Redis,
    /// PostgreSQL).
    pub fn lease_takeovers(&self) -> u64 {
        self.counters.lease_takeovers.load(Ordering::Relaxed)
    }

    pub(crate) fn lease_taken_over(&self) {
        self.counters
            .lease_takeovers
            .fetch_add(1, Ordering::Relaxed);
        self.export("coalesce_lease_takeovers_total", None);
    }

    /// Flights whose response was not kept because their lease lapsed while they ran (a
    /// stall, the store out of reach) and another instance took the key over: their
    /// callers got the response kept under the later lease instead. Each is a key that ran
    /// twice; see [What a lease can't do](crate::redis#what-a-lease-cant-do).
    pub fn keeps_superseded(&self) -> u64 {
        self.counters.keeps_superseded.load(Ordering::Relaxed)
    }

    pub(crate) fn keep_superseded(&self) {
        self.counters
            .keeps_superseded
            .fetch_add(1, Ordering::Relaxed);
        self.export("coalesce_keeps_superseded_total", None);
    }

    /// Flights running now: started and not yet completed or dropped.
    pub fn flights_in_flight(&self) -> u64 {
        self.counters.flights_in_flight.load(Ordering::Relaxed)
    }

    /// Counts a flight's work as running until the guard drops, however the work ends.
    pub(crate) fn in_flight(&self) -> InFlight<'_> {
        self.counters
            .flights_in_flight
            .fetch_add(1, Ordering::Relaxed);
        self.export_in_flight(1.0);
        InFlight(self)
    }

    /// Starts the clock of a caller's wait: read only with the `metrics` feature, so that
    /// without it a request pays no clock read.
    pub(crate) fn wait_started(&self) -> WaitClock {
        WaitClock {
            #[cfg(feature = "metrics")]
            since: tokio::time::Instant::now(),
        }
    }

    /// A follower's wait for its flight, as the wait histogram (followers only: the
    /// leader's time is the service's, which the app measures already).
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn follower_waited(&self, clock: WaitClock) {
        #[cfg(feature = "metrics")]
        metrics::histogram!(WAIT, self.labels(None)).record(clock.since.elapsed().as_secs_f64());
    }

    /// Labels what this layer exports with `route`: the route it serves, as the router
    /// matched it (never the raw path: one series per id would exhaust Prometheus).
    #[cfg(feature = "metrics")]
    pub(crate) fn with_route(mut self, route: &'static str) -> Self {
        self.route = Some(route);
        self
    }

    /// Increments the counter `name` of the `metrics` facade, with `label` and the route.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    #[inline]
    fn export(&self, name: &'static str, label: Option<(&'static str, &'static str)>) {
        #[cfg(feature = "metrics")]
        metrics::counter!(name, self.labels(label)).increment(1);
    }

    /// Moves the in-flight gauge by `delta`: by steps rather than set from the counter, so
    /// that layers sharing counters under different routes each keep their own.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn export_in_flight(&self, delta: f64) {
        #[cfg(feature = "metrics")]
        metrics::gauge!(IN_FLIGHT, self.labels(None)).increment(delta);
    }

    #[cfg(feature = "metrics")]
    fn labels(&self, label: Option<(&'static str, &'static str)>) -> Vec<metrics::Label> {
        let label = label.map(|(key, value)| metrics::Label::from_static_parts(key, value));
        let route = self
            .route
            .map(|route| metrics::Label::from_static_parts("route", route));
        label.into_iter().chain(route).collect()
    }
}

/// Names of what the `metrics` feature exports.
/// When a caller's wait began ([`Metrics::wait_started`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct WaitClock {
    #[cfg(feature = "metrics")]
    since: tokio::time::Instant,
}

const REQUESTS: &str = "coalesce_requests_total";
const CONFLICTS: &str = "coalesce_idempotency_conflicts_total";
#[cfg(feature = "metrics")]
const WAIT: &str = "coalesce_wait_duration_seconds";
#[cfg(feature = "metrics")]
const IN_FLIGHT: &str = "coalesce_inflight_flights";

/// The work of a running flight, counted in [`Metrics::flights_in_flight`] until dropped.
pub(crate) struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0
            .counters
            .flights_in_flight
            .fetch_sub(1, Ordering::Relaxed);
        self.0.export_in_flight(-1.0);
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("flights_started", &self.flights_started())
            .field("callers_joined", &self.callers_joined())
            .field("callers_cancelled", &self.callers_cancelled())
            .field("bodies_over_limit", &self.bodies_over_limit())
            .field(
                "requests_refused_without_key",
                &self.requests_refused_without_key(),
            )
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
            .field(
                "requests_without_identity",
                &self.requests_without_identity(),
            )
            .field("mismatches_queued", &self.mismatches_queued())
            .field("mismatches_rejected", &self.mismatches_rejected())
            .field("cache_hits", &self.cache_hits())
            .field("cache_stale", &self.cache_stale())
            .field("cache_near_hits", &self.cache_near_hits())
            .field("cache_purged", &self.cache_purged())
            .field("cache_refreshes", &self.cache_refreshes())
            .field("lease_takeovers", &self.lease_takeovers())
            .field("keeps_superseded", &self.keeps_superseded())
            .field("flights_in_flight", &self.flights_in_flight())
            .finish()
    }
}

/// Sets `flag`; `true` if this call set it. Read before written: once set, the flag's cache
/// line stays shared instead of bouncing between cores with every event.
fn first(flag: &AtomicBool) -> bool {
    !flag.load(Ordering::Relaxed) && !flag.swap(true, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    /// Every series name this file sends is in [`Metrics::EXPORTED`], and the other way.
    #[test]
    fn the_exported_list_is_every_name_this_file_sends() {
        let source = include_str!("metrics.rs");
        let (code, _) = source.split_once("#[cfg(test)]").unwrap();
        let (_, after_list) = code.split_once("pub const EXPORTED").unwrap();
        let (_, code) = after_list.split_once("];").unwrap();
        let mut sent: Vec<&str> = code
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|s| s.starts_with("coalesce_") && !s.contains(' '))
            .collect();
        sent.sort_unstable();
        sent.dedup();
        let mut listed = Metrics::EXPORTED.to_vec();
        listed.sort_unstable();
        assert_eq!(sent, listed);
    }
}
