//! The Prometheus endpoint against a real broker: counters move by exactly what was produced
//! and fetched (raw batches of known size, then a real client), offsets and group lag match,
//! and the text parses as exposition format (prometheus-parse, plus a strict line check).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use common::{assert_success, python, record_batch, Broker, Raw};

const TOPIC: &str = "metered";
const BATCHES: i32 = 3;
const RECORDS_PER_BATCH: i32 = 10;
const COMMITTED: i64 = 12;
const LOAD_TIMEOUT: Duration = Duration::from_secs(20);

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_owned()))
}

/// GET `path` from the metrics port: (status line, body).
fn http_get(port: u16, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let status = head.lines().next().unwrap().to_string();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .unwrap();
    assert_eq!(len, body.len(), "Content-Length matches the body");
    (status, body.to_string())
}

/// Samples by metric name and labels (without `shard`, summed over shards).
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// Parses with prometheus-parse and checks every line strictly; sums series over shards.
fn scrape(port: u16) -> Samples {
    let (status, body) = http_get(port, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    strict_check(&body);
    let parsed = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("exposition text parses");
    assert!(!parsed.samples.is_empty(), "{body}");
    let mut out = Samples::new();
    for s in parsed.samples {
        let value = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        let labels: BTreeMap<String, String> = s
            .labels
            .iter()
            .filter(|(k, _)| k.as_str() != "shard")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        *out.entry((s.metric, labels)).or_default() += value;
    }
    out
}

/// Every line is a comment (HELP/TYPE/UNIT/EOF) or `name{label="value",...} number`, every
/// sample belongs to a declared family, and the text ends with `# EOF`.
fn strict_check(body: &str) {
    let valid_name = |n: &str| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut families = HashSet::new();
    assert_eq!(body.lines().last(), Some("# EOF"), "{body}");
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            match words.next() {
                Some("TYPE") => {
                    let family = words.next().unwrap();
                    assert!(valid_name(family), "{line}");
                    let kind = words.next().unwrap();
                    assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                    families.insert(family.to_string());
                }
                Some("HELP") | Some("UNIT") => assert!(valid_name(words.next().unwrap())),
                Some("EOF") => {}
                other => panic!("unexpected comment {other:?}: {line}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').unwrap_or_else(|| panic!("{line}"));
                for pair in split_labels(labels) {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("{line}"));
                    assert!(valid_name(k), "{line}");
                    assert!(
                        v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                        "{line}"
                    );
                }
                name
            }
            None => series,
        };
        assert!(valid_name(name), "{line}");
        let family = ["_total", "_bucket", "_count", "_sum", "_created"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| families.contains(*f)))
            .unwrap_or(name);
        assert!(families.contains(family), "no TYPE for {name}: {line}");
    }
}

