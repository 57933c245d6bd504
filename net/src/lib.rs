//! Spate's Kafka layer: framing, request decoding, handlers adapting each API onto the
//! partition replicas of spate-replication, the group coordinator and metrics exposition.
//!
//! Layout: [`request`] decodes frames and headers (sans-IO), [`dispatch`] is the one match on
//! API keys, [`handlers`] adapt each API onto partition replicas, [`shard`] is a shard's
//! serving state (its replicas and routing come from spate-replication), [`server`] runs
//! connections. The binary (src/broker.rs) starts the executors and wires them together.
//! [`alloc`] is the broker's global allocator; it stays here because the decoder's property
//! tests and fuzz target run under it too (they check that no request makes the decoder
//! reserve memory it was not sent).

pub mod alloc;
pub mod budget;
pub mod config;
pub use spate_replication::shard::cross_wake;
pub mod dispatch;
pub mod error;
pub mod frame;
pub mod group;
pub mod handlers;
pub mod leader_epoch;
pub mod leader_hint;
pub use spate_replication::metadata;
pub mod metrics;
pub mod metrics_http;
pub mod request;
pub mod server;
pub mod shard;
pub mod versions;

#[cfg(test)]
mod test_cluster;

pub use config::BrokerConfig;
pub use error::NetError;
pub use shard::{Router, Shard, TopicPartition};
