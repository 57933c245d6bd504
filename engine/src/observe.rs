//! Hooks for the broker's metrics. The engine has no metrics registry of its own: a shard
//! installs an observer on its thread, and the engine reports to it. Thread-local, like the
//! logs themselves, so reporting touches nothing shared.

use std::cell::RefCell;
use std::time::Duration;

type FsyncObserver = Box<dyn Fn(Duration)>;

thread_local! {
    static FSYNC: RefCell<Option<FsyncObserver>> = const { RefCell::new(None) };
}

/// Installs `f`, called with the duration of every group-commit fdatasync of a partition log
/// on this thread (replaces any previous observer).
pub fn set_fsync_observer(f: impl Fn(Duration) + 'static) {
    FSYNC.with(|o| *o.borrow_mut() = Some(Box::new(f)));
}

/// Removes this thread's observer (so it can be freed before the thread ends).
pub fn clear_fsync_observer() {
    FSYNC.with(|o| o.borrow_mut().take());
}

pub(crate) fn fsync_done(took: Duration) {
    FSYNC.with(|o| {
        if let Some(f) = o.borrow().as_ref() {
            f(took);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn observer_sees_reports_until_cleared() {
        let seen = Rc::new(Cell::new(0u32));
        let s = seen.clone();
        set_fsync_observer(move |d| {
            assert_eq!(d, Duration::from_millis(3));
            s.set(s.get() + 1);
        });
        fsync_done(Duration::from_millis(3));
        fsync_done(Duration::from_millis(3));
        clear_fsync_observer();
        fsync_done(Duration::from_millis(3));
        assert_eq!(seen.get(), 2);
    }
}
