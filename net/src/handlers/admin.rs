//! Topic administration: CreateTopics, DeleteTopics, CreatePartitions, DescribeConfigs,
//! DescribeCluster. Metadata changes go through the store (persisted before the reply); logs of
//! new partitions are opened lazily by their owning shard.

use std::collections::BTreeMap;
use std::rc::Rc;

use bytes::Bytes;
use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult,
};
use kafka_protocol::messages::incremental_alter_configs_request::AlterConfigsResource;
use kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse;
use kafka_protocol::messages::*;
use kafka_protocol::ResponseError;
use uuid::Uuid;

use super::{str_bytes, topic_name};
use crate::config::BrokerConfig;
use crate::dispatch::encode_response;
use crate::error::{or_storage_error, NetError};
use crate::metadata::{Refused, ShardLimit};
use crate::request::{decode_body, Request};
use crate::shard::Shard;
use spate_replication::partition::apply_topic_configs;

/// Topic configs this broker understands; anything else is INVALID_CONFIG.
pub const TOPIC_CONFIG_KEYS: &[&str] = &[
    "retention.ms",
    "retention.bytes",
    "segment.bytes",
    "max.message.bytes",
    "cleanup.policy",
];
const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
const SOURCE_TOPIC: i8 = 1;
const SOURCE_STATIC_BROKER: i8 = 4;
const SOURCE_DEFAULT: i8 = 5;

/// Checks a topic config entry: known key, parseable value.
fn validate_config(key: &str, value: &str) -> Result<(), String> {
    match key {
        "retention.ms" | "retention.bytes" => value
            .parse::<i64>()
            .map(|_| ())
            .map_err(|e| format!("{key}: {e}")),
        "segment.bytes" | "max.message.bytes" => match value.parse::<i64>() {
            Ok(v) if v > 0 => Ok(()),
            _ => Err(format!("{key} must be a positive integer")),
        },
        "cleanup.policy" if value == "delete" => Ok(()),
        "cleanup.policy" => Err("only cleanup.policy=delete is supported".into()),
        _ => Err(format!("unknown topic config {key}")),
    }
}

/// Checks a topic's configs together, as the log will see them: e.g. a batch must fit in a
/// segment. Refusing here keeps a topic from being created that could never open.
fn check_topic_configs(
    config: &BrokerConfig,
    set: &BTreeMap<String, String>,
) -> Result<(), String> {
    let mut lc = config.log_config();
    apply_topic_configs(&mut lc, set);
    lc.validate().map_err(|e| e.to_string())
}

/// Effective value of every known topic config, and whether the topic set it.
pub fn topic_configs(
    config: &BrokerConfig,
    set: &BTreeMap<String, String>,
) -> Vec<(String, String, bool)> {
    let default = |k: &str| match k {
        "retention.ms" => config.retention_ms.map_or(-1, |v| v as i64).to_string(),
        "retention.bytes" => config.retention_bytes.map_or(-1, |v| v as i64).to_string(),
        "segment.bytes" => config.segment_bytes.to_string(),
        "max.message.bytes" => config.max_batch_bytes.to_string(),
        _ => "delete".to_string(),
    };
    TOPIC_CONFIG_KEYS
        .iter()
        .map(|&k| match set.get(k) {
            Some(v) => (k.to_string(), v.clone(), true),
            None => (k.to_string(), default(k), false),
        })
        .collect()
}

