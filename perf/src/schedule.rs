//! The send schedule of fixed-rate mode. Every batch has an intended send time fixed in advance;
//! latency is measured from it, so a broker stall that delays later sends still shows in the
//! latencies (no coordinated omission).

use std::time::{Duration, Instant};

/// When each batch of one connection is due.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    /// Nanoseconds between batches; None sends as fast as the in-flight window allows.
    interval_ns: Option<f64>,
}

/// How a fixed rate turns into batches on one connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatePlan {
    pub records_per_batch: usize,
    pub interval_ns: f64,
}

impl RatePlan {
    /// A connection sending `rate` records/s gathers what arrives in one linger period into a
    /// batch (as a producer with linger.ms would), at least one record and at most `max_records`.
    pub fn new(rate_per_sec: f64, linger_ms: f64, max_records: usize) -> RatePlan {
        assert!(rate_per_sec > 0.0 && max_records > 0);
        let gathered = (rate_per_sec * linger_ms / 1e3).floor() as usize;
        let records_per_batch = gathered.clamp(1, max_records);
        RatePlan {
            records_per_batch,
            interval_ns: records_per_batch as f64 * 1e9 / rate_per_sec,
        }
    }
}

impl Schedule {
    /// As fast as possible: each batch is due when it is sent.
    pub fn unthrottled(start: Instant) -> Schedule {
        Schedule {
            start,
            interval_ns: None,
        }
    }

    /// One batch every `interval_ns`, the first at `start`.
    pub fn fixed(start: Instant, interval_ns: f64) -> Schedule {
        assert!(interval_ns > 0.0);
        Schedule {
            start,
            interval_ns: Some(interval_ns),
        }
    }

    pub fn is_fixed(&self) -> bool {
        self.interval_ns.is_some()
    }

    /// The intended send time of batch `n` (None when unthrottled).
    pub fn intended(&self, n: u64) -> Option<Instant> {
        // f64 arithmetic from the start, not a running sum, so rounding never accumulates.
        self.interval_ns
            .map(|i| self.start + Duration::from_nanos((n as f64 * i) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linger_sets_the_batch_size_and_rate_the_interval() {
        let p = RatePlan::new(1000.0, 5.0, 1000);
        assert_eq!(p.records_per_batch, 5);
        assert!((p.interval_ns - 5e6).abs() < 1.0);
        // Slower than one record per linger: one record per batch, spaced by the rate.
        let p = RatePlan::new(100.0, 5.0, 1000);
        assert_eq!(p.records_per_batch, 1);
        assert!((p.interval_ns - 1e7).abs() < 1.0);
        // The batch size cap wins over linger.
        let p = RatePlan::new(1e6, 100.0, 1000);
        assert_eq!(p.records_per_batch, 1000);
        assert!((p.interval_ns - 1e6).abs() < 1.0);
    }

    #[test]
    fn intended_times_do_not_drift() {
        let t0 = Instant::now();
        let s = Schedule::fixed(t0, 1e9 / 3.0);
        assert_eq!(s.intended(0), Some(t0));
        let late = s.intended(3_000_000).unwrap() - t0;
        assert_eq!(late.as_secs(), 1_000_000);
        assert!(late.subsec_nanos() < 1_000);
        assert_eq!(Schedule::unthrottled(t0).intended(5), None);
    }
}
