//! Ready-made coalescing keys for HTTP requests.
//!
//! From the request head: [`header`], [`idempotency_key`], [`method_and_path`],
//! [`method_path_and_query`], [`path_param`]. From the body: [`json`] and [`form`], for apps
//! that send the id in the payload (`{"id": "c-1", "name": ...}`): the layer then reads the
//! body (up to its [request body limit](super::HttpCoalesceLayer::request_body_limit))
//! before it makes the key, and the inner service still receives the whole body.
//!
//! Every key maker here implements [`MakeKey<http::request::Parts>`](crate::coalesce::MakeKey),
//! as does any closure `Fn(&Parts) -> Option<K>`, and tuples of key makers combine them
//! (the key is the tuple of keys, and `None` if any part is `None`):
//!
//! ```
//! use http::request::Parts;
//! use tower_coalesce::http::{HttpCoalesceLayer, key};
//!
//! // The idempotency key the client sent, on this method and path only.
//! let layer = HttpCoalesceLayer::new((key::idempotency_key(), key::method_and_path()));
//!
//! // A client id in a header of your own.
//! let layer = HttpCoalesceLayer::new(key::header("x-client-id"));
//!
//! // Anything else: a function of the request head, whose argument type `from_fn` gives.
//! let layer = HttpCoalesceLayer::new(key::from_fn(|parts| {
//!     parts.uri.query().map(str::to_owned)
//! }));
//!
//! // The same as a bare closure, whose argument type must then be spelled out.
//! let layer = HttpCoalesceLayer::new(|parts: &Parts| parts.uri.query().map(str::to_owned));
//! ```
//!
//! Whatever the key, the layer also scopes it to the caller's identity (see
//! [`HttpCoalesceLayer::scope`](super::HttpCoalesceLayer::scope)), and never shares a flight
//! between requests whose method, path, query or body differ (see
//! [`OnMismatch`](super::OnMismatch)).
//!
//! Keys, and scopes, implement [`EncodeKey`]: stores shared by several instances keep
//! flights under a digest of these bytes. It is implemented for strings, byte strings,
//! integers, header values, methods, `Option`s, `Vec`s and tuples of these; a closure that
//! returns a type of your own needs an implementation (or returns a `String`).

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method};

use self::json_pointer::Pointer;
use crate::coalesce::MakeKey;

mod json_pointer;

/// Keys requests by what `f` returns for their head: a closure whose argument type needs
/// no annotation (a bare closure given to the layer needs `|parts: &Parts|`, because the
/// layer's bound is generic), and `http` need not be a dependency of the app.
///
/// ```
/// use tower_coalesce::http::{HttpCoalesceLayer, key};
///
/// #[derive(Clone)]
/// struct TenantId(String);
///
/// // The tenant an earlier layer put in the extensions, and the path.
/// let layer = HttpCoalesceLayer::new(key::from_fn(|parts| {
///     let tenant = parts.extensions.get::<TenantId>()?;
///     Some((tenant.0.clone(), parts.uri.path().to_owned()))
/// }));
/// ```
pub fn from_fn<F, K>(f: F) -> FromFn<F>
where
    F: Fn(&Parts) -> Option<K>,
{
    FromFn(f)
}

/// Key made by [`from_fn`].
#[derive(Clone)]
pub struct FromFn<F>(F);

impl<F, K> MakeKey<Parts> for FromFn<F>
where
    F: Fn(&Parts) -> Option<K>,
    K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
{
    type Key = K;

    fn make_key(&self, parts: &Parts) -> Option<K> {
        (self.0)(parts)
    }
}

impl<F> fmt::Debug for FromFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("FromFn")
            .field(&std::any::type_name::<F>())
            .finish()
    }
}

/// The longest header value [`header`] accepts as a key, in bytes.
pub const MAX_HEADER_KEY_LEN: usize = 255;

