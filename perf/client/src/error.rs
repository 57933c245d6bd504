//! The one error type of the Kafka client library (spate-client).

use std::io;

/// Everything that can stop a client call or a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
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
        name: String,
    },
    /// Reading or writing a result or plot file failed.
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

/// Result alias for the crate.
pub type Result<T> = std::result::Result<T, ClientError>;

impl ClientError {
    /// A broker error for a non-zero Kafka error code.
    pub fn broker(context: impl Into<String>, code: i16) -> Self {
        ClientError::Broker {
            context: context.into(),
            code,
            name: kafka_error_name(code),
        }
    }
}

/// The Kafka name of an error code, e.g. `UNKNOWN_TOPIC_OR_PARTITION`, for every code the
/// protocol defines (`UNKNOWN_ERROR_CODE_<n>` for others).
pub fn kafka_error_name(code: i16) -> String {
    use kafka_protocol::ResponseError;
    match ResponseError::try_from_code(code) {
        None => "NONE".to_string(),
        Some(ResponseError::Unknown(c)) => format!("UNKNOWN_ERROR_CODE_{c}"),
        Some(e) => screaming_snake(&format!("{e:?}")),
    }
}

fn screaming_snake(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 8);
    for (i, ch) in camel.chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
    }
    out
}
