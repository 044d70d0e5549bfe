//! Coalesce concurrent requests with equal keys onto one call of the inner service.
//!
//! The inner service runs once per key and flight; every caller receives a clone of its
//! response (or error). Built on [`single_flight`](crate::single_flight), whose guarantees
//! it keeps: exactly one inner call per flight, under races, cancellation and panics.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_coalesce::coalesce::CoalesceLayer;
//!
//! #[derive(Clone)]
//! struct CreateClient {
//!     client_id: String,
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Infallible> {
//! let inserts = Arc::new(AtomicUsize::new(0));
//! let counter = inserts.clone();
//! let svc = ServiceBuilder::new()
//!     .layer(CoalesceLayer::new(|req: &CreateClient| Some(req.client_id.clone())))
//!     .service_fn(move |req: CreateClient| {
//!         let counter = counter.clone();
//!         async move {
//!             counter.fetch_add(1, Ordering::SeqCst); // "INSERT INTO clients ..."
//!             tokio::task::yield_now().await;
//!             Ok::<_, Infallible>(format!("client {}", req.client_id))
//!         }
//!     });
//!
//! // Three tabs create the same client at once.
//! let req = CreateClient { client_id: "qg2X9STk79i".into() };
//! let (a, b, c) = tokio::join!(
//!     svc.clone().oneshot(req.clone()),
//!     svc.clone().oneshot(req.clone()),
//!     svc.clone().oneshot(req),
//! );
//! assert_eq!(inserts.load(Ordering::SeqCst), 1);
//! assert_eq!((a?, b?), (c.clone()?, c?));
//! # Ok(())
//! # }
//! ```

pub mod future;
mod key;
mod layer;
mod service;
mod shareable;

pub use self::key::MakeKey;
pub use self::layer::CoalesceLayer;
pub use self::service::Coalesce;
pub use self::shareable::Shareable;
