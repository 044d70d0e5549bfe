//! PostgreSQL as the shared store: the database the app already has runs each key once
//! across all its instances, and keeps completed responses through restarts.
//!
//! [`PostgresStore`] implements [`Store`] on one table, through sqlx, for
//! [`IdempotencyLayer::store`], [`HttpCoalesceLayer::store`] and `HttpCacheLayer::store`.
//! It works as [`RedisStore`](crate::redis::RedisStore) does:
//!
//! 1. Within an instance, requests with the same key coalesce first: the database sees one
//!    flight per key per instance, not one per request.
//! 2. The flight takes the key's lease in one statement (it inserts the key's row, or takes
//!    a free lease on it), which also finds a kept response (the lookup), and takes the
//!    key's next [`FencingToken`], handed to the inner service as a request extension. The
//!    statement locks the row only to change it, so that the instances that lose the race
//!    for a key do not queue in front of the winner's release; flights that ask at once
//!    on one instance go in one statement for all their keys. The lease is committed
//!    without waiting for the disk: see [Durability](#durability).
//! 3. The instance that holds the lease runs the request, and renews the lease every third
//!    of its duration. One statement then keeps the response, releases the lease if its
//!    token still holds it, and, if another instance said it waits for the key, sends a
//!    release message (`pg_notify`, delivered when it commits, carrying the response if it
//!    is at most 3900 bytes); unless a later lease was taken on the key meanwhile (the
//!    row's fencing token is no longer this lease's): then it keeps nothing and answers the
//!    response kept under that lease, which the stalled leader's callers get. A keep that
//!    fails is retried for the lease's length, the lease renewed meanwhile.
//! 4. The other instances `LISTEN` on one connection each. A lease statement that finds
//!    the lease held marks the key's row as waited for (`wanted`, ordered against the
//!    release by the row's lock) unless it already is; the instance, which registered for
//!    the key's release before its statement (so it hears a release however soon after
//!    the statement it comes), then waits for the
//!    message (every instance waiting for the key hears it), or the poll
//!    interval if none comes (lost while the connection was down, or the leading instance
//!    died): it replays the response the message carries, or looks it up, or, once a dead
//!    instance's lease expired, one of them takes it over and runs the request, with a
//!    higher token.
//!
//! Every call has a timeout (1 s by default). A failed or timed-out call is an error to the
//! layer, which runs the request anyway or answers `503`, as
//! [`on_store_error`](crate::idempotency::IdempotencyLayer::on_store_error) says: PostgreSQL
//! down or slow never hangs a request. A kept response is a committed row: it survives a
//! PostgreSQL restart, so the retry after one is replayed.
//!
//! # Durability
//!
//! What is kept is committed as the server's `synchronous_commit` says (on by default: on
//! disk before the answer goes out). A lease is soft state, committed without waiting for
//! the disk (`synchronous_commit = off` for its own statement): a crash of the server can
//! lose the leases taken in the last few hundred milliseconds before it (up to three
//! `wal_writer_delay`s, 200 ms by default). That is a lease lost, as when one expires:
//! after the restart another instance may take the key over and run it again, and the
//! fencing token still leaves the key one answer, which the first leader's callers get too
//! (`tests/postgres.rs` kills the server right after a lease was taken). A handler that
//! writes to this same database after the lease was taken makes it durable with its own
//! commit (the log is flushed in order), and in [atomic mode](PostgresStore::atomic) the
//! handler's writes commit only with the kept answer, lease lost or not.
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_coalesce::idempotency::IdempotencyLayer;
//! use tower_coalesce::postgres::PostgresStore;
//!
//! # async fn build(pool: sqlx::PgPool) -> Result<(), tower_coalesce::BoxError> {
//! // The app's own pool; or `PostgresStore::connect("postgres://...")`.
//! let store = PostgresStore::new(pool).await?.with_lease(Duration::from_secs(5));
//! store.migrate().await?; // once, at startup; or run `store.schema()` with your migrations
//! let layer = IdempotencyLayer::new().store(store);
//! # Ok(())
//! # }
//! ```
//!
//! # The table
//!
//! [`migrate`](PostgresStore::migrate) creates it if it is missing (under an advisory lock,
//! so that instances starting together don't race on it); teams that run their own
//! migrations take [`schema`](PostgresStore::schema) instead, which for the default table is:
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS tower_coalesce_store (
//!     key         bytea       PRIMARY KEY,  -- the 32-byte store key
//!     response    bytea,                    -- the kept response (the crate's codec); NULL: none
//!     expires_at  timestamptz,              -- until when the response is kept
//!     lease_token text,                     -- the instance's token of the last lease
//!     lease_until timestamptz,              -- the lease is held until then
//!     fence       bigint      NOT NULL DEFAULT 0,  -- the fencing token of the last lease
//!     -- when the row may go: past both its response and its lease
//!     dead_after  timestamptz GENERATED ALWAYS AS (GREATEST(expires_at, lease_until)) STORED,
//!     wanted      boolean     NOT NULL DEFAULT false  -- another instance waits for the lease
//! );
//! ALTER TABLE tower_coalesce_store ADD COLUMN IF NOT EXISTS wanted boolean NOT NULL DEFAULT false;
//! CREATE INDEX IF NOT EXISTS tower_coalesce_store_dead_after
//!     ON tower_coalesce_store (dead_after);
//! -- The HTTP cache's groups (a URI's entries, a tag's), for its purges.
//! CREATE TABLE IF NOT EXISTS tower_coalesce_store_groups (
//!     grp         bytea       NOT NULL,  -- the 32-byte key of an HTTP cache group (a URI, a tag)
//!     key         bytea       NOT NULL,  -- the 32-byte store key of an entry in it
//!     expires_at  timestamptz NOT NULL,  -- kept until then
//!     PRIMARY KEY (grp, key)
//! );
//! CREATE INDEX IF NOT EXISTS tower_coalesce_store_groups_expires_at
//!     ON tower_coalesce_store_groups (expires_at);
//! ```
//!
//! (An installation made by an earlier version may have no groups table or no `wanted`
//! column: `migrate` adds them, or run their statements.)
//!
//! Keys are [`StoreKey`]s (a SHA-256 of scope and key: no credentials, no raw keys). Expiry
//! is checked on every read, and each store sweeps dead rows (past their response and
//! their lease) every [`sweep_interval`](PostgresStoreBuilder::sweep_interval), in batches
//! of 1,000 that skip locked rows: short transactions, no table lock, and a table bounded by
//! the keys of the last TTL, however many distinct keys arrive.
//!
//! # Connections
//!
//! One of the pool's connections is held for `LISTEN`, for as long as the store lives (it
//! reconnects after the connection drops, and wakes every waiting flight then, since
//! messages may have been lost). It also receives the changes that keep the HTTP cache's
//! near caches in sync (channel `<table>_changes`; see
//! [Near cache](crate::http_cache#near-cache)), and reports a reconnection to them as
//! changes lost. Every other call is one statement: a lease and a completion per flight
//! (per key and instance, not per request), a renewal every third of the lease while a
//! flight runs, a lookup per waiting flight after its poll interval, and the sweeps.
//!
//! [`connect`](PostgresStore::connect) makes a pool of 8 and keeps 4 of them between
//! statements: sqlx pings a connection each time it goes back to the pool (a second round
//! trip per statement, and the connection out of use meanwhile), so a statement that
//! completed leaves its connection to the next one as it is, and one that did not (an
//! error, a timeout, a dropped caller) gives it back to the pool to be checked. That pool
//! pings no connection before a statement either (sqlx's
//! [`test_before_acquire`](sqlx::pool::PoolOptions::test_before_acquire), on by default):
//! a statement that fails on a dead connection (an I/O error, or the server's word that it
//! ended the session: SQLSTATE `08...`, `57P..`) runs again on another, up to once per
//! connection the pool may hold and once more on a new one, within the statement's
//! timeout; the store's statements are written to be safe to repeat, but for the HTTP
//! cache's group take (it deletes what it answers), which runs once, on a connection that
//! answered a ping just before. So after a
//! PostgreSQL restart the dead connections, kept or idle, are found by the statements
//! themselves and replaced, rather than failing them. On an app's own pool given to
//! [`build`](PostgresStoreBuilder::build), the store keeps no connection (they are the
//! app's) and uses the pool as it is configured; turning its ping off saves a round trip
//! per statement.
//!
//! Leases and completions are batched: one goes out at once when none of its kind is out,
//! and those that arrive meanwhile go together in the next statement (up to 256 keys,
//! sorted, so that instances lock rows in one order). A statement's own cost in PostgreSQL
//! outweighs what a key adds to it many times over, so under load a store sends a few
//! statements for many flights, and a lone request waits for nobody.
//!
//! # Fencing tokens
//!
//! A key's tokens strictly increase: each is one more than the key's last (while its row is
//! kept), and at least the database clock in microseconds, so they go on increasing after
//! the row was swept, or the database restored from a backup, as long as its clock did not
//! go back by more than the time since.
//!
//! [`Store`]: crate::store::Store
//! [`StoreKey`]: crate::store::StoreKey
//! [`FencingToken`]: crate::store::FencingToken
//! [`IdempotencyLayer::store`]: crate::idempotency::IdempotencyLayer::store
//! [`HttpCoalesceLayer::store`]: crate::http::HttpCoalesceLayer::store

mod atomic;
mod batch;
mod connections;
mod sql;

pub use self::atomic::{Tx, TxGuard};

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt::{self, Write as _};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Executor, Row};
use tokio::task::JoinHandle;

