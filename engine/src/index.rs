//! Sparse per-segment indexes: one entry per `index_interval_bytes` of batches, mapping an offset
//! to its byte position (offset index) and bounding timestamps (time index).
//!
//! Both files hold fixed-size big-endian entries followed by a checksummed trailer that says how
//! much of the segment they cover; a missing, short or mismatching file is rebuilt from the log.

use std::path::Path;

/// One sparse index point: the batch starting at `position` has base offset `offset`, and every
/// batch before it in the segment has a max timestamp `< max_timestamp_before` or equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub offset: u64,
    pub position: u32,
    pub max_timestamp_before: i64,
}

const OFFSET_ENTRY_BYTES: usize = 8;
const TIME_ENTRY_BYTES: usize = 12;
const TRAILER_BYTES: usize = 32;
const TRAILER_MAGIC: u32 = 0x5350_4958; // "SPIX"

/// What an index file pair covers: every batch below `covered_position`, whose next offset is
/// `next_offset` and largest timestamp `max_timestamp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexCoverage {
    pub covered_position: u64,
    pub next_offset: u64,
    pub max_timestamp: i64,
}

/// The in-memory sparse index of one segment.
#[derive(Default, Debug, Clone)]
pub struct SegmentIndex {
    pub entries: Vec<IndexEntry>,
}

impl SegmentIndex {
    pub fn push(&mut self, entry: IndexEntry) {
        if let Some(last) = self.entries.last() {
            assert!(entry.offset > last.offset && entry.position > last.position);
        }
        self.entries.push(entry);
    }

    /// Position of the last index point at or before `offset` (0 if none).
    pub fn position_for(&self, offset: u64) -> u32 {
        let i = self.entries.partition_point(|e| e.offset <= offset);
        if i == 0 {
            0
        } else {
            self.entries[i - 1].position
        }
    }

    /// Position from which to scan for the first batch whose max timestamp is `>= ts`: the last
    /// index point all of whose predecessors are older than `ts`.
    pub fn position_for_timestamp(&self, ts: i64) -> u32 {
        let i = self
            .entries
            .partition_point(|e| e.max_timestamp_before < ts);
        if i == 0 {
            0
        } else {
            self.entries[i - 1].position
        }
    }

    /// Drops every entry at or after `position`.
    pub fn truncate_at_position(&mut self, position: u64) {
        let i = self
            .entries
            .partition_point(|e| (e.position as u64) < position);
        self.entries.truncate(i);
    }

    fn trailer(&self, base: u64, cov: &IndexCoverage, body: &[u8]) -> [u8; TRAILER_BYTES] {
        let mut t = [0u8; TRAILER_BYTES];
        t[0..4].copy_from_slice(&TRAILER_MAGIC.to_be_bytes());
        t[4..8].copy_from_slice(&(self.entries.len() as u32).to_be_bytes());
        t[8..16].copy_from_slice(&cov.covered_position.to_be_bytes());
        t[16..24].copy_from_slice(&cov.next_offset.to_be_bytes());
        let crc = crc32c::crc32c_append(
            crc32c::crc32c_append(crc32c::crc32c(body), &base.to_be_bytes()),
            &t[..28],
        );
        t[28..32].copy_from_slice(&crc.to_be_bytes());
        t
    }

    /// Serialises the offset index and time index files of a segment based at `base`.
    pub fn encode(&self, base: u64, cov: &IndexCoverage) -> (Vec<u8>, Vec<u8>) {
        let mut off = Vec::with_capacity(self.entries.len() * OFFSET_ENTRY_BYTES + TRAILER_BYTES);
        let mut time =
            Vec::with_capacity(self.entries.len() * TIME_ENTRY_BYTES + TRAILER_BYTES + 8);
        for e in &self.entries {
            off.extend_from_slice(&((e.offset - base) as u32).to_be_bytes());
            off.extend_from_slice(&e.position.to_be_bytes());
            time.extend_from_slice(&e.max_timestamp_before.to_be_bytes());
            time.extend_from_slice(&((e.offset - base) as u32).to_be_bytes());
        }
        let t = self.trailer(base, cov, &off);
        off.extend_from_slice(&t);
        time.extend_from_slice(&cov.max_timestamp.to_be_bytes());
        let t = self.trailer(base, cov, &time);
        time.extend_from_slice(&t);
        (off, time)
    }

