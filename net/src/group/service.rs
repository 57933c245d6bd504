//! The I/O side of the group coordinator on one shard: feeds it requests and the clock, turns
//! its effects into replies and `__consumer_offsets` appends, loads its partitions at startup
//! and ticks it from a timer.
//!
//! Everything here runs on the shard's own executor (`Rc`, `RefCell`, no locks). The borrow of
//! the coordinator is never held across an `.await`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use glommio::channels::oneshot;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::describe_groups_response::DescribedGroup;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::{
    HeartbeatRequest, HeartbeatResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest,
    LeaveGroupResponse, OffsetCommitRequest, OffsetCommitResponse, OffsetDeleteRequest,
    OffsetDeleteResponse, SyncGroupRequest, SyncGroupResponse,
};
use spate_replication::partition::{
    Acks, BatchHeader, EngineError, FlushPolicy, LogConfig, NoObserver, PartitionGroup,
    PartitionReplica, ReplicaConfig, ReplicaError, TopicPartition, VerifiedBatch,
};
use spate_replication::shard::{ReplicaSet, Signal};

use super::records::{encode_raw_batch, OFFSETS_TOPIC};
use super::{
    ClientInfo, Effect, GroupConfig, GroupCoordinator, GroupOffsets, OffsetsRecord, ReplyId,
};

/// Most records in one appended batch (offset records are at most a few KiB each, so a batch
/// stays well below the log's `max_batch_bytes`).
pub const MAX_RECORDS_PER_BATCH: usize = 100;
/// Bytes asked for per read while loading a partition.
const LOAD_READ_BYTES: usize = 1 << 20;
/// How long a stopping broker waits for a partition's queued writes to finish.
const SHUTDOWN_WRITE_WAIT_MS: u64 = 2_000;
/// How often the coordinator's timers (sessions, rebalances, retention) are checked.
pub const DEFAULT_TICK_INTERVAL_MS: u64 = 100;

/// Segment size of `__consumer_offsets` partitions. Their records are small, and the engine
/// preallocates whole segments, so user-topic sized (1 GiB) segments would cost every broker
/// gigabytes of disk for a few kilobytes of offsets; small segments also close sooner, and
/// only closed segments are cleaned.
pub const OFFSETS_SEGMENT_BYTES: u64 = 8 << 20;
/// Longest one write waits for the cleaner before it goes ahead anyway (a failing cleaner
/// must not stop commits; the next write waits again while the partition stays over its
/// bound, `OFFSETS_MAX_UNCLEANED_BYTES`).
pub const OFFSETS_CLEAN_WAIT_MAX_MS: u64 = 1_000;
/// Largest `__consumer_offsets` batch (a group metadata snapshot of a big group).
pub const OFFSETS_MAX_BATCH_BYTES: u32 = 2 << 20;

