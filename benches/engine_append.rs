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
use spate_engine::batch::VerifiedBatch;
use spate_engine::{FlushPolicy, LogConfig, PartitionLog};

/// Producer tasks appending concurrently to the one log.
const PRODUCERS: u64 = 32;
/// Retention limit of the benchmarked log.
const RETAINED_BYTES: u64 = 512 << 20;
/// How often the retention task runs during a measurement.
const RETENTION_PERIOD_MS: u64 = 50;

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

/// Every measured run appends at least this much, so the fixed cost of its final sync does not
/// dominate short runs; the time is scaled back to the `iters` criterion asked for. (`always`
/// runs are fdatasync-bound and pay that cost per group commit anyway: a smaller floor keeps
/// their samples short.)
const MIN_RUN_BYTES: u64 = 64 << 20;
const MIN_RUN_BYTES_ALWAYS: u64 = 4 << 20;

/// Appends `iters` batches (at least `MIN_RUN_BYTES`, split among the producers) and returns
/// the time until all of them are durable, per `iters`.
fn append_run(template: &Bytes, policy: FlushPolicy, iters: u64) -> Duration {
    let floor = if policy == FlushPolicy::Always {
        MIN_RUN_BYTES_ALWAYS
    } else {
        MIN_RUN_BYTES
    };
    let runs = iters.max(floor.div_ceil(template.len() as u64));
    let elapsed = append_n(template, policy, runs);
    elapsed.mul_f64(iters as f64 / runs as f64)
}

fn append_n(template: &Bytes, policy: FlushPolicy, iters: u64) -> Duration {
    let dir = bench_dir();
    // Retention keeps the disk footprint of a run bounded (the machine's disk is shared), the
    // way a broker's retention would.
    let config = LogConfig {
        flush: policy,
        max_batch_bytes: 2 << 20,
        segment_bytes: 128 << 20,
        retention_bytes: Some(RETAINED_BYTES),
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
                        let info = log
                            .append(VerifiedBatch::from_bytes(template.clone()).unwrap(), 1)
                            .await
                            .unwrap();
                        if policy == FlushPolicy::Always {
                            log.sync_to(info.last_offset + 1).await.unwrap();
                        }
                    }
                }));
            }
            let done = Rc::new(std::cell::Cell::new(false));
            let retention = {
                let (log, done) = (log.clone(), done.clone());
                glommio::spawn_local(async move {
                    while !done.get() {
                        glommio::timer::sleep(Duration::from_millis(RETENTION_PERIOD_MS)).await;
                        log.apply_retention(0).await.unwrap();
                    }
                })
            };
            for t in tasks {
                t.await;
            }
            done.set(true);
            log.sync_to(log.log_end_offset()).await.unwrap();
            let elapsed = start.elapsed();
            retention.await;
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
