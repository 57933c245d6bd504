//! Which shard of this node owns which partition replica.
//!
//! Placement is decided once per partition, when its topic (or CreatePartitions) is created,
//! on the least-loaded shard, and stored in the topic metadata ([`crate::metadata`]); the
//! store re-places partitions only at start-up, when `--cores` shrank below a stored shard.
//! A [`ShardTable`] is a shard's read-only snapshot of that placement: the router sends a
//! partition's work by it, and each shard opens the replicas it names for it.

use std::collections::{BTreeMap, HashMap};

use crate::metadata::TopicMeta;

/// The placement rule used before placement was stored (a hash of the topic name, consecutive
/// partitions on consecutive shards). Still used for data dirs written then (so their logs
/// open on the same shard as before) and for `__consumer_offsets`, whose partitions are not
/// in the topic table: its partition count is fixed, so the hash spreads them evenly.
pub fn shard_of(topic: &str, partition: i32, shards: usize) -> usize {
    let base = crc32c::crc32c(topic.as_bytes()) as u64;
    ((base + partition.max(0) as u64) % shards.max(1) as u64) as usize
}

/// Partitions per shard among `shards`, counting every stored placement below `shards`.
pub fn shard_loads<'a>(
    topics: impl IntoIterator<Item = &'a TopicMeta>,
    shards: usize,
) -> Vec<usize> {
    let mut loads = vec![0usize; shards.max(1)];
    for t in topics {
        for &s in &t.shards {
            if let Some(l) = loads.get_mut(s as usize) {
                *l += 1;
            }
        }
    }
    loads
}

/// The least-loaded shard (the lowest index on a tie).
pub fn least_loaded(loads: &[usize]) -> usize {
    let mut best = 0;
    for (i, &l) in loads.iter().enumerate() {
        if l < loads[best] {
            best = i;
        }
    }
    best
}

/// A snapshot of which shard owns each partition of each topic. Built from the topic metadata;
/// a shard swaps in a new one when topics are created or deleted.
#[derive(Debug, Default)]
pub struct ShardTable {
    shards: usize,
    owners: HashMap<String, Box<[u32]>>,
}

impl ShardTable {
    /// The table of `topics` over `shards` shards. Partitions whose placement is not stored
    /// yet (or names a shard past `shards`) are left out: [`crate::metadata::MetadataStore::settle_placement`]
    /// runs before any table is built, so that only happens to a topic created a moment ago
    /// whose metadata this snapshot predates.
    pub fn from_topics(topics: &BTreeMap<String, TopicMeta>, shards: usize) -> ShardTable {
        let owners = topics
            .values()
            .map(|t| {
                let placed = t.shards.len().min(t.partitions.max(0) as usize);
                (t.name.clone(), t.shards[..placed].into())
            })
            .collect();
        ShardTable { shards, owners }
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The shard owning `partition` of `topic`, if the table knows it.
    pub fn owner(&self, topic: &str, partition: i32) -> Option<usize> {
        let s = *self
            .owners
            .get(topic)?
            .get(usize::try_from(partition).ok()?)? as usize;
        (s < self.shards).then_some(s)
    }

    /// Every (topic, partition) that `shard` owns.
    pub fn owned_by(&self, shard: usize) -> impl Iterator<Item = (&str, i32)> + '_ {
        self.owners.iter().flat_map(move |(topic, owners)| {
            owners
                .iter()
                .enumerate()
                .filter(move |(_, &s)| s as usize == shard)
                .map(move |(p, _)| (topic.as_str(), p as i32))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_loaded_takes_the_lowest_index_on_a_tie() {
        assert_eq!(least_loaded(&[2, 1, 1, 3]), 1);
        assert_eq!(least_loaded(&[0, 0]), 0);
        assert_eq!(least_loaded(&[5, 4, 3]), 2);
    }

    #[test]
    fn hash_placement_is_the_old_rule() {
        // Values from the rule as shipped before placement was stored: data dirs written
        // then depend on it.
        let base = crc32c::crc32c(b"orders") as usize;
        for shards in 1..5 {
            for p in 0..8 {
                assert_eq!(shard_of("orders", p, shards), (base + p as usize) % shards);
            }
        }
    }
}
