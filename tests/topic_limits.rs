//! Topic names that collide once `.` and `_` are treated alike, the per-shard partition limit,
//! and ApiVersions advertising only what the handlers serve: real broker, raw client, the
//! confluent-kafka AdminClient and the `spate` CLI.

mod common;

use common::{spate_cli, Broker, Raw};
use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

const INVALID_TOPIC_EXCEPTION: i16 = 17;
const INVALID_PARTITIONS: i16 = 37;
const UNSUPPORTED_VERSION: i16 = 35;
const INVALID_REQUEST: i16 = 42;

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

/// CreateTopics v7 for one topic; returns (error code, error message).
fn create(raw: &mut Raw, topic: &str, partitions: i32, validate_only: bool) -> (i16, String) {
    let req = CreateTopicsRequest::default()
        .with_topics(vec![CreatableTopic::default()
            .with_name(name(topic))
            .with_num_partitions(partitions)
            .with_replication_factor(-1)])
        .with_timeout_ms(10_000)
        .with_validate_only(validate_only);
    let resp = raw.call(7, &req);
    let t = &resp.topics[0];
    (
        t.error_code,
        t.error_message.as_deref().unwrap_or("").to_string(),
    )
}

fn create_partitions(raw: &mut Raw, topic: &str, count: i32) -> (i16, String) {
    let req = CreatePartitionsRequest::default()
        .with_topics(vec![CreatePartitionsTopic::default()
            .with_name(name(topic))
            .with_count(count)])
        .with_timeout_ms(10_000);
    let resp = raw.call(3, &req);
    let r = &resp.results[0];
    (
        r.error_code,
        r.error_message.as_deref().unwrap_or("").to_string(),
    )
}

