//! The work a roll leaves to the background (syncing and trimming the old segment, its index
//! files, the recovery point) against crashes and against the operations that remove data.
//! A crash is a log abandoned without close at the end of an executor run (its background tasks
//! die with the executor), then reopened in a fresh one.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use spate_engine::batch::VerifiedBatch;
use spate_engine::frame::frame_len;
use spate_engine::{FlushPolicy, LogConfig, PartitionLog};

/// Upper bound for background work to settle in a test.
const SETTLE_DEADLINE: Duration = Duration::from_secs(20);
/// Upper bound on yields while waiting for the checkpointer to start writing.
const MAX_YIELDS: usize = 100_000;

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 64 << 10,
        max_batch_bytes: 8 << 10,
        index_interval_bytes: 1024,
        flush: FlushPolicy::Always,
        ..small_config()
    }
}

/// What was appended and acknowledged (synced): each stamped batch with its frame length.
#[derive(Default)]
struct Acked {
    batches: Vec<(Bytes, u64)>,
}

impl Acked {
    fn end(&self) -> u64 {
        self.batches
            .last()
            .map(|(b, _)| last_of(b) + 1)
            .unwrap_or(0)
    }
    /// Bytes of frames in `[from, to)` offsets: a segment's data length.
    fn data_len(&self, from: u64, to: u64) -> u64 {
        self.batches
            .iter()
            .filter(|(b, _)| base_of(b) >= from && base_of(b) < to)
            .map(|(_, f)| *f)
            .sum()
    }
    fn stamped(&self) -> Vec<Bytes> {
        self.batches.iter().map(|(b, _)| b.clone()).collect()
    }
}

fn last_of(b: &[u8]) -> u64 {
    spate_engine::batch::BatchHeader::parse(b)
        .unwrap()
        .last_offset() as u64
}

fn segment_bases(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".log").map(|s| s.parse().unwrap())
        })
        .collect();
    v.sort_unstable();
    v
}

fn file_len(dir: &Path, base: u64) -> u64 {
    std::fs::metadata(dir.join(format!("{base:020}.log")))
        .unwrap()
        .len()
}

fn has_index_files(dir: &Path, base: u64) -> bool {
    dir.join(format!("{base:020}.index")).exists()
        && dir.join(format!("{base:020}.timeindex")).exists()
}

async fn append_one(log: &PartitionLog, acked: &mut Acked) {
    let i = acked.batches.len();
    // Sizes chosen so a segment's data never ends on a page boundary.
    let b = batch(i as u64, 900 + (i * 37) % 300, 3, 1_000 + i as i64);
    let flen = frame_len(b.len()) as u64;
    let info = log
        .append(VerifiedBatch::from_bytes(b.clone()).unwrap(), 2)
        .await
        .unwrap();
    acked.batches.push((stamped(&b, info.base_offset, 2), flen));
}

/// Appends until `rolls` more segments exist, then `after` batches more, and syncs: every
/// batch is acknowledged. Returns the segment bases.
async fn append_rolls(
    log: &PartitionLog,
    dir: &Path,
    acked: &mut Acked,
    rolls: usize,
    after: usize,
) -> Vec<u64> {
    let want = segment_bases(dir).len() + rolls;
    for _ in 0..10_000 {
        if segment_bases(dir).len() >= want {
            break;
        }
        append_one(log, acked).await;
    }
    assert_eq!(segment_bases(dir).len(), want, "the log rolled");
    for _ in 0..after {
        append_one(log, acked).await;
    }
    log.sync_to(log.log_end_offset()).await.unwrap();
    assert_eq!(log.durable_offset(), acked.end());
    segment_bases(dir)
}

async fn read_all(log: &PartitionLog) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut next = log.log_start_offset();
    for _ in 0..100_000 {
        if next >= log.log_end_offset() {
            break;
        }
        let r = log.read(next, 1 << 20).await.unwrap();
        assert!(!r.batches.is_empty());
        for b in r.batches {
            next = last_of(&b) + 1;
            out.push(b);
        }
    }
    out
}

async fn wait_background_idle(log: &PartitionLog) {
    let deadline = Instant::now() + SETTLE_DEADLINE;
    while log.background_work_pending() {
        assert!(Instant::now() < deadline, "background work did not settle");
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
}

/// Lets the paused background work go and returns once a recovery-point write is in flight.
async fn release_and_catch_in_flight(log: &PartitionLog) {
    log.pause_background_checkpoints(false);
    for _ in 0..MAX_YIELDS {
        if log.background_checkpoint_in_flight() {
            return;
        }
        futures_lite::future::yield_now().await;
    }
    panic!("the background checkpointer never started");
}

/// Reopens after a crash and checks the log holds exactly `expected` from `log_start`.
fn reopen_and_check(dir: &Path, expected: &[Bytes], log_start: u64) {
    run(async {
        let log = PartitionLog::open(dir, config()).await.unwrap();
        assert_eq!(log.log_start_offset(), log_start);
        let end = expected.last().map(|b| last_of(b) + 1).unwrap_or(log_start);
        assert_eq!(log.log_end_offset(), end);
        let got = read_all(&log).await;
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "recovered batches differ");
        // Every segment but the active one ends exactly at its data after recovery.
        let bases = segment_bases(dir);
        for w in bases.windows(2) {
            let want: u64 = expected
                .iter()
                .filter(|b| base_of(b) >= w[0] && base_of(b) < w[1])
                .map(|b| frame_len(b.len()) as u64)
                .sum();
            assert_eq!(file_len(dir, w[0]), want, "segment {} trimmed", w[0]);
        }
        log.close().await.unwrap();
    });
}

