//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::future::Future;

use bytes::Bytes;
use spate_engine::batch::{build_batch, BatchHeader};
use spate_engine::{FlushPolicy, LogConfig};

/// Runs a future on a fresh glommio executor on this thread.
pub fn run<T>(f: impl Future<Output = T>) -> T {
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("glommio executor")
        .run(f)
}

/// A batch of `records` records whose records section is `len` bytes derived from `seed`.
pub fn batch(seed: u64, len: usize, records: i32, ts: i64) -> Bytes {
    let body: Vec<u8> = (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
        .collect();
    Bytes::from(build_batch(&body, records, ts, ts))
}

pub fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes: 256 << 10,
        segment_ms: None,
        index_interval_bytes: 1024,
        max_batch_bytes: 64 << 10,
        retention_bytes: None,
        retention_ms: None,
        flush: FlushPolicy::Always,
    }
}

/// A batch as the log returns it: stamped with its base offset and epoch.
pub fn stamped(b: &Bytes, base: u64, epoch: i32) -> Bytes {
    let mut v = b.to_vec();
    spate_engine::batch::stamp(&mut v, base as i64, epoch);
    Bytes::from(v)
}

pub fn base_of(b: &[u8]) -> u64 {
    BatchHeader::parse(b).unwrap().base_offset() as u64
}

/// A scratch directory on tmpfs when there is one: the crash and cleaner tests reopen logs
/// thousands of times, and a disk would make that minutes instead of seconds.
pub fn scratch() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

/// Copies a log directory's files (flat: a partition directory has no subdirectories).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
