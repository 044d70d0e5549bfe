//! Atomic mode: the leader's handler writes in the flight's own transaction, and the kept
//! response is written into that transaction, fenced by the lease's token, before it
//! commits. So the handler's writes land if and only if its response is the key's kept
//! answer. See [`PostgresStore::atomic`].

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use sqlx::{PgConnection, Postgres, Row, Transaction};
use tokio::sync::{Mutex, MutexGuard};

use super::connections::on_connection;
use super::{PostgresStore, codec, described, hex, millis};
use crate::BoxError;
use crate::store::{Completion, LeaseGuard, StoreKey, StoredResponse};

/// The flight's transaction, for the leader's handler in
/// [atomic mode](PostgresStore::atomic): the layer hands it to the inner service as a
/// request extension, so an axum handler takes it as `Extension<Tx>`. What the handler
/// writes through it commits together with the response the layer keeps, and only if this
/// flight still holds the key's lease: else, and for a response that is not kept (a server
/// error), it rolls back.
///
/// ```no_run
/// use axum::Extension;
/// use axum::http::StatusCode;
/// use tower_coalesce::postgres::Tx;
///
/// async fn create_client(Extension(tx): Extension<Tx>) -> Result<StatusCode, StatusCode> {
///     let mut tx = tx.lock().await.map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
///     sqlx::query("INSERT INTO clients (id, name) VALUES ($1, $2)")
///         .bind("c-1")
///         .bind("Ada")
///         .execute(&mut *tx) // `&mut *tx` is a `&mut PgConnection`: any sqlx executor call
///         .await
///         .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
///     Ok(StatusCode::CREATED) // committed with this response, by the layer
/// }
/// ```
///
/// Don't commit or roll it back yourself, and don't keep it past the handler: the layer
/// ends it once the handler has answered.
#[derive(Clone)]
pub struct Tx(Arc<Mutex<Option<Transaction<'static, Postgres>>>>);

impl Tx {
    /// The transaction's connection, until the handler's lock ends. An error if the
    /// transaction has ended already (the handler's response is in, or the flight is gone).
    pub async fn lock(&self) -> Result<TxGuard<'_>, BoxError> {
        let guard = self.0.lock().await;
        if guard.is_none() {
            return Err(
                "the flight's transaction has ended (its response is being kept, or \
                        the flight is gone)"
                    .into(),
            );
        }
        Ok(TxGuard(guard))
    }

    /// The transaction, taken out to end it.
    async fn take(&self) -> Option<Transaction<'static, Postgres>> {
        self.0.lock().await.take()
    }
}

impl fmt::Debug for Tx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tx").finish_non_exhaustive()
    }
}

/// A locked [`Tx`]: derefs to the transaction's `PgConnection`.
pub struct TxGuard<'a>(MutexGuard<'a, Option<Transaction<'static, Postgres>>>);

impl Deref for TxGuard<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.0
            .as_ref()
            .expect("a TxGuard is made only over an open transaction")
    }
}

impl DerefMut for TxGuard<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.0
            .as_mut()
            .expect("a TxGuard is made only over an open transaction")
    }
}

impl fmt::Debug for TxGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TxGuard").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// The lease `token` took on `key` with the fencing token `fence`, in atomic mode: a
    /// transaction is begun for the flight, handed to the run as [`Tx`], and ended by the
    /// completion: with a response, the fenced keep statement runs in it and it commits if
    /// the lease still held; else it rolls back and the lease is released.
    pub(super) async fn held_atomic(
        &self,
        key: StoreKey,
        token: String,
        fence: i64,
    ) -> Result<LeaseGuard, BoxError> {
        let begun = self
            .shared
            .connections
            .run_on_pool(self.timeout, "begin", || self.shared.pool.begin())
            .await
            .map_err(|error| described(&self.shared.table, "begin", error));
        let tx = match begun {
            Ok(tx) => Tx(Arc::new(Mutex::new(Some(tx)))),
            Err(error) => {
                // The flight can't run without its transaction.
                self.release(&key, &token, fence).await;
                return Err(error);
            }
        };
        let renewer = tokio::spawn(self.clone().renew(key.clone(), token.clone()));
        let (store, run_tx) = (self.clone(), tx.clone());
        let complete = move |response: Option<(Arc<StoredResponse>, Duration)>| {
            let (store, key, token, tx) = (store.clone(), key.clone(), token.clone(), tx.clone());
            async move { Ok(store.end(tx, &key, &token, fence, response).await) }
        };
        Ok(LeaseGuard::new(complete, renewer)
            .with_extension(run_tx)
            .atomic())
    }

    /// Ends the flight's transaction: keeps `response` in it and commits, if the lease
    /// still holds; else rolls back. Never an error: whatever fails, nothing of the run is
    /// kept (or, a commit whose answer was lost, everything is, and a retry replays it).
    async fn end(
        &self,
        tx: Tx,
        key: &StoreKey,
        token: &str,
        fence: i64,
        response: Option<(Arc<StoredResponse>, Duration)>,
    ) -> Completion {
        // Taken once: a second call (the guard's drop after a completion) finds nothing.
        let Some(mut open) = tx.take().await else {
            return Completion::Discarded;
        };
        let Some((response, ttl)) = response else {
            let _ = self.timed_once("rollback", open.rollback()).await;
            self.release(key, token, fence).await;
            return Completion::Discarded;
        };
        let keep = sqlx::query(&self.shared.statements.complete)
            .bind(&key.as_bytes()[..])
            .bind(token)
            .bind(codec::encode(&response))
            .bind(millis(ttl))
            .bind(&self.shared.channel)
            .bind(hex(key))
            .bind(fence)
            .fetch_one(&mut *open);
        let kept = match self.timed_once("store and release", keep).await {
            Ok(row) => row,
            Err(error) => {
                tracing::warn!(%error, "keeping a response in its transaction failed; rolled back");
                drop(open);
                self.release(key, token, fence).await;
                return Completion::Discarded;
            }
        };
        if !kept.try_get::<bool, _>("kept").unwrap_or(false) {
            let _ = self.timed_once("rollback", open.rollback()).await;
            let found: Option<Vec<u8>> = kept.try_get("response").unwrap_or(None);
            let found = found.and_then(|bytes| codec::decode(&bytes).ok());
            return Completion::Superseded(found.map(Arc::new));
        }
        match self.timed_once("commit", open.commit()).await {
            Ok(()) => Completion::Kept,
            Err(error) => {
                tracing::warn!(%error, "committing a flight's transaction failed");
                self.release(key, token, fence).await;
                Completion::Discarded
            }
        }
    }

    /// Releases the lease without keeping anything, if no later lease was taken; a failure
    /// leaves it to expire.
    async fn release(&self, key: &StoreKey, token: &str, fence: i64) {
        let release = on_connection!(|connection| {
            sqlx::query(&self.shared.statements.complete)
                .bind(&key.as_bytes()[..])
                .bind(token)
                .bind(None::<Vec<u8>>)
                .bind(0i64)
                .bind(&self.shared.channel)
                .bind(hex(key))
                .bind(fence)
                .execute(connection)
        });
        if let Err(error) = self.timed("release", release).await {
            tracing::debug!(%error, "releasing a lease failed; it will expire");
        }
    }
}
