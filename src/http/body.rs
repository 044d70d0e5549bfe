use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::error::SharedError;
use crate::BoxError;

pin_project! {
    /// Response body of [`HttpCoalesce`](super::HttpCoalesce).
    ///
    /// It is one of:
    /// - a copy of a flight's buffered body: the same bytes (a cheap `Bytes` clone), then the
    ///   same trailers, or the same error if the inner body failed part-way;
    /// - the leader's own body when it was over the limit: what was buffered, then the rest
    ///   of the inner body as it streams;
    /// - the inner body itself, for requests passed through;
    /// - a small `application/problem+json` body made by the layer.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Buffered { data: Option<Bytes>, end: Option<End> },
        // Boxed: the flight read the start of it through a pinned box already.
        Prefixed { prefix: VecDeque<Bytes>, rest: Pin<Box<B>> },
        Inner { #[pin] inner: B },
    }
}

/// How a buffered body ended, after its data.
#[derive(Debug, Clone)]
pub(crate) enum End {
    Trailers(HeaderMap),
    Error(Arc<BoxError>),
}

impl<B> ResponseBody<B> {
    pub(crate) fn buffered(data: Bytes, end: Option<End>) -> Self {
        ResponseBody {
            kind: Kind::Buffered {
                data: Some(data),
                end,
            },
        }
    }

    pub(crate) fn prefixed(prefix: VecDeque<Bytes>, rest: Pin<Box<B>>) -> Self {
        ResponseBody {
            kind: Kind::Prefixed { prefix, rest },
        }
    }

    pub(crate) fn inner(inner: B) -> Self {
        ResponseBody {
            kind: Kind::Inner { inner },
        }
    }
}

/// An empty body, as tower-http's `TimeoutLayer` answers a request that timed out with:
/// it needs the response body type to be `Default`.
impl<B> Default for ResponseBody<B> {
    fn default() -> Self {
        ResponseBody::buffered(Bytes::new(), None)
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Buffered { data, end } => {
                if let Some(data) = data.take().filter(|d| !d.is_empty()) {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(match end.take() {
                    Some(End::Trailers(trailers)) => Some(Ok(Frame::trailers(trailers))),
                    Some(End::Error(error)) => Some(Err(Box::new(SharedError::new(error)))),
                    None => None,
                })
            }
            KindProj::Prefixed { prefix, rest } => match prefix.pop_front() {
                Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                None => rest.as_mut().poll_frame(cx).map_err(Into::into),
            },
            KindProj::Inner { inner } => inner.poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Buffered { data, end } => {
                data.as_ref().is_none_or(Bytes::is_empty) && end.is_none()
            }
            Kind::Prefixed { prefix, rest } => prefix.is_empty() && rest.is_end_stream(),
            Kind::Inner { inner } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Buffered { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Prefixed { prefix, rest } => {
                let buffered: u64 = prefix.iter().map(|d| d.len() as u64).sum();
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(buffered + rest.lower());
                if let Some(upper) = rest.upper() {
                    hint.set_upper(buffered + upper);
                }
                hint
            }
            Kind::Inner { inner } => inner.size_hint(),
        }
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Buffered { .. } => "Buffered",
            Kind::Prefixed { .. } => "Prefixed",
            Kind::Inner { .. } => "Inner",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}
