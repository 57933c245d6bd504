//! Arbitrary bytes as one produced RecordBatch v2, given to the broker's validator with its
//! batchLength and CRC fixed up (so mutations reach the insides, as a hostile client with a
//! correct CRC would). The validator must never panic, and every batch it accepts must decode
//! record by record with an independent decoder (kafka-protocol's) to the same records.
//! Seeds: `cargo +nightly run --release --bin batch_seeds -- corpus/batch_validator`.
#![no_main]

use bytes::Bytes;
use kafka_protocol::records::RecordBatchDecoder;
use libfuzzer_sys::fuzz_target;
use spate_engine::batch::BATCH_HEADER_BYTES;
use spate_engine::validate::{build, validate_batch_with, Codec, RecordView, RecordVisitor};

/// The validator's decompression bound here (the broker passes its max batch bytes, 8 MiB;
/// smaller keeps decompression bombs cheap for the fuzzer and changes no code path).
const MAX_UNCOMPRESSED_BYTES: usize = 1 << 20;

/// What the validator saw of each record.
#[derive(Default)]
struct Seen(Vec<(Option<Vec<u8>>, Option<Vec<u8>>, u32)>);

impl RecordVisitor for Seen {
    fn record(&mut self, r: &RecordView<'_>) -> Result<(), String> {
        self.0.push((
            r.key.map(<[u8]>::to_vec),
            r.value.map(<[u8]>::to_vec),
            r.header_count,
        ));
        Ok(())
    }
}

/// Whether a gzip payload holds more than one member: Kafka's Java decoder (GZIPInputStream)
/// reads them all, as the validator does; kafka-protocol's reads only the first.
fn gzip_has_several_members(payload: &[u8]) -> bool {
    use std::io::Read;
    let mut first = flate2::bufread::GzDecoder::new(payload);
    let mut sink = Vec::new();
    if (&mut first)
        .take(MAX_UNCOMPRESSED_BYTES as u64 + 1)
        .read_to_end(&mut sink)
        .is_err()
    {
        return false;
    }
    !first.into_inner().is_empty()
}

fuzz_target!(|data: &[u8]| {
    let mut b = data.to_vec();
    if b.len() >= BATCH_HEADER_BYTES {
        let len = (b.len() - 12) as i32;
        b[8..12].copy_from_slice(&len.to_be_bytes());
        build::fix_crc(&mut b);
    }
    let mut seen = Seen::default();
    let Ok(summary) = validate_batch_with(&b, MAX_UNCOMPRESSED_BYTES, &mut seen) else {
        return;
    };
    assert_eq!(summary.records as usize, seen.0.len());
    let mut buf = Bytes::from(b.clone());
    let set = match RecordBatchDecoder::decode(&mut buf) {
        Ok(set) => set,
        Err(e) => {
            let e = format!("{e:?}");
            // kafka-protocol refuses header keys that are not UTF-8 (Kafka and the validator
            // take them as bytes) and reads one gzip member only. Any other refusal is a
            // disagreement.
            let utf8 = e.to_lowercase().contains("utf");
            let gzip = summary.codec == Codec::Gzip
                && gzip_has_several_members(&b[BATCH_HEADER_BYTES..]);
            assert!(
                utf8 || gzip,
                "accepted by the validator, refused by kafka-protocol: {e}"
            );
            return;
        }
    };
    assert_eq!(set.records.len(), seen.0.len(), "record count");
    for (i, (r, (key, value, headers))) in set.records.iter().zip(&seen.0).enumerate() {
        assert_eq!(r.key.as_deref(), key.as_deref(), "record {i} key");
        assert_eq!(r.value.as_deref(), value.as_deref(), "record {i} value");
        // kafka-protocol keeps headers in a map, so repeated keys (which Kafka allows: headers
        // are a list) collapse into one there; found by this target with two empty keys.
        assert!(
            r.headers.len() <= *headers as usize && r.headers.is_empty() == (*headers == 0),
            "record {i} headers: {} decoded, {headers} validated",
            r.headers.len()
        );
    }
});
