//! A shard's hard-state store: the epoch and vote of every consensus group the shard hosts, in
//! one file (as Redpanda's kvstore). Groups record a changed hard state in memory
//! ([`HardStateStore::record`]); before a message that depends on it leaves the shard, one
//! write and one fdatasync make every state recorded so far durable
//! ([`HardStateStore::wait_durable`]), through glommio's io_uring, so the shard thread never
//! sits in the flush. Thousands of groups voting in one pass (a topic created, a node
//! restarted) cost one device flush, not one each.
//!
//! The file, `<data dir>/__hard_state/shard-<N>.log`, is a sequence of batches, one per flush,
//! each starting on a [`HARD_STATE_BLOCK_BYTES`] boundary (so a write never shares a sector
//! with acknowledged bytes): magic, version, batch sequence number, record count, records
//! (group id, epoch, kind: no vote / vote / removed, vote), CRC-32C of all of it, zero padding.
//! Replaying the batches in order gives every group's newest state. A crash during a flush
//! tears at most the last batch, whose states were never acted on (the messages that depend
//! on them wait for the fdatasync): the batch fails its checksum and the states before it
//! stand. A damaged batch followed by a valid one is not a torn write but a damaged file,
//! and the store refuses to open rather than forget votes. When the file grows past twice
//! its live size (plus [`COMPACT_SLACK_BYTES`]) the next flush rewrites it whole instead
//! (temp file, fdatasync, rename, directory fsync), and so does opening a file with a torn
//! tail, so nothing is ever appended after garbage.
//!
//! The bookkeeping ([`Book`]) and the codec are plain functions over bytes and maps; only
//! [`HardStateStore`] does I/O.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::{BufferedFile, OpenOptions};

use crate::shard::Signal;
use crate::types::{Epoch, GroupId, HardState};

/// The directory under the data dir holding the shards' hard-state files.
pub const HARD_STATE_DIR: &str = "__hard_state";
/// Groups one shard's store holds. A shard hosts at most `--max-partitions-per-shard`
/// (4,000 by default) groups; this leaves room for a raised limit. A record past it fails the
/// group rather than growing the file and the memory without bound.
pub const MAX_HARD_STATE_ENTRIES: usize = 262_144;
/// Each flush's batch starts on a boundary of this many bytes, so that writing it never
/// rewrites a sector holding states already acknowledged.
pub const HARD_STATE_BLOCK_BYTES: usize = 4096;
/// Bytes the file may have beyond twice its live size before a flush rewrites it whole: a
/// store of a few groups is not rewritten on every flush.
pub const COMPACT_SLACK_BYTES: u64 = 1 << 20;
/// The largest file opened. Compaction keeps it below 2 x (live size) + the slack + one batch,
/// about 26 MiB at [`MAX_HARD_STATE_ENTRIES`]; anything larger is not this store's.
pub const MAX_HARD_STATE_FILE_BYTES: u64 = 64 << 20;
/// Flush rounds one wait may take part in: a flush under way when it starts (which may not
/// cover its state) and one started after (which does) suffice; more is a bug.
const MAX_FLUSH_ROUNDS: usize = 4;
/// Write calls one buffer may take (a short write is retried with the rest).
const MAX_WRITE_CALLS: usize = 16;

const MAGIC: &[u8; 4] = b"SPHK";
const VERSION: u8 = 1;
/// magic, version, 3 reserved bytes, batch sequence number, record count.
const HEADER_BYTES: usize = 4 + 1 + 3 + 8 + 4;
/// group id, epoch, kind, 3 reserved bytes, vote.
const RECORD_BYTES: usize = 8 + 4 + 1 + 3 + 8;
const CRC_BYTES: usize = 4;
/// A batch holds each group at most once; a flush's batch holds the groups changed and those
/// removed since the last one, so at most every entry and as many removals.
const MAX_BATCH_RECORDS: usize = 2 * MAX_HARD_STATE_ENTRIES;

const KIND_NO_VOTE: u8 = 0;
const KIND_VOTE: u8 = 1;
const KIND_REMOVED: u8 = 2;

/// What one record says of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Set(HardState),
    Removed,
}

fn padded(len: usize) -> usize {
    len.div_ceil(HARD_STATE_BLOCK_BYTES) * HARD_STATE_BLOCK_BYTES
}

