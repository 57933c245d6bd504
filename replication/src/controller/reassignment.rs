//! Moving a partition's replicas (Kafka's AlterPartitionReassignments, KIP-455): the rules
//! shared by the controller (which records a move in the metadata log), the Kafka layer (which
//! judges each requested partition on the applied state and lists moves) and the hosting
//! runtime (whose partition leader carries a move out). Pure functions of the applied metadata;
//! no I/O, no clock.
//!
//! A move is a [`Record::Reassign`] naming the target replicas. While it is under way the
//! partition's replicas are the target followed by every other replica it has had since the
//! move started (Kafka's "replicas = union"), so every node that may hold its data hosts the
//! partition. The controller moves no data: the partition's leader changes its group's
//! membership one step at a time ([`next_step`]): each new replica joins as a learner, is
//! promoted to voter once caught up, then each replica outside the target is removed (the
//! leader hands leadership to a target voter before removing itself). When the voters are the
//! target and no learner is left, the leader reports [`Record::FinishReassignment`] and the
//! replicas become the target; nodes no longer named close the partition and delete its files.
//!
//! A cancel is a move back to the replicas the partition had before the first move started,
//! carried out the same way (a replica that already joined is removed again). Both are log
//! entries: they survive a controller failover, and recording the same target again is a no-op.

use crate::controller::records::{ReplicaAssignment, MAX_REPLICAS_PER_PARTITION};
use crate::controller::state::MetadataState;
use crate::types::{Membership, NodeId};

/// Partitions one AlterPartitionReassignments request (or plan file) may name.
pub const MAX_PARTITIONS_PER_REASSIGNMENT: usize = 10_000;

/// A move under way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reassignment {
    /// The replicas before the first move started (a cancel goes back to them); also the
    /// membership a replica whose log holds no membership batch starts from.
    pub original: Vec<ReplicaAssignment>,
    pub target: Vec<ReplicaAssignment>,
}

impl Reassignment {
    pub fn target_nodes(&self) -> Vec<NodeId> {
        self.target.iter().map(|r| r.node).collect()
    }

    /// Kafka's `adding_replicas`: target replicas that were not replicas before the move.
    pub fn adding(&self) -> Vec<NodeId> {
        self.target
            .iter()
            .map(|r| r.node)
            .filter(|n| !self.original.iter().any(|o| o.node == *n))
            .collect()
    }

    /// Kafka's `removing_replicas`: replicas (`replicas`, the partition's current union) that
    /// are not in the target.
    pub fn removing(&self, replicas: &[ReplicaAssignment]) -> Vec<NodeId> {
        replicas
            .iter()
            .map(|r| r.node)
            .filter(|n| !self.target.iter().any(|t| t.node == *n))
            .collect()
    }
}

/// Why a requested move of one partition is refused, judged on the applied state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    UnknownPartition,
    /// A target naming a node twice, no node, too many, or a node that is not a broker.
    InvalidAssignment(String),
    /// A cancel of a partition that is not moving.
    NoReassignmentInProgress,
}

impl Refusal {
    /// The Kafka error code AlterPartitionReassignments answers.
    pub fn error_code(&self) -> i16 {
        use kafka_protocol::ResponseError as K;
        match self {
            Refusal::UnknownPartition => K::UnknownTopicOrPartition.code(),
            Refusal::InvalidAssignment(_) => K::InvalidReplicaAssignment.code(),
            Refusal::NoReassignmentInProgress => K::NoReassignmentInProgress.code(),
        }
    }

    pub fn message(&self) -> String {
        match self {
            Refusal::UnknownPartition => "no such topic or partition".into(),
            Refusal::InvalidAssignment(why) => why.clone(),
            Refusal::NoReassignmentInProgress => "no reassignment of this partition".into(),
        }
    }
}

/// Checks a requested move of `topic`/`partition` to `target` (`None`: cancel) against `state`.
pub fn check_request(
    state: &MetadataState,
    topic: &str,
    partition: u32,
    target: Option<&[NodeId]>,
) -> Result<(), Refusal> {
    let Some(p) = state.partition(topic, partition) else {
        return Err(Refusal::UnknownPartition);
    };
    let Some(target) = target else {
        return if state.reassignment(topic, partition).is_some() {
            Ok(())
        } else {
            Err(Refusal::NoReassignmentInProgress)
        };
    };
    let invalid = |why: String| Err(Refusal::InvalidAssignment(why));
    if target.is_empty() || target.len() > MAX_REPLICAS_PER_PARTITION {
        return invalid(format!(
            "a target must name 1 to {MAX_REPLICAS_PER_PARTITION} replicas"
        ));
    }
    for (i, n) in target.iter().enumerate() {
        if target[..i].contains(n) {
            return invalid(format!("broker {n} is named twice"));
        }
        if !state.brokers.contains_key(n) {
            return invalid(format!("broker {n} is not registered"));
        }
        if state.decommissioning.contains(n) && !p.has_replica(*n) {
            return invalid(format!("broker {n} is being decommissioned"));
        }
    }
    let mut union: Vec<NodeId> = target.to_vec();
    for r in &p.replicas {
        if !union.contains(&r.node) {
            union.push(r.node);
        }
    }
    if union.len() > MAX_REPLICAS_PER_PARTITION {
        return invalid(format!(
            "the target and the current replicas together exceed {MAX_REPLICAS_PER_PARTITION}"
        ));
    }
    Ok(())
}