#[test]
fn crash_after_a_roll_before_its_background_work_keeps_every_acked_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked = Acked::default();
    let bases = run(async {
        let log = PartitionLog::open(dir.path(), config()).await.unwrap();
        log.pause_background_checkpoints(true);
        let bases = append_rolls(&log, dir.path(), &mut acked, 2, 5).await;
        // The crash comes before anything the roll left to the background: the sealed segments
        // still carry their zero-padded last page and the recovery point is where it was.
        assert!(log.recovery_point() < bases[1]);
        for w in bases.windows(2) {
            assert!(file_len(dir.path(), w[0]) > acked.data_len(w[0], w[1]));
            assert!(!has_index_files(dir.path(), w[0]));
        }
        bases
    });
    assert_eq!(bases.len(), 3);
    reopen_and_check(dir.path(), &acked.stamped(), 0);
}

#[test]
fn recovery_point_names_the_new_segment_once_background_work_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked = Acked::default();
    run(async {
        let log = PartitionLog::open(dir.path(), config()).await.unwrap();
        let bases = append_rolls(&log, dir.path(), &mut acked, 2, 5).await;
        wait_background_idle(&log).await;
        let active = *bases.last().unwrap();
        assert!(
            log.recovery_point() >= active,
            "recovery point {} is in the new segment {active}",
            log.recovery_point()
        );
        for w in bases.windows(2) {
            assert_eq!(file_len(dir.path(), w[0]), acked.data_len(w[0], w[1]));
            assert!(has_index_files(dir.path(), w[0]));
        }
        // A crash now, with a few batches appended and acked after the recovery point.
        for _ in 0..3 {
            append_one(&log, &mut acked).await;
        }
        log.sync_to(log.log_end_offset()).await.unwrap();
    });
    reopen_and_check(dir.path(), &acked.stamped(), 0);
}

#[test]
fn truncation_waits_for_a_recovery_point_write_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked = Acked::default();
    let kept = run(async {
        let log = PartitionLog::open(dir.path(), config()).await.unwrap();
        log.pause_background_checkpoints(true);
        let bases = append_rolls(&log, dir.path(), &mut acked, 2, 5).await;
        // Cut in the middle of the first sealed segment: the active and the second sealed
        // segment go, the first one is cut.
        let cut_at = acked
            .batches
            .iter()
            .position(|(b, _)| base_of(b) > bases[0] + (bases[1] - bases[0]) / 2)
            .unwrap();
        let cut_offset = base_of(&acked.batches[cut_at].0);
        release_and_catch_in_flight(&log).await;
        log.truncate_to(cut_offset).await.unwrap();
        assert_eq!(log.log_end_offset(), cut_offset);
        assert!(log.recovery_point() <= cut_offset);
        wait_background_idle(&log).await;
        assert!(log.recovery_point() <= cut_offset);
        assert_eq!(segment_bases(dir.path()), vec![bases[0]]);
        let kept: Vec<Bytes> = acked.stamped()[..cut_at].to_vec();
        assert!(read_all(&log).await == kept);
        // The log goes on after the cut, and that survives a crash as well.
        acked.batches.truncate(cut_at);
        for _ in 0..3 {
            append_one(&log, &mut acked).await;
        }
        log.sync_to(log.log_end_offset()).await.unwrap();
        acked.stamped()
    });
    reopen_and_check(dir.path(), &kept, 0);
}

#[test]
fn retention_waits_for_a_recovery_point_write_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked = Acked::default();
    let (kept, start) = run(async {
        let log = PartitionLog::open(dir.path(), config()).await.unwrap();
        log.pause_background_checkpoints(true);
        let bases = append_rolls(&log, dir.path(), &mut acked, 2, 5).await;
        release_and_catch_in_flight(&log).await;
        let start = log.delete_segments_below(bases[2]).await.unwrap();
        assert_eq!(start, bases[2]);
        assert!(log.recovery_point() >= start);
        wait_background_idle(&log).await;
        assert_eq!(segment_bases(dir.path()), vec![bases[2]]);
        let kept: Vec<Bytes> = acked
            .stamped()
            .into_iter()
            .filter(|b| base_of(b) >= start)
            .collect();
        assert!(read_all(&log).await == kept);
        (kept, start)
    });
    reopen_and_check(dir.path(), &kept, start);
}

#[test]
fn close_waits_for_a_recovery_point_write_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked = Acked::default();
    run(async {
        let log = PartitionLog::open(dir.path(), config()).await.unwrap();
        log.pause_background_checkpoints(true);
        let bases = append_rolls(&log, dir.path(), &mut acked, 2, 5).await;
        release_and_catch_in_flight(&log).await;
        log.close().await.unwrap();
        assert_eq!(log.recovery_point(), acked.end());
        for w in bases.windows(2) {
            assert_eq!(file_len(dir.path(), w[0]), acked.data_len(w[0], w[1]));
            assert!(has_index_files(dir.path(), w[0]));
        }
    });
    reopen_and_check(dir.path(), &acked.stamped(), 0);
}
