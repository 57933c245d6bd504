//! The controller driver: the metadata group of the consensus core, its log on disk, the
//! active controller on its leader, and every node's broker side (registration, heartbeats,
//! following the metadata log). Everything here is decisions and file I/O; no sockets and no
//! clock. The caller ([`crate::controller::service`]) feeds it ticks, the time and frames from
//! peers, and sends the frames it asks for, so the same logic runs in unit tests with nodes
//! wired together in memory.
//!
//! - Voters (the `--seeds`) host the metadata group ([`METADATA_GROUP`]). The leader proposes an
//!   empty batch on election (it commits every earlier entry), and once it has applied the whole
//!   committed log it runs the [`ActiveController`]. Requests are decided there, proposed as
//!   one decision, and answered when the decision is applied (committed).
//! - Every node, voter or not, is also a broker: it registers with the active controller,
//!   heartbeats, and re-registers when told its epoch is stale. Requests go to the controller
//!   leader it knows (its own replica's leader on a voter, the last hint otherwise), time out
//!   after `request_timeout_ms` and go to the next voter.
//! - Voters apply the committed log from their own store; other nodes fetch it from a voter.
//! - The broker side also carries this node's admin calls ([`Driver::submit_call`]) and its
//!   partition leaders' reports ([`Driver::report_leader`]) to the controller, with the same
//!   timeout and re-routing. A call finishes once this node has applied the decision (the
//!   controller answers with the offset it committed it at), is refused, or passes
//!   `call_deadline_ms`; a report, once accepted or superseded by a newer epoch.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::controller::active::{
    ActiveController, AlterIsrRequest, ControllerConfig, ControllerError, CreateTopicRequest,
    HeartbeatRequest, RegisterRequest, DEFAULT_BROKER_HEARTBEAT_INTERVAL_MS,
};
use crate::controller::records::{Endpoint, Record, RecordBatch};
use crate::controller::state::{Effect, MetadataState};
use crate::controller::store::{MetadataStore, StoreError};
use crate::controller::view::{BrokerView, ClusterView};
use crate::controller::METADATA_GROUP;
use crate::node::{Node, NodeMessage};
use crate::replica::{Config, Persisted, Replica};
use crate::rpc::frame::{Frame, MetadataChunk, RpcErrorCode, RpcErrorReply, RpcMessage};
use crate::types::{Action, Epoch, GroupId, Membership, Message, NodeId, Offset};

/// How often the driver ticks the metadata group and its timers.
pub const DEFAULT_CONTROLLER_TICK_MS: u64 = 50;
/// Ticks without a leader before a voter campaigns: drawn in [10, 20) ticks, so 0.5-1 s at the
/// default tick. Heartbeats go every 2 ticks (100 ms), so five in a row must be lost before a
/// healthy leader is doubted, while a dead one is replaced within a second.
pub const DEFAULT_CONTROLLER_ELECTION_TIMEOUT_TICKS: u32 = 10;
/// A request to the controller not answered within this long is sent again to the next voter:
/// longer than a commit round trip on any sane network, short against the 1 s session timeout.
pub const DEFAULT_CONTROLLER_REQUEST_TIMEOUT_MS: u64 = 500;
/// A gap between two ticks longer than this means the driver's thread was held (a slow
/// metadata fsync on a loaded disk, a burst of work): heartbeats that arrived meanwhile wait
/// unread, so the active controller does not count that time against brokers' sessions. Two
/// heartbeat intervals: an ordinary late tick is not a stall.
pub const CONTROLLER_STALL_MS: u64 = 2 * DEFAULT_BROKER_HEARTBEAT_INTERVAL_MS;
/// Batch bytes attached to one append (or one metadata fetch answer).
pub const MAX_METADATA_APPEND_BYTES: usize = 1 << 20;
/// A decision is proposed as batches of about this size.
const PROPOSAL_TARGET_BYTES: usize = 64 << 10;
/// A non-voter asks a voter for new metadata this often.
const FETCH_INTERVAL_MS: u64 = 100;
/// Bound on replies waiting for their decision to commit: a leader that cannot commit (no
/// quorum) does not collect requests forever; the senders time out and retry.
const MAX_PENDING_REPLIES: usize = 4096;
/// AlterIsr requests waiting for the active controller's next tick at most: a wave of new
/// partition leaders (thousands after a failover or a topic creation) is decided together and
/// proposed as one append and one fsync of the metadata log, not one each. When the queue is
/// full it is decided at once. Within [`MAX_PENDING_REPLIES`], so a full queue's answers all
/// wait for their commit.
pub const MAX_QUEUED_ALTER_ISR: usize = 2048;
/// Output loops of the core settle in a few rounds; more is a bug.
const MAX_DRIVE_ROUNDS: usize = 1000;
/// An admin call (CreateTopics, ...) not decided and applied on this node within this long is
/// answered "unavailable": long enough for a controller failover (an election within a second,
/// a retry per request timeout) and a few commit round trips, short against client timeouts.
pub const DEFAULT_CONTROLLER_CALL_DEADLINE_MS: u64 = 5_000;
/// Admin calls in flight on one node's broker side at most; more are refused at once.
pub const MAX_CALLS_IN_FLIGHT: usize = 1024;
/// Leader reports in flight at most (one per group this node leads; a report dropped here is
/// sent again by its shard).
pub const MAX_REPORTS_IN_FLIGHT: usize = 65_536;

#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub node_id: NodeId,
    pub node_uuid: u128,
    pub cluster_id: String,
    /// The metadata voters (the `--seeds` ids), the same list on every node.
    pub voters: Vec<NodeId>,
    pub rpc: Endpoint,
    pub kafka: Endpoint,
    pub shards: u32,
    pub election_timeout_ticks: u32,
    pub request_timeout_ms: u64,
    /// How long an admin call or a leader report is retried before it is given up.
    pub call_deadline_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub controller: ControllerConfig,
    /// Replicas of a topic created without a count; `None`: min(3, nodes of the cluster).
    pub default_replication_factor: Option<usize>,
    /// Seeds the election-timeout jitter.
    pub seed: u64,
}

impl DriverConfig {
    pub fn new(
        node_id: NodeId,
        node_uuid: u128,
        cluster_id: String,
        voters: Vec<NodeId>,
        rpc: Endpoint,
        kafka: Endpoint,
        shards: u32,
    ) -> Self {
        DriverConfig {
            node_id,
            node_uuid,
            cluster_id,
            voters,
            rpc,
            kafka,
            shards,
            election_timeout_ticks: DEFAULT_CONTROLLER_ELECTION_TIMEOUT_TICKS,
            request_timeout_ms: DEFAULT_CONTROLLER_REQUEST_TIMEOUT_MS,
            call_deadline_ms: DEFAULT_CONTROLLER_CALL_DEADLINE_MS,
            heartbeat_interval_ms: DEFAULT_BROKER_HEARTBEAT_INTERVAL_MS,
            controller: ControllerConfig::default(),
            default_replication_factor: None,
            seed: node_id ^ node_uuid as u64,
        }
    }
}

/// A frame the caller must send: to a peer (dialing it), or back on the connection of the
/// request it answers (`R` names that connection).
#[derive(Debug)]
pub enum Outgoing<R> {
    Peer { to: NodeId, frame: Frame },
    Reply { to: R, frame: Frame },
}

