//! What the partition tests share: an executor to run one on, their log settings, and
//! idempotent producers' batches.

// Each test binary that includes this uses part of it.
#![allow(dead_code)]

use bytes::{Bytes, BytesMut};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use spate_replication::partition::{FlushPolicy, LogConfig, VerifiedBatch};

/// Small segments and batches, nothing retained away: the logs of the partition tests.
pub fn small_log_config(flush: FlushPolicy) -> LogConfig {
    LogConfig {
        segment_bytes: 1 << 20,
        segment_ms: None,
        index_interval_bytes: 1024,
        max_batch_bytes: 64 << 10,
        retention_bytes: None,
        retention_ms: None,
        flush,
    }
}

pub fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("glommio executor")
        .run(f)
}

/// An idempotent producer's batch of `records` records with sequences from `first_seq`.
pub fn batch(producer_id: i64, first_seq: i32, records: i32) -> VerifiedBatch {
    batch_of(producer_id, first_seq, records, |seq| {
        Bytes::from(format!("value {producer_id}/{seq}"))
    })
}

/// [`batch`] with the value of each record made from its sequence by `value`.
pub fn batch_of(
    producer_id: i64,
    first_seq: i32,
    records: i32,
    value: impl Fn(i32) -> Bytes,
) -> VerifiedBatch {
    let records: Vec<Record> = (0..records)
        .map(|i| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id,
            producer_epoch: 0,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: first_seq + i,
            timestamp: 1_000 + i as i64,
            key: None,
            value: Some(value(first_seq + i)),
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
