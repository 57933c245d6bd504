//! Produce: check every batch on the connection's shard (magic 2, lengths, CRC-32C), send
//! each owning shard its partitions' batches, join the outcomes. Batches are stored exactly as
//! they came, compressed or not.
//!
//! No batch is copied here: once the decoded request is dropped the frame's buffer has one owner
//! (the connection reads large frames into buffers of their own, see `server.rs`), so it is split
//! at the batch boundaries into uniquely owned pieces the log stamps in place. A frame still
//! shared (a small one, cut from the connection's receive buffer) is copied once, as a whole.
//!
//! In a cluster a partition's batches go to its consensus group on the owning shard, which
//! takes them only as the writable leader; anything else is NOT_LEADER_OR_FOLLOWER, answered
//! from v10 on with the leader and its endpoint as this node knows them (KIP-951).

use std::collections::BTreeMap;
use std::rc::Rc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::produce_response::{
    BatchIndexAndErrorMessage, NodeEndpoint, PartitionProduceResponse, TopicProduceResponse,
};
use kafka_protocol::messages::{BrokerId, ProduceRequest, ProduceResponse, TopicName};
use kafka_protocol::protocol::{Decodable, StrBytes};
use kafka_protocol::ResponseError;
use spate_replication::controller::view::ClusterView;
use spate_replication::partition::{
    Acks, BatchHeader, Completion, ProduceOutcome, VerifiedBatch, BATCH_HEADER_BYTES,
};

use crate::cross_wake;
use crate::dispatch::{encode_response, Reply};
use crate::error::{NetError, NONE};
use crate::request::Request;
use crate::shard::{owner_in, ProduceTurn, Shard, TopicPartition};

/// The lengths of the single batches in a partition's records, each checked against the bytes
/// left and the size limit. The error is a Kafka error code.
pub fn batch_lengths(records: &[u8], max_batch_bytes: usize) -> Result<Vec<usize>, i16> {
    let corrupt = ResponseError::CorruptMessage.code();
    if records.is_empty() {
        return Err(corrupt);
    }
    let (mut rest, mut lens) = (records, Vec::new());
    while !rest.is_empty() {
        let len = BatchHeader::total_len_from_prefix(rest).ok_or(corrupt)?;
        if len > max_batch_bytes {
            return Err(ResponseError::MessageTooLarge.code());
        }
        if len > rest.len() || len < BATCH_HEADER_BYTES {
            return Err(corrupt);
        }
        lens.push(len);
        rest = &rest[len..];
    }
    Ok(lens)
}

/// The checks of one batch the log relies on (header, magic 2, CRC-32C) and a record count
/// that is not negative.
pub fn verify_batch(bytes: BytesMut) -> Result<VerifiedBatch, i16> {
    let corrupt = ResponseError::CorruptMessage.code();
    let batch = VerifiedBatch::new(bytes).map_err(|_| corrupt)?;
    if batch.header().records_count() < 0 {
        return Err(corrupt);
    }
    Ok(batch)
}

/// Splits and verifies a partition's records (copying them): [`batch_lengths`] then
/// [`verify_batch`] on each.
pub fn split_batches(
    records: Option<Bytes>,
    max_batch_bytes: usize,
) -> Result<Vec<VerifiedBatch>, i16> {
    let records = records.ok_or(ResponseError::CorruptMessage.code())?;
    let mut rest = BytesMut::from(&records[..]);
    batch_lengths(&records, max_batch_bytes)?
        .into_iter()
        .map(|len| verify_batch(rest.split_to(len)))
        .collect()
}

type Work = (usize, usize, TopicPartition, Vec<VerifiedBatch>);

/// A partition whose records passed the length checks: where they lie in the request body.
struct Planned {
    ti: usize,
    pi: usize,
    tp: TopicPartition,
    /// Offset of the records in the body, and the length of each batch.
    start: usize,
    lens: Vec<usize>,
}

