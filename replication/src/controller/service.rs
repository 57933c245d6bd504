//! The cluster service thread: a glommio executor running the rpc transport and the
//! [`Driver`] on a tick, routing partition groups' consensus traffic between the transport and
//! the shards ([`ShardLink`]), carrying the Kafka layer's controller calls ([`ClusterPort`]),
//! mirroring the applied topics into the node's [`crate::metadata::MetadataStore`] and
//! publishing the [`ClusterView`] the shards read.
//!
//! Every change the driver applied is made visible in this order: the topic mirror, then the
//! view, then the answers of the calls it finishes, so a client answered "created" finds the
//! topic in the next Metadata request to this node, on any shard.
//!
//! It runs on its own unpinned thread rather than on a shard: its work is a few small messages
//! per tick, and on a shard it would wait behind request handling and fsyncs, which delays
//! heartbeats and elections (a failover budget of about a second leaves no room for that).
//! Unpinned, the kernel runs it on whichever core has a moment; its fsyncs of the metadata log
//! block only this thread.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};

use crate::cluster::{
    plan_hosting, split_by_shard, CallError, ClusterPort, ControllerCall, HostingPlan,
    LeaderReport, Reply, RouteTable, ShardEvent, ShardLink, ShardRoutes, CONTROLLER_CALL_QUEUE,
    SHARD_CONSENSUS_CHANNEL_CAPACITY,
};
use crate::controller::driver::{
    AdminCall, CallAnswer, CallId, Driver, DriverConfig, Outgoing, DEFAULT_CONTROLLER_TICK_MS,
};
use crate::controller::records::Endpoint;
use crate::controller::store::{MetadataStore, StoreError};
use crate::controller::view::SharedClusterView;
use crate::controller::{AlterIsrRequest, MetadataState, METADATA_GROUP};
use crate::identity::NodeIdentity;
use crate::liveness::PingBoard;
use crate::metadata::{TopicMeta, NOT_HOSTED};
use crate::node::NodeMessage;
use crate::rpc::frame::{Frame, RpcErrorCode, RpcErrorReply, RpcMessage};
use crate::rpc::transport::{Incoming, ReplyTo, Transport, TransportConfig};
use crate::shard::cross_wake;
use crate::types::{GroupId, NodeId};

/// Events all shards together may have waiting for the service thread (consensus sends and
/// leader reports). A few ticks' worth for a busy node; a shard drops on full (consensus
/// resends, reports repeat).
pub const SHARD_EVENT_QUEUE: usize = 4 * SHARD_CONSENSUS_CHANNEL_CAPACITY;
/// A tick of the service thread (the driver's tick and the publishing after it) taking this
/// long is logged: heartbeats and consensus crossing the thread wait for it.
const SLOW_TICK: Duration = Duration::from_millis(200);
/// Accepted leader reports waiting for one shard; on full the acknowledgement is dropped and
/// the shard's next re-send is accepted again.
pub const ACCEPTED_REPORT_QUEUE: usize = SHARD_CONSENSUS_CHANNEL_CAPACITY;

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub identity: NodeIdentity,
    pub data_dir: PathBuf,
    /// `--rpc-listen`.
    pub rpc_listen: SocketAddr,
    /// `--advertised-rpc`; `None`: the bound rpc address.
    pub advertised_rpc: Option<Endpoint>,
    /// `--seeds`: the metadata voters and where to dial them.
    pub seeds: Vec<(NodeId, String)>,
    /// Where clients reach this node's Kafka port.
    pub kafka: Endpoint,
    pub shards: u32,
    /// `--default-replication-factor`; `None`: min(3, live brokers).
    pub default_replication_factor: Option<usize>,
    /// The leader balancer's interval; `None`: off.
    pub leader_balance_interval_ms: Option<u64>,
    pub tick: Duration,
    pub transport: TransportConfig,
}