    /// Parses an index file pair; None if either is damaged or they disagree.
    pub fn decode(base: u64, off: &[u8], time: &[u8]) -> Option<(SegmentIndex, IndexCoverage)> {
        let parse_trailer = |file: &[u8], entry_bytes: usize, extra: usize| {
            if file.len() < TRAILER_BYTES + extra {
                return None;
            }
            let (body, t) = file.split_at(file.len() - TRAILER_BYTES);
            let be32 = |b: &[u8]| u32::from_be_bytes(b.try_into().expect("4 bytes"));
            let be64 = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8 bytes"));
            if be32(&t[0..4]) != TRAILER_MAGIC {
                return None;
            }
            let count = be32(&t[4..8]) as usize;
            if body.len() != count.checked_mul(entry_bytes)? + extra {
                return None;
            }
            let crc = crc32c::crc32c_append(
                crc32c::crc32c_append(crc32c::crc32c(body), &base.to_be_bytes()),
                &t[..28],
            );
            if crc != be32(&t[28..32]) {
                return None;
            }
            Some((count, be64(&t[8..16]), be64(&t[16..24])))
        };
        let (count, covered, next) = parse_trailer(off, OFFSET_ENTRY_BYTES, 0)?;
        let (tcount, tcovered, tnext) = parse_trailer(time, TIME_ENTRY_BYTES, 8)?;
        if (count, covered, next) != (tcount, tcovered, tnext) {
            return None;
        }
        let mut index = SegmentIndex {
            entries: Vec::with_capacity(count),
        };
        for i in 0..count {
            let o = &off[i * OFFSET_ENTRY_BYTES..];
            let t = &time[i * TIME_ENTRY_BYTES..];
            let rel = u32::from_be_bytes(o[0..4].try_into().ok()?);
            let position = u32::from_be_bytes(o[4..8].try_into().ok()?);
            let ts = i64::from_be_bytes(t[0..8].try_into().ok()?);
            let trel = u32::from_be_bytes(t[8..12].try_into().ok()?);
            let entry = IndexEntry {
                offset: base + rel as u64,
                position,
                max_timestamp_before: ts,
            };
            if trel != rel || position as u64 >= covered {
                return None;
            }
            if let Some(last) = index.entries.last() {
                if entry.offset <= last.offset || entry.position <= last.position {
                    return None;
                }
            }
            index.entries.push(entry);
        }
        let ts_at = count * TIME_ENTRY_BYTES;
        let max_timestamp = i64::from_be_bytes(time[ts_at..ts_at + 8].try_into().ok()?);
        Some((
            index,
            IndexCoverage {
                covered_position: covered,
                next_offset: next,
                max_timestamp,
            },
        ))
    }
}

pub fn offset_index_path(dir: &Path, base: u64) -> std::path::PathBuf {
    dir.join(format!("{base:020}.index"))
}

pub fn time_index_path(dir: &Path, base: u64) -> std::path::PathBuf {
    dir.join(format!("{base:020}.timeindex"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (SegmentIndex, IndexCoverage) {
        let mut idx = SegmentIndex::default();
        for i in 0..10u64 {
            idx.push(IndexEntry {
                offset: 100 + i * 7,
                position: (i * 4096) as u32,
                max_timestamp_before: i as i64 * 10,
            });
        }
        let cov = IndexCoverage {
            covered_position: 50_000,
            next_offset: 200,
            max_timestamp: 1234,
        };
        (idx, cov)
    }

    #[test]
    fn round_trip_and_lookup() {
        let (idx, cov) = sample();
        let (off, time) = idx.encode(100, &cov);
        let (back, bcov) = SegmentIndex::decode(100, &off, &time).expect("valid");
        assert_eq!(back.entries, idx.entries);
        assert_eq!(bcov, cov);
        assert_eq!(back.position_for(99), 0);
        assert_eq!(back.position_for(107), 4096);
        assert_eq!(back.position_for(110), 4096);
        assert_eq!(back.position_for_timestamp(25), 2 * 4096);
    }

    #[test]
    fn any_damage_is_detected() {
        let (idx, cov) = sample();
        let (off, time) = idx.encode(100, &cov);
        for i in 0..off.len() {
            let mut bad = off.clone();
            bad[i] ^= 0x40;
            assert!(SegmentIndex::decode(100, &bad, &time).is_none(), "byte {i}");
        }
        for i in 0..time.len() {
            let mut bad = time.clone();
            bad[i] ^= 0x01;
            assert!(SegmentIndex::decode(100, &off, &bad).is_none(), "byte {i}");
        }
        assert!(SegmentIndex::decode(100, &off[..off.len() - 1], &time).is_none());
        assert!(SegmentIndex::decode(101, &off, &time).is_none());
    }

    /// The two files of a checkpoint are renamed side by side, so a crash can keep one new
    /// file beside the other's older version: such a pair is refused (and the segment scanned),
    /// never read as an index.
    #[test]
    fn an_old_file_beside_a_new_one_is_refused() {
        let (idx, cov) = sample();
        let (new_off, new_time) = idx.encode(100, &cov);
        let mut older = idx.clone();
        older.entries.pop();
        let old_cov = IndexCoverage {
            covered_position: 40_000,
            next_offset: 180,
            max_timestamp: 1200,
        };
        let (old_off, old_time) = older.encode(100, &old_cov);
        assert!(SegmentIndex::decode(100, &old_off, &old_time).is_some());
        assert!(SegmentIndex::decode(100, &new_off, &old_time).is_none());
        assert!(SegmentIndex::decode(100, &old_off, &new_time).is_none());
    }
}
