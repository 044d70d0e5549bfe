//! Purges, invalidation by unsafe methods, and several variants per key, in one process
//! over real sockets: a purge by URI drops the entries of every caller's scope, a tag purge
//! drops the tagged ones only, a successful `POST` drops its URI and its `Location`, a
//! failed one drops nothing, and alternating `Accept-Encoding` clients keep both variants.
#![cfg(feature = "http-cache")]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use support::{Counter, serve};
use tower::ServiceExt;
use tower_coalesce::http::scope;
use tower_coalesce::http_cache::{HttpCacheLayer, Purger};
use tower_coalesce::store::{StoreKey, StoredResponse};

/// Runs per path, and the data's version: what a handler reads from its "database".
#[derive(Clone, Default)]
struct Data {
    runs: Arc<Mutex<HashMap<String, usize>>>,
    version: Counter,
}

impl Data {
    fn ran(&self, path: &str) -> usize {
        self.runs.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    fn run(&self, path: String) -> usize {
        *self.runs.lock().unwrap().entry(path).or_default() += 1;
        self.version.get()
    }
}

/// `GET /r/{id}` (tagged `r-{id}` and `reports`) and `GET /r/{id}/detail` (untagged),
/// kept 300 s, answering `{path} v{version} for {user}`; `POST /r/{id}` changes the data
/// and answers `201` with `Location: /r/{id}/detail`, or `409` for id `conflict`.
fn app(data: &Data) -> Router {
    let (get_data, post_data) = (data.clone(), data.clone());
    let read = move |Path(path): Path<String>, headers: HeaderMap| {
        let data = get_data.clone();
        async move {
            let path = format!("/r/{path}");
            let version = data.run(path.clone());
            let user = headers
                .get("x-user")
                .map_or("", |v| v.to_str().unwrap())
                .to_owned();
            let id = path.split('/').nth(2).unwrap().to_owned();
            let tags = if path.ends_with("/detail") {
                String::new()
            } else {
                format!("r-{id} reports")
            };
            (
                [
                    ("cache-control", "max-age=300".to_owned()),
                    ("surrogate-key", tags),
                ],
                format!("{path} v{version} for {user}"),
            )
        }
    };
    let write = move |Path(id): Path<String>| {
        let data = post_data.clone();
        async move {
            if id == "conflict" {
                return (StatusCode::CONFLICT, [("location", String::new())]);
            }
            data.version.incr();
            (
                StatusCode::CREATED,
                [("location", format!("/r/{id}/detail"))],
            )
        }
    };
    Router::new()
        .route("/r/{id}", get(read.clone()).post(write))
        .route(
            "/r/{id}/{rest}",
            get(
                move |Path((id, rest)): Path<(String, String)>, h: HeaderMap| {
                    read(Path(format!("{id}/{rest}")), h)
                },
            ),
        )
}

struct Cached {
    base: String,
    purger: Purger,
    metrics: tower_coalesce::http::Metrics,
    client: reqwest::Client,
}

async fn cached(data: &Data) -> Cached {
    // Per user, as a cache of anything personal would be.
    let cache = HttpCacheLayer::new().scope(scope::headers(["x-user"]));
    let (purger, metrics) = (cache.purger(), cache.metrics());
    let addr = serve(app(data).layer(cache)).await;
    Cached {
        base: format!("http://{addr}"),
        purger,
        metrics,
        client: reqwest::Client::new(),
    }
}

impl Cached {
    async fn get(&self, path: &str, user: &str) -> String {
        let res = self
            .client
            .get(format!("{}{path}", self.base))
            .header("x-user", user)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.text().await.unwrap()
    }

