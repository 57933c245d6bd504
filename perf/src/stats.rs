//! Latency histograms (merged sample by sample, never by averaging percentiles), the per-second
//! interval counters, and the run summary written as text and JSON.

use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency a histogram tracks; larger samples are clamped to it.
pub const MAX_TRACKED_LATENCY_NS: u64 = 3_600 * 1_000_000_000;
/// Significant decimal digits kept by every histogram.
const SIGNIFICANT_DIGITS: u8 = 3;
/// Percentiles printed in the summary line.
pub const SUMMARY_PERCENTILES: [f64; 5] = [50.0, 90.0, 99.0, 99.9, 99.99];
/// Resolution of the distribution written to JSON (ticks per half distance, as HdrHistogram's
/// percentile output).
const DISTRIBUTION_TICKS_PER_HALF: u32 = 5;

/// A latency histogram in nanoseconds.
pub struct Latency {
    hist: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Latency {
        Latency {
            hist: Histogram::new_with_bounds(1, MAX_TRACKED_LATENCY_NS, SIGNIFICANT_DIGITS)
                .expect("static histogram bounds are valid"),
        }
    }

    /// Records `count` samples of `ns` (a batch's records share one latency).
    pub fn record_n(&mut self, ns: u64, count: u64) {
        self.hist
            .saturating_record_n(ns.clamp(1, MAX_TRACKED_LATENCY_NS), count);
    }

    /// Adds another histogram's samples to this one.
    pub fn merge(&mut self, other: &Latency) {
        self.hist
            .add(&other.hist)
            .expect("histograms share bounds, so add cannot fail");
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// Summary percentiles and the full distribution, in milliseconds.
    pub fn summary(&self) -> LatencySummary {
        let ms = |ns: u64| ns as f64 / 1e6;
        let h = &self.hist;
        let empty = h.is_empty();
        let pct = |p: f64| {
            if empty {
                0.0
            } else {
                ms(h.value_at_percentile(p))
            }
        };
        let distribution = if empty {
            Vec::new()
        } else {
            h.iter_quantiles(DISTRIBUTION_TICKS_PER_HALF)
                .map(|v| PercentilePoint {
                    percentile: v.quantile_iterated_to() * 100.0,
                    latency_ms: ms(v.value_iterated_to()),
                    count: v.count_since_last_iteration(),
                })
                .collect()
        };
        LatencySummary {
            samples: h.len(),
            avg_ms: if empty { 0.0 } else { h.mean() / 1e6 },
            p50_ms: pct(50.0),
            p90_ms: pct(90.0),
            p99_ms: pct(99.0),
            p999_ms: pct(99.9),
            p9999_ms: pct(99.99),
            max_ms: if empty { 0.0 } else { ms(h.max()) },
            distribution,
        }
    }
}

/// One point of the latency-percentile curve.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PercentilePoint {
    pub percentile: f64,
    pub latency_ms: f64,
    pub count: u64,
}

/// Latency percentiles of a run, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LatencySummary {
    pub samples: u64,
    pub avg_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub p9999_ms: f64,
    pub max_ms: f64,
    pub distribution: Vec<PercentilePoint>,
}

/// Counters a worker bumps as replies arrive and the reporter drains once a second. Relaxed
/// atomics: the reporter needs totals, not ordering.
#[derive(Default)]
pub struct IntervalStats {
    records: AtomicU64,
    bytes: AtomicU64,
    latency_sum_ns: AtomicU64,
    latency_samples: AtomicU64,
    latency_max_ns: AtomicU64,
}

/// What one interval saw.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct IntervalSnapshot {
    pub records: u64,
    pub bytes: u64,
    pub latency_sum_ns: u64,
    pub latency_samples: u64,
    pub latency_max_ns: u64,
}

impl IntervalStats {
    /// Counts `records` records of `bytes` bytes that took `latency_ns` (per record).
    pub fn add(&self, records: u64, bytes: u64, latency_ns: u64) {
        self.records.fetch_add(records, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.latency_sum_ns
            .fetch_add(latency_ns.saturating_mul(records), Ordering::Relaxed);
        self.latency_samples.fetch_add(records, Ordering::Relaxed);
        self.latency_max_ns.fetch_max(latency_ns, Ordering::Relaxed);
    }

    /// Takes the counts since the last call.
    pub fn drain(&self) -> IntervalSnapshot {
        IntervalSnapshot {
            records: self.records.swap(0, Ordering::Relaxed),
            bytes: self.bytes.swap(0, Ordering::Relaxed),
            latency_sum_ns: self.latency_sum_ns.swap(0, Ordering::Relaxed),
            latency_samples: self.latency_samples.swap(0, Ordering::Relaxed),
            latency_max_ns: self.latency_max_ns.swap(0, Ordering::Relaxed),
        }
    }
}

impl IntervalSnapshot {
    /// The line printed each second, in kafka-producer-perf-test's shape.
    pub fn line(&self, seconds: f64, warmup: bool) -> String {
        let secs = seconds.max(1e-9);
        let avg = if self.latency_samples == 0 {
            0.0
        } else {
            self.latency_sum_ns as f64 / self.latency_samples as f64 / 1e6
        };
        format!(
            "{} records, {:.1} records/sec ({:.2} MB/sec), {:.3} ms avg latency, {:.3} ms max latency{}",
            self.records,
            self.records as f64 / secs,
            self.bytes as f64 / secs / 1e6,
            avg,
            self.latency_max_ns as f64 / 1e6,
            if warmup { " (warm-up)" } else { "" }
        )
    }
}

/// The result of a run, as printed and as written by `--json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunSummary {
    /// Free text naming the run on plots (defaults to mode and sizes).
    pub label: String,
    pub mode: String,
    /// The options of the run, for the record.
    pub config: serde_json::Value,
    /// Records and bytes counted after warm-up.
    pub records: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub records_per_sec: f64,
    pub mb_per_sec: f64,
    pub latency: LatencySummary,
    /// Fixed-rate runs: how late each batch went on the wire against its intended send time
    /// (one sample per batch). Whatever spate-perf itself adds to the latency it reports (a
    /// late wake-up, a full in-flight window) shows here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_lag: Option<LatencySummary>,
    /// Produced batches sent again after a refusal the producer follows (not a leader, no
    /// leader, not enough replicas, timed out) or a lost connection. Not failures.
    #[serde(default)]
    pub retries: u64,
    /// What the producers followed: refused batches by Kafka error name, and batches lost with
    /// their connection (CONNECTION_LOST).
    #[serde(default)]
    pub retry_causes: std::collections::BTreeMap<String, u64>,
    /// Milliseconds during which at least one producer was failing over: from a refusal or lost
    /// connection to the first acknowledgement after it.
    #[serde(default)]
    pub failover_time_ms: f64,
    /// Each producer's failovers, in Unix time.
    #[serde(default)]
    pub failovers: Vec<Failover>,
}

