//! A timer that never leaves a dead registration behind in the executor's reactor.
//!
//! glommio-ng 0.12's `Timer` registers a new reactor timer on every poll that finds it pending
//! and keeps only the newest registration's id: the earlier ones stay in the reactor until they
//! expire. A timer raced against other futures (`or`, `timeout`) is polled on every wake-up of
//! any of them, so a read timeout of 10 s polled a few hundred times a second kept thousands of
//! dead registrations alive, and the reactor scans all of them on every turn (its next-expiry
//! lookup is a pass over a hash map): on an idle node of 3,000 partitions that scan was a tenth
//! of the cluster thread's time. [`Deadline`] polls each `Timer` it makes once and replaces it
//! (dropping it removes its one registration) when polled again before the deadline: the wheel
//! may wake it a little early, so a registration cannot be assumed to still be there.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use glommio::timer::Timer;

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
        Deadline::at(Instant::now() + wait)
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
        let mut timer = Timer::new(self.at - now);
        // Pending (the deadline is ahead): registers this one wake-up.
        if Pin::new(&mut timer).poll(cx).is_ready() {
            return Poll::Ready(());
        }
        self.timer = Some(timer);
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
