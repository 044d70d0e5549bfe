/// `get_ref`, `get_mut` and `into_inner` for a middleware whose wrapped service is the
/// field `inner` (after tower-http's macro of the same name).
macro_rules! define_inner_service_accessors {
    () => {
        /// Gets a reference to the underlying service.
        pub fn get_ref(&self) -> &S {
            &self.inner
        }

        /// Gets a mutable reference to the underlying service.
        pub fn get_mut(&mut self) -> &mut S {
            &mut self.inner
        }

        /// Consumes `self`, returning the underlying service.
        pub fn into_inner(self) -> S {
            self.inner
        }
    };
}

/// `with_lease` and `with_poll_interval` for a store shared by several instances, whose
/// fields `lease` and `poll_interval` say how it coordinates them (Redis, PostgreSQL).
#[cfg(any(feature = "redis", feature = "postgres"))]
macro_rules! define_lease_setters {
    () => {
        /// How long a lease lasts without renewal: the longest an instance's death holds up
        /// the key's other callers (plus one poll interval). It is renewed every third of this.
        ///
        /// # Panics
        ///
        /// If `lease` is under 3 ms, too short to renew.
        pub fn with_lease(mut self, lease: std::time::Duration) -> Self {
            assert!(
                lease >= std::time::Duration::from_millis(3),
                "a lease of {lease:?} can't be renewed"
            );
            self.lease = lease;
            self
        }

        /// How long a waiting instance waits for a release message before it looks on its own.
        pub fn with_poll_interval(mut self, interval: std::time::Duration) -> Self {
            self.poll_interval = interval;
            self
        }
    };
}

