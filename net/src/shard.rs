//! A shard: one pinned executor's share of the broker. It alone owns its partitions; other
//! shards reach them only by sending it work over a cross-shard channel ([`Router::run_on`]).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};

use glommio::sync::Semaphore;
use kafka_protocol::ResponseError;

use crate::config::BrokerConfig;
use crate::cross_wake;
use crate::error::NetError;
use crate::metadata::{MetadataStore, Topics};
pub use spate_replication::partition::TopicPartition;
use spate_replication::partition::{
    apply_topic_configs, LiveLimits, PartitionReplica, ReplicaConfig, TopicPolicy,
};
pub use spate_replication::shard_table::shard_of;

/// Work sent to another shard: runs there with that shard's state.
pub type Job = Box<dyn FnOnce(Rc<Shard>) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// Jobs queued per shard before senders wait (backpressure across shards).
pub const SHARD_QUEUE_DEPTH: usize = 4096;

thread_local! {
    static CURRENT: RefCell<Option<Rc<Shard>>> = const { RefCell::new(None) };
}

/// Routes work to the shard owning a partition. Cheap to clone; `Send`.
#[derive(Clone)]
pub struct Router {
    senders: Arc<Vec<flume::Sender<Job>>>,
    /// Client connections each shard serves (or has been given and is about to serve): the
    /// kernel spreads SO_REUSEPORT accepts by a hash of the peer's address, which can put every
    /// connection on one shard; accepts are rebalanced by these counts.
    connections: Arc<Vec<AtomicUsize>>,
}

impl Router {
    /// A router over `shards` queues; the receivers go to the shards' job loops.
    pub fn new(shards: usize) -> (Router, Vec<flume::Receiver<Job>>) {
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

    /// The shard owning a partition: fixed for a given topic, partition and shard count, and
    /// consecutive partitions of a topic land on consecutive shards.
    pub fn shard_for(&self, topic: &str, partition: i32) -> usize {
        shard_of(topic, partition, self.shards())
    }

    /// Runs `f` on shard `shard` with its state and returns the result here. Runs in place when
    /// `shard` is the current one.
    pub async fn run_on<T, F, Fut>(&self, shard: usize, f: F) -> Result<T, NetError>
    where
        T: Send + 'static,
        F: FnOnce(Rc<Shard>) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        if let Some(current) = Shard::current().filter(|s| s.id == shard) {
            return Ok(f(current).await);
        }
        let sender = self
            .senders
            .get(shard)
            .ok_or(NetError::ShardUnavailable(shard))?;
        let (tx, rx) = flume::bounded(1);
        let job: Job = Box::new(move |s| {
            Box::pin(async move {
                let _ = tx.send(f(s).await);
            })
        });
        // The other shard wakes (and drops the waker of) both waits: see cross_wake.
        cross_wake::send(sender, job)
            .await
            .map_err(|_| NetError::ShardUnavailable(shard))?;
        cross_wake::recv(&rx)
            .await
            .map_err(|_| NetError::ShardUnavailable(shard))
    }

    /// Runs `f` on every shard, each with its own copy of `f`.
    pub async fn broadcast<T, F, Fut>(&self, f: F) -> Vec<Result<T, NetError>>
    where
        T: Send + 'static,
        F: Fn(Rc<Shard>) -> Fut + Send + Clone + 'static,
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
}

/// A level-triggered wake-up for tasks of one shard: waiters remember the generation they saw
/// and wake when it moves.
#[derive(Default)]
pub struct Signal {
    generation: Cell<u64>,
    wakers: RefCell<Vec<Waker>>,
}

impl Signal {
    pub fn generation(&self) -> u64 {
        self.generation.get()
    }
    pub fn notify(&self) {
        self.generation.set(self.generation.get() + 1);
        for w in self.wakers.take() {
            w.wake();
        }
    }
    /// Resolves once [`Self::notify`] was called after generation `since`.
    pub fn changed(&self, since: u64) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.generation.get() != since {
                Poll::Ready(())
            } else {
                self.wakers.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}

/// Orders the appends of one connection's Produce requests: Kafka promises that requests on a
/// connection take effect in the order they were sent, while this broker runs them
/// concurrently. Each Produce takes a ticket when it is read; it appends when its turn comes
/// and passes the turn on once its batches are in the logs (durability waits overlap).
#[derive(Default)]
pub struct ProduceOrder {
    next_ticket: Cell<u64>,
    turn: Cell<u64>,
    changed: Signal,
}

impl ProduceOrder {
    /// Called in request order, before the request's task starts.
    pub fn take_ticket(self: &Rc<Self>) -> ProduceTurn {
        let ticket = self.next_ticket.get();
        self.next_ticket.set(ticket + 1);
        ProduceTurn {
            order: self.clone(),
            ticket,
            passed: Cell::new(false),
        }
    }
}

/// A place in a connection's Produce order; dropping it passes the turn on.
pub struct ProduceTurn {
    order: Rc<ProduceOrder>,
    ticket: u64,
    passed: Cell<bool>,
}

impl ProduceTurn {
    pub async fn wait(&self) {
        loop {
            let seen = self.order.changed.generation();
            if self.order.turn.get() == self.ticket {
                return;
            }
            self.order.changed.changed(seen).await;
        }
    }

