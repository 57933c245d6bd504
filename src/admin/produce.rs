//! `spate produce`: lines from stdin become records (optionally `KEY<sep>VALUE`), batched per
//! partition into RecordBatch v2 and sent to each partition's leader. A failed batch is reported
//! with its partition and record count, and the command exits non-zero at the end.

use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::ops::RangeInclusive;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use clap::{Args, ValueEnum};
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ApiKey, ProduceRequest};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{Compression, Record, RecordBatchEncoder, RecordEncodeOptions};
use serde_json::json;
use spate_client::wire::{encode_request, Connection};

use super::client::{check, kafka_error, key_value, topic_name, Client, ConnectArgs};
use super::partitioner::partition_for_key;
use super::table::print_json;
use super::topic::validate_topic_name;

const PRODUCE_VERSIONS: RangeInclusive<i16> = 3..=9;
/// Upper bound on --batch-bytes: stays well inside the broker's request frame limit.
pub const MAX_BATCH_BYTES: usize = 16 << 20;
/// Upper bound on --max-line-bytes.
pub const MAX_LINE_BYTES: usize = 16 << 20;
/// Upper bound on --batch-records.
pub const MAX_BATCH_RECORDS: usize = 100_000;
/// Lines the stdin reader may run ahead of the sender.
const LINE_QUEUE_DEPTH: usize = 1024;
/// How long the broker may wait for acks before answering, in milliseconds.
const PRODUCE_TIMEOUT_MS: i32 = 30_000;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CompressionArg {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl From<CompressionArg> for Compression {
    fn from(c: CompressionArg) -> Compression {
        match c {
            CompressionArg::None => Compression::None,
            CompressionArg::Gzip => Compression::Gzip,
            CompressionArg::Snappy => Compression::Snappy,
            CompressionArg::Lz4 => Compression::Lz4,
            CompressionArg::Zstd => Compression::Zstd,
        }
    }
}

#[derive(Args, Debug)]
pub struct ProduceArgs {
    /// Topic to write to (it must exist).
    #[arg(short, long)]
    pub topic: String,
    /// Send every record to this partition [default: by key hash; keyless records round-robin
    /// per batch].
    #[arg(short, long, value_parser = clap::value_parser!(i32).range(0..))]
    pub partition: Option<i32>,
    /// Split each line at the first SEP into key and value; a line without SEP is an error.
    #[arg(short = 'K', long, value_name = "SEP")]
    pub key_separator: Option<String>,
    /// A header added to every record, KEY=VALUE (repeatable).
    #[arg(short = 'H', long = "header", value_name = "KEY=VALUE")]
    pub headers: Vec<String>,
    /// Acknowledgements to wait for: all (-1), 1 (leader) or 0 (none).
    #[arg(long, default_value = "all", value_parser = parse_acks)]
    pub acks: i16,
    /// Compression of each record batch.
    #[arg(long, value_enum, default_value_t = CompressionArg::None)]
    pub compression: CompressionArg,
    /// Most records in one batch.
    #[arg(long, default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_BATCH_RECORDS as u64))]
    pub batch_records: u64,
    /// Most key+value bytes in one batch before it is sent.
    #[arg(long, default_value_t = 1 << 20,
          value_parser = clap::value_parser!(u64).range(1..=MAX_BATCH_BYTES as u64))]
    pub batch_bytes: u64,
    /// How long to wait for more input before sending what is buffered, in milliseconds.
    #[arg(long, default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub linger_ms: u64,
    /// Longest input line accepted, in bytes.
    #[arg(long, default_value_t = 1 << 20,
          value_parser = clap::value_parser!(u64).range(1..=MAX_LINE_BYTES as u64))]
    pub max_line_bytes: u64,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print a JSON summary on stdout instead of a line on stderr.
    #[arg(long)]
    pub json: bool,
}

fn parse_acks(s: &str) -> std::result::Result<i16, String> {
    match s {
        "all" | "-1" => Ok(-1),
        "0" => Ok(0),
        "1" => Ok(1),
        _ => Err(format!("{s:?} is not one of all, -1, 0, 1")),
    }
}

