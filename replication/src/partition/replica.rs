//! One partition replica on its owning shard: the engine log (private to it), the
//! idempotent-producer state that decides which batches reach it, and the high watermark. It is
//! the only way to a log from above: the Kafka handlers append, read and query offsets through
//! it, and it decides how long an append waits for durability (acks and the flush policy).

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::path::PathBuf;
use std::rc::Rc;

use bytes::Bytes;
use glommio::sync::Semaphore;
use kafka_protocol::ResponseError;
use serde::{Deserialize, Serialize};
use spate_engine::batch::{BatchHeader, VerifiedBatch};
use spate_engine::validate::{validate_batch, Refusal};
use spate_engine::{AppendInfo, FlushPolicy, LiveLimits, LogConfig, PartitionLog};

use super::error::{engine_error_code, ReplicaError};
use super::producer_state::{last_seq, BatchMeta, ProducerTable, Verdict};
use super::topic_partition::TopicPartition;

/// Bytes read per step while rebuilding producer state from the log.
const RECOVERY_READ_BYTES: usize = 1 << 20;
/// Leader epoch stamped into batches until replication assigns real epochs.
pub const LEADER_EPOCH: i32 = 0;
/// Kafka's "no error" code.
const NONE: i16 = 0;

/// What a replica reports as it changes, so the layer above can export metrics without the
/// replica knowing how they are kept.
pub trait ReplicaObserver {
    /// A batch of `bytes` bytes holding `records` records was appended.
    fn appended(&self, bytes: u64, records: u64);
    /// The log end or the high watermark moved.
    fn offsets(&self, log_end: u64, high_watermark: u64);
    /// The replica was deleted (its topic is gone).
    fn removed(&self);
}

/// For replicas whose metrics nobody exports (the broker's internal partitions).
pub struct NoObserver;

impl ReplicaObserver for NoObserver {
    fn appended(&self, _bytes: u64, _records: u64) {}
    fn offsets(&self, _log_end: u64, _high_watermark: u64) {}
    fn removed(&self) {}
}

/// How a replica is opened: the log's settings and the test hook on the high watermark.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    pub log: LogConfig,
    /// Test hook: the high watermark never passes this offset, whatever is appended, as when
    /// followers lag. It goes through [`PartitionReplica::advance_high_watermark`], the path
    /// replication commits by. `None` in production.
    pub high_watermark_cap: Option<u64>,
}

/// How durable a Produce must be before it is answered (Kafka's `acks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acks {
    /// `acks=0`: no answer, nothing waited for.
    None,
    /// `acks=1`: the leader has it (durable too if the flush policy says every batch).
    Leader,
    /// `acks=-1`: every in-sync replica has it; on a single node, the same as the leader.
    All,
}

impl Acks {
    /// The Kafka `acks` field; `None` for a value Kafka refuses (INVALID_REQUIRED_ACKS).
    pub fn from_kafka(acks: i16) -> Option<Acks> {
        match acks {
            0 => Some(Acks::None),
            1 => Some(Acks::Leader),
            -1 => Some(Acks::All),
            _ => None,
        }
    }
}

/// Resolves when an append is as durable as its acks and the flush policy require (see
/// [`PartitionReplica::append`]). Waiting is separate from appending so that the next Produce
/// of a connection may append while this one waits.
#[must_use = "an append is only durable once its completion resolves"]
pub struct Completion {
    replica: Option<Rc<PartitionReplica>>,
}

impl Completion {
    /// Nothing to wait for.
    pub fn done() -> Completion {
        Completion { replica: None }
    }

    /// Waits; the error is a Kafka error code.
    pub async fn wait(self) -> Result<(), i16> {
        let Some(r) = self.replica else {
            return Ok(());
        };
        // The batches of this append end at or before the current log end; syncing to it is
        // one group commit for everything appended so far.
        let end = r.log.log_end_offset();
        r.log.sync_to(end).await.map_err(|e| {
            tracing::error!(topic = %r.tp.topic, partition = r.tp.partition, error = %e, "sync failed");
            engine_error_code(&e)
        })
    }
}

/// Whole batches read for a consumer, never past the high watermark.
#[derive(Clone, Debug, Default)]
pub struct ReplicaRead {
    pub records: Bytes,
    pub high_watermark: u64,
    pub log_start_offset: u64,
}

pub struct PartitionReplica {
    pub tp: TopicPartition,
    log: PartitionLog,
    flush: FlushPolicy,
    /// Offsets below it are committed: consumers may read them. Only grows; never passes the
    /// log end.
    high_watermark: Cell<u64>,
    high_watermark_cap: Option<u64>,
    producers: RefCell<ProducerTable>,
    /// Held across the producer check and the append, so both see the same log end.
    write_lock: Semaphore,
    /// Where producer state is snapshotted; `None` for partitions only the broker writes.
    state_path: Option<PathBuf>,
    /// Log end covered by the last snapshot written.
    snapshot_end: Cell<Option<u64>>,
    observer: Box<dyn ReplicaObserver>,
}

