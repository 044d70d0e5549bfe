//! The cache's stage of the engine: between admitting a request and joining its flight,
//! a kept response answers it (fresh, or stale while one refresh runs); otherwise the
//! request goes through the flight as any other, and the flight keeps its response by the
//! rules.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use dashmap::DashMap;
use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Response, StatusCode};
use http_body::Body;
use tower::Service;

use super::rules::{self, Asked, Conditional, Rules, Verdict};
use crate::BoxError;
use crate::coalesce::MakeKey;
use crate::http::Role;
use crate::http::body::ResponseBody;
use crate::http::engine::{self, Answer, Engine, FlightKey, InnerRequest, KeyHash};
use crate::http::error::ShareError;
use crate::http::flown::Flown;
use crate::http::lease::{Lease, LeaseGuard};
use crate::http::store::{Fingerprint, IdempotencyStore, StoreKey, StoredResponse};
use crate::single_flight::{Freshness, Lifetimes};

/// What a cache layer holds besides the engine's store: its rules, the keys on
/// hit-for-pass, and the keys being refreshed in the background.
pub(crate) struct CacheState {
    pub(crate) rules: Rules,
    passes: moka::sync::Cache<StoreKey, ()>,
    refreshing: DashMap<StoreKey, ()>,
}

impl CacheState {
    pub(crate) fn new(rules: Rules) -> Self {
        CacheState {
            passes: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(rules.hit_for_pass.max(std::time::Duration::from_millis(1)))
                .build(),
            refreshing: DashMap::new(),
            rules,
        }
    }
}

impl std::fmt::Debug for CacheState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheState")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// How the cache came by an answer, as RFC 9211's `Cache-Status` says it.
#[derive(Debug, Clone, Copy)]
enum Status {
    Hit,
    /// Served stale: within `stale-while-revalidate`, or in place of an error.
    Stale(&'static str),
    /// Forwarded to the service (through the flight), with RFC 9211's reason.
    Forward(&'static str),
}

fn cache_status(status: Status, collapsed: bool, ttl: Option<i64>) -> HeaderValue {
    use std::fmt::Write;
    let mut value = String::with_capacity(64);
    value.push_str("tower-coalesce");
    match status {
        Status::Hit => value.push_str("; hit"),
        Status::Stale(detail) => {
            value.push_str("; hit; detail=");
            value.push_str(detail);
        }
        Status::Forward(reason) => {
            value.push_str("; fwd=");
            value.push_str(reason);
        }
    }
    if collapsed {
        value.push_str("; collapsed");
    }
    if let Some(ttl) = ttl {
        let _ = write!(value, "; ttl={ttl}");
    }
    HeaderValue::try_from(value).expect("ASCII tokens")
}

/// Serves a keyed `GET` or `HEAD` through the cache.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve<S, K, I, St, ReqB, ResB>(
    inner: S,
    engine: Arc<Engine<K, I, St>>,
    cache: Arc<CacheState>,
    flight_key: FlightKey<I::Key, K::Key>,
    store_key: StoreKey,
    key_hash: Option<KeyHash>,
    mut request: InnerRequest<ReqB>,
) -> Answer<ResB, S::Error>
where
    S: Service<InnerRequest<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: ShareError,
    K: MakeKey<Parts> + Send + Sync + 'static,
    K::Key: Send + Sync + 'static,
    I: MakeKey<Parts> + Send + Sync + 'static,
    I::Key: Send + Sync + 'static,
    St: IdempotencyStore,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let asked = Asked::of(request.headers());
    if asked.no_store || cache.passes.contains_key(&store_key) {
        let reason = if asked.no_store {
            "request"
        } else {
            "uri-miss"
        };
        let mut response = engine::run_own(inner, Some(request), engine.config.role_header).await?;
        response.headers_mut().insert(
            CACHE_STATUS,
            cache_status(Status::Forward(reason), false, None),
        );
        return Ok(response);
    }
    let conditional = Conditional::take(request.headers_mut());
    let fingerprint = flight_key.fingerprint();
    let now = SystemTime::now();

    let mut reason = "miss";
    let mut fallback = None;
    if asked.revalidate {
        reason = "request";
    } else {
        match engine.store.get(&store_key).await {
            Ok(Some(kept)) if engine::answers(&kept, fingerprint, request.headers()) => {
                let (age, lifetimes) = judge(&cache, &kept, request.headers(), now);
                let served = |status| {
                    from_store(
                        &kept,
                        age,
                        lifetimes.fresh,
                        status,
                        &conditional,
                        &engine.metrics,
                    )
                };
                match lifetimes.state(age) {
                    Freshness::Fresh => return Ok(served(Status::Hit)),
                    Freshness::Revalidate => {
                        let stale = served(Status::Stale("stale-while-revalidate"));
                        refresh(
                            inner, engine, cache, flight_key, store_key, key_hash, request,
                        );
                        return Ok(stale);
                    }
                    Freshness::IfError => {
                        reason = "stale";
                        fallback = Some((kept, lifetimes.fresh));
                    }
                    Freshness::Expired => reason = "stale",
                }
            }
            Ok(Some(_)) => reason = "vary-miss",
            Ok(None) => {}
            Err(error) => {
                engine.metrics.store_error();
                tracing::warn!(%error, "cache lookup failed; running the request");
            }
        }
    }