/// The bytes of batch `seq` holding `records`, padded to a block.
pub fn encode_batch(seq: u64, records: &[(GroupId, Change)]) -> Vec<u8> {
    assert!(records.len() <= MAX_BATCH_RECORDS, "batch over its bound");
    let len = HEADER_BYTES + RECORD_BYTES * records.len() + CRC_BYTES;
    let mut b = Vec::with_capacity(padded(len));
    b.extend_from_slice(MAGIC);
    b.push(VERSION);
    b.extend_from_slice(&[0; 3]);
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(&(records.len() as u32).to_be_bytes());
    for &(group, change) in records {
        let (epoch, kind, vote) = match change {
            Change::Set(h) => match h.voted_for {
                Some(v) => (h.epoch, KIND_VOTE, v),
                None => (h.epoch, KIND_NO_VOTE, 0),
            },
            Change::Removed => (0, KIND_REMOVED, 0),
        };
        b.extend_from_slice(&group.to_be_bytes());
        b.extend_from_slice(&epoch.to_be_bytes());
        b.push(kind);
        b.extend_from_slice(&[0; 3]);
        b.extend_from_slice(&vote.to_be_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_be_bytes());
    b.resize(padded(len), 0);
    b
}

/// A batch decoded from the start of `b`: its sequence number, records, and the bytes it takes
/// with its padding (fewer if the file ends first).
pub struct DecodedBatch {
    pub seq: u64,
    pub records: Vec<(GroupId, Change)>,
    pub bytes: usize,
}

/// The batch at the start of `b`, or why there is none (a torn write, zeros, damage).
pub fn decode_batch(b: &[u8]) -> Result<DecodedBatch, String> {
    if b.len() < HEADER_BYTES + CRC_BYTES {
        return Err(format!("{} bytes, less than a batch", b.len()));
    }
    if &b[0..4] != MAGIC || b[4] != VERSION || b[5..8] != [0; 3] {
        return Err("not a hard-state batch of this version".into());
    }
    let seq = u64::from_be_bytes(b[8..16].try_into().expect("8 bytes"));
    let count = u32::from_be_bytes(b[16..20].try_into().expect("4 bytes")) as usize;
    if count > MAX_BATCH_RECORDS {
        return Err(format!(
            "{count} records, over the bound of {MAX_BATCH_RECORDS}"
        ));
    }
    let len = HEADER_BYTES + RECORD_BYTES * count + CRC_BYTES;
    if b.len() < len {
        return Err(format!("{count} records in {} bytes", b.len()));
    }
    let crc = u32::from_be_bytes(b[len - CRC_BYTES..len].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&b[..len - CRC_BYTES]) {
        return Err("checksum mismatch".into());
    }
    let mut records = Vec::with_capacity(count);
    for r in b[HEADER_BYTES..len - CRC_BYTES].chunks_exact(RECORD_BYTES) {
        let group = u64::from_be_bytes(r[0..8].try_into().expect("8 bytes"));
        let epoch = Epoch::from_be_bytes(r[8..12].try_into().expect("4 bytes"));
        let vote = u64::from_be_bytes(r[16..24].try_into().expect("8 bytes"));
        if r[13..16] != [0; 3] {
            return Err(format!("group {group}: reserved bytes set"));
        }
        let change = match r[12] {
            KIND_NO_VOTE => Change::Set(HardState {
                epoch,
                voted_for: None,
            }),
            KIND_VOTE => Change::Set(HardState {
                epoch,
                voted_for: Some(vote),
            }),
            KIND_REMOVED => Change::Removed,
            k => return Err(format!("group {group}: unknown record kind {k}")),
        };
        records.push((group, change));
    }
    Ok(DecodedBatch {
        seq,
        records,
        bytes: padded(len).min(b.len()),
    })
}

/// What a store file holds.
#[derive(Debug, Default)]
pub struct Replayed {
    pub entries: HashMap<GroupId, HardState>,
    /// Bytes of whole batches from the start; the rest (if any) is a torn last write.
    pub valid_bytes: u64,
    /// Batches read (the next one's sequence number).
    pub batches: u64,
    /// The file does not end cleanly after its last whole batch (a flush was torn): it must
    /// be rewritten before anything is appended.
    pub torn: bool,
}

/// Replays a store file's bytes. A bad batch is a torn last write (its states were never
/// acted on) unless a valid batch follows it: then the file is damaged, an error.
pub fn replay(bytes: &[u8]) -> Result<Replayed, String> {
    let mut out = Replayed::default();
    let mut at = 0usize;
    while at < bytes.len() {
        let bad = match decode_batch(&bytes[at..]) {
            Ok(b) if b.seq == out.batches => {
                for (group, change) in b.records {
                    match change {
                        Change::Set(h) => {
                            out.entries.insert(group, h);
                        }
                        Change::Removed => {
                            out.entries.remove(&group);
                        }
                    }
                }
                if out.entries.len() > MAX_HARD_STATE_ENTRIES {
                    return Err(format!(
                        "more than {MAX_HARD_STATE_ENTRIES} groups at byte {at}"
                    ));
                }
                at += b.bytes;
                out.batches += 1;
                if b.bytes % HARD_STATE_BLOCK_BYTES != 0 {
                    // The file ends inside the batch's padding (a flush torn after its
                    // records): the batch counts, but the next one must not go here.
                    out.torn = true;
                }
                continue;
            }
            Ok(b) => format!("batch {} where {} was expected", b.seq, out.batches),
            Err(e) => e,
        };
        // Whatever follows a torn write was never written: no batch may start there.
        let mut later = at + HARD_STATE_BLOCK_BYTES;
        while later < bytes.len() {
            if let Ok(b) = decode_batch(&bytes[later..]) {
                if b.seq >= out.batches {
                    return Err(format!(
                        "damaged batch at byte {at} ({bad}) followed by batch {} at byte {later}",
                        b.seq
                    ));
                }
            }
            later += HARD_STATE_BLOCK_BYTES;
        }
        out.torn = true;
        break;
    }
    out.valid_bytes = at as u64;
    Ok(out)
}

/// Orders hard states as consensus produces them: the epoch never goes back, and within an
/// epoch the vote is cast at most once.
pub fn hard_state_order(h: &HardState) -> (Epoch, bool) {
    (h.epoch, h.voted_for.is_some())
}

struct Entry {
    hard: HardState,
    /// The record sequence number that set it (0: read from the file at open).
    seq: u64,
}

/// The store's memory: every group's newest state and what the file lacks. No I/O.
#[derive(Default)]
pub struct Book {
    entries: HashMap<GroupId, Entry>,
    /// Groups set or removed since the last flush began.
    dirty: BTreeSet<GroupId>,
    /// The sequence number of the newest record, and of the newest one durable.
    recorded: u64,
    durable: u64,
}

impl Book {
    fn from_entries(entries: HashMap<GroupId, HardState>) -> Book {
        Book {
            entries: entries
                .into_iter()
                .map(|(g, hard)| (g, Entry { hard, seq: 0 }))
                .collect(),
            ..Book::default()
        }
    }

    pub fn get(&self, group: GroupId) -> Option<HardState> {
        self.entries.get(&group).map(|e| e.hard)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records `hard` for `group`; returns the sequence number that must be durable before
    /// anything revealing it is sent.
    pub fn record(&mut self, group: GroupId, hard: HardState) -> Result<u64, String> {
        match self.entries.get(&group) {
            Some(e) if e.hard == hard => return Ok(e.seq),
            Some(e) => debug_assert!(
                hard_state_order(&hard) > hard_state_order(&e.hard),
                "hard state of group {group} went back: {:?} -> {hard:?}",
                e.hard
            ),
            None if self.entries.len() >= MAX_HARD_STATE_ENTRIES => {
                return Err(format!(
                    "the shard's hard-state store holds {MAX_HARD_STATE_ENTRIES} groups already"
                ));
            }
            None => {}
        }
        self.recorded += 1;
        let seq = self.recorded;
        self.entries.insert(group, Entry { hard, seq });
        self.dirty.insert(group);
        Ok(seq)
    }

    /// Forgets `group` (its partition is gone from this node).
    pub fn remove(&mut self, group: GroupId) {
        if self.entries.remove(&group).is_some() {
            self.recorded += 1;
            self.dirty.insert(group);
        }
    }

    pub fn is_durable(&self, seq: u64) -> bool {
        self.durable >= seq
    }

    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// The records a flush appends (the groups changed since the last) and the sequence
    /// number durable once they are.
    fn take_dirty(&mut self) -> (u64, Vec<(GroupId, Change)>) {
        let records = std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|g| (g, self.change_of(g)))
            .collect();
        (self.recorded, records)
    }

    /// Every live entry, for a rewrite of the whole file.
    fn take_all(&mut self) -> (u64, Vec<(GroupId, Change)>) {
        self.dirty.clear();
        let mut records: Vec<_> = self
            .entries
            .iter()
            .map(|(&g, e)| (g, Change::Set(e.hard)))
            .collect();
        records.sort_unstable_by_key(|r| r.0);
        (self.recorded, records)
    }

    fn change_of(&self, group: GroupId) -> Change {
        self.entries
            .get(&group)
            .map_or(Change::Removed, |e| Change::Set(e.hard))
    }

    fn flushed(&mut self, seq: u64) {
        debug_assert!(seq <= self.recorded);
        self.durable = self.durable.max(seq);
    }

    /// Whether appending `records` more to a file of `file_bytes` should rewrite it instead.
    fn should_compact(&self, file_bytes: u64, records: usize) -> bool {
        let live = padded(HEADER_BYTES + RECORD_BYTES * self.entries.len() + CRC_BYTES) as u64;
        let batch = padded(HEADER_BYTES + RECORD_BYTES * records + CRC_BYTES) as u64;
        file_bytes + batch > 2 * live + COMPACT_SLACK_BYTES
    }
}

/// Counters of a store's writes (for tests and logs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Flushes (each one write and one fdatasync, or a rewrite).
    pub flushes: u64,
    /// Flushes that rewrote the whole file.
    pub rewrites: u64,
    pub records_written: u64,
}

