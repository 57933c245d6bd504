//! The log cleaner of compacted topics: keeps at least the latest record of every key.
//!
//! One pass, as Kafka's cleaner does it:
//! 1. The cleanable part of the log is a prefix of closed segments: never the active one, never
//!    a rolled segment not yet finished by the checkpointer, nothing at or above the recovery
//!    point or the caller's `max_clean_offset` (the high watermark), nothing newer than
//!    `min.compaction.lag.ms`. Below `first_dirty` it is clean (deduplicated before); above, dirty.
//! 2. A key -> latest offset map is built over the dirty part, bounded by
//!    [`CleanerConfig::dedupe_buffer_bytes`]; when a batch's keys would not fit, the pass ends at
//!    that batch and the rest is cleaned in the next pass.
//! 3. Every segment from the log start up to where the map ends is rewritten keeping, of each
//!    record the map covers, only the latest per key; tombstones (null values) go once
//!    `delete.retention.ms` has passed since their segment was first cleaned; records without a
//!    key go (a compacted topic cannot hold them). Offsets never change.
//!
//! Batches: a batch with every record kept is copied byte for byte (frame included). A batch
//! with some records kept is rebuilt with the same header fields, its kept records' original
//! bytes, the same codec and a fresh CRC ([`crate::records::rebuild_batch`]). A batch with none
//! kept is dropped, except the last batch of each producer id (kept as Kafka's empty batch,
//! record count 0, so the producer's last sequence survives for idempotence) while the producer
//! id is younger than `producer_id_expiration_ms`.
//!
//! Offsets stay contiguous on disk: the run of offsets of dropped batches between two kept
//! batches is covered by one record-less batch (count 0, no producer), as clients already skip
//! for Kafka's own empty batches. That costs one 96-byte frame per run, at most one per kept
//! batch, so a cleaned log stays bounded by its live keys; in exchange recovery, the offset
//! index and reads see exactly the same segment structure as before (every segment keeps its
//! base and end offsets).
//!
//! A cleaned segment replaces the old one through a crash-safe swap (see `swap.rs`).

mod offset_map;
mod swap;
mod throttle;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use futures_lite::AsyncWriteExt;
use glommio::io::{DmaFile, DmaStreamWriterBuilder, OpenOptions};

use crate::batch::BatchHeader;
use crate::frame::{decode_frame, frame_len, FrameError, FrameHeader, FRAME_HEADER_BYTES};
use crate::log::max_payload;
use crate::records::{rebuild_batch, Records, MAX_UNCOMPRESSED_RECORDS_BYTES};
use crate::segment::{self, io_err, std_io_err, Segment, NO_TIMESTAMP};
use crate::{cache, EngineError, PartitionLog};

pub use offset_map::{OffsetMap, MAP_ENTRY_OVERHEAD_BYTES};
pub use swap::{finish_interrupted_swaps, CleanerState, CLEANER_STATE_FILE};
pub use throttle::{
    hurry, writers_waiting, Throttle, WriterWaits, CLEANER_BUSY_SLICE_MS, HURRY_MS,
    THROTTLE_WINDOW_MS,
};

/// Most batches one clean keeps whole for [`CleanRequest::keep_batches`]: the anchors of the
/// two snapshot generations on disk, of one being written and of the one a snapshot taken now
/// would get.
pub const CLEANER_KEEP_BATCHES_MAX: usize = 4;
/// Default memory for the key -> offset map of one cleaning pass (Kafka's
/// `log.cleaner.dedupe.buffer.size`).
pub const DEFAULT_DEDUPE_BUFFER_BYTES: usize = 128 << 20;
/// Bytes the cleaner reads from a segment per request. A producer's write or fdatasync that
/// reaches the disk just after one of these waits behind it, so it is kept small: 512 KiB is
/// well under a millisecond on an SSD, and still large enough for sequential throughput.
pub const CLEANER_READ_CHUNK_BYTES: usize = 512 << 10;
/// A read asks for at least this many of the largest frames seen so far: a frame is only used
/// whole, so the partial one at the end of each read is read again by the next, and with
/// frames near the chunk size (1 MiB producer batches) that re-reading would cost half again
/// the log's bytes.
pub const CLEANER_READ_MIN_FRAMES: usize = 4;
/// Largest read sized by [`CLEANER_READ_MIN_FRAMES`] (a single bigger frame is still read
/// whole). A read of more than [`CLEANER_READ_CHUNK_BYTES`] goes to the disk as requests of
/// that size, joined in memory.
pub const CLEANER_READ_MAX_BYTES: usize = 4 << 20;
/// Most bytes of a pass's reads kept in memory, from building the map to rewriting the
/// segments, so those are not read from the disk twice: a log cleaned as it grows
/// (`__consumer_offsets`) has passes of a segment or two and a small clean part, which then
/// cost one read of the log instead of two. Reads past this bound are read again.
pub const CLEANER_REUSE_MAX_BYTES: usize = 32 << 20;
/// Longest the cleaner works on the CPU before it lets the shard's executor look at its rings.
/// A socket's completion does not interrupt a running task queue: glommio reaps it when the
/// queue runs dry or its preempt timer (100 ms) fires, so a request that arrives while the
/// cleaner decodes and hashes a read would wait for the whole read. Yielding to the reactor
/// every quarter millisecond bounds that wait.
pub const CLEANER_CPU_SLICE: std::time::Duration = std::time::Duration::from_micros(250);
/// The timer of [`LogCleaner::yield_if_due`]: long enough to be pending when first polled (if it
/// is not, that one yield is skipped), short enough to cost the cleaner little when nothing else
/// runs. An executor with 256 or more timers keeps them on glommio's 1 ms wheel, and there the
/// wait can be up to a millisecond; it is counted as waiting, not against the time share.
const CLEANER_YIELD_TIMER: std::time::Duration = std::time::Duration::from_micros(10);
/// Write-behind buffer of the cleaned segment being written (one write request each), small
/// for the same reason.
pub const CLEANER_WRITE_BUFFER_BYTES: usize = 512 << 10;
/// Longest the cleaner defers a disk request while the shard's logs have appends or group
/// commits in flight (see `foreground.rs`). Under a load that never leaves the disk idle it
/// still issues one request per this interval (at least 25 MB/s of reads at 512 KiB), so
/// cleaning cannot starve and let a compacted log grow without bound.
pub const CLEANER_MAX_DEFER_MS: u64 = 20;
/// Default share of its shard's time the cleaner may work (see `throttle.rs`). A fifth keeps
/// the shard's requests within their latency on a loaded machine and still cleans at a
/// hundred or more MB/s of log (a fifth of the cleaner's unpaced speed on this project's
/// benchmark machine).
pub const DEFAULT_CLEANER_MAX_BUSY_PERCENT: u32 = 20;
/// Kafka's topic-config defaults for compaction (`min.cleanable.dirty.ratio`,
/// `min.compaction.lag.ms`, `max.compaction.lag.ms`, `delete.retention.ms`) and the broker's
/// `producer.id.expiration.ms`.
pub const DEFAULT_MIN_CLEANABLE_DIRTY_RATIO: f64 = 0.5;
pub const DEFAULT_MIN_COMPACTION_LAG_MS: u64 = 0;
pub const DEFAULT_MAX_COMPACTION_LAG_MS: u64 = i64::MAX as u64;
pub const DEFAULT_DELETE_RETENTION_MS: u64 = 86_400_000;
pub const DEFAULT_PRODUCER_ID_EXPIRATION_MS: u64 = 86_400_000;

