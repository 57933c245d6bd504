//! A read-only view of a Kafka RecordBatch v2 header, plus the two fields the log stamps.
//!
//! The engine treats batches as opaque payloads: it reads the header to learn the offset span and
//! the max timestamp, and writes only `baseOffset` and `partitionLeaderEpoch`, which lie before the
//! CRC-covered region, so the producer's CRC-32C stays valid.

use bytes::{Bytes, BytesMut};

use crate::error::EngineError;

/// Bytes of the fixed RecordBatch v2 header (up to and including the record count).
pub const BATCH_HEADER_BYTES: usize = 61;
/// Offset of the first byte covered by the batch CRC (the attributes field).
pub const CRC_COVERED_START: usize = 21;
/// The only record batch format the broker accepts.
pub const MAGIC_V2: i8 = 2;

const BASE_OFFSET: usize = 0;
const BATCH_LENGTH: usize = 8;
const LEADER_EPOCH: usize = 12;
const MAGIC: usize = 16;
const CRC: usize = 17;
const ATTRIBUTES: usize = 21;
const LAST_OFFSET_DELTA: usize = 23;
const BASE_TIMESTAMP: usize = 27;
const MAX_TIMESTAMP: usize = 35;
const PRODUCER_ID: usize = 43;
const PRODUCER_EPOCH: usize = 51;
const BASE_SEQUENCE: usize = 53;
const RECORDS_COUNT: usize = 57;

/// Header of one RecordBatch v2, borrowed from the batch bytes.
#[derive(Clone, Copy)]
pub struct BatchHeader<'a> {
    bytes: &'a [u8],
}

fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}
fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be_i64(b: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl<'a> BatchHeader<'a> {
    /// Checks the header is complete, the magic is 2, and `batchLength` matches the slice
    /// exactly (one batch, no trailing bytes). Does not check the CRC: see [`Self::verify_crc`].
    pub fn parse(bytes: &'a [u8]) -> Result<Self, EngineError> {
        if bytes.len() < BATCH_HEADER_BYTES {
            return Err(EngineError::InvalidBatch(format!(
                "batch of {} bytes is shorter than the {BATCH_HEADER_BYTES}-byte header",
                bytes.len()
            )));
        }
        let header = BatchHeader { bytes };
        if header.magic() != MAGIC_V2 {
            return Err(EngineError::InvalidBatch(format!(
                "magic {} is not 2",
                header.magic()
            )));
        }
        let expected = header.batch_length() as i64 + BATCH_LENGTH as i64 + 4;
        if header.batch_length() < 0 || expected != bytes.len() as i64 {
            return Err(EngineError::InvalidBatch(format!(
                "batchLength {} does not match {} bytes",
                header.batch_length(),
                bytes.len()
            )));
        }
        if header.last_offset_delta() < 0 {
            return Err(EngineError::InvalidBatch(format!(
                "negative lastOffsetDelta {}",
                header.last_offset_delta()
            )));
        }
        Ok(header)
    }

    /// Total bytes of the batch this header announces (`batchLength` + 12), read from the first
    /// 12 bytes of a buffer: how a stream of concatenated batches is split.
    pub fn total_len_from_prefix(prefix: &[u8]) -> Option<usize> {
        if prefix.len() < 12 {
            return None;
        }
        let len = be_i32(prefix, BATCH_LENGTH);
        if len < 0 {
            return None;
        }
        Some(len as usize + 12)
    }

    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
    pub fn base_offset(&self) -> i64 {
        be_i64(self.bytes, BASE_OFFSET)
    }
    pub fn batch_length(&self) -> i32 {
        be_i32(self.bytes, BATCH_LENGTH)
    }
    pub fn partition_leader_epoch(&self) -> i32 {
        be_i32(self.bytes, LEADER_EPOCH)
    }
    pub fn magic(&self) -> i8 {
        self.bytes[MAGIC] as i8
    }
    pub fn crc(&self) -> u32 {
        be_i32(self.bytes, CRC) as u32
    }
    pub fn attributes(&self) -> i16 {
        be_i16(self.bytes, ATTRIBUTES)
    }
    /// Compression codec: 0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd.
    pub fn compression(&self) -> u8 {
        (self.attributes() & 0x7) as u8
    }
    pub fn is_transactional(&self) -> bool {
        self.attributes() & 0x10 != 0
    }
    pub fn is_control(&self) -> bool {
        self.attributes() & 0x20 != 0
    }
    pub fn last_offset_delta(&self) -> i32 {
        be_i32(self.bytes, LAST_OFFSET_DELTA)
    }
    pub fn base_timestamp(&self) -> i64 {
        be_i64(self.bytes, BASE_TIMESTAMP)
    }
    pub fn max_timestamp(&self) -> i64 {
        be_i64(self.bytes, MAX_TIMESTAMP)
    }
    pub fn producer_id(&self) -> i64 {
        be_i64(self.bytes, PRODUCER_ID)
    }
    pub fn producer_epoch(&self) -> i16 {
        be_i16(self.bytes, PRODUCER_EPOCH)
    }
    pub fn base_sequence(&self) -> i32 {
        be_i32(self.bytes, BASE_SEQUENCE)
    }
    pub fn records_count(&self) -> i32 {
        be_i32(self.bytes, RECORDS_COUNT)
    }
    /// Offset of the last record: `baseOffset + lastOffsetDelta`.
    pub fn last_offset(&self) -> i64 {
        self.base_offset() + self.last_offset_delta() as i64
    }

    /// CRC-32C over attributes..end, as the producer computed it.
    pub fn computed_crc(&self) -> u32 {
        crc32c::crc32c(&self.bytes[CRC_COVERED_START..])
    }
    pub fn verify_crc(&self) -> Result<(), EngineError> {
        let (stored, computed) = (self.crc(), self.computed_crc());
        if stored != computed {
            return Err(EngineError::InvalidBatch(format!(
                "CRC-32C mismatch: stored {stored:#010x}, computed {computed:#010x}"
            )));
        }
        Ok(())
    }
}

/// A RecordBatch v2 whose header was checked ([`BatchHeader::parse`]) and whose CRC-32C was
/// verified. The log only appends these: it stamps base offset and leader epoch in place (no
/// copy), and derives its frame CRC from the verified batch CRC instead of reading the batch a
/// second time. A batch held in a buffer other handles share (a slice of a follower's received
/// frame) is kept shared: it is copied only if stamping would change its bytes, which a
/// follower's batch, already carrying its leader's offset and epoch, never needs.
#[derive(Debug)]
pub struct VerifiedBatch {
    bytes: BatchBytes,
}

#[derive(Debug)]
enum BatchBytes {
    /// The holder alone may write these.
    Owned(BytesMut),
    /// Other handles may see these: never written in place.
    Shared(Bytes),
}

impl BatchBytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            BatchBytes::Owned(b) => b,
            BatchBytes::Shared(b) => b,
        }
    }
}

impl VerifiedBatch {
    /// Checks `bytes` is exactly one RecordBatch v2 with a valid CRC-32C.
    pub fn new(bytes: BytesMut) -> Result<Self, EngineError> {
        let header = BatchHeader::parse(&bytes)?;
        header.verify_crc()?;
        Ok(VerifiedBatch {
            bytes: BatchBytes::Owned(bytes),
        })
    }

    /// [`Self::new`] for a `Bytes`: used in place, shared or not (see the type's comment).
    pub fn from_bytes(bytes: Bytes) -> Result<Self, EngineError> {
        match bytes.try_into_mut() {
            Ok(unique) => Self::new(unique),
            Err(shared) => {
                BatchHeader::parse(&shared)?.verify_crc()?;
                Ok(VerifiedBatch {
                    bytes: BatchBytes::Shared(shared),
                })
            }
        }
    }

