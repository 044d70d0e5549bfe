//! The cache's [`Stage`] of the engine: before a request joins its flight, a kept response
//! answers it (fresh, or stale while one refresh runs); otherwise the request goes through
//! the flight as any other, the flight keeps its response by the rules, and the answer gets
//! its `Cache-Status` (or becomes a `304`, or a stale response in place of an error).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use dashmap::DashMap;
use futures::future::BoxFuture;
use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Response, StatusCode, Uri};

use super::near::Near;
use super::rules::{self, Asked, Conditional, Rules, Verdict};
use crate::BoxError;
use crate::http::Metrics;
use crate::http::Role;
use crate::http::engine;
use crate::http::stage::{Admit, After, Answered, Lookup, Ran, Serves, Stage, Ticket};
use crate::single_flight::{Freshness, Lifetimes};
use crate::store::Lease;
use crate::store::{Fingerprint, StoreKey, StoredResponse};

/// The cache's stage: its rules, the keys on hit-for-pass, the keys being refreshed in
/// the background, the variants kept per key, and the near cache, if any.
pub(crate) struct CacheStage {
    pub(crate) rules: Rules,
    passes: moka::sync::Cache<StoreKey, ()>,
    /// Keys whose last response the cache would not keep (no freshness, `no-cache`, ...):
    /// for [`HIT_FOR_MISS`] their requests run on their own instead of queueing behind a
    /// flight whose response they could not be given (hit-for-miss).
    misses: moka::sync::Cache<StoreKey, ()>,
    refreshing: Arc<DashMap<StoreKey, ()>>,
    /// The fingerprints of the variants this instance kept per key (a response that
    /// varies is kept once per variant, up to [`MAX_VARIANTS`]).
    variants: moka::sync::Cache<StoreKey, Arc<Mutex<Vec<Fingerprint>>>>,
    pub(crate) near: Option<Arc<Near>>,
}

/// How long a key whose response the cache would not keep runs its requests on their own
/// (hit-for-miss), at most [`hit_for_pass`](super::HttpCacheLayer::hit_for_pass): short,
/// because what runs on its own is not kept, and the key's next response may be one to
/// keep.
pub(crate) const HIT_FOR_MISS: Duration = Duration::from_secs(10);

/// The most variants of one key's response kept at once (by this instance); a response
/// of another variant past it is served but not kept, until one of them expires.
pub(crate) const MAX_VARIANTS: usize = 8;

impl CacheStage {
    pub(crate) fn new(rules: Rules, near: Option<Arc<Near>>) -> Self {
        CacheStage {
            passes: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(rules.hit_for_pass.max(std::time::Duration::from_millis(1)))
                .build(),
            misses: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(
                    HIT_FOR_MISS
                        .min(rules.hit_for_pass)
                        .max(std::time::Duration::from_millis(1)),
                )
                .build(),
            refreshing: Arc::default(),
            variants: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(rules.max_ttl.max(std::time::Duration::from_millis(1)))
                .build(),
            rules,
            near,
        }
    }
}

impl std::fmt::Debug for CacheStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheStage")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// How the cache came by an answer, as RFC 9211's `Cache-Status` says it.
#[derive(Debug, Clone, Copy)]
enum Status {
    Hit,
    /// Served stale: within `stale-while-revalidate`, or in place of an error.
    Stale(&'static str),
    /// Forwarded to the service (through the flight), with RFC 9211's reason.
    Forward(&'static str),
}

fn cache_status(status: Status, collapsed: bool, ttl: Option<i64>) -> HeaderValue {
    use std::fmt::Write;
    let mut value = String::with_capacity(64);
    value.push_str("tower-coalesce");
    match status {
        Status::Hit => value.push_str("; hit"),
        Status::Stale(detail) => {
            value.push_str("; hit; detail=");
            value.push_str(detail);
        }
        Status::Forward(reason) => {
            value.push_str("; fwd=");
            value.push_str(reason);
        }
    }
    if collapsed {
        value.push_str("; collapsed");
    }
    if let Some(ttl) = ttl {
        let _ = write!(value, "; ttl={ttl}");
    }
    HeaderValue::try_from(value).expect("ASCII tokens")
}

/// What the cache remembers of a request between admitting it and its answer.
struct CacheTicket {
    /// RFC 9211's reason for forwarding it.
    reason: &'static str,
    /// Ran on its own (no-store, hit-for-pass): its validators went to the service.
    own: bool,
    /// The validators it sent, which the cache answers.
    conditional: Conditional,
    /// The stale entry that answers if the run fails, within `stale-if-error`, and its
    /// freshness.
    fallback: Option<(Arc<StoredResponse>, Duration)>,
}

impl Stage for CacheStage {
    fn admit<'a>(
        &'a self,
        store: &'a dyn Lookup,
        key: &'a StoreKey,
        fingerprint: Fingerprint,
        headers: &'a mut HeaderMap,
        metrics: &'a Metrics,
    ) -> BoxFuture<'a, Admit> {
        Box::pin(self.admit(store, key, fingerprint, headers, metrics))
    }

