//! The coalescers as issue 36's fan-in harness calls them: `benches/coalesce.rs` and
//! `examples/fanin_phases.rs`.

use std::convert::Infallible;
use std::future::Future;

use futures::FutureExt;
use futures::future::BoxFuture;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_coalesce::coalesce::CoalesceLayer;
use tower_coalesce::single_flight::Group;

/// A coalescer as the independent fan-in harness of issue 36 calls it.
pub trait Dedup: Send + Sync + 'static {
    fn call<F>(&self, key: u64, work: F) -> impl Future<Output = u64> + Send
    where
        F: Future<Output = u64> + Send + 'static;
}

impl Dedup for Group<u64, u64> {
    fn call<F>(&self, key: u64, work: F) -> impl Future<Output = u64> + Send
    where
        F: Future<Output = u64> + Send + 'static,
    {
        self.run(key, move || work).map(|o| o.into_value())
    }
}

/// The Tower face: `CoalesceLayer` over a service that runs the boxed work it is given.
#[derive(Clone)]
pub struct TowerFace<S>(S);

/// A call of the Tower face: the key, and the work (a `Box` per call).
pub struct Job(u64, BoxFuture<'static, u64>);

impl<S> Dedup for TowerFace<S>
where
    S: Service<Job, Response = u64, Error = Infallible> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    fn call<F>(&self, key: u64, work: F) -> impl Future<Output = u64> + Send
    where
        F: Future<Output = u64> + Send + 'static,
    {
        let svc = self.0.clone();
        async move { svc.oneshot(Job(key, work.boxed())).await.unwrap() }
    }
}

/// `CoalesceLayer` over a service that runs the boxed work it is given.
pub fn tower_face() -> TowerFace<
    impl Service<Job, Response = u64, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + Sync
    + 'static,
> {
    let layer = CoalesceLayer::new(|job: &Job| Some(job.0));
    TowerFace(layer.layer(service_fn(|job: Job| job.1.map(Ok::<_, Infallible>))))
}
