//! The seed bug on real databases: a PostgreSQL server and a SQLite file, the demo's axum
//! app served on 127.0.0.1, and 50 identical creates at once from 50 connections.
//!
//! Without the layer the lookup-then-insert handler fails on the primary key; with it,
//! every round is one handler run, one row, and 50 identical responses.
//!
//! PostgreSQL comes from `DATABASE_URL`, or is a throwaway server the test starts from the
//! installed binaries (`tests/support/postgres.rs`).
#![cfg(feature = "http")]

#[path = "../examples/demo/app.rs"]
mod app;
mod support;

use std::time::Duration;

use axum::http::StatusCode;

const CALLERS: usize = 50;

/// Without the layer: over a few rounds, at least one create dies on the primary key,
/// and the table still has one row per id (the constraint is the last line of defence).
async fn the_bug_reproduces(url: &str, duplicate_key: &str) {
    let state = app::AppState::new(app::connect(url).await.unwrap(), Duration::from_millis(20));
    let base = format!(
        "http://{}",
        app::serve(app::router(state.clone(), None)).await
    );
    let mut duplicate_errors = 0;
    for round in 0..5 {
        let id = format!("client-{round}");
        for received in app::fire(&base, &id, CALLERS).await {
            if received.status == StatusCode::INTERNAL_SERVER_ERROR {
                let body = String::from_utf8_lossy(&received.body);
                assert!(body.contains(duplicate_key), "unexpected error: {body}");
                duplicate_errors += 1;
            }
        }
        assert_eq!(state.rows(&id).await, 1);
    }
    assert_eq!(state.executions(), 5 * CALLERS);
    assert!(
        duplicate_errors > 0,
        "the race did not reproduce in 5 rounds"
    );
}

/// With the layer: 100 rounds of 50 concurrent creates, each round one handler run, one
/// row, no error, and 50 byte-identical `201` responses.
async fn the_layer_fixes_it(url: &str) {
    let layer = app::coalesce_layer();
    let metrics = layer.metrics();
    let state = app::AppState::new(app::connect(url).await.unwrap(), Duration::ZERO)
        .hold_for_followers(metrics.clone(), CALLERS - 1);
    let base = format!(
        "http://{}",
        app::serve(app::router(state.clone(), Some(layer))).await
    );
    for round in 1..=100 {
        let id = format!("client-{round}");
        let received = app::fire(&base, &id, CALLERS).await;
        for r in &received {
            assert_eq!(r.status, StatusCode::CREATED, "round {round}: {:?}", r.body);
            assert_eq!(r.body, received[0].body, "round {round}");
        }
        assert_eq!(state.executions(), round, "one handler run per round");
        assert_eq!(state.rows(&id).await, 1);
    }
    assert_eq!(metrics.flights_started(), 100);
    assert_eq!(metrics.callers_joined(), 100 * (CALLERS as u64 - 1));
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_duplicate_creates_fail_without_the_layer_and_run_once_with_it() {
    let Some(url) = support::postgres::database_url() else {
        return;
    };
    the_bug_reproduces(&url, "23505").await;
    the_layer_fixes_it(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_duplicate_creates_fail_without_the_layer_and_run_once_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("clients.db").display()
    );
    the_bug_reproduces(&url, "UNIQUE constraint failed").await;
    the_layer_fixes_it(&url).await;
}
