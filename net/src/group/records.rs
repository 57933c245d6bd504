//! The records of the internal `__consumer_offsets` topic: committed offsets and group metadata.
//!
//! Keys and values use the layouts of Kafka's own `__consumer_offsets` records (offset key v1,
//! offset value v3, group metadata key v2, group metadata value v3), so the topic can be read
//! by Kafka's tooling. A record with a null value is a tombstone. Records travel in ordinary
//! RecordBatch v2 batches, so the storage engine keeps them like any other batch.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

/// Name of the internal topic.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";

/// Key schema versions (Kafka: 0 and 1 are offset keys, 2 is the group metadata key).
const OFFSET_KEY_VERSION: i16 = 1;
const GROUP_KEY_VERSION: i16 = 2;
const OFFSET_VALUE_VERSION: i16 = 3;
const GROUP_VALUE_VERSION: i16 = 3;

/// Longest string a record field may hold (a Kafka `STRING` has an i16 length).
pub const MAX_STRING_BYTES: usize = i16::MAX as usize;
/// Most members decoded from one group metadata value.
pub const MAX_DECODED_MEMBERS: usize = 100_000;

/// Why bytes read back from `__consumer_offsets` are not a record this module wrote.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GroupRecordError {
    #[error("record truncated while reading {0}")]
    Truncated(&'static str),
    #[error("unknown {what} schema version {version}")]
    UnknownVersion { what: &'static str, version: i16 },
    #[error("invalid {0}")]
    Invalid(&'static str),
    #[error("{0} bytes left over after the record")]
    TrailingBytes(usize),
    #[error("record batch does not decode: {0}")]
    Batch(String),
    #[error("record without a key")]
    MissingKey,
}

/// The committed position of one partition for one group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OffsetValue {
    pub offset: i64,
    /// -1 when the client did not send one.
    pub leader_epoch: i32,
    pub metadata: String,
    pub commit_timestamp_ms: i64,
}

/// One member as stored in a group metadata record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberMetadata {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub rebalance_timeout_ms: i32,
    pub session_timeout_ms: i32,
    /// The member's metadata for the selected protocol.
    pub subscription: Bytes,
    pub assignment: Bytes,
}

/// A snapshot of a group after a rebalance completed (or the group emptied).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMetadataValue {
    pub protocol_type: String,
    pub generation: i32,
    pub protocol: Option<String>,
    pub leader: Option<String>,
    pub state_timestamp_ms: i64,
    pub members: Vec<MemberMetadata>,
}

/// One record of `__consumer_offsets`; `None` values are tombstones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OffsetsRecord {
    Offset {
        group_id: String,
        topic: String,
        partition: i32,
        value: Option<OffsetValue>,
    },
    Group {
        group_id: String,
        value: Option<GroupMetadataValue>,
    },
}

impl OffsetsRecord {
    pub fn group_id(&self) -> &str {
        match self {
            OffsetsRecord::Offset { group_id, .. } | OffsetsRecord::Group { group_id, .. } => {
                group_id
            }
        }
    }

    pub fn encode_key(&self) -> Bytes {
        let mut buf = BytesMut::new();
        match self {
            OffsetsRecord::Offset {
                group_id,
                topic,
                partition,
                ..
            } => {
                buf.put_i16(OFFSET_KEY_VERSION);
                put_string(&mut buf, group_id);
                put_string(&mut buf, topic);
                buf.put_i32(*partition);
            }
            OffsetsRecord::Group { group_id, .. } => {
                buf.put_i16(GROUP_KEY_VERSION);
                put_string(&mut buf, group_id);
            }
        }
        buf.freeze()
    }

