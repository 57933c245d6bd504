//! Append, read, sync and reopen on a real directory through direct I/O.

mod common;

use common::*;
use spate_engine::batch::BatchHeader;
use spate_engine::batch::VerifiedBatch;
use spate_engine::{set_shard_cache_bytes, EngineError, FlushPolicy, LogConfig, PartitionLog};

#[test]
fn append_read_sync_reopen() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert_eq!((log.log_start_offset(), log.log_end_offset()), (0, 0));
        let mut expected = Vec::new();
        for i in 0..50u64 {
            let b = batch(i, 100 + (i as usize * 37) % 3000, 3, 1000 + i as i64);
            let info = log
                .append(VerifiedBatch::from_bytes(b.clone()).unwrap(), 5)
                .await
                .unwrap();
            assert_eq!(info.base_offset, i * 3);
            assert_eq!(info.last_offset, i * 3 + 2);
            expected.push(stamped(&b, i * 3, 5));
        }
        assert_eq!(log.log_end_offset(), 150);
        // Readable at once, from memory.
        let r = log.read(0, usize::MAX).await.unwrap();
        assert_eq!(r.batches, expected);
        log.sync_to(150).await.unwrap();
        assert_eq!(log.durable_offset(), 150);
        // A read from the middle of a batch starts with that batch.
        let r = log.read(31, 1).await.unwrap();
        assert_eq!(r.batches, vec![expected[10].clone()]);
        assert!(log.read(150, 100).await.unwrap().batches.is_empty());
        assert!(matches!(
            log.read(151, 100).await,
            Err(EngineError::OffsetOutOfRange { .. })
        ));
        for b in &r.batches {
            BatchHeader::parse(b).unwrap().verify_crc().unwrap();
        }
        log.close().await.unwrap();
        assert!(matches!(log.read(0, 1).await, Err(EngineError::Closed)));

        // Reopen: everything is back, served from disk.
        set_shard_cache_bytes(0);
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert_eq!(log.log_end_offset(), 150);
        assert_eq!(log.durable_offset(), 150);
        let r = log.read(0, usize::MAX).await.unwrap();
        assert_eq!(r.batches, expected);
        for start in [0u64, 1, 44, 100, 149] {
            let r = log.read(start, 5000).await.unwrap();
            let first = (start / 3) as usize;
            assert_eq!(r.batches[0], expected[first]);
            let total: usize = r.batches.iter().map(|b| b.len()).sum();
            assert!(r.batches.len() == 1 || total <= 5000);
            assert_eq!(&r.batches[..], &expected[first..first + r.batches.len()]);
        }
        // Appending continues after the recovered tail page.
        let b = batch(99, 500, 1, 5000);
        assert_eq!(
            log.append(VerifiedBatch::from_bytes(b.clone()).unwrap(), 6)
                .await
                .unwrap()
                .base_offset,
            150
        );
        log.close().await.unwrap();
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        let r = log.read(150, 1).await.unwrap();
        assert_eq!(r.batches, vec![stamped(&b, 150, 6)]);
        assert_eq!(log.end_offset_for_epoch(5), Some((5, 150)));
        assert_eq!(log.end_offset_for_epoch(6), Some((6, 151)));
        assert_eq!(log.end_offset_for_epoch(4), None);
        log.close().await.unwrap();
        set_shard_cache_bytes(spate_engine::DEFAULT_SHARD_CACHE_BYTES);
    });
}

#[test]
fn rejects_bad_batches() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        let big = batch(1, 70 << 10, 1, 0);
        assert!(matches!(
            log.append(VerifiedBatch::from_bytes(big).unwrap(), 0).await,
            Err(EngineError::BatchTooLarge { limit, .. }) if limit == 64 << 10
        ));
        let mut bad = batch(1, 100, 1, 0).to_vec();
        bad[16] = 1; // magic
        assert!(matches!(
            VerifiedBatch::from_bytes(bad.into()),
            Err(EngineError::InvalidBatch(_))
        ));
        assert!(matches!(
            VerifiedBatch::from_bytes(bytes::Bytes::from_static(b"short")),
            Err(EngineError::InvalidBatch(_))
        ));
        // A flipped byte anywhere the batch CRC covers is refused before the log sees it.
        let good = batch(1, 100, 1, 0);
        for i in spate_engine::batch::CRC_COVERED_START..good.len() {
            let mut corrupt = good.to_vec();
            corrupt[i] ^= 0x20;
            assert!(
                matches!(
                    VerifiedBatch::from_bytes(corrupt.into()),
                    Err(EngineError::InvalidBatch(_))
                ),
                "flip at {i}"
            );
        }
        assert_eq!(log.log_end_offset(), 0);
        log.close().await.unwrap();
    });
}

#[test]
fn rolls_segments_and_reads_across_them() {
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
        let mut expected = Vec::new();
        for i in 0..200u64 {
            let b = batch(i, 5000 + (i as usize % 7) * 1000, 2, i as i64);
            let info = log
                .append(VerifiedBatch::from_bytes(b.clone()).unwrap(), 1)
                .await
                .unwrap();
            expected.push(stamped(&b, info.base_offset, 1));
        }
        let segments = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "log")
            })
            .count();
        assert!(segments >= 5, "{segments} segments");
        let mut next = 0;
        let mut got = Vec::new();
        while next < log.log_end_offset() {
            let r = log.read(next, 20_000).await.unwrap();
            next = BatchHeader::parse(r.batches.last().unwrap())
                .unwrap()
                .last_offset() as u64
                + 1;
            got.extend(r.batches);
        }
        assert_eq!(got, expected);
        assert_eq!(log.offset_for_timestamp(57).await.unwrap(), Some((114, 57)));
        assert_eq!(log.offset_for_timestamp(1000).await.unwrap(), None);
        log.close().await.unwrap();
        let log = PartitionLog::open(dir.path(), config).await.unwrap();
        let r = log.read(0, usize::MAX).await.unwrap();
        assert_eq!(r.batches, expected);
        log.close().await.unwrap();
        set_shard_cache_bytes(spate_engine::DEFAULT_SHARD_CACHE_BYTES);
    });
}

/// A log that took one small batch reserves a small run ahead, and a busy one reserves more as
/// its segment grows (up to PREALLOCATE_AHEAD_BYTES): thousands of barely used partitions must
/// not each hold 16 MiB of disk.
#[test]
fn preallocation_grows_with_the_segment() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let config = LogConfig {
            segment_bytes: 1 << 30,
            ..small_config()
        };
        let log = PartitionLog::open(dir.path(), config.clone())
            .await
            .unwrap();
        let b = batch(0, 100, 1, 1000);
        log.append(VerifiedBatch::from_bytes(b).unwrap(), 1)
            .await
            .unwrap();
        log.sync_to(1).await.unwrap();
        let seg = dir.path().join("00000000000000000000.log");
        let allocated = || std::fs::metadata(&seg).unwrap().blocks() * 512;
        let small = allocated();
        assert!(
            small <= 128 << 10, // twice PREALLOCATE_AHEAD_MIN_BYTES
            "one small batch reserved {small} bytes"
        );
        let mut offset = 1;
        while allocated() < 4 << 20 {
            let b = batch(offset, 60_000, 1, 1000);
            log.append(VerifiedBatch::from_bytes(b).unwrap(), 1)
                .await
                .unwrap();
            offset += 1;
            assert!(
                offset < 10_000,
                "never reserved more than {} bytes",
                allocated()
            );
        }
        log.close().await.unwrap();
    });
}