pub async fn create_topics(shard: &Rc<Shard>, req: &Request) -> Result<Bytes, NetError> {
    let r: CreateTopicsRequest = decode_body(req)?;
    let mut resp = CreateTopicsResponse::default();
    for t in r.topics {
        let mut res = CreatableTopicResult::default();
        res.name = t.name.clone();
        res.num_partitions = -1;
        res.replication_factor = -1;
        let partitions = if !t.assignments.is_empty() {
            t.assignments.len() as i32
        } else if t.num_partitions == -1 {
            shard.config.default_partitions
        } else {
            t.num_partitions
        };
        let mut configs = BTreeMap::new();
        let mut error: Option<(i16, String)> = None;
        for c in &t.configs {
            let value = c.value.as_ref().map(|v| v.to_string()).unwrap_or_default();
            match validate_config(&c.name, &value) {
                Ok(()) => {
                    configs.insert(c.name.to_string(), value);
                }
                Err(msg) => error = Some((ResponseError::InvalidConfig.code(), msg)),
            }
        }
        if error.is_none() {
            if let Err(msg) = check_topic_configs(&shard.config, &configs) {
                error = Some((ResponseError::InvalidConfig.code(), msg));
            }
        }
        if !matches!(t.replication_factor, -1 | 1) {
            error = Some((
                ResponseError::InvalidReplicationFactor.code(),
                "a single-node broker supports replication factor 1".into(),
            ));
        }
        if partitions < 1 || partitions > shard.config.max_partitions_per_topic {
            error = Some((
                ResponseError::InvalidPartitions.code(),
                format!(
                    "partitions must be in 1..={}",
                    shard.config.max_partitions_per_topic
                ),
            ));
        }
        if let Some((code, msg)) = error {
            res.error_code = code;
            res.error_message = Some(str_bytes(&msg));
            tracing::info!(topic = %&*t.name, code, msg, "refused to create topic");
        } else {
            let limit = shard_limit(shard);
            let outcome = if r.validate_only {
                shard
                    .metadata
                    .check_create_topic(&t.name, partitions, limit)
                    .map(|()| None)
            } else {
                store_outcome(
                    shard
                        .metadata
                        .create_topic(&t.name, partitions, configs, false, limit),
                )
                .map(Some)
            };
            match outcome {
                Ok(created) => {
                    if let Some(meta) = created {
                        tracing::info!(topic = %meta.name, partitions, "created topic");
                        shard.open_topic_on_owners(&meta.name).await;
                        if req.api_version >= 7 {
                            res.topic_id = Uuid::from_u128(meta.id);
                        }
                    }
                    if req.api_version >= 5 {
                        res.num_partitions = partitions;
                        res.replication_factor = 1;
                    }
                }
                Err(refused) => {
                    tracing::info!(topic = %&*t.name, code = refused.code, msg = refused.message, "refused to create topic");
                    res.error_code = refused.code;
                    res.error_message = Some(str_bytes(&refused.message));
                }
            }
        }
        resp.topics.push(res);
    }
    encode_response(req.correlation_id, req.api_version, &resp)
}

pub async fn delete_topics(shard: &Rc<Shard>, req: &Request) -> Result<Bytes, NetError> {
    let r: DeleteTopicsRequest = decode_body(req)?;
    let mut wanted: Vec<(Option<String>, Uuid)> = r
        .topic_names
        .iter()
        .map(|n| (Some(n.to_string()), Uuid::nil()))
        .collect();
    wanted.extend(
        r.topics
            .iter()
            .map(|t| (t.name.as_ref().map(|n| n.to_string()), t.topic_id)),
    );
    let mut resp = DeleteTopicsResponse::default();
    for (name, id) in wanted {
        let mut res = DeletableTopicResult::default();
        let v = req.api_version;
        if v >= 6 {
            res.topic_id = id;
        }
        let topics = shard.topics();
        let resolved = match &name {
            Some(n) => Some(n.clone()),
            None => topics
                .values()
                .find(|t| t.id == id.as_u128())
                .map(|t| t.name.clone()),
        };
        res.name = resolved
            .as_deref()
            .map(topic_name)
            .or(name.as_deref().map(topic_name));
        let Some(resolved) = resolved else {
            res.error_code = ResponseError::UnknownTopicId.code();
            resp.responses.push(res);
            continue;
        };
        match or_storage_error(shard.metadata.delete_topic(&resolved)) {
            Ok(meta) => {
                if v >= 6 {
                    res.topic_id = Uuid::from_u128(meta.id);
                }
                let (topic, count) = (meta.name.clone(), meta.partitions);
                for r in shard
                    .router
                    .broadcast(move |s| {
                        let topic = topic.clone();
                        async move { s.delete_partitions(&topic, count).await }
                    })
                    .await
                {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "deleting partitions on a shard");
                    }
                }
                tracing::info!(topic = %meta.name, "deleted topic");
            }
            Err(code) => res.error_code = code,
        }
        resp.responses.push(res);
    }
    encode_response(req.correlation_id, req.api_version, &resp)
}

