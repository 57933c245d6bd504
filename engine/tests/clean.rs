//! The log cleaner on real logs: latest value per key, tombstones after delete.retention.ms,
//! batches kept byte for byte, multi-pass cleaning with a small map, the I/O throttle, time
//! lookups across compacted gaps, and a cleaner stopped after every file operation of a clean
//! (recovery must leave each segment old or new, never lose the latest value of a key).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use common::*;
use spate_engine::batch::{BatchHeader, VerifiedBatch};
use spate_engine::clean::{CleanRequest, CleanStats, CleanerConfig, CompactionPolicy, LogCleaner};
use spate_engine::validate::build;
use spate_engine::{LogConfig, PartitionLog};

const DAY_MS: i64 = 86_400_000;
const NOW_MS: i64 = 1_700_000_000_000;

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 64 << 10,
        index_interval_bytes: 1024,
        max_batch_bytes: 16 << 10,
        ..small_config()
    }
}

type Rec = (Vec<u8>, Option<Vec<u8>>);

/// A batch of keyed records (value None = tombstone) stamped `ts`, `ts + 1`, ...
fn keyed(ts: i64, recs: &[Rec], codec: u8) -> Bytes {
    let mut section = Vec::new();
    for (i, (k, v)) in recs.iter().enumerate() {
        section.extend(build::record(
            i as i64,
            i as i64,
            Some(k),
            v.as_deref(),
            &[],
        ));
    }
    let payload = if codec == 0 {
        section
    } else {
        build::compress(codec, &section)
    };
    let n = recs.len() as i32;
    let mut b = build::batch(&payload, n, n - 1, codec);
    b[27..35].copy_from_slice(&ts.to_be_bytes());
    b[35..43].copy_from_slice(&(ts + n as i64 - 1).to_be_bytes());
    build::fix_crc(&mut b);
    Bytes::from(b)
}

fn with_producer(b: &Bytes, pid: i64, seq: i32) -> Bytes {
    let mut v = b.to_vec();
    v[43..51].copy_from_slice(&pid.to_be_bytes());
    v[51..53].copy_from_slice(&0i16.to_be_bytes());
    v[53..57].copy_from_slice(&seq.to_be_bytes());
    build::fix_crc(&mut v);
    Bytes::from(v)
}

fn key(i: usize) -> Vec<u8> {
    format!("key-{i:04}").into_bytes()
}

/// A value that compresses poorly (so the compressed batches fill segments too).
fn value(i: usize, round: usize) -> Vec<u8> {
    let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ round as u64;
    let noise: String = (0..100 + i % 60)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect();
    format!("value-{i}-{round}-{noise}").into_bytes()
}

async fn append(log: &PartitionLog, b: Bytes) -> u64 {
    log.append(VerifiedBatch::from_bytes(b).unwrap(), 1)
        .await
        .unwrap()
        .base_offset
}

/// One record as a reader sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    offset: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    timestamp: i64,
}

/// Every record of the log, decoded by kafka-protocol (CRC checked), and every batch's bytes.
async fn read_all(log: &PartitionLog) -> (Vec<Seen>, Vec<Bytes>) {
    let mut next = log.log_start_offset();
    let (mut seen, mut batches) = (Vec::new(), Vec::new());
    for _ in 0..1_000_000 {
        if next >= log.log_end_offset() {
            break;
        }
        let r = log.read(next, 1 << 20).await.unwrap();
        assert!(
            !r.batches.is_empty(),
            "a read below the log end returns a batch"
        );
        for b in r.batches {
            let h = BatchHeader::parse(&b).unwrap();
            assert!(h.last_offset() as u64 >= next);
            next = h.last_offset() as u64 + 1;
            let mut buf = b.clone();
            let set = kafka_protocol::records::RecordBatchDecoder::decode(&mut buf).unwrap();
            for r in set.records {
                seen.push(Seen {
                    offset: r.offset,
                    key: r.key.map(|k| k.to_vec()),
                    value: r.value.map(|v| v.to_vec()),
                    timestamp: r.timestamp,
                });
            }
            batches.push(b);
        }
    }
    for w in seen.windows(2) {
        assert!(w[0].offset < w[1].offset, "offsets strictly increase");
    }
    (seen, batches)
}

/// The latest value of every key in what a reader saw (tombstones as None).
fn latest(seen: &[Seen]) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
    seen.iter()
        .map(|s| (s.key.clone().unwrap(), s.value.clone()))
        .collect()
}

fn request(now_ms: i64) -> CleanRequest {
    CleanRequest {
        now_ms,
        max_clean_offset: u64::MAX,
        policy: CompactionPolicy::default(),
        force: true,
        keep_batches: Default::default(),
        urgent: false,
    }
}

/// One clean at `now_ms` that must find something to clean.
async fn clean_at(cleaner: &mut LogCleaner, log: &PartitionLog, now_ms: i64) -> CleanStats {
    cleaner.clean(log, &request(now_ms)).await.unwrap().unwrap()
}

