//! OffsetForLeaderEpoch (KIP-101, KIP-320): for each partition, the end offset of a leader
//! epoch on its leader. Consumers ask it after a leader change to learn whether the log they
//! read was truncated (their position past the end of their last epoch means it was). Served by
//! leaders only, after the fencing of `current_leader_epoch`, as Fetch is; a single node is the
//! leader of everything in epoch 0.

use std::collections::BTreeMap;
use std::rc::Rc;

use bytes::Bytes;
use kafka_protocol::messages::offset_for_leader_epoch_response::{
    EpochEndOffset, OffsetForLeaderTopicResult,
};
use kafka_protocol::messages::{
    BrokerId, OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse,
};
use kafka_protocol::ResponseError;

use crate::dispatch::encode_response;
use crate::error::{net_error_code, NetError};
use crate::leader_epoch::{check_current_epoch, EpochLog, UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET};
use crate::request::{decode_body, Request};
use crate::shard::{Shard, TopicPartition};

/// One partition's question, for its owner shard: (topic index, partition index, partition,
/// current leader epoch, epoch asked about).
type Work = (usize, usize, TopicPartition, i32, i32);

/// The answer for one partition on its owner: (leader epoch, end offset), or an error code.
fn answer_on_owner(
    shard: &Shard,
    tp: &TopicPartition,
    current: i32,
    asked: i32,
) -> Result<(i32, i64), i16> {
    let (p, epoch) = shard.leader_replica(tp, ResponseError::NotLeaderOrFollower.code())?;
    check_current_epoch(current, epoch)?;
    let history = p.epoch_history();
    let log = EpochLog {
        history: &history,
        current: epoch,
        log_start: p.log_start_offset(),
        log_end: p.log_end_offset(),
    };
    Ok(log.end_offset_for(asked))
}

pub async fn handle(shard: &Rc<Shard>, req: &Request) -> Result<Bytes, NetError> {
    let r: OffsetForLeaderEpochRequest = decode_body(req)?;
    // v3+ carries replica_id: -1 for consumers, -2 for debugging tools. Replicas use the rpc
    // port; one claiming to be a replica here is refused as Fetch refuses it.
    let forged_replica = req.api_version >= 3 && r.replica_id >= BrokerId(0);
    let mut resp = OffsetForLeaderEpochResponse::default();
    let mut work: BTreeMap<usize, Vec<Work>> = BTreeMap::new();
    for (ti, topic) in r.topics.iter().enumerate() {
        let mut tr = OffsetForLeaderTopicResult::default();
        tr.topic = topic.topic.clone();
        for (pi, p) in topic.partitions.iter().enumerate() {
            let mut out = EpochEndOffset::default();
            out.partition = p.partition;
            out.leader_epoch = UNDEFINED_EPOCH;
            out.end_offset = UNDEFINED_EPOCH_OFFSET;
            let owner = if forged_replica {
                Err(ResponseError::TopicAuthorizationFailed.code())
            } else {
                shard.owner(&topic.topic, p.partition)
            };
            match owner {
                Ok(owner) => work.entry(owner).or_default().push((
                    ti,
                    pi,
                    TopicPartition::new(&topic.topic, p.partition),
                    p.current_leader_epoch,
                    p.leader_epoch,
                )),
                Err(code) => out.error_code = code,
            }
            tr.partitions.push(out);
        }
        resp.topics.push(tr);
    }
    for (owner, items) in work {
        let answered = shard
            .router
            .run_on(owner, {
                let items = items.clone();
                move |s| async move {
                    items
                        .into_iter()
                        .map(|(ti, pi, tp, current, asked)| {
                            (ti, pi, answer_on_owner(&s, &tp, current, asked))
                        })
                        .collect::<Vec<_>>()
                }
            })
            .await;
        match answered {
            Ok(answers) => {
                for (ti, pi, a) in answers {
                    let out = &mut resp.topics[ti].partitions[pi];
                    match a {
                        Ok((epoch, end)) => {
                            out.leader_epoch = epoch;
                            out.end_offset = end;
                        }
                        Err(code) => out.error_code = code,
                    }
                }
            }
            Err(e) => {
                let code = net_error_code(&e.into());
                for (ti, pi, ..) in items {
                    resp.topics[ti].partitions[pi].error_code = code;
                }
            }
        }
    }
    encode_response(req.correlation_id, req.api_version, &resp)
}
