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
use std::panic;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, HeaderName, HeaderValue, VARY};
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use tokio::time::Instant;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use super::body::ResponseBody;
use super::error::ShareError;
use super::flown::{self, Buffered, Flown};
use super::key::BufferedBody;
use super::lease::{Lease, LeaseGuard};
use super::metrics::Metrics;
use super::policy::{Fallback, OnDuplicate, OnMismatch, OnStoreError, SharePredicate, Unshared};
use super::stage::{Admit, After, Answered, Ran, Stage};
use super::store::{Fingerprint, IdempotencyStore, StoreKey, StoredResponse};
use super::{DEFAULT_BODY_LIMIT, DEFAULT_HANDOVER, Role, problem};
use crate::BoxError;
use crate::coalesce::MakeKey;
use crate::single_flight::{LazyGroup, Outcome};

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

    /// Whether a stored response that answers a flight is a replay (not a stage's copy of
    /// another instance's run).
    fn replays(&self) -> bool {
        self.stage.as_ref().is_none_or(|stage| stage.replays())
    }

    /// A request whose key maker found no key: counted, logged (loudly the first time: on a
    /// route where every request has a key, it means the key is read from the wrong
    /// place, or clients send bodies without it), and refused under `require_key`, else
    /// passed through. `in_body`: the key is read from the body.
    pub(crate) fn without_key<B>(&self, in_body: bool) -> Option<Response<ResponseBody<B>>> {
        let refused = self.config.require_key;
        let what = if refused {
            "refused with 400"
        } else {
            "passed through"
        };
        if !self.metrics.request_without_key(!refused) {
            tracing::debug!("request without a coalescing key");
        } else if in_body {
            tracing::warn!(
                "a request reached the coalescing layer whose body held no key, and was \
                 {what}: the client sent a body without the key's field (or a malformed \
                 one, or not JSON or a form); if every request should have it, check the \
                 field name or pointer the key reads"
            );
        } else {
            tracing::warn!(
                "a request reached the coalescing layer without a key and was {what}; if \
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
        let refused = self.config.require_key;
        if self.metrics.request_without_identity(!refused) {
            let what = if refused {
                "refused with 400"
            } else {
                "run on its own, shared with nobody"
            };
            match super::scope::credential_ignored(parts) {
                Some(header) => tracing::warn!(
                    "a keyed request reached the coalescing layer with a `{header}` header, a \
                     credential its scope does not read, so the layer could not tell who sent \
                     it, and it was {what}: scope the layer by it \
                     (`.scope(scope::headers([\"{header}\"]))`) or by the identity your auth \
                     layer puts in the extensions"
                ),
                None => tracing::warn!(
                    "a keyed request reached the coalescing layer and its scope found no \
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
    fn by_authorization(&self, response: &HeaderMap, asked: &HeaderMap) -> bool {
        self.config
            .authorized_shared_if
            .is_some_and(|shared| asked.contains_key(AUTHORIZATION) && !shared(response))
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

/// The key of a flight in the registry: the caller's scope and the request's key. The
/// fingerprint of the leader's request rides along so that a caller can tell, before it
/// joins, whether the running flight is its own request; `Eq` and `Hash` ignore it, so that
/// one key has one flight at a time, whatever the request.
#[derive(Debug, Clone)]
pub(crate) struct FlightKey<Scope, Key> {
    scope: Scope,
    key: Key,
    fingerprint: Fingerprint,
}

impl<Scope: PartialEq, Key: PartialEq> PartialEq for FlightKey<Scope, Key> {
    fn eq(&self, other: &Self) -> bool {
        self.scope == other.scope && self.key == other.key
    }
}

impl<Scope: Eq, Key: Eq> Eq for FlightKey<Scope, Key> {}

impl<Scope: Hash, Key: Hash> Hash for FlightKey<Scope, Key> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.scope.hash(state);
        self.key.hash(state);
    }
}

/// What a flight shares: a response it produced, one it found stored, or why it ran
/// nothing.
pub(crate) enum Done<B> {
    /// A response of this flight's own run, and the fingerprint of the requests it answers
    /// (see [`Fingerprint::answered_by`]): followers whose own differs, for a response that
    /// varies on a header they sent otherwise, are not given it.
    Fresh {
        flown: Flown<B>,
        answers: Option<Fingerprint>,
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
        }
    }
}

pub(crate) type FlightResult<B, E> = Result<Done<B>, Arc<E>>;

pub(crate) type Answer<B, E> = Result<Response<ResponseBody<B>>, E>;

// ===== 1. Admit =====

/// Serves a request that has a key, or whose key is in its body.
pub(crate) async fn serve<S, K, I, St, ReqB, ResB>(
    inner: S,
    engine: Arc<Engine<K, I, St>>,
    mut parts: Parts,
    body: ReqB,
    key: Option<K::Key>,
) -> Answer<ResB, S::Error>
where
    S: InnerService<ReqB, ResB>,
    K: HeadKey<Key: super::key::EncodeKey>,
    I: HeadKey<Key: super::key::EncodeKey>,
    St: IdempotencyStore,
    ReqB: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static,
    ResB: SharedBody,
{
    let bytes = match read_body(&parts, body, engine.config.request_body_limit).await {
        Ok(bytes) => bytes,
        Err(refusal) => return Ok(refusal),
    };
    let key = match key {
        Some(key) => key,
        None => {
            parts.extensions.insert(BufferedBody(bytes.clone()));
            let key = engine.make_key.make_key(&parts);
            parts.extensions.remove::<BufferedBody>();
            match key {
                Some(key) => key,
                None => {
                    if let Some(refusal) = engine.without_key(true) {
                        return Ok(refusal);
                    }
                    let req = Request::from_parts(parts, Either::Left(Full::new(bytes)));
                    return Ok(inner.oneshot(req).await?.map(ResponseBody::inner));
                }
            }
        }
    };
    let Some(scope) = engine.scope.make_key(&parts) else {
        // Not knowing who asks, the layer can't tell whose answer is whose: nobody shares
        // this request, nor a replay of it.
        if let Some(refusal) = engine.without_identity(&parts) {
            return Ok(refusal);
        }
        let req = Request::from_parts(parts, Either::Left(Full::new(bytes)));
        return run_own(inner, Some(req), engine.config.role_header).await;
    };
    let fingerprint = Fingerprint::of(&parts.method, &parts.uri, &bytes);
    let store_key = engine
        .config
        .has_store
        .then(|| StoreKey::new(Some(&scope), &key));
    let flight_key = FlightKey {
        scope,
        key,
        fingerprint,
    };
    // Keys carry user ids: logs get a hash, and only when someone reads them.
    let key_hash = tracing::enabled!(tracing::Level::DEBUG).then(|| KeyHash::of(&flight_key));
    let request = Request::from_parts(parts, Either::Left(Full::new(bytes)));
    match (engine.stage.clone(), store_key) {
        (Some(stage), Some(store_key)) => {
            staged(
                stage, inner, engine, flight_key, store_key, key_hash, request,
            )
            .await
        }
        (_, store_key) => {
            join_or_lead(inner, engine, flight_key, store_key, key_hash, request).await
        }
    }
}

/// Serves a keyed request through the layer's stage: answered from what the stage keeps,
/// or through its flight (or on its own), and the answer then as the stage says.
async fn staged<S, K, I, St, ReqB, ResB>(
    stage: Arc<dyn Stage>,
    inner: S,
    engine: Arc<Engine<K, I, St>>,
    flight_key: FlightKey<I::Key, K::Key>,
    store_key: StoreKey,
    key_hash: Option<KeyHash>,
    mut request: InnerRequest<ReqB>,
) -> Answer<ResB, S::Error>
where
    S: InnerService<ReqB, ResB>,
    K: HeadKey,
    I: HeadKey,
    St: IdempotencyStore,
    ReqB: Send + 'static,
    ResB: SharedBody,
{
    let (fingerprint, metrics) = (flight_key.fingerprint, &engine.metrics);
    let admit = stage
        .admit(
            &engine.store,
            &store_key,
            fingerprint,
            request.headers_mut(),
            metrics,
        )
        .await;
    let (ticket, answer) = match admit {
        Admit::Answer(answer) => return Ok(from_stage(answer)),
        Admit::AnswerAndRefresh { answer, refreshing } => {
            // The caller's own request refreshes what is kept: a flight like any other,
            // which keeps its response; nobody reads its answer.
            let engine = engine.clone();
            tokio::spawn(async move {
                let _ = join_or_lead(
                    inner,
                    engine,
                    flight_key,
                    Some(store_key),
                    key_hash,
                    request,
                )
                .await;
                drop(refreshing);
            });
            return Ok(from_stage(answer));
        }
        Admit::Own(ticket) => {
            let role_header = engine.config.role_header;
            (ticket, run_own(inner, Some(request), role_header).await)
        }
        Admit::Flight(ticket) => {
            let flight = join_or_lead(
                inner,
                engine.clone(),
                flight_key,
                Some(store_key),
                key_hash,
                request,
            );
            (ticket, flight.await)
        }
    };
    let answered = answer.as_ref().ok().map(|response| Answered {
        status: response.status(),
        headers: response.headers(),
        role: response.extensions().get::<Role>().copied(),
    });
    match stage.answered(ticket, answered, metrics) {
        After::Keep(headers) => {
            let mut response = answer?;
            for (name, value) in headers {
                if let Some(name) = name {
                    response.headers_mut().insert(name, value);
                }
            }
            Ok(response)
        }
        After::Replace(response) => Ok(from_stage(response)),
    }
}

/// A response a stage made, with its body in one piece.
fn from_stage<B>(response: Response<Bytes>) -> Response<ResponseBody<B>> {
    response.map(|body| ResponseBody::buffered(body, None))
}

/// Reads a keyed request's body, refusing one over `limit` before reading it when its size
/// is declared.
async fn read_body<B, R>(
    parts: &Parts,
    body: B,
    limit: usize,
) -> Result<Bytes, Response<ResponseBody<R>>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let limit_u64 = limit as u64;
    if body.size_hint().lower() > limit_u64 || declared.is_some_and(|len| len > limit_u64) {
        return Err(problem::request_too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(problem::request_too_large()),
        Err(_) => Err(problem::request_unreadable()),
    }
}

// ===== 2. Join or lead =====

/// Why a caller was not admitted to the running flight of its key.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// Another request's flight, under `OnMismatch::Reject`.
    Mismatch,
    Conflict,
    PassThrough,
    /// The follower cap.
    Shed,
}

fn admission(config: &Config, mismatched: bool, followers: usize) -> Option<Refusal> {
    let capped = || {
        config
            .max_followers
            .is_some_and(|max| followers >= max)
            .then_some(Refusal::Shed)
    };
    if mismatched {
        return match config.on_mismatch {
            OnMismatch::Reject => Some(Refusal::Mismatch),
            _ => capped(),
        };
    }
    match config.on_duplicate {
        OnDuplicate::Share => capped(),
        OnDuplicate::Conflict => Some(Refusal::Conflict),
        OnDuplicate::PassThrough => Some(Refusal::PassThrough),
    }
}

pub(crate) async fn join_or_lead<S, K, I, St, ReqB, ResB>(
    inner: S,
    engine: Arc<Engine<K, I, St>>,
    flight_key: FlightKey<I::Key, K::Key>,
    store_key: Option<StoreKey>,
    key_hash: Option<KeyHash>,
    request: InnerRequest<ReqB>,
) -> Answer<ResB, S::Error>
where
    S: InnerService<ReqB, ResB>,
    K: HeadKey,
    I: HeadKey,
    St: IdempotencyStore,
    ReqB: Send + 'static,
    ResB: SharedBody,
{
    let fingerprint = flight_key.fingerprint;
    // Until this caller leads a flight (the request goes into it) or runs on its own.
    let mut request = Some(request);
    // The key goes into the registry; only a caller that waits for another request's turn
    // needs it again, and takes a copy of it then, from the registered key.
    let mut flight_key = Some(flight_key);
    // The leader's request goes into the flight; its headers are kept to tell which
    // responses and replays answer it when a response `Vary`s (one copy per flight).
    let mut leader_asked: Option<Arc<HeaderMap>> = None;
    let (config, metrics) = (&engine.config, &engine.metrics);
    let group = engine
        .flights
        .get::<FlightKey<I::Key, K::Key>, FlightResult<ResB, S::Error>>();
    // One deadline for the whole wait, turns of other requests included.
    let deadline = config
        .follower_timeout
        .map(|timeout| Instant::now() + timeout);
    let mut watch = None;
    // A follower's wait, turns of other requests included, for the wait histogram.
    let arrived = metrics.wait_started();
    loop {
        let (mut refusal, mut mismatched) = (None, false);
        let run = group.run_if(
            flight_key.take().expect("a key for every attempt"),
            || {
                let req = request.take().expect("a caller leads at most one flight");
                let asked = Arc::new(req.headers().clone());
                leader_asked = Some(asked.clone());
                fly(
                    inner.clone(),
                    engine.clone(),
                    req,
                    asked,
                    store_key.clone(),
                    fingerprint,
                    key_hash,
                )
            },
            |running, followers| {
                mismatched = running.fingerprint != fingerprint;
                refusal = admission(config, mismatched, followers);
                if refusal.is_none() {
                    // For another try: after another request's turn, or when the response
                    // varies on a header this caller sent otherwise. Equal to this caller's
                    // key but for the fingerprint. Followers only: a leader's key went
                    // into the registry.
                    flight_key = Some(FlightKey {
                        fingerprint,
                        ..running.clone()
                    });
                }
                refusal.is_none()
            },
        );
        let Some(run) = run else {
            let refusal = refusal.expect("a caller is refused only by admission");
            return refused(
                refusal,
                inner,
                &engine,
                request,
                store_key,
                fingerprint,
                key_hash,
            )
            .await;
        };
        let leader = run.is_leader();
        if mismatched {
            metrics.mismatch_queued();
            tracing::debug!(
                key = key_hash.map(|h| h.0),
                "waiting for another request's turn"
            );
        } else if !leader {
            metrics.caller_joined();
            tracing::debug!(key = key_hash.map(|h| h.0), "caller joined flight");
        }
        let watch = watch.get_or_insert_with(|| Watch {
            metrics: metrics.clone(),
            key_hash,
            done: false,
        });
        let outcome = match deadline.filter(|_| !leader) {
            None if leader => lead(run, config.finish_abandoned).await,
            None => run.await,
            Some(deadline) => match tokio::time::timeout_at(deadline, run).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    // Dropping the wait left the flight, which goes on for the others.
                    watch.done = true;
                    metrics.follower_waited(arrived);
                    metrics.follower_timed_out();
                    tracing::debug!(key = key_hash.map(|h| h.0), "follower stopped waiting");
                    return fall_back(config, inner, request).await;
                }
            },
        };
        if mismatched {
            // That request's turn is over; this one's may have come.
            continue;
        }
        watch.done = true;
        let leader_asked = leader_asked.clone();
        match answer(
            outcome,
            inner.clone(),
            &engine,
            &mut request,
            leader_asked,
            fingerprint,
        )
        .await
        {
            Some(answer) => {
                if !leader {
                    metrics.follower_waited(arrived);
                }
                return answer;
            }
            // The response varies on a header this caller sent otherwise: it waits for a
            // run of its own variant, which it leads or joins.
            None => watch.done = false,
        }
    }
}

/// Waits for the leader's flight; under `finish_abandoned`, on a task of its own, so that
/// the key stays claimed (its flight registered, for retries to join) until the work has
/// run and its response is kept, even if every caller has left.
async fn lead<F>(run: F, detach: bool) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    if !detach {
        return run.await;
    }
    match tokio::spawn(run.in_current_span()).await {
        Ok(outcome) => outcome,
        Err(error) => match error.try_into_panic() {
            Ok(payload) => panic::resume_unwind(payload),
            Err(_) => panic!("the runtime shut down under a running flight"),
        },
    }
}

