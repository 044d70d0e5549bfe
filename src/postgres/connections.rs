//! The store's statements run on connections it keeps between them.
//!
//! A connection borrowed from a sqlx pool goes back with a round trip of its own: when a
//! `PoolConnection` drops, sqlx pings it in a spawned task before it is idle again (to
//! catch a connection left mid-statement). For a store that sends one short statement per
//! borrow, that is a second round trip per statement, paid by both PostgreSQL and the app,
//! and the connection is out of use until it returns. A store on a pool of its own
//! (`PostgresStore::connect`) keeps a few connections instead, borrowed from the pool
//! once: a statement that completed leaves its connection ready for the next, as it is;
//! one that did not (an error, a timeout, a dropped caller) hands it back to the pool,
//! whose ping then checks it. On an app's pool, the store keeps none: its connections are
//! the app's to use.
//!
//! A kept connection may die while it waits (PostgreSQL restarted); the statement that
//! finds it dead runs again on another (see [`Connections::run`]).

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{Connection as _, PgPool, Postgres};

use super::{StoreError, within};

/// A connection borrowed for one statement.
pub(super) type Connection = PoolConnection<Postgres>;

/// A statement for [`Connections::run`]: `on_connection!(|connection| statement)`, where
/// the statement is a sqlx query executed on `connection` (a `&mut PgConnection`), makes
/// the call that takes the connection and hands it back with the statement's answer.
/// What the statement borrows must be references or `Copy` (the call is made again for a
/// repeat).
macro_rules! on_connection {
    (|$connection:ident| $statement:expr) => {
        |mut borrowed: $crate::postgres::connections::Connection| async move {
            let answer = {
                let $connection: &mut sqlx::PgConnection = &mut borrowed;
                $statement.await
            };
            (borrowed, answer)
        }
    };
}
pub(super) use on_connection;

/// The connections the store keeps, and the pool it borrows them from.
pub(super) struct Connections {
    pool: PgPool,
    idle: Mutex<Vec<PoolConnection<Postgres>>>,
    /// How many it keeps at most; more are borrowed while busy, and go back to the pool.
    keep: usize,
}

impl Connections {
    /// Keeps up to `keep` connections between statements.
    pub(super) fn new(pool: PgPool, keep: usize) -> Self {
        Connections {
            pool,
            idle: Mutex::default(),
            keep,
        }
    }

    /// Runs a statement, `call` on a connection (which it hands back with its answer; see
    /// [`on_connection!`]), against `timeout`; again on another connection while it fails
    /// on a dead one (see [`dead_connection`]), at most once per connection the pool may
    /// hold and once more for a new one.
    ///
    /// After PostgreSQL restarted, every connection kept or idle in the pool is dead, and
    /// the statement that finds one goes on to the next rather than failing (a failed lease
    /// under `OnStoreError::FailOpen` would run the request without one); the pool's own
    /// ping before each borrow (`test_before_acquire`) is not needed for that. Only for
    /// statements that are safe to repeat: a statement whose connection died after it
    /// committed may run twice, and each of the store's is written so that the second
    /// answers as if the first had been seen (the lease asked again waits on the first's
    /// lease; a completion repeated finds the response kept and answers it).
    pub(super) async fn run<T, F>(
        &self,
        timeout: Duration,
        what: &'static str,
        mut call: impl FnMut(Connection) -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = (Connection, Result<T, sqlx::Error>)>,
    {
        let attempts = self.pool.options().get_max_connections().saturating_add(1);
        let calls = async {
            let mut attempt = 1;
            loop {
                let (connection, answer) = call(self.borrow().await?).await;
                match answer {
                    Err(error) if attempt < attempts && dead_connection(&error) => {
                        tracing::debug!(%error, what, attempt, "a dead connection; again on another");
                        attempt += 1;
                    }
                    Err(error) => return Err(error),
                    Ok(answer) => {
                        self.give_back(connection);
                        return Ok(answer);
                    }
                }
            }
        };
        within(timeout, what, calls).await
    }

    /// Runs `call`, which borrows from the pool itself (to begin a transaction), again
    /// while it fails on a dead connection, as [`run`] does.
    ///
    /// [`run`]: Self::run
    pub(super) async fn run_on_pool<T, F>(
        &self,
        timeout: Duration,
        what: &'static str,
        mut call: impl FnMut() -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, sqlx::Error>>,
    {
        let attempts = self.pool.options().get_max_connections().saturating_add(1);
        let calls = async {
            let mut attempt = 1;
            loop {
                match call().await {
                    Err(error) if attempt < attempts && dead_connection(&error) => {
                        attempt += 1;
                    }
                    result => return result,
                }
            }
        };
        within(timeout, what, calls).await
    }

    /// Borrows a connection that answered a ping, passing dead ones over as [`run`] does:
    /// for a statement that is not safe to repeat, so that it does not fail on a connection
    /// that died while it waited.
    ///
    /// [`run`]: Self::run
    pub(super) async fn checked(&self) -> Result<Connection, sqlx::Error> {
        let attempts = self.pool.options().get_max_connections().saturating_add(1);
        let mut attempt = 1;
        loop {
            let mut connection = self.borrow().await?;
            match connection.ping().await {
                Err(error) if attempt < attempts && dead_connection(&error) => attempt += 1,
                Err(error) => return Err(error),
                Ok(()) => return Ok(connection),
            }
        }
    }

    async fn borrow(&self) -> Result<Connection, sqlx::Error> {
        let kept = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match kept {
            Some(connection) => Ok(connection),
            None => self.pool.acquire().await,
        }
    }

    /// Keeps a connection whose statement completed, or gives it back to the pool.
    pub(super) fn give_back(&self, connection: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.keep {
            idle.push(connection);
        }
    }
}

/// Whether a statement failed because its connection is gone (closed by the server that
/// restarted, or broken), rather than because of the statement: an I/O error, or the
/// server's word that it ended the session (SQLSTATE classes 08, connection exception, and
/// 57P, operator intervention: shutdown, crash, starting up).
pub(super) fn dead_connection(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        _ => false,
    }
}
