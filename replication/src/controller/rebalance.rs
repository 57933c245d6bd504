//! Rebalancing: the fewest replica moves that even out replica counts across brokers (a new
//! broker that joined empty, one back from a long absence), then the preferred-leader order
//! that evens out leaders, then the shards new replicas land on. Sans-IO and deterministic:
//! the caller gives the brokers and the partitions' replicas (from Metadata, client-side as
//! Kafka's tools do, or from the controller's state) and submits the plan as
//! AlterPartitionReassignments followed by a preferred-leader election.
//!
//! 1. **Replicas.** Over the eligible brokers (live, not being decommissioned, not in
//!    maintenance), with `T` replicas on `n` brokers, each broker's target is `T / n`, the
//!    `T % n` brokers holding the most getting one more: replica counts end within one of each
//!    other and exactly `sum(max(0, count - target))` replicas move, which no plan can beat.
//!    Each move takes a replica from the broker furthest above its target to the one furthest
//!    below that does not hold the partition yet (one always exists: a broker holding more
//!    partitions than another holds one the other lacks), preferring replicas that are not the
//!    preferred leader, and puts it in the same place in the replica list.
//! 2. **Leaders.** The first replica of each partition is its preferred leader. While one
//!    broker is preferred for two or more partitions more than another, a chain of reorders
//!    (`a` preferred for a partition `b` holds: make `b` first; `b` for one `c` holds; ...) moves
//!    one preferred leadership from the broker with the most to one with at least two fewer,
//!    shortest chain first. A reorder moves no data (the controller applies it at once).
//! 3. **Shards.** A replica never moves between shards of a broker (a move keeps the shard of
//!    every replica that stays), so shards are evened by where moved replicas land: each goes
//!    to the shard of its new broker holding the fewest replicas, as the controller's
//!    [`crate::controller::reassignment::assign_shards`] also chooses.
//!
//! Partitions not `movable` (already moving, or holding a replica on a decommissioning broker,
//! which the controller is draining) count toward the loads but are left as they are; replicas
//! on brokers outside the eligible set never move and count for nothing.

use std::collections::{BTreeMap, VecDeque};

use crate::controller::records::ReplicaAssignment;
use crate::types::NodeId;

/// Reorders one plan may chain for the leader pass at most: bounds the work on a huge cluster
/// (each step is a breadth-first search over the brokers).
pub const MAX_LEADER_STEPS: usize = 100_000;

/// A broker that may receive replicas, and its shard count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Broker {
    pub node: NodeId,
    pub shards: u32,
}

/// One partition as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionReplicas {
    pub topic: String,
    pub partition: u32,
    /// In order: the first is the preferred leader.
    pub replicas: Vec<ReplicaAssignment>,
    /// Whether the plan may change it (not already moving, nothing on a draining broker).
    pub movable: bool,
}

/// A change to one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub topic: String,
    pub partition: u32,
    pub from: Vec<ReplicaAssignment>,
    pub to: Vec<ReplicaAssignment>,
}

impl Move {
    /// Replicas that land on a broker that did not hold the partition (data to copy).
    pub fn replica_moves(&self) -> usize {
        self.to
            .iter()
            .filter(|t| !self.from.iter().any(|f| f.node == t.node))
            .count()
    }

    /// Whether the preferred leader changes.
    pub fn changes_leader(&self) -> bool {
        self.from.first().map(|r| r.node) != self.to.first().map(|r| r.node)
    }
}

/// A plan and the counts it gives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// One entry per partition that changes, in topic and partition order.
    pub moves: Vec<Move>,
    /// Replicas per eligible broker, before and after.
    pub replicas_before: BTreeMap<NodeId, usize>,
    pub replicas_after: BTreeMap<NodeId, usize>,
    /// Preferred leaderships per eligible broker, before and after.
    pub leaders_before: BTreeMap<NodeId, usize>,
    pub leaders_after: BTreeMap<NodeId, usize>,
}

impl Plan {
    pub fn replica_moves(&self) -> usize {
        self.moves.iter().map(Move::replica_moves).sum()
    }

    pub fn leader_changes(&self) -> usize {
        self.moves.iter().filter(|m| m.changes_leader()).count()
    }
}

fn counts(
    brokers: &[Broker],
    parts: &[PartitionReplicas],
    first_only: bool,
) -> BTreeMap<NodeId, usize> {
    let mut c: BTreeMap<NodeId, usize> = brokers.iter().map(|b| (b.node, 0)).collect();
    for p in parts {
        let replicas = if first_only {
            &p.replicas[..p.replicas.len().min(1)]
        } else {
            &p.replicas[..]
        };
        for r in replicas {
            if let Some(n) = c.get_mut(&r.node) {
                *n += 1;
            }
        }
    }
    c
}

