//! The leases and the completions of many flights in one statement each.
//!
//! A statement's own cost in PostgreSQL (a transaction, a snapshot, the executor's start
//! and end, a commit) outweighs what one row adds to it many times over: the lease
//! statement runs about 12k times a second with one key and 1.5k times with 50 (75k keys)
//! on 2 cores. So each store sends its leases through one queue and its completions
//! through another: an ask goes out at once, alone, from its caller's task, when none of
//! the queue's statements is out; the asks that arrive while statements are out go
//! together in the next one, up to [`MAX_BATCH`] asks and 1 MiB of responses. A lone
//! request waits for nobody; under load, statements carry many keys each.
//!
//! A batch holds a key once (a statement can't update a row twice); a second ask for the
//! same key waits for the next batch. Keys are sorted, so that two instances' statements
//! lock their rows in the same order and never deadlock. A failed statement fails every
//! ask in it, with its message; an ask whose caller gave up (its timeout) still gets its
//! row written, and a lease taken for nobody is released at once.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::BoxError;
use crate::store::StoreKey;

/// The most asks in one statement.
pub(super) const MAX_BATCH: usize = 256;

/// The most bytes of responses in one statement: a burst of large responses goes in
/// several statements rather than one that holds every caller up.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Statements of one queue out at once: a batch is made while others run.
const IN_FLIGHT: usize = 2;

/// What an ask gets: its answer, or the message of the statement's error.
pub(super) type Answered<A> = Result<A, Arc<str>>;

struct Ask<Q, A> {
    key: StoreKey,
    /// What the ask adds to a statement's size, as `weigh` says.
    bytes: usize,
    question: Q,
    answer: oneshot::Sender<Answered<A>>,
}

/// Sends one batch (keys unique and sorted) and answers each ask, in order.
type Run<Q, A> =
    dyn Fn(Arc<Vec<(StoreKey, Q)>>) -> BoxFuture<'static, Result<Vec<A>, BoxError>> + Send + Sync;

/// Told of an answer whose caller had gone, with the ask's question.
type Unclaimed<Q, A> = dyn Fn(StoreKey, &Q, A) -> BoxFuture<'static, ()> + Send + Sync;

/// A queue of asks of one kind, sent to PostgreSQL in batches by a task that stops when
/// the queue is dropped.
pub(super) struct Batcher<Q, A> {
    asks: mpsc::UnboundedSender<Ask<Q, A>>,
    /// Statements out, at most `IN_FLIGHT`; the queue's task holds one while it waits.
    slots: Arc<Semaphore>,
    run: Arc<Run<Q, A>>,
    weigh: fn(&Q) -> usize,
}

impl<Q: Send + Sync + 'static, A: Send + 'static> Batcher<Q, A> {
    /// Starts the queue's task: `run` sends one batch (keys unique and sorted) and answers
    /// each ask, in order; `unclaimed` is told of each answer whose caller had gone;
    /// `weigh` says how many bytes an ask adds to a statement.
    pub(super) fn start<R, F, U, G>(run: R, unclaimed: U, weigh: fn(&Q) -> usize) -> Self
    where
        R: Fn(Arc<Vec<(StoreKey, Q)>>) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Vec<A>, BoxError>> + Send + 'static,
        U: Fn(StoreKey, &Q, A) -> G + Send + Sync + 'static,
        G: Future<Output = ()> + Send + 'static,
    {
        let run: Arc<Run<Q, A>> = Arc::new(move |asks| run(asks).boxed());
        let unclaimed: Arc<Unclaimed<Q, A>> =
            Arc::new(move |key, question, answer| unclaimed(key, question, answer).boxed());
        let (asks, queue) = mpsc::unbounded_channel();
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        let task = drain(queue, slots.clone(), run.clone(), unclaimed);
        tokio::spawn(task);
        Batcher {
            asks,
            slots,
            run,
            weigh,
        }
    }

    /// Asks `question` about `key`: at once, alone, if no statement of this queue is out
    /// (so that a lone request waits for nobody and for no other task), else in the next
    /// batch.
    pub(super) async fn ask(&self, key: StoreKey, question: Q) -> Answered<A> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            let alone = (self.run)(Arc::new(vec![(key, question)])).await;
            drop(slot);
            return match alone {
                Ok(mut answers) if answers.len() == 1 => Ok(answers.remove(0)),
                Ok(answers) => Err(miscounted(answers.len(), 1)),
                Err(error) => Err(error.to_string().into()),
            };
        }
        let (answer, answered) = oneshot::channel();
        let ask = Ask {
            key,
            bytes: (self.weigh)(&question),
            question,
            answer,
        };
        if self.asks.send(ask).is_err() {
            return Err("the store's statement queue has stopped".into());
        }
        answered
            .await
            .unwrap_or_else(|_| Err("the store's statement queue has stopped".into()))
    }
}