/// Writes `rounds` updates of `keys` keys (every 7th key tombstoned in the last round), in
/// batches of 10 records rotating through the codecs, then checkpoints. Returns the model.
async fn write_updates(
    log: &PartitionLog,
    keys: usize,
    rounds: usize,
) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
    let mut model = BTreeMap::new();
    let mut pending: Vec<Rec> = Vec::new();
    let mut batch_no = 0;
    for round in 0..rounds {
        for i in 0..keys {
            let v = if round == rounds - 1 && i % 7 == 0 {
                None
            } else {
                Some(value(i, round))
            };
            model.insert(key(i), v.clone());
            pending.push((key(i), v));
            if pending.len() == 10 {
                let codec = (batch_no % 5) as u8;
                append(log, keyed(NOW_MS - DAY_MS, &pending, codec)).await;
                pending.clear();
                batch_no += 1;
            }
        }
    }
    if !pending.is_empty() {
        append(log, keyed(NOW_MS - DAY_MS, &pending, 0)).await;
    }
    log.checkpoint().await.unwrap();
    model
}

fn segment_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_str()
                .unwrap()
                .ends_with(".log")
        })
        .count()
}

#[test]
fn cleaning_keeps_the_latest_value_of_every_key_and_later_drops_tombstones() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), config()).await.unwrap();
        let model = write_updates(&log, 300, 8).await;
        assert!(segment_count(dir.path()) > 4, "several segments");
        let (before, _) = read_all(&log).await;
        let end = log.log_end_offset();

        let mut cleaner = LogCleaner::open(&log, CleanerConfig::default());
        let stats = clean_at(&mut cleaner, &log, NOW_MS).await;
        assert_eq!(stats.passes, 1);
        assert!(stats.bytes_reclaimed > 0 && stats.segments_rewritten > 0);
        assert_eq!(
            stats.tombstones_removed, 0,
            "tombstones wait delete.retention.ms"
        );
        let (after, _) = read_all(&log).await;
        assert_eq!(log.log_end_offset(), end, "offsets never change");
        assert_eq!(latest(&after), model);
        assert_eq!(latest(&before), model);
        assert!(after.len() < before.len() / 2);
        // Every surviving record is the one produced at its offset.
        let by_offset: BTreeMap<i64, &Seen> = before.iter().map(|s| (s.offset, s)).collect();
        for s in &after {
            assert_eq!(by_offset[&s.offset], s);
        }
        // In the cleaned part, one record per key.
        let clean_end = cleaner.first_dirty_offset() as i64;
        let mut keys = std::collections::HashSet::new();
        for s in after.iter().filter(|s| s.offset < clean_end) {
            assert!(
                keys.insert(s.key.clone()),
                "one record per key below the dirty part"
            );
        }
        let counters = cleaner.counters();
        assert_eq!(counters.bytes_reclaimed, stats.bytes_reclaimed);
        assert!(counters.bytes_read >= stats.bytes_read && counters.dirty_ratio < 0.5);

        // Past delete.retention.ms since the first clean, tombstones go too.
        let stats = clean_at(&mut cleaner, &log, NOW_MS + 2 * DAY_MS).await;
        assert!(stats.tombstones_removed > 0);
        let (after2, _) = read_all(&log).await;
        let live: BTreeMap<_, _> = model
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let tombstoned_below_clean: Vec<_> = after2
            .iter()
            .filter(|s| s.value.is_none() && s.offset < cleaner.first_dirty_offset() as i64)
            .collect();
        assert!(
            tombstoned_below_clean.is_empty(),
            "{tombstoned_below_clean:?}"
        );
        assert_eq!(
            latest(&after2)
                .into_iter()
                .filter(|(_, v)| v.is_some())
                .collect::<BTreeMap<_, _>>(),
            live
        );
        log.close().await.unwrap();

        // Reopened (recovery scans the cleaned segments): the same records.
        let log = PartitionLog::open(dir.path(), config()).await.unwrap();
        let (reopened, _) = read_all(&log).await;
        assert_eq!(reopened, after2);
        log.close().await.unwrap();
        // And again without index files: recovery rebuilds them from the cleaned segments.
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let p = e.unwrap().path();
            if p.extension()
                .is_some_and(|x| x == "index" || x == "timeindex")
            {
                std::fs::remove_file(p).unwrap();
            }
        }
        let log = PartitionLog::open(dir.path(), config()).await.unwrap();
        assert_eq!(read_all(&log).await.0, after2);
        log.close().await.unwrap();
    });
}

#[test]
fn untouched_batches_stay_byte_for_byte_and_producer_batches_survive() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), config()).await.unwrap();
        // A producer's only batch, entirely superseded later: kept as an empty batch.
        let p = with_producer(&keyed(NOW_MS, &[(key(1), Some(value(1, 0)))], 0), 77, 5);
        let p_base = append(&log, p).await;
        // Batches whose keys are never updated again: kept whole.
        let mut whole = Vec::new();
        for i in 0..200 {
            let b = keyed(NOW_MS, &[(key(1000 + i), Some(value(i, 0)))], (i % 5) as u8);
            let base = append(&log, b).await;
            whole.push(base);
        }
        // Updates that fill segments and supersede key 1.
        write_updates(&log, 50, 40).await;
        let (_, before) = read_all(&log).await;
        let mut cleaner = LogCleaner::open(&log, CleanerConfig::default());
        clean_at(&mut cleaner, &log, NOW_MS).await;
        let (_, after) = read_all(&log).await;
        let find = |bs: &[Bytes], base: u64| {
            bs.iter()
                .find(|b| BatchHeader::parse(b).unwrap().base_offset() as u64 == base)
                .cloned()
        };
        for base in whole {
            assert_eq!(
                find(&before, base),
                find(&after, base),
                "batch at {base} unchanged"
            );
        }
        let kept = find(&after, p_base).expect("the producer's last batch is kept");
        let h = BatchHeader::parse(&kept).unwrap();
        h.verify_crc().unwrap();
        assert_eq!(
            (
                h.records_count(),
                h.producer_id(),
                h.base_sequence(),
                h.last_offset()
            ),
            (0, 77, 5, p_base as i64)
        );
        log.close().await.unwrap();
    });
}