/// Where a controller reply goes: a peer's connection, or this node's own broker side.
#[derive(Debug, Clone)]
enum Dest<R> {
    Remote(R),
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Req {
    Register,
    Heartbeat,
    Fetch,
    Call(CallId),
    Report(GroupId),
}

/// Names an admin call; chosen by the caller, unique among its calls in flight.
pub type CallId = u64;

/// A request of this node's Kafka layer for the active controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCall {
    CreateTopic {
        req: CreateTopicRequest,
        validate_only: bool,
    },
    CreatePartitions {
        topic: String,
        total: usize,
        validate_only: bool,
    },
    DeleteTopic {
        topic: String,
    },
    SetTopicConfigs {
        topic: String,
        changes: Vec<(String, Option<String>)>,
    },
    AllocateProducerIds,
    /// An operator declares `node` gone (its data directory wiped); refused while it is live.
    UnregisterBroker {
        node: NodeId,
    },
    /// A preferred-leader election of these partitions: the controller records a wish for
    /// each one whose preferred replica could lead but does not.
    ElectLeaders {
        partitions: Vec<(String, u32)>,
    },
    /// Broker `node`'s maintenance mode.
    SetMaintenance {
        node: NodeId,
        on: bool,
    },
    /// Broker `node`'s decommissioning (its replicas drained to other brokers), on or off.
    SetDecommission {
        node: NodeId,
        on: bool,
    },
    /// Moves of partitions' replicas, or cancels (`None`).
    Reassign {
        moves: Vec<(String, u32, Option<Vec<NodeId>>)>,
    },
    /// This node, leading the partition, reports the end of its move.
    FinishReassignment {
        topic: String,
        partition: u32,
        replicas: Vec<NodeId>,
    },
}