/// Keys requests by the value of the header `name`.
///
/// A request has no key (and passes through, or gets a `400` under
/// [`require_key`](super::HttpCoalesceLayer::require_key)) if the header is missing,
/// sent more than once, empty, longer than [`MAX_HEADER_KEY_LEN`] bytes, or has bytes
/// other than visible ASCII and spaces.
///
/// ```
/// use tower_coalesce::coalesce::MakeKey;
/// use tower_coalesce::http::key;
///
/// let by_client = key::header("x-client-id");
/// let head = |client: &str| {
///     let request = http::Request::post("/api/clients").header("x-client-id", client);
///     request.body(()).unwrap().into_parts().0
/// };
/// assert_eq!(by_client.make_key(&head("c-1")), by_client.make_key(&head("c-1")));
/// assert_ne!(by_client.make_key(&head("c-1")), by_client.make_key(&head("c-2")));
/// let (missing, _) = http::Request::post("/api/clients").body(()).unwrap().into_parts();
/// assert_eq!(by_client.make_key(&missing), None);
/// ```
///
/// # Panics
///
/// If `name` is not a valid header name.
pub fn header<N>(name: N) -> HeaderKey
where
    N: TryInto<HeaderName>,
    N::Error: fmt::Debug,
{
    HeaderKey {
        name: name
            .try_into()
            .expect("invalid header name for a coalescing key"),
    }
}

/// Keys requests by their `Idempotency-Key` header, as [`header`] does.
///
/// ```
/// use tower_coalesce::coalesce::MakeKey;
/// use tower_coalesce::http::key;
///
/// let (parts, _) = http::Request::post("/payments")
///     .header("Idempotency-Key", "8e03978e-40d5-43e8-bc93-6894a57f9324")
///     .body(())
///     .unwrap()
///     .into_parts();
/// let key = key::idempotency_key().make_key(&parts).unwrap();
/// assert_eq!(key, "8e03978e-40d5-43e8-bc93-6894a57f9324");
/// ```
pub fn idempotency_key() -> HeaderKey {
    header(HeaderName::from_static("idempotency-key"))
}

/// Keys requests by method and path (not the query): every `POST /api/clients` of one
/// caller shares a flight while it runs.
///
/// ```
/// use tower_coalesce::coalesce::MakeKey;
/// use tower_coalesce::http::key;
///
/// let key = key::method_and_path();
/// let head = |method: http::Method, uri: &str| {
///     let request = http::Request::builder().method(method).uri(uri);
///     request.body(()).unwrap().into_parts().0
/// };
/// let post = key.make_key(&head(http::Method::POST, "/api/clients?page=1"));
/// assert_eq!(post, key.make_key(&head(http::Method::POST, "/api/clients?page=2")));
/// assert_ne!(post, key.make_key(&head(http::Method::PUT, "/api/clients?page=1")));
/// ```
///
/// The query is not in the key, but a flight is still never shared between requests whose
/// queries differ: the second waits for the first to end (see
/// [`OnMismatch`](super::OnMismatch)).
pub fn method_and_path() -> MethodAndPath {
    MethodAndPath { _p: () }
}

/// Keys requests by method, path and query.
///
/// ```
/// use tower_coalesce::coalesce::MakeKey;
/// use tower_coalesce::http::key;
///
/// let key = key::method_path_and_query();
/// let head = |uri: &str| http::Request::get(uri).body(()).unwrap().into_parts().0;
/// assert_eq!(key.make_key(&head("/report?year=2025")), key.make_key(&head("/report?year=2025")));
/// assert_ne!(key.make_key(&head("/report?year=2025")), key.make_key(&head("/report?year=2026")));
/// ```
pub fn method_path_and_query() -> MethodPathAndQuery {
    MethodPathAndQuery { _p: () }
}

