//! The first exchange on every rpc connection: each side sends a [`Hello`] naming its cluster,
//! node id and node UUID, and checks the other's before anything else is accepted.
//!
//! A node of another cluster is refused; so is a node id presented with a UUID other than the
//! one this node knows for it (a wiped node reusing its id, or an impostor), until an operator
//! unregisters the old node and this node is told to [`PeerDirectory::forget`] it.

use std::collections::BTreeMap;

use crate::controller::records::MAX_NODE_ID;
use crate::identity::NodeIdentity;
use crate::types::NodeId;

/// The rpc protocol version this build speaks; a peer with another one is refused. 2: appends
/// carry a quiescence token, and shards ping their peers (`Liveness`).
pub const RPC_PROTOCOL_VERSION: u16 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u16,
    pub cluster_id: String,
    pub node_id: NodeId,
    pub node_uuid: u128,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("peer speaks rpc protocol version {theirs}, this node {ours}")]
    Version { ours: u16, theirs: u16 },
    #[error("peer node {node} belongs to cluster {theirs:?}, this node to {ours:?}")]
    ClusterMismatch {
        node: NodeId,
        ours: String,
        theirs: String,
    },
    #[error(
        "peer claims node id {node} with node UUID {offered:032x}, but that id belongs to \
         {known:032x} (a wiped or foreign node reusing the id; unregister the old node first)"
    )]
    NodeIdReused {
        node: NodeId,
        known: u128,
        offered: u128,
    },
    #[error("dialed node {expected}, but the peer is node {got}")]
    UnexpectedNode { expected: NodeId, got: NodeId },
    #[error("peer sent no node UUID")]
    MissingUuid,
    #[error("peer node id {0} is outside Kafka's broker id range")]
    InvalidNodeId(NodeId),
}

/// This node's identity and the UUID it knows for every peer id.
#[derive(Debug, Clone)]
pub struct PeerDirectory {
    local: Hello,
    known: BTreeMap<NodeId, u128>,
}

impl PeerDirectory {
    pub fn new(local: &NodeIdentity) -> Self {
        let mut known = BTreeMap::new();
        known.insert(local.node_id, local.node_uuid);
        PeerDirectory {
            local: Hello {
                protocol_version: RPC_PROTOCOL_VERSION,
                cluster_id: local.cluster_id.clone(),
                node_id: local.node_id,
                node_uuid: local.node_uuid,
            },
            known,
        }
    }

    /// What this node sends first.
    pub fn hello(&self) -> Hello {
        self.local.clone()
    }

    /// Records a peer's UUID learned elsewhere (from its registration in the metadata log).
    pub fn learn(&mut self, node: NodeId, node_uuid: u128) -> Result<(), HandshakeError> {
        match self.known.get(&node) {
            Some(&known) if known != node_uuid => Err(HandshakeError::NodeIdReused {
                node,
                known,
                offered: node_uuid,
            }),
            _ => {
                self.known.insert(node, node_uuid);
                Ok(())
            }
        }
    }

    /// The operator unregistered `node`: its id may come back with a new UUID.
    pub fn forget(&mut self, node: NodeId) {
        if node != self.local.node_id {
            self.known.remove(&node);
        }
    }

    /// Checks a peer's hello; `dialed` is the node this side connected to, if it dialed. A
    /// peer seen for the first time is remembered, so its id is bound to its UUID from then on.
    pub fn admit(&mut self, hello: &Hello, dialed: Option<NodeId>) -> Result<(), HandshakeError> {
        if hello.protocol_version != RPC_PROTOCOL_VERSION {
            return Err(HandshakeError::Version {
                ours: RPC_PROTOCOL_VERSION,
                theirs: hello.protocol_version,
            });
        }
        if hello.cluster_id != self.local.cluster_id {
            return Err(HandshakeError::ClusterMismatch {
                node: hello.node_id,
                ours: self.local.cluster_id.clone(),
                theirs: hello.cluster_id.clone(),
            });
        }
        if hello.node_uuid == 0 {
            return Err(HandshakeError::MissingUuid);
        }
        if hello.node_id > MAX_NODE_ID {
            return Err(HandshakeError::InvalidNodeId(hello.node_id));
        }
        if let Some(expected) = dialed {
            if expected != hello.node_id {
                return Err(HandshakeError::UnexpectedNode {
                    expected,
                    got: hello.node_id,
                });
            }
        }
        self.learn(hello.node_id, hello.node_uuid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(node_id: NodeId, node_uuid: u128, cluster: &str) -> NodeIdentity {
        NodeIdentity {
            node_id,
            node_uuid,
            cluster_id: cluster.into(),
        }
    }

    #[test]
    fn peers_of_the_cluster_are_admitted_and_bound_to_their_uuid() {
        let mut a = PeerDirectory::new(&ident(1, 11, "c"));
        let b = PeerDirectory::new(&ident(2, 22, "c"));
        a.admit(&b.hello(), Some(2)).unwrap();
        a.admit(&b.hello(), None).unwrap();
        let wiped = PeerDirectory::new(&ident(2, 23, "c"));
        let e = a.admit(&wiped.hello(), None).unwrap_err();
        assert_eq!(
            e,
            HandshakeError::NodeIdReused {
                node: 2,
                known: 22,
                offered: 23
            }
        );
        assert!(e.to_string().contains("unregister"), "{e}");
        a.forget(2);
        a.admit(&wiped.hello(), None).unwrap();
    }

    #[test]
    fn wrong_cluster_wrong_node_and_impostors_are_refused() {
        let mut a = PeerDirectory::new(&ident(1, 11, "c"));
        let other = PeerDirectory::new(&ident(2, 22, "d"));
        assert!(matches!(
            a.admit(&other.hello(), None),
            Err(HandshakeError::ClusterMismatch { .. })
        ));
        let b = PeerDirectory::new(&ident(2, 22, "c"));
        assert!(matches!(
            a.admit(&b.hello(), Some(3)),
            Err(HandshakeError::UnexpectedNode {
                expected: 3,
                got: 2
            })
        ));
        // Someone claiming this node's own id.
        let me = PeerDirectory::new(&ident(1, 99, "c"));
        assert!(matches!(
            a.admit(&me.hello(), None),
            Err(HandshakeError::NodeIdReused { node: 1, .. })
        ));
        a.forget(1);
        assert!(
            a.admit(&me.hello(), None).is_err(),
            "own id is never forgotten"
        );
        let mut huge = b.hello();
        huge.node_id = u64::MAX;
        assert_eq!(
            a.admit(&huge, None),
            Err(HandshakeError::InvalidNodeId(u64::MAX))
        );
        let mut old = b.hello();
        old.protocol_version = 0;
        assert!(matches!(
            a.admit(&old, None),
            Err(HandshakeError::Version { .. })
        ));
    }
}
