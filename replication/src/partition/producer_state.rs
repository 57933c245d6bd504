//! Idempotent-producer bookkeeping for one partition, without I/O: for each producer id, its
//! epoch and the sequence ranges of its last few batches, so retries are recognised as
//! duplicates and gaps as out-of-order; and the snapshot file that spares a restart from
//! replaying the whole log to rebuild them.
//!
//! A snapshot is the table as of a log offset, tied to the batch that ends there (its offsets,
//! leader epoch and CRC: its [`Anchor`]). A snapshot is trusted only while the log still holds
//! that very batch there: a crash that lost it, a follower truncation or a rewind that cut it,
//! and a log that grew back past it with other batches all fail the check, so a stale snapshot
//! is skipped (the next older one is tried, then the replay starts at the log start) instead of
//! being relied on to have been deleted. Two generations are kept, so a log end that moves back
//! a little (a follower's truncation of an uncommitted tail) still finds one below it. The log
//! cleaner of a compacted topic keeps the batches the snapshots end with byte for byte (the
//! replica passes their offsets in `CleanRequest::keep_batches`), so cleaning does not make a
//! snapshot fail this check.

use std::collections::{BTreeMap, VecDeque};

use kafka_protocol::ResponseError;
use serde::{Deserialize, Serialize};

/// Kafka keeps this many batches per producer (max.in.flight for idempotence is 5).
pub const CACHED_BATCHES_PER_PRODUCER: usize = 5;
/// Producers remembered per partition; the least recently written are forgotten first.
pub const MAX_PRODUCERS_PER_PARTITION: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchMeta {
    pub first_seq: i32,
    pub last_seq: i32,
    pub base_offset: i64,
    pub last_offset: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerEntry {
    pub epoch: i16,
    pub batches: VecDeque<BatchMeta>,
    /// Log offset of the producer's last batch, to pick whom to forget first.
    pub last_offset: i64,
}

/// Snapshot generations one file keeps, newest first.
pub const SNAPSHOTS_KEPT: usize = 2;
/// A snapshot file larger than this is not read (100,000 producers of five batches each, as
/// JSON, take about 50 MB a generation); the table is rebuilt from the log instead.
pub const MAX_SNAPSHOT_FILE_BYTES: u64 = 256 << 20;
const SNAPSHOT_MAGIC: &[u8; 4] = b"SPPS";
const SNAPSHOT_VERSION: u8 = 1;
/// Magic, version, body length (u32); the body; its CRC-32C (u32).
const SNAPSHOT_HEADER_BYTES: usize = 4 + 1 + 4;

/// The batch a snapshot ends with, as stored in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    pub base_offset: u64,
    pub last_offset: u64,
    /// The partitionLeaderEpoch stamped in it: on a replicated partition, the same epoch and
    /// last offset mean the same log up to there (Raft's log matching).
    pub leader_epoch: i32,
    /// Its CRC-32C (over everything from its attributes on, producer fields and records).
    pub crc: u32,
}

/// The producer table covering every batch below `end_offset`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub end_offset: u64,
    /// The batch ending at `end_offset - 1`; `None` only for a snapshot at offset 0.
    pub anchor: Option<Anchor>,
    pub table: ProducerTable,
}

/// Serialises snapshot generations (newest first) into one checksummed file body.
pub fn encode_snapshots(generations: &[&Snapshot]) -> Result<Vec<u8>, String> {
    assert!(
        generations.len() <= SNAPSHOTS_KEPT,
        "too many snapshot generations"
    );
    let body = serde_json::to_vec(generations).map_err(|e| e.to_string())?;
    let len = u32::try_from(body.len()).map_err(|_| format!("{} bytes", body.len()))?;
    let mut b = Vec::with_capacity(SNAPSHOT_HEADER_BYTES + body.len() + 4);
    b.extend_from_slice(SNAPSHOT_MAGIC);
    b.push(SNAPSHOT_VERSION);
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(&body);
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_be_bytes());
    Ok(b)
}

