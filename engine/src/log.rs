//! The partition log: appends, group commit, reads, truncation, retention and epochs over a
//! directory of segments. Opening and recovery live in `recovery.rs`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use glommio::io::DmaFile;
use glommio::sync::Semaphore;

use crate::batch::{BatchHeader, VerifiedBatch, CRC_COVERED_START};
use crate::checkpoint::{self, RecoveryPoint};
use crate::checkpointer::Sealed;
use crate::follower::check_follower_append;
use crate::frame::{decode_frame, frame_len, FrameError, FrameHeader, FRAME_HEADER_BYTES};
use crate::segment::{self, io_err, Segment};
use crate::signal::Signal;
use crate::writer::{WriteJob, Writer, MAX_INFLIGHT_WRITES, PAGE_BYTES};
use crate::{cache, EngineError, FlushPolicy, LogConfig};

/// Largest single disk read a fetch issues (beyond one batch that is larger).
pub const MAX_READ_BYTES: usize = 8 << 20;
/// The recovery-point file is rewritten after a sync at most this often (and on roll, truncate,
/// retention and close), as the thread's budget allows (`checkpoint_budget`).
pub const CHECKPOINT_INTERVAL_MS: u64 = 5_000;
/// When a write reaches past the reserved part of the active segment's file, the file is
/// pre-allocated this far ahead (never the whole segment up front: a broker with thousands of
/// mostly idle partitions must not reserve a segment for each; idle logs reserve nothing).
pub const PREALLOCATE_AHEAD_BYTES: u64 = 16 << 20;
/// The run ahead starts this small in a new segment and doubles with the segment's size up to
/// [`PREALLOCATE_AHEAD_BYTES`]: a partition that took one small batch (a replicated leader's
/// epoch marker) reserves 64 KiB, not 16 MiB (3,000 partitions x 3 replicas reserved 141 GiB).
pub const PREALLOCATE_AHEAD_MIN_BYTES: u64 = 64 << 10;
/// Background work (recovery points, index files, finishing rolled segments) that failed for
/// lack of disk space is retried after this long.
pub const NO_SPACE_RETRY_MS: u64 = 1_000;
/// Retention whose recovery-point write fails for lack of space tries this many times in all,
/// `NO_SPACE_RETRY_MS` apart (holding no lock meanwhile), before it gives up until its next
/// pass: retention is what frees space, so it must not wait for the next pass (minutes) to try
/// again.
pub const RETENTION_NO_SPACE_ATTEMPTS: u32 = 5;
/// A roll waits for the background checkpointer while this many rolled segments are not yet
/// trimmed and indexed.
pub const MAX_UNFINISHED_SEALED_SEGMENTS: usize = 4;
/// Hard ceiling for `max_batch_bytes` and for any frame length read back from disk.
pub const MAX_FRAME_PAYLOAD_BYTES: usize = 64 << 20;

/// Where an appended batch landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendInfo {
    pub base_offset: u64,
    pub last_offset: u64,
    pub max_timestamp: i64,
}

/// Whole batches read from the log, in offset order, each a Kafka RecordBatch v2 with its
/// assigned base offset and leader epoch stamped in (no frame headers).
#[derive(Clone, Debug, Default)]
pub struct ReadResult {
    pub batches: Vec<Bytes>,
    pub log_start_offset: u64,
    pub log_end_offset: u64,
}

/// Whole batches read from the log as one buffer (see [`PartitionLog::read_joined`]).
#[derive(Clone, Debug, Default)]
pub struct JoinedRead {
    pub records: Bytes,
    pub log_start_offset: u64,
    pub log_end_offset: u64,
}

/// A disk read: the DMA buffer and each whole batch's (last offset, start, end) in it.
type DiskRead = (glommio::io::ReadResult, Vec<(u64, usize, usize)>);

/// Largest buffer a joined read reserves ahead of the bytes it has (it grows past this if a
/// read really returns more).
const JOINED_RESERVE_BYTES: usize = 16 << 20;

/// Where a read puts the batches it finds.
enum Gather {
    /// Each batch as its own `Bytes`.
    Batches(Vec<Bytes>),
    /// One buffer; a lone cached batch is kept as is until a second batch forces the copy.
    Joined {
        single: Option<Bytes>,
        buf: BytesMut,
        batches: usize,
    },
}

impl Gather {
    fn is_empty(&self) -> bool {
        match self {
            Gather::Batches(b) => b.is_empty(),
            Gather::Joined { batches, .. } => *batches == 0,
        }
    }

    fn join_single(single: &mut Option<Bytes>, buf: &mut BytesMut, more: usize) {
        if let Some(first) = single.take() {
            buf.reserve(first.len() + more);
            buf.extend_from_slice(&first);
        }
    }

    fn push_bytes(&mut self, bytes: Bytes) {
        match self {
            Gather::Batches(b) => b.push(bytes),
            Gather::Joined {
                single,
                buf,
                batches,
            } => {
                if *batches == 0 {
                    *single = Some(bytes);
                } else {
                    Self::join_single(single, buf, bytes.len());
                    buf.extend_from_slice(&bytes);
                }
                *batches += 1;
            }
        }
    }

    /// `ranges` (non-empty) are whole batches in `src`; `more` is how many bytes may follow.
    fn push_ranges(&mut self, src: &[u8], ranges: &[(u64, usize, usize)], more: usize) {
        let (first, end) = (ranges[0].1, ranges[ranges.len() - 1].2);
        match self {
            Gather::Batches(b) => {
                // The one copy out of the DMA read buffer (which is tied to this executor's
                // reactor, so it cannot travel inside a `Send` Bytes); every batch is a slice.
                let chunk = Bytes::copy_from_slice(&src[first..end]);
                b.extend(
                    ranges
                        .iter()
                        .map(|&(_, s, e)| chunk.slice(s - first..e - first)),
                );
            }
            Gather::Joined {
                single,
                buf,
                batches,
            } => {
                let len: usize = ranges.iter().map(|&(_, s, e)| e - s).sum();
                Self::join_single(single, buf, len);
                // Room for what this read brought and, within reason, what may follow, so a
                // large fetch grows its buffer once rather than by doubling.
                let ahead = more.min(JOINED_RESERVE_BYTES.saturating_sub(buf.len() + len));
                buf.reserve(len + ahead);
                // Frame headers sit between the batches on disk: copy the payloads only.
                for &(_, s, e) in ranges {
                    buf.extend_from_slice(&src[s..e]);
                }
                *batches += ranges.len();
            }
        }
    }
}

/// A batch appended but not yet written to disk: reads are served from here meanwhile.
pub(crate) struct Pending {
    pub base: u64,
    pub last: u64,
    pub end_pos: u64,
    pub bytes: Bytes,
}