/// A parsed input line.
struct Line {
    number: u64,
    key: Option<Bytes>,
    value: Bytes,
}

/// Splits a line into key and value at the first `sep`.
fn split_line(number: u64, line: Vec<u8>, sep: Option<&[u8]>) -> Result<Line> {
    let line = Bytes::from(line);
    let Some(sep) = sep else {
        return Ok(Line {
            number,
            key: None,
            value: line,
        });
    };
    let Some(at) = line.windows(sep.len()).position(|w| w == sep) else {
        bail!(
            "line {number} has no key separator {:?}",
            String::from_utf8_lossy(sep)
        );
    };
    Ok(Line {
        number,
        key: Some(line.slice(..at)),
        value: line.slice(at + sep.len()..),
    })
}

/// Reads newline-separated lines, each at most `max_bytes`, on its own thread so that the
/// sender can flush buffered records while stdin is quiet.
fn spawn_reader(max_bytes: u64) -> Receiver<Result<Vec<u8>>> {
    let (tx, rx) = sync_channel(LINE_QUEUE_DEPTH);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut input = stdin.lock();
        let mut number = 0u64;
        loop {
            number += 1;
            let mut line = Vec::new();
            // One byte over the limit tells a too-long line from one that fits exactly.
            let read = (&mut input)
                .take(max_bytes + 2)
                .read_until(b'\n', &mut line);
            let item = match read {
                Ok(0) => return,
                Ok(_) => {
                    if line.last() == Some(&b'\n') {
                        line.pop();
                    }
                    if line.len() as u64 > max_bytes {
                        Err(anyhow::anyhow!(
                            "line {number} is longer than --max-line-bytes ({max_bytes})"
                        ))
                    } else {
                        Ok(line)
                    }
                }
                Err(e) => Err(anyhow::Error::new(e).context("reading stdin")),
            };
            let stop = item.is_err();
            if tx.send(item).is_err() || stop {
                return;
            }
        }
    });
    rx
}

/// Records waiting to be sent to one partition.
#[derive(Default)]
struct Pending {
    records: Vec<Record>,
    bytes: u64,
    first_line: u64,
}

/// What happened to the records of one partition.
#[derive(Default, serde::Serialize)]
struct PartitionTally {
    records: u64,
    failed: u64,
    first_offset: Option<i64>,
    last_offset: Option<i64>,
}

struct Producer {
    topic: String,
    acks: i16,
    compression: Compression,
    headers: IndexMap<StrBytes, Option<Bytes>>,
    /// Partition → leader HOST:PORT.
    leaders: BTreeMap<i32, String>,
    pending: BTreeMap<i32, Pending>,
    tally: BTreeMap<i32, PartitionTally>,
    batches: u64,
}

