//! What RFC 9111 (HTTP caching), RFC 5861 (the stale directives) and RFC 9110's
//! conditional requests say about one response: whether a shared cache may keep it, for how
//! long, how old it is, and whether a conditional request gets `304`. Pure functions over
//! headers, so that each rule is tested on its own.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::StatusCode;
use http::header::{
    AGE, AUTHORIZATION, CACHE_CONTROL, DATE, ETAG, EXPIRES, HeaderMap, HeaderName, HeaderValue,
    IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, LAST_MODIFIED, PRAGMA, RANGE, SET_COOKIE,
};

use crate::single_flight::Lifetimes;

/// The `Cache-Control` directives this cache acts on, from every `Cache-Control` header.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Directives {
    pub(crate) max_age: Option<u64>,
    pub(crate) s_maxage: Option<u64>,
    pub(crate) stale_while_revalidate: Option<u64>,
    pub(crate) stale_if_error: Option<u64>,
    pub(crate) no_store: bool,
    pub(crate) no_cache: bool,
    pub(crate) private: bool,
    pub(crate) public: bool,
    pub(crate) must_revalidate: bool,
    pub(crate) must_understand: bool,
}

impl Directives {
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        let mut d = Directives::default();
        let directives = headers
            .get_all(CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','));
        for directive in directives {
            let (name, value) = match directive.split_once('=') {
                Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
                None => (directive.trim(), None),
            };
            // A malformed number makes the directive count as absent, except where absence
            // would store more: a `max-age` that can't be read is 0 (RFC 9111 §4.2.1). A
            // number too large to hold is the largest there is (§1.2.2), capped later by
            // `max_ttl`.
            let seconds = || value.and_then(delta_seconds);
            // Lowercased on the stack: this runs on every hit. Longer names are none of ours.
            let mut lower = [0u8; 24];
            let Some(lower) = lower.get_mut(..name.len()) else {
                continue;
            };
            lower.copy_from_slice(name.as_bytes());
            lower.make_ascii_lowercase();
            match &*lower {
                b"max-age" => d.max_age = Some(seconds().unwrap_or(0)),
                b"s-maxage" => d.s_maxage = Some(seconds().unwrap_or(0)),
                b"stale-while-revalidate" => d.stale_while_revalidate = seconds(),
                b"stale-if-error" => d.stale_if_error = seconds(),
                b"no-store" => d.no_store = true,
                // With or without a field list: the whole response is treated alike.
                b"no-cache" => d.no_cache = true,
                b"private" => d.private = true,
                b"public" => d.public = true,
                b"must-revalidate" | b"proxy-revalidate" => d.must_revalidate = true,
                b"must-understand" => d.must_understand = true,
                _ => {}
            }
        }
        d
    }

    /// The directives of a targeted field (RFC 9213: `CDN-Cache-Control`, or another
    /// the app names), a Structured Fields dictionary: `None` if the field is absent or
    /// is not a valid dictionary (then `Cache-Control` rules). A member whose value is of
    /// the wrong type (`max-age="60"`) is ignored, as RFC 9213 §2.1 asks.
    pub(crate) fn targeted(headers: &HeaderMap, name: &HeaderName) -> Option<Self> {
        let mut values = headers.get_all(name).iter().peekable();
        values.peek()?;
        let mut d = Directives::default();
        for value in values {
            let value = value.to_str().ok()?;
            if value.trim().is_empty() {
                continue;
            }
            for member in value.split(',') {
                let member = member.trim_matches([' ', '\t']);
                let (key, value) = match member.split_once('=') {
                    Some((key, value)) => (key, Some(value)),
                    None => (member, None),
                };
                if !sf_key(key) {
                    return None;
                }
                // An integer, a token, a string or a boolean; parameters are ignored.
                let value = value.map(|v| v.split(';').next().unwrap_or(v));
                let integer = match value {
                    None => None,
                    Some(v) if sf_integer(v) => Some(v.parse::<u64>().unwrap_or(u64::MAX)),
                    Some(v) if sf_item(v) => None,
                    Some(_) => return None,
                };
                let flag = value.is_none() || value == Some("?1");
                match key {
                    "max-age" => d.max_age = integer.or(d.max_age),
                    "s-maxage" => d.s_maxage = integer.or(d.s_maxage),
                    "stale-while-revalidate" => {
                        d.stale_while_revalidate = integer.or(d.stale_while_revalidate)
                    }
                    "stale-if-error" => d.stale_if_error = integer.or(d.stale_if_error),
                    "no-store" => d.no_store |= flag,
                    "no-cache" => d.no_cache |= flag,
                    "private" => d.private |= flag,
                    "public" => d.public |= flag,
                    "must-revalidate" | "proxy-revalidate" => d.must_revalidate |= flag,
                    "must-understand" => d.must_understand |= flag,
                    _ => {}
                }
            }
        }
        Some(d)
    }
}

/// RFC 8941 §3.1.2: a dictionary key, `lcalpha / "*"` then `lcalpha / DIGIT / "_" / "-" /
/// "." / "*"`.
fn sf_key(key: &str) -> bool {
    let mut bytes = key.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'*')
        && bytes.all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.' | b'*')
        })
}

/// RFC 8941 §3.3.1, as a cache reads `delta-seconds`: a non-negative integer of at most
/// 15 digits.
fn sf_integer(value: &str) -> bool {
    (1..=15).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_digit())
}

