//! Opening a log: find its segments, trust what lies below the recovery point (rebuilding
//! missing or damaged indexes, and reporting corruption there as [`EngineError::Corrupt`]), scan
//! everything above it frame by frame, and cut the log at the first torn or invalid frame.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::io::DmaFile;
use glommio::sync::Semaphore;

use crate::checkpoint::{self, RecoveryPoint};
use crate::frame::{decode_frame, Frame, FrameError};
use crate::log::{max_payload, Inner, PartitionLog, State, MAX_FRAME_PAYLOAD_BYTES};
use crate::segment::{self, io_err, std_io_err, Segment};
use crate::signal::Signal;
use crate::writer::{Writer, PAGE_BYTES};
use crate::{EngineError, FlushPolicy, LogConfig};

/// Bytes read per step while scanning a segment.
pub const SCAN_CHUNK_BYTES: usize = 4 << 20;
/// Smallest accepted `segment_bytes`.
pub const MIN_SEGMENT_BYTES: u64 = 64 << 10;

static NEXT_LOG_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// How a scan ended.
#[derive(Debug)]
pub(crate) enum ScanStop {
    /// Reached the end bound.
    End,
    /// The visitor asked to stop at this frame.
    Stopped,
    /// The bytes at the returned position are not a valid frame.
    Invalid(String),
}

