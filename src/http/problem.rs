//! Responses the layer makes itself, as RFC 9457 problem details.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};

use super::body::ResponseBody;

/// `400`: the route requires a coalescing key and the request has none; `in_body` when
/// the key is read from the request body.
pub(crate) fn key_required<B>(in_body: bool) -> Response<ResponseBody<B>> {
    let detail = if in_body {
        "This route requires a key in the request body that identifies the request, and \
         the body has none, a malformed one, or is not of the expected format."
    } else {
        "This route requires a key that identifies the request (for example an \
         Idempotency-Key header) and the request has none, or a malformed one."
    };
    problem(
        StatusCode::BAD_REQUEST,
        "Request key missing or malformed",
        detail,
    )
}

/// `400`: the route requires the caller's identity to scope its key, and the layer found
/// none (under `require_key`).
pub(crate) fn identity_required<B>() -> Response<ResponseBody<B>> {
    problem(
        StatusCode::BAD_REQUEST,
        "Caller identity missing",
        "This route shares work between identical requests of one caller only, and could \
         not tell who sent this request. Nothing was done.",
    )
}

/// `400`: a present key header that is malformed or repeated, or a missing one under
/// `require_key`, named.
pub(crate) fn bad_key_header<B>(
    header: &http::HeaderName,
    what: &str,
) -> Response<ResponseBody<B>> {
    let header = title_case(header.as_str());
    let detail = format!("The {header} header {what}.");
    problem(
        StatusCode::BAD_REQUEST,
        &format!("{header} header missing or malformed"),
        &detail,
    )
}

/// A header name as clients write it: `idempotency-key` as `Idempotency-Key`.
pub(crate) fn title_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut start = true;
    for c in name.chars() {
        out.push(if start { c.to_ascii_uppercase() } else { c });
        start = c == '-';
    }
    out
}

/// `422`: the key is in use by, or was used for, another request. `varied`: the request
/// headers the key's response varies on (`Vary`), which may be what differs.
pub(crate) fn key_reused<B>(varied: Option<&str>) -> Response<ResponseBody<B>> {
    let detail = match varied {
        None => "This key belongs to a request with another method, path, query or body, in \
                 progress or completed. Use a new key for a new request."
            .to_owned(),
        Some(names) => format!(
            "This key belongs to another request, in progress or completed: one with \
             another method, path, query or body, or other values of the headers its \
             response varies on ({names}). Send the key with the same values, or use a new \
             key for a new request."
        ),
    };
    problem(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Key reused for another request",
        &detail,
    )
}

/// `413`: the request body is over the limit the layer reads to key or fingerprint it.
pub(crate) fn request_too_large<B>() -> Response<ResponseBody<B>> {
    problem(
        StatusCode::PAYLOAD_TOO_LARGE,
        "Request body too large",
        "The body of a keyed request is read to tell it apart from other requests with the \
         same key, and this one is larger than the limit.",
    )
}

/// `400`: the request body failed part-way.
pub(crate) fn request_unreadable<B>() -> Response<ResponseBody<B>> {
    problem(
        StatusCode::BAD_REQUEST,
        "Request body unreadable",
        "The request body could not be read to the end.",
    )
}

/// `503`: the flight's response was over the body limit, so only its leader received it.
pub(crate) fn too_large_to_share<B>() -> Response<ResponseBody<B>> {
    retry_soon(problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "Response too large to share",
        "An identical request was being processed; its response was larger than the limit \
         this server shares between identical requests, so it went to that request only. \
         Retry this request.",
    ))
}

/// `409`: an identical request is in progress (under `OnDuplicate::Conflict`).
pub(crate) fn in_progress<B>() -> Response<ResponseBody<B>> {
    retry_soon(problem(
        StatusCode::CONFLICT,
        "Identical request in progress",
        "An identical request is being processed. Retry this request once it has completed.",
    ))
}

/// `503`: a follower stopped waiting (wait timeout) or was turned away (follower cap).
pub(crate) fn gave_up_waiting<B>() -> Response<ResponseBody<B>> {
    retry_soon(problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "Identical request still in progress",
        "An identical request is being processed, and this server does not let more requests \
         wait for it, or not for longer. Retry this request.",
    ))
}

/// `503`: the idempotency store failed, under `OnStoreError::FailClosed`.
pub(crate) fn store_unavailable<B>() -> Response<ResponseBody<B>> {
    retry_soon(problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "Idempotency store unavailable",
        "The store that makes this request safe to retry could not be reached, and this \
         server does not run such requests without it. Nothing was done. Retry this request.",
    ))
}

/// `503`: the request ran, but its response could not be kept for its retries, under
/// `OnStoreError::FailClosed`.
pub(crate) fn not_kept<B>() -> Response<ResponseBody<B>> {
    retry_soon(problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "Outcome not recorded",
        "This request was processed, but the store that makes it safe to retry could not \
         record its outcome, so this server does not report one it could not give again. \
         Retry this request: it may be processed again.",
    ))
}

/// `503`: the request's work was rolled back (atomic mode), nothing of it is kept.
pub(crate) fn not_committed<B>() -> Response<ResponseBody<B>> {
    retry_soon(problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "Request not completed",
        "This request could not be completed, and nothing it did was kept. Retry this \
         request.",
    ))
}

fn retry_soon<B>(mut response: Response<ResponseBody<B>>) -> Response<ResponseBody<B>> {
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// A cache revalidated a kept response, and the service answered `304 Not Modified` for
/// another one (another `ETag` or `Last-Modified`), or the kept one was gone: there is no
/// body to answer with, and a `304` would answer a question the client did not ask.
pub(crate) fn unmatched_not_modified() -> Response<Bytes> {
    whole_problem(
        StatusCode::BAD_GATEWAY,
        "Not Modified for another representation",
        "The cache asked the service whether its copy changed, and the service answered \
         304 Not Modified for a representation the cache does not keep. Retry the request.",
    )
}

pub(crate) fn problem<B>(
    status: StatusCode,
    title: &str,
    detail: &str,
) -> Response<ResponseBody<B>> {
    whole_problem(status, title, detail).map(|body| ResponseBody::buffered(body, None))
}

fn whole_problem(status: StatusCode, title: &str, detail: &str) -> Response<Bytes> {
    let body = format!(
        r#"{{"type":"about:blank","title":{},"status":{},"detail":{}}}"#,
        json_string(title),
        status.as_u16(),
        json_string(detail)
    );
    let mut response = Response::new(Bytes::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_header_is_named_as_clients_write_it() {
        assert_eq!(title_case("idempotency-key"), "Idempotency-Key");
        assert_eq!(title_case("x-request-id"), "X-Request-Id");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\nd"), r#""a\"b\\c\u000ad""#);
    }
}
