//! Timers that never leave a dead registration behind in the executor's reactor.
//!
//! glommio-ng 0.12's `Timer` inserts a new entry into the reactor's timer table every time it
//! is polled while pending and remembers only the newest; the older entries stay until their
//! deadline passes. Every poll of the reactor then looks for the earliest deadline by walking
//! that whole table. A timer raced against other futures (`or`, a `timeout` beside a read) is
//! polled again at every wake-up of its task: the rpc connection's read timeout was polled at
//! each frame the same task wrote, so at 20,000 records/s the cluster service thread held tens
//! of thousands of stale entries and walking them took half of the three nodes' CPU (and a
//! tenth of an idle 3,000-partition node's service thread). [`Deadline`] polls each `Timer` it
//! makes once and replaces it (dropping it removes its one registration) when polled again
//! before the deadline, so it holds one entry at a time, and an entry that fired early (below)
//! cannot leave it without a wake-up.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use glommio::timer::Timer;

/// Added to every registration: glommio's timing wheel (in use once an executor holds 256
/// timers) keeps deadlines in whole milliseconds rounded down, so an entry can fire up to a
/// millisecond before its instant. glommio's `Timer` then registers again; a [`Deadline`] woken
/// early would find its deadline not passed and its entry gone, and never wake again. Padded
/// by this much, an entry never fires before the deadline.
pub const TIMER_WHEEL_SLACK: Duration = Duration::from_millis(1);

/// Resolves at `at`. Must be polled on a glommio executor.
pub struct Deadline {
    at: Instant,
    /// The wake-up registered by the last pending poll (its only registration).
    timer: Option<Timer>,
}

impl Deadline {
    pub fn at(at: Instant) -> Self {
        Deadline { at, timer: None }
    }

    pub fn after(wait: Duration) -> Self {
        Self::at(Instant::now() + wait)
    }

    pub fn when(&self) -> Instant {
        self.at
    }
}

impl Future for Deadline {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let now = Instant::now();
        if now >= self.at {
            self.timer = None;
            return Poll::Ready(());
        }
        // The previous timer (if any) is dropped first, which removes its registration.
        self.timer = None;
        let mut timer = Timer::new(self.at - now + TIMER_WHEEL_SLACK);
        // Pending (the deadline is ahead): registers this one wake-up.
        if Pin::new(&mut timer).poll(cx).is_ready() {
            return Poll::Ready(());
        }
        self.timer = Some(timer);
        Poll::Pending
    }
}

/// `glommio::timer::sleep` with one timer entry.
pub async fn sleep(wait: Duration) {
    Deadline::after(wait).await
}

/// The deadline of [`timeout`] passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("timed out")]
pub struct TimedOut;

