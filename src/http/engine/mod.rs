//! The one engine behind [`HttpCoalesceLayer`](super::HttpCoalesceLayer) and
//! [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer), read top to bottom:
//!
//! 1. **admit** ([`serve`]): read the body (up to the request body limit), make the key,
//!    the scope and the fingerprint of what the request asks for;
//! 2. **join or lead** ([`join_or_lead`]): decide, before joining, whether this caller may
//!    wait on the flight running for its key (same request, policies, follower cap); a
//!    different request waits for that flight to end, then tries again;
//! 3. **run** ([`fly`], the leader's flight): look the key up in the store and take its
//!    lease when there is a store, call the inner service, buffer the response, keep it;
//! 4. **answer** ([`answer`]): every caller of the flight gets its copy, a replay, or the
//!    layer's own problem response.

use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http::header::{AUTHORIZATION, HeaderName};
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{Either, Full};
use tower::Service;

use super::body::ResponseBody;
use super::error::ShareError;
use super::flown::Flown;
use super::metrics::Metrics;
use super::policy::{Fallback, OnDuplicate, OnMismatch, OnStoreError, SharePredicate, Unshared};
use super::stage::Stage;
use super::{DEFAULT_BODY_LIMIT, DEFAULT_HANDOVER, problem};
use crate::BoxError;
use crate::coalesce::MakeKey;
use crate::single_flight::LazyGroup;
use crate::store::{Fingerprint, StoredResponse};

/// The request the inner service receives: the buffered body of a keyed request, or the
/// untouched body of a request passed through.
pub(crate) type InnerRequest<B> = Request<Either<Full<Bytes>, B>>;

// The bounds the engine's steps share, named once.

/// The inner service, as the engine calls it: a clone per flight, on any task, with an
/// error every caller of a flight can have a copy of.
pub(crate) trait InnerService<ReqB, ResB>:
    Service<
        InnerRequest<ReqB>,
        Response = Response<ResB>,
        Error: ShareError,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<T, ReqB, ResB> InnerService<ReqB, ResB> for T where
    T: Service<
            InnerRequest<ReqB>,
            Response = Response<ResB>,
            Error: ShareError,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// A response body the engine reads once and shares.
pub(crate) trait SharedBody:
    Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static
{
}

impl<B> SharedBody for B where B: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static {}

/// A key maker, or a scope: a function of the request head, shared by every call.
pub(crate) trait HeadKey: MakeKey<Parts> + Send + Sync + 'static {}

impl<T> HeadKey for T where T: MakeKey<Parts> + Send + Sync + 'static {}

/// What a layer is made of; every service it builds shares it behind an `Arc`.
#[derive(Clone)]
pub(crate) struct Engine<K, I, St> {
    pub(crate) make_key: K,
    pub(crate) scope: I,
    pub(crate) store: St,
    pub(crate) config: Config,
    pub(crate) metrics: Metrics,
    pub(crate) flights: LazyGroup,
    /// What a preset adds to the engine's steps, if anything (the HTTP cache).
    pub(crate) stage: Option<Arc<dyn Stage>>,
}

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) body_limit: usize,
    pub(crate) request_body_limit: usize,
    pub(crate) require_key: bool,
    pub(crate) role_header: bool,
    pub(crate) on_duplicate: OnDuplicate,
    pub(crate) on_mismatch: OnMismatch,
    pub(crate) follower_timeout: Option<Duration>,
    pub(crate) max_followers: Option<usize>,
    pub(crate) fallback: Fallback,
    pub(crate) share: SharePredicate,
    pub(crate) unshared: Unshared,
    /// Whether a store was given: only then are store keys made and the store asked.
    pub(crate) has_store: bool,
    pub(crate) replay: Option<Duration>,
    pub(crate) handover: Duration,
    pub(crate) finish_abandoned: bool,
    pub(crate) on_store_error: OnStoreError,
    /// The header the key is read from, to name it in a `400`, when it is one header.
    pub(crate) key_header: Option<HeaderName>,
    /// Safe methods (`GET`, `HEAD`, `OPTIONS`, `TRACE`) pass through untouched, key or
    /// not: the idempotency preset.
    pub(crate) skip_safe_methods: bool,
    /// A cache's RFC 9111 §3.5 rule: whether a response to a request with
    /// `Authorization` may answer other callers. When it may not, it answers only callers
    /// that sent the same `Authorization`, as if it varied on it. `None`: no such rule.
    pub(crate) authorized_shared_if: Option<fn(&HeaderMap) -> bool>,
    /// What the preset is called in logs ("the idempotency layer"), so that each speaks in
    /// its own terms.
    pub(crate) name: &'static str,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            body_limit: DEFAULT_BODY_LIMIT,
            request_body_limit: DEFAULT_BODY_LIMIT,
            require_key: false,
            role_header: false,
            on_duplicate: OnDuplicate::Share,
            on_mismatch: OnMismatch::Queue,
            follower_timeout: None,
            max_followers: None,
            fallback: Fallback::ServiceUnavailable,
            share: SharePredicate::default_marker(),
            unshared: Unshared::Concurrently,
            has_store: false,
            replay: None,
            handover: DEFAULT_HANDOVER,
            finish_abandoned: false,
            on_store_error: OnStoreError::FailOpen,
            key_header: None,
            skip_safe_methods: false,
            authorized_shared_if: None,
            name: "the coalescing layer",
        }
    }
}

