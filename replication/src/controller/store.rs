//! The metadata log and the controller group's hard state on disk, under
//! `<data-dir>/__cluster_metadata/`.
//!
//! `log` is append-only: each entry is `[len u32][crc32c u32][base u64][count u32][epoch i32]
//! [batch bytes]`, the CRC covering what follows it. Appends are fsynced before the core is told
//! they are durable; a torn or corrupt tail (a crash mid-append) is cut off on open, since the
//! core never counted it durable. A truncation (a follower dropping a divergent suffix) cuts the
//! file at the entry boundary. `hard_state` (epoch and vote) is replaced atomically (temp file,
//! fsync, rename, fsync of the directory) before anything that depends on it is sent.
//!
//! The whole log is also kept in memory: metadata is small (registrations, topics, partition
//! changes), and the leader attaches batches to appends from it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::controller::records::MAX_METADATA_BATCH_BYTES;
use crate::types::{Batch, Epoch, HardState, NodeId, Offset};

pub const METADATA_DIR: &str = "__cluster_metadata";
const LOG_FILE: &str = "log";
const HARD_STATE_FILE: &str = "hard_state";
/// Length and CRC before each entry.
const ENTRY_PREFIX_BYTES: usize = 8;
/// Base, count and epoch.
const ENTRY_HEADER_BYTES: usize = 16;
const HARD_STATE_BYTES: usize = 4 + 4 + 1 + 8 + 4;
const HARD_STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

pub struct MetadataStore {
    dir: PathBuf,
    log: File,
    batches: Vec<Batch>,
    /// File position of each batch's entry, for truncation.
    positions: Vec<u64>,
    file_len: u64,
    hard: HardState,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl MetadataStore {
    /// Opens (creating on first start) the store under `data_dir` and replays it.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let dir = data_dir.join(METADATA_DIR);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let hard = read_hard_state(&dir)?;
        let log_path = dir.join(LOG_FILE);
        let mut log = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        let mut raw = Vec::new();
        log.read_to_end(&mut raw).map_err(io_err(&log_path))?;
        let (batches, positions, good) = parse_log(Bytes::from(raw.clone()));
        if good < raw.len() as u64 {
            tracing::warn!(
                path = %log_path.display(),
                kept = good,
                dropped = raw.len() as u64 - good,
                "metadata log has a torn or corrupt tail (a crash mid-append): cutting it off"
            );
            log.set_len(good).map_err(io_err(&log_path))?;
            log.sync_all().map_err(io_err(&log_path))?;
        }
        if let Some(b) = batches.last() {
            if b.epoch > hard.epoch {
                return Err(StoreError::Corrupt {
                    path: dir.join(HARD_STATE_FILE),
                    reason: format!(
                        "epoch {} below the log's last epoch {}",
                        hard.epoch, b.epoch
                    ),
                });
            }
        }
        Ok(MetadataStore {
            dir,
            log,
            batches,
            positions,
            file_len: good,
            hard,
        })
    }

    pub fn batches(&self) -> &[Batch] {
        &self.batches
    }

    pub fn log_end(&self) -> Offset {
        self.batches.last().map_or(0, Batch::end)
    }

    pub fn hard_state(&self) -> HardState {
        self.hard
    }

    /// (epoch, first offset) of each epoch in the log.
    pub fn epochs(&self) -> Vec<(Epoch, Offset)> {
        let mut out: Vec<(Epoch, Offset)> = Vec::new();
        for b in &self.batches {
            if out.last().is_none_or(|e| e.0 != b.epoch) {
                out.push((b.epoch, b.base));
            }
        }
        out
    }

    /// The batches from `from` on, up to about `max_bytes` (at least one if there is one).
    pub fn read_from(&self, from: Offset, until: Offset, max_bytes: usize) -> Vec<Batch> {
        let start = self.batches.partition_point(|b| b.end() <= from);
        let mut out = Vec::new();
        let mut bytes = 0;
        for b in &self.batches[start..] {
            if b.base >= until || (!out.is_empty() && bytes + b.bytes.len() > max_bytes) {
                break;
            }
            bytes += b.bytes.len();
            out.push(b.clone());
        }
        out
    }

