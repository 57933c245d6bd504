//! `spate verify --data-dir DIR`: an offline, read-only check of every batch stored in a data
//! directory, with the validation Produce applies (engine `validate`). It names the topic,
//! partition and offset of each bad batch and exits non-zero when there is any. It opens files
//! for reading only: a broker may not be running on the directory, and nothing is repaired.
//! Segments are read in chunks (engine `VERIFY_READ_BYTES`), so its memory is one chunk plus the
//! largest batch met, whatever the segments' sizes.

use std::path::{Path, PathBuf};

use anyhow::Context;
use spate_engine::validate::verify_segment_file;

/// Outcome of a verification: bad batches found, segments and partitions read.
pub struct Summary {
    pub bad: usize,
    pub segments: usize,
    pub partitions: usize,
}

/// Partition directories are `<topic>-<partition>`; anything else in the data dir is skipped.
fn partition_of(dir_name: &str) -> Option<(&str, i32)> {
    let (topic, partition) = dir_name.rsplit_once('-')?;
    Some((topic, partition.parse().ok()?))
}

fn sorted_entries(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        out.push(
            e.with_context(|| format!("reading {}", dir.display()))?
                .path(),
        );
    }
    out.sort();
    Ok(out)
}

/// Verifies every partition under `data_dir`, printing one line per bad batch and a summary.
pub fn run(data_dir: &Path) -> anyhow::Result<Summary> {
    let mut summary = Summary {
        bad: 0,
        segments: 0,
        partitions: 0,
    };
    for dir in sorted_entries(data_dir)? {
        let name = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let Some((topic, partition)) = partition_of(&name).filter(|_| dir.is_dir()) else {
            continue;
        };
        summary.partitions += 1;
        for file in sorted_entries(&dir)? {
            if file.extension().is_none_or(|e| e != "log") {
                continue;
            }
            summary.segments += 1;
            let bad = verify_segment_file(&file)
                .with_context(|| format!("verifying {}", file.display()))?;
            for b in &bad {
                println!(
                    "BAD topic={topic} partition={partition} offset={} segment={} position={}: {}",
                    b.offset,
                    file.display(),
                    b.position,
                    b.reason
                );
            }
            summary.bad += bad.len();
        }
    }
    println!(
        "{} bad batch(es) in {} segment(s) of {} partition(s) under {}",
        summary.bad,
        summary.segments,
        summary.partitions,
        data_dir.display()
    );
    Ok(summary)
}
