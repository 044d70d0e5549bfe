//! Ready-made coalescing keys for HTTP requests.
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
//! // Anything else: a closure over the request head.
//! let layer = HttpCoalesceLayer::new(|parts: &Parts| {
//!     parts.uri.query().map(str::to_owned)
//! });
//! ```
//!
//! Whatever the key, the layer also scopes it to the caller's identity; see
//! [`HttpCoalesceLayer::scope`](super::HttpCoalesceLayer::scope).

use std::fmt;

use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method};

use crate::coalesce::MakeKey;

/// The longest header value [`header`] accepts as a key, in bytes.
pub const MAX_HEADER_KEY_LEN: usize = 255;

/// Keys requests by the value of the header `name`.
///
/// A request has no key (and passes through, or gets a `400` under
/// [`require_key`](super::HttpCoalesceLayer::require_key)) if the header is missing,
/// sent more than once, empty, longer than [`MAX_HEADER_KEY_LEN`] bytes, or has bytes
/// other than visible ASCII and spaces.
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
pub fn idempotency_key() -> HeaderKey {
    header(HeaderName::from_static("idempotency-key"))
}

/// Keys requests by method and path (not the query): every `POST /api/clients` of one
/// caller shares a flight while it runs.
pub fn method_and_path() -> MethodAndPath {
    MethodAndPath { _p: () }
}

/// Keys requests by method, path and query.
pub fn method_path_and_query() -> MethodPathAndQuery {
    MethodPathAndQuery { _p: () }
}

/// Keys requests by one parameter of a path pattern such as `/api/clients/{id}`.
///
/// The pattern is matched segment by segment against the path the layer sees (under an
/// axum `nest`, the path without the nest's prefix). Requests whose path does not match
/// have no key.
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
    PathParam { segments }
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
        let mut path = parts.uri.path().split('/').skip(1);
        let mut captured = None;
        for segment in &self.segments {
            let actual = path.next()?;
            match segment {
                Segment::Literal(literal) if literal != actual => return None,
                Segment::Capture if actual.is_empty() => return None,
                Segment::Capture => captured = Some(actual),
                Segment::Literal(_) | Segment::Any => {}
            }
        }
        if path.next().is_some() {
            return None;
        }
        captured.map(str::to_owned)
    }
}

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
}
