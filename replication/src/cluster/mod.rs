//! Replicated partitions hosted on a cluster node: which groups a node hosts and on which shard
//! (from the applied controller state), their deterministic group ids, and the routing of
//! consensus traffic between the node's shards and its transport. Sans-IO: the shards and the
//! cluster service thread drive these with their own I/O. See docs/architecture.md, "Cluster
//! wiring".

mod hosting;
mod link;
mod shard_host;
pub mod shard_runtime;
pub mod throttle;

pub use hosting::{
    gather_outgoing, partition_group_id, plan_hosting, split_by_shard, GroupIdHasher, GroupMap,
    HostedPartition, HostingChanges, HostingPlan, PlanConflict, RouteTable, ShardRoutes,
    MAX_GATHERED_BATCH_BYTES, SHARD_CONSENSUS_CHANNEL_CAPACITY,
};
pub use link::{
    CallError, ClusterPort, ControllerCall, Reply, ShardEvent, ShardLink, CONTROLLER_CALL_QUEUE,
};
pub use shard_host::{LeaderReport, ShardGroups};
pub use shard_runtime::{
    run as run_shard_runtime, RuntimeConfig, RuntimeStats, TickSource, PARTITION_TICK_MS,
    REPORT_INTERVAL_MS,
};