/// Settings of the cleaner itself (per shard, not per topic).
#[derive(Clone, Debug)]
pub struct CleanerConfig {
    /// Memory bound of the key -> offset map of one pass.
    pub dedupe_buffer_bytes: usize,
    /// Disk bytes (read plus written) per second the cleaner may use; `None`: no limit.
    pub io_bytes_per_sec: Option<u64>,
    /// Share of its shard's time the cleaner may work, 1-100 (100: no limit).
    pub max_busy_percent: u32,
}

impl Default for CleanerConfig {
    fn default() -> Self {
        CleanerConfig {
            dedupe_buffer_bytes: DEFAULT_DEDUPE_BUFFER_BYTES,
            io_bytes_per_sec: None,
            max_busy_percent: DEFAULT_CLEANER_MAX_BUSY_PERCENT,
        }
    }
}

/// A compacted topic's settings, as its topic config gives them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CompactionPolicy {
    pub min_cleanable_dirty_ratio: f64,
    pub min_compaction_lag_ms: u64,
    pub max_compaction_lag_ms: u64,
    pub delete_retention_ms: u64,
    pub producer_id_expiration_ms: u64,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        CompactionPolicy {
            min_cleanable_dirty_ratio: DEFAULT_MIN_CLEANABLE_DIRTY_RATIO,
            min_compaction_lag_ms: DEFAULT_MIN_COMPACTION_LAG_MS,
            max_compaction_lag_ms: DEFAULT_MAX_COMPACTION_LAG_MS,
            delete_retention_ms: DEFAULT_DELETE_RETENTION_MS,
            producer_id_expiration_ms: DEFAULT_PRODUCER_ID_EXPIRATION_MS,
        }
    }
}

/// One request to clean a log.
#[derive(Clone, Copy, Debug)]
pub struct CleanRequest {
    pub now_ms: i64,
    /// Nothing at or above this offset is cleaned (the high watermark: records not yet
    /// committed may still be truncated away, so they cannot supersede older ones).
    pub max_clean_offset: u64,
    pub policy: CompactionPolicy,
    /// Clean even below `min_cleanable_dirty_ratio`, and a log with no dirty part (which is
    /// how tombstones past `delete.retention.ms` in an otherwise clean log are removed).
    pub force: bool,
    /// The batches holding these offsets are kept byte for byte: the batches producer
    /// snapshots are anchored to (a snapshot is trusted only while the log still holds its
    /// anchor batch exactly, so one the cleaner rewrote would make a restart replay the log).
    /// What such a batch holds beyond the latest value of its keys stays until a later clean's
    /// dirty part writes those keys again (a clean part is deduplicated against dirty parts
    /// only): a batch per producer snapshot interval (32 MiB of log), for keys never rewritten.
    pub keep_batches: [Option<u64>; CLEANER_KEEP_BATCHES_MAX],
    /// An urgent cleaning was asked for (a `__consumer_offsets` replica near its bound on what
    /// a coordinator's load replays; its writer may be waiting): the cleaner neither pauses
    /// (for its share of time or its byte rate) nor defers to the shard's foreground writes,
    /// and cleans whatever the dirty ratio.
    pub urgent: bool,
}

/// What [`LogCleaner::plan`] found, without I/O.
#[derive(Clone, Debug)]
pub struct CleanablePlan {
    pub first_dirty: u64,
    /// First offset the cleaner may not touch (end of the cleanable prefix).
    pub clean_end: u64,
    pub clean_bytes: u64,
    pub dirty_bytes: u64,
    /// `dirty_bytes / (clean_bytes + dirty_bytes)`, 0 for nothing cleanable.
    pub dirty_ratio: f64,
    /// A dirty segment is older than `max.compaction.lag.ms`: clean whatever the ratio.
    pub max_lag_exceeded: bool,
    segments: Vec<SegInfo>,
}

impl CleanablePlan {
    pub fn should_clean(&self, policy: &CompactionPolicy) -> bool {
        self.dirty_bytes > 0
            && (self.dirty_ratio >= policy.min_cleanable_dirty_ratio || self.max_lag_exceeded)
    }
}

/// Result of one [`LogCleaner::clean`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CleanStats {
    pub passes: u32,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Segment bytes before minus after, over the rewritten segments.
    pub bytes_reclaimed: u64,
    pub segments_rewritten: u32,
    /// Segments that went away by being merged into the one before them.
    pub segments_merged: u32,
    pub records_removed: u64,
    pub tombstones_removed: u64,
    pub dirty_ratio_before: f64,
    /// Time the cleaner paused: for its share of time, deferring its disk requests to the
    /// shard's appends and group commits, and letting the shard's other tasks run.
    pub deferred_ms: u64,
    /// Read requests made to the disk (each at most [`CLEANER_READ_CHUNK_BYTES`]).
    pub read_requests: u64,
}

/// Progress counters since the cleaner was opened, for the broker to export.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CleanerCounters {
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_reclaimed: u64,
    pub segments_rewritten: u64,
    pub segments_merged: u64,
    pub passes: u64,
    /// Dirty ratio at the last plan.
    pub dirty_ratio: f64,
}

#[derive(Clone)]
pub(crate) struct SegInfo {
    base: u64,
    next_offset: u64,
    size: u64,
    max_timestamp: i64,
    file: Rc<DmaFile>,
    path: PathBuf,
}

impl SegInfo {
    fn span(&self) -> SegSpan {
        SegSpan {
            base: self.base,
            next_offset: self.next_offset,
            size: self.size,
        }
    }
}

/// What [`merge_groups`] needs to know of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegSpan {
    pub base: u64,
    pub next_offset: u64,
    pub size: u64,
}

/// Splits consecutive segments to clean into runs, each rewritten as one segment (Kafka's
/// `groupSegmentsBySize`): without it a compacted log keeps one mostly empty segment per
/// `segment.bytes` ever written. A run holds segments that follow each other without a gap,
/// whose bytes before cleaning add up to at most `max_bytes` (so the merged segment cannot
/// outgrow a segment, and its index positions fit u32), whose last offset lies within
/// `i32::MAX` of the first's base (the index stores offsets relative to the base), and that
/// the map covers whole (`next_offset <= map_end`); the segment the map ends inside is cleaned
/// on its own, so the tombstone clock of a merged segment starts only once all of it is clean.
pub fn merge_groups(segs: &[SegSpan], max_bytes: u64, map_end: u64) -> Vec<std::ops::Range<usize>> {
    let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
    let mut bytes = 0u64;
    for (i, s) in segs.iter().enumerate() {
        let joins = groups.last().is_some_and(|g| {
            let (first, prev) = (&segs[g.start], &segs[i - 1]);
            prev.next_offset == s.base
                && prev.next_offset <= map_end
                && s.next_offset <= map_end
                && bytes.saturating_add(s.size) <= max_bytes
                && s.next_offset.saturating_sub(first.base) <= i32::MAX as u64 + 1
        });
        if joins {
            groups.last_mut().expect("joined a group").end = i + 1;
            bytes += s.size;
        } else {
            groups.push(i..i + 1);
            bytes = s.size;
        }
    }
    groups
}

