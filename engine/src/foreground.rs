//! Foreground disk work of this thread's logs, so that background work can stay out of its way.
//!
//! The disk has no notion of whose request matters: the log cleaner's segment reads and a
//! producer's append write and fdatasync wait in the same device queue (and the kernel's
//! mq-deadline scheduler even dispatches reads ahead of writes). So every append write and
//! every group commit of a log marks itself here while it runs, and the cleaner issues its next
//! request only once none is running ([`wait_until_quiet`]), waiting at most a bounded time so
//! that cleaning still makes progress under a load that never pauses. A producer then waits
//! behind at most one cleaner request, which the cleaner keeps small.
//!
//! Thread-local, like the logs: a shard's logs share one disk queue per shard, and nothing here
//! is shared between threads.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use crate::signal::Signal;

thread_local! {
    static IN_FLIGHT: Cell<u32> = const { Cell::new(0) };
    static QUIET: Rc<Signal> = Rc::new(Signal::default());
}

/// One foreground disk operation in flight on this thread, until dropped. The logs mark their
/// own; a layer above may mark other latency-bound disk work the same way.
pub struct ForegroundIo(());

impl ForegroundIo {
    pub fn begin() -> ForegroundIo {
        IN_FLIGHT.with(|n| n.set(n.get() + 1));
        ForegroundIo(())
    }
}

impl Drop for ForegroundIo {
    fn drop(&mut self) {
        let left = IN_FLIGHT.with(|n| {
            let left = n
                .get()
                .checked_sub(1)
                .expect("every foreground operation ends once");
            n.set(left);
            left
        });
        if left == 0 {
            QUIET.with(|q| q.notify_all());
        }
    }
}

/// Foreground disk operations (append writes, group commits) in flight on this thread.
pub fn foreground_in_flight() -> u32 {
    IN_FLIGHT.with(Cell::get)
}

/// Resolves once no foreground disk operation is in flight on this thread, or after `max_wait`
/// at the latest; true if it was quiet.
pub async fn wait_until_quiet(max_wait: Duration) -> bool {
    if foreground_in_flight() == 0 {
        return true;
    }
    let quiet = QUIET.with(Rc::clone);
    futures_lite::future::or(
        async {
            quiet.wait_until(|| foreground_in_flight() == 0).await;
            true
        },
        async {
            // Raced: glommio's own sleep would leave a timer entry per wake-up (see `Deadline`).
            crate::deadline::sleep(max_wait).await;
            false
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_the_last_operation_or_the_bound() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                assert!(wait_until_quiet(Duration::from_secs(3600)).await);
                let a = ForegroundIo::begin();
                let b = ForegroundIo::begin();
                assert_eq!(foreground_in_flight(), 2);
                // Never quiet: the bound ends the wait.
                assert!(!wait_until_quiet(Duration::from_millis(1)).await);
                let woke = Rc::new(Cell::new(false));
                let waiter = glommio::spawn_local({
                    let woke = woke.clone();
                    async move {
                        let quiet = wait_until_quiet(Duration::from_secs(3600)).await;
                        woke.set(true);
                        quiet
                    }
                });
                glommio::executor().yield_task_queue_now().await;
                drop(a);
                glommio::executor().yield_task_queue_now().await;
                assert!(!woke.get(), "one operation is still in flight");
                drop(b);
                assert!(
                    waiter.await,
                    "the end of the last operation wakes the waiter"
                );
                assert_eq!(foreground_in_flight(), 0);
            })
            .expect("executor")
            .join()
            .expect("test ran");
    }
}
