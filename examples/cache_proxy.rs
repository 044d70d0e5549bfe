//! A caching reverse proxy: [`HttpCacheLayer`] in front of any HTTP backend, so that its
//! `GET`s are cached by their `Cache-Control` and concurrent misses reach the backend once.
//!
//! ```text
//! cargo run --release --example cache_proxy --features http-cache -- \
//!     --listen 127.0.0.1:8080 --upstream http://127.0.0.1:8000
//! ```
//!
//! It is also the harness the cache is measured with against the public HTTP caching test
//! suite (cache-tests.fyi): `.ci/cache-tests` starts the suite's origin server, this
//! proxy in front of it, and the suite's client through it.
//!
//! What the proxy itself does, as RFC 9110 §7.6.1 asks of an intermediary: drops the
//! hop-by-hop headers (`Connection` and the fields it names, `Keep-Alive`, `TE`,
//! `Transfer-Encoding`, `Upgrade`, `Proxy-*`) both ways, adds `Via`, and answers `502` when
//! the backend can't be reached. Interim (1xx) responses are not relayed: hyper's server
//! sends none but `100 Continue`.

use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use clap::Parser;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower_coalesce::http_cache::HttpCacheLayer;

#[derive(Parser, Debug)]
#[command(about = "A caching reverse proxy on tower-coalesce's HttpCacheLayer")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The backend's base URL (scheme, host and port).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    upstream: Uri,
    /// One cache for every client, whatever their `Authorization` and `Cookie`
    /// (the layer's `.unscoped()`); by default entries are kept apart per credentials.
    #[arg(long)]
    unscoped: bool,
}

#[derive(Clone)]
struct Upstream {
    client: Client<HttpConnector, Body>,
    base: Uri,
}

#[tokio::main]
async fn main() -> Result<(), tower_coalesce::BoxError> {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .init();
    let args = Args::parse();
    let upstream = Upstream {
        client: Client::builder(TokioExecutor::new()).build_http(),
        base: args.upstream.clone(),
    };
    let routes = Router::new().fallback(forward).with_state(upstream);
    let app = if args.unscoped {
        routes.layer(HttpCacheLayer::new().unscoped())
    } else {
        routes.layer(HttpCacheLayer::new())
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!(
        "caching {} on http://{}",
        args.upstream,
        listener.local_addr()?
    );
    axum::serve(listener, app).await?;
    Ok(())
}

/// Sends the request on to the backend, and its response back, without hop-by-hop headers.
async fn forward(State(upstream): State<Upstream>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let mut target = upstream.base.clone().into_parts();
    target.path_and_query = match path.parse() {
        Ok(path) => Some(path),
        Err(_) => return (StatusCode::BAD_REQUEST, "bad request target").into_response(),
    };
    parts.uri = match Uri::from_parts(target) {
        Ok(uri) => uri,
        Err(_) => return (StatusCode::BAD_REQUEST, "bad request target").into_response(),
    };
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .append(header::VIA, HeaderValue::from_static("1.1 tower-coalesce"));
    match upstream
        .client
        .request(Request::from_parts(parts, body))
        .await
    {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Body::new(body))
        }
        Err(error) => {
            tracing::warn!(%error, "the backend failed");
            (StatusCode::BAD_GATEWAY, "the backend could not be reached").into_response()
        }
    }
}

/// RFC 9110 §7.6.1: the fields `Connection` names, and the hop-by-hop fields themselves.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        HeaderName::from_static("proxy-connection"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}
