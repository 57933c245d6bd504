//! Decommissioning a broker: draining every replica off it so it can be retired. Pure
//! functions of the applied metadata, shared by the active controller (which checks a request
//! and plans the moves on its tick) and the Kafka layer and CLI (which show progress); no I/O,
//! no clock.
//!
//! Decommissioning is a flag in the metadata log ([`Record::SetDecommission`]). While it is
//! set, the active controller records a [`Record::Reassign`] for each partition holding a
//! replica on the node, replacing that replica with one on a live broker that is not being
//! decommissioned and holds the fewest replicas, at most [`MAX_DECOMMISSION_MOVES_IN_FLIGHT`]
//! such moves under way at once; partition leaders carry the moves out as any other move
//! (learners, promotion, removal), and the controller records new ones as old ones finish.
//! Because the plan is recomputed from the applied state on every tick, a new active
//! controller picks the drain up where the last one left it. Recommission clears the flag: no
//! new moves start, and moves already recorded run to their end (cancel them with
//! AlterPartitionReassignments if wanted; a rebalance brings replicas back).

use std::collections::BTreeMap;

use crate::controller::records::{Record, ReplicaAssignment};
use crate::controller::state::MetadataState;
use crate::types::NodeId;

/// Drain moves under way at once, cluster-wide: each copies a partition's whole log to a new
/// replica, so a few at a time keep the catch-up traffic (already bounded per node by the
/// replication throttle) from starving producers, while enough run in parallel for a node of
/// a few thousand partitions to drain in reasonable time.
pub const MAX_DECOMMISSION_MOVES_IN_FLIGHT: usize = 16;

/// Why a decommission request is refused: the message for the operator.
pub fn check_request(state: &MetadataState, node: NodeId) -> Result<(), String> {
    let remaining: Vec<NodeId> = state
        .placement_brokers()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|&n| n != node)
        .collect();
    let draining = |n: NodeId| n == node || state.decommissioning.contains(&n);
    for (topic, t) in &state.topics {
        for (i, p) in t.partitions.iter().enumerate() {
            if !p.replicas.iter().any(|r| draining(r.node)) {
                continue;
            }
            let rf = state
                .reassignment(topic, i as u32)
                .map_or(p.replicas.len(), |r| r.target.len());
            if rf > remaining.len() {
                return Err(format!(
                    "cannot decommission node {node}: partition {topic}-{i} has replication \
                     factor {rf}, but only {} live broker(s) would remain ({remaining:?}); add a \
                     broker or bring a fenced one back first",
                    remaining.len()
                ));
            }
        }
    }
    Ok(())
}

/// Whether a partition with these replicas (its union while moving) still holds a replica on
/// a decommissioning node.
fn holds_draining(state: &MetadataState, replicas: &[ReplicaAssignment]) -> bool {
    replicas
        .iter()
        .any(|r| state.decommissioning.contains(&r.node))
}

/// Moves under way that take a replica off a decommissioning node.
pub fn moves_in_flight(state: &MetadataState) -> usize {
    state
        .reassignments
        .iter()
        .filter(|((topic, partition), r)| {
            let replicas = state
                .partition(topic, *partition)
                .map(|p| p.replicas.as_slice())
                .unwrap_or_default();
            holds_draining(state, replicas)
                && !r
                    .target
                    .iter()
                    .any(|t| state.decommissioning.contains(&t.node))
        })
        .count()
}

/// Replicas `node` holds (moving partitions counted while it is among their replicas), and the
/// moves under way that take one off it.
pub fn progress(state: &MetadataState, node: NodeId) -> (usize, usize) {
    let mut replicas = 0;
    let mut moving = 0;
    for (topic, t) in &state.topics {
        for (i, p) in t.partitions.iter().enumerate() {
            if !p.has_replica(node) {
                continue;
            }
            replicas += 1;
            let leaving = state
                .reassignment(topic, i as u32)
                .is_some_and(|r| !r.target.iter().any(|a| a.node == node));
            if leaving {
                moving += 1;
            }
        }
    }
    (replicas, moving)
}

