//! Record-level access to a stored RecordBatch v2, for the few places the engine must look inside
//! a batch: the log cleaner (which keeps some records of a batch and drops others), time lookups
//! at record granularity, and the LogAppendTime header rewrite.
//!
//! Everything else treats batches as opaque. Records are never re-encoded here: a filtered batch
//! is the original header (base offset, base timestamp, lastOffsetDelta, producer fields kept)
//! followed by the original bytes of the records it keeps, so every kept record keeps its offset
//! and timestamp deltas. Compressed batches are decompressed (output bounded), filtered and
//! recompressed with the same codec.

use std::io::{Read, Write};

use crate::batch::{BatchHeader, BATCH_HEADER_BYTES, CRC_COVERED_START};
use crate::EngineError;

/// Attribute bit 3: the batch's timestamps are LogAppendTime (the broker's clock), not the
/// producer's CreateTime.
pub const LOG_APPEND_TIME_BIT: i16 = 0x8;
/// Largest records section a stored batch may decompress to when the engine looks inside it.
/// Stored batches were validated against `max_batch_bytes` (at most 64 MiB) when produced.
pub const MAX_UNCOMPRESSED_RECORDS_BYTES: usize = 128 << 20;
/// Uncompressed bytes per block of xerial-framed snappy (what the Java client writes).
const XERIAL_BLOCK_BYTES: usize = 32 << 10;
const XERIAL_SNAPPY_HEADER: &[u8; 16] = b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01";

const BATCH_LENGTH: usize = 8;
const CRC: usize = 17;
const ATTRIBUTES: usize = 21;
const MAX_TIMESTAMP: usize = 35;
const RECORDS_COUNT: usize = 57;

fn invalid(m: impl Into<String>) -> EngineError {
    EngineError::InvalidBatch(m.into())
}

/// One record, borrowed from the (decompressed) records section.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Offset of the record: the batch's base offset plus its offset delta.
    pub offset: i64,
    /// The record's timestamp (`baseTimestamp + timestampDelta`; for a LogAppendTime batch the
    /// batch's max timestamp, as Kafka's clients read it).
    pub timestamp: i64,
    pub key: Option<&'a [u8]>,
    /// `None` is a tombstone.
    pub value: Option<&'a [u8]>,
    /// The record's whole encoding, length prefix included.
    pub raw: &'a [u8],
}

/// The records section of one batch, decompressed if it was compressed.
pub struct Records {
    section: Vec<u8>,
    base_offset: i64,
    base_timestamp: i64,
    log_append_time: Option<i64>,
    count: u32,
}

impl Records {
    /// Decodes the records section of `batch` (which must parse as a v2 batch; its CRC is the
    /// caller's business), decompressing it into at most `max_uncompressed_bytes`.
    pub fn of(batch: &[u8], max_uncompressed_bytes: usize) -> Result<Records, EngineError> {
        let h = BatchHeader::parse(batch)?;
        let count = u32::try_from(h.records_count())
            .map_err(|_| invalid(format!("negative record count {}", h.records_count())))?;
        let payload = &batch[BATCH_HEADER_BYTES..];
        let section = decompress(h.compression(), payload, max_uncompressed_bytes)?;
        let log_append_time =
            (h.attributes() & LOG_APPEND_TIME_BIT != 0).then(|| h.max_timestamp());
        Ok(Records {
            section,
            base_offset: h.base_offset(),
            base_timestamp: h.base_timestamp(),
            log_append_time,
            count,
        })
    }

    /// The records in order. Every record is checked to lie inside the section; a malformed one
    /// ends the iteration with an error.
    pub fn iter(&self) -> RecordIter<'_> {
        RecordIter {
            records: self,
            at: 0,
            left: self.count,
        }
    }

    /// Bytes of the decompressed records section.
    pub fn section_len(&self) -> usize {
        self.section.len()
    }
}

pub struct RecordIter<'a> {
    records: &'a Records,
    at: usize,
    left: u32,
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<Record<'a>, EngineError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let r = self.read();
        if r.is_err() {
            self.left = 0;
        }
        Some(r)
    }
}

