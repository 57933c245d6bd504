//! A replicated partition on its shard: the consensus core's [`Replica`] for the partition's
//! group, driving the [`PartitionReplica`] (log, producer state, high watermark).
//!
//! The core decides; this performs its actions in order, one call at a time (a lock serialises
//! every event: a message, a tick, a produce, a durability report), so the log always matches
//! what the core ordered:
//! - `PersistHardState`: recorded in the shard's [`HardStateStore`] (memory); the messages the
//!   group hands out wait until the store has made it durable, one fdatasync for every group
//!   of the shard that changed (see [`PartitionGroup::take_messages`]). Log writes do not
//!   wait: a crash can leave batches of an epoch whose hard state was not flushed, and
//!   [`PartitionGroup::open`] then takes the log's last epoch, with no vote (safe: a replica
//!   holding batches of an epoch never grants a vote in it, every candidate of that epoch
//!   having an older log).
//! - `Append`: a follower's batches go to the log at the leader's offsets and epochs; the
//!   leader's own batches are already there (it writes a batch, then proposes it, so the
//!   producer checks and the offset assignment see one log).
//! - `Truncate`: the log and producer state go back together.
//! - `HighWatermark`: consumers read to it; acks=all produces below it complete.
//! - `BecomeLeader`: producer state is brought in line with the log, then a one-record control batch
//!   (as KRaft's LeaderChange) is proposed so the epoch commits without client writes.
//! - `LeaderReady`: the epoch is published to clients. `BecomeFollower`: acks=all waiters fail
//!   with NOT_LEADER_OR_FOLLOWER.
//! - `Send`: queued; [`PartitionGroup::take_messages`] hands them out, a leader's appends filled
//!   with whole batches from its log.
//!
//! Batches from a peer are verified (CRC, structure, the produce validator) before the core
//! sees the message: a bad one drops the message and is counted, never stored.

use std::cell::{Cell, RefCell, RefMut};
use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use glommio::channels::local_channel::{self, LocalSender};
use glommio::sync::{Permit, Semaphore, StaticPermit};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use kafka_protocol::ResponseError;
use spate_engine::batch::{BatchHeader, VerifiedBatch};
use spate_engine::validate::validate_batch;

use super::error::ReplicaError;
use super::replica::{Acks, Completion, PartitionReplica, ProduceOutcome, ReplicationGauges};
use crate::cluster::throttle::{ReplicationThrottle, THROTTLE_LAG_OFFSETS};
use crate::liveness::LiveNodes;
use crate::replica::{Config, Persisted, Replica, MAX_CATCHUP_APPENDS_IN_FLIGHT};
use crate::shard::hard_state_store::hard_state_order;
use crate::shard::{HardStateStore, Signal};
use crate::types::{
    Action, AppendRequest, Batch, Epoch, GroupId, HardState, Membership, Message, NodeId, Offset,
};

/// Bytes of batches a leader attaches to one append for one follower (at least one batch is
/// sent, however large): bounds the message and the read behind it. A follower further behind
/// catches up over several round trips.
pub const MAX_APPEND_FILL_BYTES: usize = 1 << 20;
/// A follower silent for longer than this many ticks (1 s at the shipped 50 ms tick: ten
/// missed heartbeats) leaves the in-sync voters even when it holds everything, as Kafka's
/// `replica.lag.time.max.ms` does: an idle partition does not keep a dead follower in its ISR.
/// Kafka's default is 30 s; failover here is judged in about a second, and the ISR is what
/// `min.insync.replicas` and under-replication are judged by.
pub const REPLICA_LAG_MAX_TICKS: u64 = 20;
/// Appended to a partition's log directory name for its hard-state file.
pub const HARD_STATE_SUFFIX: &str = ".hard-state";
/// Kafka's control record type for KRaft's LeaderChange, the record a new leader writes first.
pub const LEADER_CHANGE_CONTROL_TYPE: i16 = 2;
/// The control record type of Spate's membership batches (a partition group's voters and
/// learners, written by its leader when replicas move). Outside the types Kafka assigns (0-6),
/// so Kafka tools see an unknown control record, which consumers skip like any control batch.
pub const MEMBERSHIP_CONTROL_TYPE: i16 = 0x5350;
/// Appended to a partition's log directory name for the file listing where its log holds
/// membership batches.
pub const MEMBERSHIP_SUFFIX: &str = ".membership";
/// Membership batches a replica keeps track of (the newest). Only the newest matters once
/// committed, and a leader proposes a change only after the previous one committed, so at most
/// one is above the commit point (the only ones a truncation can remove); 16 leaves margin.
pub const MAX_TRACKED_MEMBERSHIP_BATCHES: usize = 16;
/// Peer messages a busy group holds for its drainer (see [`PartitionGroup::step_or_defer`]);
/// past this they are dropped, as a lossy link would (consensus retransmits). A leader has at
/// most [`MAX_CATCHUP_APPENDS_IN_FLIGHT`] appends in flight to a follower plus a heartbeat a
/// round, so a group stalled for a second on a slow disk holds a few dozen.
pub const MAX_DEFERRED_STEPS: usize = 256;
/// Bytes of peer messages (their batches) one busy group holds that way: a follower whose
/// disk stalls is sent whole appends (catch-up windows of 1 MiB fills, gathered appends up to
/// 16 MiB), and 256 of those would be gigabytes. Past this they are dropped like the rest.
pub const MAX_DEFERRED_BYTES: usize = 64 << 20;
/// Bytes of peer messages all busy groups of one shard hold together: the bound on what a
/// shard keeps for its drainers whatever the number of groups (a node hosting thousands of
/// followers on one slow disk would otherwise hold 64 MiB for each).
pub const MAX_SHARD_DEFERRED_BYTES: usize = 256 << 20;
/// Nodes one membership batch may name (voters plus learners): the controller's cap on a
/// partition's replicas while moving.
const MAX_MEMBERSHIP_NODES: usize = crate::controller::records::MAX_REPLICAS_PER_PARTITION;

const HARD_STATE_MAGIC: &[u8; 4] = b"SPHS";
const MEMBERSHIP_FILE_MAGIC: &[u8; 4] = b"SPMB";
const MEMBERSHIP_FILE_VERSION: u8 = 1;
const HARD_STATE_VERSION: u8 = 1;
/// magic, version, epoch, has-vote flag, vote, CRC-32C of what precedes it.
const HARD_STATE_BYTES: usize = 4 + 1 + 4 + 1 + 8 + 4;

/// How one replicated partition's group is set up.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    pub group: GroupId,
    /// This node.
    pub node: NodeId,
    /// The partition's replicas (all voters).
    pub voters: Vec<NodeId>,
    pub core: Config,
    /// Seeds the election-timeout jitter.
    pub seed: u64,
    /// Topic config `min.insync.replicas`: acks=all is refused (NOT_ENOUGH_REPLICAS) while
    /// fewer voters than this are caught up.
    pub min_insync_replicas: usize,
}

impl GroupConfig {
    /// The defaults: the core's timeouts, a random seed, `min.insync.replicas` a majority.
    pub fn new(group: GroupId, node: NodeId, voters: Vec<NodeId>) -> Self {
        let min_insync_replicas = voters.len() / 2 + 1;
        GroupConfig {
            group,
            node,
            voters,
            core: Config::default(),
            seed: fastrand::u64(..),
            min_insync_replicas,
        }
    }
}

/// A leader's follower `v` is in sync: it holds everything up to the high watermark `hw` and
/// answered within [`REPLICA_LAG_MAX_TICKS`].
fn peer_in_sync(core: &Replica, v: NodeId, hw: Offset) -> bool {
    core.peer_progress(v).is_some_and(|(m, _)| m >= hw)
        && core
            .peer_silent_ticks(v)
            .is_some_and(|t| t <= REPLICA_LAG_MAX_TICKS)
}

/// Where a partition whose log is in `log_dir` keeps its hard state: beside the directory, so
/// the log's own files are the engine's alone.
pub fn hard_state_path(log_dir: &Path) -> PathBuf {
    let mut p = log_dir.as_os_str().to_owned();
    p.push(HARD_STATE_SUFFIX);
    PathBuf::from(p)
}

/// Where a partition whose log is in `log_dir` lists its membership batches (what
/// [`PartitionGroup::open`] derives from the hard-state path).
pub fn membership_path(log_dir: &Path) -> PathBuf {
    let mut p = log_dir.as_os_str().to_owned();
    p.push(MEMBERSHIP_SUFFIX);
    PathBuf::from(p)
}

/// Where an acks=all produce is answered: Ok, or a Kafka error code.
type CommitAnswer = LocalSender<Result<(), i16>>;

pub struct PartitionGroup {
    cfg: GroupConfig,
    replica: Rc<PartitionReplica>,
    core: RefCell<Replica>,
    /// Held while an event is stepped into the core and its actions performed (in an `Rc`: a
    /// drainer carries a permit taken by the shard into its task).
    lock: Rc<Semaphore>,
    /// What the shard handed this group while its lock was held elsewhere, in order; one
    /// drainer task at a time works through it (see [`Self::step_or_defer`]).
    deferred: RefCell<VecDeque<Deferred>>,
    /// Steps in `deferred` (bounded by [`MAX_DEFERRED_STEPS`]).
    deferred_steps: Cell<usize>,
    /// A drainer task is alive: the shard's work goes to `deferred`, behind it.
    draining: Cell<bool>,
    /// Bytes of the peer messages in `deferred` (bounded by [`MAX_DEFERRED_BYTES`], and with
    /// the shard's other groups by [`MAX_SHARD_DEFERRED_BYTES`]).
    deferred_bytes: Cell<usize>,
    /// Peer messages dropped because `deferred` was full.
    dropped_steps: Cell<u64>,
    /// Tasks other than the drainer waiting for the lock (a produce, a durability report, a
    /// close), and a signal each gives when it stops waiting. The drainer steps aside for
    /// them: glommio's semaphore wakes a waiter on release but leaves the unit free until the
    /// waiter runs, so a drainer taking the lock again for each piece of a steady stream of
    /// deferred work would otherwise take it every time and the waiter would never get it.
    lock_waiters: Cell<usize>,
    waiter_turn: Signal,
    /// Closing or deleting: nothing more is deferred, and what was is dropped.
    closing: Cell<bool>,
    /// Ticks the shard deferred since the core last took one or keep-alives last went out
    /// (see [`Self::keep_alive_while_busy`]), and keep-alives sent.
    keepalive_owed: Cell<u32>,
    keepalives_sent: Cell<u64>,
    /// Ticks left of a failed leader's farewell keep-alives (see [`Self::farewell`]).
    farewell_ticks: Cell<u32>,
    /// The shard's next tick would do nothing ([`Replica::quiet_ticks`]) and may be skipped:
    /// set after a tick or a message the shard stepped at once, cleared by anything else that
    /// reaches the core.
    skip_tick: Cell<bool>,
    /// Ticks skipped that way, handed to the core before anything else reaches it (so the
    /// core sees them in their order) or with the next tick.
    owed_ticks: Cell<u32>,
    /// Messages a drainer took from the outbox (filled, hard state durable): the shard sends
    /// them before anything queued after them.
    ready: RefCell<Vec<(NodeId, Message)>>,
    /// The per-partition hard-state file of releases before the shard store (read at open,
    /// removed once migrated).
    hard_state_path: PathBuf,
    /// The shard's hard-state store, and the sequence number of this group's newest record in
    /// it: messages are handed out only once that is durable.
    store: Rc<HardStateStore>,
    hard_seq: Cell<u64>,
    /// The record made at open: durable before the log takes a batch (so a log holding
    /// batches always has a store entry beside it; see [`Self::open`]).
    open_seq: u64,
    /// Messages the core asked to send, not yet taken.
    outbox: RefCell<Vec<(NodeId, Message)>>,
    /// acks=all produces: (end offset, answer) until the high watermark reaches the end.
    waiters: RefCell<Vec<(Offset, CommitAnswer)>>,
    /// The leader has rebuilt producer state in its epoch and takes writes.
    writable: Cell<bool>,
    /// A storage failure left the log and the core apart: the group takes no further part.
    failed: Cell<bool>,
    refused_batches: Cell<u64>,
    /// `min.insync.replicas`: from the config at open, changed with the topic's configs.
    min_insync_replicas: Cell<usize>,
    /// The shard's wake-ups (see [`GroupSignals`]); none until the group is hosted.
    signals: RefCell<Option<GroupSignals>>,
    /// Where the log holds membership batches (ascending), and the file listing them
    /// (written before such a batch is, so it never misses one the log holds; entries the log
    /// does not hold are dropped at open).
    membership_offsets: RefCell<Vec<Offset>>,
    membership_path: PathBuf,
    /// Bytes per second a leader sends to learners and lagging followers (shared by the
    /// shard's groups); none: unthrottled.
    throttle: RefCell<Option<Arc<ReplicationThrottle>>>,
}

