//! The HTTP cache over real sockets: a miss with 500 concurrent requests runs once, a hit
//! runs nothing, stale-while-revalidate never makes a caller wait and refreshes once,
//! stale-if-error stands in for a failure within its bound only, `Vary` keeps variants
//! apart, personal responses never reach another identity, and validators get `304`.
//!
//! Freshness is counted in whole seconds from the `Date` the cache stamps (HTTP's own
//! resolution), so the tests that wait for an entry to go stale sleep a little over 2 s.
#![cfg(feature = "http-cache")]

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use futures::future::join_all;
use tower_coalesce::http_cache::HttpCacheLayer;

use support::{Counter, Gate, eventually, header, serve};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// `n` concurrent GETs of `url` with `headers`; statuses, `Cache-Status` values and bodies.
async fn fan_in(url: &str, n: usize, headers: &[(&str, &str)]) -> Vec<(u16, String, String)> {
    let client = client();
    let calls = (0..n).map(|_| {
        let mut req = client.get(url);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        async move {
            let res = req.send().await.unwrap();
            let status = header(&res, "cache-status").unwrap_or_default();
            (res.status().as_u16(), status, res.text().await.unwrap())
        }
    });
    join_all(calls).await
}

async fn fetch(url: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = client().get(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.send().await.unwrap()
}

/// A report route: counts its runs, answers `run {n}` with `cache_control`.
fn report(runs: &Counter, cache_control: &'static str, delay: Duration) -> Router {
    let runs = runs.clone();
    Router::new().route(
        "/api/report/{id}",
        get(move || {
            let runs = runs.clone();
            async move {
                let n = runs.incr();
                tokio::time::sleep(delay).await;
                ([("cache-control", cache_control)], format!("run {n}"))
            }
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_miss_with_500_concurrent_requests_runs_once_and_a_hit_runs_nothing() {
    let runs = Counter::default();
    let cache = HttpCacheLayer::new().unscoped();
    let metrics = cache.metrics();
    let app = report(&runs, "max-age=60", Duration::from_millis(200)).layer(cache);
    let addr = serve(app).await;
    let url = format!("http://{addr}/api/report/7");

    let answers = fan_in(&url, 500, &[]).await;
    assert_eq!(runs.get(), 1, "one run for 500 concurrent requests");
    assert!(
        answers
            .iter()
            .all(|(s, _, body)| *s == 200 && body == "run 0")
    );
    let missed = answers
        .iter()
        .filter(|(_, cs, _)| cs.contains("fwd=miss"))
        .count();
    let collapsed = answers
        .iter()
        .filter(|(_, cs, _)| cs.contains("collapsed"))
        .count();
    let hits = answers
        .iter()
        .filter(|(_, cs, _)| cs.ends_with("; hit") || cs.contains("; hit;"))
        .count();
    assert_eq!(missed - collapsed, 1, "one leader: {:?}", &answers[..3]);
    assert_eq!(missed + hits, 500);

    let res = fetch(&url, &[]).await;
    let status = header(&res, "cache-status").unwrap();
    assert!(status.starts_with("tower-coalesce; hit; ttl="), "{status}");
    assert!(header(&res, "age").is_some());
    assert_eq!(res.text().await.unwrap(), "run 0");
    assert_eq!(runs.get(), 1, "a hit runs nothing");
    assert!(metrics.cache_hits() >= 1);

    // Another path, another entry; other methods pass through.
    let other = fan_in(&format!("http://{addr}/api/report/8"), 1, &[]).await;
    assert_eq!(other[0].2, "run 1");
    let post = client().post(&url).send().await.unwrap();
    assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(
        header(&post, "cache-status").is_none(),
        "not through the cache"
    );
}

/// The first answer goes stale after 1 s; a refresh's answer stays fresh for the rest of
/// the test. A refresh kept with `max-age=1` could be stale the moment it is read (its age
/// counts from its `Date`, which has whole seconds), and a request that read it would start
/// a second refresh the test does not expect.
fn refreshed_for(run: usize) -> &'static str {
    if run == 0 {
        "max-age=1, stale-while-revalidate=60"
    } else {
        "max-age=60"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_while_revalidate_answers_at_once_and_refreshes_exactly_once() {
    let (runs, gate) = (Counter::default(), Gate::closed());
    let (r, g) = (runs.clone(), gate.clone());
    let app = Router::new()
        .route(
            "/api/report/{id}",
            get(move || {
                let (runs, gate) = (r.clone(), g.clone());
                async move {
                    let n = runs.incr();
                    if n > 0 {
                        // The refresh waits until every stale answer is in: a caller that
                        // waited for it would never be answered.
                        gate.pass().await;
                    }
                    ([("cache-control", refreshed_for(n))], format!("run {n}"))
                }
            }),
        )
        .layer(HttpCacheLayer::new().unscoped());
    let addr = serve(app).await;
    let url = format!("http://{addr}/api/report/1");
    assert_eq!(fetch(&url, &[]).await.text().await.unwrap(), "run 0");
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let answers = tokio::time::timeout(Duration::from_secs(10), fan_in(&url, 200, &[]))
        .await
        .expect("stale answers never wait for the refresh");
    assert!(
        answers.iter().all(|(s, cs, body)| *s == 200
            && body == "run 0"
            && cs.contains("stale-while-revalidate")),
        "{:?}",
        &answers[..2]
    );
    assert_eq!(runs.get(), 2, "exactly one refresh for 200 stale requests");

    gate.open();
    let url2 = url.clone();
    let refreshed = Arc::new(std::sync::Mutex::new(false));
    let flag = refreshed.clone();
    tokio::spawn(async move {
        loop {
            let res = fetch(&url2, &[]).await;
            if res.text().await.unwrap() == "run 1" {
                *flag.lock().unwrap() = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    eventually("the refresh is served", || *refreshed.lock().unwrap()).await;
    assert_eq!(runs.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_stands_in_for_a_failure_within_its_bound_only() {
    let runs = Counter::default();
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/api/report/{id}",
            get(move || {
                let n = r.incr();
                async move {
                    if n == 0 {
                        let cc = [("cache-control", "max-age=1, stale-if-error=4")];
                        (StatusCode::OK, cc, "the report").into_response()
                    } else {
                        // Slow enough that the 20 concurrent requests meet in its flight.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        (StatusCode::SERVICE_UNAVAILABLE, "database down").into_response()
                    }
                }
            }),
        )
        .layer(HttpCacheLayer::new().unscoped());
    let addr = serve(app).await;
    let url = format!("http://{addr}/api/report/1");
    assert_eq!(fetch(&url, &[]).await.text().await.unwrap(), "the report");

    tokio::time::sleep(Duration::from_millis(2100)).await; // stale, within 1 + 4 s
    let answers = fan_in(&url, 20, &[]).await;
    assert!(
        answers.iter().all(|(s, cs, body)| *s == 200
            && body == "the report"
            && cs.contains("stale-if-error")),
        "{:?}",
        answers[0]
    );
    assert_eq!(
        runs.get(),
        2,
        "the 20 stale requests tried the service once, together"
    );

    tokio::time::sleep(Duration::from_millis(4100)).await; // past 1 + 4 s
    let res = fetch(&url, &[]).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.text().await.unwrap(), "database down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vary_keeps_gzip_and_identity_apart() {
    let runs = Counter::default();
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/api/report/{id}",
            get(move |headers: HeaderMap| {
                r.incr();
                async move {
                    let encoding = headers
                        .get("accept-encoding")
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_default();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    (
                        [("cache-control", "max-age=60"), ("vary", "Accept-Encoding")],
                        format!("encoded as [{encoding}]"),
                    )
                }
            }),
        )
        .layer(HttpCacheLayer::new().unscoped());
    let addr = serve(app).await;
    let url = format!("http://{addr}/api/report/1");
    for _round in 0..3 {
        let (gzip, identity) = tokio::join!(
            fan_in(&url, 50, &[("accept-encoding", "gzip")]),
            fan_in(&url, 50, &[("accept-encoding", "identity")]),
        );
        assert!(
            gzip.iter().all(|(_, _, b)| b == "encoded as [gzip]"),
            "{gzip:?}"
        );
        assert!(
            identity
                .iter()
                .all(|(_, _, b)| b == "encoded as [identity]")
        );
    }
    let none = fetch(&url, &[]).await.text().await.unwrap();
    assert_eq!(none, "encoded as []");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn personal_responses_never_reach_another_identity_and_their_key_passes() {
    for cache_control in ["private, max-age=60", "no-store", "max-age=60; set-cookie"] {
        let runs = Counter::default();
        let r = runs.clone();
        let app = Router::new()
            .route(
                "/api/me",
                get(move |headers: HeaderMap| {
                    r.incr();
                    async move {
                        let user = headers["x-user"].to_str().unwrap().to_owned();
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let mut h = HeaderMap::new();
                        match cache_control.split_once("; ") {
                            Some((cc, _)) => {
                                h.insert("cache-control", cc.parse().unwrap());
                                h.insert("set-cookie", format!("session={user}").parse().unwrap());
                            }
                            None => {
                                h.insert("cache-control", cache_control.parse().unwrap());
                            }
                        }
                        (h, format!("for {user}"))
                    }
                }),
            )
            // The worst case: one cache for everyone.
            .layer(HttpCacheLayer::new().unscoped());
        let addr = serve(app).await;
        let url = format!("http://{addr}/api/me");
        for round in 0..2 {
            let calls = (0..20).map(|i| {
                let url = url.clone();
                async move {
                    let user = format!("user-{i}");
                    let res = fetch(&url, &[("x-user", &user)]).await;
                    let cs = header(&res, "cache-status").unwrap_or_default();
                    (user, cs, res.text().await.unwrap())
                }
            });
            for (user, cs, body) in join_all(calls).await {
                assert_eq!(
                    body,
                    format!("for {user}"),
                    "{cache_control}, round {round}"
                );
                if round == 1 {
                    assert!(cs.contains("fwd=uri-miss"), "hit-for-pass: {cs}");
                }
            }
        }
        assert_eq!(runs.get(), 40, "{cache_control}: every request ran its own");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validators_get_304_from_the_entry_and_no_cache_goes_to_the_service() {
    let runs = Counter::default();
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/api/report/{id}",
            get(move |headers: HeaderMap| {
                let n = r.incr();
                async move {
                    assert!(
                        !headers.contains_key("if-none-match"),
                        "the service is asked for the full response"
                    );
                    (
                        [("cache-control", "max-age=60"), ("etag", "\"v1\"")],
                        format!("run {n}"),
                    )
                }
            }),
        )
        .layer(HttpCacheLayer::new().unscoped());
    let addr = serve(app).await;
    let url = format!("http://{addr}/api/report/1");

    // A miss with a matching validator: the service runs in full, the client gets 304.
    let res = fetch(&url, &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(res.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(header(&res, "etag").as_deref(), Some("\"v1\""));
    assert_eq!(res.text().await.unwrap(), "");

    let res = fetch(&url, &[("if-none-match", "W/\"v0\", \"v1\"")]).await;
    assert_eq!(res.status(), StatusCode::NOT_MODIFIED);
    assert!(header(&res, "cache-status").unwrap().contains("hit"));
    let res = fetch(&url, &[("if-none-match", "\"v0\"")]).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.text().await.unwrap(), "run 0");
    assert_eq!(runs.get(), 1);

    let res = fetch(&url, &[("cache-control", "no-cache")]).await;
    assert!(
        header(&res, "cache-status")
            .unwrap()
            .contains("fwd=request")
    );
    assert_eq!(res.text().await.unwrap(), "run 1");
    assert_eq!(
        fetch(&url, &[]).await.text().await.unwrap(),
        "run 1",
        "refreshed"
    );
    assert_eq!(runs.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_request_is_kept_only_when_the_response_says_public() {
    for (cache_control, runs_expected) in [("max-age=60", 3), ("public, max-age=60", 1)] {
        let runs = Counter::default();
        let app =
            report(&runs, cache_control, Duration::ZERO).layer(HttpCacheLayer::new().unscoped());
        let addr = serve(app).await;
        let url = format!("http://{addr}/api/report/1");
        for _ in 0..3 {
            fetch(&url, &[("authorization", "Bearer a")]).await;
        }
        assert_eq!(runs.get(), runs_expected, "{cache_control}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_refresh_sends_the_request_it_refreshes_body_and_all() {
    // A GET with a body (a search, say): the refreshed entry answers that body's request,
    // so the refresh must send that body, not an empty one.
    let runs = Counter::default();
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/api/search",
            get(move |body: String| {
                let n = r.incr();
                async move {
                    (
                        [("cache-control", refreshed_for(n))],
                        format!("results for [{body}], run {n}"),
                    )
                }
            }),
        )
        .layer(HttpCacheLayer::new().unscoped());
    let addr = serve(app).await;
    let url = format!("http://{addr}/api/search");
    let search = |body: &'static str| {
        let url = url.clone();
        async move {
            client()
                .get(url)
                .body(body)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    assert_eq!(search("alpha").await, "results for [alpha], run 0");
    tokio::time::sleep(Duration::from_millis(2100)).await;

    // Stale: answered at once, refreshed in the background with alpha's body.
    assert_eq!(search("alpha").await, "results for [alpha], run 0");
    eventually("the refresh ran", || runs.get() == 2).await;
    let mut refreshed = String::new();
    for _ in 0..200 {
        refreshed = search("alpha").await;
        if refreshed != "results for [alpha], run 0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(refreshed, "results for [alpha], run 1");
    assert_eq!(
        search("beta").await,
        "results for [beta], run 2",
        "another body, another answer"
    );
}

/// A request whose lookup missed just before the running flight kept its entry, and that
/// reaches the flights after that flight ended, must find the entry rather than run again:
/// 300 rounds of 40 concurrent requests for a new key each, over a handler of 1 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_that_missed_just_before_the_entry_was_kept_does_not_run_again() {
    let runs = Counter::default();
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/r/{n}",
            get(move || {
                r.incr();
                async {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    [("cache-control", "max-age=60")]
                }
            }),
        )
        .layer(HttpCacheLayer::new().unscoped());
    let addr = serve(app).await;
    let client = client();
    for round in 0..300 {
        let url = format!("http://{addr}/r/{round}");
        let calls = (0..40).map(|_| {
            let request = client.get(&url);
            tokio::spawn(async move { request.send().await.unwrap().status() })
        });
        for status in join_all(calls).await {
            assert_eq!(status.unwrap(), 200);
        }
        assert_eq!(runs.get(), round + 1, "round {round} ran twice");
    }
}