    /// A batch whose CRC-32C the caller has verified on exactly these bytes (a follower checks
    /// each batch when its leader's append arrives, and appends it moments later): the header
    /// is checked again, the CRC only in debug builds, which saves reading the batch twice on
    /// the replication path.
    pub fn already_verified(bytes: Bytes) -> Result<Self, EngineError> {
        let header = BatchHeader::parse(&bytes)?;
        debug_assert!(header.verify_crc().is_ok(), "the caller verified the CRC");
        Ok(VerifiedBatch {
            bytes: BatchBytes::Shared(bytes),
        })
    }

    pub fn header(&self) -> BatchHeader<'_> {
        BatchHeader {
            bytes: self.bytes.as_slice(),
        }
    }

    pub fn len(&self) -> usize {
        self.bytes.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.as_slice().is_empty()
    }

    /// The CRC-32C the batch carries (verified): it covers bytes [`CRC_COVERED_START`]`..`.
    pub fn crc(&self) -> u32 {
        self.header().crc()
    }

    /// The bytes to write in place, copied first if they are shared.
    fn owned(&mut self) -> &mut BytesMut {
        if let BatchBytes::Shared(b) = &self.bytes {
            self.bytes = BatchBytes::Owned(BytesMut::from(&b[..]));
        }
        match &mut self.bytes {
            BatchBytes::Owned(b) => b,
            BatchBytes::Shared(_) => unreachable!("made owned above"),
        }
    }

    /// LogAppendTime: the one header rewrite a leader makes (attributes bit, max timestamp,
    /// CRC), as Kafka does; the records stay untouched.
    pub fn set_log_append_time(&mut self, append_time_ms: i64) {
        crate::records::set_log_append_time(self.owned(), append_time_ms)
            .expect("a verified batch has a header");
    }

    /// Stamps base offset and leader epoch (outside the CRC-covered bytes, so [`Self::crc`]
    /// stays valid) and hands the batch out for storing.
    pub(crate) fn stamp_into(mut self, base_offset: i64, leader_epoch: i32) -> Bytes {
        if let BatchBytes::Shared(b) = &self.bytes {
            let h = BatchHeader { bytes: b };
            if h.base_offset() == base_offset && h.partition_leader_epoch() == leader_epoch {
                return b.clone();
            }
        }
        stamp(self.owned(), base_offset, leader_epoch);
        match self.bytes {
            BatchBytes::Owned(b) => b.freeze(),
            BatchBytes::Shared(_) => unreachable!("made owned by the stamp"),
        }
    }
}

/// Writes the assigned base offset and leader epoch into a batch's header. Both lie outside the
/// CRC-covered region, so the batch CRC stays valid.
pub fn stamp(batch: &mut [u8], base_offset: i64, leader_epoch: i32) {
    assert!(batch.len() >= BATCH_HEADER_BYTES, "stamp on a short batch");
    batch[BASE_OFFSET..BASE_OFFSET + 8].copy_from_slice(&base_offset.to_be_bytes());
    batch[LEADER_EPOCH..LEADER_EPOCH + 4].copy_from_slice(&leader_epoch.to_be_bytes());
}

