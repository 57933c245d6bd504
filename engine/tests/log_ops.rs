//! Truncation, retention, leader epochs, concurrency and flush policies on a real directory.

mod common;

use std::rc::Rc;

use common::*;
use spate_engine::batch::VerifiedBatch;
use spate_engine::{set_shard_cache_bytes, EngineError, FlushPolicy, LogConfig, PartitionLog};

fn count_segments(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "log")
        })
        .count()
}

#[test]
fn truncate_epochs_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        set_shard_cache_bytes(0);
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        let mut expected = Vec::new();
        // Epoch 1: offsets 0..60, epoch 3: 60..120, epoch 4: 120..., over several segments.
        for i in 0..90u64 {
            let epoch = match i {
                0..30 => 1,
                30..60 => 3,
                _ => 4,
            };
            let b = batch(i, 12_000, 2, i as i64);
            let info = log
                .append(VerifiedBatch::from_bytes(b.clone()).unwrap(), epoch)
                .await
                .unwrap();
            expected.push(stamped(&b, info.base_offset, epoch));
        }
        assert!(count_segments(dir.path()) > 3);
        assert_eq!(log.end_offset_for_epoch(0), None);
        assert_eq!(log.end_offset_for_epoch(1), Some((1, 60)));
        assert_eq!(log.end_offset_for_epoch(2), Some((1, 60)));
        assert_eq!(log.end_offset_for_epoch(3), Some((3, 120)));
        assert_eq!(log.end_offset_for_epoch(9), Some((4, 180)));

        // Inside a batch: the whole batch goes.
        log.truncate_to(101).await.unwrap();
        assert_eq!(log.log_end_offset(), 100);
        assert_eq!(log.end_offset_for_epoch(4), Some((3, 100)));
        let r = log.read(0, usize::MAX).await.unwrap();
        assert_eq!(r.batches, expected[..50]);
        // Truncating into an earlier segment removes the later ones.
        let before = count_segments(dir.path());
        log.truncate_to(20).await.unwrap();
        assert!(count_segments(dir.path()) < before);
        assert_eq!(log.log_end_offset(), 20);
        assert!(log.durable_offset() <= 20);
        assert!(log.recovery_point() <= 20);
        assert!(matches!(
            log.truncate_to(21).await,
            Err(EngineError::OffsetOutOfRange { .. })
        ));
        expected.truncate(10);
        let b = batch(500, 3000, 5, 7);
        let info = log
            .append(VerifiedBatch::from_bytes(b.clone()).unwrap(), 7)
            .await
            .unwrap();
        assert_eq!(info.base_offset, 20);
        expected.push(stamped(&b, 20, 7));
        assert_eq!(log.end_offset_for_epoch(6), Some((1, 20)));
        assert_eq!(log.end_offset_for_epoch(7), Some((7, 25)));
        assert_eq!(log.read(0, usize::MAX).await.unwrap().batches, expected);
        // A crash right after truncation (no close) recovers the truncated log.
        log.sync_to(25).await.unwrap();
        std::mem::forget(log);
    });
    run(async {
        set_shard_cache_bytes(0);
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert_eq!(log.log_end_offset(), 25);
        assert_eq!(log.end_offset_for_epoch(1), Some((1, 20)));
        assert_eq!(log.end_offset_for_epoch(7), Some((7, 25)));
        assert_eq!(log.read(0, usize::MAX).await.unwrap().batches.len(), 11);
        log.truncate_to(0).await.unwrap();
        assert_eq!(log.log_end_offset(), 0);
        assert_eq!(log.end_offset_for_epoch(7), None);
        log.close().await.unwrap();
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert_eq!((log.log_start_offset(), log.log_end_offset()), (0, 0));
        log.delete().await.unwrap();
        assert!(!dir.path().exists());
    });
}

