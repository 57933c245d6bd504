//! Work a roll leaves behind, and the recovery-point writes, done off the append and group-commit
//! path.
//!
//! A roll only seals the old segment's last buffer, waits for its writes and switches to a new
//! file; the old segment stays "sealed but unfinished" (see [`Sealed`]). The next group commit
//! fdatasyncs it (and the directory, for the new file's name) together with the active file,
//! before `durable` moves past it. Trimming its pre-allocated tail, its index files and the
//! recovery point are done by the checkpointer task, which never holds the log's `lock`.
//!
//! Why this is safe:
//! - A recovery point is only computed from durable state (`durable`, `durable_base`,
//!   `durable_pos`), and only after every sealed segment has been trimmed and synced, because
//!   recovery requires segments below the recovery point's segment to end exactly at their data.
//! - Everything that removes data or segments (truncate_to, retention, delete_segments_below,
//!   close) first takes `ckpt_lock` ([`Inner::quiesce_checkpointer`]): that waits for the write in
//!   flight, drops the request not yet started (it may name data about to go), and finishes the
//!   sealed segments; then the operation writes its own recovery point as before. So the file on
//!   disk never names data that is not durable, was truncated, or a deleted segment.
//! - The log cleaner swaps a cleaned closed segment holding `ckpt_lock` alone: that keeps every
//!   remover out until the swap is done, while appends and group commits (which take `lock`
//!   and touch only the active segment) go on through the swap's directory syncs.
//! - A crash before a sealed segment is trimmed leaves its file longer than its data (zeros from
//!   pre-allocation). Recovery scans it up to the first invalid frame and keeps the following
//!   segment when that segment's base continues the offsets exactly (see `recovery.rs`).
//! - A background write that fails for lack of space (ENOSPC, EDQUOT) is retried every
//!   `NO_SPACE_RETRY_MS` and never fails the log: the recovery point on disk stays the older,
//!   lower one (recovery scans a little more), and a sealed segment stays unfinished (rolls stop
//!   once `MAX_UNFINISHED_SEALED_SEGMENTS` wait, so appends then fail instead). Temporary files
//!   of a failed write are removed, so a retry starts from the same free space.
//! - Any other failed background write fails the log, as a failed group commit does: a trim or
//!   fdatasync that fails may have lost dirty pages, and a disk that cannot write a small file
//!   is not one to keep acknowledging writes on. Retrying would hide that.

use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

use glommio::io::DmaFile;
use glommio::sync::Permit;

use crate::log::{Inner, NO_SPACE_RETRY_MS};
use crate::segment::io_err;
use crate::{checkpoint, EngineError};

/// A segment that is no longer active and not yet trimmed to its data length, with index files
/// and a sync that made its whole data durable still to come.
pub(crate) struct Sealed {
    pub base: u64,
    pub file: Rc<DmaFile>,
    pub path: PathBuf,
    /// Its data length (the file may be longer: pre-allocated zeros).
    pub size: u64,
    /// A group commit fdatasynced every byte of its data.
    pub synced: bool,
}

impl Inner {
    /// Asks for a recovery-point write (and the finishing of sealed segments) in the background.
    pub(crate) fn request_checkpoint(self: &Rc<Self>) {
        let spawn = {
            let mut st = self.state.borrow_mut();
            st.ckpt_wanted = true;
            !std::mem::replace(&mut st.ckpt_running, true)
        };
        if !spawn {
            return;
        }
        // A weak handle: a log dropped without close (a crash, in tests) stops its background
        // work at the next step, as a crash would, instead of writing on behind a reopen.
        let weak = Rc::downgrade(self);
        glommio::spawn_local(async move {
            let mut retry_later = false;
            loop {
                if std::mem::take(&mut retry_later) {
                    // Holds neither the log nor its lock while it waits for space.
                    glommio::timer::sleep(std::time::Duration::from_millis(NO_SPACE_RETRY_MS))
                        .await;
                }
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let Ok(_permit) = inner.ckpt_lock.acquire_permit(1).await else {
                    break;
                };
                {
                    let mut st = inner.state.borrow_mut();
                    if !st.ckpt_wanted || st.closed || st.failed.is_some() || st.ckpt_paused {
                        break;
                    }
                    st.ckpt_wanted = false;
                    st.ckpt_in_flight = true;
                }
                let started = Instant::now();
                let result = inner.checkpoint_now().await;
                let mut st = inner.state.borrow_mut();
                st.ckpt_in_flight = false;
                if let Err(e) = result {
                    if e.is_no_space() {
                        inner.note_no_space(&mut st, true, &e);
                        st.ckpt_wanted = true;
                        retry_later = true;
                        drop(st);
                        // A roll waiting for sealed segments to be finished gives up now.
                        inner.signal.notify_all();
                        continue;
                    }
                    st.fail(format!("background recovery-point write: {e}"));
                    break;
                }
                inner.note_space_ok(&mut st, true);
                drop(st);
                tracing::trace!(took = ?started.elapsed(), "background checkpoint");
            }
            if let Some(inner) = weak.upgrade() {
                inner.state.borrow_mut().ckpt_running = false;
                inner.signal.notify_all();
            }
        })
        .detach();
    }

