//! The task that drives one shard's replicated partitions on a cluster node: it opens and closes
//! the shard's groups as the applied metadata changes, ticks them, carries their consensus
//! traffic to and from the cluster service thread, and sends their leaders' reports.
//!
//! One task per shard, one event at a time:
//! - a tick every [`PARTITION_TICK_MS`] (elections, heartbeats), and on it a look at the
//!   cluster view's generation (a new view: open, close, delete and reconfigure groups; the
//!   opening of many groups is spread over ticks, [`MAX_OPEN_MS_PER_PASS`] at a time);
//! - a message from the service ([`ShardLink::inbox`]): delivered to its groups;
//! - a group queued messages outside a tick or a delivery (a produce, a durability report):
//!   flushed at once, so acks=all waits for the network and the disks, never for a tick;
//! - a group became writable leader: its report goes out at once; reports not yet accepted
//!   are repeated every [`REPORT_INTERVAL_MS`];
//! - the controller accepted a report ([`ShardLink::accepted`]): it is not repeated.
//!
//! The runtime never waits for a group: a tick, a message or a flush for a group whose lock is
//! held (a produce or a follower's append on disk, a leader reading batches to send) or whose
//! work needs the disk is done by that group's own drainer task, in order (see
//! [`crate::partition::PartitionGroup::step_or_defer`]); what it queues is flushed on its
//! outbox signal. So one busy partition holds up no other partition's heartbeats or answers.
//!
//! Everything sent goes to [`ShardLink::to_service`] with `try_send`: a full channel drops
//! (counted) rather than stalls the shard; consensus retransmits and reports repeat.
//!
//! Hard state (epochs and votes) goes to the shard's [`crate::shard::HardStateStore`]: the
//! groups record it in memory as they are stepped, and the first group handing out messages
//! after that waits for one write and one fdatasync covering every group of the pass (the
//! others find theirs durable). So a pass of thousands of votes costs one device flush, and
//! the shard's other tasks run while it is under way. After opening groups and on a tick, the
//! runtime also starts a flush of states nothing is sent for, on a task of its own (it does
//! not wait for it); it reports only leaders whose hard state is durable.
//!
//! On each tick the runtime also moves leadership the applied metadata wants elsewhere: a
//! group it leads whose partition has a wished leader (a preferred-leader election or the
//! balancer), or whose node is in maintenance mode, transfers leadership by consensus
//! ([`crate::controller::leadership::transfer_target`] picks the node), at most once per
//! [`LEADERSHIP_TRANSFER_RETRY_MS`] per group and target.
//!
//! On each tick the runtime also carries out replica moves
//! ([`crate::controller::reassignment`]): a group it leads whose partition is moving takes the
//! next membership step (a learner added, a caught-up learner promoted, a replica outside the
//! target removed, leadership handed to a target voter before the leader removes itself), and
//! once its voters are the target and that change has committed, reports the end to the
//! controller (at most once per [`REASSIGNMENT_RETRY_MS`]). A node no longer among a
//! partition's replicas once the move ended closes the partition and deletes its files.
//!
//! Every [`REPLICATION_VIEW_EVERY_TICKS`] ticks the runtime also hands each group's replication
//! view to its replica's observer (only when it changed), and on each tick its own counters to the [`RuntimeObserver`]: that is
//! how metrics see replication without this crate knowing of them.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::future::or;

use crate::cluster::throttle::ReplicationThrottle;
use crate::cluster::{
    partition_group_id, plan_hosting, HostedPartition, HostingPlan, LeaderReport, ShardEvent,
    ShardGroups, ShardLink,
};
use crate::controller::leadership::transfer_target;
use crate::controller::reassignment::{apply_step, next_step, Reassignment, Step};
use crate::controller::view::ClusterView;
use crate::liveness::{LiveNodes, PeerLiveness, Ping, PingsSeen};
use crate::node::NodeMessage;
use crate::partition::{ReplicationGauges, TopicPartition};
use crate::replica::{DEFAULT_ELECTION_TIMEOUT_TICKS, DEFAULT_HEARTBEAT_INTERVAL_TICKS};
use crate::shard::{cross_wake, Deadline, ReplicaSet, Signal};
use crate::types::{GroupId, NodeId};

/// The partition groups' unit of logical time. The core's election timeout is 10 to 20 ticks
/// (0.5 to 1 s) and its heartbeat 2 ticks (100 ms): a failed leader is replaced in about a
/// second.
pub const PARTITION_TICK_MS: u64 = 50;
/// How often a leader's report the controller has not accepted yet is sent again. A new
/// leadership is reported at once; this bounds the AlterIsr traffic of in-sync-set changes.
pub const REPORT_INTERVAL_MS: u64 = 200;
/// How long a leader waits before asking again to hand leadership to the same node (a
/// preferred-leader election, the balancer or maintenance mode wants it elsewhere). The core
/// abandons a transfer that has not finished within an election timeout (0.5-1 s); this is
/// longer, so a transfer is never asked for while one is under way.
pub const LEADERSHIP_TRANSFER_RETRY_MS: u64 = 1_500;

/// How long a partition leader waits before asking the controller again to end a finished
/// move, or to hand leadership away before removing itself.
pub const REASSIGNMENT_RETRY_MS: u64 = 1_000;

