//! Errors of the partition replica layer, and the one place storage errors become Kafka error
//! codes (the replica layer answers in Kafka's terms; net/ maps everything else).

use kafka_protocol::ResponseError;
use spate_engine::EngineError;

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("storage: {0}")]
    Engine(#[from] EngineError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("failed to encode producer state: {0}")]
    Encode(String),
    /// The topic metadata store cannot be read or written.
    #[error("metadata store {path}: {reason}")]
    Metadata { path: String, reason: String },
    /// A replicated partition's persisted epoch and vote cannot be read or written, or do not
    /// match its log.
    #[error("replica hard state {path}: {reason}")]
    HardState { path: String, reason: String },
    /// A replicated partition's log directory cannot be tied to its topic's incarnation (the
    /// topic id recorded beside it is missing, damaged or cannot be written).
    #[error("partition incarnation {path}: {reason}")]
    Incarnation { path: String, reason: String },
}

impl ReplicaError {
    /// The Kafka error code a client is given for this error.
    pub fn code(&self) -> i16 {
        match self {
            ReplicaError::Engine(e) => engine_error_code(e),
            ReplicaError::Io(_) | ReplicaError::Encode(_) | ReplicaError::Metadata { .. } => {
                ResponseError::UnknownServerError.code()
            }
            ReplicaError::HardState { .. } | ReplicaError::Incarnation { .. } => {
                ResponseError::KafkaStorageError.code()
            }
        }
    }
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
        // Not reachable from a Kafka client (only a follower appends at a given offset).
        EngineError::FollowerAppend(_) => ResponseError::UnknownServerError.code(),
    }
}
