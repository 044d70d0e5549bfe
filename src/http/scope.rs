//! Scopes: whose requests may share a flight.
//!
//! A response may carry one user's data, so [`HttpCoalesce`](super::HttpCoalesce) never
//! lets two callers with different identities share a flight, whatever the key. The scope
//! is a second key, made from the request head by any
//! [`MakeKey<Parts>`](crate::coalesce::MakeKey): the flight key is the pair of the scope
//! and the key.
//!
//! **A scope that returns `None` has not found out who the caller is**, and such a request
//! is shared with nobody: it runs on its own, is never replayed, and is counted
//! ([`Metrics::requests_without_identity`](super::Metrics::requests_without_identity)) and
//! logged at `WARN` the first time;
//! [`require_key(true)`](super::HttpCoalesceLayer::require_key) refuses it with `400`. So
//! a scope that reads an extension an auth layer has not inserted yet (the layers in the
//! wrong order) costs coalescing, never another user's answer. Anonymous callers share
//! with each other only where the scope says so with a value: the ready-made scopes below
//! give an empty identity to a request that carries none of their headers; a closure
//! returns, say, `Some(Identity::Anonymous)` of its own type.
//!
//! - [`DefaultScope`] (the default): the `Authorization` and `Cookie` headers; a request
//!   with a [credential header it does not read](DefaultScope#credentials-it-does-not-read)
//!   (`x-api-key`, ...) has no identity.
//! - [`headers`]: other headers, such as an API key header.
//! - [`extension`], for an identity that a middleware above put in the request's
//!   extensions: `scope::extension::<UserId>()`; or any closure over the head
//!   (`|parts: &Parts| ...`).
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
//!             // `None` (no `UserId` yet): not shared, and refused under `require_key`.
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
/// (or missing from both: anonymous callers share with each other). Cookies that vary
/// between requests of one user (a changing analytics cookie, say) make that user's
/// requests not coalesce; scope by the header or extension that carries the identity
/// instead.
///
/// # Credentials it does not read
///
/// An app that authenticates by a header of its own would have every user look anonymous
/// to this scope, and share. So a request that carries one of the headers of
/// [`CREDENTIAL_HEADERS`] (`x-api-key`, `api-key`, `apikey`, `x-auth-token`,
/// `x-access-token`, `x-session-token`, `x-session-id`, `x-user-id`, `x-forwarded-user`,
/// `x-auth-request-user`) has **no identity** here: it is not shared, and the layer logs a
/// `WARN` that names the header. Scope by it instead, with [`headers`] (for example
/// `scope::headers(["x-api-key"])`), or by the extension your auth layer inserts.
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
#[derive(Debug, Clone, Default)]
pub struct DefaultScope {
    _private: (),
}

impl MakeKey<Parts> for DefaultScope {
    type Key = Vec<(usize, HeaderValue)>;

    // What `credential_ignored` and `headers([AUTHORIZATION, COOKIE])` say, in one pass
    // over the headers: every keyed request asks it, and two lookups by name and a pass for
    // the credentials cost twice as much.
    fn make_key(&self, parts: &Parts) -> Option<Self::Key> {
        let mut scope = Vec::new();
        for (name, value) in &parts.headers {
            if name == AUTHORIZATION {
                scope.push((0, value.clone()));
            } else if name == COOKIE {
                scope.push((1, value.clone()));
            } else if credential(name).is_some() {
                return None;
            }
        }
        // As `headers` makes it: every `Authorization` value, then every `Cookie` value,
        // each in its order (the sort is stable).
        scope.sort_by_key(|&(header, _)| header);
        Some(scope)
    }
}

/// Headers that carry a credential or an identity, which [`DefaultScope`] does not read: a
/// request that has one has no identity under the default scope.
pub const CREDENTIAL_HEADERS: [HeaderName; 10] = [
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
    HeaderName::from_static("apikey"),
    HeaderName::from_static("x-auth-token"),
    HeaderName::from_static("x-access-token"),
    HeaderName::from_static("x-session-token"),
    HeaderName::from_static("x-session-id"),
    HeaderName::from_static("x-user-id"),
    HeaderName::from_static("x-forwarded-user"),
    HeaderName::from_static("x-auth-request-user"),
];

/// The first of [`CREDENTIAL_HEADERS`] that the request carries, if any: for the default
/// scope, and for the layer's warning, whatever the scope.
pub(crate) fn credential_ignored(parts: &Parts) -> Option<&'static HeaderName> {
    parts.headers.keys().find_map(credential)
}

