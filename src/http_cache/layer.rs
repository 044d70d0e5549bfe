use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use http::request::Parts;
use tower::Layer;

use super::near::{DEFAULT_NEAR_TTL, Near};
use super::purge::Purger;
use super::rules::{self, Rules};
use super::stage::CacheStage;
use crate::coalesce::MakeKey;
use crate::http::engine::{Config, Engine};
use crate::http::key::{self, MethodPathAndQuery};
use crate::http::policy::SharePredicate;
use crate::http::scope::{DefaultScope, Unscoped};
use crate::http::{DoNotShare, HttpCoalesce, Metrics};
use crate::store::{MemoryStore, Store};

/// The HTTP cache middleware: [`HttpCoalesce`] with the cache's stage, keyed by method,
/// path and query, for `GET` and `HEAD`.
pub type HttpCache<S, I = DefaultScope, St = MemoryStore> = HttpCoalesce<S, SafeMethods, I, St>;

/// Keys `GET` and `HEAD` requests by method, path and query; other methods have no key and
/// pass through the cache untouched.
#[derive(Debug, Clone)]
pub struct SafeMethods {
    inner: MethodPathAndQuery,
}

impl MakeKey<Parts> for SafeMethods {
    type Key = <MethodPathAndQuery as MakeKey<Parts>>::Key;

    fn make_key(&self, parts: &Parts) -> Option<Self::Key> {
        match parts.method {
            Method::GET | Method::HEAD => self.inner.make_key(parts),
            _ => None,
        }
    }
}

/// Applies [`HttpCache`] to an HTTP service: `GET` and `HEAD` responses are kept for as
/// long as their `Cache-Control` says, concurrent misses run once, and a stale response is
/// served at once while one refresh runs. See the [module docs](crate::http_cache).
///
/// Defaults, each changed by the method of the same name:
/// - [`scope`](Self::scope): [`DefaultScope`]: entries are kept apart per `Authorization`
///   and `Cookie` values; [`unscoped`](Self::unscoped) for one public cache;
/// - [`private`](Self::private): off, `Cache-Control: private` responses are not kept;
/// - [`default_ttl`](Self::default_ttl): none, responses that state no freshness are not
///   kept, nor given to the requests that waited on their flight (those run on their own);
/// - [`targeted_cache_control`](Self::targeted_cache_control): `CDN-Cache-Control`;
/// - [`max_ttl`](Self::max_ttl): 1 day;
/// - [`hit_for_pass`](Self::hit_for_pass): 2 minutes;
/// - [`store`](Self::store): a [`MemoryStore`] of this process, bounded by
///   [`memory_limit`](Self::memory_limit): 64 MiB of responses;
/// - [`body_limit`](Self::body_limit): 1 MiB, larger responses are neither shared nor kept.
#[derive(Clone)]
pub struct HttpCacheLayer<I = DefaultScope, St = MemoryStore> {
    engine: Engine<SafeMethods, I, St>,
    rules: Rules,
    /// The engine's stage, as itself: purgers hold it.
    stage: Arc<CacheStage>,
    /// The near cache's byte limit and longest TTL, if there is one.
    near: Option<(usize, Duration)>,
    near_cache: Option<Arc<Near>>,
}

/// The default of [`HttpCacheLayer::max_ttl`]: 1 day.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// The default of [`HttpCacheLayer::hit_for_pass`]: 2 minutes, as Varnish.
pub const DEFAULT_HIT_FOR_PASS: Duration = Duration::from_secs(120);

impl HttpCacheLayer {
    /// A cache with the defaults listed above.
    pub fn new() -> Self {
        let rules = Rules {
            private: false,
            default_ttl: None,
            max_ttl: DEFAULT_MAX_TTL,
            hit_for_pass: DEFAULT_HIT_FOR_PASS,
            targeted: rules::default_targeted(),
        };
        let config = Config {
            has_store: true,
            // A refresh whose callers have all gone still completes and refills the entry.
            finish_abandoned: true,
            name: "the cache layer",
            ..Config::default()
        };
        let safe = SafeMethods {
            inner: key::method_path_and_query(),
        };
        let engine = Engine::new(
            safe,
            DefaultScope::default(),
            MemoryStore::default(),
            config,
        );
        let stage = Arc::new(CacheStage::new(rules.clone(), None));
        HttpCacheLayer {
            engine,
            rules,
            stage,
            near: None,
            near_cache: None,
        }
        .with_rules()
    }
}

