//! One future, then the future its output makes, in one enum: the two never take room side
//! by side.
//!
//! An `async` block that awaits one future and then another keeps what it captured for its
//! whole life, beside whichever future it awaits (rustc does not overlap captures with
//! later locals), so a keyed request's future held its head, its body's read and its
//! flight at once: 1.5 KB, past what the allocator's per-thread cache serves. `futures`'
//! `then` overlaps them too, but a chain of combinators is moved into each wrapper in turn
//! (`then`, `map`, `Either`), a copy of the whole future each time, which cost more than
//! the room saved. This is made once, where it is boxed.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

pin_project! {
    /// `first`, then the future `next` makes of its output; `done` sees the output before
    /// the caller does.
    pub(super) struct Then<A, F, B: Future> {
        #[pin]
        state: State<A, F, B>,
        done: fn(&B::Output),
    }
}

pin_project! {
    #[project = StateProj]
    enum State<A, F, B> {
        // `next` is taken out when `first` completes (an `Option`, rather than the state
        // replaced to take it, which copied the whole state out and back).
        First { #[pin] first: A, next: Option<F> },
        Second { #[pin] second: B },
        Gone,
    }
}

impl<A, F, B> Then<A, F, B>
where
    A: Future,
    F: FnOnce(A::Output) -> B,
    B: Future,
{
    pub(super) fn new(first: A, next: F, done: fn(&B::Output)) -> Self {
        Then {
            state: State::First {
                first,
                next: Some(next),
            },
            done,
        }
    }
}

impl<A, F, B> Future for Then<A, F, B>
where
    A: Future,
    F: FnOnce(A::Output) -> B,
    B: Future,
{
    type Output = B::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<B::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::First { first, next } => {
                    let output = ready!(first.poll(cx));
                    let next = next
                        .take()
                        .expect("taken once, when the first future completes");
                    this.state.set(State::Second {
                        second: next(output),
                    });
                }
                StateProj::Second { second } => {
                    let output = ready!(second.poll(cx));
                    this.state.set(State::Gone);
                    (this.done)(&output);
                    return Poll::Ready(output);
                }
                StateProj::Gone => panic!("`Then` polled after it completed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static DONE: AtomicUsize = AtomicUsize::new(0);

    #[tokio::test]
    async fn the_second_future_runs_on_the_first_ones_output_and_done_sees_it() {
        let first = async {
            tokio::task::yield_now().await;
            20
        };
        let then = Then::new(
            first,
            |n| async move {
                tokio::task::yield_now().await;
                n + 1
            },
            |n| DONE.store(*n, Ordering::Relaxed),
        );
        assert_eq!(then.await, 21);
        assert_eq!(DONE.load(Ordering::Relaxed), 21);
    }

    #[test]
    fn the_two_futures_share_their_room() {
        let big = async {
            let buffer = [0u8; 512];
            std::future::ready(()).await;
            buffer.len()
        };
        let then = Then::new(big, |_| std::future::ready([0u8; 512]), |_| {});
        assert!(std::mem::size_of_val(&then) < 512 + 512);
    }
}
