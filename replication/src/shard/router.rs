//! Cross-shard routing: every shard has a bounded queue of jobs; a job sent to a shard runs
//! there as a task, with that shard's state. A partition's work goes to the shard owning it
//! (see [`super::table`]); nothing else crosses shards.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::cross_wake;

/// Jobs queued per shard before senders wait (backpressure across shards).
pub const SHARD_QUEUE_DEPTH: usize = 4096;

/// A shard's state as jobs see it: the one value per executor thread that work sent to the
/// shard runs with.
pub trait ShardState: 'static {
    /// This shard's index.
    fn shard_id(&self) -> usize;
    /// The state of the shard running on this thread, if any.
    fn current() -> Option<Rc<Self>>;
}

/// Work sent to another shard: runs there with that shard's state.
pub type Job<S> = Box<dyn FnOnce(Rc<S>) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// The shard a job was sent to is gone (its executor stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("shard {0} is not reachable")]
pub struct ShardUnavailable(pub usize);

/// Routes work to shards. Cheap to clone; `Send`.
pub struct Router<S> {
    senders: Arc<Vec<flume::Sender<Job<S>>>>,
    /// Client connections each shard serves (or has been given and is about to serve): the
    /// kernel spreads SO_REUSEPORT accepts by a hash of the peer's address, which can put every
    /// connection on one shard; accepts are rebalanced by these counts.
    connections: Arc<Vec<AtomicUsize>>,
}

impl<S> Clone for Router<S> {
    fn clone(&self) -> Self {
        Router {
            senders: self.senders.clone(),
            connections: self.connections.clone(),
        }
    }
}

impl<S: ShardState> Router<S> {
    /// A router over `shards` queues; the receivers go to the shards' job loops.
    pub fn new(shards: usize) -> (Router<S>, Vec<flume::Receiver<Job<S>>>) {
        assert!(shards > 0, "at least one shard");
        let (senders, receivers) = (0..shards)
            .map(|_| flume::bounded(SHARD_QUEUE_DEPTH))
            .unzip();
        (
            Router {
                senders: Arc::new(senders),
                connections: Arc::new((0..shards).map(|_| AtomicUsize::new(0)).collect()),
            },
            receivers,
        )
    }

    /// Picks the shard that will serve a connection accepted on shard `here`: the one with the
    /// fewest connections, `here` on a tie (no hand-off). The pick is counted at once, so
    /// accepts on several shards at the same moment do not all pick the same shard. Pair with
    /// [`Self::release_connection`] when the connection ends.
    pub fn claim_connection(&self, here: usize) -> usize {
        let load = |i: usize| self.connections[i].load(Ordering::Acquire);
        let mut best = here.min(self.shards() - 1);
        for i in 0..self.shards() {
            if load(i) < load(best) {
                best = i;
            }
        }
        self.connections[best].fetch_add(1, Ordering::AcqRel);
        best
    }

    /// A connection counted by [`Self::claim_connection`] on `shard` has ended.
    pub fn release_connection(&self, shard: usize) {
        let before = self.connections[shard].fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "released more connections than claimed");
    }

    pub fn shards(&self) -> usize {
        self.senders.len()
    }

    /// Runs `f` on shard `shard` with its state and returns the result here. Runs in place when
    /// `shard` is the current one.
    pub async fn run_on<T, F, Fut>(&self, shard: usize, f: F) -> Result<T, ShardUnavailable>
    where
        T: Send + 'static,
        F: FnOnce(Rc<S>) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        if let Some(current) = S::current().filter(|s| s.shard_id() == shard) {
            return Ok(f(current).await);
        }
        let sender = self.senders.get(shard).ok_or(ShardUnavailable(shard))?;
        let (tx, rx) = flume::bounded(1);
        let job: Job<S> = Box::new(move |s| {
            Box::pin(async move {
                let _ = tx.send(f(s).await);
            })
        });
        // The other shard wakes (and drops the waker of) both waits: see cross_wake.
        cross_wake::send(sender, job)
            .await
            .map_err(|_| ShardUnavailable(shard))?;
        cross_wake::recv(&rx)
            .await
            .map_err(|_| ShardUnavailable(shard))
    }

    /// Runs `f` on every shard, each with its own copy of `f`.
    pub async fn broadcast<T, F, Fut>(&self, f: F) -> Vec<Result<T, ShardUnavailable>>
    where
        T: Send + 'static,
        F: Fn(Rc<S>) -> Fut + Send + Clone + 'static,
        Fut: Future<Output = T> + 'static,
    {
        let tasks: Vec<_> = (0..self.shards())
            .map(|i| {
                let (router, f) = (self.clone(), f.clone());
                glommio::spawn_local(async move { router.run_on(i, f).await })
            })
            .collect();
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await);
        }
        out
    }

    /// Queues a job from outside any executor (signal handling), blocking while the queue is
    /// full.
    pub fn send_blocking(&self, shard: usize, job: Job<S>) -> Result<(), ShardUnavailable> {
        self.senders
            .get(shard)
            .ok_or(ShardUnavailable(shard))?
            .send(job)
            .map_err(|_| ShardUnavailable(shard))
    }
}