/// `name`, if it is one of [`CREDENTIAL_HEADERS`].
fn credential(name: &HeaderName) -> Option<&'static HeaderName> {
    static CREDENTIALS: [HeaderName; 10] = CREDENTIAL_HEADERS;
    // Every keyed request asks this of each header: a `match` on the name (a jump on its
    // length, then one comparison) costs a tenth of comparing it with the ten names.
    let i = match name.as_str() {
        "x-api-key" => 0,
        "api-key" => 1,
        "apikey" => 2,
        "x-auth-token" => 3,
        "x-access-token" => 4,
        "x-session-token" => 5,
        "x-session-id" => 6,
        "x-user-id" => 7,
        "x-forwarded-user" => 8,
        "x-auth-request-user" => 9,
        _ => return None,
    };
    Some(&CREDENTIALS[i])
}

/// Scopes by the values of the headers `names` (every value of each, in order).
///
/// An app that authenticates with a header of its own (an API key, a session header)
/// names it here: the default scope reads only `Authorization` and `Cookie` (and gives no
/// identity to a request with a [credential it does not
/// read](DefaultScope#credentials-it-does-not-read)). A request without any of `names` is
/// anonymous: it shares with other anonymous requests only.
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

    /// Never `None`: a request without any of the headers is anonymous (an empty
    /// identity), not unidentified.
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
        Some(scope)
    }
}

/// Scopes by the extension of type `T` that a layer before this one (the auth middleware)
/// put in the request: `None` (no such extension yet, say because the auth layer runs
/// after this one) means "not identified", and such a request is shared with nobody.
///
/// `T` is the scope's key: callers are the same identity when their `T`s are equal, so
/// it derives `PartialEq`, `Eq` and `Hash` (a newtype of a `String` or an integer needs
/// nothing else). A shared store digests the bytes its `Hash` writes, which are the same in
/// every process.
///
/// ```
/// use axum::{Router, routing::post};
/// use tower_coalesce::http::{HttpCoalesceLayer, key, scope};
///
/// #[derive(Clone, PartialEq, Eq, Hash)]
/// struct UserId(String);
///
/// async fn auth(mut request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
///     request.extensions_mut().insert(UserId("u-1".into()));
///     next.run(request).await
/// }
///
/// let app: Router = Router::new()
///     .route("/orders", post(|| async { "created" }))
///     .layer(HttpCoalesceLayer::new(key::idempotency_key()).scope(scope::extension::<UserId>()))
///     .layer(axum::middleware::from_fn(auth)); // runs first
/// ```
pub fn extension<T>() -> Extension<T>
where
    T: Clone + std::hash::Hash + Eq + Send + Sync + 'static,
{
    Extension(std::marker::PhantomData)
}

/// Scope made by [`extension`].
pub struct Extension<T>(std::marker::PhantomData<fn() -> T>);

impl<T> Clone for Extension<T> {
    fn clone(&self) -> Self {
        Extension(std::marker::PhantomData)
    }
}

impl<T> std::fmt::Debug for Extension<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Extension")
            .field(&std::any::type_name::<T>())
            .finish()
    }
}

impl<T> MakeKey<Parts> for Extension<T>
where
    T: Clone + std::hash::Hash + Eq + Send + Sync + 'static,
{
    type Key = ExtensionKey<T>;

    fn make_key(&self, parts: &Parts) -> Option<ExtensionKey<T>> {
        parts.extensions.get::<T>().cloned().map(ExtensionKey)
    }
}

/// The key of an [`extension`] scope: the extension, encoded for a shared store by the
/// bytes its `Hash` writes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ExtensionKey<T>(T);

impl<T: std::hash::Hash> super::key::EncodeKey for ExtensionKey<T> {
    fn encode_key(&self, out: &mut Vec<u8>) {
        self.0.hash(&mut HashBytes(out));
    }
}

impl<T> std::fmt::Debug for ExtensionKey<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // An identity: not for logs.
        f.write_str("ExtensionKey(..)")
    }
}

/// A `Hasher` that keeps what it is fed, integers in a fixed byte order: the same bytes
/// for the same value in every process (`std`'s `Hash` impls end strings with `0xff` and
/// prefix slices with their length, so that fields don't run into each other).
struct HashBytes<'a>(&'a mut Vec<u8>);

