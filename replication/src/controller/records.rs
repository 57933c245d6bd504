//! The metadata log's records and their binary encoding.
//!
//! One consensus batch of the metadata log holds one [`RecordBatch`]: the records one controller
//! decision produced (for example a broker's fencing and the leader moves it forces), applied
//! together. The encoding is versioned, big-endian, and decoded with every length and count
//! capped before allocation (see `crate::codec`): a corrupt or hostile batch is an error.

use bytes::{Bytes, BytesMut};

use crate::codec::{DecodeError, Reader, Writer};
use crate::types::{Epoch, NodeId};

/// Bytes one encoded metadata batch may take; bounds what a decoder reads.
pub const MAX_METADATA_BATCH_BYTES: usize = 8 << 20;
/// Records one metadata batch may carry.
pub const MAX_RECORDS_PER_BATCH: usize = 100_000;
/// Records of a decoded batch allocated for before they are read (the count is only a claim).
const PREALLOCATED_RECORDS: usize = 1024;
/// Kafka's limit for topic names.
pub const MAX_TOPIC_NAME_BYTES: usize = 249;
/// A host name or address in an endpoint (DNS names are at most 253 bytes).
pub const MAX_HOST_BYTES: usize = 255;
/// Partitions one topic may have (the broker's `max_partitions_per_topic` default).
pub const MAX_PARTITIONS_PER_TOPIC: usize = 10_000;
/// Replicas of one partition; Kafka has no fixed limit, but a replication factor above this is
/// a typo, and the cap bounds every per-partition list.
pub const MAX_REPLICAS_PER_PARTITION: usize = 16;
/// Shards (cores) one broker may report.
pub const MAX_SHARDS_PER_BROKER: u32 = 1024;
/// Config entries one topic may carry, and the size of a key and a value.
pub const MAX_CONFIGS_PER_TOPIC: usize = 64;
pub const MAX_CONFIG_KEY_BYTES: usize = 255;
pub const MAX_CONFIG_VALUE_BYTES: usize = 4096;
/// The highest node id: Kafka broker ids are non-negative int32s (and `u64::MAX` is "no
/// leader" in this encoding).
pub const MAX_NODE_ID: NodeId = i32::MAX as NodeId;
/// Producer ids one block may hold.
pub const MAX_PRODUCER_ID_BLOCK_LEN: u32 = 1 << 20;

const BATCH_VERSION: u8 = 1;
/// The size `encode_chunked` aims at: well under the cap, small enough to replicate quickly.
pub const TARGET_METADATA_BATCH_BYTES: usize = 1 << 20;

/// A host and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

/// Where one replica of a partition lives: a node, and the shard (core) on it that owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaAssignment {
    pub node: NodeId,
    pub shard: u32,
}

/// One partition's replicas and leadership. The first replica is the preferred leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionState {
    pub replicas: Vec<ReplicaAssignment>,
    pub isr: Vec<NodeId>,
    /// `None`: no replica may lead (every in-sync replica is fenced).
    pub leader: Option<NodeId>,
    pub leader_epoch: Epoch,
}

/// Leader epochs of partition groups start here: an epoch below it is the placement's
/// preferred leader, recorded at creation, not yet elected by the partition's group.
pub const FIRST_ELECTED_EPOCH: Epoch = 1;

impl PartitionState {
    /// The leader its consensus group elected and reported, if any. At creation the state
    /// names the preferred replica in epoch 0 (the controller's placement), but the group
    /// elects its own leader in epoch 1 or later: clients are told of that one only.
    pub fn elected_leader(&self) -> Option<NodeId> {
        self.leader
            .filter(|_| self.leader_epoch >= FIRST_ELECTED_EPOCH)
    }

    pub fn has_replica(&self, node: NodeId) -> bool {
        self.replicas.iter().any(|r| r.node == node)
    }
}

