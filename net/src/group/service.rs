//! The I/O side of the group coordinator on one shard: feeds it requests and the clock, turns
//! its effects into replies and `__consumer_offsets` appends, loads its partitions at startup
//! and ticks it from a timer.
//!
//! Everything here runs on the shard's own executor (`Rc`, `RefCell`, no locks). The borrow of
//! the coordinator is never held across an `.await`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
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
    BatchHeader, EngineError, FlushPolicy, LogConfig, PartitionReplica, ReplicaError, VerifiedBatch,
};

use super::compaction::LiveRecords;
use super::records::{decode_raw_batches, encode_raw_batch, RawRecord};
use super::{
    ClientInfo, Effect, GroupConfig, GroupCoordinator, GroupOffsets, OffsetsRecord, ReplyId,
};

/// Most records in one appended batch (offset records are at most a few KiB each, so a batch
/// stays well below the log's `max_batch_bytes`).
pub const MAX_RECORDS_PER_BATCH: usize = 100;
/// Bytes asked for per read while loading a partition.
const LOAD_READ_BYTES: usize = 1 << 20;
/// How often the coordinator's timers (sessions, rebalances, retention) are checked.
pub const DEFAULT_TICK_INTERVAL_MS: u64 = 100;

/// Segment size of `__consumer_offsets` partitions. Their records are small, and the engine
/// preallocates whole segments, so user-topic sized (1 GiB) segments would cost every broker
/// gigabytes of disk for a few kilobytes of offsets.
pub const OFFSETS_SEGMENT_BYTES: u64 = 8 << 20;
/// Largest `__consumer_offsets` batch (a group metadata snapshot of a big group).
pub const OFFSETS_MAX_BATCH_BYTES: u32 = 2 << 20;

