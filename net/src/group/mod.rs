//! Consumer groups (the classic group protocol) and committed offsets.
//!
//! `__consumer_offsets` is an ordinary compacted topic (`cleanup.policy=compact`, created by
//! the broker when a coordinator is first looked for), hosted like any topic: alone, each
//! partition's replica on its shard; in a cluster, a consensus group of its replicas. The
//! coordinator of a group is the leader of partition [`partition_for`]`(group)`, as in Kafka;
//! the log cleaner keeps the partitions small, and a coordinator that takes a partition over
//! replays only what the cleaned log still holds.
//!
//! [`GroupCoordinator`] is a sans-IO state machine: one per shard, owning the groups of the
//! `__consumer_offsets` partitions that shard leads. Its inputs are decoded Kafka requests, the
//! current time (`now_ms`) and the records replayed from its partitions; its outputs are
//! responses, deferred responses and records to persist ([`Effect`]). It never reads a clock
//! and never does I/O, so multi-member scenarios can be driven deterministically in tests.
//!
//! How a caller (the shard, `service.rs`) drives it:
//! - on every tick it compares where each partition is led with what it holds: a partition
//!   whose replica here became the ready leader (alone: that this shard owns) is loaded with
//!   [`GroupCoordinator::begin_loading`], [`GroupCoordinator::replay_batch`] of every stored
//!   batch up to the high watermark (records read in place, see
//!   [`records::uncompressed_records`]), then
//!   [`GroupCoordinator::finish_loading`]; one it no longer leads is
//!   [`GroupCoordinator::unload`]ed. Requests for a loading partition are answered with
//!   COORDINATOR_LOAD_IN_PROGRESS, for one not held with NOT_COORDINATOR.
//! - JoinGroup and SyncGroup take a [`ReplyId`] chosen by the caller; their answers (immediate
//!   or after the rebalance) come out as [`Effect::Join`] / [`Effect::Sync`]. Every reply id
//!   gets exactly one answer, unless the partition is unloaded, which answers them all.
//! - OffsetCommit returns an [`OffsetCommitOutcome`]: append its records to the partition
//!   (alone: append and sync; in a cluster: propose through the partition's group and wait for
//!   the commit, as acks=all), then call [`GroupCoordinator::finish_offset_commit`] (which makes
//!   the offsets visible) and send the response it returns.
//! - [`Effect::Persist`] records (group metadata after a rebalance, tombstones) are appended to
//!   the named partition in the order they come out.
//! - call [`GroupCoordinator::tick`] every few hundred ms: it expires sessions, ends overdue
//!   rebalances and expires old offsets.
//! - after every call, drain [`GroupCoordinator::take_effects`].

mod api;
mod config;
mod coordinator;
#[allow(clippy::module_inception)]
mod group;
pub mod records;
mod service;
#[cfg(test)]
mod tests;

pub use api::{
    check_legacy_offsets, close_shard, committed_offsets, handle, legacy_offsets_dir, start_shard,
    GROUP_API_KEYS,
};
pub use config::GroupConfig;
pub use coordinator::{
    find_coordinator_response, is_offsets_topic, offset_fetch_response, ClientInfo,
    GroupCoordinator, GroupOffsets, OffsetCommitOutcome, CLASSIC_GROUP_TYPE,
    MAX_PROTOCOLS_PER_MEMBER,
};
pub use group::GroupState;
pub use records::{partition_for, GroupRecordError, OffsetsRecord, OFFSETS_TOPIC};
pub use service::{
    offsets_topic_configs, wall_clock_ms, GroupShard, OffsetsLog, DEFAULT_TICK_INTERVAL_MS,
    MAX_RECORDS_PER_BATCH, OFFSETS_CLEAN_WAIT_MAX_MS, OFFSETS_MAX_BATCH_BYTES,
    OFFSETS_SEGMENT_BYTES,
};

use kafka_protocol::messages::join_group_response::JoinGroupResponse;
use kafka_protocol::messages::sync_group_response::SyncGroupResponse;

/// Identifies a deferred request (JoinGroup, SyncGroup) to its caller, e.g. a connection and
/// correlation id folded into one number. The coordinator only hands it back.
pub type ReplyId = u64;

/// A deferred request and the API version it must be answered at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingReply {
    pub reply: ReplyId,
    pub version: i16,
}

/// Something the caller must do.
#[derive(Clone, Debug)]
pub enum Effect {
    /// Send this JoinGroup response for the request identified by `reply`.
    Join {
        reply: ReplyId,
        response: JoinGroupResponse,
    },
    /// Send this SyncGroup response for the request identified by `reply`.
    Sync {
        reply: ReplyId,
        response: SyncGroupResponse,
    },
    /// Append these records (as one batch) to `__consumer_offsets` partition `partition`.
    Persist {
        partition: i32,
        records: Vec<OffsetsRecord>,
    },
}
