//! Step 3, run: the leader's flight. Look the key up in the store and take its lease when
//! there is a store, call the inner service, buffer the response, keep it, release the lease.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use http::Response;
use tower::ServiceExt;

use super::*;
use crate::BoxError;
use crate::http::flown::{self, Buffered, Flown};
use crate::http::policy::{OnDuplicate, OnMismatch, OnStoreError, Unshared};
use crate::http::stage::Ran;
use crate::single_flight::BoxWork;
use crate::store::{Completion, Lease, LeaseGuard};
use crate::store::{Fingerprint, Store, StoreKey, StoredResponse};

/// The work of a flight, once per key and process: the stored response if there is one;
/// else a run of the inner service (under the key's lease, with a shared store), whose
/// response is buffered to be shared and kept before the flight completes.
pub(super) fn fly<S, K, I, St, ReqB, ResB>(
    inner: S,
    engine: Arc<Engine<K, I, St>>,
    req: InnerRequest<ReqB>,
    store_key: Option<StoreKey>,
    ask: Ask,
    key_hash: Option<KeyHash>,
) -> BoxWork<FlightResult<ResB, S::Error>>
where
    S: InnerService<ReqB, ResB>,
    K: Send + Sync + 'static,
    I: Send + Sync + 'static,
    St: Store,
    ReqB: Send + 'static,
    ResB: SharedBody,
{
    // Each way boxed where it is made (see `boxed_in_span`).
    let span = (!spans_unseen()).then(|| {
        tracing::debug_span!(
            FLIGHT_SPAN,
            key = key_hash.map(|h| h.0),
            coalesce.flight_id = ask.flight(),
            coalesce.elsewhere = tracing::field::Empty,
        )
    });
    let Some(key) = store_key else {
        // Without a store, the flight is the run itself.
        return boxed_in_span(run_plain(inner, engine, req, ask), span);
    };
    let work = async move {
        let lease = match take_lease(&engine, &key, ask.fingerprint(), ask.headers()).await {
            Ok(lease) => lease,
            Err(done) => return Ok(done),
        };
        let run = run_and_keep(inner, engine, req, key, lease, ask);
        run.await
    };
    boxed_in_span(work, span)
}

/// The run of a flight without a store (nor a stage, which needs one), the commonest: the
/// call, and its response buffered to be shared. On a path of its own because its future
/// is moved whole into the flight's box: without the store's steps, and with the call made
/// before the future rather than the request held in it until the call, it is half the
/// size of [`run_and_keep`]'s (1,424 bytes there), small enough for the allocator's
/// per-thread cache, and each move of it copies half as much.
fn run_plain<S, K, I, St, ReqB, ResB>(
    inner: S,
    engine: Arc<Engine<K, I, St>>,
    req: InnerRequest<ReqB>,
    ask: Ask,
) -> impl Future<Output = FlightResult<ResB, S::Error>> + Send + 'static
where
    S: InnerService<ReqB, ResB>,
    K: Send + Sync + 'static,
    I: Send + Sync + 'static,
    St: Store,
    ReqB: Send + 'static,
    ResB: SharedBody,
{
    let call = inner.oneshot(req);
    async move {
        let metrics = &engine.metrics;
        metrics.flight_started();
        tracing::debug!("flight started");
        let _in_flight = metrics.in_flight();
        let response = match call.await {
            Ok(response) => response,
            Err(error) => {
                tracing::debug!(ok = false, "flight completed");
                return Err(Arc::new(error));
            }
        };
        let flown = shared(response, &engine.config, metrics).await;
        tracing::debug!(ok = true, "flight completed");
        Ok(fresh(&engine, flown, &ask))
    }
}

