use std::any;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::OnceLock;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use tower::Service;
use tower::util::Oneshot;
use tracing::Instrument;

use super::body::ResponseBody;
use super::error::ShareError;
use super::flown::{self, Flown};
use super::future::{FlightKey, Own, ResponseFuture, Watch};
use super::layer::Config;
use super::metrics::Metrics;
use super::policy::{Fallback, OnDuplicate, Unshared};
use super::scope::DefaultScope;
use super::{HttpCoalesceLayer, problem};
use crate::BoxError;
use crate::coalesce::MakeKey;
use crate::single_flight::LazyGroup;

/// Middleware that runs an HTTP service once for concurrent requests with equal keys and
/// equal scopes, buffers the response once, and gives every caller its own copy.
///
/// Every caller of a flight receives a `Response` with the same status, version, headers,
/// extensions and trailers, and the same body bytes (not copied: `Bytes` clones). The
/// response's [`Role`](super::Role) extension says whether its caller led or followed.
///
/// - Requests without a key pass through to the inner service untouched, or get a `400`
///   under [`require_key`](HttpCoalesceLayer::require_key).
/// - A response body over the [limit](HttpCoalesceLayer::body_limit) goes whole to the
///   leader; followers get a `503` problem response.
/// - An error of the inner service reaches every caller of the flight through
///   [`ShareError`]: for a `BoxError`, a [`SharedError`](super::error::SharedError) whose
///   source is the original error.
///
/// # Readiness and why `S: Clone`
///
/// As for [`Coalesce`](crate::coalesce::Coalesce): followers never call the inner service,
/// so `poll_ready` reserves nothing and is always ready; the leader calls a clone of the
/// inner service and drives its readiness inside the flight.
///
/// # Cancellation
///
/// Dropping a response future (a client that disconnects) leaves its flight; the inner
/// call goes on for the callers that still wait, whoever started it, and is dropped with
/// the last of them. The body is buffered inside the flight, so a follower is served even
/// if the leader's client is gone.
///
/// # Panics
///
/// A panic in the inner service reaches every waiter of that flight as a panic (which
/// tower-http's `CatchPanicLayer`, placed above this layer, turns into a `500` for each);
/// the next request with the key starts a fresh flight.
///
/// One `HttpCoalesce` serves one request body type and one response body type: calling it
/// with a second one panics.
///
/// See the [module docs](crate::http) for an example.
#[derive(Clone)]
pub struct HttpCoalesce<S, K, I = DefaultScope> {
    pub(crate) inner: S,
    pub(crate) make_key: K,
    pub(crate) scope: I,
    pub(crate) config: Config,
    pub(crate) metrics: Metrics,
    // Typed by the first request; shared by all clones and by the layer.
    pub(crate) flights: LazyGroup,
}

impl<S, K> HttpCoalesce<S, K> {
    /// Wraps `inner`, coalescing requests by the key `make_key` returns, with the defaults
    /// of [`HttpCoalesceLayer::new`]. The new service has a registry of its own, shared
    /// with its clones only.
    pub fn new(inner: S, make_key: K) -> Self {
        HttpCoalesceLayer::new(make_key).into_service(inner)
    }

    /// Returns a new [`Layer`](tower::Layer) that wraps services with an `HttpCoalesce`.
    pub fn layer(make_key: K) -> HttpCoalesceLayer<K> {
        HttpCoalesceLayer::new(make_key)
    }
}

impl<S, K, I> HttpCoalesce<S, K, I> {
    define_inner_service_accessors!();

    /// The counters of this service, shared with the layer that built it.
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }
}

/// The value a flight shares.
pub(crate) type FlightResult<ResB, E> = Result<Flown<ResB>, std::sync::Arc<E>>;