use self::batch::Batcher;
use self::connections::{Connection, Connections, dead_connection, on_connection};
use self::sql::Statements;
use crate::BoxError;
use crate::shared_store::backplane::Backplane;
use crate::shared_store::codec;
use crate::shared_store::release::{Registration, Waiters, renew_every_third, token};
use crate::store::{Change, Completion, Lease, LeaseGuard};
use crate::store::{Store, StoreKey, StoredResponse};

/// The default timeout of every statement, and of connecting.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// The default lease: how long a key stays claimed by an instance that stopped renewing it
/// (it died, or lost the database), before another instance may run it.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(5);

/// The default poll interval: how long a waiting instance waits for a release message
/// before it looks again on its own.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The default interval between sweeps of dead rows.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// The default table.
pub const DEFAULT_TABLE: &str = "tower_coalesce_store";

/// Rows deleted per sweep statement.
const SWEEP_BATCH: i64 = 1000;

/// How many of the 8 connections of the pool `connect` makes the store keeps between
/// statements (one more listens).
const KEEP_CONNECTIONS: usize = 4;

/// An [`Store`] on PostgreSQL, with leases that run each key on one instance;
/// see the [module docs](self).
///
/// Clones share the pool, the `LISTEN` connection and the sweeper, which stop with the
/// last clone.
#[derive(Clone)]
pub struct PostgresStore {
    shared: Arc<Shared>,
    timeout: Duration,
    lease: Duration,
    poll_interval: Duration,
    atomic: bool,
}