/// A broker's registration: who it is, where it listens, and how many shards it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerRegistration {
    pub node: NodeId,
    /// Created once per data directory: a wiped node comes back with a different one.
    pub node_uuid: u128,
    /// Grows with every registration of the node (a restart registers again); requests from an
    /// older incarnation carry an older epoch and are refused.
    pub broker_epoch: u64,
    pub rpc: Endpoint,
    pub kafka: Endpoint,
    pub shards: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    RegisterBroker(BrokerRegistration),
    /// The broker missed its session (or re-registered); it may lead nothing.
    FenceBroker {
        node: NodeId,
        broker_epoch: u64,
    },
    /// The broker heartbeats and has caught up with the metadata log.
    UnfenceBroker {
        node: NodeId,
        broker_epoch: u64,
    },
    /// An operator declared the node gone (a wiped disk): its id may register with a new UUID.
    UnregisterBroker {
        node: NodeId,
    },
    CreateTopic {
        name: String,
        topic_id: u128,
        configs: Vec<(String, String)>,
        partitions: Vec<PartitionState>,
    },
    /// Partitions appended to an existing topic, numbered after the current ones.
    CreatePartitions {
        name: String,
        partitions: Vec<PartitionState>,
    },
    /// A new leader, leader epoch or ISR for one partition.
    PartitionChange {
        topic: String,
        partition: u32,
        leader: Option<NodeId>,
        leader_epoch: Epoch,
        isr: Vec<NodeId>,
    },
    /// Sets (`Some`) or removes (`None`) one topic config.
    SetTopicConfig {
        topic: String,
        key: String,
        value: Option<String>,
    },
    /// Producer ids `first..first + len` belong to `node` (KIP-730): handed out in order, so two
    /// blocks never overlap and no id is handed out twice.
    ProducerIdBlock {
        node: NodeId,
        first: u64,
        len: u32,
    },
    /// The topic named `name` with id `topic_id` is gone (the id guards against deleting a
    /// topic of the same name created again since the decision).
    DeleteTopic {
        name: String,
        topic_id: u128,
    },
    /// Leadership of one partition should move to `leader` (a preferred-leader election, or the
    /// leader balancer): the partition's current leader transfers to it by consensus once it is
    /// caught up. Cleared when `leader` leads, when its broker is fenced or put in maintenance,
    /// and with the topic. Recording it again is a no-op.
    ElectLeader {
        topic: String,
        partition: u32,
        leader: NodeId,
    },
    /// Maintenance mode of broker `node` (before a restart): on, every partition it leads
    /// transfers leadership to another in-sync replica and no election or balancing chooses it;
    /// off, it is a leader candidate again.
    SetMaintenance {
        node: NodeId,
        on: bool,
    },
    /// Moves one partition's replicas to `target` (Kafka's AlterPartitionReassignments), or
    /// cancels its move (`None`: back to the replicas it had before the move started). While a
    /// move is under way the partition's replicas are the union of the target and every replica
    /// it had; its leader carries the move out by membership changes of the partition's group
    /// (learners first) and reports the end with [`Record::FinishReassignment`]. Recording the
    /// same target again is a no-op.
    Reassign {
        topic: String,
        partition: u32,
        target: Option<Vec<ReplicaAssignment>>,
    },
    /// The partition's group has exactly the move's target as voters: its replicas become the
    /// target (`replicas`, the target's nodes, guard against finishing another move).
    FinishReassignment {
        topic: String,
        partition: u32,
        replicas: Vec<NodeId>,
    },
    /// Decommissioning of broker `node` (before it is retired): on, the active controller
    /// moves every replica it holds to other brokers (a bounded number of moves at a time) and
    /// nothing places a replica on it or chooses it to lead; off (recommission), no new moves
    /// start. Recording what is already set is a no-op.
    SetDecommission {
        node: NodeId,
        on: bool,
    },
}

/// The records of one controller decision, applied together.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecordBatch {
    pub records: Vec<Record>,
}

mod tag {
    pub const REGISTER: u8 = 1;
    pub const FENCE: u8 = 2;
    pub const UNFENCE: u8 = 3;
    pub const UNREGISTER: u8 = 4;
    pub const CREATE_TOPIC: u8 = 5;
    pub const CREATE_PARTITIONS: u8 = 6;
    pub const PARTITION_CHANGE: u8 = 7;
    pub const SET_CONFIG: u8 = 8;
    pub const PRODUCER_IDS: u8 = 9;
    pub const DELETE_TOPIC: u8 = 10;
    pub const ELECT_LEADER: u8 = 11;
    pub const SET_MAINTENANCE: u8 = 12;
    pub const REASSIGN: u8 = 13;
    pub const FINISH_REASSIGNMENT: u8 = 14;
    pub const SET_DECOMMISSION: u8 = 15;
}

/// `NodeId` on the wire for "no leader" (Kafka's -1).
const NO_LEADER: u64 = u64::MAX;