/// The settings that [`HttpCoalesceLayer`](crate::http::HttpCoalesceLayer) and
/// [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer) share: both configure one
/// engine, held in the field `engine`, and differ only in their defaults.
#[cfg(feature = "http")]
macro_rules! define_engine_setters {
    () => {
        /// The largest response body, in bytes, that a flight buffers to share (and to
        /// keep, with [`replay`](Self::replay)). 1 MiB by default.
        ///
        /// A flight whose response body is larger (by its size hint, or once that many
        /// bytes have arrived) stops buffering. Its leader still receives the whole
        /// response: the bytes read so far, then the rest of the body as it streams. Each
        /// follower receives `503 Service Unavailable` with `Retry-After: 1` and a
        /// problem+json body, [`Metrics::bodies_over_limit`](crate::http::Metrics::bodies_over_limit)
        /// counts the flight, and nothing is kept. Nobody receives a truncated body.
        pub fn body_limit(mut self, bytes: usize) -> Self {
            self.engine.config.body_limit = bytes;
            self
        }

        /// The largest request body, in bytes, that the layer reads for a keyed request
        /// (to read a [body key](crate::http::key::json), and to tell apart requests whose
        /// bodies differ). 1 MiB by default.
        ///
        /// A larger body gets `413 Payload Too Large` (problem+json) and never reaches the
        /// inner service: at once if its `Content-Length` says so, else as soon as the
        /// limit is crossed. Requests without a key are never read.
        pub fn request_body_limit(mut self, bytes: usize) -> Self {
            self.engine.config.request_body_limit = bytes;
            self
        }

        /// Whether requests without a key are refused rather than passed through.
        ///
        /// When on, a request whose key maker returns `None` (for a header key, also a
        /// repeated, empty, over-long or non-ASCII header; for a body key, a body without
        /// the field) gets `400 Bad Request` with a problem+json body (RFC 9457), and never
        /// reaches the inner service. Either way,
        /// [`Metrics::requests_without_key`](crate::http::Metrics::requests_without_key)
        /// counts it, and the first one is logged at `WARN`: on a route where every
        /// request has a key, that means the key is read from the wrong place.
        pub fn require_key(mut self, require: bool) -> Self {
            self.engine.config.require_key = require;
            self
        }

        /// Whether responses to keyed requests carry a `coalesce-role: leader`,
        /// `follower` or `own` header. The [`Role`](crate::http::Role) extension is always
        /// set.
        pub fn role_header(mut self, enable: bool) -> Self {
            self.engine.config.role_header = enable;
            self
        }

        /// What a request does when a flight of the *same* request (key, scope and
        /// fingerprint) is running: wait and share its response
        /// ([`OnDuplicate::Share`](crate::http::OnDuplicate::Share), the default), get
        /// `409 Conflict` at once ([`OnDuplicate::Conflict`](crate::http::OnDuplicate::Conflict)),
        /// or call the inner service itself
        /// ([`OnDuplicate::PassThrough`](crate::http::OnDuplicate::PassThrough), for
        /// read-only routes only).
        ///
        /// ```
        /// use tower_coalesce::http::{HttpCoalesceLayer, OnDuplicate, key};
        ///
        /// // Clients of this route retry on 409 rather than wait.
        /// let layer = HttpCoalesceLayer::new(key::idempotency_key())
        ///     .on_duplicate(OnDuplicate::Conflict);
        /// ```
        pub fn on_duplicate(mut self, policy: $crate::http::OnDuplicate) -> Self {
            self.engine.config.on_duplicate = policy;
            self
        }

        /// What a request does when a flight for its key is running for a *different*
        /// request (another method, path, query or body): wait for it to end and then run
        /// ([`OnMismatch::Queue`](crate::http::OnMismatch::Queue)), or get `422`
        /// ([`OnMismatch::Reject`](crate::http::OnMismatch::Reject): at once, or, with
        /// [`replay`](Self::replay), once that flight ended, unless what is kept then is its
        /// own answer). With `replay`, it also decides what a request whose key has a kept
        /// response of another request gets: a run of its own, which then is the one kept
        /// (`Queue`), or `422` (`Reject`).
        ///
        /// ```
        /// use tower_coalesce::http::{HttpCoalesceLayer, OnMismatch, key};
        ///
        /// let layer = HttpCoalesceLayer::new(key::json("/id")).on_mismatch(OnMismatch::Reject);
        /// ```
        pub fn on_mismatch(mut self, policy: $crate::http::OnMismatch) -> Self {
            self.engine.config.on_mismatch = policy;
            self
        }

        /// How long a follower waits for its flight at most (also while it waits for a
        /// different request's turn, and for another instance that runs the key). When it
        /// has waited that long, it leaves the flight (which goes on for the others) and
        /// gets the [`fallback`](Self::fallback). No limit by default.
        ///
        /// ```
        /// use std::time::Duration;
        /// use tower_coalesce::http::{Fallback, HttpCoalesceLayer, key};
        ///
        /// // A read-only report: after 2 s of waiting, compute it yourself.
        /// let layer = HttpCoalesceLayer::new(key::method_path_and_query())
        ///     .follower_timeout(Duration::from_secs(2))
        ///     .fallback(Fallback::PassThrough);
        /// ```
        pub fn follower_timeout(mut self, timeout: std::time::Duration) -> Self {
            self.engine.config.follower_timeout = Some(timeout);
            self
        }

        /// How many followers may wait for one flight, the leader not counted. A caller
        /// that would be one more gets the [`fallback`](Self::fallback) at once, without
        /// joining the flight: the layer sheds load rather than queue without bound. No
        /// limit by default.
        ///
        /// ```
        /// use tower_coalesce::http::{HttpCoalesceLayer, key};
        ///
        /// let layer = HttpCoalesceLayer::new(key::idempotency_key()).max_followers(100);
        /// ```
        pub fn max_followers(mut self, max: usize) -> Self {
            self.engine.config.max_followers = Some(max);
            self
        }

        /// What a follower gets when it stops waiting (wait timeout) or is turned away
        /// (follower cap): `503` with `Retry-After: 1`
        /// ([`Fallback::ServiceUnavailable`](crate::http::Fallback::ServiceUnavailable), the
        /// default), or a call of its own
        /// ([`Fallback::PassThrough`](crate::http::Fallback::PassThrough), for read-only
        /// routes).
        pub fn fallback(mut self, fallback: $crate::http::Fallback) -> Self {
            self.engine.config.fallback = fallback;
            self
        }

        /// Decides from the response head whether a flight's response may be shared. A
        /// response it refuses goes to the leader only, streamed as it is, and is not kept;
        /// each follower then calls the inner service itself (see
        /// [`unshared`](Self::unshared)). By default only responses with the
        /// [`DoNotShare`](crate::http::DoNotShare) extension are refused;
        /// [`policy::not_private`](crate::http::policy::not_private) also refuses
        /// `Cache-Control: private` and `no-store`.
        ///
        /// ```
        /// use tower_coalesce::http::{HttpCoalesceLayer, key, policy};
        ///
        /// let layer = HttpCoalesceLayer::new(key::method_and_path()).share_when(policy::not_private);
        /// ```
        pub fn share_when<P>(mut self, predicate: P) -> Self
        where
            P: Fn(&http::response::Parts) -> bool + Send + Sync + 'static,
        {
            self.engine.config.share = $crate::http::policy::SharePredicate::custom(predicate);
            self
        }

        /// Whether the followers of a flight whose response is not shared call the inner
        /// service all at once ([`Unshared::Concurrently`](crate::http::Unshared::Concurrently),
        /// the default) or one after another
        /// ([`Unshared::OneAfterAnother`](crate::http::Unshared::OneAfterAnother)).
        pub fn unshared(mut self, unshared: $crate::http::Unshared) -> Self {
            self.engine.config.unshared = unshared;
            self
        }

        /// Keeps each completed response in the [store](Self::store) for `ttl`, and
        /// answers later requests with the same key, scope and fingerprint with it
        /// (`Idempotent-Replayed: true`) without calling the inner service.
        ///
        /// What is kept: `2xx`, `3xx` and `4xx` responses whose body ended within the
        /// [body limit](Self::body_limit), without trailers or an error. Not kept, so that
        /// a retry runs again: `5xx`, errors of the inner service, responses not shared,
        /// flights whose callers all left before the response (unless
        /// [`finish_abandoned`](Self::finish_abandoned)).
        ///
        /// Without it, nothing is kept for later requests: a shared store only hands a
        /// response to the instances waiting for it (for the
        /// [handover window](Self::handover)).
        pub fn replay(mut self, ttl: std::time::Duration) -> Self {
            self.engine.config.replay = Some(ttl);
            self
        }

        /// How long a response stays in a store shared by several instances, without
        /// [`replay`](Self::replay), for the instances that waited for it to read it. 2 s by
        /// default: above a store's poll interval, so that an instance that missed the
        /// release message still finds it. A request that arrives on any instance within
        /// this window after the response was stored gets it replayed.
        pub fn handover(mut self, window: std::time::Duration) -> Self {
            self.engine.config.handover = window;
            self
        }

        /// Whether a flight whose callers have all gone (clients that timed out) runs to
        /// completion on the runtime, keeps its response (with [`replay`](Self::replay))
        /// and releases its lease, instead of being dropped where it stands. A retry is
        /// then replayed instead of running a half-done create again.
        ///
        /// On for [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer); off for
        /// `HttpCoalesceLayer`, whose flights are dropped when nobody waits. When on, each
        /// flight runs on a task of its own (`tokio::spawn`): serve from a tokio runtime, as
        /// axum and hyper-util do.
        pub fn finish_abandoned(mut self, finish: bool) -> Self {
            self.engine.config.finish_abandoned = finish;
            self
        }

        /// What a request does when the store fails or times out: run anyway
        /// ([`OnStoreError::FailOpen`](crate::http::OnStoreError::FailOpen), the default)
        /// or answer `503`
        /// ([`OnStoreError::FailClosed`](crate::http::OnStoreError::FailClosed)).
        pub fn on_store_error(mut self, policy: $crate::http::OnStoreError) -> Self {
            self.engine.config.on_store_error = policy;
            self
        }

        /// The counters of every service this layer builds.
        pub fn metrics(&self) -> $crate::http::Metrics {
            self.engine.metrics.clone()
        }

        /// Labels everything this layer exports through the `metrics` facade with
        /// `route="<route>"`: the route it serves, as your router names it
        /// (`"/orders/{id}"`), never a raw path (one series per id would exhaust the
        /// metrics store). Put the layer on that route (axum's `route_layer`, or a
        /// `MethodRouter::layer`) so that it sees that route's requests only. See
        /// [`Metrics`](crate::http::Metrics#exported-through-the-metrics-facade).
        #[cfg(feature = "metrics")]
        #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
        pub fn metrics_route(mut self, route: &'static str) -> Self {
            self.engine.metrics = self.engine.metrics.with_route(route);
            self
        }
    };
}
