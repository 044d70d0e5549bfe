use std::hash::Hash;

/// Derives the coalescing key of a request.
///
/// `None` means "do not coalesce this request": it goes straight to the inner service.
/// Requests whose keys are equal and whose calls overlap in time share one call of the
/// inner service.
///
/// # Panics
///
/// `make_key` runs in [`Service::call`](tower::Service::call), before the request joins or
/// starts a flight: if it panics, only that caller panics, and no flight is affected.
///
/// Implemented for every closure `Fn(&Req) -> Option<K>`:
///
/// ```
/// use tower_coalesce::coalesce::MakeKey;
///
/// struct CreateClient { client_id: String }
///
/// let by_client = |req: &CreateClient| Some(req.client_id.clone());
/// let key = by_client.make_key(&CreateClient { client_id: "c-1".into() });
/// assert_eq!(key.as_deref(), Some("c-1"));
/// ```
pub trait MakeKey<Req> {
    /// The key. It is cloned once per flight and hashed once per request.
    type Key: Hash + Eq + Clone + Send + Sync + 'static;

    /// Returns the key of `req`, or `None` to pass it through uncoalesced.
    fn make_key(&self, req: &Req) -> Option<Self::Key>;

    /// Whether the key is read from the request body rather than its head: the HTTP layer
    /// then reads the body before it makes the key (as for `http::key::json`). `false`
    /// unless a key maker says otherwise; a tuple reads the body if any part does.
    fn reads_body(&self) -> bool {
        false
    }

    /// Why `req` has no key, when this key maker can tell more than "none": the HTTP
    /// layer puts it in the warning it logs for the first request without a key, so that
    /// a misconfigured key names its fix (as `http::key::path_param` does for a pattern
    /// that misses a `Router::nest` prefix). `None` by default.
    fn why_no_key(&self, req: &Req) -> Option<String> {
        let _ = req;
        None
    }
}

impl<F, Req, K> MakeKey<Req> for F
where
    F: Fn(&Req) -> Option<K>,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Key = K;

    fn make_key(&self, req: &Req) -> Option<K> {
        self(req)
    }
}

/// Combines key makers: the key is the tuple of their keys, and `None` if any of them
/// returns `None`. For example, an idempotency key together with the method and path.
macro_rules! impl_make_key_for_tuple {
    ($($name:ident),+) => {
        impl<Req, $($name),+> MakeKey<Req> for ($($name,)+)
        where
            $($name: MakeKey<Req>,)+
        {
            type Key = ($($name::Key,)+);

            #[allow(non_snake_case)]
            fn make_key(&self, req: &Req) -> Option<Self::Key> {
                let ($($name,)+) = self;
                Some(($($name.make_key(req)?,)+))
            }

            #[allow(non_snake_case)]
            fn reads_body(&self) -> bool {
                let ($($name,)+) = self;
                false $(|| $name.reads_body())+
            }

            #[allow(non_snake_case)]
            fn why_no_key(&self, req: &Req) -> Option<String> {
                let ($($name,)+) = self;
                $(
                    if $name.make_key(req).is_none() {
                        return $name.why_no_key(req);
                    }
                )+
                None
            }
        }
    };
}

impl_make_key_for_tuple!(A, B);
impl_make_key_for_tuple!(A, B, C);
impl_make_key_for_tuple!(A, B, C, D);