impl Default for HttpCacheLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<I, St> HttpCacheLayer<I, St> {
    /// Rebuilds the cache's state and share predicate after a change of rules.
    fn with_rules(mut self) -> Self {
        let private = self.rules.private;
        // Personal responses are never shared between callers: each gets its own, and the key
        // goes on hit-for-pass. `private` ones are, with `private(true)`: the scope is then
        // per identity. Judged by the directives the cache follows (a targeted field's, if
        // the response has one).
        let rules = self.rules.clone();
        self.engine.config.share = SharePredicate::custom(move |parts| {
            let (directives, _) = rules.directives(&parts.headers);
            parts.extensions.get::<DoNotShare>().is_none()
                && !rules.personal(parts.status, &parts.headers, &directives)
        });
        // RFC 9111 §3.5 applies to sharing a flight as much as to keeping its response:
        // unless the scope is one identity (`private`), a response to a request with
        // `Authorization` that doesn't say it may be shared answers only callers with the
        // same `Authorization`; the others wait for a run of their own.
        self.engine.config.authorized_shared_if =
            (!private).then_some(rules::shared_when_authorized);
        self.stage = Arc::new(CacheStage::new(self.rules.clone(), self.near_cache.clone()));
        self.engine.stage = Some(self.stage.clone());
        self
    }

    /// Keeps `Cache-Control: private` responses, and responses to requests with
    /// `Authorization` that don't say `public`: turn it on only with a scope that is one
    /// identity (the default scope, by `Authorization` and `Cookie`, or your own), never
    /// with [`unscoped`](Self::unscoped).
    pub fn private(mut self, keep: bool) -> Self {
        self.rules.private = keep;
        self.with_rules()
    }

    /// The targeted cache-control fields this cache obeys (RFC 9213), by precedence: the
    /// first of them a response carries, if it is a valid Structured Fields dictionary,
    /// replaces the response's `Cache-Control` and `Expires` for this cache (and only for
    /// it: the field goes on to the client as it came). Default: `CDN-Cache-Control`, so
    /// that an origin can give this cache a longer freshness than browsers get; `[]` to
    /// read `Cache-Control` only.
    ///
    /// ```
    /// use http::HeaderName;
    /// use tower_coalesce::http_cache::HttpCacheLayer;
    ///
    /// // `Acme-Cache-Control` for this cache, else `CDN-Cache-Control`, else `Cache-Control`.
    /// let cache = HttpCacheLayer::new().targeted_cache_control([
    ///     HeaderName::from_static("acme-cache-control"),
    ///     HeaderName::from_static("cdn-cache-control"),
    /// ]);
    /// ```
    pub fn targeted_cache_control(
        mut self,
        fields: impl IntoIterator<Item = http::HeaderName>,
    ) -> Self {
        self.rules.targeted = fields.into_iter().collect();
        self.with_rules()
    }

    /// Keeps responses that state no freshness (no `max-age`, `s-maxage` or `Expires`) for
    /// `ttl`. Off by default: a response that says nothing is not kept.
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.rules.default_ttl = Some(ttl);
        self.with_rules()
    }

    /// The longest a response is fresh, or stale, whatever it says. 1 day by default.
    pub fn max_ttl(mut self, ttl: Duration) -> Self {
        self.rules.max_ttl = ttl;
        self.with_rules()
    }

    /// How long requests for a key whose response was personal (`Set-Cookie`, `private`,
    /// `no-store`) go straight to the service, without waiting on each other's flights
    /// (and the bound of hit-for-miss, 10 s, for a response the cache would not keep).
    pub fn hit_for_pass(mut self, window: Duration) -> Self {
        self.rules.hit_for_pass = window;
        self.with_rules()
    }

    /// The largest response body, in bytes, that is shared and kept. 1 MiB by default; a
    /// larger one goes to its own caller only.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.engine.config.body_limit = bytes;
        self
    }

    /// Adds the `coalesce-role` header to responses of the flights (not to cached ones).
    pub fn role_header(mut self, enable: bool) -> Self {
        self.engine.config.role_header = enable;
        self
    }

    /// The counters of this cache: [`Metrics::cache_hits`] (of which
    /// [`Metrics::cache_near_hits`]), [`Metrics::cache_stale`], [`Metrics::cache_refreshes`],
    /// [`Metrics::cache_purged`] and the flights' own.
    pub fn metrics(&self) -> Metrics {
        self.engine.metrics.clone()
    }

    /// Labels what this cache exports through the `metrics` facade with `route`; see
    /// [`HttpCoalesceLayer::metrics_route`](crate::http::HttpCoalesceLayer::metrics_route).
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics_route(mut self, route: &'static str) -> Self {
        self.engine.metrics = self.engine.metrics.with_route(route);
        self
    }

    /// Keeps entries apart by another identity; see [`http::scope`](crate::http::scope).
    pub fn scope<NewScope>(self, scope: NewScope) -> HttpCacheLayer<NewScope, St> {
        HttpCacheLayer {
            engine: self.engine.with_scope(scope),
            rules: self.rules,
            stage: self.stage,
            near: self.near,
            near_cache: self.near_cache,
        }
    }

    /// One cache for every caller, **whoever they are**: for public data only. Requests
    /// with `Authorization` still get only responses that say `public`, `s-maxage` or
    /// `must-revalidate` from it (RFC 9111 §3.5), unless [`private`](Self::private) is on,
    /// which you must not do here.
    pub fn unscoped(self) -> HttpCacheLayer<Unscoped, St> {
        self.scope(Unscoped)
    }

    /// Keeps responses in `store` instead of this process's memory: with a store that
    /// several instances share ([`RedisStore`](crate::redis::RedisStore), feature `redis`),
    /// a response one instance fetched answers them all, a miss runs on one instance while
    /// the others wait for it, and a stale entry is refreshed by one instance while every
    /// instance serves it stale. See [Across instances](crate::http_cache#across-instances).
    pub fn store<St2: Store>(self, store: St2) -> HttpCacheLayer<I, St2> {
        HttpCacheLayer {
            engine: self.engine.with_store(store),
            rules: self.rules,
            stage: self.stage,
            near: self.near,
            near_cache: self.near_cache,
        }
        .with_near()
    }
}

