//! The produce path end to end over the wire: multi-partition Produce requests, large (read into
//! a buffer of their own) and small (cut from the shared receive buffer), each batch stored
//! exactly as sent with its offset stamped, a corrupt batch refused for its partition only, and
//! everything read back from disk after a restart (the frame CRCs the log derives from the batch
//! CRCs are checked there). Frames that arrive in pieces, several in one write, or cut off by a
//! peer that goes away are read correctly (the broker reads straight into unfilled buffers).

mod common;

use bytes::Bytes;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use common::{assert_success, record_batch_at, request_frame, spate_cli, Broker, Raw};
use std::io::Write;

const TOPICS: [&str; 2] = ["pa", "pb"];
const PARTITIONS: i32 = 3;
/// Offset and leader epoch (bytes 0..8 and 12..16) are the broker's; the rest is the client's.
const STAMPED: [std::ops::Range<usize>; 2] = [0..8, 12..16];

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

/// One Produce request: for every (topic, partition) the concatenation of its batches.
fn produce(raw: &mut Raw, parts: &[(&str, i32, Vec<u8>)]) -> Vec<(String, i32, i16, i64)> {
    let mut req = ProduceRequest::default();
    req.acks = 1;
    req.timeout_ms = 10_000;
    for (topic, partition, records) in parts {
        let mut pd = PartitionProduceData::default();
        pd.index = *partition;
        pd.records = Some(Bytes::from(records.clone()));
        match req.topic_data.iter_mut().find(|t| &*t.name.0 == *topic) {
            Some(t) => t.partition_data.push(pd),
            None => {
                let mut td = TopicProduceData::default();
                td.name = name(topic);
                td.partition_data = vec![pd];
                req.topic_data.push(td);
            }
        }
    }
    let resp = raw.call(7, &req);
    resp.responses
        .iter()
        .flat_map(|t| {
            t.partition_responses
                .iter()
                .map(|p| (t.name.0.to_string(), p.index, p.error_code, p.base_offset))
        })
        .collect()
}

fn fetch_all(raw: &mut Raw, topic: &str, partition: i32) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let req = common::fetch_request(topic, partition, next_offset(&out));
        let resp = raw.call(11, &req);
        let pd = &resp.responses[0].partitions[0];
        assert_eq!(pd.error_code, 0, "fetch {topic}-{partition}");
        let records = pd.records.clone().unwrap_or_default();
        if records.is_empty() {
            return out;
        }
        out.extend_from_slice(&records);
    }
}

/// Splits concatenated batches.
fn batches(mut records: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while !records.is_empty() {
        let len = i32::from_be_bytes(records[8..12].try_into().unwrap()) as usize + 12;
        out.push(&records[..len]);
        records = &records[len..];
    }
    out
}

fn next_offset(records: &[u8]) -> i64 {
    batches(records).last().map_or(0, |b| {
        let base = i64::from_be_bytes(b[..8].try_into().unwrap());
        base + i32::from_be_bytes(b[23..27].try_into().unwrap()) as i64 + 1
    })
}

/// Each batch read back is the batch sent, with offsets assigned in order from 0.
fn assert_stored(stored: &[u8], sent: &[Vec<u8>], what: &str) {
    let stored = batches(stored);
    assert_eq!(stored.len(), sent.len(), "{what}: batch count");
    let mut offset = 0i64;
    for (i, (got, want)) in stored.iter().zip(sent).enumerate() {
        assert_eq!(got.len(), want.len(), "{what}: batch {i} length");
        assert_eq!(
            i64::from_be_bytes(got[..8].try_into().unwrap()),
            offset,
            "{what}: batch {i} base offset"
        );
        let mut unstamped = got.to_vec();
        for r in STAMPED {
            unstamped[r.clone()].copy_from_slice(&want[r]);
        }
        assert!(unstamped == *want, "{what}: batch {i} bytes");
        let count = i32::from_be_bytes(want[57..61].try_into().unwrap()) as i64;
        offset += count;
    }
}