/// The queue's task: takes what has arrived (up to `MAX_BATCH` asks, one per key) whenever
/// fewer than `IN_FLIGHT` statements are out, and sends it.
async fn drain<Q, A>(
    mut queue: mpsc::UnboundedReceiver<Ask<Q, A>>,
    slots: Arc<Semaphore>,
    run: Arc<Run<Q, A>>,
    unclaimed: Arc<Unclaimed<Q, A>>,
) where
    Q: Send + Sync + 'static,
    A: Send + 'static,
{
    let mut held_over: Vec<Ask<Q, A>> = Vec::new();
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Batch::default();
        for ask in held_over.drain(..) {
            batch.take(ask);
        }
        if batch.asks.is_empty() {
            match queue.recv().await {
                Some(ask) => batch.take(ask),
                None => return,
            }
        }
        while batch.has_room() {
            match queue.try_recv() {
                Ok(ask) => batch.take(ask),
                Err(_) => break,
            }
        }
        let Batch {
            asks: mut batch,
            later,
            ..
        } = batch;
        held_over = later;
        batch.sort_by(|a, b| a.key.as_bytes().cmp(b.key.as_bytes()));
        let (run, unclaimed) = (run.clone(), unclaimed.clone());
        tokio::spawn(async move {
            send(batch, &*run, &*unclaimed).await;
            drop(slot);
        });
    }
}

/// A batch being made: its asks, their keys and bytes, and the asks held over for the next.
struct Batch<Q, A> {
    asks: Vec<Ask<Q, A>>,
    keys: HashSet<StoreKey>,
    bytes: usize,
    later: Vec<Ask<Q, A>>,
}

impl<Q, A> Default for Batch<Q, A> {
    fn default() -> Self {
        Batch {
            asks: Vec::new(),
            keys: HashSet::new(),
            bytes: 0,
            later: Vec::new(),
        }
    }
}

impl<Q, A> Batch<Q, A> {
    fn has_room(&self) -> bool {
        self.asks.len() < MAX_BATCH && self.bytes < MAX_BATCH_BYTES
    }

    /// Puts `ask` in the batch, or aside for the next one if its key is in already or it
    /// does not fit (the first ask always does).
    fn take(&mut self, ask: Ask<Q, A>) {
        let fits = self.asks.is_empty()
            || (self.asks.len() < MAX_BATCH && self.bytes + ask.bytes <= MAX_BATCH_BYTES);
        if fits && !self.keys.contains(&ask.key) {
            self.keys.insert(ask.key.clone());
            self.bytes += ask.bytes;
            self.asks.push(ask);
        } else {
            self.later.push(ask);
        }
    }
}

/// Sends one batch and answers its asks.
async fn send<Q, A>(batch: Vec<Ask<Q, A>>, run: &Run<Q, A>, unclaimed: &Unclaimed<Q, A>)
where
    Q: Send + Sync + 'static,
    A: Send + 'static,
{
    let mut senders = Vec::with_capacity(batch.len());
    let mut questions = Vec::with_capacity(batch.len());
    for ask in batch {
        senders.push(ask.answer);
        questions.push((ask.key, ask.question));
    }
    let questions = Arc::new(questions);
    match run(questions.clone()).await {
        Ok(answers) if answers.len() == senders.len() => {
            for ((sender, answer), (key, question)) in
                senders.into_iter().zip(answers).zip(&*questions)
            {
                if let Err(Ok(answer)) = sender.send(Ok(answer)) {
                    unclaimed(key.clone(), question, answer).await;
                }
            }
        }
        Ok(answers) => {
            let message = miscounted(answers.len(), senders.len());
            for sender in senders {
                let _ = sender.send(Err(message.clone()));
            }
        }
        Err(error) => {
            let message: Arc<str> = error.to_string().into();
            for sender in senders {
                let _ = sender.send(Err(message.clone()));
            }
        }
    }
}

