//! Record batches built once and re-sent: the produce request template, the in-place send-time
//! stamp of e2e mode, and a walk over the batches of a fetch reply.

use bytes::{Bytes, BytesMut};
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ApiKey, ProduceRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

use crate::error::{ClientError, Result};
use crate::wire::encode_request;

/// Size of the RecordBatch v2 header, up to and including the record count.
pub const BATCH_HEADER_BYTES: usize = 61;
const BATCH_LENGTH_AT: usize = 8;
const MAGIC_AT: usize = 16;
const CRC_AT: usize = 17;
const ATTRIBUTES_AT: usize = 21;
/// The control-batch bit of the attributes.
const CONTROL_ATTRIBUTE: i16 = 0x20;
const LAST_OFFSET_DELTA_AT: usize = 23;
const FIRST_TIMESTAMP_AT: usize = 27;
const MAX_TIMESTAMP_AT: usize = 35;
const PRODUCER_ID_AT: usize = 43;
const PRODUCER_EPOCH_AT: usize = 51;
const BASE_SEQUENCE_AT: usize = 53;
const RECORD_COUNT_AT: usize = 57;
/// Bytes of the send-time stamp at the start of a record value in e2e mode.
pub const STAMP_BYTES: usize = 8;
/// Largest batch spate-perf builds.
pub const MAX_BATCH_BYTES: usize = 64 << 20;

/// `count` values of `size` bytes of random upper-case letters (as kafka-producer-perf-test
/// sends), sliced from one buffer so each record differs and compression is realistic.
pub fn record_values(count: usize, size: usize, seed: u64) -> Vec<Bytes> {
    let mut state = seed | 1;
    let mut all = Vec::with_capacity(count * size);
    for _ in 0..count * size {
        // xorshift64: cheap, deterministic filler.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        all.push(b'A' + (state % 26) as u8);
    }
    let all = Bytes::from(all);
    (0..count)
        .map(|i| all.slice(i * size..(i + 1) * size))
        .collect()
}

/// Encodes one RecordBatch v2 of `values`, keyless, every record stamped `timestamp_ms`.
/// Record `i` of a plain (non-idempotent, non-transactional) batch with create-time
/// timestamps, as `RecordBatchEncoder` wants it.
pub fn plain_record(
    i: usize,
    timestamp_ms: i64,
    key: Option<Bytes>,
    value: Bytes,
    headers: IndexMap<StrBytes, Option<Bytes>>,
) -> Record {
    Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset: i as i64,
        // The encoder starts a new batch when offset - sequence changes; this keeps it
        // constant and gives the batch a base sequence of -1 (no idempotence).
        sequence: i as i32 - 1,
        timestamp: timestamp_ms,
        key,
        value: Some(value),
        headers,
    }
}

pub fn encode_batch(
    values: &[Bytes],
    compression: Compression,
    timestamp_ms: i64,
) -> Result<Bytes> {
    if values.is_empty() {
        return Err(ClientError::Args(
            "a batch needs at least one record".into(),
        ));
    }
    let records: Vec<Record> = values
        .iter()
        .enumerate()
        .map(|(i, v)| plain_record(i, timestamp_ms, None, v.clone(), IndexMap::new()))
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression,
        },
    )
    .map_err(|e| ClientError::Protocol(format!("encode record batch: {e}")))?;
    let batch = buf.freeze();
    let view = BatchView::parse(&batch)
        .ok_or_else(|| ClientError::Protocol("encoder produced a short batch".into()))?;
    assert_eq!(view.total_bytes, batch.len(), "one batch expected");
    assert_eq!(view.record_count as usize, values.len());
    if batch.len() > MAX_BATCH_BYTES {
        return Err(ClientError::Args(format!(
            "a batch of {} bytes exceeds {MAX_BATCH_BYTES}",
            batch.len()
        )));
    }
    Ok(batch)
}

/// Header fields of one complete batch found in a byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchView {
    pub base_offset: i64,
    pub last_offset_delta: i32,
    pub record_count: i32,
    pub compressed: bool,
    /// A control batch (transaction markers, a replicated log's leader-change marker): it
    /// carries no producer's records.
    pub control: bool,
    /// Bytes of the batch including its offset and length fields.
    pub total_bytes: usize,
}

