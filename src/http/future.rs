//! Future types

use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::header::HeaderName;
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Method, Request, Response};
use pin_project_lite::pin_project;
use tower::Service;
use tower::util::Oneshot;

use super::Role;
use super::body::ResponseBody;
use super::error::ShareError;
use super::flown::Flown;
use super::metrics::Metrics;
use super::problem;
use super::service::{FlightResult, KeyHash};
use crate::single_flight::Run;

/// The key of a flight in the registry: the caller's scope, the request's method and path,
/// and the key its [`MakeKey`](crate::coalesce::MakeKey) made. Flights are never shared
/// across scopes or routes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FlightKey<Scope, Key> {
    scope: Option<Scope>,
    route: Route,
    key: Key,
}

impl<Scope, Key> FlightKey<Scope, Key> {
    pub(crate) fn new(scope: Option<Scope>, parts: &Parts, key: Key) -> Self {
        FlightKey {
            scope,
            route: Route {
                method: parts.method.clone(),
                path_and_query: parts.uri.path_and_query().cloned(),
            },
            key,
        }
    }
}

#[derive(Debug, Clone)]
struct Route {
    method: Method,
    // The URI's own bytes, shared rather than copied; only its path counts.
    path_and_query: Option<PathAndQuery>,
}

impl Route {
    fn path(&self) -> &str {
        self.path_and_query.as_ref().map_or("/", PathAndQuery::path)
    }
}

impl PartialEq for Route {
    fn eq(&self, other: &Self) -> bool {
        self.method == other.method && self.path() == other.path()
    }
}

impl Eq for Route {}

impl Hash for Route {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.method.hash(state);
        self.path().hash(state);
    }
}

const ROLE_HEADER: HeaderName = HeaderName::from_static("coalesce-role");

pin_project! {
    /// Response future of [`HttpCoalesce`](super::HttpCoalesce).
    ///
    /// Dropping it leaves the request's flight (see the service's docs on cancellation).
    /// If the inner call panics, polling this future panics, as it does for every caller
    /// of the flight.
    pub struct ResponseFuture<S, ReqB, ResB, K>
    where
        S: Service<Request<ReqB>>,
        K: Hash,
        K: Eq,
    {
        #[pin]
        state: State<S, ReqB, ResB, K>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqB, ResB, K>
    where
        S: Service<Request<ReqB>>,
        K: Hash,
        K: Eq,
    {
        // A request without a key: straight to the inner service.
        Direct { #[pin] oneshot: Oneshot<S, Request<ReqB>> },
        Coalesced { run: Run<K, FlightResult<ResB, S::Error>>, watch: Watch },
        // The layer's own answer, such as `400` for a missing key.
        Answered { response: Option<Response<ResponseBody<ResB>>> },
    }
}

/// Counts and logs a keyed caller that leaves before its flight completes.
struct Watch {
    role_header: bool,
    metrics: Metrics,
    key_hash: Option<KeyHash>,
    done: bool,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.caller_cancelled();
            tracing::debug!(key = self.key_hash.map(|h| h.0), "caller cancelled");
        }
    }
}

impl<S, ReqB, ResB, K> ResponseFuture<S, ReqB, ResB, K>
where
    S: Service<Request<ReqB>>,
    K: Hash + Eq,
{
    pub(crate) fn direct(oneshot: Oneshot<S, Request<ReqB>>) -> Self {
        ResponseFuture {
            state: State::Direct { oneshot },
        }
    }

    pub(crate) fn coalesced(
        run: Run<K, FlightResult<ResB, S::Error>>,
        role_header: bool,
        metrics: Metrics,
        key_hash: Option<KeyHash>,
    ) -> Self {
        let watch = Watch {
            role_header,
            metrics,
            key_hash,
            done: false,
        };
        ResponseFuture {
            state: State::Coalesced { run, watch },
        }
    }

    pub(crate) fn answered(response: Response<ResponseBody<ResB>>) -> Self {
        ResponseFuture {
            state: State::Answered {
                response: Some(response),
            },
        }
    }
}

impl<S, ReqB, ResB, K> Future for ResponseFuture<S, ReqB, ResB, K>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: ShareError,
    K: Hash + Eq,
{
    type Output = Result<Response<ResponseBody<ResB>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Direct { oneshot } => {
                let response = ready!(oneshot.poll(cx))?;
                Poll::Ready(Ok(response.map(ResponseBody::inner)))
            }
            StateProj::Coalesced { run, watch } => {
                let outcome = ready!(Pin::new(run).poll(cx));
                watch.done = true;
                let role = if outcome.is_leader() {
                    Role::Leader
                } else {
                    Role::Follower
                };
                let mut response = match outcome.into_value() {
                    Ok(Flown::Buffered(buffered)) => buffered.into_response(),
                    Ok(Flown::TooLarge(slot)) => match role {
                        Role::Leader => Flown::take_too_large(&slot)
                            .expect("the over-limit response is taken once, by the leader"),
                        Role::Follower => problem::too_large_to_share(),
                    },
                    Err(error) => return Poll::Ready(Err(S::Error::share(&error))),
                };
                response.extensions_mut().insert(role);
                if watch.role_header {
                    response
                        .headers_mut()
                        .insert(ROLE_HEADER, role.header_value());
                }
                Poll::Ready(Ok(response))
            }
            StateProj::Answered { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
        }
    }
}

impl<S, ReqB, ResB, K> fmt::Debug for ResponseFuture<S, ReqB, ResB, K>
where
    S: Service<Request<ReqB>>,
    K: Hash + Eq,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Direct { .. } => "Direct",
            State::Coalesced { .. } => "Coalesced",
            State::Answered { .. } => "Answered",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