fn miscounted(rows: usize, asks: usize) -> Arc<str> {
    format!("postgres answered {rows} rows for a batch of {asks}").into()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    fn key(n: u8) -> StoreKey {
        StoreKey::from_bytes([n; 32])
    }

    /// Asks that arrive while a statement is out go together in the next one, a key once
    /// per statement and keys sorted, and every ask gets its own answer: 30 asks over 5
    /// keys, each statement taking 20 ms.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn asks_that_arrive_together_go_in_one_statement_a_key_once() {
        let statements: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let seen = statements.clone();
        let run = move |asks: Arc<Vec<(StoreKey, u32)>>| {
            let seen = seen.clone();
            async move {
                let keys = asks.iter().map(|(key, _)| key.as_bytes()[0]).collect();
                seen.lock().unwrap().push(keys);
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(asks
                    .iter()
                    .map(|(key, n)| (key.as_bytes()[0], *n))
                    .collect())
            }
        };
        let batcher = Arc::new(Batcher::start(run, |_, _, _| async {}, |_| 0));
        let asks = (0..30u32).map(|n| {
            let batcher = batcher.clone();
            tokio::spawn(async move { (n, batcher.ask(key((n % 5) as u8), n).await) })
        });
        for ask in futures::future::join_all(asks).await {
            let (n, answer) = ask.unwrap();
            assert_eq!(
                answer.unwrap(),
                ((n % 5) as u8, n),
                "each ask its own answer"
            );
        }
        let statements = statements.lock().unwrap();
        assert_eq!(statements.iter().map(Vec::len).sum::<usize>(), 30);
        assert!(statements.len() < 30, "batched: {statements:?}");
        for keys in statements.iter() {
            let mut sorted = keys.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(&sorted, keys, "sorted, each key once: {statements:?}");
        }
    }

    /// Large asks go in several statements: 12 asks of 400 KB over 12 keys, no statement
    /// over 1 MiB unless it holds one ask alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_asks_go_in_several_statements() {
        let sizes: Arc<Mutex<Vec<Vec<usize>>>> = Arc::default();
        let seen = sizes.clone();
        let run = move |asks: Arc<Vec<(StoreKey, usize)>>| {
            let seen = seen.clone();
            async move {
                seen.lock()
                    .unwrap()
                    .push(asks.iter().map(|(_, n)| *n).collect());
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(asks.iter().map(|_| ()).collect())
            }
        };
        let batcher = Arc::new(Batcher::start(run, |_, _, _| async {}, |n| *n));
        let asks = (0..12u8).map(|n| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.ask(key(n), 400 << 10).await })
        });
        for ask in futures::future::join_all(asks).await {
            ask.unwrap().unwrap();
        }
        let sizes = sizes.lock().unwrap();
        assert_eq!(sizes.iter().map(Vec::len).sum::<usize>(), 12);
        for statement in sizes.iter() {
            assert!(statement.iter().sum::<usize>() <= 1 << 20, "{sizes:?}");
        }
        assert!(
            sizes.iter().any(|statement| statement.len() > 1),
            "batched: {sizes:?}"
        );
    }

    /// An answer whose caller gave up while its statement was out goes to `unclaimed`
    /// with the ask's own question (a lease is released with the token that took it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_nobody_waits_for_goes_to_unclaimed_with_its_question() {
        let run = |asks: Arc<Vec<(StoreKey, &'static str)>>| async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(asks.iter().map(|_| ()).collect())
        };
        let (told, mut unclaimed) = mpsc::unbounded_channel();
        let tell = move |key: StoreKey, token: &&'static str, ()| {
            let _ = told.send((key.as_bytes()[0], *token));
            async {}
        };
        let batcher = Arc::new(Batcher::start(run, tell, |_| 0));
        // The first ask takes the free slot and goes alone; the second queues behind it
        // and its caller gives up before its statement answers.
        let first = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.ask(key(1), "token-1").await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let gave_up =
            tokio::time::timeout(Duration::from_millis(10), batcher.ask(key(2), "token-2")).await;
        assert!(gave_up.is_err());
        first.await.unwrap().unwrap();
        let told = tokio::time::timeout(Duration::from_secs(5), unclaimed.recv()).await;
        assert_eq!(told.unwrap(), Some((2, "token-2")));
    }

    /// A failed statement fails each of its asks with its message; the queue goes on.
    #[tokio::test]
    async fn a_failed_statement_fails_its_asks_and_the_queue_goes_on() {
        let run = |asks: Arc<Vec<(StoreKey, bool)>>| async move {
            match asks.iter().all(|(_, ok)| *ok) {
                true => Ok(asks.iter().map(|_| ()).collect()),
                false => Err(BoxError::from("the server said no")),
            }
        };
        let batcher = Batcher::start(run, |_, _, _| async {}, |_| 0);
        let failed = batcher.ask(key(1), false).await;
        assert_eq!(failed.unwrap_err().as_ref(), "the server said no");
        assert!(batcher.ask(key(1), true).await.is_ok());
    }
}