impl RecordBatch {
    pub fn new(records: Vec<Record>) -> Self {
        RecordBatch { records }
    }

    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::new();
        let mut w = Writer::new(&mut buf);
        w.u8(BATCH_VERSION);
        w.count(self.records.len(), MAX_RECORDS_PER_BATCH);
        for r in &self.records {
            encode_record(&mut w, r);
        }
        assert!(
            buf.len() <= MAX_METADATA_BATCH_BYTES,
            "metadata batch of {} bytes",
            buf.len()
        );
        buf.freeze()
    }

    /// Encodes one decision's records as consecutive batches of about `target_bytes` each (at
    /// least one record per batch), for a decision too large for one batch (fencing a broker
    /// that leads thousands of partitions). The controller orders a decision's records so
    /// every prefix keeps the safety invariants (leaderships dropped before the fencing, so a
    /// fenced broker never leads); a failover between the batches leaves at worst a broker
    /// still in some ISRs, which the next active controller fences again.
    pub fn encode_chunked(records: Vec<Record>, target_bytes: usize) -> Vec<Bytes> {
        let target = target_bytes.clamp(1, MAX_METADATA_BATCH_BYTES / 2);
        let mut out = Vec::new();
        let mut chunk = Vec::new();
        let mut scratch = BytesMut::new();
        let mut size = 0;
        for r in records {
            scratch.clear();
            encode_record(&mut Writer::new(&mut scratch), &r);
            let full = !chunk.is_empty()
                && (size + scratch.len() > target || chunk.len() == MAX_RECORDS_PER_BATCH);
            if full {
                out.push(RecordBatch::new(std::mem::take(&mut chunk)).encode());
                size = 0;
            }
            size += scratch.len();
            chunk.push(r);
        }
        if !chunk.is_empty() {
            out.push(RecordBatch::new(chunk).encode());
        }
        out
    }

    /// Decodes a whole batch; anything malformed, over a cap or followed by junk is an error.
    pub fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_METADATA_BATCH_BYTES {
            return Err(DecodeError::TooLong {
                what: "metadata batch",
                len: bytes.len() as u64,
                max: MAX_METADATA_BATCH_BYTES as u64,
            });
        }
        let mut r = Reader::new(bytes);
        let version = r.u8("metadata batch version")?;
        if version != BATCH_VERSION {
            return Err(DecodeError::Version {
                what: "metadata batch",
                version,
            });
        }
        // Every record is at least its tag byte (a CreatePartitions of a short name and no
        // partitions is 8 bytes, under the 9 of an UnregisterBroker); capacity grows with what
        // decodes rather than trusting the count up front.
        let n = r.count("metadata records", MAX_RECORDS_PER_BATCH, 1)?;
        let mut records = Vec::with_capacity(n.min(PREALLOCATED_RECORDS));
        for _ in 0..n {
            records.push(decode_record(&mut r)?);
        }
        r.finish()?;
        Ok(RecordBatch { records })
    }
}

fn encode_endpoint(w: &mut Writer<'_>, e: &Endpoint) {
    w.string(&e.host, MAX_HOST_BYTES);
    w.u16(e.port);
}

fn decode_endpoint(r: &mut Reader) -> Result<Endpoint, DecodeError> {
    Ok(Endpoint {
        host: r.string("endpoint host", MAX_HOST_BYTES)?,
        port: r.u16("endpoint port")?,
    })
}

fn encode_leader(w: &mut Writer<'_>, leader: Option<NodeId>) {
    assert_ne!(leader, Some(NO_LEADER));
    w.u64(leader.unwrap_or(NO_LEADER));
}

fn decode_leader(r: &mut Reader) -> Result<Option<NodeId>, DecodeError> {
    let v = r.u64("leader")?;
    Ok((v != NO_LEADER).then_some(v))
}

fn encode_assignments(w: &mut Writer<'_>, replicas: &[ReplicaAssignment]) {
    w.count(replicas.len(), MAX_REPLICAS_PER_PARTITION);
    for a in replicas {
        w.u64(a.node);
        w.u32(a.shard);
    }
}

fn decode_assignments(r: &mut Reader) -> Result<Vec<ReplicaAssignment>, DecodeError> {
    let n = r.count("replicas", MAX_REPLICAS_PER_PARTITION, 12)?;
    let mut replicas = Vec::with_capacity(n);
    for _ in 0..n {
        replicas.push(ReplicaAssignment {
            node: r.u64("replica node")?,
            shard: r.u32("replica shard")?,
        });
    }
    Ok(replicas)
}

fn encode_partition(w: &mut Writer<'_>, p: &PartitionState) {
    encode_assignments(w, &p.replicas);
    w.u64_list(&p.isr, MAX_REPLICAS_PER_PARTITION);
    encode_leader(w, p.leader);
    w.i32(p.leader_epoch);
}

fn decode_partition(r: &mut Reader) -> Result<PartitionState, DecodeError> {
    Ok(PartitionState {
        replicas: decode_assignments(r)?,
        isr: r.u64_list("isr", MAX_REPLICAS_PER_PARTITION)?,
        leader: decode_leader(r)?,
        leader_epoch: r.i32("leader epoch")?,
    })
}

