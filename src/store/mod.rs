//! Where completed responses are kept: the store trait, its keys, and the stored form of a
//! response.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode, Version};
use sha2::{Digest, Sha256};

use crate::BoxError;
use crate::http::key::EncodeKey;

mod lease;
#[cfg(any(feature = "idempotency", feature = "http-cache"))]
mod memory;

pub use self::lease::{Completion, FencingToken, Lease, LeaseGuard};
#[cfg(feature = "http-cache")]
pub(crate) use self::memory::PerEntryTtl;
#[cfg(any(feature = "idempotency", feature = "http-cache"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "idempotency", feature = "http-cache"))))]
pub use self::memory::{DEFAULT_MEMORY_LIMIT, MemoryStore};

/// Storage of completed responses by key and, for a store shared by several instances, the
/// lease that decides which instance runs a key. Both layers use it:
/// [`HttpCoalesceLayer::store`](crate::http::HttpCoalesceLayer::store) and the idempotency preset.
///
/// Inside a key's flight (one per key and process), the layer:
/// 1. takes the key's [`lease`](Self::lease). A store that has leases looks the response up
///    in the same step and answers [`Lease::Stored`]; one that has none answers
///    [`Lease::NotShared`], and the layer looks the response up with [`get`](Self::get)
///    when it [replays](crate::http::HttpCoalesceLayer::replay). A stored response of the same
///    request is replayed. If another instance holds the lease, the layer waits for
///    [`released`](Self::released) and starts over;
/// 2. calls the inner service, and keeps the response before the flight completes (and,
///    holding a lease, before releasing it: [`LeaseGuard::complete`]), so that whoever
///    waited finds it. Without a lease it stores it with [`put`](Self::put), for replay.
///
/// Keeping under a lease is *fenced*: a response is kept only if no later lease was taken
/// on the key. A leader that stalled past its lease (and whose key another instance took
/// over) keeps nothing, and its callers get the response kept under the later lease
/// ([`Completion::Superseded`]): one key, one answer. A keep that fails is retried for the
/// lease's length, the lease renewed meanwhile.
///
/// A store error is logged, and then the layer either runs the request as if nothing were
/// stored (it fails open, the default) or answers `503`; see
/// [`on_store_error`](crate::http::HttpCoalesceLayer::on_store_error). A response that
/// could not be kept even so is answered under `FailOpen` (a retry then runs again) and
/// replaced by a `503` that says its outcome was not recorded under `FailClosed`.
///
/// [`NoStore`] and `MemoryStore` (feature `idempotency`) are stores of one process, and keep
/// the defaults of `lease`, `refresh_lease` and `released`; [`RedisStore`](crate::redis)
/// overrides them.
///
/// The HTTP cache also removes entries and files them in groups, for its purges
/// ([`remove`](Self::remove), [`add_to_group`](Self::add_to_group),
/// [`take_group`](Self::take_group): `MemoryStore`, `RedisStore` and `PostgresStore` have
/// them; by default a purge is an error), and its near cache listens to the changes other
/// instances [`announce`](Self::announce) ([`changes`](Self::changes): Redis pub/sub,
/// PostgreSQL `NOTIFY`).
pub trait Store: Clone + Send + Sync + 'static {
    /// Returns the response stored under `key`, if any and not expired.
    fn get(
        &self,
        key: &StoreKey,
    ) -> impl Future<Output = Result<Option<Arc<StoredResponse>>, BoxError>> + Send;

    /// Stores `response` under `key` for `ttl`.
    fn put(
        &self,
        key: StoreKey,
        response: Arc<StoredResponse>,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Looks `key` up and, if nothing is stored, takes its lease, which says that this
    /// instance runs the request.
    ///
    /// The default answers [`Lease::NotShared`]: a store that only one process uses needs
    /// no lease, the process's flights are enough, and the layer calls [`get`](Self::get).
    fn lease(&self, key: &StoreKey) -> impl Future<Output = Result<Lease, BoxError>> + Send {
        let _ = key;
        std::future::ready(Ok(Lease::NotShared))
    }

    /// Takes the lease on `key` whatever is stored under it: the HTTP cache refreshes an
    /// entry that is stale but still kept, so a stored response is no answer here. Answers
    /// [`Lease::Held`] or [`Lease::HeldElsewhere`] (never [`Lease::Stored`]); the cache
    /// looks the key up again once it holds the lease, in case another instance refreshed
    /// it meanwhile.
    ///
    /// The default answers [`Lease::NotShared`], as [`lease`](Self::lease) does.
    fn refresh_lease(
        &self,
        key: &StoreKey,
    ) -> impl Future<Output = Result<Lease, BoxError>> + Send {
        let _ = key;
        std::future::ready(Ok(Lease::NotShared))
    }

    /// Completes when the lease on `key` that another instance holds may have been
    /// released, or expired; the layer then looks the key up and tries the lease again.
    /// It must complete within a bounded time even if no release is ever seen (a lost
    /// message, a dead instance).
    ///
    /// Only called after [`lease`](Self::lease) or [`refresh_lease`](Self::refresh_lease)
    /// answered [`Lease::HeldElsewhere`]; the default completes at once.
    fn released(&self, key: &StoreKey) -> impl Future<Output = ()> + Send {
        let _ = key;
        std::future::ready(())
    }

    /// Waits as [`released`](Self::released) does, and answers the response the release
    /// kept, when the store's release message carried it: the layer then answers with it
    /// as with a response it looked up, without looking the key up. It must be a response
    /// the store keeps under `key`, kept by a release after this call began.
    ///
    /// The default waits with `released` and answers `None`: the layer looks the key up.
    /// `PostgresStore` carries small responses in its release messages.
    fn released_response(
        &self,
        key: &StoreKey,
    ) -> impl Future<Output = Option<Arc<StoredResponse>>> + Send {
        async move {
            self.released(key).await;
            None
        }
    }

    /// Removes the response stored under `key`, and answers whether there was one: the
    /// HTTP cache's purges and invalidations.
    ///
    /// The default is an error that says the store can't: a purge then fails loudly rather
    /// than leave the entries in place.
    fn remove(&self, key: &StoreKey) -> impl Future<Output = Result<bool, BoxError>> + Send {
        let _ = key;
        std::future::ready(Err(cannot_purge()))
    }

    /// Adds `key` to the group `group` (the HTTP cache's groups are a URI's entries and a
    /// tag's), kept at least `ttl`, so that [`take_group`](Self::take_group) finds it.
    ///
    /// The default keeps nothing.
    fn add_to_group(
        &self,
        group: &StoreKey,
        key: &StoreKey,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let _ = (group, key, ttl);
        std::future::ready(Ok(()))
    }

    /// Empties the group `group` and returns the keys it held (some may have expired).
    ///
    /// The default is an error that says the store can't purge.
    fn take_group(
        &self,
        group: &StoreKey,
    ) -> impl Future<Output = Result<Vec<StoreKey>, BoxError>> + Send {
        let _ = group;
        std::future::ready(Err(cannot_purge()))
    }

    /// Tells every other instance that shares this store that the responses under `keys`
    /// changed (kept anew, or removed), so that they drop their near copies; see
    /// [`changes`](Self::changes).
    ///
    /// The default tells nobody: a store of one process has no other instance.
    fn announce(&self, keys: &[StoreKey]) -> impl Future<Output = Result<(), BoxError>> + Send {
        let _ = keys;
        std::future::ready(Ok(()))
    }

    /// The changes other instances [`announce`](Self::announce), as they arrive, for a near
    /// cache in front of the store to drop its copies; `None` for a store that no other
    /// instance shares (the default). A store that may lose messages (a connection that
    /// dropped) sends [`Change::Lost`] once they may have been lost, and once it confirms
    /// the subscription (messages sent before it were missed).
    ///
    /// Called within a Tokio runtime: a store may spawn its subscription.
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Change>> {
        None
    }
}

