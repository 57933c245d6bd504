//! Producer-state snapshots: a restart after a crash rebuilds the idempotent-producer table from
//! the last snapshot and the log written after it, not from the whole log (the failover time
//! of issue 17 grew with the log because of that replay), and a snapshot that is damaged or no
//! longer describes the log is never trusted: the table is then rebuilt from the log.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::Bytes;
use kafka_protocol::ResponseError;
use spate_replication::partition::{
    Acks, CleanerConfig, FlushPolicy, LogConfig, NoObserver, PartitionReplica, ReplicaConfig,
    TopicPartition, TopicPolicy, VerifiedBatch, PRODUCER_SNAPSHOT_EVERY_BYTES,
};

#[path = "support/batches.rs"]
mod batches;
use batches::{batch_of, run};

/// Records of this many bytes of value, so that a test log reaches tens of MiB in a few hundred
/// batches.
const VALUE_BYTES: usize = 4000;
const RECORDS_PER_BATCH: i32 = 64;

fn log_config() -> LogConfig {
    LogConfig {
        segment_bytes: 8 << 20,
        segment_ms: None,
        index_interval_bytes: 4096,
        max_batch_bytes: 1 << 20,
        retention_bytes: None,
        retention_ms: None,
        flush: FlushPolicy::Always,
    }
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join("state").join("t-0.json")
}

async fn open(dir: &Path) -> Rc<PartitionReplica> {
    let config = ReplicaConfig {
        log: log_config(),
        high_watermark_cap: None,
    };
    Rc::new(
        PartitionReplica::open(
            TopicPartition::new("t", 0),
            dir.join("t-0"),
            Some(state_path(dir)),
            config,
            Box::new(NoObserver),
        )
        .await
        .expect("open"),
    )
}

/// An idempotent producer's batch of RECORDS_PER_BATCH records of VALUE_BYTES from `first_seq`.
fn batch(producer_id: i64, first_seq: i32) -> VerifiedBatch {
    batch_of(producer_id, first_seq, RECORDS_PER_BATCH, |_| {
        Bytes::from(vec![b'a' + (first_seq % 26) as u8; VALUE_BYTES])
    })
}

/// Appends `batches` batches of `producer_id` from sequence `first_seq`, each acknowledged
/// (durable); returns the next sequence.
async fn produce(r: &Rc<PartitionReplica>, producer_id: i64, first_seq: i32, batches: i32) -> i32 {
    let mut seq = first_seq;
    for _ in 0..batches {
        let (o, c) = r.append(vec![batch(producer_id, seq)], Acks::All).await;
        assert_eq!(o.error_code, 0, "append at sequence {seq}");
        c.wait().await.expect("durable");
        seq += RECORDS_PER_BATCH;
    }
    seq
}

/// Batches of about 256 KiB: this many make a log several times the snapshot interval.
const BATCHES: i32 = 400;

#[test]
fn a_restart_after_a_crash_replays_only_the_log_since_the_last_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let r = open(dir.path()).await;
        let next = produce(&r, 7, 0, BATCHES).await;
        let log_bytes = r.size_bytes();
        assert!(
            log_bytes > 3 * PRODUCER_SNAPSHOT_EVERY_BYTES,
            "a log of {log_bytes} bytes"
        );
        r.snapshot_written().await;
        // A crash: no close, no final snapshot.
        drop(r);

        let r = open(dir.path()).await;
        let replayed = r.replayed_at_open();
        assert!(
            replayed <= PRODUCER_SNAPSHOT_EVERY_BYTES,
            "replayed {replayed} bytes of a {log_bytes}-byte log"
        );
        // The table is whole: the last batch is a duplicate at its offset, the next sequence
        // appends, a gap is refused.
        let last = next - RECORDS_PER_BATCH;
        let end = r.log_end_offset() as i64;
        let (o, _) = r.append(vec![batch(7, last)], Acks::None).await;
        assert_eq!(
            (o.error_code, o.base_offset),
            (0, end - RECORDS_PER_BATCH as i64)
        );
        assert_eq!(r.log_end_offset() as i64, end, "not stored twice");
        let (o, _) = r.append(vec![batch(7, next + 1)], Acks::None).await;
        assert_eq!(o.error_code, ResponseError::OutOfOrderSequenceNumber.code());
        let (o, c) = r.append(vec![batch(7, next)], Acks::All).await;
        assert_eq!((o.error_code, o.base_offset), (0, end));
        c.wait().await.unwrap();
        r.close().await.unwrap();
    });
}

