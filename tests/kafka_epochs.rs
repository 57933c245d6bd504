//! Leader epochs on the Kafka port of a single node (the leader of everything in epoch 0):
//! OffsetForLeaderEpoch answers end offsets per epoch (KIP-101), Fetch and ListOffsets fence a
//! client's `current_leader_epoch` (KIP-320), Fetch v12 answers a diverging epoch for a
//! `last_fetched_epoch` that ended before the fetch offset, and a Fetch or OffsetForLeaderEpoch
//! claiming to come from a replica is refused.

mod common;

use bytes::Bytes;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::offset_for_leader_epoch_request::{
    OffsetForLeaderPartition, OffsetForLeaderTopic,
};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;

use common::{record_batch, topic_name, Broker, Raw};

const NONE: i16 = 0;
const OFFSET_OUT_OF_RANGE: i16 = 1;
const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
const TOPIC_AUTHORIZATION_FAILED: i16 = 29;
const FENCED_LEADER_EPOCH: i16 = 74;
const UNKNOWN_LEADER_EPOCH: i16 = 75;

fn create(raw: &mut Raw, topic: &str, partitions: i32) {
    let req = CreateTopicsRequest::default()
        .with_timeout_ms(10_000)
        .with_topics(vec![create_topics_request::CreatableTopic::default()
            .with_name(topic_name(topic))
            .with_num_partitions(partitions)
            .with_replication_factor(-1)]);
    let resp = raw.call(5, &req);
    assert_eq!(resp.topics[0].error_code, NONE, "{:?}", resp.topics[0]);
}

/// Produces `count` records in one batch to partition 0; returns the base offset.
fn produce(raw: &mut Raw, topic: &str, count: i32) -> i64 {
    let req = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(10_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(topic_name(topic))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(0)
                .with_records(Some(Bytes::from(record_batch(-1, -1, -1, count))))])]);
    let p = raw.call(10, &req).responses[0].partition_responses[0].clone();
    assert_eq!(p.error_code, NONE, "{p:?}");
    p.base_offset
}

/// OffsetForLeaderEpoch for one partition: (error, leader epoch, end offset).
fn end_offset(
    raw: &mut Raw,
    version: i16,
    replica_id: i32,
    topic: &str,
    partition: i32,
    current_leader_epoch: i32,
    leader_epoch: i32,
) -> (i16, i32, i64) {
    let req = OffsetForLeaderEpochRequest::default()
        .with_replica_id(BrokerId(replica_id))
        .with_topics(vec![OffsetForLeaderTopic::default()
            .with_topic(topic_name(topic))
            .with_partitions(vec![OffsetForLeaderPartition::default()
                .with_partition(partition)
                .with_current_leader_epoch(current_leader_epoch)
                .with_leader_epoch(leader_epoch)])]);
    let resp = raw.call(version, &req);
    let p = &resp.topics[0].partitions[0];
    assert_eq!(p.partition, partition);
    (p.error_code, p.leader_epoch, p.end_offset)
}

struct Fetched {
    error: i16,
    records: Bytes,
    diverging: (i32, i64),
}

fn fetch(
    raw: &mut Raw,
    version: i16,
    replica_id: i32,
    topic: &str,
    offset: i64,
    current_leader_epoch: i32,
    last_fetched_epoch: i32,
) -> Fetched {
    let req = FetchRequest::default()
        .with_replica_id(BrokerId(replica_id))
        .with_max_wait_ms(0)
        .with_min_bytes(0)
        .with_max_bytes(1 << 20)
        .with_topics(vec![FetchTopic::default()
            .with_topic(topic_name(topic))
            .with_partitions(vec![FetchPartition::default()
                .with_partition(0)
                .with_fetch_offset(offset)
                .with_current_leader_epoch(current_leader_epoch)
                .with_last_fetched_epoch(last_fetched_epoch)
                .with_partition_max_bytes(1 << 20)])]);
    let resp = raw.call(version, &req);
    let p = &resp.responses[0].partitions[0];
    Fetched {
        error: p.error_code,
        records: p.records.clone().unwrap_or_default(),
        diverging: (p.diverging_epoch.epoch, p.diverging_epoch.end_offset),
    }
}

fn list_offset(raw: &mut Raw, topic: &str, current_leader_epoch: i32) -> (i16, i64, i32) {
    let req = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(vec![ListOffsetsTopic::default()
            .with_name(topic_name(topic))
            .with_partitions(vec![ListOffsetsPartition::default()
                .with_partition_index(0)
                .with_current_leader_epoch(current_leader_epoch)
                .with_timestamp(-1)])]);
    let resp = raw.call(7, &req);
    let p = &resp.topics[0].partitions[0];
    (p.error_code, p.offset, p.leader_epoch)
}