/// The target assignments for `target` nodes: a node that already holds a replica keeps its
/// shard; a new one gets the shard of that node holding the fewest replicas (then the lowest).
pub fn assign_shards(
    state: &MetadataState,
    topic: &str,
    partition: u32,
    target: &[NodeId],
) -> Vec<ReplicaAssignment> {
    let current = state
        .partition(topic, partition)
        .map(|p| p.replicas.clone())
        .unwrap_or_default();
    target
        .iter()
        .map(|&node| {
            if let Some(r) = current.iter().find(|r| r.node == node) {
                return *r;
            }
            let shards = state.brokers.get(&node).map_or(1, |b| b.shards.max(1));
            let mut load = vec![0u64; shards as usize];
            for t in state.topics.values() {
                for p in &t.partitions {
                    for r in p.replicas.iter().filter(|r| r.node == node) {
                        if let Some(l) = load.get_mut(r.shard as usize) {
                            *l += 1;
                        }
                    }
                }
            }
            let shard = (0..shards)
                .min_by_key(|&s| (load[s as usize], s))
                .unwrap_or(0);
            ReplicaAssignment { node, shard }
        })
        .collect()
}

/// The partition's replicas while moving to `target`: the target, then every current replica
/// outside it, in their order.
pub fn union_replicas(
    current: &[ReplicaAssignment],
    target: &[ReplicaAssignment],
) -> Vec<ReplicaAssignment> {
    let mut out = target.to_vec();
    for r in current {
        if !out.iter().any(|o| o.node == r.node) {
            out.push(*r);
        }
    }
    out
}

/// Whether two replica lists name the same nodes in any order.
pub fn same_nodes(a: &[NodeId], b: &[NodeId]) -> bool {
    a.len() == b.len() && a.iter().all(|n| b.contains(n))
}

/// The next step of a move, as the partition's leader `me` sees its group's `membership`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Add this node as a learner.
    AddLearner(NodeId),
    /// Promote this learner to voter (once it has caught up to the high watermark).
    Promote(NodeId),
    /// Remove this voter or learner (not the leader).
    Remove(NodeId),
    /// The leader itself is not in the target: hand leadership to a target voter first.
    TransferAway,
    /// The voters are the target and no learner is left: report the end.
    Finish,
}

/// One membership change at a time, in an order that never shrinks the voters below the
/// smaller of the old and new sets: learners that should not be (outside the target) go
/// first, then each new replica is added as a learner and promoted, then voters outside the
/// target are removed, the leader last (by handing leadership over).
pub fn next_step(membership: &Membership, target: &[NodeId], me: NodeId) -> Step {
    if let Some(&l) = membership.learners.iter().find(|l| !target.contains(l)) {
        return Step::Remove(l);
    }
    if let Some(&l) = membership.learners.first() {
        return Step::Promote(l);
    }
    if let Some(&n) = target.iter().find(|n| !membership.contains(**n)) {
        return Step::AddLearner(n);
    }
    if let Some(&v) = membership
        .voters
        .iter()
        .find(|v| !target.contains(v) && **v != me)
    {
        return Step::Remove(v);
    }
    if !target.contains(&me) {
        return Step::TransferAway;
    }
    Step::Finish
}

/// The membership after `step` (for the steps that change it).
pub fn apply_step(membership: &Membership, step: &Step) -> Option<Membership> {
    let mut m = membership.clone();
    match step {
        Step::AddLearner(n) => m.learners.push(*n),
        Step::Promote(n) => {
            m.learners.retain(|l| l != n);
            m.voters.push(*n);
        }
        Step::Remove(n) => {
            m.learners.retain(|l| l != n);
            m.voters.retain(|v| v != n);
        }
        Step::TransferAway | Step::Finish => return None,
    }
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(voters: &[NodeId], learners: &[NodeId]) -> Membership {
        Membership {
            voters: voters.to_vec(),
            learners: learners.to_vec(),
        }
    }

    /// Drives a move to its end as a leader would, checking the voters never drop below the
    /// smaller of the old and new sets and every step is a single change.
    fn run(from: &[NodeId], target: &[NodeId], mut me: NodeId) -> Vec<Step> {
        let mut cur = m(from, &[]);
        let floor = from.len().min(target.len());
        let mut steps = Vec::new();
        for _ in 0..64 {
            let s = next_step(&cur, target, me);
            steps.push(s.clone());
            match &s {
                Step::Finish => {
                    assert!(same_nodes(&cur.voters, target) && cur.learners.is_empty());
                    return steps;
                }
                Step::TransferAway => {
                    me = *cur.voters.iter().find(|v| target.contains(v)).unwrap();
                }
                other => {
                    assert!(!matches!(other, Step::Remove(n) if *n == me));
                    cur = apply_step(&cur, other).unwrap();
                    assert!(cur.voters.len() >= floor, "{cur:?}");
                }
            }
        }
        panic!("no end: {steps:?}");
    }

    #[test]
    fn a_move_adds_promotes_then_removes_the_leader_last() {
        assert_eq!(
            run(&[1, 2, 3], &[1, 2, 4], 1),
            vec![
                Step::AddLearner(4),
                Step::Promote(4),
                Step::Remove(3),
                Step::Finish
            ]
        );
        let steps = run(&[1, 2, 3], &[2, 3, 4], 1);
        assert_eq!(
            steps[..3],
            [Step::AddLearner(4), Step::Promote(4), Step::TransferAway]
        );
        assert_eq!(steps[3], Step::Remove(1));
        run(&[1], &[2, 3, 4], 1);
        run(&[1, 2, 3, 4, 5], &[6], 3);
    }

    #[test]
    fn a_cancelled_move_removes_a_learner_that_joined() {
        // Moving to [1, 2, 4], node 4 joined as a learner, then the move is cancelled.
        let cur = m(&[1, 2, 3], &[4]);
        assert_eq!(next_step(&cur, &[1, 2, 3], 1), Step::Remove(4));
        let cur = m(&[1, 2, 3, 4], &[]);
        assert_eq!(next_step(&cur, &[1, 2, 3], 1), Step::Remove(4));
    }
}
