//! InitProducerId for idempotent (non-transactional) producers. Alone, ids come from the
//! metadata store, which reserves them on disk so they are never reused after a restart; in a
//! cluster, from this node's block of ids granted by the controller (KIP-730), unique across
//! the cluster.
//!
//! A new block takes a call to the active controller, which waits up to the controller call
//! deadline (seconds) for an answer. A node that knows it cannot get one (it knows no active
//! controller: its metadata quorum lost, or it is cut off from the voters; or the applied
//! metadata has it fenced or unregistered) answers at once COORDINATOR_NOT_AVAILABLE, which
//! Kafka clients retry, usually on another broker.

use std::rc::Rc;

use bytes::Bytes;
use kafka_protocol::messages::{InitProducerIdRequest, InitProducerIdResponse, ProducerId};
use kafka_protocol::ResponseError;

use crate::dispatch::encode_response;
use crate::error::NetError;
use crate::request::{decode_body, Request};
use crate::shard::Shard;

pub async fn handle(shard: &Rc<Shard>, req: &Request) -> Result<Bytes, NetError> {
    let r: InitProducerIdRequest = decode_body(req)?;
    let mut resp = InitProducerIdResponse::default();
    resp.producer_id = ProducerId(-1);
    resp.producer_epoch = -1;
    if r.transactional_id.as_ref().is_some_and(|t| !t.is_empty()) {
        // No transaction coordinator yet: say so instead of pretending.
        resp.error_code = ResponseError::TransactionalIdAuthorizationFailed.code();
    } else if r.producer_id.0 >= 0 && r.producer_epoch >= 0 && r.producer_epoch < i16::MAX - 1 {
        // KIP-360: a producer may bump its own epoch to recover from a sequence error.
        resp.producer_id = r.producer_id;
        resp.producer_epoch = r.producer_epoch + 1;
    } else if let Some(port) = &shard.config.cluster {
        let view = port.view();
        if view.controller.is_none() || !view.caught_up {
            resp.error_code = ResponseError::CoordinatorNotAvailable.code();
            return encode_response(req.correlation_id, req.api_version, &resp);
        }
        match port.allocate_producer_id().await {
            Ok(id) => {
                resp.producer_id = ProducerId(id);
                resp.producer_epoch = 0;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot allocate a producer id");
                resp.error_code = e.code;
            }
        }
    } else {
        match shard.metadata.allocate_producer_id() {
            Ok(id) => {
                resp.producer_id = ProducerId(id);
                resp.producer_epoch = 0;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot allocate a producer id");
                resp.error_code = ResponseError::KafkaStorageError.code();
            }
        }
    }
    encode_response(req.correlation_id, req.api_version, &resp)
}
