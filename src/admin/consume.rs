//! `spate consume`: fetches records from a topic's partitions and writes them to stdout, one
//! per line, in a `%k %v`-style pattern or as JSON lines.

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use bytes::Bytes;
use clap::Args;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::{ApiKey, BrokerId, FetchRequest};
use kafka_protocol::records::{Record, RecordBatchDecoder};
use serde_json::{json, Map, Value};
use spate_client::batch::BatchView;

use super::client::{check, kafka_error, list_offsets, topic_name, Client, ConnectArgs, LogEnd};
use super::topic::validate_topic_name;

const FETCH_VERSIONS: RangeInclusive<i16> = 4..=12;
/// Longest the broker may hold a fetch waiting for data, in milliseconds.
const FETCH_MAX_WAIT_MS: u64 = 500;
/// Bytes asked of one partition per fetch, to start with.
const PARTITION_FETCH_BYTES: i32 = 1 << 20;
/// Most bytes asked of one partition, reached by doubling when a single batch is larger.
/// Kept under spate-perf's reply frame limit.
const MAX_PARTITION_FETCH_BYTES: i32 = 8 << 20;
/// Most bytes asked for in one fetch over all partitions.
const FETCH_MAX_BYTES: i32 = 8 << 20;
const OFFSET_OUT_OF_RANGE: i16 = 1;

#[derive(Args, Debug)]
pub struct ConsumeArgs {
    /// Topic to read.
    #[arg(short, long)]
    pub topic: String,
    /// Read only this partition [default: every partition].
    #[arg(short, long, value_parser = clap::value_parser!(i32).range(0..))]
    pub partition: Option<i32>,
    /// Start at the earliest offset still in the log [default: only new records].
    #[arg(long, conflicts_with = "offset")]
    pub from_beginning: bool,
    /// Start at this offset (in each partition read).
    #[arg(short, long, value_parser = clap::value_parser!(i64).range(0..))]
    pub offset: Option<i64>,
    /// Stop after this many records.
    #[arg(short = 'n', long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_messages: Option<u64>,
    /// Stop when no record has arrived for this long, in milliseconds.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: Option<u64>,
    /// Stop once every partition read is at its end (its high watermark).
    #[arg(short = 'e', long)]
    pub exit_at_end: bool,
    /// Output per record: `json` (one object per line) or a pattern of %t topic, %p partition,
    /// %o offset, %T timestamp (ms), %k key, %v value, %h headers (k=v,...), %K key bytes,
    /// %S value bytes, %% a percent sign, and \n \t \\ escapes. A newline ends each record.
    #[arg(short, long, default_value = "%v")]
    pub format: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// One piece of a parsed --format pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(Vec<u8>),
    Topic,
    Partition,
    Offset,
    Timestamp,
    Key,
    Value,
    Headers,
    KeyLen,
    ValueLen,
}

/// How records are written.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Format {
    Json,
    Pattern(Vec<Piece>),
}

fn parse_format(text: &str) -> Result<Format> {
    if text == "json" {
        return Ok(Format::Json);
    }
    let mut pieces = Vec::new();
    let mut literal = Vec::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        let piece = match c {
            '%' => match chars.next() {
                Some('t') => Piece::Topic,
                Some('p') => Piece::Partition,
                Some('o') => Piece::Offset,
                Some('T') => Piece::Timestamp,
                Some('k') => Piece::Key,
                Some('v') => Piece::Value,
                Some('h') => Piece::Headers,
                Some('K') => Piece::KeyLen,
                Some('S') => Piece::ValueLen,
                Some('%') => {
                    literal.push(b'%');
                    continue;
                }
                other => bail!(
                    "--format {text:?}: unknown placeholder %{}",
                    other.map(String::from).unwrap_or_default()
                ),
            },
            '\\' => {
                match chars.next() {
                    Some('n') => literal.push(b'\n'),
                    Some('t') => literal.push(b'\t'),
                    Some('\\') => literal.push(b'\\'),
                    other => bail!(
                        "--format {text:?}: unknown escape \\{}",
                        other.map(String::from).unwrap_or_default()
                    ),
                }
                continue;
            }
            c => {
                let mut buf = [0u8; 4];
                literal.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                continue;
            }
        };
        if !literal.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut literal)));
        }
        pieces.push(piece);
    }
    literal.push(b'\n');
    pieces.push(Piece::Text(literal));
    Ok(Format::Pattern(pieces))
}

