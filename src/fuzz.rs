//! Entry points for the fuzz targets in `fuzz/` (cargo fuzz builds with `--cfg fuzzing`),
//! one per parser that reads bytes from a client or from Redis. Each takes any bytes and
//! panics only if one of the parser's promises breaks; a test here replays the committed
//! corpora (`fuzz/corpus/<target>/`) in the normal test run.
//!
//! Not part of the API: compiled only for fuzzing and for the crate's own tests.

/// `Idempotency-Key` (any header value): a key exactly when the value is visible ASCII or
/// spaces, 1 to [`MAX_HEADER_KEY_LEN`](crate::http::key::MAX_HEADER_KEY_LEN) bytes and not
/// all spaces, and then the value itself.
pub fn header_key(bytes: &[u8]) {
    use crate::coalesce::MakeKey;
    use crate::http::key::{MAX_HEADER_KEY_LEN, idempotency_key};

    let Ok(value) = http::HeaderValue::from_bytes(bytes) else {
        return;
    };
    let request = http::Request::post("/").header("idempotency-key", value);
    let parts = request.body(()).expect("a valid request").into_parts().0;
    let key = idempotency_key().make_key(&parts);
    let well_formed = !bytes.is_empty()
        && bytes.len() <= MAX_HEADER_KEY_LEN
        && bytes.iter().all(|b| (0x20..0x7f).contains(b))
        && bytes.iter().any(|b| *b != b' ');
    assert_eq!(key.is_some(), well_formed, "{bytes:?}");
    if let Some(key) = key {
        assert_eq!(key.as_bytes(), bytes);
    }
}

/// `key::json("/id")` and `key::form("id")` on any body: never an empty key, the same key
/// for the same body, and a form key only when the field is sent exactly once.
pub fn body_keys(body: &[u8]) {
    use crate::coalesce::MakeKey;
    use crate::http::key::{form, json, with_body};

    let parts = http::Request::post("/")
        .body(())
        .expect("a valid request")
        .into_parts()
        .0;
    let (json_key, form_key) = (json("/id"), form("id"));
    let body = bytes::Bytes::copy_from_slice(body);
    let key_of = |key: &dyn MakeKey<_, Key = String>| with_body(&body, || key.make_key(&parts));

    let key = key_of(&json_key);
    assert_eq!(key, key_of(&json_key));
    assert!(key.is_none_or(|k| !k.is_empty()));

    let key = key_of(&form_key);
    assert_eq!(key, key_of(&form_key));
    if let Some(key) = key {
        let sent: Vec<_> = form_urlencoded::parse(&body)
            .filter(|(name, _)| name == "id")
            .map(|(_, value)| value)
            .collect();
        assert_eq!(sent, [key.as_str()]);
    }
}

/// The HTTP cache's reading of a response's and a request's headers: `Cache-Control`,
/// `Pragma`, `Age`, `Date`, `Expires`, validators. No panic, and whatever the headers say,
/// nothing is kept longer than the layer's `max_ttl`.
///
/// The bytes: the first picks the status and the layer's settings (keeping private
/// responses, a default freshness); then lines (`\n`), each a header, whose first byte
/// picks the name (and, from 128 up, puts it on the request) and whose rest is the value.
#[cfg(feature = "http-cache")]
pub fn cache_headers(bytes: &[u8]) {
    use std::time::{Duration, SystemTime};

    use http::header::{self, HeaderMap, HeaderName, HeaderValue};

    use crate::http_cache::rules::{Asked, Conditional, Rules, Verdict, age};

    const NAMES: [HeaderName; 11] = [
        header::CACHE_CONTROL,
        header::PRAGMA,
        header::AGE,
        header::DATE,
        header::EXPIRES,
        header::ETAG,
        header::LAST_MODIFIED,
        header::SET_COOKIE,
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::AUTHORIZATION,
    ];
    let Some((&first, rest)) = bytes.split_first() else {
        return;
    };
    let status = [200, 203, 204, 206, 301, 304, 404, 410, 500, 503][usize::from(first % 10)];
    let status = http::StatusCode::from_u16(status).expect("a valid status");
    let (mut response, mut request) = (HeaderMap::new(), HeaderMap::new());
    for line in rest.split(|b| *b == b'\n') {
        let Some((&which, value)) = line.split_first() else {
            continue;
        };
        let Ok(value) = HeaderValue::from_bytes(value) else {
            continue;
        };
        let name = NAMES[usize::from(which) % NAMES.len()].clone();
        // Validators and credentials are the request's; the rest, the response's (and
        // `Cache-Control` and `Pragma` both, as a request may send them too).
        let to_request = which >= 128
            || matches!(
                name,
                header::IF_NONE_MATCH | header::IF_MODIFIED_SINCE | header::AUTHORIZATION
            );
        if to_request {
            &mut request
        } else {
            &mut response
        }
        .append(name, value);
    }

    let rules = Rules {
        private: first & 0x80 != 0,
        default_ttl: (first & 0x40 != 0).then(|| Duration::from_secs(60)),
        max_ttl: Duration::from_secs(86_400),
        hit_for_pass: Duration::from_secs(120),
        targeted: crate::http_cache::rules::default_targeted(),
    };
    if let Verdict::Store(lifetimes) = rules.verdict(status, &response, &request) {
        assert!(lifetimes.fresh <= rules.max_ttl);
        assert!(lifetimes.stale_while_revalidate <= rules.max_ttl);
        assert!(lifetimes.stale_if_error <= rules.max_ttl);
        assert!(lifetimes.usable() <= rules.max_ttl * 2);
        let _ = lifetimes.state(age(&response, SystemTime::now()));
    }
    let _ = Asked::of(&request);
    let _ = Conditional::take(&mut request).not_modified(status, &response);
}

/// A response as Redis hands it back, which may be anything (another app's key, a
/// truncated write): an error or a response, never a panic, and a response decoded is
/// encoded and decoded again to the same.
#[cfg(feature = "redis")]
pub fn stored_response(bytes: &[u8]) {
    use crate::shared_store::codec::{decode, encode};

    let Ok(decoded) = decode(bytes) else {
        return;
    };
    let again = decode(&encode(&decoded)).expect("an encoded response decodes");
    assert_eq!(again.status(), decoded.status());
    assert_eq!(again.version(), decoded.version());
    assert_eq!(again.headers(), decoded.headers());
    assert_eq!(again.body(), decoded.body());
    assert_eq!(again.fingerprint(), decoded.fingerprint());
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Every input of `target`'s committed corpus through `check`; the number of inputs.
    fn replay(target: &str, check: fn(&[u8])) -> usize {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut inputs = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir:?}: {e}")) {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            if let Err(panic) = std::panic::catch_unwind(|| check(&bytes)) {
                let message = (panic.downcast_ref::<String>().map(String::as_str))
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic");
                panic!("{path:?} broke {target}: {message}");
            }
            inputs += 1;
        }
        inputs
    }

    #[test]
    fn the_header_key_corpus_passes() {
        assert!(replay("header_key", super::header_key) > 0);
    }

    #[test]
    fn the_body_keys_corpus_passes() {
        assert!(replay("body_keys", super::body_keys) > 0);
    }

    #[cfg(feature = "http-cache")]
    #[test]
    fn the_cache_headers_corpus_passes() {
        assert!(replay("cache_headers", super::cache_headers) > 0);
    }

    #[cfg(feature = "redis")]
    #[test]
    fn the_stored_response_corpus_passes() {
        assert!(replay("stored_response", super::stored_response) > 0);
    }
}
