//! Log cleaner throughput (MB/s of log cleaned) on one glommio executor: a log of
//! `LOG_BYTES` of updates over `KEYS` keys (100-byte values, 100 records per batch, uncompressed
//! and lz4) is cleaned in one forced clean; throughput counts the log's bytes before cleaning.
//! Each sample cleans a fresh copy of the same dirty log (the copy is not timed).
//!
//! Data goes to `$SPATE_BENCH_DIR` (default: the system temp dir), which should be on the disk
//! that fio measured (see scripts/bench-engine.sh).

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use spate_engine::batch::VerifiedBatch;
use spate_engine::clean::{CleanRequest, CleanerConfig, CompactionPolicy, LogCleaner};
use spate_engine::validate::build;
use spate_engine::{FlushPolicy, LogConfig, PartitionLog};

/// Bytes of batches in the benchmarked log.
const LOG_BYTES: usize = 64 << 20;
/// Distinct keys updated round-robin.
const KEYS: usize = 10_000;
const RECORDS_PER_BATCH: usize = 100;
const VALUE_BYTES: usize = 100;

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("SPATE_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).expect("bench dir"),
        None => tempfile::tempdir().expect("temp dir"),
    }
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 16 << 20,
        flush: FlushPolicy::Never,
        retention_ms: None,
        ..LogConfig::default()
    }
}

fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor")
        .run(f)
}

/// Writes the dirty log; returns its bytes of segments.
fn write_log(dir: &Path, codec: u8) -> u64 {
    run(async {
        let log = PartitionLog::open(dir, config()).await.expect("open");
        let mut written = 0usize;
        let mut next_key = 0usize;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        while written < LOG_BYTES {
            let mut section = Vec::new();
            for i in 0..RECORDS_PER_BATCH {
                let key = format!("key-{:05}", next_key % KEYS);
                next_key += 1;
                let value: Vec<u8> = (0..VALUE_BYTES)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        b'a' + (x % 26) as u8
                    })
                    .collect();
                section.extend(build::record(
                    i as i64,
                    0,
                    Some(key.as_bytes()),
                    Some(&value),
                    &[],
                ));
            }
            let payload = if codec == 0 {
                section
            } else {
                build::compress(codec, &section)
            };
            let n = RECORDS_PER_BATCH as i32;
            let b = Bytes::from(build::batch(&payload, n, n - 1, codec));
            written += b.len();
            log.append(VerifiedBatch::from_bytes(b).expect("valid"), 0)
                .await
                .expect("append");
        }
        log.close().await.expect("close");
    });
    std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry"))
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| e.metadata().expect("metadata").len())
        .sum()
}

/// Cleans a fresh copy of `source`; returns the time of the clean alone.
fn clean_copy(source: &Path) -> Duration {
    let dir = bench_dir();
    for e in std::fs::read_dir(source).expect("dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), dir.path().join(e.file_name())).expect("copy");
    }
    run(async {
        let log = PartitionLog::open(dir.path(), config())
            .await
            .expect("open");
        let mut cleaner = LogCleaner::open(&log, CleanerConfig::default());
        let req = CleanRequest {
            now_ms: i64::MAX / 2,
            max_clean_offset: u64::MAX,
            policy: CompactionPolicy::default(),
            force: true,
            keep_batches: Default::default(),
            urgent: false,
        };
        let start = Instant::now();
        let stats = cleaner.clean(&log, &req).await.expect("clean");
        let elapsed = start.elapsed();
        assert!(
            stats.is_some_and(|s| s.bytes_reclaimed > 0),
            "the clean did work"
        );
        log.close().await.expect("close");
        elapsed
    })
}

fn cleaner_throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("cleaner");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    for (name, codec) in [("none", 0u8), ("lz4", 3)] {
        let source = bench_dir();
        let bytes = write_log(source.path(), codec);
        group.throughput(Throughput::Bytes(bytes));
        group.bench_function(BenchmarkId::new("clean_64MiB_10k_keys", name), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| clean_copy(source.path())).sum())
        });
    }
    group.finish();
}

criterion_group!(benches, cleaner_throughput);
criterion_main!(benches);