/// Keys requests by one parameter of a path pattern such as `/api/clients/{id}`.
///
/// The pattern is matched segment by segment against the path the layer sees. With axum's
/// `Router::nest`, a layer on the outer router sees the full path, so the pattern includes
/// the nest's prefix (`/api/clients/{id}` under `nest("/api", ..)`); a layer on the nested
/// router sees the path without it. Requests whose path does not match have no key (see
/// [`Metrics::requests_without_key`](super::Metrics::requests_without_key)); the warning
/// the layer logs for the first one names the pattern to write when the path matches it
/// with a prefix more or less.
///
/// ```
/// use tower_coalesce::coalesce::MakeKey;
/// use tower_coalesce::http::key;
///
/// let by_id = key::path_param("/api/clients/{id}", "id");
/// let (parts, _) = http::Request::post("/api/clients/c-17").body(()).unwrap().into_parts();
/// assert_eq!(by_id.make_key(&parts).as_deref(), Some("c-17"));
/// ```
///
/// # Panics
///
/// If `pattern` does not start with `/` or has no segment `{name}`.
pub fn path_param(pattern: &str, name: &str) -> PathParam {
    assert!(pattern.starts_with('/'), "path pattern must start with '/'");
    let segments: Vec<Segment> = pattern
        .split('/')
        .skip(1)
        .map(
            |segment| match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(param) if param == name => Segment::Capture,
                Some(_) => Segment::Any,
                None => Segment::Literal(segment.to_owned()),
            },
        )
        .collect();
    assert!(
        segments.iter().any(|s| matches!(s, Segment::Capture)),
        "path pattern {pattern:?} has no segment {{{name}}}"
    );
    PathParam {
        pattern: pattern.into(),
        segments,
    }
}

/// Key maker made by [`header`] and [`idempotency_key`].
#[derive(Debug, Clone)]
pub struct HeaderKey {
    name: HeaderName,
}

impl MakeKey<Parts> for HeaderKey {
    type Key = HeaderValue;

    fn make_key(&self, parts: &Parts) -> Option<HeaderValue> {
        single_header(&parts.headers, &self.name)
            .filter(|v| is_valid_key(v.as_bytes()))
            .cloned()
    }
}

pub(crate) fn single_header<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Option<&'a HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let value = values.next()?;
    // Two values make the key ambiguous; refuse rather than pick one.
    values.next().is_none().then_some(value)
}

pub(crate) fn is_valid_key(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes.len() <= MAX_HEADER_KEY_LEN
        && bytes.iter().all(|b| (0x20..=0x7e).contains(b))
        && bytes.iter().any(|&b| b != b' ')
}

/// Key maker made by [`method_and_path`].
#[derive(Debug, Clone)]
pub struct MethodAndPath {
    _p: (),
}

impl MakeKey<Parts> for MethodAndPath {
    type Key = (Method, String);

    fn make_key(&self, parts: &Parts) -> Option<Self::Key> {
        Some((parts.method.clone(), parts.uri.path().to_owned()))
    }
}

/// Key maker made by [`method_path_and_query`].
#[derive(Debug, Clone)]
pub struct MethodPathAndQuery {
    _p: (),
}

impl MakeKey<Parts> for MethodPathAndQuery {
    type Key = (Method, PathAndQuery);

    fn make_key(&self, parts: &Parts) -> Option<Self::Key> {
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Some((parts.method.clone(), path_and_query))
    }
}

/// Key maker made by [`path_param`].
#[derive(Debug, Clone)]
pub struct PathParam {
    pattern: Arc<str>,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone)]
enum Segment {
    Literal(String),
    Any,
    Capture,
}

impl MakeKey<Parts> for PathParam {
    type Key = String;

    fn make_key(&self, parts: &Parts) -> Option<String> {
        let path: Vec<&str> = parts.uri.path().split('/').skip(1).collect();
        capture(&self.segments, &path).map(str::to_owned)
    }

    /// Names the `Router::nest` prefix when the pattern lacks it or has one too many.
    fn why_no_key(&self, parts: &Parts) -> Option<String> {
        let (pattern, path) = (&*self.pattern, parts.uri.path());
        let actual: Vec<&str> = path.split('/').skip(1).collect();
        let n = self.segments.len();
        if actual.len() > n && capture(&self.segments, &actual[actual.len() - n..]).is_some() {
            let prefix = format!("/{}", actual[..actual.len() - n].join("/"));
            return Some(format!(
                "the layer sees the path `{path}`, which the pattern `{pattern}` matches only \
                 after `{prefix}`: a layer on the router that nests (`nest(\"{prefix}\", ..)`) \
                 sees the full path, so write the pattern as `{prefix}{pattern}`"
            ));
        }
        let extra = n.saturating_sub(actual.len());
        let (head, tail) = self.segments.split_at(extra);
        if extra > 0
            && head.iter().all(|s| matches!(s, Segment::Literal(_)))
            && capture(tail, &actual).is_some()
        {
            let prefix: String = pattern
                .split('/')
                .skip(1)
                .take(extra)
                .map(|s| format!("/{s}"))
                .collect();
            let rest = &pattern[prefix.len()..];
            return Some(format!(
                "the layer sees the path `{path}`, which is the pattern `{pattern}` without \
                 its `{prefix}`: a layer inside a nested router sees the path without the \
                 prefix of `nest(\"{prefix}\", ..)`, so write the pattern as `{rest}` (or \
                 put the layer on the outer router)"
            ));
        }
        Some(format!(
            "the path `{path}` does not match the pattern `{pattern}` of `key::path_param`"
        ))
    }
}