async fn refused<S, K, I, St, ReqB, ResB>(
    refusal: Refusal,
    inner: S,
    engine: &Engine<K, I, St>,
    request: Option<InnerRequest<ReqB>>,
    store_key: Option<StoreKey>,
    fingerprint: Fingerprint,
    key_hash: Option<KeyHash>,
) -> Answer<ResB, S::Error>
where
    S: Service<InnerRequest<ReqB>, Response = Response<ResB>>,
    St: IdempotencyStore,
{
    let (config, metrics) = (&engine.config, &engine.metrics);
    match refusal {
        Refusal::Mismatch => {
            metrics.mismatch_rejected();
            Ok(problem::key_reused(None))
        }
        Refusal::Conflict => {
            // The flight may be only the lookup of a completed key (retries that arrived
            // together): replay rather than refuse.
            let asked = request.as_ref().map(|req| req.headers());
            if let (Some(_), Some(key), Some(asked)) = (config.replay, &store_key, asked) {
                if let Ok(Some(stored)) = engine.store.get(key).await {
                    if answers(&stored, fingerprint, asked) {
                        return Ok(replay(&stored, metrics));
                    }
                }
            }
            metrics.duplicate_refused();
            Ok(problem::in_progress())
        }
        Refusal::PassThrough => {
            metrics.duplicate_passed_through();
            run_own(inner, request, config.role_header).await
        }
        Refusal::Shed => {
            metrics.follower_shed();
            tracing::debug!(key = key_hash.map(|h| h.0), "follower turned away");
            fall_back(config, inner, request).await
        }
    }
}

