//! The leader-epoch history of a log: the first offset of every epoch that has a batch in it
//! (Kafka's leader-epoch-checkpoint). It answers KIP-101's `end_offset_for_epoch`.

use crate::types::{Epoch, Offset, NO_EPOCH};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EpochHistory {
    /// (epoch, first offset), both strictly increasing.
    entries: Vec<(Epoch, Offset)>,
}

impl EpochHistory {
    /// Builds a history from persisted entries; they must be strictly increasing in both fields.
    pub fn from_entries(entries: Vec<(Epoch, Offset)>) -> Self {
        for w in entries.windows(2) {
            assert!(
                w[0].0 < w[1].0 && w[0].1 < w[1].1,
                "epoch history must increase: {entries:?}"
            );
        }
        EpochHistory { entries }
    }

    pub fn entries(&self) -> &[(Epoch, Offset)] {
        &self.entries
    }

    /// The epoch of the last batch, or `NO_EPOCH` for an empty log.
    pub fn last_epoch(&self) -> Epoch {
        self.entries.last().map_or(NO_EPOCH, |e| e.0)
    }

    /// The first offset of the last epoch, if any.
    pub fn last_start(&self) -> Option<Offset> {
        self.entries.last().map(|e| e.1)
    }

    /// The epoch of the batch holding `offset`; the caller guarantees `offset` is below the log end.
    pub fn epoch_at(&self, offset: Offset) -> Epoch {
        match self.entries.partition_point(|e| e.1 <= offset) {
            0 => NO_EPOCH,
            i => self.entries[i - 1].0,
        }
    }

    /// The epoch of the entry just before `offset` (`NO_EPOCH` at offset 0): what an append at
    /// `offset` must match.
    pub fn epoch_before(&self, offset: Offset) -> Epoch {
        if offset == 0 {
            NO_EPOCH
        } else {
            self.epoch_at(offset - 1)
        }
    }

    /// KIP-101/279: the largest epoch at or below `epoch` present here, and the offset where it
    /// ends (the start of the next epoch, or `log_end` for the last one). `(NO_EPOCH, 0)` when
    /// there is none.
    pub fn end_offset_for_epoch(&self, epoch: Epoch, log_end: Offset) -> (Epoch, Offset) {
        match self.entries.partition_point(|e| e.0 <= epoch) {
            0 => (NO_EPOCH, 0),
            i => {
                let end = self.entries.get(i).map_or(log_end, |next| next.1);
                (self.entries[i - 1].0, end)
            }
        }
    }

    /// Records that a batch of `epoch` starts at `base` (a no-op within the last epoch).
    pub fn append(&mut self, epoch: Epoch, base: Offset) {
        match self.entries.last() {
            Some(&(last, start)) if last == epoch => assert!(base >= start),
            Some(&(last, start)) => {
                assert!(
                    epoch > last && base > start,
                    "epoch {epoch} at {base} after ({last}, {start})"
                );
                self.entries.push((epoch, base));
            }
            None => self.entries.push((epoch, base)),
        }
    }

    /// Forgets every epoch that starts at or after `end`.
    pub fn truncate(&mut self, end: Offset) {
        let keep = self.entries.partition_point(|e| e.1 < end);
        self.entries.truncate(keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_offset_for_epoch_follows_kip_101() {
        let mut h = EpochHistory::default();
        assert_eq!(h.end_offset_for_epoch(3, 0), (NO_EPOCH, 0));
        h.append(1, 0);
        h.append(1, 5);
        h.append(3, 10);
        h.append(6, 20);
        assert_eq!(h.end_offset_for_epoch(0, 30), (NO_EPOCH, 0));
        assert_eq!(h.end_offset_for_epoch(1, 30), (1, 10));
        // Epoch 2 never had a batch here: the answer is the largest epoch below it.
        assert_eq!(h.end_offset_for_epoch(2, 30), (1, 10));
        assert_eq!(h.end_offset_for_epoch(3, 30), (3, 20));
        assert_eq!(h.end_offset_for_epoch(9, 30), (6, 30));
        assert_eq!(h.epoch_at(0), 1);
        assert_eq!(h.epoch_at(19), 3);
        assert_eq!(h.epoch_before(20), 3);
        assert_eq!(h.epoch_before(0), NO_EPOCH);
        h.truncate(20);
        assert_eq!(h.last_epoch(), 3);
        h.truncate(11);
        assert_eq!(h.last_epoch(), 3);
        h.truncate(10);
        assert_eq!(h.last_epoch(), 1);
    }

    #[test]
    #[should_panic(expected = "after")]
    fn an_older_epoch_cannot_follow_a_newer_one() {
        let mut h = EpochHistory::default();
        h.append(4, 0);
        h.append(3, 10);
    }
}
