//! DescribeQuorum: the metadata log's quorum (KIP-595) as this node knows it. The leader knows
//! every voter's log end; other nodes report the leader, its epoch and the voters, with unknown
//! (-1) progress. Without `--seeds` the node is a quorum of itself.

use bytes::Bytes;
use kafka_protocol::messages::describe_quorum_response::{
    Listener, Node, PartitionData, ReplicaState, TopicData,
};
use kafka_protocol::messages::{BrokerId, DescribeQuorumRequest, DescribeQuorumResponse};
use kafka_protocol::ResponseError;

use super::str_bytes;
use crate::dispatch::encode_response;
use crate::error::NetError;
use crate::request::{decode_body, Request};
use crate::shard::Shard;

/// The metadata log's name in KRaft, which admin tools ask for.
pub const METADATA_TOPIC: &str = "__cluster_metadata";

pub fn handle(shard: &Shard, req: &Request) -> Result<Bytes, NetError> {
    let r: DescribeQuorumRequest = decode_body(req)?;
    let mut resp = DescribeQuorumResponse::default();
    let me = shard.config.node_id;
    let view = shard.config.cluster.as_ref().map(|c| c.view());
    let (leader, epoch, hw, voters): (i32, i32, i64, Vec<(i32, i64)>) = match &view {
        Some(v) => (
            v.controller.map_or(-1, |c| c as i32),
            v.controller_epoch,
            v.high_watermark as i64,
            v.voters
                .iter()
                .map(|&n| {
                    let end = v
                        .voter_progress
                        .iter()
                        .find(|p| p.0 == n)
                        .and_then(|p| p.1)
                        .map_or(-1, |e| e as i64);
                    (n as i32, end)
                })
                .collect(),
        ),
        None => (me, 0, 0, vec![(me, 0)]),
    };
    for t in r.topics {
        let mut topic = TopicData::default().with_topic_name(t.topic_name.clone());
        for p in t.partitions {
            let mut pd = PartitionData::default().with_partition_index(p.partition_index);
            if t.topic_name.0.as_str() != METADATA_TOPIC || p.partition_index != 0 {
                pd.error_code = ResponseError::UnknownTopicOrPartition.code();
            } else {
                pd.leader_id = BrokerId(leader);
                pd.leader_epoch = epoch;
                pd.high_watermark = hw;
                pd.current_voters = voters
                    .iter()
                    .map(|&(id, end)| {
                        ReplicaState::default()
                            .with_replica_id(BrokerId(id))
                            .with_log_end_offset(end)
                            .with_last_fetch_timestamp(-1)
                            .with_last_caught_up_timestamp(-1)
                    })
                    .collect();
            }
            topic.partitions.push(pd);
        }
        resp.topics.push(topic);
    }
    if req.api_version >= 2 {
        // The voters' Kafka endpoints, as far as the applied metadata knows them.
        for &(id, _) in &voters {
            let mut node = Node::default().with_node_id(BrokerId(id));
            let endpoint = match &view {
                Some(v) => v
                    .brokers
                    .iter()
                    .find(|b| b.node as i32 == id)
                    .map(|b| (b.kafka.host.clone(), b.kafka.port)),
                None => Some((
                    shard.config.advertised_host.clone(),
                    shard.config.advertised_port,
                )),
            };
            if let Some((host, port)) = endpoint {
                node.listeners.push(
                    Listener::default()
                        .with_name(str_bytes("PLAINTEXT"))
                        .with_host(str_bytes(&host))
                        .with_port(port),
                );
            }
            resp.nodes.push(node);
        }
    }
    encode_response(req.correlation_id, req.api_version, &resp)
}
