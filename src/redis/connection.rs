//! One connection type for a single Redis and for a Redis Cluster: the commands and scripts
//! go through the same `ConnectionLike`, and only the pub/sub of release messages differs
//! (plain on a single node, sharded on a cluster, where a plain message would be sent to
//! every node of the cluster).

use std::sync::Arc;
use std::time::Instant;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use super::cluster::Cluster;

#[derive(Clone)]
pub(super) enum Connection {
    /// A single Redis, through the connection manager, which reconnects on its own.
    Node(ConnectionManager),
    /// A Redis Cluster: each command goes to the master of its key's slot, and follows
    /// `MOVED` and `ASK` redirections; it reconnects on its own too, and is replaced when
    /// it stops answering altogether (see [`Cluster`]).
    Cluster(Arc<Cluster>),
}

impl Connection {
    /// Subscribes to the release `channel`: `SSUBSCRIBE` on a cluster, so that the message
    /// comes from the master of the channel's slot, the one that runs the release script.
    pub(super) async fn subscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Connection::Node(conn) => conn.subscribe(channel).await,
            Connection::Cluster(cluster) => cluster.conn().ssubscribe(channel).await,
        }
    }

    /// Subscribes to `channel` for the life of the store (the cache's changes): the
    /// connections subscribe again after a reconnection, and a replaced cluster
    /// connection's successor does too.
    pub(super) async fn subscribe_for_good(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Connection::Node(conn) => conn.subscribe(channel).await,
            Connection::Cluster(cluster) => cluster.subscribe_for_good(channel).await,
        }
    }

    /// Watches one command: whether it gets an answer, which a cluster connection goes
    /// by to tell that it stopped answering altogether. Nothing on a single node.
    pub(super) fn watch(&self) -> Watch<'_> {
        Watch(match self {
            Connection::Node(_) => None,
            Connection::Cluster(cluster) => Some((cluster, Instant::now())),
        })
    }

    pub(super) async fn unsubscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Connection::Node(conn) => conn.unsubscribe(channel).await,
            Connection::Cluster(cluster) => cluster.conn().sunsubscribe(channel).await,
        }
    }

    /// How the release script publishes: the argument it reads to choose `SPUBLISH` or
    /// `PUBLISH`.
    pub(super) fn publish(&self) -> &'static str {
        match self {
            Connection::Node(_) => "publish",
            Connection::Cluster(_) => "spublish",
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Node(conn) => conn.req_packed_command(cmd),
            Connection::Cluster(cluster) => {
                let mut conn = cluster.conn();
                Box::pin(async move { conn.req_packed_command(cmd).await })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Node(conn) => conn.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(cluster) => {
                let mut conn = cluster.conn();
                Box::pin(async move { conn.req_packed_commands(pipeline, offset, count).await })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Node(conn) => conn.get_db(),
            Connection::Cluster(cluster) => cluster.conn().get_db(),
        }
    }
}

/// One command on its way: [`answered`](Watch::answered) when it got an answer (an error
/// reply counts); dropped without one (timed out, or its caller stopped waiting), it
/// counts as unanswered.
pub(super) struct Watch<'a>(Option<(&'a Arc<Cluster>, Instant)>);

impl Watch<'_> {
    pub(super) fn answered(mut self) {
        if let Some((cluster, _)) = self.0.take() {
            cluster.answered();
        }
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if let Some((cluster, sent)) = self.0.take() {
            cluster.unanswered(sent);
        }
    }
}
