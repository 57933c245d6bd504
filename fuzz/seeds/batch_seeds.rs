//! Writes valid record batches, built with the engine's helpers, as seeds for the
//! batch_validator fuzz target: every codec (snappy raw and xerial-framed), null and empty keys
//! and values, headers, one record and many.
//! Run: `cargo +nightly run --release --bin batch_seeds -- corpus/batch_validator`.

use spate_engine::validate::build;

/// Xerial's snappy framing as the Java client writes it: header, then (length, block) pairs.
const XERIAL_SNAPPY_HEADER: &[u8; 16] = b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01";
/// The Java client's xerial block size.
const XERIAL_BLOCK_BYTES: usize = 32 << 10;

fn xerial(section: &[u8]) -> Vec<u8> {
    let mut out = XERIAL_SNAPPY_HEADER.to_vec();
    for chunk in section.chunks(XERIAL_BLOCK_BYTES) {
        let block = snap::raw::Encoder::new()
            .compress_vec(chunk)
            .expect("in memory");
        out.extend_from_slice(&(block.len() as u32).to_be_bytes());
        out.extend_from_slice(&block);
    }
    out
}

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "corpus/batch_validator".into());
    std::fs::create_dir_all(&dir)?;
    let mut with_headers = build::record(0, 0, None, None, &[(b"h", None), (b"", Some(b"x"))]);
    with_headers.extend(build::record(1, 5, Some(b"k"), Some(b""), &[(b"k2", Some(b"v2"))]));
    let sections: Vec<(&str, Vec<u8>, i32)> = vec![
        ("one", build::records(1, 0), 1),
        ("three", build::records(3, 10), 3),
        ("headers", with_headers, 2),
        ("hundred", build::records(100, 100), 100),
        ("big-values", build::records(4, 3000), 4),
    ];
    let mut written = 0;
    for (name, section, count) in &sections {
        for (codec_name, codec) in [
            ("none", 0u8),
            ("gzip", 1),
            ("snappy", 2),
            ("xerial", 2),
            ("lz4", 3),
            ("zstd", 4),
        ] {
            let payload = match (codec, codec_name) {
                (0, _) => section.clone(),
                (2, "xerial") => xerial(section),
                _ => build::compress(codec, section),
            };
            let batch = build::batch(&payload, *count, count - 1, codec);
            std::fs::write(format!("{dir}/{name}-{codec_name}"), batch)?;
            written += 1;
        }
    }
    eprintln!("{written} seed batches in {dir}");
    Ok(())
}
