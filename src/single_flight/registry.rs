use std::any::{self, Any};
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, OnceLock};

use super::Group;

/// A [`Group`] whose key and result types are fixed by its first use.
///
/// A Tower middleware struct names its inner service but not the request type, so it can't
/// name the key and result types of its registry. The group is therefore made on the first
/// call, boxed as `Any`, and downcast afterwards (a type-id comparison). Clones share it.
#[derive(Clone, Default)]
pub(crate) struct LazyGroup {
    group: Arc<OnceLock<Box<dyn Any + Send + Sync>>>,
}

impl LazyGroup {
    /// Returns the group, making it on the first call.
    ///
    /// # Panics
    ///
    /// If an earlier call used other key or result types: one middleware instance serves one
    /// request type.
    pub(crate) fn get<K, T>(&self) -> &Group<K, T>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        T: Clone + Send + 'static,
    {
        self.group
            .get_or_init(|| Box::new(Group::<K, T>::new()))
            .downcast_ref()
            .unwrap_or_else(|| {
                panic!(
                    "a coalescing service was called with a second request or response type \
                     (key {}); build one service per request type",
                    any::type_name::<K>()
                )
            })
    }
}

impl fmt::Debug for LazyGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LazyGroup")
            .field("initialized", &self.group.get().is_some())
            .finish()
    }
}
