//! Future types

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;
use tower::Service;
use tower::util::Oneshot;

use super::body::ResponseBody;
use super::engine::InnerRequest;

pub(crate) type BoxAnswer<ResB, E> =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody<ResB>>, E>> + Send>>;

pin_project! {
    /// Response future of [`HttpCoalesce`](super::HttpCoalesce).
    ///
    /// Dropping it leaves the request's flight (see the service's docs on cancellation).
    /// If the inner call panics, polling this future panics, as it does for every caller
    /// of the flight.
    pub struct ResponseFuture<S, ReqB, ResB>
    where
        S: Service<InnerRequest<ReqB>>,
    {
        #[pin]
        state: State<S, ReqB, ResB>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqB, ResB>
    where
        S: Service<InnerRequest<ReqB>>,
    {
        // A request without a key, passed through unread: no allocation, no buffering.
        Direct { #[pin] oneshot: Oneshot<S, InnerRequest<ReqB>> },
        // The layer's own answer, such as `400` for a missing key.
        Answered { response: Option<Response<ResponseBody<ResB>>> },
        // A keyed request: reading its body, its flight, and its answer.
        Keyed { future: BoxAnswer<ResB, S::Error> },
    }
}

impl<S, ReqB, ResB> ResponseFuture<S, ReqB, ResB>
where
    S: Service<InnerRequest<ReqB>>,
{
    pub(crate) fn direct(inner: S, request: InnerRequest<ReqB>) -> Self {
        ResponseFuture {
            state: State::Direct {
                oneshot: Oneshot::new(inner, request),
            },
        }
    }

    pub(crate) fn answered(response: Response<ResponseBody<ResB>>) -> Self {
        ResponseFuture {
            state: State::Answered {
                response: Some(response),
            },
        }
    }

    pub(crate) fn keyed(future: BoxAnswer<ResB, S::Error>) -> Self {
        ResponseFuture {
            state: State::Keyed { future },
        }
    }
}

impl<S, ReqB, ResB> Future for ResponseFuture<S, ReqB, ResB>
where
    S: Service<InnerRequest<ReqB>, Response = Response<ResB>>,
{
    type Output = Result<Response<ResponseBody<ResB>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Direct { oneshot } => {
                Poll::Ready(Ok(ready!(oneshot.poll(cx))?.map(ResponseBody::inner)))
            }
            StateProj::Answered { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            StateProj::Keyed { future } => future.as_mut().poll(cx),
        }
    }
}

impl<S, ReqB, ResB> fmt::Debug for ResponseFuture<S, ReqB, ResB>
where
    S: Service<InnerRequest<ReqB>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Direct { .. } => "Direct",
            State::Answered { .. } => "Answered",
            State::Keyed { .. } => "Keyed",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
