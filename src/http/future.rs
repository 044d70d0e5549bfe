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
use tokio::sync::{AcquireError, OwnedSemaphorePermit};
use tokio::time::Sleep;
use tower::Service;
use tower::util::Oneshot;

use super::Role;
use super::body::ResponseBody;
use super::error::ShareError;
use super::flown::Flown;
use super::metrics::Metrics;
use super::policy::Fallback;
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
        // A call of the inner service for this caller alone: a request without a key
        // (`role: None`), or a follower served on its own. A follower taking its turn
        // holds the turn's permit until its response is there.
        Direct {
            #[pin]
            oneshot: Oneshot<S, Request<ReqB>>,
            role: Option<Role>,
            role_header: bool,
            _permit: Option<OwnedSemaphorePermit>,
        },
        Coalesced {
            run: Run<K, FlightResult<ResB, S::Error>>,
            watch: Watch,
            // A follower's own request and service, kept to call the inner service
            // itself if it stops waiting or the response is not to be shared.
            own: Option<Own<S, ReqB>>,
            deadline: Option<Pin<Box<Sleep>>>,
        },
        // A follower waiting for its turn to call the inner service itself.
        WaitingTurn {
            acquire: Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>,
            own: Option<Own<S, ReqB>>,
            role_header: bool,
        },
        // The layer's own answer, such as `400` for a missing key.
        Answered { response: Option<Response<ResponseBody<ResB>>> },
    }
}

/// What a follower needs to be served on its own.
pub(crate) struct Own<S, ReqB> {
    pub(crate) inner: S,
    pub(crate) request: Request<ReqB>,
    pub(crate) fallback: Fallback,
}

/// Counts and logs a keyed caller that leaves before its flight completes.
pub(crate) struct Watch {
    pub(crate) role_header: bool,
    pub(crate) metrics: Metrics,
    pub(crate) key_hash: Option<KeyHash>,
    pub(crate) done: bool,
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
            state: State::Direct {
                oneshot,
                role: None,
                role_header: false,
                _permit: None,
            },
        }
    }

    /// A follower served by a call of its own.
    pub(crate) fn own(inner: S, request: Request<ReqB>, role_header: bool) -> Self {
        ResponseFuture {
            state: State::Direct {
                oneshot: Oneshot::new(inner, request),
                role: Some(Role::Own),
                role_header,
                _permit: None,
            },
        }
    }

    pub(crate) fn coalesced(
        run: Run<K, FlightResult<ResB, S::Error>>,
        watch: Watch,
        own: Option<Own<S, ReqB>>,
        deadline: Option<Pin<Box<Sleep>>>,
    ) -> Self {
        ResponseFuture {
            state: State::Coalesced {
                run,
                watch,
                own,
                deadline,
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
}

fn tag<B>(response: &mut Response<B>, role: Role, role_header: bool) {
    response.extensions_mut().insert(role);
    if role_header {
        response
            .headers_mut()
            .insert(ROLE_HEADER, role.header_value());
    }
}

impl<S, ReqB, ResB, K> Future for ResponseFuture<S, ReqB, ResB, K>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Send + 'static,
    S::Error: ShareError,
    ReqB: Send + 'static,
    K: Hash + Eq,
{
    type Output = Result<Response<ResponseBody<ResB>>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            let next = match this.state.as_mut().project() {
                StateProj::Direct {
                    oneshot,
                    role,
                    role_header,
                    ..
                } => {
                    let mut response = ready!(oneshot.poll(cx))?.map(ResponseBody::inner);
                    if let Some(role) = *role {
                        tag(&mut response, role, *role_header);
                    }
                    return Poll::Ready(Ok(response));
                }
                StateProj::Coalesced {
                    run,
                    watch,
                    own,
                    deadline,
                } => {
                    let outcome = match Pin::new(&mut *run).poll(cx) {
                        Poll::Ready(outcome) => outcome,
                        Poll::Pending => {
                            let expired = deadline
                                .as_mut()
                                .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                            if !expired {
                                return Poll::Pending;
                            }
                            // Leave the flight, which goes on for the others.
                            watch.done = true;
                            watch.metrics.follower_timed_out();
                            tracing::debug!(
                                key = watch.key_hash.map(|h| h.0),
                                "follower stopped waiting"
                            );
                            let own = own.take().expect("a follower keeps its request");
                            let role_header = watch.role_header;
                            this.state.set(fall_back(own, role_header));
                            continue;
                        }
                    };
                    watch.done = true;
                    let role = if outcome.is_leader() {
                        Role::Leader
                    } else {
                        Role::Follower
                    };
                    let mut response = match (outcome.into_value(), role) {
                        (Err(error), _) => return Poll::Ready(Err(S::Error::share(&error))),
                        (Ok(Flown::Buffered(buffered)), _) => buffered.into_response(),
                        (
                            Ok(Flown::TooLarge(slot) | Flown::Unshared { leader: slot, .. }),
                            Role::Leader,
                        ) => Flown::take_leader(&slot)
                            .expect("the leader's own response is taken once, by the leader"),
                        (Ok(Flown::TooLarge(_)), _) => problem::too_large_to_share(),
                        (Ok(Flown::Unshared { turn, .. }), _) => {
                            let own = own.take().expect("a follower keeps its request");
                            let role_header = watch.role_header;
                            this.state.set(match turn {
                                None => State::Direct {
                                    oneshot: Oneshot::new(own.inner, own.request),
                                    role: Some(Role::Own),
                                    role_header,
                                    _permit: None,
                                },
                                Some(turn) => State::WaitingTurn {
                                    acquire: Box::pin(turn.acquire_owned()),
                                    own: Some(own),
                                    role_header,
                                },
                            });
                            continue;
                        }
                    };
                    tag(&mut response, role, watch.role_header);
                    return Poll::Ready(Ok(response));
                }
                StateProj::WaitingTurn {
                    acquire,
                    own,
                    role_header,
                } => {
                    // The semaphore is never closed, so acquiring fails only if it were.
                    let permit = ready!(acquire.as_mut().poll(cx)).ok();
                    let own = own.take().expect("polled after completion");
                    State::Direct {
                        oneshot: Oneshot::new(own.inner, own.request),
                        role: Some(Role::Own),
                        role_header: *role_header,
                        _permit: permit,
                    }
                }
                StateProj::Answered { response } => {
                    return Poll::Ready(Ok(response.take().expect("polled after completion")));
                }
            };
            this.state.set(next);
        }
    }
}

/// The state of a follower that stops waiting: a `503`, or a call of its own.
fn fall_back<S, ReqB, ResB, K>(own: Own<S, ReqB>, role_header: bool) -> State<S, ReqB, ResB, K>
where
    S: Service<Request<ReqB>>,
    K: Hash + Eq,
{
    match own.fallback {
        Fallback::ServiceUnavailable => State::Answered {
            response: Some(problem::gave_up_waiting()),
        },
        Fallback::PassThrough => State::Direct {
            oneshot: Oneshot::new(own.inner, own.request),
            role: Some(Role::Own),
            role_header,
            _permit: None,
        },
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
            State::WaitingTurn { .. } => "WaitingTurn",
            State::Answered { .. } => "Answered",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
