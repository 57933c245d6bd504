//! Compacted topics and Kafka's topic configs end to end: real clients (tests/python/
//! compaction.py: confluent-kafka, kcat, kafka-python) against a broker whose cleaner runs
//! every 200 ms, and raw requests for what clients hide (the legacy AlterConfigs'
//! replace-all, KIP-467 record errors beside an unaffected partition).

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use spate_engine::validate::build::{batch, record};

use common::{assert_success, python, record_batch, topic_name, Broker, Raw};

const INVALID_RECORD: i16 = 87;
const INVALID_CONFIG: i16 = 40;
const SOURCE_TOPIC: i8 = 1;
const SOURCE_DEFAULT: i8 = 5;

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

fn create_topic(raw: &mut Raw, topic: &str, partitions: i32, configs: &[(&str, &str)]) -> i16 {
    let mut t = create_topics_request::CreatableTopic::default();
    t.name = topic_name(topic);
    t.num_partitions = partitions;
    t.replication_factor = 1;
    for (k, v) in configs {
        let mut c = create_topics_request::CreatableTopicConfig::default();
        c.name = s(k);
        c.value = Some(s(v));
        t.configs.push(c);
    }
    let mut req = CreateTopicsRequest::default();
    req.topics = vec![t];
    req.timeout_ms = 10_000;
    raw.call(5, &req).topics[0].error_code
}

/// (value, source) of every config of `topic`.
fn describe(raw: &mut Raw, topic: &str) -> BTreeMap<String, (String, i8)> {
    let mut r = describe_configs_request::DescribeConfigsResource::default();
    r.resource_type = 2;
    r.resource_name = s(topic);
    r.configuration_keys = None;
    let mut req = DescribeConfigsRequest::default();
    req.resources = vec![r];
    let resp = raw.call(4, &req);
    assert_eq!(resp.results[0].error_code, 0);
    resp.results[0]
        .configs
        .iter()
        .map(|c| {
            let v = c.value.as_ref().map(|v| v.to_string()).unwrap_or_default();
            (c.name.to_string(), (v, c.config_source))
        })
        .collect()
}

/// Legacy AlterConfigs (v1) of one topic: (error code, message).
fn alter_configs(raw: &mut Raw, topic: &str, configs: &[(&str, &str)]) -> (i16, String) {
    let mut r = alter_configs_request::AlterConfigsResource::default();
    r.resource_type = 2;
    r.resource_name = s(topic);
    for (k, v) in configs {
        let mut c = alter_configs_request::AlterableConfig::default();
        c.name = s(k);
        c.value = Some(s(v));
        r.configs.push(c);
    }
    let mut req = AlterConfigsRequest::default();
    req.resources = vec![r];
    let resp = raw.call(1, &req);
    let r = &resp.responses[0];
    let msg = r.error_message.as_ref().map(|m| m.to_string());
    (r.error_code, msg.unwrap_or_default())
}

/// A batch of `count` keyed records.
fn keyed_batch(count: i32) -> Vec<u8> {
    let mut section = Vec::new();
    for i in 0..count {
        let key = format!("key-{i}");
        section.extend(record(i as i64, 0, Some(key.as_bytes()), Some(b"v"), &[]));
    }
    let mut b = batch(&section, count, count - 1, 0);
    // Stamped now: the default message.timestamp.after.max.ms refuses the far future only.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    b[27..35].copy_from_slice(&now.to_be_bytes());
    b[35..43].copy_from_slice(&now.to_be_bytes());
    spate_engine::validate::build::fix_crc(&mut b);
    b
}