    let answer = engine::join_or_lead(
        inner,
        engine.clone(),
        flight_key,
        Some(store_key),
        key_hash,
        request,
    )
    .await;
    let failed = match &answer {
        Err(_) => true,
        Ok(response) => response.status().is_server_error(),
    };
    if let (true, Some((kept, fresh))) = (failed, fallback) {
        let age = rules::age(kept.headers(), SystemTime::now());
        tracing::debug!("serving a stale response in place of an error");
        let status = Status::Stale("stale-if-error");
        return Ok(from_store(
            &kept,
            age,
            fresh,
            status,
            &conditional,
            &engine.metrics,
        ));
    }
    let mut response = answer?;
    let collapsed = response.extensions().get::<Role>() == Some(&Role::Follower);
    if conditional.not_modified(response.status(), response.headers()) {
        response = not_modified(response.headers());
    }
    response.headers_mut().insert(
        CACHE_STATUS,
        cache_status(Status::Forward(reason), collapsed, None),
    );
    Ok(response)
}

/// How old a kept response is, and how long it may be served, to a request with the
/// headers `asked`.
fn judge(
    cache: &CacheState,
    kept: &StoredResponse,
    asked: &HeaderMap,
    now: SystemTime,
) -> (Duration, Lifetimes) {
    let age = rules::age(kept.headers(), now);
    let lifetimes = match cache.rules.verdict(kept.status(), kept.headers(), asked) {
        Verdict::Store(lifetimes) => lifetimes,
        // Kept under other rules (a request that was allowed what this one isn't).
        _ => Lifetimes::default(),
    };
    (age, lifetimes)
}

/// The lease of a cache flight, with a store shared by several instances: taken whatever
/// is kept (the entry may be stale: that is why the flight runs), unless the key turns out
/// to have been refreshed by another instance: then that entry answers ([`Lease::Stored`]).
/// So one instance refreshes a key, and the others wait for it or serve the stale entry
/// meanwhile.
///
/// The key is looked at again after waiting for another instance (`waited`), before the
/// lease, so that the instances that waited don't take the lease one after another; and
/// once the lease is held, in case the refresh completed between this caller's lookup and
/// the lease.
pub(crate) async fn lease<K, I, St: IdempotencyStore>(
    engine: &Engine<K, I, St>,
    cache: &CacheState,
    key: &StoreKey,
    fingerprint: Fingerprint,
    asked: &HeaderMap,
    waited: bool,
) -> Result<Lease, BoxError> {
    if waited {
        if let Some(kept) = fresh_entry(engine, cache, key, fingerprint, asked).await? {
            return Ok(Lease::Stored(kept));
        }
    }
    let guard = match engine.store.refresh_lease(key).await? {
        Lease::Held(guard) => guard,
        other => return Ok(other),
    };
    match fresh_entry(engine, cache, key, fingerprint, asked).await {
        Ok(Some(kept)) => {
            // Released by a task of its own, off this caller's path.
            drop(guard);
            Ok(Lease::Stored(kept))
        }
        Ok(None) => Ok(Lease::Held(guard)),
        Err(error) => {
            // Holding the lease, the flight may as well run.
            engine.metrics.store_error();
            tracing::warn!(%error, "cache lookup under a lease failed; refreshing");
            Ok(Lease::Held(guard))
        }
    }
}

/// The entry kept under `key`, if it answers this request and is fresh.
async fn fresh_entry<K, I, St: IdempotencyStore>(
    engine: &Engine<K, I, St>,
    cache: &CacheState,
    key: &StoreKey,
    fingerprint: Fingerprint,
    asked: &HeaderMap,
) -> Result<Option<Arc<StoredResponse>>, BoxError> {
    Ok(engine.store.get(key).await?.filter(|kept| {
        let (age, lifetimes) = judge(cache, kept, asked, SystemTime::now());
        engine::answers(kept, fingerprint, asked) && lifetimes.state(age) == Freshness::Fresh
    }))
}

