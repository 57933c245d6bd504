//! Kafka's internal topic names are the broker's: clients can neither create nor auto-create
//! them; `__consumer_offsets` is the broker's own internal topic.

mod common;

use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{MetadataRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

#[test]
fn reserved_names_are_refused_by_create_and_auto_create() {
    let broker = common::Broker::start();
    for name in ["__consumer_offsets", "__transaction_state"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_spate"))
            .args(["topic", "create", name, "-b", &broker.addr()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "creating {name} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("INVALID_TOPIC"), "{err}");

        let mut raw = common::Raw::connect(&broker.addr());
        let req = MetadataRequest::default()
            .with_topics(Some(vec![MetadataRequestTopic::default()
                .with_name(Some(TopicName(StrBytes::from_static_str(name))))]))
            .with_allow_auto_topic_creation(true);
        let resp = raw.call(9, &req);
        assert_eq!(resp.topics.len(), 1);
        assert_eq!(
            resp.topics[0].error_code,
            ResponseError::InvalidTopicException.code(),
            "auto-create of {name}"
        );
    }
    // Nothing was created.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spate"))
        .args([
            "topic",
            "list",
            "--internal",
            "--json",
            "-b",
            &broker.addr(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(!listed.contains("__transaction_state"), "{listed}");
}

/// `__consumer_offsets` is an ordinary compacted topic created when a group coordinator is
/// first looked for: listed as internal, written by the coordinator only (a client's Produce
/// is refused, as Kafka refuses appends to internal topics), and neither deleted nor grown.
#[test]
fn consumer_offsets_is_an_internal_topic_clients_cannot_write_delete_or_grow() {
    use bytes::Bytes;
    use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
    use kafka_protocol::messages::find_coordinator_request::FindCoordinatorRequest;
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{CreatePartitionsRequest, DeleteTopicsRequest, ProduceRequest};
    let broker = common::Broker::start();
    let mut raw = common::Raw::connect(&broker.addr());
    let found = raw.call(
        2,
        &FindCoordinatorRequest::default().with_key(StrBytes::from_static_str("g")),
    );
    assert_eq!(found.error_code, 0);

    let all = raw.call(9, &MetadataRequest::default().with_topics(None));
    let offsets = all
        .topics
        .iter()
        .find(|t| {
            t.name
                .as_ref()
                .is_some_and(|n| n.as_str() == "__consumer_offsets")
        })
        .expect("__consumer_offsets listed once created");
    assert!(offsets.is_internal);
    assert_eq!(offsets.partitions.len(), 8, "--offsets-topic-partitions");

    let mut pd = PartitionProduceData::default();
    pd.index = 0;
    pd.records = Some(Bytes::from(common::record_batch(-1, -1, -1, 1)));
    let mut td = TopicProduceData::default();
    td.name = common::topic_name("__consumer_offsets");
    td.partition_data = vec![pd];
    let mut req = ProduceRequest::default();
    req.acks = -1;
    req.timeout_ms = 10_000;
    req.topic_data = vec![td];
    let produced = raw.call(7, &req);
    assert_eq!(
        produced.responses[0].partition_responses[0].error_code,
        ResponseError::InvalidTopicException.code()
    );

    let deleted = raw.call(
        4,
        &DeleteTopicsRequest::default()
            .with_topic_names(vec![common::topic_name("__consumer_offsets")])
            .with_timeout_ms(10_000),
    );
    assert_eq!(
        deleted.responses[0].error_code,
        ResponseError::InvalidRequest.code()
    );
    let grown = raw.call(
        1,
        &CreatePartitionsRequest::default()
            .with_topics(vec![CreatePartitionsTopic::default()
                .with_name(common::topic_name("__consumer_offsets"))
                .with_count(16)])
            .with_timeout_ms(10_000),
    );
    assert_eq!(
        grown.results[0].error_code,
        ResponseError::InvalidRequest.code()
    );
    let again = raw.call(9, &MetadataRequest::default().with_topics(None));
    let offsets = again
        .topics
        .iter()
        .find(|t| {
            t.name
                .as_ref()
                .is_some_and(|n| n.as_str() == "__consumer_offsets")
        })
        .unwrap();
    assert_eq!(offsets.partitions.len(), 8);
}