/// The log settings of a `__consumer_offsets` partition: small segments, durable on every
/// commit, and never trimmed by time or size: retention would lose offsets. The partition's
/// writer compacts it instead (`compaction.rs`).
pub fn offsets_log_config() -> LogConfig {
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
    /// The records of `batches`, for the writer's live-record map.
    records: Vec<RawRecord>,
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

/// A partition log and the task appending to it.
type OpenLog = (Rc<PartitionReplica>, glommio::Task<()>);

/// The group coordinator of one shard with its I/O.
pub struct GroupShard {
    coordinator: RefCell<GroupCoordinator>,
    writers: RefCell<BTreeMap<i32, Rc<WriteQueue>>>,
    /// The partition logs and their writer tasks, for an orderly close.
    logs: RefCell<BTreeMap<i32, OpenLog>>,
    waiters: RefCell<HashMap<ReplyId, Waiter>>,
    next_reply: Cell<ReplyId>,
}

impl GroupShard {
    pub fn new(config: GroupConfig) -> Result<Rc<Self>, String> {
        Ok(Rc::new(GroupShard {
            coordinator: RefCell::new(GroupCoordinator::new(config)?),
            writers: RefCell::new(BTreeMap::new()),
            logs: RefCell::new(BTreeMap::new()),
            waiters: RefCell::new(HashMap::new()),
            next_reply: Cell::new(1),
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

    /// Replays `partition`'s log into the coordinator, then starts the partition's writer task
    /// and serves its groups. The partition must have been handed over with
    /// [`Self::begin_loading`]; if it was given up meanwhile (shutdown), the log is closed and
    /// nothing is served.
    pub async fn load_partition(
        self: &Rc<Self>,
        partition: i32,
        log: Rc<PartitionReplica>,
    ) -> Result<(), ReplicaError> {
        let mut offset = log.log_start_offset();
        let end = log.log_end_offset();
        let mut records = 0usize;
        let mut live = LiveRecords::default();
        while offset < end && self.coordinator.borrow().is_loading(partition) {
            let read = log.read_local(offset, LOAD_READ_BYTES).await?;
            if read.batches.is_empty() || !self.coordinator.borrow().is_loading(partition) {
                break;
            }
            let now = wall_clock_ms();
            for batch in read.batches {
                let header = BatchHeader::parse(&batch).map_err(ReplicaError::from)?;
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
                live.note_appended(batch.len() as u64);
                let decoded = decode_raw_batches(batch.clone()).and_then(|raw| {
                    let typed = raw
                        .iter()
                        .map(|(k, v)| OffsetsRecord::decode(k, v.as_deref()))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok((raw, typed))
                });
                match decoded {
                    Ok((raw, typed)) => {
                        let mut c = self.coordinator.borrow_mut();
                        for ((key, value), record) in raw.into_iter().zip(typed) {
                            records += 1;
                            // Owned copies: the decoded key and value are slices of the
                            // read buffer, which they would otherwise keep alive whole.
                            live.apply(
                                Bytes::copy_from_slice(&key),
                                value.map(|v| Bytes::copy_from_slice(&v)),
                            );
                            c.replay(partition, record, now);
                        }
                    }
                    // A batch this coordinator cannot read was not written by it: skip it
                    // loudly rather than refuse to serve every group of the partition.
                    Err(e) => {
                        tracing::error!(partition, offset, error = %e, "unreadable __consumer_offsets batch skipped")
                    }
                }
            }
        }
        if !self.coordinator.borrow().is_loading(partition) {
            tracing::info!(
                partition,
                "__consumer_offsets partition given up while loading"
            );
            return log.close().await;
        }
        let queue = Rc::new(WriteQueue::default());
        let compact = Compaction {
            min_bytes: self
                .coordinator
                .borrow()
                .config()
                .offsets_snapshot_min_bytes,
            live,
        };
        let writer =
            glommio::spawn_local(write_loop(partition, log.clone(), queue.clone(), compact));
        if let Some(old) = self.writers.borrow_mut().insert(partition, queue) {
            old.close();
        }
        self.logs.borrow_mut().insert(partition, (log, writer));
        self.coordinator
            .borrow_mut()
            .finish_loading(partition, wall_clock_ms());
        tracing::debug!(partition, records, "consumer offsets loaded");
        self.dispatch_effects().await;
        Ok(())
    }

    /// Marks a partition as this shard's before its log is even open, so its groups get
    /// COORDINATOR_LOAD_IN_PROGRESS (retriable) rather than NOT_COORDINATOR meanwhile.
    pub fn begin_loading(&self, partition: i32) {
        self.coordinator.borrow_mut().begin_loading(partition);
    }

    /// Stops serving groups (broker shutdown): every pending JoinGroup and SyncGroup is
    /// answered with NOT_COORDINATOR at once, so connections can drain without waiting for a
    /// rebalance timeout, and later requests get NOT_COORDINATOR. Writes already queued still
    /// complete; [`Self::close`] closes the logs afterwards.
    pub fn stop_serving(&self) {
        let partitions = self.coordinator.borrow().owned_partitions();
        for partition in partitions {
            self.coordinator.borrow_mut().unload(partition);
        }
        self.dispatch_effects_now();
    }

    /// Lets queued writes finish, then closes every partition log (flush and recovery point).
    pub async fn close(&self) {
        for queue in std::mem::take(&mut *self.writers.borrow_mut()).into_values() {
            queue.close();
        }
        let logs = std::mem::take(&mut *self.logs.borrow_mut());
        for (partition, (log, writer)) in logs {
            writer.await;
            if let Err(e) = log.close().await {
                tracing::error!(partition, error = %e, "closing __consumer_offsets log");
            }
        }
    }

    /// Gives `partition` up (another node or shard takes it): pending replies of its groups
    /// get NOT_COORDINATOR and its writer stops after the queued writes.
    pub fn unload_partition(&self, partition: i32) {
        self.coordinator.borrow_mut().unload(partition);
        if let Some(queue) = self.writers.borrow_mut().remove(&partition) {
            queue.close();
        }
        if let Some((log, writer)) = self.logs.borrow_mut().remove(&partition) {
            glommio::spawn_local(async move {
                writer.await;
                if let Err(e) = log.close().await {
                    tracing::error!(partition, error = %e, "closing __consumer_offsets log");
                }
            })
            .detach();
        }
        self.dispatch_effects_now();
    }

    /// Starts the timer task that ticks the coordinator every `interval_ms`; it lives as long
    /// as the shard's executor.
    pub fn start_ticker(self: &Rc<Self>, interval_ms: u64) {
        let weak = Rc::downgrade(self);
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(Duration::from_millis(interval_ms)).await;
                let Some(shard) = weak.upgrade() else { break };
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
        let records: Vec<RawRecord> = records.iter().map(OffsetsRecord::to_raw).collect();
        let batches = records
            .chunks(MAX_RECORDS_PER_BATCH)
            .map(|chunk| encode_raw_batch(chunk, now))
            .collect();
        let job = WriteJob {
            batches,
            records,
            done,
        };
        let writers = self.writers.borrow();
        match writers.get(&partition) {
            Some(queue) => queue.push(job),
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
/// share one sync (group commit).
/// A partition writer's compaction state: its live records and when to rewrite them.
struct Compaction {
    min_bytes: u64,
    live: LiveRecords,
}

async fn write_loop(
    partition: i32,
    log: Rc<PartitionReplica>,
    queue: Rc<WriteQueue>,
    mut compact: Compaction,
) {
    while let Some(jobs) = queue.take_all().await {
        let mut result: Result<(), ResponseError> = Ok(());
        let mut end = None;
        for job in &jobs {
            for batch in &job.batches {
                match append_built(&log, batch.clone()).await {
                    Ok(next) => {
                        end = Some(next);
                        compact.live.note_appended(batch.len() as u64);
                    }
                    Err(e) => {
                        tracing::error!(partition, error = %e, "__consumer_offsets append failed");
                        result = Err(storage_error(&e));
                    }
                }
            }
        }
        if let (Ok(()), Some(end)) = (&result, end) {
            if let Err(e) = log.wait_durable(end).await {
                tracing::error!(partition, error = %e, "__consumer_offsets sync failed");
                result = Err(storage_error(&e));
            }
        }
        // Only what is durable enters the live set: a failed job's records were refused.
        if result.is_ok() {
            for job in &jobs {
                for (key, value) in &job.records {
                    compact.live.apply(key.clone(), value.clone());
                }
            }
        }
        for job in jobs {
            if let Some(done) = job.done {
                let _ = done.send(result);
            }
        }
        if result.is_ok() && compact.live.should_snapshot(compact.min_bytes) {
            rewrite_live_records(partition, &log, &mut compact.live).await;
        }
    }
}

/// Appends a batch this broker built, returning the offset after it. The check is what lets
/// the log take it (the log only accepts batches whose CRC was verified).
async fn append_built(log: &PartitionReplica, batch: Bytes) -> Result<u64, ReplicaError> {
    let batch = VerifiedBatch::from_bytes(batch).map_err(ReplicaError::from)?;
    Ok(log.append_internal(batch).await?.last_offset + 1)
}

/// Appends every live record again, makes it durable, then drops the whole segments below it.
/// Runs in the writer's loop, so nothing else is appended in between. A failure leaves the log
/// longer than it needs to be, never shorter.
async fn rewrite_live_records(partition: i32, log: &PartitionReplica, live: &mut LiveRecords) {
    let start = log.log_end_offset();
    let now = wall_clock_ms();
    let batches = live.snapshot(MAX_RECORDS_PER_BATCH, OFFSETS_MAX_BATCH_BYTES as usize);
    let mut end = start;
    for records in &batches {
        match append_built(log, encode_raw_batch(records, now)).await {
            Ok(next) => end = next,
            Err(e) => {
                tracing::error!(partition, error = %e, "__consumer_offsets snapshot append failed");
                return;
            }
        }
    }
    if let Err(e) = log.wait_durable(end).await {
        tracing::error!(partition, error = %e, "__consumer_offsets snapshot sync failed");
        return;
    }
    match log.delete_segments_below(start).await {
        Ok(new_start) => tracing::debug!(
            partition,
            live = live.live_keys(),
            snapshot_start = start,
            log_start = new_start,
            "__consumer_offsets compacted"
        ),
        Err(e) => {
            tracing::error!(partition, error = %e, "__consumer_offsets segment removal failed")
        }
    }
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