    /// Writes and fsyncs `batches` (contiguous with the log).
    pub fn append(&mut self, batches: &[Batch]) -> Result<(), StoreError> {
        let path = self.dir.join(LOG_FILE);
        let mut buf = BytesMut::new();
        let mut pos = self.file_len;
        let mut positions = Vec::with_capacity(batches.len());
        let mut expected = self.log_end();
        for b in batches {
            assert_eq!(b.base, expected, "metadata appends are contiguous");
            expected = b.end();
            assert!(
                b.membership.is_none(),
                "the metadata group has fixed voters"
            );
            assert!(b.bytes.len() <= MAX_METADATA_BATCH_BYTES);
            let start = buf.len();
            let body_len = ENTRY_HEADER_BYTES + b.bytes.len();
            buf.put_u32(body_len as u32);
            buf.put_u32(0);
            buf.put_u64(b.base);
            buf.put_u32(b.count);
            buf.put_i32(b.epoch);
            buf.put_slice(&b.bytes);
            let crc = crc32c::crc32c(&buf[start + ENTRY_PREFIX_BYTES..]);
            buf[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
            positions.push(pos);
            pos += (ENTRY_PREFIX_BYTES + body_len) as u64;
        }
        self.log.write_all(&buf).map_err(io_err(&path))?;
        self.log.sync_data().map_err(io_err(&path))?;
        self.file_len = pos;
        self.positions.extend(positions);
        self.batches.extend(batches.iter().cloned());
        Ok(())
    }

    /// Removes every batch at or after `end` (a batch boundary).
    pub fn truncate(&mut self, end: Offset) -> Result<(), StoreError> {
        let keep = self.batches.partition_point(|b| b.base < end);
        if keep == self.batches.len() {
            return Ok(());
        }
        assert_eq!(self.batches[keep].base, end, "truncation inside a batch");
        let path = self.dir.join(LOG_FILE);
        let len = self.positions[keep];
        self.log.set_len(len).map_err(io_err(&path))?;
        self.log.sync_all().map_err(io_err(&path))?;
        self.batches.truncate(keep);
        self.positions.truncate(keep);
        self.file_len = len;
        Ok(())
    }

    /// Durably replaces the hard state.
    pub fn persist_hard_state(&mut self, hard: HardState) -> Result<(), StoreError> {
        if hard == self.hard {
            return Ok(());
        }
        let path = self.dir.join(HARD_STATE_FILE);
        let tmp = self.dir.join(format!("{HARD_STATE_FILE}.tmp"));
        let mut b = BytesMut::with_capacity(HARD_STATE_BYTES);
        b.put_u32(HARD_STATE_VERSION);
        b.put_i32(hard.epoch);
        b.put_u8(u8::from(hard.voted_for.is_some()));
        b.put_u64(hard.voted_for.unwrap_or(0));
        let crc = crc32c::crc32c(&b);
        b.put_u32(crc);
        let dir = self.dir.clone();
        (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&b)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, &path)?;
            File::open(&dir)?.sync_all()
        })()
        .map_err(io_err(&path))?;
        self.hard = hard;
        Ok(())
    }
}

fn read_hard_state(dir: &Path) -> Result<HardState, StoreError> {
    let path = dir.join(HARD_STATE_FILE);
    let raw = match std::fs::read(&path) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HardState::default()),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let corrupt = |reason: &str| StoreError::Corrupt {
        path: path.clone(),
        reason: reason.to_string(),
    };
    if raw.len() != HARD_STATE_BYTES {
        return Err(corrupt("wrong size"));
    }
    let (body, crc) = raw.split_at(HARD_STATE_BYTES - 4);
    if crc32c::crc32c(body) != u32::from_be_bytes(crc.try_into().expect("4 bytes")) {
        return Err(corrupt("checksum mismatch"));
    }
    let mut r = body;
    if r.get_u32() != HARD_STATE_VERSION {
        return Err(corrupt("unsupported version"));
    }
    let epoch = r.get_i32();
    let has_vote = r.get_u8();
    let vote: NodeId = r.get_u64();
    if has_vote > 1 || epoch < 0 {
        return Err(corrupt("invalid field"));
    }
    Ok(HardState {
        epoch,
        voted_for: (has_vote == 1).then_some(vote),
    })
}