/// What every clone shares.
struct Shared {
    pool: PgPool,
    /// The connections the statements run on, kept between them.
    connections: Arc<Connections>,
    table: String,
    statements: Statements,
    /// The release channel of this table.
    channel: String,
    waiters: Arc<Waiters>,
    /// Flights that a lease statement told to wait, with their registration for the key's
    /// release, made before the statement: see [`PostgresStore::released_response`].
    told_to_wait: Mutex<HashMap<StoreKey, (Instant, Registration)>>,
    /// The channel of the changes the instances announce (the HTTP cache's near caches).
    changes: String,
    backplane: Arc<Backplane>,
    /// The `LISTEN` task and the sweeper, stopped with the last clone.
    tasks: [JoinHandle<()>; 2],
    /// The lease statements of the flights, batched: with the lookup, and without it
    /// (the HTTP cache's refreshes).
    leases: [Batcher<LeaseAsk, LeaseAnswer>; 2],
    /// The completions of the flights (outside atomic mode), batched.
    completions: Batcher<CompleteAsk, CompleteAnswer>,
}

impl Shared {
    /// Keeps the registration of a flight told to wait for `key`, for its
    /// `released_response`. Two flights of the key told at once keep neither (each would
    /// need its own, made before its own statement: they register again, and look); what
    /// a flight that went away left is dropped when the key is told again, or after a while
    /// once many are kept.
    fn told_to_wait(&self, key: &StoreKey, registration: Registration) {
        let mut told = self.told_to_wait.lock().unwrap_or_else(|e| e.into_inner());
        if told.len() >= TOLD_TO_WAIT_SWEEP_AT {
            told.retain(|_, (since, _)| since.elapsed() < TOLD_TO_WAIT_FOR);
        }
        match told.entry(key.clone()) {
            Entry::Occupied(other) => drop(other.remove()),
            Entry::Vacant(entry) => drop(entry.insert((Instant::now(), registration))),
        }
    }

    /// The registration the flight told to wait for `key` made before its lease statement.
    fn registered_before_lease(&self, key: &StoreKey) -> Option<Registration> {
        let mut told = self.told_to_wait.lock().unwrap_or_else(|e| e.into_inner());
        told.remove(key).map(|(_, registration)| registration)
    }
}

/// How many registrations of flights told to wait are kept before those older than
/// [`TOLD_TO_WAIT_FOR`] (left by flights that went away) are dropped.
const TOLD_TO_WAIT_SWEEP_AT: usize = 1024;
const TOLD_TO_WAIT_FOR: Duration = Duration::from_secs(10);

/// A flight's ask for the lease of its key.
struct LeaseAsk {
    token: String,
    lease: i64,
}

/// How many times a lone lease is asked with the one-row statement before the batch form
/// settles it: each time another instance's insert or change of the row was under way.
const ONE_ROW_ATTEMPTS: usize = 4;

/// The answer to a [`LeaseAsk`]: the fencing token of the lease taken, or the response kept
/// under the key (with the lookup), or neither (held elsewhere).
struct LeaseAnswer {
    fence: Option<i64>,
    response: Option<Vec<u8>>,
}

/// A flight's completion: the response to keep (if any) for `ttl` ms, under the lease of
/// `token` with the fencing token `fence`.
struct CompleteAsk {
    token: String,
    response: Option<Vec<u8>>,
    ttl: i64,
    fence: i64,
}

/// The answer to a [`CompleteAsk`]: whether it kept, and else the response kept under the
/// key.
struct CompleteAnswer {
    kept: bool,
    response: Option<Vec<u8>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Makes a [`PostgresStore`] with other than the defaults: its table, timeout and sweep
/// interval.
///
/// ```no_run
/// use std::time::Duration;
/// use tower_coalesce::postgres::PostgresStore;
///
/// # async fn build(pool: sqlx::PgPool) -> Result<(), tower_coalesce::BoxError> {
/// let store = PostgresStore::builder()
///     .table("app.idempotency")
///     .timeout(Duration::from_millis(500))
///     .build(pool)
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct PostgresStoreBuilder {
    table: String,
    timeout: Duration,
    sweep_interval: Duration,
    /// How many connections the store keeps between statements: some of its own pool's
    /// (`connect`), none of an app's.
    keep_connections: usize,
}

impl PostgresStoreBuilder {
    /// The table, [`DEFAULT_TABLE`] unless set: a plain lowercase identifier
    /// (`[a-z_][a-z0-9_]*`, at most 40 bytes), optionally schema-qualified (`app.store`).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The timeout of connecting and of every statement, [`DEFAULT_TIMEOUT`] unless set.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How often dead rows are swept, [`DEFAULT_SWEEP_INTERVAL`] unless set.
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// Makes the store on the app's `pool`: starts listening for release messages (one of
    /// the pool's connections, held) and sweeping. Fails if the table name is not a plain
    /// identifier or PostgreSQL can't be reached within the timeout.
    pub async fn build(self, pool: PgPool) -> Result<PostgresStore, BoxError> {
        if !sql::valid_table(&self.table) {
            return Err(format!(
                "{:?} is not a plain lowercase table name ([a-z_][a-z0-9_]*, at most 40 bytes, \
                 optionally schema.table)",
                self.table
            )
            .into());
        }
        let channel = format!("{}_released", self.table.replace('.', "_"));
        let changes = format!("{}_changes", self.table.replace('.', "_"));
        let channels = [channel.clone(), changes.clone()];
        let (waiters, backplane) = (Arc::new(Waiters::default()), Arc::default());
        let listener = within(self.timeout, "connecting to listen", async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener
                .listen_all(channels.iter().map(String::as_str))
                .await?;
            Ok::<_, sqlx::Error>(listener)
        })
        .await?;
        let statements = Statements::new(&self.table);
        let connections = Arc::new(Connections::new(pool.clone(), self.keep_connections));
        let sweeper = sweep(
            pool.clone(),
            [statements.sweep.clone(), statements.sweep_groups.clone()],
            self.sweep_interval,
            self.timeout,
        );
        let listening = listen(
            listener,
            pool.clone(),
            channels,
            Arc::downgrade(&waiters),
            Arc::downgrade(&backplane),
        );
        let batchers = Batchers {
            table: Arc::from(self.table.as_str()),
            statements: &statements,
            channel: Arc::from(channel.as_str()),
            timeout: self.timeout,
            connections: connections.clone(),
        };
        Ok(PostgresStore {
            shared: Arc::new(Shared {
                leases: [batchers.leases(false), batchers.leases(true)],
                completions: batchers.completions(),
                pool,
                connections,
                table: self.table,
                statements,
                channel,
                waiters,
                told_to_wait: Mutex::default(),
                changes,
                backplane,
                tasks: [tokio::spawn(listening), tokio::spawn(sweeper)],
            }),
            timeout: self.timeout,
            lease: DEFAULT_LEASE,
            poll_interval: DEFAULT_POLL_INTERVAL,
            atomic: false,
        })
    }