/// The topic configs `__consumer_offsets` is created with: compacted (the log cleaner keeps
/// the latest record of every group and offset key, and drops tombstones once
/// `delete.retention.ms` passed), small segments, and room for a big group's metadata.
pub fn offsets_topic_configs() -> std::collections::BTreeMap<String, String> {
    [
        ("cleanup.policy", "compact".to_string()),
        ("segment.bytes", OFFSETS_SEGMENT_BYTES.to_string()),
        ("max.message.bytes", OFFSETS_MAX_BATCH_BYTES.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The log settings of a `__consumer_offsets` partition of the layout before it became a
/// topic (`<data>/__consumer_offsets/<p>`), to read it once for the migration.
fn legacy_offsets_log_config() -> LogConfig {
    LogConfig {
        segment_bytes: OFFSETS_SEGMENT_BYTES,
        max_batch_bytes: OFFSETS_MAX_BATCH_BYTES,
        retention_bytes: None,
        retention_ms: None,
        flush: FlushPolicy::Always,
        ..LogConfig::default()
    }
}

/// Wall-clock milliseconds: commit timestamps and retention are wall-clock in Kafka too.
pub fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

enum Waiter {
    Join(oneshot::Sender<JoinGroupResponse>),
    Sync(oneshot::Sender<SyncGroupResponse>),
}

struct WriteJob {
    batches: Vec<Bytes>,
    done: Option<oneshot::Sender<Result<(), ResponseError>>>,
}

/// The jobs of one partition's writer, and the writer's wake-up call when it waits for work.
#[derive(Default)]
struct WriteQueue {
    jobs: RefCell<VecDeque<WriteJob>>,
    wake: RefCell<Option<oneshot::Sender<()>>>,
    closed: Cell<bool>,
}

impl WriteQueue {
    fn push(&self, job: WriteJob) {
        self.jobs.borrow_mut().push_back(job);
        if let Some(wake) = self.wake.borrow_mut().take() {
            let _ = wake.send(());
        }
    }

    /// Everything queued, waiting for at least one job; `None` once closed.
    async fn take_all(&self) -> Option<Vec<WriteJob>> {
        loop {
            if !self.jobs.borrow().is_empty() {
                return Some(self.jobs.borrow_mut().drain(..).collect());
            }
            if self.closed.get() {
                return None;
            }
            let (tx, rx) = oneshot::oneshot();
            *self.wake.borrow_mut() = Some(tx);
            let _ = rx.await;
        }
    }

    fn close(&self) {
        self.closed.set(true);
        if let Some(wake) = self.wake.borrow_mut().take() {
            let _ = wake.send(());
        }
    }
}

/// Where a `__consumer_offsets` partition's records are written.
#[derive(Clone)]
pub enum OffsetsLog {
    /// A single node's replica: appended here and synced before a commit is answered.
    Local(Rc<PartitionReplica>),
    /// A replicated partition this node leads: proposed through its consensus group and
    /// answered once committed (acks=all).
    Replicated(Rc<PartitionGroup>),
}

impl OffsetsLog {
    fn replica(&self) -> &Rc<PartitionReplica> {
        match self {
            OffsetsLog::Local(r) => r,
            OffsetsLog::Replicated(g) => g.replica(),
        }
    }

    /// Where loading stops: everything a single node has in its log, or what a ready leader's
    /// high watermark covers (everything committed before its epoch; nothing of its own is
    /// written before the partition is loaded).
    fn load_end(&self) -> u64 {
        match self {
            OffsetsLog::Local(r) => r.log_end_offset(),
            OffsetsLog::Replicated(g) => g.replica().high_watermark(),
        }
    }
}

/// A partition's write queue and the task draining it.
type Writer = (Rc<WriteQueue>, glommio::Task<()>);

/// A partition this shard coordinates: which leadership it was loaded for, and the load's
/// generation (a load started for an earlier leadership stops when it sees a newer one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    leader_epoch: i32,
    generation: u64,
}

/// The group coordinator of one shard with its I/O.
pub struct GroupShard {
    coordinator: RefCell<GroupCoordinator>,
    /// The shard's replicas: `__consumer_offsets` partitions are hosted like any partition.
    replicas: Rc<ReplicaSet>,
    shard: usize,
    /// In a cluster a partition is coordinated where its replica is the ready leader; alone,
    /// where it is owned.
    clustered: bool,
    /// Where the layout before `__consumer_offsets` was a topic kept its partitions
    /// (`<data>/__consumer_offsets`), migrated once when a partition is first loaded.
    legacy_dir: Option<PathBuf>,
    held: RefCell<BTreeMap<i32, Held>>,
    next_generation: Cell<u64>,
    writers: RefCell<BTreeMap<i32, Writer>>,
    waiters: RefCell<HashMap<ReplyId, Waiter>>,
    next_reply: Cell<ReplyId>,
    /// Set at shutdown: nothing is loaded any more.
    stopped: Cell<bool>,
    /// Notified whenever a partition's load ends (loaded or given up).
    load_ended: Signal,
    /// The shard's log cleaner, woken after every segment's worth of writes to a partition.
    cleaner_wake: Rc<Signal>,
}

impl GroupShard {
    pub fn new(
        config: GroupConfig,
        replicas: Rc<ReplicaSet>,
        shard: usize,
        clustered: bool,
        legacy_dir: Option<PathBuf>,
        cleaner_wake: Rc<Signal>,
    ) -> Result<Rc<Self>, String> {
        Ok(Rc::new(GroupShard {
            coordinator: RefCell::new(GroupCoordinator::new(config)?),
            replicas,
            shard,
            clustered,
            legacy_dir,
            held: RefCell::new(BTreeMap::new()),
            next_generation: Cell::new(1),
            writers: RefCell::new(BTreeMap::new()),
            waiters: RefCell::new(HashMap::new()),
            next_reply: Cell::new(1),
            stopped: Cell::new(false),
            load_ended: Signal::default(),
            cleaner_wake,
        }))
    }

    pub fn partition_for(&self, group_id: &str) -> i32 {
        self.coordinator.borrow().partition_for(group_id)
    }

    pub fn partitions(&self) -> i32 {
        self.coordinator.borrow().config().offsets_topic_partitions
    }

    pub fn is_loaded(&self, partition: i32) -> bool {
        self.coordinator.borrow().is_loaded(partition)
    }

    /// The log this shard should coordinate `partition` from, with the leader epoch it holds
    /// it in: alone, the replica it owns; in a cluster, the replica whose group is the ready
    /// leader (writable, its epoch committed, so its high watermark covers every commit).
    fn wanted(&self, partition: i32) -> Option<(OffsetsLog, i32)> {
        let tp = TopicPartition::new(OFFSETS_TOPIC, partition);
        if self.clustered {
            let group = self.replicas.group(&tp)?;
            if group.has_failed() || !group.is_ready_leader() {
                return None;
            }
            let epoch = group.epoch();
            return Some((OffsetsLog::Replicated(group), epoch));
        }
        if self.replicas.table().owner(OFFSETS_TOPIC, partition) != Some(self.shard) {
            return None;
        }
        let replica = self.replicas.partition(&tp).ok()?;
        Some((OffsetsLog::Local(replica), 0))
    }

    /// Compares what this shard coordinates with where the `__consumer_offsets` partitions
    /// are led (cheap: a few getters per partition), loading those it now leads and
    /// unloading those it no longer does. Runs on every tick and after the topic is created.
    pub fn follow_leadership(self: &Rc<Self>) {
        if self.stopped.get() {
            return;
        }
        for partition in 0..self.partitions() {
            let wanted = self.wanted(partition);
            let held = self.held.borrow().get(&partition).copied();
            if held.map(|h| h.leader_epoch) == wanted.as_ref().map(|(_, e)| *e) {
                continue;
            }
            if held.is_some() {
                tracing::info!(
                    partition,
                    "no longer coordinating __consumer_offsets partition"
                );
                self.unload_partition(partition);
            }
            if let Some((log, leader_epoch)) = wanted {
                let generation = self.next_generation.get();
                self.next_generation.set(generation + 1);
                self.held.borrow_mut().insert(
                    partition,
                    Held {
                        leader_epoch,
                        generation,
                    },
                );
                // Its groups get COORDINATOR_LOAD_IN_PROGRESS (retriable) until loaded.
                self.coordinator.borrow_mut().begin_loading(partition);
                let this = self.clone();
                glommio::spawn_local(async move {
                    if let Err(e) = this.load_partition(partition, log, generation).await {
                        tracing::error!(partition, error = %e, "cannot load __consumer_offsets partition; its groups stay unavailable");
                        // Retried by the next tick's look at the leadership.
                        if this.is_current(partition, generation) {
                            this.unload_partition(partition);
                        }
                    }
                    this.load_ended.notify();
                })
                .detach();
            }
        }
    }

    /// Waits until no partition this shard holds is still loading (the topic was just
    /// created: its first requests should not be told to retry).
    pub async fn wait_loaded(&self) {
        loop {
            let seen = self.load_ended.generation();
            let loading = {
                let c = self.coordinator.borrow();
                self.held.borrow().keys().any(|p| c.is_loading(*p))
            };
            if !loading || self.stopped.get() {
                return;
            }
            self.load_ended.changed(seen).await;
        }
    }

    fn is_current(&self, partition: i32, generation: u64) -> bool {
        self.held
            .borrow()
            .get(&partition)
            .is_some_and(|h| h.generation == generation)
            && self.coordinator.borrow().is_loading(partition)
    }

    /// Replays `partition`'s log into the coordinator, then starts the partition's writer task
    /// and serves its groups. If the partition was given up meanwhile (leadership moved,
    /// shutdown), nothing is served.
    async fn load_partition(
        self: &Rc<Self>,
        partition: i32,
        log: OffsetsLog,
        generation: u64,
    ) -> Result<(), ReplicaError> {
        if let (OffsetsLog::Local(replica), Some(dir)) = (&log, &self.legacy_dir) {
            migrate_legacy_partition(dir, partition, replica).await?;
        }
        let replica = log.replica().clone();
        let started = std::time::Instant::now();
        let start = replica.log_start_offset();
        let end = log.load_end();
        let mut records = 0usize;
        let mut offset = start;
        while offset < end && self.is_current(partition, generation) {
            let batches = replica.read_local(offset, LOAD_READ_BYTES).await?.batches;
            if batches.is_empty() || !self.is_current(partition, generation) {
                break;
            }
            let now = wall_clock_ms();
            for batch in batches {
                let header = BatchHeader::parse(&batch).map_err(ReplicaError::from)?;
                if u64::try_from(header.base_offset()).unwrap_or(u64::MAX) >= end {
                    offset = end;
                    break;
                }
                let next = u64::try_from(header.last_offset() + 1).unwrap_or(u64::MAX);
                if next <= offset {
                    tracing::error!(
                        partition,
                        offset,
                        next,
                        "__consumer_offsets read went backwards; load stops here"
                    );
                    offset = end;
                    break;
                }
                offset = next;
                match self
                    .coordinator
                    .borrow_mut()
                    .replay_batch(partition, &batch, now)
                {
                    Ok(n) => records += n,
                    // A batch this coordinator cannot read was not written by it: skip it
                    // loudly rather than refuse to serve every group of the partition.
                    Err(e) => {
                        tracing::error!(partition, offset, error = %e, "unreadable __consumer_offsets batch skipped")
                    }
                }
            }
        }
        if !self.is_current(partition, generation) {
            tracing::info!(
                partition,
                "__consumer_offsets partition given up while loading"
            );
            return Ok(());
        }
        let queue = Rc::new(WriteQueue::default());
        let writer = glommio::spawn_local(write_loop(
            partition,
            log,
            queue.clone(),
            self.cleaner_wake.clone(),
        ));
        if let Some((old, _)) = self.writers.borrow_mut().insert(partition, (queue, writer)) {
            old.close();
        }
        self.coordinator
            .borrow_mut()
            .finish_loading(partition, wall_clock_ms());
        tracing::info!(
            partition,
            records,
            from_offset = start,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "consumer offsets loaded"
        );
        self.dispatch_effects().await;
        Ok(())
    }

    /// Stops serving groups (broker shutdown): every pending JoinGroup and SyncGroup is
    /// answered with NOT_COORDINATOR at once, so connections can drain without waiting for a
    /// rebalance timeout, and later requests get NOT_COORDINATOR. Writes already queued still
    /// complete; [`Self::close`] waits for them.
    pub fn stop_serving(&self) {
        self.stopped.set(true);
        let partitions: Vec<i32> = self.held.borrow().keys().copied().collect();
        for partition in partitions {
            self.unload_partition(partition);
        }
    }

    /// Lets queued writes finish (the partitions' logs are the shard's to close), each within
    /// [`SHUTDOWN_WRITE_WAIT_MS`]: a replicated write waits for a commit that peers may never
    /// give a stopping node, and a shutdown must not hang on it (its commit was not answered).
    pub async fn close(&self) {
        self.stop_serving();
        let writers = std::mem::take(&mut *self.writers.borrow_mut());
        for (partition, (queue, writer)) in writers {
            queue.close();
            let drained = async {
                writer.await;
                true
            };
            let waited = async {
                glommio::timer::sleep(Duration::from_millis(SHUTDOWN_WRITE_WAIT_MS)).await;
                false
            };
            if !futures_lite::future::or(drained, waited).await {
                tracing::warn!(
                    partition,
                    "__consumer_offsets writes still waiting at shutdown were abandoned"
                );
            }
        }
    }

    /// Gives `partition` up (its leadership moved): pending replies of its groups get
    /// NOT_COORDINATOR (members find the new coordinator and rejoin there) and its writer
    /// stops after the queued writes.
    pub fn unload_partition(&self, partition: i32) {
        self.held.borrow_mut().remove(&partition);
        self.coordinator.borrow_mut().unload(partition);
        if let Some((queue, writer)) = self.writers.borrow_mut().remove(&partition) {
            queue.close();
            writer.detach();
        }
        self.dispatch_effects_now();
    }

    /// Starts the timer task that ticks the coordinator every `interval_ms`, and follows the
    /// leadership of the `__consumer_offsets` partitions; it lives as long as the shard's
    /// executor.
    pub fn start_ticker(self: &Rc<Self>, interval_ms: u64) {
        let weak = Rc::downgrade(self);
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(Duration::from_millis(interval_ms)).await;
                let Some(shard) = weak.upgrade() else { break };
                shard.follow_leadership();
                shard.coordinator.borrow_mut().tick(wall_clock_ms());
                shard.dispatch_effects().await;
            }
        })
        .detach();
    }

    fn new_reply(&self) -> ReplyId {
        let id = self.next_reply.get();
        self.next_reply.set(id + 1);
        id
    }

    /// Routes the coordinator's effects: records to the writers, then, once those are durable,
    /// replies to their waiters. A reply never overtakes the group state it announces (as
    /// Kafka answers SyncGroup only after storing the group), so a client that saw it survives
    /// a broker crash with the same view.
    async fn dispatch_effects(&self) {
        let (written, replies) = self.route_effects();
        for done in written {
            // A failed write is logged by the writer; the reply still goes out, as the
            // in-memory state it reports is what this broker serves until it restarts.
            let _ = done.await;
        }
        self.deliver(replies);
    }

    /// Like [`Self::dispatch_effects`] without waiting for the records: for effects that are
    /// only replies (unloading), or where the caller cannot wait.
    fn dispatch_effects_now(&self) {
        let (_, replies) = self.route_effects();
        self.deliver(replies);
    }

    /// Submits the records among the pending effects and returns their completions, with the
    /// replies still to deliver.
    fn route_effects(
        &self,
    ) -> (
        Vec<oneshot::Receiver<Result<(), ResponseError>>>,
        Vec<Effect>,
    ) {
        let effects = self.coordinator.borrow_mut().take_effects();
        let mut written = Vec::new();
        let mut replies = Vec::new();
        for effect in effects {
            match effect {
                Effect::Persist { partition, records } => {
                    let (tx, rx) = oneshot::oneshot();
                    self.submit(partition, &records, Some(tx));
                    written.push(rx);
                }
                reply => replies.push(reply),
            }
        }
        (written, replies)
    }

    fn deliver(&self, replies: Vec<Effect>) {
        for reply in replies {
            match reply {
                Effect::Join { reply, response } => {
                    if let Some(Waiter::Join(tx)) = self.waiters.borrow_mut().remove(&reply) {
                        // The connection may have gone; nobody else wants the answer.
                        let _ = tx.send(response);
                    }
                }
                Effect::Sync { reply, response } => {
                    if let Some(Waiter::Sync(tx)) = self.waiters.borrow_mut().remove(&reply) {
                        let _ = tx.send(response);
                    }
                }
                Effect::Persist { .. } => unreachable!("records are routed to the writers"),
            }
        }
    }

    fn submit(
        &self,
        partition: i32,
        records: &[OffsetsRecord],
        done: Option<oneshot::Sender<Result<(), ResponseError>>>,
    ) {
        let now = wall_clock_ms();
        let records: Vec<_> = records.iter().map(OffsetsRecord::to_raw).collect();
        let batches = records
            .chunks(MAX_RECORDS_PER_BATCH)
            .map(|chunk| encode_raw_batch(chunk, now))
            .collect();
        let job = WriteJob { batches, done };
        let writers = self.writers.borrow();
        match writers.get(&partition) {
            Some((queue, _)) => queue.push(job),
            None => {
                tracing::warn!(partition, "no writer for __consumer_offsets partition");
                if let Some(done) = job.done {
                    let _ = done.send(Err(ResponseError::NotCoordinator));
                }
            }
        }
    }

    pub async fn join_group(
        &self,
        version: i16,
        client: &ClientInfo,
        req: &JoinGroupRequest,
    ) -> JoinGroupResponse {
        let reply = self.new_reply();
        let (tx, rx) = oneshot::oneshot();
        self.waiters.borrow_mut().insert(reply, Waiter::Join(tx));
        self.coordinator
            .borrow_mut()
            .join_group(reply, version, client, req, wall_clock_ms());
        self.dispatch_effects().await;
        rx.await.unwrap_or_else(|_| {
            JoinGroupResponse::default()
                .with_error_code(ResponseError::CoordinatorNotAvailable.code())
                .with_generation_id(-1)
        })
    }

    pub async fn sync_group(&self, version: i16, req: &SyncGroupRequest) -> SyncGroupResponse {
        let reply = self.new_reply();
        let (tx, rx) = oneshot::oneshot();
        self.waiters.borrow_mut().insert(reply, Waiter::Sync(tx));
        self.coordinator
            .borrow_mut()
            .sync_group(reply, version, req, wall_clock_ms());
        self.dispatch_effects().await;
        rx.await.unwrap_or_else(|_| {
            SyncGroupResponse::default()
                .with_error_code(ResponseError::CoordinatorNotAvailable.code())
        })
    }

    pub async fn heartbeat(&self, req: &HeartbeatRequest) -> HeartbeatResponse {
        let r = self
            .coordinator
            .borrow_mut()
            .heartbeat(req, wall_clock_ms());
        self.dispatch_effects().await;
        r
    }

    pub async fn leave_group(&self, version: i16, req: &LeaveGroupRequest) -> LeaveGroupResponse {
        let r = self
            .coordinator
            .borrow_mut()
            .leave_group(version, req, wall_clock_ms());
        self.dispatch_effects().await;
        r
    }

    /// OffsetCommit: answers once the offsets are durable in `__consumer_offsets`.
    pub async fn offset_commit(
        &self,
        version: i16,
        req: &OffsetCommitRequest,
        partition_exists: &dyn Fn(&str, i32) -> bool,
    ) -> OffsetCommitResponse {
        let outcome = self.coordinator.borrow_mut().offset_commit(
            version,
            req,
            wall_clock_ms(),
            partition_exists,
        );
        self.dispatch_effects().await;
        let written = if outcome.records.is_empty() {
            Ok(())
        } else {
            let (tx, rx) = oneshot::oneshot();
            self.submit(outcome.partition, &outcome.records, Some(tx));
            rx.await
                .unwrap_or(Err(ResponseError::CoordinatorNotAvailable))
        };
        let r = self
            .coordinator
            .borrow_mut()
            .finish_offset_commit(outcome, written);
        self.dispatch_effects().await;
        r
    }

    pub fn fetch_offsets(
        &self,
        group_id: &str,
        topics: Option<&[(String, Vec<i32>)]>,
    ) -> GroupOffsets {
        self.coordinator.borrow().fetch_offsets(group_id, topics)
    }

    pub async fn offset_delete(&self, req: &OffsetDeleteRequest) -> OffsetDeleteResponse {
        let r = self
            .coordinator
            .borrow_mut()
            .offset_delete(req, wall_clock_ms());
        self.dispatch_effects().await;
        r
    }

    pub fn committed_offsets(&self) -> Vec<(String, String, i32, i64)> {
        self.coordinator.borrow().committed_offsets()
    }

    pub fn describe_group(&self, version: i16, group_id: &str) -> DescribedGroup {
        self.coordinator.borrow().describe_group(version, group_id)
    }

    pub fn list_groups(&self, states: &[String], types: &[String]) -> (i16, Vec<ListedGroup>) {
        self.coordinator.borrow().list_groups(states, types)
    }

    pub async fn delete_group(&self, group_id: &str) -> DeletableGroupResult {
        let r = self.coordinator.borrow_mut().delete_group(group_id);
        self.dispatch_effects().await;
        r
    }
}