#[test]
fn legacy_alter_configs_replaces_every_override_and_refuses_unimplemented_ones() {
    let broker = Broker::start();
    let mut raw = Raw::connect(&broker.addr());
    let versions = raw.call(3, &ApiVersionsRequest::default());
    let alter = versions
        .api_keys
        .iter()
        .find(|k| k.api_key == 33)
        .expect("AlterConfigs advertised");
    assert_eq!((alter.min_version, alter.max_version), (0, 2));

    let code = create_topic(
        &mut raw,
        "legacy",
        1,
        &[("cleanup.policy", "compact"), ("retention.ms", "1000")],
    );
    assert_eq!(code, 0);
    let d = describe(&mut raw, "legacy");
    assert_eq!(d["cleanup.policy"], ("compact".into(), SOURCE_TOPIC));
    assert_eq!(d["retention.ms"], ("1000".into(), SOURCE_TOPIC));
    assert_eq!(
        d["min.cleanable.dirty.ratio"],
        ("0.5".into(), SOURCE_DEFAULT)
    );
    assert!(
        d.len() >= 35,
        "every Kafka topic config is described: {d:?}"
    );

    assert_eq!(
        alter_configs(&mut raw, "legacy", &[("segment.ms", "60000")]).0,
        0
    );
    let d = describe(&mut raw, "legacy");
    assert_eq!(d["segment.ms"], ("60000".into(), SOURCE_TOPIC));
    assert_eq!(
        d["cleanup.policy"],
        ("delete".into(), SOURCE_DEFAULT),
        "replaced"
    );
    assert_eq!(d["retention.ms"].1, SOURCE_DEFAULT, "replaced");

    let (code, msg) = alter_configs(&mut raw, "legacy", &[("compression.type", "zstd")]);
    assert_eq!(code, INVALID_CONFIG);
    assert!(msg.contains("Spate does not implement"), "{msg}");
    let (code, msg) = alter_configs(&mut raw, "legacy", &[("colour", "blue")]);
    assert_eq!(code, INVALID_CONFIG);
    assert!(msg.contains("unknown"), "{msg}");
    assert_eq!(
        describe(&mut raw, "legacy")["segment.ms"].0,
        "60000",
        "unchanged"
    );

    // Kafka Streams' and Debezium's topic configs are accepted.
    for (topic, configs) in [
        (
            "streams-repartition",
            vec![
                ("cleanup.policy", "delete"),
                ("segment.bytes", "52428800"),
                ("retention.ms", "-1"),
                ("message.timestamp.type", "CreateTime"),
            ],
        ),
        (
            "streams-windowed",
            vec![
                ("cleanup.policy", "compact,delete"),
                ("retention.ms", "172800000"),
                ("message.timestamp.type", "CreateTime"),
            ],
        ),
        (
            "connect-offsets",
            vec![
                ("cleanup.policy", "compact"),
                ("unclean.leader.election.enable", "false"),
            ],
        ),
    ] {
        assert_eq!(create_topic(&mut raw, topic, 1, &configs), 0, "{topic}");
    }
}

#[test]
fn keyless_records_on_a_compacted_topic_are_named_and_other_partitions_unaffected() {
    let broker = Broker::start();
    let mut raw = Raw::connect(&broker.addr());
    assert_eq!(
        create_topic(&mut raw, "kv", 2, &[("cleanup.policy", "compact")]),
        0
    );
    let mut req = ProduceRequest::default();
    req.acks = -1;
    req.timeout_ms = 10_000;
    let mut td = TopicProduceData::default();
    td.name = topic_name("kv");
    for (partition, records) in [(0, record_batch(-1, 0, 0, 3)), (1, keyed_batch(4))] {
        let mut pd = PartitionProduceData::default();
        pd.index = partition;
        pd.records = Some(Bytes::from(records));
        td.partition_data.push(pd);
    }
    req.topic_data = vec![td];
    let resp = raw.call(9, &req);
    let parts = &resp.responses[0].partition_responses;
    let keyless = parts.iter().find(|p| p.index == 0).unwrap();
    assert_eq!(keyless.error_code, INVALID_RECORD);
    let indexes: Vec<i32> = keyless
        .record_errors
        .iter()
        .map(|e| e.batch_index)
        .collect();
    assert_eq!(indexes, vec![0, 1, 2]);
    let message = keyless.record_errors[0]
        .batch_index_error_message
        .as_ref()
        .unwrap()
        .to_string();
    assert!(message.contains("without key"), "{message}");
    assert!(keyless.error_message.is_some());
    let keyed = parts.iter().find(|p| p.index == 1).unwrap();
    assert_eq!((keyed.error_code, keyed.base_offset), (0, 0));
    assert_eq!(raw.list_offset("kv", 0, -1), (0, 0), "nothing stored");
}

#[test]
fn confluent_kafka_kcat_and_kafka_python_on_compacted_topics() {
    let broker = Broker::start_with(&["--cleaner-backoff-ms", "200"]);
    let out = python("compaction.py", &[&broker.addr()]);
    assert_success("compaction.py", &out);
    println!("{}", String::from_utf8_lossy(&out.stdout));
    let metrics = http_get_metrics(broker.metrics_port);
    let runs: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("spate_cleaner_runs_total{") && l.contains("topic=\"compacted\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(runs >= 1.0, "cleaner runs exported:\n{metrics}");
    assert!(
        metrics.contains("spate_cleaner_bytes_reclaimed_total{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("spate_partition_dirty_ratio{"),
        "{metrics}"
    );
}

fn http_get_metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}