    async fn post(&self, path: &str) -> StatusCode {
        let res = self
            .client
            .post(format!("{}{path}", self.base))
            .header("x-user", "alice")
            .send()
            .await
            .unwrap();
        res.status()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_drops_the_uri_for_every_scope_and_a_tag_purge_the_tagged_only() {
    let data = Data::default();
    let cache = cached(&data).await;
    for user in ["alice", "bob"] {
        for _ in 0..3 {
            assert_eq!(cache.get("/r/1", user).await, format!("/r/1 v0 for {user}"));
            cache.get("/r/2", user).await;
            cache.get("/r/1/detail", user).await;
        }
    }
    assert_eq!(
        (data.ran("/r/1"), data.ran("/r/2")),
        (2, 2),
        "one run per scope"
    );

    data.version.incr();
    // Two scopes' entries, of this exact URI only.
    assert_eq!(cache.purger.purge("/r/1").await.unwrap(), 2);
    assert_eq!(cache.get("/r/1", "alice").await, "/r/1 v1 for alice");
    assert_eq!(cache.get("/r/1", "bob").await, "/r/1 v1 for bob");
    assert_eq!(
        cache.get("/r/2", "bob").await,
        "/r/2 v0 for bob",
        "not purged"
    );
    assert_eq!(
        cache.get("/r/1/detail", "bob").await,
        "/r/1/detail v0 for bob"
    );
    // A full URI purges its path and query.
    assert_eq!(
        cache.purger.purge("http://example.test/r/2").await.unwrap(),
        2
    );
    assert_eq!(cache.get("/r/2", "bob").await, "/r/2 v1 for bob");
    assert!(cache.purger.purge("not a uri").await.is_err());

    data.version.incr();
    // `reports` tags /r/1 and /r/2 (each for two scopes; /r/2 only for bob now), not details.
    assert_eq!(cache.purger.purge_tag("reports").await.unwrap(), 3);
    assert_eq!(cache.get("/r/1", "alice").await, "/r/1 v2 for alice");
    assert_eq!(cache.get("/r/2", "bob").await, "/r/2 v2 for bob");
    assert_eq!(
        cache.get("/r/1/detail", "alice").await,
        "/r/1/detail v0 for alice"
    );
    assert_eq!(
        cache.purger.purge_tag("r-1").await.unwrap(),
        1,
        "alice's only, since"
    );
    assert_eq!(cache.purger.purge_tag("nothing").await.unwrap(), 0);
    assert_eq!(data.ran("/r/1/detail"), 2, "details were never purged");
    assert_eq!(cache.metrics.cache_purged(), 2 + 2 + 3 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_post_invalidates_its_uri_and_location_and_a_failed_one_nothing() {
    let data = Data::default();
    let cache = cached(&data).await;
    for path in ["/r/1", "/r/1/detail", "/r/conflict", "/r/2"] {
        cache.get(path, "alice").await;
        cache.get(path, "bob").await;
    }
    assert_eq!(cache.post("/r/conflict").await, StatusCode::CONFLICT);
    assert_eq!(
        cache.get("/r/conflict", "alice").await,
        "/r/conflict v0 for alice"
    );

    assert_eq!(cache.post("/r/1").await, StatusCode::CREATED);
    // Alice wrote; Bob's copies are of the same URIs, and go too.
    assert_eq!(cache.get("/r/1", "bob").await, "/r/1 v1 for bob");
    assert_eq!(
        cache.get("/r/1/detail", "alice").await,
        "/r/1/detail v1 for alice"
    );
    assert_eq!(
        cache.get("/r/2", "alice").await,
        "/r/2 v0 for alice",
        "another URI"
    );
    assert_eq!(data.ran("/r/conflict"), 2);
    assert_eq!(
        cache.metrics.cache_purged(),
        4,
        "/r/1 and its detail, for two users"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternating_encodings_keep_both_variants_and_the_variants_are_bounded() {
    let runs = support::RunsByEncoding::default();
    let app = support::varied_report(&runs).layer(HttpCacheLayer::new().unscoped());
    let url = format!("http://{}/report", serve(app).await);
    let client = reqwest::Client::new();
    let get = |encoding: String| {
        let request = client.get(&url).header("accept-encoding", &encoding);
        async move { request.send().await.unwrap().text().await.unwrap() }
    };
    for _ in 0..10 {
        for encoding in ["gzip", "identity", "br"] {
            assert_eq!(get(encoding.to_owned()).await, format!("as [{encoding}]"));
        }
    }
    for encoding in ["gzip", "identity", "br"] {
        assert_eq!(runs.lock().unwrap()[encoding], 1, "{encoding} ran again");
    }
    // Past 8 variants of one key, a new one is answered but not kept.
    for round in 0..2 {
        for n in 0..8 {
            let encoding = format!("x-{n}");
            assert_eq!(get(encoding.clone()).await, format!("as [{encoding}]"));
            let ran = runs.lock().unwrap()[&encoding];
            assert_eq!(ran, if n < 5 { 1 } else { round + 1 }, "{encoding}");
        }
    }
}

#[tokio::test]
async fn a_store_that_cannot_purge_says_so() {
    let purger = HttpCacheLayer::new()
        .store(tower_coalesce::store::NoStore)
        .purger();
    let error = purger.purge("/r/1").await.unwrap_err().to_string();
    assert!(
        error.contains("can't remove entries or keep groups"),
        "{error}"
    );
    assert!(purger.purge_tag("reports").await.is_err());
}

/// A store whose group takes are slow, as a store far away would be.
#[derive(Clone, Default)]
struct SlowGroups(tower_coalesce::store::MemoryStore);

impl tower_coalesce::store::Store for SlowGroups {
    async fn get(
        &self,
        key: &StoreKey,
    ) -> Result<Option<Arc<StoredResponse>>, tower_coalesce::BoxError> {
        self.0.get(key).await
    }

    async fn put(
        &self,
        key: StoreKey,
        response: Arc<StoredResponse>,
        ttl: Duration,
    ) -> Result<(), tower_coalesce::BoxError> {
        self.0.put(key, response, ttl).await
    }

    async fn remove(&self, key: &StoreKey) -> Result<bool, tower_coalesce::BoxError> {
        self.0.remove(key).await
    }

    async fn add_to_group(
        &self,
        group: &StoreKey,
        key: &StoreKey,
        ttl: Duration,
    ) -> Result<(), tower_coalesce::BoxError> {
        self.0.add_to_group(group, key, ttl).await
    }

    async fn take_group(
        &self,
        group: &StoreKey,
    ) -> Result<Vec<StoreKey>, tower_coalesce::BoxError> {
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.0.take_group(group).await
    }
}

/// A client that times out while its `POST` invalidates (after the handler ran) leaves the
/// invalidation done all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_goes_away_mid_invalidation_leaves_it_done() {
    let data = Data::default();
    let cache = HttpCacheLayer::new()
        .scope(scope::headers(["x-user"]))
        .store(SlowGroups::default());
    let metrics = cache.metrics();
    let app = app(&data).layer(cache);
    let get = || {
        axum::http::Request::get("/r/1")
            .header("x-user", "alice")
            .body(axum::body::Body::empty())
            .unwrap()
    };
    let body = |res: axum::response::Response| async {
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    };
    assert_eq!(
        body(app.clone().oneshot(get()).await.unwrap()).await,
        "/r/1 v0 for alice"
    );
    let post = axum::http::Request::post("/r/1")
        .body(axum::body::Body::empty())
        .unwrap();
    let timed_out =
        tokio::time::timeout(Duration::from_millis(50), app.clone().oneshot(post)).await;
    assert!(
        timed_out.is_err(),
        "the caller gave up during the invalidation"
    );
    assert_eq!(data.version.get(), 1, "the handler ran");
    support::eventually("the invalidation finished", || metrics.cache_purged() == 1).await;
    assert_eq!(
        body(app.oneshot(get()).await.unwrap()).await,
        "/r/1 v1 for alice"
    );
}