/// Appends a partition's records in submission order. Jobs queued while a write is in flight
/// share one sync (a single node) or one commit round (a cluster).
/// After writing each segment's worth of a partition's writes, it wakes the shard's log
/// cleaner: only closed segments are cleaned, and waiting for the cleaner's backoff (15 s by
/// default) after a quiet spell let a burst of commits pile up hundreds of MB of dirty log,
/// all replayed by the next coordinator of the partition. Woken as segments close, the cleaner
/// keeps what a load replays to the live groups' records, the active segment and what it has
/// not yet reached (see docs/architecture.md, "Group coordinator").
async fn write_loop(
    partition: i32,
    log: OffsetsLog,
    queue: Rc<WriteQueue>,
    cleaner_wake: Rc<Signal>,
) {
    let mut since_wake = 0u64;
    while let Some(jobs) = queue.take_all().await {
        let batches: Vec<Bytes> = jobs
            .iter()
            .flat_map(|j| j.batches.iter().cloned())
            .collect();
        since_wake += batches.iter().map(|b| b.len() as u64).sum::<u64>();
        if since_wake >= OFFSETS_SEGMENT_BYTES {
            since_wake = 0;
            cleaner_wake.notify();
        }
        wait_for_cleaner(partition, log.replica()).await;
        let result = match &log {
            OffsetsLog::Local(replica) => append_local(replica, batches).await,
            OffsetsLog::Replicated(group) => append_replicated(group, batches).await,
        };
        if let Err(e) = &result {
            tracing::warn!(partition, error = ?e, "__consumer_offsets write failed");
        }
        for job in jobs {
            if let Some(done) = job.done {
                let _ = done.send(result);
            }
        }
    }
}

