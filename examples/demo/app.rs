//! The app of the demonstration, shared with `tests/database.rs`: an axum service whose
//! `POST /api/clients` does what the apps in the write-ups do (look the client up by id, and
//! insert it if there is none), on PostgreSQL or SQLite through sqlx, and a client that
//! fires identical requests at it all at once.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Row};
use tower_coalesce::http::{HttpCoalesceLayer, Metrics, key};

/// Connects to `url` (`postgres://...` or `sqlite://...`) and creates an empty `clients`
/// table with the id as its primary key.
pub async fn connect(url: &str) -> Result<AnyPool, sqlx::Error> {
    let pool = pool(url).await?;
    sqlx::query("DROP TABLE IF EXISTS clients")
        .execute(&pool)
        .await?;
    sqlx::query("CREATE TABLE clients (id TEXT PRIMARY KEY, name TEXT NOT NULL)")
        .execute(&pool)
        .await?;
    Ok(pool)
}

/// A pool of 16 connections to `url`, SQLite in WAL mode with a busy timeout; shared with
/// `examples/stampede.rs`.
pub async fn pool(url: &str) -> Result<AnyPool, sqlx::Error> {
    sqlx::any::install_default_drivers();
    let sqlite = url.starts_with("sqlite:");
    AnyPoolOptions::new()
        .max_connections(16)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if sqlite {
                    // Readers don't block the writer, and a writer waits for the lock
                    // (instead of failing with SQLITE_BUSY), as a server database would.
                    sqlx::query("PRAGMA journal_mode = WAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA busy_timeout = 10000")
                        .execute(&mut *conn)
                        .await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await
}

/// The `p` quantile (0 to 1) of `latencies`, nearest rank; sorts them.
pub fn percentile(latencies: &mut [Duration], p: f64) -> Duration {
    latencies.sort_unstable();
    let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len());
    latencies[i - 1]
}

#[derive(Clone)]
pub struct AppState {
    pool: AnyPool,
    /// The pause between the lookup and the insert.
    gap: Duration,
    executions: Arc<AtomicUsize>,
    /// For tests: the layer's counters and the followers each flight has, so that each run
    /// waits until all of its followers joined, and the test does not rely on timing.
    hold_for_followers: Option<(Metrics, usize)>,
}

impl AppState {
    pub fn new(pool: AnyPool, gap: Duration) -> Self {
        AppState {
            pool,
            gap,
            executions: Arc::new(AtomicUsize::new(0)),
            hold_for_followers: None,
        }
    }

    /// Makes every run wait (up to 10 s) until `followers` callers have joined its flight
    /// before it inserts.
    pub fn hold_for_followers(mut self, metrics: Metrics, followers: usize) -> Self {
        self.hold_for_followers = Some((metrics, followers));
        self
    }

    /// How many times the handler ran.
    pub fn executions(&self) -> usize {
        self.executions.load(Ordering::SeqCst)
    }

