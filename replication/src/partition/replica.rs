//! One partition replica on its owning shard: the engine log (private to it), the
//! idempotent-producer state that decides which batches reach it, and the high watermark. It is
//! the only way to a log from above: the Kafka handlers append, read and query offsets through
//! it, and it decides how long an append waits for durability (acks and the flush policy).

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::Bytes;
use glommio::channels::local_channel::LocalReceiver;
use glommio::sync::Semaphore;
use kafka_protocol::ResponseError;
use spate_engine::batch::{BatchHeader, VerifiedBatch};
use spate_engine::clean::{
    CleanRequest, CleanStats, CleanerConfig, LogCleaner, CLEANER_KEEP_BATCHES_MAX,
};
use spate_engine::validate::{validate_batch, Refusal};
use spate_engine::{
    AppendInfo, EngineError, FlushPolicy, LiveLimits, LogConfig, LogListener, PartitionLog,
};

use super::config::TopicPolicy;
use super::error::{engine_error_code, ReplicaError};
use super::producer_state::{
    decode_snapshots, encode_snapshots, last_seq, Anchor, BatchMeta, ProducerTable, Snapshot,
    Verdict, MAX_SNAPSHOT_FILE_BYTES, SNAPSHOTS_KEPT,
};
use super::record_check::{check_records, RecordError, RecordRules};
use super::topic_partition::TopicPartition;
use crate::types::NodeId;

/// Bytes read per step while rebuilding producer state from the log.
const RECOVERY_READ_BYTES: usize = 1 << 20;
/// Log bytes appended between two producer-state snapshots: what a restart after a crash
/// replays at most (besides a snapshot being written), about 0.1 s of reading. Without it the
/// replay was the whole log (a broker killed before its periodic snapshot replayed gigabytes).
pub const PRODUCER_SNAPSHOT_EVERY_BYTES: u64 = 32 << 20;
/// A snapshot waits for at least this many times its own size of log, so a partition with very
/// many producers does not spend more writing its table than its log.
pub const PRODUCER_SNAPSHOT_SIZE_MULTIPLE: u64 = 8;
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
    /// The high watermark advanced to `high_watermark`: consumers waiting for data may read
    /// more (long-polling fetches wake on this, not on appends).
    fn committed(&self, _high_watermark: u64) {}
    /// A Produce was refused (KAFKA_STORAGE_ERROR) because the disk had no space for it.
    fn refused_no_space(&self) {}
    /// The replica was deleted (its topic is gone).
    fn removed(&self);
    /// The cleaner looked at the log: how dirty it is (dirty bytes over cleanable bytes).
    fn dirty_ratio(&self, _ratio: f64) {}
    /// The cleaner cleaned the log.
    fn cleaned(&self, _stats: &CleanStats) {}
    /// This replica's view of its group's replication changed (reported by its shard's
    /// runtime, at most once a tick and only on a change).
    fn replication(&self, _state: &ReplicationGauges) {}
    /// The replica's group closed on this node (moved away, deleted, or the node is stopping):
    /// its replication view is no longer this node's to report.
    fn replication_stopped(&self) {}
}

/// One replica's view of its partition's replication. Every replica knows its own role and
/// epoch; only a leader knows how far its followers are, so the others (a leader not yet
/// writable included) leave those `None`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicationGauges {
    /// The replica leads and takes writes in its epoch.
    pub writable_leader: bool,
    pub leader_epoch: i32,
    /// The partition's replicas (voters).
    pub replicas: usize,
    /// Leader only: voters caught up to the high watermark, the leader included (the ISR).
    pub in_sync_replicas: Option<usize>,
    /// Leader only: records below the high watermark that the furthest-behind follower has
    /// not written (0 when every follower is caught up).
    pub lag_records: Option<u64>,
    /// Leader of a partition whose replicas are moving: each replica the move adds, with the
    /// bytes of the leader's log it has not written yet (0 once caught up); empty otherwise.
    /// Filled by the shard runtime, which knows the move.
    pub reassignment_bytes_behind: Vec<(NodeId, u64)>,
}

impl ReplicationGauges {
    /// Leader only: fewer replicas in sync than the partition has.
    pub fn under_replicated(&self) -> Option<bool> {
        self.in_sync_replicas.map(|isr| isr < self.replicas)
    }
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
    wait: Wait,
}

enum Wait {
    Done,
    /// The leader's own log must be durable through its end.
    Sync(Rc<PartitionReplica>),
    /// A replicated partition's commit (acks=all): the group answers when the high watermark
    /// passes the batches, or fails it when leadership is lost first (sender dropped included).
    Commit(LocalReceiver<Result<(), i16>>),
}

impl Completion {
    /// Nothing to wait for.
    pub fn done() -> Completion {
        Completion { wait: Wait::Done }
    }

    pub(crate) fn sync(replica: Rc<PartitionReplica>) -> Completion {
        Completion {
            wait: Wait::Sync(replica),
        }
    }

    pub(crate) fn commit(rx: LocalReceiver<Result<(), i16>>) -> Completion {
        Completion {
            wait: Wait::Commit(rx),
        }
    }