/// What a finished admin call answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallAnswer {
    /// Decided, committed and applied on this node (or, validate_only, found valid).
    Done,
    ProducerIds {
        first: u64,
        len: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallState {
    /// To be sent on the next chance (new, refused by a non-controller, or timed out).
    Unsent,
    /// Being handed to the controller (which may answer before the send returns, when it
    /// is this node).
    Sending,
    Sent {
        corr: u64,
    },
    /// The controller committed it at this metadata offset; waiting to apply it here.
    Applying(Offset),
}

#[derive(Debug)]
struct PendingCall {
    call: AdminCall,
    deadline_ms: u64,
    state: CallState,
}

#[derive(Debug)]
struct PendingReport {
    req: AlterIsrRequest,
    deadline_ms: u64,
    state: CallState,
}

/// This node as a broker of the cluster.
#[derive(Debug, Default)]
struct Agent {
    broker_epoch: Option<u64>,
    fenced: bool,
    /// The controller to ask: a hint from a refusal, else the next voter in turn.
    hint: Option<NodeId>,
    rotate: usize,
    next_corr: u64,
    /// corr -> (request, sent at, sent to)
    outstanding: BTreeMap<u64, (Req, u64, NodeId)>,
    last_heartbeat_ms: Option<u64>,
    last_fetch_ms: Option<u64>,
    /// Node id refused for another UUID: logged once per run of refusals.
    refused_logged: bool,
}

pub struct Driver<R> {
    cfg: DriverConfig,
    now_ms: u64,
    /// The metadata group, on voters only.
    node: Option<Node>,
    store: MetadataStore,
    /// The applied (committed) metadata and how far it reaches.
    state: MetadataState,
    applied: Offset,
    active: Option<ActiveController>,
    /// Replies sent once the log is applied up to the offset.
    pending: Vec<(Offset, Dest<R>, u64, RpcMessage)>,
    agent: Agent,
    out: Vec<Outgoing<R>>,
    /// Bumped whenever what [`Driver::view`] shows may have changed.
    generation: u64,
    /// `state` as shared with readers, made again only after the state changed.
    metadata: RefCell<Option<Arc<MetadataState>>>,
    calls: BTreeMap<CallId, PendingCall>,
    finished: Vec<(CallId, Result<CallAnswer, RpcErrorReply>)>,
    /// The newest leader report per group not yet accepted by the controller.
    reports: BTreeMap<GroupId, PendingReport>,
    accepted: Vec<(GroupId, AlterIsrRequest)>,
    /// AlterIsr requests for the active controller, decided together on the next tick.
    alter_isr_queue: Vec<(Dest<R>, u64, AlterIsrRequest)>,
    /// Bumped when an applied record may change what a node hosts or mirrors (topics,
    /// partitions, replicas, configs, brokers' registrations), not for leadership and ISR
    /// changes, so the caller rebuilds its hosting plan and topic mirror only then.
    placement_version: u64,
}

fn reply_frame(corr: u64, message: RpcMessage) -> Frame {
    Frame {
        correlation_id: corr,
        message,
    }
}

impl<R: Clone> Driver<R> {
    /// Opens the driver over `store` (already replayed). A voter restarts its replica from the
    /// durable log and hard state; every node re-applies the log it has.
    pub fn new(cfg: DriverConfig, store: MetadataStore, now_ms: u64) -> Self {
        assert!(!cfg.voters.is_empty(), "a cluster has at least one voter");
        let node = cfg.voters.contains(&cfg.node_id).then(|| {
            let persisted = Persisted {
                hard: store.hard_state(),
                epochs: store.epochs(),
                log_end: store.log_end(),
                bootstrap: Membership::voters(&cfg.voters),
                memberships: Vec::new(),
            };
            let rcfg = Config {
                election_timeout_ticks: cfg.election_timeout_ticks,
                ..Config::default()
            };
            let mut node = Node::new(cfg.node_id);
            node.add_group(
                METADATA_GROUP,
                Replica::new(cfg.node_id, rcfg, cfg.seed, persisted),
            );
            node
        });
        Driver {
            cfg,
            now_ms,
            node,
            store,
            state: MetadataState::new(),
            applied: 0,
            active: None,
            pending: Vec::new(),
            agent: Agent::default(),
            out: Vec::new(),
            generation: 1,
            metadata: RefCell::new(None),
            calls: BTreeMap::new(),
            finished: Vec::new(),
            reports: BTreeMap::new(),
            accepted: Vec::new(),
            alter_isr_queue: Vec::new(),
            placement_version: 1,
        }
    }

    /// The applied metadata as a shared snapshot: copied once per change, not per call.
    pub fn metadata(&self) -> Arc<MetadataState> {
        self.metadata
            .borrow_mut()
            .get_or_insert_with(|| Arc::new(self.state.clone()))
            .clone()
    }

    pub fn node_id(&self) -> NodeId {
        self.cfg.node_id
    }

    pub fn is_voter(&self) -> bool {
        self.node.is_some()
    }

    /// The applied metadata.
    pub fn state(&self) -> &MetadataState {
        &self.state
    }

    pub fn applied(&self) -> Offset {
        self.applied
    }

    /// This node runs the active controller.
    pub fn is_active_controller(&self) -> bool {
        self.active.is_some()
    }

    /// This node's broker epoch, once registered.
    pub fn broker_epoch(&self) -> Option<u64> {
        self.agent.broker_epoch
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Changes when the applied metadata's placement may have changed (see
    /// [`Effect::changes_placement`]); stays the same over leadership and ISR changes.
    pub fn placement_version(&self) -> u64 {
        self.placement_version
    }

    /// AlterIsr requests queued for the next tick's decision.
    pub fn alter_isr_queued(&self) -> usize {
        self.alter_isr_queue.len()
    }

    fn replica(&self) -> Option<&Replica> {
        self.node.as_ref().and_then(|n| n.group(METADATA_GROUP))
    }

    /// The controller leader this node knows and its epoch.
    pub fn controller(&self) -> (Option<NodeId>, Epoch) {
        match self.replica() {
            Some(r) => (r.leader(), r.epoch()),
            None => (self.agent.hint, -1),
        }
    }

    /// Frames to send, in order.
    pub fn take_outgoing(&mut self) -> Vec<Outgoing<R>> {
        std::mem::take(&mut self.out)
    }

    /// The cluster as this node sees it, for the Kafka port and the admin tools.
    pub fn view(&self) -> ClusterView {
        let (controller, controller_epoch) = self.controller();
        let brokers = self
            .state
            .brokers
            .iter()
            .map(|(&node, b)| BrokerView::of(node, b, self.cfg.voters.contains(&node)))
            .collect();
        let voter_progress = match self.replica() {
            Some(r) if r.is_leader() => self
                .cfg
                .voters
                .iter()
                .map(|&v| {
                    let end = if v == self.cfg.node_id {
                        Some(r.log_end())
                    } else {
                        r.peer_progress(v).map(|p| p.0)
                    };
                    (v, end)
                })
                .collect(),
            _ => Vec::new(),
        };
        ClusterView {
            cluster_id: self.cfg.cluster_id.clone(),
            node_id: self.cfg.node_id,
            controller,
            controller_epoch,
            voters: self.cfg.voters.clone(),
            brokers,
            high_watermark: self.applied,
            voter_progress,
            metadata: self.metadata(),
            caught_up: self.agent.broker_epoch.is_some_and(|e| {
                self.state
                    .brokers
                    .get(&self.cfg.node_id)
                    .is_some_and(|b| b.broker_epoch == e && !b.fenced)
            }),
            generation: self.generation,
        }
    }

    // ---- events ------------------------------------------------------------------------------

    /// One tick at `now_ms`: the metadata group's timers, the active controller's session
    /// checks, and the broker side's requests.
    pub fn tick(&mut self, now_ms: u64) -> Result<(), StoreError> {
        let gap = now_ms.saturating_sub(self.now_ms);
        self.now_ms = now_ms;
        if gap > CONTROLLER_STALL_MS {
            if let Some(active) = self.active.as_mut() {
                // Fencing a broker whose heartbeats sit unread in our own queue would drop
                // its leaderships for our stall, not its; under load that feeds itself (the
                // leaders report again, more work for the same thread).
                tracing::info!(
                    stalled_ms = gap,
                    "controller ticked late: brokers' sessions extended"
                );
                active.extend_sessions(gap);
            }
        }
        if let Some(node) = self.node.as_mut() {
            node.tick();
            self.drive()?;
        }
        self.decide_alter_isr()?;
        if let Some(active) = self.active.as_mut() {
            let records = active.tick(now_ms);
            if !records.is_empty() {
                self.propose_decision(records)?;
            }
        }
        if let Some(active) = self.active.as_mut() {
            let records = active.balance_leaders(now_ms);
            if !records.is_empty() {
                self.propose_decision(records)?;
            }
        }
        if let Some(active) = self.active.as_mut() {
            let records = active.drain_decommissioned();
            if !records.is_empty() {
                self.propose_decision(records)?;
            }
        }
        self.agent_tick()
    }

    /// A frame from peer `from`, arriving on connection `reply`.
    pub fn receive(&mut self, from: NodeId, frame: Frame, reply: R) -> Result<(), StoreError> {
        let corr = frame.correlation_id;
        let dest = Dest::Remote(reply);
        if let Some(claimed) = claimed_node(&frame.message) {
            // The handshake proved who the peer is; a request for another node is forged.
            if claimed != from {
                tracing::warn!(
                    from,
                    claimed,
                    "controller request on behalf of another node"
                );
                let e = RpcErrorReply {
                    code: RpcErrorCode::InvalidRequest,
                    leader_hint: None,
                    message: format!("node {from} cannot act for node {claimed}"),
                };
                let msg = match frame.message {
                    RpcMessage::RegisterBroker(_) => RpcMessage::RegisterBrokerResponse(Err(e)),
                    RpcMessage::Heartbeat(_) => RpcMessage::HeartbeatResponse(Err(e)),
                    RpcMessage::AllocateProducerIds { .. } => {
                        RpcMessage::AllocateProducerIdsResponse(Err(e))
                    }
                    RpcMessage::FinishReassignment { .. } => RpcMessage::AdminResponse(Err(e)),
                    _ => RpcMessage::AlterIsrResponse(Err(e)),
                };
                self.send_reply(dest, corr, msg);
                return Ok(());
            }
        }
        match frame.message {
            RpcMessage::Consensus(m) => {
                if m.to != self.cfg.node_id || m.from != from {
                    tracing::warn!(from, to = m.to, "consensus message misaddressed: dropped");
                    return Ok(());
                }
                if let Some(node) = self.node.as_mut() {
                    node.receive(m);
                    self.drive()?;
                }
            }
            RpcMessage::FetchMetadata {
                from_offset,
                max_bytes,
            } => {
                let msg = self.answer_fetch(from_offset, max_bytes);
                self.send_reply(dest, corr, msg);
            }
            m @ (RpcMessage::RegisterBroker(_)
            | RpcMessage::Heartbeat(_)
            | RpcMessage::AllocateProducerIds { .. }
            | RpcMessage::AlterIsr(_)
            | RpcMessage::CreateTopic { .. }
            | RpcMessage::CreatePartitions { .. }
            | RpcMessage::DeleteTopic { .. }
            | RpcMessage::SetTopicConfigs { .. }
            | RpcMessage::UnregisterBroker { .. }
            | RpcMessage::ElectLeaders { .. }
            | RpcMessage::SetMaintenance { .. }
            | RpcMessage::SetDecommission { .. }
            | RpcMessage::AlterReassignments { .. }
            | RpcMessage::FinishReassignment { .. }) => self.handle_request(dest, corr, m)?,
            RpcMessage::RegisterBrokerResponse(_)
            | RpcMessage::HeartbeatResponse(_)
            | RpcMessage::FetchMetadataResponse(_)
            | RpcMessage::AllocateProducerIdsResponse(_)
            | RpcMessage::AlterIsrResponse(_)
            | RpcMessage::AdminResponse(_) => self.agent_response(corr, frame.message)?,
            RpcMessage::Hello(_) | RpcMessage::HandshakeRefused { .. } => {
                tracing::debug!(from, "handshake frame after the handshake: ignored");
            }
            // The partition shards' concern: the service hands them on before the driver.
            RpcMessage::Liveness(_) => {}
        }
        Ok(())
    }

    /// A request for the active controller, from a peer (`dest` its connection) or from this
    /// node's own broker side (`Dest::Local`): decided here, answered to `dest`.
    fn handle_request(
        &mut self,
        dest: Dest<R>,
        corr: u64,
        message: RpcMessage,
    ) -> Result<(), StoreError> {
        match message {
            RpcMessage::RegisterBroker(req) => self.handle_register(dest, corr, req),
            RpcMessage::Heartbeat(req) => self.handle_heartbeat(dest, corr, req),
            RpcMessage::AllocateProducerIds { node, broker_epoch } => self.decide(
                dest,
                corr,
                |c| {
                    c.allocate_producer_ids(node, broker_epoch)
                        .map(|(r, first, len)| (r, (first, len)))
                },
                RpcMessage::AllocateProducerIdsResponse,
            ),
            RpcMessage::AlterIsr(req) => {
                if self.active.is_none() {
                    let e = self.not_controller();
                    self.send_reply(dest, corr, RpcMessage::AlterIsrResponse(Err(e)));
                    return Ok(());
                }
                self.alter_isr_queue.push((dest, corr, req));
                if self.alter_isr_queue.len() >= MAX_QUEUED_ALTER_ISR {
                    self.decide_alter_isr()?;
                }
                Ok(())
            }
            m @ (RpcMessage::CreateTopic { .. }
            | RpcMessage::CreatePartitions { .. }
            | RpcMessage::DeleteTopic { .. }
            | RpcMessage::SetTopicConfigs { .. }
            | RpcMessage::UnregisterBroker { .. }
            | RpcMessage::ElectLeaders { .. }
            | RpcMessage::SetMaintenance { .. }
            | RpcMessage::SetDecommission { .. }
            | RpcMessage::AlterReassignments { .. }
            | RpcMessage::FinishReassignment { .. }) => self.handle_admin(dest, corr, m),
            other => unreachable!("not a controller request: {other:?}"),
        }
    }

    // ---- the metadata group --------------------------------------------------------------------

    /// Performs everything the metadata group asked for, until it asks for nothing more.
    fn drive(&mut self) -> Result<(), StoreError> {
        for _ in 0..MAX_DRIVE_ROUNDS {
            let Some(node) = self.node.as_mut() else {
                return Ok(());
            };
            let out = node.take_output();
            if out.actions.is_empty() && out.messages.is_empty() {
                self.maybe_activate();
                return Ok(());
            }
            let mut appended = None;
            for (_, a) in out.actions {
                match a {
                    Action::PersistHardState(h) => self.store.persist_hard_state(h)?,
                    Action::Append { batches } => {
                        self.store.append(&batches)?;
                        appended = Some(self.store.log_end());
                    }
                    Action::Truncate { end } => {
                        assert!(end >= self.applied, "truncating committed metadata");
                        self.store.truncate(end)?;
                    }
                    Action::HighWatermark(hw) => self.apply_committed(hw),
                    Action::BecomeLeader { epoch } => {
                        tracing::info!(epoch, "this node leads the metadata log");
                        self.generation += 1;
                        // An empty decision in the new epoch commits every earlier entry.
                        let noop = RecordBatch::default().encode();
                        let node = self.node.as_mut().expect("voter");
                        if let Err(e) = node.propose(METADATA_GROUP, &[(1, noop)]) {
                            tracing::warn!(error = %e, "new metadata leader could not propose");
                        }
                    }
                    Action::BecomeFollower { epoch, leader } => {
                        if self.active.take().is_some() {
                            tracing::info!(epoch, ?leader, "no longer the active controller");
                        }
                        self.pending.clear();
                        self.generation += 1;
                    }
                    Action::LeaderReady { .. } | Action::MembershipChanged(_) => {}
                    Action::Send { .. } => unreachable!("the node routes sends"),
                }
            }
            for mut m in out.messages {
                // The core names a range; the batches come from the log.
                for (_, item) in &mut m.items {
                    if let Message::Append(req) = item {
                        req.batches = self.store.read_from(
                            req.prev_offset,
                            req.fill_end,
                            MAX_METADATA_APPEND_BYTES,
                        );
                    }
                }
                self.send_consensus(m);
            }
            if let Some(end) = appended {
                // Appends are fsynced before `append` returns: written is durable.
                let node = self.node.as_mut().expect("voter");
                node.on_appended(METADATA_GROUP, end);
                node.on_durable(METADATA_GROUP, end);
            }
        }
        panic!("metadata group output did not settle");
    }

    fn send_consensus(&mut self, m: NodeMessage) {
        let to = m.to;
        self.out.push(Outgoing::Peer {
            to,
            frame: reply_frame(0, RpcMessage::Consensus(m)),
        });
    }

    fn maybe_activate(&mut self) {
        let Some(r) = self.replica() else { return };
        if self.active.is_none()
            && r.is_epoch_ready()
            && self.applied == r.high_watermark()
            && r.high_watermark() == r.log_end()
        {
            let epoch = r.epoch();
            let controller = ControllerConfig {
                default_replication_factor: self.cfg.default_replication_factor,
                voters: self.cfg.voters.len(),
                ..self.cfg.controller
            };
            self.active = Some(ActiveController::new(
                controller,
                self.state.clone(),
                self.now_ms,
            ));
            self.generation += 1;
            tracing::info!(epoch, "this node is the active controller");
        }
    }

    /// Applies committed batches below `hw` from the store, then sends the replies they allow.
    fn apply_committed(&mut self, hw: Offset) {
        let batches = self
            .store
            .read_from(self.applied, hw, usize::MAX)
            .into_iter()
            .filter(|b| b.base >= self.applied && b.end() <= hw)
            .collect::<Vec<_>>();
        for b in batches {
            self.apply_batch(b.base, b.end(), b.bytes);
        }
        self.release_pending();
    }

    fn apply_batch(&mut self, base: Offset, end: Offset, bytes: Bytes) {
        assert_eq!(base, self.applied, "metadata applied in order");
        match RecordBatch::decode(bytes) {
            Ok(batch) => {
                let (effects, res) = self.state.apply_batch(&batch);
                if let Err(e) = res {
                    // Deterministic on every node, so every node skips the same record.
                    tracing::error!(offset = base, error = %e, "committed metadata record refused");
                }
                if effects.iter().any(Effect::changes_placement) {
                    self.placement_version += 1;
                }
                for e in effects {
                    log_effect(&e);
                }
            }
            Err(e) => tracing::error!(offset = base, error = %e, "committed metadata undecodable"),
        }
        self.applied = end;
        self.generation += 1;
        self.metadata.take();
        self.finish_applied_calls();
    }

    fn release_pending(&mut self) {
        let applied = self.applied;
        let (ready, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.0 <= applied);
        self.pending = keep;
        for (_, dest, corr, msg) in ready {
            self.send_reply(dest, corr, msg);
        }
    }

    fn send_reply(&mut self, dest: Dest<R>, corr: u64, msg: RpcMessage) {
        match dest {
            Dest::Remote(to) => self.out.push(Outgoing::Reply {
                to,
                frame: reply_frame(corr, msg),
            }),
            Dest::Local => {
                // Our own broker side asked our own controller.
                if let Err(e) = self.agent_response(corr, msg) {
                    tracing::error!(error = %e, "metadata store failed");
                }
            }
        }
    }

    fn propose_decision(&mut self, records: Vec<Record>) -> Result<Option<Offset>, StoreError> {
        let batches: Vec<(u32, Bytes)> =
            RecordBatch::encode_chunked(records, PROPOSAL_TARGET_BYTES)
                .into_iter()
                .map(|b| (1, b))
                .collect();
        let node = self
            .node
            .as_mut()
            .expect("the active controller is a voter");
        match node.propose(METADATA_GROUP, &batches) {
            Ok(base) => {
                self.drive()?;
                Ok(Some(base + batches.len() as Offset))
            }
            Err(e) => {
                // Leadership is gone: this controller's decisions die with it.
                tracing::info!(error = %e, "metadata proposal refused: stepping down as controller");
                self.active = None;
                self.pending.clear();
                Ok(None)
            }
        }
    }

    /// Runs a decision on the active controller; the reply goes out once it is committed.
    fn decide<T>(
        &mut self,
        dest: Dest<R>,
        corr: u64,
        f: impl FnOnce(&mut ActiveController) -> Result<(Vec<Record>, T), ControllerError>,
        reply: impl FnOnce(Result<T, RpcErrorReply>) -> RpcMessage,
    ) -> Result<(), StoreError> {
        let Some(active) = self.active.as_mut() else {
            let e = self.not_controller();
            self.send_reply(dest, corr, reply(Err(e)));
            return Ok(());
        };
        match f(active) {
            Err(e) => self.send_reply(dest, corr, reply(Err(RpcErrorReply::from(&e)))),
            Ok((records, value)) if records.is_empty() => {
                self.send_reply(dest, corr, reply(Ok(value)))
            }
            Ok((records, value)) => {
                if let Some(end) = self.propose_decision(records)? {
                    if self.pending.len() < MAX_PENDING_REPLIES {
                        self.pending.push((end, dest, corr, reply(Ok(value))));
                        self.release_pending();
                    }
                } else {
                    let e = RpcErrorReply::not_controller(None);
                    self.send_reply(dest, corr, reply(Err(e)));
                }
            }
        }
        Ok(())
    }

    /// Decides the queued AlterIsr requests in arrival order, each validated and answered on
    /// its own, and proposes the records of all that change something as one decision: one
    /// metadata append and fsync (per quorum member) for the lot. A report refused, or with
    /// nothing to change, is answered at once; the others once the decision commits.
    fn decide_alter_isr(&mut self) -> Result<(), StoreError> {
        if self.alter_isr_queue.is_empty() {
            return Ok(());
        }
        let queued = std::mem::take(&mut self.alter_isr_queue);
        let Some(active) = self.active.as_mut() else {
            let e = self.not_controller();
            for (dest, corr, _) in queued {
                let msg = RpcMessage::AlterIsrResponse(Err(e.clone()));
                self.send_reply(dest, corr, msg);
            }
            return Ok(());
        };
        let mut records = Vec::new();
        let mut answered = Vec::new();
        let mut waiting = Vec::new();
        for (dest, corr, req) in queued {
            match active.alter_isr(req) {
                Err(e) => answered.push((dest, corr, Err(RpcErrorReply::from(&e)))),
                Ok(r) if r.is_empty() => answered.push((dest, corr, Ok(()))),
                Ok(r) => {
                    records.extend(r);
                    waiting.push((dest, corr));
                }
            }
        }
        for (dest, corr, res) in answered {
            self.send_reply(dest, corr, RpcMessage::AlterIsrResponse(res));
        }
        if records.is_empty() {
            return Ok(());
        }
        match self.propose_decision(records)? {
            Some(end) => {
                for (dest, corr) in waiting {
                    // Over the bound the sender times out and reports again.
                    if self.pending.len() < MAX_PENDING_REPLIES {
                        let msg = RpcMessage::AlterIsrResponse(Ok(()));
                        self.pending.push((end, dest, corr, msg));
                    }
                }
                self.release_pending();
            }
            None => {
                let e = RpcErrorReply::not_controller(None);
                for (dest, corr) in waiting {
                    let msg = RpcMessage::AlterIsrResponse(Err(e.clone()));
                    self.send_reply(dest, corr, msg);
                }
            }
        }
        Ok(())
    }

    /// The refusal of a node that is not the active controller.
    fn not_controller(&self) -> RpcErrorReply {
        let hint = self.controller().0.filter(|&l| l != self.cfg.node_id);
        let mut e = RpcErrorReply::not_controller(hint);
        if hint.is_none() && self.is_voter() {
            e.code = RpcErrorCode::Unavailable;
            e.message = "no active controller yet (election in progress)".into();
        }
        e
    }

    /// An admin request on the active controller. The answer carries the metadata offset the
    /// decision is applied at, and goes out once it is committed; a validate_only request is
    /// decided on a copy of the state and answered at once.
    fn handle_admin(
        &mut self,
        dest: Dest<R>,
        corr: u64,
        msg: RpcMessage,
    ) -> Result<(), StoreError> {
        let Some(active) = self.active.as_mut() else {
            let e = self.not_controller();
            self.send_reply(dest, corr, RpcMessage::AdminResponse(Err(e)));
            return Ok(());
        };
        let decided = match msg {
            RpcMessage::CreateTopic { req, validate_only } => {
                run_admin(active, validate_only, |c| c.create_topic(req))
            }
            RpcMessage::CreatePartitions {
                topic,
                total,
                validate_only,
            } => run_admin(active, validate_only, |c| {
                c.create_partitions(&topic, total as usize)
            }),
            RpcMessage::DeleteTopic { topic } => {
                run_admin(active, false, |c| c.delete_topic(&topic))
            }
            RpcMessage::SetTopicConfigs { topic, changes } => {
                run_admin(active, false, |c| c.set_topic_configs(&topic, &changes))
            }
            RpcMessage::UnregisterBroker { node } => {
                if let Some(e) = refuse_unregistering(active.state(), node) {
                    self.send_reply(dest, corr, RpcMessage::AdminResponse(Err(e)));
                    return Ok(());
                }
                tracing::info!(node, "unregistering broker (operator request)");
                active.unregister(node)
            }
            RpcMessage::ElectLeaders { partitions } => active.elect_preferred(&partitions),
            RpcMessage::SetMaintenance { node, on } => active.set_maintenance(node, on),
            RpcMessage::SetDecommission { node, on } => active.set_decommission(node, on),
            RpcMessage::AlterReassignments { moves } => active.reassign(&moves),
            RpcMessage::FinishReassignment {
                leader,
                topic,
                partition,
                replicas,
            } => active.finish_reassignment(leader, &topic, partition, &replicas),
            other => unreachable!("not an admin request: {other:?}"),
        };
        match decided {
            Err(e) => {
                let msg = RpcMessage::AdminResponse(Err(RpcErrorReply::from(&e)));
                self.send_reply(dest, corr, msg);
            }
            Ok(records) if records.is_empty() => {
                self.send_reply(dest, corr, RpcMessage::AdminResponse(Ok(0)))
            }
            Ok(records) => match self.propose_decision(records)? {
                Some(end) => {
                    if self.pending.len() < MAX_PENDING_REPLIES {
                        let msg = RpcMessage::AdminResponse(Ok(end));
                        self.pending.push((end, dest, corr, msg));
                        self.release_pending();
                    }
                }
                None => {
                    let e = RpcErrorReply::not_controller(None);
                    self.send_reply(dest, corr, RpcMessage::AdminResponse(Err(e)));
                }
            },
        }
        Ok(())
    }

    fn handle_register(
        &mut self,
        dest: Dest<R>,
        corr: u64,
        req: RegisterRequest,
    ) -> Result<(), StoreError> {
        let now = self.now_ms;
        self.decide(
            dest,
            corr,
            |c| {
                let recs = c.register(req, now)?;
                let epoch = match recs.last() {
                    Some(Record::RegisterBroker(r)) => r.broker_epoch,
                    other => unreachable!("registration decided {other:?}"),
                };
                Ok((recs, epoch))
            },
            RpcMessage::RegisterBrokerResponse,
        )
    }

    fn handle_heartbeat(
        &mut self,
        dest: Dest<R>,
        corr: u64,
        req: HeartbeatRequest,
    ) -> Result<(), StoreError> {
        let now = self.now_ms;
        self.decide(
            dest,
            corr,
            |c| c.heartbeat(req, now),
            RpcMessage::HeartbeatResponse,
        )
    }

    fn answer_fetch(&self, from: Offset, max_bytes: u32) -> RpcMessage {
        if !self.is_voter() {
            return RpcMessage::FetchMetadataResponse(Err(RpcErrorReply::not_controller(
                self.agent.hint,
            )));
        }
        let max = (max_bytes as usize).min(MAX_METADATA_APPEND_BYTES);
        RpcMessage::FetchMetadataResponse(Ok(MetadataChunk {
            high_watermark: self.applied,
            batches: self.store.read_from(from, self.applied, max),
        }))
    }

    // ---- this node as a broker -----------------------------------------------------------------

    /// The voter to ask: our own controller when active, the leader we know, else in turn.
    fn agent_target(&mut self) -> NodeId {
        if self.active.is_some() {
            return self.cfg.node_id;
        }
        if let Some(l) = self.replica().and_then(|r| r.leader()) {
            return l;
        }
        if let Some(h) = self.agent.hint {
            return h;
        }
        let v = &self.cfg.voters;
        v[self.agent.rotate % v.len()]
    }

    /// Sends a request to the controller; returns its correlation id. The answer may have
    /// been handled before this returns (when this node is the controller).
    fn agent_request(&mut self, req: Req, message: RpcMessage) -> Result<u64, StoreError> {
        let corr = self.agent.next_corr;
        self.agent.next_corr += 1;
        let to = self.agent_target();
        self.agent.outstanding.insert(corr, (req, self.now_ms, to));
        if to == self.cfg.node_id {
            match message {
                // A voter applies the log itself; it fetches nothing from itself.
                RpcMessage::FetchMetadata { .. } => {}
                m => self.handle_request(Dest::Local, corr, m)?,
            }
        } else {
            self.out.push(Outgoing::Peer {
                to,
                frame: reply_frame(corr, message),
            });
        }
        Ok(corr)
    }

    fn agent_tick(&mut self) -> Result<(), StoreError> {
        let now = self.now_ms;
        let timeout = self.cfg.request_timeout_ms;
        let before = self.agent.outstanding.len();
        self.agent
            .outstanding
            .retain(|_, (_, at, _)| now.saturating_sub(*at) < timeout);
        if self.agent.outstanding.len() < before {
            // The controller we asked is gone or cut off: ask the next voter. The view says
            // so too (a broker knows no controller until one answers), which the Kafka layer
            // reads to answer controller calls at once instead of after their deadline.
            if self.agent.hint.take().is_some() {
                self.generation += 1;
            }
            self.agent.rotate += 1;
        }
        let pending = |a: &Agent, r: Req| a.outstanding.values().any(|x| x.0 == r);
        match self.agent.broker_epoch {
            None => {
                if !pending(&self.agent, Req::Register) {
                    let req = RegisterRequest {
                        node: self.cfg.node_id,
                        node_uuid: self.cfg.node_uuid,
                        rpc: self.cfg.rpc.clone(),
                        kafka: self.cfg.kafka.clone(),
                        shards: self.cfg.shards,
                    };
                    self.agent_request(Req::Register, RpcMessage::RegisterBroker(req))?;
                }
            }
            Some(epoch) => {
                let due = self
                    .agent
                    .last_heartbeat_ms
                    .is_none_or(|t| now.saturating_sub(t) >= self.cfg.heartbeat_interval_ms);
                if due && !pending(&self.agent, Req::Heartbeat) {
                    self.agent.last_heartbeat_ms = Some(now);
                    let req = HeartbeatRequest {
                        node: self.cfg.node_id,
                        broker_epoch: epoch,
                        want_fence: false,
                    };
                    self.agent_request(Req::Heartbeat, RpcMessage::Heartbeat(req))?;
                }
            }
        }
        if !self.is_voter() {
            let due = self
                .agent
                .last_fetch_ms
                .is_none_or(|t| now.saturating_sub(t) >= FETCH_INTERVAL_MS);
            if due && !pending(&self.agent, Req::Fetch) {
                self.agent.last_fetch_ms = Some(now);
                let msg = RpcMessage::FetchMetadata {
                    from_offset: self.applied,
                    max_bytes: MAX_METADATA_APPEND_BYTES as u32,
                };
                self.agent_request(Req::Fetch, msg)?;
            }
        }
        self.calls_tick()
    }

    fn agent_refused(&mut self, e: &RpcErrorReply) {
        match e.code {
            RpcErrorCode::NotController | RpcErrorCode::Unavailable => {
                let hint = e.leader_hint.filter(|h| self.cfg.voters.contains(h));
                if std::mem::replace(&mut self.agent.hint, hint) != hint {
                    self.generation += 1;
                }
                if self.agent.hint.is_none() {
                    self.agent.rotate += 1;
                }
            }
            RpcErrorCode::NodeIdInUse => {
                if !std::mem::replace(&mut self.agent.refused_logged, true) {
                    tracing::error!(
                        node_id = self.cfg.node_id,
                        node_uuid = %format!("{:032x}", self.cfg.node_uuid),
                        "the controller refused this node: its id is registered to another node \
                         UUID (this data directory was wiped or belongs to another node); an \
                         operator must unregister the old node first"
                    );
                }
            }
            RpcErrorCode::StaleBrokerEpoch | RpcErrorCode::UnknownBroker => {
                tracing::info!(reason = %e.message, "re-registering with the controller");
                self.agent.broker_epoch = None;
            }
            _ => {
                tracing::warn!(code = ?e.code, reason = %e.message, "controller refused a request")
            }
        }
    }

    fn agent_response(&mut self, corr: u64, msg: RpcMessage) -> Result<(), StoreError> {
        let Some((req, _, to)) = self.agent.outstanding.remove(&corr) else {
            return Ok(()); // late, after its timeout
        };
        if matches!(
            &msg,
            RpcMessage::RegisterBrokerResponse(Ok(_)) | RpcMessage::HeartbeatResponse(Ok(_))
        ) && self.agent.hint != Some(to)
        {
            // Only the active controller decides: whoever did is the controller.
            self.agent.hint = Some(to);
            self.generation += 1;
        }
        match (req, msg) {
            (Req::Register, RpcMessage::RegisterBrokerResponse(r)) => match r {
                Ok(epoch) => {
                    tracing::info!(broker_epoch = epoch, "registered with the controller");
                    self.agent.broker_epoch = Some(epoch);
                    self.agent.last_heartbeat_ms = None;
                    self.agent.refused_logged = false;
                }
                Err(e) => self.agent_refused(&e),
            },
            (Req::Heartbeat, RpcMessage::HeartbeatResponse(r)) => match r {
                Ok(fenced) => {
                    if fenced != self.agent.fenced {
                        tracing::info!(fenced, "controller changed this broker's fencing");
                        self.agent.fenced = fenced;
                    }
                }
                Err(e) => self.agent_refused(&e),
            },
            (Req::Fetch, RpcMessage::FetchMetadataResponse(r)) => match r {
                Ok(chunk) => {
                    for b in chunk.batches {
                        if b.base == self.applied && b.end() <= chunk.high_watermark {
                            self.apply_batch(b.base, b.end(), b.bytes);
                        }
                    }
                }
                Err(e) => self.agent_refused(&e),
            },
            (Req::Call(id), msg) => self.call_response(id, corr, msg),
            (Req::Report(group), RpcMessage::AlterIsrResponse(r)) => {
                self.report_response(group, corr, r)
            }
            (req, msg) => {
                tracing::warn!(?req, ?msg, "controller answered with another kind: ignored");
            }
        }
        Ok(())
    }

    // ---- admin calls and leader reports of this node ------------------------------------------

    /// Starts `call` (named `id` by the caller): it goes to the active controller, is retried
    /// on the next one when that fails, and finishes (see [`Self::take_finished_calls`]) once
    /// decided and applied on this node, refused, or past the call deadline.
    pub fn submit_call(&mut self, id: CallId, call: AdminCall) -> Result<(), StoreError> {
        if self.calls.len() >= MAX_CALLS_IN_FLIGHT || self.calls.contains_key(&id) {
            let e = RpcErrorReply {
                code: RpcErrorCode::Unavailable,
                leader_hint: None,
                message: format!("{MAX_CALLS_IN_FLIGHT} controller calls already in flight"),
            };
            self.finished.push((id, Err(e)));
            return Ok(());
        }
        let deadline_ms = self.now_ms + self.cfg.call_deadline_ms;
        self.calls.insert(
            id,
            PendingCall {
                call,
                deadline_ms,
                state: CallState::Unsent,
            },
        );
        self.send_calls()
    }

    /// Calls finished since the last take, with their answers.
    pub fn take_finished_calls(&mut self) -> Vec<(CallId, Result<CallAnswer, RpcErrorReply>)> {
        std::mem::take(&mut self.finished)
    }

    pub fn calls_in_flight(&self) -> usize {
        self.calls.len()
    }

    /// A partition group this node leads reports its epoch and ISR (Kafka's AlterPartition).
    /// One report per group is in flight; a newer one replaces it, the same one again is a
    /// no-op. Accepted reports come out of [`Self::take_accepted_reports`].
    pub fn report_leader(
        &mut self,
        group: GroupId,
        req: AlterIsrRequest,
    ) -> Result<(), StoreError> {
        if let Some(p) = self.reports.get(&group) {
            if p.req == req {
                return Ok(());
            }
            if let CallState::Sent { corr } = p.state {
                // Its answer would be taken for the newer report's.
                self.agent.outstanding.remove(&corr);
            }
        } else if self.reports.len() >= MAX_REPORTS_IN_FLIGHT {
            tracing::debug!(group, "leader report dropped: too many in flight");
            return Ok(());
        }
        let deadline_ms = self.now_ms + self.cfg.call_deadline_ms;
        self.reports.insert(
            group,
            PendingReport {
                req,
                deadline_ms,
                state: CallState::Unsent,
            },
        );
        // This report only: a scan of every report in flight per report made a burst of
        // thousands quadratic; the tick re-sends any other left unsent.
        self.send_report(group)
    }

    /// Reports the controller accepted, or refused as older than what it has (the group's
    /// leader has nothing more to tell it): the shard stops sending them.
    pub fn take_accepted_reports(&mut self) -> Vec<(GroupId, AlterIsrRequest)> {
        std::mem::take(&mut self.accepted)
    }

    fn send_calls(&mut self) -> Result<(), StoreError> {
        let ready: Vec<CallId> = self
            .calls
            .iter()
            .filter(|(_, c)| c.state == CallState::Unsent)
            .map(|(&id, _)| id)
            .collect();
        for id in ready {
            let msg = match &self.calls[&id].call {
                AdminCall::CreateTopic { req, validate_only } => RpcMessage::CreateTopic {
                    req: req.clone(),
                    validate_only: *validate_only,
                },
                AdminCall::CreatePartitions {
                    topic,
                    total,
                    validate_only,
                } => RpcMessage::CreatePartitions {
                    topic: topic.clone(),
                    total: u32::try_from(*total).unwrap_or(u32::MAX),
                    validate_only: *validate_only,
                },
                AdminCall::DeleteTopic { topic } => RpcMessage::DeleteTopic {
                    topic: topic.clone(),
                },
                AdminCall::SetTopicConfigs { topic, changes } => RpcMessage::SetTopicConfigs {
                    topic: topic.clone(),
                    changes: changes.clone(),
                },
                AdminCall::UnregisterBroker { node } => {
                    RpcMessage::UnregisterBroker { node: *node }
                }
                AdminCall::ElectLeaders { partitions } => RpcMessage::ElectLeaders {
                    partitions: partitions.clone(),
                },
                AdminCall::SetMaintenance { node, on } => RpcMessage::SetMaintenance {
                    node: *node,
                    on: *on,
                },
                AdminCall::SetDecommission { node, on } => RpcMessage::SetDecommission {
                    node: *node,
                    on: *on,
                },
                AdminCall::Reassign { moves } => RpcMessage::AlterReassignments {
                    moves: moves.clone(),
                },
                AdminCall::FinishReassignment {
                    topic,
                    partition,
                    replicas,
                } => RpcMessage::FinishReassignment {
                    leader: self.cfg.node_id,
                    topic: topic.clone(),
                    partition: *partition,
                    replicas: replicas.clone(),
                },
                AdminCall::AllocateProducerIds => {
                    // Blocks are granted to a registered broker only.
                    let Some(broker_epoch) = self.agent.broker_epoch else {
                        continue;
                    };
                    RpcMessage::AllocateProducerIds {
                        node: self.cfg.node_id,
                        broker_epoch,
                    }
                }
            };
            self.set_call_state(id, CallState::Sending);
            let corr = self.agent_request(Req::Call(id), msg)?;
            if self
                .calls
                .get(&id)
                .is_some_and(|c| c.state == CallState::Sending)
            {
                self.set_call_state(id, CallState::Sent { corr });
            }
        }
        Ok(())
    }

    fn send_reports(&mut self) -> Result<(), StoreError> {
        let ready: Vec<GroupId> = self
            .reports
            .iter()
            .filter(|(_, r)| r.state == CallState::Unsent)
            .map(|(&g, _)| g)
            .collect();
        for group in ready {
            self.send_report(group)?;
        }
        Ok(())
    }

    fn send_report(&mut self, group: GroupId) -> Result<(), StoreError> {
        let Some(r) = self.reports.get_mut(&group) else {
            return Ok(());
        };
        r.state = CallState::Sending;
        let req = r.req.clone();
        let corr = self.agent_request(Req::Report(group), RpcMessage::AlterIsr(req))?;
        if let Some(r) = self.reports.get_mut(&group) {
            if r.state == CallState::Sending {
                r.state = CallState::Sent { corr };
            }
        }
        Ok(())
    }

    fn set_call_state(&mut self, id: CallId, state: CallState) {
        if let Some(c) = self.calls.get_mut(&id) {
            c.state = state;
        }
    }

    fn finish_call(&mut self, id: CallId, res: Result<CallAnswer, RpcErrorReply>) {
        if self.calls.remove(&id).is_some() {
            self.finished.push((id, res));
        }
    }

    /// Calls whose decision this node has now applied are done.
    fn finish_applied_calls(&mut self) {
        let applied = self.applied;
        let done: Vec<CallId> = self
            .calls
            .iter()
            .filter(|(_, c)| matches!(c.state, CallState::Applying(at) if at <= applied))
            .map(|(&id, _)| id)
            .collect();
        for id in done {
            self.finish_call(id, Ok(CallAnswer::Done));
        }
    }

    /// Deadlines, and re-sending what timed out (the agent's timeout moved the target on).
    fn calls_tick(&mut self) -> Result<(), StoreError> {
        let now = self.now_ms;
        let outstanding = &self.agent.outstanding;
        let mut expired = Vec::new();
        for (&id, c) in self.calls.iter_mut() {
            if now >= c.deadline_ms {
                expired.push((id, c.state));
            } else if let CallState::Sent { corr } = c.state {
                if !outstanding.contains_key(&corr) {
                    c.state = CallState::Unsent;
                }
            }
        }
        for (id, state) in expired {
            let message = match state {
                CallState::Applying(at) => format!(
                    "the controller decided at metadata offset {at}, but this node has applied                      only up to {} within {} ms",
                    self.applied, self.cfg.call_deadline_ms
                ),
                _ => format!(
                    "no active controller answered within {} ms",
                    self.cfg.call_deadline_ms
                ),
            };
            let e = RpcErrorReply {
                code: RpcErrorCode::Unavailable,
                leader_hint: None,
                message,
            };
            self.finish_call(id, Err(e));
        }
        let outstanding = &self.agent.outstanding;
        self.reports.retain(|group, r| {
            if now >= r.deadline_ms {
                // The shard sends it again while it still holds.
                tracing::debug!(group, "leader report not answered in time: dropped");
                return false;
            }
            if let CallState::Sent { corr } = r.state {
                if !outstanding.contains_key(&corr) {
                    r.state = CallState::Unsent;
                }
            }
            true
        });
        self.send_calls()?;
        self.send_reports()
    }

    fn call_response(&mut self, id: CallId, corr: u64, msg: RpcMessage) {
        match self.calls.get(&id).map(|c| c.state) {
            Some(CallState::Sent { corr: c }) if c == corr => {}
            Some(CallState::Sending) => {}
            _ => return, // an answer to an earlier send of a call since re-sent or finished
        }
        let refusal = match msg {
            RpcMessage::AdminResponse(Ok(at)) => {
                self.set_call_state(id, CallState::Applying(at));
                self.finish_applied_calls();
                return;
            }
            RpcMessage::AllocateProducerIdsResponse(Ok((first, len))) => {
                self.finish_call(id, Ok(CallAnswer::ProducerIds { first, len }));
                return;
            }
            RpcMessage::AdminResponse(Err(e)) | RpcMessage::AllocateProducerIdsResponse(Err(e)) => {
                e
            }
            other => {
                tracing::warn!(msg = ?other, "controller answered a call with another kind");
                return;
            }
        };
        let unregistering = matches!(
            self.calls.get(&id).map(|c| &c.call),
            Some(
                AdminCall::UnregisterBroker { .. }
                    | AdminCall::SetMaintenance { .. }
                    | AdminCall::SetDecommission { .. }
            )
        );
        if unregistering && refusal.code == RpcErrorCode::UnknownBroker {
            // The broker named is unknown, not this node: the answer, not a cue to re-register.
            self.finish_call(id, Err(refusal));
            return;
        }
        match refusal.code {
            RpcErrorCode::NotController
            | RpcErrorCode::Unavailable
            | RpcErrorCode::StaleBrokerEpoch
            | RpcErrorCode::UnknownBroker => {
                // Ask again (the next controller, or after registering again).
                self.agent_refused(&refusal);
                self.set_call_state(id, CallState::Unsent);
            }
            _ => self.finish_call(id, Err(refusal)),
        }
    }

    fn report_response(&mut self, group: GroupId, corr: u64, res: Result<(), RpcErrorReply>) {
        let Some(r) = self.reports.get(&group) else {
            return;
        };
        if !matches!(r.state, CallState::Sending) && r.state != (CallState::Sent { corr }) {
            return;
        }
        match res {
            Ok(()) => {
                let r = self.reports.remove(&group).expect("present");
                self.accepted.push((group, r.req));
            }
            Err(e) => match e.code {
                RpcErrorCode::FencedLeaderEpoch => {
                    let r = self.reports.remove(&group).expect("present");
                    tracing::debug!(group, reason = %e.message, "leader report superseded");
                    self.accepted.push((group, r.req));
                }
                RpcErrorCode::NotController | RpcErrorCode::Unavailable => {
                    self.agent_refused(&e);
                    if let Some(r) = self.reports.get_mut(&group) {
                        r.state = CallState::Unsent;
                    }
                }
                _ => {
                    tracing::info!(group, code = ?e.code, reason = %e.message,
                        "controller refused a leader report");
                    self.reports.remove(&group);
                }
            },
        }
    }
}

/// Runs an admin decision, on a copy of the state when it is only validated.
fn run_admin(
    active: &mut ActiveController,
    validate_only: bool,
    f: impl FnOnce(&mut ActiveController) -> Result<Vec<Record>, ControllerError>,
) -> Result<Vec<Record>, ControllerError> {
    if validate_only {
        active.dry_run(|c| f(c).map(|_| Vec::new()))
    } else {
        f(active)
    }
}

/// Why the operator may not unregister `node` now, if so: a live (unfenced) broker would keep
/// serving and heartbeating while the cluster forgets it, so it must be stopped first; the
/// controller fences it once its session runs out. An unknown id is left to
/// [`ActiveController::unregister`], which refuses it with `UnknownBroker`.
fn refuse_unregistering(state: &MetadataState, node: NodeId) -> Option<RpcErrorReply> {
    let b = state.brokers.get(&node)?;
    (!b.fenced).then(|| RpcErrorReply {
        code: RpcErrorCode::InvalidRequest,
        leader_hint: None,
        message: format!(
            "broker {node} is live (registered and not fenced): stop it first; once its \
             session runs out the controller fences it, and it can then be unregistered"
        ),
    })
}

/// The node a controller request acts for.
fn claimed_node(m: &RpcMessage) -> Option<NodeId> {
    match m {
        RpcMessage::RegisterBroker(r) => Some(r.node),
        RpcMessage::Heartbeat(r) => Some(r.node),
        RpcMessage::AllocateProducerIds { node, .. } => Some(*node),
        RpcMessage::AlterIsr(r) => Some(r.leader),
        RpcMessage::FinishReassignment { leader, .. } => Some(*leader),
        _ => None,
    }
}

fn log_effect(e: &Effect) {
    match e {
        Effect::BrokerRegistered { node, broker_epoch } => {
            tracing::info!(node, broker_epoch, "broker registered")
        }
        Effect::BrokerFenced { node } => tracing::info!(node, "broker fenced"),
        Effect::BrokerUnfenced { node } => tracing::info!(node, "broker unfenced"),
        Effect::BrokerUnregistered { node } => tracing::info!(node, "broker unregistered"),
        Effect::MaintenanceChanged { node, on } => {
            tracing::info!(node, on, "broker maintenance mode changed")
        }
        Effect::DecommissionChanged { node, on } => {
            tracing::info!(node, on, "broker decommission changed")
        }
        Effect::ReassignmentChanged { topic, partition } => {
            tracing::info!(%topic, partition, "partition reassignment recorded")
        }
        Effect::ReassignmentFinished {
            topic,
            partition,
            replicas,
        } => tracing::info!(%topic, partition, ?replicas, "partition reassignment finished"),
        _ => tracing::debug!(effect = ?e, "metadata applied"),
    }
}
