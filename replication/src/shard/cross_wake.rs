//! Waiting on another thread without lending it the task's waker.
//!
//! glommio-ng 0.12 frees a task twice when the last clone of its waker is dropped on a thread
//! other than the task's executor while the owner drops the task's `JoinHandle`. The foreign
//! drop (`RawTask::drop_waker`, foreign branch) decrements the reference count to zero, looks
//! up the owner's notifier, then increments it again to queue a waker that destroys the task on
//! its owner. `JoinHandle::drop` on the owner only *loads* the count: if it reads the transient
//! zero of a completed task, it destroys the task, and the queued waker, when the owner runs it,
//! destroys it again: `free(): double free detected in tcache 2` (or, if the memory was reused
//! for another task first, a "Waker invariant broken" panic or a corrupted task).
//!
//! Cross-shard channels (flume) keep the waker of a blocked receiver or sender and the other
//! shard wakes and drops it, and produce and fetch drop `JoinHandle`s of such tasks right after
//! they complete. [`cross_thread`] gives the wrapped future a waker of its own, an `Arc` that
//! may be cloned, woken and dropped anywhere; it forwards wakes to the task's waker, which only
//! its own thread ever clones or drops. Wrap every await that another thread completes.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Wake, Waker};

/// The task waker a relay forwards to; `None` once the wrapped future is done.
#[derive(Default)]
struct Relay {
    task: Mutex<Option<Waker>>,
}

impl Relay {
    fn task(&self) -> MutexGuard<'_, Option<Waker>> {
        // A panic while holding the lock leaves an Option<Waker>, which is always valid.
        self.task.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called on the owner thread on every poll.
    fn set(&self, waker: &Waker) {
        let old = {
            let mut task = self.task();
            if task.as_ref().is_some_and(|w| w.will_wake(waker)) {
                return;
            }
            task.replace(waker.clone())
        };
        // Dropped here, on the owner thread, outside the lock.
        drop(old);
    }
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Woken under the lock: glommio's foreign wake clones the task waker and sends the
        // clone to the owner, which is only sound while a reference is held, and this one
        // cannot be taken away (and dropped) by the owner until the lock is released.
        if let Some(task) = self.task().as_ref() {
            task.wake_by_ref();
        }
    }
}

/// Takes the task waker out of the relay when the wrapped future completes or is dropped: on
/// the owner thread, whatever other threads still hold the relay.
struct Detach<'a>(&'a Relay);

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        let task = self.0.task().take();
        drop(task);
    }
}

/// Receives from a channel other threads send on (`rx.recv_async()`, which clippy.toml
/// disallows elsewhere, wrapped in [`cross_thread`]).
pub async fn recv<T>(rx: &flume::Receiver<T>) -> Result<T, flume::RecvError> {
    #[allow(clippy::disallowed_methods)]
    let fut = rx.recv_async();
    cross_thread(fut).await
}

/// Sends on a channel another thread receives from, waiting while it is full
/// (`tx.send_async(value)`, which clippy.toml disallows elsewhere, wrapped in [`cross_thread`]).
pub async fn send<T>(tx: &flume::Sender<T>, value: T) -> Result<(), flume::SendError<T>> {
    #[allow(clippy::disallowed_methods)]
    let fut = tx.send_async(value);
    cross_thread(fut).await
}