    /// The value bytes, `None` for a tombstone.
    pub fn encode_value(&self) -> Option<Bytes> {
        let mut buf = BytesMut::new();
        match self {
            OffsetsRecord::Offset { value, .. } => {
                let v = value.as_ref()?;
                buf.put_i16(OFFSET_VALUE_VERSION);
                buf.put_i64(v.offset);
                buf.put_i32(v.leader_epoch);
                put_string(&mut buf, &v.metadata);
                buf.put_i64(v.commit_timestamp_ms);
            }
            OffsetsRecord::Group { value, .. } => {
                let v = value.as_ref()?;
                buf.put_i16(GROUP_VALUE_VERSION);
                put_string(&mut buf, &v.protocol_type);
                buf.put_i32(v.generation);
                put_nullable_string(&mut buf, v.protocol.as_deref());
                put_nullable_string(&mut buf, v.leader.as_deref());
                buf.put_i64(v.state_timestamp_ms);
                buf.put_i32(v.members.len() as i32);
                for m in &v.members {
                    put_string(&mut buf, &m.member_id);
                    put_nullable_string(&mut buf, m.group_instance_id.as_deref());
                    put_string(&mut buf, &m.client_id);
                    put_string(&mut buf, &m.client_host);
                    buf.put_i32(m.rebalance_timeout_ms);
                    buf.put_i32(m.session_timeout_ms);
                    put_bytes(&mut buf, &m.subscription);
                    put_bytes(&mut buf, &m.assignment);
                }
            }
        }
        Some(buf.freeze())
    }

    /// Decodes one record from its key and value bytes.
    pub fn decode(key: &[u8], value: Option<&[u8]>) -> Result<Self, GroupRecordError> {
        RecordView::decode(key, value).map(RecordView::into_owned)
    }
}

/// A record of `__consumer_offsets` borrowing its strings from the bytes it was decoded from:
/// start-up replays every record of the log, most of them commits of an offset that a later
/// record replaces, so copying their strings would be most of the work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordView<'a> {
    Offset {
        group_id: &'a str,
        topic: &'a str,
        partition: i32,
        value: Option<OffsetValueView<'a>>,
    },
    /// Group metadata records are rare (one per rebalance) and decoded whole.
    Group {
        group_id: &'a str,
        value: Option<GroupMetadataValue>,
    },
}

/// [`OffsetValue`] borrowing its metadata string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffsetValueView<'a> {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: &'a str,
    pub commit_timestamp_ms: i64,
}

impl OffsetValueView<'_> {
    pub fn to_value(self) -> OffsetValue {
        OffsetValue {
            offset: self.offset,
            leader_epoch: self.leader_epoch,
            metadata: self.metadata.to_owned(),
            commit_timestamp_ms: self.commit_timestamp_ms,
        }
    }
}

impl OffsetValue {
    pub fn view(&self) -> OffsetValueView<'_> {
        OffsetValueView {
            offset: self.offset,
            leader_epoch: self.leader_epoch,
            metadata: &self.metadata,
            commit_timestamp_ms: self.commit_timestamp_ms,
        }
    }
}

impl<'a> RecordView<'a> {
    /// Decodes one record from its key and value bytes.
    pub fn decode(key: &'a [u8], value: Option<&'a [u8]>) -> Result<Self, GroupRecordError> {
        let mut k = key;
        let version = get_i16(&mut k, "key version")?;
        let record = match version {
            0 | 1 => {
                let group_id = get_str(&mut k, "group id")?;
                let topic = get_str(&mut k, "topic")?;
                let partition = get_i32(&mut k, "partition")?;
                let value = value.map(decode_offset_value).transpose()?;
                RecordView::Offset {
                    group_id,
                    topic,
                    partition,
                    value,
                }
            }
            GROUP_KEY_VERSION => {
                let group_id = get_str(&mut k, "group id")?;
                let value = value.map(decode_group_value).transpose()?;
                RecordView::Group { group_id, value }
            }
            version => {
                return Err(GroupRecordError::UnknownVersion {
                    what: "key",
                    version,
                })
            }
        };
        if !k.is_empty() {
            return Err(GroupRecordError::TrailingBytes(k.len()));
        }
        Ok(record)
    }

    pub fn group_id(&self) -> &'a str {
        match self {
            RecordView::Offset { group_id, .. } | RecordView::Group { group_id, .. } => group_id,
        }
    }

    pub fn into_owned(self) -> OffsetsRecord {
        match self {
            RecordView::Offset {
                group_id,
                topic,
                partition,
                value,
            } => OffsetsRecord::Offset {
                group_id: group_id.to_owned(),
                topic: topic.to_owned(),
                partition,
                value: value.map(OffsetValueView::to_value),
            },
            RecordView::Group { group_id, value } => OffsetsRecord::Group {
                group_id: group_id.to_owned(),
                value,
            },
        }
    }
}

