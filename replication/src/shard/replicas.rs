//! The partition replicas one shard owns: opening them (an explicit step, at start-up and when
//! partitions are created), finding them (a getter that never opens anything), and the
//! per-shard housekeeping over all of them (retention, producer snapshots, closing).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use glommio::sync::Semaphore;
use kafka_protocol::ResponseError;

use super::table::ShardTable;
use crate::metadata::{MetadataStore, Topics};
use crate::partition::{
    apply_topic_configs, LiveLimits, LogConfig, PartitionGroup, PartitionReplica, ReplicaConfig,
    ReplicaObserver, TopicPartition, TopicPolicy,
};

/// What every replica of a shard is opened with.
pub struct ReplicaSettings {
    /// The data dir: logs in `<data>/<topic>-<partition>`, producer state beside them.
    pub data_dir: PathBuf,
    /// The broker's log settings, before a topic's own configs are applied.
    pub log: LogConfig,
    /// A test hook holding high watermarks below the log end (see `ReplicaConfig`).
    pub high_watermark_cap: Option<u64>,
}

/// Makes the observer (metrics) of a replica being opened.
pub type ObserverFactory = Box<dyn Fn(&TopicPartition) -> Box<dyn ReplicaObserver>>;

/// The replicas of the partitions one shard owns, with that shard's view of the topic metadata
/// and of the placement.
pub struct ReplicaSet {
    shard: usize,
    shards: usize,
    settings: ReplicaSettings,
    metadata: Arc<MetadataStore>,
    observers: ObserverFactory,
    cached_topics: RefCell<(u64, Topics)>,
    /// Which shard owns which partition, as of the last topic create or delete this shard was
    /// told of (see [`Self::refresh_table`]).
    table: RefCell<Rc<ShardTable>>,
    partitions: RefCell<HashMap<TopicPartition, Rc<PartitionReplica>>>,
    /// In a cluster: the consensus group of each replicated partition open here (its replica
    /// is in `partitions` too, for reads). Empty on a single node.
    groups: RefCell<HashMap<TopicPartition, Rc<PartitionGroup>>>,
    /// Replicas whose open failed, with the error code requests for them get.
    failed_opens: RefCell<HashMap<TopicPartition, i16>>,
    /// Serialises opening partitions (rare) so two tasks never open one log twice.
    open_lock: Semaphore,
    /// Set when the shard stops: nothing more is opened.
    closing: Cell<bool>,
}

impl ReplicaSet {
    /// The replicas of shard `shard` of `shards`; none is open until [`Self::open_owned`].
    pub fn new(
        shard: usize,
        shards: usize,
        settings: ReplicaSettings,
        metadata: Arc<MetadataStore>,
        observers: ObserverFactory,
    ) -> ReplicaSet {
        let topics = (metadata.version(), metadata.topics());
        let table = Rc::new(ShardTable::from_topics(&topics.1, shards));
        ReplicaSet {
            shard,
            shards,
            settings,
            metadata,
            observers,
            cached_topics: RefCell::new(topics),
            table: RefCell::new(table),
            partitions: RefCell::default(),
            groups: RefCell::default(),
            failed_opens: RefCell::default(),
            open_lock: Semaphore::new(1),
            closing: Cell::new(false),
        }
    }

    pub fn metadata(&self) -> &Arc<MetadataStore> {
        &self.metadata
    }

    /// The topic metadata, refreshed only when the store's version moved.
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

    /// This shard's snapshot of the partition placement.
    pub fn table(&self) -> Rc<ShardTable> {
        self.table.borrow().clone()
    }

    /// Rebuilds the placement snapshot from the topic metadata: on every shard, when a topic
    /// or partitions were created or a topic deleted (the admin request waits for all shards).
    pub fn refresh_table(&self) {
        let table = ShardTable::from_topics(&self.topics(), self.shards);
        *self.table.borrow_mut() = Rc::new(table);
    }

    /// The shard owning a partition in `table` (a snapshot taken once for a whole request);
    /// the error is a Kafka error code: the partition does not exist, or it does but `table`
    /// predates it (created a moment ago: clients retry).
    pub fn owner_in(&self, table: &ShardTable, topic: &str, partition: i32) -> Result<usize, i16> {
        match table.owner(topic, partition) {
            Some(owner) => Ok(owner),
            None => {
                self.check_exists(topic, partition)?;
                Err(ResponseError::NotLeaderOrFollower.code())
            }
        }
    }

    /// The shard owning a partition; the error is a Kafka error code.
    pub fn owner(&self, topic: &str, partition: i32) -> Result<usize, i16> {
        self.owner_in(&self.table.borrow(), topic, partition)
    }