/// What a follower gets when it stops waiting or is turned away: a `503`, or a call of its
/// own.
async fn fall_back<S, ReqB, ResB>(
    config: &Config,
    inner: S,
    request: Option<InnerRequest<ReqB>>,
) -> Answer<ResB, S::Error>
where
    S: Service<InnerRequest<ReqB>, Response = Response<ResB>>,
{
    match config.fallback {
        Fallback::ServiceUnavailable => Ok(problem::gave_up_waiting()),
        Fallback::PassThrough => run_own(inner, request, config.role_header).await,
    }
}

/// A call of the inner service for this caller alone.
pub(crate) async fn run_own<S, ReqB, ResB>(
    inner: S,
    request: Option<InnerRequest<ReqB>>,
    role_header: bool,
) -> Answer<ResB, S::Error>
where
    S: Service<InnerRequest<ReqB>, Response = Response<ResB>>,
{
    let request = request.expect("a caller that did not lead keeps its request");
    let mut response = inner.oneshot(request).await?.map(ResponseBody::inner);
    tag(&mut response, Role::Own, role_header);
    Ok(response)
}

/// Counts and logs a keyed caller that leaves before its flight completes.
struct Watch {
    metrics: Metrics,
    key_hash: Option<KeyHash>,
    done: bool,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.caller_cancelled();
            tracing::debug!(key = self.key_hash.map(|h| h.0), "caller cancelled");
        }
    }
}

