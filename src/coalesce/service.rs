use std::any;
use std::fmt;
use std::task::{Context, Poll};

use tower::Service;
use tower::util::Oneshot;

use super::future::ResponseFuture;
use super::{CoalesceLayer, MakeKey, Shareable};
use crate::single_flight::LazyGroup;

/// Middleware that runs the inner service once for concurrent requests with equal keys and
/// gives every caller a clone of the one result.
///
/// Requests for which the [`MakeKey`] returns `None` go straight to the inner service.
///
/// # Why `Response` and `Error` must be `Clone`
///
/// The one result is handed to every caller of the flight, so each caller gets a clone of
/// it. `http::Response` is not `Clone`; its body is a stream that can be read only once.
/// HTTP services need the HTTP flavour of this middleware, which buffers the body once and
/// shares the bytes.
///
/// # Readiness and why `S: Clone`
///
/// A follower never calls the inner service, so it must not need any of its capacity: with a
/// `concurrency_limit(1)` below this layer, a hundred callers of one key must be served by
/// one inner call, not queued one by one. `poll_ready` therefore reserves nothing and is
/// always ready. The leader of a flight calls the inner service on a clone of it, made in
/// `call`, and drives that clone's `poll_ready` inside the flight (as
/// [`Oneshot`](tower::util::Oneshot) does); requests without a key take the same path. The
/// inner service's backpressure is thus felt by the leaders' futures rather than by
/// `poll_ready`: place a load-shedding or concurrency-limiting layer below this one, where
/// it counts executions rather than callers.
///
/// # Cancellation
///
/// Dropping a response future leaves its flight. The inner call goes on for the callers that
/// still wait, whoever started it, and is dropped when the last of them is gone. See
/// [`single_flight`](crate::single_flight) for the details.
///
/// # Panics
///
/// A panic in the inner service's `call` or future reaches every waiter of that flight as a
/// panic; the next request with the key starts a fresh flight.
///
/// The registry of a `Coalesce` is typed by its first request type. A service that
/// implements `Service` for several request types must be built once per request type:
/// calling one `Coalesce` with two request (or key, or response) types panics.
///
/// See the [module docs](crate::coalesce) for an example.
#[derive(Clone)]
pub struct Coalesce<S, F> {
    inner: S,
    make_key: F,
    // Typed by the first request; shared by all clones.
    flights: LazyGroup,
}

impl<S, F> Coalesce<S, F> {
    /// Wraps `inner`, coalescing requests by the key `make_key` returns. The new service
    /// has a registry of its own, shared with its clones only.
    pub fn new(inner: S, make_key: F) -> Self {
        Coalesce {
            inner,
            make_key,
            flights: LazyGroup::default(),
        }
    }

    /// Returns a new [`Layer`](tower::Layer) that wraps services with a `Coalesce` middleware.
    pub const fn layer(make_key: F) -> CoalesceLayer<F> {
        CoalesceLayer::new(make_key)
    }

    define_inner_service_accessors!();
}

impl<S, F, Req> Service<Req> for Coalesce<S, F>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Shareable,
    S::Error: Shareable,
    F: MakeKey<Req>,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S, Req, F::Key>;

    #[inline]
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Reserve nothing of the inner service: followers never call it. The leader drives
        // the readiness of its own clone inside the flight (see the type docs).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // `self.inner` was never polled ready, so a clone of it is as good as the original;
        // the clone is made only for a request that will call it.
        let Some(key) = self.make_key.make_key(&req) else {
            return ResponseFuture::direct(Oneshot::new(self.inner.clone(), req));
        };
        let inner = &self.inner;
        let run = self
            .flights
            .get::<F::Key, Result<S::Response, S::Error>>()
            .run(key, || Oneshot::new(inner.clone(), req));
        ResponseFuture::coalesced(run)
    }
}

impl<S, F> fmt::Debug for Coalesce<S, F>
where
    S: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coalesce")
            .field("inner", &self.inner)
            .field("make_key", &any::type_name::<F>())
            .finish()
    }
}