#[test]
fn a_small_map_cleans_in_passes_to_the_same_result() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run(async {
        let mut results = Vec::new();
        for (dir, map_bytes) in [(a.path(), 64 << 20), (b.path(), 40 * 100)] {
            let log = PartitionLog::open(dir, config()).await.unwrap();
            let model = write_updates(&log, 300, 6).await;
            let mut cleaner = LogCleaner::open(
                &log,
                CleanerConfig {
                    dedupe_buffer_bytes: map_bytes,
                    ..CleanerConfig::default()
                },
            );
            let stats: CleanStats = clean_at(&mut cleaner, &log, NOW_MS).await;
            let (seen, _) = read_all(&log).await;
            assert_eq!(latest(&seen), model);
            results.push((stats.passes, latest(&seen)));
            log.close().await.unwrap();
        }
        assert_eq!(results[0].0, 1);
        assert!(results[1].0 > 3, "{} passes", results[1].0);
        assert_eq!(results[0].1, results[1].1);
    });
}

#[test]
fn the_throttle_bounds_the_cleaners_io_rate() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), config()).await.unwrap();
        write_updates(&log, 200, 6).await;
        // The log is small, and read once (a pass keeps its reads for the rewrite).
        let rate = 128 << 10;
        let mut cleaner = LogCleaner::open(
            &log,
            CleanerConfig {
                io_bytes_per_sec: Some(rate),
                ..CleanerConfig::default()
            },
        );
        let start = std::time::Instant::now();
        let stats = clean_at(&mut cleaner, &log, NOW_MS).await;
        let elapsed = start.elapsed().as_secs_f64();
        let io = (stats.bytes_read + stats.bytes_written) as f64;
        // The last window's worth may go unpaused.
        let floor = io / rate as f64 - spate_engine::clean::THROTTLE_WINDOW_MS as f64 / 1000.0;
        assert!(io > rate as f64 / 2.0, "enough I/O to measure: {io}");
        assert!(
            elapsed >= floor,
            "{io} bytes in {elapsed:.3}s at {rate} B/s"
        );
        log.close().await.unwrap();
    });
}

#[test]
fn the_cleaner_defers_each_disk_request_to_foreground_work_but_still_finishes() {
    use spate_engine::clean::{CLEANER_MAX_DEFER_MS, CLEANER_READ_MAX_BYTES};
    use spate_engine::foreground::{foreground_in_flight, ForegroundIo};
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), config()).await.unwrap();
        let model = write_updates(&log, 200, 6).await;
        assert_eq!(
            foreground_in_flight(),
            0,
            "appends and group commits end their marks"
        );
        let mut cleaner = LogCleaner::open(&log, CleanerConfig::default());
        // A foreground operation that never ends: every request waits the whole bound.
        let busy = ForegroundIo::begin();
        let stats = clean_at(&mut cleaner, &log, NOW_MS).await;
        drop(busy);
        // At least one read for the key map and one for the rewrite.
        let requests = stats
            .bytes_read
            .div_ceil(CLEANER_READ_MAX_BYTES as u64)
            .max(2);
        assert!(
            stats.deferred_ms >= requests * CLEANER_MAX_DEFER_MS,
            "{} ms deferred over at least {requests} reads",
            stats.deferred_ms
        );
        assert_eq!(latest(&read_all(&log).await.0), model);
        log.close().await.unwrap();
    });
}

#[test]
fn time_lookups_answer_records_also_across_compacted_gaps() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), config()).await.unwrap();
        // The example: records stamped 1234 and 999999999999 in one batch.
        let mut section = build::record(0, 0, Some(b"a"), Some(b"x"), &[]);
        section.extend(build::record(
            1,
            999_999_999_999 - 1234,
            Some(b"b"),
            Some(b"y"),
            &[],
        ));
        let mut b = spate_engine::batch::build_batch(&section, 2, 1234, 999_999_999_999);
        build::fix_crc(&mut b);
        append(&log, Bytes::from(b)).await;
        assert_eq!(
            log.offset_for_timestamp(999_999_999_999).await.unwrap(),
            Some((1, 999_999_999_999))
        );
        assert_eq!(
            log.offset_for_timestamp(1234).await.unwrap(),
            Some((0, 1234))
        );
        log.close().await.unwrap();
    });

    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), config()).await.unwrap();
        // Rising timestamps: key i at ts 10_000 + offset; the even keys rewritten at the end.
        let n = 2_000usize;
        for chunk in 0..n / 10 {
            let recs: Vec<Rec> = (0..10)
                .map(|j| (key(chunk * 10 + j), Some(value(j, 0))))
                .collect();
            append(&log, keyed(10_000 + (chunk * 10) as i64, &recs, 0)).await;
        }
        for i in (0..n).step_by(2) {
            append(
                &log,
                keyed(1_000_000 + i as i64, &[(key(i), Some(value(i, 1)))], 0),
            )
            .await;
        }
        log.checkpoint().await.unwrap();
        for i in (0..n).step_by(97) {
            assert_eq!(
                log.offset_for_timestamp(10_000 + i as i64).await.unwrap(),
                Some((i as u64, 10_000 + i as i64)),
                "before cleaning"
            );
        }
        let mut cleaner = LogCleaner::open(&log, CleanerConfig::default());
        clean_at(&mut cleaner, &log, NOW_MS).await;
        // An even key rewritten below the cleaned end is gone: the next odd record answers.
        let clean_end = cleaner.first_dirty_offset() as usize;
        assert!(
            clean_end > n + 200,
            "the rewrites of many even keys were cleanable"
        );
        for i in (0..n - 2).step_by(97) {
            let superseded = i % 2 == 0 && n + i / 2 < clean_end;
            let want = if superseded { i + 1 } else { i };
            assert_eq!(
                log.offset_for_timestamp(10_000 + i as i64).await.unwrap(),
                Some((want as u64, 10_000 + want as i64)),
                "after cleaning, target {i}"
            );
        }
        log.close().await.unwrap();
    });
}