/// How long one pass over a new cluster view may spend opening groups before the shard goes
/// back to its ticks and messages; the rest open on the next ticks. Opening a replica (its
/// files, its hard state, the preferred replica's first vote) takes milliseconds of disk work,
/// so a topic of thousands of partitions opened in one go held the shard for seconds: no
/// heartbeat of its open groups went out, their peers started elections, and the elections'
/// vote fsyncs held every node further. Opened a few at a time on every node in the same
/// (group id) order, the groups also elect in waves instead of all at once.
pub const MAX_OPEN_MS_PER_PASS: u64 = 20;
/// Groups a pass opens whatever the time they take, so a handful of new partitions open in
/// one pass even on a slow disk.
pub const MIN_OPENS_PER_PASS: usize = 8;

/// Every how many ticks each group's replication view is compared with what its observer last
/// saw (metrics: leader, ISR size, lag). Every tick cost a pass over every group (thousands on
/// a shard) for gauges a scrape reads every few seconds; ten ticks is half a second.
pub const REPLICATION_VIEW_EVERY_TICKS: u64 = 10;
/// Partition files in the data dir looked at by the one sweep for files of partitions the node
/// no longer holds (see [`Runtime::remove_orphans`]); a data dir with more is swept in part.
pub const MAX_ORPHAN_SCAN_PARTITIONS: usize = 1_000_000;

/// Incoming node messages stepped before their groups' replies are flushed: batches a burst
/// (a peer's per-tick messages arrive together) without holding replies back for long.
pub const MAX_MESSAGES_PER_FLUSH: usize = 32;

/// A tick handled this long after it was due, or one event that held the runtime this long, is
/// counted and logged (at most once per [`SLOW_LOG_INTERVAL_MS`]): the shard's leaders are that
/// late with their heartbeats, and followers elsewhere elect after 500 ms without one.
pub const SLOW_SHARD_MS: u64 = 100;
pub const SLOW_LOG_INTERVAL_MS: u64 = 1_000;

/// Where a runtime's ticks come from.
pub enum TickSource {
    /// A timer (production: [`PARTITION_TICK_MS`]).
    Every(Duration),
    /// One tick per message (tests that must know exactly when groups tick). A closed channel
    /// ticks no more.
    Manual(flume::Receiver<()>),
}

pub struct RuntimeConfig {
    /// This node.
    pub node: NodeId,
    pub ticks: TickSource,
    pub report_interval: Duration,
    /// Kept current while the runtime runs (for metrics and tests).
    pub stats: Rc<RefCell<RuntimeStats>>,
    /// Told the stats after every tick (metrics); none by default.
    pub observer: Option<Box<dyn RuntimeObserver>>,
    /// The node's replication throttle for catch-up traffic (shared by its shards); none: off.
    pub throttle: Option<Arc<ReplicationThrottle>>,
}

/// Sees a runtime's counters as they move (the broker's metrics). Called on the shard's
/// thread after each tick, so it must be cheap.
pub trait RuntimeObserver {
    fn stats(&self, stats: &RuntimeStats);
}

impl RuntimeConfig {
    /// The shipped cadence: [`PARTITION_TICK_MS`], [`REPORT_INTERVAL_MS`].
    pub fn new(node: NodeId) -> Self {
        RuntimeConfig {
            node,
            ticks: TickSource::Every(Duration::from_millis(PARTITION_TICK_MS)),
            report_interval: Duration::from_millis(REPORT_INTERVAL_MS),
            stats: Rc::default(),
            observer: None,
            throttle: None,
        }
    }
}

/// What a runtime did, returned when it stops (and logged).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeStats {
    /// Ticks fully handled (their messages sent).
    pub ticks: u64,
    /// Node messages handed to the service, and dropped on a full or closed channel.
    pub messages_sent: u64,
    pub messages_dropped: u64,
    /// Flushes caused by a group's outbox signal (not a tick or a delivery).
    pub signalled_flushes: u64,
    pub reports_sent: u64,
    pub reports_dropped: u64,
    /// Peer messages dropped because the group they were for was busy and its shard held
    /// all it may for busy groups (`partition::MAX_DEFERRED_BYTES` and its siblings).
    pub deferred_dropped: u64,
    /// Cluster views acted on.
    pub views: u64,
    /// Groups that could not be opened (retried at the next view).
    pub open_failures: u64,
    /// Leadership transfers started (to a wished leader, or away from a node in maintenance).
    pub leadership_transfers: u64,
    /// Membership changes proposed for replica moves, and moves reported finished.
    pub membership_changes: u64,
    pub reassignments_finished: u64,
    /// Partitions whose files were removed at start because this node no longer holds them.
    pub orphans_removed: u64,
    /// Group ticks due (every hosted group on every tick), and those quiet groups skipped
    /// (handed over with their next tick: see `PartitionGroup::tick_or_defer`).
    pub group_ticks: u64,
    pub group_ticks_skipped: u64,
    /// Groups quiet at the last tick (see [`crate::replica::Replica::quiesced`]): a gauge.
    pub quiet_groups: u64,
    /// Ticks handled [`SLOW_SHARD_MS`] or more after they were due, and events that held the
    /// runtime that long, with the longest of each (ms).
    pub late_ticks: u64,
    pub max_tick_late_ms: u64,
    pub slow_events: u64,
    pub max_event_ms: u64,
}