pub fn run(a: ProduceArgs) -> Result<()> {
    validate_topic_name(&a.topic)?;
    let mut headers = IndexMap::new();
    for h in &a.headers {
        let (k, v) = key_value("--header", h)?;
        headers.insert(StrBytes::from_string(k), Some(Bytes::from(v)));
    }
    if a.key_separator.as_deref() == Some("") {
        bail!("--key-separator must not be empty");
    }
    let mut client = Client::connect(&a.connect)?;
    let meta = client.metadata(Some(std::slice::from_ref(&a.topic)))?;
    let t = meta
        .topics
        .first()
        .context("Metadata reply names no topic")?;
    if t.error_code == 3 {
        bail!(
            "topic {} does not exist (create it with `spate topic create {}`)",
            a.topic,
            a.topic
        );
    }
    check(t.error_code, None, format!("looking up topic {}", a.topic))?;
    let addrs = Client::broker_addrs(&meta);
    let mut leaders = BTreeMap::new();
    for p in &t.partitions {
        check(
            p.error_code,
            None,
            format!("partition {}/{}", a.topic, p.partition_index),
        )?;
        let addr = addrs
            .get(&p.leader_id.0)
            .with_context(|| format!("{}/{} has no leader", a.topic, p.partition_index))?;
        leaders.insert(p.partition_index, addr.clone());
    }
    let partitions = leaders.len() as i32;
    if partitions == 0 {
        bail!("topic {} has no partitions", a.topic);
    }
    if let Some(p) = a.partition {
        if !leaders.contains_key(&p) {
            bail!(
                "--partition {p}: topic {} has partitions 0..{}",
                a.topic,
                partitions - 1
            );
        }
    }
    let mut producer = Producer {
        topic: a.topic.clone(),
        acks: a.acks,
        compression: a.compression.into(),
        headers,
        leaders,
        pending: BTreeMap::new(),
        tally: BTreeMap::new(),
        batches: 0,
    };
    let lines = spawn_reader(a.max_line_bytes);
    let linger = Duration::from_millis(a.linger_ms);
    let sep = a.key_separator.as_ref().map(|s| s.as_bytes());
    let mut round_robin = 0i32;
    let mut number = 0u64;
    let mut input_error = None;
    loop {
        let item = if producer.pending.is_empty() {
            lines.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            lines.recv_timeout(linger)
        };
        let raw = match item {
            Ok(Ok(raw)) => raw,
            Ok(Err(e)) => {
                input_error = Some(e);
                break;
            }
            Err(RecvTimeoutError::Timeout) => {
                producer.flush(&mut client)?;
                round_robin = (round_robin + 1) % partitions;
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        number += 1;
        let line = match split_line(number, raw, sep) {
            Ok(l) => l,
            Err(e) => {
                input_error = Some(e);
                break;
            }
        };
        let partition = match (a.partition, &line.key) {
            (Some(p), _) => p,
            (None, Some(k)) => partition_for_key(k, partitions),
            (None, None) => round_robin,
        };
        let full = producer.add(partition, line);
        if full.records >= a.batch_records || full.bytes >= a.batch_bytes {
            producer.flush(&mut client)?;
            round_robin = (round_robin + 1) % partitions;
        }
    }
    producer.flush(&mut client)?;
    producer.report(a.json);
    if let Some(e) = input_error {
        return Err(e.context("stopped reading input; the records before it were sent"));
    }
    let failed: u64 = producer.tally.values().map(|t| t.failed).sum();
    if failed > 0 {
        let total: u64 = producer.tally.values().map(|t| t.records).sum();
        bail!("{failed} of {total} records were not written");
    }
    Ok(())
}

/// Size of what `add` returned, to decide whether to send.
struct Fill {
    records: u64,
    bytes: u64,
}

impl Producer {
    fn add(&mut self, partition: i32, line: Line) -> Fill {
        let pending = self.pending.entry(partition).or_default();
        if pending.records.is_empty() {
            pending.first_line = line.number;
        }
        let i = pending.records.len();
        pending.bytes += (line.value.len() + line.key.as_ref().map_or(0, |k| k.len())) as u64;
        pending.records.push(spate_client::batch::plain_record(
            i,
            now_ms(),
            line.key,
            line.value,
            self.headers.clone(),
        ));
        Fill {
            records: pending.records.len() as u64,
            bytes: pending.bytes,
        }
    }

    /// Sends every pending batch: one produce request per leader.
    fn flush(&mut self, client: &mut Client) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        let mut by_leader: BTreeMap<String, Vec<(i32, Pending)>> = BTreeMap::new();
        for (partition, p) in pending {
            let leader = self.leaders[&partition].clone();
            by_leader.entry(leader).or_default().push((partition, p));
        }
        for (leader, batches) in by_leader {
            let conn = client.broker(&leader)?;
            self.send(conn, batches)
                .with_context(|| format!("producing to {leader}"))?;
        }
        Ok(())
    }

    fn send(&mut self, conn: &mut Connection, batches: Vec<(i32, Pending)>) -> Result<()> {
        let version = conn
            .versions
            .pick(ApiKey::Produce, PRODUCE_VERSIONS)
            .context("the broker cannot serve Produce")?;
        let mut data = Vec::with_capacity(batches.len());
        for (partition, p) in &batches {
            let mut buf = BytesMut::new();
            RecordBatchEncoder::encode(
                &mut buf,
                &p.records,
                &RecordEncodeOptions {
                    version: 2,
                    compression: self.compression,
                },
            )
            .context("encoding a record batch")?;
            data.push(
                PartitionProduceData::default()
                    .with_index(*partition)
                    .with_records(Some(buf.freeze())),
            );
        }
        let req = ProduceRequest::default()
            .with_acks(self.acks)
            .with_timeout_ms(PRODUCE_TIMEOUT_MS)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(topic_name(&self.topic))
                .with_partition_data(data)]);
        self.batches += batches.len() as u64;
        if self.acks == 0 {
            // No reply comes for acks=0: write the request and count the records as sent.
            let mut frame = BytesMut::new();
            let id = conn.next_correlation_id();
            encode_request(&mut frame, ApiKey::Produce, version, id, &req)?;
            conn.writer.write_frame(&frame)?;
            for (partition, p) in &batches {
                self.tally.entry(*partition).or_default().records += p.records.len() as u64;
            }
            return Ok(());
        }
        let reply = conn.call(ApiKey::Produce, version, &req)?;
        let mut results: BTreeMap<i32, (i16, Option<String>, i64)> = BTreeMap::new();
        for t in &reply.responses {
            for p in &t.partition_responses {
                results.insert(
                    p.index,
                    (
                        p.error_code,
                        p.error_message.as_ref().map(|m| m.to_string()),
                        p.base_offset,
                    ),
                );
            }
        }
        for (partition, p) in &batches {
            let n = p.records.len() as u64;
            let tally = self.tally.entry(*partition).or_default();
            tally.records += n;
            match results.get(partition) {
                Some((0, _, base)) => {
                    tally.first_offset.get_or_insert(*base);
                    tally.last_offset = Some(base + n as i64 - 1);
                }
                Some((code, message, _)) => {
                    tally.failed += n;
                    let e = kafka_error(
                        *code,
                        message.as_deref(),
                        format!(
                            "batch of {n} records (input lines {}..={}) to {}/{partition}",
                            p.first_line,
                            p.first_line + n - 1,
                            self.topic
                        ),
                    );
                    eprintln!("spate: {e}");
                }
                None => {
                    tally.failed += n;
                    eprintln!(
                        "spate: the produce reply says nothing of {}/{partition}: {n} records \
                         may not be written",
                        self.topic
                    );
                }
            }
        }
        Ok(())
    }

    fn report(&self, json: bool) {
        let records: u64 = self.tally.values().map(|t| t.records).sum();
        let failed: u64 = self.tally.values().map(|t| t.failed).sum();
        if json {
            print_json(&json!({
                "topic": self.topic,
                "records": records,
                "failed": failed,
                "batches": self.batches,
                "partitions": self.tally.iter().map(|(p, t)| (p.to_string(), json!(t)))
                    .collect::<serde_json::Map<_, _>>(),
            }));
        } else {
            eprintln!(
                "Produced {} records to {} in {} batches{}.",
                records - failed,
                self.topic,
                self.batches,
                if failed > 0 {
                    format!(" ({failed} failed)")
                } else {
                    String::new()
                }
            );
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_at_the_first_separator() {
        let l = split_line(1, b"k1::v::x".to_vec(), Some(b"::")).unwrap();
        assert_eq!(l.key.as_deref(), Some(&b"k1"[..]));
        assert_eq!(&l.value[..], b"v::x");
        let l = split_line(2, b":v".to_vec(), Some(b":")).unwrap();
        assert_eq!(l.key.as_deref(), Some(&b""[..]));
        let e = split_line(3, b"novalue".to_vec(), Some(b":"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("line 3"), "{e}");
        let l = split_line(4, b"a:b".to_vec(), None).unwrap();
        assert!(l.key.is_none());
        assert_eq!(&l.value[..], b"a:b");
    }

    #[test]
    fn acks_accept_kafka_spellings() {
        assert_eq!(parse_acks("all"), Ok(-1));
        assert_eq!(parse_acks("1"), Ok(1));
        assert!(parse_acks("2").is_err());
    }
}
