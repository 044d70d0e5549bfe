//! The `metrics` feature, scraped as Prometheus scrapes it: an app with a real
//! `metrics-exporter-prometheus` recorder serves `/metrics` over HTTP beside two layered
//! routes; the test drives real requests at them and reads the numbers back from the
//! scrape. One recorder per process: this file is its own test binary, with one test.
#![cfg(all(feature = "metrics", feature = "idempotency"))]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use futures::future::join_all;
use metrics_exporter_prometheus::PrometheusBuilder;
use support::{Counter, Gate, eventually, serve};
use tower_coalesce::http::{HttpCoalesceLayer, key};
use tower_coalesce::idempotency::IdempotencyLayer;

/// One scrape: every sample by name and sorted labels (`name{a="1",b="2"}`).
async fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a sample line");
            let series = match series.split_once('{') {
                None => series.to_owned(),
                Some((name, labels)) => {
                    let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                    labels.sort_unstable();
                    format!("{name}{{{}}}", labels.join(","))
                }
            };
            (series, value.parse().expect("a number"))
        })
        .collect()
}

fn sample(scraped: &BTreeMap<String, f64>, series: &str) -> f64 {
    *scraped
        .get(series)
        .unwrap_or_else(|| panic!("{series} not in the scrape: {scraped:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prometheus_scrape_counts_leaders_followers_waits_flights_and_conflicts() {
    let recorder = PrometheusBuilder::new().install_recorder().unwrap();
    let (runs, gate) = (Counter::default(), Gate::closed());
    let (r, g) = (runs.clone(), gate.clone());
    let orders = post(move || {
        let (runs, gate) = (r.clone(), g.clone());
        async move {
            runs.incr();
            gate.pass().await;
            (StatusCode::CREATED, "order created")
        }
    })
    .layer(HttpCoalesceLayer::new(key::idempotency_key()).metrics_route("/orders"));
    let payments = post(|| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        (StatusCode::CREATED, "paid")
    })
    .layer(IdempotencyLayer::new().metrics_route("/payments"));
    let app = Router::new()
        .route("/orders", orders)
        .route("/payments", payments)
        .route("/metrics", get(move || async move { recorder.render() }));
    let addr = serve(app).await;
    let client = reqwest::Client::new();

    // 50 identical requests: one leader, 49 followers, held until all have joined.
    let calls = (0..50).map(|_| {
        client
            .post(format!("http://{addr}/orders"))
            .header("idempotency-key", "order-1")
            .body("2 apples")
            .send()
    });
    let calls = tokio::spawn(join_all(calls));
    eventually("the first request runs", || runs.get() == 1).await;
    let mut mid_flight = scrape(addr).await;
    for _ in 0..100 {
        if mid_flight.get(r#"coalesce_requests_total{role="follower",route="/orders"}"#)
            == Some(&49.0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        mid_flight = scrape(addr).await;
    }
    assert_eq!(
        sample(&mid_flight, r#"coalesce_inflight_flights{route="/orders"}"#),
        1.0,
        "one flight running while the handler waits"
    );
    gate.open();
    for response in calls.await.unwrap() {
        assert_eq!(response.unwrap().status(), StatusCode::CREATED);
    }
    assert_eq!(runs.get(), 1);

    // A key reused with another body while its request runs: a 422, a fingerprint conflict.
    let pay = |body: &'static str| {
        client
            .post(format!("http://{addr}/payments"))
            .header("idempotency-key", "pay-1")
            .body(body)
            .send()
    };
    let (first, reused) = tokio::join!(pay("100 EUR"), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        pay("200 EUR").await
    });
    assert_eq!(first.unwrap().status(), StatusCode::CREATED);
    assert_eq!(reused.unwrap().status(), StatusCode::UNPROCESSABLE_ENTITY);

    let scraped = scrape(addr).await;
    let orders = |series: &str| sample(&scraped, series);
    assert_eq!(
        orders(r#"coalesce_requests_total{role="leader",route="/orders"}"#),
        1.0
    );
    assert_eq!(
        orders(r#"coalesce_requests_total{role="follower",route="/orders"}"#),
        49.0
    );
    assert_eq!(
        orders(r#"coalesce_wait_duration_seconds_count{route="/orders"}"#),
        49.0,
        "followers only"
    );
    assert!(orders(r#"coalesce_wait_duration_seconds_sum{route="/orders"}"#) > 0.0);
    assert_eq!(orders(r#"coalesce_inflight_flights{route="/orders"}"#), 0.0);
    assert_eq!(
        orders(r#"coalesce_idempotency_conflicts_total{reason="fingerprint",route="/payments"}"#),
        1.0
    );
    assert_eq!(
        orders(r#"coalesce_requests_total{role="rejected",route="/payments"}"#),
        1.0
    );
    assert_eq!(
        orders(r#"coalesce_requests_total{role="leader",route="/payments"}"#),
        1.0
    );
    // The raw path never becomes a label: only the two routes named.
    for series in scraped.keys().filter(|s| s.contains("route=")) {
        assert!(
            series.contains(r#"route="/orders""#) || series.contains(r#"route="/payments""#),
            "{series}"
        );
    }
}