/// The cleaned segment of a group as it is being decided: not yet opened while every frame of
/// a single segment is kept whole (those are only noted), then written.
struct Rewrite {
    out: Option<Output>,
    prefix: Vec<FrameInfo>,
    prefix_end: u64,
}

impl std::fmt::Debug for SegInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegInfo")
            .field("base", &self.base)
            .field("next_offset", &self.next_offset)
            .field("size", &self.size)
            .finish()
    }
}

/// Offsets and extent of one frame written to a cleaned segment.
#[derive(Clone, Copy)]
struct FrameInfo {
    base: u64,
    last: u64,
    max_timestamp: i64,
    len: u64,
}

/// A frame found in a read chunk: where it starts in the buffer and its total length.
#[derive(Clone, Copy)]
struct ChunkFrame {
    start: usize,
    len: usize,
    payload_len: usize,
}

/// The bytes of one read of a segment: fresh from the disk, or kept from the map's pass.
enum Chunk {
    Read(glommio::io::ReadResult),
    Held(Vec<u8>),
}

impl std::ops::Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Chunk::Read(rr) => rr,
            Chunk::Held(v) => v,
        }
    }
}

/// Reads of the current pass kept for its rewrite, by (segment base, position): the bytes,
/// their frames and the position after them. At most [`CLEANER_REUSE_MAX_BYTES`].
#[derive(Default)]
struct HeldChunks {
    chunks: HashMap<(u64, u64), HeldChunk>,
    bytes: usize,
}

/// A kept read: its bytes, their frames and the position after them.
type HeldChunk = (Vec<u8>, Vec<ChunkFrame>, u64);

impl HeldChunks {
    fn clear(&mut self) {
        self.chunks.clear();
        self.bytes = 0;
    }

    fn hold(&mut self, base: u64, pos: u64, bytes: Chunk, frames: Vec<ChunkFrame>, next: u64) {
        if self.bytes + bytes.len() <= CLEANER_REUSE_MAX_BYTES {
            self.bytes += bytes.len();
            let bytes = match bytes {
                Chunk::Read(rr) => rr.to_vec(),
                // Joined from pieces already: kept without another copy.
                Chunk::Held(v) => v,
            };
            self.chunks.insert((base, pos), (bytes, frames, next));
        }
    }
}

/// A run of offsets whose batches were all dropped, not yet covered by a frame.
struct Gap {
    start: u64,
    end: u64,
    max_timestamp: i64,
    epoch: i32,
}

enum Act {
    /// The original frame, byte for byte (start in the chunk, length).
    Keep(usize, usize, FrameInfo),
    /// A new frame (header, payload, padding).
    New(Vec<u8>, FrameInfo),
}

/// The cleaner of one log: its persisted state, throttle and counters.
pub struct LogCleaner {
    config: CleanerConfig,
    state: CleanerState,
    throttle: Throttle,
    counters: CleanerCounters,
    /// Tests stop the cleaner after this many file operations, to crash it at every step.
    stop_after_steps: Option<u32>,
    steps: u32,
    /// Largest frame read so far (sizes the reads, see [`CLEANER_READ_MIN_FRAMES`]).
    largest_frame: usize,
    held: HeldChunks,
    /// When the cleaner last gave the executor a look at its rings ([`CLEANER_CPU_SLICE`]).
    slice_started: std::time::Instant,
}

/// The file operations of cleaning, in order: a test may stop the cleaner after any of them.
#[derive(Clone, Copy, Debug)]
enum Step {
    CleanedCreated,
    CleanedWritten,
    RenamedToSwap,
    SwapDirSynced,
    MergedPartRemoved,
    MergedPartsDirSynced,
    OldIndexRemoved,
    RenamedToLog,
    LogDirSynced,
    IndexWritten,
    StateWritten,
}

impl LogCleaner {
    /// The cleaner of `log`, with the state its last run left (none: the whole log is dirty).
    pub fn open(log: &PartitionLog, config: CleanerConfig) -> LogCleaner {
        assert!(
            config.dedupe_buffer_bytes > 0,
            "the offset map needs memory"
        );
        LogCleaner {
            throttle: Throttle::new(config.io_bytes_per_sec, config.max_busy_percent),
            state: CleanerState::read(log.dir()),
            config,
            counters: CleanerCounters::default(),
            stop_after_steps: None,
            steps: 0,
            largest_frame: 0,
            held: HeldChunks::default(),
            slice_started: std::time::Instant::now(),
        }
    }

    pub fn counters(&self) -> CleanerCounters {
        self.counters
    }

    /// Offsets below this are clean.
    pub fn first_dirty_offset(&self) -> u64 {
        self.state.first_dirty
    }

    /// Makes the cleaner fail (as if killed) after `steps` more file operations; for crash
    /// tests at every step.
    #[doc(hidden)]
    pub fn stop_after_steps(&mut self, steps: Option<u32>) {
        self.stop_after_steps = steps;
        self.steps = 0;
    }

    /// File operations since the last [`Self::stop_after_steps`] (or since open).
    #[doc(hidden)]
    pub fn steps_taken(&self) -> u32 {
        self.steps
    }

    fn step(&mut self, step: Step) -> Result<(), EngineError> {
        self.steps += 1;
        if self.stop_after_steps.is_some_and(|n| self.steps >= n) {
            return Err(EngineError::Io {
                path: PathBuf::new(),
                source: std::io::Error::other(format!("cleaner stopped after {step:?}")),
            });
        }
        Ok(())
    }