    /// Connects a pool of 8 connections to `url` (`postgres://user@host:port/db`), which
    /// pings no connection before a statement (see [Connections](self#connections)), and
    /// makes the store on it.
    pub async fn connect(self, url: &str) -> Result<PostgresStore, BoxError> {
        let pool = within(
            self.timeout,
            "connecting",
            PgPoolOptions::new()
                .max_connections(8)
                // The store finds dead connections by their first statement and goes on to
                // another (see `Connections::run`): no ping before each statement.
                .test_before_acquire(false)
                .acquire_timeout(self.timeout)
                .connect(url),
        )
        .await?;
        PostgresStoreBuilder {
            keep_connections: KEEP_CONNECTIONS,
            ..self
        }
        .build(pool)
        .await
    }
}

impl PostgresStore {
    /// A builder, for another table, timeout or sweep interval.
    pub fn builder() -> PostgresStoreBuilder {
        PostgresStoreBuilder {
            table: DEFAULT_TABLE.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            keep_connections: 0,
        }
    }

    /// The store on the app's `pool`, with the defaults; see [`PostgresStoreBuilder::build`].
    pub async fn new(pool: PgPool) -> Result<Self, BoxError> {
        Self::builder().build(pool).await
    }

    /// The store on a pool of 8 connections to `url`, with the defaults.
    pub async fn connect(url: &str) -> Result<Self, BoxError> {
        Self::builder().connect(url).await
    }