enum Event {
    Stop,
    Tick,
    TicksEnded,
    Inbox(NodeMessage),
    InboxClosed,
    Accepted(LeaderReport),
    AcceptedClosed,
    Outbox,
    Leadership,
}

impl Event {
    fn kind(&self) -> &'static str {
        match self {
            Event::Stop => "stop",
            Event::Tick => "tick",
            Event::TicksEnded => "ticks ended",
            Event::Inbox(_) => "inbox",
            Event::InboxClosed => "inbox closed",
            Event::Accepted(_) => "accepted",
            Event::AcceptedClosed => "accepted closed",
            Event::Outbox => "outbox",
            Event::Leadership => "leadership",
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Logs a slow runtime at most once per [`SLOW_LOG_INTERVAL_MS`].
#[derive(Default)]
struct SlowLog {
    last: Option<Instant>,
    skipped: u64,
}

/// This thread's CPU time and time spent runnable but waiting for a CPU, in nanoseconds
/// (`/proc/thread-self/schedstat`), so that a late tick says whether the shard was working,
/// waiting for the CPU, or blocked. None where the kernel does not keep them.
fn thread_sched_ns() -> Option<(u64, u64)> {
    let raw = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let mut it = raw.split_whitespace().map(|v| v.parse::<u64>().ok());
    Some((it.next()??, it.next()??))
}

impl SlowLog {
    /// Whether a slow event may be logged now (at most one per [`SLOW_LOG_INTERVAL_MS`]), and
    /// how many were skipped since the last one logged.
    fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        let interval = Duration::from_millis(SLOW_LOG_INTERVAL_MS);
        if self.last.is_some_and(|t| now.duration_since(t) < interval) {
            self.skipped += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.skipped))
    }

    /// A late tick: how long the thread ran and waited for a CPU between the tick before it
    /// (`since`) and this one (`now`), where the kernel keeps those times.
    fn note_late_tick(
        &mut self,
        shard: usize,
        late_ms: u64,
        since: Option<(u64, u64)>,
        now: Option<(u64, u64)>,
    ) {
        let Some(skipped) = self.due() else { return };
        let times = since.zip(now).map(|(a, b)| {
            (
                b.0.saturating_sub(a.0) / 1_000_000,
                b.1.saturating_sub(a.1) / 1_000_000,
            )
        });
        tracing::warn!(
            shard,
            late_ms,
            on_cpu_ms = times.map(|t| t.0),
            waiting_for_cpu_ms = times.map(|t| t.1),
            more_since_last = skipped,
            "shard runtime held up: its leaders' heartbeats are late (tick late)"
        );
    }

    fn note(&mut self, shard: usize, what: &str, took_ms: u64) {
        let Some(skipped) = self.due() else { return };
        tracing::warn!(
            shard,
            what,
            took_ms,
            more_since_last = skipped,
            "shard runtime held up: its leaders' heartbeats are late"
        );
    }
}