/// Outcome of one partition's share of a Produce request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProduceOutcome {
    pub error_code: i16,
    pub base_offset: i64,
    pub log_start_offset: i64,
    /// Why the partition's batches were refused (the Produce response's `error_message`); set
    /// only on that error path.
    pub error_message: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    /// The table covers every batch below this offset.
    end_offset: u64,
    table: ProducerTable,
}

impl PartitionReplica {
    /// Opens the partition's log, recovering it, and rebuilds its producer state.
    pub async fn open(
        tp: TopicPartition,
        dir: PathBuf,
        state_path: Option<PathBuf>,
        config: ReplicaConfig,
        observer: Box<dyn ReplicaObserver>,
    ) -> Result<PartitionReplica, ReplicaError> {
        let flush = config.log.flush;
        let log = PartitionLog::open(&dir, config.log).await?;
        let partition = PartitionReplica {
            tp,
            log,
            flush,
            high_watermark: Cell::new(0),
            high_watermark_cap: config.high_watermark_cap,
            producers: RefCell::default(),
            write_lock: Semaphore::new(1),
            state_path,
            snapshot_end: Cell::new(None),
            observer,
        };
        partition.recover_producers().await?;
        // A single node holds every copy there is: whatever recovery kept is committed.
        partition.commit_local();
        Ok(partition)
    }

