//! Future types

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Response future of [`Idempotency`](super::Idempotency).
///
/// Dropping it leaves the request's flight, as for [`HttpCoalesce`]; a flight whose
/// callers all left stores nothing.
///
/// [`HttpCoalesce`]: crate::http::HttpCoalesce
pub struct ResponseFuture<T, E> {
    // Reading the request body, and a flight with store calls: boxed, and private.
    inner: Pin<Box<dyn Future<Output = Result<T, E>> + Send>>,
}

impl<T, E> ResponseFuture<T, E> {
    pub(crate) fn new(inner: Pin<Box<dyn Future<Output = Result<T, E>> + Send>>) -> Self {
        ResponseFuture { inner }
    }
}

impl<T, E> Future for ResponseFuture<T, E> {
    type Output = Result<T, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<T, E> fmt::Debug for ResponseFuture<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
