//! The cache across instances with a near cache in front of Redis (a real `redis-server`
//! of each test's own), a Redis Cluster, and PostgreSQL: after each instance's first read
//! a hit costs Redis nothing; a refresh, a purge, a tag purge or a `POST` on one instance
//! reaches the other within 50 ms; a dropped connection clears the near copies, so that
//! nothing missed meanwhile is served.
#![cfg(all(feature = "redis", feature = "http-cache"))]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::get;
use support::redis::{Server, command_calls, free_port, kill_connections, prefix, subscribed};
use support::{Counter, serve};
use tower_coalesce::http_cache::{HttpCacheLayer, Purger};
use tower_coalesce::store::Store;

/// `GET /r/{id}`: `{id} v{version}`, fresh for 300 s, tagged `reports`; `POST /r/{id}`
/// changes the data. Runs are counted.
fn app(version: &Counter, runs: &Counter) -> Router {
    let (v, r) = (version.clone(), runs.clone());
    let read = move |Path(id): Path<String>| {
        let (version, runs) = (v.clone(), r.clone());
        async move {
            runs.incr();
            (
                [
                    ("cache-control", "max-age=300"),
                    ("surrogate-key", "reports"),
                ],
                format!("{id} v{}", version.get()),
            )
        }
    };
    let v = version.clone();
    let write = move || {
        let version = v.clone();
        async move {
            version.incr();
            StatusCode::NO_CONTENT
        }
    };
    Router::new().route("/r/{id}", get(read).post(write))
}

struct Instance {
    base: String,
    purger: Purger,
    metrics: tower_coalesce::http::Metrics,
}

async fn instance<St: Store>(store: St, app: Router) -> Instance {
    let cache = HttpCacheLayer::new()
        .unscoped()
        .store(store)
        .near_cache(1 << 20);
    let (purger, metrics) = (cache.purger(), cache.metrics());
    let addr: SocketAddr = serve(app.layer(cache)).await;
    let instance = Instance {
        base: format!("http://{addr}"),
        purger,
        metrics,
    };
    // The first lookup subscribes the near cache to the changes (a 404, kept nowhere).
    let res = reqwest::get(format!("{}/warm-up", instance.base))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    instance
}

impl Instance {
    async fn get(&self, path: &str) -> String {
        self.send(reqwest::Client::new().get(format!("{}{path}", self.base)))
            .await
    }

