//! Full validation of one RecordBatch v2 before it is acknowledged or stored, the checks Kafka's
//! `LogValidator` and `DefaultRecordBatch`/`DefaultRecord` make on a produced batch.
//!
//! Checked, in this order (the first failure is reported, with what and where):
//! - the header: magic 2, `batchLength` matching the bytes exactly ([`BatchHeader::parse`]); not a
//!   control batch (attribute bit 5: clients may not write them); a known codec (0 none, 1 gzip,
//!   2 snappy, 3 lz4, 4 zstd; 5..7 refused); `recordCount` > 0 and equal to
//!   `lastOffsetDelta + 1`; a batch with a producer id has a base sequence >= 0.
//! - the records section, uncompressed in place (no copy) or after decompressing it with the
//!   output bounded by the caller's `max_uncompressed_bytes` (never by what the batch claims:
//!   decoding stops and refuses once past the bound). Snappy is accepted raw (librdkafka) and
//!   xerial-framed (the Java client); lz4 is the LZ4 frame format; gzip may have several members.
//! - exactly `recordCount` records, then no byte left. Each record: a length varint >= 0 inside
//!   the section, then attributes, timestamp delta (varlong), offset delta (varint, 0, 1, 2, ...
//!   in order), key and value lengths (-1 = null, below -1 refused) with their bytes, a header
//!   count >= 0 and each header's key length (>= 0) and value length (>= -1) with their bytes;
//!   everything inside the record's length, and the record's bytes used exactly. Varints longer
//!   than 5 bytes (10 for varlongs) or with bits beyond 32 (64) are refused.
//!
//! Errors: [`Refusal::InvalidRecord`] (Kafka's `InvalidRecordException`, INVALID_RECORD) for a
//! structure that is wrong, [`Refusal::CorruptMessage`] (CORRUPT_MESSAGE) for an unknown codec
//! or a payload that does not decompress.
//!
//! Where this does less than Kafka: batch `maxTimestamp` is not compared with the records' (Kafka
//! rewrites it; Spate never re-encodes a batch, and reports the records' range in
//! [`BatchSummary`] for a caller that wants to check it); record attributes (unused in v2) are
//! not checked; per-record timestamp bounds (`message.timestamp.*.max.ms`) and keys on compacted
//! topics are left to a caller's [`RecordVisitor`].
//!
//! Cost: an uncompressed batch is walked in place. A compressed one is decompressed in one pass
//! into a buffer kept per thread (one per shard) with decoder contexts kept beside it, so a batch
//! allocates nothing once the thread has seen one as large; zstd decodes straight into that
//! buffer and allocates no window whatever window size its frame header asks for.

use std::io::Read;

use crate::batch::{BatchHeader, BATCH_HEADER_BYTES};
use crate::error::EngineError;

/// Largest zstd window (as a power of two) a batch may ask for: 128 MiB, the default limit of
/// zstd's streaming decoder (`ZSTD_WINDOWLOG_LIMIT_DEFAULT`), which Kafka's Java clients and
/// broker (zstd-jni) and kafka-protocol decode with: a frame beyond it would be refused by them.
/// The validator decodes in one pass into a buffer bounded by the batch limit and allocates no
/// window, so this bounds what is accepted, not memory.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 27;
/// zstd frame and skippable-frame magic numbers (RFC 8878).
const ZSTD_MAGIC: u32 = 0xFD2F_B528;
const ZSTD_SKIPPABLE_MAGIC_MASK: u32 = 0xFFFF_FFF0;
const ZSTD_SKIPPABLE_MAGIC: u32 = 0x184D_2A50;
/// Smallest encoding of a record: length, attributes, timestamp delta, offset delta, key length,
/// value length and header count, one byte each.
const MIN_RECORD_BYTES: usize = 7;
/// Start of xerial's snappy framing (the Java client's `SnappyOutputStream`), the whole 16-byte
/// header as Kafka's clients write it.
const XERIAL_SNAPPY_HEADER: &[u8; 16] = b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01";

/// The Kafka error a refused batch gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// INVALID_RECORD (87): the batch's structure is wrong.
    InvalidRecord,
    /// CORRUPT_MESSAGE (2): an unknown codec, or a payload that does not decompress.
    CorruptMessage,
}

/// Why a batch was refused, in words a client's log can show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BatchError {
    pub refusal: Refusal,
    pub message: String,
}

impl From<BatchError> for EngineError {
    fn from(e: BatchError) -> EngineError {
        EngineError::InvalidBatch(e.message)
    }
}

fn invalid(message: impl Into<String>) -> BatchError {
    BatchError {
        refusal: Refusal::InvalidRecord,
        message: message.into(),
    }
}

fn corrupt(message: impl Into<String>) -> BatchError {
    BatchError {
        refusal: Refusal::CorruptMessage,
        message: message.into(),
    }
}

/// Compression codec of a batch (attribute bits 0-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Codec {
    fn from_id(id: u8) -> Option<Codec> {
        Some(match id {
            0 => Codec::None,
            1 => Codec::Gzip,
            2 => Codec::Snappy,
            3 => Codec::Lz4,
            4 => Codec::Zstd,
            _ => return None,
        })
    }
}

/// One record as the walk sees it, borrowed from the batch (or its decompressed records).
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    pub offset_delta: i32,
    /// `baseTimestamp + timestampDelta` (saturating).
    pub timestamp: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub header_count: u32,
}

/// A per-record check that joins the walk (keys on compacted topics, timestamp bounds): an
/// `Err` refuses the batch with INVALID_RECORD and that message.
pub trait RecordVisitor {
    fn record(&mut self, record: &RecordView<'_>) -> Result<(), String>;
}

/// No per-record check beyond the structure.
impl RecordVisitor for () {
    fn record(&mut self, _: &RecordView<'_>) -> Result<(), String> {
        Ok(())
    }
}

/// What the walk learnt about a valid batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSummary {
    pub records: u32,
    pub codec: Codec,
    pub any_null_key: bool,
    /// Smallest and largest record timestamps.
    pub min_timestamp: i64,
    pub max_timestamp: i64,
    /// Bytes of the records section once decompressed (its length when not compressed).
    pub records_bytes: usize,
}

/// Validates `batch` (exactly one RecordBatch v2; its CRC is the caller's business) with no
/// per-record check beyond the structure. See the module documentation for the checks.
pub fn validate_batch(
    batch: &[u8],
    max_uncompressed_bytes: usize,
) -> Result<BatchSummary, BatchError> {
    validate_batch_with(batch, max_uncompressed_bytes, &mut ())
}

/// [`validate_batch`] with `visitor` called on every record, in order.
pub fn validate_batch_with<V: RecordVisitor>(
    batch: &[u8],
    max_uncompressed_bytes: usize,
    visitor: &mut V,
) -> Result<BatchSummary, BatchError> {
    validate_inner(batch, max_uncompressed_bytes, visitor, false)
}

