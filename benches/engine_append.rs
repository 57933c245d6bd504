//! Append throughput of one partition log on one glommio executor, for 1 KiB, 16 KiB and 1 MiB
//! batches under each flush policy. Many producer tasks append concurrently (as connections
//! would); `always` producers wait for their group commit like acks=1 produce requests do. Each
//! measurement ends with a sync, so every byte counted is on disk.
//!
//! Data goes to `$SPATE_BENCH_DIR` (default: the system temp dir), which should be on the disk
//! that fio measured (see scripts/bench-engine.sh).

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use spate_engine::batch::build_batch;
use spate_engine::{FlushPolicy, LogConfig, PartitionLog};

/// Producer tasks appending concurrently to the one log.
const PRODUCERS: u64 = 32;

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("SPATE_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).expect("bench dir"),
        None => tempfile::tempdir().expect("temp dir"),
    }
}

fn policies() -> [(&'static str, FlushPolicy); 3] {
    [
        ("always", FlushPolicy::Always),
        (
            "interval",
            FlushPolicy::Interval {
                interval_ms: 100,
                interval_bytes: 256 << 20,
            },
        ),
        ("never", FlushPolicy::Never),
    ]
}

/// Appends `iters` batches (split among the producers) and returns the time until all of them
/// are durable.
fn append_run(template: &Bytes, policy: FlushPolicy, iters: u64) -> Duration {
    let dir = bench_dir();
    let config = LogConfig {
        flush: policy,
        max_batch_bytes: 2 << 20,
        retention_ms: None,
        ..LogConfig::default()
    };
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor")
        .run(async move {
            let log = Rc::new(PartitionLog::open(dir.path(), config).await.unwrap());
            let start = Instant::now();
            let mut tasks = Vec::new();
            for p in 0..PRODUCERS {
                let n = iters / PRODUCERS + u64::from(p < iters % PRODUCERS);
                let log = log.clone();
                let template = template.clone();
                tasks.push(glommio::spawn_local(async move {
                    for _ in 0..n {
                        let info = log.append(template.clone(), 1).await.unwrap();
                        if policy == FlushPolicy::Always {
                            log.sync_to(info.last_offset + 1).await.unwrap();
                        }
                    }
                }));
            }
            for t in tasks {
                t.await;
            }
            log.sync_to(log.log_end_offset()).await.unwrap();
            let elapsed = start.elapsed();
            log.close().await.unwrap();
            drop(dir);
            elapsed
        })
}

fn append(c: &mut Criterion) {
    for (size_name, size) in [
        ("1KiB", 1usize << 10),
        ("16KiB", 16 << 10),
        ("1MiB", 1 << 20),
    ] {
        let mut group = c.benchmark_group(format!("append/{size_name}"));
        group.throughput(Throughput::Bytes(size as u64));
        group.sample_size(10);
        group.warm_up_time(Duration::from_secs(1));
        group.measurement_time(Duration::from_secs(4));
        let template = Bytes::from(build_batch(&vec![7u8; size - 61], 10, 0, 0));
        for (policy_name, policy) in policies() {
            group.bench_function(BenchmarkId::from_parameter(policy_name), |b| {
                b.iter_custom(|iters| append_run(&template, policy, iters))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, append);
criterion_main!(benches);
