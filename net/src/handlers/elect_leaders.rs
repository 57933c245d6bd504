//! ElectLeaders (KIP-460, API 43, v0-2): preferred-leader elections. Each partition named (or
//! every partition, for a null list) whose preferred replica (the first of its assignment) could
//! lead but does not gets a wish in the controller log; the partition's current leader then
//! hands leadership to it by a consensus transfer (the target catches up, then TimeoutNow). The
//! answer comes once the wish is applied on this node: the election is initiated, and Metadata
//! shows the new leader once its group reports it.
//!
//! Per partition: NONE (initiated, or the preferred replica already took over),
//! ELECTION_NOT_NEEDED when it already leads (left out of the answer to a null list, as Kafka
//! does), PREFERRED_LEADER_NOT_AVAILABLE when it is fenced, out of the ISR or in maintenance,
//! UNKNOWN_TOPIC_OR_PARTITION. UNCLEAN elections are refused with ELIGIBLE_LEADERS_NOT_AVAILABLE (83): a
//! replica outside the ISR may lack acknowledged writes, and Spate never loses those to elect.

use bytes::Bytes;
use kafka_protocol::messages::elect_leaders_response::{PartitionResult, ReplicaElectionResult};
use kafka_protocol::messages::{ElectLeadersRequest, ElectLeadersResponse};
use kafka_protocol::ResponseError;
use spate_replication::cluster::CallError;
use spate_replication::controller::active::MAX_PARTITIONS_PER_ELECTION;
use spate_replication::controller::leadership::{preferred_election, PreferredElection};
use spate_replication::controller::MetadataState;

use super::{str_bytes, topic_name};
use crate::dispatch::encode_response;
use crate::error::NetError;
use crate::request::{decode_body, Request};
use crate::shard::Shard;

/// ElectLeaders' election types (KIP-460).
const ELECTION_PREFERRED: i8 = 0;
const ELECTION_UNCLEAN: i8 = 1;
/// Partitions one request may name in all (a null list means every partition, which is
/// bounded by the cluster's topics).
const MAX_PARTITIONS_PER_REQUEST: usize = 1 << 20;

/// One partition's answer.
type Outcome = (i16, Option<String>);

pub async fn handle(shard: &Shard, req: &Request) -> Result<Bytes, NetError> {
    let r: ElectLeadersRequest = decode_body(req)?;
    let all = r.topic_partitions.is_none();
    let named: Vec<(String, i32)> = r
        .topic_partitions
        .iter()
        .flatten()
        .flat_map(|t| t.partitions.iter().map(|&p| (t.topic.to_string(), p)))
        .take(MAX_PARTITIONS_PER_REQUEST + 1)
        .collect();
    let refuse = |code: ResponseError, message: &str| {
        named
            .iter()
            .map(|(t, p)| (t.clone(), *p, (code.code(), Some(message.to_string()))))
            .collect::<Vec<_>>()
    };
    let results = match &shard.config.cluster {
        None => refuse(
            ResponseError::InvalidRequest,
            "not a cluster: this node runs without --seeds and has one replica per partition",
        ),
        Some(_) if req.api_version >= 1 && r.election_type == ELECTION_UNCLEAN => refuse(
            ResponseError::EligibleLeadersNotAvailable,
            "unclean leader election is not supported: a replica outside the ISR may lack \
             acknowledged writes",
        ),
        Some(_) if req.api_version >= 1 && r.election_type != ELECTION_PREFERRED => refuse(
            ResponseError::InvalidRequest,
            "unknown election type (0 is PREFERRED, 1 UNCLEAN)",
        ),
        Some(_) if named.len() > MAX_PARTITIONS_PER_REQUEST => refuse(
            ResponseError::InvalidRequest,
            "too many partitions in one request",
        ),
        Some(port) => {
            let partitions = if all {
                every_partition(&port.view().metadata)
            } else {
                named.clone()
            };
            elect_preferred(port, partitions, all).await
        }
    };
    let mut resp = ElectLeadersResponse::default();
    for (topic, partition, (code, message)) in results {
        let mut p = PartitionResult::default();
        p.partition_id = partition;
        p.error_code = code;
        p.error_message = message.as_deref().map(str_bytes);
        match resp.replica_election_results.last_mut() {
            Some(t) if t.topic.as_str() == topic => t.partition_result.push(p),
            _ => {
                let mut t = ReplicaElectionResult::default();
                t.topic = topic_name(&topic);
                t.partition_result.push(p);
                resp.replica_election_results.push(t);
            }
        }
    }
    encode_response(req.correlation_id, req.api_version, &resp)
}

fn every_partition(state: &MetadataState) -> Vec<(String, i32)> {
    state
        .topics
        .iter()
        .flat_map(|(name, t)| (0..t.partitions.len() as i32).map(move |p| (name.clone(), p)))
        .take(MAX_PARTITIONS_PER_REQUEST)
        .collect()
}

fn judge(state: &MetadataState, topic: &str, partition: i32) -> PreferredElection {
    match u32::try_from(partition) {
        Ok(p) => preferred_election(state, topic, p),
        Err(_) => PreferredElection::UnknownPartition,
    }
}

/// Judges each partition on the applied metadata, asks the controller to record the eligible
/// ones, then judges those again on what this node has applied since.
async fn elect_preferred(
    port: &spate_replication::cluster::ClusterPort,
    partitions: Vec<(String, i32)>,
    all: bool,
) -> Vec<(String, i32, Outcome)> {
    let before = port.view();
    let judged: Vec<PreferredElection> = partitions
        .iter()
        .map(|(t, p)| judge(&before.metadata, t, *p))
        .collect();
    let eligible: Vec<(String, u32)> = partitions
        .iter()
        .zip(&judged)
        .filter(|(_, j)| matches!(j, PreferredElection::Eligible(_)))
        .map(|((t, p), _)| (t.clone(), *p as u32))
        .collect();
    let mut failed: Option<CallError> = None;
    for chunk in eligible.chunks(MAX_PARTITIONS_PER_ELECTION) {
        if let Err(e) = port.elect_preferred_leaders(chunk.to_vec()).await {
            failed = Some(e);
            break;
        }
    }
    let after = port.view();
    let mut out = Vec::with_capacity(partitions.len());
    for ((topic, partition), first) in partitions.into_iter().zip(judged) {
        let outcome = match first {
            PreferredElection::Eligible(_) => match &failed {
                Some(e) => (e.code, Some(e.message.clone())),
                None => match judge(&after.metadata, &topic, partition) {
                    // Recorded, or already done by the time this node applied it.
                    PreferredElection::NotNeeded => (0, None),
                    PreferredElection::Eligible(n)
                        if after.metadata.leader_wish(&topic, partition as u32) == Some(n) =>
                    {
                        (0, None)
                    }
                    // Judged ineligible by the controller in the meantime.
                    PreferredElection::Eligible(_) => (
                        ResponseError::PreferredLeaderNotAvailable.code(),
                        Some("the controller did not record the election: retry".into()),
                    ),
                    other => (other.error_code(), other.message()),
                },
            },
            PreferredElection::NotNeeded if all => continue,
            other => (other.error_code(), other.message()),
        };
        out.push((topic, partition, outcome));
    }
    if !out.is_empty() {
        tracing::info!(
            partitions = out.len(),
            initiated = out.iter().filter(|o| o.2 .0 == 0).count(),
            "preferred-leader election"
        );
    }
    out
}