pub(crate) struct State {
    pub segments: BTreeMap<u64, Segment>,
    pub log_start: u64,
    pub log_end: u64,
    pub durable: u64,
    /// The segment holding `durable` (the active one, or a sealed one not yet synced), and the
    /// position there matching it.
    pub durable_base: u64,
    pub durable_pos: u64,
    /// (leader epoch, start offset), both strictly ascending.
    pub epochs: Vec<(i32, u64)>,
    pub checkpoint: RecoveryPoint,
    pub last_checkpoint: Instant,
    /// Rolled-away segments not yet trimmed, indexed and known durable, oldest first.
    pub sealed: Vec<Sealed>,
    /// Segment files created so far, and how many of those creations a directory sync covers.
    pub dir_changes: u64,
    pub dir_synced: u64,
    /// A background recovery-point write is requested; the checkpointer task is alive.
    pub ckpt_wanted: bool,
    pub ckpt_running: bool,
    /// The segment of the durable end when a recovery point was last asked for.
    pub ckpt_asked_base: u64,
    /// The checkpointer holds `ckpt_lock` and is writing.
    pub ckpt_in_flight: bool,
    /// Tests hold background work back to crash between a roll and its finishing.
    pub ckpt_paused: bool,
    pub writer: Writer,
    pub pending: VecDeque<Pending>,
    pub failed: Option<String>,
    pub busy: bool,
    pub closed: bool,
    /// Someone waits for a group commit that has not started yet.
    pub sync_requested: bool,
    /// The group-commit task is alive (it exits when no commit is requested).
    pub flusher_running: bool,
    pub bytes_since_sync: u64,
    /// The active segment's file has space reserved below this position.
    pub preallocated: u64,
    /// Bumped before and after every removal of data (truncation, retention), so it is odd
    /// while one is under way: a disk read that overlapped a removal may see cut files, which
    /// is not corruption.
    pub generation: u64,
    /// A write or sync of the active segment failed for lack of space: the batches not known
    /// durable must be dropped (see `truncate::rewind_unwritten`) before anything else is
    /// appended or synced.
    pub rewind_needed: bool,
    /// Bumped whenever a group commit failed for lack of space or unsynced batches were
    /// dropped: a `sync_to` caller that saw it change may have lost its batches and must fail.
    pub space_failures: u64,
    /// The highest log end a rewind ever dropped.
    pub dropped_end: u64,
    /// Appends are failing for lack of space (one log line when it starts and when it ends).
    pub short_of_space: bool,
    /// Background writes are failing for lack of space (retried every `NO_SPACE_RETRY_MS`).
    pub background_short_of_space: bool,
    /// Tests make this many of the next segment writes fail with ENOSPC (a filesystem cannot
    /// be made to fail a write inside a reserved range on demand).
    pub inject_no_space_writes: u32,
    /// Bumped whenever the log end moves back (truncation, or a rewind after a failed write):
    /// whoever keeps state derived from the log's suffix compares it to notice.
    pub truncations: u64,
    /// Tests hold group commits back (appends go on, nothing becomes durable) until released.
    pub syncs_paused: bool,
    /// Tests make this many of the next recovery-point writes fail with ENOSPC.
    pub inject_no_space_checkpoints: u32,
}

impl State {
    pub fn active(&self) -> &Segment {
        self.segments
            .values()
            .next_back()
            .expect("a log has an active segment")
    }
    pub fn active_mut(&mut self) -> &mut Segment {
        self.segments
            .values_mut()
            .next_back()
            .expect("a log has an active segment")
    }
    pub(crate) fn fail(&mut self, reason: String) {
        tracing::error!(%reason, "partition log failed");
        self.failed.get_or_insert(reason);
    }
}

/// The limits that may change while the log is open (topic config changes). Segment size is
/// not among them: read buffers are sized from it, and shrinking it under existing batches
/// would make them unreadable; it applies when the log is next opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveLimits {
    pub max_batch_bytes: u32,
    pub retention_bytes: Option<u64>,
    pub retention_ms: Option<u64>,
}

impl LiveLimits {
    pub fn of(config: &LogConfig) -> LiveLimits {
        LiveLimits {
            max_batch_bytes: config.max_batch_bytes,
            retention_bytes: config.retention_bytes,
            retention_ms: config.retention_ms,
        }
    }
}

pub(crate) struct Inner {
    pub dir: PathBuf,
    /// The configuration the log was opened with; `limits` overrides its live fields.
    pub config: LogConfig,
    pub limits: Cell<LiveLimits>,
    pub log_id: u64,
    pub state: RefCell<State>,
    pub signal: Signal,
    /// Serialises the operations that change the segment structure or sync (roll, sync,
    /// truncate, retention, close). Appends and reads never take it.
    pub lock: Semaphore,
    /// Held by the background checkpointer while it writes, and by operations that remove
    /// data while they run (taken after `lock`, never the other way round).
    pub ckpt_lock: Semaphore,
    /// Told when the durable end advances and when the log end moves back (see
    /// [`crate::LogListener`]); set once by the log's owner.
    pub listener: RefCell<Option<Box<dyn crate::LogListener>>>,
}

/// A partition log on one shard. `!Send`; every method takes `&self`.
pub struct PartitionLog {
    pub(crate) inner: Rc<Inner>,
}

impl Inner {
    /// Records that a write needing space failed; logged once until space returns.
    pub(crate) fn note_no_space(
        &self,
        st: &mut State,
        background: bool,
        error: &dyn std::fmt::Display,
    ) {
        let flag = if background {
            &mut st.background_short_of_space
        } else {
            &mut st.short_of_space
        };
        if !std::mem::replace(flag, true) {
            tracing::warn!(dir = ?self.dir, background, %error,
                "partition log out of disk space: writes that need space fail until it returns");
        }
    }

    /// Records that a write needing space succeeded (the end of a shortage, if there was one).
    pub(crate) fn note_space_ok(&self, st: &mut State, background: bool) {
        let flag = if background {
            &mut st.background_short_of_space
        } else {
            &mut st.short_of_space
        };
        if std::mem::replace(flag, false) {
            tracing::info!(dir = ?self.dir, background, "disk space is back: partition log writes resume");
        }
    }

    /// Tells the listener the durable end moved. Never called with the state borrowed.
    pub(crate) fn durable_advanced(&self) {
        let (durable, log_end) = {
            let st = self.state.borrow();
            (st.durable, st.log_end)
        };
        if let Some(l) = &*self.listener.borrow() {
            l.durable(durable, log_end);
        }
    }

    /// Counts a move back of the log end and tells the listener. Never called with the state
    /// borrowed.
    pub(crate) fn log_end_moved_back(&self) {
        let log_end = {
            let mut st = self.state.borrow_mut();
            st.truncations += 1;
            st.log_end
        };
        if let Some(l) = &*self.listener.borrow() {
            l.truncated(log_end);
        }
    }