/// Awaits `fut`, which another thread may wake, with a waker that thread may also drop.
/// See the module documentation for why a glommio task's own waker must not be lent.
pub async fn cross_thread<F: Future>(fut: F) -> F::Output {
    let relay = Arc::new(Relay::default());
    let relay_waker = Waker::from(relay.clone());
    let _detach = Detach(&relay);
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        relay.set(cx.waker());
        fut.as_mut().poll(&mut Context::from_waker(&relay_waker))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use std::task::Poll;
    use std::thread::ThreadId;
    use std::time::{Duration, Instant};

    /// A waker that records on which threads its clones were dropped.
    struct Recording {
        owner: ThreadId,
        foreign_drops: AtomicUsize,
        wakes: AtomicUsize,
    }

    fn recording_waker(rec: &Arc<Recording>) -> Waker {
        use std::task::{RawWaker, RawWakerVTable};
        fn clone(p: *const ()) -> RawWaker {
            // SAFETY: p came from Arc::into_raw of an Arc<Recording> that is still alive.
            unsafe { Arc::increment_strong_count(p as *const Recording) };
            RawWaker::new(p, &VTABLE)
        }
        fn wake(p: *const ()) {
            wake_by_ref(p);
            drop_waker(p);
        }
        fn wake_by_ref(p: *const ()) {
            // SAFETY: as in clone.
            let rec = unsafe { &*(p as *const Recording) };
            rec.wakes.fetch_add(1, Ordering::SeqCst);
        }
        fn drop_waker(p: *const ()) {
            // SAFETY: every RawWaker owns one strong count.
            let rec = unsafe { Arc::from_raw(p as *const Recording) };
            if std::thread::current().id() != rec.owner {
                rec.foreign_drops.fetch_add(1, Ordering::SeqCst);
            }
        }
        static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, wake, wake_by_ref, drop_waker);
        let p = Arc::into_raw(rec.clone()) as *const ();
        // SAFETY: the vtable functions uphold the RawWaker contract for an Arc<Recording>.
        unsafe { Waker::from_raw(RawWaker::new(p, &VTABLE)) }
    }

    /// A future that gives its waker to another thread, which wakes it and then drops it.
    fn lend_waker_to_thread() -> (impl Future<Output = ()>, std::thread::JoinHandle<()>) {
        let (tx, rx) = std::sync::mpsc::channel::<Waker>();
        let woken = Arc::new(AtomicBool::new(false));
        let thread = {
            let woken = woken.clone();
            std::thread::spawn(move || {
                let waker = rx.recv().expect("the future sends its waker");
                woken.store(true, Ordering::SeqCst);
                waker.wake_by_ref();
                drop(waker);
            })
        };
        let fut = std::future::poll_fn(move |cx| {
            if woken.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            let _ = tx.send(cx.waker().clone());
            Poll::Pending
        });
        (fut, thread)
    }

    #[test]
    fn the_task_waker_is_never_dropped_on_the_waking_thread() {
        let rec = Arc::new(Recording {
            owner: std::thread::current().id(),
            foreign_drops: AtomicUsize::new(0),
            wakes: AtomicUsize::new(0),
        });
        let waker = recording_waker(&rec);
        let mut cx = Context::from_waker(&waker);
        let (inner, thread) = lend_waker_to_thread();
        let mut fut = std::pin::pin!(cross_thread(inner));
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        thread.join().expect("waking thread");
        assert_eq!(
            rec.wakes.load(Ordering::SeqCst),
            1,
            "the wake was forwarded"
        );
        assert!(fut.as_mut().poll(&mut cx).is_ready());
        assert_eq!(rec.foreign_drops.load(Ordering::SeqCst), 0);

        // The same future unwrapped hands the task waker over: the case this module prevents.
        let (inner, thread) = lend_waker_to_thread();
        let mut fut = std::pin::pin!(inner);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        thread.join().expect("waking thread");
        assert_eq!(rec.foreign_drops.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_dropped_future_releases_the_task_waker_and_later_wakes_are_ignored() {
        let rec = Arc::new(Recording {
            owner: std::thread::current().id(),
            foreign_drops: AtomicUsize::new(0),
            wakes: AtomicUsize::new(0),
        });
        let waker = recording_waker(&rec);
        let mut cx = Context::from_waker(&waker);
        let (tx, rx) = std::sync::mpsc::channel::<Waker>();
        {
            let inner = std::future::poll_fn(|cx: &mut Context<'_>| {
                let _ = tx.send(cx.waker().clone());
                Poll::<()>::Pending
            });
            let mut fut = std::pin::pin!(cross_thread(inner));
            assert!(fut.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(Arc::strong_count(&rec), 2, "only `waker` is left");
        let lent = rx.recv().expect("lent waker");
        std::thread::spawn(move || lent.wake())
            .join()
            .expect("waking thread");
        assert_eq!(rec.wakes.load(Ordering::SeqCst), 0);
        assert_eq!(rec.foreign_drops.load(Ordering::SeqCst), 0);
    }

    /// The race itself, on a real executor: another thread drops a task's last waker clone
    /// just as the owner drops the task's `JoinHandle`. Without [`cross_thread`] around the
    /// wait this aborts (glibc's double free, or glommio's refcount assertion) within a few
    /// thousand rounds; bounded by rounds and time.
    #[test]
    fn foreign_waker_drops_racing_join_handle_drops_do_not_corrupt_tasks() {
        const ROUNDS: u64 = 200_000;
        const MAX_TEST_TIME: Duration = Duration::from_secs(3);
        // The other thread waits for the task to complete, then drops its waker after a
        // delay swept over this many spins, so that some drops land in the owner's window.
        const MAX_WAIT_SPINS: u32 = 100_000;
        const DELAY_SWEEP_SPINS: u64 = 512;

        let (tx, rx) = std::sync::mpsc::channel::<(Waker, u64)>();
        let completed = Arc::new(AtomicU64::new(u64::MAX));
        let foreign = {
            let completed = completed.clone();
            std::thread::spawn(move || {
                while let Ok((waker, round)) = rx.recv() {
                    waker.wake_by_ref();
                    let mut spins = 0;
                    while completed.load(Ordering::Acquire) != round && spins < MAX_WAIT_SPINS {
                        std::hint::spin_loop();
                        spins += 1;
                    }
                    for _ in 0..(round * 7) % DELAY_SWEEP_SPINS {
                        std::hint::spin_loop();
                    }
                    drop(waker);
                }
            })
        };
        let rounds = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .make()
            .expect("executor")
            .run(async move {
                let start = Instant::now();
                let mut round = 0;
                while round < ROUNDS && start.elapsed() < MAX_TEST_TIME {
                    let (tx, completed) = (tx.clone(), completed.clone());
                    let task = glommio::spawn_local(cross_thread(async move {
                        let mut sent = false;
                        std::future::poll_fn(|cx| {
                            if sent {
                                completed.store(round, Ordering::Release);
                                return Poll::Ready(round);
                            }
                            sent = true;
                            tx.send((cx.waker().clone(), round))
                                .expect("foreign thread");
                            Poll::Pending
                        })
                        .await
                    }));
                    // Awaiting takes the output; the handle is dropped right after.
                    assert_eq!(task.await, round);
                    round += 1;
                }
                round
            });
        foreign.join().expect("foreign thread");
        assert!(rounds > 0);
    }
}
