//! The on-disk frame: a fixed-size rkyv-archived header in front of every stored batch.
//!
//! The header is read in place (no deserialisation) and carries everything recovery and reads need
//! without touching the Kafka batch: its length, offset span, max timestamp and leader epoch, and a
//! CRC-32C over the header fields and the payload. Frames start on 8-byte boundaries (the payload
//! is zero-padded) so the archived header is always aligned where it lies in a DMA buffer.

use rkyv::{rancor, Archive, Serialize};

use crate::batch::{BatchHeader, BATCH_HEADER_BYTES};

/// Bytes of an archived [`FrameHeader`].
pub const FRAME_HEADER_BYTES: usize = 32;
/// Every frame starts at a multiple of this many bytes within its segment.
pub const FRAME_ALIGN: usize = 8;
/// Bytes of the header covered by the CRC (every field before `crc`).
const CRC_COVERED_HEADER_BYTES: usize = 28;

#[derive(Archive, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct FrameHeader {
    pub base_offset: u64,
    pub max_timestamp: i64,
    pub payload_len: u32,
    pub last_offset_delta: u32,
    pub leader_epoch: i32,
    /// CRC-32C over the 28 header bytes before this field, then the payload.
    pub crc: u32,
}

const _: () = assert!(std::mem::size_of::<ArchivedFrameHeader>() == FRAME_HEADER_BYTES);

#[repr(C, align(8))]
struct AlignedHeaderBytes([u8; FRAME_HEADER_BYTES]);

/// Total bytes a frame with this payload occupies on disk (header, payload, padding).
pub fn frame_len(payload_len: usize) -> usize {
    (FRAME_HEADER_BYTES + payload_len).next_multiple_of(FRAME_ALIGN)
}

impl FrameHeader {
    /// Archives the header for `payload`, computing its CRC over the whole payload.
    pub fn encode(
        base_offset: u64,
        max_timestamp: i64,
        last_offset_delta: u32,
        leader_epoch: i32,
        payload: &[u8],
    ) -> [u8; FRAME_HEADER_BYTES] {
        let header = FrameHeader {
            base_offset,
            max_timestamp,
            payload_len: payload.len() as u32,
            last_offset_delta,
            leader_epoch,
            crc: 0,
        };
        seal(header, |covered| crc32c::crc32c_append(covered, payload))
    }

    /// [`Self::encode`] for a payload whose bytes from `tail_start` on are known to have
    /// CRC-32C `tail_crc` (a verified Kafka batch: its own CRC covers everything after the
    /// fields the log stamps). Reads only the header and `payload[..tail_start]`; the result
    /// is bit-identical to [`Self::encode`] when `tail_crc` is right.
    pub fn encode_with_tail_crc(
        base_offset: u64,
        max_timestamp: i64,
        last_offset_delta: u32,
        leader_epoch: i32,
        payload: &[u8],
        tail_start: usize,
        tail_crc: u32,
    ) -> [u8; FRAME_HEADER_BYTES] {
        assert!(
            tail_start <= payload.len(),
            "tail starts inside the payload"
        );
        let header = FrameHeader {
            base_offset,
            max_timestamp,
            payload_len: payload.len() as u32,
            last_offset_delta,
            leader_epoch,
            crc: 0,
        };
        seal(header, |covered| {
            let head = crc32c::crc32c_append(covered, &payload[..tail_start]);
            crate::crc::combine(head, tail_crc, payload.len() - tail_start)
        })
    }
}

/// Archives `header` with the CRC `finish` computes from the CRC of the covered header bytes.
fn seal(header: FrameHeader, finish: impl FnOnce(u32) -> u32) -> [u8; FRAME_HEADER_BYTES] {
    let mut bytes = archive(&header);
    let crc = finish(crc32c::crc32c(&bytes[..CRC_COVERED_HEADER_BYTES]));
    // The CRC is the last field: archived little-endian in the last four bytes.
    bytes[CRC_COVERED_HEADER_BYTES..].copy_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(archive(&FrameHeader { crc, ..header }), bytes);
    bytes
}

