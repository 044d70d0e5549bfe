//! Prometheus metrics of the coalescing layer: an axum app whose `/orders` route is
//! coalesced by `Idempotency-Key`, and whose `/metrics` route serves what the layer counts,
//! through the `metrics` facade and `metrics-exporter-prometheus`.
//!
//! ```text
//! cargo run --example metrics --features metrics
//! curl -X POST -H 'idempotency-key: k1' localhost:3000/orders & \
//!   curl -X POST -H 'idempotency-key: k1' localhost:3000/orders
//! curl localhost:3000/metrics
//! ```
//!
//! With `--once` it sends 20 identical requests at itself, prints the scrape, and exits.

use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusBuilder;
use tower_coalesce::http::{HttpCoalesceLayer, key};

async fn create_order() -> (StatusCode, &'static str) {
    // INSERT INTO orders ... (the work that must run once per key)
    tokio::time::sleep(Duration::from_millis(200)).await;
    (StatusCode::CREATED, "order created\n")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Install the recorder first: the layer sends to whichever is installed when it counts.
    let prometheus = PrometheusBuilder::new().install_recorder()?;

    let coalesce = HttpCoalesceLayer::new(key::idempotency_key())
        // The route as the router names it: one series per route, never per raw path.
        .metrics_route("/orders");
    let app = Router::new()
        .route("/orders", post(create_order).layer(coalesce))
        .route("/metrics", get(move || async move { prometheus.render() }));

    let once = std::env::args().any(|arg| arg == "--once");
    let addr = if once {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:3000"
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    if !once {
        println!("listening on http://{addr}: POST /orders with an idempotency-key, GET /metrics");
        server.await??;
        return Ok(());
    }

    let client = reqwest::Client::new();
    let calls = (0..20).map(|_| {
        client
            .post(format!("http://{addr}/orders"))
            .header("idempotency-key", "order-1")
            .send()
    });
    for response in futures::future::join_all(calls).await {
        assert_eq!(response?.status(), StatusCode::CREATED);
    }
    let scrape = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    for line in scrape.lines().filter(|l| l.starts_with("coalesce_")) {
        println!("{line}");
    }
    Ok(())
}
