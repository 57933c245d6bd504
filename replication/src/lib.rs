//! Quorum replication for Spate: a sans-IO consensus core and its node-level multiplexer.
//!
//! [`Replica`] is one replication group (one partition, or the controller's metadata log): Raft
//! whose log positions are Kafka offsets, whose entries are whole record batches of opaque bytes
//! and whose term is the Kafka leader epoch. It reads no clock, does no I/O and draws no
//! randomness of its own; the caller feeds it events and performs the [`Action`]s it returns.
//! [`Node`] hosts every group of one node and gathers what they send to each peer into one
//! [`NodeMessage`] per call. See docs/architecture.md, "Consensus core".

pub mod epochs;
pub mod error;
pub mod liveness;
pub mod node;
pub mod replica;
pub mod types;

// Partition replicas on shards (the layer net/ talks to), apart from the consensus core above:
// the replicas, the topic metadata store (the controller's state to be) and shard placement.
pub mod metadata;
pub mod partition;
pub mod shard;

pub use epochs::EpochHistory;
pub use error::Error;
pub use liveness::{LiveNodes, PeerLiveness, Ping, PingBoard, PingsSeen};
pub use node::{Node, NodeMessage, Output};
pub use replica::{
    Config, Persisted, Quiesced, Replica, Role, DEFAULT_ELECTION_TIMEOUT_TICKS,
    DEFAULT_HEARTBEAT_INTERVAL_TICKS, DEFAULT_MAX_BATCHES_PER_PROPOSAL,
};
pub use types::{
    Action, AppendRequest, AppendResponse, Batch, Epoch, GroupId, HardState, Membership, Message,
    NodeId, Offset, VoteRequest, VoteResponse, NO_EPOCH,
};

// Controller, node transport and node identity (issue 15).
pub mod cluster;
pub mod codec;
pub mod controller;
pub mod identity;
pub mod rpc;
