//! What a follower needs of a log: appends at the leader's offset and epoch (refused, never a
//! panic, when they do not fit), reads bounded by an offset, and waiting for durability.

mod common;

use common::*;
use spate_engine::batch::VerifiedBatch;
use spate_engine::{EngineError, FlushPolicy, LogConfig, PartitionLog};

fn verified(b: &bytes::Bytes) -> VerifiedBatch {
    VerifiedBatch::from_bytes(b.clone()).unwrap()
}

#[test]
fn follower_append_lands_at_the_leaders_offset_and_epoch() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        let b0 = batch(1, 200, 3, 1000);
        let info = log.append_at(verified(&b0), 0, 2).await.unwrap();
        assert_eq!((info.base_offset, info.last_offset), (0, 2));
        let b1 = batch(2, 300, 2, 1001);
        let info = log.append_at(verified(&b1), 3, 2).await.unwrap();
        assert_eq!((info.base_offset, info.last_offset), (3, 4));
        // A new leader's epoch starts where its first batch does.
        let b2 = batch(3, 100, 1, 1002);
        log.append_at(verified(&b2), 5, 7).await.unwrap();
        assert_eq!(log.log_end_offset(), 6);
        assert_eq!(log.end_offset_for_epoch(2), Some((2, 5)));
        assert_eq!(log.end_offset_for_epoch(7), Some((7, 6)));
        let r = log.read(0, usize::MAX).await.unwrap();
        assert_eq!(
            r.batches,
            vec![stamped(&b0, 0, 2), stamped(&b1, 3, 2), stamped(&b2, 5, 7)]
        );
        log.close().await.unwrap();
    });
}

#[test]
fn follower_append_off_the_log_end_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        let b = batch(1, 200, 3, 1000);
        log.append_at(verified(&b), 0, 1).await.unwrap();
        for base in [0u64, 2, 4, 1000] {
            let refused = log.append_at(verified(&b), base, 1).await;
            assert!(
                matches!(refused, Err(EngineError::FollowerAppend(_))),
                "base {base}: {refused:?}"
            );
            assert_eq!(log.log_end_offset(), 3);
        }
        // The log is still usable at its end.
        log.append_at(verified(&b), 3, 1).await.unwrap();
        assert_eq!(log.log_end_offset(), 6);
        log.close().await.unwrap();
    });
}

#[test]
fn follower_epoch_never_goes_down() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        let b = batch(1, 200, 1, 1000);
        log.append_at(verified(&b), 0, 5).await.unwrap();
        let refused = log.append_at(verified(&b), 1, 4).await;
        assert!(
            matches!(refused, Err(EngineError::FollowerAppend(ref m)) if m.contains("epoch 4")),
            "{refused:?}"
        );
        assert_eq!(log.log_end_offset(), 1);
        // The same epoch again is fine.
        log.append_at(verified(&b), 1, 5).await.unwrap();
        // The refusal survives a reopen: the epoch history is recovered from the log.
        log.close().await.unwrap();
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert!(matches!(
            log.append_at(verified(&b), 2, 4).await,
            Err(EngineError::FollowerAppend(_))
        ));
        log.append_at(verified(&b), 2, 6).await.unwrap();
        assert_eq!(log.log_end_offset(), 3);
        log.close().await.unwrap();
    });
}

#[test]
fn reads_stop_at_the_bound_on_whole_batches() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        // Batches [0,3), [3,5), [5,9).
        let bs = [
            batch(1, 100, 3, 1),
            batch(2, 100, 2, 2),
            batch(3, 100, 4, 3),
        ];
        let mut stamped_all = Vec::new();
        let mut base = 0;
        for (b, n) in bs.iter().zip([3u64, 2, 4]) {
            log.append(verified(b), 0).await.unwrap();
            stamped_all.extend_from_slice(&stamped(b, base, 0));
            base += n;
        }
        let len = |i: usize| stamped(&bs[i], 0, 0).len();
        for (bound, want) in [
            (0u64, 0usize),
            (2, 0),
            (3, len(0)),
            (4, len(0)),
            (5, len(0) + len(1)),
            (8, len(0) + len(1)),
            (9, stamped_all.len()),
            (100, stamped_all.len()),
        ] {
            let r = log.read_joined_below(0, usize::MAX, bound).await.unwrap();
            assert_eq!(r.records.len(), want, "bound {bound}");
            assert_eq!(&r.records[..], &stamped_all[..want], "bound {bound}");
            assert_eq!(r.log_end_offset, 9);
        }
        // From the bound itself: nothing, not an error; past the log end: an error.
        let r = log.read_joined_below(5, usize::MAX, 5).await.unwrap();
        assert!(r.records.is_empty());
        assert!(matches!(
            log.read_joined_below(10, usize::MAX, 5).await,
            Err(EngineError::OffsetOutOfRange { .. })
        ));
        log.close().await.unwrap();
    });
}

#[test]
fn waiting_for_durability_past_an_offset() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        // Nothing is synced by the log on its own: only the wait makes data durable.
        let config = LogConfig {
            flush: FlushPolicy::Never,
            ..small_config()
        };
        let log = PartitionLog::open(dir.path(), config).await.unwrap();
        for i in 0..4u64 {
            log.append_at(verified(&batch(i, 500, 2, 1)), i * 2, 1)
                .await
                .unwrap();
        }
        assert_eq!(log.log_end_offset(), 8);
        assert_eq!(log.durable_offset(), 0);
        log.wait_durable_past(3).await.unwrap();
        assert!(log.durable_offset() > 3, "{}", log.durable_offset());
        log.wait_durable_past(7).await.unwrap();
        assert_eq!(log.durable_offset(), 8);
        // Already durable: returns at once.
        log.wait_durable_past(0).await.unwrap();
        log.close().await.unwrap();
    });
}
