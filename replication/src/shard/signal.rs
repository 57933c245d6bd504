//! A level-triggered wake-up for the tasks of one shard.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::task::{Poll, Waker};

/// Waiters remember the generation they saw and wake when it moves. Not `Send`: it belongs to
/// one shard, and only that shard's tasks wait on it or notify it.
#[derive(Default)]
pub struct Signal {
    generation: Cell<u64>,
    wakers: RefCell<Vec<Waker>>,
}

impl Signal {
    pub fn generation(&self) -> u64 {
        self.generation.get()
    }
    pub fn notify(&self) {
        self.generation.set(self.generation.get() + 1);
        for w in self.wakers.take() {
            w.wake();
        }
    }
    /// Resolves once [`Self::notify`] was called after generation `since`.
    pub fn changed(&self, since: u64) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.generation.get() != since {
                Poll::Ready(())
            } else {
                self.wakers.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}