#[test]
fn multi_partition_produce_large_and_small_frames_and_a_corrupt_batch() {
    let mut broker = Broker::start();
    for topic in TOPICS {
        let out = spate_cli(
            &broker.addr(),
            &[
                "topic",
                "create",
                topic,
                "--partitions",
                &PARTITIONS.to_string(),
            ],
        );
        assert_success("topic create", &out);
    }
    let mut raw = Raw::connect(&broker.addr());
    // What each partition should hold, in order.
    let mut sent: Vec<Vec<Vec<u8>>> = vec![Vec::new(); TOPICS.len() * PARTITIONS as usize];
    let slot = |t: usize, p: i32| t * PARTITIONS as usize + p as usize;

    // Rounds of one request over every partition, two batches each: large batches (a frame of
    // several hundred KiB, read into a buffer of its own) and small ones (a frame of a few
    // hundred bytes, cut from the shared receive buffer), interleaved.
    for (round, count) in [2_000, 3, 5_000, 1, 2].into_iter().enumerate() {
        let mut parts = Vec::new();
        for (t, topic) in TOPICS.iter().enumerate() {
            for p in 0..PARTITIONS {
                let a = record_batch_at(-1, -1, -1, count, 1_000 + round as i64);
                let b = record_batch_at(-1, -1, -1, count + p, 2_000 + round as i64);
                parts.push((*topic, p, [a.clone(), b.clone()].concat()));
                sent[slot(t, p)].extend([a, b]);
            }
        }
        for (topic, partition, code, base) in produce(&mut raw, &parts) {
            assert_eq!(code, 0, "round {round}: {topic}-{partition}");
            let t = TOPICS.iter().position(|x| *x == topic).unwrap();
            let expected: i64 = sent[slot(t, partition)][..sent[slot(t, partition)].len() - 2]
                .iter()
                .map(|b| i32::from_be_bytes(b[57..61].try_into().unwrap()) as i64)
                .sum();
            assert_eq!(
                base, expected,
                "round {round}: {topic}-{partition} base offset"
            );
        }
    }

    // One request where pb-1's second batch has a flipped byte in its records: that partition
    // is refused as a whole (CORRUPT_MESSAGE), the others of the same request are stored.
    for count in [4_000, 2] {
        let mut parts = Vec::new();
        for (t, topic) in TOPICS.iter().enumerate() {
            for p in 0..PARTITIONS {
                let a = record_batch_at(-1, -1, -1, count, 3_000);
                let mut b = record_batch_at(-1, -1, -1, count, 3_001);
                if (*topic, p) == ("pb", 1) {
                    let at = b.len() - 3;
                    b[at] ^= 0x40;
                } else {
                    sent[slot(t, p)].extend([a.clone(), b.clone()]);
                }
                parts.push((*topic, p, [a, b].concat()));
            }
        }
        for (topic, partition, code, _) in produce(&mut raw, &parts) {
            let want = if (topic.as_str(), partition) == ("pb", 1) {
                2
            } else {
                0
            };
            assert_eq!(code, want, "{count} records: {topic}-{partition}");
        }
    }

    // Read back from memory, then from disk after a restart.
    for phase in ["cache", "disk after restart"] {
        for (t, topic) in TOPICS.iter().enumerate() {
            for p in 0..PARTITIONS {
                let stored = fetch_all(&mut raw, topic, p);
                assert_stored(&stored, &sent[slot(t, p)], &format!("{phase}: {topic}-{p}"));
            }
        }
        if phase == "cache" {
            drop(raw);
            assert!(broker.terminate().success());
            broker.spawn();
            raw = Raw::connect(&broker.addr());
        }
    }
}