pub async fn create_partitions(shard: &Rc<Shard>, req: &Request) -> Result<Bytes, NetError> {
    let r: CreatePartitionsRequest = decode_body(req)?;
    let mut resp = CreatePartitionsResponse::default();
    for t in r.topics {
        let mut res = CreatePartitionsTopicResult::default();
        res.name = t.name.clone();
        let outcome = store_outcome(shard.metadata.create_partitions(
            &t.name,
            t.count,
            shard.config.max_partitions_per_topic,
            shard_limit(shard),
            r.validate_only,
        ));
        match outcome {
            Ok(old) if !r.validate_only => {
                tracing::info!(topic = %&*t.name, from = old, to = t.count, "added partitions");
                shard.open_topic_on_owners(&t.name).await;
            }
            Ok(_) => {}
            Err(refused) => {
                tracing::info!(topic = %&*t.name, code = refused.code, msg = refused.message, "refused to add partitions");
                res.error_code = refused.code;
                res.error_message = Some(str_bytes(&refused.message));
            }
        }
        resp.results.push(res);
    }
    encode_response(req.correlation_id, req.api_version, &resp)
}

const CONFIG_OP_SET: i8 = 0;
const CONFIG_OP_DELETE: i8 = 1;

/// IncrementalAlterConfigs: SET and DELETE of topic configs. The change is persisted in the
/// metadata store, then applied to the topic's open logs on every shard.
pub async fn incremental_alter_configs(
    shard: &Rc<Shard>,
    req: &Request,
) -> Result<Bytes, NetError> {
    let r: IncrementalAlterConfigsRequest = decode_body(req)?;
    let mut resp = IncrementalAlterConfigsResponse::default();
    for res in &r.resources {
        let mut out = AlterConfigsResourceResponse::default();
        out.resource_type = res.resource_type;
        out.resource_name = res.resource_name.clone();
        if let Err((code, msg)) = alter_topic_configs(shard, res, r.validate_only).await {
            tracing::info!(resource = %res.resource_name.as_str(), code, msg, "refused config change");
            out.error_code = code;
            out.error_message = Some(str_bytes(&msg));
        }
        resp.responses.push(out);
    }
    encode_response(req.correlation_id, req.api_version, &resp)
}

async fn alter_topic_configs(
    shard: &Rc<Shard>,
    res: &AlterConfigsResource,
    validate_only: bool,
) -> Result<(), (i16, String)> {
    let invalid = |msg: String| (ResponseError::InvalidConfig.code(), msg);
    if res.resource_type != RESOURCE_TOPIC {
        return Err((
            ResponseError::InvalidRequest.code(),
            "only topic configs can be changed; broker settings are static (restart with new \
             flags)"
                .into(),
        ));
    }
    let name = res.resource_name.as_str();
    let Some(topic) = shard.topics().get(name).cloned() else {
        return Err((
            ResponseError::UnknownTopicOrPartition.code(),
            format!("no topic {name}"),
        ));
    };
    let mut configs = topic.configs.clone();
    for c in &res.configs {
        let key = c.name.as_str();
        match c.config_operation {
            CONFIG_OP_SET => {
                let value = c.value.as_ref().map(|v| v.to_string()).unwrap_or_default();
                validate_config(key, &value).map_err(invalid)?;
                configs.insert(key.to_string(), value);
            }
            CONFIG_OP_DELETE => {
                if !TOPIC_CONFIG_KEYS.contains(&key) {
                    return Err(invalid(format!("unknown topic config {key}")));
                }
                configs.remove(key);
            }
            _ => {
                return Err(invalid(format!(
                    "{key}: APPEND and SUBTRACT apply to list configs; this broker's are scalars"
                )))
            }
        }
    }
    check_topic_configs(&shard.config, &configs).map_err(invalid)?;
    if validate_only {
        return Ok(());
    }
    let storage = |e: NetError| (ResponseError::KafkaStorageError.code(), e.to_string());
    match shard.metadata.set_topic_configs(name, configs.clone()) {
        Ok(Ok(())) => {}
        Ok(Err(code)) => return Err((code, format!("topic {name}"))),
        Err(e) => return Err(storage(e.into())),
    }
    tracing::info!(topic = name, ?configs, "changed topic configs");
    for s in 0..shard.router.shards() {
        let (topic, configs) = (name.to_string(), configs.clone());
        shard
            .router
            .run_on(s, move |sh| async move {
                sh.reconfigure_topic(&topic, &configs)
            })
            .await
            .map_err(|e| storage(e.into()))?;
    }
    Ok(())
}

