//! Future types

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower::Service;
use tower::util::Oneshot;

use crate::single_flight::Run;

pin_project! {
    /// Response future of [`Coalesce`](super::Coalesce).
    ///
    /// Dropping it leaves the request's flight; the inner call goes on while other callers
    /// wait for it, and is dropped with the last of them. If the inner call panics, polling
    /// this future panics, as it does for every caller of the flight.
    pub struct ResponseFuture<S, Req, K>
    where
        S: Service<Req>,
        K: Hash,
        K: Eq,
    {
        #[pin]
        state: State<S, Req, K>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req, K>
    where
        S: Service<Req>,
        K: Hash,
        K: Eq,
    {
        // A request without a key: no registry, no boxing.
        Direct { #[pin] oneshot: Oneshot<S, Req> },
        Coalesced { run: Run<K, Result<S::Response, S::Error>> },
    }
}

impl<S, Req, K> ResponseFuture<S, Req, K>
where
    S: Service<Req>,
    K: Hash + Eq,
{
    pub(crate) fn direct(oneshot: Oneshot<S, Req>) -> Self {
        ResponseFuture {
            state: State::Direct { oneshot },
        }
    }

    pub(crate) fn coalesced(run: Run<K, Result<S::Response, S::Error>>) -> Self {
        ResponseFuture {
            state: State::Coalesced { run },
        }
    }
}

impl<S, Req, K> Future for ResponseFuture<S, Req, K>
where
    S: Service<Req>,
    S::Response: Clone,
    S::Error: Clone,
    K: Hash + Eq,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Direct { oneshot } => oneshot.poll(cx),
            StateProj::Coalesced { run } => Pin::new(run).poll(cx).map(|o| o.into_value()),
        }
    }
}

impl<S, Req, K> fmt::Debug for ResponseFuture<S, Req, K>
where
    S: Service<Req>,
    K: Hash + Eq,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Direct { .. } => "Direct",
            State::Coalesced { .. } => "Coalesced",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
