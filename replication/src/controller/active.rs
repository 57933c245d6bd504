//! The active controller: the controller-group leader's decisions, turned into records.
//!
//! It runs on the leader of the metadata log only, from the moment that leader has committed in
//! its epoch (`LeaderReady`) and applied the whole committed log, so its starting state holds
//! every record any earlier controller got committed. Each decision is checked against its own
//! state, applied to it at once (so the next decision sees it, as KRaft's active controller
//! does) and returned as records for the caller to propose as one batch. If the proposal fails
//! or leadership is lost, the caller drops this value; the next active controller starts again
//! from the committed state. Time is passed in; nothing here reads a clock.
//!
//! Liveness is not logged: heartbeats only refresh a time kept here. A new active controller
//! gives every broker a full session from the moment it starts, as KRaft does, so a controller
//! failover never fences a healthy broker.

use std::collections::BTreeMap;

use crate::controller::decommission;
use crate::controller::leadership::{self, PreferredElection};
use crate::controller::placement::{default_replication_factor, PlacementError, Placer};
use crate::controller::reassignment;
use crate::controller::records::{
    BrokerRegistration, Endpoint, PartitionState, Record, MAX_CONFIGS_PER_TOPIC,
    MAX_CONFIG_KEY_BYTES, MAX_CONFIG_VALUE_BYTES, MAX_HOST_BYTES, MAX_NODE_ID,
    MAX_PARTITIONS_PER_TOPIC, MAX_PRODUCER_ID_BLOCK_LEN, MAX_SHARDS_PER_BROKER,
};
use crate::controller::state::{check_topic_name, MetadataState};
use crate::metadata::{is_reserved_topic_name, topic_names_collide, CONSUMER_OFFSETS_TOPIC};
use crate::types::{Epoch, NodeId};

/// A broker not heard from for this long is fenced and leaves the ISRs and leaderships. Four
/// heartbeat intervals: one or two lost heartbeats do not fence, and a dead broker is fenced
/// within about a second, inside the 2 s failover budget.
pub const DEFAULT_BROKER_SESSION_TIMEOUT_MS: u64 = 1_000;
/// How often a broker heartbeats to the active controller.
pub const DEFAULT_BROKER_HEARTBEAT_INTERVAL_MS: u64 = 250;
/// Producer ids per block (KIP-730 hands out 1000 at a time).
pub const DEFAULT_PRODUCER_ID_BLOCK_LEN: u32 = 1_000;
/// Topics whose names start with this belong to the broker (`__consumer_offsets`, ...).
pub const INTERNAL_TOPIC_PREFIX: &str = "__";
/// Config changes one SetTopicConfigs call may carry (a topic holds at most
/// [`MAX_CONFIGS_PER_TOPIC`] keys; twice that covers removing all and setting all).
pub const MAX_CONFIG_CHANGES_PER_CALL: usize = 2 * MAX_CONFIGS_PER_TOPIC;
/// How often the leader balancer moves leadership back to preferred replicas (Kafka's
/// `leader.imbalance.check.interval.seconds`, 300 s there). 30 s: a node restarted for an
/// upgrade is back in its ISRs within seconds and gets its leaders back within half a minute,
/// while a node that flaps faster than that is not handed leadership on every return.
pub const DEFAULT_LEADER_BALANCE_INTERVAL_MS: u64 = 30_000;
/// Partitions one preferred-leader election request may name.
pub const MAX_PARTITIONS_PER_ELECTION: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerConfig {
    pub broker_session_timeout_ms: u64,
    pub producer_id_block_len: u32,
    /// Replicas of a topic created without a count (`--default-replication-factor`);
    /// `None`: three, or every node of a smaller cluster (see [`Self::cluster_nodes`]).
    pub default_replication_factor: Option<usize>,
    /// The metadata voters: the cluster has at least these nodes, registered or not yet, so a
    /// topic created while some are still starting gets the cluster's replication factor
    /// (refused until enough are live, clients retry) rather than a smaller one for good.
    pub voters: usize,
    /// The leader balancer's interval (`--leader-imbalance-check-interval-seconds`); `None`:
    /// off (`--auto-leader-rebalance-enable false`).
    pub leader_balance_interval_ms: Option<u64>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            broker_session_timeout_ms: DEFAULT_BROKER_SESSION_TIMEOUT_MS,
            producer_id_block_len: DEFAULT_PRODUCER_ID_BLOCK_LEN,
            default_replication_factor: None,
            voters: 1,
            leader_balance_interval_ms: Some(DEFAULT_LEADER_BALANCE_INTERVAL_MS),
        }
    }
}

