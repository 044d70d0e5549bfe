//! Error types

use std::convert::Infallible;
use std::error::Error;
use std::fmt;
use std::sync::Arc;

use crate::BoxError;

/// An error that one call produced and every caller of its flight receives.
///
/// Errors are not `Clone` in general, so the one error is kept behind an `Arc` and each
/// caller gets a `SharedError` pointing at it. Its `Display` is the original error's, and
/// [`source`](Error::source) returns the original error itself, so that it can be
/// downcast:
///
/// ```
/// use std::error::Error;
/// use tower_coalesce::http::error::SharedError;
/// # fn check(err: tower_coalesce::BoxError) {
/// if let Some(shared) = err.downcast_ref::<SharedError>() {
///     let original = shared.source().unwrap();
///     if original.is::<std::io::Error>() { /* ... */ }
/// }
/// # }
/// ```
///
/// The leader receives a `SharedError` too, so that every caller sees the same type.
#[derive(Clone)]
pub struct SharedError {
    inner: Arc<BoxError>,
}

impl SharedError {
    pub(crate) fn new(inner: Arc<BoxError>) -> Self {
        SharedError { inner }
    }
}

impl fmt::Debug for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedError").field(&self.inner).finish()
    }
}

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

impl Error for SharedError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&**self.inner)
    }
}

/// How an error of the inner service reaches every caller of a flight.
///
/// The inner service returns its error once, to the flight; this trait makes each
/// caller's copy from the one shared error. It is implemented for:
///
/// - [`Infallible`], the error of axum routers and handlers: there is nothing to share.
/// - [`BoxError`], the error of most Tower stacks and of hyper services: each caller gets
///   a [`SharedError`] whose `source()` is the original error.
///
/// For an error type of your own, implement it (cloning the error, or wrapping the `Arc`),
/// or map your error into a `BoxError` below the layer with
/// [`MapErrLayer`](tower::util::MapErrLayer).
pub trait ShareError: Sized + Send + Sync + 'static {
    /// Makes one caller's copy of `error`.
    fn share(error: &Arc<Self>) -> Self;
}

impl ShareError for Infallible {
    fn share(error: &Arc<Self>) -> Self {
        match **error {}
    }
}

impl ShareError for BoxError {
    fn share(error: &Arc<Self>) -> Self {
        Box::new(SharedError::new(error.clone()))
    }
}
