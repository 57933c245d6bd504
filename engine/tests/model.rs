//! Model-based property test: random sequences of appends, reads, truncations, retention,
//! syncs, close/reopen and crashes (a synced log abandoned without close, its executor ended,
//! reopened in a fresh one), checked against an in-memory model of the log after every step.

mod common;

use bytes::Bytes;
use common::*;
use proptest::prelude::*;
use spate_engine::batch::BatchHeader;
use spate_engine::batch::VerifiedBatch;
use spate_engine::{set_shard_cache_bytes, FlushPolicy, LogConfig, PartitionLog};

#[derive(Clone, Debug)]
enum Op {
    Append {
        len: usize,
        records: i32,
        ts: i64,
    },
    BumpEpoch,
    Read {
        at: f64,
        max_bytes: usize,
    },
    Truncate {
        at: f64,
        inside: bool,
    },
    Retention {
        now: i64,
    },
    Sync,
    Reopen {
        cache_bytes: usize,
    },
    /// Abandon the log; with `synced` false, unacknowledged batches may or may not survive.
    Crash {
        synced: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (1usize..12_000, 1i32..6, 0i64..1000)
            .prop_map(|(len, records, ts)| Op::Append { len, records, ts }),
        1 => Just(Op::BumpEpoch),
        4 => (0.0f64..1.0, 1usize..40_000).prop_map(|(at, max_bytes)| Op::Read { at, max_bytes }),
        1 => (0.0f64..1.0, any::<bool>()).prop_map(|(at, inside)| Op::Truncate { at, inside }),
        1 => (0i64..3000).prop_map(|now| Op::Retention { now }),
        1 => Just(Op::Sync),
        1 => prop_oneof![Just(0usize), Just(20_000), Just(1 << 24)]
            .prop_map(|cache_bytes| Op::Reopen { cache_bytes }),
        1 => any::<bool>().prop_map(|synced| Op::Crash { synced }),
    ]
}

struct Model {
    /// (base offset, last offset, epoch, stamped batch)
    batches: Vec<(u64, u64, i32, Bytes)>,
    log_start: u64,
    log_end: u64,
    epoch: i32,
    /// Set by a crash without sync: the durable offset then, below which nothing may be lost.
    crash_floor: Option<u64>,
}

impl Model {
    fn end_offset_for_epoch(&self, epoch: i32) -> Option<(i32, u64)> {
        let mut starts: Vec<(i32, u64)> = Vec::new();
        for (base, _, e, _) in &self.batches {
            if starts.last().is_none_or(|(le, _)| e > le) {
                starts.push((*e, *base));
            }
        }
        let i = starts.partition_point(|(e, _)| *e <= epoch);
        if i == 0 {
            return None;
        }
        Some((
            starts[i - 1].0,
            starts.get(i).map(|s| s.1).unwrap_or(self.log_end),
        ))
    }

    fn offset_at(&self, at: f64) -> u64 {
        self.log_start + ((self.log_end - self.log_start) as f64 * at) as u64
    }

    fn expected_read(&self, offset: u64, max_bytes: usize) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut total = 0;
        for (_, last, _, b) in &self.batches {
            if *last < offset {
                continue;
            }
            if !out.is_empty() && total + b.len() > max_bytes {
                break;
            }
            total += b.len();
            out.push(b.clone());
        }
        out
    }
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 64 << 10,
        segment_ms: None,
        index_interval_bytes: 2048,
        max_batch_bytes: 16 << 10,
        retention_bytes: Some(100 << 10),
        retention_ms: Some(1000),
        flush: FlushPolicy::Always,
    }
}

fn check_ops(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Model {
        batches: Vec::new(),
        log_start: 0,
        log_end: 0,
        epoch: 0,
        crash_floor: None,
    };
    let mut ops = ops.into_iter().enumerate();
    // One executor run per crash: the background work of the abandoned log dies with it.
    let mut crashes = 0;
    while !run(run_until_crash(dir.path(), &mut m, &mut ops, crashes)) {
        crashes += 1;
    }
}

