//! What the HTTP layer logs. A binary of its own: tracing caches each call site's interest
//! process-wide, and a test that installs a thread-local subscriber while other tests'
//! threads register the same call sites without one can miss events.
#![cfg(feature = "http")]

mod support;

use std::sync::Arc;

use axum::body::Body;
use tower_coalesce::http::{HttpCoalesceLayer, key};

/// Logs name flights by a hash of the key: keys carry user ids and must not reach logs.
#[tokio::test(flavor = "current_thread")]
async fn logs_name_a_flight_by_a_hash_never_by_its_key() {
    use std::io::Write;
    use std::sync::Mutex;
    use tower::ServiceExt;

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
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer({
            let captured = captured.clone();
            move || captured.clone()
        })
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

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

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
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
