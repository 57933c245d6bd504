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

use super::hard_state_store::{hard_state_store_path, HardStateStore};
use super::incarnation::{
    claim_for_topic, partitions_with_files, read_topic_id, release, remove_partition_files,
    remove_unless_held,
};
use super::table::ShardTable;
use crate::cluster::HostedPartition;
use crate::metadata::{MetadataStore, Topics};
use crate::partition::{
    apply_topic_configs, hard_state_path, GroupConfig, LiveLimits, LogConfig, PartitionGroup,
    PartitionReplica, ReplicaConfig, ReplicaError, ReplicaObserver, TopicPartition, TopicPolicy,
};
use crate::types::{GroupId, NodeId};

/// The topic config naming how many voters must be caught up for acks=all.
pub const MIN_INSYNC_REPLICAS_CONFIG: &str = "min.insync.replicas";

/// `min.insync.replicas` of a partition with `voters` replicas: the topic's config if it is set
/// to a positive number, else a majority of the voters.
pub fn min_insync_replicas(configs: &BTreeMap<String, String>, voters: usize) -> usize {
    configs
        .get(MIN_INSYNC_REPLICAS_CONFIG)
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(voters / 2 + 1)
}

/// What every replica of a shard is opened with.
pub struct ReplicaSettings {
    /// The data dir: logs in `<data>/<topic>-<partition>`, producer state beside them.
    pub data_dir: PathBuf,
    /// The broker's log settings, before a topic's own configs are applied.
    pub log: LogConfig,
    /// A test hook holding high watermarks below the log end (see `ReplicaConfig`).
    pub high_watermark_cap: Option<u64>,
    /// The node's liveness token when replicated groups may go quiet while idle (see
    /// [`crate::replica::Replica::quiesced`]): the one its shards' pings carry
    /// ([`crate::liveness::PingBoard::token`]). `None`: idle groups keep heartbeating.
    pub liveness_token: Option<u64>,
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
    /// The epoch and vote of every consensus group of this shard (cluster nodes only; opened
    /// with the first group).
    hard_states: RefCell<Option<Rc<HardStateStore>>>,
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
            hard_states: RefCell::default(),
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

    /// Opens the replicated partition `hosted` (in `<data>/<topic>-<partition>`, producer
    /// state beside it as on a single node, hard state at [`hard_state_path`]) and starts its
    /// consensus group `group` among `hosted.voters`, as `node`, with the topic's `configs`
    /// (`min.insync.replicas`, else a majority). Files of another incarnation of the topic
    /// (another topic id) are removed first. The replica is served like any other (reads,
    /// retention, snapshots) and the group is [`Self::group`]'s. An open failure is logged and
    /// kept for requests; the error is its Kafka code.
    pub async fn open_group(
        &self,
        node: NodeId,
        group: GroupId,
        hosted: &HostedPartition,
        configs: &BTreeMap<String, String>,
    ) -> Result<Rc<PartitionGroup>, i16> {
        let tp = TopicPartition::new(&hosted.topic, hosted.partition as i32);
        let not_leader = ResponseError::NotLeaderOrFollower.code();
        let _guard = self
            .open_lock
            .acquire_permit(1)
            .await
            .map_err(|_| not_leader)?;
        if self.closing.get() {
            return Err(not_leader);
        }
        if let Some(g) = self.groups.borrow().get(&tp) {
            // The caller closes a group before opening its partition's next one.
            assert_eq!(g.group(), group, "{tp:?} open in another group");
            return Ok(g.clone());
        }
        if self.partitions.borrow().contains_key(&tp) {
            // `open_owned` is for a single node; a cluster shard's replicas open here only.
            tracing::error!(topic = %tp.topic, partition = tp.partition,
                "partition open as a single node's on a cluster shard: not replicated");
            return Err(ResponseError::KafkaStorageError.code());
        }
        match self
            .open_group_files(node, group, hosted, &tp, configs)
            .await
        {
            Ok(g) => {
                self.failed_opens.borrow_mut().remove(&tp);
                self.partitions
                    .borrow_mut()
                    .insert(tp.clone(), g.replica().clone());
                self.groups.borrow_mut().insert(tp, g.clone());
                Ok(g)
            }
            Err(e) => {
                tracing::error!(topic = %tp.topic, partition = tp.partition, group, error = %e,
                    "cannot open replicated partition");
                self.failed_opens.borrow_mut().insert(tp, e.code());
                Err(e.code())
            }
        }
    }

