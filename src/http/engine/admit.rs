//! Step 1, admit: read a keyed request's body, make its key, scope and fingerprint, and
//! send it through the layer's stage, if any, or straight to its flight.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full};
use tower::ServiceExt;

use super::then::Then;
use super::*;
use crate::BoxError;
use crate::coalesce::MakeKey;
use crate::http::body::ResponseBody;
use crate::http::flown::{Chunks, Read, read_into};
use crate::http::future::BoxAnswer;
use crate::http::key;
use crate::http::stage::{Admit, After, Answered, Stage, StandsIn, Ticket};
use crate::http::{Role, problem};
use crate::store::{Store, StoreKey};

/// Serves a request that has a key, or whose key is in its body.
///
/// Not an `async fn`, nor are the steps it awaits on the common path: every keyed
/// request's future is moved whole into its box, and an `async fn` holds its arguments
/// twice (as given and as its body's locals), the request head included (2.5 KB before).
/// Boxed here, where it is made (see [`boxed_in_span`]).
pub(crate) fn serve<S, K, I, St, ReqB, ResB>(
    inner: S,
    engine: Arc<Engine<K, I, St>>,
    parts: Parts,
    body: ReqB,
    key: Option<K::Key>,
) -> BoxAnswer<ResB, S::Error>
where
    S: InnerService<ReqB, ResB>,
    K: HeadKey<Key: crate::http::key::EncodeKey>,
    I: HeadKey<Key: crate::http::key::EncodeKey>,
    St: Store,
    ReqB: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static,
    ResB: SharedBody,
{
    let span = request_span(engine.config.name, &parts);
    let limit = engine.config.request_body_limit;
    let read = async move {
        let read = read_body(&parts, body, limit).await;
        (parts, read)
    };
    // The read, then the flight, in one place (see `Then`).
    let work = Then::new(
        read,
        move |(parts, read)| match read {
            Ok(bytes) => admitted(inner, engine, parts, bytes, key),
            // Boxed, off the common path: one `Either` more around the flight's future
            // would be one more copy of it.
            Err(refusal) => {
                let refused: Boxed<_, _> = Box::pin(std::future::ready(Ok(refusal)));
                futures::future::Either::Right(refused)
            }
        },
        record_answer,
    );
    boxed_in_span(work, span)
}

/// The span of a keyed request: who served it, in OpenTelemetry's HTTP names where they
/// exist (`http.request.method`, `url.path`, `http.response.status_code`) and the layer's
/// own: `coalesce.layer` (which preset), `coalesce.role` (`leader`, `follower`, `own`, `replay`, `hit`, `stale`,
/// `refused`), `coalesce.flight_id` (the flight it led), `coalesce.waited_on` (the flight
/// it followed) and `coalesce.cache` (`hit`, `stale`, `miss`). A flight's own span,
/// `coalesce_flight`, a child of its leader's, has its `coalesce.flight_id` and
/// `coalesce.elsewhere` (it waited for another instance's run of the key).
fn request_span(layer: &'static str, parts: &Parts) -> Option<tracing::Span> {
    if spans_unseen() {
        return None;
    }
    Some(tracing::debug_span!(
        REQUEST_SPAN,
        coalesce.layer = layer,
        http.request.method = %parts.method,
        url.path = parts.uri.path(),
        http.response.status_code = tracing::field::Empty,
        coalesce.role = tracing::field::Empty,
        coalesce.flight_id = tracing::field::Empty,
        coalesce.waited_on = tracing::field::Empty,
        coalesce.cache = tracing::field::Empty,
    ))
}

