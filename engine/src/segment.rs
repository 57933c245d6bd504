//! One segment of a partition log: its file, its sparse index, and what it holds.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::{DmaFile, OpenOptions};

use crate::index::{self, IndexCoverage, IndexEntry, SegmentIndex};
use crate::EngineError;

/// Max timestamp of a segment that holds no batch yet.
pub const NO_TIMESTAMP: i64 = i64::MIN;

pub fn log_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

/// Parses `<base-offset:020>.log`.
pub fn parse_log_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".log")?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

pub fn io_err(path: &Path) -> impl FnOnce(glommio::GlommioError<()>) -> EngineError + '_ {
    move |e| EngineError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

pub fn std_io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub async fn open_file(path: &Path) -> Result<Rc<DmaFile>, EngineError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .dma_open(path)
        .await
        .map_err(io_err(path))?;
    Ok(Rc::new(file))
}

pub struct Segment {
    pub base: u64,
    /// One past the last offset stored (== base when empty).
    pub next_offset: u64,
    /// Bytes of frames stored.
    pub size: u64,
    pub max_timestamp: i64,
    pub index: SegmentIndex,
    pub bytes_since_index: u64,
    pub file: Rc<DmaFile>,
    pub path: PathBuf,
    /// Wall-clock time the segment was created or reopened (for age-based rolling).
    pub opened_ms: i64,
}

impl Segment {
    pub fn new(base: u64, file: Rc<DmaFile>, path: PathBuf) -> Self {
        Segment {
            base,
            next_offset: base,
            size: 0,
            max_timestamp: NO_TIMESTAMP,
            index: SegmentIndex::default(),
            bytes_since_index: 0,
            file,
            path,
            opened_ms: now_ms(),
        }
    }

    /// Records one frame of `frame_bytes` at the segment's end (append and recovery share this,
    /// so a rebuilt index is the index appends would have built).
    pub fn record_frame(
        &mut self,
        base_offset: u64,
        last_offset: u64,
        max_timestamp: i64,
        frame_bytes: u64,
        index_interval_bytes: u32,
    ) {
        assert_eq!(base_offset, self.next_offset, "offsets are contiguous");
        if self.bytes_since_index >= index_interval_bytes as u64 {
            self.index.push(IndexEntry {
                offset: base_offset,
                position: u32::try_from(self.size).expect("segment size fits u32"),
                max_timestamp_before: self.max_timestamp,
            });
            self.bytes_since_index = 0;
        }
        self.bytes_since_index += frame_bytes;
        self.size += frame_bytes;
        self.next_offset = last_offset + 1;
        self.max_timestamp = self.max_timestamp.max(max_timestamp);
    }

    pub fn coverage(&self) -> IndexCoverage {
        IndexCoverage {
            covered_position: self.size,
            next_offset: self.next_offset,
            max_timestamp: self.max_timestamp,
        }
    }

    /// The index files for everything the segment holds now, to be written without holding
    /// a borrow of the segment.
    pub fn index_files(&self) -> IndexFiles {
        let (off, time) = self.index.encode(self.base, &self.coverage());
        IndexFiles {
            base: self.base,
            off,
            time,
        }
    }

    /// Index files for the part of the segment below `position` (a durable point inside it),
    /// ending at its last index point at or below `position`: that point's offset and
    /// "max timestamp before" are exact, where the segment's own maximum may count batches past
    /// `position`. `None` if no index point lies there (the segment's start is cheap to scan).
    /// Recovery trusts them below the recovery point they were written with, and scans on from
    /// their end.
    pub fn index_files_below(&self, position: u64) -> Option<IndexFiles> {
        let n = self
            .index
            .entries
            .partition_point(|e| e.position as u64 <= position);
        let end = *self.index.entries.get(n.checked_sub(1)?)?;
        let prefix = SegmentIndex {
            entries: self.index.entries[..n - 1].to_vec(),
        };
        let cov = IndexCoverage {
            covered_position: end.position as u64,
            next_offset: end.offset,
            max_timestamp: end.max_timestamp_before,
        };
        let (off, time) = prefix.encode(self.base, &cov);
        Some(IndexFiles {
            base: self.base,
            off,
            time,
        })
    }

    pub fn remove_index_files(dir: &Path, base: u64) {
        // Missing index files are rebuilt on open; failing to remove one is harmless because its
        // coverage trailer no longer matches the segment.
        let _ = std::fs::remove_file(index::offset_index_path(dir, base));
        let _ = std::fs::remove_file(index::time_index_path(dir, base));
    }

    /// Loads the index files if they are intact.
    pub fn read_index_files(dir: &Path, base: u64) -> Option<(SegmentIndex, IndexCoverage)> {
        let off = std::fs::read(index::offset_index_path(dir, base)).ok()?;
        let time = std::fs::read(index::time_index_path(dir, base)).ok()?;
        SegmentIndex::decode(base, &off, &time)
    }
}

/// Serialised index files of one segment.
pub struct IndexFiles {
    base: u64,
    off: Vec<u8>,
    time: Vec<u8>,
}

impl IndexFiles {
    /// Persists both files atomically (each replaced whole).
    pub async fn write_index_files(self, dir: &Path) -> Result<(), EngineError> {
        let name = |p: PathBuf| {
            p.file_name()
                .and_then(|n| n.to_str())
                .expect("index file name is UTF-8")
                .to_owned()
        };
        let off_name = name(index::offset_index_path(dir, self.base));
        let time_name = name(index::time_index_path(dir, self.base));
        crate::checkpoint::write_two_files_atomic(
            dir,
            (&off_name, self.off),
            (&time_name, self.time),
        )
        .await
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_names() {
        assert_eq!(parse_log_name("00000000000000000042.log"), Some(42));
        assert_eq!(parse_log_name("42.log"), None);
        assert_eq!(parse_log_name("0000000000000000004x.log"), None);
        assert_eq!(parse_log_name("00000000000000000042.index"), None);
        let p = log_path(Path::new("/d"), 7);
        assert_eq!(p, Path::new("/d/00000000000000000007.log"));
    }
}