/// A group's quiescence as the node-level liveness finds it ([`PartitionGroup::check_quiet`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quiescence {
    /// Not quiesced.
    Awake,
    /// Quiesced, and the nodes it relies on are live.
    Quiet,
    /// Quiesced under a node no longer live: woken (now, or after its busy work).
    Woken,
}

/// What became of a shard's tick of a group ([`PartitionGroup::tick_or_defer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickTaken {
    /// Taken now, or owed behind the group's busy work.
    Taken,
    /// Skipped as quiet, handed over later.
    Skipped,
    /// Not needed: the group is quiet and the nodes it relies on are live.
    Quiet,
}

/// Work the shard's runtime hands a group, done later when the group is busy.
enum Deferred {
    /// Ticks owed (consecutive ones coalesce: the core takes them at once, see
    /// [`Replica::tick_by`]).
    Tick(u32),
    Step(NodeId, Message),
    /// A leadership transfer to this voter (see [`PartitionGroup::transfer_leadership`]).
    Transfer(NodeId),
    /// Wake a quiet core whose leader or members the node-level liveness no longer vouches
    /// for (see [`Replica::check_liveness`]).
    Wake(LiveNodes),
    /// Take the outbox (hard state made durable, appends filled) into `ready`.
    Flush,
}

/// How a group tells its shard's runtime that something is to be done now rather than at the
/// next tick: acks=all latency is a network round trip, not a tick.
#[derive(Clone)]
pub struct GroupSignals {
    /// Notified when the outbox goes from empty to non-empty (a produce proposed, a durability
    /// report or a step queued messages).
    pub outbox: Rc<Signal>,
    /// The groups whose outbox went from empty to non-empty since the shard last took them:
    /// the shard visits these, not every group it hosts.
    pub queued: Rc<RefCell<Vec<GroupId>>>,
    /// Notified when the group becomes a writable leader (its report goes out at once).
    pub leadership: Rc<Signal>,
    /// Bytes of peer messages the shard's busy groups hold for their drainers (see
    /// [`MAX_SHARD_DEFERRED_BYTES`]).
    pub deferred_bytes: Rc<Cell<usize>>,
    /// Peer messages the shard's groups dropped past those bounds.
    pub deferred_dropped: Rc<Cell<u64>>,
}

impl PartitionGroup {
    /// Starts the group of `replica` (opened with [`PartitionReplica::open_replicated`]) from its
    /// persisted hard state and its log. The hard state is the newer of the shard store's entry
    /// and the file at `hard_state_path` (what releases before the store wrote; it is removed
    /// once the store holds its state durably). The group's state is recorded in `store`
    /// (durable before its log takes a batch); a caller opening many groups syncs the store
    /// once after them.
    pub async fn open(
        replica: Rc<PartitionReplica>,
        hard_state_path: PathBuf,
        store: Rc<HardStateStore>,
        cfg: GroupConfig,
    ) -> Result<Rc<PartitionGroup>, ReplicaError> {
        assert!(
            replica.is_replicated(),
            "a consensus group drives a replica opened as replicated"
        );
        let stored = store.get(cfg.group);
        let legacy = read_hard_state(&hard_state_path)?;
        let mut hard = match (stored, legacy) {
            (Some(a), Some(b)) => {
                newest_of(a, b).map_err(|r| hard_state_error(&hard_state_path, r))?
            }
            (a, b) => a.or(b).unwrap_or_default(),
        };
        let epochs = replica.epoch_history();
        if let Some(&(last, _)) = epochs.last() {
            if last > hard.epoch {
                if stored.is_none() {
                    // No record of any vote beside a log that has epochs: voting again in an
                    // epoch whose batches we hold could elect a second leader.
                    return Err(ReplicaError::HardState {
                        path: store.path().display().to_string(),
                        reason: format!(
                            "group {}: epoch {} is older than the log's last epoch {last} \
                             (hard state lost?)",
                            cfg.group, hard.epoch
                        ),
                    });
                }
                // The log took batches of an epoch whose hard state a crash kept from the
                // store (log writes do not wait for the store's flush). No vote in that epoch
                // was revealed (votes leave only once durable), and none can be granted in it:
                // every candidate of the epoch has an older log than ours.
                tracing::info!(
                    group = cfg.group,
                    stored = hard.epoch,
                    log = last,
                    "hard state behind the log after a crash: taking the log's epoch"
                );
                hard = HardState {
                    epoch: last,
                    voted_for: None,
                };
            }
        }
        let open_seq = store
            .record(cfg.group, hard)
            .map_err(|r| hard_state_error(store.path(), r))?;
        if legacy.is_some() {
            store.remove_when_durable(open_seq, hard_state_path.clone());
        }
        let membership_path = hard_state_path.with_extension(&MEMBERSHIP_SUFFIX[1..]);
        let memberships = read_memberships(&replica, &membership_path).await?;
        let membership_offsets = memberships.iter().map(|m| m.0).collect();
        let persisted = Persisted {
            hard,
            epochs,
            log_end: replica.log_end_offset(),
            bootstrap: Membership::voters(&cfg.voters),
            memberships,
        };
        let core = Replica::new(cfg.node, cfg.core, cfg.seed, persisted);
        replica.set_leader_epoch(hard.epoch);
        let min_insync = cfg.min_insync_replicas;
        let group = Rc::new(PartitionGroup {
            cfg,
            replica: replica.clone(),
            core: RefCell::new(core),
            lock: Rc::new(Semaphore::new(1)),
            deferred: RefCell::default(),
            deferred_steps: Cell::new(0),
            deferred_bytes: Cell::new(0),
            draining: Cell::new(false),
            dropped_steps: Cell::new(0),
            lock_waiters: Cell::new(0),
            waiter_turn: Signal::default(),
            closing: Cell::new(false),
            keepalive_owed: Cell::new(0),
            keepalives_sent: Cell::new(0),
            farewell_ticks: Cell::new(0),
            skip_tick: Cell::new(false),
            owed_ticks: Cell::new(0),
            ready: RefCell::default(),
            hard_state_path,
            store,
            hard_seq: Cell::new(open_seq),
            open_seq,
            outbox: RefCell::default(),
            waiters: RefCell::default(),
            writable: Cell::new(false),
            failed: Cell::new(false),
            refused_batches: Cell::new(0),
            min_insync_replicas: Cell::new(min_insync),
            signals: RefCell::new(None),
            membership_offsets: RefCell::new(membership_offsets),
            membership_path,
            throttle: RefCell::new(None),
        });
        // The log tells its listener of each group commit with its own state borrowed; the
        // core is stepped from a task instead, under the group's lock. One pending wake-up is
        // enough: the task reads the durable end when it runs.
        let (wake, woken) = local_channel::new_bounded::<()>(1);
        replica.set_durable_hook(Box::new(move |_| {
            let _ = wake.try_send(());
        }));
        let weak = Rc::downgrade(&group);
        glommio::spawn_local(async move {
            while woken.recv().await.is_some() {
                let Some(group) = weak.upgrade() else {
                    break;
                };
                group.durable_advanced().await;
            }
        })
        .detach();
        Ok(group)
    }

    pub fn replica(&self) -> &Rc<PartitionReplica> {
        &self.replica
    }
    pub fn node(&self) -> NodeId {
        self.cfg.node
    }
    pub fn group(&self) -> GroupId {
        self.cfg.group
    }
    /// The partition's replicas (the group's voters at open).
    pub fn voters(&self) -> &[NodeId] {
        &self.cfg.voters
    }
    pub fn is_leader(&self) -> bool {
        self.core.borrow().is_leader()
    }
    /// The leader this replica knows of (itself included).
    pub fn leader(&self) -> Option<NodeId> {
        self.core.borrow().leader()
    }
    pub fn epoch(&self) -> Epoch {
        self.core.borrow().epoch()
    }
    pub fn hard_state(&self) -> HardState {
        self.core.borrow().hard_state()
    }
    /// Batches from peers refused as invalid (their messages were dropped).
    pub fn refused_batches(&self) -> u64 {
        self.refused_batches.get()
    }
    /// A storage failure stopped the group.
    pub fn has_failed(&self) -> bool {
        self.failed.get()
    }
    /// The committed offset: consumers read below it.
    pub fn high_watermark(&self) -> Offset {
        self.core.borrow().high_watermark()
    }
    /// (leader epoch, first offset) of each epoch in this replica's log, ascending.
    pub fn epoch_history(&self) -> Vec<(Epoch, Offset)> {
        self.replica.epoch_history()
    }
    /// OffsetForLeaderEpoch (KIP-101/279) from this replica's log: the largest epoch at or
    /// below `epoch` that has batches here, and where it ends (the first offset of the next
    /// epoch, or the log end for the last one). `(NO_EPOCH, 0)` (-1, 0) when the log holds no
    /// epoch at or below it.
    pub fn end_offset_for_epoch(&self, epoch: Epoch) -> (Epoch, Offset) {
        self.core.borrow().end_offset_for_epoch(epoch)
    }
    pub fn min_insync_replicas(&self) -> usize {
        self.min_insync_replicas.get()
    }
    /// A changed `min.insync.replicas` (topic config), for the next acks=all produce.
    pub fn set_min_insync_replicas(&self, n: usize) {
        self.min_insync_replicas.set(n.max(1));
    }
    /// Where this group tells its shard of work to do now (set when a shard hosts it).
    pub fn set_signals(&self, signals: GroupSignals) {
        let queued = !self.outbox.borrow().is_empty();
        let writable = self.is_writable_leader();
        // Bytes deferred before are counted in the shard's bound from now on.
        let held = self.deferred_bytes.get();
        signals
            .deferred_bytes
            .set(signals.deferred_bytes.get() + held);
        if let Some(old) = self.signals.borrow_mut().replace(signals.clone()) {
            old.deferred_bytes
                .set(old.deferred_bytes.get().saturating_sub(held));
        }
        // What happened before the group was hosted is not lost.
        if queued {
            signals.queued.borrow_mut().push(self.cfg.group);
            signals.outbox.notify();
        }
        if writable {
            signals.leadership.notify();
        }
    }

    /// Voters caught up to the high watermark and heard from within [`REPLICA_LAG_MAX_TICKS`],
    /// this one included (the leader's view; a
    /// follower counts only itself). What `min.insync.replicas` is checked against.
    pub fn in_sync_voters(&self) -> usize {
        self.in_sync_voter_ids().len()
    }