/// Records on the request's span how it was answered.
fn record_answer<B, E>(answer: &Answer<B, E>) {
    let (Some(span), Ok(response)) = (own_span(REQUEST_SPAN), answer) else {
        return;
    };
    let headers = response.headers();
    span.record("http.response.status_code", response.status().as_u16());
    let cache = headers
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .map(|status| match () {
            _ if status.contains("stale") => "stale",
            _ if status.contains("; hit") => "hit",
            _ => "miss",
        });
    if let Some(cache) = cache {
        span.record("coalesce.cache", cache);
    }
    let role = match response.extensions().get::<Role>() {
        _ if headers.contains_key(REPLAYED) => "replay",
        _ if matches!(cache, Some("hit" | "stale")) => cache.unwrap_or_default(),
        Some(Role::Leader) => "leader",
        Some(Role::Follower) => "follower",
        Some(_) => "own",
        None => "refused",
    };
    span.record("coalesce.role", role);
}

/// A step that is off the common path, boxed where it is awaited (see [`serve`]).
type Boxed<B, E> = Pin<Box<dyn Future<Output = Answer<B, E>> + Send>>;

/// A keyed request once its body is read: through its flight, or (boxed) through the
/// layer's stage, on its own, or refused.
fn admitted<S, K, I, St, ReqB, ResB>(
    inner: S,
    engine: Arc<Engine<K, I, St>>,
    parts: Parts,
    bytes: Bytes,
    key: Option<K::Key>,
) -> futures::future::Either<impl Future<Output = Answer<ResB, S::Error>>, Boxed<ResB, S::Error>>
where
    S: InnerService<ReqB, ResB>,
    K: HeadKey<Key: crate::http::key::EncodeKey>,
    I: HeadKey<Key: crate::http::key::EncodeKey>,
    St: Store,
    ReqB: Send + 'static,
    ResB: SharedBody,
{
    use futures::future::Either::{Left as Flight, Right as Apart};
    let ready = |answer| Apart(Box::pin(std::future::ready(answer)) as Boxed<_, _>);
    let Some(key) = key.or_else(|| key_in_body(&engine.make_key, &parts, &bytes)) else {
        if let Some(refusal) = engine.without_key(true, || engine.make_key.why_no_key(&parts)) {
            return ready(Ok(refusal));
        }
        let req = Request::from_parts(parts, Either::Left(Full::new(bytes)));
        return Apart(Box::pin(async move {
            Ok(inner.oneshot(req).await?.map(ResponseBody::inner))
        }));
    };
    let Some(scope) = engine.scope.make_key(&parts) else {
        // Not knowing who asks, the layer can't tell whose answer is whose: nobody shares
        // this request, nor a replay of it.
        if let Some(refusal) = engine.without_identity(&parts) {
            return ready(Ok(refusal));
        }
        let req = Request::from_parts(parts, Either::Left(Full::new(bytes)));
        return Apart(Box::pin(run_own(
            inner,
            Some(req),
            engine.config.role_header,
        )));
    };
    let ask = Ask::new(&parts, &bytes);
    let store_key = engine
        .config
        .has_store
        .then(|| StoreKey::new(Some(&scope), &key));
    let flight_key = FlightKey::new(scope, key, ask);
    // Keys carry user ids: logs get a hash, and only when someone reads them.
    let key_hash = tracing::enabled!(tracing::Level::DEBUG).then(|| KeyHash::of(&flight_key));
    let request = Request::from_parts(parts, Either::Left(Full::new(bytes)));
    match (engine.stage.clone(), store_key) {
        // Boxed, like every step off the common path: a future holds the largest of the
        // futures it awaits.
        (Some(stage), Some(store_key)) => Apart(Box::pin(staged(
            stage, inner, engine, flight_key, store_key, key_hash, request,
        ))),
        (_, store_key) => Flight(join_or_lead(
            inner, engine, flight_key, store_key, key_hash, request,
        )),
    }
}