/// Parses entries until the first bad one; returns them, their positions and the good length.
fn parse_log(mut raw: Bytes) -> (Vec<Batch>, Vec<u64>, u64) {
    let mut batches: Vec<Batch> = Vec::new();
    let mut positions = Vec::new();
    let mut pos = 0u64;
    while raw.len() >= ENTRY_PREFIX_BYTES {
        let len = u32::from_be_bytes(raw[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_be_bytes(raw[4..8].try_into().expect("4 bytes"));
        if !(ENTRY_HEADER_BYTES..=ENTRY_HEADER_BYTES + MAX_METADATA_BATCH_BYTES).contains(&len)
            || raw.len() < ENTRY_PREFIX_BYTES + len
        {
            break;
        }
        let body = raw.slice(ENTRY_PREFIX_BYTES..ENTRY_PREFIX_BYTES + len);
        if crc32c::crc32c(&body) != crc {
            break;
        }
        let mut h = &body[..ENTRY_HEADER_BYTES];
        let (base, count, epoch) = (h.get_u64(), h.get_u32(), h.get_i32());
        let expected = batches.last().map_or(0, Batch::end);
        let epoch_ok = batches.last().is_none_or(|b| b.epoch <= epoch) && epoch >= 0;
        if base != expected || count == 0 || !epoch_ok {
            break;
        }
        batches.push(Batch {
            base,
            count,
            epoch,
            bytes: body.slice(ENTRY_HEADER_BYTES..),
            membership: None,
        });
        positions.push(pos);
        pos += (ENTRY_PREFIX_BYTES + len) as u64;
        raw.advance(ENTRY_PREFIX_BYTES + len);
    }
    (batches, positions, pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(base: Offset, epoch: Epoch, body: &'static [u8]) -> Batch {
        Batch {
            base,
            count: 1,
            epoch,
            bytes: Bytes::from_static(body),
            membership: None,
        }
    }

    #[test]
    fn appends_truncations_and_hard_state_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = MetadataStore::open(dir.path()).unwrap();
        assert_eq!((s.log_end(), s.hard_state()), (0, HardState::default()));
        let hard = HardState {
            epoch: 3,
            voted_for: Some(2),
        };
        s.persist_hard_state(hard).unwrap();
        s.append(&[batch(0, 1, b"a"), batch(1, 1, b"b")]).unwrap();
        s.append(&[batch(2, 3, b"c")]).unwrap();
        s.truncate(2).unwrap();
        s.append(&[batch(2, 3, b"d"), batch(3, 3, b"e")]).unwrap();
        drop(s);
        let s = MetadataStore::open(dir.path()).unwrap();
        assert_eq!(s.hard_state(), hard);
        let bodies: Vec<&[u8]> = s.batches().iter().map(|b| &b.bytes[..]).collect();
        assert_eq!(bodies, [b"a", b"b", b"d", b"e"]);
        assert_eq!(s.epochs(), vec![(1, 0), (3, 2)]);
        assert_eq!(s.read_from(1, 3, 0).len(), 1);
        assert_eq!(s.read_from(1, 4, 1 << 20).len(), 3);
    }

    #[test]
    fn a_torn_or_corrupt_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = MetadataStore::open(dir.path()).unwrap();
        s.persist_hard_state(HardState {
            epoch: 1,
            voted_for: None,
        })
        .unwrap();
        s.append(&[batch(0, 1, b"a"), batch(1, 1, b"b")]).unwrap();
        drop(s);
        let path = dir.path().join(METADATA_DIR).join(LOG_FILE);
        let mut raw = std::fs::read(&path).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 0xFF;
        std::fs::write(&path, &raw).unwrap();
        let mut s = MetadataStore::open(dir.path()).unwrap();
        assert_eq!(s.log_end(), 1);
        s.append(&[batch(1, 1, b"c")]).unwrap();
        drop(s);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0, 0, 0, 40, 1, 2]).unwrap();
        drop(f);
        let s = MetadataStore::open(dir.path()).unwrap();
        assert_eq!(s.log_end(), 2);
        assert_eq!(&s.batches()[1].bytes[..], b"c");
        // A damaged hard state is an error, never a silent reset (that could vote twice).
        std::fs::write(dir.path().join(METADATA_DIR).join(HARD_STATE_FILE), b"x").unwrap();
        assert!(MetadataStore::open(dir.path()).is_err());
    }
}
