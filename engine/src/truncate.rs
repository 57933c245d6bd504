//! Removing data: truncation of the log's suffix (follower repair) and retention of its prefix.

use std::rc::Rc;
use std::time::Duration;

use crate::log::{max_payload, Inner, NO_SPACE_RETRY_MS, RETENTION_NO_SPACE_ATTEMPTS};
use crate::recovery::{scan, ScanStop};
use crate::segment::{io_err, Segment, NO_TIMESTAMP};
use crate::writer::{Writer, PAGE_BYTES};
use crate::{cache, checkpoint, EngineError};

pub(crate) async fn truncate_to(inner: &Rc<Inner>, offset: u64) -> Result<(), EngineError> {
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
        if offset == st.log_end {
            return Ok(());
        }
    }
    let _permit = inner
        .lock
        .acquire_permit(1)
        .await
        .map_err(|_| EngineError::Closed)?;
    {
        let mut st = inner.state.borrow_mut();
        st.busy = true;
        st.generation += 1;
    }
    let result = async {
        let _quiet = inner.quiesce_checkpointer().await?;
        truncate_locked(inner, offset).await
    }
    .await;
    {
        let mut st = inner.state.borrow_mut();
        st.busy = false;
        st.generation += 1;
    }
    inner.signal.notify_all();
    result
}

async fn truncate_locked(inner: &Rc<Inner>, offset: u64) -> Result<(), EngineError> {
    inner.state.borrow_mut().writer.seal_partial();
    inner.start_jobs();
    inner.wait_writes_idle().await;
    let (seg_base, file, path, from_pos, mut max_ts, size) = {
        let st = inner.state.borrow();
        inner.check(&st)?;
        if offset >= st.log_end {
            return Ok(());
        }
        let seg = st
            .segments
            .range(..=offset)
            .next_back()
            .map(|(_, s)| s)
            .expect("offset >= log start lies in a segment");
        let pos = seg.index.position_for(offset);
        let ts = seg
            .index
            .entries
            .iter()
            .find(|e| e.position == pos)
            .map(|e| e.max_timestamp_before)
            .unwrap_or(NO_TIMESTAMP);
        (
            seg.base,
            seg.file.clone(),
            seg.path.clone(),
            pos as u64,
            ts,
            seg.size,
        )
    };
    let mut new_end = None;
    let (cut_pos, stop) = scan(
        &file,
        &path,
        from_pos,
        size,
        max_payload(&inner.config),
        |_, f| {
            if f.last_offset() >= offset {
                new_end = Some(f.base_offset());
                return Ok(false);
            }
            max_ts = max_ts.max(f.max_timestamp());
            Ok(true)
        },
    )
    .await?;
    let new_end = match (stop, new_end) {
        (ScanStop::Stopped, Some(e)) => e,
        (ScanStop::Invalid(reason), _) => {
            return Err(EngineError::Corrupt {
                path,
                position: cut_pos,
                reason,
            })
        }
        _ => {
            return Err(EngineError::Corrupt {
                path,
                position: cut_pos,
                reason: format!("offset {offset} not found in its segment"),
            })
        }
    };
    // Lower the recovery point before touching any file: a crash in between must never leave
    // a recovery point above the log end.
    if inner.state.borrow().checkpoint.offset > new_end {
        inner.write_checkpoint(new_end, seg_base, cut_pos).await?;
    }
    let later: Vec<u64> = {
        let mut st = inner.state.borrow_mut();
        let later: Vec<u64> = st.segments.range(seg_base + 1..).map(|(b, _)| *b).collect();
        for b in &later {
            st.segments.remove(b);
        }
        later
    };
    for b in later {
        let p = crate::segment::log_path(&inner.dir, b);
        std::fs::remove_file(&p).map_err(crate::segment::std_io_err(&p))?;
        Segment::remove_index_files(&inner.dir, b);
    }
    Segment::remove_index_files(&inner.dir, seg_base);
    file.truncate(cut_pos).await.map_err(io_err(&path))?;
    file.fdatasync().await.map_err(io_err(&path))?;
    checkpoint::sync_dir(&inner.dir).await?;
    reset_active_to(inner, &file, &path, seg_base, cut_pos, new_end, max_ts).await?;
    {
        let mut st = inner.state.borrow_mut();
        // Everything left was synced above (sealed segments were finished before the cut).
        st.durable = new_end;
        st.durable_base = seg_base;
        st.durable_pos = cut_pos;
    }
    inner.log_end_moved_back();
    tracing::debug!(dir = ?inner.dir, new_end, "truncated log");
    inner.write_checkpoint(new_end, seg_base, cut_pos).await
}

