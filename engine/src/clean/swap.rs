//! Crash-safe replacement of a segment by its cleaned copy, and the cleaner's state file.
//!
//! A cleaned segment is written whole to `<base>.log.cleaned` and made durable; renaming it to
//! `<base>.log.swap` is the commit point. Then the old segment's index files are removed and the
//! swap file is renamed over `<base>.log` (one atomic rename: the old file and the new one are
//! never both missing). Recovery, before it lists segments, deletes every `.cleaned` file (the
//! old segment is intact) and finishes every `.swap` (the new one is complete), so a cleaner
//! killed at any point leaves the old segment or the new one, never a mix.
//!
//! Several consecutive segments merged into one (see `merge_groups`) swap the same way, under
//! the first one's base: after the commit point the other parts are removed (and that removal
//! synced) before the swap file takes the first one's name, and recovery, finishing a swap,
//! removes every segment whose base lies inside the swap file's offsets. So the old parts and
//! the merged segment are never both in the log.
//!
//! Segments are swapped in offset order, one at a time. A crash between two swaps leaves a
//! cleaned prefix followed by uncleaned segments, which is a valid log: everything a cleaned
//! segment dropped is superseded by a record at a higher offset that every later segment, cleaned
//! or not, still holds (a tombstone that superseded it is only dropped by a later pass).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::checkpoint::{sync_dir, write_file_atomic};
use crate::segment::{self, std_io_err, Segment};
use crate::EngineError;

/// The cleaner's per-log state: where the dirty part starts, and when each segment was first
/// cleaned (the clock `delete.retention.ms` runs on for its tombstones).
pub const CLEANER_STATE_FILE: &str = "cleaner-state";
const STATE_MAGIC: u32 = 0x5350_434c; // "SPCL"
const STATE_VERSION: u32 = 1;
/// Caps the segment entries read back from the state file before allocating for them.
pub const MAX_CLEANER_STATE_SEGMENTS: usize = 1 << 20;

pub fn cleaned_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log.cleaned"))
}

pub fn swap_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log.swap"))
}

fn parse_suffixed(name: &str, suffix: &str) -> Option<u64> {
    segment::parse_log_name(name.strip_suffix(suffix)?)
}

