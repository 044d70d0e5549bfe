//! The bound on what one flight hands to every caller.

/// A response or error that [`Coalesce`](super::Coalesce) can hand to every caller of a
/// flight: any `Clone` type (a blanket implementation; there is nothing to implement).
///
/// The trait exists for its compile error. An axum `Router` or a hyper service answers
/// `http::Response<Body>`, which is not `Clone` (the body is a stream that can be read
/// once), and without this trait the error would only say that `Body: Clone` is missing,
/// many lines below the layer, without naming the layer HTTP services need:
/// `tower_coalesce::http::HttpCoalesceLayer`, which reads the body once and
/// shares the bytes.
///
/// ```compile_fail,E0277
/// use axum::{Router, routing::post};
/// use tower_coalesce::coalesce::CoalesceLayer;
///
/// // error: `Response<Body>` can't be handed to every caller of a flight ... use
/// // `tower_coalesce::http::HttpCoalesceLayer` for HTTP services
/// let app: Router = Router::new()
///     .route("/api/clients", post(|| async { "created" }))
///     .layer(CoalesceLayer::new(|req: &axum::extract::Request| {
///         req.headers().get("idempotency-key").cloned()
///     }));
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` can't be handed to every caller of a flight: it is not `Clone`; for HTTP services (axum, hyper) use `tower_coalesce::http::HttpCoalesceLayer`, which reads the body once and shares it",
    label = "not `Clone`",
    note = "`CoalesceLayer` gives every caller a clone of the one response; an `http::Response`'s body is a stream and can't be cloned"
)]
pub trait Shareable: Clone + Send + 'static {}

// Without this the error would name the innermost missing `Clone` (`Body: Clone`) rather
// than this trait and its message.
#[diagnostic::do_not_recommend]
impl<T: Clone + Send + 'static> Shareable for T {}