impl<K, I, St> Engine<K, I, St> {
    pub(crate) fn new(make_key: K, scope: I, store: St, config: Config) -> Self {
        Engine {
            make_key,
            scope,
            store,
            config,
            metrics: Metrics::default(),
            flights: LazyGroup::default(),
            stage: None,
        }
    }

    pub(crate) fn with_scope<I2>(self, scope: I2) -> Engine<K, I2, St> {
        Engine {
            make_key: self.make_key,
            scope,
            store: self.store,
            config: self.config,
            metrics: self.metrics,
            flights: self.flights,
            stage: self.stage,
        }
    }

    pub(crate) fn with_store<St2>(self, store: St2) -> Engine<K, I, St2> {
        Engine {
            make_key: self.make_key,
            scope: self.scope,
            store,
            config: Config {
                has_store: true,
                ..self.config
            },
            metrics: self.metrics,
            flights: self.flights,
            stage: self.stage,
        }
    }

    /// Whether every flight reads its leader's headers, whatever its response: a store
    /// files responses under them, a stage judges them, and a cache's RFC 9111 §3.5 rule
    /// looks for `Authorization`. Without any of these, only a response that varies does.
    fn reads_headers(&self) -> bool {
        self.config.has_store || self.stage.is_some() || self.config.authorized_shared_if.is_some()
    }

    /// Whether a stored response that answers a flight is a replay (not a stage's copy of
    /// another instance's run).
    fn replays(&self) -> bool {
        self.stage.as_ref().is_none_or(|stage| stage.replays())
    }

    /// A request whose key maker found no key: counted, logged (loudly the first time: on a
    /// route where every request has a key, it means the key is read from the wrong
    /// place, or clients send bodies without it), and refused under `require_key`, else
    /// passed through. `in_body`: the key is read from the body; `why`: what the key maker
    /// could tell of the cause, asked for the first one only.
    pub(crate) fn without_key<B>(
        &self,
        in_body: bool,
        why: impl FnOnce() -> Option<String>,
    ) -> Option<Response<ResponseBody<B>>> {
        let refused = self.config.require_key;
        let what = if refused {
            "refused with 400"
        } else {
            "passed through"
        };
        let layer = self.config.name;
        if !self.metrics.request_without_key(!refused) {
            tracing::debug!("request without a key, through {layer}");
        } else if let Some(header) = &self.config.key_header {
            // A key the client sends: the client is the one to fix.
            let header = problem::title_case(header.as_str());
            tracing::warn!(
                "a request reached {layer} without a valid `{header}` header (missing, \
                 repeated, empty, longer than 255 bytes or not visible ASCII) and was \
                 {what}; clients must send one with each request that changes something. \
                 A layer added with `.layer` also sees requests for routes that don't exist \
                 and methods a route doesn't serve: `.route_layer` sees only matched ones"
            );
        } else if let Some(why) = why() {
            tracing::warn!("a request reached {layer} without a key and was {what}: {why}");
        } else if in_body {
            tracing::warn!(
                "a request reached {layer} whose body held no key, and was \
                 {what}: the client sent a body without the key's field (or a malformed \
                 one, or not JSON or a form); if every request should have it, check the \
                 field name or pointer the key reads"
            );
        } else {
            tracing::warn!(
                "a request reached {layer} without a key and was {what}; if \
                 every request here should have one, check that the layer that provides it \
                 (auth, an extension) runs before this one (axum applies `.layer` calls \
                 outside-in) and that path patterns include the prefix of a `Router::nest`"
            );
        }
        refused.then(|| {
            self.metrics.key_missing();
            match &self.config.key_header {
                Some(header) => problem::bad_key_header(
                    header,
                    "is missing, repeated, empty, longer than 255 bytes or not visible ASCII, \
                     and this route requires it",
                ),
                None => problem::key_required(in_body),
            }
        })
    }