#[test]
fn time_lookups_under_log_append_time_answer_the_first_record_of_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), config()).await.unwrap();
        for (i, append_time) in [(0usize, 5_000i64), (1, 6_000), (2, 7_000)] {
            let recs: Vec<Rec> = (0..4)
                .map(|j| (key(i * 4 + j), Some(value(j, i))))
                .collect();
            let mut b = keyed(100, &recs, 0).to_vec();
            spate_engine::records::set_log_append_time(&mut b, append_time).unwrap();
            append(&log, Bytes::from(b)).await;
        }
        assert_eq!(
            log.offset_for_timestamp(5_500).await.unwrap(),
            Some((4, 6_000))
        );
        assert_eq!(
            log.offset_for_timestamp(7_000).await.unwrap(),
            Some((8, 7_000))
        );
        assert_eq!(log.offset_for_timestamp(7_001).await.unwrap(), None);
        log.close().await.unwrap();
    });
}

/// A tmpfs scratch directory when there is one (many reopen cycles).
fn segment_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_str().unwrap().ends_with(".log"))
        .map(|e| {
            (
                e.file_name().to_str().unwrap().to_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// Every segment a stopped cleaner committed to (a `.swap` file: complete and synced), by
/// name. A clean swaps runs of segments one after another and then merges what it left small,
/// so a stop between two swaps leaves segments that are neither the old nor the final ones; each
/// is still one whole swap's output. The stops run in step order, so a swap committed before a
/// stop was seen (stopped right after its commit) before that stop's files are checked.
#[derive(Default)]
struct Committed(BTreeMap<String, Vec<Vec<u8>>>);

impl Committed {
    fn note(&mut self, dir: &Path) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_str().unwrap().to_owned();
            if let Some(log) = name.strip_suffix(".swap") {
                let bytes = std::fs::read(e.path()).unwrap();
                let seen = self.0.entry(log.to_owned()).or_default();
                if !seen.contains(&bytes) {
                    seen.push(bytes);
                }
            }
        }
    }

    fn holds(&self, name: &str, bytes: &[u8]) -> bool {
        self.0
            .get(name)
            .is_some_and(|seen| seen.iter().any(|b| b == bytes))
    }
}

#[test]
fn a_cleaner_stopped_after_any_file_operation_leaves_old_or_new_segments() {
    let original = scratch();
    let model = run(async {
        let log = PartitionLog::open(original.path(), config()).await.unwrap();
        let model = write_updates(&log, 200, 10).await;
        log.close().await.unwrap();
        model
    });
    let old = segment_files(original.path());

    // The reference: one clean that is never stopped.
    let reference = scratch();
    copy_dir(original.path(), reference.path());
    let steps_needed = run(async {
        let log = PartitionLog::open(reference.path(), config())
            .await
            .unwrap();
        let mut cleaner = LogCleaner::open(&log, CleanerConfig::default());
        clean_at(&mut cleaner, &log, NOW_MS).await;
        let (seen, _) = read_all(&log).await;
        log.close().await.unwrap();
        (cleaner.steps_taken(), seen)
    });
    let (steps_needed, cleaned_records) = steps_needed;
    let new = segment_files(reference.path());
    assert!(new.len() < old.len(), "cleaned segments are merged");
    assert!(old != new);
    assert!(steps_needed > 10, "{steps_needed} steps");

    let mut committed = Committed::default();
    for stop in 1..steps_needed {
        let dir = scratch();
        copy_dir(original.path(), dir.path());
        run(async {
            let log = PartitionLog::open(dir.path(), config()).await.unwrap();
            let mut cleaner = LogCleaner::open(&log, CleanerConfig::default());
            cleaner.stop_after_steps(Some(stop));
            assert!(cleaner.clean(&log, &request(NOW_MS)).await.is_err());
            // Abandoned as a kill would leave it.
            std::mem::forget(log);
        });
        committed.note(dir.path());
        let recovered = run(async {
            let log = PartitionLog::open(dir.path(), config()).await.unwrap();
            let (seen, _) = read_all(&log).await;
            assert_eq!(latest(&seen), model, "stop after step {stop}");
            log.close().await.unwrap();
            segment_files(dir.path())
        });
        for (name, bytes) in &recovered {
            assert!(
                old.get(name) == Some(bytes)
                    || new.get(name) == Some(bytes)
                    || committed.holds(name, bytes),
                "stop after step {stop}: {name} is neither the old nor the cleaned segment"
            );
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_str().unwrap().to_owned())
            .filter(|n| n.ends_with(".swap") || n.ends_with(".cleaned"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // Cleaning again finishes the job: the same records as the uninterrupted clean (in
        // fewer segments when the segments cleaned before the stop are merged now).
        run(async {
            let log = PartitionLog::open(dir.path(), config()).await.unwrap();
            let mut cleaner = LogCleaner::open(&log, CleanerConfig::default());
            cleaner.clean(&log, &request(NOW_MS)).await.unwrap();
            let (seen, _) = read_all(&log).await;
            assert!(
                seen == cleaned_records,
                "stop after step {stop}, then a clean: other records than one clean keeps"
            );
            log.close().await.unwrap();
        });
        assert!(
            segment_files(dir.path()).len() <= new.len(),
            "stop after step {stop}, then a clean"
        );
    }
}

#[test]
fn the_dirty_ratio_the_lags_and_the_high_watermark_decide_what_is_cleaned() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), config()).await.unwrap();
        write_updates(&log, 300, 8).await;
        let mut cleaner = LogCleaner::open(&log, CleanerConfig::default());
        let unforced = |policy: CompactionPolicy, max_clean_offset: u64| CleanRequest {
            now_ms: NOW_MS,
            max_clean_offset,
            policy,
            force: false,
            keep_batches: Default::default(),
            urgent: false,
        };
        let default = CompactionPolicy::default();
        // Records younger than min.compaction.lag.ms are not cleanable.
        let lagged = CompactionPolicy {
            min_compaction_lag_ms: 2 * DAY_MS as u64,
            ..default
        };
        let plan = cleaner.plan(&log, &unforced(lagged, u64::MAX));
        assert_eq!((plan.dirty_bytes, plan.clean_end), (0, 0));
        assert!(cleaner
            .clean(&log, &unforced(lagged, u64::MAX))
            .await
            .unwrap()
            .is_none());
        // Nothing at or above the high watermark.
        assert!(cleaner
            .clean(&log, &unforced(default, 0))
            .await
            .unwrap()
            .is_none());
        let hw = log.log_end_offset() / 2;
        let stats = cleaner.clean(&log, &unforced(default, hw)).await.unwrap();
        assert!(stats.is_some());
        assert!(cleaner.first_dirty_offset() <= hw && cleaner.first_dirty_offset() > 0);

        // A fully dirty log is over any ratio; once cleaned, new updates make it partly dirty.
        cleaner
            .clean(&log, &unforced(default, u64::MAX))
            .await
            .unwrap()
            .unwrap();
        write_updates(&log, 300, 3).await;
        let only_all_dirty = CompactionPolicy {
            min_cleanable_dirty_ratio: 1.0,
            ..default
        };
        let plan = cleaner.plan(&log, &unforced(only_all_dirty, u64::MAX));
        assert!(plan.dirty_ratio > 0.0 && plan.dirty_ratio < 1.0, "{plan:?}");
        assert!(!plan.should_clean(&only_all_dirty));
        assert!(cleaner
            .clean(&log, &unforced(only_all_dirty, u64::MAX))
            .await
            .unwrap()
            .is_none());
        // Dirty records older than max.compaction.lag.ms are cleaned whatever the ratio.
        let max_lag = CompactionPolicy {
            max_compaction_lag_ms: 1,
            ..only_all_dirty
        };
        assert!(
            cleaner
                .plan(&log, &unforced(max_lag, u64::MAX))
                .max_lag_exceeded
        );
        assert!(cleaner
            .clean(&log, &unforced(max_lag, u64::MAX))
            .await
            .unwrap()
            .is_some());
        assert_eq!(cleaner.counters().passes, 3);
        log.close().await.unwrap();
    });
}

