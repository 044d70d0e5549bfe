//! Step 4, answer: every caller of a flight gets its copy, a replay, or the layer's own
//! problem response; a caller whose answer the response is not waits for a run of its own
//! variant.

use std::sync::Arc;

use http::HeaderMap;
use http::Response;
use http::header::{AUTHORIZATION, HeaderName, HeaderValue, VARY};

use super::*;
use crate::http::body::ResponseBody;
use crate::http::error::ShareError;
use crate::http::flown::Flown;
use crate::http::metrics::Metrics;
use crate::http::policy::OnMismatch;
use crate::http::stage::{Serves, StandsIn};
use crate::http::{Role, problem};
use crate::single_flight::Outcome;
use crate::store::{Fingerprint, StoredResponse};

/// A follower that runs on its own, after its turn (the semaphore), if followers take
/// turns.
pub(super) type OwnTurn = Option<Arc<tokio::sync::Semaphore>>;

/// What a caller of a flight gets from its outcome; `None` when the response varies on a
/// header this caller sent otherwise and it is to wait for a run of its own variant; `Err`
/// when the response is not to be shared and it is to run on its own. Not `async`: the
/// call of its own is awaited apart, boxed, off the common path.
pub(super) fn answer<K, I, St, ReqB, ResB, E: ShareError>(
    outcome: Outcome<FlightResult<ResB, E>>,
    engine: &Engine<K, I, St>,
    request: Option<&InnerRequest<ReqB>>,
    ask: &Ask,
) -> Result<Option<Answer<ResB, E>>, OwnTurn> {
    let config = &engine.config;
    let leader = outcome.is_leader();
    let role = if leader { Role::Leader } else { Role::Follower };
    // What this caller asked: its own request's headers, or the leader's copy of them,
    // which a plain flight reads only when its response varies (see `KeptHeaders`).
    let asked = || match request {
        Some(request) => request.headers(),
        None => ask.headers(),
    };
    let value = outcome.into_value();
    // The one place where a stage (a cache) says which followers a flight's response may
    // answer; the others run on their own.
    let stands_in = request.is_some_and(|r| r.extensions().get::<StandsIn>().is_some());
    match stage_serves(engine, &value, asked, stands_in) {
        _ if leader => {}
        Serves::Yes => {}
        Serves::Another => {
            let response = match &value {
                Ok(Done::Fresh {
                    flown: Flown::Buffered(buffered),
                    ..
                }) => &buffered.parts.headers,
                Ok(Done::Stored(stored)) => stored.headers(),
                _ => unreachable!("a stage judges responses only"),
            };
            return Ok(varied(engine, response));
        }
        Serves::Own => {
            engine.metrics.response_not_shared();
            return Err(None);
        }
    }
    let mut response = match value {
        Err(error) => return Ok(Some(Err(E::share(&error)))),
        Ok(Done::Stored(stored)) => {
            return Ok(Some(Ok(from_store(
                engine,
                &stored,
                ask.fingerprint(),
                asked(),
            ))));
        }
        Ok(Done::InProgress) => return Ok(Some(Ok(problem::in_progress()))),
        Ok(Done::GaveUp) => return Ok(Some(Ok(problem::gave_up_waiting()))),
        Ok(Done::Unavailable) => return Ok(Some(Ok(problem::store_unavailable()))),
        Ok(Done::Unkept) => return Ok(Some(Ok(problem::not_kept()))),
        Ok(Done::NotCommitted) => return Ok(Some(Ok(problem::not_committed()))),
        Ok(Done::Fresh {
            flown: Flown::Buffered(buffered),
            answers,
            by_authorization,
        }) => {
            let headers = &buffered.parts.headers;
            // A follower is admitted to a flight only if it asks what the leader asked.
            let own = leader
                || match answers {
                    Answers::Admitted => true,
                    Answers::Varied(answers) => {
                        let own =
                            answered_by(ask.fingerprint(), headers, asked(), by_authorization);
                        own == Some(answers)
                    }
                    Answers::Leader => false,
                };
            if !own {
                return Ok(varied(engine, headers));
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
        }) => return Err(turn),
    };
    tag(&mut response, role, config.role_header);
    Ok(Some(Ok(response)))
}