/// A flight's response buffered to be shared, or as it came if the share predicate says
/// it is not to be shared (followers then run on their own). A `304` comes here only from
/// a flight without a stage (a stage's freshens what it keeps): no stage asked a
/// conditional question, so it is shared as it is. Not `async`: a future holds its
/// arguments beside what it awaits, and the response would be held twice.
fn shared<'a, B: SharedBody>(
    response: Response<B>,
    config: &Config,
    metrics: &'a Metrics,
) -> impl Future<Output = Flown<B>> + Send + 'a {
    use futures::future::Either;
    let (parts, body) = response.into_parts();
    let shareable = parts.status == http::StatusCode::NOT_MODIFIED || config.share.allows(&parts);
    let response = Response::from_parts(parts, body);
    if shareable {
        return Either::Left(flown::collect(response, config.body_limit, metrics));
    }
    metrics.response_not_shared();
    tracing::debug!("response not to be shared; followers run on their own");
    let one_at_a_time = config.unshared == Unshared::OneAfterAnother;
    Either::Right(std::future::ready(Flown::unshared(response, one_at_a_time)))
}

/// What a flight that ran shares: its response, and whom it answers.
fn fresh<K, I, St, B>(engine: &Engine<K, I, St>, flown: Flown<B>, ask: &Ask) -> Done<B> {
    let (answers, by_authorization) = answered(engine, &flown, ask);
    Done::Fresh {
        flown,
        answers,
        by_authorization,
    }
}

/// Whom a flight's response answers, and whether only callers with the leader's
/// `Authorization`. Not shared with anyone: the leader's alone.
fn answered<K, I, St, B>(
    engine: &Engine<K, I, St>,
    flown: &Flown<B>,
    ask: &Ask,
) -> (Answers, bool) {
    match flown {
        Flown::Buffered(buffered) => {
            let headers = &buffered.parts.headers;
            let by_authorization = engine.by_authorization(headers, ask);
            (answers_of(ask, headers, by_authorization), by_authorization)
        }
        _ => (Answers::Leader, false),
    }
}

/// The run of a flight with a store: calls the inner service (under the lease, if the
/// flight holds one), buffers the response to share it, and keeps it before the flight
/// completes. Not an `async fn`, which would hold the request twice (see `serve`).
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn holds its arguments twice"
)]
pub(super) fn run_and_keep<S, K, I, St, ReqB, ResB>(
    inner: S,
    engine: Arc<Engine<K, I, St>>,
    mut req: InnerRequest<ReqB>,
    store_key: StoreKey,
    lease: Option<LeaseGuard>,
    ask: Ask,
) -> impl Future<Output = FlightResult<ResB, S::Error>> + Send + 'static
where
    S: InnerService<ReqB, ResB>,
    K: Send + Sync + 'static,
    I: Send + Sync + 'static,
    St: Store,
    ReqB: Send + 'static,
    ResB: SharedBody,
{
    async move {
        let (config, metrics) = (&engine.config, &engine.metrics);
        metrics.flight_started();
        tracing::debug!("flight started");
        let _in_flight = metrics.in_flight();
        let mut lease = lease;
        if let Some(guard) = lease.as_mut() {
            if let Some(fence) = guard.fence() {
                req.extensions_mut().insert(fence);
            }
            req.extensions_mut().extend(guard.take_extensions());
        }
        let atomic = lease.as_ref().is_some_and(LeaseGuard::is_atomic);
        // What a stage keeps is filed under the request's URI (a cache's purges find it so).
        let target = engine.stage.as_ref().map(|_| req.uri().clone());
        let flown = match (inner.oneshot(req).await, &engine.stage) {
            (Ok(response), Some(stage)) if response.status() == http::StatusCode::NOT_MODIFIED => {
                // The stage sent validators of what it keeps (a cache revalidating a stale
                // entry): the `304` freshens that entry, which is then the flight's
                // response, kept again and shared as any other. A `304` for something else
                // is a `502`: the callers never asked a conditional question.
                let (parts, _) = response.into_parts();
                let freshen = stage.freshen(
                    &engine.store,
                    &store_key,
                    ask.fingerprint(),
                    ask.headers(),
                    &parts,
                );
                let freshened = Box::pin(freshen)
                    .await
                    .unwrap_or_else(crate::http::problem::unmatched_not_modified);
                Flown::Buffered(Arc::new(Buffered::whole(freshened)))
            }
            (Ok(response), _) => shared(response, config, metrics).await,
            (Err(error), _) => {
                let kept = keep_ran::<_, _, _, ResB>(
                    &engine,
                    store_key,
                    lease,
                    None,
                    ask.headers(),
                    target.as_ref(),
                );
                Box::pin(kept).await;
                tracing::debug!(ok = false, "flight completed");
                return Err(Arc::new(error));
            }
        };
        let (answers, by_authorization) = answered(&engine, &flown, &ask);
        // Kept before the lease is released and before the flight completes, so that a
        // duplicate, here or on another instance, either waits for this flight or finds the
        // response kept.
        let kept = Box::pin(keep_ran(
            &engine,
            store_key.clone(),
            lease,
            Some((&flown, answers.fingerprint(&ask))),
            ask.headers(),
            target.as_ref(),
        ))
        .await;
        let settled = match kept {
            Kept::Done => None,
            Kept::Superseded(found) => {
                let settling = settle(&engine, store_key, found, &flown, answers, &ask, atomic);
                Box::pin(settling).await
            }
            Kept::Failed => unkept(config),
            Kept::Discarded => Some(Done::NotCommitted),
        };
        if let Some(done) = settled {
            tracing::debug!(ok = true, "flight completed with another run's answer");
            return Ok(done);
        }
        tracing::debug!(ok = true, "flight completed");
        Ok(Done::Fresh {
            flown,
            answers,
            by_authorization,
        })
    }
}

