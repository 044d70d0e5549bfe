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
}

fn capture() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
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
    let quiet = logs
        .lines()
        .filter(|l| l.contains("DEBUG") && l.contains("without a coalescing key"));
    assert_eq!(quiet.count(), 2, "{logs}");
}
