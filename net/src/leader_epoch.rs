//! Leader epochs as Kafka clients use them, sans-IO: the fencing of a request's
//! `current_leader_epoch` (KIP-320), the end offset of an epoch (OffsetForLeaderEpoch, KIP-101)
//! and the diverging epoch a Fetch answers when a consumer's last fetched epoch ended before its
//! position (KIP-320, Fetch v12+). The handlers feed these the partition's epoch history, its
//! current epoch and its log end, read on the owning shard.

use kafka_protocol::ResponseError;

/// Kafka's "no epoch" (`RecordBatch.NO_PARTITION_LEADER_EPOCH`, `UNDEFINED_EPOCH`): as a
/// request's `current_leader_epoch` it asks for no check; in an answer it says "unknown".
pub const UNDEFINED_EPOCH: i32 = -1;
/// The end offset answered with [`UNDEFINED_EPOCH`].
pub const UNDEFINED_EPOCH_OFFSET: i64 = -1;

/// Checks a request's `current_leader_epoch` against the epoch of the leader answering it.
/// Older: the client's metadata is stale (FENCED_LEADER_EPOCH, it refreshes). Newer: this
/// broker has not yet learned of that epoch (UNKNOWN_LEADER_EPOCH, it retries).
pub fn check_current_epoch(requested: i32, ours: i32) -> Result<(), i16> {
    if requested == UNDEFINED_EPOCH {
        Ok(())
    } else if requested < ours {
        Err(ResponseError::FencedLeaderEpoch.code())
    } else if requested > ours {
        Err(ResponseError::UnknownLeaderEpoch.code())
    } else {
        Ok(())
    }
}

/// A partition's epochs as the leader knows them: `history` is (epoch, first offset) of each
/// epoch with batches in the log, ascending; `current` is the leader's epoch, which Kafka's
/// leader always counts as its latest even before it wrote a batch in it (it is assigned at the
/// log end when leadership starts).
#[derive(Clone, Copy, Debug)]
pub struct EpochLog<'a> {
    pub history: &'a [(i32, u64)],
    pub current: i32,
    pub log_start: u64,
    pub log_end: u64,
}