fn archive(header: &FrameHeader) -> [u8; FRAME_HEADER_BYTES] {
    let mut out = AlignedHeaderBytes([0; FRAME_HEADER_BYTES]);
    let written = rkyv::api::high::to_bytes_in::<_, rancor::Error>(
        header,
        rkyv::ser::writer::Buffer::from(&mut out.0[..]),
    )
    .expect("a frame header always fits its fixed-size buffer");
    assert_eq!(written.len(), FRAME_HEADER_BYTES);
    out.0
}

/// Why bytes at a position are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The buffer ends before the frame does; `need` is the whole frame's length.
    Incomplete { need: usize },
    /// The bytes are not a frame that belongs here (torn write, garbage, corruption).
    Invalid(String),
}

/// A validated frame, borrowed from the buffer it was decoded from.
pub struct Frame<'a> {
    pub header: &'a ArchivedFrameHeader,
    pub payload: &'a [u8],
    /// Bytes the frame occupies including padding.
    pub len: usize,
}

impl Frame<'_> {
    pub fn base_offset(&self) -> u64 {
        self.header.base_offset.to_native()
    }
    pub fn last_offset(&self) -> u64 {
        self.base_offset() + self.header.last_offset_delta.to_native() as u64
    }
    pub fn max_timestamp(&self) -> i64 {
        self.header.max_timestamp.to_native()
    }
    pub fn leader_epoch(&self) -> i32 {
        self.header.leader_epoch.to_native()
    }
}