/// A string when the bytes are UTF-8, else their base64 under `<name>_base64`.
fn put_bytes(obj: &mut Map<String, Value>, name: &str, bytes: Option<&Bytes>) {
    match bytes {
        None => {
            obj.insert(name.into(), Value::Null);
        }
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) => {
                obj.insert(name.into(), Value::String(s.to_string()));
            }
            Err(_) => {
                obj.insert(name.into(), Value::Null);
                obj.insert(
                    format!("{name}_base64"),
                    Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
                );
            }
        },
    }
}

fn write_record(
    out: &mut Vec<u8>,
    format: &Format,
    topic: &str,
    partition: i32,
    r: &Record,
) -> Result<()> {
    let pieces = match format {
        Format::Json => {
            let mut obj = Map::new();
            obj.insert("topic".into(), json!(topic));
            obj.insert("partition".into(), json!(partition));
            obj.insert("offset".into(), json!(r.offset));
            obj.insert("timestamp".into(), json!(r.timestamp));
            put_bytes(&mut obj, "key", r.key.as_ref());
            put_bytes(&mut obj, "value", r.value.as_ref());
            let mut headers = Map::new();
            for (k, v) in &r.headers {
                put_bytes(&mut headers, k.as_str(), v.as_ref());
            }
            obj.insert("headers".into(), Value::Object(headers));
            serde_json::to_writer(&mut *out, &Value::Object(obj))?;
            out.push(b'\n');
            return Ok(());
        }
        Format::Pattern(p) => p,
    };
    for piece in pieces {
        match piece {
            Piece::Text(t) => out.extend_from_slice(t),
            Piece::Topic => out.extend_from_slice(topic.as_bytes()),
            Piece::Partition => write!(out, "{partition}")?,
            Piece::Offset => write!(out, "{}", r.offset)?,
            Piece::Timestamp => write!(out, "{}", r.timestamp)?,
            Piece::Key => out.extend_from_slice(r.key.as_deref().unwrap_or_default()),
            Piece::Value => out.extend_from_slice(r.value.as_deref().unwrap_or_default()),
            Piece::KeyLen => write!(out, "{}", r.key.as_ref().map_or(-1, |k| k.len() as i64))?,
            Piece::ValueLen => write!(out, "{}", r.value.as_ref().map_or(-1, |v| v.len() as i64))?,
            Piece::Headers => {
                for (i, (k, v)) in r.headers.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(k.as_bytes());
                    out.push(b'=');
                    out.extend_from_slice(v.as_deref().unwrap_or_default());
                }
            }
        }
    }
    Ok(())
}

/// Where one partition is read from.
struct Cursor {
    leader: String,
    position: i64,
    max_bytes: i32,
    high_watermark: Option<i64>,
}

