use std::fmt;

use tower::Layer;

use super::Coalesce;

/// Applies [`Coalesce`] to a service: concurrent requests with equal keys share one call.
///
/// Each call to [`Layer::layer`] creates a new registry of flights: the services built by
/// one `layer` call (and their clones) coalesce with each other, services built by separate
/// calls do not. Cloning this layer does not share a registry either. In axum, where
/// `Router::layer` applies the layer to each route, every route therefore coalesces only
/// its own requests, and equal keys on two routes never meet.
///
/// Mind where the layer is applied: an axum `Router` without state, and a hyper server
/// that builds its service stack per connection, apply it once per connection, and requests
/// on different connections then never coalesce. Build the service once and clone it per
/// connection, or use `http::HttpCoalesceLayer` (feature
/// `http`), whose services all share the layer's registry.
///
/// Cancellation and panics behave as described on [`Coalesce`].
///
/// See the [module docs](crate::coalesce) for an example.
#[derive(Clone)]
pub struct CoalesceLayer<F> {
    make_key: F,
}

impl<F> CoalesceLayer<F> {
    /// Creates a layer that coalesces requests by the key `make_key` returns
    /// (a [`MakeKey`](super::MakeKey), such as a closure `Fn(&Req) -> Option<K>`).
    pub const fn new(make_key: F) -> Self {
        CoalesceLayer { make_key }
    }
}

impl<S, F> Layer<S> for CoalesceLayer<F>
where
    F: Clone,
{
    type Service = Coalesce<S, F>;

    fn layer(&self, inner: S) -> Self::Service {
        Coalesce::new(inner, self.make_key.clone())
    }
}

impl<F> fmt::Debug for CoalesceLayer<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoalesceLayer")
            .field("make_key", &std::any::type_name::<F>())
            .finish()
    }
}
