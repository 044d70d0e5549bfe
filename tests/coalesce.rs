//! The Tower face: `CoalesceLayer` over real services, under a multi-thread runtime.

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_coalesce::coalesce::{Coalesce, CoalesceLayer};

use support::{Counter, Gate};

#[derive(Clone, Debug)]
struct Req {
    client_id: Option<String>,
}

fn req(id: &str) -> Req {
    Req {
        client_id: Some(id.to_owned()),
    }
}

fn by_client(req: &Req) -> Option<String> {
    req.client_id.clone()
}

/// A handler that counts its executions and waits at a gate, like an INSERT in flight.
fn gated_handler(
    calls: Counter,
    gate: Gate,
) -> impl Service<Req, Response = String, Error = Infallible, Future: Send> + Clone + Send {
    service_fn(move |req: Req| {
        let (calls, gate) = (calls.clone(), gate.clone());
        async move {
            let n = calls.incr();
            gate.pass().await;
            Ok(format!("{:?}#{n}", req.client_id))
        }
    })
}

/// Spawns `n` callers of `svc` that all start at once; returns once each has called.
async fn spawn_callers<S>(
    svc: &S,
    n: usize,
    make: impl Fn(usize) -> Req,
) -> Vec<tokio::task::JoinHandle<Result<String, Infallible>>>
where
    S: Service<Req, Response = String, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let called = Counter::default();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    let handles = (0..n)
        .map(|i| {
            let (mut svc, called, barrier, req) =
                (svc.clone(), called.clone(), barrier.clone(), make(i));
            tokio::spawn(async move {
                barrier.wait().await;
                let fut = svc.ready().await?.call(req);
                called.incr();
                fut.await
            })
        })
        .collect();
    called.reach(n).await;
    handles
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_same_key_requests_call_the_inner_service_once() {
    for _ in 0..10 {
        let (calls, gate) = (Counter::default(), Gate::closed());
        let svc = ServiceBuilder::new()
            .layer(CoalesceLayer::new(by_client))
            .service(gated_handler(calls.clone(), gate.clone()));
        let handles = spawn_callers(&svc, 200, |_| req("qg2X9STk79i")).await;
        gate.open();
        for handle in handles {
            assert_eq!(handle.await.unwrap().unwrap(), "Some(\"qg2X9STk79i\")#0");
        }
        assert_eq!(calls.get(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distinct_keys_and_unkeyed_requests_are_not_coalesced() {
    let (calls, gate) = (Counter::default(), Gate::closed());
    let svc = CoalesceLayer::new(by_client).layer(gated_handler(calls.clone(), gate.clone()));
    let handles = spawn_callers(&svc, 60, |i| match i % 3 {
        0 => req("a"),
        1 => req(&format!("k{i}")),
        _ => Req { client_id: None },
    })
    .await;
    gate.open();
    let mut results = Vec::new();
    for handle in handles {
        results.push(handle.await.unwrap().unwrap());
    }
    // One call for the 20 "a" requests, one per distinct key, one per unkeyed request.
    assert_eq!(calls.get(), 1 + 20 + 20);
    assert_eq!(
        results
            .iter()
            .filter(|r| r.starts_with("Some(\"a\")"))
            .collect::<std::collections::HashSet<_>>()
            .len(),
        1
    );
    let unkeyed: std::collections::HashSet<_> =
        results.iter().filter(|r| r.starts_with("None")).collect();
    assert_eq!(unkeyed.len(), 20, "every unkeyed request ran on its own");
}

/// Followers need no capacity of the inner service: with `concurrency_limit(1)` below the
/// layer, 100 callers of one key are served by one inner call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_need_no_inner_capacity() {
    let (calls, gate) = (Counter::default(), Gate::closed());
    let svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new(by_client))
        .concurrency_limit(1)
        .service(gated_handler(calls.clone(), gate.clone()));
    let handles = spawn_callers(&svc, 100, |_| req("one")).await;
    gate.open();
    for handle in handles {
        let served = tokio::time::timeout(Duration::from_secs(10), handle).await;
        assert_eq!(
            served
                .expect("a follower queued for inner capacity")
                .unwrap()
                .unwrap(),
            "Some(\"one\")#0"
        );
    }
    assert_eq!(calls.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clones_share_the_registry_and_separate_layers_do_not() {
    let (calls, gate) = (Counter::default(), Gate::closed());
    let layer = CoalesceLayer::new(by_client);
    let first = layer.layer(gated_handler(calls.clone(), gate.clone()));
    let second = layer.layer(gated_handler(calls.clone(), gate.clone()));

    let mut joined = spawn_callers(&first, 10, |_| req("k")).await;
    joined.extend(spawn_callers(&first.clone(), 10, |_| req("k")).await);
    joined.extend(spawn_callers(&second, 10, |_| req("k")).await);
    gate.open();
    let mut results = std::collections::HashSet::new();
    for handle in joined {
        results.insert(handle.await.unwrap().unwrap());
    }
    assert_eq!(
        calls.get(),
        2,
        "one call for `first` and its clone, one for `second`"
    );
    assert_eq!(results.len(), 2);
}

/// An inner service whose `poll_ready` fails: the error reaches every caller of the
/// flight, and is not remembered.
struct FailsReady {
    fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
    gate: Gate,
    errors: Counter,
    opening: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Clone for FailsReady {
    fn clone(&self) -> Self {
        // A clone is not ready: it waits at the gate itself.
        FailsReady {
            fail: self.fail.clone(),
            gate: self.gate.clone(),
            errors: self.errors.clone(),
            opening: None,
        }
    }
}

impl Service<Req> for FailsReady {
    type Response = &'static str;
    type Error = String;
    type Future = Pin<Box<dyn Future<Output = Result<&'static str, String>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        let gate = self.gate.clone();
        let opening = self
            .opening
            .get_or_insert_with(|| Box::pin(async move { gate.pass().await }));
        if opening.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.opening = None;
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            self.errors.incr();
            Poll::Ready(Err("database unavailable".into()))
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn call(&mut self, _: Req) -> Self::Future {
        Box::pin(async { Ok("created") })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poll_ready_error_reaches_every_caller_and_is_not_remembered() {
    let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let gate = Gate::closed();
    let errors = Counter::default();
    let inner = FailsReady {
        fail: fail.clone(),
        gate: gate.clone(),
        errors: errors.clone(),
        opening: None,
    };
    let mut svc = CoalesceLayer::new(by_client).layer(inner);

    let mut callers = Vec::new();
    for _ in 0..50 {
        callers.push(tokio::spawn(svc.ready().await.unwrap().call(req("k"))));
    }
    // Every caller joined in `call`; the gate holds the leader's `poll_ready` meanwhile.
    gate.open();
    for caller in callers {
        let res = tokio::time::timeout(Duration::from_secs(10), caller)
            .await
            .expect("hang");
        assert_eq!(res.unwrap(), Err("database unavailable".to_string()));
    }
    assert_eq!(
        errors.get(),
        1,
        "one readiness failure, shared by the flight"
    );
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        svc.ready().await.unwrap().call(req("k")).await,
        Ok("created")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_leader_does_not_fail_or_repeat_the_call() {
    for _ in 0..10 {
        let (calls, gate) = (Counter::default(), Gate::closed());
        let svc = CoalesceLayer::new(by_client).layer(gated_handler(calls.clone(), gate.clone()));
        let leader = tokio::spawn(svc.clone().oneshot(req("k")));
        calls.reach(1).await;
        let followers = spawn_callers(&svc, 50, |_| req("k")).await;
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled());
        gate.open();
        for follower in followers {
            let res = tokio::time::timeout(Duration::from_secs(10), follower)
                .await
                .expect("stranded");
            assert_eq!(res.unwrap().unwrap(), "Some(\"k\")#0");
        }
        assert_eq!(calls.get(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panicking_handler_panics_every_waiter_and_the_key_works_again() {
    let gate = Gate::closed();
    let g = gate.clone();
    let attempts = Counter::default();
    let a = attempts.clone();
    let svc = CoalesceLayer::new(by_client).layer(service_fn(move |_: Req| {
        let (g, n) = (g.clone(), a.incr());
        async move {
            g.pass().await;
            if n == 0 {
                panic!("handler bug");
            }
            Ok::<_, Infallible>("ok".to_string())
        }
    }));
    let handles = spawn_callers(&svc, 100, |_| req("k")).await;
    gate.open();
    for handle in handles {
        let err = tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .expect("hang")
            .unwrap_err();
        assert!(err.is_panic());
    }
    assert_eq!(svc.oneshot(req("k")).await.unwrap(), "ok");
    assert_eq!(attempts.get(), 2);
}

#[test]
fn static_properties() {
    fn send_sync_clone<T: Send + Sync + Clone>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let svc: Coalesce<_, _> =
        CoalesceLayer::new(by_client).layer(service_fn(|_: Req| async { Ok::<_, Infallible>(1) }));
    send_sync_clone(&svc);
    send(&svc.clone().oneshot(req("k")));
}
