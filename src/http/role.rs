use http::HeaderValue;

/// Whether a response's caller led its flight or followed it.
///
/// [`HttpCoalesce`](super::HttpCoalesce) puts it in the extensions of every response to a
/// keyed request, and, if [`role_header`](super::HttpCoalesceLayer::role_header) is on,
/// in a `coalesce-role: leader` or `coalesce-role: follower` header. Requests without a key
/// (passed through) and requests answered by the layer itself (`400` for a missing key) get
/// none.
///
/// ```
/// use http::Response;
/// use tower_coalesce::http::Role;
///
/// # let response = Response::new(());
/// match response.extensions().get::<Role>() {
///     Some(Role::Leader) => { /* this caller's request ran the handler */ }
///     Some(Role::Follower) => { /* it received a copy of another caller's response */ }
///     Some(_) => { /* it found a flight, but was served by a call of its own */ }
///     None => { /* not coalesced */ }
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// The caller started the flight: its request is the one the inner service received.
    Leader,
    /// The caller joined a running flight: its request never reached the inner service,
    /// and its response is a copy of the flight's one response.
    Follower,
    /// The caller found a flight for its key but was served by a call of its own: it
    /// stopped waiting ([`Fallback::PassThrough`](super::Fallback::PassThrough)), was let
    /// through as a duplicate ([`OnDuplicate::PassThrough`](super::OnDuplicate::PassThrough)),
    /// or the flight's response was [not to be shared](super::DoNotShare).
    Own,
}

impl Role {
    pub(crate) fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Own => "own",
        })
    }
}
