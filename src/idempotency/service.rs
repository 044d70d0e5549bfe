use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use tower::{Service, ServiceExt};

use super::future::ResponseFuture;
use super::layer::Config;
use super::lease::{Lease, LeaseGuard};
use super::store::{Fingerprint, IdempotencyStore, StoreKey, StoredResponse};
use super::{IdempotencyLayer, OnStoreError};
use crate::BoxError;
use crate::coalesce::MakeKey;
use crate::http::body::ResponseBody;
use crate::http::error::ShareError;
use crate::http::flown::{self, Flown};
use crate::http::key::{is_valid_key, single_header};
use crate::http::scope::DefaultScope;
use crate::http::{Metrics, OnDuplicate, Role, problem};

const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Middleware that runs a request with an idempotency key once, and answers its duplicates
/// with the same response: coalesced while it runs, replayed from the store once it
/// completed.
///
/// The inner service receives `Request<Either<Full<Bytes>, ReqB>>`: the buffered body of a
/// keyed request, or the untouched body of a request without a key. axum routers and
/// handlers accept any body type.
///
/// See the [module docs](crate::idempotency) for the rules and an example.
pub struct Idempotency<S, I = DefaultScope, St = super::store::MemoryStore> {
    pub(crate) inner: S,
    pub(crate) layer: Arc<IdempotencyLayer<I, St>>,
}

impl<S: Clone, I, St> Clone for Idempotency<S, I, St> {
    fn clone(&self) -> Self {
        Idempotency {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S, I, St> Idempotency<S, I, St> {
    define_inner_service_accessors!();
}

/// What a flight shares: a response it produced, one it found stored after all, or why it
/// ran nothing.
enum Done<B> {
    Fresh {
        flown: Flown<B>,
        fingerprint: Fingerprint,
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
            Done::Fresh { flown, fingerprint } => Done::Fresh {
                flown: flown.clone(),
                fingerprint: *fingerprint,
            },
            Done::Stored(stored) => Done::Stored(stored.clone()),
            Done::InProgress => Done::InProgress,
            Done::GaveUp => Done::GaveUp,
            Done::Unavailable => Done::Unavailable,
        }
    }
}

type FlightResult<B, E> = Result<Done<B>, Arc<E>>;

impl<S, I, St, ReqB, ResB> Service<Request<ReqB>> for Idempotency<S, I, St>
where
    S: Service<Request<Either<Full<Bytes>, ReqB>>, Response = Response<ResB>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: ShareError,
    I: MakeKey<Parts> + Send + Sync + 'static,
    St: IdempotencyStore,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<Self::Response, S::Error>;

    #[inline]
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // As for `HttpCoalesce`: followers and replays never call the inner service.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        ResponseFuture::new(Box::pin(handle(
            self.inner.clone(),
            self.layer.clone(),
            req,
        )))
    }
}