/// A framed Produce request (v7, acks=1) for one partition, as a client would write it.
fn produce_frame(topic: &str, partition: i32, records: &[u8], correlation_id: i32) -> Vec<u8> {
    let mut req = ProduceRequest::default();
    req.acks = 1;
    req.timeout_ms = 10_000;
    let mut pd = PartitionProduceData::default();
    pd.index = partition;
    pd.records = Some(Bytes::from(records.to_vec()));
    let mut td = TopicProduceData::default();
    td.name = name(topic);
    td.partition_data = vec![pd];
    req.topic_data = vec![td];
    request_frame(7, correlation_id, &req)
}

/// The error code of a Produce v7 response frame (after its correlation id).
fn produce_reply(raw: &mut Raw, correlation_id: i32) -> i16 {
    use kafka_protocol::protocol::Decodable;
    let frame = raw.read_frame().expect("a Produce response");
    assert_eq!(
        i32::from_be_bytes(frame[..4].try_into().unwrap()),
        correlation_id
    );
    let mut body = Bytes::from(frame).slice(4..);
    let resp = ProduceResponse::decode(&mut body, 7).unwrap();
    resp.responses[0].partition_responses[0].error_code
}

#[test]
fn frames_in_pieces_several_per_write_and_cut_off_by_the_peer() {
    let broker = Broker::start();
    let out = spate_cli(&broker.addr(), &["topic", "create", "pieces"]);
    assert_success("topic create", &out);
    let mut sent = Vec::new();
    let mut raw = Raw::connect(&broker.addr());
    raw.stream.set_nodelay(true).unwrap();

    // A large frame (read into a buffer of its own) and a small one, each written in pieces
    // cut at awkward places: inside the length prefix, inside the header, one byte alone.
    for (i, count) in [3_000, 2].into_iter().enumerate() {
        let batch = record_batch_at(-1, -1, -1, count, 10 + i as i64);
        let frame = produce_frame("pieces", 0, &batch, 100 + i as i32);
        let cuts = [
            0,
            1,
            3,
            4,
            9,
            10,
            frame.len() / 3,
            frame.len() / 2,
            frame.len() - 1,
        ];
        for w in cuts.windows(2) {
            raw.stream.write_all(&frame[w[0]..w[1]]).unwrap();
            raw.stream.flush().unwrap();
        }
        raw.stream.write_all(&frame[frame.len() - 1..]).unwrap();
        assert_eq!(
            produce_reply(&mut raw, 100 + i as i32),
            0,
            "frame {i} in pieces"
        );
        sent.push(batch);
    }

    // Several frames, large and small, in one write: each is answered, in order.
    let mut many = Vec::new();
    for (i, count) in [1, 4_000, 3, 2_500].into_iter().enumerate() {
        let batch = record_batch_at(-1, -1, -1, count, 20 + i as i64);
        many.extend(produce_frame("pieces", 0, &batch, 200 + i as i32));
        sent.push(batch);
    }
    raw.stream.write_all(&many).unwrap();
    for i in 0..4 {
        assert_eq!(produce_reply(&mut raw, 200 + i), 0, "pipelined frame {i}");
    }

    // A peer that sends half of a large frame and goes away: its frame is dropped, nothing
    // else is, and the broker keeps serving.
    let cut = produce_frame("pieces", 0, &record_batch_at(-1, -1, -1, 5_000, 30), 300);
    let mut gone = Raw::connect(&broker.addr());
    gone.stream.write_all(&cut[..cut.len() / 2]).unwrap();
    gone.stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half close");
    assert!(
        gone.is_closed(),
        "the broker closes a connection cut mid-frame"
    );
    drop(gone);

    let batch = record_batch_at(-1, -1, -1, 7, 40);
    raw.stream
        .write_all(&produce_frame("pieces", 0, &batch, 400))
        .unwrap();
    assert_eq!(produce_reply(&mut raw, 400), 0, "after the cut-off peer");
    sent.push(batch);
    let stored = fetch_all(&mut raw, "pieces", 0);
    assert_stored(&stored, &sent, "pieces-0");
}