    /// A keyed request whose scope found no identity: counted, logged (loudly the first
    /// time, naming the likely cause), and refused under `require_key`; else it runs on
    /// its own, shared with nobody.
    fn without_identity<B>(&self, parts: &Parts) -> Option<Response<ResponseBody<B>>> {
        let (refused, layer) = (self.config.require_key, self.config.name);
        if self.metrics.request_without_identity(!refused) {
            let what = if refused {
                "refused with 400"
            } else {
                "run on its own, shared with nobody"
            };
            match super::scope::credential_ignored(parts) {
                Some(header) => tracing::warn!(
                    "a keyed request reached {layer} with a `{header}` header, a \
                     credential its scope does not read, so the layer could not tell who sent \
                     it, and it was {what}: scope the layer by it \
                     (`.scope(scope::headers([\"{header}\"]))`) or by the identity your auth \
                     layer puts in the extensions"
                ),
                None => tracing::warn!(
                    "a keyed request reached {layer} and its scope found no \
                     identity, so it was {what}; if the scope reads an extension that an \
                     auth layer inserts, that layer must run before this one (axum applies \
                     `.layer` calls outside-in: add the auth layer after this one)"
                ),
            }
        } else {
            tracing::debug!("keyed request without an identity");
        }
        refused.then(problem::identity_required)
    }

    /// Whether a flight's response may answer only callers with the leader's
    /// `Authorization` (a cache's RFC 9111 §3.5 rule).
    fn by_authorization(&self, response: &HeaderMap, asked: &Ask) -> bool {
        self.config
            .authorized_shared_if
            .is_some_and(|shared| asked.headers().contains_key(AUTHORIZATION) && !shared(response))
    }
}

impl<K, I, St> fmt::Debug for Engine<K, I, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("make_key", &std::any::type_name::<K>())
            .field("scope", &std::any::type_name::<I>())
            .field("store", &std::any::type_name::<St>())
            .field("config", &self.config)
            .finish()
    }
}

/// The key of a flight in the registry: the caller's scope and the request's key. What
/// the leader's request asks rides along so that a caller can tell, before it joins,
/// whether the running flight is its own request; `Eq` and `Hash` ignore it, so that one
/// key has one flight at a time, whatever the request.
#[derive(Debug, Clone)]
pub(crate) struct FlightKey<Scope, Key> {
    scope: Scope,
    key: Key,
    ask: Ask,
    /// The hash of the scope and the key, made once: the registry hashes a flight's key
    /// for its lookup, its claim and its removal, and a scope and a key of header values
    /// cost 70 instructions a time. Seeded at random per process, as the registry's own
    /// hasher is, so that clients can't choose keys that collide.
    hash: u64,
}

impl<Scope: Hash, Key: Hash> FlightKey<Scope, Key> {
    fn new(scope: Scope, key: Key, ask: Ask) -> Self {
        static SEED: OnceLock<ahash::RandomState> = OnceLock::new();
        let hash = SEED
            .get_or_init(ahash::RandomState::new)
            .hash_one((&scope, &key));
        FlightKey {
            scope,
            key,
            ask,
            hash,
        }
    }
}

impl<Scope: Clone, Key: Clone> FlightKey<Scope, Key> {
    /// This key, for a request that asks `ask`.
    fn asking(&self, ask: Ask) -> Self {
        FlightKey {
            scope: self.scope.clone(),
            key: self.key.clone(),
            ask,
            hash: self.hash,
        }
    }
}