    /// Creates the table and its index if they are missing: idempotent, and safe to run
    /// from every instance at once (under a transaction-scoped advisory lock).
    pub async fn migrate(&self) -> Result<(), BoxError> {
        let schema = self.schema();
        let mut tx = self.shared.pool.begin().await?;
        // Two `CREATE TABLE IF NOT EXISTS` at once can both find the table missing and one
        // die on a unique index of the catalog: the very race this crate is about.
        let lock = "SELECT pg_advisory_xact_lock(hashtext('tower-coalesce migrate'))";
        tx.execute(lock).await?;
        // `IF NOT EXISTS` answers a notice per thing that exists, which sqlx logs at INFO:
        // four lines at every start that say all is well.
        tx.execute("SET LOCAL client_min_messages = warning")
            .await?;
        tx.execute(schema.as_str()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The SQL that [`migrate`](Self::migrate) runs: the table and its index, for teams
    /// that run their own migrations.
    pub fn schema(&self) -> String {
        sql::schema(&self.shared.table)
    }

    define_lease_setters!();

    /// Atomic mode, for a handler whose writes go to this same database: exactly once for
    /// those writes, with no window left to a lease.
    ///
    /// The leader of each key gets the flight's own transaction, [`Tx`], as a request
    /// extension, and does its writes through it. Once it has answered, the layer writes
    /// the response to keep into that transaction, with the key's row locked and its
    /// fencing token checked, and commits. So the writes and the kept response land
    /// together, or neither does:
    ///
    /// | the run's answer | its writes | what the callers get |
    /// | --- | --- | --- |
    /// | `2xx`, `3xx`, `4xx` (kept) | committed with the response | the response; retries replay it |
    /// | `5xx`, or the handler failed (not kept) | rolled back | the response; a retry runs again |
    /// | a lease lost meanwhile (the instance stalled past it, another took the key over) | rolled back | the response the later run kept |
    /// | the commit failed (PostgreSQL down, connection lost) | rolled back | `503` with `Retry-After`; a retry runs cleanly |
    /// | a response the layer can't keep (body over the limit, not shared) | rolled back | `503` |
    ///
    /// A `4xx` commits what the handler wrote before it: a handler that refuses a request
    /// should refuse it before writing, as it would in any transaction.
    ///
    /// From its keep statement to its commit, a flight's transaction holds the lock of the
    /// key's row: microseconds, unless the instance stalls right then (a GC pause, a
    /// starved process). Other instances' lease statements for that key then wait on the
    /// lock, up to the store's timeout (a `503` under `FailClosed`, and a retry), and the
    /// stalled flight's own statement times out, so that its transaction rolls back: its
    /// caller gets a `503` too, and nothing of the run lands.
    ///
    /// Each running flight holds one of the pool's connections for its transaction (one per
    /// key and instance, not per request), while the lease is renewed on others: size the
    /// pool for the flights that run at once, plus the `LISTEN` connection and a few for
    /// the lease statements. Under [`OnStoreError::FailOpen`](crate::http::OnStoreError),
    /// a request the store failed runs without a transaction, so a handler that takes
    /// `Extension<Tx>` is refused by its extractor: use `FailClosed` with atomic mode.
    /// Side effects outside this database (a payment provider's API) are not in the
    /// transaction: they stay at-least-once, and need an idempotency key of their own (the
    /// [`FencingToken`](crate::store::FencingToken), with the key, makes one).
    ///
    /// ```no_run
    /// use axum::{Extension, Router, routing::post};
    /// use tower_coalesce::idempotency::{IdempotencyLayer, OnStoreError};
    /// use tower_coalesce::postgres::{PostgresStore, Tx};
    ///
    /// async fn create(Extension(tx): Extension<Tx>) -> &'static str {
    ///     let mut tx = tx.lock().await.expect("the leader's transaction");
    ///     sqlx::query("INSERT INTO orders (id) VALUES ('o-1')")
    ///         .execute(&mut *tx)
    ///         .await
    ///         .expect("insert");
    ///     "order o-1 created"
    /// }
    ///
    /// # async fn app(pool: sqlx::PgPool) -> Result<Router, tower_coalesce::BoxError> {
    /// let store = PostgresStore::new(pool).await?.atomic();
    /// store.migrate().await?;
    /// let layer = IdempotencyLayer::new()
    ///     .store(store)
    ///     .on_store_error(OnStoreError::FailClosed);
    /// Ok(Router::new().route("/orders", post(create)).layer(layer))
    /// # }
    /// ```
    pub fn atomic(mut self) -> Self {
        self.atomic = true;
        self
    }

    /// Runs one statement against the timeout, on a connection the store keeps (see
    /// [`Connections::run`]), again on another if it failed on a dead one. Only for
    /// statements that are safe to repeat.
    async fn timed<T, F>(
        &self,
        what: &'static str,
        call: impl FnMut(Connection) -> F,
    ) -> Result<T, BoxError>
    where
        F: Future<Output = (Connection, Result<T, sqlx::Error>)>,
    {
        let result = self.shared.connections.run(self.timeout, what, call).await;
        result.map_err(|error| described(&self.shared.table, what, error))
    }

    /// Runs one call against the timeout, once: for what is not safe to repeat, and for
    /// statements in a transaction (whose connection is not the pool's to swap).
    async fn timed_once<T>(
        &self,
        what: &'static str,
        call: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, BoxError> {
        let result = within(self.timeout, what, call).await;
        result.map_err(|error| described(&self.shared.table, what, error))
    }

    /// Asks a batcher, against the timeout.
    async fn batched<T>(
        &self,
        what: &'static str,
        ask: impl Future<Output = batch::Answered<T>>,
    ) -> Result<T, BoxError> {
        match tokio::time::timeout(self.timeout, ask).await {
            Ok(answered) => answered.map_err(|message| BoxError::from(message.to_string())),
            Err(_) => Err(StoreError::TimedOut(what, self.timeout).into()),
        }
    }

    /// Takes the lease of `key` with a new token and the key's next fencing token, after
    /// looking the response up first if `lookup` (one statement).
    async fn take(&self, key: &StoreKey, lookup: bool) -> Result<Lease, BoxError> {
        let token = token();
        let ask = LeaseAsk {
            token: token.clone(),
            lease: millis(self.lease),
        };
        let leases = &self.shared.leases[usize::from(lookup)];
        // Registered for the key's release before the statement, so that a release after
        // it is heard however soon it comes (see `released_response`).
        let registration = self.shared.waiters.register(&hex(key));
        let answer = self.batched("lease", leases.ask(key.clone(), ask)).await?;
        match (answer.fence, answer.response) {
            (Some(fence), _) => {
                // The HTTP cache's refreshes (no lookup) keep no handler's writes.
                let guard = match self.atomic && lookup {
                    true => self.held_atomic(key.clone(), token, fence).await?,
                    false => self.held(key.clone(), token, fence),
                };
                Ok(Lease::Held(guard.with_fence(fence.max(0) as u64)))
            }
            (None, Some(bytes)) => Ok(Lease::Stored(Arc::new(codec::decode(&bytes)?))),
            (None, None) => {
                self.shared.told_to_wait(key, registration);
                Ok(Lease::HeldElsewhere)
            }
        }
    }

    /// The lease `token` took on `key` with the fencing token `fence`: renewed until
    /// completed, which keeps the response unless a later lease was taken, releases the
    /// lease and tells the waiting instances.
    fn held(&self, key: StoreKey, token: String, fence: i64) -> LeaseGuard {
        let renewer = tokio::spawn(self.clone().renew(key.clone(), token.clone()));
        let store = self.clone();
        let complete = move |response: Option<(Arc<StoredResponse>, Duration)>| {
            let (store, key, token) = (store.clone(), key.clone(), token.clone());
            async move {
                let (bytes, ttl) = match response {
                    Some((response, ttl)) => (Some(codec::encode(&response)), millis(ttl)),
                    None => (None, 0),
                };
                let ask = CompleteAsk {
                    token,
                    response: bytes,
                    ttl,
                    fence,
                };
                let completing = store.shared.completions.ask(key, ask);
                let answer = store.batched("store and release", completing).await?;
                if answer.kept {
                    return Ok(Completion::Kept);
                }
                let kept = answer
                    .response
                    .map(|bytes| codec::decode(&bytes))
                    .transpose()?;
                Ok(Completion::Superseded(kept.map(Arc::new)))
            }
        };
        LeaseGuard::new(complete, renewer).keep_trying_for(self.lease)
    }

    /// Renews the lease every third of its duration until the guard aborts it, or the
    /// lease turns out to be lost.
    async fn renew(self, key: StoreKey, token: String) {
        let lease = self.lease;
        let (store, key, token) = (&self, &key, token.as_str());
        renew_every_third(lease, || async {
            let renewal = on_connection!(|connection| {
                sqlx::query(&store.shared.statements.renew)
                    .bind(&key.as_bytes()[..])
                    .bind(token)
                    .bind(millis(lease))
                    .execute(connection)
            });
            Ok(store.timed("lease renewal", renewal).await?.rows_affected() == 1)
        })
        .await
    }
}

impl Store for PostgresStore {
    async fn get(&self, key: &StoreKey) -> Result<Option<Arc<StoredResponse>>, BoxError> {
        let found: Option<Vec<u8>> = self
            .timed(
                "lookup",
                on_connection!(|connection| {
                    sqlx::query_scalar(&self.shared.statements.get)
                        .bind(&key.as_bytes()[..])
                        .fetch_optional(connection)
                }),
            )
            .await?;
        Ok(found
            .map(|bytes| codec::decode(&bytes))
            .transpose()?
            .map(Arc::new))
    }

    async fn put(
        &self,
        key: StoreKey,
        response: Arc<StoredResponse>,
        ttl: Duration,
    ) -> Result<(), BoxError> {
        let (key, encoded) = (&key, &codec::encode(&response)[..]);
        let statement = on_connection!(|connection| {
            sqlx::query(&self.shared.statements.put)
                .bind(&key.as_bytes()[..])
                .bind(encoded)
                .bind(millis(ttl))
                .execute(connection)
        });
        self.timed("store", statement).await.map(drop)
    }

    async fn lease(&self, key: &StoreKey) -> Result<Lease, BoxError> {
        self.take(key, true).await
    }

    async fn refresh_lease(&self, key: &StoreKey) -> Result<Lease, BoxError> {
        self.take(key, false).await
    }

    async fn remove(&self, key: &StoreKey) -> Result<bool, BoxError> {
        let statement = on_connection!(|connection| {
            sqlx::query(&self.shared.statements.remove)
                .bind(&key.as_bytes()[..])
                .execute(connection)
        });
        Ok(self.timed("remove", statement).await?.rows_affected() == 1)
    }

    async fn add_to_group(
        &self,
        group: &StoreKey,
        key: &StoreKey,
        ttl: Duration,
    ) -> Result<(), BoxError> {
        let statement = on_connection!(|connection| {
            sqlx::query(&self.shared.statements.add_to_group)
                .bind(&group.as_bytes()[..])
                .bind(&key.as_bytes()[..])
                .bind(millis(ttl))
                .execute(connection)
        });
        self.timed("group add", statement).await.map(drop)
    }

    async fn take_group(&self, group: &StoreKey) -> Result<Vec<StoreKey>, BoxError> {
        // Not repeated: the statement deletes what it answers, and a repeat after an answer
        // lost with the connection would answer nothing. So it goes on a connection that
        // answered a ping just before, not one that died while it waited.
        let connections = &self.shared.connections;
        let take = async {
            let mut connection = connections.checked().await?;
            let keys = sqlx::query_scalar::<_, Vec<u8>>(&self.shared.statements.take_group)
                .bind(&group.as_bytes()[..])
                .fetch_all(&mut *connection)
                .await?;
            connections.give_back(connection);
            Ok(keys)
        };
        Ok(StoreKey::all_from(
            self.timed_once("group take", take).await?,
        ))
    }

    async fn announce(&self, keys: &[StoreKey]) -> Result<(), BoxError> {
        // A notification's payload is text of under 8000 bytes: in hex, 120 keys at most.
        for keys in keys.chunks(120) {
            let payload = &hex_bytes(&self.shared.backplane.message(keys));
            let statement = on_connection!(|connection| {
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(&self.shared.changes)
                    .bind(payload)
                    .execute(connection)
            });
            self.timed("announce", statement).await?;
        }
        Ok(())
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Change>> {
        // Listened to since the store was made; lost messages come as `Change::Lost` when
        // the listening connection is made anew.
        Some(self.shared.backplane.listen(self.shared.changes.clone()).0)
    }

    async fn released(&self, key: &StoreKey) {
        let _ = self.released_response(key).await;
    }

    /// A release message carries the response the release kept, up to 3900 bytes: the
    /// woken instance answers with it without a statement of its own.
    ///
    /// The flight registered for the key's release before its lease statement: any release
    /// the statement did not see comes after it, and is heard (or was: the registration
    /// counts the releases since), with no statement of its own. A flight that finds no
    /// registration of its lease (another local flight of the key was told to wait at the
    /// same time) registers now, and looks once whether the lease is still held, since the
    /// release may have come before.
    async fn released_response(&self, key: &StoreKey) -> Option<Arc<StoredResponse>> {
        let early = self.shared.registered_before_lease(key);
        let heard_early = early.is_some();
        let registration = early.unwrap_or_else(|| self.shared.waiters.register(&hex(key)));
        let notified = registration.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let wait = async {
            if heard_early {
                // Enabled first, then the count: a release is seen by one or the other.
                if !registration.heard() {
                    notified.await;
                }
                return;
            }
            // The release may have come before this flight registered: look once.
            let held = on_connection!(|connection| {
                sqlx::query(&self.shared.statements.held)
                    .bind(&key.as_bytes()[..])
                    .fetch_optional(connection)
            });
            if let Ok(None) = self.timed("lease lookup", held).await {
                return;
            }
            notified.await;
        };
        let _ = tokio::time::timeout(self.poll_interval, wait).await;
        // An answer that does not decode is looked up instead.
        let answer = codec::decode(&registration.answer()?).ok()?;
        Some(Arc::new(answer))
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.shared.table)
            .field("timeout", &self.timeout)
            .field("lease", &self.lease)
            .field("poll_interval", &self.poll_interval)
            .field("atomic", &self.atomic)
            .finish_non_exhaustive()
    }
}

/// Receives the release messages (the first of `channels`) and wakes the flights waiting
/// on their key, and the changes (the second) for the backplane. After an error, or a
/// connection lost (messages may have been lost with it), it listens again on a new
/// connection, wakes every waiting flight, so that each looks on its own, and tells the
/// backplane that changes were lost.
async fn listen(
    mut listener: PgListener,
    pool: PgPool,
    channels: [String; 2],
    waiters: std::sync::Weak<Waiters>,
    backplane: std::sync::Weak<Backplane>,
) {
    let [released, _changes] = &channels;
    loop {
        match listener.try_recv().await {
            Ok(Some(message)) if message.channel() == released => match waiters.upgrade() {
                Some(waiters) => {
                    // The key, and the response the release kept if the message carries it.
                    let (key, answer) = match message.payload().split_once(':') {
                        Some((key, answer)) => (key, unhex(answer).map(bytes::Bytes::from)),
                        None => (message.payload(), None),
                    };
                    waiters.wake(key, answer)
                }
                None => return,
            },
            Ok(Some(message)) => {
                let Some(backplane) = backplane.upgrade() else {
                    return;
                };
                match unhex(message.payload()) {
                    Some(bytes) => backplane.received(message.channel().as_bytes(), &bytes),
                    None => backplane.lost(),
                }
            }
            result => {
                match result {
                    Err(error) => {
                        tracing::warn!(%error, "listening for releases failed; reconnecting")
                    }
                    _ => tracing::debug!("the listening connection dropped; reconnecting"),
                }
                listener = relisten(&pool, &channels).await;
                let (Some(waiters), Some(backplane)) = (waiters.upgrade(), backplane.upgrade())
                else {
                    return;
                };
                waiters.wake_all();
                backplane.lost();
            }
        }
    }
}

/// A new listener on `channels`, retrying (every 100 ms, up to every 2 s) until PostgreSQL
/// answers.
async fn relisten(pool: &PgPool, channels: &[String]) -> PgListener {
    let mut backoff = Duration::from_millis(100);
    // A dead idle connection of the pool (the server restarted) is passed over at once.
    let mut dead_ones = pool.options().get_max_connections();
    loop {
        let attempt = async {
            let mut listener = PgListener::connect_with(pool).await?;
            listener
                .listen_all(channels.iter().map(String::as_str))
                .await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(listener)) => return listener,
            Ok(Err(error)) if dead_connection(&error) && dead_ones > 0 => {
                dead_ones -= 1;
                continue;
            }
            Ok(Err(error)) => tracing::debug!(%error, "listening again failed; retrying"),
            Err(_) => tracing::debug!("listening again timed out; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Deletes dead rows (of the store, of the groups) every `interval`, a batch at a time,
/// until a batch finds fewer than a full one.
async fn sweep(pool: PgPool, statements: [String; 2], interval: Duration, timeout: Duration) {
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        for statement in &statements {
            sweep_one(&pool, statement, timeout).await;
        }
    }
}

async fn sweep_one(pool: &PgPool, statement: &str, timeout: Duration) {
    loop {
        let batch = sqlx::query(statement).bind(SWEEP_BATCH).execute(pool);
        match within(timeout, "sweep", batch).await {
            Ok(done) if done.rows_affected() < SWEEP_BATCH as u64 => break,
            Ok(_) => tokio::task::yield_now().await,
            Err(error) => {
                tracing::debug!(%error, "sweeping dead rows failed; next time");
                break;
            }
        }
    }
}

/// An error of one call: of PostgreSQL, or its timeout.
#[derive(Debug)]
enum StoreError {
    Sql(sqlx::Error),
    TimedOut(&'static str, Duration),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Sql(error) => error.fmt(f),
            StoreError::TimedOut(what, after) => {
                write!(f, "postgres {what} timed out after {after:?}")
            }
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Sql(error) => Some(error),
            StoreError::TimedOut(..) => None,
        }
    }
}

/// The error of a call, as the layer reports it: a missing table says how to make it.
fn described(table: &str, what: &str, error: StoreError) -> BoxError {
    match &error {
        StoreError::Sql(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P01") => {
            format!(
                "postgres {what}: the table {table} does not exist; run \
                 PostgresStore::migrate() or its schema() ({db})"
            )
            .into()
        }
        _ => error.into(),
    }
}

/// What the batched statements need, to start their queues.
struct Batchers<'a> {
    table: Arc<str>,
    statements: &'a Statements,
    channel: Arc<str>,
    timeout: Duration,
    connections: Arc<Connections>,
}

impl Batchers<'_> {
    /// The queue of the lease statements, with the lookup or without. A lease taken for a
    /// caller that has gone (its timeout) is released at once.
    fn leases(&self, lookup: bool) -> Batcher<LeaseAsk, LeaseAnswer> {
        let (batch, one, table, timeout) = (
            Arc::<str>::from(self.statements.lease.as_str()),
            Arc::<str>::from(self.statements.lease_one.as_str()),
            self.table.clone(),
            self.timeout,
        );
        let connections = self.connections.clone();
        let run = move |asks: Arc<Vec<(StoreKey, LeaseAsk)>>| {
            let (batch, one, table) = (batch.clone(), one.clone(), table.clone());
            let connections = connections.clone();
            async move {
                let (batch, one, asks): (&str, &str, &[_]) = (&batch, &one, &asks);
                if let [(key, ask)] = asks {
                    // Asked again while another instance's insert or change of the row was
                    // under way (see `lease_one`); after a few, the batch form, which waits
                    // for the row's lock, settles it.
                    for _ in 0..ONE_ROW_ATTEMPTS {
                        let query = on_connection!(|connection| {
                            sqlx::query(one)
                                .bind(&key.as_bytes()[..])
                                .bind(ask.token.as_str())
                                .bind(ask.lease)
                                .bind(lookup)
                                .fetch_all(connection)
                        });
                        let rows = connections.run(timeout, "lease", query).await;
                        let answered = answers(rows, &table, "lease", |row| {
                            let answer = LeaseAnswer {
                                fence: row.try_get("fence")?,
                                response: row.try_get("response")?,
                            };
                            let waiting: bool = row.try_get("waiting")?;
                            Ok((answer, waiting))
                        })?;
                        let unsettled = matches!(&answered[..], [(answer, false)]
                            if answer.fence.is_none() && answer.response.is_none());
                        if !unsettled {
                            // (A wrong count of rows is the queue's to report.)
                            return Ok(answered.into_iter().map(|(answer, _)| answer).collect());
                        }
                    }
                }
                let query = on_connection!(|connection| {
                    sqlx::query(batch)
                        .bind(keys(asks))
                        .bind(column(asks, |ask| ask.token.as_str()))
                        .bind(column(asks, |ask| ask.lease))
                        .bind(lookup)
                        .fetch_all(connection)
                });
                answers(
                    connections.run(timeout, "lease", query).await,
                    &table,
                    "lease",
                    |row| {
                        Ok(LeaseAnswer {
                            fence: row.try_get("fence")?,
                            response: row.try_get("response")?,
                        })
                    },
                )
            }
        };
        let (release, channel) = (
            Arc::<str>::from(self.statements.complete.as_str()),
            self.channel.clone(),
        );
        let connections = self.connections.clone();
        let unclaimed = move |key: StoreKey, ask: &LeaseAsk, answer: LeaseAnswer| {
            let (release, channel, token) = (release.clone(), channel.clone(), ask.token.clone());
            let connections = connections.clone();
            async move {
                let Some(fence) = answer.fence else {
                    return;
                };
                let (release, channel, token, key): (&str, &str, &str, _) =
                    (&release, &channel, &token, &key);
                // The statement ends the lease only for the token that took it.
                let released = on_connection!(|connection| {
                    sqlx::query(release)
                        .bind(&key.as_bytes()[..])
                        .bind(token)
                        .bind(None::<Vec<u8>>)
                        .bind(0i64)
                        .bind(channel)
                        .bind(hex(key))
                        .bind(fence)
                        .execute(connection)
                });
                if let Err(error) = connections.run(timeout, "release", released).await {
                    tracing::debug!(%error, "releasing an unclaimed lease failed; it will expire");
                }
            }
        };
        Batcher::start(run, unclaimed, |ask| ask.token.len())
    }

    /// The queue of the completions.
    fn completions(&self) -> Batcher<CompleteAsk, CompleteAnswer> {
        let (batch, one, table, channel, timeout) = (
            Arc::<str>::from(self.statements.complete_batch.as_str()),
            Arc::<str>::from(self.statements.complete.as_str()),
            self.table.clone(),
            self.channel.clone(),
            self.timeout,
        );
        let connections = self.connections.clone();
        let run = move |asks: Arc<Vec<(StoreKey, CompleteAsk)>>| {
            let (batch, one) = (batch.clone(), one.clone());
            let (table, channel) = (table.clone(), channel.clone());
            let connections = connections.clone();
            async move {
                let (batch, one, channel, asks): (&str, &str, &str, &[_]) =
                    (&batch, &one, &channel, &asks);
                let query = on_connection!(|connection| match asks {
                    [(key, ask)] => sqlx::query(one)
                        .bind(&key.as_bytes()[..])
                        .bind(ask.token.as_str())
                        .bind(ask.response.as_deref())
                        .bind(ask.ttl)
                        .bind(channel)
                        .bind(hex(key))
                        .bind(ask.fence)
                        .fetch_all(connection)
                        .boxed(),
                    _ => sqlx::query(batch)
                        .bind(keys(asks))
                        .bind(column(asks, |ask| ask.token.as_str()))
                        .bind(column(asks, |ask| ask.response.as_deref()))
                        .bind(column(asks, |ask| ask.ttl))
                        .bind(column(asks, |ask| ask.fence))
                        .bind(channel)
                        .fetch_all(connection)
                        .boxed(),
                });
                let rows = connections.run(timeout, "store and release", query).await;
                answers(rows, &table, "store and release", |row| {
                    Ok(CompleteAnswer {
                        kept: row.try_get("kept")?,
                        response: row.try_get("response")?,
                    })
                })
            }
        };
        // A completion whose caller has gone is written all the same: nothing to undo.
        let weigh = |ask: &CompleteAsk| ask.response.as_ref().map_or(0, Vec::len);
        Batcher::start(run, |_, _, _| async {}, weigh)
    }
}

/// The keys of a batch, as the statements bind them (`bytea[]`).
fn keys<Q>(asks: &[(StoreKey, Q)]) -> Vec<Vec<u8>> {
    asks.iter()
        .map(|(key, _)| key.as_bytes().to_vec())
        .collect()
}

/// One field of each ask of a batch, as an array to bind.
fn column<'a, Q, T>(asks: &'a [(StoreKey, Q)], field: impl Fn(&'a Q) -> T) -> Vec<T> {
    asks.iter().map(|(_, ask)| field(ask)).collect()
}

/// A batch statement's rows, a row per ask in their order, each read by `read`.
fn answers<A>(
    rows: Result<Vec<PgRow>, StoreError>,
    table: &str,
    what: &'static str,
    read: impl Fn(&PgRow) -> Result<A, sqlx::Error>,
) -> Result<Vec<A>, BoxError> {
    let rows = rows.map_err(|error| described(table, what, error))?;
    rows.iter()
        .map(read)
        .collect::<Result<_, _>>()
        .map_err(BoxError::from)
}

/// Runs `call` against `timeout`.
async fn within<T>(
    timeout: Duration,
    what: &'static str,
    call: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map_err(StoreError::Sql),
        Err(_) => Err(StoreError::TimedOut(what, timeout)),
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis())
        .unwrap_or(i64::MAX)
        .max(1)
}

/// The store key in hex: the payload of its release message.
fn hex(key: &StoreKey) -> String {
    hex_bytes(key.as_bytes())
}

fn hex_bytes(bytes: &[u8]) -> String {
    let mut hex = String::with_capacity(2 * bytes.len());
    for b in bytes {
        let _ = write!(hex, "{b:02x}"); // Writing to a String can't fail.
    }
    hex
}

/// The bytes of lowercase hex, or `None` if it is not.
fn unhex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}