impl<I, St: Store> HttpCacheLayer<I, St> {
    /// Keeps copies of the shared store's fresh entries in this process's memory, up to
    /// `bytes` (least recently used out first), so that a hit costs no round trip to the
    /// store: a near cache in front of [`store`](Self::store). See
    /// [Near cache](crate::http_cache#near-cache) for how the copies stay in sync.
    ///
    /// A copy is kept for as long as its entry stays fresh, and at most
    /// [`near_cache_ttl`](Self::near_cache_ttl) (60 s by default); stale entries are
    /// always read from the store.
    ///
    /// Off by default. The near cache subscribes to the store's changes on its first
    /// lookup, and drops whatever it copied before the store confirms the subscription.
    pub fn near_cache(mut self, bytes: usize) -> Self {
        let ttl = self.near.map_or(DEFAULT_NEAR_TTL, |(_, ttl)| ttl);
        self.near = Some((bytes, ttl));
        self.with_near()
    }

    /// The longest a copy stays in the [near cache](Self::near_cache), however long its
    /// entry is fresh: the bound on how stale a copy can be served if the messages from
    /// the other instances stop without the connection noticing. 60 s by default.
    pub fn near_cache_ttl(mut self, ttl: Duration) -> Self {
        if let Some((_, near_ttl)) = &mut self.near {
            *near_ttl = ttl;
        } else {
            self.near = Some((super::near::DEFAULT_NEAR_BYTES, ttl));
        }
        self.with_near()
    }

    /// Purges this cache's entries by URI or tag; see [`Purger`]. Take it once the layer is
    /// configured: it acts on the store and near cache of the layer as it is now.
    pub fn purger(&self) -> Purger {
        Purger {
            stage: self.stage.clone(),
            store: Arc::new(self.engine.store.clone()),
            metrics: self.engine.metrics.clone(),
        }
    }

    /// Makes the near cache anew (for the current store) if there is one.
    fn with_near(mut self) -> Self {
        self.near_cache = self.near.map(|(bytes, ttl)| {
            let store = self.engine.store.clone();
            Near::new(bytes, ttl, Some(Box::new(move || store.changes())))
        });
        self.with_rules()
    }
}

impl<I> HttpCacheLayer<I, MemoryStore> {
    /// The bytes of responses kept at most (least recently used out first). 64 MiB by
    /// default.
    pub fn memory_limit(mut self, bytes: usize) -> Self {
        self.engine.store = MemoryStore::with_limit(bytes);
        self.with_near()
    }
}

impl<S, I: Clone, St: Clone> Layer<S> for HttpCacheLayer<I, St> {
    type Service = HttpCache<S, I, St>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpCoalesce::from_engine(inner, self.engine.clone())
    }
}

impl<I, St> fmt::Debug for HttpCacheLayer<I, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCacheLayer")
            .field("engine", &self.engine)
            .field("rules", &self.rules)
            .field("near_cache", &self.near_cache)
            .finish()
    }
}
