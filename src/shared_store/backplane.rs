//! The backplane of a shared store: the messages by which instances tell each other which
//! entries changed, so that each drops its near copies of them (the HTTP cache's near
//! cache).
//!
//! A message is the sender's id (8 bytes) and the changed store keys (32 bytes each). An
//! instance skips its own messages: it updated its near copies as it changed the store.

use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, OnceLock};

use tokio::sync::broadcast;

use crate::store::{Change, StoreKey};

/// How many changes wait for a slow listener before it is told that it lost some.
const CAPACITY: usize = 1024;

/// One store connection's end of the backplane (clones of the store share it).
pub(crate) struct Backplane {
    id: [u8; 8],
    /// The channel subscribed to, once [`Store::changes`](crate::store::Store::changes)
    /// was first called: messages on other channels are not changes.
    channel: OnceLock<String>,
    sender: broadcast::Sender<Change>,
}

impl Default for Backplane {
    fn default() -> Self {
        Backplane {
            // Random per connection: two stores in one process (tests, or two caches) are two
            // instances to each other.
            id: RandomState::new()
                .hash_one(crate::shared_store::release::token())
                .to_be_bytes(),
            channel: OnceLock::new(),
            sender: broadcast::channel(CAPACITY).0,
        }
    }
}

impl Backplane {
    /// A receiver of the changes, and whether `channel` still has to be subscribed to (the
    /// first call).
    pub(crate) fn listen(&self, channel: String) -> (broadcast::Receiver<Change>, bool) {
        let receiver = self.sender.subscribe();
        let first = self.channel.set(channel).is_ok();
        (receiver, first)
    }

    /// The message that announces `keys`.
    pub(crate) fn message(&self, keys: &[StoreKey]) -> Vec<u8> {
        let mut message = Vec::with_capacity(8 + 32 * keys.len());
        message.extend_from_slice(&self.id);
        for key in keys {
            message.extend_from_slice(key.as_bytes());
        }
        message
    }

    /// A message arrived on `channel`: if it is the backplane's, and another instance's,
    /// the keys it names changed. A message that is not whole is taken for a loss.
    pub(crate) fn received(&self, channel: &[u8], message: &[u8]) {
        if self
            .channel
            .get()
            .is_none_or(|own| own.as_bytes() != channel)
        {
            return;
        }
        let Some((id, keys)) = message.split_first_chunk::<8>() else {
            return self.lost();
        };
        if *id == self.id {
            return;
        }
        if keys.len() % 32 != 0 {
            return self.lost();
        }
        let keys: Arc<[StoreKey]> = keys
            .chunks_exact(32)
            .map(|key| StoreKey::from_bytes(key.try_into().expect("32-byte chunks")))
            .collect();
        // No listener (no near cache): nothing to tell.
        let _ = self.sender.send(Change::Keys(keys));
    }

    /// The subscription on `channel` was (re)confirmed: messages sent before may have been
    /// missed. (PostgreSQL listens before anyone asks for the changes, and reports its
    /// reconnections itself.)
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn subscribed(&self, channel: &[u8]) {
        if self
            .channel
            .get()
            .is_some_and(|own| own.as_bytes() == channel)
        {
            self.lost();
        }
    }

    /// Messages may have been lost (the connection dropped).
    pub(crate) fn lost(&self) {
        let _ = self.sender.send(Change::Lost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn another_instances_message_names_its_keys_and_an_own_one_is_skipped() {
        let (mine, other) = (Backplane::default(), Backplane::default());
        let (mut changes, first) = mine.listen("chan".into());
        assert!(first);
        assert!(!mine.listen("chan".into()).1, "subscribed once");
        let keys = [StoreKey::from_bytes([1; 32]), StoreKey::from_bytes([2; 32])];
        mine.received(b"chan", &mine.message(&keys));
        mine.received(b"other", &other.message(&keys));
        mine.received(b"chan", &other.message(&keys));
        match changes.try_recv() {
            Ok(Change::Keys(got)) => assert_eq!(&*got, &keys),
            other => panic!("expected the keys, got {other:?}"),
        }
        mine.received(b"chan", &other.message(&keys)[..20]);
        assert!(matches!(changes.try_recv(), Ok(Change::Lost)));
        mine.subscribed(b"chan");
        assert!(matches!(changes.try_recv(), Ok(Change::Lost)));
        assert!(changes.try_recv().is_err());
    }
}
