//! What a replica needs of its log beyond a leader's appends and reads: reads that stop at an
//! offset (the high watermark, for consumers), appends at the offset and epoch the leader chose
//! (followers), and waiting for durability to pass an offset (acknowledging the leader).
//!
//! Kept apart from `log.rs` so the leader's data path there stays as it is; everything here is
//! built on its public operations plus the log's offset and epoch bookkeeping.

use bytes::Bytes;

use crate::batch::{BatchHeader, VerifiedBatch};
use crate::error::EngineError;
use crate::log::{AppendInfo, JoinedRead, PartitionLog};

/// Told by a log when its durable end advances and when its end moves back; the owner of the
/// log keeps what it derives from them (the high watermark) in step. Called on the log's shard
/// with no log state borrowed, once per group commit (never per batch); it must not call back
/// into the log.
pub trait LogListener {
    /// Every offset below `durable` is on disk; the log ends at `log_end`.
    fn durable(&self, durable: u64, log_end: u64);
    /// The log end moved back to `log_end` (truncation, or a rewind after a failed write).
    fn truncated(&self, log_end: u64);
}

impl PartitionLog {
    /// Like [`Self::read_joined`], but only whole batches that end below `end_offset` (the
    /// first batch included): the read a consumer gets, bounded by the high watermark.
    pub async fn read_joined_below(
        &self,
        offset: u64,
        max_bytes: usize,
        end_offset: u64,
    ) -> Result<JoinedRead, EngineError> {
        if offset >= end_offset {
            let (log_start_offset, log_end_offset) =
                (self.log_start_offset(), self.log_end_offset());
            if offset < log_start_offset || offset > log_end_offset {
                return Err(EngineError::OffsetOutOfRange {
                    offset,
                    log_start: log_start_offset,
                    log_end: log_end_offset,
                });
            }
            return Ok(JoinedRead {
                records: Bytes::new(),
                log_start_offset,
                log_end_offset,
            });
        }
        let mut read = self.read_joined(offset, max_bytes).await?;
        if read.log_end_offset > end_offset {
            // Batches are contiguous in the buffer; cut before the first that reaches the bound
            // (a slice, no copy).
            let cut = whole_batches_below(&read.records, end_offset);
            read.records = read.records.slice(..cut);
        }
        Ok(read)
    }

    /// A follower's append: the batch goes at `base_offset`, which must be this log's end,
    /// under the leader's `leader_epoch`, which must not be below the log's last epoch.
    /// Either failing is refused with [`EngineError::FollowerAppend`] and nothing is written:
    /// the offsets come from another node, so a bad one is input to refuse, not a reason to
    /// crash this one.
    pub async fn append_at(
        &self,
        batch: VerifiedBatch,
        base_offset: u64,
        leader_epoch: i32,
    ) -> Result<AppendInfo, EngineError> {
        // Checked up front so a refused append waits for nothing, and again where the offset
        // is assigned, since the append may wait (a roll, the write-behind) before that.
        {
            let st = self.inner.state.borrow();
            check_follower_append(
                st.log_end,
                st.epochs.last().map(|e| e.0),
                base_offset,
                leader_epoch,
            )?;
        }
        let info = self
            .append_placed(batch, leader_epoch, Some(base_offset))
            .await?;
        debug_assert_eq!(info.base_offset, base_offset);
        Ok(info)
    }

    /// The log's epoch history: (leader epoch, first offset) for each epoch with batches in the
    /// log, ascending. A replica restarting its consensus state reads it from here.
    pub fn epoch_history(&self) -> Vec<(i32, u64)> {
        self.inner.state.borrow().epochs.clone()
    }

    /// Resolves once every offset up to and including `offset` is durable (joining the
    /// fdatasync in flight or starting one), whatever the flush policy.
    pub async fn wait_durable_past(&self, offset: u64) -> Result<(), EngineError> {
        self.sync_to(offset.saturating_add(1)).await?;
        debug_assert!(
            self.durable_offset() > offset || self.log_end_offset() <= offset,
            "sync_to returned before the durable offset passed {offset}"
        );
        Ok(())
    }
}

/// Refuses a follower's append at `base_offset` in `leader_epoch` onto a log ending at
/// `log_end` whose last batch has epoch `last_epoch`.
pub(crate) fn check_follower_append(
    log_end: u64,
    last_epoch: Option<i32>,
    base_offset: u64,
    leader_epoch: i32,
) -> Result<(), EngineError> {
    if base_offset != log_end {
        return Err(EngineError::FollowerAppend(format!(
            "base offset {base_offset} but the log ends at {log_end}"
        )));
    }
    if let Some(last) = last_epoch.filter(|&last| leader_epoch < last) {
        return Err(EngineError::FollowerAppend(format!(
            "leader epoch {leader_epoch} after epoch {last}"
        )));
    }
    Ok(())
}

/// Length of the prefix of `records` (contiguous RecordBatches) whose batches all end below
/// `end_offset`; the first batch counts only if it does too.
fn whole_batches_below(records: &[u8], end_offset: u64) -> usize {
    let mut pos = 0;
    while pos < records.len() {
        let Some(len) = BatchHeader::total_len_from_prefix(&records[pos..]) else {
            break;
        };
        let Some(bytes) = records.get(pos..pos + len) else {
            break;
        };
        let Ok(h) = BatchHeader::parse(bytes) else {
            break;
        };
        if h.last_offset() < 0 || h.last_offset() as u64 >= end_offset {
            break;
        }
        pos += len;
    }
    pos
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal batch header run: base offset, length, and last offset delta set.
    fn batch(base: i64, records: i32) -> Vec<u8> {
        let mut b = vec![0u8; crate::batch::BATCH_HEADER_BYTES];
        b[0..8].copy_from_slice(&base.to_be_bytes());
        let len = (b.len() - 12) as i32;
        b[8..12].copy_from_slice(&len.to_be_bytes());
        b[16] = 2; // magic
        b[23..27].copy_from_slice(&(records - 1).to_be_bytes());
        b
    }

    #[test]
    fn only_batches_ending_below_the_bound_are_kept() {
        let mut all = batch(0, 3);
        all.extend(batch(3, 2));
        all.extend(batch(5, 4));
        let one = batch(0, 3).len();
        assert_eq!(whole_batches_below(&all, 0), 0);
        assert_eq!(whole_batches_below(&all, 2), 0);
        assert_eq!(whole_batches_below(&all, 3), one);
        assert_eq!(whole_batches_below(&all, 4), one);
        assert_eq!(whole_batches_below(&all, 5), 2 * one);
        assert_eq!(whole_batches_below(&all, 9), 3 * one);
        assert_eq!(whole_batches_below(&all, u64::MAX), 3 * one);
    }
}
