//! Consumers never read past the high watermark. The broker runs with its test hook holding
//! every partition's high watermark at 4 while the log grows to 10: the hook advances the high
//! watermark through `PartitionReplica::advance_high_watermark`, the path replication commits
//! by, so this is what a consumer sees while followers lag.

mod common;

use std::process::Command;

use bytes::Bytes;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::ResponseError;

use common::{fetch_request, record_batch, topic_name, Broker, Raw};

const TOPIC: &str = "held";
/// Where the hook holds the high watermark; records are produced well past it.
const CAP: i64 = 4;
const RECORDS: i64 = 10;

fn create(raw: &mut Raw) {
    let mut req = MetadataRequest::default();
    let mut t = metadata_request::MetadataRequestTopic::default();
    t.name = Some(topic_name(TOPIC));
    req.topics = Some(vec![t]);
    req.allow_auto_topic_creation = true;
    assert_eq!(raw.call(9, &req).topics[0].error_code, 0);
}

/// Produces one single-record batch; returns its base offset.
fn produce_one(raw: &mut Raw) -> i64 {
    let mut pd = PartitionProduceData::default();
    pd.records = Some(Bytes::from(record_batch(-1, -1, -1, 1)));
    let mut td = TopicProduceData::default();
    td.name = topic_name(TOPIC);
    td.partition_data = vec![pd];
    let mut req = ProduceRequest::default();
    req.acks = -1;
    req.timeout_ms = 10_000;
    req.topic_data = vec![td];
    let p = raw.call(7, &req).responses[0].partition_responses[0].clone();
    assert_eq!(p.error_code, 0);
    p.base_offset
}

/// A Fetch from `offset`: error code, high watermark, and the base offsets of the batches.
fn fetch(raw: &mut Raw, offset: i64) -> (i16, i64, Vec<i64>) {
    let resp = raw.call(11, &fetch_request(TOPIC, 0, offset));
    let pd = &resp.responses[0].partitions[0];
    let records = pd.records.clone().unwrap_or_default();
    let (mut pos, mut bases) = (0, Vec::new());
    while pos + 12 <= records.len() {
        bases.push(i64::from_be_bytes(
            records[pos..pos + 8].try_into().unwrap(),
        ));
        let len = i32::from_be_bytes(records[pos + 8..pos + 12].try_into().unwrap());
        pos += 12 + len as usize;
    }
    assert_eq!(pos, records.len(), "whole batches only");
    (pd.error_code, pd.high_watermark, bases)
}

#[test]
fn consumers_never_read_past_a_held_high_watermark() {
    // The only test of this binary, so setting the variable races with no other thread; the
    // broker inherits it.
    std::env::set_var("SPATE_TEST_HIGH_WATERMARK_CAP", CAP.to_string());
    let broker = Broker::start();
    let mut raw = Raw::connect(&broker.addr());
    create(&mut raw);
    for want in 0..RECORDS {
        assert_eq!(
            produce_one(&mut raw),
            want,
            "appended past the watermark all the same"
        );
    }

    assert_eq!(
        raw.list_offset(TOPIC, 0, -1),
        (0, CAP),
        "latest is the high watermark"
    );
    assert_eq!(raw.list_offset(TOPIC, 0, -2), (0, 0));

    let (code, hw, bases) = fetch(&mut raw, 0);
    assert_eq!((code, hw), (0, CAP));
    assert_eq!(
        bases,
        (0..CAP).collect::<Vec<_>>(),
        "only the committed batches"
    );
    for offset in [CAP, CAP + 2, RECORDS] {
        let (code, hw, bases) = fetch(&mut raw, offset);
        assert_eq!((code, hw, bases), (0, CAP, vec![]), "fetch from {offset}");
    }
    let (code, _, bases) = fetch(&mut raw, RECORDS + 1);
    assert_eq!(code, ResponseError::OffsetOutOfRange.code());
    assert!(bases.is_empty());

    // A real consumer (librdkafka) reads to the end of the partition and stops at the
    // high watermark.
    let out = Command::new("kcat")
        .args([
            "-b",
            &broker.addr(),
            "-C",
            "-t",
            TOPIC,
            "-p",
            "0",
            "-o",
            "beginning",
        ])
        .args(["-e", "-f", "%o\n"])
        .output()
        .expect("run kcat");
    assert!(
        out.status.success(),
        "kcat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let offsets: Vec<i64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(offsets, (0..CAP).collect::<Vec<_>>());
}
