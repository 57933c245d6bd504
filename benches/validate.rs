//! What validating a produced batch costs next to the CRC-32C every batch already pays: the
//! validator (engine `validate`) and `crc32c` over the same batch bytes, for 100 B and 1 KiB
//! records, uncompressed, lz4 and zstd. Batches are what spate-perf sends by default (1 MiB of
//! record values, its deterministic filler), so the figures line up with `scripts/ab-validate.sh`.
//! Throughput is over the batch as it arrives (compressed bytes for lz4 and zstd).
//! Run: `cargo bench --bench validate`.

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kafka_protocol::records::Compression;
use spate_client::batch::{encode_batch, record_values};
use spate_engine::batch::CRC_COVERED_START;
use spate_engine::validate::validate_batch;

/// spate-perf's default `--batch-bytes`: record value bytes per batch.
const BATCH_VALUE_BYTES: usize = 1 << 20;
/// The broker's decompression bound (its shipped max batch bytes).
const MAX_UNCOMPRESSED_BYTES: usize = 8 << 20;
/// spate-perf's seed for record values.
const VALUES_SEED: u64 = 0x5EED;

fn batch(record_bytes: usize, compression: Compression) -> Bytes {
    let values = record_values(BATCH_VALUE_BYTES / record_bytes, record_bytes, VALUES_SEED);
    encode_batch(&values, compression, 0).expect("batch")
}

fn validate_vs_crc(c: &mut Criterion) {
    let mut g = c.benchmark_group("validate");
    for (codec, compression) in [
        ("none", Compression::None),
        ("lz4", Compression::Lz4),
        ("zstd", Compression::Zstd),
    ] {
        for record_bytes in [100usize, 1024] {
            let b = batch(record_bytes, compression);
            let summary = validate_batch(&b, MAX_UNCOMPRESSED_BYTES).expect("a valid batch");
            assert_eq!(
                summary.records as usize,
                BATCH_VALUE_BYTES / record_bytes,
                "every record walked"
            );
            g.throughput(Throughput::Bytes(b.len() as u64));
            let id = format!("{codec}/{record_bytes}B");
            g.bench_with_input(BenchmarkId::new("validator", &id), &b, |bench, b| {
                bench.iter(|| validate_batch(black_box(b), MAX_UNCOMPRESSED_BYTES).expect("valid"))
            });
            g.bench_with_input(BenchmarkId::new("crc32c", &id), &b, |bench, b| {
                bench.iter(|| crc32c::crc32c(black_box(&b[CRC_COVERED_START..])))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, validate_vs_crc);
criterion_main!(benches);
