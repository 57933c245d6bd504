//! Spate Kafka wire protocol: framing, request decoding, handlers, and the cross-core routing
//! between shards (one glommio executor per core, each owning its partitions).
//!
//! Layout: [`request`] decodes frames and headers (sans-IO), [`dispatch`] is the one match on
//! API keys, [`handlers`] adapt each API onto partition replicas (spate-replication), [`shard`]
//! holds this shard's replicas and runs cross-shard work, [`server`] runs connections, [`broker`] starts the executors.

pub mod alloc;
pub mod broker;
pub mod budget;
pub mod config;
pub mod cross_wake;
pub mod dispatch;
pub mod error;
pub mod frame;
pub mod group;
pub mod handlers;
pub use spate_replication::metadata;
pub mod metrics;
pub mod metrics_http;
pub mod request;
pub mod server;
pub mod shard;
pub mod versions;

pub use broker::{Broker, ShutdownHandle};
pub use config::BrokerConfig;
pub use error::NetError;
pub use shard::{Router, Shard, TopicPartition};