    /// The error a caller gets when its write was dropped for lack of space.
    pub(crate) fn no_space_error(&self) -> EngineError {
        EngineError::Io {
            path: self.dir.clone(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        }
    }

    /// Reserves (fallocates) the active segment's file up to at least `need` bytes, so that the
    /// write-behind never needs space the filesystem may not have: an append either has its
    /// bytes reserved before it is accepted, or fails without changing the log.
    async fn reserve(&self, need: u64) -> Result<(), EngineError> {
        let (file, path, base) = {
            let st = self.state.borrow();
            let a = st.active();
            (a.file.clone(), a.path.clone(), a.base)
        };
        let run = need.clamp(PREALLOCATE_AHEAD_MIN_BYTES, PREALLOCATE_AHEAD_BYTES);
        let ahead = (need + run).min(self.config.segment_bytes.max(need));
        let mut got = ahead;
        let mut res = file.pre_allocate(ahead, true).await.map_err(io_err(&path));
        if ahead > need && res.as_ref().is_err_and(|e| e.is_no_space()) {
            // No room for the run ahead: reserve just what this append needs.
            got = need;
            res = file.pre_allocate(need, true).await.map_err(io_err(&path));
        }
        let mut st = self.state.borrow_mut();
        match res {
            Ok(()) => self.note_space_ok(&mut st, false),
            Err(e) if e.is_no_space() => {
                self.note_no_space(&mut st, false, &e);
                return Err(e);
            }
            // A filesystem without fallocate: writes allocate as they go, and one that fails
            // for lack of space is rewound (see `rewind_unwritten`).
            Err(e) => tracing::debug!(error = %e, "pre-allocation failed"),
        }
        if st.active().base == base {
            st.preallocated = st.preallocated.max(got);
        }
        Ok(())
    }

    /// Drops the batches whose write failed for lack of space, if that is still to be done.
    async fn rewind(self: &Rc<Self>) -> Result<(), EngineError> {
        let _permit = self
            .lock
            .acquire_permit(1)
            .await
            .map_err(|_| EngineError::Closed)?;
        if !self.state.borrow().rewind_needed {
            return Ok(());
        }
        crate::truncate::rewind_unwritten(self).await
    }

    pub(crate) fn check(&self, st: &State) -> Result<(), EngineError> {
        if st.closed {
            return Err(EngineError::Closed);
        }
        if let Some(reason) = &st.failed {
            return Err(EngineError::Io {
                path: self.dir.clone(),
                source: std::io::Error::other(reason.clone()),
            });
        }
        Ok(())
    }

    /// Starts the sealed write jobs of the active segment.
    /// Starts the sealed write jobs of the active segment. Never called with the state
    /// borrowed: a spawned task may run before `spawn_local` returns.
    pub(crate) fn start_jobs(self: &Rc<Self>) {
        let (file, jobs) = {
            let mut st = self.state.borrow_mut();
            if st.writer.ready.is_empty() {
                return;
            }
            let jobs: Vec<WriteJob> = st.writer.ready.drain(..).collect();
            (st.active().file.clone(), jobs)
        };
        for job in jobs {
            let inner = self.clone();
            let file = file.clone();
            glommio::spawn_local(async move { inner.run_write(file, job).await }).detach();
        }
    }

    async fn run_write(self: Rc<Self>, file: Rc<DmaFile>, job: WriteJob) {
        if let Some(prev) = job.wait_for {
            self.signal
                .wait_until(|| self.state.borrow().writer.is_done(prev))
                .await;
        }
        let len = job.buf.len();
        let _foreground = crate::foreground::ForegroundIo::begin();
        // Appends reserve their space before they are accepted (`reserve`), so this write is
        // not expected to need any; if it still fails for lack of space (a filesystem without
        // fallocate), the unsynced batches are dropped rather than the log failed.
        let buf = Rc::new(job.buf);
        let res = file.write_rc_at(buf.clone(), job.pos).await;
        {
            let mut st = self.state.borrow_mut();
            let res: Result<usize, std::io::Error> = if st.inject_no_space_writes > 0 {
                st.inject_no_space_writes -= 1;
                Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
            } else {
                res.map_err(Into::into)
            };
            match res {
                Ok(n) if n == len => {}
                // O_DIRECT writes come up short when the filesystem runs out of blocks.
                Ok(n) => {
                    let e = format!("short write of {n}/{len} bytes at {}", job.pos);
                    self.note_no_space(&mut st, false, &e);
                    st.rewind_needed = true;
                }
                Err(e) => {
                    if crate::error::is_no_space_io(&e) {
                        self.note_no_space(&mut st, false, &e);
                        st.rewind_needed = true;
                    } else {
                        st.fail(format!("write at {}: {e}", job.pos));
                    }
                }
            }
            st.writer.complete(job.id, Rc::try_unwrap(buf).ok());
            // After a failed write the disk past it is not the data: reads keep being served
            // from memory until the rewind drops those batches.
            let written = st.writer.written_pos;
            while !st.rewind_needed && st.pending.front().is_some_and(|p| p.end_pos <= written) {
                st.pending.pop_front();
            }
        }
        self.signal.notify_all();
    }

    /// Waits until every sealed write of the active segment has completed.
    pub(crate) async fn wait_writes_idle(&self) {
        self.signal
            .wait_until(|| self.state.borrow().writer.idle())
            .await;
    }

    /// One group commit: seals what was appended so far, waits for those writes, fdatasyncs
    /// (with the segments and directory entry a roll left unsynced, concurrently). Caller holds
    /// `lock`.
    async fn sync_once(self: &Rc<Self>) -> Result<(), EngineError> {
        let _foreground = crate::foreground::ForegroundIo::begin();
        let (target_offset, target_base, target_pos, file, path, sealed, dir_mark) = {
            let mut st = self.state.borrow_mut();
            self.check(&st)?;
            st.bytes_since_sync = 0;
            st.writer.seal_partial();
            let sealed: Vec<_> = st
                .sealed
                .iter()
                .filter(|s| !s.synced)
                .map(|s| (s.base, s.file.clone(), s.path.clone()))
                .collect();
            let dir_mark = (st.dir_synced < st.dir_changes).then_some(st.dir_changes);
            let a = st.active();
            (
                st.log_end,
                a.base,
                a.size,
                a.file.clone(),
                a.path.clone(),
                sealed,
                dir_mark,
            )
        };
        self.start_jobs();
        self.signal
            .wait_until(|| {
                let st = self.state.borrow();
                st.writer.written_pos >= target_pos || st.failed.is_some() || st.rewind_needed
            })
            .await;
        self.check(&self.state.borrow())?;
        if self.state.borrow().rewind_needed {
            crate::truncate::rewind_unwritten(self).await?;
            return Err(self.no_space_error());
        }
        let started = Instant::now();
        let (synced, sealed_synced) =
            futures_lite::future::zip(file.fdatasync(), self.sync_sealed(sealed, dir_mark)).await;
        crate::observe::fsync_done(started.elapsed());
        if let Err(e) = synced {
            let e = io_err(&path)(e);
            if e.is_no_space() {
                // The writes were direct (no dirty pages to lose), but what they need to be
                // durable (extent conversion) could not be committed: drop what is not known
                // durable, as if it had never been written, and let later appends retry.
                {
                    let mut st = self.state.borrow_mut();
                    self.note_no_space(&mut st, false, &e);
                    st.rewind_needed = true;
                }
                crate::truncate::rewind_unwritten(self).await?;
                return Err(e);
            }
            // A failed fdatasync may have dropped dirty pages: the log cannot be trusted anymore.
            self.state.borrow_mut().fail(format!("fdatasync: {e}"));
            return Err(e);
        }
        if let Err(e) = sealed_synced {
            let mut st = self.state.borrow_mut();
            if e.is_no_space() {
                // Their data was written in full: only the sync failed, and it is retried by
                // the next group commit; meanwhile nothing past them becomes durable.
                self.note_no_space(&mut st, false, &e);
                st.space_failures += 1;
                return Err(e);
            }
            st.fail(format!("fdatasync after a roll: {e}"));
            return Err(e);
        }
        let checkpoint_due = {
            let mut st = self.state.borrow_mut();
            assert!(target_offset <= st.log_end);
            if target_offset >= st.durable {
                st.durable = target_offset;
                st.durable_base = target_base;
                st.durable_pos = target_pos;
            }
            // After a roll the recovery point moves to the new segment at once, so recovery
            // never scans a whole old segment again. Asked once per interval (within the
            // thread's budget, see `checkpoint_budget`) or segment: the write takes a while,
            // and group commits meanwhile must not queue another.
            let rolled = st.checkpoint.segment_base != st.durable_base
                && st.ckpt_asked_base != st.durable_base;
            let due = rolled
                || crate::checkpoint_budget::timed_checkpoint_due(
                    st.last_checkpoint,
                    Duration::from_millis(CHECKPOINT_INTERVAL_MS),
                    crate::checkpoint_budget::deadline_for(self.log_id),
                    Instant::now(),
                );
            if due {
                st.last_checkpoint = Instant::now();
                st.ckpt_asked_base = st.durable_base;
            }
            due
        };
        self.durable_advanced();
        self.signal.notify_all();
        if checkpoint_due {
            self.request_checkpoint();
        }
        Ok(())
    }

    pub(crate) fn index_snapshot(&self) -> crate::segment::IndexFiles {
        self.state.borrow().active().index_files()
    }

    /// Writes the recovery point at (offset, position in the active segment).
    pub(crate) async fn write_checkpoint_at(
        &self,
        offset: u64,
        position: u64,
    ) -> Result<(), EngineError> {
        let base = self.state.borrow().active().base;
        self.write_checkpoint(offset, base, position).await
    }

    pub(crate) async fn write_checkpoint(
        &self,
        offset: u64,
        segment_base: u64,
        position: u64,
    ) -> Result<(), EngineError> {
        let rp = {
            let st = self.state.borrow();
            RecoveryPoint {
                offset,
                segment_base,
                position,
                epochs: st
                    .epochs
                    .iter()
                    .copied()
                    .filter(|(_, s)| *s < offset)
                    .collect(),
            }
        };
        {
            let mut st = self.state.borrow_mut();
            if st.inject_no_space_checkpoints > 0 {
                st.inject_no_space_checkpoints -= 1;
                return Err(self.no_space_error());
            }
        }
        checkpoint::write(&self.dir, &rp).await?;
        let mut st = self.state.borrow_mut();
        st.checkpoint = rp;
        st.last_checkpoint = Instant::now();
        Ok(())
    }

    pub(crate) async fn sync_to(self: &Rc<Self>, end_offset: u64) -> Result<(), EngineError> {
        let failures = self.state.borrow().space_failures;
        loop {
            let spawn = {
                let mut st = self.state.borrow_mut();
                self.check(&st)?;
                // A commit failed for lack of space since this caller's batches were appended,
                // or they were dropped before it came: unless they are durable, they may be
                // gone (and their offsets given to others since).
                let dropped = end_offset > st.log_end && end_offset <= st.dropped_end;
                if st.space_failures != failures || dropped {
                    return if st.durable >= end_offset && !dropped {
                        Ok(())
                    } else {
                        Err(self.no_space_error())
                    };
                }
                if st.durable >= end_offset.min(st.log_end) {
                    return Ok(());
                }
                request_sync(&mut st)
            };
            if spawn {
                self.spawn_flusher();
            }
            self.signal
                .wait_until(|| {
                    let st = self.state.borrow();
                    st.durable >= end_offset.min(st.log_end)
                        || st.failed.is_some()
                        || st.closed
                        || !st.flusher_running
                        || st.space_failures != failures
                })
                .await;
        }
    }

    /// The group-commit loop: while commits are requested, run one covering everything
    /// appended so far. Every caller of `sync_to` waits on it, so one fdatasync serves all the
    /// appends made while the previous one was in flight.
    fn spawn_flusher(self: &Rc<Self>) {
        let inner = self.clone();
        glommio::spawn_local(async move {
            loop {
                {
                    let mut st = inner.state.borrow_mut();
                    if !st.sync_requested || st.closed || st.failed.is_some() {
                        st.flusher_running = false;
                        break;
                    }
                    st.sync_requested = false;
                }
                inner
                    .signal
                    .wait_until(|| {
                        let st = inner.state.borrow();
                        !st.syncs_paused || st.closed || st.failed.is_some()
                    })
                    .await;
                let result = match inner.lock.acquire_permit(1).await {
                    Ok(_permit) => inner.sync_once().await,
                    Err(_) => Err(EngineError::Closed),
                };
                if let Err(e) = result {
                    tracing::debug!(error = %e, "group commit failed");
                    inner.state.borrow_mut().flusher_running = false;
                    break;
                }
            }
            inner.signal.notify_all();
        })
        .detach();
    }

    /// Seals the active segment and starts a new one at the log end. `expected_active` guards
    /// against rolling twice when several appenders decide to roll at once.
    async fn roll(self: &Rc<Self>, expected_active: u64) -> Result<(), EngineError> {
        let _permit = self
            .lock
            .acquire_permit(1)
            .await
            .map_err(|_| EngineError::Closed)?;
        {
            let st = self.state.borrow();
            self.check(&st)?;
            if st.active().base != expected_active {
                return Ok(());
            }
        }
        // Rolls may not outrun the checkpointer without bound: each unfinished segment is one
        // more that recovery scans whole and one more entry kept in memory.
        if self.state.borrow().sealed.len() >= MAX_UNFINISHED_SEALED_SEGMENTS {
            self.request_checkpoint();
            self.signal
                .wait_until(|| {
                    let st = self.state.borrow();
                    st.sealed.len() < MAX_UNFINISHED_SEALED_SEGMENTS
                        || st.failed.is_some()
                        || st.closed
                        || st.ckpt_paused
                        || st.background_short_of_space
                })
                .await;
            let st = self.state.borrow();
            if st.sealed.len() >= MAX_UNFINISHED_SEALED_SEGMENTS && st.background_short_of_space {
                // The rolled segments cannot be finished until space returns: keep appending
                // to nothing rather than pile up more of them.
                return Err(self.no_space_error());
            }
        }
        {
            let mut st = self.state.borrow_mut();
            self.check(&st)?;
            st.busy = true;
        }
        let rolled = self.roll_locked().await;
        self.state.borrow_mut().busy = false;
        self.signal.notify_all();
        rolled?;
        // Trimming the old segment, its index files and the recovery point happen in the
        // background (see checkpointer.rs): neither appends nor group commits wait for them.
        self.request_checkpoint();
        Ok(())
    }

    /// Seals the active segment and makes a new one active; returns the new segment's base.
    /// Appends wait meanwhile, so this does only what the switch needs: the old segment's last
    /// writes and the new file. Its sync is left to the next group commit, the rest to the
    /// checkpointer.
    async fn roll_locked(self: &Rc<Self>) -> Result<u64, EngineError> {
        let started = Instant::now();
        {
            let mut st = self.state.borrow_mut();
            st.writer.seal_partial();
        }
        self.start_jobs();
        self.wait_writes_idle().await;
        let writes_done = started.elapsed();
        let base = {
            let st = self.state.borrow();
            self.check(&st)?;
            st.log_end
        };
        let new_path = segment::log_path(&self.dir, base);
        let new_file = segment::open_file(&new_path).await?;
        {
            let mut st = self.state.borrow_mut();
            let (old_base, file, path, size) = {
                let a = st.active();
                (a.base, a.file.clone(), a.path.clone(), a.size)
            };
            assert!(base > old_base, "a roll leaves a non-empty segment");
            let synced = st.durable >= base;
            st.sealed.push(Sealed {
                base: old_base,
                file,
                path,
                size,
                synced,
            });
            st.dir_changes += 1;
            st.pending.clear();
            st.writer = Writer::new(0, &[]);
            st.preallocated = 0;
            st.segments
                .insert(base, Segment::new(base, new_file, new_path));
        }
        tracing::debug!(dir = ?self.dir, base, ?writes_done, took = ?started.elapsed(), "rolled segment");
        Ok(base)
    }
}

impl PartitionLog {
    /// Opens (creating if missing) the log in `dir` and recovers it.
    pub async fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Self, EngineError> {
        crate::recovery::open(dir.as_ref(), config).await
    }

