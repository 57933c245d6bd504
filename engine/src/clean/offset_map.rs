//! The cleaner's key -> latest offset map over the dirty part of a log, bounded in memory.
//!
//! Keys are stored whole (no hash): a hash collision would make the cleaner drop a live record,
//! which Kafka accepts with a 128-bit digest and Spate does not need to. Memory is counted as the
//! key bytes plus a fixed per-entry overhead, and the map refuses a batch whose keys might not
//! fit: the cleaner then ends its pass at that batch and cleans the rest in a later pass.

use std::collections::HashMap;

/// Randomly seeded per map (as std's default), so keys chosen by clients cannot be made to
/// collide; hashing short keys costs a fraction of SipHash, and the map is most of the
/// cleaner's time on logs of small records (`__consumer_offsets`).
type KeyHasher = ahash::RandomState;

/// Bytes charged per entry beyond the key itself: the hash table slot (boxed key pointer and
/// length, offset, control byte, load-factor slack) and the key's heap allocation header.
pub const MAP_ENTRY_OVERHEAD_BYTES: usize = 64;

pub struct OffsetMap {
    entries: HashMap<Box<[u8]>, u64, KeyHasher>,
    used_bytes: usize,
    limit_bytes: usize,
}

impl OffsetMap {
    pub fn new(limit_bytes: usize) -> OffsetMap {
        OffsetMap {
            entries: HashMap::with_hasher(KeyHasher::new()),
            used_bytes: 0,
            limit_bytes,
        }
    }

    /// Bytes one entry for `key_len` bytes of key is charged.
    pub fn entry_bytes(key_len: usize) -> usize {
        key_len + MAP_ENTRY_OVERHEAD_BYTES
    }

    /// Whether `more_bytes` (from [`Self::entry_bytes`]) more would still fit.
    pub fn has_room(&self, more_bytes: usize) -> bool {
        self.used_bytes.saturating_add(more_bytes) <= self.limit_bytes
    }

    /// Records that `key` is at `offset` (offsets arrive in increasing order). The caller made
    /// sure of the room with [`Self::has_room`].
    pub fn put(&mut self, key: &[u8], offset: u64) {
        match self.entries.get_mut(key) {
            Some(o) => {
                assert!(*o < offset, "offsets arrive in increasing order");
                *o = offset;
            }
            None => {
                self.used_bytes += Self::entry_bytes(key.len());
                assert!(
                    self.used_bytes <= self.limit_bytes,
                    "offset map over its bound"
                );
                self.entries.insert(key.into(), offset);
            }
        }
    }

    pub fn get(&self, key: &[u8]) -> Option<u64> {
        self.entries.get(key).copied()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn used_bytes(&self) -> usize {
        self.used_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_offset_wins_and_memory_is_counted() {
        let mut m = OffsetMap::new(3 * OffsetMap::entry_bytes(1));
        m.put(b"a", 1);
        m.put(b"b", 2);
        m.put(b"a", 5);
        assert_eq!(
            (m.get(b"a"), m.get(b"b"), m.get(b"c")),
            (Some(5), Some(2), None)
        );
        assert_eq!(m.used_bytes(), 2 * OffsetMap::entry_bytes(1));
        assert!(m.has_room(OffsetMap::entry_bytes(1)));
        assert!(!m.has_room(OffsetMap::entry_bytes(2)));
    }
}
