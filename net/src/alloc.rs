//! The broker's global allocator: jemalloc, with hostile length fields kept from aborting the
//! process.
//!
//! The `kafka-protocol` decoders call `Vec::with_capacity(count)` with the array count read
//! from the wire before checking it against the bytes that remain. A 4-byte count can ask for
//! hundreds of GiB; with the kernel's default heuristic overcommit that allocation fails and
//! Rust aborts. Requests this large are never legitimate (frames are capped far below), so they
//! are served from `MAP_NORESERVE` anonymous mappings: address space only, no commit charge.
//! The decoder then fails on the missing bytes after touching a few pages, and the mapping is
//! returned. Everything smaller goes to jemalloc.
//!
//! Why jemalloc and not glibc's malloc: a cluster node's shard thread and its cluster service
//! thread allocate and free constantly (peer messages, their batches, Kafka requests). glibc
//! had to be held to one arena (its per-thread arenas are unmapped as soon as they are wholly
//! free, so shards that allocate and free buffers of several MiB per fetch kept mapping and
//! faulting fresh pages), and one arena is one lock: with three nodes on two CPUs, a thread
//! preempted while holding it stalled the other for hundreds of milliseconds, long enough for
//! a shard's leaders to miss their heartbeats (1,000 partitions under produce load lost
//! hundreds of leaders per 10 s run). jemalloc's thread caches and per-CPU arenas take no
//! shared lock on the common path, and it keeps freed extents for reuse (dirty pages decay
//! over seconds) without those tunables. Measured in docs/benchmarks.md (session 15).
//!
//! Install it in each binary: `#[global_allocator] static A: NoReserveLargeAlloc = NoReserveLargeAlloc;`
//! (the broker also hands jemalloc its options there: `src/main.rs`, `JEMALLOC_CONF`).

use std::alloc::{GlobalAlloc, Layout};

use tikv_jemallocator::Jemalloc;

/// Hands the allocator's free memory back to the kernel (every arena's dirty pages purged).
/// True if jemalloc took the request. It walks the arenas under their locks, so call it only
/// when the process is quiet.
pub fn give_back_free_memory() -> bool {
    // "arena.<MALLCTL_ARENAS_ALL>.purge": every arena.
    const PURGE_ALL: &[u8] = b"arena.4096.purge\0";
    // SAFETY: a NUL-terminated mallctl name with no old or new value: the documented way to
    // ask jemalloc to purge; it only releases memory jemalloc holds free.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        ) == 0
    }
}

/// Allocations at or above this size get a `MAP_NORESERVE` mapping.
pub const LARGE_ALLOC_BYTES: usize = 1 << 30;
const PAGE_BYTES: usize = 4096;

pub struct NoReserveLargeAlloc;

fn is_large(layout: &Layout) -> bool {
    layout.size() >= LARGE_ALLOC_BYTES && layout.align() <= PAGE_BYTES
}

// SAFETY: large blocks come from mmap (page aligned, so any align <= PAGE_BYTES holds) and go
// back to munmap with the same size; all others are jemalloc's.
unsafe impl GlobalAlloc for NoReserveLargeAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_large(&layout) {
            let p = libc::mmap(
                std::ptr::null_mut(),
                layout.size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                std::ptr::null_mut()
            } else {
                p as *mut u8
            }
        } else {
            Jemalloc.alloc(layout)
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_large(&layout) {
            // Fresh anonymous mappings are zero-filled.
            self.alloc(layout)
        } else {
            Jemalloc.alloc_zeroed(layout)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_large(&layout) {
            libc::munmap(ptr as *mut libc::c_void, layout.size());
        } else {
            Jemalloc.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        if !is_large(&layout) && !is_large(&new_layout) {
            return Jemalloc.realloc(ptr, layout, new_size);
        }
        let new = self.alloc(new_layout);
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new
    }
}