    /// Appends one verified RecordBatch v2, stamping base offset and leader epoch into it in
    /// place. Returns once the batch is readable; durability is awaited separately with
    /// [`Self::sync_to`].
    pub async fn append(
        &self,
        batch: VerifiedBatch,
        leader_epoch: i32,
    ) -> Result<AppendInfo, EngineError> {
        self.append_placed(batch, leader_epoch, None).await
    }

    /// [`Self::append`], and with `follower_base` the offset the batch must land at (a
    /// follower's append, see `follower.rs`): checked, with the epoch, in the same step that
    /// assigns the offset, so no other task of the shard can move the end in between.
    pub(crate) async fn append_placed(
        &self,
        batch: VerifiedBatch,
        leader_epoch: i32,
        follower_base: Option<u64>,
    ) -> Result<AppendInfo, EngineError> {
        let inner = &self.inner;
        let (payload_len, last_delta, max_ts, batch_crc) = {
            let h = batch.header();
            (
                batch.len(),
                h.last_offset_delta() as u64,
                h.max_timestamp(),
                batch.crc(),
            )
        };
        let max_batch_bytes = inner.limits.get().max_batch_bytes as usize;
        if payload_len > max_batch_bytes {
            return Err(EngineError::BatchTooLarge {
                size: payload_len,
                limit: max_batch_bytes,
            });
        }
        let flen = frame_len(payload_len) as u64;
        // The caller decided to append (producer checks, a follower's position) against the
        // log as it stood; if the log end moves back meanwhile, that decision is stale.
        let truncations = inner.state.borrow().truncations;
        enum Step {
            Roll(u64),
            Reserve(u64),
            Rewind,
            Wait,
        }
        loop {
            let step = {
                let st = inner.state.borrow();
                inner.check(&st)?;
                if st.rewind_needed && !st.busy {
                    Step::Rewind
                } else if st.busy || st.writer.inflight() >= MAX_INFLIGHT_WRITES {
                    Step::Wait
                } else {
                    let a = st.active();
                    let full = a.size > 0 && a.size + flen > inner.config.segment_bytes;
                    let old = a.size > 0
                        && inner
                            .config
                            .segment_ms
                            .is_some_and(|ms| segment::now_ms() - a.opened_ms >= ms as i64);
                    // Through the page the write-behind pads its last write to.
                    let need = (a.size + flen).next_multiple_of(PAGE_BYTES as u64);
                    if full || old {
                        Step::Roll(a.base)
                    } else if need > st.preallocated {
                        Step::Reserve(need)
                    } else {
                        break;
                    }
                }
            };
            match step {
                Step::Roll(base) => inner.roll(base).await?,
                Step::Reserve(need) => inner.reserve(need).await?,
                Step::Rewind => inner.rewind().await?,
                Step::Wait => {
                    inner
                        .signal
                        .wait_until(|| {
                            let st = inner.state.borrow();
                            st.closed
                                || st.failed.is_some()
                                || (!st.busy
                                    && (st.rewind_needed
                                        || st.writer.inflight() < MAX_INFLIGHT_WRITES))
                        })
                        .await
                }
            }
        }
        // From here to the end nothing awaits: offsets are assigned and the frame is buffered
        // atomically with respect to other tasks of this shard.
        let mut guard = inner.state.borrow_mut();
        let st = &mut *guard;
        if st.truncations != truncations {
            // Only a rewind after a failed write moves the end back under a leader's append.
            return Err(inner.no_space_error());
        }
        if let Some(want) = follower_base {
            check_follower_append(
                st.log_end,
                st.epochs.last().map(|e| e.0),
                want,
                leader_epoch,
            )?;
        }
        let base = st.log_end;
        let last = base + last_delta;
        let batch = batch.stamp_into(base as i64, leader_epoch);
        // The batch CRC was verified and covers everything after the stamped fields: the frame
        // CRC is derived from it rather than computed over the payload again.
        let header = FrameHeader::encode_with_tail_crc(
            base,
            max_ts,
            last_delta as u32,
            leader_epoch,
            &batch,
            CRC_COVERED_START,
            batch_crc,
        );
        st.writer.push(Some(&header), header.len());
        st.writer.push(Some(&batch), batch.len());
        st.writer
            .push(None, flen as usize - FRAME_HEADER_BYTES - batch.len());
        let interval = inner.config.index_interval_bytes;
        let seg = st.active_mut();
        seg.record_frame(base, last, max_ts, flen, interval);
        let end_pos = seg.size;
        assert_eq!(
            end_pos,
            st.writer.end(),
            "segment size matches the write-behind end"
        );
        if st.epochs.last().is_none_or(|(e, _)| leader_epoch > *e) {
            st.epochs.push((leader_epoch, base));
        }
        st.pending.push_back(Pending {
            base,
            last,
            end_pos,
            bytes: batch.clone(),
        });
        cache::insert(inner.log_id, base, last, batch);
        st.log_end = last + 1;
        let want_sync = match inner.config.flush {
            FlushPolicy::Always => true,
            FlushPolicy::Interval { interval_bytes, .. } => {
                st.bytes_since_sync += flen;
                st.bytes_since_sync >= interval_bytes
            }
            FlushPolicy::Never => false,
        };
        let spawn_flusher = want_sync && request_sync(st);
        drop(guard);
        inner.start_jobs();
        if spawn_flusher {
            inner.spawn_flusher();
        }
        Ok(AppendInfo {
            base_offset: base,
            last_offset: last,
            max_timestamp: max_ts,
        })
    }

