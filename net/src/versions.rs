//! The one table of API versions this broker advertises in ApiVersions and accepts.
//!
//! Ranges are what the handlers really implement and what librdkafka 2.x, kafka-python and the
//! Java client accept; none needs topic ids in Produce or Fetch requests (Produce v13+ and Fetch
//! v13+ do, so they are left out). Produce v10 (KIP-951) is v9 with the leader hints of a
//! NOT_LEADER_OR_FOLLOWER answer; v11-12 are left out because they only add transaction
//! semantics (KIP-890) this broker does not implement. OffsetForLeaderEpoch starts at v2: the
//! codec, like Kafka 4.0 (KIP-896), has no v0-1, and every client that validates positions
//! (librdkafka, the Java consumer) sends v2 or later.

use kafka_protocol::messages::ApiKey;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Supported {
    pub key: ApiKey,
    /// Advertised and served: every version in `min..=max` is answered by its handler.
    pub min: i16,
    pub max: i16,
}

const fn api(key: ApiKey, min: i16, max: i16) -> Supported {
    Supported { key, min, max }
}

/// Produce v0-v2 carry magic 0/1 message sets, which this broker does not store; as in Kafka
/// 4.0 (KIP-896) they are not advertised, and a request for one still gets UNSUPPORTED_VERSION
/// in its own layout rather than a closed connection. librdkafka up to 2.11.0 sends gzip,
/// snappy and lz4 batches uncompressed to a broker whose Produce floor is above 0 (2.11.1
/// fixed that), as it does against Kafka 4.0: the price of not advertising what is refused.
pub const PRODUCE_SERVED_MIN_VERSION: i16 = 3;

pub const SUPPORTED: &[Supported] = &[
    api(ApiKey::Produce, PRODUCE_SERVED_MIN_VERSION, 10),
    api(ApiKey::Fetch, 4, 12),
    api(ApiKey::ListOffsets, 1, 7),
    api(ApiKey::OffsetForLeaderEpoch, 2, 4),
    api(ApiKey::Metadata, 0, 12),
    api(ApiKey::ApiVersions, 0, 3),
    api(ApiKey::CreateTopics, 2, 7),
    api(ApiKey::DeleteTopics, 1, 6),
    api(ApiKey::InitProducerId, 0, 4),
    api(ApiKey::DescribeConfigs, 1, 4),
    api(ApiKey::IncrementalAlterConfigs, 0, 1),
    api(ApiKey::AlterConfigs, 0, 2),
    api(ApiKey::CreatePartitions, 0, 3),
    api(ApiKey::DescribeCluster, 0, 2),
    api(ApiKey::DescribeQuorum, 0, 2),
    // A node without `--seeds` answers it INVALID_REQUEST ("not a cluster") in its layout.
    api(ApiKey::UnregisterBroker, 0, 0),
    // Preferred-leader elections; UNCLEAN (v1+) is answered ELIGIBLE_LEADERS_NOT_AVAILABLE.
    api(ApiKey::ElectLeaders, 0, 2),
    // Replica moves (KIP-455); a node without `--seeds` refuses Alter with INVALID_REQUEST.
    api(ApiKey::AlterPartitionReassignments, 0, 0),
    api(ApiKey::ListPartitionReassignments, 0, 0),
    // Partition sizes per node (what a move's progress is read from; one log dir, no futures).
    // v0 is not in the message definitions this build decodes with.
    api(ApiKey::DescribeLogDirs, 1, 4),
    // Consumer groups (net/src/group/).
    api(ApiKey::FindCoordinator, 0, 4),
    api(ApiKey::JoinGroup, 0, 9),
    api(ApiKey::SyncGroup, 0, 5),
    api(ApiKey::Heartbeat, 0, 4),
    api(ApiKey::LeaveGroup, 0, 5),
    api(ApiKey::OffsetCommit, 2, 8),
    api(ApiKey::OffsetFetch, 1, 8),
    api(ApiKey::DescribeGroups, 0, 5),
    api(ApiKey::ListGroups, 0, 5),
    api(ApiKey::DeleteGroups, 0, 2),
    api(ApiKey::OffsetDelete, 0, 0),
];

pub fn lookup(key: ApiKey) -> Option<&'static Supported> {
    SUPPORTED.iter().find(|s| s.key == key)
}

/// True if a request of this version is served by its handler.
pub fn is_served(key: ApiKey, version: i16) -> bool {
    lookup(key).is_some_and(|s| version >= s.min && version <= s.max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_ranges_are_decodable_by_the_codec() {
        for s in SUPPORTED {
            let codec = s.key.valid_versions();
            assert!(s.min <= s.max, "{:?}", s.key);
            assert!(s.min >= codec.min && s.max <= codec.max, "{:?}", s.key);
        }
    }
}