/// Holds a write to an offsets partition over its uncleaned bound
/// (`partition::OFFSETS_MAX_UNCLEANED_BYTES`; [`PartitionReplica::keep_cleaned`] also asks for
/// the urgent cleaning) until the cleaner has been through it, at most
/// [`OFFSETS_CLEAN_WAIT_MAX_MS`]. Commits faster than the cleaner cleans are slowed to its pace
/// rather than left for a load to replay: a burst of 10 M commits left about 470 MB of dirty
/// log behind, and a restart after a crash replayed 6.5 M records of it.
async fn wait_for_cleaner(partition: i32, replica: &PartitionReplica) {
    let Some((since, true)) = replica.keep_cleaned() else {
        return;
    };
    // Every cleaning on the shard runs unpaced meanwhile: the one this waits for may be
    // queued behind another log's.
    let _waits = spate_replication::partition::WriterWaits::begin();
    let started = std::time::Instant::now();
    let visited = futures_lite::future::or(
        async {
            replica.cleaner_visited(since).await;
            true
        },
        async {
            glommio::timer::sleep(Duration::from_millis(OFFSETS_CLEAN_WAIT_MAX_MS)).await;
            false
        },
    )
    .await;
    tracing::debug!(
        partition,
        visited,
        waited_ms = started.elapsed().as_millis() as u64,
        uncleaned_after = replica.uncleaned_bytes().0,
        "__consumer_offsets write waited for the cleaner"
    );
}

