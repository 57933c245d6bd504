//! Compaction of a `__consumer_offsets` partition, sans-IO: which records are live, and when
//! the partition should rewrite them.
//!
//! Kafka compacts `__consumer_offsets` in the background, keeping the latest record per key.
//! Here the partition's writer keeps that map itself (every record it writes or replays goes
//! through [`LiveRecords::apply`]). Once enough has been appended since the last rewrite, the
//! writer appends every live record again (a snapshot, in the log's own order after everything
//! before it) and then deletes the whole segments below the snapshot's start. Replaying what
//! remains (a tail of the old log, then the snapshot) ends in the same state as replaying the
//! whole log, because the snapshot holds the last value of every key still live and any key
//! not in it was last written as a tombstone.

use std::collections::BTreeMap;

use bytes::Bytes;
use spate_replication::partition::BATCH_HEADER_BYTES;

use super::records::RawRecord;

/// Per-record overhead in a RecordBatch v2 beyond key and value (lengths, deltas, attributes),
/// rounded up; used only to size snapshot batches.
const RECORD_OVERHEAD_BYTES: usize = 32;

/// The latest value of every live key of one partition, and the bytes appended since the
/// last snapshot.
#[derive(Debug, Default)]
pub struct LiveRecords {
    live: BTreeMap<Bytes, Bytes>,
    live_bytes: u64,
    appended_since_snapshot: u64,
}

impl LiveRecords {
    /// Applies one record in log order: a value replaces the key's previous one, a tombstone
    /// removes the key.
    pub fn apply(&mut self, key: Bytes, value: Option<Bytes>) {
        let key_len = key.len() as u64;
        match value {
            Some(v) => {
                let v_len = v.len() as u64;
                match self.live.insert(key, v) {
                    Some(old) => self.live_bytes -= old.len() as u64,
                    None => self.live_bytes += key_len,
                }
                self.live_bytes += v_len;
            }
            None => {
                if let Some(old) = self.live.remove(&key) {
                    self.live_bytes -= key_len + old.len() as u64;
                }
            }
        }
    }

    /// Counts bytes appended to the log (records and replays both count: what is in the log
    /// beyond the live set is what a snapshot would reclaim).
    pub fn note_appended(&mut self, bytes: u64) {
        self.appended_since_snapshot += bytes;
    }

    pub fn live_keys(&self) -> usize {
        self.live.len()
    }

    /// Whether the log has grown enough to rewrite: at least `min_bytes` since the last
    /// snapshot, and at least twice the live set, so rewriting costs at most a third of what
    /// is written (no snapshot storms when the live set itself is large).
    pub fn should_snapshot(&self, min_bytes: u64) -> bool {
        self.appended_since_snapshot >= min_bytes.max(self.live_bytes.saturating_mul(2))
    }

    /// The live records grouped into batches of at most `max_records` records and about
    /// `max_batch_bytes` bytes (a single record larger than that gets a batch of its own: it
    /// was accepted at that size when first written). Resets the appended count: the caller is
    /// about to write them.
    pub fn snapshot(&mut self, max_records: usize, max_batch_bytes: usize) -> Vec<Vec<RawRecord>> {
        assert!(max_records > 0);
        self.appended_since_snapshot = 0;
        let mut batches = Vec::new();
        let mut current: Vec<RawRecord> = Vec::new();
        let mut current_bytes = BATCH_HEADER_BYTES;
        for (k, v) in &self.live {
            let size = k.len() + v.len() + RECORD_OVERHEAD_BYTES;
            if !current.is_empty()
                && (current.len() == max_records || current_bytes + size > max_batch_bytes)
            {
                batches.push(std::mem::take(&mut current));
                current_bytes = BATCH_HEADER_BYTES;
            }
            current.push((k.clone(), Some(v.clone())));
            current_bytes += size;
        }
        if !current.is_empty() {
            batches.push(current);
        }
        batches
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn keeps_the_last_value_per_key_and_forgets_tombstoned_keys() {
        let mut live = LiveRecords::default();
        live.apply(b("a"), Some(b("1")));
        live.apply(b("b"), Some(b("22")));
        live.apply(b("a"), Some(b("333")));
        live.apply(b("c"), Some(b("4")));
        live.apply(b("c"), None);
        live.apply(b("never"), None);
        assert_eq!(live.live_keys(), 2);
        assert_eq!(live.live_bytes, (1 + 3) + (1 + 2));
        let batches = live.snapshot(100, 1 << 20);
        assert_eq!(
            batches,
            vec![vec![(b("a"), Some(b("333"))), (b("b"), Some(b("22")))]]
        );
    }

    #[test]
    fn snapshots_when_the_log_outgrows_the_live_set() {
        let mut live = LiveRecords::default();
        for i in 0..10 {
            live.apply(b(&format!("k{i}")), Some(Bytes::from(vec![0u8; 98])));
        }
        // 1000 live bytes: twice that must be appended, and at least the minimum.
        live.note_appended(1_999);
        assert!(!live.should_snapshot(100));
        live.note_appended(1);
        assert!(live.should_snapshot(100));
        assert!(!live.should_snapshot(5_000));
        let batches = live.snapshot(4, 1 << 20);
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        assert!(!live.should_snapshot(0));
        // Byte-bounded batches: each record is 100 + 32 bytes of batch space.
        let batches = live.snapshot(100, BATCH_HEADER_BYTES + 3 * 132);
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![3, 3, 3, 1]
        );
    }
}
