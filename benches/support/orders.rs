//! The instances the store benches call: an `IdempotencyLayer` on a store around an order
//! handler, boxed, and the order request they are called with. Shared by
//! `benches/stores.rs` and `benches/examples/store_phases.rs`, so that the probe's round is
//! the bench's.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};
use tower_coalesce::idempotency::IdempotencyLayer;
use tower_coalesce::store::Store;

/// An instance: its answers are checked to be `2xx`, and their bodies dropped.
pub type Svc = BoxCloneSyncService<Request<Full<Bytes>>, Response<()>, Infallible>;

/// What the layer hands the handler.
pub type Order = Request<Either<Full<Bytes>, Full<Bytes>>>;

/// An instance on `store` around `handler`.
pub fn instance<St, H>(store: St, handler: H) -> Svc
where
    St: Store,
    H: Service<Order, Response = Response<Full<Bytes>>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    H::Future: Send + 'static,
{
    let svc = IdempotencyLayer::new().store(store).layer(handler);
    BoxCloneSyncService::new(svc.map_response(|response| {
        assert!(response.status().is_success(), "{}", response.status());
        response.map(drop)
    }))
}

/// The handler's answer: `201 Created`.
pub fn created() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"order created")));
    *response.status_mut() = StatusCode::CREATED;
    response
}

/// An order under the idempotency key `key`.
pub fn request(key: &str) -> Request<Full<Bytes>> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"2 apples")))
        .unwrap()
}
