//! Micro-benchmarks of the per-request hot paths that do not touch the disk: decoding a produce
//! request, CRC-32C of batch payloads, checking and stamping a batch, and encoding reply frames.
//! Run: `cargo bench --bench codec`. Inputs are built with spate-perf, the load generator, so
//! they are the bytes a real benchmark sends.

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{
    ApiKey, FetchResponse, ProduceRequest, ProduceResponse, RequestHeader, ResponseHeader,
    TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use kafka_protocol::records::Compression;
use spate_client::batch::{encode_batch, record_values, ProduceTemplate};
use spate_engine::batch::{stamp, BatchHeader, CRC_COVERED_START};
use spate_engine::frame::FrameHeader;

/// Produce versions real clients use: v7 (older librdkafka) and v9 (first flexible version).
const PRODUCE_VERSIONS: [i16; 2] = [7, 9];
const FETCH_VERSION: i16 = 12;

fn batch(records: usize, size: usize) -> Bytes {
    encode_batch(&record_values(records, size, 1), Compression::None, 0).expect("batch")
}

/// A produce request frame (length prefix stripped) with one batch for one partition.
fn produce_frame(records: usize, size: usize, version: i16) -> Bytes {
    let t = ProduceTemplate::build("bench", &[0], &batch(records, size), 0, 1, 30_000, version)
        .expect("template");
    t.frame.freeze().split_off(4)
}

fn request_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("request_decode");
    for version in PRODUCE_VERSIONS {
        for (records, size) in [(1000, 100), (1000, 1024), (64, 16 * 1024)] {
            let frame = produce_frame(records, size, version);
            g.throughput(Throughput::Bytes(frame.len() as u64));
            let id = format!("produce_v{version}/{records}x{size}B");
            g.bench_with_input(BenchmarkId::from_parameter(id), &frame, |b, frame| {
                b.iter(|| {
                    // Bytes clones share the buffer: records stay zero-copy slices, as in net/.
                    let mut buf = frame.clone();
                    let header =
                        RequestHeader::decode(&mut buf, ProduceRequest::header_version(version))
                            .expect("header");
                    let req =
                        ProduceRequest::decode(&mut buf, header.request_api_version).expect("body");
                    black_box(req)
                })
            });
        }
    }
    g.finish();
}

fn crc32c(c: &mut Criterion) {
    let mut g = c.benchmark_group("crc32c");
    for len in [1024usize, 16 * 1024, 1 << 20] {
        let data = vec![0xA5u8; len];
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::from_parameter(len), &data, |b, d| {
            b.iter(|| crc32c::crc32c(black_box(d)))
        });
    }
    g.finish();
}

/// What the leader does to every incoming batch before it is appended: parse the header, verify
/// the producer's CRC-32C, stamp offset and leader epoch.
fn batch_check_and_stamp(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch_check_and_stamp");
    for (records, size) in [(1000, 100), (1000, 1024)] {
        let mut bytes = batch(records, size).to_vec();
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        let id = format!("{records}x{size}B");
        g.bench_function(BenchmarkId::from_parameter(id), |b| {
            let mut offset = 0i64;
            b.iter(|| {
                let header = BatchHeader::parse(&bytes).expect("valid");
                header.verify_crc().expect("crc");
                let n = header.records_count() as i64;
                stamp(&mut bytes, offset, 0);
                offset += n;
            })
        });
    }
    g.finish();
}

/// The on-disk frame header of an appended batch: its CRC computed over the whole payload, or
/// derived from the batch CRC the produce path already verified (what the log does).
fn frame_header_crc(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_header_crc");
    for (records, size) in [(1000, 100), (61, 16 * 1024)] {
        let mut bytes = batch(records, size).to_vec();
        stamp(&mut bytes, 1_000, 0);
        let tail_crc = BatchHeader::parse(&bytes).expect("valid").crc();
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        let id = format!("{records}x{size}B");
        g.bench_function(BenchmarkId::new("full", &id), |b| {
            b.iter(|| FrameHeader::encode(1_000, 5, 0, 0, black_box(&bytes)))
        });
        g.bench_function(BenchmarkId::new("derived", &id), |b| {
            b.iter(|| {
                FrameHeader::encode_with_tail_crc(
                    1_000,
                    5,
                    0,
                    0,
                    black_box(&bytes),
                    CRC_COVERED_START,
                    tail_crc,
                )
            })
        });
    }
    g.finish();
}

fn encode_frame<T: Encodable + HeaderVersion>(
    out: &mut BytesMut,
    key: ApiKey,
    version: i16,
    body: &T,
) {
    out.clear();
    out.extend_from_slice(&[0; 4]);
    ResponseHeader::default()
        .with_correlation_id(7)
        .encode(out, key.response_header_version(version))
        .expect("header");
    body.encode(out, version).expect("body");
    let len = (out.len() - 4) as i32;
    out[..4].copy_from_slice(&len.to_be_bytes());
}

fn frame_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_encode");
    let topic = TopicName(StrBytes::from_static_str("bench"));
    let produce = ProduceResponse::default().with_responses(vec![TopicProduceResponse::default()
        .with_name(topic.clone())
        .with_partition_responses(
            (0..8)
                .map(|p| {
                    PartitionProduceResponse::default()
                        .with_index(p)
                        .with_base_offset(1 << 20)
                })
                .collect(),
        )]);
    let mut out = BytesMut::with_capacity(4 << 20);
    g.bench_function("produce_reply_v9/8_partitions", |b| {
        b.iter(|| {
            encode_frame(&mut out, ApiKey::Produce, 9, &produce);
            black_box(out.len())
        })
    });
    // A fetch reply carrying 1 MiB of stored batches: the encode copies them into the frame.
    let records = batch(1000, 1024);
    let fetch = FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
        .with_topic(topic)
        .with_partitions(vec![PartitionData::default()
            .with_high_watermark(1000)
            .with_records(Some(records.clone()))])]);
    g.throughput(Throughput::Bytes(records.len() as u64));
    g.bench_function("fetch_reply_v12/1000x1KiB", |b| {
        b.iter(|| {
            encode_frame(&mut out, ApiKey::Fetch, FETCH_VERSION, &fetch);
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    request_decode,
    crc32c,
    batch_check_and_stamp,
    frame_header_crc,
    frame_encode
);
criterion_main!(benches);
