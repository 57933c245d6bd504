//! The one place a decoded request is routed to its handler by API key. The groups helper adds
//! its keys here (and to [`crate::versions::SUPPORTED`]).

use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ResponseHeader};
use kafka_protocol::protocol::{Encodable, HeaderVersion};
use kafka_protocol::ResponseError;

use crate::error::{NetError, NONE};
use crate::frame::{Frame, SegmentedBuf};
use crate::handlers;
use crate::request::Request;
use crate::shard::Shard;
use crate::versions;

/// What to write back: a framed response, or nothing (Produce with acks=0).
pub type Reply = Option<Bytes>;

/// Per-request context from the connection.
pub struct RequestContext {
    /// Set for Produce requests: their place in the connection's append order.
    pub produce_turn: Option<crate::shard::ProduceTurn>,
}

pub async fn dispatch(
    shard: Rc<Shard>,
    req: Request,
    ctx: RequestContext,
) -> Result<Reply, NetError> {
    dispatch_reporting(shard, req, ctx, &Cell::new(NONE)).await
}

/// [`dispatch`] that also reports the first partition error of a Produce or Fetch in
/// `error_code` (for the request metrics).
async fn dispatch_reporting(
    shard: Rc<Shard>,
    req: Request,
    ctx: RequestContext,
    error_code: &Cell<i16>,
) -> Result<Reply, NetError> {
    if req.api_key == ApiKey::ApiVersions {
        return handlers::api_versions::handle(&req).map(Some);
    }
    if req.api_key == ApiKey::Produce && req.api_version < versions::PRODUCE_SERVED_MIN_VERSION {
        return handlers::produce::reject_old_version(&req).map(Some);
    }
    if !versions::is_served(req.api_key, req.api_version) {
        return Err(NetError::Malformed(format!(
            "{:?} v{} is not supported",
            req.api_key, req.api_version
        )));
    }
    match req.api_key {
        ApiKey::Produce => {
            handlers::produce::handle(&shard, req, ctx.produce_turn, error_code).await
        }
        ApiKey::Fetch => handlers::fetch::handle(&shard, &req).await.map(Some),
        ApiKey::ListOffsets => handlers::list_offsets::handle(&shard, &req).await.map(Some),
        ApiKey::OffsetForLeaderEpoch => handlers::offset_for_leader_epoch::handle(&shard, &req)
            .await
            .map(Some),
        ApiKey::Metadata => handlers::metadata::handle(&shard, &req).await.map(Some),
        ApiKey::InitProducerId => handlers::init_producer_id::handle(&shard, &req)
            .await
            .map(Some),
        ApiKey::CreateTopics => handlers::admin::create_topics(&shard, &req).await.map(Some),
        ApiKey::DeleteTopics => handlers::admin::delete_topics(&shard, &req).await.map(Some),
        ApiKey::CreatePartitions => handlers::admin::create_partitions(&shard, &req)
            .await
            .map(Some),
        ApiKey::DescribeConfigs => handlers::admin::describe_configs(&shard, &req).map(Some),
        ApiKey::IncrementalAlterConfigs => handlers::admin::incremental_alter_configs(&shard, &req)
            .await
            .map(Some),
        ApiKey::DescribeCluster => handlers::admin::describe_cluster(&shard, &req).map(Some),
        ApiKey::DescribeQuorum => handlers::quorum::handle(&shard, &req).map(Some),
        ApiKey::AlterConfigs => handlers::admin::alter_configs(&shard, &req).await.map(Some),
        ApiKey::UnregisterBroker => handlers::unregister_broker::handle(&shard, &req)
            .await
            .map(Some),
        ApiKey::ElectLeaders => handlers::elect_leaders::handle(&shard, &req)
            .await
            .map(Some),
        ApiKey::AlterPartitionReassignments => {
            handlers::reassignments::alter(&shard, &req).await.map(Some)
        }
        ApiKey::ListPartitionReassignments => handlers::reassignments::list(&shard, &req).map(Some),
        ApiKey::DescribeLogDirs => handlers::log_dirs::handle(&shard, &req).await.map(Some),
        key if crate::group::GROUP_API_KEYS.contains(&key) => {
            crate::group::handle(&shard, &req).await.map(Some)
        }
        other => Err(NetError::Malformed(format!("{other:?} is not served"))),
    }
}