    /// Resolves once every offset `< end_offset` is durable (group commit: joins the fdatasync in
    /// flight or starts one), whatever the flush policy. Offsets past the log end are not waited
    /// for.
    pub async fn sync_to(&self, end_offset: u64) -> Result<(), EngineError> {
        self.inner.sync_to(end_offset).await
    }

    /// Whole batches from the one containing `offset`, up to `max_bytes` (at least one batch if
    /// any exists at or after `offset`, even if larger than `max_bytes`).
    pub async fn read(&self, offset: u64, max_bytes: usize) -> Result<ReadResult, EngineError> {
        let mut gather = Gather::Batches(Vec::new());
        let (log_start_offset, log_end_offset) =
            self.read_with(offset, max_bytes, &mut gather).await?;
        let Gather::Batches(batches) = gather else {
            unreachable!("gathered as batches")
        };
        Ok(ReadResult {
            batches,
            log_start_offset,
            log_end_offset,
        })
    }

    /// Like [`Self::read`], but the batches come back as one contiguous buffer, as a Fetch reply
    /// carries them: a single batch from the cache is passed through, anything else is copied
    /// once (from the disk read buffer or the cache) into one buffer.
    pub async fn read_joined(
        &self,
        offset: u64,
        max_bytes: usize,
    ) -> Result<JoinedRead, EngineError> {
        let mut gather = Gather::Joined {
            single: None,
            buf: BytesMut::new(),
            batches: 0,
        };
        let (log_start_offset, log_end_offset) =
            self.read_with(offset, max_bytes, &mut gather).await?;
        let Gather::Joined { single, buf, .. } = gather else {
            unreachable!("gathered joined")
        };
        Ok(JoinedRead {
            records: single.unwrap_or_else(|| buf.freeze()),
            log_start_offset,
            log_end_offset,
        })
    }