/// Validates a batch as the log stores it (recovery, `spate verify`): the checks of
/// [`validate_batch`], except that the batches the broker writes itself pass too: a record-less
/// batch (record count 0, no records section, `lastOffsetDelta` >= 0) as the cleaner leaves
/// where it dropped every record of a batch or a run of batches, and control batches.
pub fn validate_stored_batch(
    batch: &[u8],
    max_uncompressed_bytes: usize,
) -> Result<(), BatchError> {
    let h = BatchHeader::parse(batch).map_err(|e| corrupt(e.to_string()))?;
    if h.records_count() == 0 {
        if batch.len() != BATCH_HEADER_BYTES {
            return Err(invalid(format!(
                "a batch of no records has {} bytes of records",
                batch.len() - BATCH_HEADER_BYTES
            )));
        }
        if h.last_offset_delta() < 0 {
            return Err(invalid(format!(
                "negative lastOffsetDelta {}",
                h.last_offset_delta()
            )));
        }
        return Ok(());
    }
    validate_inner(batch, max_uncompressed_bytes, &mut (), true).map(|_| ())
}

fn validate_inner<V: RecordVisitor>(
    batch: &[u8],
    max_uncompressed_bytes: usize,
    visitor: &mut V,
    allow_control: bool,
) -> Result<BatchSummary, BatchError> {
    let h = BatchHeader::parse(batch).map_err(|e| match e {
        EngineError::InvalidBatch(m) => corrupt(m),
        other => corrupt(other.to_string()),
    })?;
    if h.is_control() && !allow_control {
        return Err(invalid(
            "control batches (attribute bit 5) may not be produced by clients",
        ));
    }
    let codec = Codec::from_id(h.compression())
        .ok_or_else(|| corrupt(format!("unknown compression codec {}", h.compression())))?;
    let count = h.records_count();
    if count <= 0 {
        return Err(invalid(format!("record count {count} is not positive")));
    }
    if i64::from(count) != i64::from(h.last_offset_delta()) + 1 {
        return Err(invalid(format!(
            "record count {count} does not match lastOffsetDelta {} + 1",
            h.last_offset_delta()
        )));
    }
    if h.producer_id() >= 0 && h.base_sequence() < 0 {
        return Err(invalid(format!(
            "invalid base sequence {} for producer id {}",
            h.base_sequence(),
            h.producer_id()
        )));
    }
    let section = &batch[BATCH_HEADER_BYTES..];
    let count = count as u32;
    let base_timestamp = h.base_timestamp();
    if codec == Codec::None {
        return walk_records(section, count, base_timestamp, codec, visitor);
    }
    with_scratch(|scratch| {
        scratch.decompress(codec, section, max_uncompressed_bytes)?;
        walk_records(&scratch.out, count, base_timestamp, codec, visitor)
    })
}

