//! Traces that show who served whom: each keyed request's `coalesce` span says its role,
//! the flight it led or the one it waited on, its status, and the cache's verdict, read
//! back here by a subscriber layer as an OpenTelemetry exporter would see them. A binary of
//! its own: the subscriber is global (spans are made on the runtime's worker threads).
#![cfg(all(feature = "http-cache", feature = "idempotency"))]

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use axum::Router;
use axum::body::Body;
use axum::http::StatusCode;
use axum::routing::{get, post};
use futures::future::join_all;
use tower::ServiceExt;
use tower_coalesce::http::{HttpCoalesceLayer, key};
use tower_coalesce::http_cache::HttpCacheLayer;
use tower_coalesce::idempotency::IdempotencyLayer;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};

use support::{Gate, eventually};

/// The fields of every `coalesce` span, by span, as recorded so far.
type Spans = Arc<Mutex<BTreeMap<u64, BTreeMap<String, String>>>>;

struct Recorder(Spans);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        if attrs.metadata().name() != "coalesce" {
            return;
        }
        let mut spans = self.0.lock().unwrap();
        let fields = spans.entry(id.into_u64()).or_default();
        attrs.record(&mut Fields(fields));
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some(fields) = self.0.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Fields(fields));
        }
    }
}

fn spans() -> &'static Spans {
    static SPANS: OnceLock<Spans> = OnceLock::new();
    SPANS.get_or_init(|| {
        let spans = Spans::default();
        let subscriber = tracing_subscriber::registry()
            .with(Recorder(spans.clone()))
            .with(tracing_subscriber::filter::LevelFilter::DEBUG);
        tracing::subscriber::set_global_default(subscriber).unwrap();
        spans
    })
}

/// The spans whose `url.path` is `path`, once each has its role.
async fn spans_of(path: &str, n: usize) -> Vec<BTreeMap<String, String>> {
    let of = || -> Vec<_> {
        spans()
            .lock()
            .unwrap()
            .values()
            .filter(|f| f.get("url.path").map(String::as_str) == Some(path))
            .filter(|f| f.contains_key("coalesce.role"))
            .cloned()
            .collect()
    };
    eventually("every request's span to have its role", || of().len() >= n).await;
    of()
}

fn field<'a>(span: &'a BTreeMap<String, String>, name: &str) -> &'a str {
    span.get(name).map_or("", String::as_str)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_request_span_says_who_served_it_and_which_flight_it_waited_on() {
    spans();
    // Five identical requests: the leader's handler waits until the other four joined.
    let gate = Gate::closed();
    let layer = HttpCoalesceLayer::new(key::idempotency_key());
    let metrics = layer.metrics();
    let handler = {
        let gate = gate.clone();
        move || {
            let gate = gate.clone();
            async move {
                gate.pass().await;
                (StatusCode::CREATED, "created")
            }
        }
    };
    let app = Router::new().route("/orders", post(handler)).layer(layer);
    let calls = (0..5).map(|_| {
        let req = http::Request::post("/orders")
            .header("idempotency-key", "k-1")
            .body(Body::empty())
            .unwrap();
        tokio::spawn(app.clone().oneshot(req))
    });
    let calls: Vec<_> = calls.collect();
    eventually("four followers", || metrics.callers_joined() >= 4).await;
    gate.open();
    for call in join_all(calls).await {
        assert_eq!(call.unwrap().unwrap().status(), StatusCode::CREATED);
    }
    let spans = spans_of("/orders", 5).await;
    assert_eq!(spans.len(), 5);
    let leaders: Vec<_> = spans
        .iter()
        .filter(|s| field(s, "coalesce.role") == "leader")
        .collect();
    assert_eq!(leaders.len(), 1, "{spans:#?}");
    let flight = field(leaders[0], "coalesce.flight_id");
    assert!(flight.parse::<u64>().is_ok_and(|id| id > 0), "{spans:#?}");
    for span in &spans {
        assert_eq!(field(span, "http.request.method"), "POST");
        assert_eq!(field(span, "http.response.status_code"), "201");
        assert_eq!(field(span, "coalesce.layer"), "the coalescing layer");
        if field(span, "coalesce.role") != "leader" {
            assert_eq!(field(span, "coalesce.role"), "follower", "{span:?}");
            assert_eq!(field(span, "coalesce.waited_on"), flight, "{span:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_hit_a_miss_and_a_replay_are_named() {
    spans();
    let app = Router::new()
        .route(
            "/report",
            get(|| async { ([("cache-control", "max-age=60")], "report") }),
        )
        .layer(HttpCacheLayer::new().unscoped());
    for _ in 0..2 {
        let req = http::Request::get("/report").body(Body::empty()).unwrap();
        assert_eq!(app.clone().oneshot(req).await.unwrap().status(), 200);
    }
    let spans = spans_of("/report", 2).await;
    let mut seen: Vec<_> = spans
        .iter()
        .map(|s| (field(s, "coalesce.role"), field(s, "coalesce.cache")))
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, [("hit", "hit"), ("leader", "miss")]);

    let app = Router::new()
        .route(
            "/payments",
            post(|| async { (StatusCode::CREATED, "paid") }),
        )
        .layer(IdempotencyLayer::new());
    for _ in 0..2 {
        let req = http::Request::post("/payments")
            .header("idempotency-key", "p-1")
            .body(Body::empty())
            .unwrap();
        assert_eq!(app.clone().oneshot(req).await.unwrap().status(), 201);
    }
    let spans = spans_of("/payments", 2).await;
    let mut roles: Vec<_> = spans.iter().map(|s| field(s, "coalesce.role")).collect();
    roles.sort_unstable();
    assert_eq!(roles, ["leader", "replay"]);
    assert!(
        spans
            .iter()
            .all(|s| field(s, "coalesce.layer") == "the idempotency layer")
    );
}