    async fn read_with(
        &self,
        offset: u64,
        max_bytes: usize,
        out: &mut Gather,
    ) -> Result<(u64, u64), EngineError> {
        let inner = &self.inner;
        {
            let st = inner.state.borrow();
            inner.check(&st)?;
            if offset < st.log_start || offset > st.log_end {
                return Err(EngineError::OffsetOutOfRange {
                    offset,
                    log_start: st.log_start,
                    log_end: st.log_end,
                });
            }
        }
        let mut total = 0usize;
        let mut next = offset;
        loop {
            if !out.is_empty() && total >= max_bytes {
                break;
            }
            let found = {
                let st = inner.state.borrow();
                if next >= st.log_end || next < st.log_start {
                    break;
                }
                find_in_memory(&st, inner.log_id, next)
            };
            if let Some((last, bytes)) = found {
                if !out.is_empty() && total + bytes.len() > max_bytes {
                    break;
                }
                total += bytes.len();
                out.push_bytes(bytes);
                next = last + 1;
                continue;
            }
            let budget = max_bytes.saturating_sub(total);
            let Some((rr, ranges)) = self.read_disk(next, budget, out.is_empty()).await? else {
                break;
            };
            // Whole batches while they fit (the first one always does).
            let mut taken = 0;
            let mut stop = false;
            for &(last, s, e) in &ranges {
                if !(out.is_empty() && taken == 0) && total + (e - s) > max_bytes {
                    stop = true;
                    break;
                }
                total += e - s;
                next = last + 1;
                taken += 1;
            }
            if taken > 0 {
                out.push_ranges(&rr, &ranges[..taken], max_bytes.saturating_sub(total));
            }
            if stop || taken == 0 {
                break;
            }
        }
        let st = inner.state.borrow();
        Ok((st.log_start, st.log_end))
    }

    /// Batches from disk starting with the one containing `offset`, about `budget` bytes worth
    /// (at least one if `need_one`): the read buffer and each batch's (last offset, start, end)
    /// in it; `None` if there is nothing to read.
    async fn read_disk(
        &self,
        offset: u64,
        budget: usize,
        need_one: bool,
    ) -> Result<Option<DiskRead>, EngineError> {
        let generation = self.inner.state.borrow().generation;
        match self.read_disk_once(offset, budget, need_one).await {
            Err(EngineError::Corrupt { .. })
                if generation % 2 == 1 || self.inner.state.borrow().generation != generation =>
            {
                Ok(None)
            }
            other => other,
        }
    }

