//! The cleaner's I/O throttle: keeps its disk reads and writes under a byte rate, so cleaning
//! never takes the disk from produce and fetch (Kafka's `log.cleaner.io.max.bytes.per.second`).

use std::time::{Duration, Instant};

/// Length of one accounting window: the rate is enforced over windows this long, so a pause
/// never exceeds about one window's worth of bytes at the rate.
pub const THROTTLE_WINDOW_MS: u64 = 300;

pub struct Throttle {
    bytes_per_sec: Option<u64>,
    window_start: Instant,
    window_bytes: u64,
}

impl Throttle {
    /// `None`: no limit.
    pub fn new(bytes_per_sec: Option<u64>) -> Throttle {
        if let Some(rate) = bytes_per_sec {
            assert!(rate > 0, "a throttle rate is positive");
        }
        Throttle {
            bytes_per_sec,
            window_start: Instant::now(),
            window_bytes: 0,
        }
    }

    /// How long to pause after `bytes` more of I/O to stay under the rate (zero if none).
    pub fn charge(&mut self, bytes: u64, now: Instant) -> Duration {
        let Some(rate) = self.bytes_per_sec else {
            return Duration::ZERO;
        };
        self.window_bytes = self.window_bytes.saturating_add(bytes);
        let elapsed = now.saturating_duration_since(self.window_start);
        let due = Duration::from_secs_f64(self.window_bytes as f64 / rate as f64);
        let pause = due.saturating_sub(elapsed);
        if elapsed + pause >= Duration::from_millis(THROTTLE_WINDOW_MS) {
            self.window_start = now + pause;
            self.window_bytes = 0;
        }
        pause
    }

    /// [`Self::charge`], then the pause on the executor's timer (other tasks of the shard run).
    pub async fn account(&mut self, bytes: u64) {
        let pause = self.charge(bytes, Instant::now());
        if !pause.is_zero() {
            glommio::timer::sleep(pause).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_add_up_to_the_rate() {
        let mut t = Throttle::new(Some(1_000_000));
        let start = Instant::now();
        // 3 MB at once at 1 MB/s: a 3 s pause, whatever the window.
        let pause = t.charge(3_000_000, start);
        assert!(pause <= Duration::from_secs(3) && pause > Duration::from_millis(2_900));
        let mut none = Throttle::new(None);
        assert!(none.charge(u64::MAX, start).is_zero());
        // Small charges within the rate cost nothing.
        let mut t = Throttle::new(Some(1_000_000));
        let later = start + Duration::from_millis(100);
        assert!(t.charge(50_000, later).is_zero());
    }
}
