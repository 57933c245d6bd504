//! Batches whose CRC is right but whose insides are wrong: each is refused with an error and a
//! message, nothing of it is stored, and real consumers (confluent-kafka, kcat) then read the
//! partition to its end within seconds, before and after a restart. Real clients' compressed
//! batches (gzip, snappy, lz4, zstd) are still accepted.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use spate_engine::validate::build::{batch, compress, fix_crc, put_varint, records};

use common::{assert_success, python, record_batch, Broker, Raw};

/// How long a consumer may take to read the partition to its end.
const READ_TO_END_LIMIT: Duration = Duration::from_secs(20);
const INVALID_RECORD: i16 = 87;
const CORRUPT_MESSAGE: i16 = 2;

fn name(topic: &str) -> TopicName {
    TopicName(StrBytes::from_string(topic.to_string()))
}

fn create_topic(raw: &mut Raw, topic: &str) {
    let mut req = MetadataRequest::default();
    let mut t = metadata_request::MetadataRequestTopic::default();
    t.name = Some(name(topic));
    req.topics = Some(vec![t]);
    req.allow_auto_topic_creation = true;
    let resp = raw.call(9, &req);
    assert_eq!(resp.topics[0].error_code, 0);
}

/// Produces one partition's records per entry (topic, partition, records) in one request; the
/// (error code, base offset, error message) of each.
fn produce(raw: &mut Raw, parts: &[(&str, i32, Vec<u8>)]) -> Vec<(i16, i64, String)> {
    let mut req = ProduceRequest::default();
    req.acks = -1;
    req.timeout_ms = 10_000;
    for (topic, partition, records) in parts {
        let mut pd = PartitionProduceData::default();
        pd.index = *partition;
        pd.records = Some(Bytes::from(records.clone()));
        let mut td = TopicProduceData::default();
        td.name = name(topic);
        td.partition_data = vec![pd];
        req.topic_data.push(td);
    }
    let resp = raw.call(9, &req);
    resp.responses
        .iter()
        .flat_map(|t| &t.partition_responses)
        .map(|p| {
            let message = p.error_message.as_ref().map(|m| m.to_string());
            (p.error_code, p.base_offset, message.unwrap_or_default())
        })
        .collect()
}

fn log_end(raw: &mut Raw, topic: &str, partition: i32) -> i64 {
    let (code, offset) = raw.list_offset(topic, partition, -1);
    assert_eq!(code, 0);
    offset
}

/// Every malformed batch of issue 12, each with a correct CRC, and the error class it gets.
fn hostile_batches() -> Vec<(&'static str, Vec<u8>, i16)> {
    let two = records(2, 10);
    let mut huge_record = Vec::new();
    put_varint(&mut huge_record, 1_000_000_000);
    huge_record.extend_from_slice(&[0; 32]);
    let mut control = batch(&two, 2, 1, 0);
    control[22] |= 0x20;
    fix_crc(&mut control);
    let mut trailing = two.clone();
    trailing.extend_from_slice(&[0; 3]);
    vec![
        (
            "count 5 with 2 records",
            batch(&two, 5, 4, 0),
            INVALID_RECORD,
        ),
        (
            "count 2^31-1",
            batch(&two, i32::MAX, i32::MAX - 1, 0),
            INVALID_RECORD,
        ),
        ("count 0", batch(&two, 0, 0, 0), INVALID_RECORD),
        (
            "count 2, lastOffsetDelta 0",
            batch(&two, 2, 0, 0),
            INVALID_RECORD,
        ),
        (
            "record length 10^9",
            batch(&huge_record, 1, 0, 0),
            INVALID_RECORD,
        ),
        (
            "truncated last record",
            batch(&two[..two.len() - 4], 2, 1, 0),
            INVALID_RECORD,
        ),
        ("trailing bytes", batch(&trailing, 2, 1, 0), INVALID_RECORD),
        ("gzip garbage", batch(&[7; 200], 2, 1, 1), CORRUPT_MESSAGE),
        (
            "snappy garbage",
            batch(&[0xff; 200], 2, 1, 2),
            CORRUPT_MESSAGE,
        ),
        ("lz4 garbage", batch(&[7; 200], 2, 1, 3), CORRUPT_MESSAGE),
        ("zstd garbage", batch(&[7; 200], 2, 1, 4), CORRUPT_MESSAGE),
        (
            "zstd of a truncated record",
            batch(&compress(4, &two[..two.len() - 4]), 2, 1, 4),
            INVALID_RECORD,
        ),
        ("codec 7", batch(&two, 2, 1, 7), CORRUPT_MESSAGE),
        ("control batch", control, INVALID_RECORD),
    ]
}