/// A response kept in the store: replayed if it answers this request (the same fingerprint
/// and varied headers), else a `422` naming the varied headers.
fn from_store<K, I, St, B>(
    engine: &Engine<K, I, St>,
    stored: &StoredResponse,
    fingerprint: Fingerprint,
    asked: &HeaderMap,
) -> Response<ResponseBody<B>> {
    if !answers(stored, fingerprint, asked) {
        engine.metrics.mismatch_rejected();
        return problem::key_reused(vary_names(stored.headers()).as_deref());
    }
    if engine.replays() {
        return replay(stored, &engine.metrics);
    }
    // A cache entry another instance kept while this one waited for its lease: a copy of
    // that instance's run, not a replay.
    let mut response = stored_response(stored);
    tag(&mut response, Role::Follower, engine.config.role_header);
    response
}

/// A follower whose flight's response is not its answer: it varies on a header this
/// caller sent otherwise (or, in a cache, was made for another `Authorization`). Under
/// `OnMismatch::Reject` that is another request for the key, refused with a `422` naming
/// the headers, never a second run; else the caller waits for a run of its own variant
/// (`None`), one variant at a time.
pub(super) fn varied<K, I, St, B, E>(
    engine: &Engine<K, I, St>,
    response: &HeaderMap,
) -> Option<Answer<B, E>> {
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
pub(super) fn vary_names(response: &HeaderMap) -> Option<String> {
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
pub(super) fn answered_by(
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

/// Which callers a flight's response answers: those admitted to it, unless it varies on
/// headers (or on `Authorization`, `by_authorization`); then, only those whose fingerprint
/// [`answered_by`] it is the leader's. The digest of the request is made only then.
pub(super) fn answers_of(ask: &Ask, response: &HeaderMap, by_authorization: bool) -> Answers {
    if !by_authorization && !response.contains_key(VARY) {
        return Answers::Admitted;
    }
    match answered_by(ask.fingerprint(), response, ask.headers(), by_authorization) {
        Some(answers) => Answers::Varied(answers),
        None => Answers::Leader,
    }
}

/// Whether a stored response answers a request with this fingerprint and these headers.
pub(crate) fn answers(
    stored: &StoredResponse,
    fingerprint: Fingerprint,
    asked: &HeaderMap,
) -> bool {
    fingerprint.answered_by(stored.headers(), asked) == Some(stored.fingerprint())
}

/// Whether the layer's stage lets a flight's response answer a follower that asked
/// `follower` (always, without a stage, where they are not read, or for what is not a response: an error of the
/// service is every caller's, as it is without a stage).
fn stage_serves<'h, K, I, St, B, E>(
    engine: &Engine<K, I, St>,
    value: &FlightResult<B, E>,
    follower: impl FnOnce() -> &'h HeaderMap,
    stands_in: bool,
) -> Serves {
    let Some(stage) = &engine.stage else {
        return Serves::Yes;
    };
    let follower = follower();
    match value {
        Ok(Done::Fresh {
            flown: Flown::Buffered(buffered),
            by_authorization,
            ..
        }) => {
            let parts = &buffered.parts;
            // A failure reaches a follower the stage answers instead (a stale entry).
            if stands_in && parts.status.is_server_error() {
                return Serves::Yes;
            }
            // Made for an `Authorization`, it answers only the followers that sent the same
            // (the engine checks that next): the same credentials, the same user; judged
            // for the rest as for anyone.
            let anyone = HeaderMap::new();
            let asked = if *by_authorization { &anyone } else { follower };
            stage.serves(parts.status, &parts.headers, asked)
        }
        Ok(Done::Stored(stored)) => stage.serves(stored.status(), stored.headers(), follower),
        _ => Serves::Yes,
    }
}

/// A stored response as a response: its status, version, headers and body (not copied).
pub(crate) fn stored_response<B>(stored: &StoredResponse) -> Response<ResponseBody<B>> {
    let mut response = Response::new(ResponseBody::buffered(stored.body().clone(), None));
    *response.status_mut() = stored.status();
    *response.version_mut() = stored.version();
    *response.headers_mut() = stored.headers().clone();
    response
}

pub(super) const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

pub(super) fn replay<B>(stored: &StoredResponse, metrics: &Metrics) -> Response<ResponseBody<B>> {
    metrics.replayed();
    let mut response = stored_response(stored);
    response
        .headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    response
}

pub(super) const ROLE_HEADER: HeaderName = HeaderName::from_static("coalesce-role");

pub(super) fn tag<B>(response: &mut Response<B>, role: Role, role_header: bool) {
    response.extensions_mut().insert(role);
    if role_header {
        response
            .headers_mut()
            .insert(ROLE_HEADER, role.header_value());
    }
}