/// Another bare item: a token, a quoted string, a boolean or a decimal (read, and ignored
/// where an integer is wanted).
fn sf_item(value: &str) -> bool {
    let token = |v: &str| {
        let mut b = v.bytes();
        b.next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == b'*')
            && b.all(|c| c.is_ascii_graphic() && !b"\"(),;<=>?@[\\]{}".contains(&c))
    };
    let string = |v: &str| v.len() >= 2 && v.starts_with('"') && v.ends_with('"');
    let decimal = |v: &str| {
        let v = v.strip_prefix('-').unwrap_or(v);
        !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    };
    token(value) || string(value) || matches!(value, "?0" | "?1") || decimal(value)
}

/// RFC 9111 §1.2.2 `delta-seconds`: one or more digits; a value past `u64::MAX` is
/// `u64::MAX`.
fn delta_seconds(value: &str) -> Option<u64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(value.parse::<u64>().unwrap_or(u64::MAX))
}

/// RFC 9111 §3.5: whether a response to a request with `Authorization` may be used for
/// other requests: it says `public`, `s-maxage` or `must-revalidate`.
pub(crate) fn shared_when_authorized(response: &HeaderMap) -> bool {
    let d = Directives::of(response);
    d.public || d.s_maxage.is_some() || d.must_revalidate
}

/// What a request's own headers ask of the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Asked {
    /// `no-cache`, `max-age=0` or `Pragma: no-cache`: go to the origin (through the flight).
    pub(crate) revalidate: bool,
    /// `no-store`: neither use nor keep a stored response.
    pub(crate) no_store: bool,
}

impl Asked {
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        let d = Directives::of(headers);
        let pragma = headers
            .get_all(PRAGMA)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache"));
        Asked {
            revalidate: d.no_cache || d.max_age == Some(0) || pragma,
            no_store: d.no_store,
        }
    }
}

/// The layer's own settings for the rules.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    /// Keep `private` responses, and responses to requests with `Authorization`: the layer
    /// is scoped per identity.
    pub(crate) private: bool,
    /// Freshness of responses that state none; `None`: such responses are not kept.
    pub(crate) default_ttl: Option<Duration>,
    /// The longest any response is kept, whatever it says.
    pub(crate) max_ttl: Duration,
    /// How long a key whose response may not be shared goes straight to the service.
    pub(crate) hit_for_pass: Duration,
    /// Targeted cache-control fields (RFC 9213), by precedence: the first of them that a
    /// response carries, valid, replaces its `Cache-Control` and `Expires` for this cache.
    pub(crate) targeted: Arc<[HeaderName]>,
}

/// The default of the targeted fields: `CDN-Cache-Control`, for a cache that stands in
/// front of an origin as a CDN does.
pub(crate) fn default_targeted() -> Arc<[HeaderName]> {
    Arc::new([HeaderName::from_static("cdn-cache-control")])
}

/// What to do with a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Keep it, for these lifetimes.
    Store(Lifetimes),
    /// Don't keep it; the next requests coalesce as before.
    Skip,
    /// Don't keep it, and let the next requests for its key go straight to the service
    /// (hit-for-pass): it is personal (`Set-Cookie`, `private`, `no-store`), so a follower
    /// would only wait to run on its own after it.
    Pass,
}

impl Rules {
    /// The directives this cache follows for a response: its first targeted field's,
    /// if it has a valid one (`true`), else its `Cache-Control`.
    pub(crate) fn directives(&self, response: &HeaderMap) -> (Directives, bool) {
        self.targeted
            .iter()
            .find_map(|name| Directives::targeted(response, name))
            .map_or_else(|| (Directives::of(response), false), |d| (d, true))
    }

    /// Whether a response is for its own request only (`no-store`, `Set-Cookie`, `private`
    /// unless the scope is one identity), by the directives this cache follows.
    pub(crate) fn personal(
        &self,
        status: StatusCode,
        response: &HeaderMap,
        d: &Directives,
    ) -> bool {
        // RFC 9111 §5.2.2.3: `must-understand` stands in for `no-store` where the cache knows
        // the status code's caching rules, and adds to it elsewhere.
        let no_store = d.no_store && !(d.must_understand && understood(status));
        no_store || response.contains_key(SET_COOKIE) || (d.private && !self.private)
    }

    pub(crate) fn verdict(
        &self,
        status: StatusCode,
        response: &HeaderMap,
        request: &HeaderMap,
    ) -> Verdict {
        let (d, targeted) = self.directives(response);
        if self.personal(status, response, &d) {
            return Verdict::Pass;
        }
        // RFC 9111 §3.5: a shared cache keeps a response to an authenticated request only
        // if the response says it may.
        let authorized = request.contains_key(AUTHORIZATION)
            && !(self.private || d.public || d.s_maxage.is_some() || d.must_revalidate);
        if authorized || d.no_cache || !storable_status(status) {
            return Verdict::Skip;
        }
        let explicit = match d.s_maxage.or(d.max_age) {
            Some(seconds) => Some(Duration::from_secs(seconds)),
            None if targeted => None,
            None => expires(response),
        };
        // A server error is kept only when it says for how long (RFC 9111 §3: any final
        // status may be kept with explicit freshness), never by the default.
        let fresh = match status.is_server_error() {
            true => explicit,
            false => explicit.or(self.default_ttl),
        };
        let Some(fresh) = fresh else {
            return Verdict::Skip;
        };
        let stale = |window: Option<u64>| match d.must_revalidate {
            true => Duration::ZERO,
            false => Duration::from_secs(window.unwrap_or(0)),
        };
        let lifetimes = Lifetimes {
            fresh: fresh.min(self.max_ttl),
            stale_while_revalidate: stale(d.stale_while_revalidate).min(self.max_ttl),
            stale_if_error: stale(d.stale_if_error).min(self.max_ttl),
        };
        if lifetimes == Lifetimes::default() {
            return Verdict::Skip;
        }
        Verdict::Store(lifetimes)
    }
}