thread_local! {
    /// One decompression scratch per thread (so one per shard): its buffer keeps the capacity of
    /// the largest batch it has held (at most the largest `max_uncompressed_bytes` asked for,
    /// plus one byte) and its decoder contexts are reused, instead of a fresh buffer grown by
    /// doubling and fresh contexts per batch (allocation, page faults and copies that cost more
    /// than decompressing).
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch, or with a fresh one when it is in use (a visitor that
/// validates another batch from inside the walk).
fn with_scratch<T>(f: impl FnOnce(&mut Scratch) -> T) -> T {
    let mut f = Some(f);
    let shared = SCRATCH.try_with(|cell| {
        let mut s = cell.try_borrow_mut().ok()?;
        f.take().map(|f| f(&mut s))
    });
    match (shared, f) {
        (Ok(Some(done)), _) => done,
        (_, Some(f)) => f(&mut Scratch::default()),
        (_, None) => unreachable!("f runs once, and its result is returned"),
    }
}

/// A decompression buffer and the decoder contexts that fill it, reused batch after batch.
#[derive(Default)]
struct Scratch {
    out: Vec<u8>,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    lz4: Option<Lz4Context>,
}

impl Scratch {
    /// Decompresses a records section into `self.out`, refusing once past `max_bytes`.
    fn decompress(
        &mut self,
        codec: Codec,
        payload: &[u8],
        max_bytes: usize,
    ) -> Result<(), BatchError> {
        self.out.clear();
        match codec {
            Codec::None => unreachable!("an uncompressed section is walked in place"),
            Codec::Gzip => read_bounded(
                flate2::bufread::MultiGzDecoder::new(payload),
                codec,
                max_bytes,
                &mut self.out,
            ),
            Codec::Lz4 => {
                let ctx = match &mut self.lz4 {
                    Some(ctx) => ctx,
                    slot => slot.insert(Lz4Context::new()?),
                };
                ctx.decompress_frame(payload, max_bytes, &mut self.out)
            }
            Codec::Zstd => {
                let zstd = match &mut self.zstd {
                    Some(z) => z,
                    slot => slot.insert(zstd_decompressor()?),
                };
                // One pass into a buffer of the bound: the decoder writes straight into it and
                // needs no window buffer of its own, whatever window the frame asks for; a frame
                // that needs more room fails ("destination buffer is too small").
                zstd_windows_within_limit(payload)?;
                self.out.reserve(max_bytes + 1);
                zstd.decompress_to_buffer(payload, &mut self.out)
                    .map_err(|e| corrupt(format!("Zstd payload does not decompress: {e}")))?;
                check_bound(codec, self.out.len(), max_bytes)
            }
            Codec::Snappy => snappy(payload, max_bytes, &mut self.out),
        }
    }
}

fn zstd_decompressor() -> Result<zstd::bulk::Decompressor<'static>, BatchError> {
    zstd::bulk::Decompressor::new().map_err(|e| corrupt(format!("Zstd decoder: {e}")))
}

/// Refuses a zstd payload with a frame asking for a window above 2^[`ZSTD_WINDOW_LOG_MAX`] bytes
/// (the one-pass decoder does not check it). Stops quietly at anything it cannot parse: the
/// decoder then reports it.
fn zstd_windows_within_limit(payload: &[u8]) -> Result<(), BatchError> {
    // zstd's streaming decoders refuse a window above (1 << windowLogMax) + 1 bytes; window
    // sizes are 2^log plus eighths of it, so that is any window above 2^windowLogMax.
    const MAX_WINDOW_BYTES: u64 = 1 << ZSTD_WINDOW_LOG_MAX;
    let mut rest = payload;
    // Every frame is at least 8 bytes (magic and a header, or a skippable frame's size), so the
    // loop is bounded by the payload's length.
    while let Some(magic) = rest.first_chunk::<4>().map(|m| u32::from_le_bytes(*m)) {
        if magic & ZSTD_SKIPPABLE_MAGIC_MASK == ZSTD_SKIPPABLE_MAGIC {
            let Some(size) = rest.get(4..8) else {
                return Ok(());
            };
            let size = u32::from_le_bytes(size.try_into().expect("4 bytes")) as usize;
            let Some(tail) = rest.get(8usize.saturating_add(size)..) else {
                return Ok(());
            };
            rest = tail;
            continue;
        }
        if magic != ZSTD_MAGIC {
            return Ok(());
        }
        let Some(&descriptor) = rest.get(4) else {
            return Ok(());
        };
        // A single-segment frame's window is its content size, which the output bound caps.
        if descriptor & 0x20 == 0 {
            let Some(&window) = rest.get(5) else {
                return Ok(());
            };
            let log = 10 + u32::from(window >> 3);
            let base = 1u64 << log;
            let bytes = base + (base / 8) * u64::from(window & 7);
            if bytes > MAX_WINDOW_BYTES {
                return Err(corrupt(format!(
                    "Zstd frame asks for a window of {bytes} bytes, above the 2^{ZSTD_WINDOW_LOG_MAX} \
                     Kafka's decoders allow"
                )));
            }
        }
        match zstd::zstd_safe::find_frame_compressed_size(rest) {
            Ok(len) if len > 0 && len <= rest.len() => rest = &rest[len..],
            _ => return Ok(()),
        }
    }
    Ok(())
}

fn check_bound(codec: Codec, len: usize, max_bytes: usize) -> Result<(), BatchError> {
    if len > max_bytes {
        return Err(corrupt(format!(
            "{codec:?} payload decompresses to more than the {max_bytes}-byte limit"
        )));
    }
    Ok(())
}

/// Reads a decoder to its end into `out`, refusing once it has produced more than `max_bytes`.
fn read_bounded(
    reader: impl Read,
    codec: Codec,
    max_bytes: usize,
    out: &mut Vec<u8>,
) -> Result<(), BatchError> {
    reader
        .take(max_bytes as u64 + 1)
        .read_to_end(out)
        .map_err(|e| corrupt(format!("{codec:?} payload does not decompress: {e}")))?;
    check_bound(codec, out.len(), max_bytes)
}

/// An LZ4 frame decompression context (liblz4's, through lz4-sys), kept for reuse. The lz4
/// crate's `Decoder` would allocate a context and a 32 KiB input buffer per batch and copy the
/// input through it; this decodes the whole payload straight into the output buffer.
struct Lz4Context(lz4::liblz4::LZ4FDecompressionContext);

impl Lz4Context {
    fn new() -> Result<Lz4Context, BatchError> {
        use lz4::liblz4::{
            LZ4FDecompressionContext, LZ4F_createDecompressionContext, LZ4F_VERSION,
        };
        let mut ctx = LZ4FDecompressionContext(std::ptr::null_mut());
        // SAFETY: `ctx` is a valid out-pointer; on success it owns a context freed in `drop`.
        let code = unsafe { LZ4F_createDecompressionContext(&mut ctx, LZ4F_VERSION) };
        lz4::liblz4::check_error(code).map_err(|e| corrupt(format!("Lz4 decoder: {e}")))?;
        Ok(Lz4Context(ctx))
    }

    /// Decodes the LZ4 frame at the start of `payload` into `out` (empty, its capacity reused),
    /// writing at most `max_bytes + 1` bytes. Bytes after the frame's end mark are ignored, as
    /// Kafka's clients and the lz4 crate's reader do.
    fn decompress_frame(
        &mut self,
        payload: &[u8],
        max_bytes: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), BatchError> {
        use lz4::liblz4::{LZ4F_decompress, LZ4F_resetDecompressionContext};
        debug_assert!(out.is_empty());
        // SAFETY: the context is valid (owned by self). Resetting makes it usable whatever
        // state a previous batch left it in (liblz4 leaves it undefined after an error).
        unsafe { LZ4F_resetDecompressionContext(self.0) };
        out.reserve(max_bytes + 1);
        let dst_cap = (max_bytes + 1).min(out.capacity());
        let bad =
            |m: &dyn std::fmt::Display| corrupt(format!("Lz4 payload does not decompress: {m}"));
        let (mut read, mut written) = (0usize, 0usize);
        // Each pass consumes input or produces output (or the loop ends), so the number of
        // passes is bounded by the bytes in and out.
        loop {
            let mut src_size = payload.len() - read;
            let mut dst_size = dst_cap - written;
            // SAFETY: src points at `src_size` readable bytes of `payload`; dst at `dst_size`
            // bytes of `out`'s spare capacity (written < dst_cap <= capacity). liblz4 writes
            // at most `dst_size` bytes there and reports in `dst_size` how many it wrote.
            let hint = unsafe {
                LZ4F_decompress(
                    self.0,
                    out.as_mut_ptr().add(written),
                    &mut dst_size,
                    payload.as_ptr().add(read),
                    &mut src_size,
                    std::ptr::null(),
                )
            };
            let hint = lz4::liblz4::check_error(hint).map_err(|e| bad(&e))?;
            assert!(src_size <= payload.len() - read && dst_size <= dst_cap - written);
            read += src_size;
            written += dst_size;
            // SAFETY: liblz4 initialised the `written` bytes it reported, within capacity.
            unsafe { out.set_len(written) };
            if hint == 0 {
                return check_bound(Codec::Lz4, written, max_bytes);
            }
            if written > max_bytes {
                return check_bound(Codec::Lz4, written, max_bytes);
            }
            if src_size == 0 && dst_size == 0 {
                return Err(bad(&if read == payload.len() {
                    "the frame is truncated"
                } else {
                    "the decoder made no progress"
                }));
            }
        }
    }
}

impl Drop for Lz4Context {
    fn drop(&mut self) {
        // SAFETY: created by LZ4F_createDecompressionContext and freed only here.
        unsafe { lz4::liblz4::LZ4F_freeDecompressionContext(self.0) };
    }
}

/// Raw snappy (librdkafka) or xerial-framed snappy (the Java client), as Kafka's clients read
/// them: a payload starting with the xerial header is framed, any other is raw.
fn snappy(payload: &[u8], max_bytes: usize, out: &mut Vec<u8>) -> Result<(), BatchError> {
    let bad = |e: &dyn std::fmt::Display| corrupt(format!("Snappy payload: {e}"));
    let too_big = || {
        corrupt(format!(
            "Snappy payload decompresses to more than the {max_bytes}-byte limit"
        ))
    };
    let mut decoder = snap::raw::Decoder::new();
    let Some(mut rest) = payload.strip_prefix(&XERIAL_SNAPPY_HEADER[..]) else {
        let len = snap::raw::decompress_len(payload).map_err(|e| bad(&e))?;
        if len > max_bytes {
            return Err(too_big());
        }
        out.resize(len, 0);
        let n = decoder.decompress(payload, out).map_err(|e| bad(&e))?;
        out.truncate(n);
        return Ok(());
    };
    while !rest.is_empty() {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(bad(&"truncated xerial block length"));
        };
        let len = u32::from_be_bytes(*len) as usize;
        if len > tail.len() {
            return Err(bad(&format_args!(
                "xerial block of {len} bytes where {} are left",
                tail.len()
            )));
        }
        let (block, tail) = tail.split_at(len);
        let block_len = snap::raw::decompress_len(block).map_err(|e| bad(&e))?;
        let start = out.len();
        if block_len > max_bytes - start {
            return Err(too_big());
        }
        out.resize(start + block_len, 0);
        let n = decoder
            .decompress(block, &mut out[start..])
            .map_err(|e| bad(&e))?;
        out.truncate(start + n);
        rest = tail;
    }
    Ok(())
}

