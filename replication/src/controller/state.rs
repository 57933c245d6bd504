//! The metadata every node holds: the result of applying the committed metadata log in order.
//!
//! [`MetadataState::apply`] is deterministic: the same records in the same order give the same
//! state and the same effects on every node. A record that does not fit the state (which the
//! controller never proposes, so it means a bug or a damaged log) is refused with an error and
//! changes nothing; every node refuses it the same way.

use std::collections::{BTreeMap, BTreeSet};

use crate::controller::reassignment::{same_nodes, union_replicas, Reassignment};
use crate::controller::records::{
    BrokerRegistration, Endpoint, PartitionState, Record, RecordBatch, ReplicaAssignment,
    MAX_CONFIG_KEY_BYTES, MAX_NODE_ID, MAX_PARTITIONS_PER_TOPIC, MAX_PRODUCER_ID_BLOCK_LEN,
    MAX_REPLICAS_PER_PARTITION, MAX_SHARDS_PER_BROKER, MAX_TOPIC_NAME_BYTES,
};
use crate::types::{Epoch, NodeId};

/// A broker as the metadata log knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerInfo {
    pub node_uuid: u128,
    pub broker_epoch: u64,
    pub rpc: Endpoint,
    pub kafka: Endpoint,
    pub shards: u32,
    /// A fenced broker leads no partition and is in no new ISR.
    pub fenced: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub topic_id: u128,
    pub configs: BTreeMap<String, String>,
    pub partitions: Vec<PartitionState>,
}

/// What applying a record changed, for the node to act on (open or close replicas, refresh
/// caches, hand producer ids to a shard).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    BrokerRegistered {
        node: NodeId,
        broker_epoch: u64,
    },
    BrokerFenced {
        node: NodeId,
    },
    BrokerUnfenced {
        node: NodeId,
    },
    BrokerUnregistered {
        node: NodeId,
    },
    TopicCreated {
        topic: String,
        partitions: u32,
    },
    PartitionsCreated {
        topic: String,
        from: u32,
        to: u32,
    },
    PartitionChanged {
        topic: String,
        partition: u32,
        leader: Option<NodeId>,
        leader_epoch: Epoch,
    },
    TopicConfigChanged {
        topic: String,
        key: String,
    },
    ProducerIdsGranted {
        node: NodeId,
        first: u64,
        len: u32,
    },
    TopicDeleted {
        topic: String,
        topic_id: u128,
    },
    /// Leadership of the partition should move to `leader` (its current leader acts on it).
    LeaderWished {
        topic: String,
        partition: u32,
        leader: NodeId,
    },
    MaintenanceChanged {
        node: NodeId,
        on: bool,
    },
    DecommissionChanged {
        node: NodeId,
        on: bool,
    },
    /// A move of the partition's replicas started, changed or was cancelled (its replicas are
    /// now the union while it runs).
    ReassignmentChanged {
        topic: String,
        partition: u32,
    },
    /// The move ended: the partition's replicas are its target.
    ReassignmentFinished {
        topic: String,
        partition: u32,
        replicas: Vec<NodeId>,
    },
}

impl Effect {
    /// Whether the record may change what a node hosts, mirrors or dials: topics, partitions,
    /// replicas and their shards, configs, moves, brokers' registrations. Leadership, ISR,
    /// fencing, wishes, modes and producer-id blocks do not, and they are nearly every record
    /// in a burst of leader reports: a node's hosting plan and topic mirror (a pass over every
    /// partition) are rebuilt only after a record that does.
    pub fn changes_placement(&self) -> bool {
        !matches!(
            self,
            Effect::PartitionChanged { .. }
                | Effect::BrokerFenced { .. }
                | Effect::BrokerUnfenced { .. }
                | Effect::ProducerIdsGranted { .. }
                | Effect::LeaderWished { .. }
                | Effect::MaintenanceChanged { .. }
                | Effect::DecommissionChanged { .. }
        )
    }
}

