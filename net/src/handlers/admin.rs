//! Topic administration: CreateTopics, DeleteTopics, CreatePartitions, DescribeConfigs,
//! DescribeCluster. Alone, metadata changes go through the store (persisted before the reply)
//! and the logs of new partitions are opened by their owning shards. In a cluster they are
//! requests to the controller (`ClusterPort`), answered once committed and applied on this node;
//! every node then opens, closes and reconfigures its replicas from the applied records.

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
use spate_replication::cluster::CallError;
use spate_replication::controller::active::CreateTopicRequest;
use spate_replication::partition::{
    apply_topic_configs, parse_topic_configs, AlterOp, ConfigSource, ConfigType, TopicConfigError,
    TopicConfigs,
};

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
const SOURCE_TOPIC: i8 = 1;
const SOURCE_STATIC_BROKER: i8 = 4;
/// DescribeConfigs' DYNAMIC_BROKER_CONFIG source (maintenance mode, decommissioning).
const SOURCE_DYNAMIC_BROKER: i8 = 2;
const SOURCE_DEFAULT: i8 = 5;
/// DescribeConfigs v3+ config types (Kafka's `ConfigType` codes).
const fn config_type_code(ty: ConfigType) -> i8 {
    match ty {
        ConfigType::Boolean => 1,
        ConfigType::String => 2,
        ConfigType::Int => 3,
        ConfigType::Long => 5,
        ConfigType::Double => 6,
        ConfigType::List => 7,
    }
}

/// Topic configs whose default is the broker's setting rather than Kafka's topic default.
const BROKER_BACKED: &[&str] = &[
    "retention.ms",
    "retention.bytes",
    "segment.bytes",
    "max.message.bytes",
];