fn decode_offset_value(mut v: &[u8]) -> Result<OffsetValueView<'_>, GroupRecordError> {
    let version = get_i16(&mut v, "offset value version")?;
    if version != OFFSET_VALUE_VERSION {
        return Err(GroupRecordError::UnknownVersion {
            what: "offset value",
            version,
        });
    }
    let value = OffsetValueView {
        offset: get_i64(&mut v, "offset")?,
        leader_epoch: get_i32(&mut v, "leader epoch")?,
        metadata: get_str(&mut v, "metadata")?,
        commit_timestamp_ms: get_i64(&mut v, "commit timestamp")?,
    };
    if !v.is_empty() {
        return Err(GroupRecordError::TrailingBytes(v.len()));
    }
    Ok(value)
}

fn decode_group_value(mut v: &[u8]) -> Result<GroupMetadataValue, GroupRecordError> {
    let version = get_i16(&mut v, "group value version")?;
    if version != GROUP_VALUE_VERSION {
        return Err(GroupRecordError::UnknownVersion {
            what: "group value",
            version,
        });
    }
    let protocol_type = get_string(&mut v, "protocol type")?;
    let generation = get_i32(&mut v, "generation")?;
    let protocol = get_nullable_string(&mut v, "protocol")?;
    let leader = get_nullable_string(&mut v, "leader")?;
    let state_timestamp_ms = get_i64(&mut v, "state timestamp")?;
    let count = get_i32(&mut v, "member count")?;
    let count = usize::try_from(count).map_err(|_| GroupRecordError::Invalid("member count"))?;
    if count > MAX_DECODED_MEMBERS {
        return Err(GroupRecordError::Invalid("member count"));
    }
    // Each member takes at least 28 bytes, which bounds the allocation by the input size.
    let mut members = Vec::with_capacity(count.min(v.len() / 28));
    for _ in 0..count {
        members.push(MemberMetadata {
            member_id: get_string(&mut v, "member id")?,
            group_instance_id: get_nullable_string(&mut v, "group instance id")?,
            client_id: get_string(&mut v, "client id")?,
            client_host: get_string(&mut v, "client host")?,
            rebalance_timeout_ms: get_i32(&mut v, "rebalance timeout")?,
            session_timeout_ms: get_i32(&mut v, "session timeout")?,
            subscription: get_bytes(&mut v, "subscription")?,
            assignment: get_bytes(&mut v, "assignment")?,
        });
    }
    if !v.is_empty() {
        return Err(GroupRecordError::TrailingBytes(v.len()));
    }
    Ok(GroupMetadataValue {
        protocol_type,
        generation,
        protocol,
        leader,
        state_timestamp_ms,
        members,
    })
}

/// A record of `__consumer_offsets` as stored: its key, and its value (`None`: a tombstone).
pub type RawRecord = (Bytes, Option<Bytes>);

impl OffsetsRecord {
    pub fn to_raw(&self) -> RawRecord {
        (self.encode_key(), self.encode_value())
    }
}

/// Encodes records as one uncompressed RecordBatch v2 (base offset 0: the log assigns the real
/// one). `timestamp_ms` becomes every record's create time.
pub fn encode_batch(records: &[OffsetsRecord], timestamp_ms: i64) -> Bytes {
    let raw: Vec<RawRecord> = records.iter().map(OffsetsRecord::to_raw).collect();
    encode_raw_batch(&raw, timestamp_ms)
}

