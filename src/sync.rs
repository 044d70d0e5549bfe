//! Synchronisation primitives, swapped for loom's under `--cfg coalesce_loom` so that the flight
//! protocol can be model-checked.

#[cfg(coalesce_loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};
#[cfg(not(coalesce_loom))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};
