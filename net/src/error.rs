//! The net crate's one error type, and the one place engine errors become Kafka error codes.

use kafka_protocol::ResponseError;
use spate_replication::partition::EngineError;

pub use spate_replication::partition::engine_error_code;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The frame or the request in it cannot be decoded; the connection is closed.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// A frame announced more bytes than the configured limit.
    #[error("frame of {size} bytes exceeds max_frame_bytes {limit}")]
    FrameTooLarge { size: i64, limit: usize },
    #[error("unknown api key {0}")]
    UnknownApiKey(i16),
    #[error("failed to encode a response: {0}")]
    Encode(String),
    #[error("storage: {0}")]
    Engine(#[from] EngineError),
    #[error("metadata store {path}: {reason}")]
    Metadata { path: String, reason: String },
    /// The shard owning a partition is gone (shutdown).
    #[error("shard {0} is not reachable")]
    ShardUnavailable(usize),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("configuration: {0}")]
    Config(String),
    /// A partition replica failed (opening, recovering, snapshotting).
    #[error(transparent)]
    Replica(#[from] spate_replication::partition::ReplicaError),
}

impl From<spate_replication::shard::ShardUnavailable> for NetError {
    fn from(e: spate_replication::shard::ShardUnavailable) -> Self {
        NetError::ShardUnavailable(e.0)
    }
}

/// Kafka error code for any error met while serving a partition.
pub fn net_error_code(err: &NetError) -> i16 {
    match err {
        NetError::Engine(e) => engine_error_code(e),
        NetError::Replica(e) => e.code(),
        NetError::ShardUnavailable(_) => ResponseError::NotLeaderOrFollower.code(),
        _ => ResponseError::UnknownServerError.code(),
    }
}

pub const NONE: i16 = 0;

/// Flattens a metadata-store result: a failure to persist (disk full, I/O error) becomes
/// KAFKA_STORAGE_ERROR for that one topic instead of failing the whole request.
pub fn or_storage_error<T, E: std::fmt::Display>(r: Result<Result<T, i16>, E>) -> Result<T, i16> {
    r.unwrap_or_else(|e| {
        tracing::error!(error = %e, "metadata store update failed");
        Err(ResponseError::KafkaStorageError.code())
    })
}