    /// Waits; the error is a Kafka error code.
    pub async fn wait(self) -> Result<(), i16> {
        let r = match self.wait {
            Wait::Done => return Ok(()),
            Wait::Sync(r) => r,
            Wait::Commit(rx) => {
                return rx
                    .recv()
                    .await
                    .unwrap_or(Err(ResponseError::NotLeaderOrFollower.code()))
            }
        };
        // The batches of this append end at or before the current log end; syncing to it is
        // one group commit for everything appended so far.
        let end = r.log.log_end_offset();
        r.log.sync_to(end).await.map_err(|e| {
            if e.is_no_space() {
                r.watermark.observer.refused_no_space();
            }
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

/// Told the durable end after each group commit.
type DurableHook = Box<dyn Fn(u64)>;

/// The high watermark, shared by the replica and its log's listener (which advances it when
/// durability does).
struct Watermark {
    tp: TopicPartition,
    /// Offsets below it are committed: consumers may read them. Only grows (except when the
    /// log end moves back under it: a rewind under write caching); never passes the log end.
    value: Cell<u64>,
    cap: Option<u64>,
    /// Under flush `always` only what is durable is committed, so no consumer reads a record
    /// that a crash before the fdatasync takes back (and whose offset then goes to another).
    /// Under `interval` and `never` it is the log end: write caching.
    durable_only: bool,
    /// Replicated partition: only the consensus group moves the watermark (through
    /// [`PartitionReplica::advance_high_watermark`]); this node's log alone commits nothing.
    replicated: bool,
    /// Told the durable end after each group commit (the consensus group's `on_durable`).
    durable_hook: RefCell<Option<DurableHook>>,
    observer: Box<dyn ReplicaObserver>,
}

impl Watermark {
    /// What this node alone commits, with the log durable below `durable` and ending at
    /// `log_end` (a single node has no followers to wait for), held below the test cap.
    fn local_commit(&self, durable: u64, log_end: u64) -> u64 {
        let end = if self.durable_only {
            durable.min(log_end)
        } else {
            log_end
        };
        self.cap.map_or(end, |cap| cap.min(end))
    }

    fn advance(&self, offset: u64, log_end: u64) {
        let hw = self.value.get();
        assert!(
            offset >= hw,
            "{}-{}: high watermark moves back from {hw} to {offset}",
            self.tp.topic,
            self.tp.partition
        );
        assert!(
            offset <= log_end,
            "{}-{}: high watermark {offset} passes the log end {log_end}",
            self.tp.topic,
            self.tp.partition
        );
        self.value.set(offset);
        self.observer.offsets(log_end, offset);
        if offset > hw {
            self.observer.committed(offset);
        }
    }

    fn commit_local(&self, durable: u64, log_end: u64) {
        if self.replicated {
            return;
        }
        let commit = self.local_commit(durable, log_end);
        self.advance(commit.max(self.value.get()), log_end);
    }
}

/// The log's listener: the watermark follows durability, and never stays above a log end that
/// moved back.
struct FollowLog(Rc<Watermark>);

impl LogListener for FollowLog {
    fn durable(&self, durable: u64, log_end: u64) {
        if self.0.durable_only {
            self.0.commit_local(durable, log_end);
        }
        if let Some(hook) = &*self.0.durable_hook.borrow() {
            hook(durable);
        }
    }

    fn truncated(&self, log_end: u64) {
        let w = &self.0;
        if w.value.get() > log_end {
            // Only under write caching (the watermark was past the durable end) or a
            // follower's truncation: what consumers saw past the new end is gone.
            tracing::warn!(topic = %w.tp.topic, partition = w.tp.partition,
                high_watermark = w.value.get(), log_end,
                "log end moved back below the high watermark");
            w.value.set(log_end);
        }
        w.observer.offsets(log_end, w.value.get());
    }
}

pub struct PartitionReplica {
    pub tp: TopicPartition,
    log: PartitionLog,
    flush: FlushPolicy,
    watermark: Rc<Watermark>,
    producers: RefCell<ProducerTable>,
    /// The log's truncation count the producer table matches (see
    /// [`PartitionLog::truncations`]).
    producers_at: Cell<u64>,
    /// Held across the producer check and the append, so both see the same log end.
    write_lock: Semaphore,
    /// Where producer state is snapshotted; `None` for partitions only the broker writes.
    state_path: Option<PathBuf>,
    snapshots: Rc<Snapshots>,
    /// The last batch in the log, when known (after an append or a replay; not after a
    /// truncation): what a snapshot taken now is anchored to.
    last_batch: Cell<Option<Anchor>>,
    /// Bytes of log replayed to rebuild producer state when the replica opened.
    replayed_at_open: Cell<u64>,
    /// The leader epoch published to clients: [`LEADER_EPOCH`] on a single node; on a
    /// replicated partition, set by its consensus group.
    leader_epoch: Cell<i32>,
    /// What the topic's configs ask of this replica beyond the log's settings.
    policy: Cell<TopicPolicy>,
    /// The log cleaner's state for a compacted topic, opened by the first cleaning; taken out
    /// while a cleaning runs.
    cleaner: RefCell<Option<LogCleaner>>,
    /// Held while the cleaner works on the log, and by delete and close, so a log is never
    /// closed under the cleaner.
    clean_lock: Semaphore,
    /// When the log was last cleaned (ms since the epoch), for tombstone expiry.
    last_clean_ms: Cell<Option<i64>>,
    /// The cleaner's first dirty offset as last seen (the cleaner itself is taken out while it
    /// cleans): 0 until a cleaner round opened it, so the whole log counts as uncleaned.
    first_dirty_seen: Cell<u64>,
    /// An urgent cleaning was asked for ([`Self::keep_cleaned`]); the next cleaner visit answers it.
    urgent_clean: Cell<bool>,
    /// Most bytes past the cleaned part before an urgent cleaning is due (see
    /// [`Self::keep_cleaned`]): `__consumer_offsets` only, whose replay is bounded.
    max_uncleaned: Option<u64>,
    /// Notified each time a cleaner round has looked at this log: after it cleaned it, or
    /// found it not due.
    cleaner_visits: crate::shard::Signal,
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
    /// The refused records (KIP-467), when records were refused.
    pub record_errors: Vec<RecordError>,
    /// The time the leader stamped under LogAppendTime, else -1.
    pub log_append_time_ms: i64,
}

impl ProduceOutcome {
    /// A partition answered with `error_code` alone.
    pub fn error(error_code: i16) -> ProduceOutcome {
        ProduceOutcome {
            error_code,
            base_offset: -1,
            log_start_offset: -1,
            error_message: None,
            record_errors: Vec::new(),
            log_append_time_ms: -1,
        }
    }
}

/// A replica's producer-state snapshots, shared with the task that writes one in the
/// background (see [`PartitionReplica::note_appended`]).
struct Snapshots {
    /// The newest snapshot on disk that matched the log: the older generation of the next file.
    kept: RefCell<Option<Rc<Snapshot>>>,
    /// Log bytes appended since the last snapshot was taken.
    bytes_since: Cell<u64>,
    /// Size of the last snapshot file written.
    file_bytes: Cell<u64>,
    /// Held while a snapshot file is written: one at a time, and close and delete wait for it.
    writing: Semaphore,
    /// Set by close and delete: nothing is written after them.
    stopped: Cell<bool>,
    /// Last offsets of the batches the generations in the file end with, and of the one the
    /// newest snapshot taken (maybe still being written) ends with: the cleaner keeps those
    /// batches whole, so a snapshot still matches its log after cleaning.
    anchors_on_disk: Cell<[Option<u64>; SNAPSHOTS_KEPT]>,
    anchor_taken: Cell<Option<u64>>,
}

impl Snapshots {
    fn new() -> Snapshots {
        Snapshots {
            kept: RefCell::new(None),
            bytes_since: Cell::new(0),
            file_bytes: Cell::new(0),
            writing: Semaphore::new(1),
            stopped: Cell::new(false),
            anchors_on_disk: Cell::new([None; SNAPSHOTS_KEPT]),
            anchor_taken: Cell::new(None),
        }
    }

    /// Writes `snap` (with the newest older snapshot on disk as the second generation) over
    /// the file at `path`, atomically and durably. Caller holds `writing`.
    async fn write(&self, path: &Path, snap: Snapshot) -> Result<(), ReplicaError> {
        if self.stopped.get() {
            return Ok(());
        }
        let snap = Rc::new(snap);
        let older = self
            .kept
            .borrow()
            .clone()
            .filter(|k| k.end_offset < snap.end_offset);
        let generations: Vec<&Snapshot> = std::iter::once(&*snap).chain(older.as_deref()).collect();
        let body = encode_snapshots(&generations).map_err(ReplicaError::Encode)?;
        let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
        else {
            return Err(ReplicaError::Encode(format!(
                "snapshot path {}",
                path.display()
            )));
        };
        std::fs::create_dir_all(dir)?;
        self.file_bytes.set(body.len() as u64);
        spate_engine::write_file_atomic(dir, name, body).await?;
        let mut anchors = [None; SNAPSHOTS_KEPT];
        for (slot, g) in anchors.iter_mut().zip(&generations) {
            *slot = g.anchor.map(|a| a.last_offset);
        }
        self.anchors_on_disk.set(anchors);
        *self.kept.borrow_mut() = Some(snap);
        Ok(())
    }
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
        Self::open_with(tp, dir, state_path, config, observer, false).await
    }

    /// Opens a partition replicated by a consensus group: as [`Self::open`], but the high
    /// watermark starts at 0 and moves only as the group commits (what this node's log holds
    /// past it may yet be truncated).
    pub async fn open_replicated(
        tp: TopicPartition,
        dir: PathBuf,
        state_path: Option<PathBuf>,
        config: ReplicaConfig,
        observer: Box<dyn ReplicaObserver>,
    ) -> Result<PartitionReplica, ReplicaError> {
        Self::open_with(tp, dir, state_path, config, observer, true).await
    }

    async fn open_with(
        tp: TopicPartition,
        dir: PathBuf,
        state_path: Option<PathBuf>,
        config: ReplicaConfig,
        observer: Box<dyn ReplicaObserver>,
        replicated: bool,
    ) -> Result<PartitionReplica, ReplicaError> {
        let flush = config.log.flush;
        let started = std::time::Instant::now();
        let log = PartitionLog::open(&dir, config.log).await?;
        let log_opened = started.elapsed();
        let watermark = Rc::new(Watermark {
            tp: tp.clone(),
            value: Cell::new(0),
            cap: config.high_watermark_cap,
            durable_only: flush == FlushPolicy::Always,
            replicated,
            durable_hook: RefCell::new(None),
            observer,
        });
        log.set_listener(Box::new(FollowLog(watermark.clone())));
        let max_uncleaned = (&*tp.topic == crate::metadata::CONSUMER_OFFSETS_TOPIC)
            .then_some(super::clean::OFFSETS_MAX_UNCLEANED_BYTES);
        let partition = PartitionReplica {
            tp,
            producers_at: Cell::new(log.truncations()),
            log,
            flush,
            watermark,
            producers: RefCell::default(),
            write_lock: Semaphore::new(1),
            state_path,
            snapshots: Rc::new(Snapshots::new()),
            last_batch: Cell::new(None),
            replayed_at_open: Cell::new(0),
            leader_epoch: Cell::new(LEADER_EPOCH),
            policy: Cell::new(TopicPolicy::default()),
            cleaner: RefCell::new(None),
            clean_lock: Semaphore::new(1),
            last_clean_ms: Cell::new(None),
            first_dirty_seen: Cell::new(0),
            urgent_clean: Cell::new(false),
            max_uncleaned,
            cleaner_visits: crate::shard::Signal::default(),
        };
        let replayed = partition.recover_producers().await?;
        partition.replayed_at_open.set(replayed);
        tracing::info!(topic = %partition.tp.topic, partition = partition.tp.partition,
            log_end = partition.log.log_end_offset(), log_open_ms = log_opened.as_millis() as u64,
            producers_ms = (started.elapsed() - log_opened).as_millis() as u64,
            replayed_bytes = replayed, "replica opened");
        if replayed >= PRODUCER_SNAPSHOT_EVERY_BYTES {
            // So that the next restart does not replay this again.
            partition.snapshot_now().await?;
        }
        // A single node holds every copy there is: whatever recovery kept is committed.
        partition.commit_local();
        Ok(partition)
    }

    /// Rebuilds the producer table: from the newest snapshot that still matches the log (see
    /// [`super::producer_state`]), replaying the batches written after it; from the log start
    /// when none does. Returns the bytes replayed.
    async fn recover_producers(&self) -> Result<u64, ReplicaError> {
        let (log_start, log_end) = (self.log.log_start_offset(), self.log.log_end_offset());
        *self.producers.borrow_mut() = ProducerTable::default();
        self.last_batch.set(None);
        let Some(state_path) = &self.state_path else {
            return Ok(0);
        };
        let mut from = log_start;
        let generations = self.read_snapshots(state_path)?;
        let mut anchors = [None; SNAPSHOTS_KEPT];
        for (slot, g) in anchors.iter_mut().zip(&generations) {
            *slot = g.anchor.map(|a| a.last_offset);
        }
        self.snapshots.anchors_on_disk.set(anchors);
        for snap in generations {
            if snap.end_offset < log_start || snap.end_offset > log_end {
                continue;
            }
            if !self.anchor_holds(&snap).await {
                tracing::info!(topic = %self.tp.topic, partition = self.tp.partition,
                    end_offset = snap.end_offset,
                    "producer snapshot does not match the log (cut or rewritten since)");
                continue;
            }
            from = snap.end_offset;
            self.last_batch.set(snap.anchor);
            *self.producers.borrow_mut() = snap.table.clone();
            *self.snapshots.kept.borrow_mut() = Some(Rc::new(snap));
            break;
        }
        let mut offset = from;
        let mut replayed = 0u64;
        while offset < log_end {
            let read = self.log.read(offset, RECOVERY_READ_BYTES).await?;
            if read.batches.is_empty() {
                break;
            }
            for batch in &read.batches {
                replayed += batch.len() as u64;
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
                self.last_batch.set(Some(anchor_of(&h)));
                offset = h.last_offset() as u64 + 1;
            }
        }
        Ok(replayed)
    }

    /// The snapshot file's generations, newest first; none if it is missing, too large or
    /// damaged (the table is then rebuilt from the log).
    fn read_snapshots(&self, path: &Path) -> Result<Vec<Snapshot>, ReplicaError> {
        let unreadable = |reason: String| {
            tracing::warn!(topic = %self.tp.topic, partition = self.tp.partition,
                path = %path.display(), %reason,
                "unreadable producer snapshot; rebuilding from the log");
            Ok(Vec::new())
        };
        match std::fs::metadata(path) {
            Ok(m) if m.len() > MAX_SNAPSHOT_FILE_BYTES => {
                return unreadable(format!("{} bytes", m.len()))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        decode_snapshots(&bytes).or_else(unreadable)
    }

    /// Whether the log still holds the batch `snap` ends with, as it was.
    async fn anchor_holds(&self, snap: &Snapshot) -> bool {
        let Some(anchor) = snap.anchor else {
            return snap.end_offset == 0;
        };
        if anchor.last_offset < self.log.log_start_offset() {
            // Gone to retention: the batch cannot be compared, so the snapshot is not trusted.
            return false;
        }
        let read = match self.log.read(anchor.last_offset, 1).await {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(topic = %self.tp.topic, partition = self.tp.partition, error = %e,
                    "reading the batch a producer snapshot ends with");
                return false;
            }
        };
        read.batches
            .first()
            .and_then(|b| BatchHeader::parse(b).ok())
            .is_some_and(|h| anchor_of(&h) == anchor)
    }

    /// The producer table as of the log end, if both describe the same batches and the batch
    /// ending there is known. Caller holds `write_lock` (or has the replica to itself).
    fn capture_snapshot(&self) -> Option<Snapshot> {
        self.state_path.as_ref()?;
        if self.producers_at.get() != self.log.truncations() {
            return None;
        }
        let end = self.log.log_end_offset();
        let anchor = match self.last_batch.get() {
            Some(a) if a.last_offset + 1 == end => Some(a),
            None if end == 0 => None,
            _ => return None,
        };
        self.snapshots
            .anchor_taken
            .set(anchor.map(|a| a.last_offset));
        Some(Snapshot {
            end_offset: end,
            anchor,
            table: self.producers.borrow().clone(),
        })
    }

    /// Counts `bytes` of batches just appended (caller holds `write_lock`), and once enough
    /// log has grown since the last snapshot, takes one and writes it in the background: the
    /// append does not wait for the file.
    fn note_appended(&self, bytes: u64) {
        // Followers' replicas too: the coordinator that takes the partition over replays its
        // own replica.
        self.keep_cleaned();
        let snaps = &self.snapshots;
        snaps.bytes_since.set(snaps.bytes_since.get() + bytes);
        let due = PRODUCER_SNAPSHOT_EVERY_BYTES
            .max(PRODUCER_SNAPSHOT_SIZE_MULTIPLE * snaps.file_bytes.get());
        if snaps.bytes_since.get() < due || snaps.writing.available() == 0 {
            return;
        }
        let (Some(snap), Some(path)) = (self.capture_snapshot(), self.state_path.clone()) else {
            return;
        };
        snaps.bytes_since.set(0);
        let snaps = snaps.clone();
        let tp = self.tp.clone();
        glommio::spawn_local(async move {
            let Ok(_writing) = snaps.writing.acquire_permit(1).await else {
                return;
            };
            if let Err(e) = snaps.write(&path, snap).await {
                tracing::warn!(topic = %tp.topic, partition = tp.partition, error = %e,
                    "producer snapshot failed");
            }
        })
        .detach();
    }

    /// Takes a snapshot now and waits for its file.
    async fn snapshot_now(&self) -> Result<(), ReplicaError> {
        let Some(path) = &self.state_path else {
            return Ok(());
        };
        let Ok(_writing) = self.snapshots.writing.acquire_permit(1).await else {
            return Ok(());
        };
        let snap = {
            let Ok(_permit) = self.write_lock.acquire_permit(1).await else {
                return Ok(());
            };
            self.capture_snapshot()
        };
        let Some(snap) = snap else {
            return Ok(());
        };
        self.snapshots.bytes_since.set(0);
        self.snapshots.write(path, snap).await
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
        let outcome = self.append_checked(batches, LEADER_EPOCH, None).await;
        let completion = if outcome.error_code == NONE && outcome.base_offset >= 0 {
            self.leader_completion(acks)
        } else {
            Completion::done()
        };
        (outcome, completion)
    }

    /// What an append waits for on this node alone: the log's sync when `acks` asks for an
    /// answer and the flush policy makes every batch durable.
    pub(crate) fn leader_completion(self: &Rc<Self>, acks: Acks) -> Completion {
        if acks != Acks::None && self.flush == FlushPolicy::Always {
            Completion::sync(self.clone())
        } else {
            Completion::done()
        }
    }

    /// The leader of a replicated partition appends a Produce request's batches in `epoch`
    /// (stamped in each batch's partitionLeaderEpoch), with the same checks as [`Self::append`];
    /// where each stored batch landed is pushed to `appended` (for the consensus group to
    /// propose). Nothing is waited for.
    pub(crate) async fn append_in_epoch(
        &self,
        batches: Vec<VerifiedBatch>,
        epoch: i32,
        appended: &mut Vec<AppendInfo>,
    ) -> ProduceOutcome {
        self.append_checked(batches, epoch, Some(appended)).await
    }

    async fn append_checked(
        &self,
        batches: Vec<VerifiedBatch>,
        leader_epoch: i32,
        // Only a replicated partition's leader asks where each batch landed; the single-node
        // path passes None and allocates nothing for it.
        mut appended: Option<&mut Vec<AppendInfo>>,
    ) -> ProduceOutcome {
        let mut outcome = ProduceOutcome {
            error_code: NONE,
            base_offset: -1,
            log_start_offset: self.log.log_start_offset() as i64,
            error_message: None,
            record_errors: Vec::new(),
            log_append_time_ms: -1,
        };
        // Every batch of the request is checked before any is stored: a refused one leaves the
        // partition's share of the request unstored as a whole.
        let max_uncompressed_bytes = self.log.limits().max_batch_bytes as usize;
        let policy = self.policy.get();
        let now = now_ms();
        let rules = RecordRules {
            policy: &policy,
            topic: &self.tp.topic,
            partition: self.tp.partition,
            max_uncompressed_bytes,
            now_ms: now,
        };
        let mut first_record = 0u32;
        for (i, batch) in batches.iter().enumerate() {
            let bytes = batch.header().as_bytes();
            let summary = match validate_batch(bytes, max_uncompressed_bytes) {
                Ok(summary) => summary,
                Err(e) => {
                    tracing::debug!(topic = %self.tp.topic, partition = self.tp.partition, error = %e, "batch refused");
                    outcome.error_code = match e.refusal {
                        Refusal::InvalidRecord => ResponseError::InvalidRecord.code(),
                        Refusal::CorruptMessage => ResponseError::CorruptMessage.code(),
                    };
                    outcome.error_message = Some(format!("batch {i}: {e}"));
                    return outcome;
                }
            };
            if let Err(refusal) = check_records(&rules, bytes, &summary, first_record) {
                tracing::debug!(topic = %self.tp.topic, partition = self.tp.partition, error = %refusal.message, "records refused");
                outcome.error_code = refusal.error_code;
                outcome.error_message = Some(refusal.message);
                outcome.record_errors = refusal.record_errors;
                return outcome;
            }
            first_record = first_record.saturating_add(summary.records);
            if batch.header().is_transactional() {
                // Transactions are not implemented: storing their batches without markers
                // would expose uncommitted data.
                outcome.error_code = ResponseError::TransactionalIdAuthorizationFailed.code();
                return outcome;
            }
        }
        let Ok(_permit) = self.write_lock.acquire_permit(1).await else {
            outcome.error_code = ResponseError::NotLeaderOrFollower.code();
            return outcome;
        };
        // The producer checks must see the log the batches will be appended to: batches whose
        // write failed are dropped first, and the table forgets them.
        if let Err(e) = self.settle_producers().await {
            if matches!(&e, ReplicaError::Engine(e) if e.is_no_space()) {
                self.watermark.observer.refused_no_space();
            }
            tracing::warn!(topic = %self.tp.topic, partition = self.tp.partition, error = %e, "append failed");
            outcome.error_code = e.code();
            return outcome;
        }
        let skip = match self.plan(&batches) {
            Ok(plan) => plan,
            Err(code) => {
                outcome.error_code = code;
                return outcome;
            }
        };
        let total = batches.len();
        outcome.base_offset = skip.duplicate_base_offset;
        for (i, batch) in batches
            .into_iter()
            .enumerate()
            .skip(skip.leading_duplicates)
        {
            let mut batch = batch;
            let h = batch.header();
            let (pid, epoch, mut meta) = (h.producer_id(), h.producer_epoch(), batch_meta(&h));
            let (batch_bytes, records) = (batch.len() as u64, h.records_count().max(0) as u64);
            if policy.log_append_time {
                batch.set_log_append_time(now);
                outcome.log_append_time_ms = now;
            }
            let crc = batch.crc();
            let info = match self.log.append(batch, leader_epoch).await {
                Ok(info) => info,
                Err(e) => {
                    tracing::warn!(topic = %self.tp.topic, partition = self.tp.partition, error = %e, "append failed");
                    if e.is_no_space() {
                        self.watermark.observer.refused_no_space();
                    }
                    outcome.error_code = engine_error_code(&e);
                    if i > 0 {
                        // Kafka answers a partition as a whole; say what part of it is stored,
                        // so a retry of the whole request is understood (the stored batches are
                        // in the producer table and come back as duplicates).
                        outcome.error_message = Some(format!(
                            "batches 0..{i} of {total} are stored from offset {}; batch {i} and later are not: {e}",
                            outcome.base_offset
                        ));
                    }
                    return outcome;
                }
            };
            debug_assert!(info.last_offset >= info.base_offset);
            if let Some(appended) = appended.as_deref_mut() {
                appended.push(info);
            }
            self.watermark.observer.appended(batch_bytes, records);
            self.commit_local();
            if pid >= 0 {
                meta.base_offset = info.base_offset as i64;
                meta.last_offset = info.last_offset as i64;
                self.producers.borrow_mut().record(pid, epoch, meta);
            }
            self.last_batch
                .set(Some(appended_anchor(&info, leader_epoch, crc)));
            self.note_appended(batch_bytes);
            if outcome.base_offset < 0 {
                outcome.base_offset = info.base_offset as i64;
            }
        }
        drop(_permit);
        outcome
    }

    /// Decides a request's batches against producer state before any is stored, as Kafka's
    /// log does: a refused batch refuses the whole request. Batches already in the log
    /// (duplicates) may only lead, as when a request that was stored in part is retried:
    /// those are skipped. The error is a Kafka code.
    fn plan(&self, batches: &[VerifiedBatch]) -> Result<Plan, i16> {
        let table = self.producers.borrow();
        // Later batches of one producer in the same request follow its earlier ones: they are
        // checked against a scratch copy of its entry (only for multi-batch requests).
        let mut scratch: Option<ProducerTable> = None;
        let mut plan = Plan {
            leading_duplicates: 0,
            duplicate_base_offset: -1,
        };
        for (i, batch) in batches.iter().enumerate() {
            let h = batch.header();
            let (pid, epoch, meta) = (h.producer_id(), h.producer_epoch(), batch_meta(&h));
            if pid < 0 {
                continue;
            }
            let view = scratch.as_ref().unwrap_or(&table);
            match view.check(pid, epoch, meta.first_seq, meta.last_seq) {
                Verdict::Append => {
                    if batches.len() > 1 {
                        let s = scratch.get_or_insert_with(|| (*table).clone());
                        s.record(pid, epoch, meta);
                    }
                }
                Verdict::Duplicate { base_offset } if i == plan.leading_duplicates => {
                    if plan.leading_duplicates == 0 {
                        plan.duplicate_base_offset = base_offset;
                    }
                    plan.leading_duplicates += 1;
                }
                Verdict::Duplicate { .. } => {
                    return Err(ResponseError::OutOfOrderSequenceNumber.code());
                }
                Verdict::Reject { error_code } => return Err(error_code),
            }
        }
        // A retry of batches all stored already is answered as Kafka's log answers a batch it
        // finds among a producer's recent ones: success, with the original base offset (and,
        // with acks, once that batch is as durable as the acks ask). DUPLICATE_SEQUENCE_NUMBER
        // would be taken as success by librdkafka and the Java client, but with no offset, and
        // as an error by others.
        Ok(plan)
    }

    /// Drops batches a failed write left behind, and brings producer state in line with a
    /// log end that moved back (batches it remembers are gone). Caller holds `write_lock`.
    async fn settle_producers(&self) -> Result<(), ReplicaError> {
        self.log.drop_unwritten().await?;
        let truncations = self.log.truncations();
        if truncations == self.producers_at.get() {
            return Ok(());
        }
        let end = self.log.log_end_offset();
        let exact = self.producers.borrow_mut().truncate(end);
        if !exact {
            // Some producer's last batch below the new end is not remembered: rebuild from the
            // log (rare: only after a rewind that took all of a producer's recent batches).
            tracing::info!(topic = %self.tp.topic, partition = self.tp.partition, log_end = end,
                "rebuilding producer state after the log end moved back");
            let started = std::time::Instant::now();
            let replayed = self.recover_producers().await?;
            tracing::info!(topic = %self.tp.topic, partition = self.tp.partition,
                replayed_bytes = replayed, took_ms = started.elapsed().as_millis() as u64,
                "producer state rebuilt");
        }
        if self.last_batch.get().is_some_and(|a| a.last_offset >= end) {
            self.last_batch.set(None);
        }
        if self
            .snapshots
            .kept
            .borrow()
            .as_ref()
            .is_some_and(|k| k.end_offset > end)
        {
            // It describes batches that are gone: not the older generation of the next file
            // (on disk it is harmless: its anchor no longer matches).
            *self.snapshots.kept.borrow_mut() = None;
        }
        self.producers_at.set(truncations);
        Ok(())
    }

    /// Advances the high watermark to what this node alone commits (see
    /// [`Watermark::local_commit`]).
    fn commit_local(&self) {
        self.watermark
            .commit_local(self.log.durable_offset(), self.log.log_end_offset());
    }

    /// Moves the high watermark to `offset`: the path by which replication commits (once a
    /// majority has the batches durably). The high watermark only grows and never passes the
    /// log end.
    pub fn advance_high_watermark(&self, offset: u64) {
        self.watermark.advance(offset, self.log.log_end_offset());
    }

    /// Replicated partition: the leader epoch clients are told (set when the group's leader
    /// has committed in its epoch, or when this replica learns whom it follows).
    pub(crate) fn set_leader_epoch(&self, epoch: i32) {
        self.leader_epoch.set(epoch);
    }

    /// Replicated partition: `hook` is told the durable end after every group commit.
    pub(crate) fn set_durable_hook(&self, hook: Box<dyn Fn(u64)>) {
        *self.watermark.durable_hook.borrow_mut() = Some(hook);
    }

    pub fn is_replicated(&self) -> bool {
        self.watermark.replicated
    }

    /// Every offset below this is on disk.
    pub fn durable_offset(&self) -> u64 {
        self.log.durable_offset()
    }

    /// Whether the flush policy makes each batch durable before it counts (flush `always`).
    pub fn flushes_every_batch(&self) -> bool {
        self.flush == FlushPolicy::Always
    }

    /// (leader epoch, first offset) of each epoch in the log, ascending.
    pub fn epoch_history(&self) -> Vec<(i32, u64)> {
        self.log.epoch_history()
    }

    /// A follower's append of a batch its leader placed at `base` in `epoch` (the caller
    /// verified it). Producer state follows, so a follower that becomes leader knows the
    /// producers' last batches.
    pub(crate) async fn append_follower(
        &self,
        batch: VerifiedBatch,
        base: u64,
        epoch: i32,
    ) -> Result<AppendInfo, ReplicaError> {
        let _permit = self
            .write_lock
            .acquire_permit(1)
            .await
            .map_err(|_| EngineError::Closed)?;
        self.settle_producers().await?;
        let h = batch.header();
        let (pid, pepoch, mut meta) = (h.producer_id(), h.producer_epoch(), batch_meta(&h));
        let (batch_bytes, records) = (batch.len() as u64, h.records_count().max(0) as u64);
        let crc = batch.crc();
        let info = self.log.append_at(batch, base, epoch).await?;
        self.watermark.observer.appended(batch_bytes, records);
        if pid >= 0 {
            meta.base_offset = info.base_offset as i64;
            meta.last_offset = info.last_offset as i64;
            self.producers.borrow_mut().record(pid, pepoch, meta);
        }
        self.last_batch
            .set(Some(appended_anchor(&info, epoch, crc)));
        self.note_appended(batch_bytes);
        Ok(info)
    }

    /// A batch the leader of a replicated partition builds itself (its epoch's first, control
    /// batch): no client checks, stamped with `epoch`.
    pub(crate) async fn append_leader_batch(
        &self,
        batch: VerifiedBatch,
        epoch: i32,
    ) -> Result<AppendInfo, ReplicaError> {
        let _permit = self
            .write_lock
            .acquire_permit(1)
            .await
            .map_err(|_| EngineError::Closed)?;
        self.settle_producers().await?;
        let (batch_bytes, crc) = (batch.len() as u64, batch.crc());
        let info = self.log.append(batch, epoch).await?;
        self.last_batch
            .set(Some(appended_anchor(&info, epoch, crc)));
        self.note_appended(batch_bytes);
        Ok(info)
    }

    /// Removes every batch at or after `end` (a follower repairing its log to its leader's);
    /// producer state follows the log end back, as after a rewind.
    pub(crate) async fn truncate_to(&self, end: u64) -> Result<(), ReplicaError> {
        let _permit = self
            .write_lock
            .acquire_permit(1)
            .await
            .map_err(|_| EngineError::Closed)?;
        self.log.truncate_to(end).await?;
        self.settle_producers().await
    }

    /// Bytes of log replayed to rebuild producer state when the replica opened (the rest came
    /// from a snapshot).
    pub fn replayed_at_open(&self) -> u64 {
        self.replayed_at_open.get()
    }

    /// Waits until no producer snapshot is being written (for tests that crash right after).
    #[doc(hidden)]
    pub async fn snapshot_written(&self) {
        let _writing = self.snapshots.writing.acquire_permit(1).await;
    }

    /// Holds the log's group commits back while `paused`: appends go on, nothing new becomes
    /// durable (for tests of what consumers see meanwhile).
    #[doc(hidden)]
    pub fn pause_syncs(&self, paused: bool) {
        self.log.pause_syncs(paused);
    }

    /// Makes the log's next `writes` segment writes fail with ENOSPC (for tests).
    #[doc(hidden)]
    pub fn inject_no_space_writes(&self, writes: u32) {
        self.log.inject_no_space_writes(writes);
    }

    /// Offsets below it are committed and visible to consumers.
    pub fn high_watermark(&self) -> u64 {
        self.watermark.value.get()
    }

    /// The epoch of the leader this replica follows (or is).
    pub fn leader_epoch(&self) -> i32 {
        self.leader_epoch.get()
    }

    pub fn log_start_offset(&self) -> u64 {
        self.log.log_start_offset()
    }

    /// One past the last offset in the local log (committed or not).
    pub fn log_end_offset(&self) -> u64 {
        self.log.log_end_offset()
    }

    /// Bytes of the local log's segments (DescribeLogDirs' partition size). A getter.
    pub fn size_bytes(&self) -> u64 {
        self.log.size_bytes()
    }

    /// Bytes of the local log from `offset` to its end (see [`PartitionLog::bytes_from`]).
    pub fn bytes_from(&self, offset: u64) -> u64 {
        self.log.bytes_from(offset)
    }

    /// Whole batches from the one containing `offset`, up to `max_bytes` (at least one batch
    /// if any is committed at or after `offset`), never past the high watermark. An offset
    /// between the high watermark and the log end reads nothing; one outside the log is
    /// OFFSET_OUT_OF_RANGE. The error is a Kafka error code.
    pub async fn read(&self, offset: i64, max_bytes: usize) -> Result<ReplicaRead, i16> {
        let (start, end) = (self.log.log_start_offset(), self.log.log_end_offset());
        let hw = self.watermark.value.get();
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
        read.high_watermark = self.watermark.value.get();
        read.log_start_offset = r.log_start_offset;
        read.records = r.records;
        Ok(read)
    }

    /// The first committed offset whose record has a timestamp at or after `timestamp_ms`, with
    /// that record's timestamp; `None` if there is none. The error is a Kafka error code.
    pub async fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<(u64, i64)>, i16> {
        let found = self
            .log
            .offset_for_timestamp(timestamp_ms)
            .await
            .map_err(|e| engine_error_code(&e))?;
        Ok(found.filter(|(offset, _)| *offset < self.watermark.value.get()))
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

    /// Applies the topic's record rules, timestamp type and cleanup policy (from its configs).
    pub fn set_policy(&self, policy: TopicPolicy) {
        self.policy.set(policy);
    }

    pub fn policy(&self) -> TopicPolicy {
        self.policy.get()
    }

    /// How dirty the log of a compacted topic is, and whether the cleaner should clean it now
    /// (over `min.cleanable.dirty.ratio` or `max.compaction.lag.ms`, or `force`d for tombstones
    /// past `delete.retention.ms`); `None` for a topic that is not compacted. Opens the
    /// cleaner's state on first use (it reads the cleaner's state file).
    pub fn cleaning_due(&self, config: &CleanerConfig, now_ms: i64) -> Option<(f64, bool)> {
        let policy = self.policy.get();
        if !policy.compact {
            return None;
        }
        let mut cleaner = self.cleaner.borrow_mut();
        let cleaner = cleaner.get_or_insert_with(|| LogCleaner::open(&self.log, config.clone()));
        if self.last_clean_ms.get().is_none()
            && cleaner.first_dirty_offset() > self.log.log_start_offset()
        {
            // Cleaned before this start: its tombstones' clock starts now, so a quiet log is
            // still cleaned of them once delete.retention.ms has passed.
            self.last_clean_ms.set(Some(now_ms));
        }
        self.first_dirty_seen.set(cleaner.first_dirty_offset());
        let req = self.clean_request(now_ms);
        let plan = cleaner.plan(&self.log, &req);
        self.watermark.observer.dirty_ratio(plan.dirty_ratio);
        Some((
            plan.dirty_ratio,
            plan.should_clean(&policy.compaction)
                || (req.force && plan.clean_end > self.log.log_start_offset())
                || (req.urgent && plan.dirty_bytes > 0),
        ))
    }

    /// Bytes of the log past its cleaned part (the dirty segments and the active one), and
    /// of the whole log. A getter: no I/O.
    pub fn uncleaned_bytes(&self) -> (u64, u64) {
        let first_dirty = self
            .cleaner
            .borrow()
            .as_ref()
            .map_or(self.first_dirty_seen.get(), |c| c.first_dirty_offset());
        let from = first_dirty.max(self.log.log_start_offset());
        (self.log.bytes_from(from), self.log.size_bytes())
    }

    /// Keeps a replica with a bound on its uncleaned part (`__consumer_offsets`) near its
    /// cleaned part: two thirds of the way to the bound (or to the cleaned part's size, if
    /// bigger) it asks the shard's cleaner for an urgent cleaning. `None` while under that;
    /// else the generation of [`Self::cleaner_visited`] to wait past, and whether the replica
    /// is over the bound itself (its writer should then wait).
    pub fn keep_cleaned(&self) -> Option<(u64, bool)> {
        let max = self.max_uncleaned.filter(|_| self.policy.get().compact)?;
        let (uncleaned, total) = self.uncleaned_bytes();
        let bound = max.max(total.saturating_sub(uncleaned));
        if uncleaned <= bound - bound / 3 {
            return None;
        }
        let since = self.request_urgent_clean();
        super::clean::cleaner_wake().notify();
        Some((since, uncleaned > bound))
    }

    /// Asks the next cleaner round to clean this log first, whatever its dirty ratio, and
    /// without its pacing (see `CleanRequest::urgent`). Returns the generation of
    /// [`Self::cleaner_visited`] to wait past.
    fn request_urgent_clean(&self) -> u64 {
        self.urgent_clean.set(true);
        spate_engine::clean::hurry();
        self.cleaner_visits.generation()
    }

    pub(crate) fn urgent_clean_requested(&self) -> bool {
        self.urgent_clean.get()
    }

    /// Resolves once a cleaner round looked at this log after generation `since` (see
    /// [`Self::keep_cleaned`]).
    pub async fn cleaner_visited(&self, since: u64) {
        self.cleaner_visits.changed(since).await
    }

    /// A cleaner round looked at this log (cleaned it, or found it not due): that answers an
    /// urgent request made before.
    pub(crate) fn note_cleaner_visit(&self) {
        self.urgent_clean.set(false);
        self.cleaner_visits.notify();
    }

    fn clean_request(&self, now_ms: i64) -> CleanRequest {
        let policy = self.policy.get();
        let retention = i64::try_from(policy.compaction.delete_retention_ms).unwrap_or(i64::MAX);
        // A log cleaned before holds tombstones only a new pass removes once they expire;
        // with nothing new it would never be dirty again.
        let force = self
            .last_clean_ms
            .get()
            .is_some_and(|at| now_ms.saturating_sub(at) >= retention);
        CleanRequest {
            now_ms,
            max_clean_offset: self.watermark.value.get(),
            policy: policy.compaction,
            force,
            keep_batches: self.snapshot_anchors(),
            urgent: self.urgent_clean.get(),
        }
    }

    /// The batches the cleaner keeps byte for byte: those the producer snapshots on disk end
    /// with, the one the newest snapshot taken ends with (its file may still be being written),
    /// and the log's last batch (what a snapshot taken during this clean would end with, if
    /// it lies in a closed segment). A snapshot is trusted only while its batch is exactly as it
    /// was (see `producer_state`); rewritten, a restart would replay the whole cleaned log.
    fn snapshot_anchors(&self) -> [Option<u64>; CLEANER_KEEP_BATCHES_MAX] {
        let snaps = &self.snapshots;
        let [newest, older] = snaps.anchors_on_disk.get();
        [
            newest,
            older,
            snaps.anchor_taken.get(),
            self.last_batch.get().map(|a| a.last_offset),
        ]
    }

    /// Runs the log cleaner on a compacted topic's log if it is due (see
    /// [`Self::cleaning_due`]). Never on the produce or fetch path: the shard's cleaner task
    /// calls it; reads and appends go on meanwhile.
    pub async fn clean(
        &self,
        config: &CleanerConfig,
        now_ms: i64,
    ) -> Result<Option<CleanStats>, ReplicaError> {
        let Ok(_permit) = self.clean_lock.acquire_permit(1).await else {
            return Ok(None);
        };
        if !self
            .cleaning_due(config, now_ms)
            .is_some_and(|(_, due)| due)
        {
            return Ok(None);
        }
        let req = self.clean_request(now_ms);
        let Some(mut cleaner) = self.cleaner.borrow_mut().take() else {
            return Ok(None);
        };
        let result = cleaner.clean(&self.log, &req).await;
        let ratio = cleaner.counters().dirty_ratio;
        self.first_dirty_seen.set(cleaner.first_dirty_offset());
        *self.cleaner.borrow_mut() = Some(cleaner);
        self.watermark.observer.dirty_ratio(ratio);
        let stats = result?;
        if let Some(stats) = &stats {
            self.last_clean_ms.set(Some(now_ms));
            self.watermark.observer.cleaned(stats);
            tracing::debug!(topic = %self.tp.topic, partition = self.tp.partition, ?stats, "cleaned");
        }
        Ok(stats)
    }

    /// Deletes segments past the retention limits.
    pub async fn apply_retention(&self, now_ms: i64) -> Result<u64, ReplicaError> {
        Ok(self.log.apply_retention(now_ms).await?)
    }

    /// Appends a batch the broker built itself (the group coordinator's `__consumer_offsets`
    /// records): no client validation and no producer checks. The caller appends one batch at
    /// a time; durability is awaited with [`Self::wait_durable`]. Counted towards the producer
    /// snapshots like any append: a restart after a crash otherwise rebuilds the (empty)
    /// producer table from the whole log before the broker listens.
    pub async fn append_internal(&self, batch: VerifiedBatch) -> Result<AppendInfo, ReplicaError> {
        let info = self.append_leader_batch(batch, LEADER_EPOCH).await?;
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
    /// crash replays only the log written since (the periodic backstop of the snapshots taken
    /// every [`PRODUCER_SNAPSHOT_EVERY_BYTES`] of log).
    pub async fn snapshot_producers(&self) -> Result<(), ReplicaError> {
        let end = self.log.log_end_offset();
        let unchanged = self
            .snapshots
            .kept
            .borrow()
            .as_ref()
            .is_some_and(|k| k.end_offset == end);
        if self.producers.borrow().is_empty() || unchanged {
            return Ok(());
        }
        self.snapshot_now().await
    }

    /// Flushes the log, snapshots producer state, closes.
    pub async fn close(&self) -> Result<(), ReplicaError> {
        let _cleaning = self.clean_lock.acquire_permit(1).await;
        let _writing = self.snapshots.writing.acquire_permit(1).await;
        let _permit = self.write_lock.acquire_permit(1).await;
        let snap = self.capture_snapshot();
        self.log.close().await?;
        let written = match (snap, &self.state_path) {
            (Some(snap), Some(path)) => self.snapshots.write(path, snap).await,
            _ => Ok(()),
        };
        self.snapshots.stopped.set(true);
        written
    }

    /// Hands the replica's replication view to its observer (metrics).
    pub fn observe_replication(&self, state: Option<&ReplicationGauges>) {
        match state {
            Some(s) => self.watermark.observer.replication(s),
            None => self.watermark.observer.replication_stopped(),
        }
    }

    pub async fn delete(&self) -> Result<(), ReplicaError> {
        let _cleaning = self.clean_lock.acquire_permit(1).await;
        let _writing = self.snapshots.writing.acquire_permit(1).await;
        self.snapshots.stopped.set(true);
        let _permit = self.write_lock.acquire_permit(1).await;
        self.watermark.observer.removed();
        self.log.delete().await?;
        if let Some(state_path) = &self.state_path {
            let _ = std::fs::remove_file(state_path);
        }
        Ok(())
    }
}

/// How a request's batches are to be appended (see [`PartitionReplica::plan`]).
struct Plan {
    /// The first batches are in the log already (a retry): not appended again.
    leading_duplicates: usize,
    /// Where the first of them is (-1 if none): the base offset the request is answered with.
    duplicate_base_offset: i64,
}

/// Wall-clock milliseconds since the epoch (Kafka's timestamps).
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The anchor of a stored batch, read back from the log.
fn anchor_of(h: &BatchHeader<'_>) -> Anchor {
    Anchor {
        base_offset: h.base_offset() as u64,
        last_offset: h.last_offset() as u64,
        leader_epoch: h.partition_leader_epoch(),
        crc: h.crc(),
    }
}

/// The anchor of a batch just appended in `epoch` with checksum `crc` (stamping the offset and
/// the epoch leaves the checksummed bytes alone).
fn appended_anchor(info: &AppendInfo, epoch: i32, crc: u32) -> Anchor {
    Anchor {
        base_offset: info.base_offset,
        last_offset: info.last_offset,
        leader_epoch: epoch,
        crc,
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