    /// Waits for the background write in flight, cancels the one not yet started and finishes
    /// the sealed segments. While the permit is held no background write starts, so the caller
    /// may remove data and write its own recovery point. Callers take `lock` first.
    pub(crate) async fn quiesce_checkpointer(&self) -> Result<Permit<'_>, EngineError> {
        let permit = self
            .ckpt_lock
            .acquire_permit(1)
            .await
            .map_err(|_| EngineError::Closed)?;
        self.state.borrow_mut().ckpt_wanted = false;
        self.finish_sealed().await?;
        Ok(permit)
    }

    /// Writes the recovery point at the durable end, after the active segment's index files
    /// below it: recovery after a crash then reads only the bytes past the last index point
    /// (at most about one checkpoint interval of writes), not the whole active segment (up to
    /// `segment_bytes`, 1 GiB by default). Caller holds `ckpt_lock`.
    pub(crate) async fn checkpoint_now(&self) -> Result<(), EngineError> {
        self.finish_sealed().await?;
        let (offset, base, pos, index) = {
            let st = self.state.borrow();
            self.check(&st)?;
            let active = st.active();
            let index = (active.base == st.durable_base)
                .then(|| active.index_files_below(st.durable_pos))
                .flatten();
            (st.durable, st.durable_base, st.durable_pos, index)
        };
        // Index files never cover more than the recovery point that follows them: written first,
        // a crash between the two leaves files that cover more than the older recovery point on
        // disk, which recovery ignores (it scans from the segment start then).
        if let Some(index) = index {
            index.write_index_files(&self.dir).await?;
        }
        self.write_checkpoint(offset, base, pos).await
    }

    /// Trims every sealed segment to its data, syncs it and writes its index files; afterwards
    /// everything below the active segment is durable. Caller holds `ckpt_lock`.
    pub(crate) async fn finish_sealed(&self) -> Result<(), EngineError> {
        loop {
            let (base, file, path, size, index, dir_mark) = {
                let st = self.state.borrow();
                self.check(&st)?;
                let Some(s) = st.sealed.first() else {
                    return Ok(());
                };
                let seg = st
                    .segments
                    .get(&s.base)
                    .expect("a sealed segment stays until it is finished");
                assert_eq!(seg.size, s.size, "a sealed segment does not change");
                (
                    s.base,
                    s.file.clone(),
                    s.path.clone(),
                    s.size,
                    seg.index_files(),
                    st.dir_changes,
                )
            };
            let done = async {
                // Sealed segments have their exact data length as file size: recovery below
                // the recovery point relies on it, and the pre-allocated tail is given back.
                file.truncate(size).await.map_err(io_err(&path))?;
                file.fdatasync().await.map_err(io_err(&path))?;
                // Ends with a directory sync, which also makes the next segment's name durable.
                index.write_index_files(&self.dir).await
            }
            .await;
            if let Err(e) = done {
                // Out of space, the segment stays sealed and is finished on a later try: its
                // data was written in full, and what failed (index files, a sync) is redone.
                if !e.is_no_space() {
                    self.state
                        .borrow_mut()
                        .fail(format!("finishing sealed segment {base}: {e}"));
                }
                return Err(e);
            }
            let mut st = self.state.borrow_mut();
            let s = st.sealed.remove(0);
            assert_eq!(s.base, base);
            st.dir_synced = st.dir_synced.max(dir_mark);
            let next = st
                .segments
                .range(base + 1..)
                .next()
                .map(|(b, _)| *b)
                .expect("a sealed segment has a successor");
            // Every offset below the next segment is on disk now, and that segment's name is.
            if st.durable < next {
                st.durable = next;
                st.durable_base = next;
                st.durable_pos = 0;
            }
            drop(st);
            self.durable_advanced();
            self.signal.notify_all();
        }
    }

    /// Fdatasyncs the sealed segments no group commit has synced yet, and the directory if a
    /// segment was created since it was last synced: what a group commit needs besides the
    /// active file before `durable` may move past a roll. Returns the directory mark synced.
    pub(crate) async fn sync_sealed(
        &self,
        files: Vec<(u64, Rc<DmaFile>, PathBuf)>,
        dir_mark: Option<u64>,
    ) -> Result<(), EngineError> {
        for (_, file, path) in &files {
            file.fdatasync().await.map_err(io_err(path))?;
        }
        if let Some(mark) = dir_mark {
            checkpoint::sync_dir(&self.dir).await?;
            let mut st = self.state.borrow_mut();
            st.dir_synced = st.dir_synced.max(mark);
        }
        let mut st = self.state.borrow_mut();
        for (base, _, _) in files {
            if let Some(s) = st.sealed.iter_mut().find(|s| s.base == base) {
                s.synced = true;
            }
        }
        Ok(())
    }
}