/// What became of a flight's response when the flight kept it.
pub(super) enum Kept {
    /// Kept, or there was nothing to keep (the lease, if any, released).
    Done,
    /// A later lease was taken on the key while this flight ran (its own lapsed): the
    /// response was not kept, and the key's answer is what that lease keeps (`None`: not
    /// yet).
    Superseded(Option<Arc<StoredResponse>>),
    /// A response to keep could not be kept: the store failed, for as long as the lease
    /// allowed retrying.
    Failed,
    /// Nothing was kept, and the run's writes were rolled back with it (atomic mode): the
    /// run must not be answered as done.
    Discarded,
}

/// Keeps a flight's response (`None`: its service failed) by the rules of the layer's
/// stage, or the engine's own, and releases the lease, if the flight holds one. A stage
/// (the HTTP cache) answers every caller with the flight's own response whatever became
/// of it: [`Kept::Done`].
pub(super) async fn keep_ran<K, I, St: Store, B>(
    engine: &Engine<K, I, St>,
    key: StoreKey,
    lease: Option<LeaseGuard>,
    flown: Option<(&Flown<B>, Option<Fingerprint>)>,
    asked: &HeaderMap,
    target: Option<&http::Uri>,
) -> Kept {
    let (Some(stage), Some(target)) = (&engine.stage, target) else {
        return keep(engine, key, lease, flown).await;
    };
    let ran = flown.map(|(flown, answers)| match flown {
        Flown::Buffered(buffered) => Ran::Buffered(buffered, answers),
        Flown::Unshared { .. } => Ran::Unshared,
        Flown::TooLarge(_) => Ran::TooLarge,
    });
    let kept = stage.keep(&key, ran, asked);
    match store_and_release(engine, key.clone(), lease, kept.clone()).await {
        Ok(Completion::Kept) => {
            if let Some(kept) = &kept {
                // Boxed already: a stage is a trait object.
                stage
                    .kept(&engine.store, &key, kept, target, &engine.metrics)
                    .await;
            }
        }
        // A later refresh holds the key: what it keeps is newer than this response. (The
        // cache takes no atomic leases: nothing is discarded.)
        Ok(Completion::Superseded(_) | Completion::Discarded) => {}
        Err(error) => {
            engine.metrics.store_error();
            tracing::warn!(%error, "keeping a response failed; a retry will run again");
        }
    }
    Kept::Done
}