    /// Lets the next Produce of the connection append (also done on drop).
    pub fn pass(&self) {
        if self.passed.replace(true) {
            return;
        }
        // A turn is passed only by its holder, or by a request that never got it because
        // it failed before waiting; either way tickets are taken in order, so wait-free
        // passing keeps the sequence: skip ahead only when it is this ticket's turn.
        if self.order.turn.get() == self.ticket {
            self.order.turn.set(self.ticket + 1);
            self.order.changed.notify();
        } else {
            let order = self.order.clone();
            let ticket = self.ticket;
            glommio::spawn_local(async move {
                let turn = ProduceTurn {
                    order,
                    ticket,
                    passed: Cell::new(true),
                };
                turn.wait().await;
                turn.order.turn.set(ticket + 1);
                turn.order.changed.notify();
            })
            .detach();
        }
    }
}

impl Drop for ProduceTurn {
    fn drop(&mut self) {
        self.pass();
    }
}

pub struct Shard {
    pub id: usize,
    pub router: Router,
    pub config: Arc<BrokerConfig>,
    pub metadata: Arc<MetadataStore>,
    cached_topics: RefCell<(u64, Topics)>,
    partitions: RefCell<HashMap<TopicPartition, Rc<PartitionReplica>>>,
    /// Replicas whose open failed, with the error code requests for them get.
    failed_opens: RefCell<HashMap<TopicPartition, i16>>,
    /// Serialises opening partitions (rare) so two tasks never open one log twice.
    open_lock: Semaphore,
    /// Notified when a high watermark on this shard advances; long-polling fetches wait on it.
    pub data_arrived: Signal,
    /// Notified once when the broker starts shutting down.
    pub shutdown: Signal,
    shutting_down: Cell<bool>,
    /// Open connections accepted by this shard.
    pub connections: Cell<usize>,
    pub connections_changed: Signal,
    /// This shard's metric handles; only this shard writes them.
    pub metrics: crate::metrics::ShardMetrics,
    /// Memory for this shard's requests and replies (see `budget`).
    pub request_budget: Rc<crate::budget::RequestBudget>,
    /// Requests read on this shard so far; the allocator is trimmed only while it stands still.
    pub requests_read: Cell<u64>,
    /// Connections of this shard closed so far.
    pub connections_closed: Cell<u64>,
}

impl Shard {
    pub fn new(
        id: usize,
        router: Router,
        config: Arc<BrokerConfig>,
        metadata: Arc<MetadataStore>,
        metrics: &Arc<crate::metrics::Metrics>,
    ) -> Rc<Shard> {
        let topics = (metadata.version(), metadata.topics());
        let request_budget = crate::budget::RequestBudget::new(config.shard_request_memory_bytes());
        let shard_metrics = metrics.for_shard(id);
        request_budget.export_to(
            shard_metrics.request_memory_used.clone(),
            shard_metrics.request_memory_waits.clone(),
        );
        let shard = Rc::new(Shard {
            id,
            router,
            config,
            metadata,
            cached_topics: RefCell::new(topics),
            partitions: RefCell::default(),
            failed_opens: RefCell::default(),
            open_lock: Semaphore::new(1),
            data_arrived: Signal::default(),
            shutdown: Signal::default(),
            shutting_down: Cell::new(false),
            connections: Cell::new(0),
            connections_changed: Signal::default(),
            metrics: shard_metrics,
            request_budget,
            requests_read: Cell::new(0),
            connections_closed: Cell::new(0),
        });
        CURRENT.with(|c| *c.borrow_mut() = Some(shard.clone()));
        shard
    }

    /// The shard of the executor running on this thread, if any.
    pub fn current() -> Option<Rc<Shard>> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// Drops the thread-local reference so the shard can be freed at exit.
    pub fn clear_current() {
        CURRENT.with(|c| c.borrow_mut().take());
    }

