//! Leases: which instance runs a key when several share a store. The types live with the
//! store trait in [`http::lease`](crate::http::lease); they are here too for stores written
//! against this path.

pub use crate::http::lease::{FencingToken, Lease, LeaseGuard};
