//! The replication throttle: one rate, in bytes per second per node, for the traffic that
//! brings a replica up to date (a learner joining a partition during a move, a follower far
//! behind after a restart), so catching up does not take the disks and network that producers
//! and in-sync followers need. Kafka's `leader.replication.throttled.rate`, Redpanda's
//! `raft_learner_recovery_rate`; here `--replication-throttle-bytes-per-sec`
//! ([`DEFAULT_REPLICATION_THROTTLE_BYTES_PER_SEC`]), 0 meaning off.
//!
//! A token bucket shared by every shard of the node: a leader filling an append for such a
//! replica asks how many bytes it may attach ([`ReplicationThrottle::grant`]) and charges what
//! it attached ([`ReplicationThrottle::charge`]). At least one whole batch may go when any
//! budget is left, so the bucket can go into debt by up to a batch; the debt is paid before
//! the next grant. Appends for in-sync followers never wait on it.

use std::sync::Mutex;
use std::time::Instant;

/// The shipped rate, per node, measured on the 3-node benchmark (all nodes on one disk, a
/// follower restarted 2 GB behind, producers at a fixed 20,000 records/s with acks=all):
/// unthrottled the catch-up ran at 370 MB/s and the producers' p99 rose from 12 ms to about
/// 1 s; at 100 MB/s per node (Redpanda's default recovery rate) to 2-3 s, the follower's
/// writes and fdatasyncs delaying everyone's; at 25 MB/s the median p99 stayed within 1.1x
/// (35 ms against 32 ms). Catch-up reads and writes share the disks with the producers'
/// fdatasyncs, so recovery gets a small share; raise it where followers have disks of their own.
pub const DEFAULT_REPLICATION_THROTTLE_BYTES_PER_SEC: u64 = 25_000_000;

/// A follower more than this many offsets below the high watermark counts as catching up (its
/// appends are throttled); closer than that it is tailing the log, and its appends are what
/// acks=all waits for.
pub const THROTTLE_LAG_OFFSETS: u64 = 10_000;

/// The bucket holds at most this many milliseconds of the rate: a quiet second does not let
/// a burst of several seconds' worth through afterwards.
pub const THROTTLE_BURST_MS: u64 = 1_000;

#[derive(Debug)]
pub struct ReplicationThrottle {
    bytes_per_sec: u64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may be sent now; negative: a debt from the last batch sent over the budget.
    balance: i64,
    refilled_at: Instant,
}

impl ReplicationThrottle {
    /// A throttle of `bytes_per_sec` (at least 1), starting with a full bucket.
    pub fn new(bytes_per_sec: u64) -> Self {
        let bytes_per_sec = bytes_per_sec.max(1);
        ReplicationThrottle {
            bytes_per_sec,
            state: Mutex::new(Bucket {
                balance: Self::burst(bytes_per_sec),
                refilled_at: Instant::now(),
            }),
        }
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    fn burst(rate: u64) -> i64 {
        (rate.saturating_mul(THROTTLE_BURST_MS) / 1_000).min(i64::MAX as u64) as i64
    }

    /// Bytes a catch-up append may attach now, at most `max` (0: none until the bucket
    /// refills; the core sends the rest on a later append).
    pub fn grant(&self, max: usize) -> usize {
        self.grant_at(max, Instant::now())
    }

    /// Debits `bytes` actually attached.
    pub fn charge(&self, bytes: usize) {
        let mut b = self.state.lock().expect("throttle lock");
        b.balance = b.balance.saturating_sub(bytes as i64);
    }

    fn grant_at(&self, max: usize, now: Instant) -> usize {
        let mut b = self.state.lock().expect("throttle lock");
        let elapsed_us = now.saturating_duration_since(b.refilled_at).as_micros() as u64;
        let add = (u128::from(self.bytes_per_sec) * u128::from(elapsed_us) / 1_000_000) as i64;
        if add > 0 {
            b.balance = b
                .balance
                .saturating_add(add)
                .min(Self::burst(self.bytes_per_sec));
            b.refilled_at = now;
        }
        b.balance.clamp(0, i64::try_from(max).unwrap_or(i64::MAX)) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_rate_bounds_what_is_granted_and_charged_over_time() {
        let t = ReplicationThrottle::new(1_000_000);
        let start = Instant::now();
        // The first second's bucket, then nothing until it refills.
        assert_eq!(t.grant_at(usize::MAX, start), 1_000_000);
        t.charge(1_000_000);
        assert_eq!(t.grant_at(1 << 20, start), 0);
        // 100 ms later: 100 kB.
        let later = start + Duration::from_millis(100);
        let g = t.grant_at(1 << 20, later);
        assert!((99_000..=101_000).contains(&g), "{g}");
        // A batch over the grant puts the bucket in debt, paid before the next grant.
        t.charge(g + 50_000);
        assert_eq!(t.grant_at(1 << 20, later + Duration::from_millis(40)), 0);
        // Over ten simulated seconds, sending whatever is granted stays within the rate.
        let mut sent = 0u64;
        let mut now = later;
        for _ in 0..1_000 {
            now += Duration::from_millis(10);
            let g = t.grant_at(300_000, now);
            t.charge(g);
            sent += g as u64;
        }
        assert!(sent <= 10_000_000 + 1_000_000, "{sent}");
        assert!(sent >= 9_000_000, "{sent}");
        // A long quiet spell grants at most the burst.
        let idle = now + Duration::from_secs(60);
        assert_eq!(t.grant_at(usize::MAX, idle), 1_000_000);
    }
}