    /// How many rows the table has for `id`.
    pub async fn rows(&self, id: &str) -> i64 {
        sqlx::query("SELECT COUNT(*) FROM clients WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .unwrap()
            .get(0)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Client {
    pub id: String,
    pub name: String,
}

/// The one-line fix: concurrent creates of one client id (by one user) share one run. The
/// id is where the front end sends it: in the JSON body, `{"id": ..., "name": ...}`.
pub fn coalesce_layer() -> HttpCoalesceLayer<key::JsonKey> {
    HttpCoalesceLayer::new(key::json("/id"))
}

/// The app's routes, without state or layers.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/clients", post(create_client))
        .route("/health", axum::routing::get(|| async { "ok" }))
}

/// The app: `POST /api/clients`, with or without the coalescing layer.
pub fn router(state: AppState, layer: Option<HttpCoalesceLayer<key::JsonKey>>) -> Router {
    let router = routes();
    let router = match layer {
        Some(layer) => router.layer(layer),
        None => router,
    };
    router.with_state(state)
}

/// Look the client up; if there is none, insert it. No upsert, no retry: the code the
/// write-ups started from.
async fn create_client(State(state): State<AppState>, Json(new): Json<Client>) -> Response {
    let run = state.executions.fetch_add(1, Ordering::SeqCst) + 1;
    let existing = sqlx::query("SELECT id, name FROM clients WHERE id = $1")
        .bind(&new.id)
        .fetch_optional(&state.pool)
        .await;
    match existing {
        Ok(Some(row)) => {
            let client = Client {
                id: row.get(0),
                name: row.get(1),
            };
            return (StatusCode::OK, Json(client)).into_response();
        }
        Ok(None) => {}
        Err(error) => return database_error(error),
    }
    tokio::time::sleep(state.gap).await;
    if let Some((metrics, followers)) = &state.hold_for_followers {
        let deadline = Instant::now() + Duration::from_secs(10);
        while (metrics.callers_joined() as usize) < run * followers && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let inserted = sqlx::query("INSERT INTO clients (id, name) VALUES ($1, $2)")
        .bind(&new.id)
        .bind(&new.name)
        .execute(&state.pool)
        .await;
    match inserted {
        Ok(_) => (StatusCode::CREATED, Json(new)).into_response(),
        Err(error) => database_error(error),
    }
}

/// A `500` naming the database error, as an unhandled exception in those apps would.
fn database_error(error: sqlx::Error) -> Response {
    let message = match &error {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("{code}: {}", db.message()),
            None => db.message().to_owned(),
        },
        other => other.to_string(),
    };
    (StatusCode::INTERNAL_SERVER_ERROR, message).into_response()
}

/// Serves `router` on a fresh loopback port.
pub async fn serve(router: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

/// What one request received, and how long it took.
#[derive(Debug)]
pub struct Received {
    pub status: StatusCode,
    pub body: bytes::Bytes,
    pub latency: Duration,
}

/// Fires `n` identical creates of client `id` at `base` (`http://addr`) at once, each on a
/// connection of its own, as separate tabs or retrying clients would. Each connection is
/// opened (with a `GET /health`) before the creates are released together, so that the
/// creates race each other rather than the TCP handshakes.
pub async fn fire(base: &str, id: &str, n: usize) -> Vec<Received> {
    fire_with(base, id, n, &[]).await
}

/// [`fire`], with more headers on every create.
pub async fn fire_with(
    base: &str,
    id: &str,
    n: usize,
    headers: &[(&'static str, String)],
) -> Vec<Received> {
    fire_across(&[base.to_owned()], id, n, headers).await
}

/// [`fire_with`] across several instances of the app: create `i` goes to `bases[i % len]`.
pub async fn fire_across(
    bases: &[String],
    id: &str,
    n: usize,
    headers: &[(&'static str, String)],
) -> Vec<Received> {
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let base = bases[i % bases.len()].clone();
            let (id, barrier) = (id.to_owned(), barrier.clone());
            let headers = headers.to_vec();
            tokio::spawn(async move {
                let client = reqwest::Client::builder().no_proxy().build().unwrap();
                let health = client.get(format!("{base}/health")).send().await;
                health.expect("the server is up").bytes().await.unwrap();
                let body = serde_json::to_vec(&Client {
                    id: id.clone(),
                    name: format!("Client {id}"),
                })
                .unwrap();
                let mut req = client
                    .post(format!("{base}/api/clients"))
                    .header("content-type", "application/json")
                    .body(body);
                for (name, value) in headers {
                    req = req.header(name, value);
                }
                barrier.wait().await;
                let start = Instant::now();
                let res = req.send().await.expect("request failed");
                let status = StatusCode::from_u16(res.status().as_u16()).unwrap();
                let body = res.bytes().await.expect("body failed");
                Received {
                    status,
                    body,
                    latency: start.elapsed(),
                }
            })
        })
        .collect();
    let mut received = Vec::with_capacity(n);
    for task in tasks {
        received.push(task.await.unwrap());
    }
    received
}
