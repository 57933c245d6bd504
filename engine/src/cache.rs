//! The per-shard cache of recent batches: tailing readers are served from memory.
//!
//! One cache per thread (a shard is one thread), shared by every log of the shard and bounded in
//! bytes; the oldest inserted batches are evicted first. Entries are stamped batches as `Bytes`,
//! so a hit is a reference-count increment, never a copy.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;

/// Default byte budget of one shard's cache.
pub const DEFAULT_SHARD_CACHE_BYTES: usize = 128 << 20;

struct Cached {
    last_offset: u64,
    bytes: Bytes,
}

struct ShardCache {
    limit_bytes: usize,
    used_bytes: usize,
    logs: HashMap<u64, BTreeMap<u64, Cached>>,
    /// Insertion order (log id, base offset); may hold entries already removed.
    fifo: VecDeque<(u64, u64)>,
    live_entries: usize,
}

thread_local! {
    static CACHE: RefCell<ShardCache> = RefCell::new(ShardCache {
        limit_bytes: DEFAULT_SHARD_CACHE_BYTES,
        used_bytes: 0,
        logs: HashMap::new(),
        fifo: VecDeque::new(),
        live_entries: 0,
    });
}

impl ShardCache {
    fn remove(&mut self, log: u64, base: u64) {
        if let Some(map) = self.logs.get_mut(&log) {
            if let Some(c) = map.remove(&base) {
                self.used_bytes -= c.bytes.len();
                self.live_entries -= 1;
            }
        }
    }

    fn evict_to(&mut self, limit: usize) {
        while self.used_bytes > limit {
            let Some((log, base)) = self.fifo.pop_front() else {
                break;
            };
            self.remove(log, base);
        }
        // Removals by truncate/forget leave stale FIFO slots; compact before they pile up.
        if self.fifo.len() > 2 * self.live_entries + 1024 {
            let logs = &self.logs;
            self.fifo
                .retain(|(log, base)| logs.get(log).is_some_and(|m| m.contains_key(base)));
        }
    }

    fn remove_range(&mut self, log: u64, keep: impl Fn(u64, &Cached) -> bool) {
        if let Some(map) = self.logs.get_mut(&log) {
            let before = map.len();
            let mut freed = 0;
            map.retain(|base, c| {
                let k = keep(*base, c);
                if !k {
                    freed += c.bytes.len();
                }
                k
            });
            self.live_entries -= before - map.len();
            self.used_bytes -= freed;
        }
    }
}

/// Sets this shard's cache budget (0 disables caching), evicting at once if needed.
pub fn set_shard_cache_bytes(limit_bytes: usize) {
    CACHE.with_borrow_mut(|c| {
        c.limit_bytes = limit_bytes;
        c.evict_to(limit_bytes);
    });
}

/// Bytes of batches this shard's cache holds now.
pub fn shard_cache_used_bytes() -> usize {
    CACHE.with_borrow(|c| c.used_bytes)
}

pub(crate) fn insert(log: u64, base: u64, last_offset: u64, bytes: Bytes) {
    CACHE.with_borrow_mut(|c| {
        if bytes.len() > c.limit_bytes {
            return;
        }
        let len = bytes.len();
        let map = c.logs.entry(log).or_default();
        if let Some(old) = map.insert(base, Cached { last_offset, bytes }) {
            c.used_bytes -= old.bytes.len();
        } else {
            c.live_entries += 1;
        }
        c.used_bytes += len;
        c.fifo.push_back((log, base));
        let limit = c.limit_bytes;
        c.evict_to(limit);
    });
}

/// The cached batch containing `offset`, as (base offset, last offset, bytes).
pub(crate) fn get(log: u64, offset: u64) -> Option<(u64, u64, Bytes)> {
    CACHE.with_borrow(|c| {
        let (base, e) = c.logs.get(&log)?.range(..=offset).next_back()?;
        (e.last_offset >= offset).then(|| (*base, e.last_offset, e.bytes.clone()))
    })
}

/// Drops every cached batch of `log` at or after `offset` (truncation).
pub(crate) fn remove_from(log: u64, offset: u64) {
    CACHE.with_borrow_mut(|c| c.remove_range(log, |base, _| base < offset));
}

/// Drops every cached batch of `log` ending below `offset` (retention).
pub(crate) fn remove_below(log: u64, offset: u64) {
    CACHE.with_borrow_mut(|c| c.remove_range(log, |_, e| e.last_offset >= offset));
}

/// Drops everything cached for `log` (close, delete).
pub(crate) fn forget(log: u64) {
    CACHE.with_borrow_mut(|c| {
        c.remove_range(log, |_, _| false);
        c.logs.remove(&log);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_fifo_and_range_removal() {
        set_shard_cache_bytes(1000);
        for i in 0..20u64 {
            insert(1, i * 10, i * 10 + 9, Bytes::from(vec![0u8; 100]));
        }
        assert_eq!(shard_cache_used_bytes(), 1000);
        assert!(get(1, 5).is_none(), "oldest evicted");
        assert_eq!(get(1, 195).map(|(b, l, _)| (b, l)), Some((190, 199)));
        remove_from(1, 150);
        assert!(get(1, 155).is_none());
        assert!(get(1, 145).is_some());
        remove_below(1, 130);
        assert!(get(1, 125).is_none());
        assert_eq!(shard_cache_used_bytes(), 200);
        forget(1);
        assert_eq!(shard_cache_used_bytes(), 0);
        set_shard_cache_bytes(DEFAULT_SHARD_CACHE_BYTES);
    }
}