/// confluent-kafka and kcat both read the topic to its end (`values` in order) within the limit.
/// confluent-kafka and kcat each read `topic` to its end within the limit and get `values`,
/// in order, or as a sorted list with `sorted` (consumers order only within a partition).
fn consumers_read_to_end(broker: &Broker, topic: &str, values: &[String], sorted: bool) {
    let lines = |stdout: &[u8]| {
        let mut got: Vec<String> = std::str::from_utf8(stdout)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        if sorted {
            got.sort();
        }
        got
    };
    let start = Instant::now();
    let out = python("consume_all.py", &[&broker.addr(), topic]);
    assert_success("consume_all.py", &out);
    assert_eq!(lines(&out.stdout), values, "confluent-kafka read");
    assert!(
        start.elapsed() < READ_TO_END_LIMIT,
        "confluent-kafka took {:?}",
        start.elapsed()
    );

    let start = Instant::now();
    let out = Command::new("kcat")
        .args(["-b", &broker.addr(), "-C", "-t", topic, "-e", "-f", "%s\n"])
        .output()
        .expect("run kcat");
    assert_success("kcat -C", &out);
    assert_eq!(lines(&out.stdout), values, "kcat read");
    assert!(
        start.elapsed() < READ_TO_END_LIMIT,
        "kcat took {:?}",
        start.elapsed()
    );
}