    /// The topic metadata, refreshed only when the store's version moved.
    /// Applies a topic's changed configs to its logs open on this shard. Only the live limits
    /// change now (retention, max batch size); segment size applies when a log is next opened.
    pub fn reconfigure_topic(
        &self,
        topic: &str,
        configs: &std::collections::BTreeMap<String, String>,
    ) {
        let mut lc = self.config.log_config();
        apply_topic_configs(&mut lc, configs);
        let limits = LiveLimits::of(&lc);
        let policy = TopicPolicy::of(configs);
        for (tp, p) in self.partitions.borrow().iter() {
            if &*tp.topic == topic {
                p.set_policy(policy);
                if let Err(e) = p.set_limits(limits) {
                    tracing::warn!(topic, partition = tp.partition, error = %e, "topic config not applied");
                }
            }
        }
    }

    pub fn topics(&self) -> Topics {
        let version = self.metadata.version();
        let mut cached = self.cached_topics.borrow_mut();
        if cached.0 != version {
            *cached = (version, self.metadata.topics());
        }
        cached.1.clone()
    }

    /// Error code if the topic or partition does not exist.
    pub fn check_exists(&self, topic: &str, partition: i32) -> Result<(), i16> {
        match self.topics().get(topic) {
            Some(t) if partition >= 0 && partition < t.partitions => Ok(()),
            _ => Err(ResponseError::UnknownTopicOrPartition.code()),
        }
    }

    pub fn begin_shutdown(&self) {
        if !self.shutting_down.replace(true) {
            self.shutdown.notify();
        }
    }
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.get()
    }

    pub fn partition_dir(&self, tp: &TopicPartition) -> PathBuf {
        self.config.data_dir.join(tp.dir_name())
    }

    /// The open replica of a partition this shard owns. A getter: it never opens a log (that
    /// is [`Self::open_partition`], at start-up and when a topic is created). Must run on the
    /// owning shard. The error is a Kafka error code.
    pub fn partition(&self, tp: &TopicPartition) -> Result<Rc<PartitionReplica>, i16> {
        debug_assert_eq!(self.router.shard_for(&tp.topic, tp.partition), self.id);
        if let Some(p) = self.partitions.borrow().get(tp) {
            return Ok(p.clone());
        }
        self.check_exists(&tp.topic, tp.partition)?;
        if let Some(code) = self.failed_opens.borrow().get(tp) {
            return Err(*code);
        }
        // Created a moment ago and still being opened: clients retry this code.
        Err(ResponseError::NotLeaderOrFollower.code())
    }

    /// Opens the replicas of every partition in the topic metadata (of `topic` only, if
    /// given) that this shard owns and has not opened: at start-up, and on every shard after a
    /// topic or partitions were created.
    pub async fn open_owned_partitions(&self, topic: Option<&str>) {
        let topics = self.topics();
        for t in topics
            .values()
            .filter(|t| topic.is_none_or(|n| n == t.name))
        {
            for p in 0..t.partitions {
                let tp = TopicPartition::new(&t.name, p);
                if self.router.shard_for(&t.name, p) != self.id
                    || self.partitions.borrow().contains_key(&tp)
                {
                    continue;
                }
                // A failure is logged and kept for the requests that name the partition.
                let _ = self.open_partition(&tp).await;
            }
        }
    }

    /// Opens the replicas of `topic`'s new partitions on the shards that own them, and waits
    /// until they are open, so that the client that created them finds them.
    pub async fn open_topic_on_owners(&self, topic: &str) {
        let topic: Arc<str> = Arc::from(topic);
        let opened = self
            .router
            .broadcast(move |s| {
                let topic = topic.clone();
                async move { s.open_owned_partitions(Some(&topic)).await }
            })
            .await;
        for r in opened {
            if let Err(e) = r {
                tracing::warn!(error = %e, "cannot open new partitions on a shard");
            }
        }
    }

