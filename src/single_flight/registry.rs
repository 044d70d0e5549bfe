use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use super::Group;

/// The [`Group`]s of one middleware, one per key and result type, made on first use.
///
/// A Tower middleware struct names its inner service but not the request type, so it can't
/// name the key and result types of its registry. Groups are therefore made on the first
/// call with each pair of types, boxed as `Any`, and downcast afterwards (a type-id
/// comparison). A service called with two request or response body types gets a group for
/// each: requests of different types never share a flight, and nothing panics. Clones share
/// the groups.
#[derive(Clone, Default)]
pub(crate) struct LazyGroup {
    groups: Arc<Groups>,
}

#[derive(Default)]
struct Groups {
    // The one pair of types nearly every service sees, found without a lock.
    first: OnceLock<Box<dyn Any + Send + Sync>>,
    others: Mutex<Vec<Box<dyn Any + Send + Sync>>>,
}

impl LazyGroup {
    /// Returns the group for keys `K` and results `T`, making it on the first call: borrowed
    /// for the first pair of types (no reference count touched per call), a clone of the
    /// shared group for any other.
    pub(crate) fn get<K, T>(&self) -> Cow<'_, Group<K, T>>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        T: Clone + Send + 'static,
    {
        let first = self
            .groups
            .first
            .get_or_init(|| Box::new(Group::<K, T>::new()));
        if let Some(group) = first.downcast_ref::<Group<K, T>>() {
            return Cow::Borrowed(group);
        }
        let mut others = self
            .groups
            .others
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(group) = others.iter().find_map(|g| g.downcast_ref::<Group<K, T>>()) {
            return Cow::Owned(group.clone());
        }
        let group = Group::<K, T>::new();
        others.push(Box::new(group.clone()));
        Cow::Owned(group)
    }
}

impl fmt::Debug for LazyGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LazyGroup")
            .field("initialized", &self.groups.first.get().is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn two_request_types_get_two_groups_and_no_panic() {
        let groups = LazyGroup::default();
        let a = groups.get::<u32, u8>().run(1, || async { 1u8 });
        let b = groups
            .get::<u32, String>()
            .run(1, || async { "b".to_owned() });
        // The same key in the other group is another flight: both lead.
        assert!(a.is_leader() && b.is_leader());
        assert_eq!(a.await.into_value(), 1);
        assert_eq!(b.await.into_value(), "b");
        assert_eq!(groups.get::<u32, String>().in_flight(), 0);
    }
}