    async fn read_disk_once(
        &self,
        offset: u64,
        budget: usize,
        need_one: bool,
    ) -> Result<Option<DiskRead>, EngineError> {
        let inner = &self.inner;
        let (file, path, mut pos, limit) = {
            let st = inner.state.borrow();
            let Some(seg) = st.segments.range(..=offset).next_back().map(|(_, s)| s) else {
                return Ok(None);
            };
            if offset >= seg.next_offset {
                return Ok(None);
            }
            let is_active = seg.base == st.active().base;
            let limit = if is_active {
                st.writer.written_pos.min(seg.size)
            } else {
                seg.size
            };
            (
                seg.file.clone(),
                seg.path.clone(),
                seg.index.position_for(offset) as u64,
                limit,
            )
        };
        let cap = max_payload(&inner.config);
        let mut want = budget
            .saturating_add(inner.config.index_interval_bytes as usize + 2 * PAGE_BYTES)
            .min(MAX_READ_BYTES);
        loop {
            if pos >= limit {
                return Ok(None);
            }
            let len = (want as u64).min(limit - pos) as usize;
            let rr = file.read_at(pos, len).await.map_err(io_err(&path))?;
            let mut out_ranges: Vec<(u64, usize, usize)> = Vec::new();
            let mut p = 0usize;
            let mut taken = 0usize;
            let mut retry_at = None;
            while p < rr.len() {
                match decode_frame(&rr[p..], None, cap) {
                    Ok(f) => {
                        let (last, flen) = (f.last_offset(), f.len);
                        if last >= offset {
                            if !out_ranges.is_empty() && taken + f.payload.len() > budget {
                                break;
                            }
                            let start = p + FRAME_HEADER_BYTES;
                            out_ranges.push((last, start, start + f.payload.len()));
                            taken += f.payload.len();
                            if taken >= budget && !need_one {
                                break;
                            }
                            if taken >= budget {
                                break;
                            }
                        }
                        p += flen;
                    }
                    Err(FrameError::Incomplete { need }) => {
                        if out_ranges.is_empty() {
                            if pos + p as u64 + need as u64 > limit {
                                return Err(EngineError::Corrupt {
                                    path,
                                    position: pos + p as u64,
                                    reason: "frame runs past the written data".into(),
                                });
                            }
                            retry_at = Some((pos + p as u64, need));
                        }
                        break;
                    }
                    Err(FrameError::Invalid(reason)) => {
                        if !out_ranges.is_empty() {
                            break;
                        }
                        return Err(EngineError::Corrupt {
                            path,
                            position: pos + p as u64,
                            reason,
                        });
                    }
                }
            }
            if let Some((at, need)) = retry_at {
                pos = at;
                want = need.max(want);
                continue;
            }
            if out_ranges.is_empty() {
                return Ok(None);
            }
            return Ok(Some((rr, out_ranges)));
        }
    }

    /// The limits in force now.
    pub fn limits(&self) -> LiveLimits {
        self.inner.limits.get()
    }

    /// Changes the limits of an open log (a topic config change). Retention applies at the
    /// next `apply_retention`; the batch limit at the next append.
    pub fn set_limits(&self, limits: LiveLimits) -> Result<(), EngineError> {
        let mut config = self.inner.config.clone();
        config.max_batch_bytes = limits.max_batch_bytes;
        config.retention_bytes = limits.retention_bytes;
        config.retention_ms = limits.retention_ms;
        crate::recovery::validate(&config)?;
        self.inner.limits.set(limits);
        Ok(())
    }

    pub fn log_start_offset(&self) -> u64 {
        self.inner.state.borrow().log_start
    }

    /// The next offset to assign.
    pub fn log_end_offset(&self) -> u64 {
        self.inner.state.borrow().log_end
    }

    /// Bytes of the log's segments (what it holds on disk once written; appended batches not
    /// yet written count). A getter: no I/O.
    pub fn size_bytes(&self) -> u64 {
        self.inner
            .state
            .borrow()
            .segments
            .values()
            .map(|s| s.size)
            .sum()
    }

    /// Bytes of the log from `offset` to its end: 0 at or past the log end, every byte below
    /// the log start. Within a segment the count starts at the sparse index point at or before
    /// `offset`, so it may be over by up to `index_interval_bytes`. A getter: no I/O.
    pub fn bytes_from(&self, offset: u64) -> u64 {
        let st = self.inner.state.borrow();
        if offset >= st.log_end {
            return 0;
        }
        let Some((&base, seg)) = st.segments.range(..=offset).next_back() else {
            drop(st);
            return self.size_bytes();
        };
        let later: u64 = st.segments.range(base + 1..).map(|(_, s)| s.size).sum();
        let start = u64::from(seg.index.position_for(offset)).min(seg.size);
        seg.size - start + later
    }

    /// Every offset below this is on disk.
    pub fn durable_offset(&self) -> u64 {
        self.inner.state.borrow().durable
    }

    /// The offset below which the log is checkpointed as durable and valid (recovery scans
    /// from here; corruption below it is reported, never truncated).
    pub fn recovery_point(&self) -> u64 {
        self.inner.state.borrow().checkpoint.offset
    }

    /// Syncs and writes the recovery point at the current log end.
    pub async fn checkpoint(&self) -> Result<(), EngineError> {
        let end = self.log_end_offset();
        self.sync_to(end).await?;
        let _permit = self
            .inner
            .lock
            .acquire_permit(1)
            .await
            .map_err(|_| EngineError::Closed)?;
        let _quiet = self.inner.quiesce_checkpointer().await?;
        self.inner.checkpoint_now().await
    }

    /// How many times the log end has moved back (truncation, or a rewind after a write
    /// failed for lack of space) since the log was opened. State derived from the log's suffix
    /// (producer state) that was built at another count must be rebuilt.
    pub fn truncations(&self) -> u64 {
        self.inner.state.borrow().truncations
    }

    /// Sets who is told when the durable end advances or the log end moves back. One per log
    /// (its owner, the replica); replaces any earlier one.
    pub fn set_listener(&self, listener: Box<dyn crate::LogListener>) {
        *self.inner.listener.borrow_mut() = Some(listener);
    }

    /// Drops the batches whose write failed for lack of space, if a failed write left any: a
    /// caller about to decide on an append (producer checks) sees the log it will append to.
    pub async fn drop_unwritten(&self) -> Result<(), EngineError> {
        if !self.inner.state.borrow().rewind_needed {
            return Ok(());
        }
        self.inner.rewind().await
    }

    /// Holds group commits back while `paused` (appends go on; nothing new becomes durable):
    /// for tests of what is visible before an fdatasync.
    #[doc(hidden)]
    pub fn pause_syncs(&self, paused: bool) {
        self.inner.state.borrow_mut().syncs_paused = paused;
        self.inner.signal.notify_all();
    }

    /// Makes the next `writes` recovery-point writes fail with ENOSPC (for tests of what must
    /// retry them).
    #[doc(hidden)]
    pub fn inject_no_space_checkpoints(&self, writes: u32) {
        self.inner.state.borrow_mut().inject_no_space_checkpoints = writes;
    }

    /// Makes the next `writes` segment writes fail with ENOSPC, as a filesystem without
    /// fallocate does when it fills up: for tests of the rewind after such a write.
    #[doc(hidden)]
    pub fn inject_no_space_writes(&self, writes: u32) {
        self.inner.state.borrow_mut().inject_no_space_writes = writes;
    }

    /// Whether the background checkpointer is writing right now (for tests that must catch it
    /// in the act).
    #[doc(hidden)]
    pub fn background_checkpoint_in_flight(&self) -> bool {
        self.inner.state.borrow().ckpt_in_flight
    }

