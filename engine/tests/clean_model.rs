//! Model-based property test of the log cleaner: random produce of keyed records and tombstones
//! (every codec, some with a producer id), random cleans (clock, high watermark, compaction lag,
//! tombstone retention, map size) and reopens, checked against an in-memory map of everything
//! produced. After every step a reader of the whole log must see:
//! - offsets strictly increasing, and at each offset exactly the record produced there;
//! - for every key whose latest record is a value, that value (never lost);
//! - for every key whose latest record is a tombstone, that tombstone or nothing at all (a
//!   removed tombstone never lets an older value come back);
//! - below the cleaner's first dirty offset, at most one record per key.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use bytes::Bytes;
use common::*;
use proptest::prelude::*;
use spate_engine::batch::{BatchHeader, VerifiedBatch};
use spate_engine::clean::{CleanRequest, CleanerConfig, CompactionPolicy, LogCleaner};
use spate_engine::validate::build;
use spate_engine::{LogConfig, PartitionLog};

const DAY_MS: u64 = 86_400_000;

#[derive(Clone, Debug)]
enum Op {
    Produce {
        records: Vec<(u8, Option<u16>)>,
        codec: u8,
        producer: Option<i64>,
    },
    Clean {
        advance_ms: u64,
        /// Fraction (of 8) of the log end below which cleaning may go (the high watermark).
        hw_eighths: u8,
        lagged: bool,
        retention_zero: bool,
        small_map: bool,
        force: bool,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (
            prop::collection::vec((0u8..12, prop::option::weighted(0.85, any::<u16>())), 1..8),
            0u8..5,
            prop::option::weighted(0.2, 1i64..4),
        )
            .prop_map(|(records, codec, producer)| Op::Produce { records, codec, producer }),
        2 => (0..3 * DAY_MS, 0u8..=8, prop::bool::weighted(0.15), any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(advance_ms, hw_eighths, lagged, retention_zero, small_map, force)| Op::Clean {
                advance_ms,
                hw_eighths,
                lagged,
                retention_zero,
                small_map,
                force,
            }),
        1 => Just(Op::Reopen),
    ]
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 64 << 10,
        index_interval_bytes: 1024,
        max_batch_bytes: 32 << 10,
        ..small_config()
    }
}

fn key(k: u8) -> Vec<u8> {
    format!("key-{k}").into_bytes()
}

/// A value of a few hundred bytes that compresses poorly, unique per produce.
fn value(seed: u16, serial: u64) -> Vec<u8> {
    let mut x = (u64::from(seed) << 32 | serial).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let len = 200 + (seed % 600) as usize;
    let mut v = format!("{serial}:").into_bytes();
    v.extend((0..len).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b'a' + (x % 26) as u8
    }));
    v
}

fn batch(recs: &[(Vec<u8>, Option<Vec<u8>>)], codec: u8, ts: i64, producer: Option<i64>) -> Bytes {
    let mut section = Vec::new();
    for (i, (k, v)) in recs.iter().enumerate() {
        section.extend(build::record(i as i64, 0, Some(k), v.as_deref(), &[]));
    }
    let payload = if codec == 0 {
        section
    } else {
        build::compress(codec, &section)
    };
    let n = recs.len() as i32;
    let mut b = build::batch(&payload, n, n - 1, codec);
    b[27..35].copy_from_slice(&ts.to_be_bytes());
    b[35..43].copy_from_slice(&ts.to_be_bytes());
    if let Some(pid) = producer {
        b[43..51].copy_from_slice(&pid.to_be_bytes());
        b[51..53].copy_from_slice(&0i16.to_be_bytes());
        b[53..57].copy_from_slice(&0i32.to_be_bytes());
    }
    build::fix_crc(&mut b);
    Bytes::from(b)
}

type Produced = BTreeMap<i64, (Vec<u8>, Option<Vec<u8>>)>;