#[test]
fn readers_and_producers_running_beside_the_cleaner_see_no_stale_value() {
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;

    let dir = scratch();
    run(async {
        let log = Rc::new(PartitionLog::open(dir.path(), config()).await.unwrap());
        // offset -> (key, value) of everything produced.
        let produced: Rc<RefCell<BTreeMap<i64, Rec>>> = Rc::default();
        let produce = |log: Rc<PartitionLog>, produced: Rc<RefCell<BTreeMap<i64, Rec>>>, round| async move {
            for chunk in 0..30 {
                let recs: Vec<Rec> = (0..10)
                    .map(|j| (key(chunk * 10 + j), Some(value(chunk * 10 + j, round))))
                    .collect();
                let base = append(&log, keyed(NOW_MS - DAY_MS, &recs, (chunk % 5) as u8)).await;
                let mut p = produced.borrow_mut();
                for (i, r) in recs.into_iter().enumerate() {
                    p.insert(base as i64 + i as i64, r);
                }
            }
        };
        for round in 0..6 {
            produce(log.clone(), produced.clone(), round).await;
        }
        log.checkpoint().await.unwrap();

        let done = Rc::new(Cell::new(false));
        let scans = Rc::new(Cell::new(0u32));
        let reader = glommio::spawn_local({
            let (log, produced, done, scans) =
                (log.clone(), produced.clone(), done.clone(), scans.clone());
            async move {
                while (!done.get() || scans.get() < 3) && scans.get() < 100_000 {
                    // The latest offset of every key produced before this scan.
                    let want: BTreeMap<Vec<u8>, i64> = produced
                        .borrow()
                        .iter()
                        .map(|(o, (k, _))| (k.clone(), *o))
                        .collect();
                    let (seen, _) = read_all(&log).await;
                    {
                        let p = produced.borrow();
                        let mut last: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
                        for s in &seen {
                            let (k, v) = &p[&s.offset];
                            assert_eq!((s.key.as_ref(), &s.value), (Some(k), v));
                            last.insert(k.clone(), s.offset);
                        }
                        for (k, o) in &want {
                            assert!(
                                last.get(k).is_some_and(|l| l >= o),
                                "key {k:?}: value at {o} missed"
                            );
                        }
                    }
                    scans.set(scans.get() + 1);
                    // Reads served from memory never yield on their own; a pause between scans
                    // lets the cleaner make progress (the checks do not depend on its length).
                    glommio::timer::sleep(std::time::Duration::from_millis(2)).await;
                }
            }
        })
        .detach();
        let producer = glommio::spawn_local({
            let (log, produced) = (log.clone(), produced.clone());
            async move {
                for round in 6..12 {
                    produce(log.clone(), produced.clone(), round).await;
                    glommio::executor().yield_task_queue_now().await;
                }
            }
        })
        .detach();
        let mut cleaner = LogCleaner::open(&log, CleanerConfig::default());
        let mut cleaned = 0;
        for _ in 0..6 {
            log.checkpoint().await.unwrap();
            if let Some(s) = cleaner.clean(&log, &request(NOW_MS)).await.unwrap() {
                cleaned += s.segments_rewritten;
            }
            glommio::executor().yield_task_queue_now().await;
        }
        producer.await;
        done.set(true);
        reader.await;
        assert!(
            cleaned > 3 && scans.get() >= 3,
            "{cleaned} rewrites, {} scans",
            scans.get()
        );
        let (seen, _) = read_all(&log).await;
        let latest_produced: BTreeMap<Vec<u8>, Option<Vec<u8>>> =
            produced.borrow().values().cloned().collect();
        assert_eq!(latest(&seen), latest_produced);
        log.close().await.unwrap();
    });
}