    /// Whether background work is pending or under way: a recovery-point write, or a rolled
    /// segment not yet trimmed and indexed.
    #[doc(hidden)]
    pub fn background_work_pending(&self) -> bool {
        let st = self.inner.state.borrow();
        st.ckpt_running || st.ckpt_wanted || !st.sealed.is_empty()
    }

    /// Holds background work back (requests stay queued) until called with false: lets a test
    /// crash a log between a roll and the work the roll leaves behind.
    #[doc(hidden)]
    pub fn pause_background_checkpoints(&self, paused: bool) {
        let resume = {
            let mut st = self.inner.state.borrow_mut();
            st.ckpt_paused = paused;
            !paused && (st.ckpt_wanted || !st.sealed.is_empty())
        };
        if resume {
            self.inner.request_checkpoint();
        }
    }

    /// First offset whose record timestamp is `>= timestamp_ms`, with that record's timestamp
    /// (under LogAppendTime every record of a batch has the batch's max timestamp).
    pub async fn offset_for_timestamp(
        &self,
        timestamp_ms: i64,
    ) -> Result<Option<(u64, i64)>, EngineError> {
        let start = {
            let st = self.inner.state.borrow();
            self.inner.check(&st)?;
            let Some(seg) = st
                .segments
                .values()
                .find(|s| s.max_timestamp >= timestamp_ms && s.next_offset > s.base)
            else {
                return Ok(None);
            };
            let pos = seg.index.position_for_timestamp(timestamp_ms);
            seg.index
                .entries
                .iter()
                .find(|e| e.position == pos)
                .map(|e| e.offset)
                .unwrap_or(seg.base)
                .max(st.log_start)
        };
        let mut next = start;
        loop {
            let r = match self.read(next, 1 << 20).await {
                Ok(r) => r,
                Err(EngineError::OffsetOutOfRange { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            if r.batches.is_empty() {
                return Ok(None);
            }
            for b in &r.batches {
                let h = BatchHeader::parse(b)?;
                // At record granularity, as Kafka answers: the batch's max timestamp only says
                // some record of it qualifies (none may: a record-less batch of a cleaned log).
                match crate::records::first_record_at_or_after(b, timestamp_ms) {
                    Ok(Some((offset, ts))) => return Ok(Some((offset as u64, ts))),
                    Ok(None) => {}
                    // A stored batch whose records do not decode (kept since it was
                    // acknowledged) still answers for itself as a whole.
                    Err(e) if h.max_timestamp() >= timestamp_ms => {
                        tracing::debug!(offset = h.base_offset(), error = %e,
                            "time lookup at batch granularity: records do not decode");
                        return Ok(Some((h.base_offset() as u64, h.max_timestamp())));
                    }
                    Err(_) => {}
                }
                next = h.last_offset() as u64 + 1;
            }
        }
    }

    /// Removes every batch at or after `offset`. If `offset` falls inside a batch, that whole
    /// batch goes too (the log end becomes its base offset).
    pub async fn truncate_to(&self, offset: u64) -> Result<(), EngineError> {
        crate::truncate::truncate_to(&self.inner, offset).await
    }

    /// Kafka OffsetsForLeaderEpoch: the largest epoch `<= epoch` in the log and its end offset
    /// (the start of the next higher epoch, or the log end). None if the log has no such epoch.
    pub fn end_offset_for_epoch(&self, epoch: i32) -> Option<(i32, u64)> {
        let st = self.inner.state.borrow();
        let i = st.epochs.partition_point(|(e, _)| *e <= epoch);
        if i == 0 {
            return None;
        }
        let end = st.epochs.get(i).map(|(_, s)| *s).unwrap_or(st.log_end);
        Some((st.epochs[i - 1].0, end))
    }

    /// Deletes whole segments past the size or age limits; returns the new log start offset.
    pub async fn apply_retention(&self, now_ms: i64) -> Result<u64, EngineError> {
        crate::truncate::apply_retention(&self.inner, now_ms).await
    }

    /// Deletes every whole segment that lies entirely below `offset` (never the active one);
    /// returns the new log start offset, which may stay below `offset`. For logs that rewrite
    /// their live data at the end and then drop the prefix (`__consumer_offsets`), and Kafka's
    /// DeleteRecords.
    pub async fn delete_segments_below(&self, offset: u64) -> Result<u64, EngineError> {
        crate::truncate::delete_segments_below(&self.inner, offset).await
    }

    /// Flushes everything and writes the recovery point.
    pub async fn close(&self) -> Result<(), EngineError> {
        let inner = &self.inner;
        let _permit = inner
            .lock
            .acquire_permit(1)
            .await
            .map_err(|_| EngineError::Closed)?;
        {
            let mut st = inner.state.borrow_mut();
            if st.closed {
                return Ok(());
            }
            st.busy = true;
        }
        let result = async {
            inner.sync_once().await?;
            inner.wait_writes_idle().await;
            let _quiet = inner.quiesce_checkpointer().await?;
            let (end, pos) = {
                let st = inner.state.borrow();
                inner.check(&st)?;
                (st.log_end, st.active().size)
            };
            inner.index_snapshot().write_index_files(&inner.dir).await?;
            inner.write_checkpoint_at(end, pos).await
        }
        .await;
        {
            let mut st = inner.state.borrow_mut();
            st.closed = true;
            st.busy = false;
            st.pending.clear();
        }
        cache::forget(inner.log_id);
        inner.signal.notify_all();
        result
    }

    /// Closes the log and removes its directory (topic deletion).
    pub async fn delete(&self) -> Result<(), EngineError> {
        let closed = self.close().await;
        if let Err(e) = &closed {
            tracing::warn!(error = %e, "closing a log before deleting it failed");
        }
        std::fs::remove_dir_all(&self.inner.dir).map_err(segment::std_io_err(&self.inner.dir))
    }

    /// The directory this log lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

impl Drop for PartitionLog {
    fn drop(&mut self) {
        cache::forget(self.inner.log_id);
    }
}

/// Asks for a group commit; true if the caller must start the flusher task.
fn request_sync(st: &mut State) -> bool {
    st.sync_requested = true;
    !std::mem::replace(&mut st.flusher_running, true)
}

pub(crate) fn max_payload(config: &LogConfig) -> usize {
    (config.segment_bytes as usize).min(MAX_FRAME_PAYLOAD_BYTES)
}

/// The batch containing `offset` if it is still in memory: not yet written, or cached.
fn find_in_memory(st: &State, log_id: u64, offset: u64) -> Option<(u64, Bytes)> {
    if st.pending.front().is_some_and(|p| p.base <= offset) {
        let i = st.pending.partition_point(|p| p.last < offset);
        if let Some(p) = st.pending.get(i) {
            if p.base <= offset {
                return Some((p.last, p.bytes.clone()));
            }
        }
    }
    cache::get(log_id, offset).map(|(_, last, b)| (last, b))
}