#[test]
fn a_damaged_snapshot_is_not_trusted_and_the_log_is_replayed() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let r = open(dir.path()).await;
        let next = produce(&r, 7, 0, BATCHES / 4).await;
        r.snapshot_producers().await.unwrap();
        drop(r);
        let path = state_path(dir.path());
        let mut file = std::fs::read(&path).unwrap();
        let middle = file.len() / 2;
        file[middle] ^= 0x01;
        std::fs::write(&path, &file).unwrap();

        let r = open(dir.path()).await;
        let log_bytes = (BATCHES / 4) as u64 * batch(7, 0).len() as u64;
        assert_eq!(
            r.replayed_at_open(),
            log_bytes,
            "rebuilt from the whole log"
        );
        let end = r.log_end_offset() as i64;
        let (o, _) = r
            .append(vec![batch(7, next - RECORDS_PER_BATCH)], Acks::None)
            .await;
        assert_eq!(
            (o.error_code, o.base_offset),
            (0, end - RECORDS_PER_BATCH as i64)
        );
        let (o, _) = r.append(vec![batch(7, next + 1)], Acks::None).await;
        assert_eq!(o.error_code, ResponseError::OutOfOrderSequenceNumber.code());
        r.close().await.unwrap();
    });
}

/// A snapshot that is intact but describes other batches at the same offsets (a log that was
/// cut and grew back differently, here another partition's file) fails its anchor check.
#[test]
fn a_snapshot_of_other_batches_at_the_same_offsets_is_not_trusted() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    run(async {
        let ra = open(a.path()).await;
        produce(&ra, 7, 0, 8).await;
        ra.close().await.unwrap();
        let rb = open(b.path()).await;
        let next_b = produce(&rb, 8, 0, 8).await;
        let end = rb.log_end_offset() as i64;
        let log_bytes = 8 * batch(8, 0).len() as u64;
        drop(rb);
        std::fs::create_dir_all(state_path(b.path()).parent().unwrap()).unwrap();
        std::fs::copy(state_path(a.path()), state_path(b.path())).unwrap();

        let rb = open(b.path()).await;
        assert_eq!(
            rb.log_end_offset() as i64,
            end,
            "same offsets as the other log"
        );
        assert_eq!(
            rb.replayed_at_open(),
            log_bytes,
            "rebuilt from the whole log"
        );
        let (o, _) = rb
            .append(vec![batch(7, 8 * RECORDS_PER_BATCH)], Acks::None)
            .await;
        assert_eq!(
            o.error_code,
            ResponseError::OutOfOrderSequenceNumber.code(),
            "producer 7 is not this log's"
        );
        let (o, _) = rb
            .append(vec![batch(8, next_b - RECORDS_PER_BATCH)], Acks::None)
            .await;
        assert_eq!(
            (o.error_code, o.base_offset),
            (0, end - RECORDS_PER_BATCH as i64)
        );
        rb.close().await.unwrap();
    });
}

/// A log the broker writes itself (`__consumer_offsets`, through `append_internal`) holds no
/// producer, but a restart after a crash still reads every batch above the last snapshot to
/// rebuild the (empty) table: without snapshots taken as it grows, that was the whole log, read
/// before the broker listened (most of the start-up time after 10 million commits).
#[test]
fn a_log_written_by_the_broker_is_snapshotted_as_it_grows() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let r = open(dir.path()).await;
        for _ in 0..BATCHES {
            r.append_internal(batch(-1, -1)).await.expect("append");
        }
        r.wait_durable(r.log_end_offset()).await.expect("durable");
        let log_bytes = r.size_bytes();
        assert!(
            log_bytes > 3 * PRODUCER_SNAPSHOT_EVERY_BYTES,
            "a log of {log_bytes} bytes"
        );
        r.snapshot_written().await;
        // A crash: no close, no final snapshot.
        drop(r);

        let r = open(dir.path()).await;
        let replayed = r.replayed_at_open();
        assert!(
            replayed <= PRODUCER_SNAPSHOT_EVERY_BYTES,
            "replayed {replayed} bytes of a {log_bytes}-byte log"
        );
        r.close().await.unwrap();
    });
}

