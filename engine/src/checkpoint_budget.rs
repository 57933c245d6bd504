//! How many timed recovery-point writes this thread's logs may start per second.
//!
//! A recovery-point write (the checkpointer's) replaces three small files whole (temporary
//! file, fdatasync, rename; the two index files side by side) with two directory syncs: five
//! syncs. One log asking every [`CHECKPOINT_INTERVAL_MS`] costs nothing; a shard with a
//! thousand partitions taking writes asked 200 times a second, and its syncs were half of all
//! the syncs the disk did (docs/benchmarks.md, "Session 20"). So the timed writes of a thread
//! share a budget of [`CHECKPOINTS_PER_SEC`]; a log refused asks again at its next group
//! commit, and one whose recovery point has grown as old as its own deadline (between
//! [`CHECKPOINT_MAX_INTERVAL_MS`] less [`CHECKPOINT_DEADLINE_SPREAD_MS`] and the full 60 s,
//! Kafka's `log.flush.offset.checkpoint.interval.ms`) writes whatever the budget says, so a
//! crash never rescans more than that much of a log's writes. Such a forced write still draws
//! from the budget (which may go negative), so the average stays at the budget. The deadlines
//! are spread by log because the logs of a shard open together: with one deadline for all,
//! every log the budget had not reached would be forced in the same second, a minute after
//! start-up and every minute after (found in review by simulating 1,000 logs). Writes a roll
//! asks for (the recovery point moving to the new segment) are not counted: they come with
//! the data written.
//!
//! Thread-local, like the logs: a shard's logs share one disk queue, and nothing here is shared
//! between threads.
//!
//! [`CHECKPOINT_INTERVAL_MS`]: crate::CHECKPOINT_INTERVAL_MS

use std::cell::Cell;
use std::time::{Duration, Instant};

/// Timed recovery-point writes this thread's logs may start per second (each five syncs).
pub const CHECKPOINTS_PER_SEC: u32 = 20;
/// The longest a log's recovery point may age before the next group commit rewrites it, budget
/// or not: the most a crash makes recovery rescan is this much of the log's writes.
pub const CHECKPOINT_MAX_INTERVAL_MS: u64 = 60_000;
/// Each log's own deadline is this much or less below [`CHECKPOINT_MAX_INTERVAL_MS`], chosen
/// from its id, so the logs opened together are not all forced together.
pub const CHECKPOINT_DEADLINE_SPREAD_MS: u64 = 15_000;

thread_local! {
    /// (tokens left, possibly negative after forced writes; when they were counted).
    static BUCKET: Cell<Option<(f64, Instant)>> = const { Cell::new(None) };
}

/// Draws one write from this thread's budget: granted when a token is left, or whatever is
/// left when `forced` (down to a second's worth below zero). The bucket holds at most a
/// second's worth and refills continuously.
fn draw(now: Instant, forced: bool) -> bool {
    BUCKET.with(|b| {
        let cap = f64::from(CHECKPOINTS_PER_SEC);
        let (tokens, at) = b.get().unwrap_or((cap, now));
        // Never counted backwards: an earlier `now` refills nothing and keeps the later time.
        let at_or_later = now.max(at);
        let refill = at_or_later.duration_since(at).as_secs_f64() * cap;
        let tokens = (tokens + refill).min(cap);
        let granted = forced || tokens >= 1.0;
        let left = if granted {
            (tokens - 1.0).max(-cap)
        } else {
            tokens
        };
        b.set(Some((left, at_or_later)));
        granted
    })
}

/// The age past which the log with id `log_id` rewrites its recovery point regardless.
pub(crate) fn deadline_for(log_id: u64) -> Duration {
    // A multiplicative hash spreads consecutive ids over the whole range.
    let spread = log_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) % (CHECKPOINT_DEADLINE_SPREAD_MS + 1);
    Duration::from_millis(CHECKPOINT_MAX_INTERVAL_MS - spread)
}

/// Whether a log whose last recovery point was written at `last` should write one now, as a
/// group commit finishes: not before `interval`, then within the thread's budget, and always
/// once `deadline` (its [`deadline_for`]) has passed.
pub(crate) fn timed_checkpoint_due(
    last: Instant,
    interval: Duration,
    deadline: Duration,
    now: Instant,
) -> bool {
    let age = now.saturating_duration_since(last);
    if age < interval {
        return false;
    }
    draw(now, age >= deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Each test runs on a thread of its own (libtest), so each starts with a full bucket.

    #[test]
    fn the_budget_grants_a_second_s_worth_then_refills_with_time() {
        let t0 = Instant::now();
        let granted = (0..100).filter(|_| draw(t0, false)).count();
        assert_eq!(granted, CHECKPOINTS_PER_SEC as usize);
        assert!(!draw(t0, false));
        // A tenth of a second refills a tenth of the budget.
        let later = t0 + Duration::from_millis(100);
        let granted = (0..100).filter(|_| draw(later, false)).count();
        assert_eq!(granted, CHECKPOINTS_PER_SEC as usize / 10);
        // An earlier time refills nothing.
        assert!(!draw(t0, false));
    }

    #[test]
    fn forced_writes_draw_from_the_budget_so_the_average_stays_at_it() {
        let t0 = Instant::now();
        let cap = CHECKPOINTS_PER_SEC as usize;
        // Twice the budget forced at once: all written, and the bucket a second in debt...
        assert_eq!((0..2 * cap).filter(|_| draw(t0, true)).count(), 2 * cap);
        // ...so nothing more is granted until it has refilled past zero.
        let t1 = t0 + Duration::from_millis(990);
        assert!(!draw(t1, false));
        let t2 = t0 + Duration::from_millis(1_100);
        assert!(draw(t2, false));
    }

    #[test]
    fn a_log_writes_after_the_interval_within_the_budget_and_at_its_deadline_regardless() {
        let last = Instant::now();
        let interval = Duration::from_millis(crate::CHECKPOINT_INTERVAL_MS);
        let deadline = deadline_for(7);
        assert!(
            !timed_checkpoint_due(last, interval, deadline, last),
            "written just now"
        );
        let due = last + interval;
        while draw(due, false) {}
        assert!(
            !timed_checkpoint_due(last, interval, deadline, due),
            "budget spent"
        );
        assert!(timed_checkpoint_due(
            last,
            interval,
            deadline,
            due + Duration::from_secs(1)
        ));
        let overdue = last + deadline;
        while draw(overdue, false) {}
        assert!(
            timed_checkpoint_due(last, interval, deadline, overdue),
            "overdue"
        );
    }

    #[test]
    fn deadlines_spread_over_the_last_quarter_minute() {
        let max = Duration::from_millis(CHECKPOINT_MAX_INTERVAL_MS);
        let min = max - Duration::from_millis(CHECKPOINT_DEADLINE_SPREAD_MS);
        let deadlines: Vec<Duration> = (0..1_000).map(deadline_for).collect();
        assert!(deadlines.iter().all(|d| (min..=max).contains(d)));
        // Consecutive ids (logs opened together) fall in every second of the spread.
        let mut seconds: Vec<u64> = deadlines.iter().map(|d| d.as_secs()).collect();
        seconds.sort_unstable();
        seconds.dedup();
        assert_eq!(
            seconds.len() as u64,
            CHECKPOINT_DEADLINE_SPREAD_MS / 1_000 + 1
        );
    }
}