impl BatchView {
    /// Parses the header of the batch at the start of `buf`; None if it is not complete.
    pub fn parse(buf: &[u8]) -> Option<BatchView> {
        if buf.len() < BATCH_HEADER_BYTES {
            return None;
        }
        let batch_length = be_i32(buf, BATCH_LENGTH_AT);
        let total = usize::try_from(batch_length).ok()? + 12;
        if total < BATCH_HEADER_BYTES || buf.len() < total || buf[MAGIC_AT] != 2 {
            return None;
        }
        Some(BatchView {
            base_offset: i64::from_be_bytes(buf[0..8].try_into().ok()?),
            last_offset_delta: be_i32(buf, LAST_OFFSET_DELTA_AT),
            record_count: be_i32(buf, RECORD_COUNT_AT),
            compressed: be_i16(buf, ATTRIBUTES_AT) & 0x7 != 0,
            control: be_i16(buf, ATTRIBUTES_AT) & CONTROL_ATTRIBUTE != 0,
            total_bytes: total,
        })
    }

    /// The offset after this batch.
    pub fn next_offset(&self) -> i64 {
        self.base_offset + i64::from(self.last_offset_delta) + 1
    }
}

/// Iterates over the complete batches at the start of a fetch reply's records; a truncated
/// batch at the end (the broker may cut one at the size limit) is skipped.
pub fn batches(mut buf: &[u8]) -> impl Iterator<Item = (BatchView, &[u8])> {
    std::iter::from_fn(move || {
        let view = BatchView::parse(buf)?;
        let (this, rest) = buf.split_at(view.total_bytes);
        buf = rest;
        Some((view, this))
    })
}

fn be_i32(buf: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn be_i16(buf: &[u8], at: usize) -> i16 {
    i16::from_be_bytes(buf[at..at + 2].try_into().expect("2 bytes"))
}

/// A Kafka (zig-zag) varint at `*at`, advancing it.
fn varint(buf: &[u8], at: &mut usize) -> Option<i64> {
    let mut raw: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*at)?;
        *at += 1;
        raw |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some((raw >> 1) as i64 ^ -((raw & 1) as i64));
        }
    }
    None
}

/// Where the first record's value starts in an uncompressed batch, and its length.
pub fn first_value_span(batch: &[u8]) -> Option<(usize, usize)> {
    let mut at = BATCH_HEADER_BYTES;
    let _record_len = varint(batch, &mut at)?;
    at += 1; // attributes
    let _timestamp_delta = varint(batch, &mut at)?;
    let _offset_delta = varint(batch, &mut at)?;
    let key_len = varint(batch, &mut at)?;
    if key_len > 0 {
        at += usize::try_from(key_len).ok()?;
    }
    let value_len = usize::try_from(varint(batch, &mut at)?).ok()?;
    (at + value_len <= batch.len()).then_some((at, value_len))
}