    /// The voters [`Self::in_sync_voters`] counts, in membership order: a leader's ISR.
    pub fn in_sync_voter_ids(&self) -> Vec<NodeId> {
        let core = self.core.borrow();
        let hw = core.high_watermark();
        let me = self.cfg.node;
        core.membership()
            .voters
            .iter()
            .copied()
            .filter(|&v| v == me || peer_in_sync(&core, v, hw))
            .collect()
    }

    /// This replica's view of the group's replication (for metrics): role, epoch and replicas
    /// always; on a writable leader also the in-sync set's size and the furthest follower's lag below
    /// the high watermark (a follower whose progress the leader does not know yet counts as
    /// lacking all of it).
    pub fn replication_gauges(&self) -> ReplicationGauges {
        let writable_leader = self.is_writable_leader();
        let core = self.core.borrow();
        let voters = &core.membership().voters;
        let mut gauges = ReplicationGauges {
            writable_leader,
            leader_epoch: core.epoch(),
            replicas: voters.len(),
            in_sync_replicas: None,
            lag_records: None,
            reassignment_bytes_behind: Vec::new(),
        };
        // A leader not yet writable is about to commit its epoch or lose it: it reports as a
        // follower until then, so only the one leader clients see reports the ISR.
        if writable_leader {
            let hw = core.high_watermark();
            let me = self.cfg.node;
            let (mut in_sync, mut lag) = (0, 0);
            for &v in voters.iter().filter(|&&v| v != me) {
                // The same test as `in_sync_voter_ids`, so the gauge is the ISR reported.
                if peer_in_sync(&core, v, hw) {
                    in_sync += 1;
                }
                let matched = core.peer_progress(v).map_or(0, |(m, _)| m);
                lag = lag.max(hw.saturating_sub(matched));
            }
            if voters.contains(&me) {
                in_sync += 1;
            }
            gauges.in_sync_replicas = Some(in_sync);
            gauges.lag_records = Some(lag);
        }
        gauges
    }

    /// The group is quiet (idle, no heartbeats: see [`Replica::quiesced`]).
    pub fn is_quiesced(&self) -> bool {
        self.core.borrow().is_quiesced()
    }

    /// The group leads and takes writes in its epoch (producer state rebuilt).
    pub fn is_writable_leader(&self) -> bool {
        self.writable.get() && self.core.borrow().is_leader()
    }

    /// A writable leader whose epoch has committed (`LeaderReady`): its high watermark covers
    /// everything committed before it, so reads may be served. Until then the watermark may
    /// lag (after a restart it starts at 0).
    pub fn is_ready_leader(&self) -> bool {
        self.is_writable_leader() && self.replica.leader_epoch() == self.epoch()
    }

