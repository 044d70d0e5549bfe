//! Redis as the idempotency store, so that a response completed on one instance is replayed
//! by every instance.
//!
//! [`RedisStore`] implements [`IdempotencyStore`] on a [`redis`] connection manager, which
//! reconnects on its own after Redis restarts. Every command has a timeout (1 s by default).
//! A failed or timed-out command is an error to the layer, which logs it and runs the
//! request (it fails open): Redis being down never hangs a request, and costs at most the
//! timeout per command.
//!
//! ```no_run
//! use tower_coalesce::idempotency::IdempotencyLayer;
//! use tower_coalesce::redis::RedisStore;
//!
//! # async fn build() -> Result<(), tower_coalesce::BoxError> {
//! let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
//! let layer = IdempotencyLayer::new().store(store);
//! # Ok(())
//! # }
//! ```
//!
//! Coalescing of requests that are running on several instances at once is not part of
//! this store: each instance coalesces its own, and the first to complete stores the
//! response for all.
//!
//! [`IdempotencyStore`]: crate::idempotency::store::IdempotencyStore

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::BoxError;
use crate::idempotency::store::{Fingerprint, IdempotencyStore, StoreKey, StoredResponse};

/// The default timeout of every Redis command, and of connecting.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// An [`IdempotencyStore`] on Redis: `GET` and
/// `SET .. PX ttl` of an encoded response under `prefix` + the hex store key.
///
/// Clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: Arc<str>,
    timeout: Duration,
}

impl RedisStore {
    /// Connects to the Redis at `url` (`redis://host:port/db`), with the default timeout
    /// and the key prefix `tower-coalesce:idempotency:`.
    pub async fn connect(url: &str) -> Result<Self, BoxError> {
        Self::connect_with_timeout(url, DEFAULT_TIMEOUT).await
    }

    /// Connects with a timeout of `timeout` on connecting and on every command.
    pub async fn connect_with_timeout(url: &str, timeout: Duration) -> Result<Self, BoxError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let conn =
            tokio::time::timeout(timeout, ConnectionManager::new_with_config(client, config))
                .await
                .map_err(|_| "timed out connecting to redis")??;
        Ok(RedisStore {
            conn,
            prefix: "tower-coalesce:idempotency:".into(),
            timeout,
        })
    }

    /// Puts `prefix` before every key, to share a Redis with other data or other apps.
    pub fn with_prefix(mut self, prefix: impl Into<Arc<str>>) -> Self {
        self.prefix = prefix.into();
        self
    }

    fn key(&self, key: &StoreKey) -> String {
        let mut name = String::with_capacity(self.prefix.len() + 64);
        name.push_str(&self.prefix);
        for b in key.as_bytes() {
            name.push_str(&format!("{b:02x}"));
        }
        name
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl IdempotencyStore for RedisStore {
    async fn get(&self, key: &StoreKey) -> Result<Option<Arc<StoredResponse>>, BoxError> {
        let mut conn = self.conn.clone();
        let found: Option<Vec<u8>> = tokio::time::timeout(self.timeout, conn.get(self.key(key)))
            .await
            .map_err(|_| "redis GET timed out")??;
        Ok(found.map(|bytes| decode(&bytes)).transpose()?.map(Arc::new))
    }

    async fn put(
        &self,
        key: StoreKey,
        response: Arc<StoredResponse>,
        ttl: Duration,
    ) -> Result<(), BoxError> {
        let mut conn = self.conn.clone();
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut set = redis::cmd("SET");
        set.arg(self.key(&key))
            .arg(encode(&response))
            .arg("PX")
            .arg(millis);
        tokio::time::timeout(self.timeout, set.exec_async(&mut conn))
            .await
            .map_err(|_| "redis SET timed out")??;
        Ok(())
    }
}

const MAGIC: &[u8; 4] = b"TCR1";

/// `TCR1`, status (u16), version (u8), fingerprint (32 bytes), header count (u32), each
/// header as name length (u16), name, value length (u32), value, then the body. Integers
/// are big-endian.
fn encode(response: &StoredResponse) -> Vec<u8> {
    let mut out = Vec::with_capacity(response.weight());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&response.status().as_u16().to_be_bytes());
    out.push(match response.version() {
        Version::HTTP_09 => 0,
        Version::HTTP_10 => 1,
        Version::HTTP_2 => 3,
        Version::HTTP_3 => 4,
        _ => 2,
    });
    out.extend_from_slice(response.fingerprint().as_bytes());
    out.extend_from_slice(&(response.headers().len() as u32).to_be_bytes());
    for (name, value) in response.headers() {
        out.extend_from_slice(&(name.as_str().len() as u16).to_be_bytes());
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    out.extend_from_slice(response.body());
    out
}

/// Reads what [`encode`] wrote; anything else is an error, never a panic.
fn decode(bytes: &[u8]) -> Result<StoredResponse, BoxError> {
    let mut input = Reader(bytes);
    if input.take(4)? != MAGIC {
        return Err("not a stored response (bad magic)".into());
    }
    let status = StatusCode::from_u16(u16::from_be_bytes(input.array()?))?;
    let version = match input.array::<1>()?[0] {
        0 => Version::HTTP_09,
        1 => Version::HTTP_10,
        3 => Version::HTTP_2,
        4 => Version::HTTP_3,
        _ => Version::HTTP_11,
    };
    let fingerprint = Fingerprint::from_bytes(input.array()?);
    let count = u32::from_be_bytes(input.array()?);
    let mut headers = HeaderMap::new();
    for _ in 0..count {
        let len = u16::from_be_bytes(input.array()?) as usize;
        let name = HeaderName::from_bytes(input.take(len)?)?;
        let len = u32::from_be_bytes(input.array()?) as usize;
        let value = HeaderValue::from_bytes(input.take(len)?)?;
        headers.append(name, value);
    }
    let body = Bytes::copy_from_slice(input.0);
    Ok(StoredResponse::new(
        status,
        version,
        headers,
        body,
        fingerprint,
    ))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BoxError> {
        if self.0.len() < n {
            return Err("stored response is truncated".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], BoxError> {
        Ok(self.take(N)?.try_into().expect("took exactly N bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredResponse {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        StoredResponse::new(
            StatusCode::CREATED,
            Version::HTTP_2,
            headers,
            Bytes::from_static(b"{\"id\":\"c-1\"}"),
            Fingerprint::from_bytes([7; 32]),
        )
    }

    #[test]
    fn responses_survive_the_round_trip() {
        let decoded = decode(&encode(&sample())).unwrap();
        let original = sample();
        assert_eq!(decoded.status(), original.status());
        assert_eq!(decoded.version(), original.version());
        assert_eq!(decoded.headers(), original.headers());
        assert_eq!(decoded.body(), original.body());
        assert_eq!(decoded.fingerprint(), original.fingerprint());
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let bytes = encode(&sample());
        // The body is the tail, so only cuts before it must fail.
        let body_start = bytes.len() - sample().body().len();
        for cut in 0..body_start {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut} decoded");
        }
        for i in 0..bytes.len() {
            let mut corrupt = bytes.clone();
            corrupt[i] ^= 0xff;
            let _ = decode(&corrupt); // must not panic
        }
    }
}