/// The answer of a flight whose lease was taken over while it ran, so that its response
/// was not kept: the response the later lease kept (a replay, or `422` if it answers
/// another request), once there is one; `None` to answer the flight's own response.
///
/// While the later lease runs, the flight waits for it as any other instance would. Should
/// it end without keeping anything (its run failed), this flight takes the lease again and
/// keeps its own response, which its callers then get: either way, every caller and retry
/// of the key gets the one response that is kept. In atomic mode the flight's writes were
/// rolled back with its response: it has nothing to keep, and answers that nothing was
/// done.
async fn settle<K, I, St: Store, B>(
    engine: &Engine<K, I, St>,
    key: StoreKey,
    mut found: Option<Arc<StoredResponse>>,
    flown: &Flown<B>,
    answers: Answers,
    ask: &Ask,
    atomic: bool,
) -> Option<Done<B>> {
    // Each round waits for another instance's lease: a handful is already unlikely.
    const ROUNDS: usize = 8;
    engine.metrics.keep_superseded();
    tracing::warn!(
        "this instance's lease lapsed while its request ran (a stall, or the store out of \
         reach), and another instance took the key over: answering with that run's \
         response, not this one's"
    );
    let keeps = Some((flown, answers.fingerprint(ask)));
    for _ in 0..ROUNDS {
        if let Some(stored) = found {
            return Some(Done::Stored(stored));
        }
        // Nothing kept yet. A response that is not to be kept (a server error, say) is no
        // answer to wait for: the caller gets it, as with any run; but not in atomic mode,
        // where the run's writes were rolled back with it.
        let ttl = engine.config.replay.unwrap_or(engine.config.handover);
        if !atomic {
            to_keep(ttl, flown, answers.fingerprint(ask))?;
        }
        let fingerprint = ask.fingerprint();
        let lease = match take_lease(engine, &key, fingerprint, ask.headers()).await {
            // Released on drop: the rolled-back run is not kept under a new lease.
            Ok(Some(_)) | Ok(None) if atomic => return Some(Done::NotCommitted),
            Ok(Some(lease)) => lease,
            Ok(None) => return None,
            Err(done) => return Some(done),
        };
        found = match keep(engine, key.clone(), Some(lease), keeps).await {
            Kept::Done => return None,
            Kept::Superseded(found) => found,
            Kept::Failed => return unkept(&engine.config),
            Kept::Discarded => return Some(Done::NotCommitted),
        };
    }
    unkept(&engine.config)
}

/// The answer of a flight whose response could not be kept: under `FailClosed`, a `503`
/// that says so (a `2xx` no retry would see again breaks the promise of one answer per
/// key); else the response itself (`None`), as failing open does.
fn unkept<B>(config: &Config) -> Option<Done<B>> {
    (config.on_store_error == OnStoreError::FailClosed).then_some(Done::Unkept)
}

/// Takes the key's lease (or finds its response), waiting while another instance holds it.
/// `Ok` to run (holding the lease if the store has leases), `Err` to answer without running.
pub(super) async fn take_lease<K, I, St: Store, B>(
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
            Some(stage) => (stage.lease(store, key, fingerprint, asked, waited, metrics)).await,
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
                    if let Some(span) = own_span(FLIGHT_SPAN) {
                        span.record("coalesce.elsewhere", true);
                    }
                }
                // A release message may carry the response the release kept (not for a
                // stage, which takes leases of its own to refresh what is kept).
                match wait_for_release(engine, key, started).await? {
                    Some(stored) => stored,
                    None => continue,
                }
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

/// Waits for the instance that holds `key`'s lease to release it, within what is left of
/// the follower timeout since `started`; answers the response the release kept if its
/// message carried it (without a stage).
async fn wait_for_release<K, I, St: Store, B>(
    engine: &Engine<K, I, St>,
    key: &StoreKey,
    started: std::time::Instant,
) -> Result<Option<Arc<StoredResponse>>, Done<B>> {
    let released = async {
        match engine.stage {
            Some(_) => {
                engine.store.released(key).await;
                None
            }
            None => engine.store.released_response(key).await,
        }
    };
    let Some(timeout) = engine.config.follower_timeout else {
        return Ok(released.await);
    };
    let left = timeout.saturating_sub(started.elapsed());
    let answer = match left.is_zero() {
        true => None,
        false => tokio::time::timeout(left, released).await.ok(),
    };
    answer.ok_or_else(|| {
        engine.metrics.follower_timed_out();
        Done::GaveUp
    })
}