    pub fn partition_dir(&self, tp: &TopicPartition) -> PathBuf {
        self.settings.data_dir.join(tp.dir_name())
    }

    /// The open replica of a partition this shard owns. A getter: it never opens a log (that
    /// is [`Self::open_partition`], at start-up and when a topic is created). Must run on the
    /// owning shard. The error is a Kafka error code.
    pub fn partition(&self, tp: &TopicPartition) -> Result<Rc<PartitionReplica>, i16> {
        // The sender routed by its own table, which may be newer than this shard's (the
        // refresh after a create is on its way): only a table that knows the partition can
        // disagree.
        debug_assert!(self
            .table
            .borrow()
            .owner(&tp.topic, tp.partition)
            .is_none_or(|owner| owner == self.shard));
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

    /// The consensus group of a replicated partition open on this shard; `None` for a
    /// partition of a single node (its replica alone decides) or one not open here. A getter.
    pub fn group(&self, tp: &TopicPartition) -> Option<Rc<PartitionGroup>> {
        self.groups.borrow().get(tp).cloned()
    }

    /// Opens the replicas of every partition in the topic metadata (of `topic` only, if
    /// given) that this shard owns and has not opened: at start-up, and on every shard after a
    /// topic or partitions were created. Refreshes the shard table first, so the placement
    /// the metadata store just decided is the one routed by.
    pub async fn open_owned(&self, topic: Option<&str>) {
        self.refresh_table();
        let table = self.table();
        let mut owned: Vec<TopicPartition> = table
            .owned_by(self.shard)
            .filter(|(t, _)| topic.is_none_or(|n| n == *t))
            .map(|(t, p)| TopicPartition::new(t, p))
            .collect();
        // A stable order, so start-up logs read the same each time.
        owned.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        for tp in owned {
            if self.partitions.borrow().contains_key(&tp) {
                continue;
            }
            // A failure is logged and kept for the requests that name the partition.
            let _ = self.open_partition(&tp).await;
        }
    }

    /// Opens (and recovers) the replica of `tp`, which this shard owns, unless it is open.
    /// The error is a Kafka error code, also kept for later requests.
    pub async fn open_partition(&self, tp: &TopicPartition) -> Result<(), i16> {
        debug_assert_eq!(self.owner(&tp.topic, tp.partition), Ok(self.shard));
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
        if self.closing.get() {
            return Err(ResponseError::NotLeaderOrFollower.code());
        }
        let mut log_config = self.settings.log.clone();
        let mut policy = TopicPolicy::default();
        if let Some(t) = self.topics().get(&*tp.topic) {
            apply_topic_configs(&mut log_config, &t.configs);
            policy = TopicPolicy::of(&t.configs);
        }
        let config = ReplicaConfig {
            log: log_config,
            high_watermark_cap: self.settings.high_watermark_cap,
        };
        let partition = PartitionReplica::open(
            tp.clone(),
            self.partition_dir(tp),
            Some(producer_state_path(&self.settings.data_dir, tp)),
            config,
            (self.observers)(tp),
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

    /// Applies a topic's changed configs to its replicas open on this shard. Only the live
    /// limits change now (retention, max batch size); segment size applies when a log is next
    /// opened.
    pub fn reconfigure_topic(&self, topic: &str, configs: &BTreeMap<String, String>) {
        let mut lc = self.settings.log.clone();
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

    /// Closes and deletes every open or on-disk partition of `topic` owned by this shard, for
    /// partitions `0..partitions`, then refreshes the shard table (the topic is gone from the
    /// metadata by now; its placement is taken from the table as it was).
    pub async fn delete_partitions(&self, topic: &str, partitions: i32) {
        let table = self.table();
        for p in 0..partitions {
            let tp = TopicPartition::new(topic, p);
            let open = self.partitions.borrow_mut().remove(&tp);
            if open.is_none() && table.owner(topic, p) != Some(self.shard) {
                continue;
            }
            self.failed_opens.borrow_mut().remove(&tp);
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
            let _ = std::fs::remove_file(producer_state_path(&self.settings.data_dir, &tp));
        }
        self.refresh_table();
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

    /// The replicas open on this shard (a snapshot: for rounds that await between them).
    pub fn open_partitions(&self) -> Vec<Rc<PartitionReplica>> {
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

    /// Opens nothing more (the shard is stopping).
    pub fn stop_opening(&self) {
        self.closing.set(true);
    }

    /// Flushes and closes every replica of this shard.
    pub async fn close_all(&self) {
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
pub fn producer_state_path(data_dir: &Path, tp: &TopicPartition) -> PathBuf {
    data_dir
        .join("producer-state")
        .join(format!("{}.json", tp.dir_name()))
}