    async fn open_group_files(
        &self,
        node: NodeId,
        group: GroupId,
        hosted: &HostedPartition,
        tp: &TopicPartition,
        configs: &BTreeMap<String, String>,
    ) -> Result<Rc<PartitionGroup>, ReplicaError> {
        let dir = self.partition_dir(tp);
        let state_path = producer_state_path(&self.settings.data_dir, tp);
        claim_for_topic(&dir, &state_path, hosted.topic_id)?;
        let opened = self.open_claimed(node, group, hosted, tp, configs, &dir, state_path);
        let res = opened.await;
        if res.is_err() {
            release(&dir);
        }
        res
    }

    #[allow(clippy::too_many_arguments)]
    async fn open_claimed(
        &self,
        node: NodeId,
        group: GroupId,
        hosted: &HostedPartition,
        tp: &TopicPartition,
        configs: &BTreeMap<String, String>,
        dir: &Path,
        state_path: PathBuf,
    ) -> Result<Rc<PartitionGroup>, ReplicaError> {
        let mut log = self.settings.log.clone();
        apply_topic_configs(&mut log, configs);
        let config = ReplicaConfig {
            log,
            high_watermark_cap: self.settings.high_watermark_cap,
        };
        let replica = PartitionReplica::open_replicated(
            tp.clone(),
            dir.to_path_buf(),
            Some(state_path),
            config,
            (self.observers)(tp),
        )
        .await?;
        replica.set_policy(TopicPolicy::of(configs));
        let replica = Rc::new(replica);
        let mut cfg = GroupConfig::new(group, node, hosted.voters.clone());
        cfg.core.quiesce = self.settings.liveness_token;
        cfg.min_insync_replicas = min_insync_replicas(configs, hosted.voters.len());
        let opened = match self.hard_state_store().await {
            Ok(store) => {
                PartitionGroup::open(replica.clone(), hard_state_path(dir), store, cfg).await
            }
            Err(e) => Err(e),
        };
        match opened {
            Ok(g) => {
                g.campaign_if_preferred().await;
                Ok(g)
            }
            Err(e) => {
                if let Err(ce) = replica.close().await {
                    tracing::warn!(topic = %tp.topic, partition = tp.partition, error = %ce,
                        "closing a replica whose group did not open");
                }
                Err(e)
            }
        }
    }

    /// This shard's hard-state store, opened (and its file replayed) on first use. Called
    /// under the open lock.
    async fn hard_state_store(&self) -> Result<Rc<HardStateStore>, ReplicaError> {
        if let Some(s) = &*self.hard_states.borrow() {
            return Ok(s.clone());
        }
        let path = hard_state_store_path(&self.settings.data_dir, self.shard);
        let store =
            HardStateStore::open(&path)
                .await
                .map_err(|reason| ReplicaError::HardState {
                    path: path.display().to_string(),
                    reason,
                })?;
        tracing::info!(shard = self.shard, groups = store.len(), path = %path.display(),
            "hard-state store opened");
        *self.hard_states.borrow_mut() = Some(store.clone());
        Ok(store)
    }

    /// Makes every hard state the shard's groups recorded durable (one write, one fdatasync;
    /// nothing when none is pending). Messages wait for this on their own; the runtime calls
    /// it after opening groups and on its ticks so that states nothing is sent for (a group of
    /// one voter, a migrated file) are not left in memory.
    pub async fn sync_hard_states(&self) -> Result<(), String> {
        let store = self.hard_states.borrow().clone();
        match store {
            Some(s) if s.has_pending() => s.sync().await,
            _ => Ok(()),
        }
    }

    /// Forgets the hard state of every group `keep` rejects: groups whose partitions this
    /// node no longer holds (their topic deleted, their replica moved away) while it was down.
    /// Returns how many were dropped.
    pub fn prune_hard_states(&self, keep: impl Fn(GroupId) -> bool) -> usize {
        let store = self.hard_states.borrow().clone();
        let open: Vec<GroupId> = self.groups.borrow().values().map(|g| g.group()).collect();
        store.map_or(0, |s| s.retain(|g| keep(g) || open.contains(&g)))
    }

    /// This shard's hard-state store, if a group has opened it.
    pub fn hard_states(&self) -> Option<Rc<HardStateStore>> {
        self.hard_states.borrow().clone()
    }

