//! Step 3, run: the leader's flight. Look the key up in the store and take its lease when
//! there is a store, call the inner service, buffer the response, keep it, release the lease.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use http::Response;
use tower::ServiceExt;
use tracing::Instrument;

use super::*;
use crate::BoxError;
use crate::http::flown::{self, Buffered, Flown};
use crate::http::policy::{OnDuplicate, OnMismatch, OnStoreError, Unshared};
use crate::http::stage::Ran;
use crate::store::{Fingerprint, Store, StoreKey, StoredResponse};
use crate::store::{Lease, LeaseGuard};

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
) -> impl Future<Output = FlightResult<ResB, S::Error>> + Send + 'static
where
    S: InnerService<ReqB, ResB>,
    K: Send + Sync + 'static,
    I: Send + Sync + 'static,
    St: Store,
    ReqB: Send + 'static,
    ResB: SharedBody,
{
    use futures::future::Either;
    let span = tracing::debug_span!("coalesce_flight", key = key_hash.map(|h| h.0));
    // Without a store, the flight is the run itself. With one, the store's steps are in a
    // box of their own: the flight's work is moved whole into the flight's box, and a
    // future holds the largest of the futures it awaits (2.6 KB before, mostly the store's
    // steps, for flights that have no store).
    let work = match store_key {
        None => Either::Left(run_and_keep(inner, engine, req, None, None, ask)),
        Some(key) => Either::Right(Box::pin(async move {
            let lease = match take_lease(&engine, &key, ask.fingerprint(), ask.headers()).await {
                Ok(lease) => lease,
                Err(done) => return Ok(done),
            };
            let run = run_and_keep(inner, engine, req, Some(key), lease, ask);
            run.await
        })),
    };
    work.instrument(span)
}

/// The run of a flight: calls the inner service (under the lease, if the flight holds
/// one), buffers the response to share it, and keeps it (with a store) before the flight
/// completes. Not an `async fn`, which would hold the request twice (see `serve`).
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn holds its arguments twice"
)]
pub(super) fn run_and_keep<S, K, I, St, ReqB, ResB>(
    inner: S,
    engine: Arc<Engine<K, I, St>>,
    mut req: InnerRequest<ReqB>,
    store_key: Option<StoreKey>,
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
        if let Some(fence) = lease.as_ref().and_then(LeaseGuard::fence) {
            req.extensions_mut().insert(fence);
        }
        // What a stage keeps is filed under the request's URI (a cache's purges find it so).
        let target = engine.stage.as_ref().map(|_| req.uri().clone());
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
                    let kept = keep_ran::<_, _, _, ResB>(
                        &engine,
                        key,
                        lease,
                        None,
                        ask.headers(),
                        target.as_ref(),
                    );
                    Box::pin(kept).await;
                }
                tracing::debug!(ok = false, "flight completed");
                return Err(Arc::new(error));
            }
        };
        // Whom the response answers. Not shared with anyone: the leader's alone.
        let (answers, by_authorization) = match &flown {
            Flown::Buffered(buffered) => {
                let headers = &buffered.parts.headers;
                let by_authorization = engine.by_authorization(headers, ask.headers());
                let answers = answers_of(&ask, headers, ask.headers(), by_authorization);
                (answers, by_authorization)
            }
            _ => (Answers::Leader, false),
        };
        // Kept before the lease is released and before the flight completes, so that a
        // duplicate, here or on another instance, either waits for this flight or finds the
        // response kept.
        if let Some(key) = store_key {
            let flown = Some((&flown, answers.fingerprint(&ask)));
            Box::pin(keep_ran(
                &engine,
                key,
                lease,
                flown,
                ask.headers(),
                target.as_ref(),
            ))
            .await;
        }
        tracing::debug!(ok = true, "flight completed");
        Ok(Done::Fresh {
            flown,
            answers,
            by_authorization,
        })
    }
}

/// Keeps a flight's response (`None`: its service failed) by the rules of the layer's
/// stage, or the engine's own, and releases the lease, if the flight holds one.
pub(super) async fn keep_ran<K, I, St: Store, B>(
    engine: &Engine<K, I, St>,
    key: StoreKey,
    lease: Option<LeaseGuard>,
    flown: Option<(&Flown<B>, Option<Fingerprint>)>,
    asked: &HeaderMap,
    target: Option<&http::Uri>,
) {
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
        Ok(()) => {
            if let Some(kept) = &kept {
                // Boxed already: a stage is a trait object.
                stage
                    .kept(&engine.store, &key, kept, target, &engine.metrics)
                    .await;
            }
        }
        Err(error) => {
            engine.metrics.store_error();
            tracing::warn!(%error, "keeping a response failed; a retry will run again");
        }
    }
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
                }
                wait_for_release(engine, key, started).await?;
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

/// Waits for the instance that holds `key`'s lease to release it, within what is left of
/// the follower timeout since `started`.
async fn wait_for_release<K, I, St: Store, B>(
    engine: &Engine<K, I, St>,
    key: &StoreKey,
    started: std::time::Instant,
) -> Result<(), Done<B>> {
    let released = engine.store.released(key);
    let Some(timeout) = engine.config.follower_timeout else {
        released.await;
        return Ok(());
    };
    let left = timeout.saturating_sub(started.elapsed());
    if left.is_zero() || tokio::time::timeout(left, released).await.is_err() {
        engine.metrics.follower_timed_out();
        return Err(Done::GaveUp);
    }
    Ok(())
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
pub(crate) async fn store_and_release<K, I, St: Store>(
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
