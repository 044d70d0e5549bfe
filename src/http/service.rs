use std::any;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use http_body_util::Either;
use tower::Service;

use super::HttpCoalesceLayer;
use super::body::ResponseBody;
use super::engine::{self, Engine, InnerRequest};
use super::error::ShareError;
use super::future::ResponseFuture;
use super::key::EncodeKey;
use super::scope::DefaultScope;
use crate::BoxError;
use crate::coalesce::MakeKey;
use crate::store::{NoStore, Store};

/// Middleware that runs an HTTP service once for concurrent identical requests, buffers
/// the response once, and gives every caller its own copy.
///
/// Requests are identical when their keys and scopes are equal and their method, path,
/// query and body are too (their *fingerprint*): requests with one key and different
/// fingerprints never share a response (see [`OnMismatch`](super::OnMismatch)). Every
/// caller of a flight receives a `Response` with the same status, version, headers,
/// extensions and trailers, and the same body bytes (not copied: `Bytes` clones). The
/// response's [`Role`](super::Role) extension says whether its caller led or followed.
///
/// - Requests without a key pass through to the inner service untouched and unread, or
///   get a `400` under [`require_key`](HttpCoalesceLayer::require_key).
/// - A keyed request's body is read (up to the
///   [request body limit](HttpCoalesceLayer::request_body_limit), else `413`), and the inner
///   service receives it buffered: it takes `Request<Either<Full<Bytes>, ReqB>>`, which
///   axum routers and handlers accept as any other body.
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
/// the last of them (unless [`finish_abandoned`](HttpCoalesceLayer::finish_abandoned)).
/// The body is buffered inside the flight, so a follower is served even if the leader's
/// client is gone.
///
/// # Panics
///
/// A panic in the inner service reaches every waiter of that flight as a panic (which
/// tower-http's `CatchPanicLayer`, placed above this layer, turns into a `500` for each);
/// the next request with the key starts a fresh flight.
///
/// See the [module docs](crate::http) for an example.
pub struct HttpCoalesce<S, K, I = DefaultScope, St = NoStore> {
    inner: S,
    engine: Arc<Engine<K, I, St>>,
}

impl<S, K> HttpCoalesce<S, K> {
    /// Wraps `inner`, coalescing requests by the key `make_key` returns, with the defaults
    /// of [`HttpCoalesceLayer::new`]. The new service has a registry of its own, shared
    /// with its clones only.
    pub fn new(inner: S, make_key: K) -> Self {
        Self::from_engine(inner, HttpCoalesceLayer::new(make_key).engine)
    }

    /// Returns a new [`Layer`](tower::Layer) that wraps services with an `HttpCoalesce`.
    pub fn layer(make_key: K) -> HttpCoalesceLayer<K> {
        HttpCoalesceLayer::new(make_key)
    }
}

impl<S, K, I, St> HttpCoalesce<S, K, I, St> {
    pub(crate) fn from_engine(inner: S, engine: Engine<K, I, St>) -> Self {
        HttpCoalesce {
            inner,
            engine: Arc::new(engine),
        }
    }

    define_inner_service_accessors!();

    /// The counters of this service, shared with the layer that built it.
    pub fn metrics(&self) -> super::Metrics {
        self.engine.metrics.clone()
    }
}

impl<S: Clone, K, I, St> Clone for HttpCoalesce<S, K, I, St> {
    fn clone(&self) -> Self {
        HttpCoalesce {
            inner: self.inner.clone(),
            engine: self.engine.clone(),
        }
    }
}

impl<S, K, I, St, ReqB, ResB> Service<Request<ReqB>> for HttpCoalesce<S, K, I, St>
where
    S: Service<InnerRequest<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: ShareError,
    K: MakeKey<Parts> + Send + Sync + 'static,
    K::Key: EncodeKey,
    I: MakeKey<Parts> + Send + Sync + 'static,
    I::Key: EncodeKey,
    St: Store,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqB, ResB>;

    #[inline]
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Reserve nothing of the inner service: followers never call it. The leader drives
        // the readiness of its own clone inside the flight.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // `self.inner` was never polled ready, so a clone of it is as good as the original.
        let inner = self.inner.clone();
        let (parts, body) = req.into_parts();
        if self.engine.stage.is_some() && !parts.method.is_safe() {
            // Not kept by the stage (a cache keys `GET` and `HEAD` only), but it may change
            // what is kept.
            let engine = self.engine.clone();
            return ResponseFuture::keyed(Box::pin(engine::passed(inner, engine, parts, body)));
        }
        if self.engine.config.skip_safe_methods && parts.method.is_safe() {
            return ResponseFuture::direct(inner, Request::from_parts(parts, Either::Right(body)));
        }
        // A key from the head is made here, so that requests without one pass through
        // unread; a key from the body is made once the engine has read it.
        let key = if self.engine.make_key.reads_body() {
            None
        } else {
            match self.engine.make_key.make_key(&parts) {
                Some(key) => Some(key),
                None => {
                    return match self
                        .engine
                        .without_key(false, || self.engine.make_key.why_no_key(&parts))
                    {
                        Some(refusal) => ResponseFuture::answered(refusal),
                        None => ResponseFuture::direct(
                            inner,
                            Request::from_parts(parts, Either::Right(body)),
                        ),
                    };
                }
            }
        };
        ResponseFuture::keyed(engine::serve(inner, self.engine.clone(), parts, body, key))
    }
}

impl<S, K, I, St> fmt::Debug for HttpCoalesce<S, K, I, St>
where
    S: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCoalesce")
            .field("inner", &self.inner)
            .field("make_key", &any::type_name::<K>())
            .field("engine", &self.engine)
            .finish()
    }
}