/// Starts one background refresh of `store_key` on a tokio task, unless one runs: a flight
/// like any other, whose response the flight keeps.
fn refresh<S, K, I, St, ReqB, ResB>(
    inner: S,
    engine: Arc<Engine<K, I, St>>,
    cache: Arc<CacheState>,
    flight_key: FlightKey<I::Key, K::Key>,
    store_key: StoreKey,
    key_hash: Option<KeyHash>,
    request: InnerRequest<ReqB>,
) where
    S: Service<InnerRequest<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: ShareError,
    K: MakeKey<Parts> + Send + Sync + 'static,
    K::Key: Send + Sync + 'static,
    I: MakeKey<Parts> + Send + Sync + 'static,
    I::Key: Send + Sync + 'static,
    St: IdempotencyStore,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    if cache.refreshing.insert(store_key.clone(), ()).is_some() {
        return;
    }
    // The caller's own request (its validators already taken off), body and all: the
    // refreshed response is kept under this request's fingerprint, so it must answer it.
    engine.metrics.cache_refreshed();
    tokio::spawn(async move {
        let done = Refreshing(cache, store_key.clone());
        // The flight kept the response; nobody reads this copy.
        let _ = engine::join_or_lead(
            inner,
            engine,
            flight_key,
            Some(store_key),
            key_hash,
            request,
        )
        .await;
        drop(done);
    });
}

/// Frees a key's refresh slot when the refresh ends, however it ends.
struct Refreshing(Arc<CacheState>, StoreKey);

impl Drop for Refreshing {
    fn drop(&mut self) {
        self.0.refreshing.remove(&self.1);
    }
}

/// A kept response as an answer: its `Age` and `Cache-Status`, or a `304` for a request
/// whose validators match it.
/// `ttl` in `Cache-Status` is the freshness left, negative once stale (RFC 9211).
fn from_store<B>(
    kept: &StoredResponse,
    age: Duration,
    fresh: Duration,
    status: Status,
    conditional: &Conditional,
    metrics: &crate::http::Metrics,
) -> Response<ResponseBody<B>> {
    let mut response = if conditional.not_modified(kept.status(), kept.headers()) {
        not_modified(kept.headers())
    } else {
        engine::stored_response(kept)
    };
    metrics.cache_answered(matches!(status, Status::Hit));
    let seconds = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let ttl = seconds(fresh).saturating_sub(seconds(age));
    let headers = response.headers_mut();
    headers.insert(http::header::AGE, HeaderValue::from(age.as_secs()));
    headers.insert(CACHE_STATUS, cache_status(status, false, Some(ttl)));
    response
}

fn not_modified<B>(headers: &HeaderMap) -> Response<ResponseBody<B>> {
    let mut response = Response::new(ResponseBody::buffered(Bytes::new(), None));
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    for name in rules::NOT_MODIFIED_HEADERS {
        for value in headers.get_all(&name) {
            response.headers_mut().append(name.clone(), value.clone());
        }
    }
    response
}

/// Keeps a flight's response by the rules, or puts its key on hit-for-pass; then releases
/// the lease, if the flight held one.
pub(crate) async fn keep<K, I, St, B>(
    engine: &Engine<K, I, St>,
    cache: &CacheState,
    key: StoreKey,
    lease: Option<LeaseGuard>,
    flown: Option<(&Flown<B>, Option<Fingerprint>)>,
    asked: &HeaderMap,
) where
    St: IdempotencyStore,
{
    let kept = flown.and_then(|(flown, answers)| keepable(cache, &key, flown, answers, asked));
    if let Err(error) = engine::store_and_release(engine, key, lease, kept).await {
        engine.metrics.store_error();
        tracing::warn!(%error, "keeping a response in the cache failed");
    }
}

/// A response as the cache keeps it, and for how long, or `None` (and the key on
/// hit-for-pass, for a personal response).
fn keepable<B>(
    cache: &CacheState,
    key: &StoreKey,
    flown: &Flown<B>,
    answers: Option<Fingerprint>,
    asked: &HeaderMap,
) -> Option<(Arc<StoredResponse>, Duration)> {
    let parts = match flown {
        Flown::Buffered(buffered) => &buffered.parts,
        Flown::Unshared { .. } => {
            cache.passes.insert(key.clone(), ());
            return None;
        }
        Flown::TooLarge(_) => return None,
    };
    let lifetimes = match cache.rules.verdict(parts.status, &parts.headers, asked) {
        Verdict::Store(lifetimes) => lifetimes,
        Verdict::Pass => {
            cache.passes.insert(key.clone(), ());
            return None;
        }
        Verdict::Skip => return None,
    };
    // The engine's own rules of what a store keeps (`Vary: *`, trailers, errors in the body).
    let mut kept = engine::storable(flown, answers?)?;
    rules::stamp(kept.headers_mut(), SystemTime::now());
    // Kept while it may be served at all; the store drops it after.
    Some((Arc::new(kept), lifetimes.usable()))
}
