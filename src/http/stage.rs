//! Stages: what a preset adds to the engine's steps, through one small interface, so that
//! the engine names no preset.
//!
//! The coalescing and idempotency presets have none: they are the engine's own steps
//! with other settings. A preset with a stage (the HTTP cache) is called at four points of
//! a keyed request that has a store key:
//!
//! 1. [`admit`](Stage::admit), before the flight: answer from what is kept, or send the
//!    request through its flight (or on its own), with a ticket for step 4;
//! 2. [`lease`](Stage::lease), inside the flight, in place of the store's lease;
//! 3. [`keep`](Stage::keep), once the flight ran: what to keep, and for how long;
//! 4. [`answered`](Stage::answered), once the request has its answer: what to change in
//!    it, or what to answer instead.
//!
//! Every type here is free of the inner service's and bodies' types (responses the stage
//! makes have their body in one `Bytes`), so that a stage is a trait object and the
//! engine's types carry no stage parameter.

// The HTTP cache's is the one stage so far: without it, the engine's side of the interface
// is all there is.
#![cfg_attr(not(feature = "http-cache"), allow(dead_code))]

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::request::Parts;
use http::{HeaderMap, Response, StatusCode, Uri};

use super::Role;
use super::flown::Buffered;
use super::metrics::Metrics;
use crate::BoxError;
use crate::store::Lease;
use crate::store::{Fingerprint, Store, StoreKey, StoredResponse};

/// What a preset adds to the engine's steps; see the [module docs](self).
pub(crate) trait Stage: Send + Sync + 'static {
    /// Before a keyed request joins its flight: `headers` are the request's own, which the
    /// stage may change (a cache takes the validators off, to answer them itself).
    fn admit<'a>(
        &'a self,
        store: &'a dyn Lookup,
        key: &'a StoreKey,
        fingerprint: Fingerprint,
        headers: &'a mut HeaderMap,
        metrics: &'a Metrics,
    ) -> BoxFuture<'a, Admit>;

    /// The lease of the key's flight (`waited`: after waiting for another instance's).
    fn lease<'a>(
        &'a self,
        store: &'a dyn Lookup,
        key: &'a StoreKey,
        fingerprint: Fingerprint,
        asked: &'a HeaderMap,
        waited: bool,
        metrics: &'a Metrics,
    ) -> BoxFuture<'a, Result<Lease, BoxError>>;

    /// What to keep of a flight's response (`None`: the inner service failed) to the
    /// request `asked`, and for how long; `None` to keep nothing.
    fn keep(
        &self,
        key: &StoreKey,
        ran: Option<Ran<'_>>,
        asked: &HeaderMap,
    ) -> Option<(Arc<StoredResponse>, Duration)>;

    /// Whether a flight's response (`status`, `response`) may answer a follower that asked
    /// `follower`: a cache gives a follower only what it would keep and then serve to that
    /// follower (RFC 9111: storable, fresh, §3.5 for the follower's `Authorization`; the
    /// leader's is the engine's `authorized_shared_if`).
    fn serves(&self, status: StatusCode, response: &HeaderMap, follower: &HeaderMap) -> Serves;

    /// The flight's service answered `304 Not Modified` (`not_modified`) to the validators
    /// the stage put on the request in [`admit`](Self::admit): the kept response it
    /// freshens (RFC 9111 §4.3.4), which becomes the flight's response; `None` if nothing
    /// kept matches it (then a `502` is).
    fn freshen<'a>(
        &'a self,
        store: &'a dyn Lookup,
        key: &'a StoreKey,
        fingerprint: Fingerprint,
        asked: &'a HeaderMap,
        not_modified: &'a http::response::Parts,
    ) -> BoxFuture<'a, Option<Response<Bytes>>>;

    /// Once what [`keep`](Self::keep) returned is in the store: what else the stage does
    /// with it (`target`: the request's URI).
    fn kept<'a>(
        &'a self,
        store: &'a dyn Lookup,
        key: &'a StoreKey,
        kept: &'a (Arc<StoredResponse>, Duration),
        target: &'a Uri,
        metrics: &'a Metrics,
    ) -> BoxFuture<'a, ()>;

    /// A request the layer has no key for, of a method that is not safe (`POST`, `PUT`,
    /// `DELETE`, ...), got this answer: what the stage does about it, before the caller
    /// has it (a cache drops what the request changed).
    fn passed<'a>(
        &'a self,
        store: &'a dyn Lookup,
        request: &'a Parts,
        answer: Answered<'a>,
        metrics: &'a Metrics,
    ) -> Option<BoxFuture<'a, ()>>;

    /// Once the request has its answer (`None`: the inner service failed): what to do
    /// with it.
    fn answered(&self, ticket: Ticket, answer: Option<Answered<'_>>, metrics: &Metrics) -> After;

    /// Whether the stage answers this request itself if its flight fails (a cache's stale
    /// entry within `stale-if-error`): then a failed flight's response may reach it as a
    /// follower, to be replaced in [`answered`](Self::answered), rather than it running on
    /// its own.
    fn stands_in(&self, ticket: &Ticket) -> bool;

    /// Whether a stored response that answers a flight is a replay of a completed request
    /// (`Idempotent-Replayed`) rather than a copy of another instance's run.
    fn replays(&self) -> bool;
}