pub fn run(a: ConsumeArgs) -> Result<()> {
    validate_topic_name(&a.topic)?;
    let format = parse_format(&a.format)?;
    let mut client = Client::connect(&a.connect)?;
    let meta = client.metadata(Some(std::slice::from_ref(&a.topic)))?;
    let t = meta
        .topics
        .first()
        .context("Metadata reply names no topic")?;
    if t.error_code == 3 {
        bail!("topic {} does not exist", a.topic);
    }
    check(t.error_code, None, format!("looking up topic {}", a.topic))?;
    let addrs = Client::broker_addrs(&meta);
    let mut cursors: BTreeMap<i32, Cursor> = BTreeMap::new();
    for p in &t.partitions {
        if a.partition.is_some_and(|want| want != p.partition_index) {
            continue;
        }
        let leader = addrs
            .get(&p.leader_id.0)
            .with_context(|| format!("{}/{} has no leader", a.topic, p.partition_index))?;
        cursors.insert(
            p.partition_index,
            Cursor {
                leader: leader.clone(),
                position: 0,
                max_bytes: PARTITION_FETCH_BYTES,
                high_watermark: None,
            },
        );
    }
    if cursors.is_empty() {
        bail!(
            "--partition {}: topic {} has partitions 0..{}",
            a.partition.unwrap_or(0),
            a.topic,
            t.partitions.len().saturating_sub(1)
        );
    }
    let mut by_leader: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for (p, c) in &cursors {
        by_leader.entry(c.leader.clone()).or_default().push(*p);
    }
    for (leader, parts) in &by_leader {
        let start = match (a.offset, a.from_beginning) {
            (Some(o), _) => vec![o; parts.len()],
            (None, true) => {
                list_offsets(client.broker(leader)?, &a.topic, parts, LogEnd::Earliest)?
            }
            (None, false) => list_offsets(client.broker(leader)?, &a.topic, parts, LogEnd::Latest)?,
        };
        for (p, o) in parts.iter().zip(start) {
            cursors.get_mut(p).expect("cursor per partition").position = o;
        }
    }

    let stdout = std::io::stdout();
    let mut sink = stdout.lock();
    let mut out = Vec::with_capacity(1 << 16);
    let mut seen = 0u64;
    let idle_limit = a.timeout_ms.map(Duration::from_millis);
    let mut last_record = Instant::now();
    'fetching: loop {
        for (leader, parts) in &by_leader {
            // The broker may hold a fetch this long: keep it well inside the request timeout
            // and the idle limit.
            let max_wait = FETCH_MAX_WAIT_MS.min(a.connect.request_timeout_ms / 2);
            let wait = idle_limit.map_or(max_wait, |limit| {
                let left = limit.saturating_sub(last_record.elapsed());
                (left.as_millis() as u64).min(max_wait)
            });
            let req = FetchRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_max_wait_ms(wait as i32)
                .with_min_bytes(1)
                .with_max_bytes(FETCH_MAX_BYTES)
                .with_isolation_level(0)
                .with_session_id(0)
                .with_session_epoch(-1)
                .with_topics(vec![FetchTopic::default()
                    .with_topic(topic_name(&a.topic))
                    .with_partitions(
                        parts
                            .iter()
                            .map(|p| {
                                let c = &cursors[p];
                                FetchPartition::default()
                                    .with_partition(*p)
                                    .with_current_leader_epoch(-1)
                                    .with_fetch_offset(c.position)
                                    .with_log_start_offset(-1)
                                    .with_partition_max_bytes(c.max_bytes)
                            })
                            .collect(),
                    )]);
            let conn = client.broker(leader)?;
            let version = conn
                .versions
                .pick(ApiKey::Fetch, FETCH_VERSIONS)
                .context("the broker cannot serve Fetch")?;
            let reply = conn
                .call(ApiKey::Fetch, version, &req)
                .with_context(|| format!("fetching from {leader}"))?;
            check(reply.error_code, None, "Fetch")?;
            for topic in &reply.responses {
                for pd in &topic.partitions {
                    let p = pd.partition_index;
                    let Some(cursor) = cursors.get_mut(&p) else {
                        continue;
                    };
                    if pd.error_code == OFFSET_OUT_OF_RANGE {
                        bail!(
                            "offset {} is out of range for {}/{p}: the log holds {}..{}",
                            cursor.position,
                            a.topic,
                            pd.log_start_offset,
                            pd.high_watermark
                        );
                    }
                    if pd.error_code != 0 {
                        return Err(kafka_error(
                            pd.error_code,
                            None,
                            format!("fetching {}/{p}", a.topic),
                        ));
                    }
                    cursor.high_watermark = Some(pd.high_watermark);
                    let Some(records) = pd.records.as_ref() else {
                        continue;
                    };
                    let mut rest = records.clone();
                    let mut whole_batches = 0;
                    while let Some(view) = BatchView::parse(&rest) {
                        whole_batches += 1;
                        let mut batch = rest.split_to(view.total_bytes);
                        let set = RecordBatchDecoder::decode(&mut batch).map_err(|e| {
                            anyhow::anyhow!(
                                "{}/{p}: the batch at offset {} does not decode: {e}",
                                a.topic,
                                view.base_offset
                            )
                        })?;
                        for r in &set.records {
                            if r.control || r.offset < cursor.position {
                                continue;
                            }
                            write_record(&mut out, &format, &a.topic, p, r)?;
                            seen += 1;
                            last_record = Instant::now();
                            cursor.position = r.offset + 1;
                            if a.max_messages.is_some_and(|m| seen >= m) {
                                break 'fetching;
                            }
                        }
                        cursor.position = cursor.position.max(view.next_offset());
                    }
                    if whole_batches == 0 && !records.is_empty() {
                        // One batch is larger than we asked for: ask for more next time.
                        if cursor.max_bytes >= MAX_PARTITION_FETCH_BYTES {
                            bail!(
                                "{}/{p}: the batch at offset {} exceeds {MAX_PARTITION_FETCH_BYTES} bytes",
                                a.topic,
                                cursor.position
                            );
                        }
                        cursor.max_bytes = (cursor.max_bytes * 2).min(MAX_PARTITION_FETCH_BYTES);
                    }
                }
            }
            if !flush(&mut sink, &mut out)? {
                return Ok(());
            }
        }
        if a.exit_at_end
            && cursors
                .values()
                .all(|c| c.high_watermark.is_some_and(|h| c.position >= h))
        {
            break;
        }
        if idle_limit.is_some_and(|limit| last_record.elapsed() >= limit) {
            break;
        }
    }
    flush(&mut sink, &mut out)?;
    eprintln!("Processed {seen} messages.");
    Ok(())
}