/// The captured segment of `path` (split on `/`, without the leading empty one), if the
/// whole path matches `segments`.
fn capture<'a>(segments: &[Segment], path: &[&'a str]) -> Option<&'a str> {
    if segments.len() != path.len() {
        return None;
    }
    let mut captured = None;
    for (segment, &actual) in segments.iter().zip(path) {
        match segment {
            Segment::Literal(literal) if literal != actual => return None,
            Segment::Capture if actual.is_empty() => return None,
            Segment::Capture => captured = Some(actual),
            Segment::Literal(_) | Segment::Any => {}
        }
    }
    captured
}

/// Keys requests by the value at `pointer` (RFC 6901, such as `/client_id` or
/// `/order/id`) in a JSON request body.
///
/// A string value is the key as it is; a number is the key as written in its canonical
/// form (`17`). A request has no key (and passes through, or gets a `400` under
/// [`require_key`](super::HttpCoalesceLayer::require_key)) if its body is not JSON, has
/// no value there, or has another kind of value there (`null`, an object, an empty
/// string).
///
/// ```
/// use axum::{Router, routing::post};
/// use tower_coalesce::http::{HttpCoalesceLayer, key};
///
/// async fn create_client(body: String) -> String { body }
///
/// // POST /api/clients {"id": "c-1", "name": "Ada"}: concurrent creates of c-1 run once.
/// let app: Router = Router::new()
///     .route("/api/clients", post(create_client))
///     .layer(HttpCoalesceLayer::new(key::json("/id")));
/// ```
///
/// # Panics
///
/// If `pointer` is neither empty nor starts with `/`.
pub fn json(pointer: &str) -> JsonKey {
    assert!(
        pointer.is_empty() || pointer.starts_with('/'),
        "a JSON pointer is empty or starts with '/': {pointer:?}"
    );
    JsonKey {
        pointer: Arc::new(Pointer::new(pointer)),
    }
}

/// Keys requests by the field `name` of an `application/x-www-form-urlencoded` body.
///
/// A request has no key if the field is missing, empty, or sent more than once.
///
/// ```
/// use tower_coalesce::http::{HttpCoalesceLayer, key};
///
/// // POST /subscribe with email=ada%40example.com&list=news
/// let layer = HttpCoalesceLayer::new(key::form("email"));
/// ```
pub fn form(name: &str) -> FormKey {
    FormKey { name: name.into() }
}

