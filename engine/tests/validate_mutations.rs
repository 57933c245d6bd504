//! Random mutations of valid record batches, fed to the validator with their CRC recomputed
//! (so only the insides are wrong): it never panics, and every batch it accepts decodes record
//! by record with an independent decoder (kafka-protocol's), to the count it reported.

use bytes::Bytes;
use kafka_protocol::records::RecordBatchDecoder;
use proptest::prelude::*;
use spate_engine::validate::{build, validate_batch};

/// The validator's decompression bound in these tests (the broker passes its max batch bytes).
const MAX_UNCOMPRESSED_BYTES: usize = 1 << 20;

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Set { at: usize, byte: u8 },
    Truncate { by: usize },
    Extend { with: Vec<u8> },
    SetI32 { at: usize, value: i32 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        (1usize..64).prop_map(|by| Mutation::Truncate { by }),
        proptest::collection::vec(any::<u8>(), 1..16).prop_map(|with| Mutation::Extend { with }),
        (any::<usize>(), any::<i32>()).prop_map(|(at, value)| Mutation::SetI32 { at, value }),
    ]
}

type Rec = (
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Vec<(Vec<u8>, Option<Vec<u8>>)>,
);

fn records() -> impl Strategy<Value = Vec<Rec>> {
    let bytes = || proptest::collection::vec(any::<u8>(), 0..40);
    let ascii = || proptest::collection::vec(b'a'..=b'z', 0..12);
    let header = (ascii(), proptest::option::of(bytes()));
    let rec = (
        proptest::option::of(bytes()),
        proptest::option::of(bytes()),
        proptest::collection::vec(header, 0..3),
    );
    proptest::collection::vec(rec, 1..20)
}

/// A valid batch of `recs` with Kafka codec `codec` (0 none, 1 gzip, 3 lz4, 4 zstd).
fn valid_batch(recs: &[Rec], codec: u8) -> Vec<u8> {
    let mut section = Vec::new();
    for (i, (k, v, hs)) in recs.iter().enumerate() {
        let hs: Vec<(&[u8], Option<&[u8]>)> = hs
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_deref()))
            .collect();
        section.extend(build::record(
            i as i64,
            i as i64,
            k.as_deref(),
            v.as_deref(),
            &hs,
        ));
    }
    let payload = if codec == 0 {
        section
    } else {
        build::compress(codec, &section)
    };
    let n = recs.len() as i32;
    build::batch(&payload, n, n - 1, codec)
}

/// Applies a mutation past the batch's CRC field, then fixes batchLength and the CRC.
fn mutate(mut b: Vec<u8>, m: &Mutation) -> Vec<u8> {
    // Bytes from the attributes on: what the CRC covers (header fields and records).
    const FROM: usize = 21;
    let span = b.len() - FROM;
    match m {
        Mutation::Flip { at, bit } => b[FROM + at % span] ^= 1 << bit,
        Mutation::Set { at, byte } => b[FROM + at % span] = *byte,
        Mutation::Truncate { by } => b.truncate(b.len() - (*by).min(span - 1)),
        Mutation::Extend { with } => b.extend_from_slice(with),
        Mutation::SetI32 { at, value } => {
            if span >= 4 {
                let at = FROM + at % (span - 3);
                b[at..at + 4].copy_from_slice(&value.to_be_bytes());
            }
        }
    }
    let len = (b.len() - 12) as i32;
    b[8..12].copy_from_slice(&len.to_be_bytes());
    build::fix_crc(&mut b);
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn mutated_batches_never_panic_and_accepted_ones_decode(
        recs in records(),
        codec in prop::sample::select(vec![0u8, 1, 3, 4]),
        muts in proptest::collection::vec(mutation(), 1..4),
    ) {
        let valid = valid_batch(&recs, codec);
        let summary = validate_batch(&valid, MAX_UNCOMPRESSED_BYTES);
        prop_assert!(summary.is_ok(), "a valid batch was refused: {:?}", summary.err());
        let mut bad = valid;
        for m in &muts {
            bad = mutate(bad, m);
        }
        if let Ok(summary) = validate_batch(&bad, MAX_UNCOMPRESSED_BYTES) {
            let mut buf = Bytes::from(bad.clone());
            match RecordBatchDecoder::decode(&mut buf) {
                Ok(set) => prop_assert_eq!(set.records.len(), summary.records as usize),
                // kafka-protocol refuses header keys that are not UTF-8; Kafka's own decoder
                // (and the validator) take them as bytes. Any other refusal is a disagreement.
                Err(e) => prop_assert!(
                    format!("{e:?}").to_lowercase().contains("utf"),
                    "accepted by the validator, refused by kafka-protocol: {e:?}"
                ),
            }
        }
    }
}