/// Writes `stamp` into the first record's value at `value_at`, sets the batch timestamps to
/// `timestamp_ms` and recomputes the CRC, so the broker sees a valid batch.
pub fn stamp_batch(batch: &mut [u8], value_at: usize, stamp: u64, timestamp_ms: i64) {
    write_stamp(batch, value_at, stamp, timestamp_ms);
    let crc = crc32c::crc32c(&batch[ATTRIBUTES_AT..]);
    batch[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
}

fn write_stamp(batch: &mut [u8], value_at: usize, stamp: u64, timestamp_ms: i64) {
    batch[value_at..value_at + STAMP_BYTES].copy_from_slice(&stamp.to_be_bytes());
    batch[FIRST_TIMESTAMP_AT..FIRST_TIMESTAMP_AT + 8].copy_from_slice(&timestamp_ms.to_be_bytes());
    batch[MAX_TIMESTAMP_AT..MAX_TIMESTAMP_AT + 8].copy_from_slice(&timestamp_ms.to_be_bytes());
}

/// A batch's CRC-32C with the parts a re-send leaves alone computed once: resealing after a new
/// stamp or sequence then costs a few combines instead of a pass over the whole batch (a
/// megabyte, just before the send whose latency is measured). What changes per send: the
/// timestamps and producer fields of the header (bytes 27..57) and, in uncompressed batches,
/// the stamp in the first record's value.
#[derive(Debug, Clone, Copy)]
struct SiteCrc {
    /// CRC of the attributes and last offset delta (the bytes before the first timestamp).
    head: u32,
    /// CRC and length of the bytes from the record count to the stamp (to the end without one).
    middle: (u32, usize),
    /// Where the stamp starts, and the CRC and length of the bytes after it; None: compressed.
    stamp: Option<(usize, u32, usize)>,
}

impl SiteCrc {
    fn new(batch: &[u8], value_at: Option<usize>) -> SiteCrc {
        let middle_end = match value_at {
            Some(at) => {
                assert!(at >= RECORD_COUNT_AT && at + STAMP_BYTES <= batch.len());
                at
            }
            None => batch.len(),
        };
        let middle = &batch[RECORD_COUNT_AT..middle_end];
        SiteCrc {
            head: crc32c::crc32c(&batch[ATTRIBUTES_AT..FIRST_TIMESTAMP_AT]),
            middle: (crc32c::crc32c(middle), middle.len()),
            stamp: value_at.map(|at| {
                let tail = &batch[at + STAMP_BYTES..];
                (at, crc32c::crc32c(tail), tail.len())
            }),
        }
    }

    /// Writes the CRC of `batch` as it is now; same result as a full pass.
    fn seal(&self, batch: &mut [u8]) {
        let crc = crc32c::crc32c_append(self.head, &batch[FIRST_TIMESTAMP_AT..RECORD_COUNT_AT]);
        let mut crc = crc32c::crc32c_combine(crc, self.middle.0, self.middle.1);
        if let Some((at, tail_crc, tail_len)) = self.stamp {
            crc = crc32c::crc32c_append(crc, &batch[at..at + STAMP_BYTES]);
            crc = crc32c::crc32c_combine(crc, tail_crc, tail_len);
        }
        batch[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
    }

    /// Same result as [`stamp_batch`] on the batch this was computed from.
    fn stamp(&self, batch: &mut [u8], stamp: u64, timestamp_ms: i64) -> bool {
        let Some((at, _, _)) = self.stamp else {
            return false;
        };
        write_stamp(batch, at, stamp, timestamp_ms);
        self.seal(batch);
        true
    }
}

/// The stamp carried by a batch's first record (decompressing if needed).
pub fn read_stamp(batch: &[u8], compressed: bool) -> Option<u64> {
    if !compressed {
        let (at, len) = first_value_span(batch)?;
        if len < STAMP_BYTES {
            return None;
        }
        return Some(u64::from_be_bytes(
            batch[at..at + STAMP_BYTES].try_into().ok()?,
        ));
    }
    let mut bytes = Bytes::copy_from_slice(batch);
    let set = RecordBatchDecoder::decode(&mut bytes).ok()?;
    let value = set.records.first()?.value.as_ref()?;
    Some(u64::from_be_bytes(
        value.get(..STAMP_BYTES)?.try_into().ok()?,
    ))
}

/// A produce request encoded once and re-sent with a new correlation id (and, in e2e mode, a new
/// stamp in each batch).
pub struct ProduceTemplate {
    pub frame: BytesMut,
    /// Per batch: where it starts in `frame`, its length, and how to reseal it.
    sites: Vec<(usize, usize, SiteCrc)>,
    pub records: u64,
    /// Records of each partition's batch.
    pub records_per_partition: u64,
    /// Record value bytes per request (what MB/s counts, as kafka-producer-perf-test does).
    pub value_bytes: u64,
    pub version: i16,
}

impl ProduceTemplate {
    /// Encodes one produce request carrying `batch` for each of `partitions`.
    pub fn build(
        topic: &str,
        partitions: &[i32],
        batch: &Bytes,
        value_bytes_per_batch: u64,
        acks: i16,
        timeout_ms: i32,
        version: i16,
    ) -> Result<ProduceTemplate> {
        let view = BatchView::parse(batch)
            .ok_or_else(|| ClientError::Protocol("template batch is not a batch".into()))?;
        let req = ProduceRequest::default()
            .with_acks(acks)
            .with_timeout_ms(timeout_ms)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partition_data(
                    partitions
                        .iter()
                        .map(|&p| {
                            PartitionProduceData::default()
                                .with_index(p)
                                .with_records(Some(batch.clone()))
                        })
                        .collect(),
                )]);
        let mut frame = BytesMut::new();
        encode_request(&mut frame, ApiKey::Produce, version, 0, &req)?;
        // The codec copies the batch bytes verbatim; find each copy, in order.
        let value_at = if view.compressed {
            None
        } else {
            first_value_span(batch).map(|(at, _)| at)
        };
        let mut sites = Vec::with_capacity(partitions.len());
        let mut from = 0;
        for _ in partitions {
            let pos = frame[from..]
                .windows(BATCH_HEADER_BYTES)
                .position(|w| w == &batch[..BATCH_HEADER_BYTES])
                .ok_or_else(|| ClientError::Protocol("batch not found in produce frame".into()))?
                + from;
            sites.push((pos, batch.len(), SiteCrc::new(batch, value_at)));
            from = pos + batch.len();
        }
        Ok(ProduceTemplate {
            frame,
            sites,
            records: view.record_count as u64 * partitions.len() as u64,
            records_per_partition: view.record_count as u64,
            value_bytes: value_bytes_per_batch * partitions.len() as u64,
            version,
        })
    }

    /// Stamps every batch of the request (e2e mode). False if a batch is compressed.
    pub fn stamp(&mut self, stamp: u64, timestamp_ms: i64) -> bool {
        for (start, len, crc) in &self.sites {
            if !crc.stamp(&mut self.frame[*start..*start + *len], stamp, timestamp_ms) {
                return false;
            }
        }
        true
    }

    /// Makes every batch of the request an idempotent producer's: its id and epoch (the base
    /// sequence is set per send, [`ProduceTemplate::set_sequence`]).
    pub fn set_producer(&mut self, producer_id: i64, producer_epoch: i16) {
        for (start, len, crc) in &self.sites {
            let batch = &mut self.frame[*start..*start + *len];
            batch[PRODUCER_ID_AT..PRODUCER_ID_AT + 8].copy_from_slice(&producer_id.to_be_bytes());
            batch[PRODUCER_EPOCH_AT..PRODUCER_EPOCH_AT + 2]
                .copy_from_slice(&producer_epoch.to_be_bytes());
            crc.seal(batch);
        }
    }

    /// Sets every batch's base sequence (each partition's batch carries the same one: a
    /// producer that sends one batch per partition per request numbers them alike).
    pub fn set_sequence(&mut self, base_sequence: i32) {
        for (start, len, crc) in &self.sites {
            let batch = &mut self.frame[*start..*start + *len];
            batch[BASE_SEQUENCE_AT..BASE_SEQUENCE_AT + 4]
                .copy_from_slice(&base_sequence.to_be_bytes());
            crc.seal(batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::protocol::Decodable;

    #[test]
    fn batch_holds_every_record_in_one_batch() {
        let values = record_values(1000, 100, 7);
        let batch = encode_batch(&values, Compression::None, 1_700_000_000_000).unwrap();
        let all: Vec<_> = batches(&batch).collect();
        assert_eq!(all.len(), 1);
        let (view, _) = all[0];
        assert_eq!(view.record_count, 1000);
        assert_eq!(view.last_offset_delta, 999);
        assert_eq!(view.next_offset(), 1000);
        assert!(!view.compressed);
        let decoded = RecordBatchDecoder::decode(&mut batch.clone()).unwrap();
        assert_eq!(decoded.records.len(), 1000);
        assert_eq!(decoded.records[3].value.as_ref().unwrap(), &values[3]);
    }

    #[test]
    fn compressed_batches_are_smaller_and_decode() {
        let values = record_values(200, 1024, 1);
        let plain = encode_batch(&values, Compression::None, 0).unwrap();
        let zstd = encode_batch(&values, Compression::Zstd, 0).unwrap();
        assert!(zstd.len() < plain.len());
        let (view, _) = batches(&zstd).next().unwrap();
        assert!(view.compressed);
        let decoded = RecordBatchDecoder::decode(&mut zstd.clone()).unwrap();
        assert_eq!(decoded.records[199].value.as_ref().unwrap(), &values[199]);
    }

    #[test]
    fn stamp_survives_a_full_decode_with_crc_check() {
        let values = record_values(10, 64, 3);
        let batch = encode_batch(&values, Compression::None, 0).unwrap();
        let (at, len) = first_value_span(&batch).unwrap();
        assert_eq!(len, 64);
        let mut buf = batch.to_vec();
        stamp_batch(&mut buf, at, 0xDEAD_BEEF_0123, 1234);
        assert_eq!(read_stamp(&buf, false), Some(0xDEAD_BEEF_0123));
        // The decoder verifies the CRC-32C: a stale CRC would fail here.
        let set = RecordBatchDecoder::decode(&mut Bytes::from(buf)).unwrap();
        assert_eq!(set.records[0].timestamp, 1234);
        assert_eq!(set.records[1].value.as_ref().unwrap(), &values[1]);
    }

    #[test]
    fn truncated_tail_batch_is_skipped() {
        let values = record_values(5, 10, 9);
        let b = encode_batch(&values, Compression::None, 0).unwrap();
        let mut two = b.to_vec();
        two.extend_from_slice(&b[..b.len() - 1]);
        assert_eq!(batches(&two).count(), 1);
        assert_eq!(batches(&b[..40]).count(), 0);
    }

    #[test]
    fn incremental_restamp_matches_a_full_crc() {
        let values = record_values(200, 100, 9);
        let batch = encode_batch(&values, Compression::None, 5).unwrap();
        let (at, _) = first_value_span(&batch).unwrap();
        let plan = SiteCrc::new(&batch, Some(at));
        let (mut fast, mut full) = (batch.to_vec(), batch.to_vec());
        for (stamp, ts) in [
            (1u64, 2i64),
            (u64::MAX, -1),
            (0x0123_4567_89AB_CDEF, 1_700_000_000_000),
        ] {
            assert!(plan.stamp(&mut fast, stamp, ts));
            stamp_batch(&mut full, at, stamp, ts);
            assert_eq!(fast, full);
            RecordBatchDecoder::decode(&mut Bytes::from(fast.clone())).unwrap();
        }
    }

    #[test]
    fn template_decodes_as_a_produce_request_and_stamps_in_place() {
        let values = record_values(50, 32, 5);
        let batch = encode_batch(&values, Compression::None, 0).unwrap();
        let mut t = ProduceTemplate::build("t", &[0, 1, 2], &batch, 50 * 32, 1, 30_000, 9).unwrap();
        assert_eq!(t.records, 150);
        assert!(t.stamp(42, 99));
        let mut frame = t.frame.clone().freeze().split_off(4);
        let header = kafka_protocol::messages::RequestHeader::decode(
            &mut frame,
            ProduceRequest::header_version(9),
        )
        .unwrap();
        assert_eq!(header.request_api_key, ApiKey::Produce as i16);
        let req = ProduceRequest::decode(&mut frame, 9).unwrap();
        let parts = &req.topic_data[0].partition_data;
        assert_eq!(parts.len(), 3);
        for p in parts {
            let records = p.records.as_ref().unwrap();
            assert_eq!(read_stamp(records, false), Some(42));
            RecordBatchDecoder::decode(&mut records.clone()).unwrap();
        }
    }

    #[test]
    fn producer_fields_and_sequence_reseal_a_valid_batch() {
        for compression in [Compression::None, Compression::Lz4] {
            let values = record_values(20, 40, 11);
            let batch = encode_batch(&values, compression, 0).unwrap();
            let mut t = ProduceTemplate::build("t", &[4, 5], &batch, 800, -1, 30_000, 9).unwrap();
            assert_eq!(t.records_per_partition, 20);
            t.set_producer(77, 3);
            t.set_sequence(1_000);
            if compression == Compression::None {
                assert!(t.stamp(9, 10));
            } else {
                assert!(!t.stamp(9, 10));
            }
            let mut frame = t.frame.clone().freeze().split_off(4);
            kafka_protocol::messages::RequestHeader::decode(
                &mut frame,
                ProduceRequest::header_version(9),
            )
            .unwrap();
            let req = ProduceRequest::decode(&mut frame, 9).unwrap();
            for p in &req.topic_data[0].partition_data {
                // The decoder checks the CRC-32C: a stale one fails here.
                let set =
                    RecordBatchDecoder::decode(&mut p.records.as_ref().unwrap().clone()).unwrap();
                let r = &set.records[3];
                assert_eq!((r.producer_id, r.producer_epoch), (77, 3));
                assert_eq!(r.sequence, 1_003);
                assert_eq!(r.value.as_ref().unwrap(), &values[3]);
            }
        }
    }

    use kafka_protocol::protocol::HeaderVersion;
}