    /// Opens (and recovers) the replica of `tp`, which this shard owns, unless it is open.
    /// The error is a Kafka error code, also kept for later requests.
    pub async fn open_partition(&self, tp: &TopicPartition) -> Result<(), i16> {
        debug_assert_eq!(self.router.shard_for(&tp.topic, tp.partition), self.id);
        if self.partitions.borrow().contains_key(tp) {
            return Ok(());
        }
        self.check_exists(&tp.topic, tp.partition)?;
        let _guard = self
            .open_lock
            .acquire_permit(1)
            .await
            .map_err(|_| ResponseError::NotLeaderOrFollower.code())?;
        if self.partitions.borrow().contains_key(tp) {
            return Ok(());
        }
        if self.is_shutting_down() {
            return Err(ResponseError::NotLeaderOrFollower.code());
        }
        let mut log_config = self.config.log_config();
        let mut policy = TopicPolicy::default();
        if let Some(t) = self.topics().get(&*tp.topic) {
            apply_topic_configs(&mut log_config, &t.configs);
            policy = TopicPolicy::of(&t.configs);
        }
        let config = ReplicaConfig {
            log: log_config,
            high_watermark_cap: self.config.test_high_watermark_cap,
        };
        let partition = PartitionReplica::open(
            tp.clone(),
            self.partition_dir(tp),
            Some(producer_state_path(&self.config.data_dir, tp)),
            config,
            Box::new(self.metrics.partition(tp)),
        )
        .await
        .map_err(|e| {
            tracing::error!(topic = %tp.topic, partition = tp.partition, error = %e, "cannot open partition");
            self.failed_opens.borrow_mut().insert(tp.clone(), e.code());
            e.code()
        })?;
        partition.set_policy(policy);
        self.failed_opens.borrow_mut().remove(tp);
        self.partitions
            .borrow_mut()
            .insert(tp.clone(), Rc::new(partition));
        Ok(())
    }

    /// Closes and deletes every open or on-disk partition of `topic` owned by this shard, for
    /// partitions `0..partitions`.
    pub async fn delete_partitions(&self, topic: &str, partitions: i32) {
        for p in 0..partitions {
            if self.router.shard_for(topic, p) != self.id {
                continue;
            }
            let tp = TopicPartition::new(topic, p);
            self.failed_opens.borrow_mut().remove(&tp);
            let open = self.partitions.borrow_mut().remove(&tp);
            if let Some(part) = open {
                if let Err(e) = part.delete().await {
                    tracing::warn!(topic, partition = p, error = %e, "deleting partition log");
                }
            } else {
                let dir = self.partition_dir(&tp);
                if dir.exists() {
                    if let Err(e) = std::fs::remove_dir_all(&dir) {
                        tracing::warn!(topic, partition = p, error = %e, "removing partition dir");
                    }
                }
            }
            let _ = std::fs::remove_file(producer_state_path(&self.config.data_dir, &tp));
        }
    }

    /// Deletes segments past the retention limits in every open partition of this shard.
    pub async fn apply_retention(&self) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let open: Vec<_> = self.partitions.borrow().values().cloned().collect();
        for p in open {
            if let Err(e) = p.apply_retention(now_ms).await {
                tracing::warn!(topic = %p.tp.topic, partition = p.tp.partition, error = %e, "retention failed");
            }
        }
    }

    /// One round of the log cleaner over this shard's compacted partitions, dirtiest first.
    pub async fn clean_logs(&self) {
        spate_replication::partition::clean_logs(
            &self.open_partitions(),
            &self.config.shard_cleaner_config(),
            || self.is_shutting_down(),
        )
        .await;
    }

    fn open_partitions(&self) -> Vec<Rc<PartitionReplica>> {
        self.partitions.borrow().values().cloned().collect()
    }

    /// Writes producer-state snapshots of partitions whose state changed.
    pub async fn snapshot_producers(&self) {
        let open: Vec<_> = self.partitions.borrow().values().cloned().collect();
        for p in open {
            if let Err(e) = p.snapshot_producers().await {
                tracing::warn!(topic = %p.tp.topic, partition = p.tp.partition, error = %e, "producer snapshot failed");
            }
        }
    }

    /// Flushes and closes every partition of this shard.
    pub async fn close_partitions(&self) {
        let all: Vec<_> = self.partitions.borrow_mut().drain().collect();
        for (tp, p) in all {
            if let Err(e) = p.close().await {
                tracing::error!(topic = %tp.topic, partition = tp.partition, error = %e, "closing partition");
            }
        }
    }
}

/// Producer-state snapshots live beside, not inside, the log directories, which belong to
/// the engine.
pub fn producer_state_path(data_dir: &std::path::Path, tp: &TopicPartition) -> PathBuf {
    data_dir
        .join("producer-state")
        .join(format!("{}.json", tp.dir_name()))
}

impl Router {
    /// Queues a job from outside any executor (signal handling), blocking while the queue is
    /// full.
    pub fn send_blocking(&self, shard: usize, job: Job) -> Result<(), NetError> {
        self.senders
            .get(shard)
            .ok_or(NetError::ShardUnavailable(shard))?
            .send(job)
            .map_err(|_| NetError::ShardUnavailable(shard))
    }
}