#[test]
fn retention_by_size_and_age() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        set_shard_cache_bytes(0);
        let config = LogConfig {
            retention_bytes: Some(600 << 10),
            retention_ms: Some(10_000),
            flush: FlushPolicy::Never,
            ..small_config()
        };
        let log = PartitionLog::open(dir.path(), config.clone())
            .await
            .unwrap();
        for i in 0..400u64 {
            // Timestamps: old for the first half, recent for the second.
            let ts = if i < 200 { 1_000 } else { 100_000 };
            log.append(VerifiedBatch::from_bytes(batch(i, 4000, 1, ts)).unwrap(), 0)
                .await
                .unwrap();
        }
        let segments = count_segments(dir.path());
        assert!(segments >= 6, "{segments}");
        // Nothing is old at now = 5_000 and the size limit keeps ~600 KiB.
        let start = log.apply_retention(5_000).await.unwrap();
        assert!(start > 0);
        let r = log.read(start, usize::MAX).await.unwrap();
        let kept: usize = r.batches.iter().map(|b| b.len()).sum();
        assert!(kept >= 600 << 10, "kept {kept}");
        assert!(kept < (600 << 10) + (256 << 10) + 8000, "kept {kept}");
        assert!(matches!(
            log.read(start - 1, 1).await,
            Err(EngineError::OffsetOutOfRange { .. })
        ));
        assert_eq!(r.batches.len() as u64, 400 - start);
        // Age: everything with timestamp 1_000 is older than 10 s at now = 50_000.
        let by_size = start;
        let config2 = LogConfig {
            retention_bytes: None,
            ..config.clone()
        };
        log.close().await.unwrap();
        let log = PartitionLog::open(dir.path(), config2).await.unwrap();
        assert_eq!(log.log_start_offset(), by_size);
        let start = log.apply_retention(50_000).await.unwrap();
        assert!((by_size..=200).contains(&start), "{start}");
        let first = log.read(start, 1).await.unwrap().batches[0].clone();
        assert!(
            spate_engine::batch::BatchHeader::parse(&first)
                .unwrap()
                .max_timestamp()
                >= 1_000
        );
        // At a much later time every sealed segment goes, the active one stays.
        let start = log.apply_retention(10_000_000).await.unwrap();
        assert!(start > 200 && start < 400, "{start}");
        assert_eq!(count_segments(dir.path()), 1);
        log.close().await.unwrap();
        let log = PartitionLog::open(dir.path(), config).await.unwrap();
        assert_eq!(log.log_start_offset(), start);
        assert_eq!(log.log_end_offset(), 400);
        log.close().await.unwrap();
    });
}

#[test]
fn delete_segments_below_drops_only_whole_segments_under_the_offset() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        set_shard_cache_bytes(0);
        let config = LogConfig {
            flush: FlushPolicy::Never,
            ..small_config()
        };
        let log = PartitionLog::open(dir.path(), config.clone())
            .await
            .unwrap();
        for i in 0..300u64 {
            log.append(
                VerifiedBatch::from_bytes(batch(i, 4000, 1, 1_000)).unwrap(),
                0,
            )
            .await
            .unwrap();
        }
        let segments = count_segments(dir.path());
        assert!(segments >= 4, "{segments}");
        // Nothing lies wholly below the first segment's end.
        assert_eq!(log.delete_segments_below(1).await.unwrap(), 0);
        assert_eq!(count_segments(dir.path()), segments);
        // The segment holding 150 stays, so the new start is its base, at or below 150.
        let start = log.delete_segments_below(150).await.unwrap();
        assert!(start > 0 && start <= 150, "{start}");
        assert!(count_segments(dir.path()) < segments);
        assert!(matches!(
            log.read(start - 1, 1).await,
            Err(EngineError::OffsetOutOfRange { .. })
        ));
        let r = log.read(start, usize::MAX).await.unwrap();
        assert_eq!(r.batches.len() as u64, 300 - start);
        // Past the end: every sealed segment goes, the active one stays.
        let start = log.delete_segments_below(u64::MAX).await.unwrap();
        assert!(start > 150 && start < 300, "{start}");
        assert_eq!(count_segments(dir.path()), 1);
        log.close().await.unwrap();
        let log = PartitionLog::open(dir.path(), config).await.unwrap();
        assert_eq!(log.log_start_offset(), start);
        assert_eq!(log.log_end_offset(), 300);
        log.close().await.unwrap();
    });
}

