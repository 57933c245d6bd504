//! Idempotent-producer bookkeeping for one partition, without I/O: for each producer id, its
//! epoch and the sequence ranges of its last few batches, so retries are recognised as
//! duplicates and gaps as out-of-order.

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

    #[test]
    fn sequence_wraps() {
        assert_eq!(next_seq(i32::MAX), 0);
        assert_eq!(last_seq(i32::MAX, 1), 0);
        assert_eq!(last_seq(5, 3), 8);
    }
}
