//! Crash tests: a log is written and abandoned without close (as a crash would leave it), then
//! its active segment is cut at every byte position, or has a byte flipped, and reopened. The
//! recovered log must be exactly the longest valid prefix, never lose anything below the
//! recovery point, and report damage below the recovery point as `EngineError::Corrupt`.

mod common;

use std::path::Path;

use bytes::Bytes;
use common::*;
use spate_engine::batch::VerifiedBatch;
use spate_engine::frame::{frame_len, FRAME_HEADER_BYTES};
use spate_engine::{set_shard_cache_bytes, EngineError, FlushPolicy, LogConfig, PartitionLog};

const SEGMENT: &str = "00000000000000000000.log";

struct Written {
    /// Stamped batches in order, with their frame start position.
    batches: Vec<(u64, Bytes)>,
    /// Number of batches below the recovery point.
    below_rp: usize,
    end_pos: u64,
}

fn config() -> LogConfig {
    LogConfig {
        flush: FlushPolicy::Always,
        index_interval_bytes: 256,
        ..small_config()
    }
}

/// Writes `durable` batches, checkpoints, then `tail` more batches that are synced but above the
/// recovery point, and abandons the log.
fn write_log(dir: &Path, durable: usize, tail: usize) -> Written {
    run(async {
        let log = PartitionLog::open(dir, config()).await.unwrap();
        let mut batches = Vec::new();
        let mut pos = 0u64;
        for i in 0..durable + tail {
            if i == durable {
                log.checkpoint().await.unwrap();
            }
            let b = batch(i as u64, 40 + (i * 13) % 90, 2, i as i64);
            let info = log
                .append(
                    VerifiedBatch::from_bytes(b.clone()).unwrap(),
                    1 + i as i32 / 3,
                )
                .await
                .unwrap();
            batches.push((pos, stamped(&b, info.base_offset, 1 + i as i32 / 3)));
            pos += frame_len(b.len()) as u64;
        }
        log.sync_to(log.log_end_offset()).await.unwrap();
        let rp = log.recovery_point();
        let below_rp = batches.iter().take_while(|(_, b)| base_of(b) < rp).count();
        assert!(
            below_rp >= durable,
            "the checkpoint covers the durable batches"
        );
        // Abandoned without close: the executor (and any task of the log) ends with `run`.
        std::mem::forget(log);
        Written {
            batches,
            below_rp,
            end_pos: pos,
        }
    })
}

/// A scratch directory for the many damaged copies: tmpfs when there is one (it supports
/// O_DIRECT), so hundreds of reopen cycles do not each pay several disk fsyncs.
/// Opens a damaged copy and returns every batch it holds, or the open error.
async fn reopen_all(dir: &Path) -> Result<Vec<Bytes>, EngineError> {
    let log = PartitionLog::open(dir, config()).await?;
    let r = log.read(log.log_start_offset(), usize::MAX).await;
    let end = log.log_end_offset();
    let out = r.map(|r| r.batches);
    if let Ok(batches) = &out {
        // The log stays appendable after recovery, right after the recovered prefix.
        let b = batch(7, 50, 1, 0);
        assert_eq!(
            log.append(VerifiedBatch::from_bytes(b).unwrap(), 100)
                .await
                .unwrap()
                .base_offset,
            end
        );
        log.sync_to(end + 1).await.unwrap();
        let again = log.read(end, 1).await.unwrap();
        assert_eq!(again.batches.len(), 1);
        assert_eq!(batches.len(), batches.len());
    }
    log.close().await.unwrap();
    out
}

fn expect_prefix(got: &[Bytes], w: &Written, n: usize, what: &str) {
    let want: Vec<Bytes> = w.batches[..n].iter().map(|(_, b)| b.clone()).collect();
    assert_eq!(got.len(), want.len(), "{what}: batch count");
    assert!(got == want.as_slice(), "{what}: contents");
}

#[test]
fn cut_at_every_byte_of_the_tail() {
    let src = tempfile::tempdir().unwrap();
    let w = write_log(src.path(), 12, 4);
    let tail_start = w.batches[w.below_rp].0;
    run(async {
        set_shard_cache_bytes(0);
        for cut in tail_start..=w.end_pos {
            let dir = scratch();
            copy_dir(src.path(), dir.path());
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.path().join(SEGMENT))
                .unwrap();
            f.set_len(cut).unwrap();
            drop(f);
            let got = reopen_all(dir.path())
                .await
                .unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            let whole = w
                .batches
                .iter()
                .take_while(|(pos, b)| pos + frame_len(b.len()) as u64 <= cut)
                .count();
            expect_prefix(&got, &w, whole, &format!("cut at {cut}"));
        }
    });
}

