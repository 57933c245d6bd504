//! UnregisterBroker (KIP-631): an operator declares a broker gone for good (its data directory
//! wiped), so its id may register again with a new node UUID. The controller takes it out of
//! every ISR first, so a wiped node is never counted as holding data it lost. A live broker is
//! refused (stop it first); a node without `--seeds` has no cluster to unregister from.

use bytes::Bytes;
use kafka_protocol::messages::{UnregisterBrokerRequest, UnregisterBrokerResponse};
use kafka_protocol::ResponseError;

use super::str_bytes;
use crate::dispatch::encode_response;
use crate::error::NetError;
use crate::request::{decode_body, Request};
use crate::shard::Shard;

pub async fn handle(shard: &Shard, req: &Request) -> Result<Bytes, NetError> {
    let r: UnregisterBrokerRequest = decode_body(req)?;
    let node = r.broker_id.0;
    let refused = |e: ResponseError, message: String| {
        UnregisterBrokerResponse::default()
            .with_error_code(e.code())
            .with_error_message(Some(str_bytes(&message)))
    };
    let resp = match (&shard.config.cluster, u64::try_from(node)) {
        (None, _) => refused(
            ResponseError::InvalidRequest,
            "not a cluster: this node runs without --seeds and has no brokers to unregister".into(),
        ),
        (Some(_), Err(_)) => refused(
            ResponseError::BrokerIdNotRegistered,
            format!("broker id {node} is negative: no broker has it"),
        ),
        (Some(port), Ok(id)) => match port.unregister_broker(id).await {
            Ok(()) => {
                tracing::info!(node, "unregistered broker");
                UnregisterBrokerResponse::default()
            }
            Err(e) => UnregisterBrokerResponse::default()
                .with_error_code(e.code)
                .with_error_message(Some(str_bytes(&e.message))),
        },
    };
    encode_response(req.correlation_id, req.api_version, &resp)
}
