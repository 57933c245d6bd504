//! Spate storage engine: partition logs of opaque Kafka record batches.
//!
//! No networking and no Kafka request types live here. A [`PartitionLog`] belongs to one glommio
//! executor (shard); it is `!Send` and every method takes `&self`, so many tasks of that shard may
//! append and read concurrently.

pub mod batch;
mod config;
mod error;
mod log;

pub use config::{FlushPolicy, LogConfig};
pub use error::EngineError;
pub use log::{AppendInfo, PartitionLog, ReadResult};