    /// The group's lock, without the asynchronous acquire when it is free (it almost always
    /// is: a shard steps thousands of groups' heartbeats a second); `None`: closed. A task
    /// waiting here goes before the drainer's next piece (see `lock_waiters`).
    async fn lock_fast(&self) -> Option<Permit<'_>> {
        if let Ok(p) = self.lock.try_acquire_permit(1) {
            return Some(p);
        }
        let _waiting = LockWaiter::new(self);
        self.lock.acquire_permit(1).await.ok()
    }

    /// The lock for the drainer's next piece, after the tasks waiting for it now have had it
    /// (the drainer only ever takes the lock between pieces, so this bounds what a waiter
    /// waits to one piece). Only those: a steady stream of new waiters on a busy leader
    /// (produces, durability reports) would otherwise keep the drainer, and with it the
    /// group's ticks and its followers' answers, waiting for ever.
    async fn lock_for_drainer(&self) -> Option<Permit<'_>> {
        let ahead = self.lock_waiters.get() as u64;
        let start = self.waiter_turn.generation();
        while self.lock_waiters.get() > 0 {
            let seen = self.waiter_turn.generation();
            if seen - start >= ahead {
                break;
            }
            self.waiter_turn.changed(seen).await;
        }
        match self.lock.try_acquire_permit(1) {
            Ok(p) => Some(p),
            Err(_) => self.lock.acquire_permit(1).await.ok(),
        }
    }

    /// One unit of logical time (the shard's tick: elections, heartbeats).
    pub async fn tick(&self) {
        let Some(_guard) = self.lock_fast().await else {
            return;
        };
        if self.stopped() {
            return;
        }
        let mut out = Vec::new();
        self.core_mut(&mut out).tick(&mut out);
        // Most ticks of most groups do nothing (no heartbeat due, no election).
        if !out.is_empty() {
            self.perform(out).await;
        }
    }

    /// The group's preferred replica (its first voter, the leader the placement chose) starts
    /// an election at once when the group has never had one, instead of waiting out an
    /// election timeout (0.5-1 s); every other case is left to the timers.
    pub async fn campaign_if_preferred(&self) {
        if self.cfg.voters.first() != Some(&self.cfg.node) {
            return;
        }
        let Some(_guard) = self.lock_fast().await else {
            return;
        };
        if self.stopped() || self.core.borrow().epoch() != 0 {
            return;
        }
        let mut out = Vec::new();
        self.core_mut(&mut out).campaign_now(&mut out);
        self.perform(out).await;
    }

    /// A message from the peer `from`.
    pub async fn step(&self, from: NodeId, msg: Message) {
        if !self.peer_batches_valid(from, &msg) {
            return;
        }
        let Some(_guard) = self.lock_fast().await else {
            return;
        };
        if self.stopped() {
            return;
        }
        let mut out = Vec::new();
        self.core_mut(&mut out).step(from, msg, &mut out);
        self.perform(out).await;
    }

    // ---- the shard's entry points: they never wait -------------------------------------------
    //
    // A shard runtime ticks thousands of groups and steps their messages on one task. Had it
    // waited for each group's lock in turn, one group holding its lock across disk I/O (a
    // produce appending, a follower writing an append, a leader reading batches to send) would
    // hold up every other group of the shard: their heartbeats and answers, so followers on
    // other nodes time out and elect. So the runtime does a group's work at once only when the
    // lock is free and nothing of the group's waits; the part that needs I/O, and everything a
    // busy group is handed meanwhile, goes in order to one drainer task per group. What is
    // sent does not change (the core decides as before, holding the lock); only who waits.

    /// The shard's tick: taken now if the group is free, else owed (a busy leader heartbeats
    /// once its lock frees, however many ticks it missed: see [`Replica::tick_by`]).
    ///
    /// A quiet group (a follower hearing its leader, a leader between heartbeats whose
    /// followers answered: see [`Replica::quiet_ticks`]) is ticked every other time, the
    /// tick it skipped handed over with the next, or before anything else reaches it: its
    /// timing is what ticking it every time would give, at half the cost for thousands of
    /// idle groups.
    ///
    /// A quiesced group (idle for longer: see [`Replica::quiesced`]) takes no ticks at all
    /// while the nodes it relies on are `live`; otherwise it is woken.
    pub fn tick_or_defer(self: &Rc<Self>, live: &LiveNodes) -> TickTaken {
        if self.failed.get() {
            self.farewell();
            return TickTaken::Taken;
        }
        match self.check_quiet(live) {
            Quiescence::Quiet => return TickTaken::Quiet,
            Quiescence::Woken => return TickTaken::Taken,
            Quiescence::Awake => {}
        }
        if self.skip_tick.replace(false) {
            self.owed_ticks.set(self.owed_ticks.get() + 1);
            return TickTaken::Skipped;
        }
        if self.run_or_defer(Deferred::Tick(1)).is_none() {
            self.keep_alive_while_busy();
        }
        TickTaken::Taken
    }

    /// For a quiesced group, what the node-level liveness says: still quiet, or woken now
    /// (the nodes it relies on are not `live`; see [`Replica::liveness_lapse`]).
    pub fn check_quiet(self: &Rc<Self>, live: &LiveNodes) -> Quiescence {
        let lapsed = match self.core.try_borrow_mut() {
            Ok(mut core) if core.is_quiesced() => {
                let lapsed = core.liveness_lapse(|n| live.live(n)).is_some();
                // Not when lapsed: the wake compares with the tokens noted before.
                if !lapsed {
                    core.note_member_tokens(|n| live.live(n));
                }
                lapsed
            }
            _ => return Quiescence::Awake,
        };
        if !lapsed {
            return Quiescence::Quiet;
        }
        let _ = self.run_or_defer(Deferred::Wake(live.clone()));
        Quiescence::Woken
    }

    /// A stopped leader's farewell: keep-alives every heartbeat interval for an election
    /// timeout after it failed (see [`Self::fail`]), so one lost on the way does not leave
    /// quiet followers relying on a live node whose group takes no further part.
    fn farewell(&self) {
        let left = self.farewell_ticks.get();
        if left == 0 {
            return;
        }
        self.farewell_ticks.set(left - 1);
        if left.is_multiple_of(self.cfg.core.heartbeat_interval_ticks) {
            self.send_keepalives();
        }
    }

    /// A leader whose lock is held across disk I/O (a produce's write and its fdatasync, a
    /// read to fill an append) cannot be ticked until it is free, and its heartbeats come from
    /// ticks: a write slower than an election timeout (0.5-1 s, seen on a loaded disk) had its
    /// followers elect another leader. So every heartbeat interval of deferred ticks it sends
    /// keep-alives ([`Replica::keepalives`]: empty appends at what each follower holds; the
    /// core's state is read, not changed), straight to `ready`, without the lock. Only when
    /// the core's hard state is the one recorded and durable (nothing the core says leaves
    /// before that), and the core is not borrowed (it never is across an await).
    fn keep_alive_while_busy(&self) {
        let owed = self.keepalive_owed.get().saturating_add(1);
        self.keepalive_owed.set(owed);
        if owed < self.cfg.core.heartbeat_interval_ticks || self.failed.get() || self.closing.get()
        {
            return;
        }
        if self.send_keepalives() {
            self.keepalive_owed.set(0);
        }
    }

    /// Queues the core's keep-alives ([`Replica::keepalives`]) in `ready`, without the lock,
    /// when the core's hard state is the recorded and durable one (nothing the core says
    /// leaves before that) and the core is not borrowed. Returns whether they were made.
    fn send_keepalives(&self) -> bool {
        let mut msgs = Vec::new();
        {
            let Ok(core) = self.core.try_borrow() else {
                return false;
            };
            if !core.is_leader()
                // The core's may be newer while the action recording it waits behind I/O.
                || self.store.get(self.cfg.group) != Some(core.hard_state())
                || !self.store.is_durable(self.hard_seq.get())
            {
                return false;
            }
            core.keepalives(&mut msgs);
        }
        if msgs.is_empty() {
            return true;
        }
        self.keepalives_sent
            .set(self.keepalives_sent.get() + msgs.len() as u64);
        let was_empty = self.ready.borrow().is_empty();
        self.ready.borrow_mut().extend(msgs);
        if was_empty {
            self.signal_queued();
        }
        true
    }

    /// Keep-alives sent while the group was busy (see [`Self::keep_alive_while_busy`]).
    pub fn keepalives_sent(&self) -> u64 {
        self.keepalives_sent.get()
    }

    /// A message from the peer `from`, stepped now if the group is free, else after what the
    /// group was handed before it. Batches are verified first (a bad one drops the message).
    pub fn step_or_defer(self: &Rc<Self>, from: NodeId, msg: Message) {
        if !self.peer_batches_valid(from, &msg) {
            return;
        }
        let _ = self.run_or_defer(Deferred::Step(from, msg));
    }

    /// The messages to send now, without waiting: what a drainer made ready, then the outbox
    /// if it can go as it is (hard state durable, no append to fill from the log). Otherwise
    /// its drainer takes it, and the outbox signal says when it is ready.
    pub fn take_ready(self: &Rc<Self>) -> Vec<(NodeId, Message)> {
        let mut msgs = std::mem::take(&mut *self.ready.borrow_mut());
        if self.outbox.borrow().is_empty() || self.closing.get() {
            return msgs;
        }
        if self.draining.get() {
            self.defer(Deferred::Flush);
            return msgs;
        }
        let Ok(_permit) = self.lock.try_acquire_permit(1) else {
            self.defer(Deferred::Flush);
            return msgs;
        };
        if self.failed.get() {
            self.outbox.borrow_mut().clear();
            return msgs;
        }
        let sendable = self.store.is_durable(self.hard_seq.get())
            && !self.outbox.borrow().iter().any(|(_, m)| needs_fill(m));
        if sendable {
            msgs.append(&mut self.outbox.borrow_mut());
        } else {
            self.defer(Deferred::Flush);
        }
        msgs
    }

    /// [`Self::transfer_leadership`] started now if the group is free (`Some`: whether it
    /// started), else after what the group was handed before it (`None`; a refusal then is
    /// logged).
    pub fn transfer_leadership_or_defer(
        self: &Rc<Self>,
        target: NodeId,
    ) -> Option<Result<(), String>> {
        if self.failed.get() {
            return Some(Err("the group has failed".into()));
        }
        self.run_or_defer(Deferred::Transfer(target))
    }

    /// Work deferred and not done yet (a drainer is at it), and peer messages dropped because
    /// too many were.
    pub fn deferred(&self) -> (usize, u64) {
        (self.deferred.borrow().len(), self.dropped_steps.get())
    }

    /// Bytes of the peer messages deferred and not done yet (see [`MAX_DEFERRED_BYTES`]).
    pub fn deferred_bytes(&self) -> usize {
        self.deferred_bytes.get()
    }

    /// Holds the group's lock until the permit drops, as a produce holds it while its batches
    /// go to disk: for tests of what a busy group holds up.
    #[doc(hidden)]
    pub async fn hold_lock(&self) -> Option<Permit<'_>> {
        self.lock_fast().await
    }

    fn peer_batches_valid(&self, from: NodeId, msg: &Message) -> bool {
        if let Message::Append(req) = msg {
            let max = self.replica.limits().max_batch_bytes as usize;
            for b in &req.batches {
                if let Err(reason) = check_peer_batch(b, max) {
                    self.refused_batches.set(self.refused_batches.get() + 1);
                    tracing::warn!(group = self.cfg.group, from, base = b.base, %reason,
                        "invalid batch from a peer: append refused");
                    return false;
                }
            }
        }
        true
    }

    /// Does `work` now if the lock is free and nothing waits before it (`Some`: what the
    /// core said of it), else defers it (`None`).
    fn run_or_defer(self: &Rc<Self>, work: Deferred) -> Option<Result<(), String>> {
        if self.closing.get() {
            return Some(Err("the group is closing".into()));
        }
        if self.draining.get() {
            self.defer(work);
            return None;
        }
        let Ok(permit) = self.lock.try_acquire_permit(1) else {
            self.defer(work);
            return None;
        };
        if self.failed.get() {
            return Some(Err("the group has failed".into()));
        }
        // Whether the next tick may be skipped after this: after a tick, if it would do
        // nothing; after a message, if it could be skipped before and still would do nothing.
        let may_skip = match work {
            Deferred::Tick(_) => true,
            Deferred::Step(..) => self.skip_tick.get(),
            Deferred::Transfer(_) | Deferred::Wake(_) | Deferred::Flush => false,
        };
        let mut out = Vec::new();
        let res = self.core_event(work, &mut out);
        let mut queue: VecDeque<Action> = out.into();
        self.perform_now(&mut queue);
        if queue.is_empty() {
            let quiet = may_skip && !self.failed.get() && self.core.borrow().quiet_ticks() >= 1;
            self.skip_tick.set(quiet);
        } else {
            // The rest waits for the disk: the drainer finishes it under the same lock hold,
            // so nothing of this group runs in between. (The permit is handed over as one the
            // task can own: released and taken again in this turn, nothing can come between,
            // as nothing waited for the lock when it was taken.)
            drop(permit);
            match self.lock.try_acquire_static_permit(1) {
                Ok(held) => self.spawn_drainer(Some((held, queue))),
                Err(e) => unreachable!("a lock released in this turn is taken: {e}"),
            }
        }
        Some(res)
    }

    /// The core, for an event: first the ticks skipped since it was last ticked (they come
    /// before the event; they were quiet, so they add nothing to `out` unless the event that
    /// made them quiet changed since, which clearing `skip_tick` here rules out).
    fn core_mut(&self, out: &mut Vec<Action>) -> RefMut<'_, Replica> {
        self.skip_tick.set(false);
        let mut core = self.core.borrow_mut();
        let owed = self.owed_ticks.replace(0);
        if owed > 0 {
            core.tick_by(owed, out);
        }
        core
    }

    /// Steps a tick, a message or a transfer into the core (the caller holds the lock).
    fn core_event(&self, work: Deferred, out: &mut Vec<Action>) -> Result<(), String> {
        let mut core = self.core_mut(out);
        match work {
            Deferred::Tick(n) => {
                self.keepalive_owed.set(0);
                core.tick_by(n, out)
            }
            Deferred::Step(from, msg) => core.step(from, msg, out),
            Deferred::Transfer(to) => {
                return core.transfer_leadership(to, out).map_err(|e| e.to_string())
            }
            Deferred::Wake(live) => core.check_liveness(|n| live.live(n), out),
            Deferred::Flush => unreachable!("a flush is not a core event"),
        }
        Ok(())
    }

    /// Whether a peer message of `bytes` may join the deferred work: within the group's count
    /// and byte bounds and the shard's byte bound.
    fn may_defer(&self, bytes: usize) -> bool {
        let shard_full = self.signals.borrow().as_ref().is_some_and(|sig| {
            sig.deferred_bytes.get().saturating_add(bytes) > MAX_SHARD_DEFERRED_BYTES
        });
        self.deferred_steps.get() < MAX_DEFERRED_STEPS
            && self.deferred_bytes.get().saturating_add(bytes) <= MAX_DEFERRED_BYTES
            && !shard_full
    }

    /// Queues work behind what the group is doing; a drainer does it once the lock frees.
    fn defer(self: &Rc<Self>, work: Deferred) {
        if self.closing.get() {
            return;
        }
        // Something waits for the core: the next tick is not skipped.
        self.skip_tick.set(false);
        let bytes = match &work {
            Deferred::Step(_, msg) => message_bytes(msg),
            _ => 0,
        };
        {
            let mut q = self.deferred.borrow_mut();
            match work {
                Deferred::Tick(n) => match q.back_mut() {
                    Some(Deferred::Tick(owed)) => *owed = owed.saturating_add(n),
                    _ => q.push_back(Deferred::Tick(n)),
                },
                Deferred::Flush => {
                    if !matches!(q.back(), Some(Deferred::Flush)) {
                        q.push_back(Deferred::Flush);
                    }
                }
                Deferred::Step(..) if !self.may_defer(bytes) => {
                    let dropped = self.dropped_steps.get() + 1;
                    self.dropped_steps.set(dropped);
                    if let Some(sig) = self.signals.borrow().as_ref() {
                        sig.deferred_dropped.set(sig.deferred_dropped.get() + 1);
                    }
                    if dropped.is_power_of_two() {
                        tracing::warn!(
                            group = self.cfg.group,
                            dropped,
                            "a busy group's peer messages dropped (consensus resends)"
                        );
                    }
                    return;
                }
                Deferred::Step(..) => {
                    let n = bytes;
                    self.deferred_steps.set(self.deferred_steps.get() + 1);
                    self.deferred_bytes.set(self.deferred_bytes.get() + n);
                    if let Some(sig) = self.signals.borrow().as_ref() {
                        sig.deferred_bytes.set(sig.deferred_bytes.get() + n);
                    }
                    q.push_back(work);
                }
                // The latest liveness stands for any still queued.
                Deferred::Wake(_) => match q.back_mut() {
                    Some(w @ Deferred::Wake(_)) => *w = work,
                    _ => q.push_back(work),
                },
                Deferred::Transfer(_) => q.push_back(work),
            }
        }
        if !self.draining.get() {
            self.spawn_drainer(None);
        }
    }

    /// Starts the group's drainer: it finishes `held` (actions left waiting for I/O, under
    /// the lock hold they came from), then does the deferred work in order, taking the lock
    /// for each piece, and ends when none is left (or the group stopped).
    fn spawn_drainer(self: &Rc<Self>, held: Option<(StaticPermit, VecDeque<Action>)>) {
        assert!(!self.draining.get(), "one drainer per group");
        self.draining.set(true);
        let group = self.clone();
        glommio::spawn_local(async move {
            if let Some((permit, queue)) = held {
                group.perform_queue(queue).await;
                drop(permit);
            }
            group.drain().await;
            group.draining.set(false);
        })
        .detach();
    }

    async fn drain(&self) {
        loop {
            let work = self.deferred.borrow_mut().pop_front();
            let Some(work) = work else {
                return;
            };
            // A step's bytes stay counted until it is done (the drainer may wait a while).
            let bytes = match &work {
                Deferred::Step(_, msg) => {
                    self.deferred_steps
                        .set(self.deferred_steps.get().saturating_sub(1));
                    message_bytes(msg)
                }
                _ => 0,
            };
            let _release = ReleaseBytes { group: self, bytes };
            let Some(_guard) = self.lock_for_drainer().await else {
                return;
            };
            if self.stopped() {
                // Nothing of a stopped group is done.
                self.clear_deferred();
                return;
            }
            if let Deferred::Flush = work {
                let msgs = self.take_locked().await;
                if !msgs.is_empty() {
                    let was_empty = self.ready.borrow().is_empty();
                    self.ready.borrow_mut().extend(msgs);
                    if was_empty {
                        self.signal_queued();
                    }
                }
                continue;
            }
            let mut out = Vec::new();
            if let Err(e) = self.core_event(work, &mut out) {
                tracing::debug!(group = self.cfg.group, error = %e,
                    "leadership transfer not started");
            }
            if !out.is_empty() {
                self.perform(out).await;
            }
        }
    }

    /// A Produce request's batches for this partition. Only the leader takes them: it stamps
    /// its epoch, appends and proposes them. acks=0/1 are answered as on a single node (acks=1
    /// waits for the leader's own flush under flush `always`); acks=all completes once the
    /// high watermark passes the batches (durable on a majority), or fails with
    /// NOT_LEADER_OR_FOLLOWER if leadership is lost first.
    pub async fn produce(
        self: &Rc<Self>,
        batches: Vec<VerifiedBatch>,
        acks: Acks,
    ) -> (ProduceOutcome, Completion) {
        let refuse = |code: i16| (ProduceOutcome::error(code), Completion::done());
        let not_leader = ResponseError::NotLeaderOrFollower.code();
        let Some(_guard) = self.lock_fast().await else {
            return refuse(not_leader);
        };
        if self.failed.get() {
            return refuse(ResponseError::KafkaStorageError.code());
        }
        if self.closing.get() {
            return refuse(not_leader);
        }
        let epoch = {
            let core = self.core.borrow();
            if core.can_propose().is_err() || !self.writable.get() {
                return refuse(not_leader);
            }
            core.epoch()
        };
        if acks == Acks::All && self.in_sync_voters() < self.min_insync_replicas.get() {
            return refuse(ResponseError::NotEnoughReplicas.code());
        }
        let mut appended = Vec::new();
        let outcome = self
            .replica
            .append_in_epoch(batches, epoch, &mut appended)
            .await;
        let mut out = Vec::new();
        for info in &appended {
            let count = (info.last_offset - info.base_offset + 1) as u32;
            let proposed = self
                .core_mut(&mut out)
                .propose(&[(count, Bytes::new())], &mut out);
            if proposed != Ok(info.base_offset) {
                self.fail(&format!(
                    "batch written at {} but proposed as {proposed:?}",
                    info.base_offset
                ));
                return refuse(ResponseError::KafkaStorageError.code());
            }
        }
        self.perform(out).await;
        if self.failed.get() {
            // Performing this write failed the group (its waiters were answered then): a
            // waiter registered now would be answered only at close.
            return refuse(ResponseError::KafkaStorageError.code());
        }
        let ok = outcome.error_code == 0 && outcome.base_offset >= 0;
        let completion = match acks {
            Acks::None => Completion::done(),
            Acks::Leader if ok => self.replica.leader_completion(acks),
            Acks::All if ok => match appended.last() {
                Some(last) => self.commit_waiter(last.last_offset + 1),
                // Only retries of stored batches (answered with the original offset): answered
                // once the originals, all below the log end, are committed.
                None => self.commit_waiter(self.replica.log_end_offset()),
            },
            _ => Completion::done(),
        };
        (outcome, completion)
    }

    /// Whether the group has queued messages to send (the shard skips the others' locks).
    pub fn has_messages(&self) -> bool {
        !self.outbox.borrow().is_empty() || !self.ready.borrow().is_empty()
    }

    /// Takes the messages to send, a leader's appends filled with batches from its log.
    /// Appends of an epoch this replica no longer leads are dropped (their batches may be gone).
    pub async fn take_messages(&self) -> Vec<(NodeId, Message)> {
        let Some(_guard) = self.lock_fast().await else {
            return Vec::new();
        };
        self.take_locked().await
    }

    /// [`Self::take_messages`] with the lock held.
    async fn take_locked(&self) -> Vec<(NodeId, Message)> {
        if self.failed.get() {
            self.outbox.borrow_mut().clear();
            return Vec::new();
        }
        // Nothing the core said after a hard-state change leaves before the change is durable
        // (a vote cast twice elects two leaders). Under the lock nothing is queued meanwhile;
        // the flush writes every group's pending state, so the shard's other groups find
        // theirs durable.
        let seq = self.hard_seq.get();
        if !self.store.is_durable(seq) {
            if let Err(e) = self.store.wait_durable(seq).await {
                self.fail(&format!("hard state not persisted: {e}"));
                self.outbox.borrow_mut().clear();
                return Vec::new();
            }
        }
        self.fill_outbox().await
    }

    /// Stops the group (failing acks=all waiters) and closes the log.
    pub async fn close(&self) -> Result<(), ReplicaError> {
        self.begin_closing();
        let _guard = self.lock_fast().await;
        self.stop();
        self.replica.close().await
    }

    /// Whether this group's newest hard state is durable (what it reports as a leader may be
    /// told).
    pub fn hard_state_durable(&self) -> bool {
        self.store.is_durable(self.hard_seq.get())
    }

    /// Stops the group (failing acks=all waiters) and deletes its log, producer state and hard
    /// state: its topic is gone.
    pub async fn delete(&self) -> Result<(), ReplicaError> {
        self.begin_closing();
        let _guard = self.lock_fast().await;
        self.stop();
        self.store.remove(self.cfg.group);
        self.replica.delete().await?;
        for f in [&self.hard_state_path, &self.membership_path] {
            match std::fs::remove_file(f) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    fn stop(&self) {
        self.fail_waiters();
        self.failed.set(true);
        self.writable.set(false);
        self.outbox.borrow_mut().clear();
        self.ready.borrow_mut().clear();
        // A drainer under way finds the group failed and ends.
        self.clear_deferred();
    }

    /// Failed, or closing: a task that waited for the lock does nothing once it has it.
    fn stopped(&self) -> bool {
        self.failed.get() || self.closing.get()
    }

    /// Before a close or delete waits for the lock: the shard defers nothing more to the
    /// group and what it deferred is dropped, so the wait is for what holds the lock now (a
    /// produce's write, one drainer piece), not for a queue the shard keeps feeding.
    fn begin_closing(&self) {
        self.closing.set(true);
        self.clear_deferred();
    }

    /// Drops the deferred work (a piece the drainer holds releases its own bytes when done).
    fn clear_deferred(&self) {
        let queued: usize = self
            .deferred
            .borrow_mut()
            .drain(..)
            .map(|w| match w {
                Deferred::Step(_, msg) => message_bytes(&msg),
                _ => 0,
            })
            .sum();
        self.deferred_steps.set(0);
        self.release_deferred_bytes(queued);
    }

    fn release_deferred_bytes(&self, n: usize) {
        let n = n.min(self.deferred_bytes.get());
        self.deferred_bytes.set(self.deferred_bytes.get() - n);
        if let Some(sig) = self.signals.borrow().as_ref() {
            sig.deferred_bytes
                .set(sig.deferred_bytes.get().saturating_sub(n));
        }
    }

    // ---- internals -----------------------------------------------------------------------

    async fn durable_advanced(&self) {
        let Some(_guard) = self.lock_fast().await else {
            return;
        };
        if self.stopped() {
            return;
        }
        let mut out = Vec::new();
        let durable = self.replica.durable_offset();
        self.core_mut(&mut out).on_durable(durable, &mut out);
        self.perform(out).await;
    }

    fn commit_waiter(&self, end: Offset) -> Completion {
        if self.core.borrow().high_watermark() >= end {
            return Completion::done();
        }
        let (tx, rx) = local_channel::new_bounded(1);
        self.waiters.borrow_mut().push((end, tx));
        Completion::commit(rx)
    }

    fn fail_waiters(&self) {
        let code = ResponseError::NotLeaderOrFollower.code();
        for (_, tx) in self.waiters.borrow_mut().drain(..) {
            let _ = tx.try_send(Err(code));
        }
    }

    /// Stops the group after a write to its log or state failed (a full disk, an I/O error) or
    /// its log and consensus state were found apart: it takes no further part (its peers
    /// replicate without it) until it is reopened, as Kafka takes a failed log directory
    /// offline.
    fn fail(&self, reason: &str) {
        tracing::error!(group = self.cfg.group, topic = %self.replica.tp.topic,
            partition = self.replica.tp.partition, reason,
            "replicated partition stopped on this node: a write failed or its log and \
             consensus state disagree (see the reason); it rejoins when the node restarts \
             with the cause, such as a full disk, fixed");
        self.failed.set(true);
        self.writable.set(false);
        self.fail_waiters();
        self.farewell_ticks
            .set(self.cfg.core.election_timeout_ticks);
        // A leader's last word: keep-alives (no quiescence token) wake followers that went
        // quiet under it (the heartbeat its proposal woke them with went out with the outbox
        // this failure drops, or never did), so they elect once it falls silent instead of
        // relying on a live node whose group took no further part.
        self.send_keepalives();
    }

    /// Performs the core's actions in order (a leader's BecomeLeader adds its own).
    async fn perform(&self, actions: Vec<Action>) {
        self.perform_queue(actions.into()).await;
    }

    async fn perform_queue(&self, mut queue: VecDeque<Action>) {
        loop {
            self.perform_now(&mut queue);
            let Some(action) = queue.pop_front() else {
                return;
            };
            let mut out = Vec::new();
            self.perform_io(action, &mut queue, &mut out).await;
            queue.extend(out);
        }
    }

    /// Performs the actions at the front of `queue` that need no I/O, in order; stops at the
    /// first that does (left at the front) or when the group fails (the queue emptied). Most
    /// events (heartbeats, their answers, votes) need none: the shard steps them at once.
    fn perform_now(&self, queue: &mut VecDeque<Action>) {
        while let Some(action) = queue.front() {
            if self.failed.get() {
                queue.clear();
                return;
            }
            if self.needs_io(action) {
                return;
            }
            let Some(action) = queue.pop_front() else {
                return;
            };
            let mut out = Vec::new();
            self.perform_one(action, &mut out);
            queue.extend(out);
        }
    }

    /// Whether performing `action` waits for the disk: a follower's batches written, a
    /// truncation, a new leader's control batch, or the group's first hard-state record not yet
    /// durable before its log takes a batch (see [`Self::open`]).
    fn needs_io(&self, action: &Action) -> bool {
        match action {
            Action::Append { .. } | Action::BecomeLeader { .. }
                if !self.store.is_durable(self.open_seq) =>
            {
                true
            }
            // A leader's own proposals are in its log already; anything past its end is a
            // follower's to write.
            Action::Append { batches } => batches
                .iter()
                .any(|b| b.end() > self.replica.log_end_offset()),
            Action::Truncate { .. } | Action::BecomeLeader { .. } => true,
            _ => false,
        }
    }

    /// Performs one action that may wait for the disk (any other is performed at once).
    async fn perform_io(
        &self,
        action: Action,
        queue: &mut VecDeque<Action>,
        out: &mut Vec<Action>,
    ) {
        if self.failed.get() {
            return;
        }
        match action {
            Action::Append { .. } | Action::BecomeLeader { .. }
                if !self.store.is_durable(self.open_seq) =>
            {
                // The log's first batch waits for the group's first store record (see
                // `open`); in a shard the runtime has synced it already.
                if let Err(e) = self.store.wait_durable(self.open_seq).await {
                    self.fail(&format!("hard state not persisted: {e}"));
                    return;
                }
                queue.push_front(action);
            }
            Action::Append { batches } => {
                if let Err(e) = self.track_memberships(&batches) {
                    self.fail(&format!("membership batch list not persisted: {e}"));
                    return;
                }
                if let Err(e) = self.append(batches, out).await {
                    self.fail(&e);
                }
            }
            Action::Truncate { end } => {
                if let Err(e) = self.replica.truncate_to(end).await {
                    self.fail(&format!("truncate to {end}: {e}"));
                    return;
                }
                let before = self.membership_offsets.borrow().len();
                self.membership_offsets.borrow_mut().retain(|&o| o < end);
                if self.membership_offsets.borrow().len() != before {
                    let offsets = self.membership_offsets.borrow().clone();
                    if let Err(e) = write_membership_offsets(&self.membership_path, &offsets) {
                        self.fail(&format!("membership batch list not persisted: {e}"));
                    }
                }
            }
            Action::BecomeLeader { epoch } => {
                if let Err(e) = self.become_leader(epoch, out).await {
                    self.fail(&format!("taking leadership in epoch {epoch}: {e}"));
                }
            }
            other => self.perform_one(other, out),
        }
    }

    /// Performs an action that needs no I/O ([`Self::needs_io`] is false for it).
    fn perform_one(&self, action: Action, out: &mut Vec<Action>) {
        match action {
            Action::PersistHardState(hard) => match self.store.record(self.cfg.group, hard) {
                Ok(seq) => self.hard_seq.set(seq),
                // Never durable: nothing after it may be sent.
                Err(e) => self.fail(&format!("hard state not persisted: {e}")),
            },
            Action::Append { batches } => {
                // The leader's own proposals, written before they were proposed.
                if let Err(e) = self.track_memberships(&batches) {
                    self.fail(&format!("membership batch list not persisted: {e}"));
                    return;
                }
                if let Some(end) = batches.last().map(|b| b.end()) {
                    self.appended(end, out);
                }
            }
            Action::HighWatermark(hw) => {
                self.replica.advance_high_watermark(hw);
                self.waiters.borrow_mut().retain(|(end, tx)| {
                    if *end <= hw {
                        let _ = tx.try_send(Ok(()));
                        false
                    } else {
                        true
                    }
                });
            }
            Action::LeaderReady { epoch } => {
                tracing::info!(group = self.cfg.group, epoch, "leader ready");
                self.replica.set_leader_epoch(epoch);
            }
            Action::BecomeFollower { epoch, leader } => {
                self.writable.set(false);
                self.fail_waiters();
                if leader.is_some() {
                    self.replica.set_leader_epoch(epoch);
                }
            }
            Action::MembershipChanged(m) => {
                tracing::info!(group = self.cfg.group, topic = %self.replica.tp.topic,
                    partition = self.replica.tp.partition, voters = ?m.voters,
                    learners = ?m.learners, "membership changed");
            }
            Action::Send { to, msg } => {
                let was_empty = self.outbox.borrow().is_empty();
                self.outbox.borrow_mut().push((to, msg));
                if was_empty {
                    self.signal_queued();
                }
            }
            Action::Truncate { .. } | Action::BecomeLeader { .. } => {
                unreachable!("an action needing I/O performed without it")
            }
        }
    }

    /// Tells the shard this group has messages to hand out.
    fn signal_queued(&self) {
        if let Some(s) = &*self.signals.borrow() {
            s.queued.borrow_mut().push(self.cfg.group);
            s.outbox.notify();
        }
    }

    async fn append(&self, batches: Vec<Batch>, out: &mut Vec<Action>) -> Result<(), String> {
        let mut end = None;
        for b in batches {
            let (base, batch_end) = (b.base, b.end());
            let log_end = self.replica.log_end_offset();
            if b.base < log_end {
                // The leader's own proposal: written before it was proposed.
                if b.end() > log_end {
                    return Err(format!(
                        "batch {}..{} past log end {log_end}",
                        b.base,
                        b.end()
                    ));
                }
            } else if b.base > log_end {
                return Err(format!("append at {} after log end {log_end}", b.base));
            } else {
                // `step` verified its CRC-32C when the append arrived (check_peer_batch).
                let verified =
                    VerifiedBatch::already_verified(b.bytes).map_err(|e| e.to_string())?;
                self.replica
                    .append_follower(verified, base, b.epoch)
                    .await
                    .map_err(|e| format!("append at {base}: {e}"))?;
            }
            end = Some(batch_end);
        }
        if let Some(end) = end {
            self.appended(end, out);
        }
        Ok(())
    }

    /// The log holds everything up to `end`: the core is told (and, under write caching, that
    /// it is durable).
    fn appended(&self, end: Offset, out: &mut Vec<Action>) {
        let mut core = self.core_mut(out);
        core.on_appended(end, out);
        if !self.replica.flushes_every_batch() {
            // Write caching: a written batch counts as durable (see docs/architecture.md,
            // "What commit means under each flush policy").
            core.on_durable(end, out);
        }
    }

    async fn become_leader(&self, epoch: Epoch, out: &mut Vec<Action>) -> Result<(), String> {
        self.writable.set(false);
        // Producer state needs no rebuild: a follower records every batch it appends, and a
        // truncation brings the table back with the log (`settle_producers`, which the
        // leader-change append below runs). Rebuilding from the last snapshot instead made a
        // failover read everything written since (a minute of writes: seconds at speed).
        let batch = leader_change_batch(self.cfg.node, &self.core.borrow().membership().voters);
        let info = self
            .replica
            .append_leader_batch(batch, epoch)
            .await
            .map_err(|e| format!("appending the leader-change batch: {e}"))?;
        let proposed = self.core_mut(out).propose(&[(1, Bytes::new())], out);
        if proposed != Ok(info.base_offset) {
            return Err(format!(
                "leader-change batch written at {} but proposed as {proposed:?}",
                info.base_offset
            ));
        }
        tracing::info!(
            group = self.cfg.group,
            epoch,
            base = info.base_offset,
            "became leader"
        );
        self.writable.set(true);
        if let Some(s) = &*self.signals.borrow() {
            s.leadership.notify();
        }
        Ok(())
    }

    /// Takes the outbox (the caller holds the lock), a leader's appends filled with batches
    /// from its log. Appends of an epoch this replica no longer leads are dropped (their
    /// batches may be gone).
    async fn fill_outbox(&self) -> Vec<(NodeId, Message)> {
        let mut ready = Vec::new();
        // A short fill (a follower far behind) makes the core queue the next append of its
        // window at once: those are filled here too, so the window leaves in this message.
        // Each pass adds at most one append per follower; what the bound leaves waits for
        // the next call (the outbox signal asks for it).
        for _ in 0..MAX_CATCHUP_APPENDS_IN_FLIGHT + 1 {
            let queued = std::mem::take(&mut *self.outbox.borrow_mut());
            if queued.is_empty() {
                break;
            }
            // Followers whose append was filled short in this pass: the appends queued after
            // it start past what was sent, so they are dropped (the core went back to the end
            // of what was sent; the short append carries the commit they would have).
            let mut cut: Vec<NodeId> = Vec::new();
            for (to, msg) in queued {
                match msg {
                    Message::Append(_) if cut.contains(&to) => {}
                    Message::Append(mut req) if req.fill_end > req.prev_offset => {
                        let current = {
                            let core = self.core.borrow();
                            core.is_leader() && core.epoch() == req.epoch
                        };
                        if !current {
                            continue;
                        }
                        match self.fill(to, &mut req).await {
                            Ok(filled_end) => {
                                if filled_end < req.fill_end {
                                    cut.push(to);
                                    let mut out = Vec::new();
                                    self.core_mut(&mut out).on_append_filled(
                                        to,
                                        req.epoch,
                                        req.prev_offset,
                                        req.fill_end,
                                        filled_end,
                                        &mut out,
                                    );
                                    self.perform(out).await;
                                }
                                ready.push((to, Message::Append(req)));
                            }
                            // The next heartbeat retransmits from what the follower holds.
                            Err(e) => tracing::warn!(group = self.cfg.group, to, error = %e,
                                "cannot read batches for a follower"),
                        }
                    }
                    msg => ready.push((to, msg)),
                }
            }
        }
        ready
    }

    /// Attaches whole batches `prev_offset..fill_end` from the log, up to
    /// [`MAX_APPEND_FILL_BYTES`] (at least one, unless the throttle grants nothing); returns
    /// the end of what it attached.
    async fn fill(&self, to: NodeId, req: &mut AppendRequest) -> Result<Offset, String> {
        let mut at = req.prev_offset;
        let mut bytes = 0usize;
        let throttle = self.throttle_for(to, req);
        let limit = throttle
            .as_ref()
            .map_or(MAX_APPEND_FILL_BYTES, |t| t.grant(MAX_APPEND_FILL_BYTES));
        // One read: the log gathers whole batches up to the limit itself (at least one). A
        // second read for what is left under the limit would fetch a whole batch from disk
        // only to drop it when it does not fit (with 1 MB batches, every read twice over).
        if limit > 0 && at < req.fill_end {
            let read = self
                .replica
                .read_local(at, limit)
                .await
                .map_err(|e| e.to_string())?;
            for raw in read.batches {
                let h = BatchHeader::parse(&raw).map_err(|e| e.to_string())?;
                let base = h.base_offset() as u64;
                if base != at {
                    return Err(format!("batch at {base} where {at} was expected"));
                }
                let end = h.last_offset() as u64 + 1;
                if end > req.fill_end || (bytes > 0 && bytes + raw.len() > limit) {
                    break;
                }
                bytes += raw.len();
                let membership = if h.is_control() {
                    decode_membership_batch(&raw)
                } else {
                    None
                };
                req.batches.push(Batch {
                    base,
                    count: (end - base) as u32,
                    epoch: h.partition_leader_epoch(),
                    bytes: raw,
                    membership,
                });
                at = end;
            }
        }
        if let Some(t) = throttle {
            t.charge(bytes);
        }
        Ok(at)
    }

    /// Leader only: hands leadership to voter `target` by a consensus transfer (the target
    /// catches up, then gets TimeoutNow and campaigns at once). Proposals are refused until it
    /// takes over or an election timeout passes. An error says why nothing was started (not
    /// the leader, a transfer already under way, not a voter, the group failed).
    pub async fn transfer_leadership(&self, target: NodeId) -> Result<(), String> {
        let Some(_guard) = self.lock_fast().await else {
            return Err("the group is closed".into());
        };
        if self.stopped() {
            return Err("the group has failed".into());
        }
        let mut out = Vec::new();
        let res = self
            .core_mut(&mut out)
            .transfer_leadership(target, &mut out);
        self.perform(out).await;
        res.map_err(|e| e.to_string())
    }

    // ---- membership changes (replica moves) -------------------------------------------------

    /// The group's membership as this replica's log has it (the last membership batch, else
    /// the voters it was opened with).
    pub fn membership(&self) -> Membership {
        self.core.borrow().membership().clone()
    }

    /// Leader only: makes `next` the group's membership by a membership batch (one change at a
    /// time: add a learner, promote a caught-up learner, remove a member other than the
    /// leader; the core refuses anything else, and any change before the previous one
    /// committed). The batch goes to the log at the offset the core gives it and replicates
    /// like any other; it takes effect when appended.
    pub async fn propose_membership(&self, next: Membership) -> Result<(), String> {
        let Some(_guard) = self.lock_fast().await else {
            return Err("the group is closed".into());
        };
        if self.stopped() {
            return Err("the group has failed".into());
        }
        if !self.writable.get() {
            return Err("not a writable leader".into());
        }
        let bytes = Bytes::copy_from_slice(membership_batch(&next).header().as_bytes());
        let mut out = Vec::new();
        let res = self
            .core_mut(&mut out)
            .propose_membership(next, bytes, &mut out);
        self.perform(out).await;
        res.map(|_| ()).map_err(|e| e.to_string())
    }

    /// The last membership batch this replica holds is committed (or there is none): the
    /// next change may be proposed, and a finished move may be reported.
    pub fn membership_committed(&self) -> bool {
        let hw = self.high_watermark();
        self.membership_offsets
            .borrow()
            .last()
            .is_none_or(|&o| o < hw)
    }

    /// How far `peer` is behind this leader's log end, in offsets (`None`: not a leader, or
    /// not a member).
    pub fn peer_lag(&self, peer: NodeId) -> Option<Offset> {
        let core = self.core.borrow();
        if !core.is_leader() {
            return None;
        }
        let (matched, _) = core.peer_progress(peer)?;
        Some(core.log_end().saturating_sub(matched))
    }

    /// Leader only: how many bytes of this leader's log `peer` has not written (from its match
    /// offset to the log end, see [`PartitionReplica::bytes_from`]); a peer whose progress
    /// the leader does not know yet lacks the whole log. `None`: not a leader, or not a member.
    pub fn peer_bytes_behind(&self, peer: NodeId) -> Option<u64> {
        let core = self.core.borrow();
        if !core.is_leader() || !core.membership().contains(peer) {
            return None;
        }
        let matched = core.peer_progress(peer).map_or(0, |(m, _)| m);
        Some(self.replica.bytes_from(matched))
    }

    /// The shard's replication throttle: appends for learners and followers far behind draw
    /// on it ([`crate::cluster::throttle`]).
    pub fn set_throttle(&self, throttle: Arc<ReplicationThrottle>) {
        *self.throttle.borrow_mut() = Some(throttle);
    }

    /// Records the offsets of membership batches about to be written, before they are.
    fn track_memberships(&self, batches: &[Batch]) -> std::io::Result<()> {
        if batches.iter().all(|b| b.membership.is_none()) {
            return Ok(());
        }
        let mut offsets = self.membership_offsets.borrow().clone();
        for b in batches.iter().filter(|b| b.membership.is_some()) {
            if !offsets.contains(&b.base) {
                offsets.push(b.base);
            }
        }
        offsets.sort_unstable();
        let keep = offsets.len().saturating_sub(MAX_TRACKED_MEMBERSHIP_BATCHES);
        offsets.drain(..keep);
        write_membership_offsets(&self.membership_path, &offsets)?;
        *self.membership_offsets.borrow_mut() = offsets;
        Ok(())
    }

    /// The throttle an append to `to` draws on: the shard's, when `to` is a learner or more
    /// than [`THROTTLE_LAG_OFFSETS`] behind the high watermark (catch-up traffic).
    fn throttle_for(&self, to: NodeId, req: &AppendRequest) -> Option<Arc<ReplicationThrottle>> {
        let t = self.throttle.borrow().clone()?;
        let core = self.core.borrow();
        let catching_up = core.membership().is_learner(to)
            || core.high_watermark().saturating_sub(req.prev_offset) > THROTTLE_LAG_OFFSETS;
        catching_up.then_some(t)
    }
}

/// Bytes a peer message holds (its batches): what deferring it costs.
fn message_bytes(msg: &Message) -> usize {
    match msg {
        Message::Append(req) => req.batches.iter().map(|b| b.bytes.len()).sum(),
        _ => 0,
    }
}

/// Releases a deferred step's bytes once the drainer is done with it (however that ends).
struct ReleaseBytes<'a> {
    group: &'a PartitionGroup,
    bytes: usize,
}