    /// The cleanable part of the log and how dirty it is (no I/O).
    pub fn plan(&self, log: &PartitionLog, req: &CleanRequest) -> CleanablePlan {
        let st = log.inner.state.borrow();
        let active = st.active().base;
        let limit = req.max_clean_offset.min(st.checkpoint.offset);
        let lag_cutoff = |ms: u64| {
            req.now_ms
                .saturating_sub(i64::try_from(ms).unwrap_or(i64::MAX))
        };
        let min_lag_cutoff = lag_cutoff(req.policy.min_compaction_lag_ms);
        let first_dirty = self.state.first_dirty.clamp(st.log_start, st.log_end);
        let mut segments = Vec::new();
        for seg in st.segments.values() {
            // The segment the recovery point names keeps the bytes it names (recovery checks
            // that the log reaches that position there): it is not rewritten, let alone merged
            // away, until the recovery point has moved past it.
            if seg.base == active
                || seg.base >= st.checkpoint.segment_base
                || st.sealed.iter().any(|s| s.base == seg.base)
                || seg.next_offset > limit
                || (seg.max_timestamp != NO_TIMESTAMP && seg.max_timestamp > min_lag_cutoff)
            {
                break;
            }
            segments.push(SegInfo {
                base: seg.base,
                next_offset: seg.next_offset,
                size: seg.size,
                max_timestamp: seg.max_timestamp,
                file: seg.file.clone(),
                path: seg.path.clone(),
            });
        }
        let clean_end = segments.last().map_or(st.log_start, |s| s.next_offset);
        let (dirty, clean): (Vec<&SegInfo>, Vec<&SegInfo>) =
            segments.iter().partition(|s| s.next_offset > first_dirty);
        let clean_bytes: u64 = clean.iter().map(|s| s.size).sum();
        let dirty_bytes: u64 = dirty.iter().map(|s| s.size).sum();
        let total = clean_bytes + dirty_bytes;
        let max_lag_cutoff = lag_cutoff(req.policy.max_compaction_lag_ms);
        CleanablePlan {
            first_dirty,
            clean_end,
            clean_bytes,
            dirty_bytes,
            dirty_ratio: if total == 0 {
                0.0
            } else {
                dirty_bytes as f64 / total as f64
            },
            max_lag_exceeded: dirty
                .iter()
                .any(|s| s.max_timestamp != NO_TIMESTAMP && s.max_timestamp < max_lag_cutoff),
            segments,
        }
    }

    /// Cleans the log if it is dirty enough (or `req.force`): as many passes as the map needs
    /// to cover the whole cleanable part. `None` if there was nothing to do.
    pub async fn clean(
        &mut self,
        log: &PartitionLog,
        req: &CleanRequest,
    ) -> Result<Option<CleanStats>, EngineError> {
        let plan = self.plan(log, req);
        self.counters.dirty_ratio = plan.dirty_ratio;
        let dirty = plan.first_dirty < plan.clean_end;
        // Forced, a clean log is cleaned again too: that is when its expired tombstones go.
        let anything = dirty || (req.force && !plan.segments.is_empty());
        if !anything || !(req.force || req.urgent || plan.should_clean(&req.policy)) {
            return Ok(None);
        }
        // Time between two cleanings is rest.
        self.throttle.rested(std::time::Instant::now());
        self.throttle.set_urgent(req.urgent);
        let mut stats = CleanStats {
            dirty_ratio_before: plan.dirty_ratio,
            ..CleanStats::default()
        };
        let mut first_dirty = plan.first_dirty;
        let mut plan = Some(plan);
        loop {
            // Each pass sees the segments as the previous one left them.
            let plan = match plan.take() {
                Some(p) => p,
                None => self.plan(log, req),
            };
            if stats.passes > 0 && plan.clean_end <= first_dirty {
                break;
            }
            let map_end = self.pass(log, &plan, first_dirty, req, &mut stats).await?;
            assert!(
                map_end > first_dirty || map_end == plan.clean_end,
                "every pass makes progress"
            );
            // A forced pass over a log whose cleanable end fell below the dirty part (a lower
            // high watermark) cleans up to that end and leaves the dirty part where it was.
            first_dirty = first_dirty.max(map_end);
            self.state.first_dirty = first_dirty;
            {
                let st = log.inner.state.borrow();
                self.state
                    .first_cleaned_ms
                    .retain(|base, _| st.segments.contains_key(base));
            }
            let asked = std::time::Instant::now();
            self.state.write(log.dir()).await?;
            self.throttle.waited(asked, std::time::Instant::now());
            self.step(Step::StateWritten)?;
            stats.passes += 1;
            self.counters.passes += 1;
            if first_dirty >= plan.clean_end {
                break;
            }
        }
        self.counters.dirty_ratio = self.plan(log, req).dirty_ratio;
        tracing::debug!(dir = ?log.dir(), ?stats, "cleaned log");
        Ok(Some(stats))
    }