#[test]
fn concurrent_appenders_share_group_commits() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = Rc::new(
            PartitionLog::open(dir.path(), small_config())
                .await
                .unwrap(),
        );
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let log = log.clone();
            tasks.push(glommio::spawn_local(async move {
                let mut mine = Vec::new();
                for i in 0..40u64 {
                    let b = batch(t * 1000 + i, 200 + (i as usize * 53) % 4000, 1, 0);
                    let info = log
                        .append(VerifiedBatch::from_bytes(b.clone()).unwrap(), 2)
                        .await
                        .unwrap();
                    log.sync_to(info.last_offset + 1).await.unwrap();
                    assert!(log.durable_offset() > info.last_offset);
                    mine.push((info.base_offset, stamped(&b, info.base_offset, 2)));
                }
                mine
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await);
        }
        all.sort_by_key(|(o, _)| *o);
        let expected: Vec<_> = all.into_iter().map(|(_, b)| b).collect();
        assert_eq!(log.log_end_offset(), 320);
        assert_eq!(log.read(0, usize::MAX).await.unwrap().batches, expected);
        log.close().await.unwrap();
        set_shard_cache_bytes(0);
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert_eq!(log.read(0, usize::MAX).await.unwrap().batches, expected);
        log.close().await.unwrap();
    });
}

#[test]
fn interval_flush_makes_appends_durable() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let config = LogConfig {
            flush: FlushPolicy::Interval {
                interval_ms: 5,
                interval_bytes: 1 << 30,
            },
            ..small_config()
        };
        let log = PartitionLog::open(dir.path(), config).await.unwrap();
        log.append(VerifiedBatch::from_bytes(batch(1, 1000, 3, 0)).unwrap(), 0)
            .await
            .unwrap();
        // Poll with a bounded deadline: the timer flusher must get there on its own.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while log.durable_offset() < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "interval flush never ran"
            );
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        log.close().await.unwrap();
    });
    run(async {
        let config = LogConfig {
            flush: FlushPolicy::Interval {
                interval_ms: 1 << 30,
                interval_bytes: 4096,
            },
            ..small_config()
        };
        let log = PartitionLog::open(dir.path(), config).await.unwrap();
        for i in 0..3 {
            log.append(VerifiedBatch::from_bytes(batch(i, 3000, 1, 0)).unwrap(), 0)
                .await
                .unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while log.durable_offset() < 4 {
            assert!(
                std::time::Instant::now() < deadline,
                "byte-count flush never ran"
            );
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        log.close().await.unwrap();
    });
}

#[test]
fn never_policy_syncs_only_on_request_and_close() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let config = LogConfig {
            flush: FlushPolicy::Never,
            ..small_config()
        };
        let log = PartitionLog::open(dir.path(), config.clone())
            .await
            .unwrap();
        for i in 0..10 {
            log.append(VerifiedBatch::from_bytes(batch(i, 2000, 1, 0)).unwrap(), 0)
                .await
                .unwrap();
        }
        assert_eq!(log.durable_offset(), 0);
        log.sync_to(5).await.unwrap();
        assert_eq!(log.durable_offset(), 10);
        log.close().await.unwrap();
    });
}

