//! A cluster's applied metadata built from real controller records, for the unit tests of
//! what the Kafka layer answers from it.

use std::sync::Arc;

use spate_replication::controller::records::{
    BrokerRegistration, Endpoint, PartitionState, Record, ReplicaAssignment,
};
use spate_replication::controller::view::{BrokerView, ClusterView};
use spate_replication::controller::MetadataState;
use spate_replication::types::NodeId;

pub(crate) fn endpoint(port: u16) -> Endpoint {
    Endpoint {
        host: "127.0.0.1".into(),
        port,
    }
}

pub(crate) fn replicas(nodes: &[NodeId]) -> Vec<ReplicaAssignment> {
    nodes
        .iter()
        .map(|&node| ReplicaAssignment { node, shard: 0 })
        .collect()
}

/// Three brokers, a topic of three partitions led by 1 and 2, then broker 3 fenced and
/// partition 2 left leaderless: every state reached by applying real records.
pub(crate) fn state() -> MetadataState {
    let mut s = MetadataState::new();
    let mut apply = |r: Record| s.apply(&r).map(drop).unwrap_or_else(|e| panic!("{e}"));
    for node in 1..=3u64 {
        apply(Record::RegisterBroker(BrokerRegistration {
            node,
            node_uuid: u128::from(node) * 77,
            broker_epoch: node,
            rpc: endpoint(9190 + node as u16),
            kafka: endpoint(9090 + node as u16),
            shards: 1,
        }));
        apply(Record::UnfenceBroker {
            node,
            broker_epoch: node,
        });
    }
    let part = |nodes: &[NodeId], leader: NodeId, epoch| PartitionState {
        replicas: replicas(nodes),
        isr: nodes.to_vec(),
        leader: Some(leader),
        leader_epoch: epoch,
    };
    apply(Record::CreateTopic {
        name: "orders".into(),
        topic_id: 0xabc,
        configs: vec![],
        partitions: vec![
            part(&[1, 2, 3], 1, 4),
            part(&[2, 3, 1], 2, 1),
            part(&[3, 1, 2], 3, 2),
        ],
    });
    // Broker 3 goes away: its leadership is dropped (epoch kept), then it is fenced.
    apply(Record::PartitionChange {
        topic: "orders".into(),
        partition: 2,
        leader: None,
        leader_epoch: 2,
        isr: vec![3],
    });
    apply(Record::PartitionChange {
        topic: "orders".into(),
        partition: 1,
        leader: Some(2),
        leader_epoch: 1,
        isr: vec![2, 1],
    });
    apply(Record::FenceBroker {
        node: 3,
        broker_epoch: 3,
    });
    s
}

/// The view a node publishes for `state`: its brokers as registered, fenced or not.
pub(crate) fn view_of(state: MetadataState) -> ClusterView {
    ClusterView {
        brokers: state
            .brokers
            .iter()
            .map(|(&node, b)| BrokerView::of(node, b, true))
            .collect(),
        metadata: Arc::new(state),
        ..ClusterView::default()
    }
}
