//! What a node hosts, derived from the applied metadata alone, so that every node computes the
//! same group ids and the same group-to-shard routes without asking anyone.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use crate::controller::{MetadataState, METADATA_GROUP};
use crate::node::NodeMessage;
use crate::types::{GroupId, Message, NodeId};

/// Bound of each channel carrying consensus traffic between a shard and the cluster service
/// thread, in [`NodeMessage`]s. A shard sends at most one message per peer per tick plus one
/// per event it steps, so a few hundred absorb a burst of several ticks; beyond that the
/// sender drops (consensus retransmits on its next heartbeat) rather than queueing without end.
pub const SHARD_CONSENSUS_CHANNEL_CAPACITY: usize = 256;

/// The consensus group id of partition `partition` of the topic with id `topic_id`: a 64-bit
/// mix of both, the same on every node. Never [`METADATA_GROUP`]. Collisions are possible in
/// principle (two random 128-bit topic ids mixed into 64 bits); [`plan_hosting`] detects them
/// and hosts neither group rather than mixing their traffic.
pub fn partition_group_id(topic_id: u128, partition: u32) -> GroupId {
    let folded = (topic_id as u64) ^ ((topic_id >> 64) as u64).rotate_left(29);
    let id = mix(mix(folded) ^ u64::from(partition));
    if id == METADATA_GROUP {
        METADATA_GROUP - 1
    } else {
        id
    }
}

/// SplitMix64's finalizer: every input bit affects every output bit.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One partition replica this node hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostedPartition {
    pub topic: String,
    pub topic_id: u128,
    pub partition: u32,
    /// The shard the assignment names for this node's replica.
    pub shard: u32,
    /// The group's voters for a replica whose log holds no membership batch: the partition's
    /// replicas, or while they move, the replicas before the move (a replica joining as a
    /// learner must not count itself a voter; it learns the membership from the log). Not part
    /// of what decides whether a group is reopened ([`HostingPlan::changes_to`]): a move
    /// changes the membership by consensus, not by reopening.
    pub voters: Vec<NodeId>,
}

/// Two partitions whose group ids collide; neither is hosted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("partitions {a:?} and {b:?} map to the same consensus group {group}; neither is hosted")]
pub struct PlanConflict {
    pub group: GroupId,
    pub a: (String, u32),
    pub b: (String, u32),
}

/// Every group a node hosts, by group id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostingPlan {
    pub groups: BTreeMap<GroupId, HostedPartition>,
}

/// What changed between two plans: groups to open (new, or moved to another shard or voter
/// set) and groups to close (gone, or about to be reopened).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostingChanges {
    pub open: Vec<(GroupId, HostedPartition)>,
    pub close: Vec<(GroupId, HostedPartition)>,
}

/// The groups `node` hosts in `state`, and the group-id collisions found (their partitions are
/// left out). A node with a shard count below an assignment's shard cannot host it: the
/// controller refuses such registrations, so the plan trusts the state here.
pub fn plan_hosting(state: &MetadataState, node: NodeId) -> (HostingPlan, Vec<PlanConflict>) {
    let mut groups: BTreeMap<GroupId, HostedPartition> = BTreeMap::new();
    let mut conflicts = Vec::new();
    let mut poisoned: Vec<GroupId> = Vec::new();
    for (name, t) in &state.topics {
        for (i, p) in t.partitions.iter().enumerate() {
            let Some(mine) = p.replicas.iter().find(|r| r.node == node) else {
                continue;
            };
            let partition = i as u32;
            let group = partition_group_id(t.topic_id, partition);
            let bootstrap = state
                .reassignment(name, partition)
                .map_or(&p.replicas, |r| &r.original);
            let hosted = HostedPartition {
                topic: name.clone(),
                topic_id: t.topic_id,
                partition,
                shard: mine.shard,
                voters: bootstrap.iter().map(|r| r.node).collect(),
            };
            if let Some(other) = groups.get(&group) {
                conflicts.push(PlanConflict {
                    group,
                    a: (other.topic.clone(), other.partition),
                    b: (name.clone(), partition),
                });
                poisoned.push(group);
                continue;
            }
            groups.insert(group, hosted);
        }
    }
    for g in poisoned {
        groups.remove(&g);
    }
    (HostingPlan { groups }, conflicts)
}

impl HostingPlan {
    /// The shard hosting `group`, for routing its incoming consensus messages.
    pub fn shard_of(&self, group: GroupId) -> Option<u32> {
        self.groups.get(&group).map(|h| h.shard)
    }

    /// From `self` to `next`. A group whose partition incarnation or shard changed is closed
    /// and reopened; one whose bootstrap voters changed (a move started or ended) is not: its
    /// membership is the group's own, changed by consensus.
    pub fn changes_to(&self, next: &HostingPlan) -> HostingChanges {
        let same = |a: &HostedPartition, b: &HostedPartition| {
            (&a.topic, a.topic_id, a.partition, a.shard)
                == (&b.topic, b.topic_id, b.partition, b.shard)
        };
        let mut c = HostingChanges::default();
        for (g, h) in &self.groups {
            if !next.groups.get(g).is_some_and(|n| same(n, h)) {
                c.close.push((*g, h.clone()));
            }
        }
        for (g, h) in &next.groups {
            if !self.groups.get(g).is_some_and(|o| same(o, h)) {
                c.open.push((*g, h.clone()));
            }
        }
        c
    }
}

