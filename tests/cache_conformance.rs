//! The HTTP cache's RFC 9111 behaviours that the public cache-tests suite checks
//! (`.ci/cache-tests`), each tested here on its own over real sockets: revalidation of a
//! stale entry with its validators and a `304` that freshens it, server errors kept when
//! they state their freshness, `CDN-Cache-Control` (RFC 9213), `Age` sent as a list, and
//! byte ranges answered from a complete entry.
#![cfg(feature = "http-cache")]

mod support;

use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use futures::future::join_all;
use tower_coalesce::http_cache::HttpCacheLayer;

use support::{Counter, header, serve};

async fn fetch(url: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut req = client.get(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.send().await.unwrap()
}

/// A route that answers `headers` and `body`, counting its runs.
fn route(runs: &Counter, headers: &'static [(&'static str, &'static str)]) -> Router {
    let runs = runs.clone();
    Router::new().route(
        "/r",
        get(move || {
            let n = runs.incr();
            async move {
                let mut map = HeaderMap::new();
                for (name, value) in headers {
                    map.append(*name, value.parse().unwrap());
                }
                (map, format!("run {n}"))
            }
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_entry_is_revalidated_once_and_the_304_freshens_it() {
    let (full, conditional) = (Counter::default(), Counter::default());
    let (f, c) = (full.clone(), conditional.clone());
    let app = Router::new()
        .route(
            "/doc",
            get(move |headers: HeaderMap| {
                let (f, c) = (f.clone(), c.clone());
                async move {
                    if headers.get("if-none-match").is_some_and(|v| v == "\"v1\"") {
                        c.incr();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        return (
                            StatusCode::NOT_MODIFIED,
                            [
                                ("cache-control", "max-age=60"),
                                ("etag", "\"v1\""),
                                ("x-version", "B"),
                            ],
                        )
                            .into_response();
                    }
                    f.incr();
                    (
                        [
                            ("cache-control", "max-age=1"),
                            ("etag", "\"v1\""),
                            ("x-version", "A"),
                        ],
                        "the document",
                    )
                        .into_response()
                }
            }),
        )
        .layer(HttpCacheLayer::new().unscoped());
    let addr = serve(app).await;
    let url = format!("http://{addr}/doc");

    let first = fetch(&url, &[]).await;
    assert_eq!(header(&first, "x-version").as_deref(), Some("A"));
    tokio::time::sleep(Duration::from_millis(2100)).await;

    // 20 requests for the stale entry: one conditional request, answered 304, freshens it
    // for all of them; nobody gets the 304 they did not ask for.
    let answers = join_all((0..20).map(|_| async {
        let res = fetch(&url, &[]).await;
        let version = header(&res, "x-version");
        (res.status(), version, res.text().await.unwrap())
    }))
    .await;
    for (status, version, body) in &answers {
        assert_eq!(*status, StatusCode::OK);
        assert_eq!(version.as_deref(), Some("B"), "the 304's headers");
        assert_eq!(body, "the document", "the kept body");
    }
    assert_eq!((full.get(), conditional.get()), (1, 1));

    // Fresh again for the 304's max-age: a hit.
    let res = fetch(&url, &[]).await;
    assert!(header(&res, "cache-status").unwrap().contains("hit"));
    assert_eq!(header(&res, "x-version").as_deref(), Some("B"));
    // A client's own validator is answered by the cache.
    let res = fetch(&url, &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(res.status(), StatusCode::NOT_MODIFIED);
    assert_eq!((full.get(), conditional.get()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_304_for_another_representation_freshens_nothing() {
    // A 304 whose ETag is not the kept one's: the kept response is not made fresh by it,
    // and the client, which sent no validator, gets neither a 304 nor the old body: a 502
    // that says why.
    let runs = Counter::default();
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/doc",
            get(move |headers: HeaderMap| {
                let n = r.incr();
                async move {
                    if headers.contains_key("if-none-match") {
                        return (StatusCode::NOT_MODIFIED, [("etag", "\"other\"")]).into_response();
                    }
                    (
                        [("cache-control", "max-age=1"), ("etag", "\"v1\"")],
                        format!("run {n}"),
                    )
                        .into_response()
                }
            }),
        )
        .layer(HttpCacheLayer::new().unscoped());
    let addr = serve(app).await;
    let url = format!("http://{addr}/doc");
    assert_eq!(fetch(&url, &[]).await.text().await.unwrap(), "run 0");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let res = fetch(&url, &[]).await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert!(
        res.text()
            .await
            .unwrap()
            .contains("Not Modified for another representation")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_kept_only_when_they_state_their_freshness() {
    for (headers, runs_expected) in [(&[("cache-control", "max-age=60")][..], 1), (&[][..], 3)] {
        let runs = Counter::default();
        let r = runs.clone();
        let app = Router::new()
            .route(
                "/r",
                get(move || {
                    r.incr();
                    let mut map = HeaderMap::new();
                    for (name, value) in headers {
                        map.append(*name, value.parse().unwrap());
                    }
                    async move { (StatusCode::SERVICE_UNAVAILABLE, map, "down") }
                }),
            )
            .layer(
                HttpCacheLayer::new()
                    .unscoped()
                    .default_ttl(Duration::from_secs(60)),
            );
        let addr = serve(app).await;
        for _ in 0..3 {
            let res = fetch(&format!("http://{addr}/r"), &[]).await;
            assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
        assert_eq!(runs.get(), runs_expected, "{headers:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdn_cache_control_speaks_to_the_cache_in_place_of_cache_control() {
    let cases: [(&'static [(&'static str, &'static str)], usize); 4] = [
        // Browsers don't keep it; this cache does.
        (
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=60"),
            ],
            1,
        ),
        // Browsers keep it; this cache doesn't.
        (
            &[
                ("cache-control", "max-age=60"),
                ("cdn-cache-control", "no-store"),
            ],
            3,
        ),
        (
            &[
                ("cache-control", "max-age=60"),
                ("cdn-cache-control", "private"),
            ],
            3,
        ),
        // Not a valid field: Cache-Control rules.
        (
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=60, &&"),
            ],
            3,
        ),
    ];
    for (headers, runs_expected) in cases {
        let runs = Counter::default();
        let addr = serve(route(&runs, headers).layer(HttpCacheLayer::new().unscoped())).await;
        for _ in 0..3 {
            let res = fetch(&format!("http://{addr}/r"), &[]).await;
            assert_eq!(
                header(&res, "cdn-cache-control").as_deref(),
                Some(headers[1].1),
                "the field goes on as it came"
            );
        }
        assert_eq!(runs.get(), runs_expected, "{headers:?}");
    }
    // With the targeted fields turned off, Cache-Control rules.
    let runs = Counter::default();
    let cache = HttpCacheLayer::new().unscoped().targeted_cache_control([]);
    let headers = &[
        ("cache-control", "no-store"),
        ("cdn-cache-control", "max-age=60"),
    ];
    let addr = serve(route(&runs, headers).layer(cache)).await;
    for _ in 0..3 {
        fetch(&format!("http://{addr}/r"), &[]).await;
    }
    assert_eq!(runs.get(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_age_sent_as_a_list_counts_its_first_value() {
    let runs = Counter::default();
    let headers = &[("cache-control", "max-age=3600"), ("age", "7200, 0")];
    let addr = serve(route(&runs, headers).layer(HttpCacheLayer::new().unscoped())).await;
    for _ in 0..2 {
        fetch(&format!("http://{addr}/r"), &[]).await;
    }
    assert_eq!(runs.get(), 2, "two hours old: stale at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_is_answered_206_from_the_kept_whole() {
    let (runs, asked_ranges) = (Counter::default(), Counter::default());
    let (r, a) = (runs.clone(), asked_ranges.clone());
    let app = Router::new()
        .route(
            "/video",
            get(move |headers: HeaderMap| {
                r.incr();
                if headers.contains_key("range") {
                    a.incr();
                }
                async move {
                    (
                        [("cache-control", "max-age=60"), ("etag", "\"v1\"")],
                        "0123456789",
                    )
                }
            }),
        )
        .layer(HttpCacheLayer::new().unscoped());
    let addr = serve(app).await;
    let url = format!("http://{addr}/video");

    // A miss asks the service for the whole response, and keeps it.
    let res = fetch(&url, &[("range", "bytes=2-4")]).await;
    assert_eq!(res.text().await.unwrap(), "0123456789");
    for (range, if_range, status, body, content_range) in [
        ("bytes=2-4", None, 206, "234", Some("bytes 2-4/10")),
        ("bytes=7-", None, 206, "789", Some("bytes 7-9/10")),
        ("bytes=-2", None, 206, "89", Some("bytes 8-9/10")),
        (
            "bytes=2-4",
            Some("\"v1\""),
            206,
            "234",
            Some("bytes 2-4/10"),
        ),
        // Another representation, several ranges, past the end: the whole.
        ("bytes=2-4", Some("\"v0\""), 200, "0123456789", None),
        ("bytes=0-1,5-6", None, 200, "0123456789", None),
        ("bytes=20-", None, 200, "0123456789", None),
    ] {
        let mut headers = vec![("range", range)];
        headers.extend(if_range.map(|v| ("if-range", v)));
        let res = fetch(&url, &headers).await;
        assert_eq!(res.status().as_u16(), status, "{range} {if_range:?}");
        assert_eq!(header(&res, "content-range").as_deref(), content_range);
        assert_eq!(res.text().await.unwrap(), body, "{range}");
    }
    assert_eq!((runs.get(), asked_ranges.get()), (1, 0));
}