/// Splits `a="x",b="y"` at commas outside quotes.
fn split_labels(labels: &str) -> Vec<&str> {
    let (mut out, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&labels[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < labels.len() {
        out.push(&labels[start..]);
    }
    out
}

fn get(samples: &Samples, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let key = (
        metric.to_string(),
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    samples.get(&key).copied().unwrap_or(0.0)
}

fn partition_value(samples: &Samples, metric: &str) -> f64 {
    get(samples, metric, &[("topic", TOPIC), ("partition", "0")])
}

fn produce(raw: &mut Raw, batch: Vec<u8>) {
    let mut pd = PartitionProduceData::default();
    pd.records = Some(Bytes::from(batch));
    let mut td = TopicProduceData::default();
    td.name = name(TOPIC);
    td.partition_data = vec![pd];
    let mut req = ProduceRequest::default();
    req.acks = -1;
    req.timeout_ms = 10_000;
    req.topic_data = vec![td];
    let p = raw.call(7, &req).responses[0].partition_responses[0].clone();
    assert_eq!(p.error_code, 0);
}

fn fetch_all(raw: &mut Raw) -> Bytes {
    let mut p = FetchPartition::default();
    p.fetch_offset = 0;
    p.partition_max_bytes = 1 << 20;
    let mut t = FetchTopic::default();
    t.topic = name(TOPIC);
    t.partitions = vec![p];
    let mut req = FetchRequest::default();
    req.replica_id = BrokerId(-1);
    req.max_wait_ms = 0;
    req.min_bytes = 1;
    req.max_bytes = 8 << 20;
    req.topics = vec![t];
    let resp = raw.call(11, &req);
    let pd = &resp.responses[0].partitions[0];
    assert_eq!(pd.error_code, 0);
    pd.records.clone().unwrap_or_default()
}

/// Commits `offset` for partition 0 as a simple (group-less) consumer, retrying while the
/// coordinator loads.
fn commit(raw: &mut Raw, group: &str, offset: i64) {
    let deadline = Instant::now() + LOAD_TIMEOUT;
    loop {
        let req = OffsetCommitRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(group.to_owned())))
            .with_generation_id_or_member_epoch(-1)
            .with_topics(vec![OffsetCommitRequestTopic::default()
                .with_name(name(TOPIC))
                .with_partitions(vec![OffsetCommitRequestPartition::default()
                    .with_partition_index(0)
                    .with_committed_offset(offset)])]);
        let code = raw.call(7, &req).topics[0].partitions[0].error_code;
        if code == 0 {
            return;
        }
        assert_eq!(code, ResponseError::CoordinatorLoadInProgress.code());
        assert!(Instant::now() < deadline, "coordinator never loaded");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn counters_move_by_what_was_produced_and_fetched() {
    let broker = Broker::start();
    let port = broker.metrics_port;
    let before = scrape(port);
    assert!(get(&before, "spate_memory_resident_bytes", &[]) > 0.0);

    let mut raw = Raw::connect(&broker.addr());
    let mut meta = MetadataRequest::default();
    let mut t = metadata_request::MetadataRequestTopic::default();
    t.name = Some(name(TOPIC));
    meta.topics = Some(vec![t]);
    meta.allow_auto_topic_creation = true;
    assert_eq!(raw.call(9, &meta).topics[0].error_code, 0);

    let mut bytes_in = 0usize;
    for _ in 0..BATCHES {
        let batch = record_batch(-1, -1, -1, RECORDS_PER_BATCH);
        bytes_in += batch.len();
        produce(&mut raw, batch);
    }
    let records = (BATCHES * RECORDS_PER_BATCH) as f64;
    let fetched = fetch_all(&mut raw);
    assert_eq!(fetched.len(), bytes_in, "one fetch returns every batch");

    let after = scrape(port);
    let moved = |metric: &str, labels: &[(&str, &str)]| {
        get(&after, metric, labels) - get(&before, metric, labels)
    };
    assert_eq!(
        partition_value(&after, "spate_partition_bytes_in_total"),
        bytes_in as f64
    );
    assert_eq!(
        partition_value(&after, "spate_partition_records_in_total"),
        records
    );
    assert_eq!(
        partition_value(&after, "spate_partition_bytes_out_total"),
        bytes_in as f64
    );
    assert_eq!(
        partition_value(&after, "spate_partition_records_out_total"),
        records
    );
    assert_eq!(
        partition_value(&after, "spate_partition_log_end_offset"),
        records
    );
    assert_eq!(
        partition_value(&after, "spate_partition_high_watermark"),
        records
    );
    let ok_produce = [("api", "Produce"), ("error_code", "0")];
    assert_eq!(moved("spate_requests_total", &ok_produce), BATCHES as f64);
    assert_eq!(
        moved(
            "spate_requests_total",
            &[("api", "Fetch"), ("error_code", "0")]
        ),
        1.0
    );
    assert!(
        moved(
            "spate_requests_total",
            &[("api", "Metadata"), ("error_code", "0")]
        ) >= 1.0
    );
    assert!(get(&after, "spate_connections", &[]) >= 1.0);

    // Histograms: prometheus-parse folds them into one sample; read the counts from the text.
    let (_, text) = http_get(port, "/metrics");
    let count = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}_count{{")))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
            .sum()
    };
    assert_eq!(count("spate_produce_latency_seconds"), BATCHES as f64);
    assert_eq!(count("spate_fetch_latency_seconds"), 1.0);
    // --flush always: every acks=-1 produce waited for a group-commit fdatasync.
    assert!(count("spate_fsync_latency_seconds") >= 1.0, "{text}");

    // A produce to a partition that does not exist is counted under its error code.
    let mut bad = ProduceRequest::default();
    bad.acks = 1;
    bad.timeout_ms = 10_000;
    let mut td = TopicProduceData::default();
    td.name = name(TOPIC);
    let mut pd = PartitionProduceData::default();
    pd.index = 7;
    pd.records = Some(Bytes::from(record_batch(-1, -1, -1, 1)));
    td.partition_data = vec![pd];
    bad.topic_data = vec![td];
    let code = raw.call(7, &bad).responses[0].partition_responses[0].error_code;
    assert_eq!(code, ResponseError::UnknownTopicOrPartition.code());
    let code_text = code.to_string();
    let errors = scrape(port);
    assert_eq!(
        get(
            &errors,
            "spate_requests_total",
            &[("api", "Produce"), ("error_code", &code_text)]
        ),
        1.0
    );

    // Consumer group lag: committed offset against the log end.
    commit(&mut raw, "metrics-group", COMMITTED);
    let lagging = scrape(port);
    let group = [
        ("group", "metrics-group"),
        ("topic", TOPIC),
        ("partition", "0"),
    ];
    assert_eq!(
        get(&lagging, "spate_consumer_group_committed_offset", &group),
        COMMITTED as f64
    );
    assert_eq!(
        get(&lagging, "spate_consumer_group_lag", &group),
        records - COMMITTED as f64
    );

    // A real client reads everything once more: the out counters double.
    let out = python("consume_all.py", &[&broker.addr(), TOPIC]);
    assert_success("consume_all.py", &out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        records as usize
    );
    let consumed = scrape(port);
    assert_eq!(
        partition_value(&consumed, "spate_partition_records_out_total"),
        2.0 * records
    );
    assert_eq!(
        partition_value(&consumed, "spate_partition_bytes_out_total"),
        2.0 * bytes_in as f64
    );
}

#[test]
fn only_get_metrics_is_served() {
    let broker = Broker::start();
    let (status, _) = http_get(broker.metrics_port, "/");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let mut s = TcpStream::connect(("127.0.0.1", broker.metrics_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"DELETE /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 405"), "{reply}");
    // A head that never ends is cut off at the limit, and the endpoint keeps serving.
    let mut s = TcpStream::connect(("127.0.0.1", broker.metrics_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // Exactly the limit: the broker reads all of it, so closing does not reset the reply.
    s.write_all(&[b'a'; 8 * 1024]).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert!(reply.starts_with(b"HTTP/1.1 431"), "{reply:?}");
    let (status, _) = http_get(broker.metrics_port, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
}

#[test]
fn metrics_can_be_turned_off_and_a_taken_port_is_an_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("timeout")
        .args(["20", env!("CARGO_BIN_EXE_spate"), "serve", "--cores", "1"])
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen for metrics"), "{err}");
    drop(taken);

    // `off`: the broker serves Kafka and nothing on the (default) metrics port is needed.
    let broker = Broker::start_with(&["--metrics-listen", "off"]);
    let log = broker.log();
    assert!(!log.contains("metrics listening"), "{log}");
    let banner = log.lines().find(|l| l.contains("starting spate")).unwrap();
    // The text log colours keys; drop the escape sequences before reading the field.
    let plain = common::plain_log(banner);
    assert!(plain.contains("metrics=off"), "{plain}");
}
