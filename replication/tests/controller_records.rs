//! The metadata log's encoding: every record round-trips, and random, truncated or mutated
//! bytes decode to an error, never a panic, and never to an allocation larger than the input
//! warrants (every count is checked against the bytes left before a list is allocated).

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use spate_replication::codec::DecodeError;
use spate_replication::controller::records::{MAX_METADATA_BATCH_BYTES, MAX_RECORDS_PER_BATCH};
use spate_replication::controller::{
    BrokerRegistration, Endpoint, PartitionState, Record, RecordBatch, ReplicaAssignment,
};

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._-]{1,40}"
}

fn endpoint() -> impl Strategy<Value = Endpoint> {
    ("[a-z0-9.]{1,30}", any::<u16>()).prop_map(|(host, port)| Endpoint { host, port })
}

fn leader() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![Just(None), (0u64..1000).prop_map(Some)]
}

fn partition() -> impl Strategy<Value = PartitionState> {
    (
        proptest::collection::vec((0u64..100, 0u32..64), 0..6),
        proptest::collection::vec(0u64..100, 0..6),
        leader(),
        -1i32..1000,
    )
        .prop_map(|(replicas, isr, leader, leader_epoch)| PartitionState {
            replicas: replicas
                .into_iter()
                .map(|(node, shard)| ReplicaAssignment { node, shard })
                .collect(),
            isr,
            leader,
            leader_epoch,
        })
}

fn record() -> impl Strategy<Value = Record> {
    prop_oneof![
        (
            any::<u64>(),
            any::<u128>(),
            any::<u64>(),
            endpoint(),
            endpoint(),
            any::<u32>()
        )
            .prop_map(|(node, node_uuid, broker_epoch, rpc, kafka, shards)| {
                Record::RegisterBroker(BrokerRegistration {
                    node,
                    node_uuid,
                    broker_epoch,
                    rpc,
                    kafka,
                    shards,
                })
            }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(node, broker_epoch)| Record::FenceBroker { node, broker_epoch }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(node, broker_epoch)| Record::UnfenceBroker { node, broker_epoch }),
        any::<u64>().prop_map(|node| Record::UnregisterBroker { node }),
        (
            name(),
            any::<u128>(),
            proptest::collection::vec((name(), ".{0,30}"), 0..4),
            proptest::collection::vec(partition(), 0..8)
        )
            .prop_map(
                |(name, topic_id, configs, partitions)| Record::CreateTopic {
                    name,
                    topic_id,
                    configs,
                    partitions
                }
            ),
        (name(), proptest::collection::vec(partition(), 0..8))
            .prop_map(|(name, partitions)| Record::CreatePartitions { name, partitions }),
        (
            name(),
            any::<u32>(),
            leader(),
            any::<i32>(),
            proptest::collection::vec(0u64..100, 0..6)
        )
            .prop_map(|(topic, partition, leader, leader_epoch, isr)| {
                Record::PartitionChange {
                    topic,
                    partition,
                    leader,
                    leader_epoch,
                    isr,
                }
            }),
        (name(), name(), proptest::option::of(".{0,50}"))
            .prop_map(|(topic, key, value)| Record::SetTopicConfig { topic, key, value }),
        (any::<u64>(), any::<u64>(), any::<u32>())
            .prop_map(|(node, first, len)| Record::ProducerIdBlock { node, first, len }),
        (name(), any::<u128>()).prop_map(|(name, topic_id)| Record::DeleteTopic { name, topic_id }),
        (any::<u64>(), any::<bool>()).prop_map(|(node, on)| Record::SetDecommission { node, on }),
    ]
}

fn batch() -> impl Strategy<Value = RecordBatch> {
    proptest::collection::vec(record(), 0..12).prop_map(RecordBatch::new)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_batch_round_trips(b in batch()) {
        let bytes = b.encode();
        prop_assert_eq!(RecordBatch::decode(bytes).unwrap(), b);
    }

    #[test]
    fn every_strict_prefix_is_an_error(b in batch(), cut in any::<prop::sample::Index>()) {
        let bytes = b.encode();
        let at = cut.index(bytes.len());
        prop_assert!(RecordBatch::decode(bytes.slice(..at)).is_err());
    }

    #[test]
    fn trailing_bytes_are_an_error(b in batch(), junk in proptest::collection::vec(any::<u8>(), 1..8)) {
        let mut buf = BytesMut::from(&b.encode()[..]);
        buf.put_slice(&junk);
        prop_assert!(RecordBatch::decode(buf.freeze()).is_err());
    }

    #[test]
    fn mutated_bytes_never_panic(
        b in batch(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut raw = b.encode().to_vec();
        for (i, v) in flips {
            let at = i.index(raw.len());
            raw[at] = v;
        }
        let _ = RecordBatch::decode(Bytes::from(raw));
    }

    #[test]
    fn random_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = RecordBatch::decode(Bytes::from(raw));
    }
}