#[test]
fn offset_for_leader_epoch_answers_end_offsets_and_fences_epochs() {
    let broker = Broker::start();
    let mut raw = Raw::connect(&broker.addr());
    create(&mut raw, "epochs", 2);

    // Before any record, epoch 0 (the leader's) ends at the log end, 0.
    for v in 2..=4 {
        assert_eq!(
            end_offset(&mut raw, v, -1, "epochs", 0, -1, 0),
            (NONE, 0, 0)
        );
    }
    assert_eq!(produce(&mut raw, "epochs", 3), 0);
    assert_eq!(produce(&mut raw, "epochs", 2), 3);
    for v in 2..=4 {
        // The current epoch ends at the log end.
        assert_eq!(
            end_offset(&mut raw, v, -1, "epochs", 0, -1, 0),
            (NONE, 0, 5),
            "v{v}"
        );
        assert_eq!(end_offset(&mut raw, v, -1, "epochs", 0, 0, 0), (NONE, 0, 5));
        // An epoch the leader never had, above its own: undefined.
        assert_eq!(
            end_offset(&mut raw, v, -1, "epochs", 0, -1, 3),
            (NONE, -1, -1)
        );
        // The client knows a newer epoch than this leader: retry later.
        assert_eq!(
            end_offset(&mut raw, v, -1, "epochs", 0, 1, 0),
            (UNKNOWN_LEADER_EPOCH, -1, -1)
        );
        // Older than the leader's (only a negative one other than -1 is, alone): fenced.
        assert_eq!(
            end_offset(&mut raw, v, -1, "epochs", 0, -5, 0),
            (FENCED_LEADER_EPOCH, -1, -1)
        );
        // The other partition is empty; one that does not exist is unknown.
        assert_eq!(end_offset(&mut raw, v, -1, "epochs", 1, 0, 0), (NONE, 0, 0));
        assert_eq!(
            end_offset(&mut raw, v, -1, "epochs", 2, -1, 0).0,
            UNKNOWN_TOPIC_OR_PARTITION
        );
        assert_eq!(
            end_offset(&mut raw, v, -1, "nope", 0, -1, 0).0,
            UNKNOWN_TOPIC_OR_PARTITION
        );
    }
    // v3+ carries a replica id: a replica has no business on the Kafka port.
    for v in 3..=4 {
        assert_eq!(
            end_offset(&mut raw, v, 2, "epochs", 0, -1, 0),
            (TOPIC_AUTHORIZATION_FAILED, -1, -1)
        );
        // Debugging tools send -2.
        assert_eq!(
            end_offset(&mut raw, v, -2, "epochs", 0, -1, 0),
            (NONE, 0, 5)
        );
    }
}

#[test]
fn fetch_fences_leader_epochs_and_answers_diverging_epochs() {
    let broker = Broker::start();
    let mut raw = Raw::connect(&broker.addr());
    create(&mut raw, "fenced", 1);
    assert_eq!(produce(&mut raw, "fenced", 5), 0);

    for v in [9, 11, 12] {
        for current in [-1, 0] {
            let f = fetch(&mut raw, v, -1, "fenced", 0, current, -1);
            assert_eq!(f.error, NONE, "v{v}");
            assert!(!f.records.is_empty(), "v{v}: the batch is read");
        }
        let f = fetch(&mut raw, v, -1, "fenced", 0, 1, -1);
        assert_eq!(f.error, UNKNOWN_LEADER_EPOCH, "v{v}");
        assert!(f.records.is_empty());
        let f = fetch(&mut raw, v, -1, "fenced", 0, -7, -1);
        assert_eq!(f.error, FENCED_LEADER_EPOCH, "v{v}");
        assert!(f.records.is_empty());
    }
    // Before v9 there is no current_leader_epoch to check.
    assert_eq!(fetch(&mut raw, 8, -1, "fenced", 0, -1, -1).error, NONE);

    // v12: epoch 0 ends at 5 here. A fetcher at 3 in epoch 0 is consistent and gets data.
    let f = fetch(&mut raw, 12, -1, "fenced", 3, 0, 0);
    assert_eq!((f.error, f.diverging), (NONE, (-1, -1)));
    assert!(!f.records.is_empty());
    // A fetcher that holds epoch 0 up to 7 diverged: truncate to 5, no records this time.
    let f = fetch(&mut raw, 12, -1, "fenced", 7, 0, 0);
    assert_eq!((f.error, f.diverging), (NONE, (0, 5)));
    assert!(f.records.is_empty());
    // A fetcher claiming an epoch this leader cannot place: out of range, as Kafka answers.
    let f = fetch(&mut raw, 12, -1, "fenced", 5, 0, 4);
    assert_eq!(f.error, OFFSET_OUT_OF_RANGE);

    // ListOffsets (v4+) fences the same way and names the leader's epoch.
    assert_eq!(list_offset(&mut raw, "fenced", -1), (NONE, 5, 0));
    assert_eq!(list_offset(&mut raw, "fenced", 0), (NONE, 5, 0));
    assert_eq!(list_offset(&mut raw, "fenced", 1).0, UNKNOWN_LEADER_EPOCH);
    assert_eq!(list_offset(&mut raw, "fenced", -3).0, FENCED_LEADER_EPOCH);
}

#[test]
fn a_fetch_claiming_to_be_a_replica_is_refused() {
    let broker = Broker::start();
    let mut raw = Raw::connect(&broker.addr());
    create(&mut raw, "forged", 1);
    assert_eq!(produce(&mut raw, "forged", 4), 0);
    for v in [4, 11, 12] {
        for replica_id in [0, 1, 7] {
            let f = fetch(&mut raw, v, replica_id, "forged", 0, -1, -1);
            assert_eq!(
                f.error, TOPIC_AUTHORIZATION_FAILED,
                "v{v} replica {replica_id}"
            );
            assert!(f.records.is_empty(), "nothing is read for a forged replica");
        }
        // The same connection goes on serving consumers.
        let f = fetch(&mut raw, v, -1, "forged", 0, -1, -1);
        assert_eq!(f.error, NONE);
        assert!(!f.records.is_empty());
    }
}