/// Why a record was refused. The state is unchanged when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("unknown broker {0}")]
    UnknownBroker(NodeId),
    #[error("broker {node} is registered with another node UUID")]
    UuidMismatch { node: NodeId },
    #[error("broker epoch {got} of broker {node} is stale (current {current})")]
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
    #[error("invalid record: {0}")]
    Invalid(&'static str),
    #[error("producer id block starting at {first} does not follow the last one (next {next})")]
    ProducerIdGap { first: u64, next: u64 },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataState {
    pub brokers: BTreeMap<NodeId, BrokerInfo>,
    pub topics: BTreeMap<String, TopicInfo>,
    /// The highest broker epoch ever handed out: a new registration gets a higher one.
    pub last_broker_epoch: u64,
    /// The first producer id not yet handed out; blocks are granted from here up.
    pub next_producer_id: u64,
    /// Partitions whose leadership should move, and where to (`Record::ElectLeader`): the
    /// current leader transfers to it. An entry goes when that node leads, when it is fenced or
    /// put in maintenance, and with its topic.
    pub leader_wishes: BTreeMap<(String, u32), NodeId>,
    /// Brokers in maintenance mode: they lead nothing that another in-sync replica can lead.
    pub maintenance: BTreeSet<NodeId>,
    /// The last elected leader of each partition and its epoch, kept when fencing drops the
    /// leader: within that epoch only it may be reinstated (one epoch, one leader), which the
    /// partition's own `leader` cannot say once it is `None`. Derived from the records.
    pub epoch_leaders: BTreeMap<(String, u32), (Epoch, NodeId)>,
    /// Partitions whose replicas are moving (`Record::Reassign`), until their leader reports
    /// the end (`Record::FinishReassignment`); they go with their topic.
    pub reassignments: BTreeMap<(String, u32), Reassignment>,
    /// Brokers being decommissioned (`Record::SetDecommission`): the active controller moves
    /// their replicas away; nothing places a replica on them or chooses them to lead.
    pub decommissioning: BTreeSet<NodeId>,
}

impl MetadataState {
    pub fn new() -> Self {
        MetadataState::default()
    }

    pub fn partition(&self, topic: &str, partition: u32) -> Option<&PartitionState> {
        self.topics
            .get(topic)
            .and_then(|t| t.partitions.get(partition as usize))
    }

    pub fn is_live(&self, node: NodeId) -> bool {
        self.brokers.get(&node).is_some_and(|b| !b.fenced)
    }

    /// A node elections and the balancer may choose: live, not in maintenance and not being
    /// decommissioned.
    pub fn is_leader_candidate(&self, node: NodeId) -> bool {
        self.is_live(node) && !self.is_draining(node)
    }

    /// Whether `node`'s leaderships should move to other replicas: it is in maintenance mode
    /// or being decommissioned.
    pub fn is_draining(&self, node: NodeId) -> bool {
        self.maintenance.contains(&node) || self.decommissioning.contains(&node)
    }

    /// Brokers that may receive new replicas (placement of new topics and partitions,
    /// decommission targets, rebalance): unfenced and not being decommissioned, in id order,
    /// with their shard counts.
    pub fn placement_brokers(&self) -> Vec<(NodeId, u32)> {
        self.brokers
            .iter()
            .filter(|(n, b)| !b.fenced && !self.decommissioning.contains(n))
            .map(|(&n, b)| (n, b.shards))
            .collect()
    }

    /// The node leadership of `topic`/`partition` should move to, if any.
    pub fn leader_wish(&self, topic: &str, partition: u32) -> Option<NodeId> {
        if self.leader_wishes.is_empty() {
            return None;
        }
        self.leader_wishes
            .get(&(topic.to_string(), partition))
            .copied()
    }

    /// The move under way of `topic`/`partition`, if any.
    pub fn reassignment(&self, topic: &str, partition: u32) -> Option<&Reassignment> {
        if self.reassignments.is_empty() {
            return None;
        }
        self.reassignments.get(&(topic.to_string(), partition))
    }

    fn drop_wishes_for(&mut self, node: NodeId) {
        self.leader_wishes.retain(|_, &mut n| n != node);
    }

    /// Unfenced brokers in id order, with their shard counts.
    pub fn live_brokers(&self) -> Vec<(NodeId, u32)> {
        self.brokers
            .iter()
            .filter(|(_, b)| !b.fenced)
            .map(|(&n, b)| (n, b.shards))
            .collect()
    }

    /// Replicas of `p` on fenced or unregistered brokers (Metadata's offline_replicas).
    pub fn offline_replicas(&self, p: &PartitionState) -> Vec<NodeId> {
        p.replicas
            .iter()
            .map(|r| r.node)
            .filter(|&n| !self.is_live(n))
            .collect()
    }

    /// Applies every record of `batch` in order. A refused record stops the batch there: the
    /// records before it stay applied (identically on every node), and the error is returned
    /// with the effects so far.
    pub fn apply_batch(&mut self, batch: &RecordBatch) -> (Vec<Effect>, Result<(), ApplyError>) {
        let mut effects = Vec::with_capacity(batch.records.len());
        for r in &batch.records {
            match self.apply(r) {
                Ok(e) => effects.push(e),
                Err(e) => return (effects, Err(e)),
            }
        }
        (effects, Ok(()))
    }

    /// Applies one record: checks it against the state first, then changes the state.
    pub fn apply(&mut self, record: &Record) -> Result<Effect, ApplyError> {
        match record {
            Record::RegisterBroker(reg) => self.apply_register(reg),
            Record::FenceBroker { node, broker_epoch } => {
                let b = self.broker_at(*node, *broker_epoch)?;
                if b.fenced {
                    return Err(ApplyError::Invalid("broker already fenced"));
                }
                let leads = self
                    .topics
                    .values()
                    .flat_map(|t| t.partitions.iter())
                    .any(|p| p.leader == Some(*node));
                if leads {
                    // The controller moves leadership away before (in the same batch) fencing.
                    return Err(ApplyError::Invalid("fencing a broker that still leads"));
                }
                self.broker_mut(*node).fenced = true;
                self.drop_wishes_for(*node);
                Ok(Effect::BrokerFenced { node: *node })
            }
            Record::UnfenceBroker { node, broker_epoch } => {
                let b = self.broker_at(*node, *broker_epoch)?;
                if !b.fenced {
                    return Err(ApplyError::Invalid("broker not fenced"));
                }
                self.broker_mut(*node).fenced = false;
                Ok(Effect::BrokerUnfenced { node: *node })
            }
            Record::UnregisterBroker { node } => {
                let b = self
                    .brokers
                    .get(node)
                    .ok_or(ApplyError::UnknownBroker(*node))?;
                if !b.fenced {
                    return Err(ApplyError::Invalid("unregistering a live broker"));
                }
                let in_isr = self
                    .topics
                    .values()
                    .flat_map(|t| t.partitions.iter())
                    .any(|p| p.isr.contains(node));
                if in_isr {
                    // Its data may be gone: it must not count as in sync anywhere.
                    return Err(ApplyError::Invalid(
                        "unregistering a broker still in an ISR",
                    ));
                }
                self.brokers.remove(node);
                self.maintenance.remove(node);
                self.decommissioning.remove(node);
                self.drop_wishes_for(*node);
                Ok(Effect::BrokerUnregistered { node: *node })
            }
            Record::CreateTopic {
                name,
                topic_id,
                configs,
                partitions,
            } => {
                check_topic_name(name)?;
                if self.topics.contains_key(name) {
                    return Err(ApplyError::TopicExists(name.clone()));
                }
                if self.topics.values().any(|t| t.topic_id == *topic_id) || *topic_id == 0 {
                    return Err(ApplyError::Invalid("topic id zero or in use"));
                }
                if partitions.is_empty() {
                    return Err(ApplyError::Invalid("a topic needs a partition"));
                }
                for p in partitions {
                    self.check_new_partition(p)?;
                }
                let mut map = BTreeMap::new();
                for (k, v) in configs {
                    check_config_key(k)?;
                    if map.insert(k.clone(), v.clone()).is_some() {
                        return Err(ApplyError::Invalid("duplicate config key"));
                    }
                }
                self.topics.insert(
                    name.clone(),
                    TopicInfo {
                        topic_id: *topic_id,
                        configs: map,
                        partitions: partitions.clone(),
                    },
                );
                Ok(Effect::TopicCreated {
                    topic: name.clone(),
                    partitions: partitions.len() as u32,
                })
            }
            Record::CreatePartitions { name, partitions } => {
                let have = self
                    .topics
                    .get(name)
                    .ok_or_else(|| ApplyError::UnknownTopic(name.clone()))?
                    .partitions
                    .len();
                if partitions.is_empty() || have + partitions.len() > MAX_PARTITIONS_PER_TOPIC {
                    return Err(ApplyError::Invalid("partition count out of range"));
                }
                for p in partitions {
                    self.check_new_partition(p)?;
                }
                let t = self.topics.get_mut(name).expect("checked above");
                t.partitions.extend(partitions.iter().cloned());
                Ok(Effect::PartitionsCreated {
                    topic: name.clone(),
                    from: have as u32,
                    to: t.partitions.len() as u32,
                })
            }
            Record::PartitionChange {
                topic,
                partition,
                leader,
                leader_epoch,
                isr,
            } => {
                let p = self.partition(topic, *partition).ok_or_else(|| {
                    ApplyError::UnknownPartition {
                        topic: topic.clone(),
                        partition: *partition,
                    }
                })?;
                // One epoch has at most one leader (the partition group's Raft term): within an
                // epoch the leader may only be lost (its broker fenced) or reinstated (it
                // reports again), never replaced by another.
                let replaced = matches!((p.leader, *leader), (Some(a), Some(b)) if a != b);
                if *leader_epoch < p.leader_epoch || (replaced && *leader_epoch == p.leader_epoch) {
                    return Err(ApplyError::Invalid(
                        "leader epoch must grow with a new leader",
                    ));
                }
                check_isr(p, isr)?;
                if let Some(l) = leader {
                    if !isr.contains(l) {
                        return Err(ApplyError::Invalid("leader outside the ISR"));
                    }
                    if !self.is_live(*l) {
                        return Err(ApplyError::Invalid("a fenced broker cannot lead"));
                    }
                }
                let p = &mut self
                    .topics
                    .get_mut(topic)
                    .expect("checked above")
                    .partitions[*partition as usize];
                p.leader = *leader;
                p.leader_epoch = *leader_epoch;
                p.isr = isr.clone();
                if let Some(l) = leader {
                    self.epoch_leaders
                        .insert((topic.clone(), *partition), (*leader_epoch, *l));
                }
                if leader.is_some() && self.leader_wish(topic, *partition) == *leader {
                    // The move asked for happened.
                    self.leader_wishes.remove(&(topic.clone(), *partition));
                }
                Ok(Effect::PartitionChanged {
                    topic: topic.clone(),
                    partition: *partition,
                    leader: *leader,
                    leader_epoch: *leader_epoch,
                })
            }
            Record::SetTopicConfig { topic, key, value } => {
                check_config_key(key)?;
                let t = self
                    .topics
                    .get_mut(topic)
                    .ok_or_else(|| ApplyError::UnknownTopic(topic.clone()))?;
                match value {
                    Some(v) => {
                        if !t.configs.contains_key(key)
                            && t.configs.len() >= crate::controller::records::MAX_CONFIGS_PER_TOPIC
                        {
                            return Err(ApplyError::Invalid("too many topic configs"));
                        }
                        t.configs.insert(key.clone(), v.clone());
                    }
                    None => {
                        t.configs.remove(key);
                    }
                }
                Ok(Effect::TopicConfigChanged {
                    topic: topic.clone(),
                    key: key.clone(),
                })
            }
            Record::ProducerIdBlock { node, first, len } => {
                if !self.brokers.contains_key(node) {
                    return Err(ApplyError::UnknownBroker(*node));
                }
                if *first != self.next_producer_id {
                    return Err(ApplyError::ProducerIdGap {
                        first: *first,
                        next: self.next_producer_id,
                    });
                }
                if *len == 0 || *len > MAX_PRODUCER_ID_BLOCK_LEN {
                    return Err(ApplyError::Invalid("producer id block length"));
                }
                // Producer ids are Kafka int64s: stay below i64::MAX.
                let end = first
                    .checked_add(u64::from(*len))
                    .filter(|&e| e <= i64::MAX as u64)
                    .ok_or(ApplyError::Invalid("producer ids exhausted"))?;
                self.next_producer_id = end;
                Ok(Effect::ProducerIdsGranted {
                    node: *node,
                    first: *first,
                    len: *len,
                })
            }
            Record::DeleteTopic { name, topic_id } => {
                let t = self
                    .topics
                    .get(name)
                    .ok_or_else(|| ApplyError::UnknownTopic(name.clone()))?;
                if t.topic_id != *topic_id {
                    return Err(ApplyError::Invalid(
                        "deleting another incarnation of the topic",
                    ));
                }
                self.topics.remove(name);
                self.leader_wishes.retain(|(t, _), _| t != name);
                self.epoch_leaders.retain(|(t, _), _| t != name);
                self.reassignments.retain(|(t, _), _| t != name);
                Ok(Effect::TopicDeleted {
                    topic: name.clone(),
                    topic_id: *topic_id,
                })
            }
            Record::ElectLeader {
                topic,
                partition,
                leader,
            } => {
                let p = self.partition(topic, *partition).ok_or_else(|| {
                    ApplyError::UnknownPartition {
                        topic: topic.clone(),
                        partition: *partition,
                    }
                })?;
                if !p.has_replica(*leader) {
                    return Err(ApplyError::Invalid("wished leader is not a replica"));
                }
                self.leader_wishes
                    .insert((topic.clone(), *partition), *leader);
                Ok(Effect::LeaderWished {
                    topic: topic.clone(),
                    partition: *partition,
                    leader: *leader,
                })
            }
            Record::SetMaintenance { node, on } => {
                if !self.brokers.contains_key(node) {
                    return Err(ApplyError::UnknownBroker(*node));
                }
                if *on {
                    self.maintenance.insert(*node);
                    self.drop_wishes_for(*node);
                } else {
                    self.maintenance.remove(node);
                }
                Ok(Effect::MaintenanceChanged {
                    node: *node,
                    on: *on,
                })
            }
            Record::Reassign {
                topic,
                partition,
                target,
            } => self.apply_reassign(topic, *partition, target.as_deref()),
            Record::FinishReassignment {
                topic,
                partition,
                replicas,
            } => self.apply_finish_reassignment(topic, *partition, replicas),
            Record::SetDecommission { node, on } => {
                if !self.brokers.contains_key(node) {
                    return Err(ApplyError::UnknownBroker(*node));
                }
                if *on {
                    self.decommissioning.insert(*node);
                    self.drop_wishes_for(*node);
                } else {
                    self.decommissioning.remove(node);
                }
                Ok(Effect::DecommissionChanged {
                    node: *node,
                    on: *on,
                })
            }
        }
    }

    fn apply_reassign(
        &mut self,
        topic: &str,
        partition: u32,
        target: Option<&[ReplicaAssignment]>,
    ) -> Result<Effect, ApplyError> {
        let unknown = || ApplyError::UnknownPartition {
            topic: topic.to_string(),
            partition,
        };
        let p = self.partition(topic, partition).ok_or_else(unknown)?;
        let key = (topic.to_string(), partition);
        let running = self.reassignments.get(&key);
        let original = running.map_or_else(|| p.replicas.clone(), |r| r.original.clone());
        let target = match target {
            Some(t) => t.to_vec(),
            None if running.is_some() => original.clone(),
            None => {
                return Err(ApplyError::Invalid(
                    "cancelling a partition that is not moving",
                ))
            }
        };
        if target.is_empty() || target.len() > MAX_REPLICAS_PER_PARTITION {
            return Err(ApplyError::Invalid("reassignment target size out of range"));
        }
        for (i, r) in target.iter().enumerate() {
            let b = self
                .brokers
                .get(&r.node)
                .ok_or(ApplyError::UnknownBroker(r.node))?;
            if r.shard >= b.shards {
                return Err(ApplyError::Invalid("replica on a shard the broker lacks"));
            }
            if target[..i].iter().any(|o| o.node == r.node) {
                return Err(ApplyError::Invalid("two replicas on one node"));
            }
            if p.replicas
                .iter()
                .any(|c| c.node == r.node && c.shard != r.shard)
            {
                return Err(ApplyError::Invalid(
                    "a reassignment moves no replica between shards",
                ));
            }
        }
        let union = union_replicas(&p.replicas, &target);
        if union.len() > MAX_REPLICAS_PER_PARTITION {
            return Err(ApplyError::Invalid("replicas while moving exceed the cap"));
        }
        let nodes = |v: &[ReplicaAssignment]| v.iter().map(|r| r.node).collect::<Vec<_>>();
        // Nothing was ever added: the group's membership is the original one, so a target of
        // the same nodes (a reorder, or a cancel before anything ran) takes effect at once.
        let instant = same_nodes(&nodes(&target), &nodes(&original))
            && same_nodes(&nodes(&p.replicas), &nodes(&original));
        let p = &mut self
            .topics
            .get_mut(topic)
            .expect("checked above")
            .partitions[partition as usize];
        if instant {
            p.replicas = target;
            self.reassignments.remove(&key);
        } else {
            p.replicas = union;
            self.reassignments
                .insert(key, Reassignment { original, target });
        }
        Ok(Effect::ReassignmentChanged {
            topic: topic.to_string(),
            partition,
        })
    }

    fn apply_finish_reassignment(
        &mut self,
        topic: &str,
        partition: u32,
        replicas: &[NodeId],
    ) -> Result<Effect, ApplyError> {
        let key = (topic.to_string(), partition);
        let Some(r) = self.reassignments.get(&key) else {
            return Err(ApplyError::Invalid(
                "finishing a partition that is not moving",
            ));
        };
        if r.target_nodes() != replicas {
            return Err(ApplyError::Invalid(
                "finishing another move than the one recorded",
            ));
        }
        let target = r.target.clone();
        let p = self
            .partition(topic, partition)
            .ok_or_else(|| ApplyError::UnknownPartition {
                topic: topic.to_string(),
                partition,
            })?;
        if p.leader.is_some_and(|l| !replicas.contains(&l)) {
            return Err(ApplyError::Invalid(
                "finishing a move with a leader outside the target",
            ));
        }
        let p = &mut self
            .topics
            .get_mut(topic)
            .expect("checked above")
            .partitions[partition as usize];
        p.replicas = target;
        p.isr.retain(|n| replicas.contains(n));
        self.reassignments.remove(&key);
        if self
            .leader_wish(topic, partition)
            .is_some_and(|w| !replicas.contains(&w))
        {
            self.leader_wishes.remove(&key);
        }
        Ok(Effect::ReassignmentFinished {
            topic: topic.to_string(),
            partition,
            replicas: replicas.to_vec(),
        })
    }

    fn apply_register(&mut self, reg: &BrokerRegistration) -> Result<Effect, ApplyError> {
        if reg.node > MAX_NODE_ID || reg.node_uuid == 0 {
            return Err(ApplyError::Invalid(
                "node id above the Kafka range or zero node UUID",
            ));
        }
        if reg.shards == 0 || reg.shards > MAX_SHARDS_PER_BROKER {
            return Err(ApplyError::Invalid("shard count out of range"));
        }
        if reg.broker_epoch <= self.last_broker_epoch {
            return Err(ApplyError::StaleBrokerEpoch {
                node: reg.node,
                got: reg.broker_epoch,
                current: self.last_broker_epoch,
            });
        }
        if let Some(b) = self.brokers.get(&reg.node) {
            if b.node_uuid != reg.node_uuid {
                return Err(ApplyError::UuidMismatch { node: reg.node });
            }
            let leads = self
                .topics
                .values()
                .flat_map(|t| t.partitions.iter())
                .any(|p| p.leader == Some(reg.node));
            if leads {
                // A new incarnation starts fenced, so the old one's leadership moved first.
                return Err(ApplyError::Invalid(
                    "re-registering a broker that still leads",
                ));
            }
            if reg.shards < b.shards && self.uses_shard_at_or_above(reg.node, reg.shards) {
                return Err(ApplyError::Invalid("fewer shards than the replicas placed"));
            }
        }
        self.last_broker_epoch = reg.broker_epoch;
        self.brokers.insert(
            reg.node,
            BrokerInfo {
                node_uuid: reg.node_uuid,
                broker_epoch: reg.broker_epoch,
                rpc: reg.rpc.clone(),
                kafka: reg.kafka.clone(),
                shards: reg.shards,
                fenced: true,
            },
        );
        Ok(Effect::BrokerRegistered {
            node: reg.node,
            broker_epoch: reg.broker_epoch,
        })
    }

    fn uses_shard_at_or_above(&self, node: NodeId, shards: u32) -> bool {
        self.topics
            .values()
            .flat_map(|t| t.partitions.iter())
            .flat_map(|p| p.replicas.iter())
            .any(|r| r.node == node && r.shard >= shards)
    }

    fn broker_at(&self, node: NodeId, epoch: u64) -> Result<&BrokerInfo, ApplyError> {
        let b = self
            .brokers
            .get(&node)
            .ok_or(ApplyError::UnknownBroker(node))?;
        if b.broker_epoch != epoch {
            return Err(ApplyError::StaleBrokerEpoch {
                node,
                got: epoch,
                current: b.broker_epoch,
            });
        }
        Ok(b)
    }

    fn broker_mut(&mut self, node: NodeId) -> &mut BrokerInfo {
        self.brokers.get_mut(&node).expect("broker checked")
    }

    fn check_new_partition(&self, p: &PartitionState) -> Result<(), ApplyError> {
        if p.replicas.is_empty() || p.replicas.len() > MAX_REPLICAS_PER_PARTITION {
            return Err(ApplyError::Invalid("replica count out of range"));
        }
        for (i, r) in p.replicas.iter().enumerate() {
            let b = self
                .brokers
                .get(&r.node)
                .ok_or(ApplyError::UnknownBroker(r.node))?;
            if r.shard >= b.shards {
                return Err(ApplyError::Invalid("replica on a shard the broker lacks"));
            }
            if p.replicas[..i].iter().any(|o| o.node == r.node) {
                return Err(ApplyError::Invalid("two replicas on one node"));
            }
        }
        check_isr(p, &p.isr)?;
        if let Some(l) = p.leader {
            if !p.isr.contains(&l) || !self.is_live(l) {
                return Err(ApplyError::Invalid("leader not a live in-sync replica"));
            }
        }
        if p.leader_epoch < 0 {
            return Err(ApplyError::Invalid("negative leader epoch"));
        }
        Ok(())
    }
}

fn check_isr(p: &PartitionState, isr: &[NodeId]) -> Result<(), ApplyError> {
    for (i, n) in isr.iter().enumerate() {
        if !p.has_replica(*n) {
            return Err(ApplyError::Invalid("ISR member is not a replica"));
        }
        if isr[..i].contains(n) {
            return Err(ApplyError::Invalid("ISR member twice"));
        }
    }
    Ok(())
}

/// Kafka's rule for topic names: 1-249 of `[a-zA-Z0-9._-]`, not "." or "..".
pub fn check_topic_name(name: &str) -> Result<(), ApplyError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TOPIC_NAME_BYTES
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApplyError::Invalid("topic name"))
    }
}

fn check_config_key(key: &str) -> Result<(), ApplyError> {
    if key.is_empty() || key.len() > MAX_CONFIG_KEY_BYTES {
        return Err(ApplyError::Invalid("config key"));
    }
    Ok(())
}
