//! The error type of spate-perf: the client library's, under the name the tool has always used.

pub use spate_client::error::{kafka_error_name, ClientError as PerfError, Result};
