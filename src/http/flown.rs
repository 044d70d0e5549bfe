//! What a flight produces: the leader's response, buffered once for everyone.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};
use http::Response;
use http::response::Parts;
use http_body::Body;
use http_body_util::BodyExt;

use super::body::{End, ResponseBody};
use super::metrics::Metrics;
use crate::BoxError;

/// The shared result of a flight's inner call, cloned for every caller.
pub(crate) enum Flown<B> {
    /// The whole body, within the limit: every caller gets a copy.
    Buffered(Arc<Buffered>),
    /// Over the limit: the leader's response (what was read, then the rest of the body),
    /// taken once by the leader; followers get a `503`.
    TooLarge(Slot<B>),
    /// Not to be shared: the leader's response as it came, taken once by the leader; each
    /// follower calls the inner service itself, one at a time if `turn` is set.
    Unshared {
        leader: Slot<B>,
        turn: Option<Arc<tokio::sync::Semaphore>>,
    },
}

/// A response for the leader alone, taken out once.
pub(crate) type Slot<B> = Arc<Mutex<Option<Response<ResponseBody<B>>>>>;

impl<B> Clone for Flown<B> {
    fn clone(&self) -> Self {
        match self {
            Flown::Buffered(buffered) => Flown::Buffered(buffered.clone()),
            Flown::TooLarge(slot) => Flown::TooLarge(slot.clone()),
            Flown::Unshared { leader, turn } => Flown::Unshared {
                leader: leader.clone(),
                turn: turn.clone(),
            },
        }
    }
}

impl<B> fmt::Debug for Flown<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Flown::Buffered(b) => f.debug_tuple("Buffered").field(&b.data.len()).finish(),
            Flown::TooLarge(_) => f.write_str("TooLarge"),
            Flown::Unshared { .. } => f.write_str("Unshared"),
        }
    }
}

pub(crate) struct Buffered {
    pub(crate) parts: Parts,
    pub(crate) data: Bytes,
    pub(crate) end: Option<End>,
}

impl Buffered {
    /// A response a stage made whole (its body in one `Bytes`).
    pub(crate) fn whole(response: Response<Bytes>) -> Self {
        let (parts, data) = response.into_parts();
        Buffered {
            parts,
            data,
            end: None,
        }
    }

    /// A caller's own response: the same head, and the same bytes without copying them.
    /// The last caller to read the flight's result (the only one, if nobody joined) takes
    /// the head as it is instead of cloning it.
    pub(crate) fn into_response<B>(self: Arc<Self>) -> Response<ResponseBody<B>> {
        match Arc::try_unwrap(self) {
            Ok(Buffered { parts, data, end }) => {
                Response::from_parts(parts, ResponseBody::buffered(data, end))
            }
            Err(shared) => Response::from_parts(
                shared.parts.clone(),
                ResponseBody::buffered(shared.data.clone(), shared.end.clone()),
            ),
        }
    }
}

impl<B> Flown<B> {
    /// The response's status, while the leader has not taken its response out.
    pub(crate) fn status(&self) -> Option<http::StatusCode> {
        match self {
            Flown::Buffered(buffered) => Some(buffered.parts.status),
            Flown::TooLarge(slot) | Flown::Unshared { leader: slot, .. } => {
                let slot = slot.lock().unwrap_or_else(|e| e.into_inner());
                slot.as_ref().map(Response::status)
            }
        }
    }

    /// The leader's response, not to be shared; `one_at_a_time` makes followers take turns.
    pub(crate) fn unshared(response: Response<B>, one_at_a_time: bool) -> Self {
        let response = response.map(|body| ResponseBody::prefixed(VecDeque::new(), Box::pin(body)));
        Flown::Unshared {
            leader: Arc::new(Mutex::new(Some(response))),
            turn: one_at_a_time.then(|| Arc::new(tokio::sync::Semaphore::new(1))),
        }
    }

    /// Takes the response kept for the leader; only the leader calls this, once.
    pub(crate) fn take_leader(
        slot: &Mutex<Option<Response<ResponseBody<B>>>>,
    ) -> Option<Response<ResponseBody<B>>> {
        slot.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// Reads the body of `response` into memory, up to `limit` bytes.
///
/// A body that ends within the limit is shared whole. A body over the limit stops being
/// read as soon as that is known (from its size hint, before reading anything, or from
/// the chunk that crosses the limit) and becomes the leader's, with what was read put back
/// in front of the rest. An error from the body ends it like trailers would: every caller
/// gets the bytes read before it, then the error.
pub(crate) async fn collect<B>(response: Response<B>, limit: usize, metrics: &Metrics) -> Flown<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let (parts, body) = response.into_parts();
    let mut chunks = Chunks::default();
    let hint = body.size_hint();
    if hint.lower() > limit as u64 {
        return too_large(parts, chunks, Box::pin(body), metrics);
    }
    let read = if hint.upper().is_some_and(|upper| upper <= limit as u64) {
        // Bounded within the limit: read in place, without a box. A body that sends more
        // than its own bound is broken; it ends with an error where the bound is crossed.
        let mut body = std::pin::pin!(body);
        read_into(body.as_mut(), &mut chunks, limit).await
    } else {
        // Boxed so that the body can be read here and still be handed on, unread part and
        // all, without asking for `B: Unpin`.
        let mut body = Box::pin(body);
        match read_into(body.as_mut(), &mut chunks, limit).await {
            Read::OverLimit => return too_large(parts, chunks, body, metrics),
            read => read,
        }
    };
    let end = match read {
        Read::Ended(trailers) => trailers.map(End::Trailers),
        Read::Failed(error) => Some(End::Error(Arc::new(error.into()))),
        Read::OverLimit => Some(End::Error(Arc::new(
            "the response body is longer than its size hint".into(),
        ))),
    };
    Flown::Buffered(Arc::new(Buffered {
        parts,
        data: chunks.concat(),
        end,
    }))
}

/// How reading a body into [`Chunks`] ended.
pub(crate) enum Read<E> {
    /// The body ended, with its trailers if it had any.
    Ended(Option<http::HeaderMap>),
    Failed(E),
    /// More than the limit was read; the rest is left in the body.
    OverLimit,
}

/// Reads `body` into `chunks` until it ends, fails, or has given more than `limit` bytes.
/// Trailers end it: a frame after them would be a bug of the body, and is not read.
pub(crate) async fn read_into<B: Body<Data = Bytes>>(
    mut body: Pin<&mut B>,
    chunks: &mut Chunks,
    limit: usize,
) -> Read<B::Error> {
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => return Read::Failed(error),
        };
        match frame.into_data() {
            Ok(data) => {
                chunks.push(data);
                if chunks.len > limit {
                    return Read::OverLimit;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    return Read::Ended(Some(trailers));
                }
            }
        }
    }
    Read::Ended(None)
}