/// The open file and where the next batch goes.
struct FileState {
    file: Option<Rc<BufferedFile>>,
    bytes: u64,
    next_batch: u64,
}

/// One shard's hard-state store (see the module docs). Lives on its shard; not `Send`.
pub struct HardStateStore {
    dir: PathBuf,
    path: PathBuf,
    book: RefCell<Book>,
    file: RefCell<FileState>,
    flushing: Cell<bool>,
    /// Set by a failed write: the file's state is unknown, nothing more is made durable.
    failed: RefCell<Option<String>>,
    /// Notified when a flush ends.
    flushed: Signal,
    /// Old per-partition hard-state files to remove once the store holds their state durably.
    unlink_after: RefCell<Vec<(u64, PathBuf)>>,
    stats: Cell<StoreStats>,
}

/// Where shard `shard`'s store lives under `data_dir`.
pub fn hard_state_store_path(data_dir: &Path, shard: usize) -> PathBuf {
    data_dir
        .join(HARD_STATE_DIR)
        .join(format!("shard-{shard}.log"))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".tmp");
    PathBuf::from(p)
}

/// Clears a store's flushing flag however its flush ends (also if the waiting future is
/// dropped), and wakes the other waiters.
struct FlushGuard<'a>(&'a HardStateStore);

impl Drop for FlushGuard<'_> {
    fn drop(&mut self) {
        self.0.flushing.set(false);
        self.0.flushed.notify();
    }
}