/// Plans at most `max_moves` replica moves (leader reorders are not counted: they move no
/// data) evening out `partitions` over `brokers`.
pub fn plan(brokers: &[Broker], partitions: &[PartitionReplicas], max_moves: usize) -> Plan {
    let mut parts: Vec<PartitionReplicas> = partitions.to_vec();
    parts.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    let mut brokers: Vec<Broker> = brokers.to_vec();
    brokers.sort_by_key(|b| b.node);
    brokers.dedup_by_key(|b| b.node);
    let mut plan = Plan {
        replicas_before: counts(&brokers, &parts, false),
        leaders_before: counts(&brokers, &parts, true),
        ..Plan::default()
    };
    if !brokers.is_empty() {
        move_replicas(&brokers, &mut parts, max_moves);
        balance_leaders(&brokers, &mut parts);
    }
    plan.replicas_after = counts(&brokers, &parts, false);
    plan.leaders_after = counts(&brokers, &parts, true);
    let mut original: BTreeMap<(&str, u32), &PartitionReplicas> = BTreeMap::new();
    for p in partitions {
        original.insert((p.topic.as_str(), p.partition), p);
    }
    for p in &parts {
        let before = original[&(p.topic.as_str(), p.partition)];
        if before.replicas != p.replicas {
            plan.moves.push(Move {
                topic: p.topic.clone(),
                partition: p.partition,
                from: before.replicas.clone(),
                to: p.replicas.clone(),
            });
        }
    }
    plan
}

/// Each broker's target replica count: `T / n`, plus one for the `T % n` holding the most
/// (ties to the lower id), so that as few replicas as possible move.
fn targets(count: &BTreeMap<NodeId, usize>) -> BTreeMap<NodeId, usize> {
    let total: usize = count.values().sum();
    let n = count.len();
    let (q, r) = (total / n, total % n);
    let mut order: Vec<(NodeId, usize)> = count.iter().map(|(&k, &v)| (k, v)).collect();
    order.sort_by_key(|&(node, c)| (std::cmp::Reverse(c), node));
    order
        .iter()
        .enumerate()
        .map(|(i, &(node, _))| (node, q + usize::from(i < r)))
        .collect()
}

fn move_replicas(brokers: &[Broker], parts: &mut [PartitionReplicas], max_moves: usize) {
    let mut count = counts(brokers, parts, false);
    let target = targets(&count);
    let mut shard_load: BTreeMap<NodeId, Vec<usize>> = brokers
        .iter()
        .map(|b| (b.node, vec![0; b.shards.max(1) as usize]))
        .collect();
    for r in parts.iter().flat_map(|p| p.replicas.iter()) {
        if let Some(s) = shard_load
            .get_mut(&r.node)
            .and_then(|l| l.get_mut(r.shard as usize))
        {
            *s += 1;
        }
    }
    let mut moved = 0;
    while moved < max_moves {
        // Sources furthest above target first, destinations furthest below first.
        let mut over: Vec<NodeId> = count
            .iter()
            .filter(|(n, &c)| c > target[n])
            .map(|(&n, _)| n)
            .collect();
        over.sort_by_key(|n| (std::cmp::Reverse(count[n] - target[n]), *n));
        let mut under: Vec<NodeId> = count
            .iter()
            .filter(|(n, &c)| c < target[n])
            .map(|(&n, _)| n)
            .collect();
        under.sort_by_key(|n| (std::cmp::Reverse(target[n] - count[n]), *n));
        let mut chosen = None;
        'search: for &src in &over {
            for &dst in &under {
                // A follower replica first (no leadership to hand over), then any.
                for want_follower in [true, false] {
                    let found = parts.iter().position(|p| {
                        p.movable
                            && !p.replicas.iter().any(|r| r.node == dst)
                            && p.replicas
                                .iter()
                                .enumerate()
                                .any(|(i, r)| r.node == src && (!want_follower || i > 0))
                    });
                    if let Some(i) = found {
                        chosen = Some((i, src, dst));
                        break 'search;
                    }
                }
            }
        }
        let Some((i, src, dst)) = chosen else {
            return;
        };
        let loads = shard_load.get_mut(&dst).expect("an eligible broker");
        let shard = (0..loads.len())
            .min_by_key(|&s| (loads[s], s))
            .expect("a broker has a shard");
        loads[shard] += 1;
        let slot = parts[i]
            .replicas
            .iter_mut()
            .find(|r| r.node == src)
            .expect("found above");
        if let Some(l) = shard_load
            .get_mut(&src)
            .and_then(|l| l.get_mut(slot.shard as usize))
        {
            *l -= 1;
        }
        *slot = ReplicaAssignment {
            node: dst,
            shard: shard as u32,
        };
        *count.get_mut(&src).expect("eligible") -= 1;
        *count.get_mut(&dst).expect("eligible") += 1;
        moved += 1;
    }
}