fn encode_partitions(w: &mut Writer<'_>, ps: &[PartitionState]) {
    w.count(ps.len(), MAX_PARTITIONS_PER_TOPIC);
    for p in ps {
        encode_partition(w, p);
    }
}

fn decode_partitions(r: &mut Reader) -> Result<Vec<PartitionState>, DecodeError> {
    // Smallest partition: two empty lists, a leader and an epoch.
    let n = r.count("partitions", MAX_PARTITIONS_PER_TOPIC, 20)?;
    let mut ps = Vec::with_capacity(n);
    for _ in 0..n {
        ps.push(decode_partition(r)?);
    }
    Ok(ps)
}

fn encode_record(w: &mut Writer<'_>, rec: &Record) {
    match rec {
        Record::RegisterBroker(b) => {
            w.u8(tag::REGISTER);
            w.u64(b.node);
            w.u128(b.node_uuid);
            w.u64(b.broker_epoch);
            encode_endpoint(w, &b.rpc);
            encode_endpoint(w, &b.kafka);
            w.u32(b.shards);
        }
        Record::FenceBroker { node, broker_epoch } => {
            w.u8(tag::FENCE);
            w.u64(*node);
            w.u64(*broker_epoch);
        }
        Record::UnfenceBroker { node, broker_epoch } => {
            w.u8(tag::UNFENCE);
            w.u64(*node);
            w.u64(*broker_epoch);
        }
        Record::UnregisterBroker { node } => {
            w.u8(tag::UNREGISTER);
            w.u64(*node);
        }
        Record::CreateTopic {
            name,
            topic_id,
            configs,
            partitions,
        } => {
            w.u8(tag::CREATE_TOPIC);
            w.string(name, MAX_TOPIC_NAME_BYTES);
            w.u128(*topic_id);
            w.count(configs.len(), MAX_CONFIGS_PER_TOPIC);
            for (k, v) in configs {
                w.string(k, MAX_CONFIG_KEY_BYTES);
                w.string(v, MAX_CONFIG_VALUE_BYTES);
            }
            encode_partitions(w, partitions);
        }
        Record::CreatePartitions { name, partitions } => {
            w.u8(tag::CREATE_PARTITIONS);
            w.string(name, MAX_TOPIC_NAME_BYTES);
            encode_partitions(w, partitions);
        }
        Record::PartitionChange {
            topic,
            partition,
            leader,
            leader_epoch,
            isr,
        } => {
            w.u8(tag::PARTITION_CHANGE);
            w.string(topic, MAX_TOPIC_NAME_BYTES);
            w.u32(*partition);
            encode_leader(w, *leader);
            w.i32(*leader_epoch);
            w.u64_list(isr, MAX_REPLICAS_PER_PARTITION);
        }
        Record::SetTopicConfig { topic, key, value } => {
            w.u8(tag::SET_CONFIG);
            w.string(topic, MAX_TOPIC_NAME_BYTES);
            w.string(key, MAX_CONFIG_KEY_BYTES);
            w.bool(value.is_some());
            if let Some(v) = value {
                w.string(v, MAX_CONFIG_VALUE_BYTES);
            }
        }
        Record::ProducerIdBlock { node, first, len } => {
            w.u8(tag::PRODUCER_IDS);
            w.u64(*node);
            w.u64(*first);
            w.u32(*len);
        }
        Record::DeleteTopic { name, topic_id } => {
            w.u8(tag::DELETE_TOPIC);
            w.string(name, MAX_TOPIC_NAME_BYTES);
            w.u128(*topic_id);
        }
        Record::ElectLeader {
            topic,
            partition,
            leader,
        } => {
            w.u8(tag::ELECT_LEADER);
            w.string(topic, MAX_TOPIC_NAME_BYTES);
            w.u32(*partition);
            w.u64(*leader);
        }
        Record::SetMaintenance { node, on } => {
            w.u8(tag::SET_MAINTENANCE);
            w.u64(*node);
            w.bool(*on);
        }
        Record::Reassign {
            topic,
            partition,
            target,
        } => {
            w.u8(tag::REASSIGN);
            w.string(topic, MAX_TOPIC_NAME_BYTES);
            w.u32(*partition);
            w.bool(target.is_some());
            if let Some(target) = target {
                encode_assignments(w, target);
            }
        }
        Record::FinishReassignment {
            topic,
            partition,
            replicas,
        } => {
            w.u8(tag::FINISH_REASSIGNMENT);
            w.string(topic, MAX_TOPIC_NAME_BYTES);
            w.u32(*partition);
            w.u64_list(replicas, MAX_REPLICAS_PER_PARTITION);
        }
        Record::SetDecommission { node, on } => {
            w.u8(tag::SET_DECOMMISSION);
            w.u64(*node);
            w.bool(*on);
        }
    }
}

