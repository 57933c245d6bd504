//! Which shard of this node owns which partition replica. Placement is decided here, by one
//! rule, and used by the metadata store (to enforce the per-shard limit when a topic is
//! created), by each shard (to open the replicas it owns at start-up and on creation) and by
//! the router (to send a partition's work to its owner).

/// The shard owning a partition among `shards`: fixed for a given topic, partition and shard
/// count, and consecutive partitions of a topic land on consecutive shards (the metadata store
/// counts partitions per shard on that rule).
pub fn shard_of(topic: &str, partition: i32, shards: usize) -> usize {
    let base = crc32c::crc32c(topic.as_bytes()) as u64;
    ((base + partition.max(0) as u64) % shards.max(1) as u64) as usize
}