/// Hashes a [`GroupId`] as itself: group ids are SplitMix64 outputs already
/// ([`partition_group_id`]), so hashing them again would only cost time. For maps looked up
/// once per consensus message entry (tens of thousands a second on a node of thousands of
/// partitions).
#[derive(Default, Clone, Copy)]
pub struct GroupIdHasher(u64);

impl Hasher for GroupIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is expected (a `GroupId`); anything else still hashes, slowly.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// A map keyed by [`GroupId`] with [`GroupIdHasher`].
pub type GroupMap<V> = HashMap<GroupId, V, BuildHasherDefault<GroupIdHasher>>;

/// Where a group's consensus traffic goes on this node: its shard.
pub trait ShardRoutes {
    fn shard_of(&self, group: GroupId) -> Option<u32>;
}

impl ShardRoutes for HostingPlan {
    fn shard_of(&self, group: GroupId) -> Option<u32> {
        HostingPlan::shard_of(self, group)
    }
}

/// A [`HostingPlan`]'s routes as a hash map: the service thread looks up every entry of every
/// incoming node message, which in the plan's ordered map is a dozen cache-missing steps.
#[derive(Debug, Clone, Default)]
pub struct RouteTable(GroupMap<u32>);

impl RouteTable {
    pub fn of(plan: &HostingPlan) -> Self {
        RouteTable(plan.groups.iter().map(|(g, h)| (*g, h.shard)).collect())
    }
}

impl ShardRoutes for RouteTable {
    fn shard_of(&self, group: GroupId) -> Option<u32> {
        self.0.get(&group).copied()
    }
}

/// Splits one incoming node message into one per shard hosting its groups, in shard order;
/// entries for groups this node does not host (closed, or not yet opened here) are dropped and
/// counted: consensus resends what is still needed.
pub fn split_by_shard(
    msg: NodeMessage,
    plan: &impl ShardRoutes,
) -> (Vec<(u32, NodeMessage)>, usize) {
    let mut per: BTreeMap<u32, Vec<(GroupId, Message)>> = BTreeMap::new();
    let mut dropped = 0;
    for (g, m) in msg.items {
        match plan.shard_of(g) {
            Some(s) => per.entry(s).or_default().push((g, m)),
            None => dropped += 1,
        }
    }
    let out = per
        .into_iter()
        .map(|(s, items)| {
            (
                s,
                NodeMessage {
                    from: msg.from,
                    to: msg.to,
                    items,
                },
            )
        })
        .collect();
    (out, dropped)
}

/// Bytes of batches one gathered [`NodeMessage`] carries at most (one append larger than this
/// goes alone): half the rpc frame cap
/// ([`crate::rpc::frame::DEFAULT_MAX_RPC_FRAME_BYTES`]), so that groups catching up at once,
/// each with its window of appends, never make a frame the transport refuses.
pub const MAX_GATHERED_BATCH_BYTES: usize = crate::rpc::frame::DEFAULT_MAX_RPC_FRAME_BYTES / 2;

/// Gathers what a shard's groups produced in one round (each group's `(peer, message)` list)
/// into one [`NodeMessage`] per peer, so the per-tick message count between two nodes does not
/// grow with the number of groups; a peer gets more than one only when the batches to it pass
/// [`MAX_GATHERED_BATCH_BYTES`]. A group's messages to a peer stay in order.
pub fn gather_outgoing(
    from: NodeId,
    per_group: impl IntoIterator<Item = (GroupId, Vec<(NodeId, Message)>)>,
) -> Vec<NodeMessage> {
    // Per peer: the messages so far, the last one's batch bytes.
    let mut per: BTreeMap<NodeId, (Vec<NodeMessage>, usize)> = BTreeMap::new();
    for (g, msgs) in per_group {
        for (to, m) in msgs {
            let bytes = batch_bytes(&m);
            let (out, filled) = per.entry(to).or_default();
            match out.last_mut() {
                Some(last) if *filled + bytes <= MAX_GATHERED_BATCH_BYTES || bytes == 0 => {
                    last.items.push((g, m));
                    *filled += bytes;
                }
                _ => {
                    out.push(NodeMessage {
                        from,
                        to,
                        items: vec![(g, m)],
                    });
                    *filled = bytes;
                }
            }
        }
    }
    per.into_values().flat_map(|(out, _)| out).collect()
}

fn batch_bytes(m: &Message) -> usize {
    match m {
        Message::Append(a) => a.batches.iter().map(|b| b.bytes.len()).sum(),
        _ => 0,
    }
}
