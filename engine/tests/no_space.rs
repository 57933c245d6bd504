//! A segment write that fails for lack of space (ENOSPC) does not fail the log: the batches not
//! known durable are dropped (log end back to the last synced batch, on disk too), their syncs
//! fail, reads never return them, and later appends retry cleanly, also across a reopen.

mod common;

use bytes::Bytes;
use common::*;
use spate_engine::batch::VerifiedBatch;
use spate_engine::PartitionLog;

fn verified(b: &Bytes) -> VerifiedBatch {
    VerifiedBatch::from_bytes(b.clone()).unwrap()
}

/// Every batch from offset 0, as stored.
async fn read_all(log: &PartitionLog) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut next = 0;
    while next < log.log_end_offset() {
        let r = log.read(next, 1 << 20).await.unwrap();
        assert!(!r.batches.is_empty(), "a batch at {next}");
        for b in r.batches {
            next = base_of(&b)
                + spate_engine::batch::BatchHeader::parse(&b)
                    .unwrap()
                    .last_offset_delta() as u64
                + 1;
            out.push(b);
        }
    }
    out
}

#[test]
fn a_write_failing_for_lack_of_space_drops_only_the_unsynced_batches() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        let acked: Vec<Bytes> = (0..3).map(|i| batch(i, 500, 5, 1_000 + i as i64)).collect();
        for b in &acked {
            let info = log.append(verified(b), 0).await.unwrap();
            log.sync_to(info.last_offset + 1).await.unwrap();
        }
        assert_eq!(log.log_end_offset(), 15);

        // The next write fails with ENOSPC: the batch appended meanwhile is dropped, and the
        // caller waiting for it hears so.
        log.inject_no_space_writes(1);
        let lost = batch(9, 700, 4, 2_000);
        let info = log.append(verified(&lost), 0).await.unwrap();
        assert_eq!(info.base_offset, 15);
        let err = log.sync_to(info.last_offset + 1).await.unwrap_err();
        assert!(err.is_no_space(), "{err}");
        assert_eq!(
            log.log_end_offset(),
            15,
            "the log end is back at the synced end"
        );
        assert_eq!(log.durable_offset(), 15);
        let want: Vec<Bytes> = acked
            .iter()
            .enumerate()
            .map(|(i, b)| stamped(b, i as u64 * 5, 0))
            .collect();
        assert_eq!(read_all(&log).await, want, "nothing dropped is read back");

        // Appends retry cleanly at the same offset.
        let next = batch(10, 300, 2, 3_000);
        let info = log.append(verified(&next), 0).await.unwrap();
        assert_eq!(info.base_offset, 15);
        log.sync_to(info.last_offset + 1).await.unwrap();
        let mut want = want;
        want.push(stamped(&next, 15, 0));
        assert_eq!(read_all(&log).await, want);
        log.close().await.unwrap();

        let log = PartitionLog::open(dir.path(), small_config())
            .await
            .unwrap();
        assert_eq!(log.log_end_offset(), 17);
        assert_eq!(read_all(&log).await, want, "the same after a reopen");
        log.close().await.unwrap();
    });
}
