//! Metadata. Alone, this node is the only broker, the controller and the leader of every
//! partition. In a cluster, every topic of the applied controller metadata with each
//! partition's leader (or LEADER_NOT_AVAILABLE), leader epoch, replicas, in-sync replicas and
//! offline replicas, the same from any node. Unknown topics are created when auto-creation is
//! on and the client allows it (in a cluster, by the controller).
//!
//! A cluster node that has not applied the cluster metadata since it started (it is replaying
//! or fetching the metadata log) does not know the topics and the other brokers yet. Kafka
//! brokers do not serve clients before they caught up; here a Metadata request waits for it,
//! at most [`METADATA_CATCH_UP_WAIT_MS`], and a topic the node still does not know then is
//! answered LEADER_NOT_AVAILABLE (retried), never UNKNOWN_TOPIC_OR_PARTITION: librdkafka takes
//! that as the topic deleted (the partition count drops to 0, group consumers revoke their
//! partitions) and a broker missing from the list as removed from the cluster (it decommissions
//! the handle, the group coordinator's included). Nor is such a topic auto-created.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{BrokerId, MetadataRequest, MetadataResponse};
use kafka_protocol::ResponseError;
use spate_replication::cluster::ClusterPort;
use spate_replication::controller::active::CreateTopicRequest;
use spate_replication::controller::{MetadataState, TopicInfo};
use spate_replication::types::NodeId;
use uuid::Uuid;

use super::{str_bytes, topic_name};
use crate::dispatch::encode_response;
use crate::error::{or_storage_error, NetError};
use crate::metadata::{is_reserved_topic_name, valid_topic_name, TopicMeta};
use crate::request::{decode_body, Request};
use crate::shard::Shard;

/// Topic names one Metadata request may auto-create (a request cannot create thousands).
pub const MAX_AUTO_CREATE_PER_REQUEST: usize = 100;
/// Longest a Metadata request to a cluster node that has not caught up with the cluster
/// metadata since it started waits for it (a restarted node usually needs well under a
/// second; one that cannot reach a quorum answers with what it has after this). Far below the
/// clients' request timeouts (librdkafka 60 s, the Java client 30 s).
pub const METADATA_CATCH_UP_WAIT_MS: u64 = 3_000;
/// How often the waiting request looks at the node's view again.
const CATCH_UP_POLL_MS: u64 = 20;

/// A broker as Metadata and DescribeCluster list it.
pub(crate) struct ListedBroker {
    pub node_id: i32,
    pub host: String,
    pub port: u16,
    pub fenced: bool,
}

pub(crate) struct BrokersView {
    pub cluster_id: String,
    /// The node clients send admin requests to: the active controller when it is known and
    /// listed, else this node. Any node takes admin requests and forwards them to the active
    /// controller (as KRaft brokers do), and librdkafka's admin client, told -1, waits for its
    /// next periodic metadata refresh (minutes) before it sends anything.
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
    let me_id = me.node_id;
    brokers.push(me);
    brokers.sort_by_key(|b| b.node_id);
    let controller_id = v
        .controller
        .and_then(|c| i32::try_from(c).ok())
        .filter(|c| brokers.iter().any(|b| b.node_id == *c && !b.fenced))
        .unwrap_or(me_id);
    BrokersView {
        cluster_id: v.cluster_id.clone(),
        controller_id,
        brokers,
    }
}

pub async fn handle(shard: &Rc<Shard>, req: &Request) -> Result<Bytes, NetError> {
    let r: MetadataRequest = decode_body(req)?;
    let node = shard.config.node_id;
    let caught_up = wait_for_catch_up(shard).await;
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
    if let Some(port) = &shard.config.cluster {
        resp.topics = cluster_topics(shard, port, requested, allow_create, caught_up, v).await;
        return encode_response(req.correlation_id, req.api_version, &resp);
    }
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

/// A broker id as Kafka carries it (node ids are capped within Kafka's i32 range).
fn broker_id(node: NodeId) -> BrokerId {
    BrokerId(i32::try_from(node).unwrap_or(-1))
}

/// One topic of the applied cluster metadata as Metadata lists it; fields a version does not
/// have stay at their defaults.
pub(crate) fn describe_replicated(
    name: &str,
    t: &TopicInfo,
    state: &MetadataState,
    version: i16,
) -> MetadataResponseTopic {
    let mut topic = MetadataResponseTopic::default();
    topic.name = Some(topic_name(name));
    if version >= 10 {
        topic.topic_id = Uuid::from_u128(t.topic_id);
    }
    if version >= 1 {
        topic.is_internal = is_reserved_topic_name(name);
    }
    topic.topic_authorized_operations = i32::MIN;
    topic.partitions = t
        .partitions
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut part = MetadataResponsePartition::default();
            part.partition_index = i as i32;
            match p.elected_leader() {
                Some(leader) => part.leader_id = broker_id(leader),
                None => {
                    part.leader_id = BrokerId(-1);
                    part.error_code = ResponseError::LeaderNotAvailable.code();
                }
            }
            if version >= 7 {
                part.leader_epoch = p.leader_epoch;
            }
            part.replica_nodes = p.replicas.iter().map(|r| broker_id(r.node)).collect();
            part.isr_nodes = p.isr.iter().map(|&n| broker_id(n)).collect();
            if version >= 5 {
                part.offline_replicas = state
                    .offline_replicas(p)
                    .into_iter()
                    .map(broker_id)
                    .collect();
            }
            part
        })
        .collect();
    topic
}

