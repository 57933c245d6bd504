//! A shard's request memory budget (Kafka's `queued.max.request.bytes`, Redpanda's per-shard
//! Kafka memory semaphore): every request's bytes are charged from the moment its length is
//! known until its reply is written, and a connection's reader waits for budget before it
//! allocates a frame's buffer. So when the budget is spent the shard stops reading from its
//! sockets (the kernel's receive windows push back on the clients) instead of allocating.
//!
//! A small part of the budget, the reserve, is kept for small frames only, so ApiVersions,
//! Metadata and heartbeats keep moving while large Produce requests wait. A frame larger than
//! everything large frames may use is charged all of it (clamped): it is still served, alone.
//! Responses are charged when they are built (a Fetch or a Metadata for many partitions can be
//! far larger than its request) and released when written; they may overdraw the budget,
//! since their memory is already taken, and then hold back new large requests until written.

use std::cell::{Cell, OnceCell};
use std::rc::Rc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::shard::Signal;

/// Frames shorter than this are small: they may use the reserve.
pub const SMALL_FRAME_MAX_BYTES: usize = 64 * 1024;
/// Largest reserve for small frames, per shard: 256 frames of 64 KiB at once.
pub const SMALL_RESERVE_MAX_BYTES: usize = 16 << 20;
/// The reserve is this fraction (1/N) of a shard's budget, up to [`SMALL_RESERVE_MAX_BYTES`].
const SMALL_RESERVE_DIVISOR: usize = 8;
/// Smallest budget a shard may get: one small frame in the reserve and one beside it.
pub const MIN_SHARD_BUDGET_BYTES: usize = 2 * SMALL_FRAME_MAX_BYTES;

pub struct RequestBudget {
    /// Bytes large frames may be charged together (the budget less the reserve).
    shared_bytes: usize,
    /// Bytes only small frames may be charged.
    reserve_bytes: usize,
    /// Charged against `shared_bytes` (responses may push it past).
    shared_used: Cell<usize>,
    reserve_used: Cell<usize>,
    released: Signal,
    /// Where the bytes charged and the waits are exported (`spate_request_memory_*`).
    exported: OnceCell<(Gauge, Counter)>,
}

impl RequestBudget {
    pub fn new(total_bytes: usize) -> Rc<RequestBudget> {
        assert!(
            total_bytes >= MIN_SHARD_BUDGET_BYTES,
            "a shard's request budget holds at least two small frames"
        );
        let reserve_bytes = (total_bytes / SMALL_RESERVE_DIVISOR)
            .clamp(SMALL_FRAME_MAX_BYTES, SMALL_RESERVE_MAX_BYTES);
        Rc::new(RequestBudget {
            shared_bytes: total_bytes - reserve_bytes,
            reserve_bytes,
            shared_used: Cell::new(0),
            reserve_used: Cell::new(0),
            released: Signal::default(),
            exported: OnceCell::new(),
        })
    }

    /// Exports the bytes charged to `used` and counts in `waits` the frames that had to wait.
    pub fn export_to(&self, used: Gauge, waits: Counter) {
        used.set(self.used_bytes() as i64);
        let _ = self.exported.set((used, waits));
    }

    fn exported_changed(&self) {
        if let Some((used, _)) = self.exported.get() {
            used.set(self.used_bytes() as i64);
        }
    }

    /// Bytes charged now (requests being read, queued or handled, and unwritten responses).
    pub fn used_bytes(&self) -> usize {
        self.shared_used.get() + self.reserve_used.get()
    }

    /// What a frame of `len` bytes is charged: all of it, or everything large frames may use
    /// if it is larger than that (so it is served, alone, instead of waiting forever).
    pub fn charge_for(&self, len: usize) -> usize {
        len.min(self.shared_bytes)
    }

    /// Charges a frame of `len` bytes if the budget allows it now.
    pub fn try_charge(self: &Rc<Self>, len: usize) -> Option<Charge> {
        let bytes = self.charge_for(len);
        let small = len < SMALL_FRAME_MAX_BYTES;
        if small && self.reserve_used.get() + bytes <= self.reserve_bytes {
            self.reserve_used.set(self.reserve_used.get() + bytes);
            self.exported_changed();
            return Some(Charge {
                budget: self.clone(),
                reserve: bytes,
                shared: 0,
            });
        }
        if self.shared_used.get() + bytes <= self.shared_bytes {
            self.shared_used.set(self.shared_used.get() + bytes);
            self.exported_changed();
            return Some(Charge {
                budget: self.clone(),
                reserve: 0,
                shared: bytes,
            });
        }
        None
    }

