//! Step 2, join or lead: decide, before joining, whether a caller may wait on the flight
//! running for its key; a different request waits for that flight to end, then tries again.

use std::panic;
use std::sync::Arc;

use http::HeaderMap;
use http::Response;
use tokio::time::Instant;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use super::*;
use crate::http::body::ResponseBody;
use crate::http::metrics::Metrics;
use crate::http::policy::{Fallback, OnDuplicate, OnMismatch};
use crate::http::store::{Fingerprint, IdempotencyStore, StoreKey};
use crate::http::{Role, problem};

/// Why a caller was not admitted to the running flight of its key.
#[derive(Debug, Clone, Copy)]
pub(super) enum Refusal {
    /// Another request's flight, under `OnMismatch::Reject`.
    Mismatch,
    Conflict,
    PassThrough,
    /// The follower cap.
    Shed,
}

pub(super) fn admission(config: &Config, mismatched: bool, followers: usize) -> Option<Refusal> {
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
pub(super) async fn lead<F>(run: F, detach: bool) -> F::Output
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

pub(super) async fn refused<S, K, I, St, ReqB, ResB>(
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
pub(super) async fn fall_back<S, ReqB, ResB>(
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
pub(super) struct Watch {
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