/// Per broker that may receive replicas: its replica count and its shards' replica counts.
struct Loads {
    nodes: BTreeMap<NodeId, (usize, Vec<usize>)>,
}

impl Loads {
    fn of(state: &MetadataState) -> Self {
        let mut nodes: BTreeMap<NodeId, (usize, Vec<usize>)> = state
            .placement_brokers()
            .into_iter()
            .map(|(n, shards)| (n, (0, vec![0; shards.max(1) as usize])))
            .collect();
        for p in state.topics.values().flat_map(|t| t.partitions.iter()) {
            for r in &p.replicas {
                if let Some((count, shards)) = nodes.get_mut(&r.node) {
                    *count += 1;
                    if let Some(s) = shards.get_mut(r.shard as usize) {
                        *s += 1;
                    }
                }
            }
        }
        Loads { nodes }
    }

    /// The broker outside `taken` holding the fewest replicas (then the lowest id), and its
    /// shard holding the fewest; counted as holding one more from now on.
    fn take(&mut self, taken: &[NodeId]) -> Option<ReplicaAssignment> {
        let (&node, _) = self
            .nodes
            .iter()
            .filter(|(n, _)| !taken.contains(n))
            .min_by_key(|(&n, (count, _))| (*count, n))?;
        let (count, shards) = self.nodes.get_mut(&node).expect("chosen above");
        let shard = (0..shards.len())
            .min_by_key(|&s| (shards[s], s))
            .expect("a broker has a shard");
        *count += 1;
        shards[shard] += 1;
        Some(ReplicaAssignment {
            node,
            shard: shard as u32,
        })
    }

    /// Undoes a [`Self::take`] whose partition was not moved after all.
    fn give_back(&mut self, a: ReplicaAssignment) {
        let (count, shards) = self.nodes.get_mut(&a.node).expect("taken from here");
        *count -= 1;
        shards[a.shard as usize] -= 1;
    }
}