pub fn describe_configs(shard: &Rc<Shard>, req: &Request) -> Result<Bytes, NetError> {
    let r: DescribeConfigsRequest = decode_body(req)?;
    let mut resp = DescribeConfigsResponse::default();
    for res in r.resources {
        let mut out = DescribeConfigsResult::default();
        out.resource_type = res.resource_type;
        out.resource_name = res.resource_name.clone();
        let entries: Vec<(String, String, i8)> = match res.resource_type {
            RESOURCE_TOPIC => match shard.topics().get(res.resource_name.as_str()) {
                Some(t) => topic_configs(&shard.config, &t.configs)
                    .into_iter()
                    .map(|(k, v, set)| (k, v, if set { SOURCE_TOPIC } else { SOURCE_DEFAULT }))
                    .collect(),
                None => {
                    out.error_code = ResponseError::UnknownTopicOrPartition.code();
                    Vec::new()
                }
            },
            RESOURCE_BROKER => broker_configs(&shard.config),
            _ => {
                out.error_code = ResponseError::InvalidRequest.code();
                out.error_message = Some(str_bytes("only topic and broker resources"));
                Vec::new()
            }
        };
        let keys = res.configuration_keys.as_ref();
        out.configs = entries
            .into_iter()
            .filter(|(k, ..)| keys.is_none_or(|ks| ks.iter().any(|w| w.as_str() == k)))
            .map(|(k, v, source)| {
                let mut c = DescribeConfigsResourceResult::default();
                c.name = str_bytes(&k);
                c.value = Some(str_bytes(&v));
                c.read_only = res.resource_type == RESOURCE_BROKER;
                c.config_source = source;
                c
            })
            .collect();
        resp.results.push(out);
    }
    encode_response(req.correlation_id, req.api_version, &resp)
}

fn broker_configs(config: &BrokerConfig) -> Vec<(String, String, i8)> {
    let s = SOURCE_STATIC_BROKER;
    vec![
        ("broker.id".into(), config.node_id.to_string(), s),
        (
            "num.partitions".into(),
            config.default_partitions.to_string(),
            s,
        ),
        (
            "auto.create.topics.enable".into(),
            config.auto_create_topics.to_string(),
            s,
        ),
        (
            "log.segment.bytes".into(),
            config.segment_bytes.to_string(),
            s,
        ),
        (
            "message.max.bytes".into(),
            config.max_batch_bytes.to_string(),
            s,
        ),
        (
            "socket.request.max.bytes".into(),
            config.max_frame_bytes.to_string(),
            s,
        ),
    ]
}

pub fn describe_cluster(shard: &Rc<Shard>, req: &Request) -> Result<Bytes, NetError> {
    let r: DescribeClusterRequest = decode_body(req)?;
    let mut resp = DescribeClusterResponse::default();
    let cluster = super::metadata::brokers_view(shard, r.include_fenced_brokers);
    resp.cluster_id = str_bytes(&cluster.cluster_id);
    resp.controller_id = BrokerId(cluster.controller_id);
    resp.endpoint_type = 1;
    resp.cluster_authorized_operations = i32::MIN;
    for listed in &cluster.brokers {
        let mut b = DescribeClusterBroker::default();
        b.broker_id = BrokerId(listed.node_id);
        b.host = str_bytes(&listed.host);
        b.port = i32::from(listed.port);
        b.is_fenced = listed.fenced;
        resp.brokers.push(b);
    }
    encode_response(req.correlation_id, req.api_version, &resp)
}

/// The per-shard partition limit as the metadata store checks it.
pub(crate) fn shard_limit(shard: &Shard) -> ShardLimit {
    ShardLimit {
        shards: shard.router.shards(),
        max_partitions_per_shard: shard.config.max_partitions_per_shard,
    }
}

/// A metadata-store answer for one topic: a failure to persist (disk full, I/O error) is
/// KAFKA_STORAGE_ERROR for that topic instead of failing the whole request.
fn store_outcome<T, E: std::fmt::Display>(r: Result<Result<T, Refused>, E>) -> Result<T, Refused> {
    r.unwrap_or_else(|e| {
        tracing::error!(error = %e, "metadata store update failed");
        Err(Refused {
            code: ResponseError::KafkaStorageError.code(),
            message: format!("the broker could not persist the change: {e}"),
        })
    })
}
