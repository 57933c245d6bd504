//! The recovery-point file: the offset (and its segment position) below which the log is known to
//! be durable and valid, plus the leader-epoch cache up to it. Written atomically (temporary file,
//! fsync, rename, directory fsync) and checksummed, so a torn write is never mistaken for data.

use std::path::{Path, PathBuf};

use crate::EngineError;

pub const RECOVERY_POINT_FILE: &str = "recovery-point";
const MAGIC: u32 = 0x5350_5250; // "SPRP"
const VERSION: u32 = 1;
const FIXED_BYTES: usize = 4 + 4 + 8 + 8 + 8 + 4;
const EPOCH_ENTRY_BYTES: usize = 12;
/// Caps the epoch list read back from disk before allocating for it.
pub const MAX_EPOCH_ENTRIES: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryPoint {
    /// Every offset below this is durable and was valid when written.
    pub offset: u64,
    /// Base offset of the segment holding `offset`, and its byte position there.
    pub segment_base: u64,
    pub position: u64,
    /// (leader epoch, start offset) for every epoch starting below `offset`, ascending.
    pub epochs: Vec<(i32, u64)>,
}

impl RecoveryPoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(FIXED_BYTES + self.epochs.len() * EPOCH_ENTRY_BYTES + 4);
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&VERSION.to_be_bytes());
        b.extend_from_slice(&self.offset.to_be_bytes());
        b.extend_from_slice(&self.segment_base.to_be_bytes());
        b.extend_from_slice(&self.position.to_be_bytes());
        b.extend_from_slice(&(self.epochs.len() as u32).to_be_bytes());
        for (epoch, start) in &self.epochs {
            b.extend_from_slice(&epoch.to_be_bytes());
            b.extend_from_slice(&start.to_be_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < FIXED_BYTES + 4 {
            return Err(format!("{} bytes is too short", b.len()));
        }
        let (body, crc) = b.split_at(b.len() - 4);
        let stored = u32::from_be_bytes(crc.try_into().expect("4 bytes"));
        if crc32c::crc32c(body) != stored {
            return Err("checksum mismatch".into());
        }
        let u32_at = |i: usize| u32::from_be_bytes(body[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_be_bytes(body[i..i + 8].try_into().expect("8 bytes"));
        if u32_at(0) != MAGIC || u32_at(4) != VERSION {
            return Err("bad magic or version".into());
        }
        let count = u32_at(32) as usize;
        if count > MAX_EPOCH_ENTRIES || body.len() != FIXED_BYTES + count * EPOCH_ENTRY_BYTES {
            return Err(format!("bad epoch count {count}"));
        }
        let epochs = (0..count)
            .map(|i| {
                let at = FIXED_BYTES + i * EPOCH_ENTRY_BYTES;
                (
                    i32::from_be_bytes(body[at..at + 4].try_into().expect("4 bytes")),
                    u64_at(at + 4),
                )
            })
            .collect();
        Ok(RecoveryPoint {
            offset: u64_at(8),
            segment_base: u64_at(16),
            position: u64_at(24),
            epochs,
        })
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads the recovery point; Ok(None) if the file does not exist, Corrupt if it is damaged.
pub fn read(dir: &Path) -> Result<Option<RecoveryPoint>, EngineError> {
    let path = dir.join(RECOVERY_POINT_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    RecoveryPoint::decode(&bytes)
        .map(Some)
        .map_err(|reason| EngineError::Corrupt {
            path,
            position: 0,
            reason: format!("recovery-point file: {reason}"),
        })
}

fn glommio_err(path: &Path) -> impl FnOnce(glommio::GlommioError<()>) -> EngineError + '_ {
    move |e| EngineError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// Replaces `dir/name` atomically and durably with `contents`: temporary file, fdatasync,
/// rename, directory sync. Every step goes through the executor's io_uring, so the shard keeps
/// serving while the disk works.
pub async fn write_file_atomic(
    dir: &Path,
    name: &str,
    contents: Vec<u8>,
) -> Result<(), EngineError> {
    replace_file(dir, name, contents).await?;
    sync_dir(dir).await
}

/// [`write_file_atomic`] for two files at once: both written and synced side by side, both
/// renamed, then one directory sync for the two names. A crash may keep either rename without
/// the other, or a failure of one may follow the other's rename: used for a segment's offset
/// and time index, which recovery takes only as a pair whose trailers agree (else it scans the
/// segment), and which are written before the recovery point that relies on them.
pub async fn write_two_files_atomic(
    dir: &Path,
    (a, a_contents): (&str, Vec<u8>),
    (b, b_contents): (&str, Vec<u8>),
) -> Result<(), EngineError> {
    debug_assert_ne!(a, b, "one temporary file each");
    let (ra, rb) = futures_lite::future::zip(
        replace_file(dir, a, a_contents),
        replace_file(dir, b, b_contents),
    )
    .await;
    if let (Err(_), Err(e)) = (&ra, &rb) {
        // Only the first error goes up; the second is still worth a line.
        tracing::warn!(error = %e, file = b, "replacing the second of two files failed too");
    }
    ra?;
    rb?;
    sync_dir(dir).await
}

/// `dir/name` replaced whole by `contents` (temporary file, fdatasync, rename); the new name is
/// durable only after a directory sync.
async fn replace_file(dir: &Path, name: &str, contents: Vec<u8>) -> Result<(), EngineError> {
    let tmp: PathBuf = dir.join(format!("{name}.tmp"));
    let written = replace_file_inner(dir, name, &tmp, contents).await;
    if written.is_err() {
        // A failed write (most likely for lack of space) leaves no half-written file holding
        // blocks; the target is untouched, since only the rename replaces it.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

async fn replace_file_inner(
    dir: &Path,
    name: &str,
    tmp: &Path,
    contents: Vec<u8>,
) -> Result<(), EngineError> {
    let path = dir.join(name);
    let tmp = tmp.to_path_buf();
    let mut f = glommio::io::BufferedFile::create(&tmp)
        .await
        .map_err(glommio_err(&tmp))?;
    let len = contents.len();
    let written = f.write_at(contents, 0).await.map_err(glommio_err(&tmp))?;
    if written != len {
        return Err(EngineError::Io {
            path: tmp,
            source: std::io::Error::other(format!("short write of {written}/{len} bytes")),
        });
    }
    f.fdatasync().await.map_err(glommio_err(&tmp))?;
    f.rename(&path).await.map_err(glommio_err(&path))?;
    f.close().await.map_err(glommio_err(&path))
}

pub async fn sync_dir(dir: &Path) -> Result<(), EngineError> {
    let d = glommio::io::Directory::open(dir)
        .await
        .map_err(glommio_err(dir))?;
    d.sync().await.map_err(glommio_err(dir))?;
    d.close().await.map_err(glommio_err(dir))
}

pub async fn write(dir: &Path, rp: &RecoveryPoint) -> Result<(), EngineError> {
    write_file_atomic(dir, RECOVERY_POINT_FILE, rp.encode()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let rp = RecoveryPoint {
            offset: 77,
            segment_base: 50,
            position: 4096,
            epochs: vec![(0, 0), (3, 40), (7, 70)],
        };
        let b = rp.encode();
        assert_eq!(RecoveryPoint::decode(&b).unwrap(), rp);
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x10;
            assert!(RecoveryPoint::decode(&bad).is_err(), "byte {i}");
        }
        assert!(RecoveryPoint::decode(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn atomic_write_and_read() {
        glommio::LocalExecutorBuilder::default()
            .make()
            .unwrap()
            .run(atomic_write_and_read_async());
    }

    async fn atomic_write_and_read_async() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let rp = RecoveryPoint {
            offset: 1,
            segment_base: 0,
            position: 100,
            epochs: vec![(2, 0)],
        };
        write(dir.path(), &rp).await.unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(rp));
        std::fs::write(
            dir.path().join(RECOVERY_POINT_FILE),
            b"garbage-garbage-garbage-garbage-garbage",
        )
        .unwrap();
        assert!(matches!(read(dir.path()), Err(EngineError::Corrupt { .. })));
    }
}