/// Drives the replicated partitions of `replicas`' shard until `stop` resolves, then closes
/// every group (their files stay). Spawned once per shard on a cluster node, on that shard's
/// executor, with the shard's end of the service channels.
pub async fn run(
    replicas: Rc<ReplicaSet>,
    link: ShardLink,
    config: RuntimeConfig,
    stop: impl Future<Output = ()>,
) -> RuntimeStats {
    let mut rt = Runtime {
        groups: ShardGroups::new(config.node),
        replicas,
        node: config.node,
        report_interval: config.report_interval,
        plan: HostingPlan::default(),
        configs: BTreeMap::new(),
        generation: None,
        opens_pending: false,
        outbox_seen: 0,
        leadership_seen: 0,
        last_reported: None,
        reported: BTreeMap::new(),
        published: BTreeMap::new(),
        transfers: BTreeMap::new(),
        finishing: BTreeMap::new(),
        orphans_swept: false,
        synced: Rc::default(),
        proposing: Rc::default(),
        syncing: Rc::default(),
        throttle: config.throttle.clone(),
        stats: config.stats.clone(),
        liveness: PeerLiveness::new(DEFAULT_ELECTION_TIMEOUT_TICKS),
        pings_seen: PingsSeen::new(),
    };
    let mut stop = std::pin::pin!(stop);
    let (mut timer, manual) = match config.ticks {
        TickSource::Every(d) => (Some((d, Instant::now() + d)), None),
        TickSource::Manual(rx) => (None, Some(rx)),
    };
    // One reactor timer per tick, kept across the events between ticks (a timer made per
    // event, or polled on every wake-up, would be registered again each time: see `Deadline`).
    let mut next_tick = timer.map(|(_, at)| Box::pin(Deadline::at(at)));
    let (mut inbox_open, mut accepted_open, mut manual_open) = (true, true, manual.is_some());
    let mut slow_log = SlowLog::default();
    let mut last_tick_sched = thread_sched_ns();
    rt.check_view(&link).await;
    loop {
        let outbox = rt.groups.outbox_signal();
        let leadership = rt.groups.leadership_signal();
        let (outbox_seen, leadership_seen) = (rt.outbox_seen, rt.leadership_seen);
        let event = or(
            async {
                stop.as_mut().await;
                Event::Stop
            },
            or(
                async {
                    match (&mut next_tick, &manual) {
                        (Some(deadline), _) => {
                            deadline.as_mut().await;
                            Event::Tick
                        }
                        (None, Some(rx)) if manual_open => match cross_wake::recv(rx).await {
                            Ok(()) => Event::Tick,
                            Err(_) => Event::TicksEnded,
                        },
                        _ => std::future::pending().await,
                    }
                },
                or(
                    async {
                        outbox.changed(outbox_seen).await;
                        Event::Outbox
                    },
                    or(
                        async {
                            leadership.changed(leadership_seen).await;
                            Event::Leadership
                        },
                        or(
                            async {
                                if !inbox_open {
                                    return std::future::pending().await;
                                }
                                match cross_wake::recv(&link.inbox).await {
                                    Ok(m) => Event::Inbox(m),
                                    Err(_) => Event::InboxClosed,
                                }
                            },
                            async {
                                if !accepted_open {
                                    return std::future::pending().await;
                                }
                                match cross_wake::recv(&link.accepted).await {
                                    Ok(r) => Event::Accepted(r),
                                    Err(_) => Event::AcceptedClosed,
                                }
                            },
                        ),
                    ),
                ),
            ),
        )
        .await;
        let started = Instant::now();
        let kind = event.kind();
        match event {
            Event::Stop => break,
            Event::TicksEnded => manual_open = false,
            Event::Tick => {
                if let Some((every, at)) = &mut timer {
                    // A late tick is not made up for (no burst of ticks after a stall): the
                    // groups' clocks are ticks, not time.
                    let now = Instant::now();
                    let late = ms(now.saturating_duration_since(*at));
                    let sched = thread_sched_ns();
                    if late >= SLOW_SHARD_MS {
                        let mut st = rt.stats.borrow_mut();
                        st.late_ticks += 1;
                        st.max_tick_late_ms = st.max_tick_late_ms.max(late);
                        drop(st);
                        slow_log.note_late_tick(link.shard, late, last_tick_sched, sched);
                    }
                    last_tick_sched = sched;
                    *at += *every;
                    if *at <= now {
                        *at = now + *every;
                    }
                    next_tick = Some(Box::pin(Deadline::at(*at)));
                }
                // Pings first: the view's group opens and closes may take a while.
                let live = rt.liveness_tick(&link);
                rt.check_view(&link).await;
                let (skipped, quiet) = rt.groups.tick_all(&live);
                {
                    let mut st = rt.stats.borrow_mut();
                    st.group_ticks += rt.groups.len() as u64;
                    st.group_ticks_skipped += skipped;
                    st.quiet_groups = quiet;
                }
                // What the ticks queued is taken now: seen, so no second flush for it.
                rt.outbox_seen = rt.groups.outbox_signal().generation();
                let out = rt.groups.take_outgoing();
                rt.send(&link, out);
                rt.sync_hard_states_behind();
                rt.report(&link, false);
                rt.move_leadership(&link);
                rt.move_replicas(&link);
                // Every group every REPLICATION_VIEW_EVERY_TICKS; the groups of moving
                // partitions every tick, so a scrape sees a new replica's catch-up from its
                // start.
                let every = rt
                    .stats
                    .borrow()
                    .ticks
                    .is_multiple_of(REPLICATION_VIEW_EVERY_TICKS);
                rt.publish_replication(&link, every);
                {
                    let mut st = rt.stats.borrow_mut();
                    st.ticks += 1;
                    st.deferred_dropped = rt.groups.deferred_dropped();
                }
                if let Some(o) = &config.observer {
                    o.stats(&rt.stats.borrow());
                }
            }
            Event::Inbox(msg) => {
                rt.groups.step(msg);
                // What else has arrived is stepped before the flush: one pass over the groups
                // and one message per peer for all of it.
                for _ in 1..MAX_MESSAGES_PER_FLUSH {
                    let Ok(msg) = link.inbox.try_recv() else {
                        break;
                    };
                    rt.groups.step(msg);
                }
                // What the steps queued is taken now: seen, so no second flush for it.
                rt.outbox_seen = rt.groups.outbox_signal().generation();
                let out = rt.groups.take_outgoing();
                rt.send(&link, out);
            }
            Event::Outbox => {
                rt.stats.borrow_mut().signalled_flushes += 1;
                rt.outbox_seen = rt.groups.outbox_signal().generation();
                let out = rt.groups.take_outgoing();
                rt.send(&link, out);
            }
            Event::Leadership => rt.report(&link, true),
            Event::Accepted(r) => rt.groups.acknowledge(r),
            Event::InboxClosed => {
                tracing::warn!(node = rt.node, shard = link.shard, "consensus inbox closed");
                inbox_open = false;
            }
            Event::AcceptedClosed => accepted_open = false,
        }
        let took = ms(started.elapsed());
        if took >= SLOW_SHARD_MS {
            let mut st = rt.stats.borrow_mut();
            st.slow_events += 1;
            st.max_event_ms = st.max_event_ms.max(took);
            drop(st);
            slow_log.note(link.shard, kind, took);
        }
    }
    for g in rt.groups.ids() {
        if let Some(group) = rt.groups.remove(g) {
            group.replica().observe_replication(None);
        }
    }
    // A flush under way finishes (its task is detached: cancelling it mid-write would leave
    // the store's waiters waiting).
    while rt.syncing.get() {
        let seen = rt.synced.generation();
        rt.synced.changed(seen).await;
    }
    rt.stats.borrow_mut().deferred_dropped = rt.groups.deferred_dropped();
    rt.replicas.close_groups().await;
    let stats = rt.stats.borrow().clone();
    tracing::info!(
        node = rt.node,
        shard = link.shard,
        ?stats,
        "replicated partitions of the shard stopped"
    );
    stats
}

