//! DescribeLogDirs (API 35, v1-v4): the partitions this node holds in its one log directory
//! (the data dir), each with its size in bytes and Kafka's offset lag (how far this replica's
//! log end is below the high watermark it knows: 0 for every log here, as for Kafka's current
//! logs; Spate has no future logs).
//!
//! This is where a replica move's progress per adding replica comes from for clients:
//! ListPartitionReassignments has no field for it in Kafka's schema, and Kafka's own tooling
//! compares the sizes DescribeLogDirs reports on the leader's and the new replica's brokers.
//! `spate partition reassignments` does the same (the leader also exports its exact figure as
//! `spate_reassignment_bytes_behind`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::describe_log_dirs_response::{
    DescribeLogDirsPartition, DescribeLogDirsResult, DescribeLogDirsTopic,
};
use kafka_protocol::messages::{DescribeLogDirsRequest, DescribeLogDirsResponse};

use super::{str_bytes, topic_name};
use crate::dispatch::encode_response;
use crate::error::NetError;
use crate::request::{decode_body, Request};
use crate::shard::Shard;

/// Topics one request may name; more is refused as a whole (Kafka has no cap; a client
/// naming this many wants every topic, which a null list asks for).
pub const MAX_DESCRIBED_TOPICS: usize = 10_000;

/// One partition held on a shard: topic, partition, size in bytes, offset lag.
type Held = (String, i32, i64, i64);

pub async fn handle(shard: &Shard, req: &Request) -> Result<Bytes, NetError> {
    let r: DescribeLogDirsRequest = decode_body(req)?;
    let mut resp = DescribeLogDirsResponse::default();
    if r.topics
        .as_ref()
        .is_some_and(|t| t.len() > MAX_DESCRIBED_TOPICS)
    {
        resp.error_code = kafka_protocol::ResponseError::InvalidRequest.code();
        return encode_response(req.correlation_id, req.api_version, &resp);
    }
    // One set for every shard to look partitions up in (a list scanned per partition was the
    // request's topics times the node's partitions).
    let wanted: Option<Arc<HashMap<String, HashSet<i32>>>> = r.topics.map(|ts| {
        let mut m: HashMap<String, HashSet<i32>> = HashMap::with_capacity(ts.len());
        for t in ts {
            m.entry(t.topic.to_string())
                .or_default()
                .extend(t.partitions);
        }
        Arc::new(m)
    });
    let mut held: Vec<Held> = Vec::new();
    for part in shard
        .router
        .broadcast(move |s| {
            let wanted = wanted.clone();
            async move {
                s.replicas
                    .open_partitions()
                    .into_iter()
                    .filter(|p| {
                        wanted.as_ref().is_none_or(|w| {
                            w.get(&*p.tp.topic)
                                .is_some_and(|ps| ps.contains(&p.tp.partition))
                        })
                    })
                    .map(|p| {
                        let lag = p.high_watermark().saturating_sub(p.log_end_offset());
                        (
                            p.tp.topic.to_string(),
                            p.tp.partition,
                            i64::try_from(p.size_bytes()).unwrap_or(i64::MAX),
                            i64::try_from(lag).unwrap_or(i64::MAX),
                        )
                    })
                    .collect::<Vec<Held>>()
            }
        })
        .await
    {
        match part {
            Ok(p) => held.extend(p),
            // A shard that is stopping holds nothing it can describe.
            Err(e) => tracing::debug!(error = %e, "describing a shard's log directory"),
        }
    }
    held.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let mut dir = DescribeLogDirsResult::default();
    dir.log_dir = str_bytes(&shard.config.data_dir.display().to_string());
    dir.total_bytes = -1;
    dir.usable_bytes = -1;
    for (topic, partition, size, lag) in held {
        let mut p = DescribeLogDirsPartition::default();
        p.partition_index = partition;
        p.partition_size = size;
        p.offset_lag = lag;
        match dir.topics.last_mut() {
            Some(t) if t.name.as_str() == topic => t.partitions.push(p),
            _ => {
                let mut t = DescribeLogDirsTopic::default();
                t.name = topic_name(&topic);
                t.partitions.push(p);
                dir.topics.push(t);
            }
        }
    }
    resp.results.push(dir);
    encode_response(req.correlation_id, req.api_version, &resp)
}
