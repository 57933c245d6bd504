//! Retention on a full disk: its one write that needs space, the recovery point, is retried
//! (as the other background writes are) instead of failing the pass, since deleting segments is
//! what gives space back; and a pass that gives up leaves the log consistent for the next one.

mod common;

use common::*;
use spate_engine::batch::VerifiedBatch;
use spate_engine::{FlushPolicy, LogConfig, PartitionLog, RETENTION_NO_SPACE_ATTEMPTS};

async fn log_with_old_segments(dir: &std::path::Path) -> PartitionLog {
    let config = LogConfig {
        retention_bytes: Some(300 << 10),
        flush: FlushPolicy::Always,
        ..small_config()
    };
    let log = PartitionLog::open(dir, config).await.unwrap();
    for i in 0..300u64 {
        log.append(
            VerifiedBatch::from_bytes(batch(i, 4000, 1, 1_000)).unwrap(),
            0,
        )
        .await
        .unwrap();
    }
    log.checkpoint().await.unwrap();
    // Background work (finishing rolled segments) may write recovery points too: let it end
    // before failures are injected, so the injected ones hit retention.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while log.background_work_pending() {
        assert!(std::time::Instant::now() < deadline, "background work ends");
        glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
    }
    log
}

#[test]
fn retention_retries_a_recovery_point_write_that_found_no_space() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = log_with_old_segments(dir.path()).await;
        assert_eq!(log.log_start_offset(), 0);
        log.inject_no_space_checkpoints(RETENTION_NO_SPACE_ATTEMPTS - 1);
        let start = log
            .apply_retention(5_000)
            .await
            .expect("retried until it had space");
        assert!(start > 0, "segments were deleted");
        assert_eq!(log.log_start_offset(), start);
        log.close().await.unwrap();
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert_eq!(log.log_start_offset(), start, "the same after a reopen");
        log.close().await.unwrap();
    });
}

#[test]
fn retention_that_gives_up_for_lack_of_space_is_done_by_the_next_pass() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = log_with_old_segments(dir.path()).await;
        log.inject_no_space_checkpoints(RETENTION_NO_SPACE_ATTEMPTS);
        let err = log.apply_retention(5_000).await.unwrap_err();
        assert!(err.is_no_space(), "{err}");
        let start = log.apply_retention(5_000).await.unwrap();
        assert!(start > 0);
        let r = log.read(start, 1 << 20).await.unwrap();
        assert!(!r.batches.is_empty());
        log.close().await.unwrap();
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert_eq!(log.log_start_offset(), start);
        log.close().await.unwrap();
    });
}