fn balance_leaders(brokers: &[Broker], parts: &mut [PartitionReplicas]) {
    let mut lead = counts(brokers, parts, true);
    for _ in 0..MAX_LEADER_STEPS {
        let max = *lead.values().max().expect("brokers");
        // Try each broker with the most preferred leaderships: the shortest chain of reorders
        // to a broker with at least two fewer.
        let sources: Vec<NodeId> = lead
            .iter()
            .filter(|(_, &c)| c == max)
            .map(|(&n, _)| n)
            .collect();
        let path = sources
            .iter()
            .find_map(|&s| chain(&lead, parts, s, max.saturating_sub(2)));
        let Some(path) = path else {
            return;
        };
        // Each step: partition `i`, preferred on `u`, gets `v` (one of its replicas) first.
        for (i, v) in path {
            let p = &mut parts[i];
            let u = p.replicas[0].node;
            let at = p
                .replicas
                .iter()
                .position(|r| r.node == v)
                .expect("a replica");
            p.replicas.swap(0, at);
            *lead.get_mut(&u).expect("eligible") -= 1;
            *lead.get_mut(&v).expect("eligible") += 1;
        }
    }
}

/// The shortest chain of reorders moving one preferred leadership from `from` to an eligible
/// broker leading at most `at_most`: `(partition index, new first replica)` per step.
fn chain(
    lead: &BTreeMap<NodeId, usize>,
    parts: &[PartitionReplicas],
    from: NodeId,
    at_most: usize,
) -> Option<Vec<(usize, NodeId)>> {
    if lead[&from] < 2 {
        return None;
    }
    let mut prev: BTreeMap<NodeId, (NodeId, usize)> = BTreeMap::new();
    let mut queue = VecDeque::from([from]);
    while let Some(u) = queue.pop_front() {
        for (i, p) in parts.iter().enumerate() {
            if !p.movable || p.replicas.first().map(|r| r.node) != Some(u) {
                continue;
            }
            for r in &p.replicas[1..] {
                let v = r.node;
                if v == from || prev.contains_key(&v) || !lead.contains_key(&v) {
                    continue;
                }
                prev.insert(v, (u, i));
                if lead[&v] <= at_most {
                    let mut path = Vec::new();
                    let mut at = v;
                    while at != from {
                        let (back, i) = prev[&at];
                        path.push((i, at));
                        at = back;
                    }
                    path.reverse();
                    return Some(path);
                }
                queue.push_back(v);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn part(topic: &str, partition: u32, nodes: &[NodeId]) -> PartitionReplicas {
        PartitionReplicas {
            topic: topic.into(),
            partition,
            replicas: nodes
                .iter()
                .map(|&node| ReplicaAssignment { node, shard: 0 })
                .collect(),
            movable: true,
        }
    }

    fn brokers(ids: &[NodeId], shards: u32) -> Vec<Broker> {
        ids.iter().map(|&node| Broker { node, shards }).collect()
    }

    fn spread(c: &BTreeMap<NodeId, usize>) -> usize {
        c.values().max().unwrap() - c.values().min().unwrap()
    }

    #[test]
    fn a_new_empty_broker_gets_its_share_and_nothing_else_moves() {
        // Three brokers, six partitions of RF 2 (four replicas each); node 4 joins empty.
        let parts: Vec<PartitionReplicas> = [[1, 2], [2, 3], [3, 1], [1, 2], [2, 3], [3, 1]]
            .iter()
            .enumerate()
            .map(|(i, n)| part("t", i as u32, n))
            .collect();
        let p = plan(&brokers(&[1, 2, 3, 4], 2), &parts, usize::MAX);
        assert_eq!(p.replica_moves(), 3, "{p:?}");
        assert_eq!(
            p.replicas_after.values().copied().collect::<Vec<_>>(),
            [3; 4]
        );
        assert!(spread(&p.leaders_after) <= 1, "{p:?}");
        for m in &p.moves {
            assert!(m.replica_moves() <= 1);
        }
        // Already even: nothing to do.
        let mut after = parts.clone();
        for m in &p.moves {
            let i = m.partition as usize;
            after[i].replicas = m.to.clone();
        }
        assert_eq!(
            plan(&brokers(&[1, 2, 3, 4], 2), &after, usize::MAX).moves,
            []
        );
    }

    #[test]
    fn max_moves_and_frozen_partitions_are_respected() {
        let mut parts: Vec<PartitionReplicas> = (0..8).map(|i| part("t", i, &[1, 2])).collect();
        parts[0].movable = false;
        let p = plan(&brokers(&[1, 2, 3, 4], 1), &parts, 2);
        assert_eq!(p.replica_moves(), 2);
        assert!(p.moves.iter().all(|m| m.partition != 0));
        // Sixteen replicas over three brokers: five land on node 3, spread over its shards.
        let p = plan(&brokers(&[1, 2, 3], 4), &parts, usize::MAX);
        let mut shards: Vec<u32> = p
            .moves
            .iter()
            .flat_map(|m| m.to.iter().filter(|r| r.node == 3).map(|r| r.shard))
            .collect();
        shards.sort_unstable();
        assert_eq!(shards, vec![0, 0, 1, 2, 3]);
    }

    #[test]
    fn leaders_even_out_by_reordering_without_moving_data() {
        let parts: Vec<PartitionReplicas> = (0..6).map(|i| part("t", i, &[1, 2, 3])).collect();
        let p = plan(&brokers(&[1, 2, 3], 1), &parts, usize::MAX);
        assert_eq!(p.replica_moves(), 0);
        assert_eq!(p.leader_changes(), 4);
        assert_eq!(
            p.leaders_after.values().copied().collect::<Vec<_>>(),
            [2; 3]
        );
    }

    /// Brokers 1..=n eligible, plus broker 100 not eligible; partitions of RF 1..=3.
    fn cluster() -> impl Strategy<Value = (usize, u32, Vec<Vec<NodeId>>)> {
        (3usize..8, 1u32..4).prop_flat_map(|(n, shards)| {
            let mut nodes: Vec<NodeId> = (1..=n as NodeId).collect();
            nodes.push(100);
            let partition = (1usize..=3)
                .prop_flat_map(move |rf| proptest::sample::subsequence(nodes.clone(), rf))
                .prop_shuffle();
            (
                Just(n),
                Just(shards),
                proptest::collection::vec(partition, 1..80),
            )
        })
    }

    proptest! {
        #[test]
        fn plans_keep_partitions_whole_and_end_even(
            (n, shards, lists) in cluster(),
            frozen in proptest::collection::vec(any::<bool>(), 80),
        ) {
            let eligible: Vec<NodeId> = (1..=n as NodeId).collect();
            let bs = brokers(&eligible, shards);
            let parts: Vec<PartitionReplicas> = lists
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let mut p = part("t", i as u32, l);
                    for (k, r) in p.replicas.iter_mut().enumerate() {
                        r.shard = (i as u32 + k as u32) % shards;
                    }
                    p
                })
                .collect();
            let p = plan(&bs, &parts, usize::MAX);
            for m in &p.moves {
                let before = &parts[m.partition as usize];
                // Same replication factor, distinct brokers, nothing onto or off an
                // ineligible broker, kept replicas keep their shard.
                prop_assert_eq!(m.to.len(), before.replicas.len());
                let mut nodes: Vec<NodeId> = m.to.iter().map(|r| r.node).collect();
                nodes.sort_unstable();
                nodes.dedup();
                prop_assert_eq!(nodes.len(), m.to.len());
                prop_assert_eq!(
                    before.replicas.iter().any(|r| r.node == 100),
                    m.to.iter().any(|r| r.node == 100)
                );
                for r in &m.to {
                    prop_assert!(r.shard < shards);
                    if let Some(f) = before.replicas.iter().find(|f| f.node == r.node) {
                        prop_assert_eq!(f.shard, r.shard);
                    }
                }
            }
            // Replica counts end within one, with the fewest moves possible.
            prop_assert!(spread(&p.replicas_after) <= 1, "{:?}", p.replicas_after);
            let target = targets(&p.replicas_before);
            let least: usize = p
                .replicas_before
                .iter()
                .map(|(k, &c)| c.saturating_sub(target[k]))
                .sum();
            prop_assert_eq!(p.replica_moves(), least);
            // Already even: the plan is empty.
            if spread(&p.replicas_before) <= 1 && spread(&p.leaders_before) <= 1 {
                prop_assert!(p.moves.is_empty());
            }
            // Leaders never end less even than they started.
            prop_assert!(spread(&p.leaders_after) <= spread(&p.leaders_before).max(1));
            // Running the plan's result again changes nothing.
            let mut after = parts.clone();
            for m in &p.moves {
                after[m.partition as usize].replicas = m.to.clone();
            }
            prop_assert_eq!(plan(&bs, &after, usize::MAX).moves, vec![]);
            // Frozen partitions never change; a cap bounds the moves.
            let mut some_frozen = parts.clone();
            for (p, f) in some_frozen.iter_mut().zip(&frozen) {
                p.movable = !f;
            }
            let capped = plan(&bs, &some_frozen, 3);
            prop_assert!(capped.replica_moves() <= 3);
            for m in &capped.moves {
                prop_assert!(some_frozen[m.partition as usize].movable);
            }
        }
    }
}
