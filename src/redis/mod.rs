//! Redis as the idempotency store: a response completed on one instance is replayed by
//! every instance, and a request running on one instance is not run again by another.
//!
//! [`RedisStore`] implements [`Store`] on a single Redis
//! ([`connect`](RedisStore::connect)) or on a Redis Cluster
//! ([`connect_cluster`](RedisStore::connect_cluster)); both connections reconnect on their
//! own after Redis restarts. A cluster connection that stops answering altogether (no
//! command answered for three timeouts, while commands were sent) is replaced by a new
//! one: the fault campaign wedged redis-rs's cluster connection for good, after a node
//! restart while every connection was killed, in the versions up to the current one
//! (1.8.2). With it, an [`IdempotencyLayer`] runs each key once across all
//! the instances that share the Redis:
//!
//! 1. Within an instance, requests with the same key coalesce first, so Redis sees one
//!    flight per key per instance, not one per request.
//! 2. The flight runs a script that returns the key's stored response if there is one, and
//!    else takes the key's lease (`SET lease-key token NX PX lease`, with a token of its
//!    own): one round trip.
//!    Taking the lease also takes the key's next fencing token, and the request reaches the
//!    inner service with that [`FencingToken`] in its extensions.
//! 3. The instance that took the lease runs the request, and renews the lease every third
//!    of its duration while it runs. A second script then stores the response
//!    (`SET .. PX ttl`), deletes the lease only if the token is still its own, and
//!    publishes on the key's channel (`SPUBLISH` on a cluster): a second round trip. The
//!    script keeps nothing if a later lease was taken on the key (the key's fencing token
//!    is no longer this lease's), and answers what that lease kept instead, which the
//!    stalled leader's callers get. A keep that fails is retried for the lease's length,
//!    the lease renewed meanwhile.
//! 4. The other instances subscribe to that channel and wait for the message, or for the
//!    poll interval if no message comes (one was lost, or the leading instance died), and
//!    then go back to 2: they find the response and replay it, or, once a dead instance's
//!    lease expired, one of them takes it and runs the request.
//!
//! Every command has a timeout (1 s by default). A failed or timed-out command is an error
//! to the layer, which runs the request anyway or answers `503`, as
//! [`on_store_error`](crate::idempotency::IdempotencyLayer::on_store_error) says: Redis being down or slow never
//! hangs a request.
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_coalesce::idempotency::IdempotencyLayer;
//! use tower_coalesce::redis::RedisStore;
//!
//! # async fn build() -> Result<(), tower_coalesce::BoxError> {
//! let store = RedisStore::connect("redis://127.0.0.1:6379")
//!     .await?
//!     .with_lease(Duration::from_secs(5));
//! let layer = IdempotencyLayer::new().store(store);
//! # Ok(())
//! # }
//! ```
//!
//! # What a lease can't do
//!
//! A lease is a promise with a deadline. If the leading instance stalls (or loses Redis)
//! for longer than the lease while its request still runs, the lease expires and another
//! instance runs the request too. Renewal every third of the lease makes that need two
//! missed renewals in a row; choose a lease well above your longest pauses. A database
//! constraint remains the last line of defence, and the [`FencingToken`] lets a handler
//! refuse the stale writer itself (`UPDATE .. WHERE fence < $token`).
//!
//! What such a second run can't do is give the key a second answer: the stalled leader's
//! response is not kept over the later one (its keep is fenced), and its callers get the
//! later run's response. So every caller and retry of a key gets one answer; what the two
//! runs did besides answering is for the fencing token and the constraint to settle.
//! [`Metrics::keeps_superseded`](crate::http::Metrics::keeps_superseded) counts these
//! cases. The same holds for [`PostgresStore`](crate::postgres::PostgresStore).
//!
//! Responses that are not stored (server errors, bodies over the limit) are not shared
//! across instances either: an instance that waited for one runs the request itself, as a
//! retry would.
//!
//! Redis 6 or newer is needed: the connection speaks RESP3, to receive the release messages
//! on the connection that sends the commands; Redis 7 or newer for a cluster (sharded
//! pub/sub).
//!
//! # Fencing tokens
//!
//! A key's fencing tokens strictly increase: each is one more than the key's last, and at
//! least the Redis server's clock in microseconds. The second part keeps them increasing
//! when Redis lost the last one (a restart without persistence, or a failover to a replica
//! that had not received it yet), provided the clock of the Redis that answers did not go
//! back by more than the time since. Without it, a handler that refuses tokens at or
//! under the highest it has seen would refuse every writer of that key after such a loss.
//!
//! [`Store`]: crate::store::Store
//! [`FencingToken`]: crate::store::FencingToken
//! [`IdempotencyLayer`]: crate::idempotency::IdempotencyLayer

