//! Leases on Redis: a script that looks the response up or takes the lease (`SET NX PX`)
//! in one round trip, scripts that check the owner's token to renew it and to store the
//! response and release it, and a pub/sub message on release for the instances that wait.

use std::sync::{OnceLock, Weak};

use redis::aio::ConnectionLike;
use redis::{
    Cmd, ErrorKind, FromRedisValue, PushInfo, PushKind, RedisResult, Script, ServerErrorKind,
    ToRedisArgs, Value,
};

use crate::shared_store::backplane::Backplane;
pub(super) use crate::shared_store::release::{Waiters, token};

/// Extends the lease to `ARGV[2]` ms if `ARGV[1]` still owns it. A lease that expired and
/// was taken over belongs to the new owner: renewing it would run the key twice at once.
pub(super) static RENEW: LazyScript = LazyScript::new(
    r"if redis.call('GET', KEYS[1]) == ARGV[1] then
        return redis.call('PEXPIRE', KEYS[1], ARGV[2])
    end
    return 0",
);

/// Returns the response stored at `KEYS[1]` if there is one and `ARGV[4]` asks to look
/// (`lookup`); else takes the lease `KEYS[2]` for the token `ARGV[1]` and `ARGV[2]` ms and
/// answers the key's next fencing token, or finds the lease taken (0). The lookup and the
/// lease in one round trip; without the lookup for the HTTP cache, which refreshes an entry
/// still kept.
///
/// The fencing token is one more than the key's last (`KEYS[3]`, kept `ARGV[3]` ms after
/// the last lease), and at least the server's clock in microseconds: so tokens keep
/// increasing even if Redis lost the last one (a restart without persistence, a failover
/// that lost the last writes), as long as its clock doesn't go back by more than the time
/// since. Microseconds since 1970 fit a Lua number exactly (under 2^53) until the year 2255.
pub(super) static LEASE: LazyScript = LazyScript::new(
    r"if ARGV[4] == 'lookup' then
        local stored = redis.call('GET', KEYS[1])
        if stored then
            return stored
        end
    end
    if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
        local now = redis.call('TIME')
        local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
        local fence = math.max((tonumber(redis.call('GET', KEYS[3])) or 0) + 1, clock)
        redis.call('SET', KEYS[3], string.format('%.0f', fence), 'PX', ARGV[3])
        return fence
    end
    return 0",
);

/// Unless a later lease was taken on the key (its fencing-token counter `KEYS[3]` is no
/// longer `ARGV[4]`): stores the response `ARGV[5]` at `KEYS[1]` for `ARGV[6]` ms if one
/// is given, deletes the lease `KEYS[2]` if the token `ARGV[2]` still owns it, then tells
/// the waiting instances on the channel `ARGV[1]` to look (`SPUBLISH` if `ARGV[3]` is
/// `spublish`: a cluster, where the channel is in the keys' slot and the message stays on
/// its shard; else `PUBLISH`), and answers 1. A stalled leader whose lease was taken over
/// keeps nothing and answers what the later lease kept (or 0, nothing yet): its response
/// must never replace that one. A counter that is gone (Redis lost it) was not moved on by
/// a later lease, which would have set it again. Safe to repeat.
pub(super) static STORE_AND_RELEASE: LazyScript = LazyScript::new(
    r"local fence = redis.call('GET', KEYS[3])
    if fence and fence ~= ARGV[4] then
        return redis.call('GET', KEYS[1]) or 0
    end
    if ARGV[5] then
        redis.call('SET', KEYS[1], ARGV[5], 'PX', ARGV[6])
    end
    if redis.call('GET', KEYS[2]) == ARGV[2] then
        redis.call('DEL', KEYS[2])
    end
    if ARGV[3] == 'spublish' then
        redis.call('SPUBLISH', ARGV[1], '1')
    else
        redis.call('PUBLISH', ARGV[1], '1')
    end
    return 1",
);

/// Adds the member `ARGV[1]` to the set `KEYS[1]` (a group of the HTTP cache's entries),
/// and keeps the set at least `ARGV[2]` ms.
pub(super) static GROUP_ADD: LazyScript = LazyScript::new(
    r"redis.call('SADD', KEYS[1], ARGV[1])
    if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
        redis.call('PEXPIRE', KEYS[1], ARGV[2])
    end
    return 1",
);

/// Empties the set `KEYS[1]` and returns its members, in one step: a key added after it
/// is in the group for the next purge.
pub(super) static GROUP_TAKE: LazyScript = LazyScript::new(
    r"local members = redis.call('SMEMBERS', KEYS[1])
    redis.call('DEL', KEYS[1])
    return members",
);

