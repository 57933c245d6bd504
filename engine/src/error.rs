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
    #[error("I/O error on {path:?}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