mod cluster;
mod connection;
mod lease;

use std::fmt::{self, Write as _};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::{ConnectionInfo, IntoConnectionInfo, ProtocolVersion, RedisError, Value};

use self::connection::Connection;
use self::lease::{GROUP_ADD, GROUP_TAKE, LEASE, RENEW, STORE_AND_RELEASE, Waiters, push_sender};
use crate::BoxError;
use crate::shared_store::backplane::Backplane;
use crate::shared_store::codec;
use crate::shared_store::release::renew_every_third;
use crate::store::{Change, Store, StoreKey, StoredResponse};
use crate::store::{Completion, Lease, LeaseGuard};

/// The default timeout of every Redis command, and of connecting.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// The default lease: how long a key stays claimed by an instance that stopped renewing it
/// (it died, or lost Redis), before another instance may run it.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(5);

/// How long a key's fencing-token counter is kept after its last lease: tokens of a key
/// strictly increase within this (a stale writer would have to outlive it).
const FENCE_KEPT: Duration = Duration::from_secs(24 * 60 * 60);

/// The default poll interval: how long a waiting instance waits for a release message
/// before it looks again on its own.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// An [`Store`] on Redis, with leases that run each key on one instance; see the
/// [module docs](self).
///
/// Keys, under a prefix (`tower-coalesce:idempotency:` by default) and the hex store key
/// `k` in braces (a cluster's hash tag): the response at `prefix + "{k}"`, the lease at
/// `prefix + "lease:{k}"`, the fencing-token counter at `prefix + "fence:{k}"`, and the
/// release channel `prefix + "released:{k}"`. For the HTTP cache's purges, the keys of a
/// URI's or a tag's entries are a set at `prefix + "group:{g}"`, and the changes that keep
/// the instances' near caches in sync go on the channel `prefix + "changes"`.
///
/// Clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: Connection,
    waiters: Arc<Waiters>,
    backplane: Arc<Backplane>,
    prefix: Arc<str>,
    timeout: Duration,
    lease: Duration,
    poll_interval: Duration,
}

impl RedisStore {
    /// Connects to the Redis at `url` (`redis://host:port/db`), with the default timeout,
    /// lease and poll interval.
    pub async fn connect(url: &str) -> Result<Self, BoxError> {
        Self::connect_with_timeout(url, DEFAULT_TIMEOUT).await
    }