/// Appends batches this broker built to a single node's replica and syncs them, whatever
/// the flush policy: a commit is answered once it is on disk.
async fn append_local(
    replica: &PartitionReplica,
    batches: Vec<Bytes>,
) -> Result<(), ResponseError> {
    let mut end = None;
    for batch in batches {
        let verified = VerifiedBatch::from_bytes(batch).map_err(|e| storage_error(&e.into()))?;
        match replica.append_internal(verified).await {
            Ok(info) => end = Some(info.last_offset + 1),
            Err(e) => return Err(storage_error(&e)),
        }
    }
    if let Some(end) = end {
        replica
            .wait_durable(end)
            .await
            .map_err(|e| storage_error(&e))?;
    }
    Ok(())
}

/// Proposes batches this broker built through the partition's consensus group, as an
/// acks=all produce: done once committed (durable on a majority as the flush policy says).
async fn append_replicated(
    group: &Rc<PartitionGroup>,
    batches: Vec<Bytes>,
) -> Result<(), ResponseError> {
    let verified = batches
        .into_iter()
        .map(VerifiedBatch::from_bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| storage_error(&e.into()))?;
    let (outcome, completion) = group.produce(verified, Acks::All).await;
    if outcome.error_code != 0 {
        return Err(commit_error(outcome.error_code));
    }
    completion.wait().await.map_err(commit_error)
}

