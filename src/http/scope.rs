//! Scopes: whose requests may share a flight.
//!
//! A response may carry one user's data, so [`HttpCoalesce`](super::HttpCoalesce) never
//! lets two callers with different identities share a flight, whatever the key. The scope
//! is a second key, made from the request head by any
//! [`MakeKey<Parts>`](crate::coalesce::MakeKey): the flight key is the pair of the scope
//! and the key. A scope of `None` means "no identity": such callers share flights with each
//! other only.
//!
//! - [`DefaultScope`] (the default): the `Authorization` and `Cookie` headers.
//! - [`headers`]: other headers, such as an API key header.
//! - A closure, for an identity that a middleware above put in the request's extensions:
//!   `|parts: &Parts| parts.extensions.get::<UserId>().cloned()`.
//! - [`Unscoped`]: **every caller shares with every other**. Use it only where responses
//!   hold nothing private to a caller, for example public, read-only data.
//!
//! A closure scope (or key) needs its argument's type spelled out, `&Parts`: Rust infers
//! closure argument types from the call site, and the layer's is generic. It reads an
//! extension that a layer *before* this one inserted; with axum, that is a `.layer` call
//! made *after* this one (axum runs the last `.layer` first):
//!
//! ```
//! use axum::{Router, routing::post};
//! use http::request::Parts;
//! use tower_coalesce::http::{HttpCoalesceLayer, key};
//!
//! #[derive(Clone)]
//! struct UserId(String);
//!
//! async fn auth(mut request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
//!     // Check the credentials; then say who the caller is.
//!     request.extensions_mut().insert(UserId("u-1".into()));
//!     next.run(request).await
//! }
//!
//! let app: Router = Router::new()
//!     .route("/orders", post(|| async { "created" }))
//!     .layer(
//!         HttpCoalesceLayer::new(key::idempotency_key())
//!             .scope(|parts: &Parts| parts.extensions.get::<UserId>().map(|user| user.0.clone()))
//!             .require_key(true),
//!     )
//!     .layer(axum::middleware::from_fn(auth)); // runs first
//! ```

use std::sync::Arc;

use http::HeaderValue;
use http::header::{AUTHORIZATION, COOKIE, HeaderName};
use http::request::Parts;

use crate::coalesce::MakeKey;

/// The default scope: the values of the `Authorization` and `Cookie` headers.
///
/// Two callers share a flight only if both headers are byte-identical in their requests
/// (or missing from both). Cookies that vary between requests of one user (a changing
/// analytics cookie, say) make that user's requests not coalesce; scope by the header or
/// extension that carries the identity instead.
///
/// ```
/// use tower_coalesce::coalesce::MakeKey;
/// use tower_coalesce::http::scope::DefaultScope;
///
/// let scope = DefaultScope::default();
/// let head = |token: &str| {
///     let request = http::Request::get("/me").header("authorization", token);
///     request.body(()).unwrap().into_parts().0
/// };
/// assert_eq!(scope.make_key(&head("Bearer a")), scope.make_key(&head("Bearer a")));
/// assert_ne!(scope.make_key(&head("Bearer a")), scope.make_key(&head("Bearer b")));
/// ```
#[derive(Debug, Clone)]
pub struct DefaultScope {
    headers: ScopeHeaders,
}

impl Default for DefaultScope {
    fn default() -> Self {
        DefaultScope {
            headers: headers([AUTHORIZATION, COOKIE]),
        }
    }
}

impl MakeKey<Parts> for DefaultScope {
    type Key = Vec<(usize, HeaderValue)>;

    fn make_key(&self, parts: &Parts) -> Option<Self::Key> {
        self.headers.make_key(parts)
    }
}

/// Scopes by the values of the headers `names` (every value of each, in order).
///
/// An app that authenticates with a header of its own (an API key, a session header) must
/// name it: the default scope reads only `Authorization` and `Cookie`, so without this,
/// two users' requests with equal keys would share one response.
///
/// ```
/// use tower_coalesce::coalesce::MakeKey;
/// use tower_coalesce::http::{HttpCoalesceLayer, key, scope};
///
/// let by_api_key = scope::headers(["x-api-key"]);
/// let head = |api_key: &str| {
///     let request = http::Request::post("/orders").header("x-api-key", api_key);
///     request.body(()).unwrap().into_parts().0
/// };
/// assert_ne!(by_api_key.make_key(&head("alice")), by_api_key.make_key(&head("bob")));
///
/// let layer = HttpCoalesceLayer::new(key::idempotency_key()).scope(by_api_key);
/// ```
///
/// # Panics
///
/// If a name is not a valid header name.
pub fn headers<I>(names: I) -> ScopeHeaders
where
    I: IntoIterator,
    I::Item: TryInto<HeaderName>,
    <I::Item as TryInto<HeaderName>>::Error: std::fmt::Debug,
{
    let names: Vec<HeaderName> = names
        .into_iter()
        .map(|name| name.try_into().expect("invalid header name for a scope"))
        .collect();
    ScopeHeaders {
        names: names.into(),
    }
}

/// Scope made by [`headers`].
#[derive(Debug, Clone)]
pub struct ScopeHeaders {
    names: Arc<[HeaderName]>,
}

impl MakeKey<Parts> for ScopeHeaders {
    // Each value is tagged with the index of its header, so that values can't move from
    // one header to another and still compare equal.
    type Key = Vec<(usize, HeaderValue)>;

    fn make_key(&self, parts: &Parts) -> Option<Self::Key> {
        let scope: Vec<_> = self
            .names
            .iter()
            .enumerate()
            .flat_map(|(i, name)| {
                parts
                    .headers
                    .get_all(name)
                    .iter()
                    .map(move |v| (i, v.clone()))
            })
            .collect();
        (!scope.is_empty()).then_some(scope)
    }
}

/// No scope: callers with equal keys share flights whoever they are.
///
/// **One caller may then receive a response that was made for another.** Use it only where
/// responses hold nothing private to a caller, or where the key itself proves the identity.
///
/// ```
/// use tower_coalesce::http::{HttpCoalesceLayer, key};
///
/// // Public, read-only data: one flight per path for everyone.
/// let layer = HttpCoalesceLayer::new(key::method_path_and_query()).unscoped();
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Unscoped;

impl MakeKey<Parts> for Unscoped {
    type Key = ();

    fn make_key(&self, _: &Parts) -> Option<()> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: http::request::Builder) -> Parts {
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn default_scope_tells_identities_apart() {
        let scope = DefaultScope::default();
        let alice = parts(http::Request::post("/").header("authorization", "Bearer a"));
        let bob = parts(http::Request::post("/").header("authorization", "Bearer b"));
        let cookie = parts(http::Request::post("/").header("cookie", "Bearer a"));
        let anonymous = parts(http::Request::post("/"));
        assert_eq!(scope.make_key(&alice), scope.make_key(&alice.clone()));
        assert_ne!(scope.make_key(&alice), scope.make_key(&bob));
        // The same bytes in another header are another identity.
        assert_ne!(scope.make_key(&alice), scope.make_key(&cookie));
        assert_eq!(scope.make_key(&anonymous), None);
    }
}
