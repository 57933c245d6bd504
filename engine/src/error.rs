//! The engine's one error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The bytes handed to append are not one well-formed RecordBatch v2.
    #[error("invalid record batch: {0}")]
    InvalidBatch(String),
    /// A batch is larger than the log's `max_batch_bytes`.
    #[error("batch of {size} bytes exceeds the limit of {limit} bytes")]
    BatchTooLarge { size: usize, limit: usize },
    /// A read or truncate named an offset outside [log start, log end].
    #[error("offset {offset} is out of range [{log_start}, {log_end}]")]
    OffsetOutOfRange {
        offset: u64,
        log_start: u64,
        log_end: u64,
    },
    /// Data below the recovery point failed its checksum: the partition must be repaired from a
    /// replica; it is never truncated silently.
    #[error("corruption below the recovery point in {path:?} at byte {position}: {reason}")]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: String,
    },
    #[error("invalid log configuration: {0}")]
    Config(String),
    #[error("the log is closed")]
    Closed,
    /// A follower's append did not fit the log: its base offset is not the log end, or its
    /// leader epoch is below the log's last one. Nothing was written. The replication layer
    /// above must not send such an append, but it comes from another node, so it is refused
    /// rather than trusted.
    #[error("follower append refused: {0}")]
    FollowerAppend(String),
    #[error("I/O error on {path:?}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl EngineError {
    /// The filesystem is out of space or quota (ENOSPC, EDQUOT): the write that needed it failed
    /// and nothing else is wrong, so the log stays usable and the write may be retried once space
    /// returns. Any other I/O error may have lost data and fails the log.
    pub fn is_no_space(&self) -> bool {
        matches!(self, EngineError::Io { source, .. } if is_no_space_io(source))
    }
}

/// Whether an I/O error is ENOSPC or EDQUOT (also when it went through glommio, which keeps the
/// error kind but not always the raw code).
pub fn is_no_space_io(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_space_is_told_apart_from_other_io_errors() {
        let io = |e: std::io::Error| EngineError::Io {
            path: PathBuf::from("/x"),
            source: e,
        };
        assert!(io(std::io::Error::from_raw_os_error(libc::ENOSPC)).is_no_space());
        assert!(io(std::io::Error::from_raw_os_error(libc::EDQUOT)).is_no_space());
        let kind_only = std::io::Error::new(std::io::ErrorKind::StorageFull, "full");
        assert!(io(kind_only).is_no_space());
        assert!(!io(std::io::Error::from_raw_os_error(libc::EIO)).is_no_space());
        assert!(!EngineError::Closed.is_no_space());
    }
}
