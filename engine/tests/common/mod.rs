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