/// Decodes the request, fills in the response skeleton (with partition errors), and says where
/// every accepted partition's batches lie in `body`. Everything decoded that refers to `body`
/// is dropped on return (topic names in the response are copied), so `body` can become unique.
fn plan(
    shard: &Shard,
    body: &Bytes,
    api_version: i16,
    resp: &mut ProduceResponse,
) -> Result<(i16, Vec<Planned>), NetError> {
    let r = ProduceRequest::decode(&mut body.clone(), api_version)
        .map_err(|e| NetError::Malformed(format!("Produce v{api_version}: {e}")))?;
    let acks = r.acks;
    let max_batch = shard.config.max_batch_bytes as usize;
    let body_range = body.as_ptr() as usize..body.as_ptr() as usize + body.len();
    let mut planned = Vec::new();
    for (ti, topic) in r.topic_data.into_iter().enumerate() {
        let mut tr = TopicProduceResponse::default();
        tr.name = TopicName(StrBytes::from_string(topic.name.to_string()));
        tr.topic_id = topic.topic_id;
        for (pi, pd) in topic.partition_data.into_iter().enumerate() {
            let mut pr = PartitionProduceResponse::default();
            pr.index = pd.index;
            pr.base_offset = -1;
            pr.log_append_time_ms = -1;
            pr.log_start_offset = -1;
            let checked = if r.transactional_id.is_some() {
                Err(ResponseError::TransactionalIdAuthorizationFailed.code())
            } else if !matches!(acks, -1..=1) {
                Err(ResponseError::InvalidRequiredAcks.code())
            } else if crate::metadata::is_reserved_topic_name(&topic.name) {
                // Kafka's "Cannot append to internal topic": `__consumer_offsets` is written
                // by the group coordinator only.
                Err(ResponseError::InvalidTopicException.code())
            } else {
                let records = pd.records.ok_or(ResponseError::CorruptMessage.code());
                shard
                    .check_exists(&topic.name, pd.index)
                    .and(records)
                    .and_then(|rec| Ok((rec.as_ptr() as usize, batch_lengths(&rec, max_batch)?)))
            };
            match checked {
                Ok((at, lens)) => {
                    // The codec hands out records as slices of the body it decoded.
                    assert!(
                        body_range.contains(&at),
                        "Produce records are a slice of the request body"
                    );
                    planned.push(Planned {
                        ti,
                        pi,
                        tp: TopicPartition::new(&topic.name, pd.index),
                        start: at - body_range.start,
                        lens,
                    });
                }
                Err(code) => pr.error_code = code,
            }
            tr.partition_responses.push(pr);
        }
        resp.responses.push(tr);
    }
    Ok((acks, planned))
}