fn decode_record(r: &mut Reader) -> Result<Record, DecodeError> {
    let t = r.u8("record tag")?;
    Ok(match t {
        tag::REGISTER => Record::RegisterBroker(BrokerRegistration {
            node: r.u64("node")?,
            node_uuid: r.u128("node uuid")?,
            broker_epoch: r.u64("broker epoch")?,
            rpc: decode_endpoint(r)?,
            kafka: decode_endpoint(r)?,
            shards: r.u32("shards")?,
        }),
        tag::FENCE => Record::FenceBroker {
            node: r.u64("node")?,
            broker_epoch: r.u64("broker epoch")?,
        },
        tag::UNFENCE => Record::UnfenceBroker {
            node: r.u64("node")?,
            broker_epoch: r.u64("broker epoch")?,
        },
        tag::UNREGISTER => Record::UnregisterBroker {
            node: r.u64("node")?,
        },
        tag::CREATE_TOPIC => {
            let name = r.string("topic name", MAX_TOPIC_NAME_BYTES)?;
            let topic_id = r.u128("topic id")?;
            let n = r.count("topic configs", MAX_CONFIGS_PER_TOPIC, 4)?;
            let mut configs = Vec::with_capacity(n);
            for _ in 0..n {
                configs.push((
                    r.string("config key", MAX_CONFIG_KEY_BYTES)?,
                    r.string("config value", MAX_CONFIG_VALUE_BYTES)?,
                ));
            }
            Record::CreateTopic {
                name,
                topic_id,
                configs,
                partitions: decode_partitions(r)?,
            }
        }
        tag::CREATE_PARTITIONS => Record::CreatePartitions {
            name: r.string("topic name", MAX_TOPIC_NAME_BYTES)?,
            partitions: decode_partitions(r)?,
        },
        tag::PARTITION_CHANGE => Record::PartitionChange {
            topic: r.string("topic name", MAX_TOPIC_NAME_BYTES)?,
            partition: r.u32("partition")?,
            leader: decode_leader(r)?,
            leader_epoch: r.i32("leader epoch")?,
            isr: r.u64_list("isr", MAX_REPLICAS_PER_PARTITION)?,
        },
        tag::SET_CONFIG => {
            let topic = r.string("topic name", MAX_TOPIC_NAME_BYTES)?;
            let key = r.string("config key", MAX_CONFIG_KEY_BYTES)?;
            let value = if r.bool("config value present")? {
                Some(r.string("config value", MAX_CONFIG_VALUE_BYTES)?)
            } else {
                None
            };
            Record::SetTopicConfig { topic, key, value }
        }
        tag::PRODUCER_IDS => Record::ProducerIdBlock {
            node: r.u64("node")?,
            first: r.u64("first producer id")?,
            len: r.u32("producer id block length")?,
        },
        tag::DELETE_TOPIC => Record::DeleteTopic {
            name: r.string("topic name", MAX_TOPIC_NAME_BYTES)?,
            topic_id: r.u128("topic id")?,
        },
        tag::ELECT_LEADER => Record::ElectLeader {
            topic: r.string("topic name", MAX_TOPIC_NAME_BYTES)?,
            partition: r.u32("partition")?,
            leader: r.u64("leader")?,
        },
        tag::SET_MAINTENANCE => Record::SetMaintenance {
            node: r.u64("node")?,
            on: r.bool("maintenance on")?,
        },
        tag::REASSIGN => Record::Reassign {
            topic: r.string("topic name", MAX_TOPIC_NAME_BYTES)?,
            partition: r.u32("partition")?,
            target: if r.bool("reassignment target present")? {
                Some(decode_assignments(r)?)
            } else {
                None
            },
        },
        tag::FINISH_REASSIGNMENT => Record::FinishReassignment {
            topic: r.string("topic name", MAX_TOPIC_NAME_BYTES)?,
            partition: r.u32("partition")?,
            replicas: r.u64_list("replicas", MAX_REPLICAS_PER_PARTITION)?,
        },
        tag::SET_DECOMMISSION => Record::SetDecommission {
            node: r.u64("node")?,
            on: r.bool("decommission on")?,
        },
        tag => {
            return Err(DecodeError::UnknownTag {
                what: "metadata record",
                tag,
            })
        }
    })
}
