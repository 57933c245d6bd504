//! The one error type of spate-perf.

use std::io;

/// Everything that can stop a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum PerfError {
    /// A command-line value is out of range or inconsistent with another one.
    #[error("invalid arguments: {0}")]
    Args(String),
    /// No TCP connection to a broker within the connect timeout.
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    /// The socket failed or timed out mid-request.
    #[error("i/o error talking to {addr}: {source}")]
    Io { addr: String, source: io::Error },
    /// The broker sent bytes we cannot decode, or a reply that breaks the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The broker answered with a Kafka error code.
    #[error("broker error in {context}: Kafka error code {code} ({name})")]
    Broker {
        context: String,
        code: i16,
        name: &'static str,
    },
    /// Reading or writing a result or plot file failed.
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

/// Result alias for the crate.
pub type Result<T> = std::result::Result<T, PerfError>;

impl PerfError {
    /// A broker error for a non-zero Kafka error code.
    pub fn broker(context: impl Into<String>, code: i16) -> Self {
        PerfError::Broker {
            context: context.into(),
            code,
            name: kafka_error_name(code),
        }
    }
}

/// The Kafka name of the error codes a load generator is likely to meet.
pub fn kafka_error_name(code: i16) -> &'static str {
    match code {
        -1 => "UNKNOWN_SERVER_ERROR",
        0 => "NONE",
        1 => "OFFSET_OUT_OF_RANGE",
        2 => "CORRUPT_MESSAGE",
        3 => "UNKNOWN_TOPIC_OR_PARTITION",
        5 => "LEADER_NOT_AVAILABLE",
        6 => "NOT_LEADER_OR_FOLLOWER",
        7 => "REQUEST_TIMED_OUT",
        10 => "MESSAGE_TOO_LARGE",
        19 => "NOT_ENOUGH_REPLICAS",
        20 => "NOT_ENOUGH_REPLICAS_AFTER_APPEND",
        35 => "UNSUPPORTED_VERSION",
        36 => "TOPIC_ALREADY_EXISTS",
        37 => "INVALID_PARTITIONS",
        38 => "INVALID_REPLICATION_FACTOR",
        41 => "NOT_CONTROLLER",
        42 => "INVALID_REQUEST",
        43 => "UNSUPPORTED_FOR_MESSAGE_FORMAT",
        76 => "UNSUPPORTED_COMPRESSION_TYPE",
        87 => "INVALID_RECORD",
        _ => "see the Kafka protocol error table",
    }
}