/// Reads a snapshot file back: its generations, newest first. Any damage (a torn or foreign
/// file, a flipped bit, an older format) is an error: the caller rebuilds from the log.
pub fn decode_snapshots(b: &[u8]) -> Result<Vec<Snapshot>, String> {
    if b.len() < SNAPSHOT_HEADER_BYTES + 4 || &b[0..4] != SNAPSHOT_MAGIC || b[4] != SNAPSHOT_VERSION
    {
        return Err("not a producer snapshot of this version".into());
    }
    let len = u32::from_be_bytes(b[5..9].try_into().expect("4 bytes")) as usize;
    if b.len() != SNAPSHOT_HEADER_BYTES + len + 4 {
        return Err(format!("{} bytes for a body of {len}", b.len()));
    }
    let (covered, crc) = b.split_at(b.len() - 4);
    if crc32c::crc32c(covered) != u32::from_be_bytes(crc.try_into().expect("4 bytes")) {
        return Err("checksum mismatch".into());
    }
    let generations: Vec<Snapshot> =
        serde_json::from_slice(&covered[SNAPSHOT_HEADER_BYTES..]).map_err(|e| e.to_string())?;
    if generations.len() > SNAPSHOTS_KEPT {
        return Err(format!("{} generations", generations.len()));
    }
    for g in &generations {
        let consistent = match g.anchor {
            None => g.end_offset == 0,
            Some(a) => a.base_offset <= a.last_offset && a.last_offset + 1 == g.end_offset,
        };
        if !consistent {
            return Err(format!(
                "snapshot at {} with anchor {:?}",
                g.end_offset, g.anchor
            ));
        }
    }
    Ok(generations)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Append,
    /// A retry of a batch already in the log, at this base offset.
    Duplicate {
        base_offset: i64,
    },
    Reject {
        error_code: i16,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerTable {
    producers: BTreeMap<i64, ProducerEntry>,
}

/// Sequence numbers wrap from i32::MAX to 0.
pub fn next_seq(seq: i32) -> i32 {
    if seq == i32::MAX {
        0
    } else {
        seq + 1
    }
}

/// Last sequence of a batch whose first is `first_seq` and which spans `last_offset_delta`.
pub fn last_seq(first_seq: i32, last_offset_delta: i32) -> i32 {
    ((first_seq as i64 + last_offset_delta as i64) % (i32::MAX as i64 + 1)) as i32
}

impl ProducerTable {
    pub fn len(&self) -> usize {
        self.producers.len()
    }
    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }
    pub fn get(&self, producer_id: i64) -> Option<&ProducerEntry> {
        self.producers.get(&producer_id)
    }

    pub fn check(&self, producer_id: i64, epoch: i16, first_seq: i32, last_seq: i32) -> Verdict {
        let out_of_order = Verdict::Reject {
            error_code: ResponseError::OutOfOrderSequenceNumber.code(),
        };
        let Some(entry) = self.producers.get(&producer_id) else {
            return if first_seq == 0 {
                Verdict::Append
            } else {
                out_of_order
            };
        };
        if epoch < entry.epoch {
            return Verdict::Reject {
                error_code: ResponseError::InvalidProducerEpoch.code(),
            };
        }
        if epoch > entry.epoch {
            return if first_seq == 0 {
                Verdict::Append
            } else {
                out_of_order
            };
        }
        if let Some(dup) = entry
            .batches
            .iter()
            .find(|b| b.first_seq == first_seq && b.last_seq == last_seq)
        {
            return Verdict::Duplicate {
                base_offset: dup.base_offset,
            };
        }
        match entry.batches.back() {
            Some(last) if first_seq == next_seq(last.last_seq) => Verdict::Append,
            None if first_seq == 0 => Verdict::Append,
            _ => out_of_order,
        }
    }

    /// Records a batch that was appended (or found in the log during recovery).
    pub fn record(&mut self, producer_id: i64, epoch: i16, batch: BatchMeta) {
        if !self.producers.contains_key(&producer_id)
            && self.producers.len() >= MAX_PRODUCERS_PER_PARTITION
        {
            self.evict_oldest();
        }
        let entry = self.producers.entry(producer_id).or_default();
        if epoch != entry.epoch {
            entry.epoch = epoch;
            entry.batches.clear();
        }
        entry.batches.push_back(batch);
        while entry.batches.len() > CACHED_BATCHES_PER_PRODUCER {
            entry.batches.pop_front();
        }
        entry.last_offset = batch.last_offset;
    }

    /// Forgets every batch at or past `log_end` (the log end moved back under them). Returns
    /// false if that left some producer with none of its batches: its last sequence below
    /// `log_end` is then unknown here and the table must be rebuilt from the log.
    #[must_use]
    pub fn truncate(&mut self, log_end: u64) -> bool {
        let mut exact = true;
        self.producers.retain(|_, e| {
            let before = e.batches.len();
            e.batches.retain(|b| b.last_offset < log_end as i64);
            if e.batches.len() == before {
                return true;
            }
            match e.batches.back() {
                Some(last) => {
                    e.last_offset = last.last_offset;
                    true
                }
                None => {
                    exact = false;
                    false
                }
            }
        });
        exact
    }

    fn evict_oldest(&mut self) {
        if let Some((&id, _)) = self.producers.iter().min_by_key(|(_, e)| e.last_offset) {
            self.producers.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(first: i32, last: i32, off: i64) -> BatchMeta {
        BatchMeta {
            first_seq: first,
            last_seq: last,
            base_offset: off,
            last_offset: off + (last - first) as i64,
        }
    }

    #[test]
    fn sequences_duplicates_gaps_and_epochs() {
        let mut t = ProducerTable::default();
        assert_eq!(t.check(7, 0, 3, 4), Verdict::Reject { error_code: 45 });
        assert_eq!(t.check(7, 0, 0, 4), Verdict::Append);
        t.record(7, 0, meta(0, 4, 100));
        assert_eq!(t.check(7, 0, 0, 4), Verdict::Duplicate { base_offset: 100 });
        assert_eq!(t.check(7, 0, 6, 6), Verdict::Reject { error_code: 45 });
        assert_eq!(t.check(7, 0, 5, 9), Verdict::Append);
        t.record(7, 1, meta(0, 0, 200));
        assert_eq!(t.check(7, 0, 5, 9), Verdict::Reject { error_code: 47 });
        assert_eq!(t.check(7, 1, 1, 1), Verdict::Append);
    }

    #[test]
    fn only_the_last_five_batches_are_remembered() {
        let mut t = ProducerTable::default();
        for i in 0..7 {
            t.record(1, 0, meta(i, i, i as i64));
        }
        assert_eq!(t.get(1).unwrap().batches.len(), CACHED_BATCHES_PER_PRODUCER);
        assert_eq!(t.check(1, 0, 6, 6), Verdict::Duplicate { base_offset: 6 });
        assert_eq!(t.check(1, 0, 0, 0), Verdict::Reject { error_code: 45 });
    }

    #[test]
    fn truncation_forgets_the_batches_past_the_new_end() {
        let mut t = ProducerTable::default();
        for i in 0..3 {
            t.record(1, 0, meta(i * 2, i * 2 + 1, 10 * i as i64));
        }
        t.record(2, 0, meta(0, 0, 25));
        assert!(!t.truncate(21), "producer 2 lost its only batch");
        assert!(t.get(2).is_none());
        assert_eq!(
            t.check(1, 0, 4, 5),
            Verdict::Append,
            "its dropped batch again"
        );
        assert_eq!(t.check(1, 0, 2, 3), Verdict::Duplicate { base_offset: 10 });
        assert_eq!(t.get(1).unwrap().last_offset, 11);
        assert!(t.truncate(100), "nothing past the end");
    }

    fn snapshot(end: u64, epoch: i32) -> Snapshot {
        let mut table = ProducerTable::default();
        table.record(9, 1, meta(0, 4, end as i64 - 5));
        Snapshot {
            end_offset: end,
            anchor: Some(Anchor {
                base_offset: end - 5,
                last_offset: end - 1,
                leader_epoch: epoch,
                crc: 0xdead_beef,
            }),
            table,
        }
    }

    #[test]
    fn snapshot_file_round_trips_and_damage_is_refused() {
        let (newer, older) = (snapshot(100, 3), snapshot(50, 2));
        let file = encode_snapshots(&[&newer, &older]).unwrap();
        assert_eq!(decode_snapshots(&file).unwrap(), vec![newer.clone(), older]);
        let empty = Snapshot {
            end_offset: 0,
            anchor: None,
            table: ProducerTable::default(),
        };
        let one = encode_snapshots(&[&empty]).unwrap();
        assert_eq!(decode_snapshots(&one).unwrap(), vec![empty]);
        // Every flipped byte and every torn length is refused, never misread.
        for i in 0..file.len() {
            let mut bad = file.clone();
            bad[i] ^= 0x40;
            assert!(decode_snapshots(&bad).is_err(), "byte {i} flipped");
        }
        for len in 0..file.len() {
            assert!(decode_snapshots(&file[..len]).is_err(), "torn at {len}");
        }
        // The format before this one (bare JSON) is not a snapshot: rebuilt from the log.
        let old = br#"{"end_offset":5,"table":{"producers":{}}}"#;
        assert!(decode_snapshots(old).is_err());
    }

    #[test]
    fn snapshot_whose_anchor_does_not_end_it_is_refused() {
        let mut s = snapshot(100, 1);
        s.anchor.as_mut().unwrap().last_offset = 98;
        assert!(decode_snapshots(&encode_snapshots(&[&s]).unwrap()).is_err());
        s.anchor = None;
        assert!(decode_snapshots(&encode_snapshots(&[&s]).unwrap()).is_err());
    }

    #[test]
    fn sequence_wraps() {
        assert_eq!(next_seq(i32::MAX), 0);
        assert_eq!(last_seq(i32::MAX, 1), 0);
        assert_eq!(last_seq(5, 3), 8);
    }
}