    /// A `GET` that skips the kept entry and keeps the new response: a refresh.
    async fn refresh(&self, path: &str) -> String {
        let request = reqwest::Client::new()
            .get(format!("{}{path}", self.base))
            .header("cache-control", "no-cache");
        self.send(request).await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> String {
        let res = request.send().await.unwrap();
        assert!(res.status().is_success(), "{}", res.status());
        res.text().await.unwrap()
    }
}

/// Two instances on a Redis of the test's own (to count its commands, to kill its
/// connections), each with its own connection and near cache.
async fn two_instances(version: &Counter, runs: &Counter) -> Option<(Server, Instance, Instance)> {
    let server = Server::start(free_port())?;
    let prefix = prefix();
    let a = instance(
        server.connect().await.with_prefix(prefix.as_str()),
        app(version, runs),
    )
    .await;
    let b = instance(
        server.connect().await.with_prefix(prefix.as_str()),
        app(version, runs),
    )
    .await;
    // Each is subscribed to the changes before the test starts.
    subscribed(&[server.url()], &format!("{prefix}changes"), 2).await;
    Some((server, a, b))
}

/// The commands Redis ran, but the `INFO` that counts them.
async fn commands(server: &Server) -> u64 {
    command_calls(server)
        .await
        .into_iter()
        .filter(|(name, _)| name != "info")
        .map(|(_, calls)| calls)
        .sum()
}

/// Asks `instance` for `path` until it answers `expected`, for at most `within`; answers
/// how long that took.
async fn answers_within(
    instance: &Instance,
    path: &str,
    expected: &str,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let body = instance.get(path).await;
        if body == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "still {body:?} instead of {expected:?} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_first_read_a_hit_on_either_instance_costs_redis_nothing() {
    let (version, runs) = (Counter::default(), Counter::default());
    let Some((server, a, b)) = two_instances(&version, &runs).await else {
        return;
    };
    assert_eq!(a.get("/r/1").await, "1 v0");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let before_b = commands(&server).await;
    assert_eq!(b.get("/r/1").await, "1 v0");
    let b_first = commands(&server).await - before_b;
    let before = commands(&server).await;
    for _ in 0..50 {
        assert_eq!(a.get("/r/1").await, "1 v0");
        assert_eq!(b.get("/r/1").await, "1 v0");
    }
    assert_eq!(commands(&server).await - before, 0, "100 hits, 0 commands");
    assert_eq!(b_first, 1, "B's first hit: one GET");
    assert_eq!(runs.get(), 1);
    assert_eq!(
        (a.metrics.cache_near_hits(), b.metrics.cache_near_hits()),
        (50, 50)
    );
    assert_eq!(b.metrics.cache_hits(), 51);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_a_purge_a_tag_purge_and_a_post_reach_the_other_instance_within_50_ms() {
    let (version, runs) = (Counter::default(), Counter::default());
    let Some((_server, a, b)) = two_instances(&version, &runs).await else {
        return;
    };
    let within = Duration::from_millis(50);
    for path in ["/r/1", "/r/2", "/r/3"] {
        a.get(path).await;
        b.get(path).await;
    }
    assert_eq!(runs.get(), 3);

    // A refreshes: B's near copy goes, and B reads A's new entry (no run of its own).
    version.incr();
    assert_eq!(a.refresh("/r/1").await, "1 v1");
    let took = answers_within(&b, "/r/1", "1 v1", within).await;
    assert_eq!(runs.get(), 4, "B read the refreshed entry: it ran nothing");
    eprintln!("refresh reached the other instance in {took:?}");

    // A purges a URI: B's next request is a miss.
    version.incr();
    assert_eq!(a.purger.purge("/r/1").await.unwrap(), 1);
    answers_within(&b, "/r/1", "1 v2", within).await;
    assert_eq!(a.get("/r/1").await, "1 v2", "A reads what B kept");

    // A purges a tag: every tagged entry, on both.
    version.incr();
    assert_eq!(a.purger.purge_tag("reports").await.unwrap(), 3);
    for path in ["/r/2", "/r/3", "/r/1"] {
        let id = &path[3..];
        answers_within(&b, path, &format!("{id} v3"), within).await;
        assert_eq!(a.get(path).await, format!("{id} v3"));
    }

    // A `POST` through B drops the URI on A too.
    let res = reqwest::Client::new()
        .post(format!("{}/r/2", b.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    answers_within(&a, "/r/2", "2 v4", within).await;
    assert_eq!(b.get("/r/3").await, "3 v3", "another URI stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_clears_the_near_cache_so_nothing_missed_is_served() {
    let (version, runs) = (Counter::default(), Counter::default());
    let Some((server, a, b)) = two_instances(&version, &runs).await else {
        return;
    };
    a.get("/r/1").await;
    assert_eq!(b.get("/r/1").await, "1 v0");
    let before = commands(&server).await;
    assert_eq!(b.get("/r/1").await, "1 v0");
    assert_eq!(commands(&server).await, before, "a near hit");

    // Every connection of both instances drops; A refreshes while B may still be away.
    kill_connections(&server).await;
    version.incr();
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.refresh("/r/1").await != "1 v1" {
        assert!(Instant::now() < deadline, "A never refreshed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Whether or not B got A's message, its copy is gone: it reads Redis again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = commands(&server).await;
        let body = b.get("/r/1").await;
        if commands(&server).await > before {
            assert_eq!(body, "1 v1");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B kept serving its near copy ({body})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(b.get("/r/1").await, "1 v1");
}

/// The store reports a dropped connection as changes lost, and again once it is
/// subscribed anew: the near cache then drops every copy (its own tests show it does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_is_reported_as_changes_lost() {
    use tower_coalesce::store::Store;
    let Some(server) = Server::start(free_port()) else {
        return;
    };
    let prefix = prefix();
    let store = server.connect().await.with_prefix(prefix.as_str());
    let mut changes = store.changes().expect("a shared store has changes");
    subscribed(&[server.url()], &format!("{prefix}changes"), 1).await;
    // The subscription's confirmation is itself reported as a loss: the one to come first.
    assert_lost_within(&mut changes, Duration::from_secs(5)).await;
    while changes.try_recv().is_ok() {}
    kill_connections(&server).await;
    assert_lost_within(&mut changes, Duration::from_secs(5)).await;
}

/// Waits for `Change::Lost`, passing over the keys other instances announce meanwhile (a
/// keep announced just before the connections go may still be on its way); fails if the
/// loss is not reported in time.
async fn assert_lost_within(
    changes: &mut tokio::sync::broadcast::Receiver<tower_coalesce::store::Change>,
    within: Duration,
) {
    use tower_coalesce::store::Change;
    let lost = tokio::time::timeout(within, async {
        loop {
            match changes.recv().await {
                Ok(Change::Keys(_)) => continue,
                other => return other,
            }
        }
    })
    .await;
    assert!(matches!(lost, Ok(Ok(Change::Lost))), "{lost:?}");
}

/// On a Redis Cluster the backplane is a sharded channel (`SSUBSCRIBE`/`SPUBLISH`), and a
/// tag's entries are on several masters: a refresh and a tag purge still reach the other
/// instance within 50 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_refresh_and_a_tag_purge_reach_the_other_instance_within_50_ms() {
    let Some(urls) = support::redis::cluster_urls() else {
        return;
    };
    let (version, runs) = (Counter::default(), Counter::default());
    let prefix = prefix();
    let mut instances = Vec::new();
    for _ in 0..2 {
        let store = support::redis::connect_cluster(&urls, Duration::from_secs(1))
            .await
            .with_prefix(prefix.as_str());
        instances.push(instance(store, app(&version, &runs)).await);
    }
    subscribed(&urls, &format!("{prefix}changes"), 2).await;
    refresh_and_tag_purge(&instances, &version, &runs, 12).await;
}

/// Both instances read `/r/0` .. `/r/{n - 1}`; A refreshes `/r/0`, and B reads the new
/// entry within 50 ms; A purges the tag, and within 50 ms B runs each anew and A reads
/// those.
async fn refresh_and_tag_purge(
    instances: &[Instance],
    version: &Counter,
    runs: &Counter,
    n: usize,
) {
    let (a, b) = (&instances[0], &instances[1]);
    let within = Duration::from_millis(50);
    let paths: Vec<String> = (0..n).map(|n| format!("/r/{n}")).collect();
    for path in &paths {
        a.get(path).await;
        b.get(path).await;
    }
    assert_eq!(runs.get(), n);

    version.incr();
    assert_eq!(a.refresh("/r/0").await, "0 v1");
    answers_within(b, "/r/0", "0 v1", within).await;
    assert_eq!(
        runs.get(),
        n + 1,
        "B read the refreshed entry: it ran nothing"
    );

    version.incr();
    assert_eq!(a.purger.purge_tag("reports").await.unwrap(), n);
    for (id, path) in paths.iter().enumerate() {
        answers_within(b, path, &format!("{id} v2"), within).await;
        assert_eq!(a.get(path).await, format!("{id} v2"));
    }
}

/// On PostgreSQL the backplane is `LISTEN`/`NOTIFY` and the groups a table beside the
/// store's: a refresh, a tag purge and a `POST` reach the other instance within 50 ms, and
/// a dropped listening connection is reported as changes lost.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_refresh_a_tag_purge_and_a_post_reach_the_other_instance_within_50_ms() {
    let Some(url) = support::postgres::database_url() else {
        return;
    };
    let (pool, table) = (
        support::postgres::pool(&url).await,
        support::postgres::table(),
    );
    let (version, runs) = (Counter::default(), Counter::default());
    let mut stores = Vec::new();
    let mut instances = Vec::new();
    for _ in 0..2 {
        let poll = Duration::from_millis(200);
        let store = support::postgres::store(&pool, &table, Duration::from_secs(5), poll).await;
        stores.push(store.clone());
        instances.push(instance(store, app(&version, &runs)).await);
    }
    refresh_and_tag_purge(&instances, &version, &runs, 2).await;
    let (a, b) = (&instances[0], &instances[1]);
    let res = reqwest::Client::new()
        .post(format!("{}/r/1", b.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    answers_within(a, "/r/1", "1 v3", Duration::from_millis(50)).await;

    // The listening connections go: each store listens anew and reports the loss.
    let mut changes = stores[1].changes().unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_lost_within(&mut changes, Duration::from_secs(10)).await;
}

/// Variants through the near caches: two instances, clients alternating three
/// `Accept-Encoding`s: one run per variant for both instances, each answer its own
/// variant, and after each instance's first read of a variant, hits from the near copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variants_run_once_across_instances_and_hit_near_after() {
    let Some(server) = Server::start(free_port()) else {
        return;
    };
    let runs = support::RunsByEncoding::default();
    let app = support::varied_report(&runs);
    let prefix = prefix();
    let mut instances = Vec::new();
    for _ in 0..2 {
        let store = server.connect().await.with_prefix(prefix.as_str());
        instances.push(instance(store, app.clone()).await);
    }
    subscribed(&[server.url()], &format!("{prefix}changes"), 2).await;
    for _ in 0..5 {
        each_variant_on_each(&instances).await;
    }
    let all: usize = runs.lock().unwrap().values().sum();
    assert_eq!(all, 3, "one run per variant for both instances");
    let before = commands(&server).await;
    each_variant_on_each(&instances).await;
    assert_eq!(
        commands(&server).await - before,
        0,
        "every variant from the near copies"
    );
}

/// Every instance asked for the report in each of three encodings: each answer its own.
async fn each_variant_on_each(instances: &[Instance]) {
    let client = reqwest::Client::new();
    for instance in instances {
        for encoding in ["gzip", "br", "identity"] {
            let res = client
                .get(format!("{}/report", instance.base))
                .header("accept-encoding", encoding)
                .send()
                .await
                .unwrap();
            assert_eq!(res.text().await.unwrap(), format!("as [{encoding}]"));
        }
    }
}