struct Runtime {
    groups: ShardGroups,
    replicas: Rc<ReplicaSet>,
    node: NodeId,
    report_interval: Duration,
    /// The groups open on this shard, as the plan named them.
    plan: HostingPlan,
    /// The configs last applied, per topic with a group open here.
    configs: BTreeMap<String, BTreeMap<String, String>>,
    /// The cluster view last acted on.
    generation: Option<u64>,
    /// Groups of that view are still to open (the last pass ran out of its time budget).
    opens_pending: bool,
    /// The signals' generations before the last flush and report (a notify after them is
    /// acted on).
    outbox_seen: u64,
    leadership_seen: u64,
    last_reported: Option<Instant>,
    /// The last report sent per group: a new epoch is sent at once, a repeat at the interval.
    reported: BTreeMap<GroupId, LeaderReport>,
    /// The replication view last handed to each group's observer: only changes are handed on.
    published: BTreeMap<GroupId, ReplicationGauges>,
    /// The last leadership transfer asked of each group: to whom, and when.
    transfers: BTreeMap<GroupId, (NodeId, Instant)>,
    /// When each group last reported its move finished.
    finishing: BTreeMap<GroupId, Instant>,
    /// The data dir was swept for files of partitions this node no longer holds (once per
    /// start, by shard 0), and the shard's hard-state store for their groups.
    orphans_swept: bool,
    /// Whether a flush of hard states started by a tick is under way, and a signal when one
    /// ends.
    syncing: Rc<Cell<bool>>,
    synced: Rc<Signal>,
    /// Groups with a membership change being proposed (on a task of its own).
    proposing: Rc<RefCell<HashSet<GroupId>>>,
    throttle: Option<Arc<ReplicationThrottle>>,
    stats: Rc<RefCell<RuntimeStats>>,
    /// The peers' liveness as this shard has read it from the service's ping board, and the
    /// pings read so far (see [`crate::liveness`]).
    liveness: PeerLiveness,
    pings_seen: PingsSeen,
}

impl Runtime {
    /// The liveness part of a tick: every heartbeat interval this shard pings every peer
    /// node; the pings peers sent are read and the peers' liveness moves on a tick. Returns
    /// who is live now, for the quiet groups.
    fn liveness_tick(&mut self, link: &ShardLink) -> LiveNodes {
        let board = link.port.pings();
        if self
            .stats
            .borrow()
            .ticks
            .is_multiple_of(u64::from(DEFAULT_HEARTBEAT_INTERVAL_TICKS))
        {
            let ping = Ping {
                token: board.token(),
                shard: link.shard as u32,
            };
            // Counted with the consensus drops: the same channel, full.
            if link.to_service.try_send(ShardEvent::Ping(ping)).is_err() {
                self.stats.borrow_mut().messages_dropped += 1;
            }
        }
        board.read_into(&mut self.pings_seen, &mut self.liveness);
        self.liveness.tick();
        self.liveness.snapshot()
    }

    /// Flushes hard states recorded with nothing to send on a task of its own, one flush at a
    /// time: the tick does not wait for the fdatasync (a group whose messages need its state
    /// durable waits for it itself).
    fn sync_hard_states_behind(&mut self) {
        let pending = self.replicas.hard_states().is_some_and(|s| s.has_pending());
        if !pending || self.syncing.get() {
            return;
        }
        self.syncing.set(true);
        let (replicas, syncing, node) = (self.replicas.clone(), self.syncing.clone(), self.node);
        let synced = self.synced.clone();
        glommio::spawn_local(async move {
            if let Err(e) = replicas.sync_hard_states().await {
                tracing::error!(node, error = %e, "hard-state store flush failed");
            }
            syncing.set(false);
            synced.notify();
        })
        .detach();
    }

    fn send(&mut self, link: &ShardLink, out: Vec<NodeMessage>) {
        for m in out {
            match link.to_service.try_send(ShardEvent::Send(m)) {
                Ok(()) => self.stats.borrow_mut().messages_sent += 1,
                Err(_) => self.stats.borrow_mut().messages_dropped += 1,
            }
        }
    }

