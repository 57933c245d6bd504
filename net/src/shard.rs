//! A shard as the Kafka layer sees it: one pinned executor's share of the broker. Its
//! partition replicas ([`ReplicaSet`]), the placement table and cross-shard routing live in
//! spate-replication (`shard/`); this adds what serving Kafka clients needs per shard:
//! connections, the request memory budget, metrics, shutdown, and the order of a connection's
//! Produce requests. Other shards reach this one only by sending it work ([`Router::run_on`]).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use crate::config::BrokerConfig;
use crate::metadata::{MetadataStore, Topics};
use spate_replication::partition::PartitionReplica;
pub use spate_replication::partition::TopicPartition;
pub use spate_replication::shard::{
    producer_state_path, ReplicaSet, ReplicaSettings, ShardState, ShardTable, ShardUnavailable,
    Signal, SHARD_QUEUE_DEPTH,
};

/// Routes work to the shard owning a partition. Cheap to clone; `Send`.
pub type Router = spate_replication::shard::Router<Shard>;
/// Work sent to another shard: runs there with that shard's state.
pub type Job = spate_replication::shard::Job<Shard>;

thread_local! {
    static CURRENT: RefCell<Option<Rc<Shard>>> = const { RefCell::new(None) };
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
    /// The partition replicas this shard owns, and its view of the placement.
    pub replicas: Rc<ReplicaSet>,
    /// Notified when a high watermark on this shard advances; long-polling fetches wait on it.
    pub data_arrived: Signal,
    /// Notified once when the broker starts shutting down.
    pub shutdown: Signal,
    /// Wakes the shard's log cleaner before its backoff ends (the thread's
    /// `partition::cleaner_wake`): the group coordinator rings it each time it has written
    /// about a segment to a `__consumer_offsets` partition, and a `__consumer_offsets` replica
    /// when it asks for an urgent cleaning, so those are cleaned as they grow (see
    /// `group::service`, `PartitionReplica::keep_cleaned`).
    pub cleaner_wake: Rc<Signal>,
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
    /// Latched by [`Self::has_caught_up`] the first time this node's view was caught up.
    caught_up_once: Cell<bool>,
}

impl ShardState for Shard {
    fn shard_id(&self) -> usize {
        self.id
    }
    fn current() -> Option<Rc<Self>> {
        Shard::current()
    }
}