    fn lease<'a>(
        &'a self,
        store: &'a dyn Lookup,
        key: &'a StoreKey,
        fingerprint: Fingerprint,
        asked: &'a HeaderMap,
        waited: bool,
        metrics: &'a Metrics,
    ) -> BoxFuture<'a, Result<Lease, BoxError>> {
        Box::pin(self.lease(store, key, fingerprint, asked, waited, metrics))
    }

    fn keep(
        &self,
        key: &StoreKey,
        ran: Option<Ran<'_>>,
        asked: &HeaderMap,
    ) -> Option<(Arc<StoredResponse>, Duration)> {
        keepable(self, key, ran?, asked)
    }

    fn kept<'a>(
        &'a self,
        store: &'a dyn Lookup,
        key: &'a StoreKey,
        kept: &'a (Arc<StoredResponse>, Duration),
        target: &'a Uri,
        metrics: &'a Metrics,
    ) -> BoxFuture<'a, ()> {
        Box::pin(self.kept(store, key, kept, target, metrics))
    }

    fn serves(&self, status: StatusCode, response: &HeaderMap, follower: &HeaderMap) -> Serves {
        let fresh = |verdict| match verdict {
            Verdict::Store(lifetimes) => rules::age(response, SystemTime::now()) < lifetimes.fresh,
            _ => false,
        };
        if fresh(self.rules.verdict(status, response, follower)) {
            Serves::Yes
        } else if follower.contains_key(http::header::AUTHORIZATION)
            && fresh(self.rules.verdict(status, response, &HeaderMap::new()))
        {
            // §3.5: fresh for anyone but a request with `Authorization`, whose own response
            // its own flight makes (and shares with the callers of its `Authorization`).
            Serves::Another
        } else {
            Serves::Own
        }
    }

    fn freshen<'a>(
        &'a self,
        store: &'a dyn Lookup,
        key: &'a StoreKey,
        fingerprint: Fingerprint,
        asked: &'a HeaderMap,
        not_modified: &'a http::response::Parts,
    ) -> BoxFuture<'a, Option<Response<Bytes>>> {
        Box::pin(async move {
            let found = self.find(store, key, fingerprint, asked).await;
            let Ok(Found::Answers { kept, .. }) = found else {
                return None;
            };
            let headers = rules::freshened(kept.headers(), &not_modified.headers)?;
            let mut response = Response::new(kept.body().clone());
            *response.status_mut() = kept.status();
            *response.version_mut() = kept.version();
            *response.headers_mut() = headers;
            tracing::debug!("a stale entry revalidated: 304 from the service");
            Some(response)
        })
    }

    fn passed<'a>(
        &'a self,
        store: &'a dyn Lookup,
        request: &'a Parts,
        answer: Answered<'a>,
        metrics: &'a Metrics,
    ) -> Option<BoxFuture<'a, ()>> {
        let targets = super::purge::invalidated(request, answer.status, answer.headers)?;
        Some(Box::pin(async move {
            for target in targets {
                if let Err(error) = super::purge::purge_uri(self, store, &target, metrics).await {
                    metrics.store_error();
                    tracing::warn!(%error, "invalidating a cached URI failed");
                }
            }
        }))
    }

    fn answered(&self, ticket: Ticket, answer: Option<Answered<'_>>, metrics: &Metrics) -> After {
        let ticket = ticket
            .downcast::<CacheTicket>()
            .expect("the cache's stage reads its own tickets");
        self.answered(*ticket, answer, metrics)
    }

    fn stands_in(&self, ticket: &Ticket) -> bool {
        ticket
            .downcast_ref::<CacheTicket>()
            .is_some_and(|ticket| ticket.fallback.is_some())
    }

    fn replays(&self) -> bool {
        // A kept entry that answers a flight is another instance's run, not a replay.
        false
    }
}

