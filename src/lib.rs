//! Request coalescing for Tower services.
//!
//! See the README for an overview.

#![forbid(unsafe_code)]
#![warn(
    missing_debug_implementations,
    missing_docs,
    rust_2018_idioms,
    unreachable_pub
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod coalesce;
pub mod single_flight;
mod sync;