/// A cursor over a records section: every read is checked against the bytes left.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn u8(&mut self, what: &str) -> Result<u8, BatchError> {
        let b = *self
            .bytes
            .get(self.at)
            .ok_or_else(|| invalid(format!("{what} runs past the end of its record")))?;
        self.at += 1;
        Ok(b)
    }

    /// A zigzag varint of at most `max_bytes` bytes carrying at most `bits` bits.
    ///
    /// Most varints of a record (lengths, small deltas) are one or two bytes: those are decoded
    /// inline without the general loop, which profiled at over a third of the broker's cycles
    /// for 100-byte records when every varint took it (and at 39% of the validator's when the
    /// two-byte lengths of 100-byte records still did).
    #[inline]
    fn zigzag(&mut self, max_bytes: usize, bits: u32, what: &str) -> Result<i64, BatchError> {
        let unzigzag = |raw: u64| (raw >> 1) as i64 ^ -((raw & 1) as i64);
        match self.bytes.get(self.at..) {
            Some(&[b0, ..]) if b0 & 0x80 == 0 => {
                self.at += 1;
                return Ok(unzigzag(u64::from(b0)));
            }
            // Two bytes carry 14 bits: within any limit, so no overflow check.
            Some(&[b0, b1, ..]) if b1 & 0x80 == 0 => {
                self.at += 2;
                return Ok(unzigzag(u64::from(b0 & 0x7f) | u64::from(b1) << 7));
            }
            _ => {}
        }
        self.zigzag_long(max_bytes, bits, what)
    }

    #[inline(never)]
    fn zigzag_long(&mut self, max_bytes: usize, bits: u32, what: &str) -> Result<i64, BatchError> {
        let mut raw: u64 = 0;
        for i in 0..max_bytes {
            let b = self.u8(what)?;
            let shift = 7 * i as u32;
            let part = u64::from(b & 0x7f);
            if shift + 7 > bits && part >> (bits - shift) != 0 {
                return Err(invalid(format!("{what} varint overflows {bits} bits")));
            }
            raw |= part << shift;
            if b & 0x80 == 0 {
                return Ok((raw >> 1) as i64 ^ -((raw & 1) as i64));
            }
        }
        Err(invalid(format!(
            "{what} varint is longer than {max_bytes} bytes"
        )))
    }

    fn varint(&mut self, what: &str) -> Result<i32, BatchError> {
        Ok(self.zigzag(5, 32, what)? as i32)
    }

    fn varlong(&mut self, what: &str) -> Result<i64, BatchError> {
        self.zigzag(10, 64, what)
    }

    fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8], BatchError> {
        if len > self.left() {
            return Err(invalid(format!(
                "{what} of {len} bytes runs past its record ({} bytes left)",
                self.left()
            )));
        }
        let s = &self.bytes[self.at..self.at + len];
        self.at += len;
        Ok(s)
    }

    /// A length-prefixed byte string: -1 is null, below that is refused.
    fn nullable(&mut self, what: &str) -> Result<Option<&'a [u8]>, BatchError> {
        match self.varint(what)? {
            -1 => Ok(None),
            len if len < -1 => Err(invalid(format!("{what} length {len} is negative"))),
            len => self.take(len as usize, what).map(Some),
        }
    }
}

fn walk_records<V: RecordVisitor>(
    records: &[u8],
    count: u32,
    base_timestamp: i64,
    codec: Codec,
    visitor: &mut V,
) -> Result<BatchSummary, BatchError> {
    assert!(count > 0, "the record count was checked before the walk");
    if (count as usize).saturating_mul(MIN_RECORD_BYTES) > records.len() {
        return Err(invalid(format!(
            "record count {count} cannot fit in {} bytes of records",
            records.len()
        )));
    }
    let mut summary = BatchSummary {
        records: count,
        codec,
        any_null_key: false,
        min_timestamp: i64::MAX,
        max_timestamp: i64::MIN,
        records_bytes: records.len(),
    };
    let mut section = Cursor {
        bytes: records,
        at: 0,
    };
    for i in 0..count {
        let at = section.at;
        let in_record = |e: BatchError| BatchError {
            message: format!("record {i} (byte {at} of the records): {}", e.message),
            ..e
        };
        let len = section.varint("record length").map_err(in_record)?;
        if len < 0 || len as usize > section.left() {
            return Err(in_record(invalid(format!(
                "record length {len} outside the {} bytes left in the batch",
                section.left()
            ))));
        }
        let mut r = Cursor {
            bytes: section.take(len as usize, "record").map_err(in_record)?,
            at: 0,
        };
        let record = read_record(&mut r, base_timestamp).map_err(in_record)?;
        if record.offset_delta as i64 != i64::from(i) {
            return Err(in_record(invalid(format!(
                "offset delta {} where {i} was expected",
                record.offset_delta
            ))));
        }
        if r.left() != 0 {
            return Err(in_record(invalid(format!(
                "{} bytes left over inside the record",
                r.left()
            ))));
        }
        summary.any_null_key |= record.key.is_none();
        summary.min_timestamp = summary.min_timestamp.min(record.timestamp);
        summary.max_timestamp = summary.max_timestamp.max(record.timestamp);
        visitor.record(&record).map_err(|m| in_record(invalid(m)))?;
    }
    if section.left() != 0 {
        return Err(invalid(format!(
            "{} bytes left after the batch's {count} records",
            section.left()
        )));
    }
    Ok(summary)
}

fn read_record<'a>(r: &mut Cursor<'a>, base_timestamp: i64) -> Result<RecordView<'a>, BatchError> {
    let _attributes = r.u8("attributes")?;
    let timestamp_delta = r.varlong("timestamp delta")?;
    let offset_delta = r.varint("offset delta")?;
    let key = r.nullable("key")?;
    let value = r.nullable("value")?;
    let header_count = r.varint("header count")?;
    // Each header takes at least two bytes (its two lengths): a count beyond that cannot fit.
    if header_count < 0 || header_count as usize > r.left() / 2 {
        return Err(invalid(format!(
            "header count {header_count} outside what {} bytes can hold",
            r.left()
        )));
    }
    for _ in 0..header_count {
        let key_len = r.varint("header key")?;
        if key_len < 0 {
            return Err(invalid(format!("header key length {key_len} is negative")));
        }
        r.take(key_len as usize, "header key")?;
        r.nullable("header value")?;
    }
    Ok(RecordView {
        offset_delta,
        timestamp: base_timestamp.saturating_add(timestamp_delta),
        key,
        value,
        header_count: header_count as u32,
    })
}