impl<S, K, I, ReqB, ResB> Service<Request<ReqB>> for HttpCoalesce<S, K, I>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: ShareError,
    K: MakeKey<Parts>,
    I: MakeKey<Parts>,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqB, ResB, FlightKey<I::Key, K::Key>>;

    #[inline]
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Reserve nothing of the inner service: followers never call it. The leader drives
        // the readiness of its own clone inside the flight.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let key = self
            .make_key
            .make_key(&parts)
            .map(|key| FlightKey::new(self.scope.make_key(&parts), &parts, key));
        let req = Request::from_parts(parts, body);

        let Some(key) = key else {
            if self.config.require_key {
                self.metrics.key_missing();
                tracing::debug!("request without a coalescing key refused");
                return ResponseFuture::answered(problem::key_required());
            }
            // `self.inner` was never polled ready, so a clone of it is as good as the original.
            return ResponseFuture::direct(Oneshot::new(self.inner.clone(), req));
        };

        // Keys carry user ids: logs get a hash, and only when someone reads them.
        let key_hash = tracing::enabled!(tracing::Level::DEBUG).then(|| KeyHash::of(&key));
        let config = &self.config;
        let metrics = &self.metrics;
        let inner = &self.inner;
        // The request goes into the flight if this caller leads it; a follower keeps it, to
        // call the inner service itself should it stop waiting.
        let mut request = Some(req);
        let run = self
            .flights
            .get::<FlightKey<I::Key, K::Key>, FlightResult<ResB, S::Error>>()
            .run(key, || {
                metrics.flight_started();
                let req = request.take().expect("the flight is made once");
                flight(inner.clone(), req, config, metrics.clone(), key_hash)
            });
        // Made only for a caller that waits: one turned away is not counted as cancelled.
        let watch = || Watch {
            role_header: config.role_header,
            metrics: metrics.clone(),
            key_hash,
            done: false,
        };
        let Some(request) = request else {
            return ResponseFuture::coalesced(run, watch(), None, None);
        };

        // A follower.
        match config.on_duplicate {
            OnDuplicate::Share => {}
            OnDuplicate::Conflict => {
                metrics.duplicate_refused();
                return ResponseFuture::answered(problem::in_progress());
            }
            OnDuplicate::PassThrough => {
                metrics.duplicate_passed_through();
                return ResponseFuture::own(inner.clone(), request, config.role_header);
            }
        }
        // `waiters` counts this caller, and the leader while it waits.
        if config
            .max_followers
            .is_some_and(|max| run.waiters() > max + 1)
        {
            metrics.follower_shed();
            tracing::debug!(key = key_hash.map(|h| h.0), "follower turned away");
            return match config.fallback {
                Fallback::ServiceUnavailable => {
                    ResponseFuture::answered(problem::gave_up_waiting())
                }
                Fallback::PassThrough => {
                    ResponseFuture::own(inner.clone(), request, config.role_header)
                }
            };
        }
        metrics.caller_joined();
        tracing::debug!(key = key_hash.map(|h| h.0), "caller joined flight");
        let own = Own {
            inner: inner.clone(),
            request,
            fallback: config.fallback,
        };
        let deadline = config
            .follower_timeout
            .map(|timeout| Box::pin(tokio::time::sleep(timeout)));
        ResponseFuture::coalesced(run, watch(), Some(own), deadline)
    }
}

/// The work of a flight: the leader's call, then its response buffered to be shared, or
/// kept for the leader alone.
fn flight<S, ReqB, ResB>(
    inner: S,
    req: Request<ReqB>,
    config: &Config,
    metrics: Metrics,
    key_hash: Option<KeyHash>,
) -> impl Future<Output = FlightResult<ResB, S::Error>> + Send + 'static
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + Sync + 'static,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let span = tracing::debug_span!("coalesce_flight", key = key_hash.map(|h| h.0));
    let (limit, share) = (config.body_limit, config.share.clone());
    let one_at_a_time = config.unshared == Unshared::OneAfterAnother;
    let call = Oneshot::new(inner, req);
    async move {
        tracing::debug!("flight started");
        let result = match call.await {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                let shareable = share.allows(&parts);
                let response = Response::from_parts(parts, body);
                if shareable {
                    Ok(flown::collect(response, limit, &metrics).await)
                } else {
                    metrics.response_not_shared();
                    tracing::debug!("response not to be shared; followers run on their own");
                    Ok(Flown::unshared(response, one_at_a_time))
                }
            }
            Err(error) => Err(std::sync::Arc::new(error)),
        };
        tracing::debug!(ok = result.is_ok(), "flight completed");
        result
    }
    .instrument(span)
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

impl<S, K, I> fmt::Debug for HttpCoalesce<S, K, I>
where
    S: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCoalesce")
            .field("inner", &self.inner)
            .field("make_key", &any::type_name::<K>())
            .field("scope", &any::type_name::<I>())
            .field("config", &self.config)
            .finish()
    }
}