    /// Groups this shard leads whose partition the applied metadata wants led elsewhere (a
    /// wished leader, or this node in maintenance or being decommissioned) transfer leadership
    /// to that node, each at most once per [`LEADERSHIP_TRANSFER_RETRY_MS`] for the same target.
    fn move_leadership(&mut self, link: &ShardLink) {
        let view = link.port.view();
        let state = &view.metadata;
        let draining = state.is_draining(self.node);
        if state.leader_wishes.is_empty() && !draining {
            self.transfers.clear();
            return;
        }
        let now = Instant::now();
        let retry = Duration::from_millis(LEADERSHIP_TRANSFER_RETRY_MS);
        // Only groups the metadata names: every one led here when this node is in
        // maintenance, else those with a wish (looked up by their group id, so an idle shard
        // with thousands of groups does not scan them all every tick).
        let candidates: Vec<GroupId> = if draining {
            self.plan.groups.keys().copied().collect()
        } else {
            state
                .leader_wishes
                .keys()
                .filter_map(|(topic, partition)| {
                    let t = state.topics.get(topic)?;
                    let g = partition_group_id(t.topic_id, *partition);
                    self.plan.groups.contains_key(&g).then_some(g)
                })
                .collect()
        };
        let mut moves = Vec::new();
        for g in candidates {
            let (Some(group), Some(h)) = (self.groups.get(g), self.plan.groups.get(&g)) else {
                continue;
            };
            if !group.is_writable_leader() {
                continue;
            }
            let in_sync = group.in_sync_voter_ids();
            let Some(target) = transfer_target(state, &h.topic, h.partition, self.node, &in_sync)
            else {
                continue;
            };
            let recent = self
                .transfers
                .get(&g)
                .is_some_and(|(t, at)| *t == target && now.duration_since(*at) < retry);
            if !recent {
                moves.push((g, group, target, h.topic.clone(), h.partition));
            }
        }
        for (g, group, target, topic, partition) in moves {
            self.transfers.insert(g, (target, now));
            // A busy group starts it once free (the shard does not wait for it).
            match group.transfer_leadership_or_defer(target) {
                Some(Err(e)) => tracing::debug!(%topic, partition, group = g, to = target,
                    error = %e, "leadership transfer not started"),
                Some(Ok(())) | None => {
                    self.stats.borrow_mut().leadership_transfers += 1;
                    tracing::info!(%topic, partition, group = g, to = target,
                        "transferring partition leadership");
                }
            }
        }
        let plan = &self.plan;
        self.transfers.retain(|g, _| plan.groups.contains_key(g));
    }

    /// Groups this shard leads whose partition is moving take the next step of the move
    /// ([`next_step`]): one membership change, a leadership hand-over, or the report of the end
    /// once the voters are the target and that change has committed.
    fn move_replicas(&mut self, link: &ShardLink) {
        let view = link.port.view();
        let state = &view.metadata;
        if state.reassignments.is_empty() {
            self.finishing.clear();
            return;
        }
        let now = Instant::now();
        let retry = Duration::from_millis(REASSIGNMENT_RETRY_MS);
        let mut work = Vec::new();
        for ((topic, partition), r) in &state.reassignments {
            let Some(t) = state.topics.get(topic) else {
                continue;
            };
            let g = partition_group_id(t.topic_id, *partition);
            let Some(group) = self.groups.get(g).filter(|g| g.is_writable_leader()) else {
                continue;
            };
            work.push((g, group, topic.clone(), *partition, r.target_nodes()));
        }
        for (g, group, topic, partition, target) in work {
            if !group.membership_committed() {
                continue;
            }
            let membership = group.membership();
            match next_step(&membership, &target, self.node) {
                Step::Finish => {
                    if self
                        .finishing
                        .get(&g)
                        .is_some_and(|at| now.duration_since(*at) < retry)
                    {
                        continue;
                    }
                    self.finishing.insert(g, now);
                    let port = link.port.clone();
                    let stats = self.stats.clone();
                    glommio::spawn_local(async move {
                        let res = port
                            .finish_reassignment(topic.clone(), partition, target)
                            .await;
                        match res {
                            Ok(()) => stats.borrow_mut().reassignments_finished += 1,
                            Err(e) => tracing::debug!(%topic, partition, error = %e,
                                "reassignment end not recorded yet"),
                        }
                    })
                    .detach();
                }
                Step::TransferAway => {
                    let in_sync = group.in_sync_voter_ids();
                    let Some(to) = target
                        .iter()
                        .copied()
                        .find(|n| in_sync.contains(n) && state.is_leader_candidate(*n))
                    else {
                        continue;
                    };
                    let recent = self
                        .transfers
                        .get(&g)
                        .is_some_and(|(t, at)| *t == to && now.duration_since(*at) < retry);
                    if recent {
                        continue;
                    }
                    self.transfers.insert(g, (to, now));
                    // A busy group starts it once free (the shard does not wait for it).
                    match group.transfer_leadership_or_defer(to) {
                        Some(Ok(())) | None => {
                            self.stats.borrow_mut().leadership_transfers += 1;
                            tracing::info!(%topic, partition, group = g, to,
                                "moving replicas: handing leadership to a target replica");
                        }
                        Some(Err(e)) => tracing::debug!(%topic, partition, group = g, to,
                            error = %e, "leadership transfer not started"),
                    }
                }
                step => {
                    // On a task of its own: the group may be busy with disk I/O, and the
                    // shard does not wait for a group. One proposal per group at a time.
                    if !self.proposing.borrow_mut().insert(g) {
                        continue;
                    }
                    let next = apply_step(&membership, &step).expect("a membership change");
                    let (stats, proposing) = (self.stats.clone(), self.proposing.clone());
                    glommio::spawn_local(async move {
                        match group.propose_membership(next).await {
                            Ok(()) => {
                                stats.borrow_mut().membership_changes += 1;
                                tracing::info!(%topic, partition, group = g, ?step,
                                    "moving replicas: membership change proposed");
                            }
                            // A learner not caught up yet, an uncommitted epoch: the next tick.
                            Err(e) => tracing::debug!(%topic, partition, group = g, ?step,
                                error = %e, "membership change not proposed yet"),
                        }
                        proposing.borrow_mut().remove(&g);
                    })
                    .detach();
                }
            }
        }
        let plan = &self.plan;
        self.finishing.retain(|g, _| plan.groups.contains_key(g));
    }