#[test]
fn hostile_batches_are_refused_and_consumers_read_to_the_end() {
    let mut broker = Broker::start_with(&["--default-partitions", "2"]);
    let mut raw = Raw::connect(&broker.addr());
    create_topic(&mut raw, "hostile");
    assert_eq!(
        produce(&mut raw, &[("hostile", 0, record_batch(-1, -1, -1, 2))])[0].0,
        0
    );
    for (what, bad, code) in hostile_batches() {
        let end = log_end(&mut raw, "hostile", 0);
        let other_end = log_end(&mut raw, "hostile", 1);
        // The bad batch follows a good one in the same partition, and a good batch goes to the
        // other partition of the same request: only the bad partition's share is refused.
        let mut both = record_batch(-1, -1, -1, 1);
        both.extend_from_slice(&bad);
        let out = produce(
            &mut raw,
            &[
                ("hostile", 0, both),
                ("hostile", 1, record_batch(-1, -1, -1, 1)),
            ],
        );
        assert_eq!(out[0].0, code, "{what}: {out:?}");
        assert!(
            out[0].2.contains("batch 1"),
            "{what}: message {:?}",
            out[0].2
        );
        assert_eq!(
            log_end(&mut raw, "hostile", 0),
            end,
            "{what}: nothing stored"
        );
        assert_eq!(out[1].0, 0, "{what}: the other partition");
        assert_eq!(log_end(&mut raw, "hostile", 1), other_end + 1, "{what}");
    }
    assert_eq!(
        produce(&mut raw, &[("hostile", 0, record_batch(-1, -1, -1, 3))])[0].0,
        0
    );
    let ones = vec!["v0".to_string(); hostile_batches().len()];
    let mut values: Vec<String> = ["v0", "v1", "v0", "v1", "v2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // Consumers read partition by partition: partition 0 first (ordered by the script and kcat
    // only within a partition), so compare sorted.
    values.extend(ones);
    values.sort();
    consumers_read_to_end(&broker, "hostile", &values, true);
    drop(raw);
    broker.kill();
    broker.spawn();
    consumers_read_to_end(&broker, "hostile", &values, true);
}

#[test]
fn real_clients_compressed_batches_are_accepted() {
    let mut broker = Broker::start();
    let codecs = ["gzip", "snappy", "lz4", "zstd"];
    let mut args = vec![broker.addr(), "compressed".to_string(), "500".to_string()];
    args.extend(codecs.iter().map(|c| c.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_success(
        "produce_compressed.py",
        &python("produce_compressed.py", &args),
    );
    let values: Vec<String> = codecs
        .iter()
        .flat_map(|c| (0..500).map(move |i| format!("{c}-{i}")))
        .collect();
    consumers_read_to_end(&broker, "compressed", &values, false);
    broker.kill();
    broker.spawn();
    consumers_read_to_end(&broker, "compressed", &values, false);
}

/// Writes `batches` straight into a partition log (no validation: as a broker before this check
/// would have), closes it, and removes its recovery point so the next open scans every batch.
fn write_unvalidated(dir: std::path::PathBuf, batches: Vec<Vec<u8>>) {
    use spate_engine::batch::VerifiedBatch;
    use spate_engine::{LogConfig, PartitionLog};
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor")
        .run(async move {
            let log = PartitionLog::open(&dir, LogConfig::default())
                .await
                .unwrap();
            for b in batches {
                let v = VerifiedBatch::from_bytes(Bytes::from(b)).unwrap();
                log.append(v, 0).await.unwrap();
            }
            log.close().await.unwrap();
            std::fs::remove_file(dir.join(spate_engine::RECOVERY_POINT_FILE)).unwrap();
        });
}

/// A tracing writer into a shared buffer, to read what recovery logged.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn verify_names_bad_batches_and_recovery_warns_about_them() {
    let data = tempfile::tempdir().unwrap();
    let two = records(2, 10);
    write_unvalidated(
        data.path().join("with-dash-3"),
        vec![
            record_batch(-1, -1, -1, 2),
            batch(&two, 5, 4, 0),
            record_batch(-1, -1, -1, 1),
            batch(&[7; 100], 2, 1, 4),
        ],
    );
    write_unvalidated(
        data.path().join("fine-0"),
        vec![record_batch(-1, -1, -1, 3)],
    );
    let listing = |dir: &std::path::Path| {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let m = e.metadata().unwrap();
                (e.file_name(), m.len(), m.modified().unwrap())
            })
            .collect();
        files.sort();
        files
    };
    let before = listing(&data.path().join("with-dash-3"));

    let out = Command::new(env!("CARGO_BIN_EXE_spate"))
        .args(["verify", "--data-dir"])
        .arg(data.path())
        .output()
        .expect("run spate verify");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let bad: Vec<&str> = text.lines().filter(|l| l.starts_with("BAD ")).collect();
    assert_eq!(bad.len(), 2, "{text}");
    assert!(
        bad[0].contains("topic=with-dash partition=3 offset=2 "),
        "{text}"
    );
    assert!(bad[0].contains("record 2 "), "{text}");
    assert!(
        bad[1].contains("topic=with-dash partition=3 offset=8 "),
        "{text}"
    );
    assert!(
        text.contains("2 bad batch(es) in 2 segment(s) of 2 partition(s)"),
        "{text}"
    );
    assert_eq!(
        listing(&data.path().join("with-dash-3")),
        before,
        "read-only"
    );

    // Only the good partition: success.
    let good = tempfile::tempdir().unwrap();
    write_unvalidated(
        good.path().join("fine-0"),
        vec![record_batch(-1, -1, -1, 3)],
    );
    let out = Command::new(env!("CARGO_BIN_EXE_spate"))
        .args(["verify", "--data-dir"])
        .arg(good.path())
        .output()
        .expect("run spate verify");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Recovery scans the batches (no recovery point), keeps them and warns about each bad one.
    let captured = Captured::default();
    let writer = captured.clone();
    let dir = data.path().join("with-dash-3");
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor")
        .run(async move {
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish();
            let _guard = tracing::subscriber::set_default(subscriber);
            let log = spate_engine::PartitionLog::open(&dir, spate_engine::LogConfig::default())
                .await
                .unwrap();
            assert_eq!(log.log_end_offset(), 10, "the bad batches are kept");
            log.close().await.unwrap();
        });
    let logged = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let warnings: Vec<&str> = logged
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("malformed inside"))
        .collect();
    assert_eq!(warnings.len(), 2, "{logged}");
    assert!(warnings[0].contains("offset=2"), "{logged}");
    assert!(warnings[1].contains("offset=8"), "{logged}");
}