/// Visits the frames of `file` from `from` (a frame boundary) up to `end`; returns the position
/// where the scan stopped and why. The visitor returns Ok(false) to stop, Err to declare the
/// frame invalid (e.g. a discontinuous offset).
pub(crate) async fn scan(
    file: &DmaFile,
    path: &Path,
    from: u64,
    end: u64,
    max_payload_bytes: usize,
    mut visit: impl FnMut(u64, &Frame<'_>) -> Result<bool, String>,
) -> Result<(u64, ScanStop), EngineError> {
    let mut pos = from;
    let mut want = SCAN_CHUNK_BYTES;
    loop {
        if pos >= end {
            return Ok((pos, ScanStop::End));
        }
        let len = (want as u64).min(end - pos) as usize;
        let rr = file.read_at(pos, len).await.map_err(io_err(path))?;
        if rr.is_empty() {
            return Ok((pos, ScanStop::Invalid("file ends early".into())));
        }
        let mut p = 0usize;
        want = SCAN_CHUNK_BYTES;
        while p < rr.len() {
            match decode_frame(&rr[p..], None, max_payload_bytes) {
                Ok(f) if pos + (p + f.len) as u64 > end => {
                    return Ok((
                        pos + p as u64,
                        ScanStop::Invalid("frame padding runs past the end".into()),
                    ))
                }
                Ok(f) => match visit(pos + p as u64, &f) {
                    Ok(true) => p += f.len,
                    Ok(false) => return Ok((pos + p as u64, ScanStop::Stopped)),
                    Err(reason) => return Ok((pos + p as u64, ScanStop::Invalid(reason))),
                },
                Err(FrameError::Incomplete { need }) => {
                    if pos + p as u64 + need as u64 > end {
                        return Ok((
                            pos + p as u64,
                            ScanStop::Invalid(format!("frame of {need} bytes runs past the end")),
                        ));
                    }
                    if p == 0 {
                        want = need;
                    }
                    break;
                }
                Err(FrameError::Invalid(reason)) => {
                    return Ok((pos + p as u64, ScanStop::Invalid(reason)))
                }
            }
        }
        pos += p as u64;
    }
}

pub(crate) fn validate(config: &LogConfig) -> Result<(), EngineError> {
    let bad = |m: String| Err(EngineError::Config(m));
    if config.segment_bytes < MIN_SEGMENT_BYTES || config.segment_bytes > u32::MAX as u64 {
        return bad(format!(
            "segment_bytes {} outside [{MIN_SEGMENT_BYTES}, {}]",
            config.segment_bytes,
            u32::MAX
        ));
    }
    if (config.max_batch_bytes as usize) < crate::batch::BATCH_HEADER_BYTES
        || config.max_batch_bytes as usize > MAX_FRAME_PAYLOAD_BYTES
        || crate::frame::frame_len(config.max_batch_bytes as usize) as u64 > config.segment_bytes
    {
        return bad(format!(
            "max_batch_bytes {} must be at least one batch header, at most \
             {MAX_FRAME_PAYLOAD_BYTES}, and fit in a segment",
            config.max_batch_bytes
        ));
    }
    if config.index_interval_bytes == 0 {
        return bad("index_interval_bytes must be positive".into());
    }
    if let FlushPolicy::Interval {
        interval_ms,
        interval_bytes,
    } = config.flush
    {
        if interval_ms == 0 || interval_bytes == 0 {
            return bad("flush interval_ms and interval_bytes must be positive".into());
        }
    }
    Ok(())
}

fn corrupt(path: &Path, position: u64, reason: impl Into<String>) -> EngineError {
    EngineError::Corrupt {
        path: path.to_path_buf(),
        position,
        reason: reason.into(),
    }
}

fn remove_segment_files(dir: &Path, base: u64) -> Result<(), EngineError> {
    let path = segment::log_path(dir, base);
    std::fs::remove_file(&path).map_err(std_io_err(&path))?;
    Segment::remove_index_files(dir, base);
    Ok(())
}

pub(crate) async fn open(dir: &Path, config: LogConfig) -> Result<PartitionLog, EngineError> {
    validate(&config)?;
    std::fs::create_dir_all(dir).map_err(std_io_err(dir))?;
    // A cleaner killed in a segment swap left the old segment or a complete new one.
    crate::clean::finish_interrupted_swaps(dir).await?;
    let mut bases = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(std_io_err(dir))? {
        let entry = entry.map_err(std_io_err(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".tmp") {
            std::fs::remove_file(entry.path()).map_err(std_io_err(&entry.path()))?;
        } else if let Some(base) = segment::parse_log_name(name) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    let stored_rp = checkpoint::read(dir)?;
    // Whether opening changed anything the recovery point on disk stands for (see below).
    let mut changed = stored_rp.is_none();
    if bases.is_empty() {
        if let Some(rp) = &stored_rp {
            if rp.offset > 0 {
                return Err(corrupt(
                    &dir.join(checkpoint::RECOVERY_POINT_FILE),
                    0,
                    format!(
                        "no segment files but a recovery point at offset {}",
                        rp.offset
                    ),
                ));
            }
        }
        bases.push(0);
    }
    let first = bases[0];
    let rp = match stored_rp {
        Some(rp) => {
            if !bases.contains(&rp.segment_base) || rp.offset < rp.segment_base {
                return Err(corrupt(
                    &dir.join(checkpoint::RECOVERY_POINT_FILE),
                    0,
                    format!(
                        "recovery point at offset {} names segment {} which is missing",
                        rp.offset, rp.segment_base
                    ),
                ));
            }
            rp
        }
        None => RecoveryPoint {
            offset: first,
            segment_base: first,
            position: 0,
            epochs: Vec::new(),
        },
    };
    let mut epochs: Vec<(i32, u64)> = rp
        .epochs
        .iter()
        .copied()
        .filter(|(_, s)| *s < rp.offset)
        .collect();
    let cap = max_payload(&config);
    let mut segments: BTreeMap<u64, Segment> = BTreeMap::new();
    let mut expected: Option<u64> = None;
    let mut cut = false;
    for &base in &bases {
        let path = segment::log_path(dir, base);
        if cut {
            tracing::warn!(?path, "removing segment after a torn tail");
            remove_segment_files(dir, base)?;
            changed = true;
            continue;
        }
        // Bytes of this segment below the recovery point must be valid.
        let strict_end = match base.cmp(&rp.segment_base) {
            std::cmp::Ordering::Less => u64::MAX,
            std::cmp::Ordering::Equal => rp.position,
            std::cmp::Ordering::Greater => 0,
        };
        if let Some(exp) = expected {
            if exp != base {
                if strict_end > 0 {
                    return Err(corrupt(
                        &path,
                        0,
                        format!("segment base {base} does not follow the previous end {exp}"),
                    ));
                }
                tracing::warn!(?path, "removing a segment that does not continue the log");
                remove_segment_files(dir, base)?;
                cut = true;
                changed = true;
                continue;
            }
        }
        let file = segment::open_file(&path).await?;
        let file_size = file.file_size().await.map_err(io_err(&path))?;
        let mut seg = Segment::new(base, file.clone(), path.clone());
        let loaded = Segment::read_index_files(dir, base)
            .filter(|(_, c)| c.covered_position <= file_size && c.next_offset >= base);
        let start = match loaded {
            Some((idx, cov))
                if (strict_end == u64::MAX && cov.covered_position == file_size)
                    || (strict_end != u64::MAX && cov.covered_position <= strict_end) =>
            {
                seg.bytes_since_index = cov.covered_position
                    - idx.entries.last().map(|e| e.position as u64).unwrap_or(0);
                seg.index = idx;
                seg.size = cov.covered_position;
                seg.next_offset = cov.next_offset;
                seg.max_timestamp = cov.max_timestamp;
                cov.covered_position
            }
            _ => 0,
        };
        let mut boundary_ok = strict_end == u64::MAX
            || strict_end == 0
            || (start == strict_end && seg.next_offset == rp.offset);
        let interval = config.index_interval_bytes;
        let (stop_pos, stop) = scan(&file, &path, start, file_size, cap, |pos, f| {
            if pos != seg.size || f.base_offset() != seg.next_offset {
                return Err(format!(
                    "frame with base offset {} at {pos} where offset {} at {} was expected",
                    f.base_offset(),
                    seg.next_offset,
                    seg.size
                ));
            }
            if f.base_offset() >= rp.offset
                && epochs.last().is_none_or(|(e, _)| f.leader_epoch() > *e)
            {
                epochs.push((f.leader_epoch(), f.base_offset()));
            }
            // A batch stored before full validation existed (or by a broken broker) was
            // acknowledged: it is kept, but named so an operator can act on it.
            if let Err(e) = crate::validate::validate_stored_batch(f.payload, MAX_FRAME_PAYLOAD_BYTES) {
                tracing::warn!(?path, offset = f.base_offset(), error = %e,
                    "stored batch is malformed inside (kept: it was acknowledged); see `spate verify`");
            }
            seg.record_frame(
                f.base_offset(),
                f.last_offset(),
                f.max_timestamp(),
                f.len as u64,
                interval,
            );
            if seg.size == strict_end && seg.next_offset == rp.offset {
                boundary_ok = true;
            }
            Ok(true)
        })
        .await?;
        if let ScanStop::Invalid(reason) = stop {
            if stop_pos < strict_end {
                return Err(corrupt(&path, stop_pos, reason));
            }
            if stop_pos < file_size {
                tracing::debug!(?path, position = stop_pos, %reason, "log ends here");
                file.truncate(stop_pos).await.map_err(io_err(&path))?;
                changed = true;
                // The recovery point written below may name a later segment: this one must
                // end at its data on disk before it does.
                file.fdatasync().await.map_err(io_err(&path))?;
                Segment::remove_index_files(dir, base);
                // A segment rolled away but not yet trimmed (a crash before the checkpointer
                // finished it) ends in pre-allocated zeros; when the next segment starts right
                // at its last offset nothing is missing, and the log goes on there.
                let next = bases.iter().find(|b| **b > base);
                if next.is_some_and(|n| *n != seg.next_offset) {
                    tracing::warn!(?path, position = stop_pos, %reason, "torn segment tail cut");
                    cut = true;
                }
            }
        }
        if !boundary_ok || (strict_end != u64::MAX && seg.size < strict_end) {
            return Err(corrupt(
                &path,
                seg.size,
                format!(
                    "log ends at offset {} (byte {}) below the recovery point at offset {} \
                     (byte {strict_end})",
                    seg.next_offset, seg.size, rp.offset
                ),
            ));
        }
        expected = Some(seg.next_offset);
        segments.insert(base, seg);
    }

    let (active_file, active_path, size) = {
        let a = segments.values().next_back().expect("at least one segment");
        (a.file.clone(), a.path.clone(), a.size)
    };
    let tail_start = size - size % PAGE_BYTES as u64;
    let tail = if size > tail_start {
        let rr = active_file
            .read_at(tail_start, (size - tail_start) as usize)
            .await
            .map_err(io_err(&active_path))?;
        rr.to_vec()
    } else {
        Vec::new()
    };
    if tail.len() as u64 != size - tail_start {
        return Err(corrupt(
            &active_path,
            tail_start,
            "short read of the last page",
        ));
    }
    let log_start = *segments.keys().next().expect("at least one segment");
    let (active_base, log_end) = {
        let a = segments.values().next_back().expect("active");
        (a.base, a.next_offset)
    };
    // A log that ends exactly at its recovery point, with nothing cut or removed, is already
    // as durable as that recovery point says (it was written after the data below it, its
    // segment files and their names were synced): syncing it again and rewriting the same
    // recovery point would cost four disk flushes per partition for nothing, which a broker
    // with thousands of idle partitions pays on every start before it listens.
    let unchanged =
        !changed && log_end == rp.offset && active_base == rp.segment_base && size == rp.position;
    if !unchanged {
        active_file
            .fdatasync()
            .await
            .map_err(io_err(&active_path))?;
        checkpoint::sync_dir(dir).await?;
    }
    epochs.retain(|(_, s)| *s < log_end);
    let state = State {
        segments,
        log_start,
        log_end,
        durable: log_end,
        durable_base: active_base,
        durable_pos: size,
        epochs,
        checkpoint: rp,
        last_checkpoint: Instant::now(),
        sealed: Vec::new(),
        dir_changes: 0,
        dir_synced: 0,
        ckpt_wanted: false,
        ckpt_running: false,
        ckpt_asked_base: active_base,
        ckpt_in_flight: false,
        ckpt_paused: false,
        writer: Writer::new(size, &tail),
        pending: VecDeque::new(),
        failed: None,
        busy: false,
        closed: false,
        sync_requested: false,
        flusher_running: false,
        bytes_since_sync: 0,
        preallocated: size,
        generation: 0,
        rewind_needed: false,
        space_failures: 0,
        dropped_end: 0,
        short_of_space: false,
        background_short_of_space: false,
        inject_no_space_writes: 0,
        truncations: 0,
        syncs_paused: false,
        inject_no_space_checkpoints: 0,
    };
    let inner = Rc::new(Inner {
        dir: dir.to_path_buf(),
        limits: std::cell::Cell::new(crate::log::LiveLimits::of(&config)),
        config,
        log_id: NEXT_LOG_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        state: RefCell::new(state),
        signal: Signal::default(),
        lock: Semaphore::new(1),
        ckpt_lock: Semaphore::new(1),
        listener: RefCell::new(None),
    });
    let written = if unchanged {
        Ok(())
    } else {
        inner.write_checkpoint(log_end, active_base, size).await
    };
    match written {
        Ok(()) => {}
        // A full disk must not keep a partition from opening: the recovery point on disk is
        // an older, lower one (recovery just scans more), and the background retries it.
        Err(e) if e.is_no_space() => {
            tracing::warn!(?dir, error = %e, "no space for the recovery point at open; retrying in the background");
            inner.request_checkpoint();
        }
        Err(e) => return Err(e),
    }
    if let FlushPolicy::Interval { interval_ms, .. } = inner.config.flush {
        let weak = Rc::downgrade(&inner);
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(Duration::from_millis(interval_ms)).await;
                let Some(inner) = weak.upgrade() else { break };
                let end = {
                    let st = inner.state.borrow();
                    if st.closed || st.failed.is_some() {
                        break;
                    }
                    st.log_end
                };
                if let Err(e) = inner.sync_to(end).await {
                    tracing::debug!(error = %e, "interval flush failed");
                }
            }
        })
        .detach();
    }
    tracing::debug!(?dir, log_start, log_end, "opened partition log");
    Ok(PartitionLog { inner })
}
