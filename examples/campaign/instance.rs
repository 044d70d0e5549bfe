//! One instance of the system under test, as a process of its own, with two creates on
//! the shared store:
//!
//! - `POST /payments` with an `Idempotency-Key` and a JSON body, under `IdempotencyLayer`;
//! - `POST /clients` keyed by the body's `id`, under a plain `HttpCoalesceLayer` with
//!   `replay` and `OnMismatch::Reject`.
//!
//! Each handler writes its effect to PostgreSQL fenced by the `FencingToken` and prints
//! every run on stdout, where the campaign reads it.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Extension, Router};
use sqlx::PgPool;
use tower_coalesce::http::{HttpCoalesceLayer, OnMismatch, key};
use tower_coalesce::idempotency::{IdempotencyLayer, OnStoreError};
use tower_coalesce::postgres::{PostgresStore, Tx};
use tower_coalesce::redis::RedisStore;
use tower_coalesce::store::{FencingToken, Store};

/// An instance's settings, from the campaign.
#[derive(clap::Args, Debug, Clone)]
pub struct InstanceArgs {
    /// The instance's name (`i0`, `i1`, ...), in its runs and answers.
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub port: u16,
    /// `postgres`, `redis` or `cluster`.
    #[arg(long)]
    pub store: String,
    /// The store's URL (through the campaign's proxy); comma-separated nodes for a cluster.
    #[arg(long)]
    pub store_url: String,
    /// The PostgreSQL of the effects table (direct).
    #[arg(long)]
    pub effects_url: String,
    #[arg(long)]
    pub effects_table: String,
    #[arg(long)]
    pub store_table: String,
    #[arg(long)]
    pub redis_prefix: String,
    #[arg(long)]
    pub lease_ms: u64,
    #[arg(long)]
    pub timeout_ms: u64,
    /// How long a run works before it writes its effect.
    #[arg(long)]
    pub work_ms: u64,
}

/// How a run writes its effect.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Effects {
    /// On a connection of its own, fenced by the lease's token.
    Fenced,
    /// In the flight's transaction (atomic mode), unconditionally: a second effect of a key
    /// would show as a second write.
    InFlight,
}

#[derive(Clone)]
struct App {
    name: Arc<str>,
    work: Duration,
    effects: PgPool,
    upsert: Arc<str>,
    mode: Effects,
}

pub async fn run(args: InstanceArgs) -> Result<(), tower_coalesce::BoxError> {
    // `CAMPAIGN_LOG=redis=debug,tower_coalesce=debug` (targets and levels): the instance's
    // log, and its store client's, on its stderr, which the campaign keeps for an
    // instance that did not recover.
    if let Ok(spec) = std::env::var("CAMPAIGN_LOG") {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        let targets: tracing_subscriber::filter::Targets = spec.parse()?;
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(std::io::stderr),
            )
            .with(targets)
            .try_init()?;
    }
    let timeout = Duration::from_millis(args.timeout_ms);
    let lease = Duration::from_millis(args.lease_ms);
    let poll = Duration::from_millis(100);
    let effects = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy(&args.effects_url)?;
    // Fenced: a write with a lower token than the key's last changes nothing. `writes`
    // counts the writes that took effect.
    let upsert = format!(
        "INSERT INTO {t} AS e (key, body, fence, run, writes) VALUES ($1, $2, $3, $4, 1)
         ON CONFLICT (key) DO UPDATE SET body = EXCLUDED.body, fence = EXCLUDED.fence,
             run = EXCLUDED.run, writes = e.writes + 1
         WHERE e.fence < EXCLUDED.fence
         RETURNING writes",
        t = args.effects_table
    );
    let atomic = args.store == "postgres-atomic";
    let upsert = match atomic {
        false => upsert,
        true => format!(
            "INSERT INTO {t} AS e (key, body, fence, run, writes) VALUES ($1, $2, $3, $4, 1)
             ON CONFLICT (key) DO UPDATE SET body = EXCLUDED.body, fence = EXCLUDED.fence,
                 run = EXCLUDED.run, writes = e.writes + 1
             RETURNING writes",
            t = args.effects_table
        ),
    };
    let app = App {
        mode: if atomic {
            Effects::InFlight
        } else {
            Effects::Fenced
        },
        name: args.name.clone().into(),
        work: Duration::from_millis(args.work_ms),
        effects,
        upsert: upsert.into(),
    };
    let router = match args.store.as_str() {
        "postgres" | "postgres-atomic" => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(timeout)
                .connect_lazy(&args.store_url)?;
            let store = PostgresStore::builder()
                .table(&args.store_table)
                .timeout(timeout)
                .build(pool)
                .await?;
            let store = store.with_lease(lease).with_poll_interval(poll);
            match atomic {
                true => routes(app, store.atomic()),
                false => routes(app, store),
            }
        }
        "redis" => {
            let store = RedisStore::connect_with_timeout(&args.store_url, timeout).await?;
            let store = store.with_prefix(args.redis_prefix.clone());
            routes(app, store.with_lease(lease).with_poll_interval(poll))
        }
        "cluster" => {
            let nodes: Vec<&str> = args.store_url.split(',').collect();
            let store = RedisStore::connect_cluster(&nodes).await?;
            let store = store.with_prefix(args.redis_prefix.clone());
            routes(app, store.with_lease(lease).with_poll_interval(poll))
        }
        other => return Err(format!("unknown store {other}").into()),
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    say(&format!("listening {}", listener.local_addr()?));
    axum::serve(listener, router).await?;
    Ok(())
}

