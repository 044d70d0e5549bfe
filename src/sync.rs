//! Synchronisation primitives, swapped for loom's under `--cfg loom` so that the flight
//! protocol can be model-checked.

#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};
