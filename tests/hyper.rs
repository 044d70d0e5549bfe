//! The HTTP layer in front of a plain hyper service (no axum): `Request<Incoming>` in,
//! a `BoxError` error type, served by hyper-util's auto (HTTP/1.1 and HTTP/2) builder.
#![cfg(feature = "http")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures::future::join_all;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tower_coalesce::BoxError;
use tower_coalesce::http::{HttpCoalesceLayer, RequestBody, key};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hyper_service_is_called_once_for_fifty_concurrent_requests() {
    let layer = HttpCoalesceLayer::new(key::method_path_and_query());
    let metrics = layer.metrics();
    let runs = Arc::new(AtomicUsize::new(0));
    let svc = tower::ServiceBuilder::new().layer(layer).service_fn({
        let (runs, metrics) = (runs.clone(), metrics.clone());
        move |req: Request<RequestBody<Incoming>>| {
            let (runs, metrics) = (runs.clone(), metrics.clone());
            async move {
                let body = req.into_body().collect().await?.to_bytes();
                let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                support::eventually("49 followers", || metrics.callers_joined() == 49).await;
                let text = format!("report {n} of {} request bytes", body.len());
                Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(text))))
            }
        }
    });

    // Boxed, with the error made concrete at the server's edge: with `BoxError` there, the
    // compiler fails to prove the spawned connection task `Send` (rust-lang/rust#102211).
    let svc =
        tower::util::BoxCloneService::new(tower::ServiceExt::map_err(svc, std::io::Error::other));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(serve_connection(stream, svc.clone()));
        }
    });

    let client = reqwest::Client::new();
    let url = format!("http://{addr}/reports?month=2026-11");
    let bodies = join_all((0..50).map(|_| async {
        let res = client.post(&url).body("filters").send().await.unwrap();
        assert_eq!(res.status(), 200);
        res.bytes().await.unwrap()
    }))
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    for body in &bodies {
        assert_eq!(body, "report 1 of 7 request bytes");
    }
}

type Svc = tower::util::BoxCloneService<
    Request<Incoming>,
    Response<tower_coalesce::http::ResponseBody<Full<Bytes>>>,
    std::io::Error,
>;

async fn serve_connection(stream: tokio::net::TcpStream, svc: Svc) {
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
        .await;
}
