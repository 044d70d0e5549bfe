//! What the HTTP layer logs. A binary of its own: tracing caches each call site's interest
//! process-wide, and a test that installs a thread-local subscriber while other tests'
//! threads register the same call sites without one can miss events.
#![cfg(feature = "http")]

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use tower_coalesce::http::{HttpCoalesceLayer, key};

/// Everything logged at `DEBUG` and above on this thread while the guard lives.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    /// The one line logged at `WARN`; fails if there are none or several.
    fn the_warning(&self) -> String {
        let logs = self.text();
        let warnings: Vec<&str> = logs.lines().filter(|l| l.contains("WARN")).collect();
        assert_eq!(warnings.len(), 1, "{logs}");
        warnings[0].to_owned()
    }
}

fn capture() -> (Captured, tracing::subscriber::DefaultGuard) {
    capture_at(tracing::Level::DEBUG)
}

/// Everything logged at `level` and above on this thread while the guard lives.
fn capture_at(level: tracing::Level) -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer({
            let captured = captured.clone();
            move || captured.clone()
        })
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

/// Logs name flights by a hash of the key: keys carry user ids and must not reach logs.
#[tokio::test(flavor = "current_thread")]
async fn logs_name_a_flight_by_a_hash_never_by_its_key() {
    use tower::ServiceExt;

    let (captured, _guard) = capture();

    let gate = support::Gate::closed();
    let svc = tower::ServiceBuilder::new()
        .layer(HttpCoalesceLayer::new(key::idempotency_key()))
        .service(tower::service_fn({
            let gate = gate.clone();
            move |_req: http::Request<tower_coalesce::http::RequestBody<Body>>| {
                let gate = gate.clone();
                async move {
                    gate.pass().await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(Body::from("ok")))
                }
            }
        }));
    let secret = "user-4242-secret";
    let req = || {
        http::Request::post("/api/clients")
            .header("idempotency-key", secret)
            .body(Body::empty())
            .unwrap()
    };
    let calls = [svc.clone().oneshot(req()), svc.clone().oneshot(req())];
    let mut cancelled = Box::pin(svc.clone().oneshot(req()));
    let (mut first, mut second) = {
        let [a, b] = calls;
        (Box::pin(a), Box::pin(b))
    };
    // Start the flight and join it twice, cancel one caller, then let the work finish.
    assert!(futures::poll!(&mut first).is_pending());
    assert!(futures::poll!(&mut second).is_pending());
    assert!(futures::poll!(&mut cancelled).is_pending());
    drop(cancelled);
    gate.open();
    let (a, b) = tokio::join!(first, second);
    assert_eq!(a.unwrap().status(), 200);
    assert_eq!(b.unwrap().status(), 200);

    let logs = captured.text();
    for event in [
        "coalesce_flight",
        "flight started",
        "caller joined flight",
        "caller cancelled",
        "flight completed",
    ] {
        assert!(logs.contains(event), "no {event:?} in the logs:\n{logs}");
    }
    assert!(logs.contains("key="), "events name the key's hash:\n{logs}");
    assert!(!logs.contains(secret), "the key itself was logged:\n{logs}");
}

/// A keyed layer that sees requests without a key says so once at `WARN` (naming the usual
/// misconfigurations), then at `DEBUG` only, so that a route full of keyless requests does not
/// flood the logs.
#[tokio::test(flavor = "current_thread")]
async fn the_first_request_without_a_key_is_logged_at_warn_and_the_rest_at_debug() {
    use tower::ServiceExt;

    let (captured, _guard) = capture();
    let layer = HttpCoalesceLayer::new(key::header("x-client-id"));
    let metrics = layer.metrics();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(
            |_req: http::Request<tower_coalesce::http::RequestBody<Body>>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Body::from("ok")))
            },
        ));
    for _ in 0..3 {
        let req = http::Request::post("/api/clients")
            .body(Body::empty())
            .unwrap();
        assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 200);
    }
    assert_eq!(metrics.requests_without_key(), 3);
    let logs = captured.text();
    let warnings: Vec<&str> = logs.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{logs}");
    assert!(warnings[0].contains("without a key") && warnings[0].contains("Router::nest"));
    let quiet = logs.lines().filter(|l| {
        l.contains("DEBUG") && l.contains("without a key, through the coalescing layer")
    });
    assert_eq!(quiet.count(), 2, "{logs}");
}