/// What a keyed request asks for: its method, path, query and body. The callers of one
/// process compare it exactly. Its digest, the [`Fingerprint`] a store keeps responses
/// under and a response that varies extends, is made where one is needed, once per
/// request: a flight without a store whose response does not vary needs none (SHA-256 of
/// the request was a tenth of what the layer cost a keyed request).
#[derive(Clone)]
pub(crate) struct Ask(Arc<Asked>);

struct Asked {
    method: http::Method,
    uri: http::Uri,
    body: Bytes,
    digest: OnceLock<Fingerprint>,
    /// The request's headers, kept by a leader whose request goes into its flight: they
    /// tell which responses and replays answer it when a response `Vary`s.
    headers: KeptHeaders,
    /// The id of the flight this request leads, if it leads one (0: not asked yet): its
    /// followers' traces name the flight they waited on.
    flight: std::sync::atomic::AtomicU64,
}

impl Ask {
    fn new(parts: &Parts, body: &Bytes) -> Self {
        Ask(Arc::new(Asked {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            body: body.clone(),
            digest: OnceLock::new(),
            headers: KeptHeaders::default(),
            flight: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// The id of the flight this request leads (unique in the process, from 1), made on
    /// the first call, by whichever span asks first: the leader's, the flight's, or a
    /// follower's that joined in between the flight's registration and the making of its
    /// work (the registry's lock is released before the work is made), which then names
    /// the flight the others will. Only asked where a span would record it: the count it
    /// comes from is one cache line for every worker, not to be touched per request for
    /// nothing. Only the asks of leaders are asked.
    fn flight(&self) -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static FLIGHTS: AtomicU64 = AtomicU64::new(1);
        let id = self.0.flight.load(Ordering::Relaxed);
        if id != 0 {
            return id;
        }
        let id = FLIGHTS.fetch_add(1, Ordering::Relaxed);
        match self
            .0
            .flight
            .compare_exchange(0, id, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => id,
            Err(first) => first,
        }
    }

    /// Keeps a copy of the request's headers, for [`headers`](Self::headers) once the
    /// request itself has gone into its flight (one copy per flight); `read`: every flight
    /// of the layer reads them (a store or a stage does).
    fn keep_headers(&self, headers: &HeaderMap, read: bool) {
        self.0.headers.keep(headers, read);
    }

    /// The request's headers as [kept](Self::keep_headers) by its leader.
    fn headers(&self) -> &HeaderMap {
        self.0.headers.get()
    }

    /// The request's digest, made on the first call.
    pub(crate) fn fingerprint(&self) -> Fingerprint {
        let asked = &*self.0;
        *asked
            .digest
            .get_or_init(|| Fingerprint::of(&asked.method, &asked.uri, &asked.body))
    }

    /// Whether two requests ask for the same: what equal fingerprints mean, compared
    /// without making them.
    fn same(&self, other: &Ask) -> bool {
        let (a, b) = (&*self.0, &*other.0);
        Arc::ptr_eq(&self.0, &other.0)
            || a.method == b.method
                && a.uri.path() == b.uri.path()
                && a.uri.query() == b.uri.query()
                && a.body == b.body
    }
}

impl fmt::Debug for Ask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Bodies and queries may carry what logs must not.
        f.debug_struct("Ask")
            .field("method", &self.0.method)
            .field("path", &self.0.uri.path())
            .field("body_len", &self.0.body.len())
            .finish()
    }
}

/// Which callers a flight's response answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answers {
    /// Every caller admitted to the flight: they asked what the leader asked, and the
    /// response varies on no header (nor, under a cache's RFC 9111 §3.5 rule, on
    /// `Authorization`).
    Admitted,
    /// The requests of this fingerprint (see [`Fingerprint::answered_by`]): the response
    /// varies on headers, and followers whose own values differ are not given it.
    Varied(Fingerprint),
    /// The leader's request only (`Vary: *`).
    Leader,
}

impl Answers {
    /// The fingerprint a store keeps the response under, if it may be kept.
    fn fingerprint(self, ask: &Ask) -> Option<Fingerprint> {
        match self {
            Answers::Admitted => Some(ask.fingerprint()),
            Answers::Varied(fingerprint) => Some(fingerprint),
            Answers::Leader => None,
        }
    }
}