/// A stored batch that fails validation, found by [`verify_segment_file`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadBatch {
    /// Base offset of the batch (or of the first offset not readable, for an unreadable frame).
    pub offset: u64,
    /// Byte position of its frame in the segment file.
    pub position: u64,
    pub reason: String,
}

/// Bytes [`verify_segment_file`] reads from a segment at a time. Its memory is this plus the
/// largest frame it meets (at most [`crate::MAX_FRAME_PAYLOAD_BYTES`]), whatever the segment's
/// size.
pub const VERIFY_READ_BYTES: usize = 1 << 20;

/// What [`verify_segment_file_in_chunks`] found, and the memory it used for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentVerification {
    pub bad: Vec<BadBatch>,
    /// Largest capacity its read buffer reached.
    pub peak_buffer_bytes: usize,
    /// Bytes of the file it read.
    pub bytes_read: u64,
}

/// Reads one segment file (`<base-offset:020>.log`) with plain std::fs, never writing it, and
/// validates every stored batch: frame CRC, batch CRC, and the checks of [`validate_stored_batch`]
/// (decompression bounded by [`crate::MAX_FRAME_PAYLOAD_BYTES`]). Stops at the end of the data
/// (zero bytes of pre-allocation) or at a torn tail, which recovery cuts (not reported). A frame
/// that cannot be read, with data after it, is reported and ends the scan of that file. Reads
/// the file [`VERIFY_READ_BYTES`] at a time.
pub fn verify_segment_file(path: &std::path::Path) -> Result<Vec<BadBatch>, EngineError> {
    verify_segment_file_in_chunks(path, VERIFY_READ_BYTES, crate::MAX_FRAME_PAYLOAD_BYTES)
        .map(|v| v.bad)
}