/// The stored form of a topic's overrides (the metadata store keeps strings).
fn stored(configs: &TopicConfigs) -> BTreeMap<String, String> {
    configs
        .overrides()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
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

/// Every topic config with its effective value, where it comes from and its type. Those the
/// broker sets a default for (retention, segment and batch size) show the broker's value.
pub fn topic_configs(
    config: &BrokerConfig,
    set: &BTreeMap<String, String>,
) -> Vec<(String, String, i8, ConfigType)> {
    let broker_default = |k: &str| match k {
        "retention.ms" => Some(config.retention_ms.map_or(-1, |v| v as i64).to_string()),
        "retention.bytes" => Some(config.retention_bytes.map_or(-1, |v| v as i64).to_string()),
        "segment.bytes" => Some(config.segment_bytes.to_string()),
        "max.message.bytes" => Some(config.max_batch_bytes.to_string()),
        _ => None,
    };
    parse_topic_configs(set)
        .describe()
        .into_iter()
        .map(|d| match d.source {
            ConfigSource::Topic => (d.name.to_string(), d.value, SOURCE_TOPIC, d.ty),
            ConfigSource::Default => match broker_default(d.name) {
                Some(v) if BROKER_BACKED.contains(&d.name) => {
                    (d.name.to_string(), v, SOURCE_DEFAULT, d.ty)
                }
                _ => (d.name.to_string(), d.value, SOURCE_DEFAULT, d.ty),
            },
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
        let pairs: Vec<(String, String)> = t
            .configs
            .iter()
            .map(|c| {
                let value = c.value.as_ref().map(|v| v.to_string()).unwrap_or_default();
                (c.name.to_string(), value)
            })
            .collect();
        match TopicConfigs::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
            Ok(parsed) => configs = stored(&parsed),
            Err(e) => error = Some((ResponseError::InvalidConfig.code(), e.to_string())),
        }
        if error.is_none() {
            if let Err(msg) = check_topic_configs(&shard.config, &configs) {
                error = Some((ResponseError::InvalidConfig.code(), msg));
            }
        }
        if let Some(refused) = check_replication(shard, &t) {
            error = Some(refused);
        }
        if crate::metadata::is_reserved_topic_name(&t.name) {
            // The broker creates its internal topics itself (`__consumer_offsets` when a
            // group coordinator is first looked for); the controller takes the name from it.
            error = Some((
                ResponseError::InvalidTopicException.code(),
                format!(
                    "Topic name '{}' is reserved for the broker's internal use",
                    &*t.name
                ),
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
        } else if let Some(port) = &shard.config.cluster {
            let replication_factor = usize::try_from(t.replication_factor).ok();
            // Chosen here (the controller reads no randomness) and kept by the controller.
            let topic_id = fastrand::u128(1..);
            let create = CreateTopicRequest {
                name: t.name.to_string(),
                topic_id,
                partitions: partitions as usize,
                replication_factor,
                configs: configs.into_iter().collect(),
            };
            match port.create_topic(create, r.validate_only).await {
                Ok(()) => {
                    let view = port.view();
                    let created = view.metadata.topics.get(t.name.as_str());
                    if !r.validate_only {
                        tracing::info!(topic = %&*t.name, partitions, "created topic");
                    }
                    if req.api_version >= 5 {
                        res.num_partitions = partitions;
                        res.replication_factor = created
                            .and_then(|c| c.partitions.first())
                            .map(|p| p.replicas.len() as i16)
                            .or(replication_factor.map(|f| f as i16))
                            .unwrap_or(-1);
                    }
                    if req.api_version >= 7 && !r.validate_only {
                        res.topic_id = Uuid::from_u128(topic_id);
                    }
                }
                Err(e) => {
                    tracing::info!(topic = %&*t.name, code = e.code, msg = e.message, "refused to create topic");
                    res.error_code = e.code;
                    res.error_message = Some(str_bytes(&e.message));
                }
            }
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
        let resolved = match &name {
            Some(n) => Some(n.clone()),
            None => topic_name_of_id(shard, id.as_u128()),
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
        if crate::metadata::is_reserved_topic_name(&resolved) {
            // `__consumer_offsets` holds every group's committed offsets.
            res.error_code = ResponseError::InvalidRequest.code();
            if v >= 5 {
                res.error_message = Some(str_bytes(&format!(
                    "{resolved} is an internal topic and cannot be deleted"
                )));
            }
            resp.responses.push(res);
            continue;
        }
        if let Some(port) = &shard.config.cluster {
            let topic_id = port
                .view()
                .metadata
                .topics
                .get(&resolved)
                .map(|t| t.topic_id);
            match port.delete_topic(resolved.clone()).await {
                Ok(()) => {
                    if let Some(id) = topic_id.filter(|_| v >= 6) {
                        res.topic_id = Uuid::from_u128(id);
                    }
                    tracing::info!(topic = %resolved, "deleted topic");
                }
                Err(e) => set_call_error(&mut res.error_code, &mut res.error_message, v >= 5, &e),
            }
            resp.responses.push(res);
            continue;
        }
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
        if crate::metadata::is_reserved_topic_name(&t.name) {
            // A group's partition is its id's hash modulo the count: the count never changes.
            res.error_code = ResponseError::InvalidRequest.code();
            res.error_message = Some(str_bytes(&format!(
                "{} is an internal topic: its partition count is --offsets-topic-partitions",
                &*t.name
            )));
            resp.results.push(res);
            continue;
        }
        if let Some(port) = &shard.config.cluster {
            let outcome = if t.assignments.as_ref().is_some_and(|a| !a.is_empty()) {
                Err(CallError::new(
                    ResponseError::InvalidRequest.code(),
                    "manual replica assignments are not supported: the controller places replicas",
                ))
            } else if t.count < 1 || t.count > shard.config.max_partitions_per_topic {
                Err(CallError::new(
                    ResponseError::InvalidPartitions.code(),
                    format!(
                        "partitions must be in 1..={}",
                        shard.config.max_partitions_per_topic
                    ),
                ))
            } else {
                port.create_partitions(t.name.to_string(), t.count as usize, r.validate_only)
                    .await
            };
            match outcome {
                Ok(()) if !r.validate_only => {
                    tracing::info!(topic = %&*t.name, to = t.count, "added partitions");
                }
                Ok(()) => {}
                Err(e) => {
                    tracing::info!(topic = %&*t.name, code = e.code, msg = e.message, "refused to add partitions");
                    set_call_error(&mut res.error_code, &mut res.error_message, true, &e);
                }
            }
            resp.results.push(res);
            continue;
        }
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

/// IncrementalAlterConfigs: SET, DELETE, APPEND and SUBTRACT of topic configs, all of a
/// resource's operations or none. The change is persisted in the metadata store, then applied
/// to the topic's open logs on every shard.
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
        if res.resource_type == RESOURCE_BROKER {
            // Maintenance mode and decommissioning are the broker settings changed at run time.
            if let Err((code, msg)) = super::maintenance::alter(shard, res, r.validate_only).await {
                out.error_code = code;
                out.error_message = Some(str_bytes(&msg));
            }
            resp.responses.push(out);
            continue;
        }
        let next = topic_resource(shard, res.resource_type, &res.resource_name)
            .and_then(|current| alter_ops(&current, res));
        if let Err((code, msg)) =
            change_topic_configs(shard, res.resource_name.as_str(), next, r.validate_only).await
        {
            out.error_code = code;
            out.error_message = Some(str_bytes(&msg));
        }
        resp.responses.push(out);
    }
    encode_response(req.correlation_id, req.api_version, &resp)
}

/// The legacy AlterConfigs (API key 33, which librdkafka's and kafka-python's admin clients
/// still use): Kafka's replace-all semantics, the named configs become the topic's overrides
/// and every other override goes back to its default.
pub async fn alter_configs(shard: &Rc<Shard>, req: &Request) -> Result<Bytes, NetError> {
    let r: AlterConfigsRequest = decode_body(req)?;
    let mut resp = AlterConfigsResponse::default();
    for res in &r.resources {
        let mut out = alter_configs_response::AlterConfigsResourceResponse::default();
        out.resource_type = res.resource_type;
        out.resource_name = res.resource_name.clone();
        let pairs: Vec<(String, String)> = res
            .configs
            .iter()
            .map(|c| {
                let value = c.value.as_ref().map(|v| v.to_string()).unwrap_or_default();
                (c.name.to_string(), value)
            })
            .collect();
        let next = topic_resource(shard, res.resource_type, &res.resource_name).and_then(|_| {
            TopicConfigs::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .map_err(invalid_config)
        });
        if let Err((code, msg)) =
            change_topic_configs(shard, res.resource_name.as_str(), next, r.validate_only).await
        {
            out.error_code = code;
            out.error_message = Some(str_bytes(&msg));
        }
        resp.responses.push(out);
    }
    encode_response(req.correlation_id, req.api_version, &resp)
}

fn invalid_config(e: TopicConfigError) -> (i16, String) {
    (ResponseError::InvalidConfig.code(), e.to_string())
}

/// The current overrides of the topic a config change names; the error for anything else.
fn topic_resource(
    shard: &Rc<Shard>,
    resource_type: i8,
    name: &str,
) -> Result<TopicConfigs, (i16, String)> {
    if resource_type != RESOURCE_TOPIC {
        return Err((
            ResponseError::InvalidRequest.code(),
            "only topic configs can be changed; broker settings are static (restart with new \
             flags)"
                .into(),
        ));
    }
    match current_topic_configs(shard, name) {
        Some(configs) => Ok(parse_topic_configs(&configs)),
        None => Err((
            ResponseError::UnknownTopicOrPartition.code(),
            format!("no topic {name}"),
        )),
    }
}

/// Applies IncrementalAlterConfigs' operations to `current`: all or none.
fn alter_ops(
    current: &TopicConfigs,
    res: &AlterConfigsResource,
) -> Result<TopicConfigs, (i16, String)> {
    let mut ops = Vec::with_capacity(res.configs.len());
    for c in &res.configs {
        let Some(op) = AlterOp::from_code(c.config_operation) else {
            return Err((
                ResponseError::InvalidRequest.code(),
                format!("unknown config operation {}", c.config_operation),
            ));
        };
        ops.push((c.name.as_str(), op, c.value.as_deref()));
    }
    current.alter(ops).map_err(invalid_config)
}

/// Checks a topic's new overrides against the broker's limits, then (unless `validate_only`)
/// persists them and applies them to the topic's open logs on every shard.
/// Stores a topic's new configs (both alter APIs end here), or logs why they were refused.
async fn change_topic_configs(
    shard: &Rc<Shard>,
    name: &str,
    next: Result<TopicConfigs, (i16, String)>,
    validate_only: bool,
) -> Result<(), (i16, String)> {
    let outcome = match next {
        Ok(next) => store_topic_configs(shard, name, next, validate_only).await,
        Err(e) => Err(e),
    };
    if let Err((code, msg)) = &outcome {
        tracing::info!(resource = %name, code, msg, "refused config change");
    }
    outcome
}

async fn store_topic_configs(
    shard: &Rc<Shard>,
    name: &str,
    next: TopicConfigs,
    validate_only: bool,
) -> Result<(), (i16, String)> {
    let configs = stored(&next);
    check_topic_configs(&shard.config, &configs)
        .map_err(|msg| (ResponseError::InvalidConfig.code(), msg))?;
    if validate_only {
        return Ok(());
    }
    if let Some(port) = &shard.config.cluster {
        let current = current_topic_configs(shard, name).unwrap_or_default();
        let changes = config_changes(&current, &configs);
        if changes.is_empty() {
            return Ok(());
        }
        port.set_topic_configs(name.to_string(), changes)
            .await
            .map_err(|e| (e.code, e.message))?;
        // Every node applies the change to its replicas when it applies the records.
        tracing::info!(topic = name, ?configs, "changed topic configs");
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
        let entries: Vec<(String, String, i8, ConfigType)> = match res.resource_type {
            RESOURCE_TOPIC => match shard.topics().get(res.resource_name.as_str()) {
                Some(t) => topic_configs(&shard.config, &t.configs),
                None => {
                    out.error_code = ResponseError::UnknownTopicOrPartition.code();
                    Vec::new()
                }
            },
            RESOURCE_BROKER => {
                let mut configs = broker_configs(&shard.config);
                for (name, v) in super::maintenance::describe(shard, res.resource_name.as_str()) {
                    let name = name.to_string();
                    configs.push((name, v, SOURCE_DYNAMIC_BROKER, ConfigType::Boolean));
                }
                configs
            }
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
            .map(|(k, v, source, ty)| {
                let mut c = DescribeConfigsResourceResult::default();
                c.name = str_bytes(&k);
                c.value = Some(str_bytes(&v));
                c.read_only =
                    res.resource_type == RESOURCE_BROKER && !super::maintenance::is_dynamic(&k);
                c.config_source = source;
                if req.api_version >= 3 {
                    c.config_type = config_type_code(ty);
                }
                c
            })
            .collect();
        resp.results.push(out);
    }
    encode_response(req.correlation_id, req.api_version, &resp)
}

fn broker_configs(config: &BrokerConfig) -> Vec<(String, String, i8, ConfigType)> {
    let s = SOURCE_STATIC_BROKER;
    let configs: Vec<(String, String, i8)> = vec![
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
    ];
    configs
        .into_iter()
        .map(|(k, v, source)| {
            let ty = match k.as_str() {
                "auto.create.topics.enable" => ConfigType::Boolean,
                "log.segment.bytes" => ConfigType::Long,
                _ => ConfigType::Int,
            };
            (k, v, source, ty)
        })
        .collect()
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

/// The replication factor and assignments a CreateTopics entry asks for, checked: alone, only
/// factor 1 (or -1, the default); in a cluster any positive factor or -1 (the controller's
/// default; it refuses a factor above the live brokers) and no manual assignments.
fn check_replication(
    shard: &Shard,
    t: &create_topics_request::CreatableTopic,
) -> Option<(i16, String)> {
    if shard.config.cluster.is_none() {
        return (!matches!(t.replication_factor, -1 | 1)).then(|| {
            (
                ResponseError::InvalidReplicationFactor.code(),
                "a single-node broker supports replication factor 1".into(),
            )
        });
    }
    if !t.assignments.is_empty() {
        return Some((
            ResponseError::InvalidRequest.code(),
            "manual replica assignments are not supported: the controller places replicas".into(),
        ));
    }
    (t.replication_factor == 0 || t.replication_factor < -1).then(|| {
        (
            ResponseError::InvalidReplicationFactor.code(),
            "the replication factor must be positive, or -1 for the cluster's default".into(),
        )
    })
}

/// The name of the topic with `id`: in a cluster from the controller's metadata, alone from
/// the store.
fn topic_name_of_id(shard: &Shard, id: u128) -> Option<String> {
    match &shard.config.cluster {
        Some(port) => port
            .view()
            .metadata
            .topics
            .iter()
            .find(|(_, t)| t.topic_id == id)
            .map(|(name, _)| name.clone()),
        None => shard
            .topics()
            .values()
            .find(|t| t.id == id)
            .map(|t| t.name.clone()),
    }
}

/// A topic's config overrides as stored: in a cluster the controller's, alone the store's.
fn current_topic_configs(shard: &Shard, name: &str) -> Option<BTreeMap<String, String>> {
    match &shard.config.cluster {
        Some(port) => port
            .view()
            .metadata
            .topics
            .get(name)
            .map(|t| t.configs.clone()),
        None => shard.topics().get(name).map(|t| t.configs.clone()),
    }
}

/// What turns the overrides `current` into `next`: keys set to a new value, and keys removed.
pub(crate) fn config_changes(
    current: &BTreeMap<String, String>,
    next: &BTreeMap<String, String>,
) -> Vec<(String, Option<String>)> {
    let set = next
        .iter()
        .filter(|(k, v)| current.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), Some(v.clone())));
    let removed = current
        .keys()
        .filter(|k| !next.contains_key(*k))
        .map(|k| (k.clone(), None));
    set.chain(removed).collect()
}

/// A controller call's refusal in a response: its code, and its message where the version has
/// a field for it.
fn set_call_error(
    code: &mut i16,
    message: &mut Option<kafka_protocol::protocol::StrBytes>,
    has_message: bool,
    e: &CallError,
) {
    *code = e.code;
    if has_message {
        *message = Some(str_bytes(&e.message));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn config_changes_set_new_values_and_remove_dropped_keys() {
        let current = map(&[("retention.ms", "1000"), ("cleanup.policy", "compact")]);
        let next = map(&[("retention.ms", "2000"), ("segment.bytes", "1048576")]);
        let mut changes = config_changes(&current, &next);
        changes.sort();
        assert_eq!(
            changes,
            [
                ("cleanup.policy".to_string(), None),
                ("retention.ms".to_string(), Some("2000".to_string())),
                ("segment.bytes".to_string(), Some("1048576".to_string())),
            ]
        );
        assert!(config_changes(&current, &current).is_empty());
    }
}