/// Every topic the broker lists, with its partition count.
fn topics(raw: &mut Raw) -> Vec<(String, usize)> {
    let resp = raw.call(12, &MetadataRequest::default().with_topics(None));
    let mut out: Vec<(String, usize)> = resp
        .topics
        .iter()
        .map(|t| {
            (
                t.name.as_ref().map(|n| n.0.to_string()).unwrap_or_default(),
                t.partitions.len(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn names_colliding_on_dot_and_underscore_are_refused() {
    let broker = Broker::start();
    let mut raw = Raw::connect(&broker.addr());
    for (first, second) in [("foo.bar", "foo_bar"), ("baz_qux", "baz.qux")] {
        assert_eq!(create(&mut raw, first, 1, false), (0, String::new()));
        let expected = format!("Topic '{second}' collides with existing topic: {first}");
        // validate_only answers what the create would.
        assert_eq!(
            create(&mut raw, second, 1, true),
            (INVALID_TOPIC_EXCEPTION, expected.clone())
        );
        assert_eq!(
            create(&mut raw, second, 1, false),
            (INVALID_TOPIC_EXCEPTION, expected)
        );
    }
    let names: Vec<String> = topics(&mut raw).into_iter().map(|t| t.0).collect();
    assert_eq!(names, ["baz_qux", "foo.bar"]);

    // The CLI shows the broker's message.
    let out = spate_cli(&broker.addr(), &["topic", "create", "foo_bar"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("collides with existing topic: foo.bar"),
        "{stderr}"
    );

    // The confluent-kafka AdminClient gets code 17 and the message.
    let script = r#"
import sys
from confluent_kafka.admin import AdminClient, NewTopic
a = AdminClient({"bootstrap.servers": sys.argv[1]})
for n in ("py.t", "py_t"):
    try:
        a.create_topics([NewTopic(n, 1)], request_timeout=15)[n].result(timeout=20)
        print(n, "created")
    except Exception as e:
        err = e.args[0]
        print(n, err.code(), err.str())
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, &broker.addr()])
        .output()
        .expect("run python3");
    common::assert_success("AdminClient create_topics", &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("py.t created"), "{stdout}");
    assert!(
        stdout.contains("py_t 17 Topic 'py_t' collides with existing topic: py.t"),
        "{stdout}"
    );
}

#[test]
fn partitions_beyond_the_per_shard_limit_are_refused_whole() {
    // Two shards of at most 5 partitions each.
    let broker = Broker::start_with(&["--max-partitions-per-shard", "5"]);
    let mut raw = Raw::connect(&broker.addr());
    let limit_message = |m: &str| {
        assert!(
            m.contains("limit of 5 partition replicas per shard")
                && m.contains("--max-partitions-per-shard"),
            "{m}"
        );
    };

    let (code, msg) = create(&mut raw, "big", 11, false);
    assert_eq!(code, INVALID_PARTITIONS, "{msg}");
    limit_message(&msg);
    assert_eq!(create(&mut raw, "big", 11, true).0, INVALID_PARTITIONS);
    assert!(topics(&mut raw).is_empty(), "nothing created");

    // Three a shard, then growing past five on one shard is refused and changes nothing.
    assert_eq!(create(&mut raw, "a", 6, false).0, 0);
    let (code, msg) = create_partitions(&mut raw, "a", 11);
    assert_eq!(code, INVALID_PARTITIONS, "{msg}");
    limit_message(&msg);
    assert_eq!(topics(&mut raw), [("a".to_string(), 6)]);

    // Up to the limit is fine; then even one more partition anywhere is refused.
    assert_eq!(create_partitions(&mut raw, "a", 10).0, 0);
    assert_eq!(topics(&mut raw), [("a".to_string(), 10)]);
    let (code, msg) = create(&mut raw, "b", 1, false);
    assert_eq!(code, INVALID_PARTITIONS, "{msg}");
    limit_message(&msg);
    let out = spate_cli(&broker.addr(), &["topic", "create", "c"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--max-partitions-per-shard"), "{stderr}");
    assert_eq!(topics(&mut raw), [("a".to_string(), 10)]);
}

/// Sends `req` at `version` and checks the answer: a response that decodes, on a connection
/// that stays open, with no UNSUPPORTED_VERSION anywhere in it.
fn probe<Req>(addr: &str, version: i16, req: &Req)
where
    Req: kafka_protocol::protocol::Request,
    Req::Response: std::fmt::Debug,
{
    let mut raw = Raw::connect(addr);
    let framed = common::request_frame(version, 9, req);
    raw.send_raw(&framed).unwrap();
    let frame = raw
        .read_frame()
        .unwrap_or_else(|| panic!("{:?} v{version}: connection closed", Req::KEY));
    let mut frame = bytes::Bytes::from(frame);
    let rhv = <Req::Response as kafka_protocol::protocol::HeaderVersion>::header_version(version);
    let header =
        <ResponseHeader as kafka_protocol::protocol::Decodable>::decode(&mut frame, rhv).unwrap();
    assert_eq!(header.correlation_id, 9);
    let resp = <Req::Response as kafka_protocol::protocol::Decodable>::decode(&mut frame, version)
        .unwrap_or_else(|e| panic!("{:?} v{version}: bad response: {e}", Req::KEY));
    let text = format!("{resp:?}");
    assert!(
        !text.contains(&format!("error_code: {UNSUPPORTED_VERSION}")),
        "{:?} v{version} is advertised but refused: {text}",
        Req::KEY
    );
}

#[test]
fn every_advertised_version_is_served() {
    let broker = Broker::start();
    let addr = broker.addr();
    let mut raw = Raw::connect(&addr);
    assert_eq!(create(&mut raw, "probe", 1, false).0, 0);
    let versions = raw.call(3, &ApiVersionsRequest::default());
    assert_eq!(versions.error_code, 0);
    assert!(versions.api_keys.len() >= 20);

    let topic = || name("probe");
    let batch = bytes::Bytes::from(common::record_batch(-1, -1, -1, 2));
    for api in &versions.api_keys {
        let key = ApiKey::try_from(api.api_key).expect("a known api key");
        for v in [api.min_version, api.max_version] {
            match key {
                ApiKey::Produce => {
                    use produce_request::{PartitionProduceData, TopicProduceData};
                    let req = ProduceRequest::default()
                        .with_acks(-1)
                        .with_timeout_ms(10_000)
                        .with_topic_data(vec![TopicProduceData::default()
                            .with_name(topic())
                            .with_partition_data(vec![PartitionProduceData::default()
                                .with_index(0)
                                .with_records(Some(batch.clone()))])]);
                    probe(&addr, v, &req);
                }
                ApiKey::Fetch => {
                    use fetch_request::{FetchPartition, FetchTopic};
                    let req = FetchRequest::default()
                        .with_replica_id(BrokerId(-1))
                        .with_max_bytes(1 << 20)
                        .with_topics(vec![FetchTopic::default()
                            .with_topic(topic())
                            .with_partitions(vec![FetchPartition::default()
                                .with_partition(0)
                                .with_partition_max_bytes(1 << 20)])]);
                    probe(&addr, v, &req);
                }
                ApiKey::ListOffsets => {
                    use list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
                    let req = ListOffsetsRequest::default()
                        .with_replica_id(BrokerId(-1))
                        .with_topics(vec![ListOffsetsTopic::default()
                            .with_name(topic())
                            .with_partitions(vec![ListOffsetsPartition::default()
                                .with_partition_index(0)
                                .with_timestamp(-1)])]);
                    probe(&addr, v, &req);
                }
                ApiKey::OffsetForLeaderEpoch => {
                    use offset_for_leader_epoch_request::{
                        OffsetForLeaderPartition, OffsetForLeaderTopic,
                    };
                    let req = OffsetForLeaderEpochRequest::default()
                        .with_replica_id(BrokerId(-1))
                        .with_topics(vec![OffsetForLeaderTopic::default()
                            .with_topic(topic())
                            .with_partitions(vec![OffsetForLeaderPartition::default()
                                .with_partition(0)
                                .with_current_leader_epoch(-1)
                                .with_leader_epoch(0)])]);
                    probe(&addr, v, &req);
                }
                ApiKey::Metadata => probe(
                    &addr,
                    v,
                    &MetadataRequest::default().with_topics(Some(vec![
                        metadata_request::MetadataRequestTopic::default().with_name(Some(topic())),
                    ])),
                ),
                ApiKey::ApiVersions => {
                    let req = ApiVersionsRequest::default()
                        .with_client_software_name(StrBytes::from_static_str("probe"))
                        .with_client_software_version(StrBytes::from_static_str("1"));
                    probe(&addr, v, &req)
                }
                ApiKey::CreateTopics => probe(&addr, v, &CreateTopicsRequest::default()),
                ApiKey::DeleteTopics => probe(&addr, v, &DeleteTopicsRequest::default()),
                ApiKey::InitProducerId => probe(&addr, v, &InitProducerIdRequest::default()),
                ApiKey::DescribeConfigs => probe(&addr, v, &DescribeConfigsRequest::default()),
                ApiKey::IncrementalAlterConfigs => {
                    probe(&addr, v, &IncrementalAlterConfigsRequest::default())
                }
                ApiKey::AlterConfigs => probe(&addr, v, &AlterConfigsRequest::default()),
                ApiKey::CreatePartitions => probe(&addr, v, &CreatePartitionsRequest::default()),
                ApiKey::DescribeCluster => probe(&addr, v, &DescribeClusterRequest::default()),
                ApiKey::DescribeQuorum => probe(&addr, v, &DescribeQuorumRequest::default()),
                ApiKey::FindCoordinator => {
                    let g = StrBytes::from_static_str("g");
                    let req = if v >= 4 {
                        FindCoordinatorRequest::default().with_coordinator_keys(vec![g])
                    } else {
                        FindCoordinatorRequest::default().with_key(g)
                    };
                    probe(&addr, v, &req)
                }
                ApiKey::JoinGroup => probe(&addr, v, &JoinGroupRequest::default()),
                ApiKey::SyncGroup => probe(&addr, v, &SyncGroupRequest::default()),
                ApiKey::Heartbeat => probe(&addr, v, &HeartbeatRequest::default()),
                ApiKey::LeaveGroup => probe(&addr, v, &LeaveGroupRequest::default()),
                ApiKey::OffsetCommit => probe(&addr, v, &OffsetCommitRequest::default()),
                ApiKey::OffsetFetch => probe(&addr, v, &OffsetFetchRequest::default()),
                ApiKey::DescribeGroups => probe(&addr, v, &DescribeGroupsRequest::default()),
                ApiKey::ListGroups => probe(&addr, v, &ListGroupsRequest::default()),
                ApiKey::DeleteGroups => probe(&addr, v, &DeleteGroupsRequest::default()),
                ApiKey::OffsetDelete => probe(&addr, v, &OffsetDeleteRequest::default()),
                ApiKey::UnregisterBroker => probe(
                    &addr,
                    v,
                    &UnregisterBrokerRequest::default().with_broker_id(BrokerId(1)),
                ),
                ApiKey::ElectLeaders => probe(&addr, v, &ElectLeadersRequest::default()),
                ApiKey::AlterPartitionReassignments => {
                    probe(&addr, v, &AlterPartitionReassignmentsRequest::default())
                }
                ApiKey::ListPartitionReassignments => {
                    probe(&addr, v, &ListPartitionReassignmentsRequest::default())
                }
                ApiKey::DescribeLogDirs => probe(&addr, v, &DescribeLogDirsRequest::default()),
                other => panic!("{other:?} is advertised: add a probe for it"),
            }
        }
    }
    // A single node has no cluster to unregister from, and says so.
    let r = raw.call(
        0,
        &UnregisterBrokerRequest::default().with_broker_id(BrokerId(0)),
    );
    assert_eq!(r.error_code, INVALID_REQUEST, "{r:?}");
    let message = r.error_message.map(|m| m.to_string()).unwrap_or_default();
    assert!(message.contains("not a cluster"), "{message}");
}
