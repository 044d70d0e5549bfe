//! The least a layer that shares responses has to do, as a reference beside ours: read the
//! request's body, register its key in a `DashMap` for the call, call the handler, read
//! the response's body into one `Bytes`. It shares nothing and checks nothing; what the
//! real layer costs above it is the price of what it promises.

use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use dashmap::DashMap;
use futures::future::BoxFuture;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};

#[derive(Clone)]
pub struct Floor<S> {
    inner: S,
    registry: Arc<DashMap<Bytes, ()>>,
}

/// Wraps services with the floor layer, keyed by the `Idempotency-Key` header.
pub fn layer<S>() -> impl tower::Layer<S, Service = Floor<S>> + Clone {
    let registry = Arc::new(DashMap::new());
    tower::layer::layer_fn(move |inner| Floor {
        inner,
        registry: registry.clone(),
    })
}

impl<S> Service<Request<Body>> for Floor<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<Full<Bytes>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let (inner, registry) = (self.inner.clone(), self.registry.clone());
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let key = parts
                .headers
                .get("idempotency-key")
                .map(|key| Bytes::copy_from_slice(key.as_bytes()));
            if let Some(key) = &key {
                registry.insert(key.clone(), ());
            }
            let bytes = body.collect().await.expect("a body").to_bytes();
            let response = inner
                .oneshot(Request::from_parts(parts, Full::new(bytes)))
                .await?;
            let (parts, body) = response.into_parts();
            let bytes = body.collect().await.expect("a body").to_bytes();
            if let Some(key) = key {
                registry.remove(&key);
            }
            Ok(Response::from_parts(parts, Full::new(bytes)))
        })
    }
}
