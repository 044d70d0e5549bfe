//! Step 2, join or lead: decide, before joining, whether a caller may wait on the flight
//! running for its key; a different request waits for that flight to end, then tries again.

use std::panic;
use std::pin::Pin;
use std::sync::Arc;

use http::Response;
use tokio::time::Instant;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use super::*;
use crate::http::body::ResponseBody;
use crate::http::metrics::Metrics;
use crate::http::policy::{Fallback, OnDuplicate, OnMismatch};
use crate::http::{Role, problem};
use crate::single_flight::Outcome;
use crate::store::{Store, StoreKey};

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
            // Where responses are kept, the key's answer is the one kept, not whichever
            // request happens to run now: that may be a reuse of the key about to be refused
            // itself, and the key's own request must not be refused for it. So the caller
            // waits for the running flight to end, and then replays what is kept for its
            // key, or gets its `422` if that is another request's answer.
            OnMismatch::Reject if config.replay.is_none() => Some(Refusal::Mismatch),
            _ => capped(),
        };
    }
    match config.on_duplicate {
        OnDuplicate::Share => capped(),
        OnDuplicate::Conflict => Some(Refusal::Conflict),
        OnDuplicate::PassThrough => Some(Refusal::PassThrough),
    }
}

/// Leads the flight of the request's key, or joins it, and answers.
///
/// Not an `async fn`: one copies its arguments into its body's locals, and the future kept
/// both, so the request was held twice in every keyed request's future (which is moved
/// into its box whole). Here the caller is made first and the future owns it once.
pub(crate) fn join_or_lead<S, K, I, St, ReqB, ResB>(
    inner: S,
    engine: Arc<Engine<K, I, St>>,
    flight_key: FlightKey<I::Key, K::Key>,
    store_key: Option<StoreKey>,
    key_hash: Option<KeyHash>,
    request: InnerRequest<ReqB>,
) -> impl Future<Output = Answer<ResB, S::Error>> + Send + 'static
where
    S: InnerService<ReqB, ResB>,
    K: HeadKey,
    I: HeadKey,
    St: Store,
    ReqB: Send + 'static,
    ResB: SharedBody,
{
    let mut caller = Caller {
        ask: flight_key.ask.clone(),
        flight_key: Some(flight_key),
        request: Some(request),
        inner: Some(inner),
        store_key,
        key_hash,
    };
    async move {
        let (config, metrics) = (&engine.config, &engine.metrics);
        let group = engine
            .flights
            .get::<FlightKey<I::Key, K::Key>, FlightResult<ResB, S::Error>>();
        // One deadline for the whole wait, turns of other requests included.
        let deadline = config
            .follower_timeout
            .map(|timeout| Instant::now() + timeout);
        // A follower's wait, turns of other requests included, for the wait histogram.
        let arrived = metrics.wait_started();
        let mut watch = None;
        loop {
            // `leader` is read inside `attempt`: a `run` borrowed here would keep its room
            // in this future beside the wait it moves into.
            let (run, leader, mismatched) = match caller.attempt(&engine, &group) {
                Ok(attempt) => attempt,
                // Boxed: off the common path (see `serve`).
                Err(refusal) => return Box::pin(caller.refused(&engine, refusal)).await,
            };
            caller.entered(metrics, leader, mismatched);
            let watch = watch.get_or_insert_with(|| Watch {
                metrics,
                key_hash,
                done: false,
            });
            let Some(outcome) = wait(run, leader, deadline, config.finish_abandoned).await else {
                // Dropping the wait left the flight, which goes on for the others.
                watch.done = true;
                metrics.follower_waited(arrived);
                metrics.follower_timed_out();
                tracing::debug!(key = key_hash.map(|h| h.0), "follower stopped waiting");
                let (inner, request) = (caller.service(), caller.request.take());
                return Box::pin(fall_back(config, inner, request)).await;
            };
            if mismatched {
                // That request's turn is over; this one's may have come.
                continue;
            }
            watch.done = true;
            let answer = match caller.answer(&engine, outcome) {
                Ok(answer) => answer,
                // Boxed: off the common path (see `serve`).
                Err(turn) => {
                    let has_stage = engine.stage.is_some();
                    Some(Box::pin(caller.run_own(config, turn, has_stage)).await)
                }
            };
            match answer {
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
}

/// One caller's way through the flights of its key: its attempts (another after another
/// request's turn, or after a response that varies on a header it sent otherwise), and
/// what it keeps between them. The engine is lent to each step rather than kept here,
/// so that the wait can borrow its metrics while the caller changes.
struct Caller<S, K: HeadKey, I: HeadKey, ReqB> {
    /// Until this caller leads a flight: the service goes into it with the request.
    inner: Option<S>,
    store_key: Option<StoreKey>,
    key_hash: Option<KeyHash>,
    ask: Ask,
    /// Until this caller leads a flight (the request goes into it) or runs on its own.
    request: Option<InnerRequest<ReqB>>,
    /// The key of the next attempt. It goes into the registry; a follower takes a copy of
    /// the registered key, for another attempt.
    flight_key: Option<FlightKey<I::Key, K::Key>>,
}

type Flights<'g, K, I, ResB, E> = std::borrow::Cow<
    'g,
    crate::single_flight::Group<
        FlightKey<<I as MakeKey<Parts>>::Key, <K as MakeKey<Parts>>::Key>,
        FlightResult<ResB, E>,
    >,
>;

impl<S, K, I, ReqB> Caller<S, K, I, ReqB>
where
    K: HeadKey,
    I: HeadKey,
    ReqB: Send + 'static,
{
    /// Leads the key's flight, joins the running one, or is refused by the policies;
    /// whether the running flight is another request's (this caller then waits for its
    /// turn).
    fn attempt<St: Store, ResB>(
        &mut self,
        engine: &Arc<Engine<K, I, St>>,
        group: &Flights<'_, K, I, ResB, S::Error>,
    ) -> Attempt<K, I, ResB, S::Error>
    where
        S: InnerService<ReqB, ResB>,
        ResB: SharedBody,
    {
        let (mut refusal, mut mismatched) = (None, false);
        let (config, ask) = (&engine.config, &self.ask);
        let run = group.run_boxed_if(
            self.flight_key.take().expect("a key for every attempt"),
            || {
                let lead = "a caller leads at most one flight";
                let (req, inner) = (self.request.take().expect(lead), self.inner.take());
                ask.keep_headers(req.headers(), engine.reads_headers());
                // The flight's id is made only for what would see it (`Ask::flight`).
                if let Some(span) = own_span(REQUEST_SPAN) {
                    span.record("coalesce.flight_id", ask.flight());
                }
                let store_key = self.store_key.clone();
                fly(
                    inner.expect(lead),
                    engine.clone(),
                    req,
                    store_key,
                    ask.clone(),
                    self.key_hash,
                )
            },
            |running, followers| {
                mismatched = !running.ask.same(ask);
                refusal = admission(config, mismatched, followers);
                if refusal.is_none() {
                    if let Some(span) = own_span(REQUEST_SPAN) {
                        span.record("coalesce.waited_on", running.ask.flight());
                    }
                    // Equal to this caller's key but for what it asks.
                    self.flight_key = Some(running.asking(ask.clone()));
                }
                refusal.is_none()
            },
        );
        match run {
            Some(run) => {
                let leader = run.is_leader();
                Ok((run, leader, mismatched))
            }
            None => Err(refusal.expect("a caller is refused only by admission")),
        }
    }

    /// The service, for a call of this caller's own: it has one unless it led a flight.
    fn service(&mut self) -> S {
        self.inner
            .take()
            .expect("a caller that did not lead keeps its service")
    }

    /// Counts and logs how this caller entered a flight.
    fn entered(&self, metrics: &Metrics, leader: bool, mismatched: bool) {
        let key = self.key_hash.map(|h| h.0);
        if mismatched {
            metrics.mismatch_queued();
            tracing::debug!(key, "waiting for another request's turn");
        } else if !leader {
            metrics.caller_joined();
            tracing::debug!(key, "caller joined flight");
        }
    }

    async fn refused<St: Store, ResB>(
        &mut self,
        engine: &Engine<K, I, St>,
        refusal: Refusal,
    ) -> Answer<ResB, S::Error>
    where
        S: InnerService<ReqB, ResB>,
    {
        let (request, store_key) = (self.request.take(), self.store_key.take());
        let inner = self.service();
        refused(
            refusal,
            inner,
            engine,
            request,
            store_key,
            &self.ask,
            self.key_hash,
        )
        .await
    }

    /// This caller's answer from its flight's outcome; `None` to try again, `Err` to run
    /// on its own (see [`answer`]).
    fn answer<St, ResB>(
        &mut self,
        engine: &Engine<K, I, St>,
        outcome: Outcome<FlightResult<ResB, S::Error>>,
    ) -> Result<Option<Answer<ResB, S::Error>>, OwnTurn>
    where
        S: InnerService<ReqB, ResB>,
    {
        answer(outcome, engine, self.request.as_ref(), &self.ask)
    }

    /// A call of the inner service for this caller alone, once it has its turn, if
    /// followers of its flight take turns.
    async fn run_own<ResB>(
        &mut self,
        config: &Config,
        turn: OwnTurn,
        has_stage: bool,
    ) -> Answer<ResB, S::Error>
    where
        S: InnerService<ReqB, ResB>,
    {
        // Holds the turn until its own response is there.
        let _turn = match turn {
            Some(turn) => turn.acquire_owned().await.ok(),
            None => None,
        };
        let mut request = self.request.take();
        if let (Some(request), true) = (request.as_mut(), has_stage) {
            // A stage's flight carries only the validators the stage put on it to
            // revalidate what it keeps (the client's own were taken off): a follower that
            // runs on its own asks for the whole response, which is its answer.
            let headers = request.headers_mut();
            headers.remove(http::header::IF_NONE_MATCH);
            headers.remove(http::header::IF_MODIFIED_SINCE);
        }
        run_own(self.service(), request, config.role_header).await
    }
}

/// The flight a caller led or joined, whether it leads it and whether it runs another
/// request; or why the caller was refused.
type Attempt<K, I, ResB, E> = Result<(RunOf<K, I, ResB, E>, bool, bool), Refusal>;

type RunOf<K, I, ResB, E> = crate::single_flight::Run<
    FlightKey<<I as MakeKey<Parts>>::Key, <K as MakeKey<Parts>>::Key>,
    FlightResult<ResB, E>,
>;

/// A caller's wait for its flight's outcome: the leader's run (detached under
/// `finish_abandoned`), or a follower's wait, which ends with `None` at the deadline.
/// Combinators rather than an `async fn`, which would hold `run` twice.
fn wait<F>(
    run: F,
    leader: bool,
    deadline: Option<Instant>,
    detach: bool,
) -> impl Future<Output = Option<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    use futures::future::{Either, FutureExt};
    // The plain wait unboxed; a detached lead and a wait with a deadline (a timer beside
    // the run) boxed, so that every keyed request's future is not as large as theirs.
    let boxed = |wait: Pin<Box<dyn Future<Output = Option<F::Output>> + Send>>| Either::Right(wait);
    match deadline {
        _ if leader && detach => boxed(Box::pin(lead(run, true).map(Some))),
        None => Either::Left(run.map(Some)),
        _ if leader => Either::Left(run.map(Some)),
        Some(deadline) => boxed(Box::pin(
            tokio::time::timeout_at(deadline, run).map(Result::ok),
        )),
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
    ask: &Ask,
    key_hash: Option<KeyHash>,
) -> Answer<ResB, S::Error>
where
    S: Service<InnerRequest<ReqB>, Response = Response<ResB>>,
    St: Store,
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
            if let (Some(_), Some(key), Some(asked)) = (config.replay, &store_key, asked)
                && let Ok(Some(stored)) = engine.store.get(key).await
                && answers(&stored, ask.fingerprint(), asked)
            {
                return Ok(replay(&stored, metrics));
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
pub(super) struct Watch<'a> {
    metrics: &'a Metrics,
    key_hash: Option<KeyHash>,
    done: bool,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.caller_cancelled();
            tracing::debug!(key = self.key_hash.map(|h| h.0), "caller cancelled");
        }
    }
}
