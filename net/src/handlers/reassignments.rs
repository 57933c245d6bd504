//! AlterPartitionReassignments (KIP-455, API 45, v0) and ListPartitionReassignments (API 46,
//! v0): moving partitions' replicas between brokers. A move is a record in the controller log
//! (`controller/reassignment.rs`); the partition's leader carries it out by membership changes
//! of its group (each new replica joins as a learner and catches up before it votes) and the
//! move ends when the leader reports that its voters are the target.
//!
//! Alter, per partition: NONE once the move (or cancel, for null replicas) is applied on this
//! node; UNKNOWN_TOPIC_OR_PARTITION; INVALID_REPLICA_ASSIGNMENT for a target naming a broker
//! twice, an unregistered broker, no broker or more than the cap; NO_REASSIGNMENT_IN_PROGRESS
//! for a cancel of a partition not moving. A cancel moves back to the replicas the partition had
//! before the move started (a replica that already joined is removed again), so until that
//! finishes List shows it as a move with the added replicas removing.
//!
//! List, per moving partition: replicas (the target, then every other replica held since the
//! move started), adding_replicas (target replicas that were not replicas before) and
//! removing_replicas (replicas outside the target).

use bytes::Bytes;
use kafka_protocol::messages::alter_partition_reassignments_response::{
    ReassignablePartitionResponse, ReassignableTopicResponse,
};
use kafka_protocol::messages::list_partition_reassignments_response::{
    OngoingPartitionReassignment, OngoingTopicReassignment,
};
use kafka_protocol::messages::{
    AlterPartitionReassignmentsRequest, AlterPartitionReassignmentsResponse, BrokerId,
    ListPartitionReassignmentsRequest, ListPartitionReassignmentsResponse,
};
use kafka_protocol::ResponseError;
use spate_replication::cluster::{CallError, ClusterPort};
use spate_replication::controller::reassignment::{
    check_request, Refusal, MAX_PARTITIONS_PER_REASSIGNMENT,
};
use spate_replication::controller::MetadataState;
use spate_replication::NodeId;

use super::{str_bytes, topic_name};
use crate::dispatch::encode_response;
use crate::error::NetError;
use crate::request::{decode_body, Request};
use crate::shard::Shard;

const NOT_A_CLUSTER: &str =
    "not a cluster: this node runs without --seeds and has one replica per partition";

/// One partition's answer: an error code and message.
type Outcome = (i16, Option<String>);
/// A requested move: topic, partition, target nodes (`None`: cancel).
type Move = (String, u32, Option<Vec<NodeId>>);

pub async fn alter(shard: &Shard, req: &Request) -> Result<Bytes, NetError> {
    let r: AlterPartitionReassignmentsRequest = decode_body(req)?;
    let named: Vec<(String, i32, Option<Vec<BrokerId>>)> = r
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(|p| (t.name.to_string(), p.partition_index, p.replicas.clone()))
        })
        .take(MAX_PARTITIONS_PER_REASSIGNMENT + 1)
        .collect();
    let mut resp = AlterPartitionReassignmentsResponse::default();
    let refuse_all = |code: ResponseError, message: &str| {
        named
            .iter()
            .map(|(t, p, _)| (t.clone(), *p, (code.code(), Some(message.to_string()))))
            .collect::<Vec<_>>()
    };
    let results = match &shard.config.cluster {
        None => {
            resp.error_code = ResponseError::InvalidRequest.code();
            resp.error_message = Some(str_bytes(NOT_A_CLUSTER));
            refuse_all(ResponseError::InvalidRequest, NOT_A_CLUSTER)
        }
        Some(_) if named.len() > MAX_PARTITIONS_PER_REASSIGNMENT => {
            let why = "too many partitions in one request";
            resp.error_code = ResponseError::InvalidRequest.code();
            resp.error_message = Some(str_bytes(why));
            refuse_all(ResponseError::InvalidRequest, why)
        }
        Some(port) => reassign(port, named).await,
    };
    for (topic, partition, (code, message)) in results {
        let mut p = ReassignablePartitionResponse::default();
        p.partition_index = partition;
        p.error_code = code;
        p.error_message = message.as_deref().map(str_bytes);
        match resp.responses.last_mut() {
            Some(t) if t.name.as_str() == topic => t.partitions.push(p),
            _ => {
                let mut t = ReassignableTopicResponse::default();
                t.name = topic_name(&topic);
                t.partitions.push(p);
                resp.responses.push(t);
            }
        }
    }
    encode_response(req.correlation_id, req.api_version, &resp)
}