async fn handle<S, I, St, ReqB, ResB>(
    inner: S,
    layer: Arc<IdempotencyLayer<I, St>>,
    req: Request<ReqB>,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<Either<Full<Bytes>, ReqB>>, Response = Response<ResB>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: ShareError,
    I: MakeKey<Parts> + Send + Sync + 'static,
    St: IdempotencyStore,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let config = &layer.config;
    let metrics = &layer.metrics;
    let (parts, body) = req.into_parts();

    let key = match single_header(&parts.headers, &config.header) {
        Some(value) if is_valid_key(value.as_bytes()) => value.clone(),
        Some(_) => {
            return Ok(bad_key(
                config,
                "is empty, longer than 255 bytes or not visible ASCII",
            ));
        }
        None if parts.headers.contains_key(&config.header) => {
            return Ok(bad_key(config, "was sent more than once"));
        }
        None if config.require_key => {
            metrics.key_missing();
            return Ok(bad_key(config, "is missing, and this route requires it"));
        }
        None => {
            let req = Request::from_parts(parts, Either::Right(body));
            let response = inner.oneshot(req).await?;
            return Ok(response.map(ResponseBody::inner));
        }
    };

    let bytes = match Limited::new(body, config.body_limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<LengthLimitError>() => {
            return Ok(problem::problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request body too large",
                "The body of a request with an idempotency key is read to fingerprint it, and \
                 this one is larger than the limit.",
            ));
        }
        Err(_) => {
            return Ok(problem::problem(
                StatusCode::BAD_REQUEST,
                "Request body unreadable",
                "The request body could not be read to the end.",
            ));
        }
    };
    let fingerprint = Fingerprint::of(&parts.method, parts.uri.path(), &bytes);
    let store_key = StoreKey::new(&layer.scope.make_key(&parts), key.as_bytes());

    let req = Request::from_parts(parts, Either::Left(Full::new(bytes)));
    let flight = fly(inner, layer.clone(), store_key.clone(), req, fingerprint);
    let run = layer
        .flights
        .get::<StoreKey, FlightResult<ResB, S::Error>>()
        .run(store_key.clone(), move || flight);
    if !run.is_leader() {
        if config.on_duplicate == OnDuplicate::Conflict {
            drop(run);
            // The flight may be only the lookup of a completed key (a concurrent retry):
            // replay rather than refuse.
            if let Ok(Some(stored)) = layer.store.get(&store_key).await {
                return Ok(replay(&stored, fingerprint, metrics));
            }
            metrics.duplicate_refused();
            return Ok(problem::in_progress());
        }
        // `waiters` counts this caller, and the leader while it waits.
        if config
            .max_followers
            .is_some_and(|max| run.waiters() > max + 1)
        {
            metrics.follower_shed();
            return Ok(problem::gave_up_waiting());
        }
        metrics.caller_joined();
    }
    let outcome = match config.follower_timeout.filter(|_| !run.is_leader()) {
        None => run.await,
        Some(timeout) => match tokio::time::timeout(timeout, run).await {
            Ok(outcome) => outcome,
            Err(_) => {
                // Dropping the wait left the flight, which goes on for the others.
                metrics.follower_timed_out();
                return Ok(problem::gave_up_waiting());
            }
        },
    };
    let role = if outcome.is_leader() {
        Role::Leader
    } else {
        Role::Follower
    };
    let mut response = match outcome.into_value() {
        Err(error) => return Err(S::Error::share(&error)),
        Ok(Done::Stored(stored)) => return Ok(replay(&stored, fingerprint, metrics)),
        Ok(Done::InProgress) => return Ok(problem::in_progress()),
        Ok(Done::GaveUp) => return Ok(problem::gave_up_waiting()),
        Ok(Done::Unavailable) => return Ok(problem::store_unavailable()),
        Ok(Done::Fresh {
            fingerprint: theirs,
            ..
        }) if theirs != fingerprint => {
            return Ok(key_reused());
        }
        Ok(Done::Fresh {
            flown: Flown::Buffered(buffered),
            ..
        }) => buffered.into_response(),
        // Idempotency flights share every response they can buffer.
        Ok(Done::Fresh {
            flown: Flown::TooLarge(slot) | Flown::Unshared { leader: slot, .. },
            ..
        }) => match role {
            Role::Leader => Flown::take_leader(&slot)
                .expect("the over-limit response is taken once, by the leader"),
            _ => problem::too_large_to_share(),
        },
    };
    response.extensions_mut().insert(role);
    Ok(response)
}

