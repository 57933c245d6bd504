//! Per-record checks that depend on the topic's configs, beside the batch validation: keys on
//! compacted topics and the CreateTime bounds (`message.timestamp.before.max.ms` /
//! `after.max.ms`).
//!
//! The normal path costs nothing beyond the validation walk: its summary already says whether
//! any key is null and what the records' timestamp range is. Only a batch that fails is walked
//! again, to name its refused records (KIP-467's `record_errors`).

use kafka_protocol::ResponseError;
use spate_engine::validate::{validate_batch_with, BatchSummary, RecordView, RecordVisitor};

use super::config::TopicPolicy;

/// Most record errors one refused partition reports (the rest are counted in the message).
pub const MAX_RECORD_ERRORS: usize = 1024;

/// One refused record: its index among the records of the partition's share of the request,
/// and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordError {
    pub batch_index: i32,
    pub message: String,
}

/// Why a batch's records were refused: a Kafka error code, the partition's error message and
/// the records named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordRefusal {
    pub error_code: i16,
    pub message: String,
    pub record_errors: Vec<RecordError>,
}

/// The timestamp range a CreateTime record must fall in at `now_ms`, or `None` when the
/// topic's bounds let every timestamp through.
fn timestamp_bounds(policy: &TopicPolicy, now_ms: i64) -> Option<(i64, i64)> {
    if policy.log_append_time {
        // The broker's clock replaces the producer's: Kafka checks only CreateTime.
        return None;
    }
    let lo = now_ms.saturating_sub(policy.timestamp_before_max_ms);
    let hi = now_ms.saturating_add(policy.timestamp_after_max_ms);
    (lo > i64::MIN || hi < i64::MAX).then_some((lo, hi))
}

/// The record rules of one partition's share of a Produce request.
pub struct RecordRules<'a> {
    pub policy: &'a TopicPolicy,
    pub topic: &'a str,
    pub partition: i32,
    /// Bound on a batch's decompressed records (as its validation had).
    pub max_uncompressed_bytes: usize,
    pub now_ms: i64,
}

/// Checks a validated batch (`summary` is its validation's) against the topic's record rules.
/// `first_index` is the index of its first record among the partition's records of the request.
pub fn check_records(
    rules: &RecordRules<'_>,
    batch: &[u8],
    summary: &BatchSummary,
    first_index: u32,
) -> Result<(), RecordRefusal> {
    let (policy, now_ms) = (rules.policy, rules.now_ms);
    let keyless = policy.compact && summary.any_null_key;
    let bounds = timestamp_bounds(policy, now_ms);
    let out_of_time = bounds.is_some_and(|(lo, hi)| {
        summary.records > 0 && (summary.min_timestamp < lo || summary.max_timestamp > hi)
    });
    if !keyless && !out_of_time {
        return Ok(());
    }
    let mut namer = Namer {
        compact: policy.compact,
        bounds,
        topic: rules.topic,
        partition: rules.partition,
        index: first_index,
        errors: Vec::new(),
        refused: 0,
        keyless: 0,
    };
    // The batch passed this walk once already; the visitor's errors are collected, not
    // returned, so the walk visits every record.
    let _ = validate_batch_with(batch, rules.max_uncompressed_bytes, &mut namer);
    // Kafka answers INVALID_TIMESTAMP when that is the only problem, INVALID_RECORD otherwise.
    let error_code = if namer.keyless > 0 {
        ResponseError::InvalidRecord.code()
    } else {
        ResponseError::InvalidTimestamp.code()
    };
    let first = namer
        .errors
        .first()
        .map(|e| format!(": record {}: {}", e.batch_index, e.message))
        .unwrap_or_default();
    Err(RecordRefusal {
        error_code,
        message: format!(
            "one or more records were refused ({} of the batch's {}){first}",
            namer.refused, summary.records
        ),
        record_errors: namer.errors,
    })
}

struct Namer<'a> {
    compact: bool,
    bounds: Option<(i64, i64)>,
    topic: &'a str,
    partition: i32,
    index: u32,
    errors: Vec<RecordError>,
    refused: usize,
    keyless: usize,
}

impl RecordVisitor for Namer<'_> {
    fn record(&mut self, r: &RecordView<'_>) -> Result<(), String> {
        let index = self.index;
        self.index += 1;
        let message = if self.compact && r.key.is_none() {
            self.keyless += 1;
            format!(
                "Compacted topic cannot accept message without key in topic partition {}-{}.",
                self.topic, self.partition
            )
        } else {
            match self.bounds {
                Some((lo, hi)) if r.timestamp < lo || r.timestamp > hi => format!(
                    "Timestamp {} of the record is out of range: it must be within [{lo}, {hi}]",
                    r.timestamp
                ),
                _ => return Ok(()),
            }
        };
        self.refused += 1;
        if self.errors.len() < MAX_RECORD_ERRORS {
            self.errors.push(RecordError {
                batch_index: i32::try_from(index).unwrap_or(i32::MAX),
                message,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spate_engine::validate::build::{batch, record};
    use spate_engine::validate::validate_batch;

    const MAX: usize = 1 << 20;

    fn check(
        policy: &TopicPolicy,
        b: &[u8],
        s: &BatchSummary,
        now_ms: i64,
        first: u32,
    ) -> Result<(), RecordRefusal> {
        let rules = RecordRules {
            policy,
            topic: "t",
            partition: 0,
            max_uncompressed_bytes: MAX,
            now_ms,
        };
        check_records(&rules, b, s, first)
    }

    fn policy(compact: bool) -> TopicPolicy {
        TopicPolicy {
            compact,
            ..TopicPolicy::default()
        }
    }

    #[test]
    fn keyless_records_are_named_on_compacted_topics_only() {
        let mut section = record(0, 0, Some(b"k"), Some(b"v"), &[]);
        section.extend(record(1, 0, None, Some(b"v"), &[]));
        let b = batch(&section, 2, 1, 0);
        let s = validate_batch(&b, MAX).unwrap();
        check(&policy(false), &b, &s, 0, 0).unwrap();
        let e = check(&policy(true), &b, &s, 0, 5).unwrap_err();
        assert_eq!(e.error_code, ResponseError::InvalidRecord.code());
        assert_eq!(e.record_errors.len(), 1);
        assert_eq!(e.record_errors[0].batch_index, 6);
        assert!(e.record_errors[0].message.contains("without key"), "{e:?}");
    }

    #[test]
    fn timestamps_outside_the_bounds_are_invalid_timestamp() {
        let now = 1_000_000_000;
        let section = record(0, 0, Some(b"k"), Some(b"v"), &[]);
        let late = batch(&section, 1, 0, 0); // base timestamp 1000: far behind `now`
        let s = validate_batch(&late, MAX).unwrap();
        let mut p = policy(false);
        check(&p, &late, &s, now, 0).unwrap();
        p.timestamp_before_max_ms = 1000;
        let e = check(&p, &late, &s, now, 0).unwrap_err();
        assert_eq!(e.error_code, ResponseError::InvalidTimestamp.code());
        assert_eq!(e.record_errors[0].batch_index, 0);
        p.log_append_time = true;
        check(&p, &late, &s, now, 0).unwrap();
        // The default after.max.ms (one hour) refuses a record from the far future.
        let p = policy(false);
        check(&p, &late, &s, -10_000_000, 0).unwrap_err();
    }
}
