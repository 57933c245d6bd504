//! The shard runtime below the Kafka layer. A shard is one pinned executor; it alone owns the
//! partition replicas placed on it ([`ReplicaSet`]). Which shard owns which partition is the
//! [`ShardTable`], built from the topic metadata; work for a partition is sent to its owner
//! over the [`Router`], whose cross-thread waits go through [`cross_wake`].

pub mod cross_wake;
pub mod deadline;
pub mod hard_state_store;
pub mod incarnation;
pub mod replicas;
pub mod router;
pub mod signal;
pub mod table;

pub use deadline::Deadline;
pub use hard_state_store::{hard_state_store_path, HardStateStore};
pub use replicas::{producer_state_path, ObserverFactory, ReplicaSet, ReplicaSettings};
pub use router::{Job, Router, ShardState, ShardUnavailable, SHARD_QUEUE_DEPTH};
pub use signal::Signal;
pub use table::{shard_of, ShardTable};