/// A change to a shared store that another instance made, as [`Store::changes`] reports it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Change {
    /// The responses under these keys were kept anew or removed.
    Keys(Arc<[StoreKey]>),
    /// Changes may have been missed (the connection dropped, or was subscribed again):
    /// whatever was copied from the store may be out of date.
    Lost,
}

fn cannot_purge() -> BoxError {
    "this store can't remove entries or keep groups: purging needs a store that can \
     (MemoryStore, RedisStore, PostgresStore)"
        .into()
}

/// The key a response is stored under: a SHA-256 of the caller's scope and the request's
/// key, so that stores keep neither credentials nor raw keys, and every process computes
/// the same key.
///
/// # Encoding
///
/// The digest is taken over explicit bytes, never over `std::hash::Hash` output (which
/// may differ between Rust versions and platforms, so that two instances built apart would
/// run one request twice):
///
/// ```text
/// "tower-coalesce store key v1\0"
/// scope: 0x00 (none) | 0x01 followed by the scope's EncodeKey bytes
/// key:   the key's EncodeKey bytes
/// ```
///
/// [`EncodeKey`] writes strings and byte strings as a big-endian `u64` length and the
/// bytes, integers as 8 big-endian bytes, sequences as a `u64` count and their items, and
/// tuples as their parts in order, so that no two different keys give the same bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StoreKey([u8; 32]);