#[test]
fn cut_below_the_recovery_point_is_corruption() {
    let src = tempfile::tempdir().unwrap();
    let w = write_log(src.path(), 12, 2);
    let rp_pos = w.batches[w.below_rp].0;
    run(async {
        for cut in (0..rp_pos).step_by(61) {
            let dir = scratch();
            copy_dir(src.path(), dir.path());
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.path().join(SEGMENT))
                .unwrap();
            f.set_len(cut).unwrap();
            drop(f);
            match PartitionLog::open(dir.path(), config()).await {
                Err(EngineError::Corrupt { .. }) => {}
                Err(e) => panic!("cut at {cut}: unexpected {e}"),
                Ok(_) => panic!("cut at {cut} below the recovery point went unnoticed"),
            }
        }
    });
}

/// Index of the batch whose checksummed bytes (header and payload, not padding) hold `pos`.
fn covering_batch(w: &Written, pos: u64) -> Option<usize> {
    w.batches
        .iter()
        .position(|(start, b)| pos >= *start && pos < start + (FRAME_HEADER_BYTES + b.len()) as u64)
}

fn flip(dir: &Path, pos: u64) {
    let path = dir.join(SEGMENT);
    let mut data = std::fs::read(&path).unwrap();
    data[pos as usize] ^= 0x5a;
    std::fs::write(&path, data).unwrap();
}

#[test]
fn flipped_bytes_in_the_tail_cut_the_log_there() {
    let src = tempfile::tempdir().unwrap();
    let w = write_log(src.path(), 10, 4);
    let tail_start = w.batches[w.below_rp].0;
    run(async {
        set_shard_cache_bytes(0);
        for pos in tail_start..w.end_pos {
            let dir = scratch();
            copy_dir(src.path(), dir.path());
            flip(dir.path(), pos);
            let got = reopen_all(dir.path())
                .await
                .unwrap_or_else(|e| panic!("flip at {pos}: {e}"));
            // Padding is not checksummed and not data: flipping it changes nothing.
            let keep = covering_batch(&w, pos).unwrap_or(w.batches.len());
            expect_prefix(&got, &w, keep, &format!("flip at {pos}"));
        }
    });
}

/// Below the recovery point, the active segment is trusted up to the end of the index files
/// written with it (damage there fails the read, as in a sealed segment) and scanned past them
/// (damage there fails the open); neither ever reads back as different data.
#[test]
fn flipped_bytes_below_the_recovery_point_are_corruption() {
    let src = tempfile::tempdir().unwrap();
    let w = write_log(src.path(), 10, 2);
    let rp_pos = w.batches[w.below_rp].0;
    run(async {
        set_shard_cache_bytes(0);
        for pos in (0..rp_pos).step_by(7) {
            let Some(hit) = covering_batch(&w, pos) else {
                continue;
            };
            let dir = scratch();
            copy_dir(src.path(), dir.path());
            flip(dir.path(), pos);
            let log = match PartitionLog::open(dir.path(), config()).await {
                Err(EngineError::Corrupt { position, .. }) => {
                    assert!(position < rp_pos);
                    continue;
                }
                Err(e) => panic!("flip at {pos}: unexpected {e}"),
                Ok(log) => log,
            };
            match log.read(base_of(&w.batches[hit].1), 1).await {
                Err(EngineError::Corrupt { .. }) => {}
                Ok(r) => panic!("flip at {pos} read back as {} batches", r.batches.len()),
                Err(e) => panic!("flip at {pos}: {e}"),
            }
            log.close().await.unwrap();
        }
    });
}