thread_local! {
    /// The body of the request whose key is being made, where body keys read it: set by
    /// the layer around its `make_key` call, on that thread, for that call only. Not an
    /// extension of the head: the first insert into a request's extensions allocates the
    /// map (three allocations per keyed request, for a value that lives one call).
    static BODY: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Runs `make` (a key maker's `make_key`) with `body` as the request's buffered body.
pub(crate) fn with_body<T>(body: &Bytes, make: impl FnOnce() -> T) -> T {
    /// Puts back what was there before, also if `make` panics.
    struct Restore(Option<Bytes>);
    impl Drop for Restore {
        fn drop(&mut self) {
            BODY.with(|body| *body.borrow_mut() = self.0.take());
        }
    }
    let _restore = Restore(BODY.with(|current| current.replace(Some(body.clone()))));
    make()
}

/// `read` of the buffered body of the request whose key is being made; `None` outside the
/// layer's `make_key` call (no body was read).
fn buffered_body<T>(read: impl FnOnce(&[u8]) -> Option<T>) -> Option<T> {
    // Taken out while it is read, so that a key maker may make another key meanwhile.
    let body = BODY.with(|body| body.borrow_mut().take())?;
    let value = read(&body);
    BODY.with(|current| *current.borrow_mut() = Some(body));
    value
}

/// Key maker made by [`json`].
#[derive(Debug, Clone)]
pub struct JsonKey {
    pointer: Arc<Pointer>,
}

impl JsonKey {
    /// The key of a request with this body, as the layer makes it: to check a key
    /// configuration against the bodies clients send.
    ///
    /// ```
    /// use tower_coalesce::http::key;
    ///
    /// let by_id = key::json("/client/id");
    /// assert_eq!(by_id.key_of(br#"{"client":{"id":"c-1"}}"#).as_deref(), Some("c-1"));
    /// assert_eq!(by_id.key_of(br#"{"client":{"id":17}}"#).as_deref(), Some("17"));
    /// assert_eq!(by_id.key_of(br#"{"client":{}}"#), None);
    /// ```
    pub fn key_of(&self, body: &[u8]) -> Option<String> {
        match self.pointer.find(body)? {
            serde_json::Value::String(s) if !s.is_empty() => Some(s),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

impl MakeKey<Parts> for JsonKey {
    type Key = String;

    fn make_key(&self, _: &Parts) -> Option<String> {
        buffered_body(|body| self.key_of(body))
    }

    fn reads_body(&self) -> bool {
        true
    }
}

/// Key maker made by [`form`].
#[derive(Debug, Clone)]
pub struct FormKey {
    name: Arc<str>,
}

impl FormKey {
    /// The key of a request with this body, as the layer makes it: to check a key
    /// configuration against the bodies clients send.
    ///
    /// ```
    /// use tower_coalesce::http::key;
    ///
    /// let by_email = key::form("email");
    /// assert_eq!(by_email.key_of(b"email=ada%40example.com&list=news").as_deref(), Some("ada@example.com"));
    /// assert_eq!(by_email.key_of(b"email=a&email=b"), None);
    /// ```
    pub fn key_of(&self, body: &[u8]) -> Option<String> {
        let mut values = form_urlencoded::parse(body)
            .filter(|(name, _)| **name == *self.name)
            .map(|(_, value)| value);
        let value = values.next()?;
        // Two values make the key ambiguous; refuse rather than pick one.
        (values.next().is_none() && !value.is_empty()).then(|| value.into_owned())
    }
}

impl MakeKey<Parts> for FormKey {
    type Key = String;

    fn make_key(&self, _: &Parts) -> Option<String> {
        buffered_body(|body| self.key_of(body))
    }

    fn reads_body(&self) -> bool {
        true
    }
}

/// A key's bytes, the same in every process and on every platform: what
/// [`StoreKey`](crate::store::StoreKey) digests, so that instances sharing a store agree on
/// a key whatever toolchain built them.
///
/// Implementations write a self-delimiting encoding, so that two different keys never give
/// the same bytes: strings and byte strings as a big-endian `u64` length and the bytes;
/// integers as 8 big-endian bytes (`bool` as one byte); `Option` as `0x00`, or `0x01` and
/// the value; sequences as a `u64` count and their items; tuples as their parts in order.
///
/// ```
/// use tower_coalesce::http::key::EncodeKey;
///
/// #[derive(Clone, PartialEq, Eq, Hash)]
/// struct TenantId(u64);
///
/// impl EncodeKey for TenantId {
///     fn encode_key(&self, out: &mut Vec<u8>) {
///         self.0.encode_key(out);
///     }
/// }
/// ```
pub trait EncodeKey {
    /// Appends this key's bytes to `out`.
    fn encode_key(&self, out: &mut Vec<u8>);
}

fn encode_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

macro_rules! encode_as_bytes {
    ($($ty:ty => $bytes:expr),+ $(,)?) => {
        $(impl EncodeKey for $ty {
            fn encode_key(&self, out: &mut Vec<u8>) {
                let bytes: fn(&$ty) -> &[u8] = $bytes;
                encode_bytes(bytes(self), out);
            }
        })+
    };
}

encode_as_bytes! {
    str => str::as_bytes,
    String => String::as_bytes,
    [u8] => |b| b,
    Bytes => |b| b,
    HeaderValue => HeaderValue::as_bytes,
    Method => |m| m.as_str().as_bytes(),
    PathAndQuery => |p| p.as_str().as_bytes(),
}

macro_rules! encode_as_integer {
    ($($ty:ty),+) => {
        $(impl EncodeKey for $ty {
            fn encode_key(&self, out: &mut Vec<u8>) {
                // Widened to 64 bits, so that `usize` encodes alike on every platform.
                out.extend_from_slice(&(*self as i128 as u64).to_be_bytes());
            }
        })+
    };
}

encode_as_integer!(u8, u16, u32, u64, usize, i8, i16, i32, i64, isize);

impl EncodeKey for bool {
    fn encode_key(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl EncodeKey for () {
    fn encode_key(&self, _: &mut Vec<u8>) {}
}

impl<T: EncodeKey + ?Sized> EncodeKey for &T {
    fn encode_key(&self, out: &mut Vec<u8>) {
        (**self).encode_key(out);
    }
}

impl<T: EncodeKey + ?Sized> EncodeKey for Arc<T> {
    fn encode_key(&self, out: &mut Vec<u8>) {
        (**self).encode_key(out);
    }
}

impl<T: EncodeKey> EncodeKey for Option<T> {
    fn encode_key(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(value) => {
                out.push(1);
                value.encode_key(out);
            }
        }
    }
}

impl<T: EncodeKey> EncodeKey for Vec<T> {
    fn encode_key(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.len() as u64).to_be_bytes());
        self.iter().for_each(|item| item.encode_key(out));
    }
}

macro_rules! encode_tuple {
    ($($name:ident),+) => {
        impl<$($name: EncodeKey),+> EncodeKey for ($($name,)+) {
            #[allow(non_snake_case)]
            fn encode_key(&self, out: &mut Vec<u8>) {
                let ($($name,)+) = self;
                $($name.encode_key(out);)+
            }
        }
    };
}

encode_tuple!(A, B);
encode_tuple!(A, B, C);
encode_tuple!(A, B, C, D);

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: http::request::Builder) -> Parts {
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn header_keys_refuse_missing_repeated_and_malformed_values() {
        let key = idempotency_key();
        let with = |values: &[&[u8]]| {
            let mut req = http::Request::post("/");
            for v in values {
                req = req.header("idempotency-key", HeaderValue::from_bytes(v).unwrap());
            }
            key.make_key(&parts(req))
        };
        assert_eq!(with(&[b"abc-1"]).unwrap(), "abc-1");
        assert_eq!(with(&[]), None);
        assert_eq!(with(&[b"a", b"b"]), None);
        assert_eq!(with(&[b""]), None);
        assert_eq!(with(&[b"   "]), None);
        assert_eq!(with(&[b"caf\xc3\xa9"]), None);
        assert_eq!(with(&[b"a\tb"]), None);
        assert_eq!(with(&[&[b'k'; MAX_HEADER_KEY_LEN]]).unwrap().len(), 255);
        assert_eq!(with(&[&[b'k'; MAX_HEADER_KEY_LEN + 1]]), None);
    }

    #[test]
    fn path_params_match_whole_paths_only() {
        let key = path_param("/api/clients/{id}/orders/{order}", "id");
        let get = |path: &str| key.make_key(&parts(http::Request::get(path)));
        assert_eq!(get("/api/clients/c1/orders/7").as_deref(), Some("c1"));
        assert_eq!(get("/api/clients/c1/orders"), None);
        assert_eq!(get("/api/clients/c1/orders/7/x"), None);
        assert_eq!(get("/api/users/c1/orders/7"), None);
        assert_eq!(get("/api/clients//orders/7"), None);
    }

    #[test]
    fn method_keys_tell_methods_and_queries_apart() {
        let path = method_and_path();
        let full = method_path_and_query();
        let a = parts(http::Request::post("/x?a=1"));
        let b = parts(http::Request::post("/x?a=2"));
        let c = parts(http::Request::put("/x?a=1"));
        assert_eq!(path.make_key(&a), path.make_key(&b));
        assert_ne!(path.make_key(&a), path.make_key(&c));
        assert_ne!(full.make_key(&a), full.make_key(&b));
    }

    #[test]
    fn tuples_need_every_part() {
        let key = (idempotency_key(), method_and_path());
        assert!(key.make_key(&parts(http::Request::post("/x"))).is_none());
        let keyed = parts(http::Request::post("/x").header("idempotency-key", "k"));
        assert!(key.make_key(&keyed).is_some());
    }

    /// The key `key` makes of a request with `body`, as the layer makes it.
    fn body_key<K: MakeKey<Parts>>(key: &K, body: &[u8]) -> Option<K::Key> {
        let head = parts(http::Request::post("/"));
        super::with_body(&Bytes::copy_from_slice(body), || key.make_key(&head))
    }

    #[test]
    fn json_keys_read_strings_and_numbers_at_the_pointer() {
        let id = json("/id");
        let nested = json("/client/id");
        let key = |k: &JsonKey, body: &str| body_key(k, body.as_bytes());
        assert_eq!(
            key(&id, r#"{"id":"c-1","name":"Ada"}"#).as_deref(),
            Some("c-1")
        );
        assert_eq!(key(&id, r#"{"id":17}"#).as_deref(), Some("17"));
        assert_eq!(
            key(&nested, r#"{"client":{"id":"c-2"}}"#).as_deref(),
            Some("c-2")
        );
        for no_key in [
            r#"{"name":"Ada"}"#,
            r#"{"id":null}"#,
            r#"{"id":""}"#,
            r#"{"id":{}}"#,
            "id=c-1",
            "",
        ] {
            assert_eq!(key(&id, no_key), None, "{no_key}");
        }
        assert_eq!(id.make_key(&parts(http::Request::post("/"))), None);
        assert!(id.reads_body() && (header("x"), id.clone()).reads_body());
        assert!(!header("x").reads_body());
    }

    #[test]
    fn form_keys_refuse_missing_empty_and_repeated_fields() {
        let email = form("email");
        let key = |body: &str| body_key(&email, body.as_bytes());
        assert_eq!(
            key("email=ada%40example.com&list=news").as_deref(),
            Some("ada@example.com")
        );
        assert_eq!(key("list=news"), None);
        assert_eq!(key("email=&list=news"), None);
        assert_eq!(key("email=a&email=b"), None);
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// Any header bytes: a key exactly when the value is one visible-ASCII (or
            /// space) string of 1 to 255 bytes that is not all spaces, and then the value.
            #[test]
            fn a_header_key_is_the_value_when_it_is_well_formed(
                bytes in proptest::collection::vec(any::<u8>(), 0..300),
            ) {
                let Ok(value) = HeaderValue::from_bytes(&bytes) else {
                    return Ok(());
                };
                let key = idempotency_key()
                    .make_key(&parts(http::Request::post("/").header("idempotency-key", value)));
                let well_formed = !bytes.is_empty()
                    && bytes.len() <= MAX_HEADER_KEY_LEN
                    && bytes.iter().all(|b| (0x20..0x7f).contains(b))
                    && bytes.iter().any(|b| *b != b' ');
                prop_assert_eq!(key.is_some(), well_formed, "{:?}", bytes);
                if let Some(key) = key {
                    prop_assert_eq!(key.as_bytes(), &bytes[..]);
                }
            }

            /// Any body: no panic, and the same body gives the same key.
            #[test]
            fn body_keys_read_any_bytes_without_panic(
                body in proptest::collection::vec(any::<u8>(), 0..512),
            ) {
                let (json_key, form_key) = (json("/id"), form("id"));
                let json_first = body_key(&json_key, &body);
                prop_assert_eq!(json_first, body_key(&json_key, &body));
                let form_first = body_key(&form_key, &body);
                prop_assert_eq!(form_first, body_key(&form_key, &body));
            }

            /// Whatever string a client puts in the field, written as JSON or as a form,
            /// the key is that string (an empty one is no key).
            #[test]
            fn body_keys_are_the_field_as_sent(id in any::<String>(), other in any::<String>()) {
                let body = serde_json::json!({ "name": other, "id": id }).to_string();
                let json_key = body_key(&json("/id"), body.as_bytes());
                let form_body = form_urlencoded::Serializer::new(String::new())
                    .append_pair("name", &other)
                    .append_pair("id", &id)
                    .finish();
                let form_key = body_key(&form("id"), form_body.as_bytes());
                let expected = (!id.is_empty()).then(|| id.clone());
                prop_assert_eq!(json_key, expected.clone());
                prop_assert_eq!(form_key, expected);
            }
        }
    }
}