    /// Hands each group's replication view to its replica's observer if it changed since it
    /// was last handed; a leader of a moving partition adds how far behind each replica the move
    /// adds is, in bytes (a replica not yet a learner lacks the whole log). `every`: all groups;
    /// otherwise only those of moving partitions (none, at the cost of one look, when nothing
    /// moves).
    fn publish_replication(&mut self, link: &ShardLink, every: bool) {
        let view = link.port.view();
        let state = &view.metadata;
        if !every && state.reassignments.is_empty() {
            return;
        }
        // Looked up by borrowed names: `MetadataState::reassignment` builds an owned key.
        let moves: HashMap<(&str, u32), &Reassignment> = state
            .reassignments
            .iter()
            .map(|((t, p), r)| ((t.as_str(), *p), r))
            .collect();
        for group in self.groups.all().iter() {
            let g = group.group();
            let moving = self
                .plan
                .groups
                .get(&g)
                .and_then(|h| moves.get(&(h.topic.as_str(), h.partition)).copied());
            if !every && moving.is_none() {
                continue;
            }
            let mut now = group.replication_gauges();
            if let Some(r) = moving.filter(|_| now.writable_leader) {
                now.reassignment_bytes_behind = r
                    .adding()
                    .into_iter()
                    .map(|n| {
                        let behind = group
                            .peer_bytes_behind(n)
                            .unwrap_or_else(|| group.replica().size_bytes());
                        (n, behind)
                    })
                    .collect();
            }
            if self.published.get(&g) != Some(&now) {
                group.replica().observe_replication(Some(&now));
                self.published.insert(g, now);
            }
        }
    }

    /// Sends the reports the controller has not accepted: a group's first in its epoch at once,
    /// the others when the report interval has passed (`leadership`: only new epochs).
    fn report(&mut self, link: &ShardLink, leadership: bool) {
        let now = Instant::now();
        let due = !leadership
            && self
                .last_reported
                .is_none_or(|t| now.duration_since(t) >= self.report_interval);
        // Between intervals only new epochs go out, and each raised the leadership signal
        // (handled as `leadership`, left unseen here): no pass over every group every tick.
        if !leadership && !due {
            return;
        }
        self.leadership_seen = self.groups.leadership_signal().generation();
        let mut sent_any = false;
        for r in self.groups.pending_reports() {
            // A leadership the controller may publish rests on a durable vote (a leader of
            // one voter records its epoch with no message to wait for it).
            if !self
                .groups
                .get(r.group)
                .is_some_and(|g| g.hard_state_durable())
            {
                continue;
            }
            let new_epoch = self
                .reported
                .get(&r.group)
                .is_none_or(|last| last.epoch != r.epoch);
            if !(new_epoch || due) {
                continue;
            }
            sent_any = true;
            self.reported.insert(r.group, r.clone());
            match link.to_service.try_send(ShardEvent::Report(r)) {
                Ok(()) => self.stats.borrow_mut().reports_sent += 1,
                Err(_) => self.stats.borrow_mut().reports_dropped += 1,
            }
        }
        if due || sent_any {
            self.last_reported = Some(now);
        }
    }

    async fn check_view(&mut self, link: &ShardLink) {
        let view = link.port.view();
        if self.generation == Some(view.generation) && !self.opens_pending {
            return;
        }
        if self.generation != Some(view.generation) {
            self.generation = Some(view.generation);
            self.stats.borrow_mut().views += 1;
        }
        self.apply_view(link.shard, &view).await;
        if view.caught_up && !self.orphans_swept {
            self.orphans_swept = true;
            if link.shard == 0 {
                self.remove_orphans(link);
            }
            self.prune_hard_states(&view);
        }
    }

    /// Once the node has caught up with the metadata, forgets the hard state of groups it no
    /// longer hosts (their partitions deleted or moved away while it was down; a delete seen
    /// while running removes its entry itself). A replica never moves between shards of a
    /// node (the controller refuses such a move), so this shard's entries are its groups'.
    fn prune_hard_states(&self, view: &ClusterView) {
        let (plan, conflicts) = plan_hosting(&view.metadata, self.node);
        // Colliding groups are not hosted, but their partitions still exist.
        let colliding: Vec<GroupId> = conflicts.iter().map(|c| c.group).collect();
        let dropped = self
            .replicas
            .prune_hard_states(|g| plan.groups.contains_key(&g) || colliding.contains(&g));
        if dropped > 0 {
            tracing::info!(
                node = self.node,
                dropped,
                "hard state of groups this node no longer hosts forgotten"
            );
        }
    }