impl<'a> RecordIter<'a> {
    fn read(&mut self) -> Result<Record<'a>, EngineError> {
        let bytes: &'a [u8] = &self.records.section;
        let start = self.at;
        let mut c = Cursor { bytes, at: start };
        let len = c.varint()?;
        if len < 0 || len as usize > c.left() {
            return Err(invalid(format!(
                "record length {len} at byte {start} outside the records section"
            )));
        }
        let end = c.at + len as usize;
        let mut r = Cursor {
            bytes: &bytes[..end],
            at: c.at,
        };
        r.take(1)?; // attributes (unused in v2)
        let ts_delta = r.varint()?;
        let offset_delta = r.varint()?;
        let key = r.nullable()?;
        let value = r.nullable()?;
        self.at = end;
        let timestamp = self
            .records
            .log_append_time
            .unwrap_or_else(|| self.records.base_timestamp.saturating_add(ts_delta));
        Ok(Record {
            offset: self.records.base_offset.saturating_add(offset_delta),
            timestamp,
            key,
            value,
            raw: &bytes[start..end],
        })
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], EngineError> {
        if n > self.left() {
            return Err(invalid(format!(
                "{n} bytes wanted where {} are left in the record",
                self.left()
            )));
        }
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    /// A zigzag varlong (at most 10 bytes).
    fn varint(&mut self) -> Result<i64, EngineError> {
        let mut raw: u64 = 0;
        for i in 0..10 {
            let b = self.take(1)?[0];
            raw |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok((raw >> 1) as i64 ^ -((raw & 1) as i64));
            }
        }
        Err(invalid("varint longer than 10 bytes"))
    }

    fn nullable(&mut self) -> Result<Option<&'a [u8]>, EngineError> {
        match self.varint()? {
            -1 => Ok(None),
            n if n < -1 => Err(invalid(format!("negative length {n}"))),
            n => self.take(n as usize).map(Some),
        }
    }
}

/// Builds the batch that keeps `kept` (raw encodings of records of `original`, in order) from
/// `original`: same header fields (base offset, lastOffsetDelta, base timestamp, producer id,
/// epoch and base sequence, leader epoch, attributes), the record count set, the records
/// section recompressed with the batch's codec, the max timestamp recomputed from the kept
/// records under CreateTime (kept under LogAppendTime), and a valid CRC-32C. With no record
/// kept this is Kafka's empty batch, kept for the producer state it carries.
pub fn rebuild_batch(
    original: &[u8],
    kept: &[&[u8]],
    kept_max_timestamp: Option<i64>,
) -> Result<Vec<u8>, EngineError> {
    let h = BatchHeader::parse(original)?;
    let section: Vec<u8> = kept.concat();
    let mut attributes = h.attributes();
    let payload = if kept.is_empty() {
        // An empty batch carries no records section, so no codec either.
        attributes &= !0x7;
        Vec::new()
    } else {
        let xerial = h.compression() == 2
            && original[BATCH_HEADER_BYTES..].starts_with(&XERIAL_SNAPPY_HEADER[..]);
        compress(h.compression(), &section, xerial)?
    };
    let mut b = Vec::with_capacity(BATCH_HEADER_BYTES + payload.len());
    b.extend_from_slice(&original[..BATCH_HEADER_BYTES]);
    b.extend_from_slice(&payload);
    let total = b.len();
    b[BATCH_LENGTH..BATCH_LENGTH + 4].copy_from_slice(&((total - 12) as i32).to_be_bytes());
    b[ATTRIBUTES..ATTRIBUTES + 2].copy_from_slice(&attributes.to_be_bytes());
    b[RECORDS_COUNT..RECORDS_COUNT + 4].copy_from_slice(&(kept.len() as i32).to_be_bytes());
    if h.attributes() & LOG_APPEND_TIME_BIT == 0 {
        if let Some(ts) = kept_max_timestamp {
            b[MAX_TIMESTAMP..MAX_TIMESTAMP + 8].copy_from_slice(&ts.to_be_bytes());
        }
    }
    fix_crc(&mut b);
    Ok(b)
}