impl Drop for ReleaseBytes<'_> {
    fn drop(&mut self) {
        self.group.release_deferred_bytes(self.bytes);
    }
}

/// Counts a task waiting for a group's lock while it waits (however the wait ends), and
/// lets the drainer know when it stops.
struct LockWaiter<'a> {
    group: &'a PartitionGroup,
}

impl<'a> LockWaiter<'a> {
    fn new(group: &'a PartitionGroup) -> Self {
        group.lock_waiters.set(group.lock_waiters.get() + 1);
        LockWaiter { group }
    }
}

impl Drop for LockWaiter<'_> {
    fn drop(&mut self) {
        let g = self.group;
        g.lock_waiters.set(g.lock_waiters.get() - 1);
        g.waiter_turn.notify();
    }
}

/// Whether `msg` is a leader's append whose batches are still to be read from its log.
fn needs_fill(msg: &Message) -> bool {
    matches!(msg, Message::Append(req) if req.fill_end > req.prev_offset)
}

/// A batch from a peer is stored only if it is what the append says it is and what a producer
/// could have written (or a leader's control batch).
fn check_peer_batch(b: &Batch, max_batch_bytes: usize) -> Result<(), String> {
    if b.bytes.len() > max_batch_bytes {
        return Err(format!(
            "{} bytes, over the limit of {max_batch_bytes}",
            b.bytes.len()
        ));
    }
    let h = BatchHeader::parse(&b.bytes).map_err(|e| e.to_string())?;
    h.verify_crc().map_err(|e| e.to_string())?;
    if h.base_offset() != b.base as i64
        || i64::from(h.last_offset_delta()) + 1 != i64::from(b.count)
        || h.partition_leader_epoch() != b.epoch
    {
        return Err(format!(
            "header says base {} records {} epoch {}, the append says {} {} {}",
            h.base_offset(),
            i64::from(h.last_offset_delta()) + 1,
            h.partition_leader_epoch(),
            b.base,
            b.count,
            b.epoch
        ));
    }
    if h.is_control() {
        // The produce validator refuses control batches (clients may not write them); a
        // leader's are checked for shape only, and a membership batch must say what the
        // append says it does (the core acts on the decoded membership, the log keeps bytes).
        if h.records_count() != h.last_offset_delta() + 1 {
            return Err("control batch record count mismatch".into());
        }
        if decode_membership_batch(&b.bytes) != b.membership {
            return Err("membership batch and the append's membership differ".into());
        }
        return Ok(());
    }
    if b.membership.is_some() {
        return Err("a membership in an append of a data batch".into());
    }
    validate_batch(&b.bytes, max_batch_bytes)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The control batch a new leader writes first (Kafka's LeaderChange record: version 0, the
/// leader and the voters), so its epoch commits without client writes.
fn leader_change_batch(leader: NodeId, voters: &[NodeId]) -> VerifiedBatch {
    // LeaderChangeMessage v0 (flexible): version, leader id, voters, granting voters (empty),
    // each struct and the message with an empty tagged-field section.
    let mut value = Vec::new();
    value.extend_from_slice(&0i16.to_be_bytes());
    value.extend_from_slice(&(leader as i32).to_be_bytes());
    value.push((voters.len() + 1) as u8);
    for &v in voters {
        value.extend_from_slice(&(v as i32).to_be_bytes());
        value.push(0);
    }
    value.push(1);
    value.push(0);
    control_batch(LEADER_CHANGE_CONTROL_TYPE, value)
}

/// A one-record control batch of `control_type` (key: version 0 and the type, as Kafka's).
fn control_batch(control_type: i16, value: Vec<u8>) -> VerifiedBatch {
    let mut key = Vec::with_capacity(4);
    key.extend_from_slice(&0i16.to_be_bytes());
    key.extend_from_slice(&control_type.to_be_bytes());
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let record = Record {
        transactional: false,
        control: true,
        delete_horizon: false,
        partition_leader_epoch: 0,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset: 0,
        sequence: -1,
        timestamp: now_ms,
        key: Some(Bytes::from(key)),
        value: Some(Bytes::from(value)),
        headers: Default::default(),
    };
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        std::slice::from_ref(&record),
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .expect("a one-record batch encodes");
    VerifiedBatch::new(buf).expect("an encoded batch is valid")
}

/// A membership batch: one control record of [`MEMBERSHIP_CONTROL_TYPE`] whose value is a
/// version (0), then the voters and the learners, each a count and big-endian i32 ids.
fn membership_batch(m: &Membership) -> VerifiedBatch {
    let mut value = Vec::with_capacity(2 + 8 + 4 * (m.voters.len() + m.learners.len()));
    value.extend_from_slice(&0i16.to_be_bytes());
    for list in [&m.voters, &m.learners] {
        value.extend_from_slice(&(list.len() as u32).to_be_bytes());
        for &n in list {
            value.extend_from_slice(&(n as i32).to_be_bytes());
        }
    }
    control_batch(MEMBERSHIP_CONTROL_TYPE, value)
}

/// The membership a batch carries, if it is a well-formed membership batch.
fn decode_membership_batch(raw: &Bytes) -> Option<Membership> {
    let h = BatchHeader::parse(raw).ok()?;
    if !h.is_control() || h.records_count() != 1 {
        return None;
    }
    let mut buf = raw.clone();
    let set = kafka_protocol::records::RecordBatchDecoder::decode(&mut buf).ok()?;
    let record = set.records.first()?;
    let key = record.key.as_ref()?;
    if key.len() != 4 || key[2..4] != MEMBERSHIP_CONTROL_TYPE.to_be_bytes() {
        return None;
    }
    let v = record.value.as_ref()?;
    if v.len() < 2 || v[0..2] != [0, 0] {
        return None;
    }
    let mut at = 2;
    let mut lists = [Vec::new(), Vec::new()];
    for list in &mut lists {
        let n = u32::from_be_bytes(v.get(at..at + 4)?.try_into().ok()?) as usize;
        at += 4;
        if n > MAX_MEMBERSHIP_NODES {
            return None;
        }
        for _ in 0..n {
            let id = i32::from_be_bytes(v.get(at..at + 4)?.try_into().ok()?);
            at += 4;
            list.push(NodeId::try_from(id).ok()?);
        }
    }
    if at != v.len() {
        return None;
    }
    let [voters, learners] = lists;
    Some(Membership { voters, learners })
}

/// The membership batches of `replica`'s log, from the list at `path` (a missing file: none),
/// each checked against the log: an offset at or past the log end, or where the log holds no
/// membership batch (the list is written before the batch, and a crash may come between), is
/// dropped.
async fn read_memberships(
    replica: &PartitionReplica,
    path: &Path,
) -> Result<Vec<(Offset, Membership)>, ReplicaError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(hard_state_error(path, e)),
    };
    let offsets = decode_membership_offsets(&bytes).map_err(|r| hard_state_error(path, r))?;
    let log_end = replica.log_end_offset();
    let mut out = Vec::with_capacity(offsets.len());
    for o in offsets.into_iter().filter(|&o| o < log_end) {
        // A membership batch is one small record; the first batch read at its offset is it.
        let read = replica.read_local(o, 4096).await?;
        let Some(raw) = read.batches.first() else {
            continue;
        };
        let at = BatchHeader::parse(raw).map(|h| h.base_offset() as u64);
        if at.ok() != Some(o) {
            continue;
        }
        if let Some(m) = decode_membership_batch(raw) {
            out.push((o, m));
        }
    }
    Ok(out)
}

