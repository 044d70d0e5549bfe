//! Purges: dropping kept responses by URI or by tag, on every instance that shares the
//! store, by the app ([`Purger`]) or by a request that changed them (RFC 9111 §4.4).
//!
//! Each kept response is filed under its request's path and query, and under each of its
//! tags (`Surrogate-Key`, space-separated, as Fastly reads it; `Cache-Tag`, comma-separated,
//! as Cloudflare does): groups that the store keeps beside the entries
//! ([`Store::add_to_group`](crate::store::Store::add_to_group)). A purge takes a group and
//! removes every entry in it, whatever the scope and variant it was kept for, then
//! announces the keys so that every instance drops its near copies.

use std::fmt;
use std::sync::Arc;

use futures::future::join_all;
use http::header::{CONTENT_LOCATION, HOST, LOCATION};
use http::request::Parts;
use http::{HeaderMap, HeaderName, StatusCode, Uri};

use super::stage::CacheStage;
use crate::BoxError;
use crate::http::Metrics;
use crate::http::stage::Lookup;
use crate::store::StoreKey;

const SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
const CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");

/// Purges a cache's entries by URI or by tag, on every instance that shares its store;
/// from [`HttpCacheLayer::purger`](super::HttpCacheLayer::purger). Clones share it.
///
/// ```
/// use axum::{Router, extract::State, routing::{get, post}};
/// use tower_coalesce::http_cache::{HttpCacheLayer, Purger};
///
/// async fn report() -> ([(&'static str, &'static str); 2], &'static str) {
///     ([("cache-control", "max-age=300"), ("surrogate-key", "reports team-7")], "the report")
/// }
///
/// // An admin route, behind the app's own auth: the cache leaves purging to the app.
/// async fn reports_changed(State(purger): State<Purger>) -> String {
///     match purger.purge_tag("reports").await {
///         Ok(dropped) => format!("{dropped} dropped"),
///         Err(error) => format!("purge failed: {error}"),
///     }
/// }
///
/// let cache = HttpCacheLayer::new().unscoped();
/// let purger = cache.purger();
/// let app: Router = Router::new()
///     .route("/api/report", get(report).layer(cache))
///     .route("/admin/reports-changed", post(reports_changed))
///     .with_state(purger);
/// ```
#[derive(Clone)]
pub struct Purger {
    pub(super) stage: Arc<CacheStage>,
    pub(super) store: Arc<dyn Lookup>,
    pub(super) metrics: Metrics,
}

impl Purger {
    /// Drops the entries kept for `uri` (its path and query, exactly: `/a?x=1` is not `/a`;
    /// a scheme and host, if given, are ignored), for every caller's scope and every
    /// variant, on every instance. Answers how many entries the store dropped.
    ///
    /// # Errors
    ///
    /// If `uri` is not a URI, or the store failed (or can't purge); entries whose removal
    /// failed stay until they expire.
    pub async fn purge(&self, uri: &str) -> Result<usize, BoxError> {
        let uri: Uri = uri
            .parse()
            .map_err(|e| format!("can't purge {uri:?}: {e}"))?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        purge_uri(&self.stage, &*self.store, path, &self.metrics).await
    }

    /// Drops the entries whose response named `tag` in `Surrogate-Key` or `Cache-Tag`, on
    /// every instance. Answers how many entries were dropped.
    ///
    /// # Errors
    ///
    /// If the store failed (or can't purge).
    pub async fn purge_tag(&self, tag: &str) -> Result<usize, BoxError> {
        let group = StoreKey::group("tag", tag.as_bytes());
        purge_group(&self.stage, &*self.store, &group, &self.metrics).await
    }
}

impl fmt::Debug for Purger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Purger").finish_non_exhaustive()
    }
}

/// Drops the entries kept for the path and query `path`.
pub(super) async fn purge_uri(
    stage: &CacheStage,
    store: &dyn Lookup,
    path: &str,
    metrics: &Metrics,
) -> Result<usize, BoxError> {
    purge_group(
        stage,
        store,
        &StoreKey::group("uri", path.as_bytes()),
        metrics,
    )
    .await
}

/// Takes the group, removes its entries, drops the near copies and tells the others.
async fn purge_group(
    stage: &CacheStage,
    store: &dyn Lookup,
    group: &StoreKey,
    metrics: &Metrics,
) -> Result<usize, BoxError> {
    let keys = store.take_group(group).await?;
    if keys.is_empty() {
        return Ok(0);
    }
    let removed = join_all(keys.iter().map(|key| store.remove(key))).await;
    if let Some(near) = &stage.near {
        near.drop_keys(&keys);
    }
    // Announced even if some removals failed: the others' copies of those are as stale.
    let announced = store.announce(&keys).await;
    let removed = removed.into_iter().collect::<Result<Vec<bool>, _>>()?;
    announced?;
    let dropped = removed.into_iter().filter(|&was| was).count();
    metrics.cache_purged_entries(dropped);
    Ok(dropped)
}