/// [`dispatch`] for the connection loop: Fetch replies keep their record batches as separate
/// segments (written from the buffers they were read into); every other reply is one segment.
pub async fn dispatch_frame(
    shard: Rc<Shard>,
    req: Request,
    ctx: RequestContext,
) -> Result<Option<Frame>, NetError> {
    let (api, started, error_code) = (req.api_key, Instant::now(), Cell::new(NONE));
    let result = if api == ApiKey::Fetch && versions::is_served(api, req.api_version) {
        handlers::fetch::handle_frame(&shard, &req, &error_code)
            .await
            .map(Some)
    } else {
        dispatch_reporting(shard.clone(), req, ctx, &error_code)
            .await
            .map(|r| r.map(Frame::from))
    };
    // A request the broker could not handle closes the connection: Kafka's catch-all code.
    let code = match &result {
        Ok(_) => error_code.get(),
        Err(_) => ResponseError::UnknownServerError.code(),
    };
    shard.metrics.request(api, code);
    shard.metrics.observe_latency(api, started.elapsed());
    result
}

/// The response header for `correlation_id`, its version, and the size the length prefix
/// announces (header plus body), which must fit the prefix's i32.
fn response_header<T: Encodable + HeaderVersion>(
    correlation_id: i32,
    version: i16,
    body: &T,
) -> Result<(ResponseHeader, i16, usize), NetError> {
    let header_version = T::header_version(version);
    let mut header = ResponseHeader::default();
    header.correlation_id = correlation_id;
    let enc = |e: anyhow::Error| NetError::Encode(e.to_string());
    let size = header
        .compute_size(header_version)
        .map_err(enc)?
        .checked_add(body.compute_size(version).map_err(enc)?)
        .filter(|s| *s <= i32::MAX as usize)
        .ok_or_else(|| NetError::Encode("response size overflows".into()))?;
    Ok((header, header_version, size))
}

/// [`encode_response`] that leaves the `zero_copy` buffers (record batches) uncopied.
pub fn encode_response_frame<T: Encodable + HeaderVersion>(
    correlation_id: i32,
    version: i16,
    body: &T,
    zero_copy: Vec<Bytes>,
) -> Result<Frame, NetError> {
    let (header, header_version, size) = response_header(correlation_id, version, body)?;
    let enc = |e: anyhow::Error| NetError::Encode(e.to_string());
    let mut buf = SegmentedBuf::new(zero_copy);
    buf.put_i32(size as i32);
    header.encode(&mut buf, header_version).map_err(enc)?;
    body.encode(&mut buf, version).map_err(enc)?;
    debug_assert_eq!(
        kafka_protocol::protocol::buf::ByteBufMut::offset(&buf),
        4 + size,
        "encoded size matches computed size"
    );
    Ok(buf.into_frame())
}

/// Frames a response: length prefix, response header (the version the API defines for this
/// request version), body.
pub fn encode_response<T: Encodable + HeaderVersion>(
    correlation_id: i32,
    version: i16,
    body: &T,
) -> Result<Bytes, NetError> {
    let (header, header_version, size) = response_header(correlation_id, version, body)?;
    let enc = |e: anyhow::Error| NetError::Encode(e.to_string());
    let mut buf = BytesMut::with_capacity(4 + size);
    buf.put_i32(size as i32);
    header.encode(&mut buf, header_version).map_err(enc)?;
    body.encode(&mut buf, version).map_err(enc)?;
    debug_assert_eq!(buf.len(), 4 + size, "encoded size matches computed size");
    Ok(buf.freeze())
}