/// The two creates, each under its layer, on one store. Both fail closed: a store error
/// is a `503`, never a run without the store.
fn routes<St: Store>(app: App, store: St) -> Router {
    let payments = IdempotencyLayer::new()
        .store(store.clone())
        .on_store_error(OnStoreError::FailClosed);
    let clients = HttpCoalesceLayer::new(key::json("/id"))
        .store(store)
        .replay(Duration::from_secs(3600))
        .on_mismatch(OnMismatch::Reject)
        .on_store_error(OnStoreError::FailClosed);
    Router::new()
        .route("/payments", post(create).layer(payments))
        .route("/clients", post(create).layer(clients))
        .with_state(app)
}

/// A line on stdout, flushed at once: a `SIGKILL` must not lose what was said before it.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The create: writes the effect fenced by the lease's token, and answers with the run that
/// made it (instance and token), so that two runs of a key give two different answers.
async fn create(
    State(app): State<App>,
    fence: Option<Extension<FencingToken>>,
    tx: Option<Extension<Tx>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let body = String::from_utf8_lossy(&body).into_owned();
    // The payment's key is its header; the client's, its body's `id`.
    let key = match headers.get("idempotency-key") {
        Some(key) => key.to_str().unwrap_or("").to_owned(),
        None => serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|body| body["id"].as_str().map(str::to_owned))
            .unwrap_or_default(),
    };
    // Without a lease there is no token (the layer runs without the store only under
    // FailOpen, which the campaign does not use): 0 writes only where nothing was written.
    let fence = fence.map_or(0, |Extension(token)| token.get()) as i64;
    let run = format!("{}-{fence}", app.name);
    say(&format!("run {key} {run} start"));
    tokio::time::sleep(app.work).await;
    let upsert = sqlx::query_scalar(&app.upsert)
        .bind(&key)
        .bind(&body)
        .bind(fence)
        .bind(&run);
    let written: Result<Option<i32>, sqlx::Error> = match (app.mode, tx) {
        (Effects::Fenced, _) => upsert.fetch_optional(&app.effects).await,
        (Effects::InFlight, Some(Extension(tx))) => match tx.lock().await {
            Ok(mut tx) => upsert.fetch_optional(&mut *tx).await,
            Err(error) => Err(sqlx::Error::Protocol(error.to_string())),
        },
        (Effects::InFlight, None) => Err(sqlx::Error::Protocol("no transaction".into())),
    };
    match written {
        Ok(Some(_)) => {
            say(&format!("run {key} {run} wrote"));
            let answer = serde_json::json!({ "key": key, "body": body, "run": run });
            (StatusCode::CREATED, answer.to_string())
        }
        Ok(None) => {
            say(&format!("run {key} {run} stale"));
            (StatusCode::CONFLICT, "a newer run of this key wrote".into())
        }
        Err(error) => {
            say(&format!("run {key} {run} failed"));
            (StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
        }
    }
}