/// `fut`, unless `wait` passes first (a future ready at the deadline wins): as
/// `glommio::future::timeout`, with one timer entry.
pub async fn timeout<F: Future>(wait: Duration, fut: F) -> Result<F::Output, TimedOut> {
    futures_lite::future::or(async { Ok(fut.await) }, async {
        Deadline::after(wait).await;
        Err(TimedOut)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;
    use std::task::Waker;

    struct CountWakes(AtomicUsize);

    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Polls `fut` up to `polls` times with one counting waker (as a task re-polled by its
    /// other futures' wake-ups) while it is pending, lets the deadline pass on the executor,
    /// and returns how many polls found it pending and how many wake-ups the timer table then
    /// delivered: one per entry the polls left in it.
    async fn entries_left_by<F: Future + Unpin>(
        mut fut: F,
        polls: usize,
        wait: Duration,
    ) -> (usize, usize) {
        let count = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut pending = 0;
        while pending < polls && Pin::new(&mut fut).poll(&mut cx).is_pending() {
            pending += 1;
        }
        // The reactor fires every entry due before this later one.
        glommio::timer::sleep(wait * 2).await;
        assert!(Pin::new(&mut fut).poll(&mut cx).is_ready());
        (pending, count.0.load(Ordering::SeqCst))
    }

    #[test]
    fn a_deadline_polled_many_times_is_one_timer_entry() {
        const POLLS: usize = 100;
        // Far longer than the polls take (microseconds), even on a loaded machine.
        const WAIT: Duration = Duration::from_millis(300);
        let (glommio, deadline) = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .make()
            .expect("executor")
            .run(async {
                let glommio =
                    entries_left_by(Box::pin(glommio::timer::sleep(WAIT)), POLLS, WAIT).await;
                let deadline = entries_left_by(Deadline::after(WAIT), POLLS, WAIT).await;
                (glommio, deadline)
            });
        assert_eq!(
            (glommio.0, deadline.0),
            (POLLS, POLLS),
            "polled before the deadline"
        );
        // The library's timer: an entry per poll (what this module works around; if this
        // fails, glommio was fixed and the module can go).
        assert_eq!(glommio.1, POLLS);
        assert_eq!(deadline.1, 1);
    }

    #[test]
    fn a_new_waker_moves_the_single_entry() {
        const WAIT: Duration = Duration::from_millis(50);
        let (first, second) = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .make()
            .expect("executor")
            .run(async {
                let first = Arc::new(CountWakes(AtomicUsize::new(0)));
                let second = Arc::new(CountWakes(AtomicUsize::new(0)));
                let mut d = Deadline::after(WAIT);
                for w in [&first, &second] {
                    let waker = Waker::from(w.clone());
                    assert!(Pin::new(&mut d)
                        .poll(&mut Context::from_waker(&waker))
                        .is_pending());
                }
                glommio::timer::sleep(WAIT * 2).await;
                (
                    first.0.load(Ordering::SeqCst),
                    second.0.load(Ordering::SeqCst),
                )
            });
        assert_eq!((first, second), (0, 1));
    }

    /// With 256 timers or more the executor's wheel rounds deadlines down to the millisecond
    /// and can fire an entry early: the deadline must still resolve (raced against a much
    /// later glommio sleep, so a lost wake-up shows as a loss, not a hang). Repeated, since a
    /// round is only at risk when the wheel fires inside the rounded-off fraction. With no
    /// slack, 2 of 20 rounds were lost.
    #[test]
    fn a_deadline_resolves_when_the_wheel_fires_early() {
        const WHEEL_TIMERS: usize = 300;
        const ROUNDS: usize = 20;
        const WAIT: Duration = Duration::from_millis(7);
        const LOST: Duration = Duration::from_secs(2);
        let lost = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .make()
            .expect("executor")
            .run(async {
                // Long timers, polled once each, that put the reactor in its wheel stage.
                let mut parked: Vec<_> = (0..WHEEL_TIMERS)
                    .map(|_| Box::pin(glommio::timer::sleep(Duration::from_secs(600))))
                    .collect();
                let mut cx = Context::from_waker(Waker::noop());
                for t in &mut parked {
                    assert!(t.as_mut().poll(&mut cx).is_pending());
                }
                // Keeps the executor polling its reactor (short sleeps, which the wheel rounds
                // to "due"), so entries are fired as soon as their rounded-down millisecond
                // comes (an idle executor sleeps to the exact instant).
                let spinning = std::rc::Rc::new(std::cell::Cell::new(true));
                let spinner = glommio::spawn_local({
                    let spinning = spinning.clone();
                    async move {
                        while spinning.get() {
                            glommio::timer::sleep(Duration::from_micros(200)).await;
                        }
                    }
                });
                let mut lost = 0;
                for _ in 0..ROUNDS {
                    // The late sleep is polled first: once it fires, a deadline that was
                    // not woken loses even though its instant has passed by then.
                    let deadline = Deadline::after(WAIT);
                    let resolved = futures_lite::future::or(
                        async {
                            glommio::timer::sleep(LOST).await;
                            false
                        },
                        async {
                            deadline.await;
                            true
                        },
                    )
                    .await;
                    lost += usize::from(!resolved);
                }
                spinning.set(false);
                spinner.await;
                drop(parked);
                lost
            });
        assert_eq!(lost, 0, "deadlines that never woke");
    }

    #[test]
    fn timeout_prefers_the_future_and_times_out_without_it() {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .make()
            .expect("executor")
            .run(async {
                assert_eq!(timeout(Duration::ZERO, async { 7 }).await, Ok(7));
                let never = std::future::pending::<()>();
                assert_eq!(
                    timeout(Duration::from_millis(1), never).await,
                    Err(TimedOut)
                );
                sleep(Duration::from_millis(1)).await;
            });
    }

    #[test]
    fn fires_once_the_deadline_passes_however_often_polled() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let start = Instant::now();
                let wait = Duration::from_millis(30);
                let mut d = std::pin::pin!(Deadline::after(wait));
                // Raced against a future that wakes the task often: the deadline still fires.
                let mut polls = 0u32;
                loop {
                    let ticked = futures_lite::future::or(
                        async {
                            d.as_mut().await;
                            true
                        },
                        async {
                            glommio::timer::sleep(Duration::from_millis(1)).await;
                            false
                        },
                    )
                    .await;
                    polls += 1;
                    if ticked {
                        break;
                    }
                    assert!(polls < 10_000, "the deadline never fired");
                }
                assert!(start.elapsed() >= wait);
                assert!(polls > 1, "raced: polled more than once");
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn a_past_deadline_is_ready_at_once() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                Deadline::at(Instant::now() - Duration::from_millis(1)).await;
                Deadline::after(Duration::ZERO).await;
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
