//! Which shard owns which partition: decided when the topic is created (least-loaded shard),
//! stored in the metadata file, kept across restarts; a data dir written before placement was
//! stored opens with the old hash placement; fewer `--cores` re-place only the partitions past
//! them, and every record stays readable. Real broker, raw client, the metrics endpoint to see
//! which shard opened each log.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;

use common::{fetch_request, record_batch, topic_name, Broker, Raw};

const METADATA_FILE: &str = "spate-metadata.json";
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);

fn create(raw: &mut Raw, topic: &str, partitions: i32) {
    let req = CreateTopicsRequest::default()
        .with_topics(vec![CreatableTopic::default()
            .with_name(topic_name(topic))
            .with_num_partitions(partitions)
            .with_replication_factor(-1)])
        .with_timeout_ms(10_000);
    let resp = raw.call(7, &req);
    assert_eq!(resp.topics[0].error_code, 0, "{resp:?}");
}

/// Produces one batch of `records` records to each partition of `topic`.
fn produce_each(raw: &mut Raw, topic: &str, partitions: i32, records: i32) {
    let mut td = TopicProduceData::default();
    td.name = topic_name(topic);
    td.partition_data = (0..partitions)
        .map(|p| {
            let mut pd = PartitionProduceData::default();
            pd.index = p;
            pd.records = Some(Bytes::from(record_batch(-1, -1, -1, records)));
            pd
        })
        .collect();
    let mut req = ProduceRequest::default();
    req.acks = -1;
    req.timeout_ms = 10_000;
    req.topic_data = vec![td];
    let resp = raw.call(7, &req);
    for p in &resp.responses[0].partition_responses {
        assert_eq!(p.error_code, 0, "partition {}: {resp:?}", p.index);
    }
}

/// Every partition of `topic` holds `records` records, and a Fetch returns them.
fn assert_readable(raw: &mut Raw, topic: &str, partitions: i32, records: i64) {
    for p in 0..partitions {
        assert_eq!(raw.list_offset(topic, p, -1), (0, records), "partition {p}");
        let resp = raw.call(11, &fetch_request(topic, p, 0));
        let pd = &resp.responses[0].partitions[0];
        assert_eq!(pd.error_code, 0, "partition {p}");
        assert_eq!(pd.high_watermark, records, "partition {p}");
        assert!(
            pd.records.as_ref().is_some_and(|r| !r.is_empty()),
            "partition {p}: no records"
        );
    }
}

/// The metadata file's body (after its checksum line) as JSON.
fn stored(broker: &Broker) -> serde_json::Value {
    let bytes = std::fs::read(broker.data_dir().join(METADATA_FILE)).unwrap();
    let newline = bytes.iter().position(|&b| b == b'\n').unwrap();
    serde_json::from_slice(&bytes[newline + 1..]).unwrap()
}

/// The stored shard of each partition of `topic`.
fn stored_shards(broker: &Broker, topic: &str) -> Vec<u64> {
    stored(broker)["topics"][topic]["shards"]
        .as_array()
        .unwrap_or_else(|| panic!("no stored shards for {topic}"))
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect()
}

/// Rewrites the metadata file as a broker from before placement was stored wrote it: no
/// `shards` in any topic, with a matching checksum line. Done on the text: topic ids are
/// 128-bit numbers, which a JSON value would round through a float.
fn strip_stored_placement(broker: &Broker) {
    let path = broker.data_dir().join(METADATA_FILE);
    let bytes = std::fs::read(&path).unwrap();
    let newline = bytes.iter().position(|&b| b == b'\n').unwrap();
    let mut body = String::from_utf8(bytes[newline + 1..].to_vec()).unwrap();
    let key = ",\"shards\":[";
    let mut stripped = 0;
    while let Some(at) = body.find(key) {
        let end = at + body[at..].find(']').unwrap() + 1;
        body.replace_range(at..end, "");
        stripped += 1;
    }
    assert!(stripped > 0, "no stored placement in {body}");
    let mut file = format!("{:08x}\n", crc32c::crc32c(body.as_bytes())).into_bytes();
    file.extend_from_slice(body.as_bytes());
    std::fs::write(&path, file).unwrap();
}