/// Three requests with an `x-api-key` the default scope does not read: one `WARN` naming
/// the header and the fix, the rest at `DEBUG`; a scope closure that finds nothing: one
/// `WARN` naming the layer order.
#[tokio::test(flavor = "current_thread")]
async fn the_first_request_without_an_identity_is_logged_at_warn_with_its_cause() {
    use tower::ServiceExt;

    let ok = |_req: http::Request<tower_coalesce::http::RequestBody<Body>>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(Body::from("ok")))
    };
    let (captured, _guard) = capture();
    let layer = HttpCoalesceLayer::new(key::header("x-client-id"));
    let metrics = layer.metrics();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(ok));
    for _ in 0..3 {
        let req = http::Request::post("/api/clients")
            .header("x-client-id", "c-1")
            .header("x-api-key", "alice-key")
            .body(Body::empty())
            .unwrap();
        assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 200);
    }
    assert_eq!(metrics.requests_without_identity(), 3);
    assert_eq!(metrics.callers_joined(), 0);
    let warning = captured.the_warning();
    assert!(
        warning.contains("`x-api-key`") && warning.contains("scope::headers"),
        "{warning}"
    );

    let (captured, _guard) = capture();
    let layer = HttpCoalesceLayer::new(key::header("x-client-id"))
        .scope(|parts: &http::request::Parts| parts.extensions.get::<String>().cloned());
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(ok));
    let req = http::Request::post("/api/clients")
        .header("x-client-id", "c-1")
        .body(Body::empty())
        .unwrap();
    assert_eq!(svc.oneshot(req).await.unwrap().status(), 200);
    let warning = captured.the_warning();
    assert!(warning.contains("outside-in"), "{warning}");
}

/// Each preset speaks in its own terms: the idempotency layer's `WARN` for a `POST` to a
/// route that doesn't exist names the `Idempotency-Key` header the client must send (not
/// auth layers or nesting), and the cache's calls itself the cache.
#[cfg(all(feature = "idempotency", feature = "http-cache"))]
#[tokio::test(flavor = "current_thread")]
async fn each_preset_names_itself_and_what_its_user_must_fix() {
    use axum::Router;
    use axum::routing::{get, post};
    use tower::ServiceExt;
    use tower_coalesce::http_cache::HttpCacheLayer;
    use tower_coalesce::idempotency::IdempotencyLayer;

    let (captured, _guard) = capture();
    let app = Router::new()
        .route("/payments", post(|| async { "paid" }))
        .layer(IdempotencyLayer::new());
    let req = http::Request::post("/nope").body(Body::empty()).unwrap();
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 400);
    let warning = captured.the_warning();
    assert!(
        warning.contains("reached the idempotency layer")
            && warning.contains("`Idempotency-Key` header")
            && warning.contains(".route_layer"),
        "{warning}"
    );
    assert!(
        !warning.contains("auth") && !warning.contains("nest"),
        "{warning}"
    );
    drop(_guard);

    let (captured, _guard) = capture();
    let app = Router::new()
        .route("/report", get(|| async { "report" }))
        .layer(HttpCacheLayer::new());
    let req = http::Request::get("/report")
        .header("x-api-key", "alice-key")
        .body(Body::empty())
        .unwrap();
    assert_eq!(app.oneshot(req).await.unwrap().status(), 200);
    let warning = captured.the_warning();
    assert!(
        warning.contains("reached the cache layer") && !warning.contains("coalescing"),
        "{warning}"
    );
}

/// A response that varies on a header its followers sent otherwise (a compression layer
/// below): one `WARN` naming the header and where the layer belongs.
#[tokio::test(flavor = "current_thread")]
async fn a_varied_response_is_logged_at_warn_once_with_the_header() {
    use tower::ServiceExt;

    let (captured, _guard) = capture();
    let gate = support::Gate::closed();
    let layer = HttpCoalesceLayer::new(key::header("x-client-id"));
    let metrics = layer.metrics();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn({
            let gate = gate.clone();
            move |_req: http::Request<tower_coalesce::http::RequestBody<Body>>| {
                let gate = gate.clone();
                async move {
                    gate.pass().await;
                    let mut res = http::Response::new(Body::from("ok"));
                    res.headers_mut()
                        .insert("vary", http::HeaderValue::from_static("accept-encoding"));
                    Ok::<_, std::convert::Infallible>(res)
                }
            }
        }));
    let req = |encoding: &'static str| {
        http::Request::post("/api/clients")
            .header("x-client-id", "c-1")
            .header("accept-encoding", encoding)
            .body(Body::empty())
            .unwrap()
    };
    let calls: Vec<_> = ["gzip", "br", "br", "zstd"]
        .into_iter()
        .map(|encoding| tokio::spawn(svc.clone().oneshot(req(encoding))))
        .collect();
    support::eventually("three followers", || metrics.callers_joined() == 3).await;
    gate.open();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
    // gzip led; br and zstd had runs of their own (how many depends on whether the
    // second `br` rejoined before the instant first `br` run ended: tests/safe_defaults.rs
    // counts runs exactly).
    assert!(metrics.flights_started() >= 3);
    let warning = captured.the_warning();
    assert!(
        warning.contains("`accept-encoding`") && warning.contains("above"),
        "{warning}"
    );
}

