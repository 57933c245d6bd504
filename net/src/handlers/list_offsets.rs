//! ListOffsets: earliest (-2), latest (-1), or the first offset whose batch timestamp is at or
//! after a given time. Served by a partition's leader only (in a cluster), after the fencing of
//! `current_leader_epoch` (v4+), as Fetch is; answers carry the leader's epoch.

use std::rc::Rc;

use bytes::Bytes;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::{ListOffsetsRequest, ListOffsetsResponse};
use kafka_protocol::ResponseError;

use crate::dispatch::encode_response;
use crate::error::NetError;
use crate::leader_epoch::{check_current_epoch, UNDEFINED_EPOCH};
use crate::request::{decode_body, Request};
use crate::shard::{Shard, TopicPartition};

pub const LATEST_TIMESTAMP: i64 = -1;
pub const EARLIEST_TIMESTAMP: i64 = -2;
/// KIP-734: the offset of the record with the largest timestamp; answered as latest - 1.
pub const MAX_TIMESTAMP: i64 = -3;

pub async fn handle(shard: &Rc<Shard>, req: &Request) -> Result<Bytes, NetError> {
    let r: ListOffsetsRequest = decode_body(req)?;
    let mut resp = ListOffsetsResponse::default();
    for topic in r.topics {
        let mut tr = ListOffsetsTopicResponse::default();
        tr.name = topic.name.clone();
        for p in topic.partitions {
            let mut pr = ListOffsetsPartitionResponse::default();
            pr.partition_index = p.partition_index;
            pr.timestamp = -1;
            pr.offset = -1;
            if req.api_version >= 4 {
                pr.leader_epoch = UNDEFINED_EPOCH;
            }
            let owner = match shard.owner(&topic.name, p.partition_index) {
                Ok(owner) => owner,
                Err(code) => {
                    pr.error_code = code;
                    tr.partitions.push(pr);
                    continue;
                }
            };
            let tp = TopicPartition::new(&topic.name, p.partition_index);
            let (ts, current_epoch) = (p.timestamp, p.current_leader_epoch);
            let res = shard
                .router
                .run_on(owner, move |s| async move {
                    let (part, epoch) =
                        s.leader_replica(&tp, ResponseError::OffsetNotAvailable.code())?;
                    check_current_epoch(current_epoch, epoch)?;
                    // Latest is the high watermark: consumers never see past it.
                    let (start, end) = (part.log_start_offset(), part.high_watermark());
                    match ts {
                        EARLIEST_TIMESTAMP => Ok((-1, start as i64, epoch)),
                        LATEST_TIMESTAMP => Ok((-1, end as i64, epoch)),
                        MAX_TIMESTAMP => Ok((-1, end.saturating_sub(1) as i64, epoch)),
                        _ => match part.offset_for_timestamp(ts).await? {
                            Some((off, t)) => Ok((t, off as i64, epoch)),
                            None => Ok((-1, -1, epoch)),
                        },
                    }
                })
                .await;
            match res {
                Ok(Ok((timestamp, offset, epoch))) => {
                    pr.timestamp = timestamp;
                    pr.offset = offset;
                    if req.api_version >= 4 {
                        pr.leader_epoch = epoch;
                    }
                }
                Ok(Err(code)) => pr.error_code = code,
                Err(e) => pr.error_code = crate::error::net_error_code(&e.into()),
            }
            tr.partitions.push(pr);
        }
        resp.topics.push(tr);
    }
    encode_response(req.correlation_id, req.api_version, &resp)
}