/// Serves a keyed request through the layer's stage: answered from what the stage keeps,
/// or through its flight (or on its own), and the answer then as the stage says.
pub(super) async fn staged<S, K, I, St, ReqB, ResB>(
    stage: Arc<dyn Stage>,
    inner: S,
    engine: Arc<Engine<K, I, St>>,
    flight_key: FlightKey<I::Key, K::Key>,
    store_key: StoreKey,
    key_hash: Option<KeyHash>,
    mut request: InnerRequest<ReqB>,
) -> Answer<ResB, S::Error>
where
    S: InnerService<ReqB, ResB>,
    K: HeadKey,
    I: HeadKey,
    St: Store,
    ReqB: Send + 'static,
    ResB: SharedBody,
{
    let (fingerprint, metrics) = (flight_key.ask.fingerprint(), &engine.metrics);
    let admit = stage
        .admit(
            &engine.store,
            &store_key,
            fingerprint,
            request.headers_mut(),
            metrics,
        )
        .await;
    let (ticket, answer) = match admit {
        Admit::Answer(answer) => return Ok(from_stage(answer)),
        Admit::AnswerAndRefresh { answer, refreshing } => {
            // The caller's own request refreshes what is kept: a flight like any other,
            // which keeps its response; nobody reads its answer.
            let engine = engine.clone();
            tokio::spawn(async move {
                let _ = join_or_lead(
                    inner,
                    engine,
                    flight_key,
                    Some(store_key),
                    key_hash,
                    request,
                )
                .await;
                drop(refreshing);
            });
            return Ok(from_stage(answer));
        }
        Admit::Own(ticket) => {
            let role_header = engine.config.role_header;
            (ticket, run_own(inner, Some(request), role_header).await)
        }
        Admit::Flight(ticket) => {
            if stage.stands_in(&ticket) {
                request.extensions_mut().insert(StandsIn);
            }
            let flight = join_or_lead(
                inner,
                engine.clone(),
                flight_key,
                Some(store_key),
                key_hash,
                request,
            );
            (ticket, flight.await)
        }
    };
    after(&*stage, ticket, answer, metrics)
}

/// The answer a stage makes of a request's answer, under its ticket.
fn after<B, E>(
    stage: &dyn Stage,
    ticket: Ticket,
    answer: Answer<B, E>,
    metrics: &Metrics,
) -> Answer<B, E> {
    let answered = answer.as_ref().ok().map(|response| Answered {
        status: response.status(),
        headers: response.headers(),
        role: response.extensions().get::<Role>().copied(),
    });
    match stage.answered(ticket, answered, metrics) {
        After::Keep(headers) => {
            let mut response = answer?;
            for (name, value) in headers {
                if let Some(name) = name {
                    response.headers_mut().insert(name, value);
                }
            }
            Ok(response)
        }
        After::Replace(response) => Ok(from_stage(response)),
    }
}

/// Serves a request without a key, of a method that is not safe, through a layer with a
/// stage: the stage sees its answer before the caller does (a cache drops the entries it
/// changed), on a task of its own, so that a caller that goes away meanwhile (a client
/// timeout) doesn't leave the stage's work half done.
pub(crate) async fn passed<S, K, I, St, ReqB, ResB>(
    inner: S,
    engine: Arc<Engine<K, I, St>>,
    parts: Parts,
    body: ReqB,
) -> Answer<ResB, S::Error>
where
    S: InnerService<ReqB, ResB>,
    K: Send + Sync + 'static,
    I: Send + Sync + 'static,
    St: Store,
    ReqB: Send + 'static,
    ResB: SharedBody,
{
    let request = Request::from_parts(parts.clone(), Either::Right(body));
    let response = inner.oneshot(request).await?;
    let (status, headers) = (response.status(), response.headers().clone());
    let work = tokio::spawn(async move {
        let Some(stage) = &engine.stage else { return };
        let answer = Answered {
            status,
            headers: &headers,
            role: None,
        };
        if let Some(work) = stage.passed(&engine.store, &parts, answer, &engine.metrics) {
            work.await;
        }
    });
    // A panic in the stage is the stage's: the caller has its answer all the same.
    let _ = work.await;
    Ok(response.map(ResponseBody::inner))
}

/// A response a stage made, with its body in one piece.
pub(super) fn from_stage<B>(response: Response<Bytes>) -> Response<ResponseBody<B>> {
    response.map(|body| ResponseBody::buffered(body, None))
}