/// [`verify_segment_file`] reading `read_bytes` at a time and refusing frames of more than
/// `max_payload_bytes`: its buffer never holds more than one frame and `read_bytes` beyond it.
pub fn verify_segment_file_in_chunks(
    path: &std::path::Path,
    read_bytes: usize,
    max_payload_bytes: usize,
) -> Result<SegmentVerification, EngineError> {
    use crate::frame::{decode_frame, frame_len, FrameError, FRAME_ALIGN};
    assert!(read_bytes > 0);
    let io = |e: std::io::Error| EngineError::InvalidBatch(format!("{}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(io)?;
    let mut win = SegmentWindow {
        file,
        buf: rkyv::util::AlignedVec::<16>::with_capacity(read_bytes),
        start: 0,
        eof: false,
        read_bytes,
        bytes_read: 0,
    };
    let mut bad = Vec::new();
    let mut pos = 0usize;
    let mut next_offset =
        crate::segment::parse_log_name(&path.file_name().unwrap_or_default().to_string_lossy())
            .unwrap_or(0);
    win.refill(0, read_bytes).map_err(io)?;
    loop {
        if pos >= win.buf.len() {
            if win.eof {
                break;
            }
            win.refill(pos, read_bytes).map_err(io)?;
            pos = 0;
            continue;
        }
        debug_assert_eq!((win.start as usize + pos) % FRAME_ALIGN, 0);
        let position = win.start + pos as u64;
        match decode_frame(&win.buf[pos..], None, max_payload_bytes) {
            Ok(f) => {
                let payload = f.payload;
                let checked = BatchHeader::parse(payload)
                    .and_then(|h| h.verify_crc())
                    .map_err(|e| e.to_string())
                    .and_then(|()| {
                        validate_stored_batch(payload, max_payload_bytes).map_err(|e| e.message)
                    });
                if let Err(reason) = checked {
                    bad.push(BadBatch {
                        offset: f.base_offset(),
                        position,
                        reason,
                    });
                }
                next_offset = f.last_offset() + 1;
                pos += f.len;
            }
            Err(FrameError::Incomplete { need }) => {
                if win.eof {
                    break; // a torn tail
                }
                assert!(
                    need <= frame_len(max_payload_bytes),
                    "decode_frame caps lengths"
                );
                win.refill(pos, need).map_err(io)?;
                pos = 0;
            }
            Err(FrameError::Invalid(reason)) => {
                if win.any_data_from(pos).map_err(io)? {
                    bad.push(BadBatch {
                        offset: next_offset,
                        position,
                        reason: format!("unreadable frame: {reason}"),
                    });
                }
                break;
            }
        }
    }
    let peak_buffer_bytes = win.buf.capacity();
    assert!(
        peak_buffer_bytes <= frame_len(max_payload_bytes) + FRAME_ALIGN + read_bytes,
        "the read buffer holds one frame and a read beyond it"
    );
    Ok(SegmentVerification {
        bad,
        peak_buffer_bytes,
        bytes_read: win.bytes_read,
    })
}

/// A sliding window over a segment file: `buf` holds the file's bytes from `start` on.
/// 16-byte aligned storage, and frames at 8-byte multiples of the file, keep archived frame
/// headers readable in place.
struct SegmentWindow {
    file: std::fs::File,
    buf: rkyv::util::AlignedVec<16>,
    start: u64,
    eof: bool,
    read_bytes: usize,
    bytes_read: u64,
}

impl SegmentWindow {
    /// Drops the bytes before `at` (which may lie past the buffered bytes: a frame's padding),
    /// then reads until `need` bytes from there are held or the file ends.
    fn refill(&mut self, at: usize, need: usize) -> std::io::Result<()> {
        let held = self.buf.len();
        let mut skip = at.saturating_sub(held);
        let keep = at.min(held);
        self.buf.as_mut_slice().copy_within(keep.., 0);
        self.buf.resize(held - keep, 0);
        self.start += at as u64;
        // Grown once to what is needed plus one read, never by doubling: one frame and one
        // read beyond it is the whole of the memory.
        if self.buf.capacity() < need + skip + self.read_bytes {
            self.buf
                .reserve_exact(need + skip + self.read_bytes - self.buf.len());
        }
        while !self.eof && self.buf.len() < need + skip {
            let old = self.buf.len();
            self.buf.resize(old + self.read_bytes, 0);
            let n = loop {
                match std::io::Read::read(&mut self.file, &mut self.buf.as_mut_slice()[old..]) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    other => break other?,
                }
            };
            self.buf.resize(old + n, 0);
            self.bytes_read += n as u64;
            self.eof = n == 0;
            // Padding past the end of what was held: drop it as it arrives.
            let dropped = skip.min(self.buf.len());
            if dropped > 0 {
                let len = self.buf.len();
                self.buf.as_mut_slice().copy_within(dropped.., 0);
                self.buf.resize(len - dropped, 0);
                skip -= dropped;
            }
        }
        Ok(())
    }

    /// Whether any byte from `at` to the end of the file is not zero (pre-allocation is zeros),
    /// reading the rest of the file a window at a time.
    fn any_data_from(&mut self, at: usize) -> std::io::Result<bool> {
        let mut from = at;
        loop {
            if self
                .buf
                .get(from..)
                .is_some_and(|rest| rest.iter().any(|&b| b != 0))
            {
                return Ok(true);
            }
            if self.eof {
                return Ok(false);
            }
            let end = self.buf.len().max(from);
            self.refill(end, self.read_bytes)?;
            from = 0;
        }
    }
}

/// Helpers that build valid and deliberately broken batches, for tests, benches and fuzzing.
pub mod build {
    use crate::batch::{BATCH_HEADER_BYTES, CRC_COVERED_START};

    /// Appends a zigzag varint.
    pub fn put_varint(out: &mut Vec<u8>, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        while z >= 0x80 {
            out.push(z as u8 | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
    }

    /// One record's encoding (length included): `headers` are (key, value) pairs.
    pub fn record(
        offset_delta: i64,
        timestamp_delta: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&[u8], Option<&[u8]>)],
    ) -> Vec<u8> {
        let mut body = vec![0u8];
        put_varint(&mut body, timestamp_delta);
        put_varint(&mut body, offset_delta);
        for field in [key, value] {
            match field {
                None => put_varint(&mut body, -1),
                Some(b) => {
                    put_varint(&mut body, b.len() as i64);
                    body.extend_from_slice(b);
                }
            }
        }
        put_varint(&mut body, headers.len() as i64);
        for (k, v) in headers {
            put_varint(&mut body, k.len() as i64);
            body.extend_from_slice(k);
            match v {
                None => put_varint(&mut body, -1),
                Some(v) => {
                    put_varint(&mut body, v.len() as i64);
                    body.extend_from_slice(v);
                }
            }
        }
        let mut out = Vec::with_capacity(body.len() + 5);
        put_varint(&mut out, body.len() as i64);
        out.extend_from_slice(&body);
        out
    }

    /// `count` records with `value_bytes`-byte values and short keys, offset deltas 0, 1, ...
    pub fn records(count: usize, value_bytes: usize) -> Vec<u8> {
        let value = vec![b'v'; value_bytes];
        let mut out = Vec::new();
        for i in 0..count {
            let key = format!("key-{i}");
            out.extend(record(
                i as i64,
                i as i64,
                Some(key.as_bytes()),
                Some(&value),
                &[],
            ));
        }
        out
    }

    /// Sets the record count, lastOffsetDelta, codec and CRC of a batch built by
    /// [`crate::batch::build_batch`] (whose records section is `section`).
    pub fn batch(section: &[u8], count: i32, last_offset_delta: i32, codec: u8) -> Vec<u8> {
        let mut b = crate::batch::build_batch(section, count.max(1), 1_000, 1_000);
        b[57..61].copy_from_slice(&count.to_be_bytes());
        b[23..27].copy_from_slice(&last_offset_delta.to_be_bytes());
        b[22] = (b[22] & !0x7) | (codec & 0x7);
        fix_crc(&mut b);
        debug_assert!(b.len() >= BATCH_HEADER_BYTES);
        b
    }

    /// Recomputes a batch's CRC (after its insides were changed on purpose).
    pub fn fix_crc(b: &mut [u8]) {
        let crc = crc32c::crc32c(&b[CRC_COVERED_START..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
    }

    /// Compresses a records section with Kafka codec `codec` (1 gzip, 2 snappy raw,
    /// 3 lz4 frame, 4 zstd).
    pub fn compress(codec: u8, section: &[u8]) -> Vec<u8> {
        use std::io::Write;
        match codec {
            1 => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(section).expect("in memory");
                e.finish().expect("in memory")
            }
            2 => snap::raw::Encoder::new()
                .compress_vec(section)
                .expect("in memory"),
            3 => {
                let mut e = lz4::EncoderBuilder::new()
                    .build(Vec::new())
                    .expect("in memory");
                e.write_all(section).expect("in memory");
                let (out, r) = e.finish();
                r.expect("in memory");
                out
            }
            4 => zstd::bulk::compress(section, 3).expect("in memory"),
            other => panic!("no codec {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    const MAX: usize = 1 << 20;

    fn valid(count: usize) -> Vec<u8> {
        batch(&records(count, 10), count as i32, count as i32 - 1, 0)
    }

    fn refused(b: &[u8]) -> BatchError {
        validate_batch(b, MAX).expect_err("must be refused")
    }

    #[test]
    fn valid_batches_pass_with_a_summary() {
        let s = validate_batch(&valid(3), MAX).unwrap();
        assert_eq!(s.records, 3);
        assert_eq!((s.min_timestamp, s.max_timestamp), (1_000, 1_002));
        assert!(!s.any_null_key);
        for codec in 1..=4u8 {
            let section = records(50, 100);
            let b = batch(&compress(codec, &section), 50, 49, codec);
            let s = validate_batch(&b, MAX).unwrap_or_else(|e| panic!("codec {codec}: {e}"));
            assert_eq!(s.records_bytes, section.len());
        }
    }

    #[test]
    fn null_keys_and_headers() {
        let mut section = record(0, 0, None, None, &[(b"h", None), (b"", Some(b"x"))]);
        section.extend(record(1, 5, Some(b"k"), Some(b""), &[]));
        let s = validate_batch(&batch(&section, 2, 1, 0), MAX).unwrap();
        assert!(s.any_null_key);
    }

    #[test]
    fn the_issue_cases_are_refused() {
        let two = records(2, 10);
        for (name, b, kind) in [
            ("count 5 of 2", batch(&two, 5, 4, 0), Refusal::InvalidRecord),
            (
                "count i32::MAX",
                batch(&two, i32::MAX, i32::MAX - 1, 0),
                Refusal::InvalidRecord,
            ),
            ("count 0", batch(&two, 0, 0, 0), Refusal::InvalidRecord),
            ("count/delta", batch(&two, 2, 0, 0), Refusal::InvalidRecord),
            ("codec 7", batch(&two, 2, 1, 7), Refusal::CorruptMessage),
            ("codec 5", batch(&two, 2, 1, 5), Refusal::CorruptMessage),
            (
                "gzip garbage",
                batch(&[7u8; 64], 2, 1, 1),
                Refusal::CorruptMessage,
            ),
            (
                "zstd garbage",
                batch(&[7u8; 64], 2, 1, 4),
                Refusal::CorruptMessage,
            ),
            (
                "lz4 garbage",
                batch(&[7u8; 64], 2, 1, 3),
                Refusal::CorruptMessage,
            ),
            (
                "snappy garbage",
                batch(&[0xffu8; 64], 2, 1, 2),
                Refusal::CorruptMessage,
            ),
        ] {
            assert_eq!(refused(&b).refusal, kind, "{name}");
        }
        // A record length of 10^9.
        let mut section = Vec::new();
        put_varint(&mut section, 1_000_000_000);
        section.extend_from_slice(&[0; 20]);
        assert_eq!(
            refused(&batch(&section, 1, 0, 0)).refusal,
            Refusal::InvalidRecord
        );
        // A truncated last record.
        let t = &two[..two.len() - 3];
        assert!(refused(&batch(t, 2, 1, 0)).message.contains("record 1"));
        // Trailing bytes.
        let mut extra = two.clone();
        extra.push(0);
        assert!(refused(&batch(&extra, 2, 1, 0))
            .message
            .contains("left after"));
        // Offset deltas out of order.
        let mut swapped = record(1, 0, None, None, &[]);
        swapped.extend(record(0, 0, None, None, &[]));
        assert!(refused(&batch(&swapped, 2, 1, 0))
            .message
            .contains("offset delta"));
        // A control batch.
        let mut control = valid(2);
        control[22] |= 0x20;
        fix_crc(&mut control);
        assert!(refused(&control).message.contains("control"));
    }

    #[test]
    fn decompression_is_bounded_by_the_limit_not_the_claim() {
        let section = records(1000, 1000);
        for codec in 1..=4u8 {
            let b = batch(&compress(codec, &section), 1000, 999, codec);
            let e = validate_batch(&b, section.len() - 1).unwrap_err();
            assert_eq!(e.refusal, Refusal::CorruptMessage, "codec {codec}");
            assert!(e.message.contains("limit"), "codec {codec}: {e}");
            validate_batch(&b, section.len()).unwrap();
        }
    }

    #[test]
    fn the_reused_scratch_carries_nothing_between_batches() {
        // Large then small, refused in the middle of a frame then valid, for every codec: a
        // decoder context left mid-frame or a buffer left full must not leak into the next.
        let big = records(2000, 300);
        let small = records(3, 10);
        for codec in 1..=4u8 {
            let big_batch = batch(&compress(codec, &big), 2000, 1999, codec);
            let small_batch = batch(&compress(codec, &small), 3, 2, codec);
            let mut cut = compress(codec, &big);
            cut.truncate(cut.len() / 2);
            let cut_batch = batch(&cut, 2000, 1999, codec);
            for _ in 0..2 {
                assert_eq!(validate_batch(&big_batch, MAX).unwrap().records, 2000);
                assert_eq!(refused(&cut_batch).refusal, Refusal::CorruptMessage);
                assert_eq!(
                    validate_batch(&big_batch, big.len() - 1)
                        .unwrap_err()
                        .refusal,
                    Refusal::CorruptMessage
                );
                let s = validate_batch(&small_batch, MAX).unwrap();
                assert_eq!((s.records, s.records_bytes), (3, small.len()));
            }
        }
    }

    #[test]
    fn a_visitor_may_validate_another_batch() {
        struct Nested(Vec<u8>);
        impl RecordVisitor for Nested {
            fn record(&mut self, _: &RecordView<'_>) -> Result<(), String> {
                validate_batch(&self.0, MAX)
                    .map(|_| ())
                    .map_err(|e| e.message)
            }
        }
        let inner = batch(&compress(4, &records(5, 50)), 5, 4, 4);
        let outer = batch(&compress(3, &records(4, 50)), 4, 3, 3);
        let s = validate_batch_with(&outer, MAX, &mut Nested(inner)).unwrap();
        assert_eq!(s.records, 4);
    }

    #[test]
    fn lz4_bytes_after_the_frame_are_ignored_and_a_cut_frame_is_refused() {
        let section = records(20, 30);
        let mut payload = compress(3, &section);
        payload.extend_from_slice(b"trailing");
        validate_batch(&batch(&payload, 20, 19, 3), MAX).unwrap();
        let frame_len = payload.len() - b"trailing".len();
        for cut in [4, 7, frame_len - 4, frame_len - 1] {
            let e = refused(&batch(&payload[..cut], 20, 19, 3));
            assert_eq!(e.refusal, Refusal::CorruptMessage, "cut at {cut}: {e}");
        }
    }

    #[test]
    fn zstd_with_a_large_window_is_bounded_by_the_limit() {
        // A frame asking for a 128 MiB window (what Kafka's decoders allow): decoded in one pass
        // into the bounded buffer, it allocates no window; it is accepted when its output fits
        // and refused beyond. One byte more of window is refused, as Kafka's decoders do.
        let section = records(500, 200);
        use std::io::Write;
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        e.long_distance_matching(true).unwrap();
        e.window_log(27).unwrap();
        e.write_all(&section).unwrap();
        let payload = e.finish().unwrap();
        // Frame header descriptor without the single-segment flag, then the window descriptor:
        // log = 10 + exponent.
        assert_eq!(payload[4] & 0x20, 0);
        assert_eq!(
            10 + (payload[5] >> 3),
            27,
            "the frame asks for a 128 MiB window"
        );
        validate_batch(&batch(&payload, 500, 499, 4), MAX).unwrap();
        let e = validate_batch(&batch(&payload, 500, 499, 4), section.len() - 1).unwrap_err();
        assert_eq!(e.refusal, Refusal::CorruptMessage);
        let mut wider = payload.clone();
        wider[5] += 1; // mantissa 1: 2^27 + 2^24 bytes
        let e = refused(&batch(&wider, 500, 499, 4));
        assert!(e.message.contains("window"), "{e}");
        // Behind a skippable frame too.
        let mut skippable = vec![0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3];
        skippable.extend_from_slice(&wider);
        assert!(refused(&batch(&skippable, 500, 499, 4))
            .message
            .contains("window"));
        skippable.truncate(11);
        skippable.extend_from_slice(&payload);
        validate_batch(&batch(&skippable, 500, 499, 4), MAX).unwrap();
    }

    /// A segment frame holding `batch` at `base_offset`, padded as the log writes it.
    fn frame(base_offset: u64, mut batch: Vec<u8>) -> Vec<u8> {
        batch[..8].copy_from_slice(&(base_offset as i64).to_be_bytes());
        let h = crate::batch::BatchHeader::parse(&batch).unwrap();
        let mut out = crate::frame::FrameHeader::encode(
            base_offset,
            h.max_timestamp(),
            h.last_offset_delta() as u32,
            0,
            &batch,
        )
        .to_vec();
        out.extend_from_slice(&batch);
        out.resize(crate::frame::frame_len(batch.len()), 0);
        out
    }

    /// Writes `frames` (with `tail` after them) as segment 0 and returns its path.
    fn segment(dir: &tempfile::TempDir, frames: &[Vec<u8>], tail: &[u8]) -> std::path::PathBuf {
        let path = dir.path().join(format!("{:020}.log", 0));
        let mut bytes = frames.concat();
        bytes.extend_from_slice(tail);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// `n` frames, batches of assorted sizes (some larger than `read_bytes`), every
    /// `bad_every`-th one claiming 5 records for 2; returns frames and the expected bad batches.
    fn frames(n: usize, bad_every: usize) -> (Vec<Vec<u8>>, Vec<(u64, u64)>) {
        let (mut out, mut bad, mut offset, mut position) = (Vec::new(), Vec::new(), 0u64, 0u64);
        for i in 0..n {
            let b = if i % bad_every == bad_every - 1 {
                bad.push((offset, position));
                batch(&records(2, 10), 5, 4, 0)
            } else {
                let (count, value) = [(1, 0), (20, 100), (3, 9_000), (7, 1_000)][i % 4];
                batch(&records(count, value), count as i32, count as i32 - 1, 0)
            };
            let count = u64::from(
                crate::batch::BatchHeader::parse(&b)
                    .unwrap()
                    .records_count() as u32,
            );
            let f = frame(offset, b);
            offset += count;
            position += f.len() as u64;
            out.push(f);
        }
        (out, bad)
    }

    fn found(v: &SegmentVerification) -> Vec<(u64, u64)> {
        v.bad.iter().map(|b| (b.offset, b.position)).collect()
    }

    #[test]
    fn verify_streams_a_segment_through_a_buffer_smaller_than_it() {
        let dir = tempfile::tempdir().unwrap();
        let (frames, bad) = frames(300, 37);
        let largest = frames.iter().map(Vec::len).max().unwrap();
        let path = segment(&dir, &frames, &[0; 10_000]);
        let file_bytes = std::fs::metadata(&path).unwrap().len();
        for read_bytes in [8, 4096, 10_000, 1 << 20] {
            let v = verify_segment_file_in_chunks(&path, read_bytes, MAX).unwrap();
            assert_eq!(found(&v), bad, "read_bytes {read_bytes}");
            assert_eq!(v.bytes_read, file_bytes, "read_bytes {read_bytes}");
            assert!(
                v.peak_buffer_bytes <= largest + 8 + 2 * read_bytes,
                "read_bytes {read_bytes}: peak {} for frames of at most {largest}",
                v.peak_buffer_bytes
            );
        }
        assert_eq!(
            verify_segment_file(&path).unwrap().len(),
            bad.len(),
            "the shipped chunk size"
        );
    }

    #[test]
    fn verify_reports_an_unreadable_frame_with_data_after_it_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (frames, _) = frames(40, 1000);
        let end: u64 = frames.iter().map(|f| f.len() as u64).sum();
        // A torn tail: half a frame, then zeros.
        let torn = frame(10_000, valid(50));
        let path = segment(&dir, &frames, &torn[..torn.len() / 2]);
        for read_bytes in [64, 1 << 20] {
            let v = verify_segment_file_in_chunks(&path, read_bytes, MAX).unwrap();
            assert!(v.bad.is_empty(), "read_bytes {read_bytes}: {:?}", v.bad);
        }
        // Garbage where a frame should start, zeros for 50 KB, then one non-zero byte.
        let mut tail = vec![0xA5; 40];
        tail.resize(50_000, 0);
        tail.push(1);
        let path = segment(&dir, &frames, &tail);
        for read_bytes in [64, 4096, 1 << 20] {
            let v = verify_segment_file_in_chunks(&path, read_bytes, MAX).unwrap();
            assert_eq!(v.bad.len(), 1, "read_bytes {read_bytes}");
            assert_eq!(v.bad[0].position, end);
            assert!(v.bad[0].reason.contains("unreadable frame"));
        }
    }

    #[test]
    fn verify_holds_one_frame_and_one_read_of_a_large_segment() {
        // 48 MiB of 1 MiB batches, one bad at the end, with the shipped limits: the buffer stays
        // at one frame and one read, whatever the segment's size.
        let dir = tempfile::tempdir().unwrap();
        let big = batch(&records(1000, 1040), 1000, 999, 0);
        let mut frames = Vec::new();
        for i in 0..48u64 {
            frames.push(frame(i * 1000, big.clone()));
        }
        frames.push(frame(48_000, batch(&records(2, 10), 5, 4, 0)));
        let path = segment(&dir, &frames, &[]);
        let file_bytes = std::fs::metadata(&path).unwrap().len();
        assert!(file_bytes > 48 << 20);
        let v =
            verify_segment_file_in_chunks(&path, VERIFY_READ_BYTES, crate::MAX_FRAME_PAYLOAD_BYTES)
                .unwrap();
        assert_eq!(v.bad.len(), 1);
        assert_eq!(v.bad[0].offset, 48_000);
        assert_eq!(v.bytes_read, file_bytes);
        assert!(
            v.peak_buffer_bytes <= frames[0].len() + 8 + 2 * VERIFY_READ_BYTES,
            "peak {} for a {file_bytes}-byte segment",
            v.peak_buffer_bytes
        );
    }

    #[test]
    fn xerial_snappy_is_accepted() {
        let section = records(100, 500);
        let mut framed = XERIAL_SNAPPY_HEADER.to_vec();
        for chunk in section.chunks(8 << 10) {
            let block = snap::raw::Encoder::new().compress_vec(chunk).unwrap();
            framed.extend_from_slice(&(block.len() as u32).to_be_bytes());
            framed.extend_from_slice(&block);
        }
        validate_batch(&batch(&framed, 100, 99, 2), MAX).unwrap();
        framed.pop();
        assert_eq!(
            refused(&batch(&framed, 100, 99, 2)).refusal,
            Refusal::CorruptMessage
        );
    }

    #[test]
    fn overlong_varints_are_refused() {
        let mut section = vec![0x80, 0x80, 0x80, 0x80, 0x80, 0x00];
        section.extend_from_slice(&[0; 10]);
        assert!(refused(&batch(&section, 1, 0, 0))
            .message
            .contains("varint"));
    }

    #[test]
    fn a_visitor_refuses_with_its_message() {
        struct NoNullKeys;
        impl RecordVisitor for NoNullKeys {
            fn record(&mut self, r: &RecordView<'_>) -> Result<(), String> {
                r.key.map(|_| ()).ok_or_else(|| "null key".to_string())
            }
        }
        let section = record(0, 0, None, Some(b"v"), &[]);
        let e = validate_batch_with(&batch(&section, 1, 0, 0), MAX, &mut NoNullKeys).unwrap_err();
        assert!(e.message.contains("null key"));
    }

    #[test]
    fn stored_validation_takes_the_cleaners_record_less_batches() {
        let span = crate::clean::empty_span_batch(10, 19, 5, 0);
        assert!(validate_batch(&span, MAX).is_err(), "never produced");
        validate_stored_batch(&span, MAX).unwrap();
        let mut longer = span.clone();
        longer.extend_from_slice(&[0; 4]);
        let len = (longer.len() - 12) as i32;
        longer[8..12].copy_from_slice(&len.to_be_bytes());
        assert!(validate_stored_batch(&longer, MAX).is_err());
        validate_stored_batch(&valid(3), MAX).unwrap();
    }
}