/// Why the controller refused a request. Nothing was decided when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControllerError {
    #[error(
        "node id {node} is registered with another node UUID (a wiped or foreign node); \
         unregister the old node first"
    )]
    NodeIdInUse { node: NodeId },
    #[error("unknown broker {0}")]
    UnknownBroker(NodeId),
    #[error("stale broker epoch {got} for broker {node} (current {current})")]
    StaleBrokerEpoch {
        node: NodeId,
        got: u64,
        current: u64,
    },
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    #[error("unknown partition {topic:?}/{partition}")]
    UnknownPartition { topic: String, partition: u32 },
    #[error("leader epoch {got} is not the current {current}")]
    FencedLeaderEpoch { got: Epoch, current: Epoch },
    #[error("node {node} is not the leader of the partition")]
    NotLeader { node: NodeId },
    #[error("fenced broker {0} cannot join an ISR")]
    FencedBroker(NodeId),
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error("invalid topic name {0:?}: 1-249 of [a-zA-Z0-9._-], not '.' or '..', not reserved, not equal to another topic's but for '.' and '_'")]
    InvalidTopicName(String),
    #[error("invalid partition count: {0}")]
    InvalidPartitions(&'static str),
    #[error("invalid topic config: {0}")]
    InvalidConfig(&'static str),
    /// Internal topics (names starting with `__`) belong to the broker.
    #[error("topic {0:?} is internal and cannot be deleted")]
    InternalTopic(String),
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// Decommissioning would leave fewer brokers than a partition's replication factor.
    #[error("{0}")]
    CannotDecommission(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterRequest {
    pub node: NodeId,
    pub node_uuid: u128,
    pub rpc: Endpoint,
    pub kafka: Endpoint,
    pub shards: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatRequest {
    pub node: NodeId,
    pub broker_epoch: u64,
    /// The broker has applied the metadata log past its own registration and may serve: it
    /// asks to be unfenced. `true` asks to be fenced (a controlled shutdown).
    pub want_fence: bool,
}

/// The leader of a partition reporting its in-sync replicas (Kafka's AlterPartition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlterIsrRequest {
    pub topic: String,
    pub partition: u32,
    pub leader: NodeId,
    pub leader_epoch: Epoch,
    pub isr: Vec<NodeId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateTopicRequest {
    pub name: String,
    /// Chosen by the caller (random); the controller reads no randomness.
    pub topic_id: u128,
    pub partitions: usize,
    /// `None`: the cluster default (three, or every live broker of a smaller cluster).
    pub replication_factor: Option<usize>,
    pub configs: Vec<(String, String)>,
}

pub struct ActiveController {
    cfg: ControllerConfig,
    state: MetadataState,
    last_heartbeat_ms: BTreeMap<NodeId, u64>,
    /// When the leader balancer runs next: a full interval after activation, so brokers
    /// restarting with a controller failover are back in their ISRs first.
    next_balance_ms: Option<u64>,
}

impl ActiveController {
    /// Starts from the committed state; every known broker gets a full session from `now_ms`.
    pub fn new(cfg: ControllerConfig, committed: MetadataState, now_ms: u64) -> Self {
        assert!(
            cfg.producer_id_block_len > 0 && cfg.producer_id_block_len <= MAX_PRODUCER_ID_BLOCK_LEN
        );
        let last_heartbeat_ms = committed.brokers.keys().map(|&n| (n, now_ms)).collect();
        ActiveController {
            next_balance_ms: cfg
                .leader_balance_interval_ms
                .map(|i| now_ms.saturating_add(i)),
            cfg,
            state: committed,
            last_heartbeat_ms,
        }
    }

    /// The nodes of the cluster as far as the default replication factor goes: registered
    /// brokers, fenced or not, and at least every voter.
    fn cluster_nodes(&self) -> usize {
        self.state.brokers.len().max(self.cfg.voters)
    }

    /// The committed state plus everything this controller decided since.
    pub fn state(&self) -> &MetadataState {
        &self.state
    }

    /// Applies a decided record to the local state and adds it to the batch. Every record is
    /// checked before it is built, so a refusal here is a bug in this module.
    fn push(&mut self, out: &mut Vec<Record>, record: Record) {
        if let Err(e) = self.state.apply(&record) {
            panic!("active controller built a record its state refuses: {e}: {record:?}");
        }
        out.push(record);
    }

    pub fn register(
        &mut self,
        req: RegisterRequest,
        now_ms: u64,
    ) -> Result<Vec<Record>, ControllerError> {
        if req.shards == 0 || req.shards > MAX_SHARDS_PER_BROKER {
            return Err(ControllerError::Invalid("shard count out of range"));
        }
        if req.node > MAX_NODE_ID || req.node_uuid == 0 {
            return Err(ControllerError::Invalid(
                "node id above the Kafka range (int32) or zero node UUID",
            ));
        }
        if [&req.rpc, &req.kafka]
            .iter()
            .any(|e| e.host.is_empty() || e.host.len() > MAX_HOST_BYTES)
        {
            return Err(ControllerError::Invalid("endpoint host length"));
        }
        let mut out = Vec::new();
        if let Some(b) = self.state.brokers.get(&req.node) {
            if b.node_uuid != req.node_uuid {
                return Err(ControllerError::NodeIdInUse { node: req.node });
            }
            if req.shards < b.shards {
                let used = self
                    .state
                    .topics
                    .values()
                    .flat_map(|t| t.partitions.iter())
                    .flat_map(|p| p.replicas.iter())
                    .any(|r| r.node == req.node && r.shard >= req.shards);
                if used {
                    return Err(ControllerError::Invalid(
                        "fewer shards than the replicas placed on this node",
                    ));
                }
            }
            // The old incarnation may have lost unflushed data: it leaves every ISR it can
            // and leads nothing until it registers, catches up and is unfenced again.
            self.move_off(req.node, &mut out);
        }
        let reg = BrokerRegistration {
            node: req.node,
            node_uuid: req.node_uuid,
            broker_epoch: self.state.last_broker_epoch + 1,
            rpc: req.rpc,
            kafka: req.kafka,
            shards: req.shards,
        };
        self.push(&mut out, Record::RegisterBroker(reg));
        self.last_heartbeat_ms.insert(req.node, now_ms);
        Ok(out)
    }

    /// Returns the records to propose and whether the broker is fenced once they apply.
    pub fn heartbeat(
        &mut self,
        req: HeartbeatRequest,
        now_ms: u64,
    ) -> Result<(Vec<Record>, bool), ControllerError> {
        let b = self.broker_at(req.node, req.broker_epoch)?;
        let fenced = b.fenced;
        self.last_heartbeat_ms.insert(req.node, now_ms);
        let mut out = Vec::new();
        if fenced && !req.want_fence {
            self.push(
                &mut out,
                Record::UnfenceBroker {
                    node: req.node,
                    broker_epoch: req.broker_epoch,
                },
            );
        } else if !fenced && req.want_fence {
            self.fence(req.node, &mut out);
        }
        Ok((out, self.state.brokers[&req.node].fenced))
    }

    /// The controller was not running for `ms` (its thread held): no broker's session counts
    /// that time, since heartbeats sent meanwhile have not been read yet.
    pub fn extend_sessions(&mut self, ms: u64) {
        for t in self.last_heartbeat_ms.values_mut() {
            *t = t.saturating_add(ms);
        }
    }

    /// Fences every live broker whose session expired at `now_ms`, dropping its leadership.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Record> {
        let timeout = self.cfg.broker_session_timeout_ms;
        let expired: Vec<NodeId> = self
            .state
            .brokers
            .iter()
            .filter(|(n, b)| {
                !b.fenced
                    && self
                        .last_heartbeat_ms
                        .get(n)
                        .is_none_or(|&t| now_ms.saturating_sub(t) >= timeout)
            })
            .map(|(&n, _)| n)
            .collect();
        let mut out = Vec::new();
        for node in expired {
            tracing::info!(node, "broker session expired: fencing");
            self.fence(node, &mut out);
        }
        out
    }

    /// The leader balancer, when its interval has passed at `now_ms` (else nothing): a wish
    /// for every partition whose preferred replica could lead but does not
    /// ([`leadership::balance_wishes`]).
    pub fn balance_leaders(&mut self, now_ms: u64) -> Vec<Record> {
        let (Some(at), Some(interval)) =
            (self.next_balance_ms, self.cfg.leader_balance_interval_ms)
        else {
            return Vec::new();
        };
        if now_ms < at {
            return Vec::new();
        }
        self.next_balance_ms = Some(now_ms.saturating_add(interval));
        let mut out = Vec::new();
        for r in leadership::balance_wishes(&self.state) {
            self.push(&mut out, r);
        }
        if !out.is_empty() {
            tracing::info!(
                moves = out.len(),
                "leader balancer: moving leaders to preferred replicas"
            );
        }
        out
    }

    /// A preferred-leader election (Kafka's ElectLeaders, PREFERRED): a wish naming the
    /// preferred replica for each partition of `partitions` whose preferred replica could lead
    /// but does not and has no such wish yet. The others are left as they are (the requester
    /// tells its client why, from [`leadership::preferred_election`] on the applied state), so
    /// asking again changes nothing.
    pub fn elect_preferred(
        &mut self,
        partitions: &[(String, u32)],
    ) -> Result<Vec<Record>, ControllerError> {
        if partitions.len() > MAX_PARTITIONS_PER_ELECTION {
            return Err(ControllerError::Invalid(
                "too many partitions in one election",
            ));
        }
        let mut out = Vec::new();
        for (topic, partition) in partitions {
            let outcome = leadership::preferred_election(&self.state, topic, *partition);
            if let PreferredElection::Eligible(leader) = outcome {
                if self.state.leader_wish(topic, *partition) != Some(leader) {
                    let record = Record::ElectLeader {
                        topic: topic.clone(),
                        partition: *partition,
                        leader,
                    };
                    self.push(&mut out, record);
                }
            }
        }
        Ok(out)
    }

    /// Maintenance mode of broker `node`, on or off. On: its partition leaders hand leadership
    /// to other in-sync replicas and nothing elects it; one broker at a time (two would leave
    /// a replication factor of 3 with a single leader candidate). Setting what is already set
    /// records nothing.
    pub fn set_maintenance(
        &mut self,
        node: NodeId,
        on: bool,
    ) -> Result<Vec<Record>, ControllerError> {
        if !self.state.brokers.contains_key(&node) {
            return Err(ControllerError::UnknownBroker(node));
        }
        if self.state.maintenance.contains(&node) == on {
            return Ok(Vec::new());
        }
        if on && !self.state.maintenance.is_empty() {
            return Err(ControllerError::Invalid(
                "another broker is in maintenance mode: turn it off first (one broker at a time)",
            ));
        }
        tracing::info!(node, on, "broker maintenance mode (operator request)");
        let mut out = Vec::new();
        self.push(&mut out, Record::SetMaintenance { node, on });
        Ok(out)
    }

    /// Decommissioning of broker `node`, on or off. On is refused while the live brokers not
    /// being decommissioned, without this one, are fewer than the replication factor of a
    /// partition it (or another decommissioning broker) holds; the moves themselves are
    /// planned on the tick ([`Self::drain_decommissioned`]). Off stops new moves; moves
    /// already recorded run to their end. Setting what is already set records nothing.
    pub fn set_decommission(
        &mut self,
        node: NodeId,
        on: bool,
    ) -> Result<Vec<Record>, ControllerError> {
        if !self.state.brokers.contains_key(&node) {
            return Err(ControllerError::UnknownBroker(node));
        }
        if self.state.decommissioning.contains(&node) == on {
            return Ok(Vec::new());
        }
        if on {
            decommission::check_request(&self.state, node)
                .map_err(ControllerError::CannotDecommission)?;
        }
        tracing::info!(node, on, "broker decommission (operator request)");
        let mut out = Vec::new();
        self.push(&mut out, Record::SetDecommission { node, on });
        Ok(out)
    }

    /// The next moves draining decommissioning brokers, as old ones finish
    /// ([`decommission::plan_moves`]): nothing when no broker is being decommissioned or the
    /// moves under way are at the cap.
    pub fn drain_decommissioned(&mut self) -> Vec<Record> {
        let mut out = Vec::new();
        for r in decommission::plan_moves(&self.state) {
            if let Record::Reassign {
                topic,
                partition,
                target,
            } = &r
            {
                tracing::info!(%topic, partition, ?target, "decommission: moving a replica off");
            }
            self.push(&mut out, r);
        }
        out
    }

    /// Moves of partitions' replicas (Kafka's AlterPartitionReassignments): for each
    /// `(topic, partition, target)` a [`Record::Reassign`] to the target nodes (new replicas get
    /// a shard by load), or a cancel for `None`. A partition the request refuses
    /// ([`reassignment::check_request`]; the requester tells its client why, from the applied
    /// state), a target already recorded, or a cancel of a partition not moving records nothing,
    /// so asking again changes nothing.
    pub fn reassign(
        &mut self,
        moves: &[(String, u32, Option<Vec<NodeId>>)],
    ) -> Result<Vec<Record>, ControllerError> {
        if moves.len() > reassignment::MAX_PARTITIONS_PER_REASSIGNMENT {
            return Err(ControllerError::Invalid(
                "too many partitions in one reassignment",
            ));
        }
        let mut out = Vec::new();
        for (topic, partition, target) in moves {
            if reassignment::check_request(&self.state, topic, *partition, target.as_deref())
                .is_err()
            {
                continue;
            }
            let record = match target {
                None => Record::Reassign {
                    topic: topic.clone(),
                    partition: *partition,
                    target: None,
                },
                Some(nodes) => {
                    let target = reassignment::assign_shards(&self.state, topic, *partition, nodes);
                    let p = self.state.partition(topic, *partition).expect("checked");
                    let unchanged = match self.state.reassignment(topic, *partition) {
                        Some(r) => r.target == target,
                        None => p.replicas == target,
                    };
                    if unchanged {
                        continue;
                    }
                    Record::Reassign {
                        topic: topic.clone(),
                        partition: *partition,
                        target: Some(target),
                    }
                }
            };
            tracing::info!(%topic, partition, ?target, "partition reassignment (operator request)");
            self.push(&mut out, record);
        }
        Ok(out)
    }

    /// The leader `node` of `topic`/`partition` reports that its group's voters are the
    /// move's target `replicas`: the move ends. A repeat after the end records nothing; a
    /// report for another target (the move changed meanwhile) or from a node that is not the
    /// recorded leader is refused.
    pub fn finish_reassignment(
        &mut self,
        node: NodeId,
        topic: &str,
        partition: u32,
        replicas: &[NodeId],
    ) -> Result<Vec<Record>, ControllerError> {
        let Some(p) = self.state.partition(topic, partition) else {
            return Err(ControllerError::UnknownPartition {
                topic: topic.to_string(),
                partition,
            });
        };
        let Some(r) = self.state.reassignment(topic, partition) else {
            let done = p
                .replicas
                .iter()
                .map(|r| r.node)
                .eq(replicas.iter().copied());
            return if done {
                Ok(Vec::new())
            } else {
                Err(ControllerError::Invalid("no such reassignment under way"))
            };
        };
        if r.target_nodes() != replicas {
            return Err(ControllerError::Invalid(
                "the reassignment's target changed",
            ));
        }
        if p.leader != Some(node) {
            return Err(ControllerError::NotLeader { node });
        }
        tracing::info!(%topic, partition, ?replicas, "partition reassignment finished");
        let mut out = Vec::new();
        self.push(
            &mut out,
            Record::FinishReassignment {
                topic: topic.to_string(),
                partition,
                replicas: replicas.to_vec(),
            },
        );
        Ok(out)
    }

    /// An operator declared `node` gone (its disk wiped): it leaves every ISR, even as the last
    /// member, and its id may then register with a new UUID.
    pub fn unregister(&mut self, node: NodeId) -> Result<Vec<Record>, ControllerError> {
        let b = self
            .state
            .brokers
            .get(&node)
            .ok_or(ControllerError::UnknownBroker(node))?;
        let mut out = Vec::new();
        if !b.fenced {
            self.fence(node, &mut out);
        }
        for (topic, partition, p) in self.partitions_where(|p| p.isr.contains(&node)) {
            let isr: Vec<NodeId> = p.isr.iter().copied().filter(|&n| n != node).collect();
            assert_ne!(p.leader, Some(node), "a fenced broker leads");
            let leader = p.leader.filter(|l| isr.contains(l));
            self.push(
                &mut out,
                Record::PartitionChange {
                    topic,
                    partition,
                    leader,
                    leader_epoch: p.leader_epoch,
                    isr,
                },
            );
        }
        self.push(&mut out, Record::UnregisterBroker { node });
        self.last_heartbeat_ms.remove(&node);
        Ok(out)
    }

    /// A partition group's leader reports its leadership and in-sync voters (Kafka's
    /// AlterPartition). The group's own election decides who leads; the controller records it:
    /// a report in a newer epoch installs its sender as leader, one in the current epoch changes
    /// the ISR (or reinstates a leader the controller moved off when fencing its broker, since
    /// one epoch has one leader). Older epochs and other senders are refused.
    pub fn alter_isr(&mut self, req: AlterIsrRequest) -> Result<Vec<Record>, ControllerError> {
        let p = self
            .state
            .partition(&req.topic, req.partition)
            .ok_or_else(|| ControllerError::UnknownPartition {
                topic: req.topic.clone(),
                partition: req.partition,
            })?;
        if req.leader_epoch < p.leader_epoch {
            return Err(ControllerError::FencedLeaderEpoch {
                got: req.leader_epoch,
                current: p.leader_epoch,
            });
        }
        if req.leader_epoch == p.leader_epoch && p.leader.is_some_and(|l| l != req.leader) {
            return Err(ControllerError::NotLeader { node: req.leader });
        }
        // The epoch's leader was dropped (fenced): only it may be reinstated in that epoch.
        let key = (req.topic.clone(), req.partition);
        if let Some(&(epoch, l)) = self.state.epoch_leaders.get(&key) {
            if req.leader_epoch == epoch && l != req.leader {
                return Err(ControllerError::NotLeader { node: req.leader });
            }
        }
        if !p.has_replica(req.leader) {
            return Err(ControllerError::NotLeader { node: req.leader });
        }
        if !req.isr.contains(&req.leader) {
            return Err(ControllerError::Invalid("the ISR must hold its leader"));
        }
        for (i, &n) in req.isr.iter().enumerate() {
            if !p.has_replica(n) || req.isr[..i].contains(&n) {
                return Err(ControllerError::Invalid(
                    "ISR members must be distinct replicas",
                ));
            }
        }
        if !self.state.is_live(req.leader) {
            return Err(ControllerError::FencedBroker(req.leader));
        }
        // A fenced broker does not join an ISR (KIP-841), but the rest of the report stands:
        // refusing it whole would also refuse the leadership it reports, and a leader that
        // still hears a follower the controller has fenced (a one-way cut) would stay unknown
        // to clients for as long as that lasts. The leader reports again while the record
        // differs from its view; an unchanged record is not written again.
        let isr: Vec<NodeId> = req
            .isr
            .iter()
            .copied()
            .filter(|&n| n == req.leader || p.isr.contains(&n) || self.state.is_live(n))
            .collect();
        if p.leader == Some(req.leader) && p.leader_epoch == req.leader_epoch && p.isr == isr {
            return Ok(Vec::new());
        }
        let record = Record::PartitionChange {
            topic: req.topic,
            partition: req.partition,
            leader: Some(req.leader),
            leader_epoch: req.leader_epoch,
            isr,
        };
        let mut out = Vec::new();
        self.push(&mut out, record);
        Ok(out)
    }

    pub fn create_topic(
        &mut self,
        req: CreateTopicRequest,
    ) -> Result<Vec<Record>, ControllerError> {
        // `__consumer_offsets` is created by the brokers' group coordinators (clients'
        // CreateTopics of reserved names are refused by the Kafka layer before this).
        if check_topic_name(&req.name).is_err()
            || (is_reserved_topic_name(&req.name) && req.name != CONSUMER_OFFSETS_TOPIC)
        {
            return Err(ControllerError::InvalidTopicName(req.name));
        }
        if self.state.topics.contains_key(&req.name) {
            return Err(ControllerError::TopicExists(req.name));
        }
        if req.name.contains(['.', '_'])
            && self
                .state
                .topics
                .keys()
                .any(|t| topic_names_collide(t, &req.name))
        {
            return Err(ControllerError::InvalidTopicName(req.name));
        }
        if req.topic_id == 0
            || self
                .state
                .topics
                .values()
                .any(|t| t.topic_id == req.topic_id)
        {
            return Err(ControllerError::Invalid("topic id zero or in use"));
        }
        check_configs(&req.configs)?;
        let mut placer = Placer::from_state(&self.state);
        let rf = req
            .replication_factor
            .or(self.cfg.default_replication_factor)
            .unwrap_or_else(|| default_replication_factor(self.cluster_nodes()));
        let partitions = placer
            .place(req.partitions, rf)?
            .into_iter()
            .map(fresh_partition)
            .collect();
        let mut out = Vec::new();
        self.push(
            &mut out,
            Record::CreateTopic {
                name: req.name,
                topic_id: req.topic_id,
                configs: req.configs,
                partitions,
            },
        );
        Ok(out)
    }

    /// Grows `topic` to `total` partitions, placed like a new topic's, with its replication
    /// factor.
    pub fn create_partitions(
        &mut self,
        topic: &str,
        total: usize,
    ) -> Result<Vec<Record>, ControllerError> {
        let t = self
            .state
            .topics
            .get(topic)
            .ok_or_else(|| ControllerError::UnknownTopic(topic.to_string()))?;
        let have = t.partitions.len();
        if total <= have || total > MAX_PARTITIONS_PER_TOPIC {
            return Err(ControllerError::InvalidPartitions(
                "the new partition count must exceed the current one and stay within the limit",
            ));
        }
        let rf = t.partitions[0].replicas.len();
        let partitions = Placer::from_state(&self.state)
            .place(total - have, rf)?
            .into_iter()
            .map(fresh_partition)
            .collect();
        let mut out = Vec::new();
        self.push(
            &mut out,
            Record::CreatePartitions {
                name: topic.to_string(),
                partitions,
            },
        );
        Ok(out)
    }

    pub fn set_topic_config(
        &mut self,
        topic: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<Vec<Record>, ControllerError> {
        let t = self
            .state
            .topics
            .get(topic)
            .ok_or_else(|| ControllerError::UnknownTopic(topic.to_string()))?;
        if value.is_some()
            && !t.configs.contains_key(key)
            && t.configs.len() >= MAX_CONFIGS_PER_TOPIC
        {
            return Err(ControllerError::InvalidConfig("too many topic configs"));
        }
        check_config(key, value.unwrap_or(""))?;
        let mut out = Vec::new();
        self.push(
            &mut out,
            Record::SetTopicConfig {
                topic: topic.to_string(),
                key: key.to_string(),
                value: value.map(str::to_string),
            },
        );
        Ok(out)
    }

    /// Sets or removes each key of `changes` as one decision (all or nothing).
    pub fn set_topic_configs(
        &mut self,
        topic: &str,
        changes: &[(String, Option<String>)],
    ) -> Result<Vec<Record>, ControllerError> {
        if changes.len() > MAX_CONFIG_CHANGES_PER_CALL {
            return Err(ControllerError::InvalidConfig("too many config changes"));
        }
        self.dry_run(|c| {
            for (k, v) in changes {
                c.set_topic_config(topic, k, v.as_deref())?;
            }
            Ok(())
        })?;
        let mut out = Vec::with_capacity(changes.len());
        for (k, v) in changes {
            out.extend(self.set_topic_config(topic, k, v.as_deref())?);
        }
        Ok(out)
    }

    /// Deletes `topic`; internal (`__`-prefixed) topics are refused.
    pub fn delete_topic(&mut self, topic: &str) -> Result<Vec<Record>, ControllerError> {
        if topic.starts_with(INTERNAL_TOPIC_PREFIX) {
            return Err(ControllerError::InternalTopic(topic.to_string()));
        }
        let t = self
            .state
            .topics
            .get(topic)
            .ok_or_else(|| ControllerError::UnknownTopic(topic.to_string()))?;
        let record = Record::DeleteTopic {
            name: topic.to_string(),
            topic_id: t.topic_id,
        };
        let mut out = Vec::new();
        self.push(&mut out, record);
        Ok(out)
    }

    /// Runs a decision for its answer only (validate_only): the state is put back after it.
    pub fn dry_run<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, ControllerError>,
    ) -> Result<T, ControllerError> {
        let saved = self.state.clone();
        let out = f(self);
        self.state = saved;
        out
    }

    /// Hands the broker the next block of producer ids: `(first, len)` and the record.
    pub fn allocate_producer_ids(
        &mut self,
        node: NodeId,
        broker_epoch: u64,
    ) -> Result<(Vec<Record>, u64, u32), ControllerError> {
        self.broker_at(node, broker_epoch)?;
        let first = self.state.next_producer_id;
        let len = self.cfg.producer_id_block_len;
        if first.saturating_add(u64::from(len)) > i64::MAX as u64 {
            return Err(ControllerError::Invalid("producer ids exhausted"));
        }
        let mut out = Vec::new();
        self.push(&mut out, Record::ProducerIdBlock { node, first, len });
        Ok((out, first, len))
    }

    fn broker_at(
        &self,
        node: NodeId,
        broker_epoch: u64,
    ) -> Result<&crate::controller::state::BrokerInfo, ControllerError> {
        let b = self
            .state
            .brokers
            .get(&node)
            .ok_or(ControllerError::UnknownBroker(node))?;
        if b.broker_epoch != broker_epoch {
            return Err(ControllerError::StaleBrokerEpoch {
                node,
                got: broker_epoch,
                current: b.broker_epoch,
            });
        }
        Ok(b)
    }

    fn fence(&mut self, node: NodeId, out: &mut Vec<Record>) {
        self.move_off(node, out);
        let broker_epoch = self.state.brokers[&node].broker_epoch;
        if !self.state.brokers[&node].fenced {
            self.push(out, Record::FenceBroker { node, broker_epoch });
        }
    }

    /// Takes `node` out of every ISR (but never empties one: the last in-sync replica stays, so
    /// no replica that may lack acknowledged data is ever listed as in sync) and marks the
    /// partitions it led leaderless. Choosing the next leader is the partition group's
    /// election; its winner reports with a newer epoch ([`Self::alter_isr`]).
    fn move_off(&mut self, node: NodeId, out: &mut Vec<Record>) {
        let affected = self.partitions_where(|p| p.isr.contains(&node) || p.leader == Some(node));
        for (topic, partition, p) in affected {
            let mut isr: Vec<NodeId> = p.isr.iter().copied().filter(|&n| n != node).collect();
            if isr.is_empty() {
                isr = p.isr.clone();
            }
            let leader = p.leader.filter(|&l| l != node);
            if isr == p.isr && leader == p.leader {
                continue;
            }
            self.push(
                out,
                Record::PartitionChange {
                    topic,
                    partition,
                    leader,
                    leader_epoch: p.leader_epoch,
                    isr,
                },
            );
        }
    }

    fn partitions_where(
        &self,
        pred: impl Fn(&PartitionState) -> bool,
    ) -> Vec<(String, u32, PartitionState)> {
        self.state
            .topics
            .iter()
            .flat_map(|(name, t)| {
                t.partitions
                    .iter()
                    .enumerate()
                    .map(move |(i, p)| (name, i as u32, p))
            })
            .filter(|(_, _, p)| pred(p))
            .map(|(n, i, p)| (n.clone(), i, p.clone()))
            .collect()
    }
}

fn fresh_partition(replicas: Vec<crate::controller::records::ReplicaAssignment>) -> PartitionState {
    PartitionState {
        isr: replicas.iter().map(|r| r.node).collect(),
        leader: replicas.first().map(|r| r.node),
        leader_epoch: 0,
        replicas,
    }
}

fn check_config(key: &str, value: &str) -> Result<(), ControllerError> {
    if key.is_empty() || key.len() > MAX_CONFIG_KEY_BYTES || value.len() > MAX_CONFIG_VALUE_BYTES {
        return Err(ControllerError::InvalidConfig("config key or value length"));
    }
    Ok(())
}

fn check_configs(configs: &[(String, String)]) -> Result<(), ControllerError> {
    if configs.len() > MAX_CONFIGS_PER_TOPIC {
        return Err(ControllerError::InvalidConfig("too many topic configs"));
    }
    for (i, (k, v)) in configs.iter().enumerate() {
        check_config(k, v)?;
        if configs[..i].iter().any(|(o, _)| o == k) {
            return Err(ControllerError::InvalidConfig("duplicate config key"));
        }
    }
    Ok(())
}