/// The key of a request whose key maker reads the body.
fn key_in_body<K: MakeKey<Parts>>(make_key: &K, parts: &Parts, body: &Bytes) -> Option<K::Key> {
    key::with_body(body, || make_key.make_key(parts))
}

/// Reads a keyed request's body, refusing one over `limit` before reading it when its size
/// is declared.
pub(super) async fn read_body<B, R>(
    parts: &Parts,
    body: B,
    limit: usize,
) -> Result<Bytes, Response<ResponseBody<R>>>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let limit_u64 = limit as u64;
    if body.size_hint().lower() > limit_u64 || declared.is_some_and(|len| len > limit_u64) {
        return Err(too_large(parts, body));
    }
    let mut chunks = Chunks::default();
    let read = if body
        .size_hint()
        .upper()
        .is_some_and(|upper| upper <= limit_u64)
    {
        // Bounded within the limit (a declared length, a buffered body): read in place,
        // without a box. A body that sends more than its own bound is refused where the
        // bound is crossed, and the rest is not read.
        let mut body = std::pin::pin!(body);
        read_into(body.as_mut(), &mut chunks, limit).await
    } else {
        let mut body = Box::pin(body);
        match read_into(body.as_mut(), &mut chunks, limit).await {
            Read::OverLimit => return Err(too_large(parts, body)),
            read => read,
        }
    };
    match read {
        // Trailers of a request are not kept: the handler gets the bytes.
        Read::Ended(_) => Ok(chunks.concat()),
        Read::Failed(_) => Err(problem::request_unreadable()),
        Read::OverLimit => Err(problem::request_too_large()),
    }
}

/// How long the rest of a refused body is read and dropped: at most [`LINGER`] in all,
/// and until [`LINGER_IDLE`] passes without a byte (nginx's `lingering_time` and
/// `lingering_timeout`).
const LINGER: std::time::Duration = std::time::Duration::from_secs(30);
const LINGER_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// The `413` for a body over the limit. The `413` goes out at once; the rest of the body
/// is read and dropped in the background, so that a client still sending it can read the
/// `413` (a connection closed with unread bytes is reset, and the client sees a broken pipe
/// instead), unless the client waits for `100 Continue` before sending: then it sends
/// nothing more.
fn too_large<B, R>(parts: &Parts, body: B) -> Response<ResponseBody<R>>
where
    B: Body<Data = Bytes> + Send + 'static,
{
    let expects = parts
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !expects && !body.is_end_stream() {
        tokio::spawn(async move {
            let mut body = std::pin::pin!(body);
            let drain = async {
                while let Ok(Some(Ok(_))) = tokio::time::timeout(LINGER_IDLE, body.frame()).await {}
            };
            let _ = tokio::time::timeout(LINGER, drain).await;
        });
    }
    problem::request_too_large()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::flown::tests::Bounded;

    fn request(chunks: &[&'static str], bound: u64) -> (Parts, Bounded) {
        let chunks = chunks.iter().map(|c| Bytes::from_static(c.as_bytes()));
        let body = Bounded {
            chunks: chunks.collect(),
            bound,
        };
        (Request::new(()).into_parts().0, body)
    }

    #[tokio::test]
    async fn a_request_body_bounded_within_the_limit_is_read_whole() {
        let (parts, body) = request(&["ab", "cd"], 4);
        let read = read_body::<_, Full<Bytes>>(&parts, body, 4).await;
        let Ok(read) = read else {
            panic!("refused a body within the limit")
        };
        assert_eq!(read, "abcd");
    }

    #[tokio::test]
    async fn a_request_body_longer_than_its_bound_is_refused_at_the_limit() {
        for bound in [4, u64::MAX] {
            let (parts, body) = request(&["abcd", "efgh", "ijkl"], bound);
            let read = read_body::<_, Full<Bytes>>(&parts, body, 6).await;
            let Err(refusal) = read else {
                panic!("read a body over the limit")
            };
            assert_eq!(
                refusal.status(),
                http::StatusCode::PAYLOAD_TOO_LARGE,
                "bound {bound}"
            );
        }
    }
}
