//! A first app with the layer, as the README's "Your first app" shows it: state, an auth
//! middleware that puts the caller's id into the request's extensions, a nested router,
//! and the coalescing layer keyed by a path parameter and scoped by that id.
//!
//! ```text
//! cargo run --example first_app            # serves on 127.0.0.1:3000
//! curl -X PUT -H 'x-api-key: alice-key' localhost:3000/api/clients/c-1
//! cargo run --example first_app -- --once  # checks itself over HTTP and exits
//! ```
//!
//! The three traps it avoids are marked `TRAP` below.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use axum::{Extension, Router};
use tower_coalesce::http::{HttpCoalesceLayer, key};

/// Who the caller is, as the auth middleware found out.
#[derive(Clone)]
struct UserId(String);

#[derive(Clone, Default)]
struct AppState {
    /// (owner, client id) -> name: the table with its unique index.
    clients: Arc<Mutex<HashMap<(String, String), String>>>,
    /// Handler runs, to see the coalescing.
    runs: Arc<AtomicUsize>,
}

/// Looks the client up and creates it if missing: the check-then-insert that duplicates
/// race on.
async fn upsert_client(
    State(state): State<AppState>,
    Extension(UserId(user)): Extension<UserId>,
    Path(id): Path<String>,
) -> Response {
    state.runs.fetch_add(1, Ordering::SeqCst);
    let exists = state
        .clients
        .lock()
        .unwrap()
        .contains_key(&(user.clone(), id.clone()));
    if exists {
        return (StatusCode::OK, format!("{user}'s client {id}\n")).into_response();
    }
    tokio::time::sleep(Duration::from_millis(50)).await; // the database round trip
    let mut clients = state.clients.lock().unwrap();
    if clients.contains_key(&(user.clone(), id.clone())) {
        // The unique index: a duplicate that raced past the check dies here.
        return (StatusCode::CONFLICT, "23505 duplicate key\n").into_response();
    }
    clients.insert((user.clone(), id.clone()), format!("client {id}"));
    (StatusCode::CREATED, format!("{user}'s client {id}\n")).into_response()
}

/// Authenticates by a header of the app's own, and puts the caller's id into the
/// request's extensions.
async fn auth(mut request: Request, next: Next) -> Response {
    let user = match request.headers().get("x-api-key").map(|v| v.as_bytes()) {
        Some(b"alice-key") => "alice",
        Some(b"bob-key") => "bob",
        _ => return StatusCode::UNAUTHORIZED.into_response(),
    };
    request.extensions_mut().insert(UserId(user.to_owned()));
    next.run(request).await
}

fn app(state: AppState) -> Router {
    let coalesce =
        // TRAP 1: the layer sits on the outer router, so it sees the full path: the pattern
        // includes the prefix of `nest("/api", ..)`. Without it no request has a key, and
        // `require_key(true)` says so with a 400 instead of passing them through silently.
        HttpCoalesceLayer::new(key::path_param("/api/clients/{id}", "id"))
            // TRAP 2: this app authenticates with `x-api-key`, which the default scope
            // (`Authorization`, `Cookie`) does not read: without a scope, nothing would be
            // shared (the default scope refuses to guess who sends an `x-api-key`). The
            // closure needs its argument type spelled out.
            .scope(|parts: &Parts| parts.extensions.get::<UserId>().map(|u| u.0.clone()))
            .require_key(true);
    Router::new()
        .nest(
            "/api",
            Router::new().route("/clients/{id}", put(upsert_client)),
        )
        .with_state(state)
        .layer(coalesce)
        // TRAP 3: axum runs the last `.layer` first. The auth layer must run before the
        // coalescing layer reads the extension it inserts, so it comes after it here. In
        // the other order the scope finds no `UserId`: nothing is shared, and with
        // `require_key(true)` every request gets a 400 that says so.
        .layer(middleware::from_fn(auth))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let state = AppState::default();
    let once = std::env::args().any(|arg| arg == "--once");
    let addr = if once {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:3000"
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(axum::serve(listener, app(state.clone())).into_future());
    if !once {
        println!("listening on http://{addr}: PUT /api/clients/{{id}} with x-api-key: alice-key");
        server.await??;
        return Ok(());
    }

    let client = reqwest::Client::new();
    let put = |user: &str, id: &str| {
        client
            .put(format!("http://{addr}/api/clients/{id}"))
            .header("x-api-key", format!("{user}-key"))
            .send()
    };
    let answers = |responses: Vec<reqwest::Result<reqwest::Response>>| async move {
        let mut answers = Vec::new();
        for response in responses {
            let response = response.unwrap();
            answers.push((response.status().as_u16(), response.text().await.unwrap()));
        }
        answers
    };

    // A double click, times twenty: one run, everyone gets its 201.
    let clicks = futures::future::join_all((0..20).map(|_| put("alice", "c-1"))).await;
    let clicks = answers(clicks).await;
    assert!(
        clicks
            .iter()
            .all(|a| *a == (201, "alice's client c-1\n".into()))
    );
    println!(
        "20 identical PUTs from alice: {} run(s), 20 x 201",
        state.runs.load(Ordering::SeqCst)
    );
    assert_eq!(state.runs.load(Ordering::SeqCst), 1);

    // Two users, the same path at once: never each other's answer.
    let (alice, bob) = tokio::join!(put("alice", "c-2"), put("bob", "c-2"));
    let both = answers(vec![alice, bob]).await;
    assert_eq!(both[0], (201, "alice's client c-2\n".into()));
    assert_eq!(both[1], (201, "bob's client c-2\n".into()));
    println!("alice and bob at once on one path: each got their own answer");

    // No credentials: the auth layer answers, the coalescing layer never sees it.
    let anonymous = client
        .put(format!("http://{addr}/api/clients/c-3"))
        .send()
        .await?;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    println!("no x-api-key: 401 from the auth layer");
    Ok(())
}