#[test]
fn hostile_counts_are_refused_before_allocating() {
    // A batch claiming the maximum record count with nothing behind it.
    let mut b = BytesMut::new();
    b.put_u8(1);
    b.put_u32(MAX_RECORDS_PER_BATCH as u32);
    assert!(matches!(
        RecordBatch::decode(b.freeze()),
        Err(DecodeError::Truncated { .. })
    ));
    // Above the cap.
    let mut b = BytesMut::new();
    b.put_u8(1);
    b.put_u32(u32::MAX);
    assert!(matches!(
        RecordBatch::decode(b.freeze()),
        Err(DecodeError::TooLong { .. })
    ));
    // A topic creation claiming u32::MAX partitions.
    let mut b = BytesMut::new();
    b.put_u8(1);
    b.put_u32(1);
    b.put_u8(5);
    b.put_u16(1);
    b.put_u8(b't');
    b.put_u128(7);
    b.put_u32(0);
    b.put_u32(u32::MAX);
    assert!(RecordBatch::decode(b.freeze()).is_err());
    // An oversized batch is refused whole.
    let big = Bytes::from(vec![0u8; MAX_METADATA_BATCH_BYTES + 1]);
    assert!(matches!(
        RecordBatch::decode(big),
        Err(DecodeError::TooLong { .. })
    ));
    // An unknown version.
    assert!(matches!(
        RecordBatch::decode(Bytes::from_static(&[9, 0, 0, 0, 0])),
        Err(DecodeError::Version { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn chunked_decisions_decode_to_the_same_records_in_order(
        records in proptest::collection::vec(record(), 0..40),
        target in 1usize..2000,
    ) {
        let chunks = RecordBatch::encode_chunked(records.clone(), target);
        let mut back = Vec::new();
        for c in chunks {
            let b = RecordBatch::decode(c).unwrap();
            prop_assert!(!b.records.is_empty());
            back.extend(b.records);
        }
        prop_assert_eq!(back, records);
    }
}

#[test]
fn the_largest_topic_record_fits_one_batch() {
    use spate_replication::controller::records::{
        MAX_CONFIGS_PER_TOPIC, MAX_CONFIG_KEY_BYTES, MAX_CONFIG_VALUE_BYTES,
        MAX_PARTITIONS_PER_TOPIC, MAX_REPLICAS_PER_PARTITION, MAX_TOPIC_NAME_BYTES,
    };
    let p = PartitionState {
        replicas: (0..MAX_REPLICAS_PER_PARTITION as u64)
            .map(|node| ReplicaAssignment { node, shard: 0 })
            .collect(),
        isr: (0..MAX_REPLICAS_PER_PARTITION as u64).collect(),
        leader: Some(0),
        leader_epoch: 0,
    };
    let rec = Record::CreateTopic {
        name: "t".repeat(MAX_TOPIC_NAME_BYTES),
        topic_id: 1,
        configs: (0..MAX_CONFIGS_PER_TOPIC)
            .map(|i| {
                (
                    format!("{i:0>width$}", width = MAX_CONFIG_KEY_BYTES),
                    "v".repeat(MAX_CONFIG_VALUE_BYTES),
                )
            })
            .collect(),
        partitions: vec![p; MAX_PARTITIONS_PER_TOPIC],
    };
    let chunks = RecordBatch::encode_chunked(vec![rec.clone()], 1);
    assert_eq!(chunks.len(), 1);
    assert!(
        chunks[0].len() <= MAX_METADATA_BATCH_BYTES / 2,
        "{}",
        chunks[0].len()
    );
    assert_eq!(
        RecordBatch::decode(chunks[0].clone()).unwrap().records,
        vec![rec]
    );
}

/// Found by `chunked_decisions_decode_to_the_same_records_in_order`: a record smaller than the
/// count check assumed (8 bytes) made a valid batch decode as truncated.
#[test]
fn the_smallest_records_round_trip() {
    let records = vec![
        Record::CreatePartitions {
            name: "0".into(),
            partitions: Vec::new(),
        };
        3
    ];
    let back = RecordBatch::decode(RecordBatch::new(records.clone()).encode()).unwrap();
    assert_eq!(back.records, records);
}