#[test]
fn large_batches_span_write_buffers() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        set_shard_cache_bytes(0);
        let config = LogConfig {
            segment_bytes: 16 << 20,
            max_batch_bytes: 3 << 20,
            ..small_config()
        };
        let log = PartitionLog::open(dir.path(), config.clone())
            .await
            .unwrap();
        let mut expected = Vec::new();
        for i in 0..9u64 {
            let b = batch(i, (1 << 20) + 4093 * i as usize, 10, 0);
            let info = log
                .append(VerifiedBatch::from_bytes(b.clone()).unwrap(), 0)
                .await
                .unwrap();
            expected.push(stamped(&b, info.base_offset, 0));
        }
        log.sync_to(90).await.unwrap();
        for (i, e) in expected.iter().enumerate() {
            let r = log.read(i as u64 * 10 + 3, 1).await.unwrap();
            assert!(r.batches[0] == *e, "batch {i}");
        }
        log.close().await.unwrap();
        let log = PartitionLog::open(dir.path(), config).await.unwrap();
        assert!(log.read(0, usize::MAX).await.unwrap().batches == expected);
        log.close().await.unwrap();
    });
}

#[test]
fn reads_racing_truncation_and_retention_never_report_corruption() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        set_shard_cache_bytes(0);
        let config = LogConfig {
            retention_bytes: Some(300 << 10),
            ..small_config()
        };
        let log = Rc::new(PartitionLog::open(dir.path(), config).await.unwrap());
        for i in 0..150u64 {
            log.append(VerifiedBatch::from_bytes(batch(i, 5000, 1, 0)).unwrap(), 0)
                .await
                .unwrap();
        }
        let stop = Rc::new(std::cell::Cell::new(false));
        let mut readers = Vec::new();
        for r in 0..4u64 {
            let (log, stop) = (log.clone(), stop.clone());
            readers.push(glommio::spawn_local(async move {
                let mut reads = 0u64;
                while !stop.get() {
                    let end = log.log_end_offset();
                    let start = log.log_start_offset();
                    let at = start + (reads * 7 + r * 13) % (end - start + 1);
                    match log.read(at, 20_000).await {
                        Ok(_) | Err(EngineError::OffsetOutOfRange { .. }) => {}
                        Err(e) => panic!("read at {at}: {e}"),
                    }
                    reads += 1;
                    glommio::yield_if_needed().await;
                }
                reads
            }));
        }
        for round in 0..20u64 {
            let end = log.log_end_offset();
            log.truncate_to(end - 10).await.unwrap();
            for i in 0..12u64 {
                log.append(
                    VerifiedBatch::from_bytes(batch(round * 100 + i, 5000, 1, 0)).unwrap(),
                    0,
                )
                .await
                .unwrap();
            }
            log.apply_retention(0).await.unwrap();
        }
        stop.set(true);
        for r in readers {
            assert!(r.await > 0);
        }
        log.close().await.unwrap();
    });
}

/// `read_joined` returns exactly the bytes of `read`'s batches laid end to end, whether they
/// come from disk (several segments, frame headers skipped) or from the cache, and keeps the
/// same limits: whole batches, at least one, no more than `max_bytes` otherwise.
#[test]
fn joined_reads_match_batch_reads_from_disk_and_cache() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        for cache_bytes in [0, 64 << 20] {
            set_shard_cache_bytes(cache_bytes);
            let sub = dir.path().join(format!("cache-{cache_bytes}"));
            let log = PartitionLog::open(&sub, small_config()).await.unwrap();
            for i in 0..60u64 {
                let size = 500 + (i as usize * 397) % 9_000;
                log.append(
                    VerifiedBatch::from_bytes(batch(i, size, 3, i as i64)).unwrap(),
                    0,
                )
                .await
                .unwrap();
            }
            log.sync_to(log.log_end_offset()).await.unwrap();
            assert!(count_segments(&sub) > 1, "reads cross segments");
            for (offset, max_bytes) in [
                (0, usize::MAX),
                (0, 1),
                (4, 10_000),
                (31, 50_000),
                (90, 0),
                (177, usize::MAX),
                (180, 100),
            ] {
                let batches = log.read(offset, max_bytes).await.unwrap();
                let joined = log.read_joined(offset, max_bytes).await.unwrap();
                assert_eq!(
                    joined.records,
                    batches.batches.concat(),
                    "offset {offset}, max {max_bytes}, cache {cache_bytes}"
                );
                assert_eq!(joined.log_end_offset, batches.log_end_offset);
                assert_eq!(joined.log_start_offset, batches.log_start_offset);
            }
            assert!(matches!(
                log.read_joined(181, 100).await,
                Err(EngineError::OffsetOutOfRange { .. })
            ));
            log.close().await.unwrap();
        }
        set_shard_cache_bytes(spate_engine::DEFAULT_SHARD_CACHE_BYTES);
    });
}