/// The groups a response kept for the request target `target` is filed under: its path
/// and query, and its tags.
pub(super) fn groups(target: &Uri, response: &HeaderMap) -> Vec<StoreKey> {
    let path = target.path_and_query().map_or("/", |p| p.as_str());
    let mut groups = vec![StoreKey::group("uri", path.as_bytes())];
    let tags = |name, separator: fn(char) -> bool| {
        response
            .get_all(name)
            .into_iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(move |value| value.split(separator))
            .map(str::trim)
            .filter(|tag| !tag.is_empty())
    };
    let surrogate = tags(SURROGATE_KEY, |c| c == ' ' || c == '\t');
    for tag in surrogate.chain(tags(CACHE_TAG, |c| c == ',')) {
        let group = StoreKey::group("tag", tag.as_bytes());
        if !groups.contains(&group) {
            groups.push(group);
        }
    }
    groups
}

/// The paths (and queries) that a request of an unsafe method invalidates once it
/// succeeded (RFC 9111 §4.4: a non-error status): its own, and those of `Location` and
/// `Content-Location` on the same origin. `None` for a safe method or an error status.
pub(super) fn invalidated(
    request: &Parts,
    status: StatusCode,
    response: &HeaderMap,
) -> Option<Vec<String>> {
    if request.method.is_safe() || !(status.is_success() || status.is_redirection()) {
        return None;
    }
    let own = request.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut paths = vec![own.to_owned()];
    let origin = request
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| request.headers.get(HOST).and_then(|h| h.to_str().ok()));
    for name in [LOCATION, CONTENT_LOCATION] {
        let Some(uri) = response.get(name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        if let Some(path) = same_origin_path(uri, origin)
            && !paths.contains(&path)
        {
            paths.push(path);
        }
    }
    Some(paths)
}

/// The path and query of `uri` if it is on the origin `origin`: an absolute path, or an
/// absolute URI whose host and port are `origin`'s. (A relative path like `../x` is
/// ignored: rare in these headers, and resolving it is not worth a wrong purge.)
fn same_origin_path(uri: &str, origin: Option<&str>) -> Option<String> {
    if uri.starts_with('/') && !uri.starts_with("//") {
        let uri: Uri = uri.parse().ok()?;
        return Some(uri.path_and_query()?.as_str().to_owned());
    }
    let uri: Uri = uri.parse().ok()?;
    let same = uri
        .authority()
        .zip(origin)
        .is_some_and(|(authority, origin)| authority.as_str().eq_ignore_ascii_case(origin));
    same.then(|| uri.path_and_query().map_or("/", |p| p.as_str()).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, uri: &str, host: Option<&str>) -> Parts {
        let mut builder = http::Request::builder().method(method).uri(uri);
        if let Some(host) = host {
            builder = builder.header(HOST, host);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, http::HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn a_successful_unsafe_request_invalidates_its_uri_and_same_origin_locations() {
        let post = request("POST", "/items?list=1", Some("shop.test"));
        let response = headers(&[
            ("location", "/items/7"),
            ("content-location", "https://other.test/items/7"),
        ]);
        assert_eq!(
            invalidated(&post, StatusCode::CREATED, &response),
            Some(vec!["/items?list=1".to_owned(), "/items/7".to_owned()])
        );
        let same = headers(&[("content-location", "http://SHOP.test/items/8?v=2")]);
        assert_eq!(
            invalidated(&post, StatusCode::SEE_OTHER, &same),
            Some(vec!["/items?list=1".to_owned(), "/items/8?v=2".to_owned()])
        );
        let protocol_relative = headers(&[("location", "//other.test/x")]);
        assert_eq!(
            invalidated(&post, StatusCode::OK, &protocol_relative),
            Some(vec!["/items?list=1".to_owned()])
        );
        // Errors change nothing; safe methods change nothing.
        assert_eq!(invalidated(&post, StatusCode::CONFLICT, &response), None);
        assert_eq!(
            invalidated(&post, StatusCode::INTERNAL_SERVER_ERROR, &response),
            None
        );
        let get = request("GET", "/items", Some("shop.test"));
        assert_eq!(invalidated(&get, StatusCode::OK, &response), None);
        let delete = request("DELETE", "/items/7", None);
        assert_eq!(
            invalidated(&delete, StatusCode::NO_CONTENT, &headers(&[])),
            Some(vec!["/items/7".to_owned()])
        );
    }

    #[test]
    fn a_response_is_filed_under_its_uri_and_each_tag_once() {
        let target: Uri = "/r/1?x=2".parse().unwrap();
        let response = headers(&[
            ("surrogate-key", "reports  team-7"),
            ("cache-tag", "team-7, eu,,"),
        ]);
        let groups = groups(&target, &response);
        let expected = [
            StoreKey::group("uri", b"/r/1?x=2"),
            StoreKey::group("tag", b"reports"),
            StoreKey::group("tag", b"team-7"),
            StoreKey::group("tag", b"eu"),
        ];
        assert_eq!(groups, expected);
        // A URI's group and a tag's of the same name are apart.
        assert_ne!(StoreKey::group("uri", b"x"), StoreKey::group("tag", b"x"));
    }
}