/// The shard each open partition of `topic` is on, from the `shard` label of its log-end
/// gauge (set by the shard that opened it); polls until `partitions` of them show up.
fn open_on(broker: &Broker, topic: &str, partitions: usize) -> BTreeMap<i32, u64> {
    let deadline = Instant::now() + OPEN_TIMEOUT;
    loop {
        let mut s = TcpStream::connect(("127.0.0.1", broker.metrics_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let mut found = BTreeMap::new();
        for line in text.lines() {
            let Some(labels) = line.strip_prefix("spate_partition_log_end_offset{") else {
                continue;
            };
            let labels = labels.split('}').next().unwrap();
            let label = |name: &str| {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                    .map(|v| v.trim_end_matches('"').to_string())
            };
            if label("topic").as_deref() == Some(topic) {
                let p: i32 = label("partition").unwrap().parse().unwrap();
                found.insert(p, label("shard").unwrap().parse().unwrap());
            }
        }
        if found.len() == partitions {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{topic}: {found:?} open, want {partitions}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn as_map(shards: &[u64]) -> BTreeMap<i32, u64> {
    shards
        .iter()
        .enumerate()
        .map(|(p, &s)| (p as i32, s))
        .collect()
}

/// The shard the placement rule of old brokers gave a partition.
fn old_hash_shard(topic: &str, partition: i32, shards: u64) -> u64 {
    (crc32c::crc32c(topic.as_bytes()) as u64 + partition as u64) % shards
}

#[test]
fn placement_is_stored_and_survives_restart() {
    let mut broker = Broker::start_with(&["--cores", "3"]);
    let mut raw = Raw::connect(&broker.addr());
    create(&mut raw, "first", 4);
    create(&mut raw, "second", 5);
    // Least-loaded shard per partition, lowest index on a tie: even over the shards.
    assert_eq!(stored_shards(&broker, "first"), [0, 1, 2, 0]);
    assert_eq!(stored_shards(&broker, "second"), [1, 2, 0, 1, 2]);
    assert_eq!(open_on(&broker, "first", 4), as_map(&[0, 1, 2, 0]));
    assert_eq!(open_on(&broker, "second", 5), as_map(&[1, 2, 0, 1, 2]));
    produce_each(&mut raw, "first", 4, 3);
    produce_each(&mut raw, "second", 5, 2);
    drop(raw);

    assert!(broker.terminate().success());
    broker.spawn();
    assert_eq!(stored_shards(&broker, "first"), [0, 1, 2, 0]);
    assert_eq!(stored_shards(&broker, "second"), [1, 2, 0, 1, 2]);
    assert_eq!(open_on(&broker, "first", 4), as_map(&[0, 1, 2, 0]));
    assert_eq!(open_on(&broker, "second", 5), as_map(&[1, 2, 0, 1, 2]));
    let mut raw = Raw::connect(&broker.addr());
    assert_readable(&mut raw, "first", 4, 3);
    assert_readable(&mut raw, "second", 5, 2);
}

#[test]
fn a_data_dir_without_stored_placement_opens_with_the_old_hash_placement() {
    let mut broker = Broker::start_with(&["--cores", "3"]);
    let mut raw = Raw::connect(&broker.addr());
    create(&mut raw, "legacy", 6);
    produce_each(&mut raw, "legacy", 6, 4);
    drop(raw);
    assert!(broker.terminate().success());

    strip_stored_placement(&broker);
    assert!(stored(&broker)["topics"]["legacy"].get("shards").is_none());
    broker.spawn();
    let old: Vec<u64> = (0..6).map(|p| old_hash_shard("legacy", p, 3)).collect();
    // Opened where an old broker opened them, and that placement is now stored.
    assert_eq!(open_on(&broker, "legacy", 6), as_map(&old));
    assert_eq!(stored_shards(&broker, "legacy"), old);
    let mut raw = Raw::connect(&broker.addr());
    assert_readable(&mut raw, "legacy", 6, 4);
    // New partitions and topics go to the least-loaded shards from there on.
    create(&mut raw, "fresh", 3);
    let mut loads = [0u64; 3];
    for s in stored_shards(&broker, "legacy") {
        loads[s as usize] += 1;
    }
    for s in stored_shards(&broker, "fresh") {
        let least = (0..3).min_by_key(|&i| (loads[i], i)).unwrap();
        assert_eq!(s, least as u64);
        loads[least] += 1;
    }
}

#[test]
fn fewer_cores_re_place_partitions_and_keep_their_data() {
    let mut broker = Broker::start_with(&["--cores", "4"]);
    let mut raw = Raw::connect(&broker.addr());
    create(&mut raw, "wide", 8);
    assert_eq!(stored_shards(&broker, "wide"), [0, 1, 2, 3, 0, 1, 2, 3]);
    produce_each(&mut raw, "wide", 8, 5);
    drop(raw);
    assert!(broker.terminate().success());

    broker.set_args(&["--cores", "3"]);
    broker.spawn();
    let after = stored_shards(&broker, "wide");
    // Only the partitions of the shard that is gone moved, onto the least-loaded shards.
    for p in [0, 1, 2, 4, 5, 6] {
        assert_eq!(after[p], [0, 1, 2, 3, 0, 1, 2, 3][p], "partition {p} stays");
    }
    assert_eq!((after[3], after[7]), (0, 1), "{after:?}");
    assert_eq!(open_on(&broker, "wide", 8), as_map(&after));
    let mut raw = Raw::connect(&broker.addr());
    assert_readable(&mut raw, "wide", 8, 5);
    produce_each(&mut raw, "wide", 8, 1);
    assert_readable(&mut raw, "wide", 8, 6);
}