/// Makes the active segment (already cut to `cut_pos` on disk) end at `cut_pos` and the log at
/// `new_end` in memory: its index, the write-behind (from the last partial page, read back),
/// epochs, unwritten batches and cached batches past the cut.
async fn reset_active_to(
    inner: &Rc<Inner>,
    file: &glommio::io::DmaFile,
    path: &std::path::Path,
    seg_base: u64,
    cut_pos: u64,
    new_end: u64,
    max_ts: i64,
) -> Result<(), EngineError> {
    let tail_start = cut_pos - cut_pos % PAGE_BYTES as u64;
    let tail = if cut_pos > tail_start {
        file.read_at(tail_start, (cut_pos - tail_start) as usize)
            .await
            .map_err(io_err(path))?
            .to_vec()
    } else {
        Vec::new()
    };
    if tail.len() as u64 != cut_pos - tail_start {
        return Err(EngineError::Corrupt {
            path: path.to_path_buf(),
            position: tail_start,
            reason: "short read of the last page".into(),
        });
    }
    {
        let mut st = inner.state.borrow_mut();
        let seg = st.active_mut();
        assert_eq!(seg.base, seg_base);
        seg.index.truncate_at_position(cut_pos);
        seg.size = cut_pos;
        seg.next_offset = new_end;
        seg.max_timestamp = max_ts;
        seg.bytes_since_index = cut_pos
            - seg
                .index
                .entries
                .last()
                .map(|e| e.position as u64)
                .unwrap_or(0);
        st.writer = Writer::new(cut_pos, &tail);
        st.preallocated = cut_pos;
        st.log_end = new_end;
        st.epochs.retain(|(_, s)| *s < new_end);
        st.pending.clear();
    }
    cache::remove_from(inner.log_id, new_end);
    Ok(())
}

/// After a write or fdatasync of the active segment failed for lack of space: drops every batch
/// of the active segment not known durable, in memory and on disk, so the log ends at its last
/// safely written batch, the callers waiting for the dropped batches fail (`space_failures`)
/// and later appends retry cleanly at that position. Caller holds `lock`.
///
/// The cut is at the durable end (or the active segment's start if none of it is durable yet):
/// everything below was written and synced, so it needs no scan for a valid frame boundary, and
/// no recovery point moves (it never passes the durable end). Batches past the cut that were
/// written fine go too: their acknowledgement waits on the same group commit, which failed.
pub(crate) async fn rewind_unwritten(inner: &Rc<Inner>) -> Result<(), EngineError> {
    {
        let mut st = inner.state.borrow_mut();
        inner.check(&st)?;
        st.busy = true;
        st.generation += 1;
    }
    let result = async {
        // Every write issued must land (or fail) before the file is cut under it.
        inner.start_jobs();
        inner.wait_writes_idle().await;
        let (seg_base, file, path, cut_pos, new_end, from_pos, mut max_ts, old_end) = {
            let st = inner.state.borrow();
            inner.check(&st)?;
            let a = st.active();
            let (new_end, cut_pos) = if st.durable_base == a.base {
                (st.durable, st.durable_pos)
            } else {
                (a.base, 0)
            };
            assert!(
                cut_pos <= a.size && new_end <= st.log_end,
                "a rewind only drops data"
            );
            let pos = a.index.position_for(new_end.max(a.base)) as u64;
            let pos = pos.min(cut_pos);
            let ts = a
                .index
                .entries
                .iter()
                .find(|e| e.position as u64 == pos)
                .map(|e| e.max_timestamp_before)
                .unwrap_or(NO_TIMESTAMP);
            (
                a.base,
                a.file.clone(),
                a.path.clone(),
                cut_pos,
                new_end,
                pos,
                ts,
                st.log_end,
            )
        };
        // The segment's max timestamp over what stays (synced data: a clean scan).
        let (at, stop) = scan(
            &file,
            &path,
            from_pos,
            cut_pos,
            max_payload(&inner.config),
            |_, f| {
                max_ts = max_ts.max(f.max_timestamp());
                Ok(true)
            },
        )
        .await?;
        if let ScanStop::Invalid(reason) = stop {
            return Err(EngineError::Corrupt {
                path,
                position: at,
                reason,
            });
        }
        // Cutting frees space and needs none. The sync makes the cut durable, so a crash can
        // never bring the dropped batches back behind the new ones.
        let cut = async {
            file.truncate(cut_pos).await.map_err(io_err(&path))?;
            file.fdatasync().await.map_err(io_err(&path))
        }
        .await;
        if let Err(e) = cut {
            inner
                .state
                .borrow_mut()
                .fail(format!("cutting unwritten batches: {e}"));
            return Err(e);
        }
        reset_active_to(inner, &file, &path, seg_base, cut_pos, new_end, max_ts).await?;
        {
            let mut st = inner.state.borrow_mut();
            st.dropped_end = st.dropped_end.max(old_end);
        }
        if new_end < old_end {
            inner.log_end_moved_back();
        }
        tracing::warn!(dir = ?inner.dir, from = new_end, to = old_end,
            "dropped batches whose write failed for lack of disk space");
        Ok(())
    }
    .await;
    {
        let mut st = inner.state.borrow_mut();
        st.busy = false;
        st.generation += 1;
        st.space_failures += 1;
        if result.is_ok() {
            st.rewind_needed = false;
        }
    }
    inner.signal.notify_all();
    result
}

