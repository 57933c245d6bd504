//! The net crate's one error type, and the one place engine errors become Kafka error codes.

use kafka_protocol::ResponseError;
use spate_engine::EngineError;

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
}

/// Kafka error code for a storage error.
pub fn engine_error_code(err: &EngineError) -> i16 {
    match err {
        EngineError::InvalidBatch(_) => ResponseError::CorruptMessage.code(),
        EngineError::BatchTooLarge { .. } => ResponseError::MessageTooLarge.code(),
        EngineError::OffsetOutOfRange { .. } => ResponseError::OffsetOutOfRange.code(),
        EngineError::Corrupt { .. } | EngineError::Io { .. } => {
            ResponseError::KafkaStorageError.code()
        }
        EngineError::Closed => ResponseError::NotLeaderOrFollower.code(),
        EngineError::Config(_) => ResponseError::InvalidConfig.code(),
    }
}

/// Kafka error code for any error met while serving a partition.
pub fn net_error_code(err: &NetError) -> i16 {
    match err {
        NetError::Engine(e) => engine_error_code(e),
        NetError::ShardUnavailable(_) => ResponseError::NotLeaderOrFollower.code(),
        _ => ResponseError::UnknownServerError.code(),
    }
}

pub const NONE: i16 = 0;