/// Runs ops until a crash (returns false) or the end (returns true, after the final checks).
async fn run_until_crash(
    dir: &std::path::Path,
    m: &mut Model,
    ops: &mut impl Iterator<Item = (usize, Op)>,
    crashes: usize,
) -> bool {
    {
        set_shard_cache_bytes(20_000);
        let mut log = PartitionLog::open(dir, config()).await.unwrap();
        if let Some(floor) = m.crash_floor.take() {
            // Recovery keeps a prefix of the batches, with at least every acknowledged one.
            let end = log.log_end_offset();
            assert!(
                floor <= end && end <= m.log_end,
                "{floor} <= {end} <= {}",
                m.log_end
            );
            assert!(end == m.log_start || m.batches.iter().any(|b| b.1 + 1 == end));
            m.batches.retain(|b| b.1 < end);
            m.log_end = end;
            let all = log.read(m.log_start, usize::MAX).await.unwrap();
            let want: Vec<Bytes> = m.batches.iter().map(|b| b.3.clone()).collect();
            assert!(all.batches == want, "contents after crash {crashes}");
        }
        if crashes > 0 {
            assert_eq!(log.durable_offset(), m.log_end, "after a crash");
        }
        for (step, op) in ops.by_ref() {
            match op {
                Op::Append { len, records, ts } => {
                    let b = batch(step as u64, len, records, ts);
                    let info = log
                        .append(VerifiedBatch::from_bytes(b.clone()).unwrap(), m.epoch)
                        .await
                        .unwrap();
                    assert_eq!(info.base_offset, m.log_end);
                    assert_eq!(info.last_offset, m.log_end + records as u64 - 1);
                    m.batches.push((
                        info.base_offset,
                        info.last_offset,
                        m.epoch,
                        stamped(&b, info.base_offset, m.epoch),
                    ));
                    m.log_end = info.last_offset + 1;
                }
                Op::BumpEpoch => m.epoch += 1,
                Op::Read { at, max_bytes } => {
                    let offset = m.offset_at(at);
                    let r = log.read(offset, max_bytes).await.unwrap();
                    let want = m.expected_read(offset, max_bytes);
                    assert!(
                        r.batches == want,
                        "step {step}: read({offset}, {max_bytes})"
                    );
                    assert_eq!(r.log_end_offset, m.log_end);
                }
                Op::Truncate { at, inside } => {
                    let mut offset = m.offset_at(at);
                    if !inside {
                        // Snap to a batch boundary at or after the offset.
                        offset = m
                            .batches
                            .iter()
                            .map(|b| b.0)
                            .find(|b| *b >= offset)
                            .unwrap_or(m.log_end);
                    }
                    log.truncate_to(offset).await.unwrap();
                    m.batches.retain(|b| b.1 < offset);
                    m.log_end = m.batches.last().map(|b| b.1 + 1).unwrap_or(m.log_start);
                    assert!(log.durable_offset() <= m.log_end);
                }
                Op::Retention { now } => {
                    let start = log.apply_retention(now).await.unwrap();
                    assert!(start >= m.log_start && start <= m.log_end);
                    assert!(
                        start == m.log_end || m.batches.iter().any(|b| b.0 == start),
                        "step {step}: new log start {start} is a batch boundary"
                    );
                    m.batches.retain(|b| b.0 >= start);
                    m.log_start = start;
                }
                Op::Sync => {
                    log.sync_to(m.log_end).await.unwrap();
                    assert_eq!(log.durable_offset(), m.log_end);
                }
                Op::Reopen { cache_bytes } => {
                    log.close().await.unwrap();
                    set_shard_cache_bytes(cache_bytes);
                    log = PartitionLog::open(dir, config()).await.unwrap();
                    assert_eq!(log.durable_offset(), m.log_end);
                }
                Op::Crash { synced } => {
                    // The log is abandoned mid-flight, background work and all.
                    if synced {
                        log.sync_to(m.log_end).await.unwrap();
                        assert_eq!(log.durable_offset(), m.log_end);
                    } else {
                        m.crash_floor = Some(log.durable_offset());
                    }
                    return false;
                }
            }
            assert_eq!(log.log_start_offset(), m.log_start, "step {step}");
            assert_eq!(log.log_end_offset(), m.log_end, "step {step}");
            for e in 0..=m.epoch + 1 {
                assert_eq!(
                    log.end_offset_for_epoch(e),
                    m.end_offset_for_epoch(e),
                    "step {step}: epoch {e}"
                );
            }
        }
        let all = log.read(m.log_start, usize::MAX).await.unwrap();
        let want: Vec<Bytes> = m.batches.iter().map(|b| b.3.clone()).collect();
        assert!(all.batches == want, "final contents");
        for b in &all.batches {
            BatchHeader::parse(b).unwrap().verify_crc().unwrap();
        }
        log.close().await.unwrap();
        set_shard_cache_bytes(spate_engine::DEFAULT_SHARD_CACHE_BYTES);
    }
    true
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        check_ops(ops);
    }
}