/// Decodes and fully verifies the frame at the start of `buf` (8-byte aligned): CRC, lengths,
/// that it carries `expected_offset` (when given), and that its payload is a RecordBatch v2 whose
/// header agrees with the frame. `max_payload_bytes` caps the announced length before any use.
pub fn decode_frame(
    buf: &[u8],
    expected_offset: Option<u64>,
    max_payload_bytes: usize,
) -> Result<Frame<'_>, FrameError> {
    if buf.len() < FRAME_HEADER_BYTES {
        return Err(FrameError::Incomplete {
            need: FRAME_HEADER_BYTES,
        });
    }
    let header = rkyv::access::<ArchivedFrameHeader, rancor::Error>(&buf[..FRAME_HEADER_BYTES])
        .map_err(|e| FrameError::Invalid(format!("frame header: {e}")))?;
    let payload_len = header.payload_len.to_native() as usize;
    if payload_len < BATCH_HEADER_BYTES || payload_len > max_payload_bytes {
        return Err(FrameError::Invalid(format!(
            "frame payload length {payload_len} outside [{BATCH_HEADER_BYTES}, {max_payload_bytes}]"
        )));
    }
    let len = frame_len(payload_len);
    if buf.len() < FRAME_HEADER_BYTES + payload_len {
        return Err(FrameError::Incomplete { need: len });
    }
    let payload = &buf[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + payload_len];
    let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[..CRC_COVERED_HEADER_BYTES]), payload);
    if crc != header.crc.to_native() {
        return Err(FrameError::Invalid(format!(
            "frame CRC-32C mismatch: stored {:#010x}, computed {crc:#010x}",
            header.crc.to_native()
        )));
    }
    let frame = Frame {
        header,
        payload,
        len,
    };
    if let Some(expected) = expected_offset {
        if frame.base_offset() != expected {
            return Err(FrameError::Invalid(format!(
                "frame base offset {} where {expected} was expected",
                frame.base_offset()
            )));
        }
    }
    let batch = BatchHeader::parse(payload).map_err(|e| FrameError::Invalid(e.to_string()))?;
    if batch.base_offset() as u64 != frame.base_offset()
        || batch.last_offset_delta() as u32 != header.last_offset_delta.to_native()
    {
        return Err(FrameError::Invalid(
            "frame header disagrees with its batch header".into(),
        ));
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::build_batch;

    #[repr(C, align(8))]
    struct Aligned([u8; 512]);

    fn frame_bytes(payload: &[u8], base: u64) -> Aligned {
        let mut out = Aligned([0; 512]);
        let header = FrameHeader::encode(base, 77, 0, 5, payload);
        out.0[..FRAME_HEADER_BYTES].copy_from_slice(&header);
        out.0[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + payload.len()].copy_from_slice(payload);
        out
    }

    #[test]
    fn round_trip_in_place() {
        let mut payload = build_batch(&[9u8; 100], 1, 0, 77);
        crate::batch::stamp(&mut payload, 42, 5);
        let buf = frame_bytes(&payload, 42);
        let f = decode_frame(&buf.0, Some(42), 1 << 20).unwrap();
        assert_eq!((f.base_offset(), f.last_offset()), (42, 42));
        assert_eq!((f.max_timestamp(), f.leader_epoch()), (77, 5));
        assert_eq!(f.payload, &payload[..]);
        assert_eq!(f.len, frame_len(payload.len()));
        assert_eq!(f.len % FRAME_ALIGN, 0);
    }

    #[test]
    fn tail_crc_gives_the_same_header() {
        for records in [0usize, 1, 7, 100, 4096, 100_000] {
            let mut payload = build_batch(&vec![5u8; records], 3, 1, 2);
            crate::batch::stamp(&mut payload, 1234, 9);
            let tail_crc = crc32c::crc32c(&payload[crate::batch::CRC_COVERED_START..]);
            let full = FrameHeader::encode(1234, 2, 2, 9, &payload);
            let derived = FrameHeader::encode_with_tail_crc(
                1234,
                2,
                2,
                9,
                &payload,
                crate::batch::CRC_COVERED_START,
                tail_crc,
            );
            assert_eq!(full, derived, "{records} record bytes");
            // A wrong tail CRC gives a frame that fails its check.
            let bad = FrameHeader::encode_with_tail_crc(
                1234,
                2,
                2,
                9,
                &payload,
                crate::batch::CRC_COVERED_START,
                tail_crc ^ 1,
            );
            assert_ne!(full, bad);
        }
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let mut payload = build_batch(&[1u8; 40], 1, 0, 0);
        crate::batch::stamp(&mut payload, 3, 0);
        let end = FRAME_HEADER_BYTES + payload.len();
        for i in 0..end {
            let mut buf = frame_bytes(&payload, 3);
            buf.0[i] ^= 0x08;
            // A damaged length may announce more bytes than the buffer has: the caller then
            // reads further and the CRC fails, or the frame runs past the end of the data.
            match decode_frame(&buf.0, Some(3), 1 << 20) {
                Err(FrameError::Invalid(_)) => {}
                Err(FrameError::Incomplete { need }) => assert!(need > buf.0.len(), "flip at {i}"),
                Ok(_) => panic!("flip at {i} went unnoticed"),
            }
        }
    }

    #[test]
    fn short_buffers_and_wrong_offsets() {
        let mut payload = build_batch(&[1u8; 40], 1, 0, 0);
        crate::batch::stamp(&mut payload, 3, 0);
        let buf = frame_bytes(&payload, 3);
        assert!(matches!(
            decode_frame(&buf.0[..FRAME_HEADER_BYTES + 10], Some(3), 1 << 20),
            Err(FrameError::Incomplete { .. })
        ));
        assert!(matches!(
            decode_frame(&buf.0, Some(4), 1 << 20),
            Err(FrameError::Invalid(_))
        ));
        assert!(matches!(
            decode_frame(&buf.0, Some(3), 64),
            Err(FrameError::Invalid(_))
        ));
        assert!(matches!(
            decode_frame(&[0u8; 64], None, 1 << 20),
            Err(FrameError::Invalid(_)) | Err(FrameError::Incomplete { .. })
        ));
    }
}