// ===== 3. Run: the leader's flight =====

/// The work of a flight, once per key and process: the stored response if there is one;
/// else a run of the inner service (under the key's lease, with a shared store), whose
/// response is buffered to be shared and kept before the flight completes.
fn fly<S, K, I, St, ReqB, ResB>(
    inner: S,
    engine: Arc<Engine<K, I, St>>,
    req: InnerRequest<ReqB>,
    asked: Arc<HeaderMap>,
    store_key: Option<StoreKey>,
    fingerprint: Fingerprint,
    key_hash: Option<KeyHash>,
) -> impl Future<Output = FlightResult<ResB, S::Error>> + Send + 'static
where
    S: InnerService<ReqB, ResB>,
    K: Send + Sync + 'static,
    I: Send + Sync + 'static,
    St: IdempotencyStore,
    ReqB: Send + 'static,
    ResB: SharedBody,
{
    let span = tracing::debug_span!("coalesce_flight", key = key_hash.map(|h| h.0));
    async move {
        let lease = match &store_key {
            None => None,
            Some(key) => match take_lease(&engine, key, fingerprint, &asked).await {
                Ok(lease) => lease,
                Err(done) => return Ok(done),
            },
        };
        engine.metrics.flight_started();
        tracing::debug!("flight started");
        let mut req = req;
        if let Some(fence) = lease.as_ref().and_then(LeaseGuard::fence) {
            req.extensions_mut().insert(fence);
        }
        let outcome = run_and_keep(inner, engine, req, asked, store_key, lease, fingerprint).await;
        tracing::debug!(ok = outcome.is_ok(), "flight completed");
        outcome
    }
    .instrument(span)
}

