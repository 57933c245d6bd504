//! Replica placement: which nodes hold a new partition's replicas, which of them leads, and
//! which shard on each node owns the replica.
//!
//! Greedy and deterministic: each partition's leader goes to the live node leading the fewest
//! partitions (then holding the fewest replicas, then the lowest id), its followers to the
//! nodes holding the fewest replicas (ties broken by distance after the leader in id order, so
//! followers of consecutive leaders land on different nodes). On the chosen node, a leader
//! replica takes the shard leading the fewest partitions, a follower the shard holding the
//! fewest replicas. Existing partitions count toward the load, so new topics and
//! CreatePartitions fill the least loaded nodes and shards first.

use std::collections::BTreeMap;

use crate::controller::records::{
    ReplicaAssignment, MAX_PARTITIONS_PER_TOPIC, MAX_REPLICAS_PER_PARTITION,
};
use crate::controller::state::MetadataState;
use crate::types::NodeId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("replication factor {replication_factor} is larger than the {live} live brokers")]
    NotEnoughBrokers {
        replication_factor: usize,
        live: usize,
    },
    #[error("replication factor must be 1..={max}, got {got}")]
    InvalidReplicationFactor { got: usize, max: usize },
    #[error("partition count must be 1..={max}, got {got}")]
    InvalidPartitionCount { got: usize, max: usize },
}

/// The replication factor a topic gets when the request does not name one: three, or every
/// node of a smaller cluster.
pub fn default_replication_factor(live_brokers: usize) -> usize {
    live_brokers.clamp(1, 3)
}

/// `min.insync.replicas` when the topic does not set it: a majority of its replicas, so an
/// acks=all write survives the loss of any minority of them.
pub fn default_min_insync_replicas(replication_factor: usize) -> usize {
    replication_factor / 2 + 1
}

#[derive(Debug, Clone)]
struct NodeLoad {
    node: NodeId,
    leaders: u32,
    replicas: u32,
    shard_leaders: Vec<u32>,
    shard_replicas: Vec<u32>,
}

impl NodeLoad {
    fn pick_shard(&self, leader: bool) -> u32 {
        let key = |s: usize| {
            if leader {
                (self.shard_leaders[s], self.shard_replicas[s], s)
            } else {
                (self.shard_replicas[s], self.shard_leaders[s], s)
            }
        };
        (0..self.shard_replicas.len())
            .min_by_key(|&s| key(s))
            .expect("a broker has at least one shard") as u32
    }

    fn add(&mut self, shard: u32, leader: bool) {
        self.replicas += 1;
        self.shard_replicas[shard as usize] += 1;
        if leader {
            self.leaders += 1;
            self.shard_leaders[shard as usize] += 1;
        }
    }
}

/// The load of the live brokers, updated as partitions are placed.
#[derive(Debug, Clone)]
pub struct Placer {
    nodes: Vec<NodeLoad>,
}

impl Placer {
    /// Live brokers as (node, shard count), any order; no load yet.
    pub fn new(live: &[(NodeId, u32)]) -> Self {
        let mut nodes: Vec<NodeLoad> = live
            .iter()
            .map(|&(node, shards)| {
                assert!(shards > 0, "broker {node} with no shard");
                NodeLoad {
                    node,
                    leaders: 0,
                    replicas: 0,
                    shard_leaders: vec![0; shards as usize],
                    shard_replicas: vec![0; shards as usize],
                }
            })
            .collect();
        nodes.sort_by_key(|n| n.node);
        Placer { nodes }
    }

    /// The live brokers of `state` that are not being decommissioned, loaded with every
    /// existing partition (the current leader, or the preferred one when there is none, counts
    /// as the leader).
    pub fn from_state(state: &MetadataState) -> Self {
        let mut p = Placer::new(&state.placement_brokers());
        let index: BTreeMap<NodeId, usize> = p
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.node, i))
            .collect();
        for part in state.topics.values().flat_map(|t| t.partitions.iter()) {
            let leader = part.leader.or(part.replicas.first().map(|r| r.node));
            for r in &part.replicas {
                if let Some(&i) = index.get(&r.node) {
                    let n = &mut p.nodes[i];
                    if (r.shard as usize) < n.shard_replicas.len() {
                        n.add(r.shard, leader == Some(r.node));
                    }
                }
            }
        }
        p
    }

    pub fn live_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Places `count` partitions of `replication_factor` replicas each; the first replica of
    /// each is its leader.
    pub fn place(
        &mut self,
        count: usize,
        replication_factor: usize,
    ) -> Result<Vec<Vec<ReplicaAssignment>>, PlacementError> {
        if count == 0 || count > MAX_PARTITIONS_PER_TOPIC {
            return Err(PlacementError::InvalidPartitionCount {
                got: count,
                max: MAX_PARTITIONS_PER_TOPIC,
            });
        }
        if replication_factor == 0 || replication_factor > MAX_REPLICAS_PER_PARTITION {
            return Err(PlacementError::InvalidReplicationFactor {
                got: replication_factor,
                max: MAX_REPLICAS_PER_PARTITION,
            });
        }
        if replication_factor > self.nodes.len() {
            return Err(PlacementError::NotEnoughBrokers {
                replication_factor,
                live: self.nodes.len(),
            });
        }
        Ok((0..count)
            .map(|_| self.place_one(replication_factor))
            .collect())
    }

    fn place_one(&mut self, rf: usize) -> Vec<ReplicaAssignment> {
        let n = self.nodes.len();
        let leader = (0..n)
            .min_by_key(|&i| (self.nodes[i].leaders, self.nodes[i].replicas, i))
            .expect("checked: at least one node");
        let mut followers: Vec<usize> = (0..n).filter(|&i| i != leader).collect();
        followers.sort_by_key(|&i| (self.nodes[i].replicas, (i + n - leader) % n));
        followers.truncate(rf - 1);
        let mut out = Vec::with_capacity(rf);
        for (k, i) in std::iter::once(leader).chain(followers).enumerate() {
            let is_leader = k == 0;
            let shard = self.nodes[i].pick_shard(is_leader);
            self.nodes[i].add(shard, is_leader);
            out.push(ReplicaAssignment {
                node: self.nodes[i].node,
                shard,
            });
        }
        out
    }
}