/// A requested topic that cannot be described: its name (and id) with `error_code`.
fn topic_error(
    want: &MetadataRequestTopic,
    version: i16,
    error_code: i16,
) -> MetadataResponseTopic {
    let mut entry = MetadataResponseTopic::default();
    entry.name = want.name.clone();
    if version >= 10 {
        entry.topic_id = want.topic_id;
    }
    entry.topic_authorized_operations = i32::MIN;
    entry.error_code = error_code;
    entry
}

/// Waits (bounded) until this node has caught up with the cluster metadata since it started,
/// or the broker stops; returns whether it has. Alone, at once.
async fn wait_for_catch_up(shard: &Shard) -> bool {
    let deadline = Instant::now() + Duration::from_millis(METADATA_CATCH_UP_WAIT_MS);
    loop {
        if shard.has_caught_up() {
            return true;
        }
        if shard.is_shutting_down() || Instant::now() >= deadline {
            return false;
        }
        glommio::timer::sleep(Duration::from_millis(CATCH_UP_POLL_MS)).await;
    }
}

/// The topics of a cluster's Metadata answer: all of them, or those requested (by id or name),
/// auto-creating unknown names through the controller. A node that has not `caught_up` answers
/// a topic it does not know LEADER_NOT_AVAILABLE and creates nothing.
async fn cluster_topics(
    shard: &Shard,
    port: &ClusterPort,
    requested: Option<Vec<MetadataRequestTopic>>,
    allow_create: bool,
    caught_up: bool,
    version: i16,
) -> Vec<MetadataResponseTopic> {
    let view = port.view();
    let state = &view.metadata;
    let Some(list) = requested else {
        return state
            .topics
            .iter()
            .map(|(name, t)| describe_replicated(name, t, state, version))
            .collect();
    };
    let mut out = Vec::with_capacity(list.len());
    let mut created = 0usize;
    for want in list {
        let by_id = (want.topic_id != Uuid::nil())
            .then(|| {
                state
                    .topics
                    .iter()
                    .find(|(_, t)| t.topic_id == want.topic_id.as_u128())
            })
            .flatten();
        let name = want.name.as_ref().map(|n| n.0.to_string());
        let found = by_id.or_else(|| name.as_deref().and_then(|n| state.topics.get_key_value(n)));
        if let Some((n, t)) = found {
            out.push(describe_replicated(n, t, state, version));
            continue;
        }
        // Not known here yet is not unknown to the cluster.
        let not_caught_up = ResponseError::LeaderNotAvailable.code();
        let Some(name) = name else {
            let code = if caught_up {
                ResponseError::UnknownTopicId.code()
            } else {
                not_caught_up
            };
            out.push(topic_error(&want, version, code));
            continue;
        };
        if !valid_topic_name(&name) || is_reserved_topic_name(&name) {
            out.push(topic_error(
                &want,
                version,
                ResponseError::InvalidTopicException.code(),
            ));
            continue;
        }
        if !caught_up {
            out.push(topic_error(&want, version, not_caught_up));
            continue;
        }
        if !allow_create || created >= MAX_AUTO_CREATE_PER_REQUEST {
            out.push(topic_error(
                &want,
                version,
                ResponseError::UnknownTopicOrPartition.code(),
            ));
            continue;
        }
        created += 1;
        let req = CreateTopicRequest {
            name: name.clone(),
            topic_id: fastrand::u128(1..),
            partitions: usize::try_from(shard.config.default_partitions).unwrap_or(1),
            replication_factor: None,
            configs: Vec::new(),
        };
        let code = match port.create_topic(req, false).await {
            Ok(()) => {
                tracing::info!(topic = %name, "auto-created topic");
                None
            }
            // Created concurrently by another request: describe that one.
            Err(e) if e.code == ResponseError::TopicAlreadyExists.code() => None,
            Err(e) => {
                tracing::info!(topic = %name, code = e.code, msg = e.message, "refused to auto-create topic");
                Some(e.code)
            }
        };
        // The controller answers once the topic is applied on this node; a view published a
        // moment later than that is answered as Kafka answers a topic being created.
        let now = port.view();
        match (code, now.metadata.topics.get(&name)) {
            (None, Some(t)) => out.push(describe_replicated(&name, t, &now.metadata, version)),
            (None, None) => out.push(topic_error(
                &want,
                version,
                ResponseError::LeaderNotAvailable.code(),
            )),
            (Some(code), _) if code == ResponseError::RequestTimedOut.code() => out.push(
                topic_error(&want, version, ResponseError::LeaderNotAvailable.code()),
            ),
            (Some(code), _) => out.push(topic_error(&want, version, code)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_cluster::{state, view_of};
    use kafka_protocol::protocol::{Decodable, Encodable};

    const LEADER_NOT_AVAILABLE: i16 = 5;

    fn ids(v: &[BrokerId]) -> Vec<i32> {
        v.iter().map(|b| b.0).collect()
    }

    #[test]
    fn a_replicated_topic_lists_leaders_epochs_replicas_isr_and_offline_replicas() {
        let s = state();
        let t = describe_replicated("orders", &s.topics["orders"], &s, 12);
        assert_eq!(t.error_code, 0);
        assert_eq!(t.topic_id, Uuid::from_u128(0xabc));
        assert!(!t.is_internal);
        let p = &t.partitions;
        assert_eq!(p.len(), 3);

        assert_eq!((p[0].partition_index, p[0].error_code), (0, 0));
        assert_eq!((p[0].leader_id.0, p[0].leader_epoch), (1, 4));
        assert_eq!(ids(&p[0].replica_nodes), [1, 2, 3]);
        assert_eq!(ids(&p[0].isr_nodes), [1, 2, 3]);
        assert_eq!(ids(&p[0].offline_replicas), [3]);

        assert_eq!((p[1].leader_id.0, p[1].leader_epoch), (2, 1));
        assert_eq!(ids(&p[1].replica_nodes), [2, 3, 1]);
        assert_eq!(ids(&p[1].isr_nodes), [2, 1]);

        assert_eq!(p[2].error_code, LEADER_NOT_AVAILABLE);
        assert_eq!((p[2].leader_id.0, p[2].leader_epoch), (-1, 2));
        assert_eq!(ids(&p[2].isr_nodes), [3]);
        assert_eq!(ids(&p[2].offline_replicas), [3]);
    }

    #[test]
    fn every_version_encodes_what_it_has() {
        let s = state();
        for v in 0..=12 {
            let mut resp = MetadataResponse::default();
            resp.topics = vec![describe_replicated("orders", &s.topics["orders"], &s, v)];
            let mut buf = bytes::BytesMut::new();
            resp.encode(&mut buf, v)
                .unwrap_or_else(|e| panic!("v{v}: {e}"));
            let back = MetadataResponse::decode(&mut buf.freeze(), v).unwrap();
            let p = &back.topics[0].partitions[0];
            assert_eq!(ids(&p.replica_nodes), [1, 2, 3], "v{v}");
            assert_eq!(p.leader_epoch, if v >= 7 { 4 } else { -1 }, "v{v}");
            let offline: &[i32] = if v >= 5 { &[3] } else { &[] };
            assert_eq!(ids(&p.offline_replicas), offline, "v{v}");
        }
    }

    #[test]
    fn leader_hints_come_from_the_view() {
        let view = view_of(state());
        use crate::leader_hint::{endpoints_of, leader_hint, LeaderHint};
        let h0 = leader_hint(&view, "orders", 0).unwrap();
        assert_eq!(
            h0,
            LeaderHint {
                leader_id: 1,
                leader_epoch: 4
            }
        );
        let h2 = leader_hint(&view, "orders", 2).unwrap();
        assert_eq!((h2.leader_id, h2.leader_epoch), (-1, 2));
        assert_eq!(leader_hint(&view, "orders", 3), None);
        assert_eq!(leader_hint(&view, "orders", -1), None);
        assert_eq!(leader_hint(&view, "other", 0), None);
        let h1 = leader_hint(&view, "orders", 1).unwrap();
        let eps = endpoints_of(&view, [h1, h0, h2, h0]);
        assert_eq!(
            eps.iter().map(|e| (e.node_id, e.port)).collect::<Vec<_>>(),
            [(1, 9091), (2, 9092)],
            "each leader once, in id order; none for a leaderless partition"
        );
        // A fenced broker has no endpoint to offer.
        assert_eq!(crate::leader_hint::endpoint(&view, 3), None);
    }

    #[test]
    fn a_group_coordinator_is_the_leader_of_its_offsets_partition() {
        use crate::leader_hint::group_coordinator;
        let mut s = state();
        assert_eq!(
            group_coordinator(&view_of(s.clone()), 0),
            None,
            "no __consumer_offsets topic yet"
        );
        let mut offsets = s.topics["orders"].clone();
        offsets.topic_id = 0xdef;
        s.topics.insert(crate::group::OFFSETS_TOPIC.into(), offsets);
        let view = view_of(s);
        let c = group_coordinator(&view, 0).unwrap();
        assert_eq!((c.node_id, c.port), (1, 9091));
        assert_eq!(group_coordinator(&view, 1).unwrap().node_id, 2);
        assert_eq!(group_coordinator(&view, 2), None, "a leaderless partition");
        assert_eq!(group_coordinator(&view, 3), None, "no such partition");
    }
}