    /// Once the node has caught up with the metadata (so a partition it does not know of does
    /// not exist), removes the files of every partition it no longer holds: a node down when a
    /// move took its replica away (or its topic was deleted), or killed while it was removing
    /// them, finds them here at its next start, and nothing else would ever open or delete
    /// them. Shard 0 looks at the whole data dir (partition directories do not depend on the
    /// shard); a partition open in a group anywhere in the process is left alone.
    fn remove_orphans(&mut self, link: &ShardLink) {
        let node = self.node;
        let port = link.port.clone();
        let removed =
            self.replicas
                .remove_orphans(MAX_ORPHAN_SCAN_PARTITIONS, |topic, partition, id| {
                    let view = port.view();
                    let state = &view.metadata;
                    state.topics.get(topic).is_some_and(|t| t.topic_id == id)
                        && state
                            .partition(topic, partition)
                            .is_some_and(|p| p.has_replica(node))
                });
        self.stats.borrow_mut().orphans_removed += removed as u64;
    }

    /// Opens, closes, deletes and reconfigures this shard's groups to match `view`.
    async fn apply_view(&mut self, shard: usize, view: &ClusterView) {
        self.replicas.refresh_table();
        let state = &view.metadata;
        let (plan, conflicts) = plan_hosting(state, self.node);
        for c in conflicts {
            tracing::error!(error = %c, "partitions not hosted");
        }
        let mine = HostingPlan {
            groups: plan
                .groups
                .into_iter()
                .filter(|(_, h)| h.shard as usize == shard)
                .collect(),
        };
        let changes = self.plan.changes_to(&mine);
        for (g, h) in changes.close {
            if let Some(group) = self.groups.remove(g) {
                group.replica().observe_replication(None);
            }
            self.published.remove(&g);
            self.reported.remove(&g);
            self.plan.groups.remove(&g);
            let tp = topic_partition(&h);
            let topic_gone = state
                .topics
                .get(&h.topic)
                .is_none_or(|t| t.topic_id != h.topic_id);
            // A move ended without this node: its replica is no longer the cluster's.
            let moved_away = !topic_gone
                && state
                    .partition(&h.topic, h.partition)
                    .is_some_and(|p| !p.has_replica(self.node));
            if topic_gone || moved_away {
                let why = if topic_gone {
                    "topic deleted"
                } else {
                    "replica moved away"
                };
                tracing::info!(topic = %h.topic, partition = h.partition, group = g, why,
                    "removing the replicated partition and its files");
                self.replicas.delete_group(&tp, h.topic_id).await;
            } else {
                self.replicas.close_group(&tp).await;
            }
        }
        let started = Instant::now();
        let budget = Duration::from_millis(MAX_OPEN_MS_PER_PASS);
        self.opens_pending = false;
        for (opened, (g, h)) in changes.open.into_iter().enumerate() {
            if opened >= MIN_OPENS_PER_PASS && started.elapsed() >= budget {
                // The next tick goes on from here (the plan lacks the rest).
                self.opens_pending = true;
                break;
            }
            let configs = state
                .topics
                .get(&h.topic)
                .map(|t| t.configs.clone())
                .unwrap_or_default();
            match self.replicas.open_group(self.node, g, &h, &configs).await {
                Ok(group) => {
                    tracing::info!(topic = %h.topic, partition = h.partition, group = g,
                        voters = ?h.voters, "hosting replicated partition");
                    if let Some(t) = &self.throttle {
                        group.set_throttle(t.clone());
                    }
                    self.groups.insert(group);
                    self.plan.groups.insert(g, h);
                }
                Err(_) => self.stats.borrow_mut().open_failures += 1,
            }
        }
        // The groups opened record their hard state; one flush for the pass makes it durable
        // before any of them takes a batch (see `PartitionGroup::open`: a group waits for it
        // itself). Not waited for here: under a loaded disk a flush takes hundreds of ms, and
        // every view change (ISR changes come several a second under load) came here.
        self.sync_hard_states_behind();
        // A move started or ended: the bootstrap voters changed, the group stays open.
        for (g, h) in mine.groups {
            if let Some(kept) = self.plan.groups.get_mut(&g) {
                *kept = h;
            }
        }
        let hosted: BTreeMap<&str, ()> = self
            .plan
            .groups
            .values()
            .map(|h| (h.topic.as_str(), ()))
            .collect();
        self.configs.retain(|t, _| hosted.contains_key(t.as_str()));
        for topic in hosted.keys() {
            let Some(t) = state.topics.get(*topic) else {
                continue;
            };
            if self.configs.get(*topic) != Some(&t.configs) {
                self.replicas.reconfigure_topic(topic, &t.configs);
                self.configs.insert(topic.to_string(), t.configs.clone());
            }
        }
        // The controller's record can move away from a report it accepted: fencing this
        // broker (a pause longer than its session) drops its leaderships and takes replicas
        // out of ISRs, and nothing else puts them back. A writable leader whose partition the
        // view does not show as led by it, in its epoch, with its in-sync voters, reports again.
        for (g, h) in &self.plan.groups {
            let Some(group) = self.groups.get(*g) else {
                continue;
            };
            if !group.is_writable_leader() {
                continue;
            }
            let mut isr = group.in_sync_voter_ids();
            isr.sort_unstable();
            let shown = state.partition(&h.topic, h.partition).is_some_and(|p| {
                let mut recorded = p.isr.clone();
                recorded.sort_unstable();
                p.leader == Some(self.node) && p.leader_epoch == group.epoch() && recorded == isr
            });
            if !shown {
                self.groups.forget_acknowledged(*g);
                self.reported.remove(g);
            }
        }
    }
}

fn topic_partition(h: &HostedPartition) -> TopicPartition {
    TopicPartition::new(&h.topic, h.partition as i32)
}