/// The next drain moves: for partitions holding a replica on a decommissioning node and not
/// already moving, a [`Record::Reassign`] whose target replaces each such replica, in place
/// (so a drained preferred leader's replacement is preferred), with one on the broker holding
/// the fewest replicas among the live, non-decommissioning brokers not already in the
/// partition; at most enough to bring the drain moves under way up to
/// [`MAX_DECOMMISSION_MOVES_IN_FLIGHT`]. A partition for which no broker is free (one is
/// down) is skipped until one is.
pub fn plan_moves(state: &MetadataState) -> Vec<Record> {
    if state.decommissioning.is_empty() {
        return Vec::new();
    }
    let mut budget = MAX_DECOMMISSION_MOVES_IN_FLIGHT.saturating_sub(moves_in_flight(state));
    if budget == 0 {
        return Vec::new();
    }
    let mut loads = Loads::of(state);
    let mut out = Vec::new();
    for (topic, t) in &state.topics {
        // This topic's moving partitions, found once (a lookup per partition builds a key).
        let moving: Vec<u32> = state
            .reassignments
            .range((topic.clone(), 0)..=(topic.clone(), u32::MAX))
            .map(|((_, p), _)| *p)
            .collect();
        for (i, p) in t.partitions.iter().enumerate() {
            let partition = i as u32;
            if !holds_draining(state, &p.replicas) || moving.contains(&partition) {
                continue;
            }
            let mut taken: Vec<NodeId> = p.replicas.iter().map(|r| r.node).collect();
            let mut target = Vec::with_capacity(p.replicas.len());
            let mut complete = true;
            for r in &p.replicas {
                if !state.decommissioning.contains(&r.node) {
                    target.push(*r);
                    continue;
                }
                match loads.take(&taken) {
                    Some(a) => {
                        taken.push(a.node);
                        target.push(a);
                    }
                    None => {
                        complete = false;
                        break;
                    }
                }
            }
            if !complete {
                // No broker is free for one of its replicas (one is down): what the others
                // took is given back.
                for a in &target[..] {
                    if !p.replicas.contains(a) {
                        loads.give_back(*a);
                    }
                }
                continue;
            }
            out.push(Record::Reassign {
                topic: topic.clone(),
                partition,
                target: Some(target),
            });
            budget -= 1;
            if budget == 0 {
                return out;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::records::{BrokerRegistration, Endpoint, PartitionState};
    use proptest::prelude::*;

    fn broker(state: &mut MetadataState, node: NodeId, shards: u32) {
        let e = Endpoint {
            host: "h".into(),
            port: 1,
        };
        state
            .apply(&Record::RegisterBroker(BrokerRegistration {
                node,
                node_uuid: u128::from(node) + 1,
                broker_epoch: state.last_broker_epoch + 1,
                rpc: e.clone(),
                kafka: e,
                shards,
            }))
            .unwrap();
        let epoch = state.brokers[&node].broker_epoch;
        state
            .apply(&Record::UnfenceBroker {
                node,
                broker_epoch: epoch,
            })
            .unwrap();
    }

    /// A state with `brokers` live brokers (ids 1..) of `shards` shards and a topic "t" whose
    /// partitions have the given replica nodes (shard = partition index modulo shards).
    fn state(brokers: u64, shards: u32, partitions: &[Vec<NodeId>]) -> MetadataState {
        let mut s = MetadataState::new();
        for n in 1..=brokers {
            broker(&mut s, n, shards);
        }
        let partitions = partitions
            .iter()
            .enumerate()
            .map(|(i, nodes)| PartitionState {
                replicas: nodes
                    .iter()
                    .map(|&node| ReplicaAssignment {
                        node,
                        shard: i as u32 % shards,
                    })
                    .collect(),
                isr: nodes.clone(),
                leader: None,
                leader_epoch: 0,
            })
            .collect();
        s.apply(&Record::CreateTopic {
            name: "t".into(),
            topic_id: 1,
            configs: Vec::new(),
            partitions,
        })
        .unwrap();
        s
    }

    /// Applies plans (and finishes each move at once, as a leader would) until none is left;
    /// returns the rounds it took.
    fn drain(s: &mut MetadataState) -> usize {
        for round in 0..10_000 {
            let plan = plan_moves(s);
            assert!(plan.len() <= MAX_DECOMMISSION_MOVES_IN_FLIGHT);
            if plan.is_empty() && s.reassignments.is_empty() {
                return round;
            }
            for r in &plan {
                s.apply(r).unwrap();
            }
            let moving: Vec<(String, u32)> = s.reassignments.keys().cloned().collect();
            for (topic, partition) in moving {
                let replicas = s.reassignments[&(topic.clone(), partition)].target_nodes();
                s.apply(&Record::FinishReassignment {
                    topic,
                    partition,
                    replicas,
                })
                .unwrap();
            }
        }
        panic!("no end");
    }

    #[test]
    fn a_drain_replaces_the_node_in_place_on_the_least_loaded_brokers() {
        let mut s = state(4, 1, &[vec![1, 2, 3], vec![2, 1, 3], vec![2, 3, 4]]);
        s.apply(&Record::SetDecommission { node: 1, on: true })
            .unwrap();
        let plan = plan_moves(&s);
        // Node 4 holds one replica, the others more: both moves go to it, in node 1's place.
        let targets: Vec<Vec<NodeId>> = plan
            .iter()
            .map(|r| match r {
                Record::Reassign {
                    target: Some(t), ..
                } => t.iter().map(|a| a.node).collect(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(targets, vec![vec![4, 2, 3], vec![2, 4, 3]]);
        for r in &plan {
            s.apply(r).unwrap();
        }
        // Under way: nothing new is planned for the same partitions.
        assert!(plan_moves(&s).is_empty());
        assert_eq!(progress(&s, 1), (2, 2));
        drain(&mut s);
        assert_eq!(progress(&s, 1), (0, 0));
    }

    #[test]
    fn too_few_brokers_left_is_refused_and_recommission_stops_new_moves() {
        let s = state(3, 1, &[vec![1, 2, 3]]);
        let why = check_request(&s, 1).unwrap_err();
        assert!(why.contains("replication factor 3"), "{why}");
        let mut s = state(4, 1, &[vec![1, 2, 3], vec![1, 2, 4]]);
        assert_eq!(check_request(&s, 1), Ok(()));
        s.apply(&Record::SetDecommission { node: 1, on: true })
            .unwrap();
        // A second node would leave two brokers for replication factor 3.
        assert!(check_request(&s, 2).is_err());
        // Each partition's replacement is the one broker it does not hold yet.
        let targets: Vec<Option<Vec<ReplicaAssignment>>> = plan_moves(&s)
            .into_iter()
            .map(|r| match r {
                Record::Reassign { target, .. } => target,
                other => panic!("{other:?}"),
            })
            .collect();
        let nodes = |t: &Option<Vec<ReplicaAssignment>>| {
            t.as_ref()
                .unwrap()
                .iter()
                .map(|a| a.node)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            targets.iter().map(nodes).collect::<Vec<_>>(),
            [[4, 2, 3], [3, 2, 4]]
        );
        s.apply(&Record::SetDecommission { node: 1, on: false })
            .unwrap();
        assert!(plan_moves(&s).is_empty());
    }

    #[test]
    fn at_most_the_cap_moves_at_once() {
        let parts: Vec<Vec<NodeId>> = (0..100).map(|i| vec![1, 2 + i % 3]).collect();
        let mut s = state(5, 2, &parts);
        s.apply(&Record::SetDecommission { node: 1, on: true })
            .unwrap();
        let plan = plan_moves(&s);
        assert_eq!(plan.len(), MAX_DECOMMISSION_MOVES_IN_FLIGHT);
        for r in &plan {
            s.apply(r).unwrap();
        }
        assert!(plan_moves(&s).is_empty());
        let rounds = drain(&mut s);
        assert!(rounds >= 100 / MAX_DECOMMISSION_MOVES_IN_FLIGHT, "{rounds}");
    }

    fn cluster() -> impl Strategy<Value = (u64, u32, Vec<Vec<NodeId>>)> {
        (3u64..8, 1u32..4).prop_flat_map(|(brokers, shards)| {
            let partition = (1usize..=3)
                .prop_flat_map(move |rf| {
                    proptest::sample::subsequence((1..=brokers).collect::<Vec<_>>(), rf)
                })
                .prop_shuffle();
            (
                Just(brokers),
                Just(shards),
                proptest::collection::vec(partition, 1..60),
            )
        })
    }

    proptest! {
        /// Draining one node (when allowed) ends with no replica on it, every partition keeping
        /// its replication factor with distinct nodes, no replica on another draining node, and
        /// replica counts on the receiving brokers as even as a greedy fill makes them.
        #[test]
        fn a_drain_ends_empty_and_keeps_every_partition_whole(
            (brokers, shards, parts) in cluster(),
            node in 1u64..8,
        ) {
            let mut s = state(brokers, shards, &parts);
            let node = (node - 1) % brokers + 1;
            let allowed = check_request(&s, node).is_ok();
            let max_rf = parts.iter().filter(|p| p.contains(&node)).map(Vec::len).max();
            prop_assert_eq!(allowed, max_rf.is_none_or(|rf| rf < brokers as usize));
            if !allowed {
                return Ok(());
            }
            s.apply(&Record::SetDecommission { node, on: true }).unwrap();
            drain(&mut s);
            prop_assert_eq!(progress(&s, node), (0, 0));
            for (i, p) in s.topics["t"].partitions.iter().enumerate() {
                prop_assert_eq!(p.replicas.len(), parts[i].len());
                let mut nodes: Vec<NodeId> = p.replicas.iter().map(|r| r.node).collect();
                nodes.sort_unstable();
                nodes.dedup();
                prop_assert_eq!(nodes.len(), parts[i].len());
                // Replicas that were not on the node did not move.
                for r in &parts[i] {
                    prop_assert!(*r == node || p.has_replica(*r));
                }
                for r in &p.replicas {
                    prop_assert!(r.shard < shards);
                }
            }
        }
    }
}