impl StoreKey {
    /// The store key of `key` for callers of `scope` (`None`: no identity).
    pub fn new<Scope: EncodeKey, Key: EncodeKey + ?Sized>(
        scope: Option<&Scope>,
        key: &Key,
    ) -> Self {
        let mut bytes = Vec::with_capacity(64);
        bytes.extend_from_slice(b"tower-coalesce store key v1\0");
        scope.encode_key(&mut bytes);
        key.encode_key(&mut bytes);
        StoreKey(Sha256::digest(&bytes).into())
    }

    /// The key of a group of entries, `kind` (`uri`, `tag`) named `name`: the same in every
    /// process, and apart from every request's key.
    #[cfg(feature = "http-cache")]
    pub(crate) fn group(kind: &str, name: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"tower-coalesce group v1\0");
        hasher.update((kind.len() as u64).to_be_bytes());
        hasher.update(kind.as_bytes());
        hasher.update(name);
        StoreKey(hasher.finalize().into())
    }

    /// The key of one variant of this key's response: the one that answers requests of
    /// `fingerprint` (the fingerprint a response that varies is kept under).
    #[cfg(feature = "http-cache")]
    pub(crate) fn variant(&self, fingerprint: Fingerprint) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"tower-coalesce variant v1\0");
        hasher.update(self.0);
        hasher.update(fingerprint.0);
        StoreKey(hasher.finalize().into())
    }

    /// A key from its 32 bytes, as a store that keeps them gives them back (and for tests
    /// of a store).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        StoreKey(bytes)
    }

    /// The key's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The keys a shared store gives back as bytes, those of 32 bytes.
    #[cfg(any(feature = "redis", feature = "postgres"))]
    pub(crate) fn all_from(keys: Vec<Vec<u8>>) -> Vec<StoreKey> {
        let key = |bytes: Vec<u8>| Some(StoreKey(bytes.try_into().ok()?));
        keys.into_iter().filter_map(key).collect()
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreKey(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// A hash of what a request asks for: its method, path, query and body. Requests with one
/// key and different fingerprints are different requests: they never share a response.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub(crate) fn of(method: &http::Method, uri: &http::Uri, body: &[u8]) -> Self {
        // The `EncodeKey` bytes of method, path and query, written into the digest as they
        // are made rather than gathered in a buffer first: this runs for every keyed request.
        fn part(hasher: &mut Sha256, bytes: &[u8]) {
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        }
        let mut hasher = Sha256::new();
        hasher.update(b"tower-coalesce fingerprint v1\0");
        part(&mut hasher, method.as_str().as_bytes());
        part(&mut hasher, uri.path().as_bytes());
        match uri.query() {
            None => hasher.update([0]),
            Some(query) => {
                hasher.update([1]);
                part(&mut hasher, query.as_bytes());
            }
        }
        hasher.update(body);
        Fingerprint(hasher.finalize().into())
    }

    /// The fingerprint of the requests a response to this one may also answer: this one
    /// itself, unless the response says with `Vary` that it depends on request headers;
    /// then this one extended by the values those headers had in `request`. `None` for
    /// `Vary: *`: such a response answers its own request only.
    ///
    /// A response is kept and shared under this, so that a caller whose `Vary`'d headers
    /// differ (another `Accept-Encoding`, say, with compression below the layer) never
    /// receives it.
    pub(crate) fn answered_by(self, response: &HeaderMap, request: &HeaderMap) -> Option<Self> {
        let mut varied = response.get_all(http::header::VARY).iter().peekable();
        if varied.peek().is_none() {
            return Some(self);
        }
        let mut hasher = Sha256::new();
        hasher.update(b"tower-coalesce vary v1\0");
        hasher.update(self.0);
        let names = varied
            .flat_map(|value| value.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|name| !name.is_empty());
        for name in names {
            if name == b"*" {
                return None;
            }
            let name = String::from_utf8_lossy(name).to_ascii_lowercase();
            // A name that is not a header name matches no header: it adds nothing but itself.
            hash_header(&mut hasher, &name, request);
        }
        Some(Fingerprint(hasher.finalize().into()))
    }

    /// This fingerprint extended by the values of the header `name` in `request`, as if
    /// the response varied on it.
    pub(crate) fn extended_by(self, name: &http::HeaderName, request: &HeaderMap) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"tower-coalesce header v1\0");
        hasher.update(self.0);
        hash_header(&mut hasher, name.as_str(), request);
        Fingerprint(hasher.finalize().into())
    }

    /// Rebuilds a fingerprint read back from a store.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Fingerprint(bytes)
    }

    /// The fingerprint's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Writes a lowercase header name and the values `request` has for it into `hasher`.