async fn run_and_keep<S, K, I, St, ReqB, ResB>(
    inner: S,
    engine: Arc<Engine<K, I, St>>,
    req: InnerRequest<ReqB>,
    asked: Arc<HeaderMap>,
    store_key: Option<StoreKey>,
    lease: Option<LeaseGuard>,
    fingerprint: Fingerprint,
) -> FlightResult<ResB, S::Error>
where
    S: Service<InnerRequest<ReqB>, Response = Response<ResB>>,
    St: IdempotencyStore,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    let (config, metrics) = (&engine.config, &engine.metrics);
    let _in_flight = metrics.in_flight();
    let flown = match inner.oneshot(req).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            let shareable = config.share.allows(&parts);
            let response = Response::from_parts(parts, body);
            if shareable {
                flown::collect(response, config.body_limit, metrics).await
            } else {
                metrics.response_not_shared();
                tracing::debug!("response not to be shared; followers run on their own");
                let one_at_a_time = config.unshared == Unshared::OneAfterAnother;
                Flown::unshared(response, one_at_a_time)
            }
        }
        Err(error) => {
            if let Some(key) = store_key {
                keep_ran::<_, _, _, ResB>(&engine, key, lease, None, &asked).await;
            }
            return Err(Arc::new(error));
        }
    };
    // Whom the response answers. Not shared with anyone: the leader's alone.
    let (answers, by_authorization) = match &flown {
        Flown::Buffered(buffered) => {
            let headers = &buffered.parts.headers;
            let by_authorization = engine.by_authorization(headers, &asked);
            let answers = answered_by(fingerprint, headers, &asked, by_authorization);
            (answers, by_authorization)
        }
        _ => (None, false),
    };
    // Kept before the lease is released and before the flight completes, so that a
    // duplicate, here or on another instance, either waits for this flight or finds the
    // response kept.
    if let Some(key) = store_key {
        keep_ran(&engine, key, lease, Some((&flown, answers)), &asked).await;
    }
    Ok(Done::Fresh {
        flown,
        answers,
        by_authorization,
    })
}