/// Recovery after a crash reads the active segment only past the index files its last recovery
/// point was written with, not from the segment start: a flipped byte in the first batch goes
/// unread by the open (it fails the read of that batch), one in the last batch below the
/// recovery point is found by it.
#[test]
fn recovery_after_a_crash_scans_only_past_the_checkpointed_index() {
    let src = tempfile::tempdir().unwrap();
    let w = write_log(src.path(), 40, 2);
    let rp_pos = w.batches[w.below_rp].0;
    run(async {
        set_shard_cache_bytes(0);
        let first = w.batches[0].0 + FRAME_HEADER_BYTES as u64 + 1;
        let dir = scratch();
        copy_dir(src.path(), dir.path());
        flip(dir.path(), first);
        let log = PartitionLog::open(dir.path(), config())
            .await
            .expect("the first batch is below the index: not read at open");
        assert_eq!(
            log.log_end_offset(),
            base_of(&w.batches.last().unwrap().1) + 2
        );
        match log.read(0, 1).await {
            Err(EngineError::Corrupt { .. }) => {}
            Ok(r) => panic!(
                "the damaged first batch read back as {} batches",
                r.batches.len()
            ),
            Err(e) => panic!("reading the damaged first batch: {e}"),
        }
        log.close().await.unwrap();

        let last_below = w.batches[w.below_rp - 1].0 + FRAME_HEADER_BYTES as u64 + 1;
        assert!(last_below < rp_pos);
        let dir = scratch();
        copy_dir(src.path(), dir.path());
        flip(dir.path(), last_below);
        match PartitionLog::open(dir.path(), config()).await {
            Err(EngineError::Corrupt { position, .. }) => assert!(position < rp_pos),
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => panic!("damage past the index and below the recovery point went unnoticed"),
        }
    });
}

#[test]
fn damage_below_the_recovery_point_of_a_clean_log_fails_reads() {
    // After a clean close the indexes are trusted and nothing is rescanned on open; the damage
    // must then surface as Corrupt on read, never as different data.
    let src = tempfile::tempdir().unwrap();
    let w = run(async {
        let log = PartitionLog::open(src.path(), config()).await.unwrap();
        let mut batches = Vec::new();
        let mut pos = 0;
        for i in 0..10u64 {
            let b = batch(i, 100, 1, 0);
            let info = log
                .append(VerifiedBatch::from_bytes(b.clone()).unwrap(), 0)
                .await
                .unwrap();
            batches.push((pos, stamped(&b, info.base_offset, 0)));
            pos += frame_len(b.len()) as u64;
        }
        log.close().await.unwrap();
        Written {
            batches,
            below_rp: 10,
            end_pos: pos,
        }
    });
    run(async {
        set_shard_cache_bytes(0);
        for pos in (0..w.end_pos).step_by(29) {
            let Some(hit) = covering_batch(&w, pos) else {
                continue;
            };
            let dir = scratch();
            copy_dir(src.path(), dir.path());
            flip(dir.path(), pos);
            let log = match PartitionLog::open(dir.path(), config()).await {
                Ok(log) => log,
                Err(EngineError::Corrupt { .. }) => continue,
                Err(e) => panic!("flip at {pos}: {e}"),
            };
            let (hit_offset, _) = (base_of(&w.batches[hit].1), ());
            match log.read(hit_offset, 1).await {
                Err(EngineError::Corrupt { .. }) => {}
                Ok(r) => panic!("flip at {pos} read back as {} batches", r.batches.len()),
                Err(e) => panic!("flip at {pos}: {e}"),
            }
            log.close().await.unwrap();
        }
    });
}

/// The inode of the recovery-point file: it is replaced (a new file renamed over it) whenever
/// it is written.
fn recovery_point_inode(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir.join(spate_engine::RECOVERY_POINT_FILE))
        .unwrap()
        .ino()
}

/// A log that ends at its recovery point is opened without rewriting it (and without the
/// syncs that go with it: a broker with many idle partitions paid them all before listening);
/// one with data past it after a crash still moves the recovery point to its end at open.
#[test]
fn an_unchanged_log_keeps_its_recovery_point_file_at_open() {
    let src = tempfile::tempdir().unwrap();
    let w = write_log(src.path(), 6, 3);
    run(async {
        let end = base_of(&w.batches.last().unwrap().1) + 2;
        let crashed = recovery_point_inode(src.path());
        let log = PartitionLog::open(src.path(), config()).await.unwrap();
        assert_eq!(log.recovery_point(), end);
        let moved = recovery_point_inode(src.path());
        assert_ne!(
            moved, crashed,
            "data past the recovery point: it moves at open"
        );
        // Abandoned again with nothing new: the log ends where its recovery point says.
        std::mem::forget(log);
        let log = PartitionLog::open(src.path(), config()).await.unwrap();
        assert_eq!((log.log_end_offset(), log.recovery_point()), (end, end));
        assert_eq!(
            recovery_point_inode(src.path()),
            moved,
            "nothing changed: not rewritten"
        );
        log.close().await.unwrap();
        let closed = recovery_point_inode(src.path());
        let log = PartitionLog::open(src.path(), config()).await.unwrap();
        assert_eq!(log.log_end_offset(), end);
        assert_eq!(recovery_point_inode(src.path()), closed);
        log.close().await.unwrap();
    });
}