async fn check(log: &PartitionLog, produced: &Produced, first_dirty: u64) {
    let mut next = log.log_start_offset();
    let mut seen: Vec<(i64, Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    for _ in 0..100_000 {
        if next >= log.log_end_offset() {
            break;
        }
        let r = log.read(next, 1 << 20).await.unwrap();
        assert!(
            !r.batches.is_empty(),
            "a read at {next} below the end returns a batch"
        );
        for b in r.batches {
            let h = BatchHeader::parse(&b).unwrap();
            h.verify_crc().unwrap();
            assert!(h.last_offset() as u64 >= next);
            next = h.last_offset() as u64 + 1;
            let mut buf = b.clone();
            let set = kafka_protocol::records::RecordBatchDecoder::decode(&mut buf).unwrap();
            for r in set.records {
                let k = r.key.unwrap().to_vec();
                seen.push((r.offset, k, r.value.map(|v| v.to_vec())));
            }
        }
    }
    assert_eq!(next, log.log_end_offset(), "the whole log was read");
    for w in seen.windows(2) {
        assert!(w[0].0 < w[1].0, "offsets strictly increase");
    }
    for (o, k, v) in &seen {
        assert_eq!(
            produced.get(o),
            Some(&(k.clone(), v.clone())),
            "record at {o} is the one produced there"
        );
    }
    let mut latest_produced: BTreeMap<&[u8], (i64, bool)> = BTreeMap::new();
    for (o, (k, v)) in produced {
        latest_produced.insert(k, (*o, v.is_some()));
    }
    let mut latest_seen: BTreeMap<&[u8], i64> = BTreeMap::new();
    for (o, k, _) in &seen {
        latest_seen.insert(k, *o);
    }
    for (k, (o, is_value)) in &latest_produced {
        match latest_seen.get(k) {
            Some(s) => assert_eq!(s, o, "key {k:?}: the latest record is the latest produced"),
            None => assert!(!is_value, "key {k:?}: its latest value at {o} is lost"),
        }
    }
    let mut clean_keys = HashSet::new();
    for (o, k, _) in seen.iter().filter(|(o, _, _)| (*o as u64) < first_dirty) {
        assert!(
            clean_keys.insert(k),
            "key {k:?} twice below {first_dirty} (at {o})"
        );
    }
}

async fn run_ops(dir: &Path, ops: Vec<Op>) {
    let mut log = PartitionLog::open(dir, config()).await.unwrap();
    let mut cleaner = LogCleaner::open(&log, CleanerConfig::default());
    let mut produced: Produced = BTreeMap::new();
    let mut clock: i64 = 1_700_000_000_000;
    let mut serial = 0u64;
    for op in ops {
        match op {
            Op::Produce {
                records,
                codec,
                producer,
            } => {
                clock += 10;
                let recs: Vec<(Vec<u8>, Option<Vec<u8>>)> = records
                    .iter()
                    .map(|(k, v)| {
                        serial += 1;
                        (key(*k), v.map(|seed| value(seed, serial)))
                    })
                    .collect();
                let b = batch(&recs, codec, clock, producer);
                let info = log
                    .append(VerifiedBatch::from_bytes(b).unwrap(), 1)
                    .await
                    .unwrap();
                for (i, r) in recs.into_iter().enumerate() {
                    produced.insert(info.base_offset as i64 + i as i64, r);
                }
            }
            Op::Clean {
                advance_ms,
                hw_eighths,
                lagged,
                retention_zero,
                small_map,
                force,
            } => {
                clock += advance_ms as i64;
                log.checkpoint().await.unwrap();
                if small_map {
                    cleaner = LogCleaner::open(
                        &log,
                        CleanerConfig {
                            dedupe_buffer_bytes: 6
                                * spate_engine::clean::OffsetMap::entry_bytes(8)
                                * 8,
                            ..CleanerConfig::default()
                        },
                    );
                }
                let req = CleanRequest {
                    now_ms: clock,
                    max_clean_offset: log.log_end_offset() * u64::from(hw_eighths) / 8,
                    policy: CompactionPolicy {
                        min_compaction_lag_ms: if lagged { 10 * DAY_MS } else { 0 },
                        delete_retention_ms: if retention_zero { 0 } else { DAY_MS },
                        ..CompactionPolicy::default()
                    },
                    force,
                    keep_batches: Default::default(),
                    urgent: false,
                };
                cleaner.clean(&log, &req).await.unwrap();
                check(&log, &produced, cleaner.first_dirty_offset()).await;
            }
            Op::Reopen => {
                log.close().await.unwrap();
                log = PartitionLog::open(dir, config()).await.unwrap();
                cleaner = LogCleaner::open(&log, CleanerConfig::default());
                check(&log, &produced, cleaner.first_dirty_offset()).await;
            }
        }
    }
    check(&log, &produced, cleaner.first_dirty_offset()).await;
    log.close().await.unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn the_cleaner_agrees_with_a_map_of_latest_values(ops in prop::collection::vec(op(), 20..260)) {
        let dir = scratch();
        run(run_ops(dir.path(), ops));
    }
}
