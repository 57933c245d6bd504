//! A partition's settings from its topic's configs: the log's (the broker's, overridden by the
//! topic) and the replica's own (cleanup policy, timestamps), parsed through the engine's
//! registry of Kafka topic configs.

use std::collections::BTreeMap;

use spate_engine::clean::CompactionPolicy;
use spate_engine::topic_config::{AlterOp, ConfigValue, TopicConfigs};
use spate_engine::LogConfig;

/// A topic's stored overrides, parsed. They were validated when they were set; one that no
/// longer parses (stored by an older broker) is skipped with a warning rather than keeping the
/// partition from opening.
pub fn parse_topic_configs(set: &BTreeMap<String, String>) -> TopicConfigs {
    let mut out = TopicConfigs::default();
    for (k, v) in set {
        match out.alter([(k.as_str(), AlterOp::Set, Some(v.as_str()))]) {
            Ok(next) => out = next,
            Err(e) => {
                tracing::warn!(config = %k, value = %v, error = %e, "stored topic config ignored")
            }
        }
    }
    out
}

/// Overrides the broker's log settings with a topic's own configs. Retention deletes segments
/// only under `cleanup.policy` `delete`: a compact-only topic keeps every key's latest record
/// however old.
pub fn apply_topic_configs(lc: &mut LogConfig, set: &BTreeMap<String, String>) {
    let parsed = parse_topic_configs(set);
    let overridden = |k: &str| set.contains_key(k);
    let long = |k: &str| match parsed.value(k) {
        ConfigValue::Long(v) => v,
        ConfigValue::Int(v) => i64::from(v),
        _ => unreachable!("{k} is an integer"),
    };
    if overridden("retention.ms") {
        let v = long("retention.ms");
        lc.retention_ms = (v >= 0).then_some(v as u64);
    }
    if overridden("retention.bytes") {
        let v = long("retention.bytes");
        lc.retention_bytes = (v >= 0).then_some(v as u64);
    }
    if overridden("segment.bytes") {
        lc.segment_bytes = long("segment.bytes").max(1) as u64;
    }
    if overridden("segment.ms") {
        lc.segment_ms = Some(long("segment.ms").max(1) as u64);
    }
    if overridden("index.interval.bytes") {
        lc.index_interval_bytes = long("index.interval.bytes").clamp(1, i64::from(u32::MAX)) as u32;
    }
    if overridden("max.message.bytes") {
        lc.max_batch_bytes = long("max.message.bytes").clamp(1, i64::from(u32::MAX)) as u32;
    }
    if !parsed.cleanup_policy().delete {
        lc.retention_ms = None;
        lc.retention_bytes = None;
    }
}

/// What a replica does with its topic's configs beyond the log's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TopicPolicy {
    /// `cleanup.policy` holds `compact`: records need keys, and the cleaner keeps the latest
    /// record of every key.
    pub compact: bool,
    /// `message.timestamp.type=LogAppendTime`: the leader stamps batches with its clock.
    pub log_append_time: bool,
    /// `message.timestamp.before.max.ms` and `after.max.ms` (CreateTime only).
    pub timestamp_before_max_ms: i64,
    pub timestamp_after_max_ms: i64,
    pub compaction: CompactionPolicy,
}

impl Default for TopicPolicy {
    fn default() -> Self {
        TopicPolicy::of(&BTreeMap::new())
    }
}

impl TopicPolicy {
    pub fn of(set: &BTreeMap<String, String>) -> TopicPolicy {
        let parsed = parse_topic_configs(set);
        let (before, after) = parsed.timestamp_bounds_ms();
        TopicPolicy {
            compact: parsed.cleanup_policy().compact,
            log_append_time: parsed.log_append_time(),
            timestamp_before_max_ms: before,
            timestamp_after_max_ms: after,
            compaction: parsed.compaction_policy(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn compact_only_topics_are_not_deleted_by_retention() {
        let mut lc = LogConfig::default();
        apply_topic_configs(&mut lc, &set(&[("cleanup.policy", "compact")]));
        assert_eq!((lc.retention_ms, lc.retention_bytes), (None, None));
        let mut lc = LogConfig::default();
        apply_topic_configs(
            &mut lc,
            &set(&[
                ("cleanup.policy", "compact,delete"),
                ("retention.ms", "1000"),
            ]),
        );
        assert_eq!(lc.retention_ms, Some(1000));
        let p = TopicPolicy::of(&set(&[("cleanup.policy", "delete,compact")]));
        assert!(p.compact && !p.log_append_time);
        assert!(!TopicPolicy::default().compact);
    }

    #[test]
    fn overrides_reach_the_log_config() {
        let mut lc = LogConfig::default();
        apply_topic_configs(
            &mut lc,
            &set(&[
                ("segment.bytes", "1048576"),
                ("segment.ms", "60000"),
                ("retention.bytes", "-1"),
                ("max.message.bytes", "100000"),
            ]),
        );
        assert_eq!(lc.segment_bytes, 1 << 20);
        assert_eq!(lc.segment_ms, Some(60_000));
        assert_eq!(lc.retention_bytes, None);
        assert_eq!(lc.max_batch_bytes, 100_000);
    }
}