/// A request's partition and target as the controller takes them, or why not.
fn parse(
    state: &MetadataState,
    topic: &str,
    partition: i32,
    replicas: &Option<Vec<BrokerId>>,
) -> Result<Move, Refusal> {
    let partition = u32::try_from(partition).map_err(|_| Refusal::UnknownPartition)?;
    let target = match replicas {
        None => None,
        Some(ids) => Some(
            ids.iter()
                .map(|b| NodeId::try_from(b.0))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| Refusal::InvalidAssignment("a negative broker id".into()))?,
        ),
    };
    check_request(state, topic, partition, target.as_deref())?;
    Ok((topic.to_string(), partition, target))
}

/// Whether `m` is what this node's applied state shows now.
fn applied(state: &MetadataState, m: &Move) -> bool {
    let (topic, partition, target) = m;
    let running = state.reassignment(topic, *partition);
    match target {
        None => running.is_none_or(|r| r.target == r.original),
        Some(nodes) => match running {
            Some(r) => r.target_nodes() == *nodes,
            None => state
                .partition(topic, *partition)
                .is_some_and(|p| p.replicas.iter().map(|r| r.node).eq(nodes.iter().copied())),
        },
    }
}

/// Judges each partition on the applied metadata, asks the controller to record the valid
/// ones, then checks each on what this node has applied since.
async fn reassign(
    port: &ClusterPort,
    named: Vec<(String, i32, Option<Vec<BrokerId>>)>,
) -> Vec<(String, i32, Outcome)> {
    let before = port.view();
    let judged: Vec<Result<Move, Refusal>> = named
        .iter()
        .map(|(t, p, r)| parse(&before.metadata, t, *p, r))
        .collect();
    let moves: Vec<Move> = judged.iter().filter_map(|j| j.clone().ok()).collect();
    let mut failed: Option<CallError> = None;
    if !moves.is_empty() {
        if let Err(e) = port.reassign(moves).await {
            failed = Some(e);
        }
    }
    let after = port.view();
    let mut out = Vec::with_capacity(named.len());
    for ((topic, partition, _), judged) in named.into_iter().zip(judged) {
        let outcome = match judged {
            Err(refusal) => (refusal.error_code(), Some(refusal.message())),
            Ok(_) if failed.is_some() => {
                let e = failed.as_ref().expect("checked");
                (e.code, Some(e.message.clone()))
            }
            Ok(m) if applied(&after.metadata, &m) => (0, None),
            // The controller judged it otherwise meanwhile (a broker unregistered, the
            // partition deleted): the client may ask again.
            Ok(_) => (
                ResponseError::RequestTimedOut.code(),
                Some("the controller did not record the move: retry".into()),
            ),
        };
        out.push((topic, partition, outcome));
    }
    if !out.is_empty() {
        tracing::info!(
            partitions = out.len(),
            recorded = out.iter().filter(|o| o.2 .0 == 0).count(),
            "partition reassignment request"
        );
    }
    out
}

pub fn list(shard: &Shard, req: &Request) -> Result<Bytes, NetError> {
    let r: ListPartitionReassignmentsRequest = decode_body(req)?;
    let mut resp = ListPartitionReassignmentsResponse::default();
    let Some(port) = &shard.config.cluster else {
        // Nothing ever moves on a single node.
        return encode_response(req.correlation_id, req.api_version, &resp);
    };
    let view = port.view();
    let state = &view.metadata;
    let wanted = |topic: &str, partition: u32| match &r.topics {
        None => true,
        Some(ts) => ts
            .iter()
            .any(|t| t.name.as_str() == topic && t.partition_indexes.contains(&(partition as i32))),
    };
    let ids = |v: Vec<NodeId>| v.into_iter().map(|n| BrokerId(n as i32)).collect();
    for ((topic, partition), m) in &state.reassignments {
        if !wanted(topic, *partition) {
            continue;
        }
        let Some(p) = state.partition(topic, *partition) else {
            continue;
        };
        let mut o = OngoingPartitionReassignment::default();
        o.partition_index = *partition as i32;
        o.replicas = ids(p.replicas.iter().map(|r| r.node).collect());
        o.adding_replicas = ids(m.adding());
        o.removing_replicas = ids(m.removing(&p.replicas));
        match resp.topics.last_mut() {
            Some(t) if t.name.as_str() == topic => t.partitions.push(o),
            _ => {
                let mut t = OngoingTopicReassignment::default();
                t.name = topic_name(topic);
                t.partitions.push(o);
                resp.topics.push(t);
            }
        }
    }
    encode_response(req.correlation_id, req.api_version, &resp)
}