impl CacheStage {
    /// A keyed `GET` or `HEAD`: answered from the kept entry if it is fresh (or stale
    /// within `stale-while-revalidate`, while the request refreshes it in the background),
    /// else through its flight.
    async fn admit(
        &self,
        store: &dyn Lookup,
        key: &StoreKey,
        fingerprint: Fingerprint,
        headers: &mut HeaderMap,
        metrics: &Metrics,
    ) -> Admit {
        let asked = Asked::of(headers);
        let pass = self.passes.contains_key(key) || self.misses.contains_key(key);
        if asked.no_store || pass {
            let reason = if asked.no_store {
                "request"
            } else {
                "uri-miss"
            };
            return Admit::Own(ticket(reason, true, Conditional::default(), None));
        }
        let conditional = Conditional::take(headers);
        let (mut reason, mut fallback) = ("miss", None);
        if asked.revalidate {
            return Admit::Flight(ticket("request", false, conditional, None));
        }
        match self.find(store, key, fingerprint, headers).await {
            Ok(Found::Answers { kept, at, epoch }) => {
                let (age, lifetimes) = judge(self, &kept, headers, SystemTime::now());
                let served =
                    |status| from_store(&kept, age, lifetimes.fresh, status, &conditional, metrics);
                match lifetimes.state(age) {
                    Freshness::Fresh => {
                        match (&self.near, epoch) {
                            (Some(near), Some(epoch)) => {
                                near.fill(&at, kept.clone(), lifetimes.fresh - age, epoch);
                            }
                            (Some(_), None) => metrics.cache_near_hit(),
                            (None, _) => {}
                        }
                        return Admit::Answer(served(Status::Hit));
                    }
                    Freshness::Revalidate => {
                        let answer = served(Status::Stale("stale-while-revalidate"));
                        rules::validate(&kept, headers);
                        // One refresh at a time per key: the others are answered stale.
                        if self.refreshing.insert(key.clone(), ()).is_some() {
                            return Admit::Answer(answer);
                        }
                        metrics.cache_refreshed();
                        let refreshing = Refreshing(self.refreshing.clone(), key.clone());
                        return Admit::AnswerAndRefresh {
                            answer,
                            refreshing: Box::new(refreshing),
                        };
                    }
                    Freshness::IfError => {
                        reason = "stale";
                        rules::validate(&kept, headers);
                        fallback = Some((kept, lifetimes.fresh));
                    }
                    Freshness::Expired => {
                        reason = "stale";
                        rules::validate(&kept, headers);
                    }
                }
            }
            Ok(Found::OtherVariant) => reason = "vary-miss",
            Ok(Found::Nothing) => {}
            Err(error) => {
                metrics.store_error();
                tracing::warn!(%error, "cache lookup failed; running the request");
            }
        }
        Admit::Flight(ticket(reason, false, conditional, fallback))
    }

    /// The answer of a request the cache forwarded: a stale entry in place of a failure
    /// (within `stale-if-error`), a `304` for validators that match, and `Cache-Status`.
    fn answered(
        &self,
        ticket: CacheTicket,
        answer: Option<Answered<'_>>,
        metrics: &Metrics,
    ) -> After {
        let failed = answer
            .as_ref()
            .is_none_or(|answer| answer.status.is_server_error());
        if let (true, Some((kept, fresh))) = (failed, &ticket.fallback) {
            let age = rules::age(kept.headers(), SystemTime::now());
            tracing::debug!("serving a stale response in place of an error");
            let status = Status::Stale("stale-if-error");
            return After::Replace(from_store(
                kept,
                age,
                *fresh,
                status,
                &ticket.conditional,
                metrics,
            ));
        }
        let forwarded = |collapsed| cache_status(Status::Forward(ticket.reason), collapsed, None);
        let Some(answer) = answer else {
            return After::Keep(HeaderMap::new());
        };
        let collapsed = !ticket.own && answer.role == Some(Role::Follower);
        if !ticket.own
            && ticket
                .conditional
                .not_modified(answer.status, answer.headers)
        {
            let mut response = not_modified(answer.headers);
            response
                .headers_mut()
                .insert(CACHE_STATUS, forwarded(collapsed));
            return After::Replace(response);
        }
        let mut headers = HeaderMap::new();
        headers.insert(CACHE_STATUS, forwarded(collapsed));
        After::Keep(headers)
    }
}

