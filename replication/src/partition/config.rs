//! A partition's log settings: the broker's, overridden by its topic's configs.

use std::collections::BTreeMap;

use spate_engine::LogConfig;

/// Overrides the broker's log settings with a topic's own configs.
pub fn apply_topic_configs(lc: &mut LogConfig, set: &BTreeMap<String, String>) {
    let num = |k: &str| set.get(k).and_then(|v| v.parse::<i64>().ok());
    if let Some(v) = num("retention.ms") {
        lc.retention_ms = (v >= 0).then_some(v as u64);
    }
    if let Some(v) = num("retention.bytes") {
        lc.retention_bytes = (v >= 0).then_some(v as u64);
    }
    if let Some(v) = num("segment.bytes").filter(|v| *v > 0) {
        lc.segment_bytes = v as u64;
    }
    if let Some(v) = num("max.message.bytes").filter(|v| *v > 0) {
        lc.max_batch_bytes = v.min(u32::MAX as i64) as u32;
    }
}