fn encode_membership_offsets(offsets: &[Offset]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + 1 + 4 + 8 * offsets.len() + 4);
    b.extend_from_slice(MEMBERSHIP_FILE_MAGIC);
    b.push(MEMBERSHIP_FILE_VERSION);
    b.extend_from_slice(&(offsets.len() as u32).to_be_bytes());
    for o in offsets {
        b.extend_from_slice(&o.to_be_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_be_bytes());
    b
}

fn decode_membership_offsets(b: &[u8]) -> Result<Vec<Offset>, String> {
    if b.len() < 13 || &b[0..4] != MEMBERSHIP_FILE_MAGIC || b[4] != MEMBERSHIP_FILE_VERSION {
        return Err("not a membership list of this version".into());
    }
    let n = u32::from_be_bytes(b[5..9].try_into().expect("4 bytes")) as usize;
    if n > MAX_TRACKED_MEMBERSHIP_BATCHES || b.len() != 9 + 8 * n + 4 {
        return Err(format!("{} bytes for {n} entries", b.len()));
    }
    let crc = u32::from_be_bytes(b[b.len() - 4..].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&b[..b.len() - 4]) {
        return Err("checksum mismatch".into());
    }
    Ok(b[9..9 + 8 * n]
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Replaces the membership list at `path` whole (temp, fsync, rename, directory fsync).
fn write_membership_offsets(path: &Path, offsets: &[Offset]) -> std::io::Result<()> {
    write_atomically(path, &encode_membership_offsets(offsets))
}

fn hard_state_error(path: &Path, reason: impl std::fmt::Display) -> ReplicaError {
    ReplicaError::HardState {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The epoch and vote in a partition's own hard-state file (what releases before the shard
/// store wrote), `None` if there is none.
fn read_hard_state(path: &Path) -> Result<Option<HardState>, ReplicaError> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(hard_state_error(path, e)),
    };
    let slots = read_hard_state_slots(&file).map_err(|e| hard_state_error(path, e))?;
    newest_hard_state(&slots)
        .map(Some)
        .map_err(|reason| hard_state_error(path, reason))
}

/// The newer of two persisted states of one group; two different votes in one epoch is a
/// record that cannot be trusted.
fn newest_of(a: HardState, b: HardState) -> Result<HardState, String> {
    if hard_state_order(&a) == hard_state_order(&b) && a != b {
        return Err(format!("two votes in epoch {}: {a:?} and {b:?}", a.epoch));
    }
    Ok(if hard_state_order(&b) > hard_state_order(&a) {
        b
    } else {
        a
    })
}

/// Byte offsets of the hard-state file's two slots. A write goes to the slot that does not
/// hold the newest state, so a write torn by a crash damages only a state that was never
/// acted on (the vote is sent after its fdatasync returns) and the other slot still holds the
/// one before it. The slots are a page apart so that no device writes them in one sector.
const HARD_STATE_SLOTS: [u64; 2] = [0, 4096];

/// Each slot's bytes: `None` where the file ends before the slot (a file of one slot is what
/// the first write, and releases before two slots, leave).
fn read_hard_state_slots(file: &std::fs::File) -> std::io::Result<[Option<Vec<u8>>; 2]> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    let mut slots = [None, None];
    for (i, &at) in HARD_STATE_SLOTS.iter().enumerate() {
        if len > at {
            // Never more than a slot, whatever the file's length claims.
            let n = (len - at).min(HARD_STATE_BYTES as u64) as usize;
            let mut b = vec![0u8; n];
            file.read_exact_at(&mut b, at)?;
            slots[i] = Some(b);
        }
    }
    Ok(slots)
}

/// The newest valid slot. One damaged slot is a write torn by a crash (its state was never
/// acted on); both damaged, or two different votes in one epoch, is a file that cannot be
/// trusted, and the group refuses to open rather than vote again.
fn newest_hard_state(slots: &[Option<Vec<u8>>; 2]) -> Result<HardState, String> {
    let mut valid = Vec::with_capacity(2);
    let mut errors = Vec::new();
    for (i, b) in slots.iter().enumerate() {
        if let Some(b) = b {
            match decode_hard_state(b) {
                Ok(h) => valid.push((i, h)),
                Err(e) => errors.push(format!("slot {i}: {e}")),
            }
        }
    }
    match valid.as_slice() {
        [] => Err(errors.join("; ")),
        [(_, h)] => Ok(*h),
        [(_, a), (_, b)] => newest_of(*a, *b),
        _ => unreachable!("two slots"),
    }
}

/// The slot a new state goes to: the one not holding the newest valid state.
#[cfg(test)]
fn hard_state_target_slot(slots: &[Option<Vec<u8>>; 2]) -> usize {
    let decoded: Vec<Option<HardState>> = slots
        .iter()
        .map(|b| b.as_deref().and_then(|b| decode_hard_state(b).ok()))
        .collect();
    match (decoded[0], decoded[1]) {
        (Some(a), Some(b)) if hard_state_order(&b) > hard_state_order(&a) => 0,
        (Some(_), _) => 1,
        _ => 0,
    }
}

#[cfg(test)]
fn encode_hard_state(hard: HardState) -> [u8; HARD_STATE_BYTES] {
    let mut b = [0u8; HARD_STATE_BYTES];
    b[0..4].copy_from_slice(HARD_STATE_MAGIC);
    b[4] = HARD_STATE_VERSION;
    b[5..9].copy_from_slice(&hard.epoch.to_be_bytes());
    b[9] = u8::from(hard.voted_for.is_some());
    b[10..18].copy_from_slice(&hard.voted_for.unwrap_or(0).to_be_bytes());
    let crc = crc32c::crc32c(&b[..18]);
    b[18..22].copy_from_slice(&crc.to_be_bytes());
    b
}

fn decode_hard_state(b: &[u8]) -> Result<HardState, String> {
    if b.len() != HARD_STATE_BYTES {
        return Err(format!("{} bytes, expected {HARD_STATE_BYTES}", b.len()));
    }
    if &b[0..4] != HARD_STATE_MAGIC || b[4] != HARD_STATE_VERSION {
        return Err("not a hard-state file of this version".into());
    }
    let crc = u32::from_be_bytes(b[18..22].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&b[..18]) {
        return Err("checksum mismatch".into());
    }
    let epoch = i32::from_be_bytes(b[5..9].try_into().expect("4 bytes"));
    let vote = u64::from_be_bytes(b[10..18].try_into().expect("8 bytes"));
    let voted_for = match b[9] {
        0 => None,
        1 => Some(vote),
        f => return Err(format!("bad vote flag {f}")),
    };
    Ok(HardState { epoch, voted_for })
}

/// How releases before the shard store wrote a partition's hard state (kept to write the
/// files the upgrade tests read): so that a crash leaves the old or the new one whole. The first write
/// creates the file with temp file, fsync, rename and directory fsync; later ones overwrite
/// the older of its two slots in place and fdatasync ([`HARD_STATE_SLOTS`]): a torn write
/// leaves the previous state readable in the other slot. One device flush per vote instead of
/// two journal commits and a directory entry: with thousands of partitions electing at once
/// (a topic created, a node restarted) those synchronous commits held a shard for seconds,
/// long enough for its leaders to be deposed.
#[cfg(test)]
pub(crate) fn write_hard_state(path: &Path, hard: HardState) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let bytes = encode_hard_state(hard);
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => {
            let slots = read_hard_state_slots(&f)?;
            if let Ok(current) = newest_hard_state(&slots) {
                debug_assert!(
                    hard_state_order(&hard) >= hard_state_order(&current),
                    "hard state went back: {current:?} -> {hard:?}"
                );
            }
            let slot = hard_state_target_slot(&slots);
            f.write_all_at(&bytes, HARD_STATE_SLOTS[slot])?;
            f.sync_data()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => write_atomically(path, &bytes),
        Err(e) => Err(e),
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_state_round_trips_and_damage_is_refused() {
        for hard in [
            HardState::default(),
            HardState {
                epoch: 7,
                voted_for: Some(3),
            },
        ] {
            let b = encode_hard_state(hard);
            assert_eq!(decode_hard_state(&b), Ok(hard));
            for i in 0..b.len() {
                let mut bad = b;
                bad[i] ^= 0x40;
                assert!(
                    decode_hard_state(&bad).is_err(),
                    "flip at byte {i} accepted"
                );
            }
            assert!(decode_hard_state(&b[..b.len() - 1]).is_err());
        }
    }

    #[test]
    fn hard_state_is_created_then_overwritten_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0.hard-state");
        assert_eq!(
            read_hard_state(&path).unwrap().unwrap_or_default(),
            HardState::default()
        );
        for (epoch, voted_for) in [(1, Some(1)), (2, None), (2, Some(3)), (9, Some(2))] {
            let hard = HardState { epoch, voted_for };
            write_hard_state(&path, hard).unwrap();
            assert_eq!(read_hard_state(&path).unwrap().unwrap_or_default(), hard);
            let len = std::fs::metadata(&path).unwrap().len();
            assert!(
                len <= HARD_STATE_SLOTS[1] + HARD_STATE_BYTES as u64,
                "overwritten, not appended to"
            );
        }
        // Only the creation goes through a temp file, and none is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    /// A crash in the middle of any write leaves the state before it or the new one, never
    /// neither: every prefix of the slot being written (and garbage in it) is tried.
    #[test]
    fn a_torn_hard_state_write_leaves_the_previous_state() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0.hard-state");
        let states = [
            HardState {
                epoch: 1,
                voted_for: Some(1),
            },
            HardState {
                epoch: 2,
                voted_for: None,
            },
            HardState {
                epoch: 2,
                voted_for: Some(3),
            },
            HardState {
                epoch: 5,
                voted_for: Some(2),
            },
        ];
        let mut before = HardState::default();
        for next in states {
            if path.exists() {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .unwrap();
                let slots = read_hard_state_slots(&f).unwrap();
                let slot = hard_state_target_slot(&slots);
                let at = HARD_STATE_SLOTS[slot];
                let saved = std::fs::read(&path).unwrap();
                let bytes = encode_hard_state(next);
                for cut in 0..bytes.len() {
                    f.write_all_at(&bytes[..cut], at).unwrap();
                    f.write_all_at(&[0xA5u8; 3][..(bytes.len() - cut).min(3)], at + cut as u64)
                        .unwrap();
                    let got = read_hard_state(&path).unwrap().unwrap_or_default();
                    assert!(got == before || got == next, "cut {cut}: {got:?}");
                    std::fs::write(&path, &saved).unwrap();
                }
            }
            write_hard_state(&path, next).unwrap();
            assert_eq!(read_hard_state(&path).unwrap().unwrap_or_default(), next);
            before = next;
        }
    }

    #[test]
    fn a_hard_state_file_of_one_slot_still_opens() {
        // What the first write, and releases before the second slot, leave.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0.hard-state");
        let old = HardState {
            epoch: 4,
            voted_for: Some(2),
        };
        std::fs::write(&path, encode_hard_state(old)).unwrap();
        assert_eq!(read_hard_state(&path).unwrap().unwrap_or_default(), old);
        let new = HardState {
            epoch: 5,
            voted_for: None,
        };
        write_hard_state(&path, new).unwrap();
        assert_eq!(read_hard_state(&path).unwrap().unwrap_or_default(), new);
        // Both slots damaged: refused, never read as "no vote".
        std::fs::write(&path, [0u8; 5000]).unwrap();
        assert!(read_hard_state(&path).is_err());
    }

    #[test]
    fn membership_batches_round_trip_and_others_are_not_memberships() {
        let m = Membership {
            voters: vec![1, 2, 3],
            learners: vec![4],
        };
        let b = membership_batch(&m);
        let raw = Bytes::copy_from_slice(b.header().as_bytes());
        assert_eq!(decode_membership_batch(&raw), Some(m.clone()));
        // The append must say the same membership as the bytes, and a data batch none.
        let mut batch = Batch {
            base: 0,
            count: 1,
            epoch: 0,
            bytes: raw.clone(),
            membership: Some(m),
        };
        assert_eq!(check_peer_batch(&batch, 1 << 20), Ok(()));
        batch.membership = Some(Membership::voters(&[1, 2]));
        assert!(check_peer_batch(&batch, 1 << 20).is_err());
        batch.membership = None;
        assert!(check_peer_batch(&batch, 1 << 20).is_err());
        let lc = leader_change_batch(2, &[1, 2, 3]);
        let lc = Bytes::copy_from_slice(lc.header().as_bytes());
        assert_eq!(decode_membership_batch(&lc), None);
        // Damaged values are not memberships (nor panics).
        for cut in 1..raw.len() {
            let _ = decode_membership_batch(&raw.slice(..cut));
        }
    }

    #[test]
    fn the_membership_list_round_trips_and_damage_is_refused() {
        for offsets in [vec![], vec![0, 17, 1 << 40]] {
            let b = encode_membership_offsets(&offsets);
            assert_eq!(decode_membership_offsets(&b), Ok(offsets.clone()));
            for i in 0..b.len() {
                let mut bad = b.clone();
                bad[i] ^= 0x20;
                assert!(decode_membership_offsets(&bad).is_err(), "flip at {i}");
            }
            assert!(decode_membership_offsets(&b[..b.len() - 1]).is_err());
        }
        let too_many = vec![0; MAX_TRACKED_MEMBERSHIP_BATCHES + 1];
        assert!(decode_membership_offsets(&encode_membership_offsets(&too_many)).is_err());
    }

    #[test]
    fn the_leader_change_batch_is_one_control_record() {
        let b = leader_change_batch(2, &[1, 2, 3]);
        let h = b.header();
        assert!(h.is_control());
        assert_eq!(h.records_count(), 1);
        assert_eq!(h.producer_id(), -1);
        let batch = Batch {
            base: 0,
            count: 1,
            epoch: 0,
            bytes: Bytes::copy_from_slice(h.as_bytes()),
            membership: None,
        };
        assert_eq!(check_peer_batch(&batch, 1 << 20), Ok(()));
    }
}