    /// One pass from `first_dirty`; returns where its map ended (the new first dirty offset).
    async fn pass(
        &mut self,
        log: &PartitionLog,
        plan: &CleanablePlan,
        first_dirty: u64,
        req: &CleanRequest,
        stats: &mut CleanStats,
    ) -> Result<u64, EngineError> {
        let cap = max_payload(&log.inner.config);
        let mut map = OffsetMap::new(self.config.dedupe_buffer_bytes);
        // Producer id -> last offset of its last batch below the map's end.
        let mut producers: HashMap<i64, u64> = HashMap::new();
        let mut map_end = plan.clean_end;
        self.held.clear();
        'segments: for seg in &plan.segments {
            let mut pos = 0;
            while pos < seg.size {
                let (rr, frames, next) = self.read_chunk(seg, pos, cap, stats).await?;
                for f in &frames {
                    // A read holds up to 4 MiB of records to decode and hash: the shard's
                    // requests get their turn between batches, not after the whole read.
                    self.yield_if_due().await;
                    let payload = &rr[f.start + FRAME_HEADER_BYTES..][..f.payload_len];
                    let h = BatchHeader::parse(payload)?;
                    if h.base_offset() as u64 >= first_dirty && !h.is_control() {
                        let records = Records::of(payload, MAX_UNCOMPRESSED_RECORDS_BYTES)?;
                        let mut need = 0usize;
                        for r in records.iter() {
                            if let Some(k) = r?.key {
                                need = need.saturating_add(OffsetMap::entry_bytes(k.len()));
                            }
                        }
                        if !map.has_room(need) {
                            if map.is_empty() {
                                return Err(EngineError::Config(format!(
                                    "the cleaner's dedupe buffer of {} bytes cannot hold the \
                                     keys of the batch at offset {}",
                                    self.config.dedupe_buffer_bytes,
                                    h.base_offset()
                                )));
                            }
                            map_end = h.base_offset() as u64;
                            break 'segments;
                        }
                        for r in records.iter() {
                            let r = r?;
                            if let Some(k) = r.key {
                                map.put(k, r.offset as u64);
                            }
                        }
                    }
                    if h.producer_id() >= 0 {
                        producers.insert(h.producer_id(), h.last_offset() as u64);
                    }
                }
                self.held.hold(seg.base, pos, rr, frames, next);
                pos = next;
            }
        }
        let to_clean: Vec<SegInfo> = plan
            .segments
            .iter()
            .take_while(|s| s.base < map_end)
            .cloned()
            .collect();
        let rewritten = stats.segments_rewritten;
        let cleaned = self
            .clean_groups(log, &to_clean, false, &map, &producers, map_end, req, stats)
            .await;
        self.held.clear();
        cleaned?;
        if stats.segments_rewritten > rewritten {
            // The runs above were formed by the sizes before cleaning; what this pass rewrote
            // is small now, and runs of it that fit a segment are merged at once (copying
            // what is left is cheap), not only at the log's next clean: a log cleaned once
            // after a burst would keep a file per segment.bytes written until written again.
            let now = self.plan(log, req);
            let cleaned: Vec<SegInfo> = now
                .segments
                .iter()
                .take_while(|s| s.next_offset <= map_end)
                .cloned()
                .collect();
            self.clean_groups(log, &cleaned, true, &map, &producers, map_end, req, stats)
                .await?;
        }
        Ok(map_end)
    }

    /// Cleans `segs` (consecutive, from a plan) in runs of [`merge_groups`]; with
    /// `merges_only`, only the runs of several segments.
    #[allow(clippy::too_many_arguments)]
    async fn clean_groups(
        &mut self,
        log: &PartitionLog,
        segs: &[SegInfo],
        merges_only: bool,
        map: &OffsetMap,
        producers: &HashMap<i64, u64>,
        map_end: u64,
        req: &CleanRequest,
        stats: &mut CleanStats,
    ) -> Result<(), EngineError> {
        let spans: Vec<SegSpan> = segs.iter().map(SegInfo::span).collect();
        for range in merge_groups(&spans, log.inner.config.segment_bytes, map_end) {
            let group = &segs[range];
            if group.len() == 1 && (merges_only || group[0].size == 0) {
                continue;
            }
            let merged = self
                .clean_group(log, group, map, producers, map_end, req, stats)
                .await?;
            if merged {
                // The merged segment's tombstones wait as long as the most recently cleaned
                // of its parts' would have (never less).
                let clock = group
                    .iter()
                    .map(|s| {
                        self.state
                            .first_cleaned_ms
                            .get(&s.base)
                            .copied()
                            .unwrap_or(req.now_ms)
                    })
                    .max()
                    .unwrap_or(req.now_ms);
                for s in &group[1..] {
                    self.state.first_cleaned_ms.remove(&s.base);
                }
                self.state.first_cleaned_ms.insert(group[0].base, clock);
            } else {
                for seg in group.iter().filter(|s| s.next_offset <= map_end) {
                    self.state
                        .first_cleaned_ms
                        .entry(seg.base)
                        .or_insert(req.now_ms);
                }
            }
        }
        Ok(())
    }

    /// Reads whole frames of `seg` from `pos` (at least one): the buffer, the frames in it, and
    /// the position after the last.
    async fn read_chunk(
        &mut self,
        seg: &SegInfo,
        pos: u64,
        cap: usize,
        stats: &mut CleanStats,
    ) -> Result<(Chunk, Vec<ChunkFrame>, u64), EngineError> {
        let mut want = self
            .largest_frame
            .saturating_mul(CLEANER_READ_MIN_FRAMES)
            .clamp(CLEANER_READ_CHUNK_BYTES, CLEANER_READ_MAX_BYTES);
        loop {
            let len = (want as u64).min(seg.size - pos) as usize;
            let rr = if len <= CLEANER_READ_CHUNK_BYTES {
                Chunk::Read(self.read_piece(seg, pos, len, stats).await?)
            } else {
                // A read sized for several large frames still goes to the disk in requests of
                // the chunk size, each waiting its turn: a producer's write or fdatasync queued
                // behind a 4 MiB read waited two milliseconds for it.
                let mut buf = Vec::with_capacity(len);
                while buf.len() < len {
                    let at = pos + buf.len() as u64;
                    let piece = CLEANER_READ_CHUNK_BYTES.min(len - buf.len());
                    let rr = self.read_piece(seg, at, piece, stats).await?;
                    if rr.is_empty() {
                        break;
                    }
                    buf.extend_from_slice(&rr);
                }
                Chunk::Held(buf)
            };
            let mut frames = Vec::new();
            let mut p = 0usize;
            let corrupt = |at: usize, reason: String| EngineError::Corrupt {
                path: seg.path.clone(),
                position: pos + at as u64,
                reason,
            };
            while p < rr.len() {
                self.yield_if_due().await;
                match decode_frame(&rr[p..], None, cap) {
                    Ok(f) => {
                        self.largest_frame = self.largest_frame.max(f.len);
                        frames.push(ChunkFrame {
                            start: p,
                            len: f.len,
                            payload_len: f.payload.len(),
                        });
                        p += f.len;
                    }
                    Err(FrameError::Incomplete { need }) => {
                        if frames.is_empty() {
                            if pos + need as u64 > seg.size {
                                return Err(corrupt(p, "frame runs past the segment".into()));
                            }
                            want = need;
                        }
                        break;
                    }
                    Err(FrameError::Invalid(reason)) => return Err(corrupt(p, reason)),
                }
            }
            if !frames.is_empty() {
                return Ok((rr, frames, pos + p as u64));
            }
            if rr.len() == len && want > len {
                continue;
            }
            return Err(corrupt(0, "no whole frame where one was expected".into()));
        }
    }

    /// One read request of at most [`CLEANER_READ_CHUNK_BYTES`], after giving way to the shard's
    /// foreground disk work.
    async fn read_piece(
        &mut self,
        seg: &SegInfo,
        pos: u64,
        len: usize,
        stats: &mut CleanStats,
    ) -> Result<glommio::io::ReadResult, EngineError> {
        stats.deferred_ms += give_way(&mut self.throttle).await;
        let asked = std::time::Instant::now();
        stats.read_requests += 1;
        let rr = seg
            .file
            .read_at(pos, len)
            .await
            .map_err(io_err(&seg.path))?;
        self.throttle.waited(asked, std::time::Instant::now());
        stats.bytes_read += rr.len() as u64;
        self.counters.bytes_read += rr.len() as u64;
        self.throttle.account(rr.len() as u64).await;
        // The executor reaped completions while the read was in flight.
        self.slice_started = std::time::Instant::now();
        Ok(rr)
    }

    /// Yields to the executor's reactor once the cleaner has held the CPU for
    /// [`CLEANER_CPU_SLICE`]. A plain yield would only requeue the task: with no other task
    /// runnable, glommio runs it again without polling its rings. A short timer ends the
    /// queue's turn; the reactor poll that fires it also delivers the sockets' completions,
    /// and their requests run first (the cleaner's queue has a tenth of the shares). glommio's
    /// own timer, not `Deadline` (which pads a deadline by a millisecond): it is polled once
    /// while pending, so it leaves no timer entry behind.
    async fn yield_if_due(&mut self) {
        if self.slice_started.elapsed() >= CLEANER_CPU_SLICE {
            let asked = std::time::Instant::now();
            glommio::timer::Timer::new(CLEANER_YIELD_TIMER).await;
            let now = std::time::Instant::now();
            // The turn given away is not the cleaner's work (its time share counts only that).
            self.throttle.waited(asked, now);
            self.slice_started = now;
        }
    }

    /// Rewrites a run of segments against the map as one segment (see [`merge_groups`]) and
    /// swaps it in: a run of several always, a single segment only if anything changed.
    /// Returns whether several segments were merged into one.
    #[allow(clippy::too_many_arguments)]
    async fn clean_group(
        &mut self,
        log: &PartitionLog,
        group: &[SegInfo],
        map: &OffsetMap,
        producers: &HashMap<i64, u64>,
        map_end: u64,
        req: &CleanRequest,
        stats: &mut CleanStats,
    ) -> Result<bool, EngineError> {
        let dir = log.dir().to_path_buf();
        let cap = max_payload(&log.inner.config);
        let retention = i64::try_from(req.policy.delete_retention_ms).unwrap_or(i64::MAX);
        let expiration = i64::try_from(req.policy.producer_id_expiration_ms).unwrap_or(i64::MAX);
        let producer_cutoff = req.now_ms.saturating_sub(expiration);
        let merge = group.len() > 1;
        let first = &group[0];
        let last = group.last().expect("a group holds a segment");

        let mut w = Rewrite {
            out: None,
            prefix: Vec::new(),
            prefix_end: 0,
        };
        if merge {
            w.out = Some(Output::create(&dir, first.base, &log.inner.config).await?);
            self.step(Step::CleanedCreated)?;
        }
        // A run of dropped batches is covered by one frame, also across the parts of a merge.
        let mut gap: Option<Gap> = None;
        let mut removed = (0u64, 0u64);
        for seg in group {
            // Each part's tombstones expire on its own clock.
            let first_cleaned = self
                .state
                .first_cleaned_ms
                .get(&seg.base)
                .copied()
                .unwrap_or(req.now_ms);
            let tombstones_expired = first_cleaned.saturating_add(retention) <= req.now_ms;
            let mut pos = 0;
            while pos < seg.size {
                let (rr, frames, next) = match self.held.chunks.remove(&(seg.base, pos)) {
                    Some((bytes, frames, next)) => (Chunk::Held(bytes), frames, next),
                    None => self.read_chunk(seg, pos, cap, stats).await?,
                };
                let mut acts = Vec::with_capacity(frames.len());
                for f in &frames {
                    self.yield_if_due().await;
                    let payload = &rr[f.start + FRAME_HEADER_BYTES..][..f.payload_len];
                    let h = BatchHeader::parse(payload)?;
                    let (base, last) = (h.base_offset() as u64, h.last_offset() as u64);
                    let info = FrameInfo {
                        base,
                        last,
                        max_timestamp: h.max_timestamp(),
                        len: f.len as u64,
                    };
                    let keep_whole = base >= map_end
                        || h.is_control()
                        || req
                            .keep_batches
                            .iter()
                            .flatten()
                            .any(|o| (base..=last).contains(o));
                    let decision = if keep_whole {
                        None
                    } else {
                        let records = Records::of(payload, MAX_UNCOMPRESSED_RECORDS_BYTES)?;
                        let mut kept: Vec<&[u8]> = Vec::new();
                        let mut kept_max_ts = i64::MIN;
                        let mut all = 0usize;
                        for r in records.iter() {
                            let r = r?;
                            all += 1;
                            let superseded = match r.key {
                                None => true,
                                Some(k) => map.get(k).is_some_and(|o| o > r.offset as u64),
                            };
                            let expired_tombstone = r.value.is_none() && tombstones_expired;
                            if superseded || expired_tombstone {
                                removed.0 += 1;
                                removed.1 += u64::from(!superseded && expired_tombstone);
                            } else {
                                kept.push(r.raw);
                                kept_max_ts = kept_max_ts.max(r.timestamp);
                            }
                        }
                        if kept.len() == all {
                            None
                        } else if !kept.is_empty() {
                            Some(Some(rebuild_batch(payload, &kept, Some(kept_max_ts))?))
                        } else if h.producer_id() >= 0
                            && producers.get(&h.producer_id()) == Some(&last)
                            && h.max_timestamp() >= producer_cutoff
                        {
                            Some(Some(rebuild_batch(payload, &[], None)?))
                        } else {
                            Some(None)
                        }
                    };
                    match decision {
                        None => {
                            flush_gap(&mut gap, &mut acts);
                            acts.push(Act::Keep(f.start, f.len, info));
                        }
                        Some(Some(batch)) => {
                            flush_gap(&mut gap, &mut acts);
                            let frame = encode_frame(&batch, h.partition_leader_epoch());
                            let info = FrameInfo {
                                len: frame.len() as u64,
                                max_timestamp: BatchHeader::parse(&batch)?.max_timestamp(),
                                ..info
                            };
                            acts.push(Act::New(frame, info));
                        }
                        Some(None) => match &mut gap {
                            Some(g) => {
                                assert_eq!(g.end + 1, base, "offsets are contiguous");
                                g.end = last;
                                g.max_timestamp = g.max_timestamp.max(h.max_timestamp());
                                g.epoch = h.partition_leader_epoch();
                            }
                            None => {
                                gap = Some(Gap {
                                    start: base,
                                    end: last,
                                    max_timestamp: h.max_timestamp(),
                                    epoch: h.partition_leader_epoch(),
                                })
                            }
                        },
                    }
                }
                self.apply(&mut w, acts, &rr, pos, seg, &dir, log, stats)
                    .await?;
                pos = next;
            }
        }
        let mut acts = Vec::new();
        flush_gap(&mut gap, &mut acts);
        self.apply(&mut w, acts, &[], 0, first, &dir, log, stats)
            .await?;
        let Some(out) = w.out else {
            return Ok(false);
        };
        // Closing, syncing and swapping the files is waiting for the disk (and for the
        // checkpointer), not the cleaner's work.
        let asked = std::time::Instant::now();
        let (new_seg, written) = out.finish(last).await?;
        self.step(Step::CleanedWritten)?;
        stats.bytes_written += written;
        self.counters.bytes_written += written;
        let swapped = self.swap(log, group, new_seg).await?;
        self.throttle.waited(asked, std::time::Instant::now());
        if swapped {
            let before: u64 = group.iter().map(|s| s.size).sum();
            let reclaimed = before.saturating_sub(written);
            let parts = group.len() as u32;
            stats.bytes_reclaimed += reclaimed;
            stats.segments_rewritten += parts;
            stats.segments_merged += parts - 1;
            stats.records_removed += removed.0;
            stats.tombstones_removed += removed.1;
            self.counters.bytes_reclaimed += reclaimed;
            self.counters.segments_rewritten += u64::from(parts);
            self.counters.segments_merged += u64::from(parts - 1);
        }
        Ok(swapped && merge)
    }

    /// Carries out the decisions on one read of `seg` (starting at its position `pos`): frames
    /// kept whole before the first change are only noted (a segment with no change is not
    /// rewritten at all); from the first change on, everything is written to the output.
    #[allow(clippy::too_many_arguments)]
    async fn apply(
        &mut self,
        w: &mut Rewrite,
        acts: Vec<Act>,
        chunk: &[u8],
        pos: u64,
        seg: &SegInfo,
        dir: &Path,
        log: &PartitionLog,
        stats: &mut CleanStats,
    ) -> Result<(), EngineError> {
        for act in acts {
            match act {
                Act::Keep(start, len, info) if w.out.is_none() => {
                    debug_assert_eq!(pos + start as u64, w.prefix_end);
                    w.prefix.push(info);
                    w.prefix_end += len as u64;
                }
                Act::Keep(start, len, info) => {
                    let o = w.out.as_mut().expect("output open");
                    o.write(&chunk[start..start + len], info, self, stats)
                        .await?;
                }
                Act::New(frame, info) => {
                    if w.out.is_none() {
                        // Only a single segment is written lazily: `seg` is that segment.
                        let mut o = Output::create(dir, seg.base, &log.inner.config).await?;
                        self.step(Step::CleanedCreated)?;
                        o.copy_prefix(seg, w.prefix_end, &w.prefix, self, stats)
                            .await?;
                        w.out = Some(o);
                    }
                    let o = w.out.as_mut().expect("output open");
                    o.write(&frame, info, self, stats).await?;
                }
            }
        }
        Ok(())
    }

    /// Replaces the segments of `group` by the cleaned segment in `.cleaned` (see `swap.rs`);
    /// false if the log changed under the cleaner (retention or truncation removed a segment),
    /// in which case the cleaned copy is discarded.
    async fn swap(
        &mut self,
        log: &PartitionLog,
        group: &[SegInfo],
        mut new_seg: Segment,
    ) -> Result<bool, EngineError> {
        let inner = &log.inner;
        let dir = inner.dir.clone();
        let first = &group[0];
        let last = group.last().expect("a group holds a segment");
        let cleaned = swap::cleaned_path(&dir, first.base);
        // Segments go away (truncation, retention, deletion, close) only under `ckpt_lock`,
        // which those take after `lock`; appends and group commits take `lock` alone and touch
        // only the active segment, which is never cleaned. So `ckpt_lock` alone keeps these
        // segments in place until they are swapped, without holding the partition's group
        // commits back through the directory syncs below (under `lock`, cleaning
        // `__consumer_offsets` as it grew raised the commits' p99 sevenfold).
        let _permit = inner
            .ckpt_lock
            .acquire_permit(1)
            .await
            .map_err(|_| EngineError::Closed)?;
        let unchanged = {
            let st = inner.state.borrow();
            inner.check(&st)?;
            group.iter().all(|old| {
                st.segments.get(&old.base).is_some_and(|s| {
                    Rc::ptr_eq(&s.file, &old.file)
                        && s.size == old.size
                        && s.next_offset == old.next_offset
                        && s.base != st.active().base
                        && s.base < st.checkpoint.segment_base
                })
            })
        };
        if !unchanged {
            tracing::debug!(
                ?cleaned,
                "segment changed while cleaning; cleaned copy dropped"
            );
            std::fs::remove_file(&cleaned).map_err(std_io_err(&cleaned))?;
            return Ok(false);
        }
        let swap = swap::swap_path(&dir, first.base);
        std::fs::rename(&cleaned, &swap).map_err(std_io_err(&cleaned))?;
        self.step(Step::RenamedToSwap)?;
        crate::checkpoint::sync_dir(&dir).await?;
        self.step(Step::SwapDirSynced)?;
        // Committed: recovery finishes the swap from here, removing every segment the swap
        // file's offsets cover. The merged parts go before the swap file takes the first
        // one's name, and that removal is durable first: a log with the merged segment
        // beside a part it replaced would overlap itself.
        for old in &group[1..] {
            let path = segment::log_path(&dir, old.base);
            std::fs::remove_file(&path).map_err(std_io_err(&path))?;
            Segment::remove_index_files(&dir, old.base);
            self.step(Step::MergedPartRemoved)?;
        }
        if group.len() > 1 {
            crate::checkpoint::sync_dir(&dir).await?;
            self.step(Step::MergedPartsDirSynced)?;
        }
        Segment::remove_index_files(&dir, first.base);
        self.step(Step::OldIndexRemoved)?;
        let path = segment::log_path(&dir, first.base);
        std::fs::rename(&swap, &path).map_err(std_io_err(&swap))?;
        self.step(Step::RenamedToLog)?;
        crate::checkpoint::sync_dir(&dir).await?;
        self.step(Step::LogDirSynced)?;
        new_seg.file = segment::open_file(&path).await?;
        new_seg.path = path;
        let index = new_seg.index_files();
        {
            let mut st = inner.state.borrow_mut();
            for old in &group[1..] {
                st.segments
                    .remove(&old.base)
                    .expect("checked under ckpt_lock");
            }
            let slot = st
                .segments
                .get_mut(&first.base)
                .expect("checked under ckpt_lock");
            new_seg.opened_ms = slot.opened_ms;
            assert_eq!(
                (new_seg.base, new_seg.next_offset),
                (first.base, last.next_offset),
                "a cleaned segment spans the same offsets as the segments it replaces"
            );
            *slot = new_seg;
        }
        // Cached batches of the old segments are still right (the same offsets, older values
        // that a reader could also have read a moment ago), but dropping them returns memory.
        cache::forget(inner.log_id);
        index.write_index_files(&dir).await?;
        self.step(Step::IndexWritten)?;
        Ok(true)
    }
}
/// Before one cleaner disk request: pauses if the cleaner has used its share of time, waits for
/// the shard's foreground disk work to end (at most [`CLEANER_MAX_DEFER_MS`]), and lets the
/// shard's other tasks run if they are due; returns the milliseconds this took.
async fn give_way(throttle: &mut Throttle) -> u64 {
    let started = std::time::Instant::now();
    let pause = throttle.busy_pause(started);
    if !pause.is_zero() {
        glommio::timer::sleep(pause).await;
    }
    let quiet = crate::foreground::foreground_in_flight() == 0;
    if !throttle.urgent() {
        crate::foreground::wait_until_quiet(std::time::Duration::from_millis(CLEANER_MAX_DEFER_MS))
            .await;
    }
    glommio::yield_if_needed().await;
    let now = std::time::Instant::now();
    if !pause.is_zero() || !quiet {
        throttle.rested(now);
    } else {
        // The shard's other tasks ran meanwhile (the cleaner's queue has a tenth of the
        // shares): their time is not the cleaner's. Counted as its work, a shard busy with
        // requests made the cleaner pause four times as long as they ran, and under a burst of
        // commits it cleaned a megabyte a second while `__consumer_offsets` grew twenty.
        throttle.waited(started, now);
    }
    now.saturating_duration_since(started).as_millis() as u64
}