impl<Scope: PartialEq, Key: PartialEq> PartialEq for FlightKey<Scope, Key> {
    fn eq(&self, other: &Self) -> bool {
        self.scope == other.scope && self.key == other.key
    }
}

impl<Scope: Eq, Key: Eq> Eq for FlightKey<Scope, Key> {}

impl<Scope, Key> Hash for FlightKey<Scope, Key> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Equal keys have equal scopes and keys, so equal hashes.
        state.write_u64(self.hash);
    }
}

/// What a flight shares: a response it produced, one it found stored, or why it ran
/// nothing.
pub(crate) enum Done<B> {
    /// A response of this flight's own run, and which callers it answers.
    Fresh {
        flown: Flown<B>,
        answers: Answers,
        /// The response answers only callers with the leader's `Authorization`.
        by_authorization: bool,
    },
    Stored(Arc<StoredResponse>),
    /// Another instance runs the key, under `OnDuplicate::Conflict`.
    InProgress,
    /// Another instance ran the key for longer than the follower timeout.
    GaveUp,
    /// The store failed, under `OnStoreError::FailClosed`.
    Unavailable,
    /// The request ran, but its response could not be kept (the store failed for as long
    /// as the lease allowed), under `OnStoreError::FailClosed`.
    Unkept,
    /// The request ran, but its writes were rolled back with its response (atomic mode:
    /// a lease lost, a commit that failed, a response the layer can't keep).
    NotCommitted,
}

impl<B> Clone for Done<B> {
    fn clone(&self) -> Self {
        match self {
            Done::Fresh {
                flown,
                answers,
                by_authorization,
            } => Done::Fresh {
                flown: flown.clone(),
                answers: *answers,
                by_authorization: *by_authorization,
            },
            Done::Stored(stored) => Done::Stored(stored.clone()),
            Done::InProgress => Done::InProgress,
            Done::GaveUp => Done::GaveUp,
            Done::Unavailable => Done::Unavailable,
            Done::Unkept => Done::Unkept,
            Done::NotCommitted => Done::NotCommitted,
        }
    }
}

pub(crate) type FlightResult<B, E> = Result<Done<B>, Arc<E>>;

pub(crate) type Answer<B, E> = Result<Response<ResponseBody<B>>, E>;

mod admit;
mod answer;
mod join;
mod kept_headers;
mod run;
mod then;

use self::kept_headers::KeptHeaders;

// Each step's module names the others' items through these.
use self::answer::*;
use self::join::*;
use self::run::*;

pub(crate) use self::admit::{passed, serve};
pub(crate) use self::answer::answers;
#[cfg(feature = "http-cache")]
pub(crate) use self::run::stored_copy;

/// The name of a keyed request's span (see `admit::request_span`).
pub(crate) const REQUEST_SPAN: &str = "coalesce";

/// The name of a flight's span, a child of its leader's request span.
pub(crate) const FLIGHT_SPAN: &str = "coalesce_flight";

/// Whether nothing can see the layer's spans (all at `DEBUG`): no subscriber wants `DEBUG`,
/// and no `log` logger would print them (tracing's `log` feature logs a span's creation at
/// its level when no subscriber is set). Then they are not made at all: a span nobody sees
/// is made (its fields recorded for `log`), dropped, and looked for as the current span
/// all the same, about 450 instructions per keyed request with the request's span and
/// its flight's. Two relaxed loads.
pub(crate) fn spans_unseen() -> bool {
    use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};
    let debug = tracing::Level::DEBUG;
    (STATIC_MAX_LEVEL < debug || LevelFilter::current() < debug)
        && log::max_level() < log::LevelFilter::Debug
}

/// `work` in `span`, or not entering it when nothing would see it: a span no subscriber
/// wants is entered and exited at every poll all the same, and with tracing's `log` feature
/// (which axum turns on) each is a check of the `log` logger: about 300 instructions per
/// keyed request. A `log` logger at `TRACE`, with no subscriber set, prints spans' enter
/// and exit lines: then the span is entered.
pub(crate) fn in_span<F: Future>(
    work: F,
    span: tracing::Span,
) -> futures::future::Either<tracing::instrument::Instrumented<F>, F> {
    use futures::future::Either;
    use tracing::Instrument;
    if span.is_disabled() && log::max_level() < log::LevelFilter::Trace {
        Either::Right(work)
    } else {
        Either::Left(work.instrument(span))
    }
}

