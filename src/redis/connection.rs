//! One connection type for a single Redis and for a Redis Cluster: the commands and scripts
//! go through the same `ConnectionLike`, and only the pub/sub of release messages differs
//! (plain on a single node, sharded on a cluster, where a plain message would be sent to
//! every node of the cluster).

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

#[derive(Clone)]
pub(super) enum Connection {
    /// A single Redis, through the connection manager, which reconnects on its own.
    Node(ConnectionManager),
    /// A Redis Cluster: each command goes to the master of its key's slot, and follows
    /// `MOVED` and `ASK` redirections; it reconnects on its own too.
    Cluster(ClusterConnection),
}

impl Connection {
    /// Subscribes to the release `channel`: `SSUBSCRIBE` on a cluster, so that the message
    /// comes from the master of the channel's slot, the one that runs the release script.
    pub(super) async fn subscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Connection::Node(conn) => conn.subscribe(channel).await,
            Connection::Cluster(conn) => conn.ssubscribe(channel).await,
        }
    }

    pub(super) async fn unsubscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Connection::Node(conn) => conn.unsubscribe(channel).await,
            Connection::Cluster(conn) => conn.sunsubscribe(channel).await,
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
            Connection::Cluster(conn) => conn.req_packed_command(cmd),
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
            Connection::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Node(conn) => conn.get_db(),
            Connection::Cluster(conn) => conn.get_db(),
        }
    }
}