/// A pass keeps what it read to build the map for rewriting the same segments (up to
/// CLEANER_REUSE_MAX_BYTES): a log smaller than that is read from the disk once, not twice,
/// which is what lets the cleaner keep up with `__consumer_offsets` as it grows.
#[test]
fn a_pass_reads_a_small_log_from_the_disk_once() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), config()).await.unwrap();
        let model = write_updates(&log, 200, 6).await;
        let log_bytes = log.size_bytes();
        assert!((log_bytes as usize) < spate_engine::clean::CLEANER_REUSE_MAX_BYTES);
        let mut cleaner = LogCleaner::open(&log, CleanerConfig::default());
        let stats = clean_at(&mut cleaner, &log, NOW_MS).await;
        assert_eq!(stats.passes, 1);
        assert!(
            stats.bytes_read <= log_bytes,
            "read {} bytes of a {log_bytes}-byte log",
            stats.bytes_read
        );
        let (seen, _) = read_all(&log).await;
        assert_eq!(latest(&seen), model);
        log.close().await.unwrap();
    });
}

#[test]
fn batches_larger_than_a_read_request_are_read_in_pieces_and_cleaned_whole() {
    // Batches of about 330 KiB make the cleaner read several frames at a time (more than
    // CLEANER_READ_CHUNK_BYTES), which it asks of the disk in chunk-sized pieces and joins.
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 4 << 20,
        max_batch_bytes: 1 << 20,
        ..config()
    };
    run(async {
        let log = PartitionLog::open(dir.path(), config.clone())
            .await
            .unwrap();
        let mut model = BTreeMap::new();
        for round in 0..12 {
            for first in (0..60).step_by(40) {
                let recs: Vec<Rec> = (first..(first + 40).min(60))
                    .map(|i| (key(i), Some(value(i, round).repeat(50))))
                    .collect();
                for (k, v) in &recs {
                    model.insert(k.clone(), v.clone());
                }
                append(&log, keyed(NOW_MS - DAY_MS, &recs, 0)).await;
            }
        }
        log.checkpoint().await.unwrap();
        assert!(segment_count(dir.path()) >= 2, "a closed segment to clean");
        let mut cleaner = LogCleaner::open(&log, CleanerConfig::default());
        let stats = clean_at(&mut cleaner, &log, NOW_MS).await;
        assert!(stats.segments_rewritten > 0 && stats.bytes_reclaimed > 0);
        // Reads of 1 MiB and more were asked for; none reached the disk above the chunk size.
        let chunk = spate_engine::clean::CLEANER_READ_CHUNK_BYTES as u64;
        assert!(
            stats.read_requests * chunk >= stats.bytes_read,
            "{} bytes in {} requests",
            stats.bytes_read,
            stats.read_requests
        );
        let (seen, _) = read_all(&log).await;
        assert_eq!(latest(&seen), model);
        log.close().await.unwrap();
        let log = PartitionLog::open(dir.path(), config).await.unwrap();
        assert_eq!(read_all(&log).await.0, seen, "the same after recovery");
        log.close().await.unwrap();
    });
}

/// Writes `rounds` updates of `keys` keys in batches of 10 (the codecs in turn), the record at
/// offset `o` stamped `NOW_MS - DAY_MS + o` (rising timestamps), then checkpoints.
async fn write_stamped(
    log: &PartitionLog,
    keys: usize,
    rounds: usize,
    model: &mut BTreeMap<Vec<u8>, Option<Vec<u8>>>,
) {
    let mut batch_no = 0;
    for round in 0..rounds {
        for chunk in (0..keys).collect::<Vec<_>>().chunks(10) {
            let recs: Vec<Rec> = chunk
                .iter()
                .map(|&i| (key(i), Some(value(i, round))))
                .collect();
            for (k, v) in &recs {
                model.insert(k.clone(), v.clone());
            }
            let ts = NOW_MS - DAY_MS + log.log_end_offset() as i64;
            let codec = (batch_no % 5) as u8;
            append(log, keyed(ts, &recs, codec)).await;
            batch_no += 1;
        }
    }
    log.checkpoint().await.unwrap();
}