    /// Waits until a frame of `len` bytes can be charged. Cancel-safe: dropping the future
    /// charges nothing.
    pub async fn charge(self: &Rc<Self>, len: usize) -> Charge {
        let mut waited = false;
        loop {
            let seen = self.released.generation();
            if let Some(c) = self.try_charge(len) {
                return c;
            }
            if !std::mem::replace(&mut waited, true) {
                if let Some((_, waits)) = self.exported.get() {
                    waits.inc();
                }
            }
            self.released.changed(seen).await;
        }
    }

    fn release(&self, reserve: usize, shared: usize) {
        assert!(
            self.reserve_used.get() >= reserve && self.shared_used.get() >= shared,
            "released more request memory than was charged"
        );
        self.reserve_used.set(self.reserve_used.get() - reserve);
        self.shared_used.set(self.shared_used.get() - shared);
        self.exported_changed();
        if reserve + shared > 0 {
            self.released.notify();
        }
    }
}

/// Bytes charged to a [`RequestBudget`], given back when dropped.
pub struct Charge {
    budget: Rc<RequestBudget>,
    reserve: usize,
    shared: usize,
}

impl Charge {
    pub fn bytes(&self) -> usize {
        self.reserve + self.shared
    }

    /// Raises the charge to at least `bytes` at once, past the budget if need be: for a
    /// response whose memory is already taken. New requests then wait until it is written.
    pub fn grow_to(&mut self, bytes: usize) {
        let extra = bytes.saturating_sub(self.bytes());
        self.budget
            .shared_used
            .set(self.budget.shared_used.get() + extra);
        self.shared += extra;
        self.budget.exported_changed();
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.release(self.reserve, self.shared);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_charged_and_waits_are_exported() {
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
        let shard = metrics.for_shard(0);
        let b = RequestBudget::new(MIN_SHARD_BUDGET_BYTES);
        b.export_to(
            shard.request_memory_used.clone(),
            shard.request_memory_waits.clone(),
        );
        let large = SMALL_FRAME_MAX_BYTES;
        let mut held = b.try_charge(large).expect("room for one large frame");
        assert_eq!(shard.request_memory_used.get(), large as i64);
        held.grow_to(large + 10);
        assert_eq!(shard.request_memory_used.get(), large as i64 + 10);
        let waiting =
            futures_lite::future::block_on(futures_lite::future::poll_once(b.charge(large)));
        assert!(waiting.is_none(), "the budget is spent");
        assert_eq!(shard.request_memory_waits.get(), 1);
        drop(held);
        assert_eq!(shard.request_memory_used.get(), 0);
    }

    #[test]
    fn large_frames_leave_the_reserve_to_small_ones() {
        let b = RequestBudget::new(8 << 20);
        let reserve = b.reserve_bytes;
        assert_eq!(reserve, 1 << 20);
        let big = b.try_charge(7 << 20).expect("fits the shared part");
        assert!(b.try_charge(1 << 20).is_none(), "a large frame waits");
        let small: Vec<_> = (0..reserve / 1024).map(|_| b.try_charge(1024)).collect();
        assert!(
            small.iter().all(Option::is_some),
            "small frames use the reserve"
        );
        assert!(b.try_charge(1024).is_none(), "until it is spent");
        drop(big);
        assert!(
            b.try_charge(1024).is_some(),
            "then they use the shared part"
        );
        drop(small);
    }

    #[test]
    fn a_frame_larger_than_the_budget_is_clamped_and_served_alone() {
        let b = RequestBudget::new(1 << 20);
        let huge = b.try_charge(100 << 20).expect("clamped to the shared part");
        assert_eq!(huge.bytes(), b.shared_bytes);
        assert!(b.try_charge(SMALL_FRAME_MAX_BYTES).is_none());
        assert!(b.try_charge(100).is_some(), "small frames still pass");
        drop(huge);
        assert_eq!(b.shared_used.get(), 0);
    }

    #[test]
    fn a_grown_response_charge_holds_back_requests_until_dropped() {
        let b = RequestBudget::new(1 << 20);
        let mut c = b.try_charge(100).unwrap();
        c.grow_to(4 << 20);
        assert_eq!(c.bytes(), 4 << 20);
        assert!(b.used_bytes() > 1 << 20, "a response may overdraw");
        assert!(b.try_charge(SMALL_FRAME_MAX_BYTES).is_none());
        drop(c);
        assert_eq!(b.used_bytes(), 0);
    }
}