fn fix_crc(b: &mut [u8]) {
    let crc = crc32c::crc32c(&b[CRC_COVERED_START..]);
    b[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
}

/// LogAppendTime: the one header rewrite a leader makes, as Kafka does. Sets the timestamp-type
/// attribute bit, stores `append_time_ms` as the batch's max timestamp and recomputes the CRC;
/// the records (and the base timestamp) stay untouched, and clients read every record's
/// timestamp as the max timestamp.
pub fn set_log_append_time(batch: &mut [u8], append_time_ms: i64) -> Result<(), EngineError> {
    let attributes = BatchHeader::parse(batch)?.attributes() | LOG_APPEND_TIME_BIT;
    batch[ATTRIBUTES..ATTRIBUTES + 2].copy_from_slice(&attributes.to_be_bytes());
    batch[MAX_TIMESTAMP..MAX_TIMESTAMP + 8].copy_from_slice(&append_time_ms.to_be_bytes());
    fix_crc(batch);
    Ok(())
}

/// The first record of `batch` whose timestamp is `>= target`: its offset and timestamp (Kafka's
/// offsetsForTimes answers at record granularity). `None` if the batch holds no such record.
pub fn first_record_at_or_after(
    batch: &[u8],
    target: i64,
) -> Result<Option<(i64, i64)>, EngineError> {
    let h = BatchHeader::parse(batch)?;
    if h.max_timestamp() < target || h.records_count() == 0 {
        return Ok(None);
    }
    let records = Records::of(batch, MAX_UNCOMPRESSED_RECORDS_BYTES)?;
    for r in records.iter() {
        let r = r?;
        if r.timestamp >= target {
            return Ok(Some((r.offset, r.timestamp)));
        }
    }
    Ok(None)
}

fn decompress(codec: u8, payload: &[u8], max_bytes: usize) -> Result<Vec<u8>, EngineError> {
    let bad = |e: &dyn std::fmt::Display| invalid(format!("codec {codec}: {e}"));
    let bounded = |reader: &mut dyn Read| -> Result<Vec<u8>, EngineError> {
        let mut out = Vec::new();
        reader
            .take(max_bytes as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| bad(&e))?;
        if out.len() > max_bytes {
            return Err(bad(&format_args!(
                "records decompress to more than {max_bytes} bytes"
            )));
        }
        Ok(out)
    };
    match codec {
        0 => {
            if payload.len() > max_bytes {
                return Err(bad(&"records section too large"));
            }
            Ok(payload.to_vec())
        }
        1 => bounded(&mut flate2::read::MultiGzDecoder::new(payload)),
        2 => snappy_decompress(payload, max_bytes),
        3 => bounded(&mut lz4::Decoder::new(payload).map_err(|e| bad(&e))?),
        4 => {
            let mut d = zstd::stream::read::Decoder::with_buffer(payload).map_err(|e| bad(&e))?;
            d.window_log_max(crate::validate::ZSTD_WINDOW_LOG_MAX)
                .map_err(|e| bad(&e))?;
            bounded(&mut d)
        }
        other => Err(invalid(format!("unknown compression codec {other}"))),
    }
}

fn snappy_decompress(payload: &[u8], max_bytes: usize) -> Result<Vec<u8>, EngineError> {
    let bad = |e: &dyn std::fmt::Display| invalid(format!("snappy: {e}"));
    let mut decoder = snap::raw::Decoder::new();
    let mut one = |block: &[u8], out: &mut Vec<u8>| -> Result<(), EngineError> {
        let len = snap::raw::decompress_len(block).map_err(|e| bad(&e))?;
        let start = out.len();
        if len > max_bytes - start {
            return Err(bad(&format_args!("decompresses past {max_bytes} bytes")));
        }
        out.resize(start + len, 0);
        let n = decoder
            .decompress(block, &mut out[start..])
            .map_err(|e| bad(&e))?;
        out.truncate(start + n);
        Ok(())
    };
    let mut out = Vec::new();
    let Some(mut rest) = payload.strip_prefix(&XERIAL_SNAPPY_HEADER[..]) else {
        one(payload, &mut out)?;
        return Ok(out);
    };
    while !rest.is_empty() {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(bad(&"truncated xerial block length"));
        };
        let len = u32::from_be_bytes(*len) as usize;
        if len > tail.len() {
            return Err(bad(&"xerial block runs past the payload"));
        }
        let (block, tail) = tail.split_at(len);
        one(block, &mut out)?;
        rest = tail;
    }
    Ok(out)
}