/// The flight of a key, once per process: the stored response if there is one, else a run
/// of the inner service under the key's lease, whose response is stored before the lease is
/// released.
async fn fly<S, I, St, ReqB, ResB>(
    inner: S,
    layer: Arc<IdempotencyLayer<I, St>>,
    key: StoreKey,
    req: Request<Either<Full<Bytes>, ReqB>>,
    fingerprint: Fingerprint,
) -> FlightResult<ResB, S::Error>
where
    S: Service<Request<Either<Full<Bytes>, ReqB>>, Response = Response<ResB>>,
    St: IdempotencyStore,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    let (store, config, metrics) = (&layer.store, &layer.config, &layer.metrics);
    let lease = match take_lease(&layer, &key).await {
        Ok(lease) => lease,
        Err(done) => return Ok(done),
    };
    metrics.flight_started();
    let outcome = match inner.oneshot(req).await {
        Ok(response) => Ok(flown::collect(response, config.body_limit, metrics).await),
        Err(error) => Err(Arc::new(error)),
    };
    // Stored before the lease is released and before the flight completes, so that a
    // duplicate, here or on another instance, either waits for this flight or finds the
    // response stored.
    let stored = outcome
        .as_ref()
        .ok()
        .and_then(|flown| storable(flown, fingerprint))
        .map(|stored| (Arc::new(stored), config.ttl));
    let kept = match (lease, stored) {
        (Some(lease), stored) => lease.complete(stored).await,
        (None, Some((stored, ttl))) => store.put(key, stored, ttl).await,
        (None, None) => Ok(()),
    };
    if let Err(error) = kept {
        metrics.store_error();
        tracing::warn!(%error, "storing an idempotent response failed; a retry will run again");
    }
    outcome.map(|flown| Done::Fresh { flown, fingerprint })
}

/// Takes the key's lease (or finds its response), waiting while another instance holds it.
/// `Ok` to run (holding the lease if the store has leases), `Err` to answer without running.
async fn take_lease<I, St: IdempotencyStore, B>(
    layer: &IdempotencyLayer<I, St>,
    key: &StoreKey,
) -> Result<Option<LeaseGuard>, Done<B>> {
    let (store, config, metrics) = (&layer.store, &layer.config, &layer.metrics);
    let started = Instant::now();
    let mut waited = false;
    loop {
        match store.lease(key).await {
            Ok(Lease::Held(guard)) => return Ok(Some(guard)),
            Ok(Lease::Stored(stored)) => return Err(Done::Stored(stored)),
            Ok(Lease::NotShared) => {
                return match store.get(key).await {
                    Ok(Some(stored)) => Err(Done::Stored(stored)),
                    Ok(None) => Ok(None),
                    Err(error) => store_failed(&error, "lookup", layer),
                };
            }
            Ok(Lease::HeldElsewhere) => {}
            Err(error) => return store_failed(&error, "lease", layer),
        }
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
    }
}

fn store_failed<I, St, B>(
    error: &BoxError,
    call: &'static str,
    layer: &IdempotencyLayer<I, St>,
) -> Result<Option<LeaseGuard>, Done<B>> {
    let (config, metrics) = (&layer.config, &layer.metrics);
    metrics.store_error();
    match config.on_store_error {
        OnStoreError::FailClosed => {
            tracing::warn!(%error, call, "idempotency store failed; answering 503");
            Err(Done::Unavailable)
        }
        _ => {
            tracing::warn!(%error, call, "idempotency store failed; running the request");
            Ok(None)
        }
    }
}

/// A completed response as the store keeps it, unless the rules say not to keep it:
/// server errors (so that a retry runs again), bodies over the limit, and bodies that
/// ended in an error or with trailers.
fn storable<B>(flown: &Flown<B>, fingerprint: Fingerprint) -> Option<StoredResponse> {
    let Flown::Buffered(buffered) = flown else {
        return None;
    };
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

fn replay<B>(
    stored: &StoredResponse,
    fingerprint: Fingerprint,
    metrics: &Metrics,
) -> Response<ResponseBody<B>> {
    if stored.fingerprint() != fingerprint {
        return key_reused();
    }
    metrics.replayed();
    let mut response = Response::new(ResponseBody::buffered(stored.body().clone(), None));
    *response.status_mut() = stored.status();
    *response.version_mut() = stored.version();
    *response.headers_mut() = stored.headers().clone();
    response
        .headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    response
}

fn key_reused<B>() -> Response<ResponseBody<B>> {
    problem::problem(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Idempotency key reused",
        "This idempotency key was already used for a request with another method, path or \
         body. Use a new key for a new request.",
    )
}

fn bad_key<B>(config: &Config, what: &str) -> Response<ResponseBody<B>> {
    let detail = format!("The {} header {what}.", config.header);
    problem::problem(
        StatusCode::BAD_REQUEST,
        "Idempotency key missing or malformed",
        &detail,
    )
}

impl<S: fmt::Debug, I, St> fmt::Debug for Idempotency<S, I, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}