/// Builds a well-formed RecordBatch v2 with an opaque records section, for tests and benches
/// (the engine never looks inside records). The CRC is valid; base offset and epoch are zero.
pub fn build_batch(
    records: &[u8],
    records_count: i32,
    base_timestamp: i64,
    max_timestamp: i64,
) -> Vec<u8> {
    let mut b = vec![0u8; BATCH_HEADER_BYTES];
    b.extend_from_slice(records);
    let total = b.len();
    b[BATCH_LENGTH..BATCH_LENGTH + 4].copy_from_slice(&((total - 12) as i32).to_be_bytes());
    b[MAGIC] = MAGIC_V2 as u8;
    b[LAST_OFFSET_DELTA..LAST_OFFSET_DELTA + 4]
        .copy_from_slice(&(records_count.max(1) - 1).to_be_bytes());
    b[BASE_TIMESTAMP..BASE_TIMESTAMP + 8].copy_from_slice(&base_timestamp.to_be_bytes());
    b[MAX_TIMESTAMP..MAX_TIMESTAMP + 8].copy_from_slice(&max_timestamp.to_be_bytes());
    b[PRODUCER_ID..PRODUCER_ID + 8].copy_from_slice(&(-1i64).to_be_bytes());
    b[PRODUCER_EPOCH..PRODUCER_EPOCH + 2].copy_from_slice(&(-1i16).to_be_bytes());
    b[BASE_SEQUENCE..BASE_SEQUENCE + 4].copy_from_slice(&(-1i32).to_be_bytes());
    b[RECORDS_COUNT..RECORDS_COUNT + 4].copy_from_slice(&records_count.to_be_bytes());
    let crc = crc32c::crc32c(&b[CRC_COVERED_START..]);
    b[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unique_batch_is_stamped_in_place_and_a_shared_one_is_copied() {
        let unique = Bytes::from(build_batch(&[7u8; 300], 2, 0, 0));
        let at = unique.as_ptr();
        let stamped = VerifiedBatch::from_bytes(unique).unwrap().stamp_into(42, 3);
        assert_eq!(stamped.as_ptr(), at, "no copy of a unique batch");
        let h = BatchHeader::parse(&stamped).unwrap();
        assert_eq!((h.base_offset(), h.partition_leader_epoch()), (42, 3));
        h.verify_crc().unwrap();

        let shared = Bytes::from(build_batch(&[7u8; 300], 2, 0, 0));
        let other = shared.clone();
        let stamped = VerifiedBatch::from_bytes(shared).unwrap().stamp_into(42, 3);
        assert_ne!(stamped.as_ptr(), other.as_ptr());
        assert_eq!(
            BatchHeader::parse(&other).unwrap().base_offset(),
            0,
            "not written through"
        );

        // A shared batch already carrying the offset and epoch (a follower's) stays shared.
        let mut b = build_batch(&[7u8; 300], 2, 0, 0);
        stamp(&mut b, 42, 3);
        let shared = Bytes::from(b);
        let other = shared.clone();
        let stored = VerifiedBatch::from_bytes(shared).unwrap().stamp_into(42, 3);
        assert_eq!(
            stored.as_ptr(),
            other.as_ptr(),
            "no copy of a follower's batch"
        );
        let stored = VerifiedBatch::already_verified(other.clone())
            .unwrap()
            .stamp_into(42, 3);
        assert_eq!(stored.as_ptr(), other.as_ptr());
        // LogAppendTime on a shared batch writes a copy, not through the other handle.
        let mut v = VerifiedBatch::from_bytes(other.clone()).unwrap();
        v.set_log_append_time(99);
        let stamped = v.stamp_into(42, 3);
        assert_ne!(stamped.as_ptr(), other.as_ptr());
        BatchHeader::parse(&stamped).unwrap().verify_crc().unwrap();
        assert_eq!(BatchHeader::parse(&other).unwrap().max_timestamp(), 0);
    }

    #[test]
    fn a_shared_batch_is_checked_and_a_short_one_refused_unverified() {
        let mut b = build_batch(&[7u8; 300], 2, 0, 0);
        b[CRC_COVERED_START + 20] ^= 1;
        let shared = Bytes::from(b);
        let _keep = shared.clone();
        assert!(
            VerifiedBatch::from_bytes(shared).is_err(),
            "CRC checked when shared"
        );
        let short = Bytes::from(vec![0u8; 10]);
        assert!(VerifiedBatch::already_verified(short).is_err());
    }

    #[test]
    fn a_bad_crc_is_refused() {
        let mut b = build_batch(&[7u8; 300], 2, 0, 0);
        b[100] ^= 1;
        assert!(matches!(
            VerifiedBatch::new(BytesMut::from(&b[..])),
            Err(EngineError::InvalidBatch(_))
        ));
    }
}