/// A `Script` (which hashes its source) made on first use.
pub(super) struct LazyScript {
    source: &'static str,
    script: OnceLock<Script>,
}

impl LazyScript {
    const fn new(source: &'static str) -> Self {
        LazyScript {
            source,
            script: OnceLock::new(),
        }
    }

    pub(super) fn get(&self) -> &Script {
        self.script.get_or_init(|| Script::new(self.source))
    }

    /// A call of the script, with keys and arguments to add.
    pub(super) fn call<'a>(&'static self) -> ScriptCall<'a> {
        ScriptCall {
            script: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }
}

/// A call of a script: `EVALSHA`, and `EVAL` with the source if the node doesn't know the
/// script (`NOSCRIPT`: a Redis restarted, a replica promoted, a node added).
///
/// Not the `redis` crate's `ScriptInvocation`, which answers `NOSCRIPT` with `SCRIPT LOAD`:
/// on a cluster that goes to every master, and fails while any master the client knows is
/// down, which is exactly when a promoted replica meets the script for the first time.
/// `EVAL` goes to the key's own node, and leaves the script cached there.
pub(super) struct ScriptCall<'a> {
    script: &'static LazyScript,
    keys: Vec<&'a str>,
    args: Vec<Vec<u8>>,
}

impl<'a> ScriptCall<'a> {
    pub(super) fn key(&mut self, key: &'a str) -> &mut Self {
        self.keys.push(key);
        self
    }

    pub(super) fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    fn command(&self, name: &str, script: &str) -> Cmd {
        let mut command = redis::cmd(name);
        command
            .arg(script)
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        command
    }

    pub(super) async fn invoke<T: FromRedisValue>(
        &self,
        conn: &mut impl ConnectionLike,
    ) -> RedisResult<T> {
        let hash = self.script.get().get_hash();
        match self.command("EVALSHA", hash).query_async(conn).await {
            Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.command("EVAL", self.script.source)
                    .query_async(conn)
                    .await
            }
            answer => answer,
        }
    }
}

/// The push sender of a connection: wakes the flights waiting on the channel of a message.
/// It must not block, and it doesn't (a short lock). Weak, so that the connection doesn't
/// keep the registry alive, nor the other way round.
///
/// It also feeds the backplane: its messages, the confirmations of its subscription, and
/// the connection's drops, after which messages may have been lost.
pub(super) fn push_sender(
    waiters: Weak<Waiters>,
    backplane: Weak<Backplane>,
) -> impl Fn(PushInfo) -> Result<(), std::convert::Infallible> + Send + Sync + 'static {
    move |push: PushInfo| {
        let channel = match push.data.first() {
            Some(Value::BulkString(channel)) => Some(channel.as_slice()),
            _ => None,
        };
        match (push.kind, channel) {
            // `smessage`: a sharded channel's message, on a cluster.
            (PushKind::Message | PushKind::SMessage, Some(channel)) => {
                if let Some(waiters) = waiters.upgrade()
                    && let Ok(channel) = std::str::from_utf8(channel)
                {
                    waiters.wake(channel, None);
                }
                if let (Some(backplane), Some(Value::BulkString(message))) =
                    (backplane.upgrade(), push.data.get(1))
                {
                    backplane.received(channel, message);
                }
            }
            (PushKind::Subscribe | PushKind::SSubscribe, Some(channel)) => {
                if let Some(backplane) = backplane.upgrade() {
                    backplane.subscribed(channel);
                }
            }
            (PushKind::Disconnection, _) => {
                if let Some(backplane) = backplane.upgrade() {
                    backplane.lost();
                }
                if let Some(waiters) = waiters.upgrade() {
                    waiters.wake_all();
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_message_wakes_the_flights_registered_on_its_channel_only() {
        let waiters = Arc::new(Waiters::default());
        let send = push_sender(Arc::downgrade(&waiters), Weak::new());
        let mine = waiters.register("chan-a");
        let other = waiters.register("chan-b");
        {
            let (mine_woken, other_woken) = (mine.notify.notified(), other.notify.notified());
            tokio::pin!(mine_woken, other_woken);
            mine_woken.as_mut().enable();
            other_woken.as_mut().enable();

            send(PushInfo {
                kind: PushKind::Message,
                data: vec![Value::BulkString(b"chan-a".to_vec()), Value::Int(1)],
            })
            .unwrap();
            tokio::time::timeout(std::time::Duration::from_secs(1), mine_woken)
                .await
                .expect("the registered flight was not woken");
            assert!(futures::poll!(other_woken).is_pending());
        }
        drop((mine, other));
        assert!(waiters.is_empty());
    }
}