pub(crate) async fn apply_retention(inner: &Rc<Inner>, now_ms: i64) -> Result<u64, EngineError> {
    let mut attempt = 1;
    loop {
        match apply_retention_once(inner, now_ms).await {
            // Only the recovery-point write needs space (deleting frees it); the state a failed
            // attempt leaves is the one the next attempt starts from.
            Err(e) if e.is_no_space() && attempt < RETENTION_NO_SPACE_ATTEMPTS => {
                {
                    let mut st = inner.state.borrow_mut();
                    inner.note_no_space(&mut st, true, &e);
                }
                attempt += 1;
                glommio::timer::sleep(Duration::from_millis(NO_SPACE_RETRY_MS)).await;
            }
            Ok(start) => {
                if attempt > 1 {
                    let mut st = inner.state.borrow_mut();
                    inner.note_space_ok(&mut st, true);
                }
                return Ok(start);
            }
            Err(e) => return Err(e),
        }
    }
}

async fn apply_retention_once(inner: &Rc<Inner>, now_ms: i64) -> Result<u64, EngineError> {
    let limits = inner.limits.get();
    let mut total: Option<u64> = None;
    remove_prefix(inner, |segments, seg| {
        let total = total.get_or_insert_with(|| segments.values().map(|s| s.size).sum());
        let by_size = limits
            .retention_bytes
            .is_some_and(|limit| *total - seg.size >= limit);
        let by_age = limits.retention_ms.is_some_and(|ms| {
            seg.max_timestamp != NO_TIMESTAMP
                && now_ms.saturating_sub(seg.max_timestamp) > ms as i64
        });
        if by_size || by_age {
            *total -= seg.size;
        }
        by_size || by_age
    })
    .await
}

pub(crate) async fn delete_segments_below(
    inner: &Rc<Inner>,
    offset: u64,
) -> Result<u64, EngineError> {
    remove_prefix(inner, |_, seg| seg.next_offset <= offset).await
}

/// Deletes the oldest inactive segments for as long as `doomed` says so (it sees segments in
/// offset order and stops at the first it refuses); returns the new log start offset.
async fn remove_prefix(
    inner: &Rc<Inner>,
    mut doomed_fn: impl FnMut(&std::collections::BTreeMap<u64, Segment>, &Segment) -> bool,
) -> Result<u64, EngineError> {
    let _permit = inner
        .lock
        .acquire_permit(1)
        .await
        .map_err(|_| EngineError::Closed)?;
    let _quiet = inner.quiesce_checkpointer().await?;
    let (doomed, new_start) = {
        let st = inner.state.borrow();
        inner.check(&st)?;
        let mut doomed = Vec::new();
        let active = st.active().base;
        for seg in st.segments.values().filter(|s| s.base != active) {
            if !doomed_fn(&st.segments, seg) {
                break;
            }
            doomed.push(seg.base);
        }
        let Some(&last) = doomed.last() else {
            return Ok(st.log_start);
        };
        let new_start = st
            .segments
            .range(last + 1..)
            .next()
            .map(|(b, _)| *b)
            .expect("the active segment remains");
        (doomed, new_start)
    };
    {
        let mut st = inner.state.borrow_mut();
        // Epochs that ended before the new start are gone; the one spanning it starts there.
        let keep_from = st
            .epochs
            .partition_point(|(_, s)| *s <= new_start)
            .saturating_sub(1);
        st.epochs.drain(..keep_from);
        if let Some(first) = st.epochs.first_mut() {
            first.1 = first.1.max(new_start);
        }
        // An emptied log has no epochs: a reopen would find none either (the recovery point
        // keeps only epochs that start below it), and end_offset_for_epoch must not depend on
        // whether the log was reopened.
        if new_start == st.log_end {
            st.epochs.clear();
        }
        st.log_start = new_start;
        st.generation += 1;
    }
    let result = remove_segments(inner, &doomed, new_start).await;
    inner.state.borrow_mut().generation += 1;
    result
}

async fn remove_segments(
    inner: &Rc<Inner>,
    doomed: &[u64],
    new_start: u64,
) -> Result<u64, EngineError> {
    let rp = inner.state.borrow().checkpoint.clone();
    if rp.offset < new_start || doomed.contains(&rp.segment_base) {
        inner.write_checkpoint(new_start, new_start, 0).await?;
    } else {
        inner
            .write_checkpoint(rp.offset, rp.segment_base, rp.position)
            .await?;
    }
    let removed: Vec<Segment> = {
        let mut st = inner.state.borrow_mut();
        doomed
            .iter()
            .filter_map(|b| st.segments.remove(b))
            .collect()
    };
    for seg in removed {
        std::fs::remove_file(&seg.path).map_err(crate::segment::std_io_err(&seg.path))?;
        Segment::remove_index_files(&inner.dir, seg.base);
    }
    checkpoint::sync_dir(&inner.dir).await?;
    cache::remove_below(inner.log_id, new_start);
    tracing::debug!(dir = ?inner.dir, new_start, "retention advanced the log start");
    Ok(new_start)
}