impl ServiceConfig {
    pub fn new(
        identity: NodeIdentity,
        data_dir: PathBuf,
        rpc_listen: SocketAddr,
        seeds: Vec<(NodeId, String)>,
        kafka: Endpoint,
        shards: u32,
    ) -> Self {
        ServiceConfig {
            identity,
            data_dir,
            rpc_listen,
            advertised_rpc: None,
            seeds,
            kafka,
            shards,
            default_replication_factor: None,
            leader_balance_interval_ms: Some(
                crate::controller::active::DEFAULT_LEADER_BALANCE_INTERVAL_MS,
            ),
            tick: Duration::from_millis(DEFAULT_CONTROLLER_TICK_MS),
            transport: TransportConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("metadata store: {0}")]
    Store(#[from] StoreError),
    #[error("rpc listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("controller thread: {0}")]
    Thread(String),
    #[error("the topic store given to the cluster service is not in mirrored mode")]
    NotMirrored,
}

/// Counters of the service thread, for tests and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ServiceStats {
    /// Incoming consensus entries for groups this node does not host (closed, not opened yet,
    /// or never here): dropped; consensus resends what is still needed.
    pub consensus_unhosted: u64,
    /// Incoming consensus entries dropped because their shard's inbox was full.
    pub consensus_inbox_full: u64,
    /// Shard consensus messages not handed to the transport (unknown peer, oversized).
    pub shard_sends_failed: u64,
    /// Leader reports for groups the applied metadata does not place on this node.
    pub reports_unplaced: u64,
    /// Acknowledgements of accepted leader reports dropped because their shard's queue was
    /// full (the shard re-sends the report and it is acknowledged again).
    pub report_acks_dropped: u64,
    /// Frames the rpc transport dropped from a full send queue (the oldest go first).
    pub rpc_frames_dropped: u64,
    /// The controller driver's frames (metadata consensus, broker requests, answers) the
    /// transport refused (unknown peer, oversized, connection gone).
    pub rpc_sends_failed: u64,
}

impl ServiceStats {
    /// Every counter with a short name (the `reason` label of the Prometheus series).
    pub fn by_reason(&self) -> [(&'static str, u64); 7] {
        [
            ("consensus_unhosted", self.consensus_unhosted),
            ("consensus_inbox_full", self.consensus_inbox_full),
            ("shard_send_failed", self.shard_sends_failed),
            ("report_unplaced", self.reports_unplaced),
            ("report_ack_queue_full", self.report_acks_dropped),
            ("rpc_send_queue_full", self.rpc_frames_dropped),
            ("rpc_send_failed", self.rpc_sends_failed),
        ]
    }
}

/// The service thread's counters, shared with the [`ClusterPort`] (the Kafka layer exports
/// them) and [`ClusterService::stats`].
#[derive(Debug, Default)]
pub(crate) struct StatCells {
    consensus_unhosted: AtomicU64,
    consensus_inbox_full: AtomicU64,
    shard_sends_failed: AtomicU64,
    reports_unplaced: AtomicU64,
    report_acks_dropped: AtomicU64,
    /// A copy of the transport's own running total, taken every tick.
    rpc_frames_dropped: AtomicU64,
    rpc_sends_failed: AtomicU64,
}

impl StatCells {
    fn add(cell: &AtomicU64, n: u64) {
        if n > 0 {
            cell.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> ServiceStats {
        ServiceStats {
            consensus_unhosted: self.consensus_unhosted.load(Ordering::Relaxed),
            consensus_inbox_full: self.consensus_inbox_full.load(Ordering::Relaxed),
            shard_sends_failed: self.shard_sends_failed.load(Ordering::Relaxed),
            reports_unplaced: self.reports_unplaced.load(Ordering::Relaxed),
            report_acks_dropped: self.report_acks_dropped.load(Ordering::Relaxed),
            rpc_frames_dropped: self.rpc_frames_dropped.load(Ordering::Relaxed),
            rpc_sends_failed: self.rpc_sends_failed.load(Ordering::Relaxed),
        }
    }
}

/// The running service thread.
pub struct ClusterService {
    view: SharedClusterView,
    rpc_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    stats: Arc<StatCells>,
    thread: Option<glommio::ExecutorJoinHandle<()>>,
}

/// The service thread's ends of the shard channels.
struct ShardEnds {
    inboxes: Vec<flume::Sender<NodeMessage>>,
    accepted: Vec<flume::Sender<LeaderReport>>,
    events: flume::Receiver<ShardEvent>,
    calls: flume::Receiver<ControllerCall>,
    /// Where peers' liveness pings go for the shards.
    pings: Arc<PingBoard>,
}

impl ClusterService {
    /// Opens the metadata log, binds the rpc port and starts the service thread. Returns once
    /// the port is bound (so its address is known) or failed, with one [`ShardLink`] per shard
    /// (`cfg.shards` of them, `links[i].shard == i`) and the Kafka layer's [`ClusterPort`].
    /// The driver publishes into `view` and mirrors the topics into `mirror`, which must be a
    /// [`crate::metadata::MetadataStore::mirrored`] store (the one the shards read).
    pub fn start(
        cfg: ServiceConfig,
        view: SharedClusterView,
        mirror: Arc<crate::metadata::MetadataStore>,
    ) -> Result<(ClusterService, Vec<ShardLink>, ClusterPort), ServiceError> {
        if !mirror.is_mirrored() {
            return Err(ServiceError::NotMirrored);
        }
        let store = MetadataStore::open(&cfg.data_dir)?;
        let shards = cfg.shards.max(1) as usize;
        let (calls_tx, calls_rx) = flume::bounded(CONTROLLER_CALL_QUEUE);
        let (events_tx, events_rx) = flume::bounded(SHARD_EVENT_QUEUE);
        let port = ClusterPort::new(view.clone(), calls_tx);
        let stats = port.service_stat_cells();
        let mut ends = ShardEnds {
            inboxes: Vec::with_capacity(shards),
            accepted: Vec::with_capacity(shards),
            events: events_rx,
            calls: calls_rx,
            pings: port.pings().clone(),
        };
        let mut links = Vec::with_capacity(shards);
        for shard in 0..shards {
            let (inbox_tx, inbox_rx) = flume::bounded(SHARD_CONSENSUS_CHANNEL_CAPACITY);
            let (acc_tx, acc_rx) = flume::bounded(ACCEPTED_REPORT_QUEUE);
            ends.inboxes.push(inbox_tx);
            ends.accepted.push(acc_tx);
            links.push(ShardLink {
                shard,
                inbox: inbox_rx,
                to_service: events_tx.clone(),
                accepted: acc_rx,
                port: port.clone(),
            });
        }
        drop(events_tx);
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (view2, stop2, stats2) = (view.clone(), stop.clone(), stats.clone());
        let handle = LocalExecutorBuilder::new(Placement::Unbound)
            .name("spate-cluster")
            .spawn(move || async move {
                run(cfg, store, view2, mirror, ends, stats2, stop2, ready_tx).await;
            })
            .map_err(|e| ServiceError::Thread(e.to_string()))?;
        let rpc_addr = match ready_rx.recv() {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                let _ = handle.join();
                return Err(e);
            }
            Err(_) => return Err(ServiceError::Thread("exited before binding".into())),
        };
        let svc = ClusterService {
            view,
            rpc_addr,
            stop,
            stats,
            thread: Some(handle),
        };
        Ok((svc, links, port))
    }

    pub fn view(&self) -> SharedClusterView {
        self.view.clone()
    }

    pub fn rpc_addr(&self) -> SocketAddr {
        self.rpc_addr
    }

    pub fn stats(&self) -> ServiceStats {
        self.stats.snapshot()
    }

    /// Stops the service and waits for its thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where a finished call's answer goes.
enum CallReply {
    Unit(Reply<()>),
    /// An unregistration, maintenance or decommission change: an unknown broker is `BROKER_ID_NOT_REGISTERED`,
    /// not a generic refusal.
    Unregister(Reply<()>),
    ProducerIds(Reply<(u64, u32)>),
}

/// Everything the service thread's tasks share (one executor: borrowed, never across an
/// await).
struct Ctx {
    node: NodeId,
    /// Peers' liveness pings, for the shards (see [`crate::liveness`]).
    pings: Arc<PingBoard>,
    driver: Driver<ReplyTo>,
    transport: Transport,
    view: SharedClusterView,
    mirror: Arc<crate::metadata::MetadataStore>,
    stats: Arc<StatCells>,
    inboxes: Vec<flume::Sender<NodeMessage>>,
    accepted: Vec<flume::Sender<LeaderReport>>,
    /// The groups this node hosts, from the applied metadata at placement version `plan_at`.
    plan: HostingPlan,
    /// The plan's group-to-shard routes, for the consensus traffic.
    routes: RouteTable,
    plan_at: Option<u64>,
    conflicts_logged: BTreeSet<GroupId>,
    /// What the mirror holds.
    mirrored: BTreeMap<String, TopicMeta>,
    /// Where the transport dials each broker (from the seeds, then the registrations).
    peers: BTreeMap<NodeId, String>,
    /// The node UUID of each registered broker as last told to the transport's handshake.
    peer_uuids: BTreeMap<NodeId, u128>,
    /// The newest report per group handed to the driver, with the hosting shard.
    reports: BTreeMap<GroupId, (usize, LeaderReport)>,
    replies: BTreeMap<CallId, CallReply>,
    next_call: CallId,
    last_generation: u64,
}

impl Ctx {
    /// After every event: frames out, then (when the applied placement changed) the plan,
    /// peers and mirror, then the view, then the answers and acknowledgements this allows.
    ///
    /// The view (a copy of the whole applied metadata) is made again on a tick, with the mirror,
    /// or when a call finishes (its caller must find what it did), not after every event: a burst of leader
    /// reports applies a metadata batch every few events, and a copy per batch of a state with
    /// thousands of partitions held this thread for seconds. Leaders and ISRs reach the view
    /// within a tick.
    fn publish(&mut self, tick: bool) {
        let unsent = flush(&mut self.driver, &self.transport);
        StatCells::add(&self.stats.rpc_sends_failed, unsent);
        let placement = self.driver.placement_version();
        let placed = self.plan_at != Some(placement);
        if placed {
            self.plan_at = Some(placement);
            self.refresh_applied();
        }
        let finished = self.driver.take_finished_calls();
        let stale = self.driver.generation() != self.last_generation;
        // A topic the mirror holds is in the view too.
        if stale && (tick || placed || !finished.is_empty()) {
            self.last_generation = self.driver.generation();
            self.view.set(self.driver.view());
        }
        for (id, res) in finished {
            let Some(reply) = self.replies.remove(&id) else {
                continue;
            };
            // The caller may have gone away: nothing to do then.
            match (reply, res) {
                (CallReply::Unit(r), Ok(_)) => drop(r.try_send(Ok(()))),
                (CallReply::Unit(r), Err(e)) => drop(r.try_send(Err(call_error(&e)))),
                (CallReply::Unregister(r), Ok(_)) => drop(r.try_send(Ok(()))),
                (CallReply::Unregister(r), Err(e)) => drop(r.try_send(Err(unregister_error(&e)))),
                (CallReply::ProducerIds(r), Ok(CallAnswer::ProducerIds { first, len })) => {
                    drop(r.try_send(Ok((first, len))))
                }
                (CallReply::ProducerIds(r), Ok(CallAnswer::Done)) => drop(r.try_send(Err(
                    CallError::unavailable("the controller answered without a block"),
                ))),
                (CallReply::ProducerIds(r), Err(e)) => drop(r.try_send(Err(call_error(&e)))),
            }
        }
        for (group, req) in self.driver.take_accepted_reports() {
            let Some((_, report)) = self.reports.get(&group) else {
                continue;
            };
            if report.epoch != req.leader_epoch || report.isr != req.isr {
                continue; // a newer report is in flight
            }
            let (shard, report) = self.reports.remove(&group).expect("present");
            if self.accepted[shard].try_send(report).is_err() {
                StatCells::add(&self.stats.report_acks_dropped, 1);
                tracing::debug!(
                    group,
                    shard,
                    "report acknowledgement dropped: shard queue full"
                );
            }
        }
    }

    /// The applied placement changed: recompute the hosting plan, dial new brokers, and mirror
    /// the topics (before the view is published).
    fn refresh_applied(&mut self) {
        let state = self.driver.state();
        let (plan, conflicts) = plan_hosting(state, self.node);
        for c in conflicts {
            if self.conflicts_logged.insert(c.group) {
                tracing::error!(error = %c, "partition group id collision");
            }
        }
        self.routes = RouteTable::of(&plan);
        self.plan = plan;
        // Reports for groups no longer here are not answered any more.
        let plan = &self.plan;
        self.reports.retain(|g, _| plan.groups.contains_key(g));
        // An unregistered broker's id may come back with a new node UUID: the handshake
        // forgets the old one (a wiped node is refused until then).
        let gone: Vec<NodeId> = self
            .peer_uuids
            .iter()
            .filter(|(n, u)| state.brokers.get(n).is_none_or(|b| b.node_uuid != **u))
            .map(|(&n, _)| n)
            .collect();
        for node in gone {
            self.peer_uuids.remove(&node);
            if !state.brokers.contains_key(&node) {
                tracing::info!(
                    node,
                    "broker unregistered: its id may join with a new node UUID"
                );
            }
            self.transport.forget_peer_uuid(node);
        }
        for (&node, b) in &state.brokers {
            if node == self.node {
                continue;
            }
            if self.peer_uuids.get(&node) != Some(&b.node_uuid) {
                self.transport.learn_peer_uuid(node, b.node_uuid);
                self.peer_uuids.insert(node, b.node_uuid);
            }
            let addr = format!("{}:{}", b.rpc.host, b.rpc.port);
            if self.peers.get(&node) != Some(&addr) {
                self.transport.add_peer(node, addr.clone());
                self.peers.insert(node, addr);
            }
        }
        let topics = mirror_topics(state, self.node);
        if topics != self.mirrored {
            self.mirror.mirror_cluster(topics.clone());
            self.mirrored = topics;
        }
    }

    /// A frame from the transport: partition groups' consensus to the shards, the rest to the
    /// driver. Returns whether the driver got something (and so may have changed).
    fn incoming(&mut self, m: Incoming) -> Result<bool, StoreError> {
        let Incoming { from, frame, reply } = m;
        if let RpcMessage::Liveness(ping) = frame.message {
            self.pings.record(from, ping);
            return Ok(false);
        }
        let RpcMessage::Consensus(msg) = frame.message else {
            return self.driver.receive(from, frame, reply).map(|()| true);
        };
        if msg.to != self.node || msg.from != from {
            tracing::warn!(from, to = msg.to, "consensus message misaddressed: dropped");
            return Ok(false);
        }
        let metadata = msg
            .items
            .iter()
            .filter(|(g, _)| *g == METADATA_GROUP)
            .count();
        if metadata == msg.items.len() {
            let frame = Frame {
                correlation_id: frame.correlation_id,
                message: RpcMessage::Consensus(msg),
            };
            return self.driver.receive(from, frame, reply).map(|()| true);
        }
        if metadata == 0 {
            self.route_to_shards(msg);
            return Ok(false);
        }
        // Senders keep the metadata group apart from the partition groups, so this is rare.
        let (meta, rest): (Vec<_>, Vec<_>) = msg
            .items
            .into_iter()
            .partition(|(g, _)| *g == METADATA_GROUP);
        self.route_to_shards(NodeMessage {
            from: msg.from,
            to: msg.to,
            items: rest,
        });
        let frame = Frame {
            correlation_id: frame.correlation_id,
            message: RpcMessage::Consensus(NodeMessage {
                from: msg.from,
                to: msg.to,
                items: meta,
            }),
        };
        self.driver.receive(from, frame, reply).map(|()| true)
    }

    fn route_to_shards(&mut self, msg: NodeMessage) {
        // Usually every entry is for one shard (a peer's shard sends its own groups): pass the
        // message on whole.
        let first = msg
            .items
            .first()
            .and_then(|(g, _)| self.routes.shard_of(*g));
        let whole = first.filter(|&s| {
            msg.items
                .iter()
                .all(|(g, _)| self.routes.shard_of(*g) == Some(s))
        });
        if let Some(s) = whole {
            self.deliver(s, msg);
            return;
        }
        let (parts, dropped) = split_by_shard(msg, &self.routes);
        StatCells::add(&self.stats.consensus_unhosted, dropped as u64);
        for (s, part) in parts {
            self.deliver(s, part);
        }
    }

    fn deliver(&self, shard: u32, msg: NodeMessage) {
        let n = msg.items.len() as u64;
        match self.inboxes.get(shard as usize) {
            Some(inbox) => {
                if inbox.try_send(msg).is_err() {
                    StatCells::add(&self.stats.consensus_inbox_full, n);
                }
            }
            // Placed on a shard this node does not run (the controller refuses that; a bug).
            None => StatCells::add(&self.stats.consensus_unhosted, n),
        }
    }

    fn shard_event(&mut self, ev: ShardEvent) -> Result<(), StoreError> {
        match ev {
            ShardEvent::Send(msg) => {
                let to = msg.to;
                let frame = Frame {
                    correlation_id: 0,
                    message: RpcMessage::Consensus(msg),
                };
                if let Err(e) = self.transport.send(to, &frame) {
                    StatCells::add(&self.stats.shard_sends_failed, 1);
                    tracing::debug!(to, error = %e, "partition consensus not sent");
                }
                Ok(())
            }
            ShardEvent::Ping(ping) => {
                let frame = Frame {
                    correlation_id: 0,
                    message: RpcMessage::Liveness(ping),
                };
                for &to in self.peers.keys() {
                    if to == self.node {
                        continue;
                    }
                    if let Err(e) = self.transport.send(to, &frame) {
                        StatCells::add(&self.stats.shard_sends_failed, 1);
                        tracing::debug!(to, error = %e, "liveness ping not sent");
                    }
                }
                Ok(())
            }
            ShardEvent::Report(report) => {
                let Some(h) = self.plan.groups.get(&report.group) else {
                    StatCells::add(&self.stats.reports_unplaced, 1);
                    return Ok(());
                };
                let req = AlterIsrRequest {
                    topic: h.topic.clone(),
                    partition: h.partition,
                    leader: report.leader,
                    leader_epoch: report.epoch,
                    isr: report.isr.clone(),
                };
                let (group, shard) = (report.group, h.shard as usize);
                self.reports.insert(group, (shard, report));
                self.driver.report_leader(group, req)
            }
        }
    }

    fn call(&mut self, call: ControllerCall) -> Result<(), StoreError> {
        let id = self.next_call;
        self.next_call += 1;
        let (admin, reply) = match call {
            ControllerCall::CreateTopic {
                req,
                validate_only,
                reply,
            } => (
                AdminCall::CreateTopic { req, validate_only },
                CallReply::Unit(reply),
            ),
            ControllerCall::CreatePartitions {
                topic,
                total,
                validate_only,
                reply,
            } => (
                AdminCall::CreatePartitions {
                    topic,
                    total,
                    validate_only,
                },
                CallReply::Unit(reply),
            ),
            ControllerCall::DeleteTopic { topic, reply } => {
                (AdminCall::DeleteTopic { topic }, CallReply::Unit(reply))
            }
            ControllerCall::SetTopicConfigs {
                topic,
                changes,
                reply,
            } => (
                AdminCall::SetTopicConfigs { topic, changes },
                CallReply::Unit(reply),
            ),
            ControllerCall::AllocateProducerIds { reply } => (
                AdminCall::AllocateProducerIds,
                CallReply::ProducerIds(reply),
            ),
            ControllerCall::UnregisterBroker { node, reply } => (
                AdminCall::UnregisterBroker { node },
                CallReply::Unregister(reply),
            ),
            ControllerCall::ElectPreferredLeaders { partitions, reply } => (
                AdminCall::ElectLeaders { partitions },
                CallReply::Unit(reply),
            ),
            ControllerCall::SetMaintenance { node, on, reply } => (
                AdminCall::SetMaintenance { node, on },
                CallReply::Unregister(reply),
            ),
            ControllerCall::SetDecommission { node, on, reply } => (
                AdminCall::SetDecommission { node, on },
                CallReply::Unregister(reply),
            ),
            ControllerCall::Reassign { moves, reply } => {
                (AdminCall::Reassign { moves }, CallReply::Unit(reply))
            }
            ControllerCall::FinishReassignment {
                topic,
                partition,
                replicas,
                reply,
            } => (
                AdminCall::FinishReassignment {
                    topic,
                    partition,
                    replicas,
                },
                CallReply::Unit(reply),
            ),
        };
        self.replies.insert(id, reply);
        self.driver.submit_call(id, admin)
    }
}

/// A controller refusal as the Kafka client should see it.
pub fn call_error(e: &RpcErrorReply) -> CallError {
    use kafka_protocol::ResponseError as K;
    let code = match e.code {
        RpcErrorCode::NotController | RpcErrorCode::Unavailable => {
            return CallError::unavailable(&e.message)
        }
        RpcErrorCode::TopicExists => K::TopicAlreadyExists,
        RpcErrorCode::UnknownTopic => K::UnknownTopicOrPartition,
        RpcErrorCode::InvalidTopic => K::InvalidTopicException,
        RpcErrorCode::InvalidPartitions => K::InvalidPartitions,
        RpcErrorCode::InvalidReplicationFactor => K::InvalidReplicationFactor,
        RpcErrorCode::InvalidConfig => K::InvalidConfig,
        RpcErrorCode::FencedLeaderEpoch => K::FencedLeaderEpoch,
        RpcErrorCode::StaleBrokerEpoch
        | RpcErrorCode::NodeIdInUse
        | RpcErrorCode::UnknownBroker
        | RpcErrorCode::InvalidRequest => K::InvalidRequest,
    };
    CallError::new(code.code(), e.message.clone())
}

/// An unregistration's refusal: an unknown id has Kafka's own code.
fn unregister_error(e: &RpcErrorReply) -> CallError {
    if e.code == RpcErrorCode::UnknownBroker {
        let code = kafka_protocol::ResponseError::BrokerIdNotRegistered.code();
        return CallError::new(code, e.message.clone());
    }
    call_error(e)
}

/// The controller's topics as this node's store holds them: `shards[p]` is the shard of this
/// node's replica of partition `p`, or [`NOT_HOSTED`].
pub fn mirror_topics(state: &MetadataState, node: NodeId) -> BTreeMap<String, TopicMeta> {
    state
        .topics
        .iter()
        .map(|(name, t)| {
            let shards = t
                .partitions
                .iter()
                .map(|p| {
                    p.replicas
                        .iter()
                        .find(|r| r.node == node)
                        .map_or(NOT_HOSTED, |r| r.shard)
                })
                .collect();
            let meta = TopicMeta {
                name: name.clone(),
                id: t.topic_id,
                partitions: t.partitions.len() as i32,
                internal: false,
                configs: t.configs.clone(),
                shards,
            };
            (name.clone(), meta)
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn run(
    cfg: ServiceConfig,
    store: MetadataStore,
    view: SharedClusterView,
    mirror: Arc<crate::metadata::MetadataStore>,
    ends: ShardEnds,
    stats: Arc<StatCells>,
    stop: Arc<AtomicBool>,
    ready: std::sync::mpsc::Sender<Result<SocketAddr, ServiceError>>,
) {
    let (transport, inbox) =
        match Transport::bind(cfg.rpc_listen, &cfg.identity, cfg.transport.clone()) {
            Ok(t) => t,
            Err(source) => {
                let _ = ready.send(Err(ServiceError::Bind {
                    addr: cfg.rpc_listen,
                    source,
                }));
                return;
            }
        };
    let bound = transport.local_addr();
    let id = &cfg.identity;
    let mut peers = BTreeMap::new();
    for (node, addr) in &cfg.seeds {
        if *node != id.node_id {
            transport.add_peer(*node, addr.clone());
            peers.insert(*node, addr.clone());
        }
    }
    let rpc = cfg.advertised_rpc.clone().unwrap_or_else(|| Endpoint {
        host: bound.ip().to_string(),
        port: bound.port(),
    });
    let voters: Vec<NodeId> = cfg.seeds.iter().map(|s| s.0).collect();
    let mut dcfg = DriverConfig::new(
        id.node_id,
        id.node_uuid,
        id.cluster_id.clone(),
        voters,
        rpc,
        cfg.kafka.clone(),
        cfg.shards,
    );
    dcfg.default_replication_factor = cfg.default_replication_factor;
    dcfg.controller.leader_balance_interval_ms = cfg.leader_balance_interval_ms;
    let start = Instant::now();
    let now_ms = move || start.elapsed().as_millis() as u64;
    let driver = Driver::new(dcfg, store, now_ms());
    tracing::info!(
        rpc = %bound,
        cluster_id = %id.cluster_id,
        voter = driver.is_voter(),
        metadata_offset = driver.applied(),
        shards = ends.inboxes.len(),
        "cluster service started"
    );
    let ShardEnds {
        inboxes,
        accepted,
        events,
        calls,
        pings,
    } = ends;
    let ctx = Rc::new(RefCell::new(Ctx {
        node: id.node_id,
        driver,
        transport: transport.clone(),
        view,
        mirror,
        stats,
        inboxes,
        accepted,
        plan: HostingPlan::default(),
        routes: RouteTable::default(),
        plan_at: None,
        conflicts_logged: BTreeSet::new(),
        mirrored: BTreeMap::new(),
        peers,
        peer_uuids: BTreeMap::new(),
        reports: BTreeMap::new(),
        replies: BTreeMap::new(),
        next_call: 0,
        last_generation: 0,
        pings,
    }));
    ctx.borrow_mut().publish(true);
    let _ = ready.send(Ok(bound));

    let receiver = {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            while let Some(m) = inbox.recv().await {
                let c = &mut *ctx.borrow_mut();
                // Partition traffic only passes through: nothing to publish after it.
                if fatal_on_error(c.incoming(m)) {
                    c.publish(false);
                }
            }
        })
    };
    let shard_events = {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            while let Ok(ev) = cross_wake::recv(&events).await {
                let c = &mut *ctx.borrow_mut();
                let mut reports = matches!(ev, ShardEvent::Report(_));
                fatal_on_error(c.shard_event(ev));
                // Drain what else is queued, then publish once (consensus sends need none).
                for ev in events.try_iter().take(SHARD_EVENT_QUEUE) {
                    reports |= matches!(ev, ShardEvent::Report(_));
                    fatal_on_error(c.shard_event(ev));
                }
                if reports {
                    c.publish(false);
                }
            }
        })
    };
    let controller_calls = {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            while let Ok(call) = cross_wake::recv(&calls).await {
                let c = &mut *ctx.borrow_mut();
                fatal_on_error(c.call(call));
                c.publish(false);
            }
        })
    };
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        next += cfg.tick;
        let wait = next.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            // Behind (a slow fsync): skip the missed ticks rather than bursting them.
            next = Instant::now();
        } else {
            glommio::timer::sleep(wait).await;
        }
        let c = &mut *ctx.borrow_mut();
        let started = Instant::now();
        fatal_on_error(c.driver.tick(now_ms()));
        c.publish(true);
        c.stats
            .rpc_frames_dropped
            .store(c.transport.stats().frames_dropped, Ordering::Relaxed);
        let took = started.elapsed();
        if took >= SLOW_TICK {
            tracing::info!(
                took_ms = took.as_millis() as u64,
                applied = c.driver.applied(),
                "cluster service tick was slow"
            );
        }
    }
    transport.stop();
    drop(receiver);
    drop(shard_events);
    drop(controller_calls);
    // Calls still waiting are answered "unavailable" as their reply senders drop.
    ctx.borrow_mut().replies.clear();
    tracing::info!("cluster service stopped");
}

/// Hands the driver's frames to the transport; returns how many it refused.
fn flush(d: &mut Driver<ReplyTo>, transport: &Transport) -> u64 {
    let mut unsent = 0;
    for o in d.take_outgoing() {
        let res = match o {
            Outgoing::Peer { to, frame } => transport.send(to, &frame).map_err(|e| e.to_string()),
            Outgoing::Reply { to, frame } => to.send(&frame).map_err(|e| e.to_string()),
        };
        if let Err(e) = res {
            unsent += 1;
            tracing::warn!(error = %e, "rpc frame not sent");
        }
    }
    unsent
}

/// The metadata log could not be written: the node cannot keep its promises to the quorum
/// (an acknowledged entry may be lost), so it stops rather than continue.
fn fatal_on_error<T>(res: Result<T, StoreError>) -> T {
    match res {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "metadata store failed: stopping this node");
            std::process::exit(1);
        }
    }
}