/// [`encode_batch`] for records already encoded.
pub fn encode_raw_batch(records: &[RawRecord], timestamp_ms: i64) -> Bytes {
    assert!(!records.is_empty(), "an empty batch is never written");
    let kafka_records: Vec<Record> = records
        .iter()
        .enumerate()
        .map(|(i, (key, value))| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            // The encoder starts a new batch wherever `offset - sequence` changes; with no
            // producer id the sequence is meaningless, and -1 for the first record keeps the
            // batch's base sequence at the "none" value.
            sequence: i as i32 - 1,
            timestamp: timestamp_ms,
            key: Some(key.clone()),
            value: value.clone(),
            headers: Default::default(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &kafka_records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    // Encoding uncompressed records into memory has no failure mode but a bug.
    .expect("encoding an uncompressed record batch");
    buf.freeze()
}

/// Decodes every record of one or more concatenated RecordBatch v2 batches.
pub fn decode_batches(bytes: Bytes) -> Result<Vec<OffsetsRecord>, GroupRecordError> {
    decode_raw_batches(bytes)?
        .iter()
        .map(|(key, value)| OffsetsRecord::decode(key, value.as_deref()))
        .collect()
}

/// The keys and values of every record of one or more concatenated RecordBatch v2 batches
/// (control records skipped).
pub fn decode_raw_batches(bytes: Bytes) -> Result<Vec<RawRecord>, GroupRecordError> {
    let mut buf = bytes;
    let sets = RecordBatchDecoder::decode_all(&mut buf)
        .map_err(|e| GroupRecordError::Batch(e.to_string()))?;
    let mut out = Vec::new();
    for set in sets {
        for record in set.records {
            if record.control {
                continue;
            }
            let key = record.key.ok_or(GroupRecordError::MissingKey)?;
            out.push((key, record.value));
        }
    }
    Ok(out)
}

/// Bytes of a RecordBatch v2 header, up to its first record.
const BATCH_HEADER_BYTES: usize = 61;
/// The batch attributes' compression codec bits and control flag.
const ATTR_COMPRESSION: i16 = 0x07;
const ATTR_CONTROL: i16 = 0x20;
/// Fewest bytes a record takes (length, attributes, timestamp and offset deltas, key and value
/// lengths, header count): bounds the allocation a batch's stored record count can ask for.
const MIN_RECORD_BYTES: usize = 7;

/// `decode` of the key and value (`None`: a tombstone) of every record of one stored
/// RecordBatch v2 (its whole bytes, as a log read returns them), borrowed from it; none for a
/// control batch. `Ok(None)` for a compressed
/// batch, which [`decode_raw_batches`] decodes instead (the coordinator never writes one). The
/// batch CRC is not checked again: the log checked its frame's CRC-32C, which covers the whole
/// batch, when it read it (and replay checks every record's bounds and fields regardless).
pub fn uncompressed_records<'a, T>(
    batch: &'a [u8],
    mut decode: impl FnMut(&'a [u8], Option<&'a [u8]>) -> Result<T, GroupRecordError>,
) -> Result<Option<Vec<T>>, GroupRecordError> {
    let bad = |what: &str| GroupRecordError::Batch(what.to_string());
    if batch.len() < BATCH_HEADER_BYTES {
        return Err(bad("shorter than a batch header"));
    }
    let be_i32 = |at: usize| i32::from_be_bytes(batch[at..at + 4].try_into().expect("4 bytes"));
    if usize::try_from(be_i32(8))
        .ok()
        .and_then(|n| n.checked_add(12))
        != Some(batch.len())
    {
        return Err(bad("batch length does not match its bytes"));
    }
    if batch[16] != 2 {
        return Err(bad("not a v2 record batch"));
    }
    let attributes = i16::from_be_bytes([batch[21], batch[22]]);
    if attributes & ATTR_COMPRESSION != 0 {
        return Ok(None);
    }
    if attributes & ATTR_CONTROL != 0 {
        return Ok(Some(Vec::new()));
    }
    let count = usize::try_from(be_i32(57)).map_err(|_| bad("negative record count"))?;
    let mut rest = &batch[BATCH_HEADER_BYTES..];
    let mut out = Vec::with_capacity(count.min(rest.len() / MIN_RECORD_BYTES));
    for _ in 0..count {
        let len = usize::try_from(varint(&mut rest)?).map_err(|_| bad("negative record length"))?;
        if rest.len() < len {
            return Err(GroupRecordError::Truncated("record"));
        }
        let (mut r, after) = rest.split_at(len);
        rest = after;
        let _attributes = take(&mut r, 1)?;
        let _timestamp_delta = varint(&mut r)?;
        let _offset_delta = varint(&mut r)?;
        let key = nullable_bytes(&mut r)?.ok_or(GroupRecordError::MissingKey)?;
        let value = nullable_bytes(&mut r)?;
        let headers = varint(&mut r)?;
        for _ in 0..headers.max(0) {
            nullable_bytes(&mut r)?.ok_or_else(|| bad("null header key"))?;
            nullable_bytes(&mut r)?;
        }
        if headers < 0 || !r.is_empty() {
            return Err(bad("record length does not match its fields"));
        }
        out.push(decode(key, value)?);
    }
    if !rest.is_empty() {
        return Err(GroupRecordError::TrailingBytes(rest.len()));
    }
    Ok(Some(out))
}

/// A zigzag varint of up to 64 bits (Kafka's varint and varlong).
fn varint(b: &mut &[u8]) -> Result<i64, GroupRecordError> {
    let mut raw = 0u64;
    for i in 0..10 {
        let Some((&byte, rest)) = b.split_first() else {
            return Err(GroupRecordError::Truncated("varint"));
        };
        *b = rest;
        raw |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok((raw >> 1) as i64 ^ -((raw & 1) as i64));
        }
    }
    Err(GroupRecordError::Invalid("varint longer than 10 bytes"))
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], GroupRecordError> {
    if b.len() < n {
        return Err(GroupRecordError::Truncated("record field"));
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Ok(head)
}

/// A varint length (-1: null) and that many bytes.
fn nullable_bytes<'a>(b: &mut &'a [u8]) -> Result<Option<&'a [u8]>, GroupRecordError> {
    match varint(b)? {
        -1 => Ok(None),
        n => {
            let n = usize::try_from(n).map_err(|_| GroupRecordError::Invalid("length"))?;
            take(b, n).map(Some)
        }
    }
}