impl HardStateStore {
    /// Opens the store at `path` (a missing file is an empty store), replaying its batches. A
    /// file with a torn tail is rewritten before anything is appended to it. Runs on the
    /// shard's executor.
    pub async fn open(path: &Path) -> Result<Rc<HardStateStore>, String> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        // A rewrite the process did not finish: the file it was to replace is whole.
        match std::fs::remove_file(tmp_path(path)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("removing {}: {e}", tmp_path(path).display()))
            }
            _ => {}
        }
        let bytes = read_file(path).await?;
        let replayed = match &bytes {
            Some(b) => replay(b)?,
            None => Replayed::default(),
        };
        let store = Rc::new(HardStateStore {
            dir,
            path: path.to_path_buf(),
            book: RefCell::new(Book::from_entries(replayed.entries)),
            file: RefCell::new(FileState {
                file: None,
                bytes: replayed.valid_bytes,
                next_batch: replayed.batches,
            }),
            flushing: Cell::new(false),
            failed: RefCell::new(None),
            flushed: Signal::default(),
            unlink_after: RefCell::default(),
            stats: Cell::default(),
        });
        if replayed.torn {
            tracing::warn!(path = %path.display(), valid_bytes = replayed.valid_bytes,
                "hard-state store ends in a torn write (a crash during a flush): rewriting it");
        }
        if bytes.is_some() && !replayed.torn {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .buffered_open(path)
                .await
                .map_err(|e| format!("opening {}: {e}", path.display()))?;
            store.file.borrow_mut().file = Some(Rc::new(f));
        }
        // A torn or missing file is (re)written whole by the first flush: nothing is appended
        // after garbage, and a new file's directory entry is made durable with it.
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The newest state recorded for `group` (durable or not).
    pub fn get(&self, group: GroupId) -> Option<HardState> {
        self.book.borrow().get(group)
    }

    /// Groups held.
    pub fn len(&self) -> usize {
        self.book.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.book.borrow().is_empty()
    }

    pub fn stats(&self) -> StoreStats {
        self.stats.get()
    }

    /// Records `group`'s new hard state in memory; returns the sequence number to pass to
    /// [`Self::wait_durable`] before anything revealing it is sent. An error (the store is
    /// full or has failed) means the state will never be durable.
    pub fn record(&self, group: GroupId, hard: HardState) -> Result<u64, String> {
        if let Some(e) = &*self.failed.borrow() {
            return Err(e.clone());
        }
        self.book.borrow_mut().record(group, hard)
    }

    /// Forgets `group`; the removal reaches the file with the next flush (until then, or if a
    /// crash comes first, the entry is pruned at the next start: see [`Self::retain`]).
    pub fn remove(&self, group: GroupId) {
        self.book.borrow_mut().remove(group);
    }

    /// Forgets every group `keep` rejects (groups this node no longer hosts).
    pub fn retain(&self, keep: impl Fn(GroupId) -> bool) -> usize {
        let mut book = self.book.borrow_mut();
        let gone: Vec<GroupId> = book.entries.keys().copied().filter(|&g| !keep(g)).collect();
        for &g in &gone {
            book.remove(g);
        }
        gone.len()
    }

    /// Removes the old per-partition file at `path` once the store holds, durably, a state
    /// at least as new as the one read from it (`seq` from [`Self::record`]).
    pub fn remove_when_durable(&self, seq: u64, path: PathBuf) {
        self.unlink_after.borrow_mut().push((seq, path));
    }

    pub fn is_durable(&self, seq: u64) -> bool {
        self.book.borrow().is_durable(seq)
    }

    /// Whether something recorded is not durable yet.
    pub fn has_pending(&self) -> bool {
        self.book.borrow().has_dirty()
    }

    /// Resolves once the state recorded as `seq` is durable: joins the flush under way or
    /// starts one, which writes every state recorded so far with one fdatasync.
    pub async fn wait_durable(&self, seq: u64) -> Result<(), String> {
        debug_assert!(seq <= self.book.borrow().recorded);
        for _ in 0..MAX_FLUSH_ROUNDS {
            if let Some(e) = &*self.failed.borrow() {
                return Err(e.clone());
            }
            if self.is_durable(seq) {
                return Ok(());
            }
            if self.flushing.get() {
                let seen = self.flushed.generation();
                self.flushed.changed(seen).await;
                continue;
            }
            self.flush().await?;
        }
        Err(format!(
            "hard state {seq} not durable after {MAX_FLUSH_ROUNDS} flushes"
        ))
    }

    /// Makes everything recorded so far durable (no I/O when nothing is pending).
    pub async fn sync(&self) -> Result<(), String> {
        let seq = self.book.borrow().recorded;
        self.wait_durable(seq).await
    }

    /// One flush: the changed states appended as one batch and fdatasynced, or the whole file
    /// rewritten when it has grown past its bound (or is new, or was torn).
    async fn flush(&self) -> Result<(), String> {
        assert!(!self.flushing.get(), "one flush at a time");
        self.flushing.set(true);
        let _guard = FlushGuard(self);
        let (seq, records, rewrite) = {
            let mut book = self.book.borrow_mut();
            let fs = self.file.borrow();
            let rewrite = fs.file.is_none() || book.should_compact(fs.bytes, book.dirty.len());
            let (seq, records) = if rewrite {
                book.take_all()
            } else {
                book.take_dirty()
            };
            (seq, records, rewrite)
        };
        let written = if rewrite {
            self.rewrite(&records).await
        } else {
            self.append(&records).await
        };
        if let Err(e) = written {
            let e = format!("hard-state store {}: {e}", self.path.display());
            tracing::error!(error = %e, "hard-state write failed: the shard's groups stop");
            *self.failed.borrow_mut() = Some(e.clone());
            return Err(e);
        }
        self.book.borrow_mut().flushed(seq);
        let mut stats = self.stats.get();
        stats.flushes += 1;
        stats.rewrites += u64::from(rewrite);
        stats.records_written += records.len() as u64;
        self.stats.set(stats);
        self.remove_migrated(seq).await;
        Ok(())
    }

    async fn append(&self, records: &[(GroupId, Change)]) -> Result<(), String> {
        let (file, at, seq) = {
            let fs = self.file.borrow();
            (
                fs.file.clone().expect("an open file"),
                fs.bytes,
                fs.next_batch,
            )
        };
        let bytes = encode_batch(seq, records);
        let len = bytes.len() as u64;
        write_all(&file, bytes, at).await?;
        file.fdatasync()
            .await
            .map_err(|e| format!("fdatasync: {e}"))?;
        let mut fs = self.file.borrow_mut();
        fs.bytes = at + len;
        fs.next_batch = seq + 1;
        Ok(())
    }

    async fn rewrite(&self, records: &[(GroupId, Change)]) -> Result<(), String> {
        let tmp = tmp_path(&self.path);
        let bytes = encode_batch(0, records);
        let len = bytes.len() as u64;
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .buffered_open(&tmp)
            .await
            .map_err(|e| format!("creating {}: {e}", tmp.display()))?;
        write_all(&f, bytes, 0).await?;
        f.fdatasync().await.map_err(|e| format!("fdatasync: {e}"))?;
        f.rename(&self.path)
            .await
            .map_err(|e| format!("renaming {}: {e}", tmp.display()))?;
        let dir = glommio::io::Directory::open(&self.dir)
            .await
            .map_err(|e| format!("opening {}: {e}", self.dir.display()))?;
        dir.sync()
            .await
            .map_err(|e| format!("syncing {}: {e}", self.dir.display()))?;
        let _ = dir.close().await;
        let old = {
            let mut fs = self.file.borrow_mut();
            fs.bytes = len;
            fs.next_batch = 1;
            fs.file.replace(Rc::new(f))
        };
        if let Some(old) = old.and_then(|o| Rc::try_unwrap(o).ok()) {
            let _ = old.close().await;
        }
        Ok(())
    }

    async fn remove_migrated(&self, durable: u64) {
        let due: Vec<PathBuf> = {
            let mut pending = self.unlink_after.borrow_mut();
            let (due, keep) = std::mem::take(&mut *pending)
                .into_iter()
                .partition(|(seq, _)| *seq <= durable);
            *pending = keep;
            due.into_iter().map(|(_, p)| p).collect()
        };
        for p in due {
            match glommio::io::remove(&p).await {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                // Harmless: the old file is read again at the next open, and the store's
                // state is at least as new.
                Err(e) => tracing::warn!(path = %p.display(), error = %e,
                    "cannot remove a migrated hard-state file"),
            }
        }
    }

    /// Closes the file (the shard is stopping); pending records are written first.
    pub async fn close(&self) -> Result<(), String> {
        let synced = self.sync().await;
        let f = self.file.borrow_mut().file.take();
        if let Some(f) = f.and_then(|f| Rc::try_unwrap(f).ok()) {
            let _ = f.close().await;
        }
        synced
    }
}