/// Compresses a records section with Kafka codec `codec` in a form every Kafka client reads:
/// gzip, snappy (xerial-framed when `xerial`, as the Java client writes it; raw otherwise, as
/// librdkafka does), the LZ4 frame format with independent blocks, zstd.
pub fn compress(codec: u8, section: &[u8], xerial: bool) -> Result<Vec<u8>, EngineError> {
    let io = |e: std::io::Error| invalid(format!("compressing with codec {codec}: {e}"));
    Ok(match codec {
        0 => section.to_vec(),
        1 => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(section).map_err(io)?;
            e.finish().map_err(io)?
        }
        2 if xerial => {
            let mut out = XERIAL_SNAPPY_HEADER.to_vec();
            let mut enc = snap::raw::Encoder::new();
            for chunk in section.chunks(XERIAL_BLOCK_BYTES) {
                let block = enc
                    .compress_vec(chunk)
                    .map_err(|e| invalid(e.to_string()))?;
                out.extend_from_slice(&(block.len() as u32).to_be_bytes());
                out.extend_from_slice(&block);
            }
            out
        }
        2 => snap::raw::Encoder::new()
            .compress_vec(section)
            .map_err(|e| invalid(e.to_string()))?,
        3 => {
            let mut e = lz4::EncoderBuilder::new()
                .block_mode(lz4::BlockMode::Independent)
                .checksum(lz4::ContentChecksum::NoChecksum)
                .build(Vec::new())
                .map_err(io)?;
            e.write_all(section).map_err(io)?;
            let (out, r) = e.finish();
            r.map_err(io)?;
            out
        }
        4 => zstd::bulk::compress(section, 3).map_err(io)?,
        other => return Err(invalid(format!("unknown compression codec {other}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::build;

    fn keyed_batch(codec: u8, n: usize) -> Vec<u8> {
        let mut section = Vec::new();
        for i in 0..n {
            let key = format!("k{i}");
            let value = (i % 3 != 0).then(|| format!("value-{i}"));
            section.extend(build::record(
                i as i64,
                i as i64 * 10,
                Some(key.as_bytes()),
                value.as_deref().map(str::as_bytes),
                &[],
            ));
        }
        let payload = if codec == 0 {
            section
        } else {
            build::compress(codec, &section)
        };
        let mut b = build::batch(&payload, n as i32, n as i32 - 1, codec);
        crate::batch::stamp(&mut b, 100, 0);
        b
    }

    fn decode(batch: &[u8]) -> Vec<kafka_protocol::records::Record> {
        let mut buf = bytes::Bytes::copy_from_slice(batch);
        kafka_protocol::records::RecordBatchDecoder::decode(&mut buf)
            .expect("kafka-protocol decodes the batch")
            .records
    }

    #[test]
    fn filtered_batches_keep_offsets_and_decode_in_every_codec() {
        for codec in 0..=4u8 {
            let b = keyed_batch(codec, 10);
            let records = Records::of(&b, 1 << 20).unwrap();
            let all: Vec<Record> = records.iter().map(|r| r.unwrap()).collect();
            assert_eq!(all.len(), 10);
            assert_eq!(all[3].offset, 103);
            assert_eq!(all[3].timestamp, 1_000 + 30);
            let kept: Vec<&[u8]> = all
                .iter()
                .filter(|r| r.offset % 2 == 1)
                .map(|r| r.raw)
                .collect();
            let out = rebuild_batch(&b, &kept, Some(1_090)).unwrap();
            let h = BatchHeader::parse(&out).unwrap();
            h.verify_crc().unwrap();
            assert_eq!((h.base_offset(), h.last_offset()), (100, 109));
            assert_eq!((h.records_count(), h.compression()), (5, codec));
            let decoded = decode(&out);
            let offsets: Vec<i64> = decoded.iter().map(|r| r.offset).collect();
            assert_eq!(offsets, vec![101, 103, 105, 107, 109], "codec {codec}");
            assert_eq!(decoded[1].key.as_deref(), Some(&b"k3"[..]));
            assert!(decoded[1].value.is_none(), "tombstone kept as a tombstone");
            assert_eq!(decoded[2].timestamp, 1_050);
        }
    }

    #[test]
    fn an_empty_batch_keeps_the_producer_fields_and_offset_span() {
        let b = keyed_batch(4, 4);
        let out = rebuild_batch(&b, &[], None).unwrap();
        let h = BatchHeader::parse(&out).unwrap();
        h.verify_crc().unwrap();
        assert_eq!(
            (h.records_count(), h.last_offset(), h.compression()),
            (0, 103, 0)
        );
        assert_eq!(out.len(), BATCH_HEADER_BYTES);
        assert!(decode(&out).is_empty());
    }

    #[test]
    fn log_append_time_rewrites_only_the_header() {
        let mut b = keyed_batch(0, 3);
        let records_before = b[BATCH_HEADER_BYTES..].to_vec();
        set_log_append_time(&mut b, 777_777).unwrap();
        let h = BatchHeader::parse(&b).unwrap();
        h.verify_crc().unwrap();
        assert_eq!(h.max_timestamp(), 777_777);
        assert_eq!(&b[BATCH_HEADER_BYTES..], &records_before[..]);
        for r in decode(&b) {
            // (kafka-protocol reports the type; Kafka's clients then read the max timestamp.)
            assert_eq!(
                r.timestamp_type,
                kafka_protocol::records::TimestampType::LogAppend
            );
        }
        // Under LogAppendTime every record has the append time: the first one answers.
        assert_eq!(
            first_record_at_or_after(&b, 777_777).unwrap(),
            Some((100, 777_777))
        );
        assert_eq!(first_record_at_or_after(&b, 777_778).unwrap(), None);
    }

    #[test]
    fn time_lookup_answers_the_record_not_the_batch() {
        // The example: one batch with records stamped 1234 and 999999999999.
        let mut section = build::record(0, 0, Some(b"a"), Some(b"x"), &[]);
        section.extend(build::record(
            1,
            999_999_999_999 - 1234,
            Some(b"b"),
            Some(b"y"),
            &[],
        ));
        let mut b = crate::batch::build_batch(&section, 2, 1234, 999_999_999_999);
        fix_crc(&mut b);
        assert_eq!(
            first_record_at_or_after(&b, 999_999_999_999).unwrap(),
            Some((1, 999_999_999_999))
        );
        assert_eq!(first_record_at_or_after(&b, 1234).unwrap(), Some((0, 1234)));
        assert_eq!(
            first_record_at_or_after(&b, 1235).unwrap(),
            Some((1, 999_999_999_999))
        );
    }

    #[test]
    fn malformed_sections_are_errors_not_panics() {
        let b = keyed_batch(0, 3);
        for cut in BATCH_HEADER_BYTES..b.len() {
            let mut bad = b[..cut].to_vec();
            let len = (bad.len() - 12) as i32;
            bad[8..12].copy_from_slice(&len.to_be_bytes());
            if let Ok(r) = Records::of(&bad, 1 << 20) {
                assert!(r.iter().any(|r| r.is_err()), "cut at {cut}");
            }
        }
        assert!(
            Records::of(&keyed_batch(4, 50), 10).is_err(),
            "output bound"
        );
    }
}
