//! Which incarnation of a topic a replicated partition's files belong to. A topic deleted and
//! created again under the same name gets a new topic id (and new consensus groups); its
//! partitions' directories have the same names as before. The id recorded beside each log
//! directory tells an old incarnation's files (left behind by a node that was down or
//! crashed during the delete) from the new one's, so the new topic never starts from them.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::partition::{hard_state_path, ReplicaError};

/// Appended to a partition's log directory name for the file holding its topic id.
pub const TOPIC_ID_SUFFIX: &str = ".topic-id";
/// The file's size: the id in 32 hex digits and a newline.
const TOPIC_ID_FILE_BYTES: usize = 33;

/// Where the topic id of the partition whose log is in `log_dir` is recorded.
pub fn topic_id_path(log_dir: &Path) -> PathBuf {
    let mut p = log_dir.as_os_str().to_owned();
    p.push(TOPIC_ID_SUFFIX);
    PathBuf::from(p)
}

fn incarnation_error(path: &Path, reason: impl std::fmt::Display) -> ReplicaError {
    ReplicaError::Incarnation {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The recorded topic id, `None` if there is none.
pub fn read_topic_id(log_dir: &Path) -> Result<Option<u128>, ReplicaError> {
    let path = topic_id_path(log_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(incarnation_error(&path, e)),
    };
    if bytes.len() != TOPIC_ID_FILE_BYTES || bytes[32] != b'\n' {
        return Err(incarnation_error(&path, "not a topic-id file"));
    }
    let hex = std::str::from_utf8(&bytes[..32]).map_err(|e| incarnation_error(&path, e))?;
    u128::from_str_radix(hex, 16)
        .map(Some)
        .map_err(|e| incarnation_error(&path, e))
}

/// Records `topic_id` so that a crash leaves the old file or the new one whole: temp file,
/// fsync, rename, directory fsync.
pub fn write_topic_id(log_dir: &Path, topic_id: u128) -> Result<(), ReplicaError> {
    let path = topic_id_path(log_dir);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> std::io::Result<()> {
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(format!("{topic_id:032x}\n").as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| incarnation_error(&path, e))
}

/// Removes every file of a replicated partition: its log directory, hard state, producer
/// state (`state_path`) and recorded topic id (last, so a crash part-way is redone).
pub fn remove_partition_files(log_dir: &Path, state_path: &Path) -> Result<(), ReplicaError> {
    match std::fs::remove_dir_all(log_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    for f in [
        hard_state_path(log_dir),
        state_path.to_path_buf(),
        topic_id_path(log_dir),
    ] {
        match std::fs::remove_file(&f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    Ok(())
}

/// Before a replicated partition of the topic `topic_id` opens in `log_dir`: files of another
/// incarnation are removed, and the id is recorded (before the log directory is created, so a
/// directory without an id was never this layer's). Returns whether files were removed.
///
/// A log directory with no recorded id is refused, not removed: it is a single node's data
/// (a data dir started with `--seeds` by mistake) and deleting it would lose that data.
pub fn claim_for_topic(
    log_dir: &Path,
    state_path: &Path,
    topic_id: u128,
) -> Result<bool, ReplicaError> {
    match read_topic_id(log_dir)? {
        Some(id) if id == topic_id => Ok(false),
        Some(old) => {
            tracing::info!(dir = %log_dir.display(), old = format_args!("{old:032x}"),
                new = format_args!("{topic_id:032x}"),
                "removing the files of a deleted incarnation of the topic");
            remove_partition_files(log_dir, state_path)?;
            write_topic_id(log_dir, topic_id)?;
            Ok(true)
        }
        None if log_dir.exists() => Err(incarnation_error(
            &topic_id_path(log_dir),
            "a log directory without a recorded topic id (a single-node data dir?) is not \
             opened as a replicated partition",
        )),
        None => {
            // Hard state or producer state of an incarnation whose id was never recorded
            // beside them cannot be trusted either.
            remove_partition_files(log_dir, state_path)?;
            write_topic_id(log_dir, topic_id)?;
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_incarnation_is_wiped_and_a_foreign_dir_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("t-0");
        let state = tmp.path().join("t-0.json");
        assert!(!claim_for_topic(&dir, &state, 7).unwrap());
        assert_eq!(read_topic_id(&dir).unwrap(), Some(7));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("segment"), b"old").unwrap();
        std::fs::write(hard_state_path(&dir), b"hs").unwrap();
        std::fs::write(&state, b"ps").unwrap();
        assert!(!claim_for_topic(&dir, &state, 7).unwrap());
        assert!(dir.join("segment").exists(), "same incarnation kept");
        assert!(claim_for_topic(&dir, &state, 8).unwrap());
        assert!(!dir.exists() && !hard_state_path(&dir).exists() && !state.exists());
        assert_eq!(read_topic_id(&dir).unwrap(), Some(8));
        // A directory nobody recorded an id for.
        let foreign = tmp.path().join("u-0");
        std::fs::create_dir_all(&foreign).unwrap();
        assert!(claim_for_topic(&foreign, &state, 8).is_err());
        assert!(foreign.exists());
        // A damaged id file is an error, not a reason to delete.
        std::fs::write(topic_id_path(&dir), b"zz").unwrap();
        assert!(claim_for_topic(&dir, &state, 8).is_err());
    }
}