/// An idempotent producer's batch from `first_seq` whose records have the keys `keys` and
/// values of `value_bytes`.
fn keyed_batch(
    producer_id: i64,
    first_seq: i32,
    keys: &[String],
    value_bytes: usize,
) -> VerifiedBatch {
    use bytes::BytesMut;
    use kafka_protocol::records::{
        Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };
    let records: Vec<Record> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id,
            producer_epoch: 0,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: first_seq + i as i32,
            timestamp: 1_000 + i as i64,
            key: Some(Bytes::from(k.clone())),
            value: Some(Bytes::from(vec![b'v'; value_bytes])),
            headers: Default::default(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .expect("encode");
    VerifiedBatch::from_bytes(buf.freeze()).expect("a valid batch")
}

/// A compacted log cleaned under its producer snapshots: the batches the snapshots end with
/// are kept whole by the cleaner, so a restart after a crash still trusts the newest snapshot
/// and replays only the log past it (a snapshot whose batch the cleaner had rewritten was
/// distrusted, and the whole cleaned log replayed).
#[test]
fn a_snapshot_survives_the_cleaning_of_the_batch_it_ends_with() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let r = open(dir.path()).await;
        r.set_policy(TopicPolicy {
            compact: true,
            ..TopicPolicy::default()
        });
        // Batches of keys of their own, ~108 MiB (snapshots every 32 MiB, the newest one's
        // batch in a closed, cleanable segment of 8 MiB); then one batch that supersedes a
        // record of every batch before (so cleaning rewrites them all), then 10 MiB more so
        // that batch is in a closed segment too (no snapshot: under 128 MiB in all).
        let batches = 440;
        let mut seq = 0;
        let append_keyed = |seq: i32, keys: Vec<String>, value_bytes: usize| {
            let r = r.clone();
            async move {
                let (o, c) = r
                    .append(vec![keyed_batch(7, seq, &keys, value_bytes)], Acks::All)
                    .await;
                assert_eq!(o.error_code, 0, "append at sequence {seq}");
                c.wait().await.expect("durable");
                seq + keys.len() as i32
            }
        };
        for b in 0..batches {
            let keys: Vec<String> = (0..RECORDS_PER_BATCH).map(|i| format!("{b}-{i}")).collect();
            seq = append_keyed(seq, keys, VALUE_BYTES).await;
        }
        let superseding: Vec<String> = (0..batches).map(|b| format!("{b}-0")).collect();
        seq = append_keyed(seq, superseding, 8).await;
        for b in batches..batches + 40 {
            let keys: Vec<String> = (0..RECORDS_PER_BATCH).map(|i| format!("{b}-{i}")).collect();
            seq = append_keyed(seq, keys, VALUE_BYTES).await;
        }
        r.snapshot_written().await;

        let config = CleanerConfig {
            max_busy_percent: 100,
            ..CleanerConfig::default()
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let stats = r.clean(&config, now).await.unwrap().expect("cleaned");
        assert!(
            stats.segments_rewritten >= 10 && stats.records_removed >= 400,
            "{stats:?}"
        );
        let log_bytes = r.size_bytes();
        assert!(
            log_bytes > 3 * PRODUCER_SNAPSHOT_EVERY_BYTES,
            "a cleaned log of {log_bytes} bytes"
        );
        r.snapshot_written().await;
        // A crash: no close, no final snapshot.
        drop(r);

        let r = open(dir.path()).await;
        let replayed = r.replayed_at_open();
        assert!(
            replayed <= PRODUCER_SNAPSHOT_EVERY_BYTES,
            "replayed {replayed} bytes of a {log_bytes}-byte cleaned log"
        );
        // The producer's table is whole: its last batch is a duplicate, the next appends.
        let end = r.log_end_offset() as i64;
        let keys: Vec<String> = (0..RECORDS_PER_BATCH)
            .map(|i| format!("last-{i}"))
            .collect();
        let last = seq - RECORDS_PER_BATCH;
        let (o, _) = r
            .append(vec![keyed_batch(7, last, &keys, VALUE_BYTES)], Acks::None)
            .await;
        assert_eq!(
            (o.error_code, o.base_offset),
            (0, end - RECORDS_PER_BATCH as i64)
        );
        assert_eq!(r.log_end_offset() as i64, end, "not stored twice");
        let (o, c) = r
            .append(vec![keyed_batch(7, seq, &keys, 8)], Acks::All)
            .await;
        assert_eq!((o.error_code, o.base_offset), (0, end));
        c.wait().await.unwrap();
        r.close().await.unwrap();
    });
}