    /// Loads the last snapshot (if it is consistent with the log) and replays the batches
    /// written after it.
    async fn recover_producers(&self) -> Result<(), ReplicaError> {
        let (log_start, log_end) = (self.log.log_start_offset(), self.log.log_end_offset());
        let mut from = log_start;
        let Some(state_path) = &self.state_path else {
            return Ok(());
        };
        match std::fs::read(state_path) {
            Ok(bytes) => match serde_json::from_slice::<Snapshot>(&bytes) {
                Ok(s) if s.end_offset <= log_end && s.end_offset >= log_start => {
                    *self.producers.borrow_mut() = s.table;
                    from = s.end_offset;
                }
                Ok(_) => tracing::info!(topic = %self.tp.topic, partition = self.tp.partition,
                    "producer snapshot does not match the log; rebuilding from the log"),
                Err(e) => tracing::warn!(topic = %self.tp.topic, partition = self.tp.partition,
                    error = %e, "unreadable producer snapshot; rebuilding from the log"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let mut offset = from;
        while offset < log_end {
            let read = self.log.read(offset, RECOVERY_READ_BYTES).await?;
            if read.batches.is_empty() {
                break;
            }
            for batch in &read.batches {
                let h = BatchHeader::parse(batch)?;
                if (h.last_offset() as u64) < offset {
                    continue;
                }
                if h.producer_id() >= 0 {
                    self.producers.borrow_mut().record(
                        h.producer_id(),
                        h.producer_epoch(),
                        batch_meta(&h),
                    );
                }
                offset = h.last_offset() as u64 + 1;
            }
        }
        Ok(())
    }

    /// Appends a Produce request's verified batches for this partition after validating their
    /// insides and the idempotence checks. Returns once they are readable, with the base offset
    /// (or the error) and a completion that resolves once they are as durable as `acks` and the
    /// flush policy require.
    pub async fn append(
        self: &Rc<Self>,
        batches: Vec<VerifiedBatch>,
        acks: Acks,
    ) -> (ProduceOutcome, Completion) {
        let outcome = self.append_checked(batches).await;
        let wait = acks != Acks::None && self.flush == FlushPolicy::Always;
        let completion = if wait && outcome.error_code == NONE && outcome.base_offset >= 0 {
            Completion {
                replica: Some(self.clone()),
            }
        } else {
            Completion::done()
        };
        (outcome, completion)
    }

    async fn append_checked(&self, batches: Vec<VerifiedBatch>) -> ProduceOutcome {
        let mut outcome = ProduceOutcome {
            error_code: NONE,
            base_offset: -1,
            log_start_offset: self.log.log_start_offset() as i64,
            error_message: None,
        };
        // Every batch of the request is checked before any is stored: a refused one leaves the
        // partition's share of the request unstored as a whole.
        let max_uncompressed_bytes = self.log.limits().max_batch_bytes as usize;
        for (i, batch) in batches.iter().enumerate() {
            if let Err(e) = validate_batch(batch.header().as_bytes(), max_uncompressed_bytes) {
                tracing::debug!(topic = %self.tp.topic, partition = self.tp.partition, error = %e, "batch refused");
                outcome.error_code = match e.refusal {
                    Refusal::InvalidRecord => ResponseError::InvalidRecord.code(),
                    Refusal::CorruptMessage => ResponseError::CorruptMessage.code(),
                };
                outcome.error_message = Some(format!("batch {i}: {e}"));
                return outcome;
            }
        }
        let Ok(_permit) = self.write_lock.acquire_permit(1).await else {
            outcome.error_code = ResponseError::NotLeaderOrFollower.code();
            return outcome;
        };
        for batch in batches {
            let h = batch.header();
            let (pid, epoch, mut meta) = (h.producer_id(), h.producer_epoch(), batch_meta(&h));
            let (batch_bytes, records) = (batch.len() as u64, h.records_count().max(0) as u64);
            if h.is_transactional() {
                // Transactions are not implemented: storing their batches without markers
                // would expose uncommitted data.
                outcome.error_code = ResponseError::TransactionalIdAuthorizationFailed.code();
                return outcome;
            }
            if pid >= 0 {
                match self
                    .producers
                    .borrow()
                    .check(pid, epoch, meta.first_seq, meta.last_seq)
                {
                    Verdict::Append => {}
                    Verdict::Duplicate { base_offset } => {
                        outcome.error_code = ResponseError::DuplicateSequenceNumber.code();
                        outcome.base_offset = base_offset;
                        return outcome;
                    }
                    Verdict::Reject { error_code } => {
                        outcome.error_code = error_code;
                        return outcome;
                    }
                }
            }
            let info = match self.log.append(batch, LEADER_EPOCH).await {
                Ok(info) => info,
                Err(e) => {
                    tracing::warn!(topic = %self.tp.topic, partition = self.tp.partition, error = %e, "append failed");
                    outcome.error_code = engine_error_code(&e);
                    return outcome;
                }
            };
            debug_assert!(info.last_offset >= info.base_offset);
            self.observer.appended(batch_bytes, records);
            self.commit_local();
            if pid >= 0 {
                meta.base_offset = info.base_offset as i64;
                meta.last_offset = info.last_offset as i64;
                self.producers.borrow_mut().record(pid, epoch, meta);
            }
            if outcome.base_offset < 0 {
                outcome.base_offset = info.base_offset as i64;
            }
        }
        drop(_permit);
        outcome
    }

    /// Advances the high watermark to what this node alone commits: the log end (a single node
    /// has no followers to wait for), held below the test hook's cap if one is set.
    fn commit_local(&self) {
        let end = self.log.log_end_offset();
        let commit = self.high_watermark_cap.map_or(end, |cap| cap.min(end));
        self.advance_high_watermark(commit.max(self.high_watermark.get()));
    }

    /// Moves the high watermark to `offset`: the path by which replication commits (once a
    /// majority has the batches durably). The high watermark only grows and never passes the
    /// log end.
    pub fn advance_high_watermark(&self, offset: u64) {
        let (hw, end) = (self.high_watermark.get(), self.log.log_end_offset());
        assert!(
            offset >= hw,
            "{}-{}: high watermark moves back from {hw} to {offset}",
            self.tp.topic,
            self.tp.partition
        );
        assert!(
            offset <= end,
            "{}-{}: high watermark {offset} passes the log end {end}",
            self.tp.topic,
            self.tp.partition
        );
        self.high_watermark.set(offset);
        self.observer.offsets(end, offset);
    }

    /// Offsets below it are committed and visible to consumers.
    pub fn high_watermark(&self) -> u64 {
        self.high_watermark.get()
    }

    /// The epoch of the leader this replica follows (or is).
    pub fn leader_epoch(&self) -> i32 {
        LEADER_EPOCH
    }

    pub fn log_start_offset(&self) -> u64 {
        self.log.log_start_offset()
    }

    /// One past the last offset in the local log (committed or not).
    pub fn log_end_offset(&self) -> u64 {
        self.log.log_end_offset()
    }

    /// Whole batches from the one containing `offset`, up to `max_bytes` (at least one batch
    /// if any is committed at or after `offset`), never past the high watermark. An offset
    /// between the high watermark and the log end reads nothing; one outside the log is
    /// OFFSET_OUT_OF_RANGE. The error is a Kafka error code.
    pub async fn read(&self, offset: i64, max_bytes: usize) -> Result<ReplicaRead, i16> {
        let (start, end) = (self.log.log_start_offset(), self.log.log_end_offset());
        let hw = self.high_watermark.get();
        debug_assert!(hw <= end, "high watermark {hw} passes the log end {end}");
        let mut read = ReplicaRead {
            records: Bytes::new(),
            high_watermark: hw,
            log_start_offset: start,
        };
        if offset < start as i64 || offset > end as i64 {
            return Err(ResponseError::OffsetOutOfRange.code());
        }
        if offset as u64 >= hw {
            return Ok(read);
        }
        let r = self
            .log
            .read_joined_below(offset as u64, max_bytes, hw)
            .await
            .map_err(|e| engine_error_code(&e))?;
        // Read after the log: the watermark may have moved on while the read ran, never back.
        read.high_watermark = self.high_watermark.get();
        read.log_start_offset = r.log_start_offset;
        read.records = r.records;
        Ok(read)
    }

    /// The first committed offset whose batch has a timestamp at or after `timestamp_ms`, with
    /// that batch's max timestamp; `None` if there is none. The error is a Kafka error code.
    pub async fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<(u64, i64)>, i16> {
        let found = self
            .log
            .offset_for_timestamp(timestamp_ms)
            .await
            .map_err(|e| engine_error_code(&e))?;
        Ok(found.filter(|(offset, _)| *offset < self.high_watermark.get()))
    }

    /// The log's live limits (retention, max batch size).
    pub fn limits(&self) -> LiveLimits {
        self.log.limits()
    }

    /// Applies changed topic configs (only the live limits change; segment size applies when
    /// the log is next opened).
    pub fn set_limits(&self, limits: LiveLimits) -> Result<(), ReplicaError> {
        Ok(self.log.set_limits(limits)?)
    }

    /// Deletes segments past the retention limits.
    pub async fn apply_retention(&self, now_ms: i64) -> Result<u64, ReplicaError> {
        Ok(self.log.apply_retention(now_ms).await?)
    }

    /// Appends a batch the broker built itself (the group coordinator's `__consumer_offsets`
    /// records): no client validation and no producer checks. The caller appends one batch at
    /// a time; durability is awaited with [`Self::wait_durable`].
    pub async fn append_internal(&self, batch: VerifiedBatch) -> Result<AppendInfo, ReplicaError> {
        let info = self.log.append(batch, LEADER_EPOCH).await?;
        self.commit_local();
        Ok(info)
    }

    /// Waits until every offset below `end_offset` is durable.
    pub async fn wait_durable(&self, end_offset: u64) -> Result<(), ReplicaError> {
        if end_offset == 0 {
            return Ok(());
        }
        Ok(self.log.wait_durable_past(end_offset - 1).await?)
    }

    /// Whole batches of the local log from the one containing `offset`, each its own buffer,
    /// up to its end: for the owner of the partition's state (the group coordinator loading
    /// its groups), not for consumers.
    pub async fn read_local(
        &self,
        offset: u64,
        max_bytes: usize,
    ) -> Result<spate_engine::ReadResult, ReplicaError> {
        Ok(self.log.read(offset, max_bytes).await?)
    }

    /// Deletes the whole segments below `offset` (after their live data was rewritten at the
    /// end); returns the new log start offset.
    pub async fn delete_segments_below(&self, offset: u64) -> Result<u64, ReplicaError> {
        Ok(self.log.delete_segments_below(offset).await?)
    }

    /// Snapshots producer state if it changed since the last snapshot, so recovery after a
    /// crash replays only the log written since. Taken under the write lock: the table and the
    /// log end must describe the same batches.
    pub async fn snapshot_producers(&self) -> Result<(), ReplicaError> {
        let Ok(_permit) = self.write_lock.acquire_permit(1).await else {
            return Ok(());
        };
        let end = self.log.log_end_offset();
        if self.producers.borrow().is_empty() || self.snapshot_end.get() == Some(end) {
            return Ok(());
        }
        self.write_snapshot()
    }

    /// Writes the producer snapshot atomically (temp file, fsync, rename).
    fn write_snapshot(&self) -> Result<(), ReplicaError> {
        let Some(state_path) = &self.state_path else {
            return Ok(());
        };
        let snap = Snapshot {
            end_offset: self.log.log_end_offset(),
            table: self.producers.borrow().clone(),
        };
        self.snapshot_end.set(Some(snap.end_offset));
        let body = serde_json::to_vec(&snap).map_err(|e| ReplicaError::Encode(e.to_string()))?;
        if let Some(dir) = state_path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = state_path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, state_path)?;
        Ok(())
    }

    /// Flushes the log, snapshots producer state, closes.
    pub async fn close(&self) -> Result<(), ReplicaError> {
        let _permit = self.write_lock.acquire_permit(1).await;
        self.log.close().await?;
        self.write_snapshot()
    }

    pub async fn delete(&self) -> Result<(), ReplicaError> {
        let _permit = self.write_lock.acquire_permit(1).await;
        self.observer.removed();
        self.log.delete().await?;
        if let Some(state_path) = &self.state_path {
            let _ = std::fs::remove_file(state_path);
        }
        Ok(())
    }
}

fn batch_meta(h: &BatchHeader<'_>) -> BatchMeta {
    BatchMeta {
        first_seq: h.base_sequence(),
        last_seq: last_seq(h.base_sequence(), h.last_offset_delta()),
        base_offset: h.base_offset(),
        last_offset: h.last_offset(),
    }
}