/// Keeps a flight's response (`None`: its service failed) by the rules of the layer's
/// stage, or the engine's own, and releases the lease, if the flight holds one.
async fn keep_ran<K, I, St: IdempotencyStore, B>(
    engine: &Engine<K, I, St>,
    key: StoreKey,
    lease: Option<LeaseGuard>,
    flown: Option<(&Flown<B>, Option<Fingerprint>)>,
    asked: &HeaderMap,
) {
    let Some(stage) = &engine.stage else {
        return keep(engine, key, lease, flown).await;
    };
    let ran = flown.map(|(flown, answers)| match flown {
        Flown::Buffered(buffered) => Ran::Buffered(buffered, answers),
        Flown::Unshared { .. } => Ran::Unshared,
        Flown::TooLarge(_) => Ran::TooLarge,
    });
    let kept = stage.keep(&key, ran, asked);
    if let Err(error) = store_and_release(engine, key, lease, kept).await {
        engine.metrics.store_error();
        tracing::warn!(%error, "keeping a response failed; a retry will run again");
    }
}

/// Takes the key's lease (or finds its response), waiting while another instance holds it.
/// `Ok` to run (holding the lease if the store has leases), `Err` to answer without running.
async fn take_lease<K, I, St: IdempotencyStore, B>(
    engine: &Engine<K, I, St>,
    key: &StoreKey,
    fingerprint: Fingerprint,
    asked: &HeaderMap,
) -> Result<Option<LeaseGuard>, Done<B>> {
    let (store, config, metrics) = (&engine.store, &engine.config, &engine.metrics);
    let started = std::time::Instant::now();
    let mut waited = false;
    loop {
        // A stage may take its own lease (the cache refreshes entries that are stale but
        // still kept).
        let lease = match &engine.stage {
            Some(stage) => {
                let metrics = &engine.metrics;
                stage
                    .lease(store, key, fingerprint, asked, waited, metrics)
                    .await
            }
            None => store.lease(key).await,
        };
        let found = match lease {
            Ok(Lease::Held(guard)) => {
                if waited {
                    metrics.lease_taken_over();
                }
                return Ok(Some(guard));
            }
            Ok(Lease::Stored(stored)) => stored,
            // A store of one process keeps responses for replay only.
            Ok(Lease::NotShared) if config.replay.is_none() => return Ok(None),
            Ok(Lease::NotShared) => match store.get(key).await {
                Ok(Some(stored)) => stored,
                Ok(None) => return Ok(None),
                Err(error) => return store_failed(&error, "lookup", engine),
            },
            Ok(Lease::HeldElsewhere) => {
                if config.on_duplicate == OnDuplicate::Conflict {
                    metrics.duplicate_refused();
                    return Err(Done::InProgress);
                }
                if !waited {
                    waited = true;
                    metrics.flight_waiting_elsewhere();
                }
                let released = store.released(key);
                match config.follower_timeout {
                    None => released.await,
                    Some(timeout) => {
                        let left = timeout.saturating_sub(started.elapsed());
                        if left.is_zero() || tokio::time::timeout(left, released).await.is_err() {
                            metrics.follower_timed_out();
                            return Err(Done::GaveUp);
                        }
                    }
                }
                continue;
            }
            Err(error) => return store_failed(&error, "lease", engine),
        };
        if !answers(&found, fingerprint, asked) && config.on_mismatch == OnMismatch::Queue {
            // Another request's response: this one runs, and its response is kept instead.
            // The store answered with the response rather than the lease, so this run holds
            // none (see the `OnMismatch` docs).
            return Ok(None);
        }
        return Err(Done::Stored(found));
    }
}

fn store_failed<K, I, St, B>(
    error: &BoxError,
    call: &'static str,
    engine: &Engine<K, I, St>,
) -> Result<Option<LeaseGuard>, Done<B>> {
    engine.metrics.store_error();
    match engine.config.on_store_error {
        OnStoreError::FailClosed => {
            tracing::warn!(%error, call, "coalescing store failed; answering 503");
            Err(Done::Unavailable)
        }
        _ => {
            tracing::warn!(%error, call, "coalescing store failed; running the request");
            Ok(None)
        }
    }
}