fn is_not_found(e: &glommio::GlommioError<()>) -> bool {
    matches!(e, glommio::GlommioError::IoError(io) if io.kind() == std::io::ErrorKind::NotFound)
        || matches!(e, glommio::GlommioError::EnhancedIoError { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound)
}

async fn write_all(file: &BufferedFile, bytes: Vec<u8>, at: u64) -> Result<(), String> {
    let mut done = 0usize;
    for _ in 0..MAX_WRITE_CALLS {
        if done == bytes.len() {
            return Ok(());
        }
        let rest = if done == 0 {
            bytes.clone()
        } else {
            bytes[done..].to_vec()
        };
        let n = file
            .write_at(rest, at + done as u64)
            .await
            .map_err(|e| format!("write at {}: {e}", at + done as u64))?;
        if n == 0 {
            return Err(format!("write at {} took no bytes", at + done as u64));
        }
        done += n;
    }
    if done == bytes.len() {
        Ok(())
    } else {
        Err(format!("{done} of {} bytes written", bytes.len()))
    }
}

/// The whole file, `None` if there is none. Bounded by [`MAX_HARD_STATE_FILE_BYTES`].
async fn read_file(path: &Path) -> Result<Option<Vec<u8>>, String> {
    let f = match BufferedFile::open(path).await {
        Ok(f) => f,
        Err(e) if is_not_found(&e) => return Ok(None),
        Err(e) => return Err(format!("opening {}: {e}", path.display())),
    };
    let len = f
        .file_size()
        .await
        .map_err(|e| format!("size of {}: {e}", path.display()))?;
    if len > MAX_HARD_STATE_FILE_BYTES {
        let _ = f.close().await;
        return Err(format!(
            "{}: {len} bytes, over the bound of {MAX_HARD_STATE_FILE_BYTES}",
            path.display()
        ));
    }
    let mut out = Vec::with_capacity(len as usize);
    // Each read returns at most what is left; a file that shrinks under us ends the loop.
    for _ in 0..(len as usize / HARD_STATE_BLOCK_BYTES + MAX_WRITE_CALLS) {
        if out.len() as u64 >= len {
            break;
        }
        let want = (len - out.len() as u64) as usize;
        let r = f
            .read_at(out.len() as u64, want)
            .await
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        if r.is_empty() {
            break;
        }
        out.extend_from_slice(&r);
    }
    let _ = f.close().await;
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs(epoch: Epoch, voted_for: Option<u64>) -> HardState {
        HardState { epoch, voted_for }
    }

    #[test]
    fn a_batch_round_trips_and_any_damage_is_refused() {
        let records = vec![
            (1, Change::Set(hs(3, Some(2)))),
            (u64::MAX, Change::Set(hs(0, None))),
            (7, Change::Removed),
        ];
        let b = encode_batch(5, &records);
        assert_eq!(b.len(), HARD_STATE_BLOCK_BYTES);
        let d = decode_batch(&b).unwrap();
        assert_eq!((d.seq, d.records.clone(), d.bytes), (5, records, b.len()));
        let len = HEADER_BYTES + 3 * RECORD_BYTES + CRC_BYTES;
        for i in 0..len {
            let mut bad = b.clone();
            bad[i] ^= 0x10;
            assert!(decode_batch(&bad).is_err(), "flip at byte {i} accepted");
        }
        for cut in 0..len {
            assert!(decode_batch(&b[..cut]).is_err(), "cut at {cut} accepted");
        }
        // A count claiming more than the bound is refused before anything is allocated.
        let mut huge = b.clone();
        huge[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_batch(&huge).is_err());
    }

    #[test]
    fn replay_applies_batches_in_order_and_removals() {
        let mut file = encode_batch(0, &[(1, Change::Set(hs(1, Some(1))))]);
        file.extend(encode_batch(
            1,
            &[
                (1, Change::Set(hs(2, None))),
                (2, Change::Set(hs(1, Some(3)))),
            ],
        ));
        file.extend(encode_batch(2, &[(2, Change::Removed)]));
        let r = replay(&file).unwrap();
        assert!(!r.torn);
        assert_eq!(r.batches, 3);
        assert_eq!(r.valid_bytes, file.len() as u64);
        assert_eq!(r.entries, HashMap::from([(1, hs(2, None))]));
        assert!(replay(&[]).unwrap().entries.is_empty());
    }

    /// A crash during a flush leaves every prefix of its batch (and garbage after it): the
    /// states before it are read whole, or (the whole batch written) the new ones, never
    /// anything else.
    #[test]
    fn a_torn_flush_at_any_prefix_leaves_the_states_before_it() {
        let before = [
            (1, Change::Set(hs(4, Some(2)))),
            (2, Change::Set(hs(1, None))),
        ];
        let mut file = encode_batch(0, &before);
        file.extend(encode_batch(1, &[(3, Change::Set(hs(2, Some(3))))]));
        let old = replay(&file).unwrap().entries;
        let next = encode_batch(
            2,
            &[
                (1, Change::Set(hs(5, None))),
                (3, Change::Removed),
                (9, Change::Set(hs(1, Some(1)))),
            ],
        );
        let mut new_file = file.clone();
        new_file.extend_from_slice(&next);
        let new = replay(&new_file).unwrap().entries;
        assert_ne!(old, new);
        for cut in 0..next.len() {
            for tail in [&[][..], &[0u8; 7][..], &[0xA5u8; 64][..]] {
                let mut torn = file.clone();
                torn.extend_from_slice(&next[..cut]);
                torn.extend_from_slice(tail);
                let r = replay(&torn).unwrap_or_else(|e| panic!("cut {cut}: {e}"));
                if r.entries == new {
                    // Only the whole batch (its padding cut) reads as the new states.
                    assert!(
                        cut >= HEADER_BYTES + 3 * RECORD_BYTES + CRC_BYTES,
                        "cut {cut}"
                    );
                } else {
                    assert_eq!(r.entries, old, "cut {cut}");
                    assert!(r.torn || torn.len() == file.len(), "cut {cut}");
                    assert_eq!(r.valid_bytes, file.len() as u64, "cut {cut}");
                }
            }
        }
    }

    #[test]
    fn a_damaged_batch_before_a_valid_one_is_refused() {
        let mut file = encode_batch(0, &[(1, Change::Set(hs(1, Some(1))))]);
        file.extend(encode_batch(1, &[(1, Change::Set(hs(2, Some(2))))]));
        file.extend(encode_batch(2, &[(2, Change::Set(hs(1, None)))]));
        // The middle batch damaged: its vote would be forgotten, so the file is refused.
        let mut bad = file.clone();
        bad[HARD_STATE_BLOCK_BYTES + HEADER_BYTES + 2] ^= 1;
        let err = replay(&bad).unwrap_err();
        assert!(err.contains("followed by batch 2"), "{err}");
        // The last one damaged is a torn write.
        let mut torn = file.clone();
        torn[2 * HARD_STATE_BLOCK_BYTES + HEADER_BYTES] ^= 1;
        let r = replay(&torn).unwrap();
        assert!(r.torn);
        assert_eq!(r.entries, HashMap::from([(1, hs(2, Some(2)))]));
        // Batches out of sequence (a stale copy spliced in) are refused too.
        let mut spliced = encode_batch(0, &[(1, Change::Set(hs(1, None)))]);
        spliced.extend(encode_batch(0, &[(1, Change::Set(hs(1, None)))]));
        spliced.extend(encode_batch(1, &[(1, Change::Set(hs(1, None)))]));
        assert!(replay(&spliced).is_err());
    }

    #[test]
    fn the_book_coalesces_records_and_bounds_entries() {
        let mut book = Book::default();
        let s1 = book.record(1, hs(1, Some(1))).unwrap();
        let s2 = book.record(2, hs(1, None)).unwrap();
        let s3 = book.record(1, hs(2, None)).unwrap();
        assert!(s1 < s2 && s2 < s3);
        // The same state again needs nothing new.
        assert_eq!(book.record(1, hs(2, None)).unwrap(), s3);
        let (seq, records) = book.take_dirty();
        assert_eq!(seq, s3);
        assert_eq!(
            records,
            vec![(1, Change::Set(hs(2, None))), (2, Change::Set(hs(1, None)))]
        );
        assert!(!book.is_durable(s3));
        book.flushed(seq);
        assert!(book.is_durable(s3));
        book.remove(2);
        assert_eq!(book.take_dirty().1, vec![(2, Change::Removed)]);
        for g in 100..100 + MAX_HARD_STATE_ENTRIES as u64 - 1 {
            book.record(g, hs(1, None)).unwrap();
        }
        assert_eq!(book.len(), MAX_HARD_STATE_ENTRIES);
        assert!(book.record(u64::MAX, hs(1, None)).is_err());
        // An existing group still moves on.
        assert!(book.record(1, hs(3, Some(1))).is_ok());
    }

    fn run<F: std::future::Future<Output = ()> + 'static>(f: impl FnOnce() -> F + Send + 'static) {
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move { f().await })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn states_survive_reopening_with_one_flush_for_many_groups() {
        let dir = tempfile::tempdir().unwrap();
        let path = hard_state_store_path(dir.path(), 0);
        run(move || async move {
            let store = HardStateStore::open(&path).await.unwrap();
            let mut last = 0;
            for g in 0..3_000u64 {
                last = store.record(g, hs(1, Some(g % 3 + 1))).unwrap();
            }
            assert!(!store.is_durable(last));
            store.wait_durable(last).await.unwrap();
            assert_eq!(store.stats().flushes, 1);
            // Appends after the first (rewritten) flush.
            for g in 0..10u64 {
                store.record(g, hs(2, None)).unwrap();
            }
            store.remove(2_999);
            store.sync().await.unwrap();
            assert_eq!(store.stats().flushes, 2);
            assert_eq!(store.stats().rewrites, 1);
            // Nothing pending: no I/O.
            store.sync().await.unwrap();
            assert_eq!(store.stats().flushes, 2);
            // Recorded but never flushed: lost, as in a crash before the fdatasync.
            store.record(5, hs(9, Some(1))).unwrap();
            drop(store);
            let store = HardStateStore::open(&path).await.unwrap();
            assert_eq!(store.len(), 2_999);
            assert_eq!(store.get(5), Some(hs(2, None)));
            assert_eq!(store.get(20), Some(hs(1, Some(3))));
            assert_eq!(store.get(2_999), None);
        });
    }

    #[test]
    fn the_file_is_rewritten_when_it_outgrows_its_live_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = hard_state_store_path(dir.path(), 1);
        let p = path.clone();
        run(move || async move {
            let store = HardStateStore::open(&p).await.unwrap();
            // One group changing on every flush: each flush a block, until the slack is used.
            let flushes = (COMPACT_SLACK_BYTES as usize / HARD_STATE_BLOCK_BYTES) * 2;
            for e in 1..=flushes as Epoch {
                store.record(1, hs(e, None)).unwrap();
                store.sync().await.unwrap();
                let len = std::fs::metadata(&p).unwrap().len();
                assert!(len <= COMPACT_SLACK_BYTES + 3 * HARD_STATE_BLOCK_BYTES as u64);
            }
            assert!(store.stats().rewrites >= 2, "{:?}", store.stats());
            drop(store);
            let store = HardStateStore::open(&p).await.unwrap();
            assert_eq!(store.get(1), Some(hs(flushes as Epoch, None)));
        });
        assert!(!tmp_path(&path).exists());
    }

    /// A crash part-way through a flush, at every prefix of its batch on disk: the store opens
    /// with the states before it, rewrites the file, and goes on appending after it.
    #[test]
    fn a_store_opens_after_a_torn_flush_and_keeps_working() {
        let dir = tempfile::tempdir().unwrap();
        let path = hard_state_store_path(dir.path(), 0);
        let p = path.clone();
        run(move || async move {
            let store = HardStateStore::open(&p).await.unwrap();
            store.record(1, hs(3, Some(1))).unwrap();
            store.record(2, hs(1, None)).unwrap();
            store.sync().await.unwrap();
            store.record(3, hs(1, Some(2))).unwrap();
            store.sync().await.unwrap();
            drop(store);
        });
        let good = std::fs::read(&path).unwrap();
        let next = encode_batch(2, &[(1, Change::Set(hs(4, None)))]);
        let whole = HEADER_BYTES + RECORD_BYTES + CRC_BYTES;
        // Every cut through the header and record, then a few through the padding.
        let cuts: Vec<usize> = (0..=whole)
            .chain([whole + 1, 2048, next.len() - 1])
            .collect();
        run(move || async move {
            for cut in cuts {
                let mut torn = good.clone();
                torn.extend_from_slice(&next[..cut]);
                std::fs::write(&path, &torn).unwrap();
                let store = HardStateStore::open(&path).await.unwrap();
                let want = if cut >= whole {
                    hs(4, None)
                } else {
                    hs(3, Some(1))
                };
                assert_eq!(store.get(1), Some(want), "cut {cut}");
                assert_eq!(store.get(3), Some(hs(1, Some(2))));
                store.record(2, hs(2, Some(2))).unwrap();
                store.sync().await.unwrap();
                drop(store);
                let store = HardStateStore::open(&path).await.unwrap();
                assert_eq!(store.get(1), Some(want), "cut {cut}");
                assert_eq!(store.get(2), Some(hs(2, Some(2))), "cut {cut}");
            }
        });
    }

    #[test]
    fn a_damaged_or_oversized_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = hard_state_store_path(dir.path(), 0);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut file = encode_batch(0, &[(1, Change::Set(hs(1, Some(1))))]);
        file.extend(encode_batch(1, &[(1, Change::Set(hs(2, Some(2))))]));
        file[HEADER_BYTES + 1] ^= 1;
        std::fs::write(&path, &file).unwrap();
        let p = path.clone();
        run(move || async move {
            assert!(HardStateStore::open(&p).await.is_err());
        });
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(MAX_HARD_STATE_FILE_BYTES + 1).unwrap();
        run(move || async move {
            let err = HardStateStore::open(&path).await.err().unwrap();
            assert!(err.contains("over the bound"), "{err}");
        });
    }
}
