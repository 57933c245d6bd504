//! Where a partition's leader is, as this node's applied cluster metadata says: the KIP-951
//! hints (`current_leader`, `node_endpoints`) a NOT_LEADER_OR_FOLLOWER answer carries, so
//! clients that read them (librdkafka 2.x, the Java client) go to the new leader without a
//! Metadata round trip first. And the node a cluster's group coordinator is on.

use spate_replication::controller::view::ClusterView;

/// A partition's leader and epoch as the controller recorded them; -1 for "none known".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaderHint {
    pub leader_id: i32,
    pub leader_epoch: i32,
}

/// A broker's Kafka endpoint, for `node_endpoints`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub node_id: i32,
    pub host: String,
    pub port: u16,
}

/// The leader of `topic`/`partition` in `view`, if the partition is known there.
pub fn leader_hint(view: &ClusterView, topic: &str, partition: i32) -> Option<LeaderHint> {
    let p = view
        .metadata
        .partition(topic, u32::try_from(partition).ok()?)?;
    Some(LeaderHint {
        leader_id: p
            .elected_leader()
            .and_then(|n| i32::try_from(n).ok())
            .unwrap_or(-1),
        leader_epoch: p.leader_epoch,
    })
}

/// The Kafka endpoint of a live (unfenced) broker.
pub fn endpoint(view: &ClusterView, node_id: i32) -> Option<Endpoint> {
    let node = u64::try_from(node_id).ok()?;
    view.live_brokers()
        .find(|b| b.node == node)
        .map(|b| Endpoint {
            node_id,
            host: b.kafka.host.clone(),
            port: b.kafka.port,
        })
}

/// The endpoints of the leaders named in `hints`, each once, in id order.
pub fn endpoints_of(
    view: &ClusterView,
    hints: impl IntoIterator<Item = LeaderHint>,
) -> Vec<Endpoint> {
    let mut ids: Vec<i32> = hints
        .into_iter()
        .map(|h| h.leader_id)
        .filter(|&id| id >= 0)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter()
        .filter_map(|id| endpoint(view, id))
        .collect()
}

/// The coordinator of the groups of `__consumer_offsets` partition `partition` in a
/// cluster: that partition's elected leader, as Kafka places coordinators, if it is a live
/// broker. `None` while it has no leader or this node does not know the topic yet: clients
/// retry (COORDINATOR_NOT_AVAILABLE).
pub fn group_coordinator(view: &ClusterView, partition: i32) -> Option<Endpoint> {
    let hint = leader_hint(view, crate::group::OFFSETS_TOPIC, partition)?;
    endpoint(view, hint.leader_id)
}