pub(super) fn store_failed<K, I, St, B>(
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
pub(super) async fn keep<K, I, St: Store, B>(
    engine: &Engine<K, I, St>,
    key: StoreKey,
    lease: Option<LeaseGuard>,
    flown: Option<(&Flown<B>, Option<Fingerprint>)>,
) -> Kept {
    let config = &engine.config;
    let ttl = config
        .replay
        .or_else(|| lease.is_some().then_some(config.handover));
    let stored = ttl.and_then(|ttl| {
        let (flown, answers) = flown?;
        to_keep(ttl, flown, answers)
    });
    let keeping = stored.is_some();
    match store_and_release(engine, key, lease, stored).await {
        Ok(Completion::Kept) => Kept::Done,
        Ok(Completion::Superseded(found)) => Kept::Superseded(found),
        // A run that failed, or answered a server error, is rolled back as it should be
        // (and answered as it is); any other was meant to be done.
        Ok(Completion::Discarded) => match flown.and_then(|(flown, _)| flown.status()) {
            Some(status) if !status.is_server_error() => Kept::Discarded,
            _ => Kept::Done,
        },
        Err(error) => {
            engine.metrics.store_error();
            if !keeping {
                tracing::warn!(%error, "releasing a lease failed; it will expire");
                return Kept::Done;
            }
            let outcome = match config.on_store_error {
                OnStoreError::FailClosed => "answering 503",
                _ => "answering all the same; a retry will run again",
            };
            tracing::warn!(%error, "keeping a response failed; {outcome}");
            Kept::Failed
        }
    }
}

/// What a flight keeps of its response for `ttl`, if it is one to keep.
fn to_keep<B>(
    ttl: Duration,
    flown: &Flown<B>,
    answers: Option<Fingerprint>,
) -> Option<(Arc<StoredResponse>, Duration)> {
    let Flown::Buffered(buffered) = flown else {
        return None;
    };
    Some((Arc::new(storable(buffered, answers?)?), ttl))
}

/// Stores `stored` under `key` for its TTL, if there is one, and releases the lease, if one
/// is held: one step for a store with leases.
pub(crate) async fn store_and_release<K, I, St: Store>(
    engine: &Engine<K, I, St>,
    key: StoreKey,
    lease: Option<LeaseGuard>,
    stored: Option<(Arc<StoredResponse>, Duration)>,
) -> Result<Completion, BoxError> {
    match (lease, stored) {
        (Some(lease), stored) => lease.complete(stored).await,
        (None, Some((stored, ttl))) => engine
            .store
            .put(key, stored, ttl)
            .await
            .map(|()| Completion::Kept),
        (None, None) => Ok(Completion::Kept),
    }
}

/// A completed response as the store keeps it, under the fingerprint of the requests it
/// answers, unless the rules say not to keep it: server errors (so that a retry runs
/// again), bodies that ended in an error or with trailers, and (by the caller) `Vary: *`.
/// Bodies over the limit or not shared are not `Buffered`: not kept either.
pub(crate) fn storable(buffered: &Buffered, fingerprint: Fingerprint) -> Option<StoredResponse> {
    if buffered.parts.status.is_server_error() {
        return None;
    }
    stored_copy(buffered, fingerprint)
}

/// A completed response as the store keeps it, whatever its status (a cache keeps a server
/// error that states its freshness); not a body that ended in an error or with trailers.
pub(crate) fn stored_copy(buffered: &Buffered, fingerprint: Fingerprint) -> Option<StoredResponse> {
    let parts = &buffered.parts;
    if buffered.end.is_some() {
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