/// What [`Stage::serves`] decided for a follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Serves {
    /// The flight's response answers it.
    Yes,
    /// Not this response, but one made for its own request could be shared (it sent
    /// another `Authorization`): it waits for a flight of its own, as for another variant.
    Another,
    /// No follower gets this response (not storable, not fresh): it runs on its own.
    Own,
}

/// Marks a request whose stage stands in for a failure of its flight
/// ([`Stage::stands_in`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StandsIn;

/// The stage's own state between [`Stage::admit`] and [`Stage::answered`].
pub(crate) type Ticket = Box<dyn Any + Send>;

/// What [`Stage::admit`] decided.
pub(crate) enum Admit {
    /// Through the key's flight, then [`Stage::answered`].
    Flight(Ticket),
    /// On its own, not through the flight (nothing is shared with it), then
    /// [`Stage::answered`].
    Own(Ticket),
    /// This answer, from what the stage keeps.
    Answer(Response<Bytes>),
    /// This answer, while the request itself refreshes what is kept, through its flight,
    /// in the background; `refreshing` is dropped when that ends.
    AnswerAndRefresh {
        answer: Response<Bytes>,
        refreshing: Box<dyn Send>,
    },
}

/// What a flight produced, as [`Stage::keep`] sees it.
pub(crate) enum Ran<'a> {
    /// A response read whole, and the fingerprint of the requests it answers.
    Buffered(&'a Buffered, Option<Fingerprint>),
    /// A response that may not be shared, which went to its leader only.
    Unshared,
    /// A response over the body limit, which went to its leader only.
    TooLarge,
}

/// The answer a request got, as [`Stage::answered`] sees it.
pub(crate) struct Answered<'a> {
    pub(crate) status: StatusCode,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) role: Option<Role>,
}

/// What [`Stage::answered`] decided.
pub(crate) enum After {
    /// The answer as it is, with these headers set.
    Keep(HeaderMap),
    /// This instead (a stale response in place of an error, a `304`).
    Replace(Response<Bytes>),
}

/// The store, as a stage reads it: the calls a stage makes, boxed, so that a stage is one
/// type whatever the store.
pub(crate) trait Lookup: Send + Sync {
    fn get<'a>(
        &'a self,
        key: &'a StoreKey,
    ) -> BoxFuture<'a, Result<Option<Arc<StoredResponse>>, BoxError>>;

    fn put<'a>(
        &'a self,
        key: StoreKey,
        response: Arc<StoredResponse>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), BoxError>>;

    fn refresh_lease<'a>(&'a self, key: &'a StoreKey) -> BoxFuture<'a, Result<Lease, BoxError>>;

    fn remove<'a>(&'a self, key: &'a StoreKey) -> BoxFuture<'a, Result<bool, BoxError>>;

    fn add_to_group<'a>(
        &'a self,
        group: StoreKey,
        key: StoreKey,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), BoxError>>;

    fn take_group<'a>(
        &'a self,
        group: &'a StoreKey,
    ) -> BoxFuture<'a, Result<Vec<StoreKey>, BoxError>>;

    fn announce<'a>(&'a self, keys: &'a [StoreKey]) -> BoxFuture<'a, Result<(), BoxError>>;
}

impl<St: Store> Lookup for St {
    fn get<'a>(
        &'a self,
        key: &'a StoreKey,
    ) -> BoxFuture<'a, Result<Option<Arc<StoredResponse>>, BoxError>> {
        Box::pin(Store::get(self, key))
    }

    fn put<'a>(
        &'a self,
        key: StoreKey,
        response: Arc<StoredResponse>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), BoxError>> {
        Box::pin(Store::put(self, key, response, ttl))
    }

    fn refresh_lease<'a>(&'a self, key: &'a StoreKey) -> BoxFuture<'a, Result<Lease, BoxError>> {
        Box::pin(Store::refresh_lease(self, key))
    }

    fn remove<'a>(&'a self, key: &'a StoreKey) -> BoxFuture<'a, Result<bool, BoxError>> {
        Box::pin(Store::remove(self, key))
    }

    fn add_to_group<'a>(
        &'a self,
        group: StoreKey,
        key: StoreKey,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), BoxError>> {
        Box::pin(async move { Store::add_to_group(self, &group, &key, ttl).await })
    }

    fn take_group<'a>(
        &'a self,
        group: &'a StoreKey,
    ) -> BoxFuture<'a, Result<Vec<StoreKey>, BoxError>> {
        Box::pin(Store::take_group(self, group))
    }

    fn announce<'a>(&'a self, keys: &'a [StoreKey]) -> BoxFuture<'a, Result<(), BoxError>> {
        Box::pin(Store::announce(self, keys))
    }
}