/// Decodes a request's body for its API without running it: what the fuzz target and the
/// property tests drive with arbitrary bytes.
pub fn decode_only(req: &Request) -> Result<(), NetError> {
    use crate::request::decode_body;
    use kafka_protocol::messages::*;
    if !versions::is_served(req.api_key, req.api_version) {
        return Err(NetError::Malformed("unsupported version".into()));
    }
    match req.api_key {
        ApiKey::Produce => decode_body::<ProduceRequest>(req).map(drop),
        ApiKey::Fetch => decode_body::<FetchRequest>(req).map(drop),
        ApiKey::ListOffsets => decode_body::<ListOffsetsRequest>(req).map(drop),
        ApiKey::OffsetForLeaderEpoch => decode_body::<OffsetForLeaderEpochRequest>(req).map(drop),
        ApiKey::Metadata => decode_body::<MetadataRequest>(req).map(drop),
        ApiKey::ApiVersions => decode_body::<ApiVersionsRequest>(req).map(drop),
        ApiKey::CreateTopics => decode_body::<CreateTopicsRequest>(req).map(drop),
        ApiKey::DeleteTopics => decode_body::<DeleteTopicsRequest>(req).map(drop),
        ApiKey::InitProducerId => decode_body::<InitProducerIdRequest>(req).map(drop),
        ApiKey::DescribeConfigs => decode_body::<DescribeConfigsRequest>(req).map(drop),
        ApiKey::IncrementalAlterConfigs => {
            decode_body::<IncrementalAlterConfigsRequest>(req).map(drop)
        }
        ApiKey::CreatePartitions => decode_body::<CreatePartitionsRequest>(req).map(drop),
        ApiKey::DescribeCluster => decode_body::<DescribeClusterRequest>(req).map(drop),
        ApiKey::DescribeQuorum => decode_body::<DescribeQuorumRequest>(req).map(drop),
        ApiKey::AlterConfigs => decode_body::<AlterConfigsRequest>(req).map(drop),
        ApiKey::UnregisterBroker => decode_body::<UnregisterBrokerRequest>(req).map(drop),
        ApiKey::ElectLeaders => decode_body::<ElectLeadersRequest>(req).map(drop),
        ApiKey::AlterPartitionReassignments => {
            decode_body::<AlterPartitionReassignmentsRequest>(req).map(drop)
        }
        ApiKey::ListPartitionReassignments => {
            decode_body::<ListPartitionReassignmentsRequest>(req).map(drop)
        }
        ApiKey::DescribeLogDirs => decode_body::<DescribeLogDirsRequest>(req).map(drop),
        _ => Err(NetError::Malformed("not served".into())),
    }
}

/// Everything the broker does with untrusted bytes before touching state: framing, header,
/// body, and the record-batch checks of a Produce.
pub fn decode_frame_for_fuzzing(bytes: &[u8], max_frame_bytes: usize) {
    let Ok(Some(len)) = crate::request::frame_len(bytes, max_frame_bytes) else {
        return;
    };
    let Some(frame) =
        bytes.get(crate::request::FRAME_PREFIX_BYTES..crate::request::FRAME_PREFIX_BYTES + len)
    else {
        return;
    };
    let Ok(req) = crate::request::decode_request(Bytes::copy_from_slice(frame)) else {
        return;
    };
    let _ = decode_only(&req);
    if req.api_key == ApiKey::Produce {
        if req.api_version < versions::PRODUCE_SERVED_MIN_VERSION {
            let _ = handlers::produce::reject_old_version(&req);
        } else if let Ok(p) =
            crate::request::decode_body::<kafka_protocol::messages::ProduceRequest>(&req)
        {
            for t in p.topic_data {
                for pd in t.partition_data {
                    let _ = handlers::produce::split_batches(pd.records, 1 << 20);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
    use kafka_protocol::messages::FetchResponse;
    use kafka_protocol::protocol::Decodable;

    #[test]
    fn fetch_records_are_not_copied_into_the_frame() {
        let records = Bytes::from(vec![9u8; 50_000]);
        let mut pd = PartitionData::default();
        pd.records = Some(records.clone());
        let mut t = FetchableTopicResponse::default();
        t.partitions = vec![pd];
        let mut resp = FetchResponse::default();
        resp.responses = vec![t];
        for version in [4, 11, 12] {
            let frame = encode_response_frame(3, version, &resp, vec![records.clone()]).unwrap();
            assert!(
                frame
                    .segments
                    .iter()
                    .any(|s| s.as_ptr() == records.as_ptr()),
                "v{version}: records are a segment of their own"
            );
            let copied = encode_response(3, version, &resp).unwrap();
            assert_eq!(
                frame.to_bytes(),
                copied,
                "v{version}: same bytes either way"
            );
            let mut body = copied.slice(8 + usize::from(version >= 12)..);
            let back = FetchResponse::decode(&mut body, version).unwrap();
            assert_eq!(
                back.responses[0].partitions[0].records,
                Some(records.clone())
            );
        }
    }
}
