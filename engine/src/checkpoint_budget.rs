//! How many timed recovery-point writes this thread's logs may start per second.
//!
//! A recovery-point write (the checkpointer's) is three small files each replaced atomically:
//! a temporary file, its fdatasync, a rename and a directory sync, so six syncs. One log asking
//! every [`CHECKPOINT_INTERVAL_MS`] costs nothing; a shard with a thousand partitions taking
//! writes asked 200 times a second, and its 1,200 syncs a second were half of all the syncs the
//! disk did (measured: docs/benchmarks.md, "Session 20"). So the timed writes of a thread share
//! a budget of [`CHECKPOINTS_PER_SEC`]; a log refused asks again at its next group commit, and
//! one that has waited [`CHECKPOINT_MAX_INTERVAL_MS`] writes whatever the budget says, so a
//! crash never rescans more than that much of a log's writes (Kafka's
//! `log.flush.offset.checkpoint.interval.ms` is the same 60 s). Writes a roll asks for (the
//! recovery point moving to the new segment) are not counted: they come with the data written.
//!
//! Thread-local, like the logs: a shard's logs share one disk queue, and nothing here is shared
//! between threads.
//!
//! [`CHECKPOINT_INTERVAL_MS`]: crate::CHECKPOINT_INTERVAL_MS

use std::cell::Cell;
use std::time::{Duration, Instant};

/// Timed recovery-point writes this thread's logs may start per second (each about six syncs).
pub const CHECKPOINTS_PER_SEC: u32 = 20;
/// A log whose last recovery point is this old writes the next one at its next group commit,
/// budget or not: the most a crash makes recovery rescan is this much of the log's writes.
pub const CHECKPOINT_MAX_INTERVAL_MS: u64 = 60_000;

thread_local! {
    /// (tokens left, when they were counted).
    static BUCKET: Cell<Option<(f64, Instant)>> = const { Cell::new(None) };
}

/// Takes one timed recovery-point write from this thread's budget; false when it is spent for
/// now (the bucket holds at most a second's worth, refilled continuously).
pub(crate) fn take(now: Instant) -> bool {
    BUCKET.with(|b| {
        let cap = f64::from(CHECKPOINTS_PER_SEC);
        let (tokens, at) = b.get().unwrap_or((cap, now));
        let refill = now.saturating_duration_since(at).as_secs_f64() * cap;
        let tokens = (tokens + refill).min(cap);
        let (left, granted) = if tokens >= 1.0 {
            (tokens - 1.0, true)
        } else {
            (tokens, false)
        };
        b.set(Some((left, now)));
        granted
    })
}

/// Whether a log whose last recovery point was written at `last` should write one now, as a
/// group commit finishes: at most once per `interval`, within the thread's budget, and always
/// once `CHECKPOINT_MAX_INTERVAL_MS` has passed.
pub(crate) fn timed_checkpoint_due(last: Instant, interval: Duration, now: Instant) -> bool {
    let age = now.saturating_duration_since(last);
    if age >= Duration::from_millis(CHECKPOINT_MAX_INTERVAL_MS) {
        return true;
    }
    age >= interval && take(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_grants_a_second_s_worth_then_refills_with_time() {
        std::thread::spawn(|| {
            let t0 = Instant::now();
            let granted = (0..100).filter(|_| take(t0)).count();
            assert_eq!(granted, CHECKPOINTS_PER_SEC as usize);
            assert!(!take(t0));
            // A tenth of a second refills a tenth of the budget.
            let later = t0 + Duration::from_millis(100);
            let granted = (0..100).filter(|_| take(later)).count();
            assert_eq!(granted, CHECKPOINTS_PER_SEC as usize / 10);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn an_overdue_log_writes_whatever_the_budget_and_a_recent_one_never() {
        std::thread::spawn(|| {
            let last = Instant::now();
            let interval = Duration::from_millis(crate::CHECKPOINT_INTERVAL_MS);
            let max = Duration::from_millis(CHECKPOINT_MAX_INTERVAL_MS);
            assert!(
                !timed_checkpoint_due(last, interval, last),
                "written just now"
            );
            let due = last + interval;
            while take(due) {}
            assert!(!timed_checkpoint_due(last, interval, due), "budget spent");
            assert!(timed_checkpoint_due(
                last,
                interval,
                due + Duration::from_secs(1)
            ));
            let overdue = last + max;
            while take(overdue) {}
            assert!(timed_checkpoint_due(last, interval, overdue), "overdue");
        })
        .join()
        .unwrap();
    }
}