/// Writes out what is buffered. False when stdout is closed (e.g. piped into `head`), which
/// ends the command quietly.
fn flush(sink: &mut impl Write, out: &mut Vec<u8>) -> Result<bool> {
    let result = sink.write_all(out).and_then(|()| sink.flush());
    out.clear();
    match result {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(anyhow::Error::new(e).context("writing to stdout")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::indexmap::IndexMap;
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::records::TimestampType;

    fn record(key: Option<&'static [u8]>, value: &'static [u8]) -> Record {
        let mut headers = IndexMap::new();
        headers.insert(
            StrBytes::from_static_str("h"),
            Some(Bytes::from_static(b"1")),
        );
        Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: 42,
            sequence: -1,
            timestamp: 1_700_000_000_000,
            key: key.map(Bytes::from_static),
            value: Some(Bytes::from_static(value)),
            headers,
        }
    }

    fn render(format: &str, r: &Record) -> String {
        let mut out = Vec::new();
        write_record(&mut out, &parse_format(format).unwrap(), "t", 3, r).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn patterns_render_every_placeholder() {
        let r = record(Some(b"k"), b"value");
        assert_eq!(render("%v", &r), "value\n");
        assert_eq!(
            render("%t/%p@%o %T %k=%v [%h] %K %S 100%%", &r),
            "t/3@42 1700000000000 k=value [h=1] 1 5 100%\n"
        );
        assert_eq!(render("%k\\t%v", &record(None, b"x")), "\tx\n");
        assert!(parse_format("%q").is_err());
        assert!(parse_format("\\x").is_err());
    }

    #[test]
    fn json_lines_keep_binary_values() {
        let r = record(None, b"\xff\x00");
        let line = render("json", &r);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["key"], Value::Null);
        assert_eq!(v["value"], Value::Null);
        assert_eq!(v["value_base64"], "/wA=");
        assert_eq!(v["headers"]["h"], "1");
        assert_eq!(v["offset"], 42);
    }
}
