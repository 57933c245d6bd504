//! Kafka's internal topic names are the broker's: clients can neither create nor auto-create
//! them, and the broker's own `__consumer_offsets` log never shows up as a user topic.

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