fn ticket(
    reason: &'static str,
    own: bool,
    conditional: Conditional,
    fallback: Option<(Arc<StoredResponse>, Duration)>,
) -> Ticket {
    Box::new(CacheTicket {
        reason,
        own,
        conditional,
        fallback,
    })
}

/// How old a kept response is, and how long it may be served, to a request with the
/// headers `asked`.
fn judge(
    cache: &CacheStage,
    kept: &StoredResponse,
    asked: &HeaderMap,
    now: SystemTime,
) -> (Duration, Lifetimes) {
    let age = rules::age(kept.headers(), now);
    let lifetimes = match cache.rules.verdict(kept.status(), kept.headers(), asked) {
        Verdict::Store(lifetimes) => lifetimes,
        // Kept under other rules (a request that was allowed what this one isn't).
        _ => Lifetimes::default(),
    };
    (age, lifetimes)
}

impl CacheStage {
    /// The lease of a cache flight, with a store shared by several instances: taken
    /// whatever is kept (the entry may be stale: that is why the flight runs), unless the
    /// key turns out to have been refreshed by another instance: then that entry answers
    /// ([`Lease::Stored`]). So one instance refreshes a key, and the others wait for it or
    /// serve the stale entry meanwhile.
    ///
    /// The key is looked at again after waiting for another instance (`waited`), before
    /// the lease, so that the instances that waited don't take the lease one after
    /// another; and once the lease is held, in case the refresh completed between this
    /// caller's lookup and the lease (unless the request asked for the origin with
    /// `no-cache`: then it runs). A store of this process has no lease, and is looked at
    /// all the same: a request whose lookup missed just before the previous flight kept
    /// the entry, and that reached the flights after it ended, would otherwise run again.
    async fn lease(
        &self,
        store: &dyn Lookup,
        key: &StoreKey,
        fingerprint: Fingerprint,
        asked: &HeaderMap,
        waited: bool,
        metrics: &Metrics,
    ) -> Result<Lease, BoxError> {
        if waited && let Some(kept) = self.fresh_entry(store, key, fingerprint, asked).await? {
            return Ok(Lease::Stored(kept));
        }
        // The request asked for the origin (`no-cache`): a fresh entry it did not wait for
        // is no answer to it.
        let revalidate = Asked::of(asked).revalidate;
        let guard = match store.refresh_lease(key).await? {
            Lease::Held(guard) if revalidate => return Ok(Lease::Held(guard)),
            Lease::Held(guard) => guard,
            // A store of this process only: the flight before this one may have kept the
            // entry between this request's lookup and its flight.
            Lease::NotShared if !revalidate => {
                return match self.fresh_entry(store, key, fingerprint, asked).await? {
                    Some(kept) => Ok(Lease::Stored(kept)),
                    None => Ok(Lease::NotShared),
                };
            }
            other => return Ok(other),
        };
        match self.fresh_entry(store, key, fingerprint, asked).await {
            Ok(Some(kept)) => {
                // Released by a task of its own, off this caller's path.
                drop(guard);
                Ok(Lease::Stored(kept))
            }
            Ok(None) => Ok(Lease::Held(guard)),
            Err(error) => {
                // Holding the lease, the flight may as well run.
                metrics.store_error();
                tracing::warn!(%error, "cache lookup under a lease failed; refreshing");
                Ok(Lease::Held(guard))
            }
        }
    }

    /// The entry kept under `key`, if it answers this request and is fresh.
    async fn fresh_entry(
        &self,
        store: &dyn Lookup,
        key: &StoreKey,
        fingerprint: Fingerprint,
        asked: &HeaderMap,
    ) -> Result<Option<Arc<StoredResponse>>, BoxError> {
        let Found::Answers { kept, .. } = self.find(store, key, fingerprint, asked).await? else {
            return Ok(None);
        };
        let (age, lifetimes) = judge(self, &kept, asked, SystemTime::now());
        Ok((lifetimes.state(age) == Freshness::Fresh).then_some(kept))
    }