    /// Connects with a timeout of `timeout` on connecting and on every command.
    ///
    /// A node of a Redis Cluster is refused with an error that says to use
    /// [`connect_cluster`](Self::connect_cluster).
    pub async fn connect_with_timeout(url: &str, timeout: Duration) -> Result<Self, BoxError> {
        let client = redis::Client::open(resp3(url.into_connection_info()?))?;
        let (waiters, backplane) = (Arc::new(Waiters::default()), Arc::default());
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_push_sender(push_sender(
                Arc::downgrade(&waiters),
                Arc::downgrade(&backplane),
            ))
            .set_automatic_resubscription();
        let conn =
            tokio::time::timeout(timeout, ConnectionManager::new_with_config(client, config))
                .await
                .map_err(|_| "timed out connecting to redis")??;
        // A cluster node answers only for its own slots: every other key would be a MOVED
        // error, and under `FailOpen` the layer would quietly run every such request on
        // each instance. (A Redis that refuses `INFO` is taken for a single one.)
        let mut probe = conn.clone();
        let mut info = redis::cmd("INFO");
        info.arg("cluster");
        let answer = tokio::time::timeout(timeout, info.query_async::<String>(&mut probe)).await;
        if answer.is_ok_and(|info| info.is_ok_and(|info| info.contains("cluster_enabled:1"))) {
            return Err(format!(
                "{url} is a Redis Cluster node: connect with RedisStore::connect_cluster"
            )
            .into());
        }
        Self::ready(Connection::Node(conn), waiters, backplane, timeout).await
    }

