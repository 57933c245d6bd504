//! Sequential read throughput of one partition log: a consumer fetching 1 MiB at a time from
//! the start of a 256 MiB log of 16 KiB batches, from disk (cache off) and from the shard cache.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use spate_engine::batch::VerifiedBatch;
use spate_engine::batch::{build_batch, BatchHeader};
use spate_engine::{set_shard_cache_bytes, FlushPolicy, LogConfig, PartitionLog};

const LOG_BYTES: usize = 256 << 20;
const BATCH_BYTES: usize = 16 << 10;
const FETCH_BYTES: usize = 1 << 20;

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("SPATE_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).expect("bench dir"),
        None => tempfile::tempdir().expect("temp dir"),
    }
}

fn read(c: &mut Criterion) {
    let dir = bench_dir();
    let ex = glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor");
    let config = LogConfig {
        flush: FlushPolicy::Never,
        retention_ms: None,
        ..LogConfig::default()
    };
    let template = Bytes::from(build_batch(&vec![3u8; BATCH_BYTES - 61], 10, 0, 0));
    let log = ex.run(async {
        // The cache is filled by appends: keep the whole log in it for the cached variant.
        set_shard_cache_bytes(2 * LOG_BYTES);
        let log = PartitionLog::open(dir.path(), config).await.unwrap();
        for _ in 0..LOG_BYTES / BATCH_BYTES {
            log.append(VerifiedBatch::from_bytes(template.clone()).unwrap(), 1)
                .await
                .unwrap();
        }
        log.sync_to(log.log_end_offset()).await.unwrap();
        log
    });
    let mut group = c.benchmark_group("read/sequential-1MiB-fetch");
    group.throughput(Throughput::Bytes(FETCH_BYTES as u64));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    // Cached first: setting the budget to 0 for the disk variant empties the cache.
    for (name, cache_bytes) in [("cache", 2 * LOG_BYTES), ("disk", 0usize)] {
        ex.run(async { set_shard_cache_bytes(cache_bytes) });
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                ex.run(async {
                    let end = log.log_end_offset();
                    let mut next = 0;
                    let start = Instant::now();
                    for _ in 0..iters {
                        if next >= end {
                            next = 0;
                        }
                        let r = log.read(next, FETCH_BYTES).await.unwrap();
                        let last = r.batches.last().unwrap();
                        next = BatchHeader::parse(last).unwrap().last_offset() as u64 + 1;
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
    ex.run(async { log.close().await.unwrap() });
}

criterion_group!(benches, read);
criterion_main!(benches);