    /// Finds the entry that answers a request: near first, then in the store; under the
    /// key, or, if the entry kept there is another variant, under the key of the request's
    /// own variant.
    async fn find(
        &self,
        store: &dyn Lookup,
        key: &StoreKey,
        fingerprint: Fingerprint,
        asked: &HeaderMap,
    ) -> Result<Found, BoxError> {
        let Some((kept, epoch)) = self.get(store, key).await? else {
            return Ok(Found::Nothing);
        };
        if engine::answers(&kept, fingerprint, asked) {
            let at = key.clone();
            return Ok(Found::Answers { kept, at, epoch });
        }
        // Another variant (or another request's response): the request's own variant is
        // kept under a key of its own, if it is kept.
        let Some(variant) = fingerprint
            .answered_by(kept.headers(), asked)
            .filter(|_| kept.headers().contains_key(http::header::VARY))
        else {
            return Ok(Found::OtherVariant);
        };
        let at = key.variant(variant);
        match self.get(store, &at).await? {
            Some((kept, epoch)) if engine::answers(&kept, fingerprint, asked) => {
                Ok(Found::Answers { kept, at, epoch })
            }
            _ => Ok(Found::OtherVariant),
        }
    }

    /// The entry under `key`: the near copy, or the store's, with the near cache's drop
    /// count read before the store lookup (`None`: from the near cache, or none).
    async fn get(
        &self,
        store: &dyn Lookup,
        key: &StoreKey,
    ) -> Result<Option<(Arc<StoredResponse>, Option<u64>)>, BoxError> {
        let epoch = match &self.near {
            Some(near) => match near.get(key) {
                Some(kept) => return Ok(Some((kept, None))),
                None => Some(near.epoch()),
            },
            None => None,
        };
        Ok(store.get(key).await?.map(|kept| (kept, epoch)))
    }

    /// Once a response is kept under `key`: kept under its variant's key too, if it varies;
    /// filed under its URI and tags, for purges; copied near, and announced to the other
    /// instances, so that they drop their copies.
    async fn kept(
        &self,
        store: &dyn Lookup,
        key: &StoreKey,
        (response, ttl): &(Arc<StoredResponse>, Duration),
        target: &Uri,
        metrics: &Metrics,
    ) {
        let mut keys = vec![key.clone()];
        if response.headers().contains_key(http::header::VARY)
            && self.another_variant_fits(key, response.fingerprint())
        {
            let variant = key.variant(response.fingerprint());
            match store.put(variant.clone(), response.clone(), *ttl).await {
                Ok(()) => keys.push(variant),
                Err(error) => {
                    metrics.store_error();
                    tracing::warn!(%error, "keeping a variant failed");
                }
            }
        }
        let groups = super::purge::groups(target, response.headers());
        let filed = groups.iter().flat_map(|group| {
            keys.iter()
                .map(|key| store.add_to_group(group.clone(), key.clone(), *ttl))
        });
        let announced = async {
            if self.near.is_some() {
                store.announce(&keys).await
            } else {
                Ok(())
            }
        };
        let (filed, announced) =
            futures::future::join(futures::future::join_all(filed), announced).await;
        for error in filed.into_iter().chain([announced]).filter_map(Result::err) {
            metrics.store_error();
            tracing::warn!(%error, "filing a kept response for purges failed");
        }
        if let Some(near) = &self.near {
            let (age, lifetimes) = judge(self, response, &HeaderMap::new(), SystemTime::now());
            let fresh = lifetimes.fresh.saturating_sub(age);
            let epoch = near.epoch();
            for key in &keys {
                near.fill(key, response.clone(), fresh, epoch);
            }
        }
    }

    /// Whether a variant of fingerprint `variant` may be kept for `key`: it is one of the
    /// kept ones, or fewer than [`MAX_VARIANTS`] are.
    fn another_variant_fits(&self, key: &StoreKey, variant: Fingerprint) -> bool {
        let kept = self.variants.get_with_by_ref(key, Arc::default);
        let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.contains(&variant) {
            return true;
        }
        if kept.len() >= MAX_VARIANTS {
            return false;
        }
        kept.push(variant);
        true
    }
}

/// What [`CacheStage::find`] found for a request.
enum Found {
    /// An entry that answers it, kept under `at`; `epoch`: read from the store when the
    /// near cache's drop count was this.
    Answers {
        kept: Arc<StoredResponse>,
        at: StoreKey,
        epoch: Option<u64>,
    },
    /// An entry of another variant only.
    OtherVariant,
    Nothing,
}

