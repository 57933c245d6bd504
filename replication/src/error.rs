//! Errors the consensus core returns to its caller.

use crate::types::NodeId;

/// Why a request to the consensus core was refused. Nothing was changed when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Only the leader accepts proposals; `leader` is the last leader this replica heard from.
    #[error("not the leader (leader hint: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    /// Leadership is being handed to another replica; proposals wait for the new leader.
    #[error("leadership transfer to {target} in progress")]
    TransferInProgress { target: NodeId },
    /// A proposed batch has no records, or the proposal holds more batches than allowed.
    #[error("invalid proposal: {reason}")]
    InvalidProposal { reason: &'static str },
    /// The node named is not a member of the group in the role the request needs.
    #[error("node {node} is not a {role} of this group")]
    NotMember { node: NodeId, role: &'static str },
    /// A membership change waits until the leader has committed in its epoch and the previous
    /// change is committed (one change at a time keeps every two majorities overlapping).
    #[error("membership change not allowed now: {reason}")]
    MembershipChangeRefused { reason: &'static str },
    /// The group id is not hosted on this node.
    #[error("unknown group {0}")]
    UnknownGroup(u64),
}