impl EpochLog<'_> {
    /// The latest epoch: the current one if the log has nothing newer.
    fn latest(&self) -> Option<i32> {
        let last = self.history.last().map(|&(e, _)| e);
        match last {
            Some(e) if e >= self.current => Some(e),
            _ if self.current >= 0 => Some(self.current),
            other => other,
        }
    }

    /// The first offset of the first epoch after `epoch`, counting the current epoch (which
    /// starts at the log end when no batch of it is written yet).
    fn start_after(&self, epoch: i32) -> Option<u64> {
        self.history
            .iter()
            .find(|&&(e, _)| e > epoch)
            .map(|&(_, start)| start)
            .or_else(|| (self.current > epoch).then_some(self.log_end))
    }

    /// OffsetForLeaderEpoch's answer for `requested`, as Kafka's `LeaderEpochFileCache.endOffsetFor`
    /// gives it: the largest epoch at or below `requested` and the start offset of the epoch
    /// after it (the log end for the latest epoch). An epoch below the first known gets itself
    /// and the first known epoch's start (older history was removed with its data, so a
    /// follower or consumer truncates to where the log begins); one above the latest, or any
    /// epoch of a log with none, is undefined (-1, -1).
    pub fn end_offset_for(&self, requested: i32) -> (i32, i64) {
        let undefined = (UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET);
        if requested == UNDEFINED_EPOCH {
            return undefined;
        }
        let Some(latest) = self.latest() else {
            return undefined;
        };
        if requested == latest {
            return (requested, self.log_end as i64);
        }
        let Some(next_start) = self.start_after(requested) else {
            return undefined;
        };
        let floor = self
            .history
            .iter()
            .rev()
            .find(|&&(e, _)| e <= requested)
            .map(|&(e, _)| e);
        (floor.unwrap_or(requested), next_start as i64)
    }

    /// Fetch v12's check of a fetcher's `last_fetched_epoch` (KIP-320): `Ok(Some((epoch,
    /// end)))` when the log diverged from what the fetcher holds (that epoch ended before
    /// `fetch_offset`, or the leader never had it): the fetcher truncates to `end` and fetches
    /// no records this time. A negative `last_fetched_epoch` skips the check. The error is a
    /// Kafka error code (OFFSET_OUT_OF_RANGE when the epoch's end cannot be told, as Kafka).
    pub fn diverging_epoch(
        &self,
        last_fetched_epoch: i32,
        fetch_offset: i64,
    ) -> Result<Option<(i32, i64)>, i16> {
        if last_fetched_epoch < 0 {
            return Ok(None);
        }
        let (epoch, end) = self.end_offset_for(last_fetched_epoch);
        let out_of_range = ResponseError::OffsetOutOfRange.code();
        if epoch == UNDEFINED_EPOCH || end == UNDEFINED_EPOCH_OFFSET {
            return Err(out_of_range);
        }
        if fetch_offset < self.log_start as i64 {
            return Err(out_of_range);
        }
        if epoch < last_fetched_epoch || end < fetch_offset {
            return Ok(Some((epoch, end)));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FENCED: i16 = 74;
    const UNKNOWN: i16 = 75;
    const OUT_OF_RANGE: i16 = 1;

    fn log(history: &[(i32, u64)], current: i32, log_end: u64) -> EpochLog<'_> {
        EpochLog {
            history,
            current,
            log_start: history.first().map_or(log_end, |&(_, s)| s),
            log_end,
        }
    }

    #[test]
    fn error_codes_are_kafkas() {
        assert_eq!(ResponseError::FencedLeaderEpoch.code(), FENCED);
        assert_eq!(ResponseError::UnknownLeaderEpoch.code(), UNKNOWN);
        assert_eq!(ResponseError::OffsetOutOfRange.code(), OUT_OF_RANGE);
    }

    #[test]
    fn current_epoch_fencing() {
        assert_eq!(check_current_epoch(-1, 5), Ok(()));
        assert_eq!(check_current_epoch(5, 5), Ok(()));
        assert_eq!(check_current_epoch(4, 5), Err(FENCED));
        assert_eq!(check_current_epoch(0, 5), Err(FENCED));
        assert_eq!(check_current_epoch(6, 5), Err(UNKNOWN));
        assert_eq!(check_current_epoch(-1, 0), Ok(()));
        assert_eq!(check_current_epoch(1, 0), Err(UNKNOWN));
    }

    #[test]
    fn end_offset_of_each_epoch() {
        // Epoch 1 from 0, 3 from 10, 7 from 25; the log ends at 40, the leader is in 7.
        let h = [(1, 0), (3, 10), (7, 25)];
        let l = log(&h, 7, 40);
        assert_eq!(l.end_offset_for(1), (1, 10));
        assert_eq!(
            l.end_offset_for(2),
            (1, 10),
            "no epoch 2: the largest below"
        );
        assert_eq!(l.end_offset_for(3), (3, 25));
        assert_eq!(l.end_offset_for(6), (3, 25));
        assert_eq!(
            l.end_offset_for(7),
            (7, 40),
            "the latest ends at the log end"
        );
        assert_eq!(l.end_offset_for(8), (-1, -1), "above the latest: undefined");
        assert_eq!(l.end_offset_for(-1), (-1, -1));
        assert_eq!(
            l.end_offset_for(0),
            (0, 0),
            "below the first known: itself, ending where the first known starts"
        );
    }

    #[test]
    fn the_current_epoch_counts_before_its_first_batch() {
        // A new leader in epoch 9 whose log holds epochs 1 and 3 only.
        let h = [(1, 0), (3, 10)];
        let l = log(&h, 9, 30);
        assert_eq!(l.end_offset_for(3), (3, 30), "epoch 3 ended where 9 began");
        assert_eq!(l.end_offset_for(5), (3, 30));
        assert_eq!(l.end_offset_for(9), (9, 30));
        assert_eq!(l.end_offset_for(10), (-1, -1));
        // A single node: epoch 0, an empty log.
        let single = log(&[], 0, 0);
        assert_eq!(single.end_offset_for(0), (0, 0));
        assert_eq!(single.end_offset_for(1), (-1, -1));
        let single = log(&[(0, 0)], 0, 12);
        assert_eq!(single.end_offset_for(0), (0, 12));
        // No epoch at all (nothing known): undefined.
        assert_eq!(log(&[], -1, 0).end_offset_for(0), (-1, -1));
    }

    #[test]
    fn diverging_epoch_is_answered_when_the_fetcher_went_past_its_epochs_end() {
        let h = [(1, 0), (3, 10), (7, 25)];
        let l = log(&h, 7, 40);
        // Consistent: epoch 3 ends at 25, the fetcher is at or below it.
        assert_eq!(l.diverging_epoch(3, 25), Ok(None));
        assert_eq!(l.diverging_epoch(3, 12), Ok(None));
        assert_eq!(l.diverging_epoch(7, 40), Ok(None));
        // The fetcher wrote epoch 3 up to 28, but the leader's epoch 3 ended at 25.
        assert_eq!(l.diverging_epoch(3, 28), Ok(Some((3, 25))));
        // The fetcher has an epoch 5 the leader never had: truncate to the end of 3.
        assert_eq!(l.diverging_epoch(5, 26), Ok(Some((3, 25))));
        assert_eq!(l.diverging_epoch(5, 20), Ok(Some((3, 25))));
        // Skipped without a last fetched epoch.
        assert_eq!(l.diverging_epoch(-1, 1_000), Ok(None));
        // An epoch the leader cannot place, or a position before the log: out of range.
        assert_eq!(l.diverging_epoch(8, 41), Err(OUT_OF_RANGE));
        let trimmed = EpochLog {
            history: &h,
            current: 7,
            log_start: 12,
            log_end: 40,
        };
        assert_eq!(trimmed.diverging_epoch(3, 11), Err(OUT_OF_RANGE));
    }
}