#[test]
fn live_limits_change_retention_and_the_batch_limit_of_an_open_log() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        set_shard_cache_bytes(0);
        let config = LogConfig {
            retention_bytes: None,
            retention_ms: None,
            flush: FlushPolicy::Never,
            ..small_config()
        };
        let log = PartitionLog::open(dir.path(), config.clone())
            .await
            .unwrap();
        for i in 0..200u64 {
            log.append(
                VerifiedBatch::from_bytes(batch(i, 4000, 1, 1_000)).unwrap(),
                0,
            )
            .await
            .unwrap();
        }
        // No limits: nothing goes.
        assert_eq!(log.apply_retention(1_000_000).await.unwrap(), 0);
        let mut limits = log.limits();
        limits.retention_bytes = Some(300 << 10);
        log.set_limits(limits).unwrap();
        let start = log.apply_retention(1_000_000).await.unwrap();
        assert!(start > 0, "the new size limit applies to the open log");
        // A smaller batch limit refuses what was accepted before.
        limits.max_batch_bytes = 1000;
        log.set_limits(limits).unwrap();
        assert!(matches!(
            log.append(
                VerifiedBatch::from_bytes(batch(0, 4000, 1, 1_000)).unwrap(),
                0
            )
            .await,
            Err(EngineError::BatchTooLarge { limit: 1000, .. })
        ));
        // A limit the segment cannot hold is refused and changes nothing.
        let mut too_big = limits;
        too_big.max_batch_bytes = u32::MAX;
        assert!(matches!(
            log.set_limits(too_big),
            Err(EngineError::Config(_))
        ));
        assert_eq!(log.limits(), limits);
        log.close().await.unwrap();
    });
}

/// Sizes for replica-move progress: the whole log, nothing at the end, never more than the
/// bytes from an earlier offset, and within one index interval of the exact suffix.
#[test]
fn bytes_from_counts_the_suffix_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        set_shard_cache_bytes(0);
        let config = small_config();
        let interval = u64::from(config.index_interval_bytes);
        let log = PartitionLog::open(dir.path(), config).await.unwrap();
        assert_eq!((log.size_bytes(), log.bytes_from(0)), (0, 0));
        // (base offset, bytes of the log from it), exact.
        let mut starts = Vec::new();
        for i in 0..150u64 {
            let b = batch(i, 3_000 + (i as usize % 7) * 500, 2, i as i64);
            let before = log.size_bytes();
            let info = log
                .append(VerifiedBatch::from_bytes(b).unwrap(), 1)
                .await
                .unwrap();
            starts.push((info.base_offset, before));
        }
        assert!(count_segments(dir.path()) > 2);
        let total = log.size_bytes();
        assert_eq!(log.bytes_from(0), total);
        assert_eq!(log.bytes_from(log.log_end_offset()), 0);
        assert_eq!(log.bytes_from(log.log_end_offset() + 10), 0);
        let mut last = u64::MAX;
        for (base, before) in starts {
            let exact = total - before;
            let got = log.bytes_from(base);
            assert!(
                got >= exact && got <= exact + interval + 8_000,
                "from {base}: {got}, exact {exact}"
            );
            assert!(got <= last, "never grows with the offset");
            last = got;
        }
    });
}