/// How a partition's refusal of the coordinator's write is answered, as Kafka maps them for
/// commits: leadership gone means another coordinator.
fn commit_error(code: i16) -> ResponseError {
    match ResponseError::try_from_code(code) {
        Some(ResponseError::NotLeaderOrFollower) => ResponseError::NotCoordinator,
        Some(ResponseError::MessageTooLarge | ResponseError::RecordListTooLarge) => {
            ResponseError::InvalidCommitOffsetSize
        }
        _ => ResponseError::CoordinatorNotAvailable,
    }
}

/// Moves one partition of the layout before `__consumer_offsets` was a topic
/// (`<legacy>/<partition>`) into the topic's partition of the same number (the same count
/// puts every group on the same number): appends every batch of the old log, syncs, then
/// removes the old directory. A crash before the removal copies again on the next start;
/// replaying a record twice in order ends in the same state, so that is harmless.
async fn migrate_legacy_partition(
    legacy: &Path,
    partition: i32,
    into: &PartitionReplica,
) -> Result<(), ReplicaError> {
    let dir = legacy.join(partition.to_string());
    if !dir.exists() {
        return Ok(());
    }
    let config = ReplicaConfig {
        log: legacy_offsets_log_config(),
        high_watermark_cap: None,
    };
    let tp = TopicPartition::new(OFFSETS_TOPIC, partition);
    let old = PartitionReplica::open(tp, dir.clone(), None, config, Box::new(NoObserver)).await?;
    let (mut offset, end) = (old.log_start_offset(), old.log_end_offset());
    let mut batches = 0usize;
    let mut written = None;
    while offset < end {
        let read = old.read_local(offset, LOAD_READ_BYTES).await?;
        if read.batches.is_empty() {
            break;
        }
        for batch in read.batches {
            let header = BatchHeader::parse(&batch).map_err(ReplicaError::from)?;
            let next = u64::try_from(header.last_offset() + 1).unwrap_or(u64::MAX);
            if next <= offset {
                offset = end;
                break;
            }
            offset = next;
            let verified = VerifiedBatch::from_bytes(batch).map_err(ReplicaError::from)?;
            written = Some(into.append_internal(verified).await?.last_offset + 1);
            batches += 1;
        }
    }
    if let Some(end) = written {
        into.wait_durable(end).await?;
    }
    old.close().await?;
    std::fs::remove_dir_all(&dir)?;
    // The parent goes with its last partition.
    if std::fs::read_dir(legacy).is_ok_and(|mut d| d.next().is_none()) {
        let _ = std::fs::remove_dir(legacy);
    }
    tracing::info!(
        partition,
        batches,
        from = %dir.display(),
        "migrated __consumer_offsets partition of the previous layout into the topic"
    );
    Ok(())
}

/// How a failed write is reported to the client, as Kafka maps log errors for commits.
fn storage_error(e: &ReplicaError) -> ResponseError {
    match e {
        ReplicaError::Engine(EngineError::BatchTooLarge { .. }) => {
            ResponseError::InvalidCommitOffsetSize
        }
        _ => ResponseError::CoordinatorNotAvailable,
    }
}