/// Keeps a completed response: for `replay`, or for the handover to instances that wait
/// on the lease; then releases the lease.
async fn keep<K, I, St: IdempotencyStore, B>(
    engine: &Engine<K, I, St>,
    key: StoreKey,
    lease: Option<LeaseGuard>,
    flown: Option<(&Flown<B>, Option<Fingerprint>)>,
) {
    let config = &engine.config;
    let ttl = config
        .replay
        .or_else(|| lease.is_some().then_some(config.handover));
    let stored = ttl.and_then(|ttl| {
        let (flown, answers) = flown?;
        let Flown::Buffered(buffered) = flown else {
            return None;
        };
        let stored = storable(buffered, answers?)?;
        Some((Arc::new(stored), ttl))
    });
    if let Err(error) = store_and_release(engine, key, lease, stored).await {
        engine.metrics.store_error();
        tracing::warn!(%error, "keeping a response failed; a retry will run again");
    }
}

/// Stores `stored` under `key` for its TTL, if there is one, and releases the lease, if one
/// is held: one step for a store with leases.
pub(crate) async fn store_and_release<K, I, St: IdempotencyStore>(
    engine: &Engine<K, I, St>,
    key: StoreKey,
    lease: Option<LeaseGuard>,
    stored: Option<(Arc<StoredResponse>, Duration)>,
) -> Result<(), BoxError> {
    match (lease, stored) {
        (Some(lease), stored) => lease.complete(stored).await,
        (None, Some((stored, ttl))) => engine.store.put(key, stored, ttl).await,
        (None, None) => Ok(()),
    }
}

/// A completed response as the store keeps it, under the fingerprint of the requests it
/// answers, unless the rules say not to keep it: server errors (so that a retry runs
/// again), bodies that ended in an error or with trailers, and (by the caller) `Vary: *`.
/// Bodies over the limit or not shared are not `Buffered`: not kept either.
pub(crate) fn storable(buffered: &Buffered, fingerprint: Fingerprint) -> Option<StoredResponse> {
    let parts = &buffered.parts;
    if parts.status.is_server_error() || buffered.end.is_some() {
        return None;
    }
    Some(StoredResponse::new(
        parts.status,
        parts.version,
        parts.headers.clone(),
        buffered.data.clone(),
        fingerprint,
    ))
}

// ===== 4. Answer =====

/// What a caller of a flight gets from its outcome; `None` when the response varies on a
/// header this caller sent otherwise and it is to wait for a run of its own variant.
async fn answer<S, K, I, St, ReqB, ResB>(
    outcome: Outcome<FlightResult<ResB, S::Error>>,
    inner: S,
    engine: &Engine<K, I, St>,
    request: &mut Option<InnerRequest<ReqB>>,
    leader_asked: Option<Arc<HeaderMap>>,
    fingerprint: Fingerprint,
) -> Option<Answer<ResB, S::Error>>
where
    S: Service<InnerRequest<ReqB>, Response = Response<ResB>> + Clone,
    S::Error: ShareError,
{
    let (config, metrics) = (&engine.config, &engine.metrics);
    let leader = outcome.is_leader();
    let role = if leader { Role::Leader } else { Role::Follower };
    // What this caller asked: its own request's headers, or the leader's copy of them.
    let asked = match (request.as_ref(), &leader_asked) {
        (Some(request), _) => request.headers(),
        (None, Some(asked)) => asked,
        (None, None) => unreachable!("a caller keeps its request unless it leads"),
    };
    let mut response = match outcome.into_value() {
        Err(error) => return Some(Err(S::Error::share(&error))),
        Ok(Done::Stored(stored)) if answers(&stored, fingerprint, asked) => {
            if engine.replays() {
                return Some(Ok(replay(&stored, metrics)));
            }
            // A cache entry another instance kept while this one waited for its lease: a
            // copy of that instance's run, not a replay.
            let mut response = stored_response(&stored);
            tag(&mut response, Role::Follower, config.role_header);
            return Some(Ok(response));
        }
        Ok(Done::Stored(stored)) => {
            metrics.mismatch_rejected();
            let varied = vary_names(stored.headers());
            return Some(Ok(problem::key_reused(varied.as_deref())));
        }
        Ok(Done::InProgress) => return Some(Ok(problem::in_progress())),
        Ok(Done::GaveUp) => return Some(Ok(problem::gave_up_waiting())),
        Ok(Done::Unavailable) => return Some(Ok(problem::store_unavailable())),
        Ok(Done::Fresh {
            flown: Flown::Buffered(buffered),
            answers,
            by_authorization,
        }) => {
            let headers = &buffered.parts.headers;
            let own = leader
                || answers.is_some()
                    && answers == answered_by(fingerprint, headers, asked, by_authorization);
            if !own {
                return varied(engine, headers);
            }
            buffered.into_response()
        }
        Ok(Done::Fresh {
            flown: Flown::TooLarge(slot) | Flown::Unshared { leader: slot, .. },
            ..
        }) if leader => Flown::take_leader(&slot)
            .expect("the leader's own response is taken once, by the leader"),
        Ok(Done::Fresh {
            flown: Flown::TooLarge(_),
            ..
        }) => problem::too_large_to_share(),
        Ok(Done::Fresh {
            flown: Flown::Unshared { turn, .. },
            ..
        }) => {
            // Holds the turn, if followers take turns, until its own response is there.
            let _turn = match turn {
                Some(turn) => turn.acquire_owned().await.ok(),
                None => None,
            };
            return Some(run_own(inner, request.take(), config.role_header).await);
        }
    };
    tag(&mut response, role, config.role_header);
    Some(Ok(response))
}

