//! Limits and timeouts of the group coordinator.

/// Kafka's default `offset.metadata.max.bytes`.
pub const DEFAULT_OFFSET_METADATA_MAX_BYTES: usize = 4096;

/// Kafka's default `offsets.topic.replication.factor`.
pub const DEFAULT_OFFSETS_TOPIC_REPLICATION_FACTOR: u16 = 3;

/// Settings of the group coordinator. Defaults follow the Kafka broker's, except the number of
/// `__consumer_offsets` partitions (Kafka: 50), which is kept small because each partition is a
/// log with its own files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupConfig {
    /// Partitions of the internal `__consumer_offsets` topic; a group lives on
    /// `partition_for(group_id, offsets_topic_partitions)`. Must never change once data exists.
    pub offsets_topic_partitions: i32,
    /// Smallest session timeout a member may ask for (`group.min.session.timeout.ms`).
    pub min_session_timeout_ms: i32,
    /// Largest session timeout a member may ask for (`group.max.session.timeout.ms`).
    pub max_session_timeout_ms: i32,
    /// How long the first rebalance of an empty group waits for more members
    /// (`group.initial.rebalance.delay.ms`); each new member extends it by this much, up to the
    /// rebalance timeout.
    pub initial_rebalance_delay_ms: i64,
    /// Most members (including ids handed out but not yet joined) in one group.
    pub max_group_members: usize,
    /// Most groups one coordinator holds; new groups beyond this are refused.
    pub max_groups: usize,
    /// Longest metadata string stored with a committed offset.
    pub offset_metadata_max_bytes: usize,
    /// How long the offsets of an empty group are kept after it became empty (or after the last
    /// commit, whichever is later) (`offsets.retention.minutes`, here in ms).
    pub offsets_retention_ms: i64,
    /// How often `tick` looks for expired offsets (`offsets.retention.check.interval.ms`).
    pub offsets_retention_check_interval_ms: i64,
    /// Most topics plus partitions accepted in one OffsetCommit or OffsetFetch request.
    pub max_partitions_per_request: usize,
    /// Replicas of each `__consumer_offsets` partition in a cluster
    /// (`offsets.topic.replication.factor`), capped at the live brokers when the topic is
    /// created. A single node keeps one.
    pub offsets_topic_replication_factor: u16,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            offsets_topic_partitions: 8,
            min_session_timeout_ms: 6_000,
            max_session_timeout_ms: 1_800_000,
            initial_rebalance_delay_ms: 3_000,
            max_group_members: 1_000,
            max_groups: 100_000,
            offset_metadata_max_bytes: DEFAULT_OFFSET_METADATA_MAX_BYTES,
            offsets_retention_ms: 7 * 24 * 60 * 60 * 1_000,
            offsets_retention_check_interval_ms: 600_000,
            max_partitions_per_request: 100_000,
            offsets_topic_replication_factor: DEFAULT_OFFSETS_TOPIC_REPLICATION_FACTOR,
        }
    }
}

impl GroupConfig {
    /// Checks the settings; the message names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if self.offsets_topic_partitions < 1 {
            return Err("offsets_topic_partitions must be at least 1".into());
        }
        if self.min_session_timeout_ms < 1
            || self.min_session_timeout_ms > self.max_session_timeout_ms
        {
            return Err("need 1 <= min_session_timeout_ms <= max_session_timeout_ms".into());
        }
        if self.initial_rebalance_delay_ms < 0 {
            return Err("initial_rebalance_delay_ms must not be negative".into());
        }
        if self.max_group_members < 1 || self.max_groups < 1 {
            return Err("max_group_members and max_groups must be at least 1".into());
        }
        if self.offsets_topic_replication_factor < 1 {
            return Err("offsets_topic_replication_factor must be at least 1".into());
        }
        if self.offsets_retention_ms < 1 || self.offsets_retention_check_interval_ms < 1 {
            return Err("offsets_retention_ms and its check interval must be positive".into());
        }
        Ok(())
    }
}