pub async fn handle(
    shard: &Rc<Shard>,
    req: Request,
    turn: Option<ProduceTurn>,
    error_code: &std::cell::Cell<i16>,
) -> Result<Reply, NetError> {
    let (api_version, correlation_id) = (req.api_version, req.correlation_id);
    let body = req.body;
    let mut resp = ProduceResponse::default();
    let (acks, planned) = plan(shard, &body, api_version, &mut resp)?;
    // `plan` refused every partition of a request with other acks (INVALID_REQUIRED_ACKS).
    let replica_acks = Acks::from_kafka(acks).unwrap_or(Acks::All);
    let mut by_shard: BTreeMap<usize, Vec<Work>> = BTreeMap::new();
    if !planned.is_empty() {
        let mut rest = body
            .try_into_mut()
            .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
        let mut pos = 0;
        let table = shard.shard_table();
        for part in planned {
            assert!(
                part.start >= pos,
                "partitions lie in the body in request order"
            );
            rest.advance(part.start - pos);
            pos = part.start + part.lens.iter().sum::<usize>();
            let verified: Result<Vec<_>, i16> = part
                .lens
                .iter()
                .map(|&len| verify_batch(rest.split_to(len)))
                .collect();
            let owner = verified.and_then(|batches| {
                Ok((
                    owner_in(&table, shard, &part.tp.topic, part.tp.partition)?,
                    batches,
                ))
            });
            match owner {
                Ok((owner, batches)) => {
                    by_shard
                        .entry(owner)
                        .or_default()
                        .push((part.ti, part.pi, part.tp, batches));
                }
                Err(code) => {
                    resp.responses[part.ti].partition_responses[part.pi].error_code = code;
                }
            }
        }
    }

    if let Some(turn) = &turn {
        turn.wait().await;
    }
    let (appended_tx, appended_rx) = flume::bounded::<()>(by_shard.len().max(1));
    let tasks: Vec<_> = by_shard
        .into_iter()
        .map(|(owner, work)| {
            let (router, appended) = (shard.router.clone(), appended_tx.clone());
            glommio::spawn_local(async move {
                router
                    .run_on(owner, move |s| {
                        produce_on_owner(s, work, replica_acks, appended)
                    })
                    .await
            })
        })
        .collect();
    drop(appended_tx);
    // Every owner has appended (or failed, dropping its sender): the next Produce of this
    // connection may go; durability waits of both overlap.
    while cross_wake::recv(&appended_rx).await.is_ok() {}
    drop(turn);
    for task in tasks {
        match task.await {
            Ok(outcomes) => {
                for (ti, pi, o) in outcomes {
                    let pr = &mut resp.responses[ti].partition_responses[pi];
                    pr.error_code = o.error_code;
                    pr.base_offset = o.base_offset;
                    if api_version >= 5 {
                        pr.log_start_offset = o.log_start_offset;
                    }
                    if api_version >= 2 {
                        pr.log_append_time_ms = o.log_append_time_ms;
                    }
                    if api_version >= 8 {
                        pr.error_message = o.error_message.map(StrBytes::from_string);
                        pr.record_errors = o
                            .record_errors
                            .into_iter()
                            .map(|e| {
                                let mut r = BatchIndexAndErrorMessage::default();
                                r.batch_index = e.batch_index;
                                r.batch_index_error_message =
                                    Some(StrBytes::from_string(e.message));
                                r
                            })
                            .collect();
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "produce could not reach a shard");
                for tr in &mut resp.responses {
                    for pr in &mut tr.partition_responses {
                        if pr.error_code == NONE && pr.base_offset < 0 {
                            pr.error_code = crate::error::net_error_code(&e.into());
                        }
                    }
                }
            }
        }
    }
    add_leader_hints(shard, &mut resp, api_version);
    let first_error = resp
        .responses
        .iter()
        .flat_map(|t| &t.partition_responses)
        .map(|p| p.error_code)
        .find(|c| *c != NONE);
    error_code.set(first_error.unwrap_or(NONE));
    if acks == 0 {
        return Ok(None);
    }
    encode_response(correlation_id, api_version, &resp).map(Some)
}

/// Produce v10+ (KIP-951): the leader hints of a cluster node's answer.
/// Only a refused partition costs anything: the cluster view is not read otherwise.
fn add_leader_hints(shard: &Shard, resp: &mut ProduceResponse, version: i16) {
    let not_leader = ResponseError::NotLeaderOrFollower.code();
    let refused = || {
        resp.responses
            .iter()
            .flat_map(|t| &t.partition_responses)
            .any(|p| p.error_code == not_leader)
    };
    if let Some(port) = shard.config.cluster.as_ref().filter(|_| version >= 10) {
        if refused() {
            hint_leaders(&port.view(), resp);
        }
    }
}

/// Each partition refused with NOT_LEADER_OR_FOLLOWER names the leader and epoch `view`
/// knows, and the response lists those leaders' endpoints (KIP-951).
pub(crate) fn hint_leaders(view: &ClusterView, resp: &mut ProduceResponse) {
    let not_leader = ResponseError::NotLeaderOrFollower.code();
    let mut hints = Vec::new();
    for t in &mut resp.responses {
        for p in t
            .partition_responses
            .iter_mut()
            .filter(|p| p.error_code == not_leader)
        {
            if let Some(h) = crate::leader_hint::leader_hint(view, &t.name, p.index) {
                p.current_leader.leader_id = BrokerId(h.leader_id);
                p.current_leader.leader_epoch = h.leader_epoch;
                hints.push(h);
            }
        }
    }
    resp.node_endpoints = crate::leader_hint::endpoints_of(view, hints)
        .into_iter()
        .map(|e| {
            let mut n = NodeEndpoint::default();
            n.node_id = BrokerId(e.node_id);
            n.host = StrBytes::from_string(e.host);
            n.port = i32::from(e.port);
            n
        })
        .collect();
}

/// Appends every partition's batches (concurrently), reports that through `appended`, then
/// waits until each replica says its append is as durable as `acks` requires.
async fn produce_on_owner(
    shard: Rc<Shard>,
    work: Vec<Work>,
    acks: Acks,
    appended: flume::Sender<()>,
) -> Vec<(usize, usize, ProduceOutcome)> {
    let tasks: Vec<_> = work
        .into_iter()
        .map(|(ti, pi, tp, batches)| {
            let shard = shard.clone();
            glommio::spawn_local(async move {
                let (o, completion) = append_on_owner(&shard, &tp, batches, acks).await;
                (ti, pi, completion, o)
            })
        })
        .collect();
    let mut appended_parts = Vec::with_capacity(tasks.len());
    for t in tasks {
        appended_parts.push(t.await);
    }
    // Fetches waiting for data are woken by the replicas when their high watermarks move (at
    // once, or once durable under flush `always`), not here.
    let _ = appended.send(());
    drop(appended);
    let syncs: Vec<_> = appended_parts
        .into_iter()
        .map(|(ti, pi, completion, o)| {
            glommio::spawn_local(async move {
                match completion.wait().await {
                    Ok(()) => (ti, pi, o),
                    Err(error_code) => (ti, pi, ProduceOutcome { error_code, ..o }),
                }
            })
        })
        .collect();
    let mut out = Vec::with_capacity(syncs.len());
    for t in syncs {
        out.push(t.await);
    }
    out
}

/// One partition's append on its owner: alone, to its replica; in a cluster, through its
/// consensus group (which refuses unless it is the writable leader).
async fn append_on_owner(
    shard: &Shard,
    tp: &TopicPartition,
    batches: Vec<VerifiedBatch>,
    acks: Acks,
) -> (ProduceOutcome, Completion) {
    if shard.in_cluster() {
        return match shard.replicas.group(tp) {
            Some(group) => group.produce(batches, acks).await,
            None => (
                ProduceOutcome::error(ResponseError::NotLeaderOrFollower.code()),
                Completion::done(),
            ),
        };
    }
    match shard.partition(tp) {
        Ok(p) => p.append(batches, acks).await,
        Err(code) => (ProduceOutcome::error(code), Completion::done()),
    }
}

/// Produce v0-v2 are advertised (librdkafka keeps compression on only if they are) but not
/// served: they carry magic 0/1 message sets. Every partition gets UNSUPPORTED_VERSION in the
/// layout of the request's version, decoded here by hand because the codec starts at v3.
pub fn reject_old_version(req: &Request) -> Result<Bytes, NetError> {
    let bad = || NetError::Malformed("truncated Produce v0-2 request".into());
    let mut b = req.body.clone();
    if b.remaining() < 2 + 4 + 4 {
        return Err(bad());
    }
    let _acks = b.get_i16();
    let _timeout = b.get_i32();
    let topics = checked_count(&mut b, 2)?;
    let mut out = BytesMut::new();
    out.put_i32(0); // length, patched below
    out.put_i32(req.correlation_id);
    out.put_i32(topics as i32);
    for _ in 0..topics {
        let name_len = if b.remaining() >= 2 {
            b.get_i16()
        } else {
            return Err(bad());
        };
        if name_len < 0 || b.remaining() < name_len as usize {
            return Err(bad());
        }
        let name = b.split_to(name_len as usize);
        out.put_i16(name_len);
        out.put_slice(&name);
        let partitions = checked_count(&mut b, 8)?;
        out.put_i32(partitions as i32);
        for _ in 0..partitions {
            if b.remaining() < 8 {
                return Err(bad());
            }
            let index = b.get_i32();
            let size = b.get_i32();
            if size > 0 {
                if b.remaining() < size as usize {
                    return Err(bad());
                }
                b.advance(size as usize);
            }
            out.put_i32(index);
            out.put_i16(ResponseError::UnsupportedVersion.code());
            out.put_i64(-1);
            if req.api_version >= 2 {
                out.put_i64(-1);
            }
        }
    }
    if req.api_version >= 1 {
        out.put_i32(0); // throttle_time_ms
    }
    let len = (out.len() - 4) as i32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Ok(out.freeze())
}

/// Reads an array count and checks it against the bytes left (each element needs at least
/// `min_element_bytes`), so a hostile count cannot drive an allocation or a long loop.
fn checked_count(b: &mut Bytes, min_element_bytes: usize) -> Result<usize, NetError> {
    if b.remaining() < 4 {
        return Err(NetError::Malformed("truncated array count".into()));
    }
    let n = b.get_i32();
    if n < 0 || (n as usize).saturating_mul(min_element_bytes) > b.remaining() {
        return Err(NetError::Malformed(format!(
            "array count {n} exceeds the {} bytes left",
            b.remaining()
        )));
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_cluster::{state, view_of};
    use kafka_protocol::protocol::Encodable;

    fn partition(index: i32, error_code: i16) -> PartitionProduceResponse {
        let mut p = PartitionProduceResponse::default();
        p.index = index;
        p.error_code = error_code;
        p.base_offset = -1;
        p
    }

    #[test]
    fn not_leader_answers_carry_the_leader_and_its_endpoint_from_v10() {
        let view = view_of(state());
        let not_leader = ResponseError::NotLeaderOrFollower.code();
        let mut t = TopicProduceResponse::default();
        t.name = TopicName(StrBytes::from_static_str("orders"));
        t.partition_responses = vec![
            partition(0, not_leader),
            partition(1, 0),
            partition(2, not_leader),
        ];
        let mut resp = ProduceResponse::default();
        resp.responses = vec![t];
        hint_leaders(&view, &mut resp);
        let p = &resp.responses[0].partition_responses;
        assert_eq!(
            (
                p[0].current_leader.leader_id.0,
                p[0].current_leader.leader_epoch
            ),
            (1, 4)
        );
        assert_eq!(
            p[1].current_leader.leader_id.0, -1,
            "a success names no leader"
        );
        assert_eq!(
            (
                p[2].current_leader.leader_id.0,
                p[2].current_leader.leader_epoch
            ),
            (-1, 2),
            "leaderless: the epoch, no leader"
        );
        assert_eq!(resp.node_endpoints.len(), 1);
        let e = &resp.node_endpoints[0];
        assert_eq!(
            (e.node_id.0, e.host.as_str(), e.port),
            (1, "127.0.0.1", 9091)
        );

        // v10 carries them, as tagged fields.
        let back = encode_decode(&resp, 10);
        assert_eq!(
            back.responses[0].partition_responses[0]
                .current_leader
                .leader_id
                .0,
            1
        );
        assert_eq!(
            back.responses[0].partition_responses[2]
                .current_leader
                .leader_epoch,
            2
        );
        assert_eq!(back.node_endpoints, resp.node_endpoints);
    }

    fn encode_decode(resp: &ProduceResponse, version: i16) -> ProduceResponse {
        let mut buf = bytes::BytesMut::new();
        resp.encode(&mut buf, version).unwrap();
        ProduceResponse::decode(&mut buf.freeze(), version).unwrap()
    }
}