/// One producer's failover: its first refusal (or lost connection) and the first
/// acknowledgement after it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Failover {
    pub start_unix_ms: i64,
    pub first_ack_unix_ms: i64,
    pub ms: f64,
}

impl RunSummary {
    /// The send-lag line of a fixed-rate run.
    pub fn send_lag_line(&self) -> Option<String> {
        self.send_lag.as_ref().map(|l| {
            format!(
                "send lag behind schedule per batch: {:.3} ms 50th, {:.3} ms 99th, {:.3} ms \
                 99.9th, {:.3} ms max ({} batches).",
                l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms, l.samples
            )
        })
    }

    /// The summary line printed at the end of a run.
    pub fn line(&self) -> String {
        let l = &self.latency;
        let verb = if self.mode == "produce" {
            "sent"
        } else {
            "received"
        };
        format!(
            "{} records {verb}, {:.1} records/sec ({:.2} MB/sec), {:.3} ms avg latency, {:.3} ms max \
             latency, {:.3} ms 50th, {:.3} ms 90th, {:.3} ms 99th, {:.3} ms 99.9th, {:.3} ms 99.99th, \
             {} retries, {:.1} ms failing over.",
            self.records,
            self.records_per_sec,
            self.mb_per_sec,
            l.avg_ms,
            l.max_ms,
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.p999_ms,
            l.p9999_ms,
            self.retries,
            self.failover_time_ms
        ) + &if self.retry_causes.is_empty() {
            String::new()
        } else {
            let causes: Vec<String> = self
                .retry_causes
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            format!(" Refused: {}.", causes.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_keeps_samples_not_averaged_percentiles() {
        // Connection A: 990 fast samples. Connection B: 10 slow ones.
        let mut a = Latency::new();
        a.record_n(1_000_000, 990);
        let mut b = Latency::new();
        b.record_n(100_000_000, 10);
        let mut merged = Latency::new();
        merged.merge(&a);
        merged.merge(&b);
        let s = merged.summary();
        assert_eq!(s.samples, 1000);
        // 99% of the samples are 1 ms: p99 is 1 ms; averaging the per-connection p99s would
        // have said ~50 ms.
        assert!((s.p99_ms - 1.0).abs() < 0.01, "{}", s.p99_ms);
        assert!((s.p999_ms - 100.0).abs() < 0.1, "{}", s.p999_ms);
        assert!((s.max_ms - 100.0).abs() < 0.1);
        let total: u64 = s.distribution.iter().map(|p| p.count).sum();
        assert_eq!(total, 1000);
        assert!(s
            .distribution
            .windows(2)
            .all(|w| w[0].percentile <= w[1].percentile && w[0].latency_ms <= w[1].latency_ms));
    }

    #[test]
    fn empty_histogram_summarises_to_zeros() {
        let s = Latency::new().summary();
        assert_eq!(s.samples, 0);
        assert_eq!(s.max_ms, 0.0);
        assert!(s.distribution.is_empty());
    }

    #[test]
    fn out_of_range_samples_are_clamped_not_dropped() {
        let mut h = Latency::new();
        h.record_n(0, 1);
        h.record_n(u64::MAX, 1);
        assert_eq!(h.count(), 2);
    }

    #[test]
    fn interval_drain_resets_and_averages_per_record() {
        let s = IntervalStats::default();
        s.add(10, 1000, 2_000_000);
        s.add(30, 3000, 4_000_000);
        let snap = s.drain();
        assert_eq!(snap.records, 40);
        assert_eq!(snap.latency_max_ns, 4_000_000);
        assert_eq!(snap.latency_sum_ns, 10 * 2_000_000 + 30 * 4_000_000);
        assert!(snap.line(1.0, false).contains("3.500 ms avg latency"));
        assert_eq!(s.drain(), IntervalSnapshot::default());
    }
}