/// A follower whose flight's response is not its answer: it varies on a header this
/// caller sent otherwise (or, in a cache, was made for another `Authorization`). Under
/// `OnMismatch::Reject` that is another request for the key, refused with a `422` naming
/// the headers, never a second run; else the caller waits for a run of its own variant
/// (`None`), one variant at a time.
fn varied<K, I, St, B, E>(engine: &Engine<K, I, St>, response: &HeaderMap) -> Option<Answer<B, E>> {
    let (config, metrics) = (&engine.config, &engine.metrics);
    let reject = config.on_mismatch == OnMismatch::Reject;
    let names = vary_names(response);
    if let Some(names) = names.as_deref().filter(|_| metrics.first_varied()) {
        let outcome = if reject {
            "they get 422 (one run per key)"
        } else {
            "they wait for a run of their own, one variant at a time"
        };
        tracing::warn!(
            "a response shared by this layer's flights varies on `{names}`, and callers \
             that sent other values of it can't share it: {outcome}. `Vary` comes from the \
             handler or from a layer below this one (tower-http's CompressionLayer adds \
             `accept-encoding`, CorsLayer `origin`): put such layers above (outside) this \
             one, so that they run on every caller's copy"
        );
    }
    if reject {
        metrics.mismatch_rejected();
        return Some(Ok(problem::key_reused(Some(
            names.as_deref().unwrap_or("authorization"),
        ))));
    }
    metrics.mismatch_queued();
    tracing::debug!("response varies on a header this follower sent otherwise");
    None
}

/// The header names a response's `Vary` lists, lowercase and comma-separated.
fn vary_names(response: &HeaderMap) -> Option<String> {
    let mut names = String::new();
    for value in response.get_all(VARY) {
        for name in value.as_bytes().split(|&b| b == b',') {
            let name = String::from_utf8_lossy(name.trim_ascii()).to_ascii_lowercase();
            if !name.is_empty() {
                if !names.is_empty() {
                    names.push_str(", ");
                }
                names.push_str(&name);
            }
        }
    }
    (!names.is_empty()).then_some(names)
}

/// The fingerprint of the requests a flight's response answers: the leader's, extended by
/// the values of the headers the response varies on, and (`by_authorization`) by
/// `Authorization`. `None` for `Vary: *`: only its own request.
fn answered_by(
    fingerprint: Fingerprint,
    response: &HeaderMap,
    asked: &HeaderMap,
    by_authorization: bool,
) -> Option<Fingerprint> {
    let answers = fingerprint.answered_by(response, asked)?;
    Some(match by_authorization {
        true => answers.extended_by(&AUTHORIZATION, asked),
        false => answers,
    })
}

/// Whether a stored response answers a request with this fingerprint and these headers.
pub(crate) fn answers(
    stored: &StoredResponse,
    fingerprint: Fingerprint,
    asked: &HeaderMap,
) -> bool {
    fingerprint.answered_by(stored.headers(), asked) == Some(stored.fingerprint())
}

/// A stored response as a response: its status, version, headers and body (not copied).
pub(crate) fn stored_response<B>(stored: &StoredResponse) -> Response<ResponseBody<B>> {
    let mut response = Response::new(ResponseBody::buffered(stored.body().clone(), None));
    *response.status_mut() = stored.status();
    *response.version_mut() = stored.version();
    *response.headers_mut() = stored.headers().clone();
    response
}

const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

fn replay<B>(stored: &StoredResponse, metrics: &Metrics) -> Response<ResponseBody<B>> {
    metrics.replayed();
    let mut response = stored_response(stored);
    response
        .headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    response
}

const ROLE_HEADER: HeaderName = HeaderName::from_static("coalesce-role");

fn tag<B>(response: &mut Response<B>, role: Role, role_header: bool) {
    response.extensions_mut().insert(role);
    if role_header {
        response
            .headers_mut()
            .insert(ROLE_HEADER, role.header_value());
    }
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
