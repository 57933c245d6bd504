//! Who should lead a partition: the rules behind preferred-leader elections, the leader
//! balancer and maintenance mode, shared by the controller (which records what it wants in the
//! metadata log) and the hosting runtime (whose partition leaders carry it out by a consensus
//! transfer). Pure functions of the applied metadata; no I/O, no clock.
//!
//! The controller never moves leadership itself: a partition's consensus group elects its
//! leaders. What it records is a wish ([`crate::controller::Record::ElectLeader`]) or a
//! broker's maintenance mode, and the current leader, seeing either in the metadata it has
//! applied, transfers leadership to the target once the target is caught up (TimeoutNow). Both
//! are in the committed log, so they survive a controller failover, and recording them again
//! changes nothing.

use crate::controller::records::{PartitionState, Record};
use crate::controller::state::MetadataState;
use crate::types::NodeId;

/// Leadership moves the balancer records in one round at most: bounds one decision's size; the
/// rest follow in the next rounds.
pub const MAX_LEADER_MOVES_PER_BALANCE: usize = 4096;

/// How a preferred-leader election of one partition goes, judged on a metadata state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreferredElection {
    UnknownPartition,
    /// The preferred replica (the first of the assignment) already leads.
    NotNeeded,
    /// The preferred replica cannot lead now; the reason names why.
    NotAvailable(&'static str),
    /// Leadership should move to this node, the preferred replica.
    Eligible(NodeId),
}

impl PreferredElection {
    /// The Kafka error code ElectLeaders answers for this outcome once the election is
    /// recorded (`Eligible`: none).
    pub fn error_code(&self) -> i16 {
        use kafka_protocol::ResponseError as K;
        match self {
            PreferredElection::UnknownPartition => K::UnknownTopicOrPartition.code(),
            PreferredElection::NotNeeded => K::ElectionNotNeeded.code(),
            PreferredElection::NotAvailable(_) => K::PreferredLeaderNotAvailable.code(),
            PreferredElection::Eligible(_) => 0,
        }
    }

    pub fn message(&self) -> Option<String> {
        match self {
            PreferredElection::UnknownPartition => Some("no such topic or partition".into()),
            PreferredElection::NotNeeded => Some("the preferred replica already leads".into()),
            PreferredElection::NotAvailable(why) => Some(format!("preferred replica {why}")),
            PreferredElection::Eligible(_) => None,
        }
    }
}

/// Whether leadership of `topic`/`partition` can move to its preferred replica.
pub fn preferred_election(state: &MetadataState, topic: &str, partition: u32) -> PreferredElection {
    let Some(p) = state.partition(topic, partition) else {
        return PreferredElection::UnknownPartition;
    };
    let Some(preferred) = p.replicas.first().map(|r| r.node) else {
        return PreferredElection::UnknownPartition;
    };
    if p.leader == Some(preferred) {
        return PreferredElection::NotNeeded;
    }
    if !state.is_live(preferred) {
        return PreferredElection::NotAvailable("is not live (fenced or not registered)");
    }
    if state.maintenance.contains(&preferred) {
        return PreferredElection::NotAvailable("is in maintenance mode");
    }
    if state.decommissioning.contains(&preferred) {
        return PreferredElection::NotAvailable("is being decommissioned");
    }
    if !p.isr.contains(&preferred) {
        return PreferredElection::NotAvailable("is not in the ISR");
    }
    PreferredElection::Eligible(preferred)
}

/// Where the leader of `topic`/`partition` on node `me` should hand leadership now, if
/// anywhere. `in_sync` is the voters its group counts in sync (the leader's own view, fresher
/// than the controller's ISR): a transfer goes only to one of them.
/// - `me` in maintenance: the wished leader if it qualifies, else the first replica in
///   assignment order that is live, not in maintenance and in sync;
/// - otherwise the wished leader (a preferred-leader election or the balancer), if it is live,
///   not in maintenance and in sync.
pub fn transfer_target(
    state: &MetadataState,
    topic: &str,
    partition: u32,
    me: NodeId,
    in_sync: &[NodeId],
) -> Option<NodeId> {
    let draining = state.is_draining(me);
    let wish = state.leader_wish(topic, partition);
    if !draining && wish.is_none() {
        return None;
    }
    let p = state.partition(topic, partition)?;
    let fit = |n: NodeId| {
        n != me && p.has_replica(n) && state.is_leader_candidate(n) && in_sync.contains(&n)
    };
    if let Some(w) = wish.filter(|&w| fit(w)) {
        return Some(w);
    }
    if draining {
        return p.replicas.iter().map(|r| r.node).find(|&n| fit(n));
    }
    None
}

/// The leader balancer's round (Kafka's auto.leader.rebalance): every led partition whose
/// preferred replica does not lead but could (live, in the ISR, not in maintenance) gets a
/// wish naming it, unless one is already recorded. Placement spreads preferred replicas evenly
/// over the nodes (and their shards), so this also evens out leaders per node.
pub fn balance_wishes(state: &MetadataState) -> Vec<Record> {
    let mut out = Vec::new();
    for (name, t) in &state.topics {
        for (i, p) in t.partitions.iter().enumerate() {
            if out.len() >= MAX_LEADER_MOVES_PER_BALANCE {
                return out;
            }
            let partition = i as u32;
            if p.elected_leader().is_none() || state.leader_wish(name, partition).is_some() {
                continue;
            }
            if let PreferredElection::Eligible(leader) = preferred_election(state, name, partition)
            {
                out.push(Record::ElectLeader {
                    topic: name.clone(),
                    partition,
                    leader,
                });
            }
        }
    }
    out
}

/// Partitions `node` leads in `state`.
pub fn leaders_of(state: &MetadataState, node: NodeId) -> usize {
    state
        .topics
        .values()
        .flat_map(|t| t.partitions.iter())
        .filter(|p: &&PartitionState| p.leader == Some(node))
        .count()
}