/// Covers a pending run of dropped offsets with record-less batches (split so each span fits
/// lastOffsetDelta).
fn flush_gap(gap: &mut Option<Gap>, acts: &mut Vec<Act>) {
    let Some(g) = gap.take() else { return };
    let mut start = g.start;
    loop {
        let end = g.end.min(start + i32::MAX as u64);
        let batch = empty_span_batch(start, end, g.max_timestamp, g.epoch);
        let frame = encode_frame(&batch, g.epoch);
        acts.push(Act::New(
            frame.clone(),
            FrameInfo {
                base: start,
                last: end,
                max_timestamp: g.max_timestamp,
                len: frame.len() as u64,
            },
        ));
        if end == g.end {
            break;
        }
        start = end + 1;
    }
}

/// A RecordBatch v2 with no records covering offsets `start..=end`, no producer.
pub fn empty_span_batch(start: u64, end: u64, timestamp: i64, epoch: i32) -> Vec<u8> {
    assert!(
        end >= start && end - start <= i32::MAX as u64,
        "span fits lastOffsetDelta"
    );
    let mut b = crate::batch::build_batch(&[], 0, timestamp, timestamp);
    b[23..27].copy_from_slice(&((end - start) as i32).to_be_bytes());
    crate::batch::stamp(&mut b, start as i64, epoch);
    let crc = crc32c::crc32c(&b[crate::batch::CRC_COVERED_START..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    b
}

/// A whole frame (header, payload, zero padding) for a stamped batch.
fn encode_frame(batch: &[u8], epoch: i32) -> Vec<u8> {
    let h = BatchHeader::parse(batch).expect("the cleaner builds valid batches");
    let header = FrameHeader::encode(
        h.base_offset() as u64,
        h.max_timestamp(),
        h.last_offset_delta() as u32,
        epoch,
        batch,
    );
    let mut frame = Vec::with_capacity(frame_len(batch.len()));
    frame.extend_from_slice(&header);
    frame.extend_from_slice(batch);
    frame.resize(frame_len(batch.len()), 0);
    frame
}

/// The cleaned segment being written.
struct Output {
    writer: glommio::io::DmaStreamWriter,
    path: PathBuf,
    seg: Segment,
    index_interval_bytes: u32,
    written: u64,
}

impl Output {
    async fn create(
        dir: &Path,
        base: u64,
        config: &crate::LogConfig,
    ) -> Result<Output, EngineError> {
        let path = swap::cleaned_path(dir, base);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .dma_open(&path)
            .await
            .map_err(io_err(&path))?;
        // The in-memory segment is rebuilt on the final file after the swap; until then it
        // only collects the index, so it borrows a handle to the new file.
        let seg_file = segment::open_file(&path).await?;
        // One write in flight (glommio's default is four): a producer's request waits behind
        // at most one of the cleaner's.
        let writer = DmaStreamWriterBuilder::new(file)
            .with_buffer_size(CLEANER_WRITE_BUFFER_BYTES)
            .with_write_behind(1)
            .build();
        Ok(Output {
            writer,
            seg: Segment::new(base, seg_file, path.clone()),
            path,
            index_interval_bytes: config.index_interval_bytes,
            written: 0,
        })
    }

    async fn write(
        &mut self,
        frame: &[u8],
        info: FrameInfo,
        cleaner: &mut LogCleaner,
        stats: &mut CleanStats,
    ) -> Result<(), EngineError> {
        assert_eq!(info.len as usize, frame.len());
        let buffered = (self.written % CLEANER_WRITE_BUFFER_BYTES as u64) as usize;
        if buffered + frame.len() >= CLEANER_WRITE_BUFFER_BYTES {
            // This frame fills the buffer: the writer sends it to the disk.
            stats.deferred_ms += give_way(&mut cleaner.throttle).await;
        }
        let asked = std::time::Instant::now();
        self.writer
            .write_all(frame)
            .await
            .map_err(std_io_err(&self.path))?;
        cleaner.throttle.waited(asked, std::time::Instant::now());
        self.written += frame.len() as u64;
        cleaner.throttle.account(frame.len() as u64).await;
        self.seg.record_frame(
            info.base,
            info.last,
            info.max_timestamp,
            info.len,
            self.index_interval_bytes,
        );
        Ok(())
    }

    /// Copies the frames kept whole before the first change (bytes `..end` of `old`).
    async fn copy_prefix(
        &mut self,
        old: &SegInfo,
        end: u64,
        frames: &[FrameInfo],
        cleaner: &mut LogCleaner,
        stats: &mut CleanStats,
    ) -> Result<(), EngineError> {
        let mut pos = 0;
        while pos < end {
            let len = (CLEANER_READ_CHUNK_BYTES as u64).min(end - pos) as usize;
            let rr = cleaner.read_piece(old, pos, len, stats).await?;
            if rr.is_empty() {
                return Err(EngineError::Corrupt {
                    path: old.path.clone(),
                    position: pos,
                    reason: "segment shorter than the frames just read".into(),
                });
            }
            stats.deferred_ms += give_way(&mut cleaner.throttle).await;
            let asked = std::time::Instant::now();
            self.writer
                .write_all(&rr)
                .await
                .map_err(std_io_err(&self.path))?;
            cleaner.throttle.waited(asked, std::time::Instant::now());
            cleaner.throttle.account(rr.len() as u64).await;
            pos += rr.len() as u64;
        }
        self.written += end;
        for f in frames {
            self.seg.record_frame(
                f.base,
                f.last,
                f.max_timestamp,
                f.len,
                self.index_interval_bytes,
            );
        }
        Ok(())
    }

    /// Flushes, syncs and closes the file (exactly its data long): the cleaned segment, with its
    /// index built, and the bytes written.
    async fn finish(mut self, old: &SegInfo) -> Result<(Segment, u64), EngineError> {
        self.writer.close().await.map_err(std_io_err(&self.path))?;
        let on_disk = std::fs::metadata(&self.path)
            .map_err(std_io_err(&self.path))?
            .len();
        if on_disk != self.written {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.path)
                .map_err(std_io_err(&self.path))?;
            f.set_len(self.written).map_err(std_io_err(&self.path))?;
            f.sync_all().map_err(std_io_err(&self.path))?;
        }
        assert_eq!(self.seg.size, self.written, "index covers what was written");
        assert_eq!(
            self.seg.next_offset, old.next_offset,
            "a cleaned segment ends where the old one did"
        );
        Ok((self.seg, self.written))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(sizes: &[(u64, u64)]) -> Vec<SegSpan> {
        let mut base = 0;
        sizes
            .iter()
            .map(|&(offsets, size)| {
                let s = SegSpan {
                    base,
                    next_offset: base + offsets,
                    size,
                };
                base += offsets;
                s
            })
            .collect()
    }

    #[test]
    fn runs_fit_a_segment_a_relative_offset_and_the_map() {
        let segs = spans(&[(10, 30), (10, 30), (10, 30), (10, 100), (10, 1), (10, 1)]);
        assert_eq!(merge_groups(&segs, 100, 60), vec![0..3, 3..4, 4..6]);
        // Exactly the segment size fits.
        assert_eq!(merge_groups(&segs, 90, 60), vec![0..3, 3..4, 4..6]);
        assert_eq!(merge_groups(&segs, 89, 60), vec![0..2, 2..3, 3..4, 4..6]);
        // The segment the map ends inside is cleaned alone; what lies past it is not merged.
        assert_eq!(
            merge_groups(&segs, 1000, 25),
            vec![0..2, 2..3, 3..4, 4..5, 5..6]
        );
        // Offsets beyond i32::MAX of the run's base start a new run.
        let wide = spans(&[(1 << 30, 1), (1 << 30, 1), (1 << 30, 1)]);
        assert_eq!(merge_groups(&wide, 100, u64::MAX), vec![0..2, 2..3]);
        // A gap in the offsets (never in a log, but not merged over) starts a new run.
        let mut gapped = spans(&[(10, 1), (10, 1)]);
        gapped[1].base += 1;
        gapped[1].next_offset += 1;
        assert_eq!(merge_groups(&gapped, 100, u64::MAX), vec![0..1, 1..2]);
        assert!(merge_groups(&[], 100, 0).is_empty());
    }
}