/// The `__consumer_offsets` partition of a group: Kafka's own choice
/// (`abs(groupId.hashCode) % partitions` with Java's `String.hashCode`), so that a group lands on
/// the same partition number as it would on a Kafka cluster with the same partition count.
pub fn partition_for(group_id: &str, partitions: i32) -> i32 {
    assert!(partitions > 0);
    let mut h: i32 = 0;
    for unit in group_id.encode_utf16() {
        h = h.wrapping_mul(31).wrapping_add(unit as i32);
    }
    (h & 0x7fff_ffff) % partitions
}

fn put_string(buf: &mut BytesMut, s: &str) {
    // Longer strings are refused before they reach a record (group ids, topics and metadata are
    // all capped below this), so truncation here would be a bug.
    assert!(s.len() <= MAX_STRING_BYTES, "string field too long");
    buf.put_i16(s.len() as i16);
    buf.put_slice(s.as_bytes());
}

fn put_nullable_string(buf: &mut BytesMut, s: Option<&str>) {
    match s {
        Some(s) => put_string(buf, s),
        None => buf.put_i16(-1),
    }
}

fn put_bytes(buf: &mut BytesMut, b: &[u8]) {
    let len = i32::try_from(b.len()).expect("bytes field fits in i32");
    buf.put_i32(len);
    buf.put_slice(b);
}

fn get_i16(b: &mut &[u8], what: &'static str) -> Result<i16, GroupRecordError> {
    if b.remaining() < 2 {
        return Err(GroupRecordError::Truncated(what));
    }
    Ok(b.get_i16())
}

fn get_i32(b: &mut &[u8], what: &'static str) -> Result<i32, GroupRecordError> {
    if b.remaining() < 4 {
        return Err(GroupRecordError::Truncated(what));
    }
    Ok(b.get_i32())
}

fn get_i64(b: &mut &[u8], what: &'static str) -> Result<i64, GroupRecordError> {
    if b.remaining() < 8 {
        return Err(GroupRecordError::Truncated(what));
    }
    Ok(b.get_i64())
}

fn get_nullable_str<'a>(
    b: &mut &'a [u8],
    what: &'static str,
) -> Result<Option<&'a str>, GroupRecordError> {
    let len = get_i16(b, what)?;
    if len < 0 {
        return if len == -1 {
            Ok(None)
        } else {
            Err(GroupRecordError::Invalid(what))
        };
    }
    let len = len as usize;
    if b.len() < len {
        return Err(GroupRecordError::Truncated(what));
    }
    let (s, rest) = b.split_at(len);
    let s = std::str::from_utf8(s).map_err(|_| GroupRecordError::Invalid(what))?;
    *b = rest;
    Ok(Some(s))
}

fn get_str<'a>(b: &mut &'a [u8], what: &'static str) -> Result<&'a str, GroupRecordError> {
    get_nullable_str(b, what)?.ok_or(GroupRecordError::Invalid(what))
}

fn get_nullable_string(
    b: &mut &[u8],
    what: &'static str,
) -> Result<Option<String>, GroupRecordError> {
    Ok(get_nullable_str(b, what)?.map(str::to_owned))
}