    /// Stops the group of `tp` and closes its replica (its files stay: the partition moved or
    /// the node stops hosting it for now).
    pub async fn close_group(&self, tp: &TopicPartition) {
        self.failed_opens.borrow_mut().remove(tp);
        let Some(g) = self.groups.borrow_mut().remove(tp) else {
            return;
        };
        self.partitions.borrow_mut().remove(tp);
        if let Err(e) = g.close().await {
            tracing::error!(topic = %tp.topic, partition = tp.partition, error = %e,
                "closing replicated partition");
        }
        release(&self.partition_dir(tp));
    }

    /// Stops the group of `tp` (if open) and removes every file of the partition: its topic,
    /// with id `topic_id`, was deleted. Files already claimed by a newer incarnation (opened
    /// on another shard first) are left to it: the group is only closed.
    pub async fn delete_group(&self, tp: &TopicPartition, topic_id: u128) {
        let dir = self.partition_dir(tp);
        match read_topic_id(&dir) {
            Ok(Some(id)) if id != topic_id => {
                tracing::info!(topic = %tp.topic, partition = tp.partition,
                    "the partition's files belong to a newer incarnation: kept");
                self.close_group(tp).await;
                return;
            }
            _ => {}
        }
        self.failed_opens.borrow_mut().remove(tp);
        let g = self.groups.borrow_mut().remove(tp);
        if let Some(g) = g {
            self.partitions.borrow_mut().remove(tp);
            if let Err(e) = g.delete().await {
                tracing::warn!(topic = %tp.topic, partition = tp.partition, error = %e,
                    "deleting replicated partition");
            }
        }
        let state_path = producer_state_path(&self.settings.data_dir, tp);
        if let Err(e) = remove_partition_files(&dir, &state_path) {
            tracing::warn!(topic = %tp.topic, partition = tp.partition, error = %e,
                "removing replicated partition files");
        }
        release(&dir);
    }

    /// Removes the files of every replicated partition in the data dir that no group of this
    /// process has open and that `held(topic, partition, recorded topic id)` says this node no
    /// longer holds: what a node left behind when it was down, or killed part-way through a
    /// delete, while a move took a replica off it or its topic was deleted. `held` is asked
    /// under the claims lock (see [`remove_unless_held`]) and must read the newest metadata.
    /// At most `max` partitions are looked at; returns how many were removed.
    pub fn remove_orphans(&self, max: usize, held: impl Fn(&str, u32, u128) -> bool) -> usize {
        let found = match partitions_with_files(&self.settings.data_dir, max) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "listing the data dir for orphaned partitions");
                return 0;
            }
        };
        let mut removed = 0;
        for (topic, partition) in found {
            let Ok(index) = i32::try_from(partition) else {
                continue;
            };
            let tp = TopicPartition::new(&topic, index);
            let dir = self.partition_dir(&tp);
            let state_path = producer_state_path(&self.settings.data_dir, &tp);
            match remove_unless_held(&dir, &state_path, |id| held(&topic, partition, id)) {
                Ok(true) => {
                    removed += 1;
                    tracing::info!(%topic, partition,
                        "removed the files of a partition this node no longer holds");
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(%topic, partition, error = %e,
                    "removing the files of a partition this node no longer holds"),
            }
        }
        removed
    }

    /// The consensus groups open on this shard (a snapshot).
    pub fn open_groups(&self) -> Vec<(TopicPartition, Rc<PartitionGroup>)> {
        self.groups
            .borrow()
            .iter()
            .map(|(tp, g)| (tp.clone(), g.clone()))
            .collect()
    }

    /// Stops and closes every consensus group of this shard (the shard is stopping), then
    /// the hard-state store.
    pub async fn close_groups(&self) {
        let all: Vec<TopicPartition> = self.groups.borrow().keys().cloned().collect();
        for tp in all {
            self.close_group(&tp).await;
        }
        let store = self.hard_states.borrow_mut().take();
        if let Some(s) = store {
            if let Err(e) = s.close().await {
                tracing::error!(shard = self.shard, error = %e, "closing the hard-state store");
            }
        }
    }

    /// Applies a topic's changed configs to its replicas open on this shard. Only the live
    /// limits change now (retention, max batch size, `min.insync.replicas`); segment size
    /// applies when a log is next opened.
    pub fn reconfigure_topic(&self, topic: &str, configs: &BTreeMap<String, String>) {
        for (tp, g) in self.groups.borrow().iter() {
            if &*tp.topic == topic {
                g.set_min_insync_replicas(min_insync_replicas(configs, g.voters().len()));
            }
        }
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

    /// Flushes and closes every replica of this shard (replicated ones through their group).
    pub async fn close_all(&self) {
        self.close_groups().await;
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