fn hash_header(hasher: &mut Sha256, name: &str, request: &HeaderMap) {
    hasher.update((name.len() as u64).to_be_bytes());
    hasher.update(name.as_bytes());
    let values = request.get_all(name);
    hasher.update((values.iter().count() as u64).to_be_bytes());
    for value in values {
        hasher.update((value.len() as u64).to_be_bytes());
        hasher.update(value.as_bytes());
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// A completed response as stored: status, version, headers and body, and the fingerprint
/// of the request that produced it.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
    fingerprint: Fingerprint,
}

impl StoredResponse {
    /// Assembles a stored response, for stores that read one back.
    pub fn new(
        status: StatusCode,
        version: Version,
        headers: HeaderMap,
        body: Bytes,
        fingerprint: Fingerprint,
    ) -> Self {
        StoredResponse {
            status,
            version,
            headers,
            body,
            fingerprint,
        }
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The HTTP version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The headers, for the HTTP cache to stamp `Date` before keeping it.
    #[cfg_attr(not(feature = "http-cache"), allow(dead_code))]
    pub(crate) fn headers_mut(&mut self) -> &mut HeaderMap {
        &mut self.headers
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The fingerprint of the request that produced the response.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Roughly the bytes the response holds, for byte budgets.
    pub fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 32)
            .sum();
        self.body.len() + headers + std::mem::size_of::<Self>()
    }
}

/// No store: flights are shared within this process only, and nothing is kept. The
/// default of [`HttpCoalesceLayer`](crate::http::HttpCoalesceLayer).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoStore;

impl Store for NoStore {
    async fn get(&self, _: &StoreKey) -> Result<Option<Arc<StoredResponse>>, BoxError> {
        Ok(None)
    }

    async fn put(&self, _: StoreKey, _: Arc<StoredResponse>, _: Duration) -> Result<(), BoxError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Fixed inputs, fixed digests: a change here changes every stored key, so that
    /// instances of two versions would no longer see each other's flights.
    #[test]
    fn store_keys_are_fixed_bytes_across_builds() {
        let header = http::HeaderValue::from_static("k-1");
        let scope = vec![(0usize, http::HeaderValue::from_static("Bearer a"))];
        let cases = [
            (
                StoreKey::new(None::<&()>, &header),
                "3346a62a5b4430f076d02bf1b8a5c4b68988cb58376789e4beb111f2ed15324c",
            ),
            (
                StoreKey::new(Some(&scope), &header),
                "14025d6cd17c342d283310378a8295c29b10ff37ef1d874c82038b30ea627c0a",
            ),
            (
                StoreKey::new(Some(&()), &"k-1".to_owned()),
                "a2fc70e55c70c049bad3270ff0180593b73d2f1670b2686ef5d8c34c9634a744",
            ),
            (
                StoreKey::new(None::<&()>, &(http::Method::POST, "/a".to_owned())),
                "4a3262ebeb146212086f885b6b449188c02bf86abc158ecbb4c5477712f194de",
            ),
        ];
        for (key, expected) in cases {
            assert_eq!(hex(key.as_bytes()), expected);
        }
        // The parts are delimited: moving bytes from the scope to the key changes the key.
        assert_ne!(
            StoreKey::new(Some(&"ab".to_owned()), &"c".to_owned()),
            StoreKey::new(Some(&"a".to_owned()), &"bc".to_owned()),
        );
    }

    #[test]
    fn a_varied_response_answers_only_requests_with_the_same_varied_headers() {
        let base = Fingerprint::from_bytes([9; 32]);
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.append(*name, http::HeaderValue::from_static(value));
            }
            map
        };
        let plain = headers(&[("content-type", "text/plain")]);
        let gzip = headers(&[("accept-encoding", "gzip"), ("x-other", "1")]);
        let gzip_too = headers(&[("accept-encoding", "gzip"), ("x-other", "2")]);
        let identity = headers(&[("accept-encoding", "identity")]);
        assert_eq!(base.answered_by(&plain, &gzip), Some(base));
        let varied = headers(&[("vary", "Accept-Encoding")]);
        let answered = base.answered_by(&varied, &gzip);
        assert_ne!(answered, Some(base));
        assert_eq!(
            answered,
            base.answered_by(&varied, &gzip_too),
            "other headers don't count"
        );
        assert_ne!(answered, base.answered_by(&varied, &identity));
        assert_ne!(answered, base.answered_by(&varied, &HeaderMap::new()));
        let two = headers(&[("vary", "origin"), ("vary", "accept-encoding")]);
        assert_ne!(base.answered_by(&two, &gzip), answered);
        assert_eq!(base.answered_by(&headers(&[("vary", "x, *")]), &gzip), None);
    }

    #[test]
    fn fingerprints_tell_method_path_query_and_body_apart() {
        let fp = |method: http::Method, uri: &str, body: &[u8]| {
            Fingerprint::of(&method, &uri.parse().unwrap(), body)
        };
        let base = fp(http::Method::POST, "/pay?amount=100", b"{}");
        assert_eq!(
            hex(base.as_bytes()),
            "a194a9ae34dca6fad8f90c20d304c22b5087ff242ac252a636489cbb842fb465"
        );
        assert_ne!(base, fp(http::Method::POST, "/pay?amount=200", b"{}"));
        assert_ne!(base, fp(http::Method::POST, "/pay", b"{}"));
        assert_ne!(
            fp(http::Method::POST, "/pay?", b""),
            fp(http::Method::POST, "/pay", b"")
        );
        assert_ne!(base, fp(http::Method::PUT, "/pay?amount=100", b"{}"));
        assert_ne!(base, fp(http::Method::POST, "/pay?amount=100", b"{ }"));
    }
}