/// Fetch at every offset and a time lookup for every record's timestamp answer what the
/// records `seen` (the whole log as read from its start) say they must.
async fn check_reads(log: &PartitionLog, seen: &[Seen], context: &str) {
    for o in log.log_start_offset()..log.log_end_offset() {
        let r = log.read(o, 1).await.unwrap();
        let b = r
            .batches
            .first()
            .expect("a batch at every offset below the end");
        let h = BatchHeader::parse(b).unwrap();
        assert!(
            h.base_offset() as u64 <= o && o <= h.last_offset() as u64,
            "{context}: fetch at {o} answered offsets {}..={}",
            h.base_offset(),
            h.last_offset()
        );
    }
    let t0 = NOW_MS - DAY_MS;
    for o in log.log_start_offset()..log.log_end_offset() {
        let want = seen
            .iter()
            .find(|s| s.offset as u64 >= o)
            .map(|s| (s.offset as u64, s.timestamp));
        assert_eq!(
            log.offset_for_timestamp(t0 + o as i64).await.unwrap(),
            want,
            "{context}: time lookup for offset {o}'s timestamp"
        );
    }
}

fn remove_index_files(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension()
            .is_some_and(|x| x == "index" || x == "timeindex")
        {
            std::fs::remove_file(p).unwrap();
        }
    }
}

/// Once cleaned, the segments of a compacted log are mostly empty; the next clean merges runs
/// of them into single segments (Kafka's groupSegmentsBySize), and fetches at every offset,
/// time lookups and recovery (with its index files and without) are right across them.
#[test]
fn cleaning_merges_small_segments_and_reads_stay_right_across_them() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), config()).await.unwrap();
        let mut model = BTreeMap::new();
        write_stamped(&log, 200, 14, &mut model).await;
        let written = segment_count(dir.path());
        assert!(written > 5, "{written} segments");
        let (before, _) = read_all(&log).await;
        let end = log.log_end_offset();

        let mut cleaner = LogCleaner::open(&log, CleanerConfig::default());
        // Runs are formed by the sizes before cleaning (full segments: none), then what
        // the clean left small is merged in the same clean.
        let second = clean_at(&mut cleaner, &log, NOW_MS).await;
        assert!(second.segments_merged > 0, "{second:?}");
        assert_eq!(
            cleaner.counters().segments_merged,
            u64::from(second.segments_merged)
        );
        let merged = segment_count(dir.path());
        // The cleaned part (200 live keys) fits one segment; the active one is never cleaned.
        assert_eq!(merged, 2, "{written} segments before, {merged} after");
        assert_eq!(
            written - merged,
            second.segments_merged as usize,
            "each merged segment's file went away"
        );
        assert_eq!(log.log_end_offset(), end, "offsets never change");

        let (after, _) = read_all(&log).await;
        assert_eq!(latest(&after), model);
        let by_offset: BTreeMap<i64, &Seen> = before.iter().map(|s| (s.offset, s)).collect();
        for s in &after {
            assert_eq!(by_offset[&s.offset], s);
        }
        check_reads(&log, &after, "after the merge").await;
        // Another clean finds nothing left to merge or change.
        let third = clean_at(&mut cleaner, &log, NOW_MS).await;
        assert_eq!((third.segments_merged, third.segments_rewritten), (0, 0));
        log.close().await.unwrap();

        // Reopened with the merged segment's index files, then with none (rebuilt by recovery).
        let log = PartitionLog::open(dir.path(), config()).await.unwrap();
        assert_eq!(read_all(&log).await.0, after);
        check_reads(&log, &after, "reopened").await;
        log.close().await.unwrap();
        remove_index_files(dir.path());
        let log = PartitionLog::open(dir.path(), config()).await.unwrap();
        assert_eq!(read_all(&log).await.0, after);
        check_reads(&log, &after, "reopened without index files").await;
        log.close().await.unwrap();
    });
}

