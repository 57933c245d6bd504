//! The cluster as one node sees it, published by the controller driver for the Kafka port
//! (Metadata, DescribeCluster, DescribeQuorum) and the admin tools. Readers on the shards take
//! a cheap snapshot (an `Arc`); the driver replaces it when something changed.

use std::sync::{Arc, RwLock};

use crate::controller::records::Endpoint;
use crate::controller::{BrokerInfo, MetadataState};
use crate::types::{Epoch, NodeId, Offset};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerView {
    pub node: NodeId,
    pub kafka: Endpoint,
    pub rpc: Endpoint,
    /// Not heard from within the session timeout (or not yet unfenced): not serving.
    pub fenced: bool,
    /// A metadata voter (one of the seeds).
    pub voter: bool,
}

impl BrokerView {
    /// Broker `node` as its registration in the applied metadata shows it.
    pub fn of(node: NodeId, info: &BrokerInfo, voter: bool) -> Self {
        BrokerView {
            node,
            kafka: info.kafka.clone(),
            rpc: info.rpc.clone(),
            fenced: info.fenced,
            voter,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    pub cluster_id: String,
    /// The node publishing this view.
    pub node_id: NodeId,
    /// The metadata-log leader (the active controller) this node knows, and its epoch.
    pub controller: Option<NodeId>,
    pub controller_epoch: Epoch,
    pub voters: Vec<NodeId>,
    /// Every registered broker, fenced or not, by id.
    pub brokers: Vec<BrokerView>,
    /// How far this node has applied the metadata log.
    pub high_watermark: Offset,
    /// On the controller leader: each voter's log end as far as the leader knows.
    pub voter_progress: Vec<(NodeId, Option<Offset>)>,
    /// The applied metadata: topics, their partitions' replicas (node and shard), leaders,
    /// leader epochs and ISRs. What Metadata answers from and what the shards host.
    pub metadata: Arc<MetadataState>,
    /// This node's current incarnation is registered and unfenced in the applied metadata:
    /// it has applied the log at least past its own registration (the controller unfences a
    /// broker only then), so a topic it does not know does not exist as of then. A node that
    /// just started replays or fetches the log first and may not know topics yet.
    pub caught_up: bool,
    pub generation: u64,
}

impl ClusterView {
    /// The brokers clients may use: registered and not fenced.
    pub fn live_brokers(&self) -> impl Iterator<Item = &BrokerView> {
        self.brokers.iter().filter(|b| !b.fenced)
    }
}

/// The latest [`ClusterView`], shared between the driver's thread and the shards.
#[derive(Debug, Clone, Default)]
pub struct SharedClusterView(Arc<RwLock<Arc<ClusterView>>>);

impl SharedClusterView {
    pub fn new(initial: ClusterView) -> Self {
        SharedClusterView(Arc::new(RwLock::new(Arc::new(initial))))
    }

    pub fn get(&self) -> Arc<ClusterView> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, v: ClusterView) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(v);
    }
}