fn get_string(b: &mut &[u8], what: &'static str) -> Result<String, GroupRecordError> {
    Ok(get_str(b, what)?.to_owned())
}

fn get_bytes(b: &mut &[u8], what: &'static str) -> Result<Bytes, GroupRecordError> {
    let len = get_i32(b, what)?;
    let len = usize::try_from(len).map_err(|_| GroupRecordError::Invalid(what))?;
    if b.remaining() < len {
        return Err(GroupRecordError::Truncated(what));
    }
    let out = Bytes::copy_from_slice(&b[..len]);
    b.advance(len);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn partition_matches_java_string_hash() {
        // "" hashes to 0; "a" to 97; Java's "hello".hashCode() == 99162322.
        assert_eq!(partition_for("", 50), 0);
        assert_eq!(partition_for("a", 50), 97 % 50);
        assert_eq!(partition_for("hello", 50), 99_162_322 % 50);
        // "polygenelubricants".hashCode() == Integer.MIN_VALUE: Kafka's abs() maps it to 0.
        assert_eq!(partition_for("polygenelubricants", 7), 0);
    }

    fn arb_string() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._\\-é]{0,20}"
    }

    fn arb_member() -> impl Strategy<Value = MemberMetadata> {
        (
            arb_string(),
            proptest::option::of(arb_string()),
            arb_string(),
            arb_string(),
            any::<i32>(),
            any::<i32>(),
            proptest::collection::vec(any::<u8>(), 0..40),
            proptest::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(m, i, c, h, r, s, sub, asg)| MemberMetadata {
                member_id: m,
                group_instance_id: i,
                client_id: c,
                client_host: h,
                rebalance_timeout_ms: r,
                session_timeout_ms: s,
                subscription: Bytes::from(sub),
                assignment: Bytes::from(asg),
            })
    }

    fn arb_record() -> impl Strategy<Value = OffsetsRecord> {
        let offset = (
            arb_string(),
            arb_string(),
            any::<i32>(),
            proptest::option::of((any::<i64>(), any::<i32>(), arb_string(), any::<i64>())),
        )
            .prop_map(|(g, t, p, v)| OffsetsRecord::Offset {
                group_id: g,
                topic: t,
                partition: p,
                value: v.map(|(offset, leader_epoch, metadata, ts)| OffsetValue {
                    offset,
                    leader_epoch,
                    metadata,
                    commit_timestamp_ms: ts,
                }),
            });
        let group = (
            arb_string(),
            proptest::option::of((
                arb_string(),
                any::<i32>(),
                proptest::option::of(arb_string()),
                proptest::option::of(arb_string()),
                any::<i64>(),
                proptest::collection::vec(arb_member(), 0..4),
            )),
        )
            .prop_map(|(g, v)| OffsetsRecord::Group {
                group_id: g,
                value: v.map(|(pt, generation, protocol, leader, ts, members)| {
                    GroupMetadataValue {
                        protocol_type: pt,
                        generation,
                        protocol,
                        leader,
                        state_timestamp_ms: ts,
                        members,
                    }
                }),
            });
        prop_oneof![offset, group]
    }

    #[test]
    fn compressed_and_control_batches_are_recognised() {
        let record = OffsetsRecord::Group {
            group_id: "g".into(),
            value: None,
        };
        let batch = encode_batch(&[record], 0).to_vec();
        let decode = |k: &[u8], v: Option<&[u8]>| OffsetsRecord::decode(k, v);
        // The attributes' low bits name the codec (1: gzip); the walk leaves such a batch to
        // the decoder.
        let mut gzip = batch.clone();
        gzip[22] |= 1;
        assert_eq!(uncompressed_records(&gzip, decode), Ok(None));
        let mut control = batch.clone();
        control[22] |= 0x20;
        assert_eq!(uncompressed_records(&control, decode), Ok(Some(Vec::new())));
        let mut v1 = batch;
        v1[16] = 1;
        assert!(uncompressed_records(&v1, decode).is_err());
    }

    #[test]
    fn varints_decode_as_kafka_writes_them() {
        let mut b: &[u8] = &[0x01];
        assert_eq!(varint(&mut b), Ok(-1));
        let mut b: &[u8] = &[0xac, 0x02];
        assert_eq!(varint(&mut b), Ok(150));
        let mut b: &[u8] = &[0xff; 11];
        assert!(varint(&mut b).is_err());
        let mut b: &[u8] = &[0x80];
        assert!(varint(&mut b).is_err());
    }

    proptest! {
        #[test]
        fn record_roundtrip(record in arb_record()) {
            let key = record.encode_key();
            let value = record.encode_value();
            prop_assert_eq!(OffsetsRecord::decode(&key, value.as_deref()).unwrap(), record);
        }

        #[test]
        fn batch_roundtrip(records in proptest::collection::vec(arb_record(), 1..8), ts in 0i64..i64::MAX / 2) {
            let batch = encode_batch(&records, ts);
            // Exactly one batch, whose length field covers the whole buffer (the log stores
            // one batch per append).
            let header = spate_replication::partition::BatchHeader::parse(&batch).unwrap();
            prop_assert_eq!(header.batch_length() as usize + 12, batch.len());
            prop_assert_eq!(header.base_sequence(), -1);
            prop_assert_eq!(header.records_count() as usize, records.len());
            prop_assert_eq!(decode_batches(batch).unwrap(), records);
        }

        /// The in-place walk of a stored batch reads exactly what the kafka_protocol decoder
        /// reads.
        #[test]
        fn uncompressed_walk_matches_the_decoder(records in proptest::collection::vec(arb_record(), 1..8), ts in 0i64..i64::MAX / 2) {
            let batch = encode_batch(&records, ts);
            let walked = uncompressed_records(&batch, |k, v| OffsetsRecord::decode(k, v)).unwrap();
            prop_assert_eq!(walked, Some(records));
        }

        /// A damaged batch is an error (or, where the damage lands in a field the walk does
        /// not read, the same records), never a panic.
        #[test]
        fn damaged_batches_never_panic(records in proptest::collection::vec(arb_record(), 1..4),
                                       at in any::<prop::sample::Index>(), byte in any::<u8>(),
                                       cut in any::<prop::sample::Index>()) {
            let batch = encode_batch(&records, 0).to_vec();
            let short = &batch[..cut.index(batch.len())];
            prop_assert!(uncompressed_records(short, |k, v| OffsetsRecord::decode(k, v)).is_err());
            let mut bent = batch.clone();
            bent[at.index(batch.len())] = byte;
            let _ = uncompressed_records(&bent, |k, v| OffsetsRecord::decode(k, v));
        }

        #[test]
        fn garbage_never_panics(key in proptest::collection::vec(any::<u8>(), 0..64),
                                value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..128))) {
            let _ = OffsetsRecord::decode(&key, value.as_deref());
        }

        #[test]
        fn truncated_records_are_errors(record in arb_record(), cut in 1usize..8) {
            let key = record.encode_key();
            if let Some(value) = record.encode_value() {
                let short = &value[..value.len().saturating_sub(cut)];
                prop_assert!(OffsetsRecord::decode(&key, Some(short)).is_err());
            }
            let short_key = &key[..key.len().saturating_sub(cut)];
            prop_assert!(OffsetsRecord::decode(short_key, None).is_err());
        }
    }

    #[test]
    fn concatenated_batches_decode_in_order() {
        let a = OffsetsRecord::Group {
            group_id: "g".into(),
            value: None,
        };
        let b = OffsetsRecord::Offset {
            group_id: "g".into(),
            topic: "t".into(),
            partition: 3,
            value: None,
        };
        let mut both = BytesMut::new();
        both.extend_from_slice(&encode_batch(std::slice::from_ref(&a), 1));
        both.extend_from_slice(&encode_batch(std::slice::from_ref(&b), 2));
        assert_eq!(decode_batches(both.freeze()).unwrap(), vec![a, b]);
    }

    #[test]
    fn member_count_beyond_input_is_an_error_without_allocating() {
        let mut v = BytesMut::new();
        v.put_i16(GROUP_VALUE_VERSION);
        put_string(&mut v, "consumer");
        v.put_i32(1);
        put_nullable_string(&mut v, None);
        put_nullable_string(&mut v, None);
        v.put_i64(0);
        v.put_i32(MAX_DECODED_MEMBERS as i32);
        let key = OffsetsRecord::Group {
            group_id: "g".into(),
            value: None,
        }
        .encode_key();
        assert_eq!(
            OffsetsRecord::decode(&key, Some(&v)),
            Err(GroupRecordError::Truncated("member id"))
        );
    }
}