/// The step-by-step crash test of a clean that merges segments: stopped after any file
/// operation, recovery leaves each run of segments old or merged (the files are the old ones or
/// the new ones, the log reads contiguously from its start to its end with the latest value of
/// every key), and nothing half-swapped.
#[test]
fn a_cleaner_stopped_after_any_file_operation_of_a_merge_leaves_old_or_merged_segments() {
    let original = scratch();
    let (model, end) = run(async {
        let log = PartitionLog::open(original.path(), config()).await.unwrap();
        // Every key once, then four keys in five again: cleaned, each segment of the first
        // round keeps a fifth of its records, and those are merged in several runs of a
        // segment's size.
        let mut model = BTreeMap::new();
        for round in 0..2 {
            let keys: Vec<usize> = (0..4000).filter(|i| round == 0 || i % 5 != 0).collect();
            for chunk in keys.chunks(10) {
                let recs: Vec<Rec> = chunk
                    .iter()
                    .map(|&i| (key(i), Some(value(i, round))))
                    .collect();
                for (k, v) in &recs {
                    model.insert(k.clone(), v.clone());
                }
                append(&log, keyed(NOW_MS - DAY_MS, &recs, (round % 5) as u8)).await;
            }
        }
        log.checkpoint().await.unwrap();
        let end = log.log_end_offset();
        log.close().await.unwrap();
        (model, end)
    });
    let old = segment_files(original.path());

    let reference = scratch();
    copy_dir(original.path(), reference.path());
    let steps_needed = run(async {
        let log = PartitionLog::open(reference.path(), config())
            .await
            .unwrap();
        let mut cleaner = LogCleaner::open(&log, CleanerConfig::default());
        let stats = clean_at(&mut cleaner, &log, NOW_MS).await;
        assert!(stats.segments_merged >= 3, "{stats:?}");
        log.close().await.unwrap();
        cleaner.steps_taken()
    });
    let new = segment_files(reference.path());
    let merged_runs = new.iter().filter(|(n, b)| old.get(*n) != Some(b)).count();
    assert!(
        merged_runs >= 2 && new.len() + 3 <= old.len(),
        "{} segments -> {}, {merged_runs} rewritten",
        old.len(),
        new.len()
    );

    let mut committed = Committed::default();
    for stop in 1..steps_needed {
        let dir = scratch();
        copy_dir(original.path(), dir.path());
        run(async {
            let log = PartitionLog::open(dir.path(), config()).await.unwrap();
            let mut cleaner = LogCleaner::open(&log, CleanerConfig::default());
            cleaner.stop_after_steps(Some(stop));
            assert!(cleaner.clean(&log, &request(NOW_MS)).await.is_err());
            std::mem::forget(log);
        });
        committed.note(dir.path());
        let recovered = run(async {
            let log = PartitionLog::open(dir.path(), config()).await.unwrap();
            assert_eq!(
                (log.log_start_offset(), log.log_end_offset()),
                (0, end),
                "stop after step {stop}"
            );
            let (seen, _) = read_all(&log).await;
            assert_eq!(latest(&seen), model, "stop after step {stop}");
            log.close().await.unwrap();
            segment_files(dir.path())
        });
        for (name, bytes) in &recovered {
            assert!(
                old.get(name) == Some(bytes)
                    || new.get(name) == Some(bytes)
                    || committed.holds(name, bytes),
                "stop after step {stop}: {name} is neither an old nor a merged segment"
            );
        }
        // Every merged segment present means all the old ones it replaced are gone.
        let bases: Vec<u64> = recovered
            .keys()
            .map(|n| n.trim_end_matches(".log").parse().unwrap())
            .collect();
        for w in bases.windows(2) {
            let name = format!("{:020}.log", w[0]);
            if new.get(&name) == recovered.get(&name) && old.get(&name) != recovered.get(&name) {
                let next_new = new
                    .keys()
                    .map(|n| n.trim_end_matches(".log").parse::<u64>().unwrap())
                    .find(|b| *b > w[0]);
                assert_eq!(
                    Some(w[1]),
                    next_new,
                    "stop after step {stop}: {name} overlaps"
                );
            }
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_str().unwrap().to_owned())
            .filter(|n| n.ends_with(".swap") || n.ends_with(".cleaned"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // Cleaning again finishes the job.
        run(async {
            let log = PartitionLog::open(dir.path(), config()).await.unwrap();
            let mut cleaner = LogCleaner::open(&log, CleanerConfig::default());
            cleaner.clean(&log, &request(NOW_MS)).await.unwrap();
            let (seen, _) = read_all(&log).await;
            assert_eq!(latest(&seen), model, "stop after step {stop}, then a clean");
            log.close().await.unwrap();
        });
        assert!(
            segment_files(dir.path()).len() <= new.len(),
            "stop after step {stop}, then a clean: merged as far"
        );
    }
}

/// The batches a request names (producer snapshots' anchors) are kept byte for byte, however
/// much of them later records supersede; everything else is cleaned as usual.
#[test]
fn batches_the_request_names_are_kept_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let log = PartitionLog::open(dir.path(), config()).await.unwrap();
        let model = write_updates(&log, 200, 8).await;
        let (_, before) = read_all(&log).await;
        let pick = |i: usize| {
            let h = BatchHeader::parse(&before[i]).unwrap();
            (
                h.base_offset() as u64,
                h.last_offset() as u64,
                before[i].clone(),
            )
        };
        // One batch of the first round (all of it superseded) and one of the fourth.
        let kept = [pick(3), pick(65)];
        let mut cleaner = LogCleaner::open(&log, CleanerConfig::default());
        let req = CleanRequest {
            keep_batches: [Some(kept[0].0), Some(kept[1].1), None, None],
            urgent: false,
            ..request(NOW_MS)
        };
        let stats = cleaner.clean(&log, &req).await.unwrap().unwrap();
        assert!(stats.records_removed > 0);
        let (seen, after) = read_all(&log).await;
        assert_eq!(latest(&seen), model);
        for (base, last, bytes) in &kept {
            let found = after
                .iter()
                .find(|b| BatchHeader::parse(b).unwrap().base_offset() as u64 == *base)
                .unwrap_or_else(|| panic!("the batch at {base}..={last} is gone"));
            assert_eq!(found, bytes, "the batch at {base}..={last} is rewritten");
        }
        // No longer named, their superseded records go in the next clean whose dirty part
        // writes those keys again (a clean part is only deduplicated against a dirty part).
        let model = write_updates(&log, 200, 4).await;
        clean_at(&mut cleaner, &log, NOW_MS).await;
        let (_, after) = read_all(&log).await;
        for (base, _, bytes) in &kept {
            assert!(!after.contains(bytes), "the batch at {base} is still whole");
        }
        assert_eq!(latest(&read_all(&log).await.0), model);
        log.close().await.unwrap();
    });
}