/// `work` boxed, in `span` if there is one (see [`in_span`]). A future is boxed where it is
/// made: it is moved whole into its box, and each wrapper around it on the way (an
/// `Either`, a span) would be one more copy of it.
#[inline]
pub(crate) fn boxed_in_span<F>(
    work: F,
    span: Option<tracing::Span>,
) -> std::pin::Pin<Box<dyn Future<Output = F::Output> + Send>>
where
    F: Future + Send + 'static,
{
    match span {
        Some(span) => Box::pin(in_span(work, span)),
        None => Box::pin(work),
    }
}

/// The layer's span `name` if it is the current span, to record on. A span no subscriber
/// wants is never current (entered or not): the current span is then the app's, which may
/// declare fields of the same names (OpenTelemetry's HTTP spans declare
/// `http.response.status_code`), and must not get the layer's values.
pub(crate) fn own_span(name: &str) -> Option<tracing::Span> {
    if spans_unseen() {
        return None;
    }
    let span = tracing::Span::current();
    span.metadata()
        .is_some_and(|meta| meta.name() == name && meta.target().starts_with("tower_coalesce::"))
        .then_some(span)
}

/// A hash of a flight key for logs, with a per-process random seed so that a logged hash
/// can't be matched against hashes of guessed ids.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyHash(pub(crate) u64);

impl KeyHash {
    fn of<T: Hash>(key: &T) -> Self {
        static SEED: OnceLock<RandomState> = OnceLock::new();
        KeyHash(SEED.get_or_init(RandomState::new).hash_one(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A subscriber of everything at `level` and above, written nowhere.
    fn subscriber(level: tracing::Level) -> impl tracing::Subscriber + Send + Sync {
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_writer(std::io::sink)
            .finish()
    }

    fn entered<F: Future>(
        work: &futures::future::Either<tracing::instrument::Instrumented<F>, F>,
    ) -> bool {
        matches!(work, futures::future::Either::Left(_))
    }

    #[test]
    fn a_span_is_entered_only_when_a_subscriber_or_a_log_logger_could_see_it() {
        // No subscriber on this thread, `log` at its default (off): not entered.
        let span = tracing::debug_span!(REQUEST_SPAN);
        assert!(!entered(&in_span(async {}, span)));

        // A subscriber that wants it.
        tracing::subscriber::with_default(subscriber(tracing::Level::DEBUG), || {
            let span = tracing::debug_span!(REQUEST_SPAN);
            assert!(entered(&in_span(async {}, span)));
        });

        // A `log` logger at `TRACE` prints enter and exit lines of spans nobody subscribes
        // to (tracing's `log` feature): entered. (The level is global; no other test
        // depends on it.)
        log::set_max_level(log::LevelFilter::Trace);
        let span = tracing::debug_span!(REQUEST_SPAN);
        let at_trace = entered(&in_span(async {}, span));
        log::set_max_level(log::LevelFilter::Off);
        assert!(at_trace);
    }

    #[test]
    fn the_layer_records_only_on_its_own_current_span() {
        tracing::subscriber::with_default(subscriber(tracing::Level::INFO), || {
            // The app's span is current, the layer's (at DEBUG) is filtered out.
            let app = tracing::info_span!(
                target: "my_app",
                "coalesce",
                coalesce.role = tracing::field::Empty
            );
            let _app = app.enter();
            let ours = tracing::debug_span!(REQUEST_SPAN);
            let _ours = ours.enter();
            // Same name, not the layer's target: not ours.
            assert!(own_span(REQUEST_SPAN).is_none());
        });
        tracing::subscriber::with_default(subscriber(tracing::Level::DEBUG), || {
            let ours = tracing::debug_span!(REQUEST_SPAN);
            let _ours = ours.enter();
            assert!(own_span(REQUEST_SPAN).is_some());
            assert!(own_span(FLIGHT_SPAN).is_none());
        });
    }
}
