//! Which incarnation of a topic a replicated partition's files belong to. A topic deleted and
//! created again under the same name gets a new topic id (and new consensus groups); its
//! partitions' directories have the same names as before. The id recorded beside each log
//! directory tells an old incarnation's files (left behind by a node that was down or
//! crashed during the delete) from the new one's, so the new topic never starts from them.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::partition::{hard_state_path, membership_path, ReplicaError};

/// Appended to a partition's log directory name for the file holding its topic id.
pub const TOPIC_ID_SUFFIX: &str = ".topic-id";
/// The file's size: the id in 32 hex digits and a newline.
const TOPIC_ID_FILE_BYTES: usize = 33;

/// The log directories of replicated partitions open in this process (each claimed by
/// [`claim_for_topic`] for a group until [`release`]). The lock also serialises claiming with
/// [`remove_unless_held`]: a node's shards run on their own threads, and one of them removing
/// the files of a partition the node no longer holds must never race another opening it
/// (a move that adds the node back). Both are rare and short (no log is opened under it).
static CLAIMED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

fn claimed() -> std::sync::MutexGuard<'static, BTreeSet<PathBuf>> {
    CLAIMED.lock().unwrap_or_else(|p| p.into_inner())
}

/// The group using `log_dir` closed (or never opened): its files may be removed again.
pub fn release(log_dir: &Path) {
    claimed().remove(log_dir);
}

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

/// Removes every file of a replicated partition: its log directory, hard state, membership
/// list, producer state (`state_path`) and recorded topic id (last, so a crash part-way is
/// redone).
pub fn remove_partition_files(log_dir: &Path, state_path: &Path) -> Result<(), ReplicaError> {
    match std::fs::remove_dir_all(log_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    for f in [
        hard_state_path(log_dir),
        membership_path(log_dir),
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
    let mut claims = claimed();
    let removed = claim_locked(log_dir, state_path, topic_id)?;
    claims.insert(log_dir.to_path_buf());
    Ok(removed)
}

fn claim_locked(log_dir: &Path, state_path: &Path, topic_id: u128) -> Result<bool, ReplicaError> {
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

/// The replicated partitions whose files are in `data_dir`, as (topic, partition), found by
/// their topic-id files (`<topic>-<partition>.topic-id`); a directory without one was never
/// this layer's and is not listed. At most `max` are returned.
pub fn partitions_with_files(data_dir: &Path, max: usize) -> std::io::Result<Vec<(String, u32)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(data_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(TOPIC_ID_SUFFIX)) else {
            continue;
        };
        let Some((topic, partition)) = stem.rsplit_once('-') else {
            continue;
        };
        let Ok(partition) = partition.parse::<u32>() else {
            continue;
        };
        if topic.is_empty() || !entry.file_type()?.is_file() {
            continue;
        }
        out.push((topic.to_string(), partition));
        if out.len() >= max {
            break;
        }
    }
    out.sort();
    Ok(out)
}

/// Removes every file of the replicated partition in `log_dir` unless a group has it open in
/// this process or `held(topic id recorded beside it)` says the node still holds it; `held` is
/// asked under the claims lock, so it must read the newest metadata then. Returns whether
/// files were removed. A directory without a recorded id is left alone.
pub fn remove_unless_held(
    log_dir: &Path,
    state_path: &Path,
    held: impl FnOnce(u128) -> bool,
) -> Result<bool, ReplicaError> {
    let claims = claimed();
    if claims.contains(log_dir) {
        return Ok(false);
    }
    let Some(id) = read_topic_id(log_dir)? else {
        return Ok(false);
    };
    if held(id) {
        return Ok(false);
    }
    remove_partition_files(log_dir, state_path)?;
    drop(claims);
    Ok(true)
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
        std::fs::write(membership_path(&dir), b"ms").unwrap();
        std::fs::write(&state, b"ps").unwrap();
        assert!(!claim_for_topic(&dir, &state, 7).unwrap());
        assert!(dir.join("segment").exists(), "same incarnation kept");
        assert!(claim_for_topic(&dir, &state, 8).unwrap());
        assert!(!dir.exists() && !hard_state_path(&dir).exists() && !state.exists());
        assert!(
            !membership_path(&dir).exists(),
            "an old incarnation's membership list"
        );
        assert_eq!(read_topic_id(&dir).unwrap(), Some(8));
        // A directory nobody recorded an id for.
        let foreign = tmp.path().join("u-0");
        std::fs::create_dir_all(&foreign).unwrap();
        assert!(claim_for_topic(&foreign, &state, 8).is_err());
        assert!(foreign.exists());
        // A damaged id file is an error, not a reason to delete.
        std::fs::write(topic_id_path(&dir), b"zz").unwrap();
        assert!(claim_for_topic(&dir, &state, 8).is_err());
        release(&dir);
    }

    #[test]
    fn files_no_longer_held_are_removed_unless_open() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("my-topic-3");
        let state = tmp.path().join("my-topic-3.json");
        claim_for_topic(&dir, &state, 9).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&state, b"ps").unwrap();
        std::fs::create_dir_all(tmp.path().join("single-0")).unwrap();
        std::fs::write(tmp.path().join("x-1.topic-id.tmp"), b"").unwrap();
        assert_eq!(
            partitions_with_files(tmp.path(), 100).unwrap(),
            vec![("my-topic".to_string(), 3)]
        );
        // Open in a group: never removed, whatever the metadata says.
        assert!(!remove_unless_held(&dir, &state, |_| false).unwrap());
        release(&dir);
        assert!(!remove_unless_held(&dir, &state, |id| id == 9).unwrap());
        assert!(dir.exists());
        assert!(remove_unless_held(&dir, &state, |id| id == 10).unwrap());
        assert!(!dir.exists() && !state.exists() && !topic_id_path(&dir).exists());
        assert!(partitions_with_files(tmp.path(), 100).unwrap().is_empty());
        // A directory nobody recorded an id for is not this layer's.
        let foreign = tmp.path().join("single-0");
        assert!(!remove_unless_held(&foreign, &state, |_| false).unwrap());
        assert!(foreign.exists());
    }
}