/// Trap 1 of the README: a `path_param` pattern that misses the prefix of `Router::nest`
/// (the layer on the outer router sees the full path), or that has it while the layer sits
/// inside the nested router. The first keyless request's `WARN` names the pattern to write.
#[tokio::test(flavor = "current_thread")]
async fn a_path_pattern_that_misses_the_nest_prefix_is_logged_with_the_pattern_to_write() {
    use axum::{Router, routing::put};
    use tower::ServiceExt;

    async fn upsert() -> &'static str {
        "ok"
    }
    let put_client = |uri: &str| http::Request::put(uri).body(Body::from("{}")).unwrap();

    // The layer on the outer router, the pattern written as the nested router sees it.
    let (captured, guard) = capture();
    let layer = HttpCoalesceLayer::new(key::path_param("/clients/{id}", "id")).require_key(true);
    let app = Router::new()
        .nest("/api", Router::new().route("/clients/{id}", put(upsert)))
        .layer(layer);
    let response = app.oneshot(put_client("/api/clients/c-1")).await.unwrap();
    assert_eq!(response.status(), 400);
    let warning = captured.the_warning();
    assert!(
        warning.contains("`/api/clients/c-1`")
            && warning.contains("write the pattern as `/api/clients/{id}`"),
        "{warning}"
    );
    drop(guard);

    // The layer inside the nested router, the pattern written with the prefix.
    let (captured, _guard) = capture();
    let layer = HttpCoalesceLayer::new(key::path_param("/api/v1/clients/{id}", "id"));
    let nested = Router::new()
        .route("/clients/{id}", put(upsert))
        .layer(layer);
    let app = Router::new().nest("/api/v1", nested);
    let response = app
        .oneshot(put_client("/api/v1/clients/c-1"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let warning = captured.the_warning();
    assert!(
        warning.contains("`/clients/c-1`")
            && warning.contains("nest(\"/api/v1\", ..)")
            && warning.contains("write the pattern as `/clients/{id}`"),
        "{warning}"
    );
}

/// `migrate()` at every start of an instance whose table exists says nothing: PostgreSQL's
/// notices for each `IF NOT EXISTS` ("relation ... already exists, skipping"), which sqlx
/// logs at INFO, are not asked for.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn migrating_an_existing_table_logs_no_notices() {
    let Some(url) = support::postgres::database_url() else {
        return;
    };
    let table = support::postgres::table();
    let pool = support::postgres::pool(&url).await;
    let store = tower_coalesce::postgres::PostgresStore::builder()
        .table(&table)
        .build(pool)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let (logs, _guard) = capture();
    store.migrate().await.unwrap();
    let text = logs.text();
    assert!(!text.contains("already exists"), "{text}");
    assert!(!text.contains(" INFO "), "{text}");
}

/// The layer records what it did (`coalesce.role`, the status, the flight's id) on its own
/// request span only: when a filter leaves that span out, nothing lands on the span of the
/// app's layer around it, even one that declares fields of the same names (as OpenTelemetry
/// HTTP spans declare `http.response.status_code`).
#[tokio::test(flavor = "current_thread")]
async fn a_filtered_out_request_span_records_nothing_on_the_callers_span() {
    use tower::ServiceExt;
    use tracing::Instrument;

    let (captured, _guard) = capture_at(tracing::Level::INFO);

    let svc = tower::ServiceBuilder::new()
        .layer(HttpCoalesceLayer::new(key::idempotency_key()))
        .service(tower::service_fn(
            |_req: http::Request<tower_coalesce::http::RequestBody<Body>>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Body::from("ok")))
            },
        ));
    let outer = tracing::info_span!(
        "app_request",
        http.response.status_code = tracing::field::Empty,
        coalesce.role = tracing::field::Empty,
        coalesce.flight_id = tracing::field::Empty,
        coalesce.waited_on = tracing::field::Empty,
    );
    async {
        let req = http::Request::post("/api/clients")
            .header("idempotency-key", "k-1")
            .body(Body::empty())
            .unwrap();
        let response = svc.oneshot(req).await.unwrap();
        assert_eq!(response.status(), 200);
        tracing::info!("answered");
    }
    .instrument(outer)
    .await;

    let logs = captured.text();
    let line = logs
        .lines()
        .find(|l| l.contains("answered"))
        .unwrap_or_else(|| panic!("no event:\n{logs}"));
    assert!(line.contains("app_request"), "{line}");
    assert!(
        !line.contains("coalesce.") && !line.contains("status_code"),
        "the layer recorded on the app's span: {line}"
    );
}
