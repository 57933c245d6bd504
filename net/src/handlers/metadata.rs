//! Metadata: this node is the only broker, the controller and the leader of every partition.
//! Unknown topics are created here when auto-creation is on and the client allows it.

use std::collections::BTreeMap;
use std::rc::Rc;

use bytes::Bytes;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{BrokerId, MetadataRequest, MetadataResponse};
use kafka_protocol::ResponseError;
use uuid::Uuid;

use super::{str_bytes, topic_name};
use crate::dispatch::encode_response;
use crate::error::{or_storage_error, NetError};
use crate::metadata::{is_reserved_topic_name, valid_topic_name, TopicMeta};
use crate::request::{decode_body, Request};
use crate::shard::Shard;

/// Topic names one Metadata request may auto-create (a request cannot create thousands).
pub const MAX_AUTO_CREATE_PER_REQUEST: usize = 100;

/// A broker as Metadata and DescribeCluster list it.
pub(crate) struct ListedBroker {
    pub node_id: i32,
    pub host: String,
    pub port: u16,
    pub fenced: bool,
}

pub(crate) struct BrokersView {
    pub cluster_id: String,
    /// -1 while no controller is known (an election in progress).
    pub controller_id: i32,
    pub brokers: Vec<ListedBroker>,
}

/// The brokers to tell clients about: in a cluster, every live (unfenced) broker the applied
/// metadata knows, and this node always (it answers, so clients may use it even before its
/// registration is applied); alone, this node as the only broker and the controller.
/// With `include_fenced`, fenced brokers too (DescribeCluster v2 asks for them).
pub(crate) fn brokers_view(shard: &Shard, include_fenced: bool) -> BrokersView {
    let me = ListedBroker {
        node_id: shard.config.node_id,
        host: shard.config.advertised_host.clone(),
        port: shard.config.advertised_port,
        fenced: false,
    };
    let Some(cluster) = &shard.config.cluster else {
        return BrokersView {
            cluster_id: shard.metadata.cluster_id(),
            controller_id: shard.config.node_id,
            brokers: vec![me],
        };
    };
    let v = cluster.view();
    let mut brokers: Vec<ListedBroker> = v
        .brokers
        .iter()
        .filter(|b| include_fenced || !b.fenced)
        .filter(|b| i32::try_from(b.node).is_ok_and(|id| id != me.node_id))
        .map(|b| ListedBroker {
            node_id: b.node as i32,
            host: b.kafka.host.clone(),
            port: b.kafka.port,
            fenced: b.fenced,
        })
        .collect();
    brokers.push(me);
    brokers.sort_by_key(|b| b.node_id);
    BrokersView {
        cluster_id: v.cluster_id.clone(),
        controller_id: v
            .controller
            .and_then(|c| i32::try_from(c).ok())
            .unwrap_or(-1),
        brokers,
    }
}

pub async fn handle(shard: &Rc<Shard>, req: &Request) -> Result<Bytes, NetError> {
    let r: MetadataRequest = decode_body(req)?;
    let node = shard.config.node_id;
    let mut resp = MetadataResponse::default();
    let cluster = brokers_view(shard, false);
    for b in &cluster.brokers {
        let mut broker = MetadataResponseBroker::default();
        broker.node_id = BrokerId(b.node_id);
        broker.host = str_bytes(&b.host);
        broker.port = i32::from(b.port);
        resp.brokers.push(broker);
    }
    let v = req.api_version;
    if v >= 2 {
        resp.cluster_id = Some(str_bytes(&cluster.cluster_id));
    }
    if v >= 1 {
        resp.controller_id = BrokerId(cluster.controller_id);
    }
    resp.cluster_authorized_operations = i32::MIN;

    // v0 lists all topics with an empty array; later versions with a null one.
    let requested = match r.topics {
        Some(t) if !(t.is_empty() && req.api_version == 0) => Some(t),
        _ => None,
    };
    let allow_create =
        (req.api_version < 4 || r.allow_auto_topic_creation) && shard.config.auto_create_topics;
    let mut created = 0usize;
    let topics = shard.topics();
    match requested {
        None => {
            for t in topics.values() {
                resp.topics.push(describe(node, t, v));
            }
        }
        Some(list) => {
            for want in list {
                let by_id = (want.topic_id != Uuid::nil())
                    .then(|| topics.values().find(|t| t.id == want.topic_id.as_u128()))
                    .flatten();
                let name = want.name.as_ref().map(|n| n.0.to_string());
                let found = by_id.or_else(|| name.as_deref().and_then(|n| topics.get(n)));
                if let Some(t) = found {
                    resp.topics.push(describe(node, t, v));
                    continue;
                }
                let mut entry = MetadataResponseTopic::default();
                entry.name = want.name.clone();
                if v >= 10 {
                    entry.topic_id = want.topic_id;
                }
                entry.topic_authorized_operations = i32::MIN;
                let Some(name) = name else {
                    entry.error_code = ResponseError::UnknownTopicId.code();
                    resp.topics.push(entry);
                    continue;
                };
                if !valid_topic_name(&name) || is_reserved_topic_name(&name) {
                    entry.error_code = ResponseError::InvalidTopicException.code();
                } else if allow_create && created < MAX_AUTO_CREATE_PER_REQUEST {
                    created += 1;
                    let limit = super::admin::shard_limit(shard);
                    let created = shard.metadata.create_topic(
                        &name,
                        shard.config.default_partitions,
                        BTreeMap::new(),
                        false,
                        limit,
                    );
                    if let Ok(Err(refused)) = &created {
                        tracing::info!(topic = %name, code = refused.code, msg = refused.message, "refused to auto-create topic");
                    }
                    match or_storage_error(created.map(|r| r.map_err(|refused| refused.code))) {
                        Ok(t) => {
                            tracing::info!(topic = %name, partitions = t.partitions, "auto-created topic");
                            shard.open_topic_on_owners(&name).await;
                            resp.topics.push(describe(node, &t, v));
                            continue;
                        }
                        // Created concurrently by another request: describe that one.
                        Err(code) => match shard.topics().get(&name) {
                            Some(t) => {
                                resp.topics.push(describe(node, t, v));
                                continue;
                            }
                            // A name colliding with another topic's is as invalid as a bad one.
                            None if code == ResponseError::InvalidTopicException.code() => {
                                entry.error_code = code
                            }
                            None => {
                                entry.error_code = ResponseError::UnknownTopicOrPartition.code()
                            }
                        },
                    }
                } else {
                    entry.error_code = ResponseError::UnknownTopicOrPartition.code();
                }
                resp.topics.push(entry);
            }
        }
    }
    encode_response(req.correlation_id, req.api_version, &resp)
}

/// One topic's entry; fields a version does not have stay at their defaults (the codec
/// refuses to encode them otherwise).
fn describe(node: i32, t: &TopicMeta, version: i16) -> MetadataResponseTopic {
    let mut topic = MetadataResponseTopic::default();
    topic.name = Some(topic_name(&t.name));
    if version >= 10 {
        topic.topic_id = Uuid::from_u128(t.id);
    }
    if version >= 1 {
        topic.is_internal = t.internal;
    }
    topic.topic_authorized_operations = i32::MIN;
    topic.partitions = (0..t.partitions)
        .map(|p| {
            let mut part = MetadataResponsePartition::default();
            part.partition_index = p;
            part.leader_id = BrokerId(node);
            if version >= 7 {
                part.leader_epoch = spate_replication::partition::LEADER_EPOCH;
            }
            part.replica_nodes = vec![BrokerId(node)];
            part.isr_nodes = vec![BrokerId(node)];
            part
        })
        .collect();
    topic
}
