//! The controller: the cluster's metadata as a replicated log, applied the same way on every
//! node, and the decisions of the controller-group leader that write it.
//!
//! - [`records`]: what the metadata log holds (brokers, fencing, topics, partition assignments,
//!   leaders, ISRs, configs, producer-id blocks) and its capped binary encoding.
//! - [`state`]: [`MetadataState::apply`], deterministic on every node, returning [`Effect`]s.
//! - [`active`]: [`ActiveController`], the leader's logic from events (registration,
//!   heartbeats, missed sessions, ISR changes, topic creation) to records. Time is passed in.
//! - [`placement`]: where replicas, leaders and their shards go.
//! - [`leadership`]: who should lead (preferred-leader elections, the leader balancer,
//!   maintenance mode), recorded by the controller and carried out by partition leaders.
//! - [`reassignment`]: moving a partition's replicas (learners, promotion, removal), recorded
//!   by the controller and carried out by partition leaders.
//! - [`decommission`]: draining every replica off a broker before it is retired, planned by
//!   the controller as bounded batches of moves.
//! - [`rebalance`]: the fewest replica moves and preferred-leader changes that even out
//!   replicas and leaders across brokers (run by the CLI on Metadata).
//! - [`store`]: the metadata log and hard state on disk.
//! - [`driver`]: the metadata group, the active controller on its leader, and every node's
//!   broker side, as decisions over frames and ticks (no sockets).
//! - [`service`]: the driver's thread with the rpc transport; [`view`]: what it publishes.
//!
//! The metadata log is one consensus group (the core in `crate::replica`) among the seed
//! nodes; each committed batch of that group is one encoded [`RecordBatch`].

pub mod active;
pub mod decommission;
pub mod driver;
pub mod leadership;
pub mod placement;
pub mod reassignment;
pub mod rebalance;
pub mod records;
pub mod service;
pub mod state;
pub mod store;
pub mod view;

pub use active::{
    ActiveController, AlterIsrRequest, ControllerConfig, ControllerError, CreateTopicRequest,
    HeartbeatRequest, RegisterRequest, DEFAULT_BROKER_HEARTBEAT_INTERVAL_MS,
    DEFAULT_BROKER_SESSION_TIMEOUT_MS, DEFAULT_PRODUCER_ID_BLOCK_LEN,
};
pub use placement::{
    default_min_insync_replicas, default_replication_factor, PlacementError, Placer,
};
pub use records::{
    BrokerRegistration, Endpoint, PartitionState, Record, RecordBatch, ReplicaAssignment,
};
pub use state::{ApplyError, BrokerInfo, Effect, MetadataState, TopicInfo};

/// The consensus group id of the metadata log. Partition groups are numbered by the replica
/// layer; this one id is reserved for the controller.
pub const METADATA_GROUP: crate::types::GroupId = u64::MAX;