/// Finishes or rolls back swaps a crash interrupted; called by recovery before it lists the
/// segments. Returns how many swaps were finished.
pub async fn finish_interrupted_swaps(dir: &Path) -> Result<usize, EngineError> {
    let mut finished = 0;
    let mut changed = false;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(std_io_err(dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(std_io_err(dir))?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    names.sort();
    for name in names {
        if let Some(base) = parse_suffixed(&name, ".cleaned") {
            let path = cleaned_path(dir, base);
            tracing::info!(?path, "removing an unfinished cleaned segment");
            std::fs::remove_file(&path).map_err(std_io_err(&path))?;
            changed = true;
        } else if let Some(base) = parse_suffixed(&name, ".swap") {
            let (swap, log) = (swap_path(dir, base), segment::log_path(dir, base));
            let end = swap_end_offset(&swap, base).await?;
            tracing::info!(?log, end, "finishing an interrupted segment swap");
            for part in list_log_bases(dir)? {
                if part > base && part < end {
                    let path = segment::log_path(dir, part);
                    tracing::info!(?path, "removing a segment merged into the swapped one");
                    std::fs::remove_file(&path).map_err(std_io_err(&path))?;
                    Segment::remove_index_files(dir, part);
                }
            }
            Segment::remove_index_files(dir, base);
            std::fs::rename(&swap, &log).map_err(std_io_err(&swap))?;
            finished += 1;
            changed = true;
        }
    }
    if changed {
        sync_dir(dir).await?;
    }
    Ok(finished)
}

/// One past the last offset a committed swap file holds (`base` if it holds no batch). The
/// file was synced whole before it was renamed to `.swap`, so a frame that does not decode
/// is damage, reported rather than guessed around.
async fn swap_end_offset(swap: &Path, base: u64) -> Result<u64, EngineError> {
    let file = segment::open_file(swap).await?;
    let size = file.file_size().await.map_err(segment::io_err(swap))?;
    let mut end = base;
    let (pos, stop) = crate::recovery::scan(
        &file,
        swap,
        0,
        size,
        crate::log::MAX_FRAME_PAYLOAD_BYTES,
        |_, f| {
            end = f.last_offset() + 1;
            Ok(true)
        },
    )
    .await?;
    if let Ok(file) = std::rc::Rc::try_unwrap(file) {
        // Closing only releases the descriptor; nothing was written.
        let _ = file.close().await;
    }
    if let crate::recovery::ScanStop::Invalid(reason) = stop {
        return Err(EngineError::Corrupt {
            path: swap.to_path_buf(),
            position: pos,
            reason: format!("a committed segment swap file does not decode: {reason}"),
        });
    }
    Ok(end)
}

fn list_log_bases(dir: &Path) -> Result<Vec<u64>, EngineError> {
    let mut bases = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(std_io_err(dir))? {
        let entry = entry.map_err(std_io_err(dir))?;
        if let Some(base) = entry.file_name().to_str().and_then(segment::parse_log_name) {
            bases.push(base);
        }
    }
    Ok(bases)
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanerState {
    /// Offsets below this have been deduplicated against every key above them up to here.
    pub first_dirty: u64,
    /// Segment base -> wall-clock ms when the cleaner first rewrote it.
    pub first_cleaned_ms: BTreeMap<u64, i64>,
}

impl CleanerState {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(24 + self.first_cleaned_ms.len() * 16);
        b.extend_from_slice(&STATE_MAGIC.to_be_bytes());
        b.extend_from_slice(&STATE_VERSION.to_be_bytes());
        b.extend_from_slice(&self.first_dirty.to_be_bytes());
        b.extend_from_slice(&(self.first_cleaned_ms.len() as u32).to_be_bytes());
        for (base, ms) in &self.first_cleaned_ms {
            b.extend_from_slice(&base.to_be_bytes());
            b.extend_from_slice(&ms.to_be_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<CleanerState, String> {
        if b.len() < 24 {
            return Err(format!("{} bytes is too short", b.len()));
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32c::crc32c(body).to_be_bytes() != crc {
            return Err("checksum mismatch".into());
        }
        let u32_at = |i: usize| u32::from_be_bytes(body[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_be_bytes(body[i..i + 8].try_into().expect("8 bytes"));
        if u32_at(0) != STATE_MAGIC || u32_at(4) != STATE_VERSION {
            return Err("bad magic or version".into());
        }
        let count = u32_at(16) as usize;
        if count > MAX_CLEANER_STATE_SEGMENTS || body.len() != 20 + count * 16 {
            return Err(format!("bad segment count {count}"));
        }
        let first_cleaned_ms = (0..count)
            .map(|i| (u64_at(20 + i * 16), u64_at(28 + i * 16) as i64))
            .collect();
        Ok(CleanerState {
            first_dirty: u64_at(8),
            first_cleaned_ms,
        })
    }

    /// Reads the state; a missing or damaged file is an empty state (the cleaner then cleans
    /// the whole log again, and restarts the tombstone clocks: it keeps more, never less).
    pub fn read(dir: &Path) -> CleanerState {
        let path = dir.join(CLEANER_STATE_FILE);
        match std::fs::read(&path) {
            Ok(b) => CleanerState::decode(&b).unwrap_or_else(|reason| {
                tracing::warn!(?path, %reason, "damaged cleaner state ignored");
                CleanerState::default()
            }),
            Err(_) => CleanerState::default(),
        }
    }

    pub async fn write(&self, dir: &Path) -> Result<(), EngineError> {
        write_file_atomic(dir, CLEANER_STATE_FILE, self.encode()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip_and_damage() {
        let s = CleanerState {
            first_dirty: 1234,
            first_cleaned_ms: [(0, 10), (500, -1), (900, i64::MAX)].into_iter().collect(),
        };
        let b = s.encode();
        assert_eq!(CleanerState::decode(&b).unwrap(), s);
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x01;
            assert!(CleanerState::decode(&bad).is_err(), "byte {i}");
        }
        assert!(CleanerState::decode(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn swap_file_names() {
        let d = Path::new("/d");
        assert_eq!(
            parse_suffixed("00000000000000000042.log.swap", ".swap"),
            Some(42)
        );
        assert_eq!(
            parse_suffixed("00000000000000000042.log.cleaned", ".cleaned"),
            Some(42)
        );
        assert_eq!(parse_suffixed("42.log.swap", ".swap"), None);
        assert_eq!(
            swap_path(d, 7),
            Path::new("/d/00000000000000000007.log.swap")
        );
    }
}