/// Frees a key's refresh slot when the refresh ends, however it ends.
struct Refreshing(Arc<DashMap<StoreKey, ()>>, StoreKey);

impl Drop for Refreshing {
    fn drop(&mut self) {
        self.0.remove(&self.1);
    }
}

/// A kept response as an answer: its `Age` and `Cache-Status`, or a `304` for a request
/// whose validators match it.
/// `ttl` in `Cache-Status` is the freshness left, negative once stale (RFC 9211).
fn from_store(
    kept: &StoredResponse,
    age: Duration,
    fresh: Duration,
    status: Status,
    conditional: &Conditional,
    metrics: &Metrics,
) -> Response<Bytes> {
    let len = kept.body().len() as u64;
    let mut response = if conditional.not_modified(kept.status(), kept.headers()) {
        not_modified(kept.headers())
    } else if let Some((first, last)) = conditional.range(kept.status(), kept.headers(), len) {
        // A part of the kept whole (RFC 9110 §14.2, §15.3.7).
        let part = kept.body().slice(first as usize..=last as usize);
        let mut response = Response::new(part);
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        *response.version_mut() = kept.version();
        *response.headers_mut() = kept.headers().clone();
        let headers = response.headers_mut();
        headers.remove(http::header::CONTENT_LENGTH);
        let range = format!("bytes {first}-{last}/{len}");
        headers.insert(
            http::header::CONTENT_RANGE,
            HeaderValue::try_from(range).expect("digits and ASCII"),
        );
        response
    } else {
        let mut response = Response::new(kept.body().clone());
        *response.status_mut() = kept.status();
        *response.version_mut() = kept.version();
        *response.headers_mut() = kept.headers().clone();
        response
    };
    metrics.cache_answered(matches!(status, Status::Hit));
    let seconds = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let ttl = seconds(fresh).saturating_sub(seconds(age));
    let headers = response.headers_mut();
    headers.insert(http::header::AGE, HeaderValue::from(age.as_secs()));
    headers.insert(CACHE_STATUS, cache_status(status, false, Some(ttl)));
    response
}

fn not_modified(headers: &HeaderMap) -> Response<Bytes> {
    let mut response = Response::new(Bytes::new());
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    for name in rules::NOT_MODIFIED_HEADERS {
        for value in headers.get_all(&name) {
            response.headers_mut().append(name.clone(), value.clone());
        }
    }
    response
}

/// A response as the cache keeps it, and for how long, or `None` (and the key on
/// hit-for-pass, for a personal response).
fn keepable(
    cache: &CacheStage,
    key: &StoreKey,
    ran: Ran<'_>,
    asked: &HeaderMap,
) -> Option<(Arc<StoredResponse>, Duration)> {
    let (buffered, answers) = match ran {
        Ran::Buffered(buffered, answers) => (buffered, answers),
        Ran::Unshared => {
            cache.passes.insert(key.clone(), ());
            return None;
        }
        Ran::TooLarge => return None,
    };
    let parts = &buffered.parts;
    let lifetimes = match cache.rules.verdict(parts.status, &parts.headers, asked) {
        Verdict::Store(lifetimes) => lifetimes,
        Verdict::Pass => {
            cache.passes.insert(key.clone(), ());
            return None;
        }
        Verdict::Skip => {
            // Not one to keep for anyone (not only for this request's `Authorization`):
            // the key's next requests don't queue behind flights (hit-for-miss).
            let anyone = cache
                .rules
                .verdict(parts.status, &parts.headers, &HeaderMap::new());
            if !matches!(anyone, Verdict::Store(_)) {
                cache.misses.insert(key.clone(), ());
            }
            return None;
        }
    };
    // The engine's own rules of what a store keeps (`Vary: *`, trailers, errors in the body);
    // the status is the rules' to judge.
    let mut kept = engine::stored_copy(buffered, answers?)?;
    rules::stamp(kept.headers_mut(), SystemTime::now());
    // Kept while it may be served at all, and, if it has validators, for a while after,
    // to be revalidated with them; the store drops it after.
    let mut ttl = lifetimes.usable();
    if rules::has_validators(kept.status(), kept.headers()) {
        ttl = ttl.saturating_add(rules::REVALIDATE_FOR);
    }
    Some((Arc::new(kept), ttl))
}