/// Statuses whose responses are kept when their headers allow: final and complete.
fn storable_status(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// Status codes whose caching rules this cache knows (RFC 9110's own), for
/// `must-understand`.
fn understood(status: StatusCode) -> bool {
    storable_status(status) && status.canonical_reason().is_some()
}

/// Freshness from `Expires` minus `Date` (or now); an `Expires` that can't be read is in
/// the past (RFC 9111 §5.3).
fn expires(response: &HeaderMap) -> Option<Duration> {
    let expires = response.get(EXPIRES)?;
    let Some(expires) = date(Some(expires)) else {
        return Some(Duration::ZERO);
    };
    let base = date(response.get(DATE)).unwrap_or_else(SystemTime::now);
    Some(expires.duration_since(base).unwrap_or(Duration::ZERO))
}

fn date(value: Option<&HeaderValue>) -> Option<SystemTime> {
    let text = value?.to_str().ok()?;
    httpdate::parse_http_date(text)
        .ok()
        .or_else(|| lenient_date(text))
}

/// An HTTP date with the two slips that caches forgive (nginx, Varnish, Traffic Server):
/// names in another case, and a weekday that doesn't match the date, in the IMF-fixdate
/// (`Sun, 06 Nov 1994 08:49:37 GMT`) and asctime (`Sun Nov  6 08:49:37 1994`) layouts.
/// Anything else that isn't a date stays invalid (an `Expires` in the past).
fn lenient_date(text: &str) -> Option<SystemTime> {
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    if !text.is_ascii() {
        return None;
    }
    let b = text.as_bytes();
    let weekday = b.get(..3)?.iter().all(u8::is_ascii_alphabetic);
    let (day, month, year, time) = match b.len() {
        29 if &b[3..5] == b", " && b[7] == b' ' && b[11] == b' ' && b[16] == b' ' => {
            if b[25] != b' ' || !text[26..].eq_ignore_ascii_case("GMT") {
                return None;
            }
            (&text[5..7], &text[8..11], &text[12..16], &text[17..25])
        }
        24 if b[3] == b' ' && b[7] == b' ' && b[10] == b' ' && b[19] == b' ' => (
            text[8..10].trim_start(),
            &text[4..7],
            &text[20..24],
            &text[11..19],
        ),
        _ => return None,
    };
    let month = MONTHS.iter().position(|m| m.eq_ignore_ascii_case(month))? as u64 + 1;
    let number = |v: &str| match !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        true => v.parse::<u64>().ok(),
        false => None,
    };
    let (day, year) = (number(day)?, number(year)?);
    let (h, m, sec) = match time.as_bytes() {
        [_, _, b':', _, _, b':', _, _] => (
            number(&time[..2])?,
            number(&time[3..5])?,
            number(&time[6..])?,
        ),
        _ => return None,
    };
    if !weekday || !(1970..=9999).contains(&year) || !(1..=31).contains(&day) {
        return None;
    }
    if h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days since 1970-01-01 of a civil date (Howard Hinnant's days_from_civil).
    let (y, mo) = match month <= 2 {
        true => (year - 1, month + 9),
        false => (year, month - 3),
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    let seconds = days * 86_400 + h * 3600 + m * 60 + sec;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
}

/// Stamps a response about to be kept with the time it was made, unless its service did:
/// its age is counted from there (hyper writes `Date` only when it sends the response,
/// after every layer).
pub(crate) fn stamp(headers: &mut HeaderMap, now: SystemTime) {
    if !headers.contains_key(DATE) {
        let date = httpdate::fmt_http_date(now);
        headers.insert(
            DATE,
            HeaderValue::try_from(date).expect("an HTTP date is a header"),
        );
    }
}

/// The age of a kept response (RFC 9111 §4.2.3): its `Age` when kept, plus the time since
/// its `Date`. Of an `Age` sent as a list (`7200, 0`, against §5.1), the first value counts.
pub(crate) fn age(headers: &HeaderMap, now: SystemTime) -> Duration {
    let initial = headers
        .get(AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_secs);
    let resident = date(headers.get(DATE))
        .and_then(|date| now.duration_since(date).ok())
        .unwrap_or(Duration::ZERO);
    // Saturating: `Age` is whatever the service (or a proxy behind it) sent.
    initial.saturating_add(resident)
}

/// A request's validators, taken off it so that the service answers in full (a full
/// response is what the cache keeps) and applied by the cache to what it serves.
/// Its `Range` (and `If-Range`) too: the service is asked for the whole response, which
/// the cache keeps, and a hit answers the range from it.
#[derive(Debug, Default)]
pub(crate) struct Conditional {
    if_none_match: Option<HeaderValue>,
    if_modified_since: Option<HeaderValue>,
    range: Option<HeaderValue>,
    if_range: Option<HeaderValue>,
}

impl Conditional {
    pub(crate) fn take(headers: &mut HeaderMap) -> Self {
        Conditional {
            if_none_match: headers.remove(IF_NONE_MATCH),
            if_modified_since: headers.remove(IF_MODIFIED_SINCE),
            range: headers.remove(RANGE),
            if_range: headers.remove(IF_RANGE),
        }
    }

    /// The byte range (first and last position) a `200` of `len` bytes answers with `206`
    /// (RFC 9110 §14.2): one satisfiable `bytes` range, and an `If-Range` that matches, if
    /// there is one. `None`: the whole response answers (a server may ignore `Range`; so
    /// are several ranges and unsatisfiable ones).
    pub(crate) fn range(
        &self,
        status: StatusCode,
        response: &HeaderMap,
        len: u64,
    ) -> Option<(u64, u64)> {
        if status != StatusCode::OK || len == 0 {
            return None;
        }
        let spec = self.range.as_ref()?.to_str().ok()?.trim();
        if let Some(if_range) = &self.if_range {
            // A strong entity tag, or the exact Last-Modified date.
            let matches = match if_range.to_str().ok()?.trim() {
                tag if tag.starts_with('"') => response.get(ETAG).is_some_and(|e| e == tag),
                date => response.get(LAST_MODIFIED).is_some_and(|m| m == date),
            };
            if !matches {
                return None;
            }
        }
        let (unit, set) = spec.split_once('=')?;
        if !unit.trim().eq_ignore_ascii_case("bytes") || set.contains(',') {
            return None;
        }
        let (first, last) = set.trim().split_once('-')?;
        let number = |v: &str| match v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            true => None,
            false => v.parse::<u64>().ok(),
        };
        let (first, last) = match (first.trim(), last.trim()) {
            ("", suffix) => {
                let suffix = number(suffix)?.min(len);
                (len.checked_sub(suffix)?, len - 1)
            }
            (first, "") => (number(first)?, len - 1),
            (first, last) => (number(first)?, number(last)?.min(len - 1)),
        };
        (first <= last && first < len).then_some((first, last))
    }

    /// Whether a `200` with these headers answers the request with `304 Not Modified`
    /// (RFC 9110 §13.1.2-3: `If-None-Match` by weak comparison; `If-Modified-Since` only
    /// without it).
    pub(crate) fn not_modified(&self, status: StatusCode, response: &HeaderMap) -> bool {
        if status != StatusCode::OK {
            return false;
        }
        if let Some(wanted) = &self.if_none_match {
            let Some(etag) = response.get(ETAG).and_then(|v| v.to_str().ok()) else {
                return false;
            };
            let Ok(wanted) = wanted.to_str() else {
                return false;
            };
            return wanted.trim() == "*"
                || wanted
                    .split(',')
                    .any(|tag| weak(tag.trim()) == weak(etag.trim()));
        }
        match (
            date(self.if_modified_since.as_ref()),
            date(response.get(LAST_MODIFIED)),
        ) {
            (Some(since), Some(modified)) => modified <= since,
            _ => false,
        }
    }
}

/// How long an entry with validators is kept past its last use by freshness, so that a
/// request for it then asks the service whether it changed (`If-None-Match`,
/// `If-Modified-Since`) instead of for the whole response again: 10 minutes, nginx's
/// `inactive` default.
pub(crate) const REVALIDATE_FOR: Duration = Duration::from_secs(600);

/// Whether a kept response can be revalidated: a `200` with an `ETag` or a `Last-Modified`.
pub(crate) fn has_validators(status: StatusCode, headers: &HeaderMap) -> bool {
    status == StatusCode::OK && (headers.contains_key(ETAG) || headers.contains_key(LAST_MODIFIED))
}

/// Puts a kept response's validators on the request that refreshes it (whose own were
/// taken off by [`Conditional::take`]), so that the service may answer `304`.
pub(crate) fn validate(kept: &crate::store::StoredResponse, request: &mut HeaderMap) {
    if !has_validators(kept.status(), kept.headers()) {
        return;
    }
    if let Some(etag) = kept.headers().get(ETAG) {
        request.insert(IF_NONE_MATCH, etag.clone());
    }
    if let Some(modified) = kept.headers().get(LAST_MODIFIED) {
        request.insert(IF_MODIFIED_SINCE, modified.clone());
    }
}

/// A kept response's headers freshened by a `304` (RFC 9111 §3.2, §4.3.4): every field of
/// the `304` replaces the kept one, but `Content-Length` (the kept body is the body) and
/// hop-by-hop fields; its `Date` and `Age` restart the entry's age. `None` if the `304`
/// names another representation (another `ETag` or `Last-Modified`).
pub(crate) fn freshened(kept: &HeaderMap, not_modified: &HeaderMap) -> Option<HeaderMap> {
    for validator in [ETAG, LAST_MODIFIED] {
        let (Some(old), Some(new)) = (kept.get(&validator), not_modified.get(&validator)) else {
            continue;
        };
        let same = match validator == ETAG {
            true => old.to_str().ok().map(weak) == new.to_str().ok().map(weak),
            false => old == new,
        };
        if !same {
            return None;
        }
    }
    let mut headers = kept.clone();
    headers.remove(AGE);
    headers.remove(DATE);
    for name in not_modified.keys() {
        let skip = matches!(
            name.as_str(),
            "content-length"
                | "connection"
                | "keep-alive"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "upgrade"
                | "proxy-connection"
                | "cache-status"
        );
        if skip {
            continue;
        }
        headers.remove(name);
        for value in not_modified.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    Some(headers)
}

fn weak(tag: &str) -> &str {
    tag.strip_prefix("W/").unwrap_or(tag)
}

/// The headers a `304` carries from the `200` it stands for (RFC 9110 §15.4.5), and the
/// cache's own.
pub(crate) const NOT_MODIFIED_HEADERS: [http::header::HeaderName; 8] = [
    CACHE_CONTROL,
    http::header::CONTENT_LOCATION,
    DATE,
    ETAG,
    EXPIRES,
    http::header::VARY,
    LAST_MODIFIED,
    AGE,
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::single_flight::Freshness;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| (n.parse().unwrap(), v.parse().unwrap()))
            .collect()
    }

    fn rules() -> Rules {
        Rules {
            private: false,
            default_ttl: None,
            max_ttl: Duration::from_secs(86_400),
            hit_for_pass: Duration::from_secs(120),
            targeted: default_targeted(),
        }
    }

    fn secs(fresh: u64, swr: u64, sie: u64) -> Verdict {
        Verdict::Store(Lifetimes {
            fresh: Duration::from_secs(fresh),
            stale_while_revalidate: Duration::from_secs(swr),
            stale_if_error: Duration::from_secs(sie),
        })
    }

    #[test]
    fn freshness_from_s_maxage_before_max_age_and_the_stale_windows() {
        let none = HeaderMap::new();
        let v =
            |cc: &str| rules().verdict(StatusCode::OK, &headers(&[("cache-control", cc)]), &none);
        assert_eq!(v("max-age=60"), secs(60, 0, 0));
        assert_eq!(v("max-age=60, s-maxage=5"), secs(5, 0, 0));
        assert_eq!(
            v("public, max-age=10, stale-while-revalidate=30, stale-if-error=600"),
            secs(10, 30, 600)
        );
        assert_eq!(
            v("max-age=10, stale-while-revalidate=30, must-revalidate"),
            secs(10, 0, 0)
        );
        assert_eq!(v(r#"max-age="20""#), secs(20, 0, 0));
        assert_eq!(v("max-age=abc"), Verdict::Skip, "unreadable max-age is 0");
        assert_eq!(v("no-cache, max-age=60"), Verdict::Skip);
        assert_eq!(v("max-age=999999999"), secs(86_400, 0, 0), "capped");
        assert_eq!(
            rules().verdict(StatusCode::OK, &none, &none),
            Verdict::Skip,
            "no freshness stated, no default: not kept"
        );
    }

    #[test]
    fn personal_responses_pass_and_authenticated_ones_need_leave() {
        let none = HeaderMap::new();
        let ok =
            |h: &[(&str, &str)], req: &HeaderMap| rules().verdict(StatusCode::OK, &headers(h), req);
        assert_eq!(
            ok(&[("cache-control", "private, max-age=60")], &none),
            Verdict::Pass
        );
        assert_eq!(ok(&[("cache-control", "no-store")], &none), Verdict::Pass);
        assert_eq!(
            ok(
                &[("cache-control", "max-age=60"), ("set-cookie", "s=1")],
                &none
            ),
            Verdict::Pass
        );
        let auth = headers(&[("authorization", "Bearer a")]);
        assert_eq!(ok(&[("cache-control", "max-age=60")], &auth), Verdict::Skip);
        assert_eq!(
            ok(&[("cache-control", "public, max-age=60")], &auth),
            secs(60, 0, 0)
        );
        let scoped = Rules {
            private: true,
            ..rules()
        };
        assert_eq!(
            scoped.verdict(
                StatusCode::OK,
                &headers(&[("cache-control", "private, max-age=9")]),
                &auth
            ),
            secs(9, 0, 0)
        );
    }

    #[test]
    fn statuses_expires_and_default_ttl() {
        let none = HeaderMap::new();
        let cc = headers(&[("cache-control", "max-age=60")]);
        assert_eq!(
            rules().verdict(StatusCode::NOT_FOUND, &cc, &none),
            secs(60, 0, 0)
        );
        for status in [StatusCode::PARTIAL_CONTENT, StatusCode::NOT_MODIFIED] {
            assert_eq!(
                rules().verdict(status, &cc, &none),
                Verdict::Skip,
                "{status}"
            );
        }
        // A server error is kept when it says for how long, never by the default.
        assert_eq!(
            rules().verdict(StatusCode::BAD_GATEWAY, &cc, &none),
            secs(60, 0, 0)
        );
        let default = Rules {
            default_ttl: Some(Duration::from_secs(7)),
            ..rules()
        };
        assert_eq!(
            default.verdict(StatusCode::SERVICE_UNAVAILABLE, &none, &none),
            Verdict::Skip
        );
        let expires = headers(&[
            ("date", "Tue, 24 Nov 2026 10:00:00 GMT"),
            ("expires", "Tue, 24 Nov 2026 10:05:00 GMT"),
        ]);
        assert_eq!(
            rules().verdict(StatusCode::OK, &expires, &none),
            secs(300, 0, 0)
        );
        let garbage = headers(&[("expires", "0")]);
        assert_eq!(
            rules().verdict(StatusCode::OK, &garbage, &none),
            Verdict::Skip
        );
        let default = Rules {
            default_ttl: Some(Duration::from_secs(7)),
            ..rules()
        };
        assert_eq!(default.verdict(StatusCode::OK, &none, &none), secs(7, 0, 0));
    }

    #[test]
    fn age_counts_from_date_plus_age_and_freshness_follows_the_windows() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut kept = headers(&[("age", "5")]);
        stamp(&mut kept, now - Duration::from_secs(10));
        assert_eq!(age(&kept, now), Duration::from_secs(15));

        let l = Lifetimes {
            fresh: Duration::from_secs(10),
            stale_while_revalidate: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(20),
        };
        let at = |s| l.state(Duration::from_secs(s));
        assert_eq!(
            [at(9), at(10), at(14), at(15), at(29), at(30)],
            [
                Freshness::Fresh,
                Freshness::Revalidate,
                Freshness::Revalidate,
                Freshness::IfError,
                Freshness::IfError,
                Freshness::Expired
            ]
        );
    }

    #[test]
    fn conditionals_by_weak_etag_then_by_date() {
        let response = headers(&[
            ("etag", "W/\"v2\""),
            ("last-modified", "Tue, 24 Nov 2026 10:00:00 GMT"),
        ]);
        let cond = |h: &[(&str, &str)]| Conditional::take(&mut headers(h));
        assert!(
            cond(&[("if-none-match", "\"v1\", \"v2\"")]).not_modified(StatusCode::OK, &response)
        );
        assert!(cond(&[("if-none-match", "*")]).not_modified(StatusCode::OK, &response));
        assert!(!cond(&[("if-none-match", "\"v1\"")]).not_modified(StatusCode::OK, &response));
        assert!(
            !cond(&[("if-none-match", "\"v2\"")]).not_modified(StatusCode::NOT_FOUND, &response)
        );
        // If-None-Match wins over If-Modified-Since.
        assert!(
            !cond(&[
                ("if-none-match", "\"v1\""),
                ("if-modified-since", "Tue, 24 Nov 2026 11:00:00 GMT")
            ])
            .not_modified(StatusCode::OK, &response)
        );
        assert!(
            cond(&[("if-modified-since", "Tue, 24 Nov 2026 11:00:00 GMT")])
                .not_modified(StatusCode::OK, &response)
        );
        assert!(
            !cond(&[("if-modified-since", "Tue, 24 Nov 2026 09:00:00 GMT")])
                .not_modified(StatusCode::OK, &response)
        );
        assert!(!cond(&[]).not_modified(StatusCode::OK, &response));
    }

    #[test]
    fn a_targeted_field_replaces_cache_control_and_expires_when_it_is_valid() {
        let none = HeaderMap::new();
        let v = |h: &[(&str, &str)]| rules().verdict(StatusCode::OK, &headers(h), &none);
        let cdn = "cdn-cache-control";
        assert_eq!(
            v(&[("cache-control", "no-store"), (cdn, "max-age=600")]),
            secs(600, 0, 0)
        );
        assert_eq!(
            v(&[("cache-control", "max-age=600"), (cdn, "max-age=5")]),
            secs(5, 0, 0)
        );
        assert_eq!(
            v(&[("cache-control", "max-age=600"), (cdn, "private")]),
            Verdict::Pass
        );
        assert_eq!(
            v(&[("cache-control", "max-age=600"), (cdn, "no-cache")]),
            Verdict::Skip
        );
        // No freshness in the targeted field: `Expires` does not count either.
        let expires = [
            ("date", "Tue, 24 Nov 2026 10:00:00 GMT"),
            ("expires", "Tue, 24 Nov 2026 10:05:00 GMT"),
        ];
        assert_eq!(v(&[expires[0], expires[1], (cdn, "foo")]), Verdict::Skip);
        assert_eq!(
            v(&[expires[0], expires[1], (cdn, "foo, max-age=9")]),
            secs(9, 0, 0)
        );
        // Not a valid dictionary, or a value of the wrong type: `Cache-Control` rules.
        for invalid in ["max-age=10000, &&&&&", "MaX-aGe=3600", "max-age =100"] {
            assert_eq!(
                v(&[("cache-control", "no-store"), (cdn, invalid)]),
                Verdict::Pass,
                "{invalid}"
            );
        }
        assert_eq!(
            v(&[("cache-control", "no-store"), (cdn, "max-age=\"10000\"")]),
            Verdict::Skip,
            "a string max-age is ignored: no freshness"
        );
        let none_targeted = Rules {
            targeted: Arc::new([]),
            ..rules()
        };
        assert_eq!(
            none_targeted.verdict(
                StatusCode::OK,
                &headers(&[("cache-control", "no-store"), (cdn, "max-age=600")]),
                &none
            ),
            Verdict::Pass
        );
    }

    #[test]
    fn must_understand_keeps_known_statuses_despite_no_store() {
        let none = HeaderMap::new();
        let cc = headers(&[("cache-control", "max-age=60, must-understand, no-store")]);
        assert_eq!(rules().verdict(StatusCode::OK, &cc, &none), secs(60, 0, 0));
        let unknown = StatusCode::from_u16(599).unwrap();
        assert_eq!(rules().verdict(unknown, &cc, &none), Verdict::Pass);
    }

    #[test]
    fn an_age_list_counts_its_first_value() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut kept = headers(&[("age", "7200, 0")]);
        stamp(&mut kept, now);
        assert_eq!(age(&kept, now), Duration::from_secs(7200));
        let mut kept = headers(&[("age", "0, 7200")]);
        stamp(&mut kept, now);
        assert_eq!(age(&kept, now), Duration::ZERO);
    }

    #[test]
    fn one_satisfiable_byte_range_of_a_200_is_answered() {
        let response = headers(&[
            ("etag", "\"v1\""),
            ("last-modified", "Tue, 24 Nov 2026 10:00:00 GMT"),
        ]);
        let range = |h: &[(&str, &str)]| {
            Conditional::take(&mut headers(h)).range(StatusCode::OK, &response, 11)
        };
        assert_eq!(range(&[("range", "bytes=0-1")]), Some((0, 1)));
        assert_eq!(range(&[("range", "bytes=1-")]), Some((1, 10)));
        assert_eq!(range(&[("range", "bytes=-3")]), Some((8, 10)));
        assert_eq!(range(&[("range", "bytes=-30")]), Some((0, 10)));
        assert_eq!(range(&[("range", "bytes=5-99")]), Some((5, 10)));
        for whole in [
            "bytes=0-1,3-4",
            "bytes=11-",
            "bytes=4-2",
            "items=0-1",
            "bytes=a-b",
            "bytes=-0",
        ] {
            assert_eq!(range(&[("range", whole)]), None, "{whole}");
        }
        assert_eq!(
            range(&[("range", "bytes=0-1"), ("if-range", "\"v1\"")]),
            Some((0, 1))
        );
        assert_eq!(
            range(&[("range", "bytes=0-1"), ("if-range", "\"v2\"")]),
            None
        );
        assert_eq!(
            range(&[
                ("range", "bytes=0-1"),
                ("if-range", "Tue, 24 Nov 2026 10:00:00 GMT")
            ]),
            Some((0, 1))
        );
        let none = Conditional::take(&mut headers(&[("range", "bytes=0-1")]));
        assert_eq!(none.range(StatusCode::NOT_FOUND, &response, 11), None);
    }

    #[test]
    fn dates_are_read_in_any_case_and_with_a_wrong_weekday() {
        let at = |v: &str| date(Some(&HeaderValue::from_str(v).unwrap()));
        let expected = at("Thu, 18 Aug 2050 02:01:18 GMT").unwrap();
        for text in [
            "THU, 18 Aug 2050 02:01:18 GMT",
            "Thu, 18 AUG 2050 02:01:18 GMT",
            "Thu, 18 Aug 2050 02:01:18 gMT",
            "Mon, 18 Aug 2050 02:01:18 GMT",
            "Sun Aug 18 02:01:18 2050",
        ] {
            assert_eq!(at(text), Some(expected), "{text}");
        }
        assert_eq!(
            at("Thu Aug  8 02:01:18 2050"),
            Some(expected - Duration::from_secs(10 * 86_400))
        );
        // Not dates, as caches read them (cache-tests' freshness-expires-invalid-*).
        for invalid in [
            "0",
            "yesterday",
            "Thu, 32 Aug 2050 02:01:18 GMT",
            "Thu, 18 Aug 2050 02:01:18 UTC",
            "Thu, 18 Aug 2050 02:01:18 AEST",
            "Thu, 18 Aug 50 02:01:18 GMT",
            "Thu 18 Aug 2050 02:01:18 GMT",
            "Thu, 18 Aug  2050 02:01:18 GMT",
            "Thu, 18-Aug-2050 02:01:18 GMT",
        ] {
            assert_eq!(at(invalid), None, "{invalid}");
        }
    }

    #[test]
    fn delta_seconds_past_the_largest_number_are_the_largest() {
        let max_age = |v: &str| Directives::of(&headers(&[("cache-control", v)])).max_age;
        assert_eq!(max_age("max-age=99999999999999999999"), Some(u64::MAX));
        assert_eq!(max_age("max-age=18446744073709551615"), Some(u64::MAX));
        assert_eq!(max_age("max-age=60"), Some(60));
        // Not the grammar: unreadable, so 0.
        for bad in [
            "max-age=",
            "max-age=-1",
            "max-age=+5",
            "max-age=1e3",
            "max-age=12a",
        ] {
            assert_eq!(max_age(bad), Some(0), "{bad}");
        }
        let verdict = rules().verdict(
            StatusCode::OK,
            &headers(&[("cache-control", "max-age=99999999999999999999")]),
            &HeaderMap::new(),
        );
        let Verdict::Store(lifetimes) = verdict else {
            panic!("{verdict:?}");
        };
        assert_eq!(lifetimes.fresh, rules().max_ttl);
    }

    #[test]
    fn request_directives() {
        assert!(Asked::of(&headers(&[("cache-control", "no-cache")])).revalidate);
        assert!(Asked::of(&headers(&[("cache-control", "max-age=0")])).revalidate);
        assert!(Asked::of(&headers(&[("pragma", "no-cache")])).revalidate);
        assert!(!Asked::of(&headers(&[("cache-control", "max-age=5")])).revalidate);
        assert!(Asked::of(&headers(&[("cache-control", "no-store")])).no_store);
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Header values as a client or a service might send them: mostly directive-like
        /// text, sometimes any bytes.
        fn value() -> impl Strategy<Value = HeaderValue> {
            prop_oneof![
                "[ ,=\"a-zA-Z0-9-]{0,64}",
                "(max-age|s-maxage|stale-while-revalidate|stale-if-error)=[0-9]{0,25}",
            ]
            .prop_map(|text| HeaderValue::from_str(&text).unwrap())
            .boxed()
            .prop_union(
                proptest::collection::vec(any::<u8>(), 0..64)
                    .prop_filter_map("not a header value", |b| HeaderValue::from_bytes(&b).ok())
                    .boxed(),
            )
        }

        proptest! {
            /// Any `Cache-Control`, `Age`, `Date`, `Expires` and status: no panic, lifetimes
            /// within `max_ttl`, and an age and a freshness that can be computed.
            #[test]
            fn any_response_headers_give_bounded_lifetimes(
                controls in proptest::collection::vec(value(), 0..4),
                age_value in value(),
                date_value in value(),
                expires_value in value(),
                status in 100u16..600,
                authorized in any::<bool>(),
            ) {
                let mut response = HeaderMap::new();
                for control in controls {
                    response.append(CACHE_CONTROL, control);
                }
                response.insert(AGE, age_value);
                response.insert(DATE, date_value);
                response.insert(EXPIRES, expires_value);
                let mut request = HeaderMap::new();
                if authorized {
                    request.insert(AUTHORIZATION, HeaderValue::from_static("Bearer a"));
                }
                let rules = Rules { default_ttl: Some(Duration::from_secs(60)), ..rules() };
                let status = StatusCode::from_u16(status).unwrap();
                if let Verdict::Store(lifetimes) = rules.verdict(status, &response, &request) {
                    prop_assert!(lifetimes.fresh <= rules.max_ttl);
                    prop_assert!(lifetimes.stale_while_revalidate <= rules.max_ttl);
                    prop_assert!(lifetimes.stale_if_error <= rules.max_ttl);
                    prop_assert!(lifetimes.usable() <= rules.max_ttl * 2);
                    let _ = lifetimes.state(age(&response, SystemTime::now()));
                }
                let _ = Asked::of(&response);
            }

            /// Directives as a service writes them, in any case and spacing, read back.
            #[test]
            fn written_directives_are_read_back(
                max_age in proptest::option::of(any::<u64>()),
                swr in proptest::option::of(any::<u64>()),
                no_store in any::<bool>(),
                private in any::<bool>(),
                upper in any::<bool>(),
                space in "[ \t]{0,2}",
            ) {
                let mut parts = Vec::new();
                if let Some(seconds) = max_age {
                    parts.push(format!("max-age={seconds}"));
                }
                if let Some(seconds) = swr {
                    parts.push(format!("stale-while-revalidate=\"{seconds}\""));
                }
                if no_store {
                    parts.push("no-store".to_owned());
                }
                if private {
                    parts.push("private".to_owned());
                }
                let mut text = parts.join(&format!("{space},{space}"));
                if upper {
                    text = text.to_ascii_uppercase();
                }
                let headers: HeaderMap = [(CACHE_CONTROL, HeaderValue::from_str(&text).unwrap())]
                    .into_iter()
                    .collect();
                let read = Directives::of(&headers);
                prop_assert_eq!(read.max_age, max_age);
                prop_assert_eq!(read.stale_while_revalidate, swr);
                prop_assert_eq!(read.no_store, no_store);
                prop_assert_eq!(read.private, private);
            }

            /// Any validators on either side: an answer, never a panic; `*` matches any
            /// entity tag.
            #[test]
            fn any_validators_are_compared_without_panic(
                if_none_match in proptest::option::of(value()),
                if_modified_since in proptest::option::of(value()),
                etag in proptest::option::of(value()),
                last_modified in proptest::option::of(value()),
            ) {
                let mut request = HeaderMap::new();
                if let Some(v) = if_none_match.clone() {
                    request.insert(IF_NONE_MATCH, v);
                }
                if let Some(v) = if_modified_since {
                    request.insert(IF_MODIFIED_SINCE, v);
                }
                let mut response = HeaderMap::new();
                if let Some(v) = etag.clone() {
                    response.insert(ETAG, v);
                }
                if let Some(v) = last_modified {
                    response.insert(LAST_MODIFIED, v);
                }
                let conditional = Conditional::take(&mut request);
                prop_assert!(request.is_empty(), "validators are taken off the request");
                let answer = conditional.not_modified(StatusCode::OK, &response);
                let star = if_none_match.as_ref().and_then(|v| v.to_str().ok()).map(str::trim) == Some("*");
                if star && etag.as_ref().is_some_and(|e| e.to_str().is_ok()) {
                    prop_assert!(answer);
                }
                prop_assert!(!conditional.not_modified(StatusCode::NOT_FOUND, &response));
            }
        }
    }
}