impl Shard {
    pub fn new(
        id: usize,
        router: Router,
        config: Arc<BrokerConfig>,
        metadata: Arc<MetadataStore>,
        metrics: &Arc<crate::metrics::Metrics>,
    ) -> Rc<Shard> {
        let request_budget = crate::budget::RequestBudget::new(config.shard_request_memory_bytes());
        let shard_metrics = metrics.for_shard(id);
        if let Some(port) = &config.cluster {
            metrics.watch_cluster_service(port);
        }
        request_budget.export_to(
            shard_metrics.request_memory_used.clone(),
            shard_metrics.request_memory_waits.clone(),
        );
        let settings = ReplicaSettings {
            data_dir: config.data_dir.clone(),
            log: config.log_config(),
            high_watermark_cap: config.test_high_watermark_cap,
            liveness_token: config.cluster.as_ref().map(|p| p.pings().token()),
        };
        let observers = {
            let metrics = metrics.for_shard(id);
            Box::new(move |tp: &TopicPartition| {
                Box::new(metrics.partition(tp))
                    as Box<dyn spate_replication::partition::ReplicaObserver>
            })
        };
        let replicas = Rc::new(ReplicaSet::new(
            id,
            router.shards(),
            settings,
            metadata.clone(),
            observers,
        ));
        let shard = Rc::new(Shard {
            id,
            router,
            config,
            metadata,
            replicas,
            data_arrived: Signal::default(),
            shutdown: Signal::default(),
            cleaner_wake: spate_replication::partition::cleaner_wake(),
            shutting_down: Cell::new(false),
            connections: Cell::new(0),
            connections_changed: Signal::default(),
            metrics: shard_metrics,
            request_budget,
            requests_read: Cell::new(0),
            connections_closed: Cell::new(0),
            caught_up_once: Cell::new(false),
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

    /// Applies a topic's changed configs to its replicas open on this shard.
    pub fn reconfigure_topic(
        &self,
        topic: &str,
        configs: &std::collections::BTreeMap<String, String>,
    ) {
        self.replicas.reconfigure_topic(topic, configs);
    }

    /// The topic metadata, refreshed only when the store's version moved.
    pub fn topics(&self) -> Topics {
        self.replicas.topics()
    }

    /// This shard's snapshot of the partition placement.
    pub fn shard_table(&self) -> Rc<ShardTable> {
        self.replicas.table()
    }

    /// The shard owning a partition; the error is a Kafka error code.
    pub fn owner(&self, topic: &str, partition: i32) -> Result<usize, i16> {
        self.replicas
            .owner(topic, partition)
            .map_err(|c| self.unknown_while_catching_up(c))
    }

    /// Error code if the topic or partition does not exist.
    pub fn check_exists(&self, topic: &str, partition: i32) -> Result<(), i16> {
        self.replicas
            .check_exists(topic, partition)
            .map_err(|c| self.unknown_while_catching_up(c))
    }

    /// A cluster node that has not caught up with the controller yet (not registered and
    /// unfenced in the metadata it applied: it just started and is still replaying or
    /// fetching the metadata log) may not know a topic that exists. Kafka clients take
    /// UNKNOWN_TOPIC_OR_PARTITION from a ListOffsets or Fetch as final (librdkafka resets the
    /// consumer's offset), so until then it is answered as NOT_LEADER_OR_FOLLOWER, which they
    /// retry after refreshing their metadata (from any node).
    pub fn unknown_while_catching_up(&self, code: i16) -> i16 {
        let unknown = kafka_protocol::ResponseError::UnknownTopicOrPartition.code();
        let Some(port) = &self.config.cluster else {
            return code;
        };
        if code != unknown {
            return code;
        }
        if port.view().caught_up {
            code
        } else {
            kafka_protocol::ResponseError::NotLeaderOrFollower.code()
        }
    }

    /// Whether this node has applied the cluster metadata at least once since it started
    /// (alone: always). Until then its view may lack every topic and every other broker, so
    /// what it could tell clients about the cluster would be wrong, not merely stale: librdkafka
    /// takes a topic missing from a Metadata answer as deleted, and a broker missing from one
    /// as gone from the cluster. Once caught up, a node that is fenced later (cut off from the
    /// controller) keeps the metadata it applied, as a Kafka broker keeps its metadata cache.
    pub fn has_caught_up(&self) -> bool {
        if self.caught_up_once.get() {
            return true;
        }
        let Some(port) = &self.config.cluster else {
            return true;
        };
        let now = port.view().caught_up;
        self.caught_up_once.set(now);
        now
    }

    pub fn begin_shutdown(&self) {
        if !self.shutting_down.replace(true) {
            self.replicas.stop_opening();
            self.shutdown.notify();
        }
    }
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.get()
    }

    /// The open replica of a partition this shard owns: a getter, see [`ReplicaSet::partition`].
    pub fn partition(&self, tp: &TopicPartition) -> Result<Rc<PartitionReplica>, i16> {
        self.replicas
            .partition(tp)
            .map_err(|c| self.unknown_while_catching_up(c))
    }

    /// True in a cluster (`--seeds`): partitions are replicated, served by their leaders.
    pub fn in_cluster(&self) -> bool {
        self.config.cluster.is_some()
    }

    /// The replica a client's read (Fetch, ListOffsets, OffsetForLeaderEpoch) of a partition
    /// this shard owns is served from, with the leader epoch it is served in. Alone, every
    /// partition's replica in epoch 0. In a cluster only a writable leader serves (a follower
    /// may lack committed data or hold an uncommitted suffix, and a leader that has not yet
    /// rebuilt its state in its epoch may still be truncated): anything else is
    /// NOT_LEADER_OR_FOLLOWER, so the client refreshes its metadata and goes to the leader.
    /// A leader that has not yet committed in its epoch answers `not_ready` instead: its high
    /// watermark is not known until then (after a restart it reads 0, and a ListOffsets for the
    /// latest offset would send a reader back to the start). That lasts one round trip to a
    /// majority; a leader that cannot reach one steps down.
    /// A getter: must run on the owning shard.
    pub fn leader_replica(
        &self,
        tp: &TopicPartition,
        not_ready: i16,
    ) -> Result<(Rc<PartitionReplica>, i32), i16> {
        if !self.in_cluster() {
            let p = self.partition(tp)?;
            let epoch = p.leader_epoch();
            return Ok((p, epoch));
        }
        self.check_exists(&tp.topic, tp.partition)?;
        match self.replicas.group(tp) {
            Some(g) if g.is_writable_leader() => {
                if g.is_ready_leader() {
                    Ok((g.replica().clone(), g.epoch()))
                } else {
                    Err(not_ready)
                }
            }
            _ => Err(kafka_protocol::ResponseError::NotLeaderOrFollower.code()),
        }
    }

    /// Opens the replicas this shard owns (of `topic` only, if given): see
    /// [`ReplicaSet::open_owned`].
    pub async fn open_owned_partitions(&self, topic: Option<&str>) {
        self.replicas.open_owned(topic).await
    }

    /// Opens the replicas of `topic`'s new partitions on the shards that own them, and waits
    /// until they are open (and every shard routes by the new placement), so that the client
    /// that created them finds them.
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

    /// Closes and deletes this shard's partitions `0..partitions` of a deleted topic.
    pub async fn delete_partitions(&self, topic: &str, partitions: i32) {
        self.replicas.delete_partitions(topic, partitions).await
    }

    pub async fn apply_retention(&self) {
        self.replicas.apply_retention().await
    }

    /// One round of the log cleaner over this shard's compacted partitions, dirtiest first;
    /// returns how many logs it cleaned.
    pub async fn clean_logs(&self) -> usize {
        spate_replication::partition::clean_logs(
            &self.replicas.open_partitions(),
            &self.config.shard_cleaner_config(),
            || self.is_shutting_down(),
        )
        .await
    }

    /// Writes producer-state snapshots of partitions whose state changed.
    pub async fn snapshot_producers(&self) {
        self.replicas.snapshot_producers().await
    }

    /// Flushes and closes every partition of this shard.
    pub async fn close_partitions(&self) {
        self.replicas.close_all().await
    }
}

/// The owner of a partition in `table` (a snapshot taken once for a whole request); the
/// error is a Kafka error code (see [`ReplicaSet::owner_in`]).
pub fn owner_in(
    table: &ShardTable,
    shard: &Shard,
    topic: &str,
    partition: i32,
) -> Result<usize, i16> {
    shard
        .replicas
        .owner_in(table, topic, partition)
        .map_err(|c| shard.unknown_while_catching_up(c))
}