    /// Connects to the Redis Cluster that `nodes` belong to (`redis://host:port` each; one
    /// is enough, the others are found), with the default timeout, lease and poll interval.
    ///
    /// Every key of one request (its response, lease and fencing-token counter) and its
    /// release channel are in one hash slot, so each script runs on one master, and the
    /// release messages go by sharded pub/sub (`SPUBLISH`, Redis 7 or newer) to the
    /// instances waiting on that slot only. The connection follows slot migrations and
    /// failovers; while the master of a key's slot is unreachable, the store answers errors
    /// for that key, which the layer handles as its
    /// [`on_store_error`](crate::idempotency::IdempotencyLayer::on_store_error) says.
    ///
    /// ```no_run
    /// use tower_coalesce::idempotency::IdempotencyLayer;
    /// use tower_coalesce::redis::RedisStore;
    ///
    /// # async fn build() -> Result<(), tower_coalesce::BoxError> {
    /// let store = RedisStore::connect_cluster(&[
    ///     "redis://10.0.0.1:6379",
    ///     "redis://10.0.0.2:6379",
    ///     "redis://10.0.0.3:6379",
    /// ])
    /// .await?;
    /// let layer = IdempotencyLayer::new().store(store);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_cluster(nodes: &[&str]) -> Result<Self, BoxError> {
        Self::connect_cluster_with_timeout(nodes, DEFAULT_TIMEOUT).await
    }

    /// Connects to a Redis Cluster with a timeout of `timeout` on connecting and on every
    /// command (redirections and retries included).
    pub async fn connect_cluster_with_timeout(
        nodes: &[&str],
        timeout: Duration,
    ) -> Result<Self, BoxError> {
        let nodes = nodes
            .iter()
            .map(|url| Ok(resp3(url.into_connection_info()?)))
            .collect::<Result<Vec<_>, RedisError>>()?;
        let (waiters, backplane) = (Arc::new(Waiters::default()), Arc::default());
        let client = ClusterClientBuilder::new(nodes)
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(push_sender(
                Arc::downgrade(&waiters),
                Arc::downgrade(&backplane),
            ))
            .connection_timeout(timeout)
            .response_timeout(timeout)
            // The client's own waits between retries start at 1.28 s, over any command
            // timeout worth having: after a failover, every command to the moved slots would
            // time out until a slow retry refreshed the slot map. Retry within the timeout.
            .retries(3)
            .min_retry_wait(5)
            .max_retry_wait(Self::millis(timeout / 4))
            .retry_wait_formula(10, 2)
            .build()?;
        let conn = tokio::time::timeout(timeout, client.get_async_connection())
            .await
            .map_err(|_| "timed out connecting to the redis cluster")??;
        let cluster = cluster::Cluster::new(client, conn, timeout);
        Self::ready(Connection::Cluster(cluster), waiters, backplane, timeout).await
    }

    /// Loads the scripts (into every master of a cluster) and makes the store.
    async fn ready(
        conn: Connection,
        waiters: Arc<Waiters>,
        backplane: Arc<Backplane>,
        timeout: Duration,
    ) -> Result<Self, BoxError> {
        // Loaded up front so that the first requests don't pay a NOSCRIPT round trip. After
        // a Redis restart (or on a promoted replica), each script is sent whole on its
        // first `NOSCRIPT` (`ScriptCall`).
        for script in [&LEASE, &STORE_AND_RELEASE, &RENEW, &GROUP_ADD, &GROUP_TAKE] {
            let mut conn = conn.clone();
            tokio::time::timeout(timeout, script.get().load_async(&mut conn))
                .await
                .map_err(|_| "timed out loading a script into redis")??;
        }
        Ok(RedisStore {
            conn,
            waiters,
            backplane,
            prefix: "tower-coalesce:idempotency:".into(),
            timeout,
            lease: DEFAULT_LEASE,
            poll_interval: DEFAULT_POLL_INTERVAL,
        })
    }

    /// Puts `prefix` before every key, to share a Redis with other data or other apps.
    ///
    /// # Panics
    ///
    /// If `prefix` has a `{` or a `}`: on a cluster, Redis would hash the prefix's braces
    /// instead of each key's own hash tag, and every key would land on one master.
    pub fn with_prefix(mut self, prefix: impl Into<Arc<str>>) -> Self {
        let prefix = prefix.into();
        assert!(
            !prefix.contains(['{', '}']),
            "the key prefix {prefix:?} has a brace: keys are hash-tagged by their own braces"
        );
        self.prefix = prefix;
        self
    }

    define_lease_setters!();

    /// The name of one of `key`'s Redis keys (or its channel): the prefix, the kind, and
    /// the store key in hex as the hash tag, so that all of them are in one cluster slot.
    fn name(&self, kind: &str, key: &StoreKey) -> String {
        let mut name = String::with_capacity(self.prefix.len() + kind.len() + 66);
        name.push_str(&self.prefix);
        name.push_str(kind);
        name.push('{');
        for b in key.as_bytes() {
            let _ = write!(name, "{b:02x}"); // Writing to a String can't fail.
        }
        name.push('}');
        name
    }

    /// The channel of the backplane: the changes instances announce to each other.
    fn changes_channel(&self) -> String {
        format!("{}changes", self.prefix)
    }

    /// Runs one command against the timeout.
    async fn timed<T>(
        &self,
        what: &'static str,
        command: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, BoxError> {
        let watch = self.conn.watch();
        let answer = tokio::time::timeout(self.timeout, command).await;
        // An error reply is an answer too; a timeout the client reports is not.
        if matches!(&answer, Ok(Ok(_))) || matches!(&answer, Ok(Err(e)) if !e.is_timeout()) {
            watch.answered();
        }
        match answer {
            Ok(result) => Ok(result?),
            Err(_) => Err(format!("redis {what} timed out after {:?}", self.timeout).into()),
        }
    }

    fn millis(duration: Duration) -> u64 {
        u64::try_from(duration.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Renews the lease every third of its duration until the guard aborts it, or the
    /// lease turns out to be lost.
    fn renew(&self, lease_key: String, token: String) -> impl Future<Output = ()> + use<> {
        let store = self.clone();
        renew_every_third(self.lease, move || {
            let (store, lease_key, token) = (store.clone(), lease_key.clone(), token.clone());
            async move {
                let mut conn = store.conn.clone();
                let mut renew = RENEW.call();
                renew
                    .key(&lease_key)
                    .arg(&token)
                    .arg(Self::millis(store.lease));
                let renewed = renew.invoke::<i64>(&mut conn);
                Ok(store.timed("lease renewal", renewed).await? == 1)
            }
        })
    }

    /// Takes the lease of `key` with a new token and the key's next fencing token, after
    /// looking the response up first if `lookup` (one script, one round trip): a stored
    /// response, the lease held, or the lease held elsewhere.
    async fn take(&self, key: &StoreKey, lookup: bool) -> Result<Lease, BoxError> {
        let (response_key, lease_key) = (self.name("", key), self.name("lease:", key));
        let (fence_key, token) = (self.name("fence:", key), lease::token());
        let mut script = LEASE.call();
        script
            .key(&response_key)
            .key(&lease_key)
            .key(&fence_key)
            .arg(&token)
            .arg(Self::millis(self.lease))
            .arg(Self::millis(FENCE_KEPT))
            .arg(if lookup { "lookup" } else { "" });
        let mut conn = self.conn.clone();
        let answer: Value = self.timed("lease", script.invoke(&mut conn)).await?;
        match answer {
            Value::BulkString(bytes) => Ok(Lease::Stored(Arc::new(codec::decode(&bytes)?))),
            Value::Int(0) => Ok(Lease::HeldElsewhere),
            Value::Int(fence @ 1..) => {
                let guard = self.held(key, [response_key, lease_key, fence_key], token, fence);
                Ok(Lease::Held(guard.with_fence(fence as u64)))
            }
            other => Err(format!("unexpected answer to the lease script: {other:?}").into()),
        }
    }

    /// The lease `token` took on `key` with the fencing token `fence`: renewed until
    /// completed, which stores the response at `response_key` unless a later lease was
    /// taken, releases the lease and tells the waiting instances.
    fn held(
        &self,
        key: &StoreKey,
        [response_key, lease_key, fence_key]: [String; 3],
        token: String,
        fence: i64,
    ) -> LeaseGuard {
        let renewer = tokio::spawn(self.renew(lease_key.clone(), token.clone()));
        let (store, channel) = (self.clone(), self.name("released:", key));
        let names = Arc::new([response_key, lease_key, fence_key, channel, token]);
        let complete = move |response: Option<(Arc<StoredResponse>, Duration)>| {
            let (store, names) = (store.clone(), names.clone());
            async move {
                let [response_key, lease_key, fence_key, channel, token] = &*names;
                let mut conn = store.conn.clone();
                let mut script = STORE_AND_RELEASE.call();
                script
                    .key(response_key)
                    .key(lease_key)
                    .key(fence_key)
                    .arg(channel)
                    .arg(token)
                    .arg(store.conn.publish())
                    .arg(fence.to_string());
                if let Some((response, ttl)) = response {
                    script.arg(codec::encode(&response)).arg(Self::millis(ttl));
                }
                let answer = store.timed("store and release", script.invoke(&mut conn));
                match answer.await? {
                    Value::Int(1) => Ok(Completion::Kept),
                    Value::Int(0) | Value::Nil => Ok(Completion::Superseded(None)),
                    Value::BulkString(bytes) => Ok(Completion::Superseded(Some(Arc::new(
                        codec::decode(&bytes)?,
                    )))),
                    other => Err(format!("unexpected answer to the keep script: {other:?}").into()),
                }
            }
        };
        LeaseGuard::new(complete, renewer).keep_trying_for(self.lease)
    }
}

/// The connection settings of `info`, speaking RESP3: the release messages arrive as push
/// messages on the connection that sends the commands.
fn resp3(info: ConnectionInfo) -> ConnectionInfo {
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    info.set_redis_settings(settings)
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &matches!(self.conn, Connection::Cluster(_)))
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("lease", &self.lease)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

impl Store for RedisStore {
    async fn get(&self, key: &StoreKey) -> Result<Option<Arc<StoredResponse>>, BoxError> {
        let mut conn = self.conn.clone();
        let mut get = redis::cmd("GET");
        get.arg(self.name("", key));
        let found: Option<Vec<u8>> = self.timed("GET", get.query_async(&mut conn)).await?;
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
        let mut conn = self.conn.clone();
        let mut set = redis::cmd("SET");
        set.arg(self.name("", &key))
            .arg(codec::encode(&response))
            .arg("PX")
            .arg(Self::millis(ttl));
        self.timed("SET", set.exec_async(&mut conn)).await
    }

    async fn lease(&self, key: &StoreKey) -> Result<Lease, BoxError> {
        self.take(key, true).await
    }

    async fn refresh_lease(&self, key: &StoreKey) -> Result<Lease, BoxError> {
        self.take(key, false).await
    }

    async fn remove(&self, key: &StoreKey) -> Result<bool, BoxError> {
        let mut del = redis::cmd("DEL");
        del.arg(self.name("", key));
        let mut conn = self.conn.clone();
        Ok(self.timed("DEL", del.query_async::<i64>(&mut conn)).await? == 1)
    }

    async fn add_to_group(
        &self,
        group: &StoreKey,
        key: &StoreKey,
        ttl: Duration,
    ) -> Result<(), BoxError> {
        let group = self.name("group:", group);
        let mut script = GROUP_ADD.call();
        script
            .key(&group)
            .arg(key.as_bytes().as_slice())
            .arg(Self::millis(ttl));
        let mut conn = self.conn.clone();
        let added = script.invoke::<i64>(&mut conn);
        self.timed("group add", added).await.map(drop)
    }

    async fn take_group(&self, group: &StoreKey) -> Result<Vec<StoreKey>, BoxError> {
        let group = self.name("group:", group);
        let mut script = GROUP_TAKE.call();
        script.key(&group);
        let mut conn = self.conn.clone();
        let taken = script.invoke::<Vec<Vec<u8>>>(&mut conn);
        Ok(StoreKey::all_from(self.timed("group take", taken).await?))
    }

    async fn announce(&self, keys: &[StoreKey]) -> Result<(), BoxError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut publish = redis::cmd(self.conn.publish());
        publish
            .arg(self.changes_channel())
            .arg(self.backplane.message(keys));
        self.timed("announce", publish.exec_async(&mut self.conn.clone()))
            .await
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Change>> {
        let channel = self.changes_channel();
        let (changes, first) = self.backplane.listen(channel.clone());
        if first {
            // Subscribed once per connection, by a task of its own (this isn't async), and
            // again after every reconnection by the connection itself; each confirmation
            // tells the listeners that messages may have been lost meanwhile.
            let store = self.clone();
            tokio::spawn(async move {
                loop {
                    let mut conn = store.conn.clone();
                    match store
                        .timed("SUBSCRIBE", conn.subscribe_for_good(&channel))
                        .await
                    {
                        Ok(()) => return,
                        Err(error) => {
                            tracing::warn!(%error, "subscribing to the cache's changes failed; retrying");
                            tokio::time::sleep(store.poll_interval).await;
                        }
                    }
                }
            });
        }
        Some(changes)
    }

    async fn released(&self, key: &StoreKey) {
        let channel = self.name("released:", key);
        let registration = self.waiters.register(&channel);
        let notified = registration.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        let mut conn = self.conn.clone();
        let wait = async {
            if self
                .timed("SUBSCRIBE", conn.subscribe(&channel))
                .await
                .is_err()
            {
                // Without the subscription, wait the poll interval out.
                return std::future::pending().await;
            }
            // The release may have come before the subscription: look once.
            let mut exists = redis::cmd("EXISTS");
            exists.arg(self.name("lease:", key));
            if let Ok(0) = self
                .timed("EXISTS", exists.query_async::<i64>(&mut conn.clone()))
                .await
            {
                return;
            }
            notified.await;
        };
        let _ = tokio::time::timeout(self.poll_interval, wait).await;

        // Off the waiting path. A flight that subscribes to the channel again meanwhile may
        // lose its subscription to this; it then polls.
        let store = self.clone();
        tokio::spawn(async move {
            let _ = store.timed("UNSUBSCRIBE", conn.unsubscribe(&channel)).await;
        });
    }
}
