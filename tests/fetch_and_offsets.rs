//! Fetch and ListOffsets on the wire: long polling woken by a produce, fetches that start
//! inside a batch, out-of-range offsets, and offsets by time.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use common::{record_batch_at, Broker, Raw};

fn name(s: &'static str) -> TopicName {
    TopicName(StrBytes::from_static_str(s))
}

fn create(raw: &mut Raw, topic: &'static str) {
    let mut req = MetadataRequest::default();
    let mut t = metadata_request::MetadataRequestTopic::default();
    t.name = Some(name(topic));
    req.topics = Some(vec![t]);
    req.allow_auto_topic_creation = true;
    assert_eq!(raw.call(9, &req).topics[0].error_code, 0);
}

fn produce(raw: &mut Raw, topic: &'static str, batch: Vec<u8>) -> i64 {
    let mut pd = PartitionProduceData::default();
    pd.records = Some(Bytes::from(batch));
    let mut td = TopicProduceData::default();
    td.name = name(topic);
    td.partition_data = vec![pd];
    let mut req = ProduceRequest::default();
    req.acks = 1;
    req.timeout_ms = 10_000;
    req.topic_data = vec![td];
    let p = raw.call(7, &req).responses[0].partition_responses[0].clone();
    assert_eq!(p.error_code, 0);
    p.base_offset
}

fn fetch(raw: &mut Raw, topic: &'static str, offset: i64, max_wait_ms: i32) -> (i16, Bytes) {
    let mut p = FetchPartition::default();
    p.fetch_offset = offset;
    p.partition_max_bytes = 1 << 20;
    let mut t = FetchTopic::default();
    t.topic = name(topic);
    t.partitions = vec![p];
    let mut req = FetchRequest::default();
    req.replica_id = BrokerId(-1);
    req.max_wait_ms = max_wait_ms;
    req.min_bytes = 1;
    req.max_bytes = 8 << 20;
    req.topics = vec![t];
    let resp = raw.call(11, &req);
    let pd = &resp.responses[0].partitions[0];
    (pd.error_code, pd.records.clone().unwrap_or_default())
}

fn list_offset(raw: &mut Raw, topic: &'static str, timestamp: i64) -> (i16, i64) {
    raw.list_offset(topic, 0, timestamp)
}

fn base_offset_of(records: &Bytes) -> i64 {
    i64::from_be_bytes(records[..8].try_into().unwrap())
}

#[test]
fn long_poll_is_woken_by_a_produce() {
    let broker = Broker::start();
    let mut raw = Raw::connect(&broker.addr());
    create(&mut raw, "lp");
    let addr = broker.addr();
    let waiter = std::thread::spawn(move || {
        let mut raw = Raw::connect(&addr);
        let start = Instant::now();
        let out = fetch(&mut raw, "lp", 0, 25_000);
        (out, start.elapsed())
    });
    produce(&mut raw, "lp", record_batch_at(-1, -1, -1, 3, 1_000));
    let ((code, records), elapsed) = waiter.join().unwrap();
    assert_eq!(code, 0);
    assert!(!records.is_empty(), "the fetch returned the produced batch");
    assert!(
        elapsed < Duration::from_secs(20),
        "woken by the produce, not by max_wait_ms ({elapsed:?})"
    );
}

#[test]
fn fetch_inside_a_batch_out_of_range_and_offsets_by_time() {
    let broker = Broker::start();
    let mut raw = Raw::connect(&broker.addr());
    create(&mut raw, "fo");
    assert_eq!(
        produce(&mut raw, "fo", record_batch_at(-1, -1, -1, 3, 1_000)),
        0
    );
    assert_eq!(
        produce(&mut raw, "fo", record_batch_at(-1, -1, -1, 2, 2_000)),
        3
    );

    let (code, records) = fetch(&mut raw, "fo", 1, 0);
    assert_eq!(code, 0);
    assert_eq!(
        base_offset_of(&records),
        0,
        "whole batch containing offset 1"
    );
    let (code, records) = fetch(&mut raw, "fo", 4, 0);
    assert_eq!(code, 0);
    assert_eq!(base_offset_of(&records), 3);
    let (code, records) = fetch(&mut raw, "fo", 5, 0);
    assert_eq!((code, records.len()), (0, 0), "at the end: nothing yet");
    assert_eq!(fetch(&mut raw, "fo", 9, 0).0, 1, "OFFSET_OUT_OF_RANGE");

    assert_eq!(list_offset(&mut raw, "fo", -2), (0, 0));
    assert_eq!(list_offset(&mut raw, "fo", -1), (0, 5));
    assert_eq!(list_offset(&mut raw, "fo", 1_500), (0, 3));
    assert_eq!(list_offset(&mut raw, "fo", 500), (0, 0));
    assert_eq!(list_offset(&mut raw, "fo", 9_000), (0, -1));
    assert_eq!(list_offset(&mut raw, "nope", -1).0, 3);
}