fn too_large<B>(parts: Parts, read: Chunks, rest: Pin<Box<B>>, metrics: &Metrics) -> Flown<B> {
    metrics.body_over_limit();
    tracing::debug!("response body over the limit; followers get 503");
    let response = Response::from_parts(parts, ResponseBody::prefixed(read.into_deque(), rest));
    Flown::TooLarge(Arc::new(Mutex::new(Some(response))))
}

/// The chunks of a body read so far. Most bodies come in one chunk: that one is kept
/// without a queue (an allocation per request saved, on requests and on responses).
#[derive(Default)]
pub(crate) struct Chunks {
    first: Option<Bytes>,
    more: VecDeque<Bytes>,
    /// The bytes read, saturating.
    pub(crate) len: usize,
}

impl Chunks {
    pub(crate) fn push(&mut self, data: Bytes) {
        self.len = self.len.saturating_add(data.len());
        if self.first.is_none() {
            self.first = Some(data);
        } else {
            self.more.push_back(data);
        }
    }

    /// The chunks joined, copied only if there is more than one.
    pub(crate) fn concat(self) -> Bytes {
        let Some(first) = self.first else {
            return Bytes::new();
        };
        if self.more.is_empty() {
            return first;
        }
        let mut data = BytesMut::with_capacity(self.len);
        data.extend_from_slice(&first);
        for chunk in self.more {
            data.extend_from_slice(&chunk);
        }
        data.freeze()
    }

    fn into_deque(self) -> VecDeque<Bytes> {
        let mut chunks = self.more;
        if let Some(first) = self.first {
            chunks.push_front(first);
        }
        chunks
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http_body::{Frame, SizeHint};

    use super::*;

    /// A body that gives `chunks` and says it holds at most `bound` bytes.
    pub(crate) struct Bounded {
        pub(crate) chunks: VecDeque<Bytes>,
        pub(crate) bound: u64,
    }

    impl Body for Bounded {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.chunks.pop_front().map(|data| Ok(Frame::data(data))))
        }

        fn size_hint(&self) -> SizeHint {
            let mut hint = SizeHint::new();
            hint.set_upper(self.bound);
            hint
        }
    }

    fn response(chunks: &[&'static str], bound: u64) -> Response<Bounded> {
        let chunks = chunks.iter().map(|c| Bytes::from_static(c.as_bytes()));
        Response::new(Bounded {
            chunks: chunks.collect(),
            bound,
        })
    }

    #[tokio::test]
    async fn a_body_bounded_within_the_limit_is_read_whole_in_place() {
        let flown = collect(response(&["ab", "cd"], 4), 10, &Metrics::default()).await;
        let Flown::Buffered(buffered) = flown else {
            panic!("buffered: {flown:?}")
        };
        assert_eq!(buffered.data, "abcd");
        assert!(buffered.end.is_none());
    }

    #[tokio::test]
    async fn a_body_longer_than_its_bound_ends_with_an_error_where_it_crosses_the_limit() {
        let metrics = Metrics::default();
        let flown = collect(response(&["abcd", "efgh", "ijkl"], 4), 6, &metrics).await;
        let Flown::Buffered(buffered) = flown else {
            panic!("buffered: {flown:?}")
        };
        assert_eq!(buffered.data, "abcdefgh", "what was read before the limit");
        let Some(End::Error(error)) = &buffered.end else {
            panic!("an error end: {:?}", buffered.end)
        };
        assert!(
            error.to_string().contains("longer than its size hint"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn an_unbounded_body_over_the_limit_goes_to_the_leader_whole() {
        let flown = collect(
            response(&["abcd", "efgh", "ijkl"], u64::MAX),
            6,
            &Metrics::default(),
        )
        .await;
        let Flown::TooLarge(slot) = flown else {
            panic!("too large: {flown:?}")
        };
        let leader = Flown::<Bounded>::take_leader(&slot).expect("the leader's response");
        let body = http_body_util::BodyExt::collect(leader.into_body()).await;
        let Ok(body) = body else {
            panic!("the leader's body fails")
        };
        assert_eq!(body.to_bytes(), "abcdefghijkl");
    }
}