impl std::hash::Hasher for HashBytes<'_> {
    fn finish(&self) -> u64 {
        unreachable!("only written to")
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
    fn write_u8(&mut self, i: u8) {
        self.0.push(i);
    }
    fn write_u16(&mut self, i: u16) {
        self.0.extend_from_slice(&i.to_be_bytes());
    }
    fn write_u32(&mut self, i: u32) {
        self.0.extend_from_slice(&i.to_be_bytes());
    }
    fn write_u64(&mut self, i: u64) {
        self.0.extend_from_slice(&i.to_be_bytes());
    }
    fn write_u128(&mut self, i: u128) {
        self.0.extend_from_slice(&i.to_be_bytes());
    }
    fn write_usize(&mut self, i: usize) {
        // The same bytes on 32- and 64-bit machines.
        self.write_u64(i as u64);
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
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: http::request::Builder) -> Parts {
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn an_extension_scope_encodes_its_value_alike_everywhere_and_apart_from_others() {
        use crate::http::key::EncodeKey;
        #[derive(Clone, PartialEq, Eq, Hash)]
        struct UserId(String);
        #[derive(Clone, PartialEq, Eq, Hash)]
        struct Pair(String, String);
        let scope = extension::<UserId>();
        let of = |user: &str| {
            let mut req = http::Request::new(());
            req.extensions_mut().insert(UserId(user.into()));
            let key = scope.make_key(&req.into_parts().0).unwrap();
            let mut out = Vec::new();
            key.encode_key(&mut out);
            out
        };
        assert_eq!(of("u-1"), b"u-1\xff");
        assert_ne!(of("u-1"), of("u-2"));
        let pair = |a: &str, b: &str| {
            let mut out = Vec::new();
            ExtensionKey(Pair(a.into(), b.into())).encode_key(&mut out);
            out
        };
        assert_ne!(
            pair("ab", "c"),
            pair("a", "bc"),
            "fields don't run into each other"
        );
        let mut number = Vec::new();
        ExtensionKey(42u64).encode_key(&mut number);
        assert_eq!(number, 42u64.to_be_bytes());
        assert!(
            extension::<UserId>()
                .make_key(&parts(http::Request::get("/")))
                .is_none()
        );
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
        // Anonymous is an identity, shared by every anonymous caller.
        assert_eq!(scope.make_key(&anonymous), Some(Vec::new()));
    }

    #[test]
    fn the_default_scope_is_the_scope_of_authorization_and_cookie() {
        // Its one pass gives the key `headers` gives, whatever order the headers came in,
        // repeated values included: a store keeps responses under it.
        let by_headers = headers([AUTHORIZATION, COOKIE]);
        let orders: [&[(&str, &str)]; 5] = [
            &[("authorization", "Bearer a"), ("cookie", "s=1")],
            &[("cookie", "s=1"), ("authorization", "Bearer a")],
            &[
                ("cookie", "s=1"),
                ("x-other", "v"),
                ("cookie", "t=2"),
                ("authorization", "A"),
            ],
            &[
                ("authorization", "A"),
                ("authorization", "B"),
                ("cookie", "c"),
            ],
            &[("x-other", "v")],
        ];
        for headers in orders {
            let mut request = http::Request::post("/");
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let head = parts(request);
            let key = DefaultScope::default().make_key(&head);
            assert_eq!(key, by_headers.make_key(&head), "{headers:?}");
        }
    }

    #[test]
    fn an_extension_scope_is_the_extension_or_unidentified() {
        #[derive(Clone, PartialEq, Eq, Hash, Debug)]
        struct UserId(u32);
        let scope = extension::<UserId>();
        let mut alice = parts(http::Request::get("/"));
        alice.extensions.insert(UserId(1));
        assert_eq!(scope.make_key(&alice), Some(ExtensionKey(UserId(1))));
        // The auth layer has not run yet: not anonymous, unidentified.
        assert_eq!(scope.make_key(&parts(http::Request::get("/"))), None);
    }

    #[test]
    fn a_credential_the_default_scope_does_not_read_leaves_the_caller_unidentified() {
        let scope = DefaultScope::default();
        for name in &CREDENTIAL_HEADERS {
            let alice = parts(http::Request::get("/").header(name, "alice-key"));
            assert_eq!(scope.make_key(&alice), None, "{name}");
            // The warning names the header the request carries.
            assert_eq!(credential_ignored(&alice), Some(name));
            let with_auth = parts(
                http::Request::get("/")
                    .header("authorization", "Bearer a")
                    .header(name, "alice-key"),
            );
            assert_eq!(scope.make_key(&with_auth), None, "{name}");
        }
        // Checked both ways: a request with more headers than the list is long.
        let mut many = http::Request::get("/");
        for i in 0..12 {
            many = many.header(format!("x-other-{i}"), "v");
        }
        assert!(scope.make_key(&parts(many)).is_some());
        let mut many = http::Request::get("/").header("x-user-id", "u-1");
        for i in 0..12 {
            many = many.header(format!("x-other-{i}"), "v");
        }
        assert_eq!(scope.make_key(&parts(many)), None);
        // Named, such a header is the identity.
        let by_key = headers(["x-api-key"]);
        let alice = parts(http::Request::get("/").header("x-api-key", "alice-key"));
        let bob = parts(http::Request::get("/").header("x-api-key", "bob-key"));
        assert_ne!(by_key.make_key(&alice), by_key.make_key(&bob));
    }
}
