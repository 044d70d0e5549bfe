//! Synchronisation primitives, swapped for loom's under `--cfg coalesce_loom` so that the flight
//! protocol can be model-checked.

#[cfg(coalesce_loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};
#[cfg(not(coalesce_loom))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};

#[cfg(coalesce_loom)]
pub(crate) use loom::sync::atomic::AtomicUsize;
#[cfg(not(coalesce_loom))]
pub(crate) use std::sync::atomic::AtomicUsize;

/// A value set once and read without a lock afterwards: `std`'s `OnceLock`; under loom,
/// which has none, a mutex around an `Option` with the same semantics for the protocol.
pub(crate) struct Once<T>(
    #[cfg(not(coalesce_loom))] std::sync::OnceLock<T>,
    #[cfg(coalesce_loom)] loom::sync::Mutex<Option<T>>,
);

impl<T> Once<T> {
    pub(crate) fn new() -> Self {
        Once(Default::default())
    }

    /// Sets the value; the first set wins.
    pub(crate) fn set(&self, value: T) {
        #[cfg(not(coalesce_loom))]
        let _ = self.0.set(value);
        #[cfg(coalesce_loom)]
        {
            let mut slot = self.0.lock().unwrap();
            if slot.is_none() {
                *slot = Some(value);
            }
        }
    }

    /// `f` of the value, if it is set.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&T) -> R) -> Option<R> {
        #[cfg(not(coalesce_loom))]
        return self.0.get().map(f);
        #[cfg(coalesce_loom)]
        return self.0.lock().unwrap().as_ref().map(f);
    }
}
