//! The cleaner's pacing: its disk reads and writes under a byte rate, so cleaning never takes
//! the disk from produce and fetch (Kafka's `log.cleaner.io.max.bytes.per.second`), and its
//! share of its shard's time under a percentage, so it never keeps the shard's thread busy for
//! long: a thread that runs without pause loses the kernel's preference for threads that wake
//! from sleep, and on a loaded machine every request of the shard then waits for other
//! processes' time slices (measured: producer p99 7-18x while an unpaced cleaner ran).

use std::cell::Cell;
use std::time::{Duration, Instant};

thread_local! {
    static WRITERS_WAITING: Cell<u32> = const { Cell::new(0) };
    static HURRY_UNTIL: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// How long one [`hurry`] keeps this thread's cleanings unpaced.
pub const HURRY_MS: u64 = 1_000;

/// A log of this thread asked for an urgent cleaning (a `__consumer_offsets` replica past two
/// thirds of its bound): for the next [`HURRY_MS`] every cleaning on the thread runs unpaced
/// ([`Throttle::urgent`]), the one under way included, which may be the very log's, begun
/// paced before it filled (at a low byte rate that one alone took longer than the burst).
/// Each request renews it; it lapses by itself, so nothing has to undo it.
pub fn hurry() {
    let until = Instant::now() + Duration::from_millis(HURRY_MS);
    HURRY_UNTIL.with(|h| h.set(Some(until)));
}

fn hurried() -> bool {
    HURRY_UNTIL.with(|h| h.get().is_some_and(|until| Instant::now() < until))
}

/// A writer of this thread's logs waits for the cleaner, until dropped (the group coordinator
/// holds a write to an offsets partition over its dirty bound). Meanwhile every cleaning on the
/// thread runs unpaced ([`Throttle::urgent`]): the one it waits for may only start once the
/// cleaning under way, of another log, has finished.
pub struct WriterWaits(());

impl WriterWaits {
    pub fn begin() -> WriterWaits {
        WRITERS_WAITING.with(|n| n.set(n.get() + 1));
        WriterWaits(())
    }
}

impl Drop for WriterWaits {
    fn drop(&mut self) {
        WRITERS_WAITING.with(|n| {
            let left = n.get().checked_sub(1).expect("every wait ends once");
            n.set(left)
        });
    }
}

/// Writers of this thread's logs waiting for the cleaner.
pub fn writers_waiting() -> u32 {
    WRITERS_WAITING.with(Cell::get)
}

/// Length of one accounting window: the rate is enforced over windows this long, so a pause
/// never exceeds about one window's worth of bytes at the rate.
pub const THROTTLE_WINDOW_MS: u64 = 300;
/// The cleaner works for at most this long before it pauses for its share (see
/// [`Throttle::busy_pause`]): a request that arrives meanwhile waits at most about this long.
pub const CLEANER_BUSY_SLICE_MS: u64 = 5;

pub struct Throttle {
    bytes_per_sec: Option<u64>,
    window_start: Instant,
    window_bytes: u64,
    busy_percent: u32,
    busy_since: Instant,
    /// The cleaning under way is urgent (see `CleanRequest::urgent`): no limits.
    urgent: bool,
}

impl Throttle {
    /// `bytes_per_sec` `None`: no byte limit; `busy_percent` 100: no time limit.
    pub fn new(bytes_per_sec: Option<u64>, busy_percent: u32) -> Throttle {
        if let Some(rate) = bytes_per_sec {
            assert!(rate > 0, "a throttle rate is positive");
        }
        assert!(
            (1..=100).contains(&busy_percent),
            "a share of time is 1-100 %"
        );
        let now = Instant::now();
        Throttle {
            bytes_per_sec,
            window_start: now,
            window_bytes: 0,
            busy_percent,
            busy_since: now,
            urgent: false,
        }
    }

    /// How long to pause now so that the cleaner, working since it last rested, keeps to its
    /// share of time: zero until it has worked [`CLEANER_BUSY_SLICE_MS`], then the rest of its
    /// share's cycle (20 % after 5 ms of work: 20 ms).
    pub fn busy_pause(&self, now: Instant) -> Duration {
        let busy = now.saturating_duration_since(self.busy_since);
        if self.urgent()
            || self.busy_percent >= 100
            || busy < Duration::from_millis(CLEANER_BUSY_SLICE_MS)
        {
            return Duration::ZERO;
        }
        busy * (100 - self.busy_percent) / self.busy_percent
    }

    /// Whether the cleaning under way is urgent: then the cleaner takes no pauses, neither for
    /// its share of time nor for its byte rate, and does not defer to foreground writes. The
    /// limits keep the cleaner from slowing requests; a writer that waits for it would be
    /// slowed by them instead.
    pub fn set_urgent(&mut self, urgent: bool) {
        self.urgent = urgent;
    }

    /// Set for this cleaning, or a writer of the thread's logs waits for the cleaner, or one
    /// asked for an urgent cleaning lately ([`hurry`]).
    pub fn urgent(&self) -> bool {
        self.urgent || writers_waiting() > 0 || hurried()
    }

    /// The cleaner was idle until `now` (paused, or waiting for foreground work).
    pub fn rested(&mut self, now: Instant) {
        self.busy_since = now;
    }

    /// The cleaner waited from `since` until `now` (for the disk, or for its byte rate)
    /// without using its thread: that is not work its share of time has to pay for. Counted
    /// as work, every wait was paid again four times over at 20 %, so a cleaner on a slow or
    /// busy disk, or at its byte rate, cleaned far slower than either limit asks.
    pub fn waited(&mut self, since: Instant, now: Instant) {
        let waited = now.saturating_duration_since(since);
        self.busy_since = (self.busy_since + waited).min(now);
    }

    /// How long to pause after `bytes` more of I/O to stay under the rate (zero if none).
    pub fn charge(&mut self, bytes: u64, now: Instant) -> Duration {
        let Some(rate) = self.bytes_per_sec.filter(|_| !self.urgent()) else {
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
        let started = Instant::now();
        let pause = self.charge(bytes, started);
        if !pause.is_zero() {
            glommio::timer::sleep(pause).await;
            self.waited(started, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_add_up_to_the_rate() {
        let mut t = Throttle::new(Some(1_000_000), 100);
        let start = Instant::now();
        // 3 MB at once at 1 MB/s: a 3 s pause, whatever the window.
        let pause = t.charge(3_000_000, start);
        assert!(pause <= Duration::from_secs(3) && pause > Duration::from_millis(2_900));
        let mut none = Throttle::new(None, 100);
        assert!(none.charge(u64::MAX, start).is_zero());
        let mut urgent = Throttle::new(Some(1_000_000), 100);
        urgent.set_urgent(true);
        assert!(urgent.charge(3_000_000, start).is_zero());
        // Or while a writer of the thread's logs waits for the cleaner.
        let mut t = Throttle::new(Some(1_000_000), 100);
        let waits = WriterWaits::begin();
        assert!(t.charge(3_000_000, start).is_zero());
        drop(waits);
        assert!(!t.charge(3_000_000, start).is_zero());
        // Or for a while after a log asked for an urgent cleaning.
        let mut t = Throttle::new(Some(1_000_000), 100);
        hurry();
        assert!(t.urgent() && t.charge(3_000_000, start).is_zero());
        // Small charges within the rate cost nothing.
        let mut t = Throttle::new(Some(1_000_000), 100);
        let later = start + Duration::from_millis(100);
        assert!(t.charge(50_000, later).is_zero());
    }

    #[test]
    fn the_cleaner_pauses_for_its_share_of_time() {
        let start = Instant::now();
        let mut t = Throttle::new(None, 20);
        t.rested(start);
        let slice = Duration::from_millis(CLEANER_BUSY_SLICE_MS);
        assert!(
            t.busy_pause(start + slice / 2).is_zero(),
            "within its slice"
        );
        // 5 ms of work at 20 %: 20 ms of pause, so work is a fifth of the cycle.
        assert_eq!(t.busy_pause(start + slice), slice * 4);
        assert_eq!(t.busy_pause(start + slice * 2), slice * 8);
        t.rested(start + slice * 10);
        assert!(t.busy_pause(start + slice * 10).is_zero());
        let all = Throttle::new(None, 100);
        assert!(all.busy_pause(start + slice * 1000).is_zero());
        // A writer waits for this cleaning: no pause, whatever the share.
        t.set_urgent(true);
        assert!(t.busy_pause(start + slice * 1000).is_zero());
        t.set_urgent(false);
        assert_eq!(t.busy_pause(start + slice * 11), slice * 4);
    }

    #[test]
    fn waiting_is_not_work() {
        let start = Instant::now();
        let slice = Duration::from_millis(CLEANER_BUSY_SLICE_MS);
        let mut t = Throttle::new(None, 20);
        t.rested(start);
        // One slice of work, then nine slices waiting for a read: still one slice of work.
        t.waited(start + slice, start + slice * 10);
        assert_eq!(t.busy_pause(start + slice * 10), slice * 4);
        // A wait never makes work negative.
        t.waited(start, start + slice * 20);
        assert!(t.busy_pause(start + slice * 10).is_zero());
    }
}
