//! `spate topic create|list|describe|delete|alter-config`.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::incremental_alter_configs_request::{
    AlterConfigsResource, AlterableConfig,
};
use kafka_protocol::messages::{
    ApiKey, CreatePartitionsRequest, CreateTopicsRequest, DeleteTopicsRequest,
    DescribeConfigsRequest, IncrementalAlterConfigsRequest, MetadataResponse,
};
use kafka_protocol::protocol::StrBytes;
use serde_json::{json, Value};

use super::client::{
    check, kafka_error, key_value, list_offsets, topic_name, Client, ConnectArgs, LogEnd,
};
use super::table::{out, print_json, say, Table};

const CREATE_TOPICS_VERSIONS: RangeInclusive<i16> = 2..=7;
const CREATE_PARTITIONS_VERSIONS: RangeInclusive<i16> = 0..=3;
const DELETE_TOPICS_VERSIONS: RangeInclusive<i16> = 1..=6;
const DESCRIBE_CONFIGS_VERSIONS: RangeInclusive<i16> = 1..=4;
const INCREMENTAL_ALTER_CONFIGS_VERSIONS: RangeInclusive<i16> = 0..=1;
/// How long the broker may take to create or delete topics, in milliseconds.
const TOPIC_OPERATION_TIMEOUT_MS: i32 = 30_000;
/// DeleteTopics v6 names topics in `topics` rather than `topic_names`.
const DELETE_TOPICS_BY_STATE_VERSION: i16 = 6;
/// DescribeConfigs / IncrementalAlterConfigs resource type of a topic.
const RESOURCE_TOPIC: i8 = 2;
const OP_SET: i8 = 0;
const OP_DELETE: i8 = 1;
/// Kafka's limit on a topic name's length.
const MAX_TOPIC_NAME_BYTES: usize = 249;
const TOPIC_ALREADY_EXISTS: i16 = 36;
const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;

#[derive(Subcommand, Debug)]
pub enum TopicCommand {
    /// Create a topic.
    Create(CreateArgs),
    /// List topics with their partition counts.
    List(ListArgs),
    /// Show a topic's partitions (leader, replicas, log offsets) and its configs.
    Describe(DescribeArgs),
    /// Delete topics and all their data.
    Delete(DeleteArgs),
    /// Set or remove topic configs (retention.ms, segment.bytes, ...).
    AlterConfig(AlterConfigArgs),
    /// Raise a topic's partition count (keys then map to other partitions).
    AddPartitions(AddPartitionsArgs),
}

#[derive(Args, Debug)]
pub struct AddPartitionsArgs {
    /// Topic to grow.
    pub topic: String,
    /// The new total partition count; it must exceed the current one.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub total: i32,
    /// Ask the broker to validate the change without applying it.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Name of the new topic.
    pub topic: String,
    /// Partition count [default: the broker's --default-partitions].
    #[arg(short, long, value_parser = clap::value_parser!(i32).range(1..))]
    pub partitions: Option<i32>,
    /// Replicas per partition [default: the broker's].
    #[arg(short, long, value_parser = clap::value_parser!(i16).range(1..))]
    pub replication_factor: Option<i16>,
    /// A topic config, KEY=VALUE (repeatable), e.g. --config retention.ms=3600000.
    #[arg(short, long = "config", value_name = "KEY=VALUE")]
    pub configs: Vec<String>,
    /// Succeed without change if the topic already exists.
    #[arg(long)]
    pub if_not_exists: bool,
    /// Ask the broker to validate the request without creating anything.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Include internal topics such as __consumer_offsets.
    #[arg(long)]
    pub internal: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct DescribeArgs {
    /// Topic(s) to describe.
    #[arg(required = true)]
    pub topics: Vec<String>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// Topic(s) to delete.
    #[arg(required = true)]
    pub topics: Vec<String>,
    /// Succeed for topics that do not exist.
    #[arg(long)]
    pub if_exists: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct AlterConfigArgs {
    /// Topic to change.
    pub topic: String,
    /// Set a config, KEY=VALUE (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Remove a topic's own value for KEY, going back to the broker default (repeatable).
    #[arg(long = "delete", value_name = "KEY")]
    pub delete: Vec<String>,
    /// Ask the broker to validate the change without applying it.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: TopicCommand) -> Result<()> {
    match cmd {
        TopicCommand::Create(a) => create(a),
        TopicCommand::List(a) => list(a),
        TopicCommand::Describe(a) => describe(a),
        TopicCommand::Delete(a) => delete(a),
        TopicCommand::AlterConfig(a) => alter_config(a),
        TopicCommand::AddPartitions(a) => add_partitions(a),
    }
}

/// Rejects names Kafka would reject, before asking the broker.
pub fn validate_topic_name(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." {
        bail!("topic name {name:?} is not allowed");
    }
    if name.len() > MAX_TOPIC_NAME_BYTES {
        bail!(
            "topic name is {} bytes; the limit is {MAX_TOPIC_NAME_BYTES}",
            name.len()
        );
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        bail!("topic name {name:?} contains {bad:?}; allowed are ASCII letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

fn create(a: CreateArgs) -> Result<()> {
    validate_topic_name(&a.topic)?;
    let configs = a
        .configs
        .iter()
        .map(|c| key_value("--config", c))
        .collect::<Result<Vec<_>>>()?;
    let mut client = Client::connect(&a.connect)?;
    let topic = CreatableTopic::default()
        .with_name(topic_name(&a.topic))
        .with_num_partitions(a.partitions.unwrap_or(-1))
        .with_replication_factor(a.replication_factor.unwrap_or(-1))
        .with_configs(
            configs
                .iter()
                .map(|(k, v)| {
                    CreatableTopicConfig::default()
                        .with_name(StrBytes::from_string(k.clone()))
                        .with_value(Some(StrBytes::from_string(v.clone())))
                })
                .collect(),
        );
    let req = CreateTopicsRequest::default()
        .with_topics(vec![topic])
        .with_timeout_ms(TOPIC_OPERATION_TIMEOUT_MS)
        .with_validate_only(a.dry_run);
    let (_, reply) = client.call(ApiKey::CreateTopics, CREATE_TOPICS_VERSIONS, &req)?;
    let result = reply
        .topics
        .first()
        .context("CreateTopics reply names no topic")?;
    let existed = result.error_code == TOPIC_ALREADY_EXISTS && a.if_not_exists;
    if !existed {
        check(
            result.error_code,
            result.error_message.as_deref(),
            format!("creating topic {}", a.topic),
        )?;
    }
    if a.json {
        print_json(&json!({
            "topic": a.topic,
            "created": !existed && !a.dry_run,
            "already_existed": existed,
            "dry_run": a.dry_run,
            "partitions": result.num_partitions,
            "replication_factor": result.replication_factor,
            "topic_id": (!result.topic_id.is_nil()).then(|| result.topic_id.to_string()),
        }));
    } else if existed {
        say!("Topic {} already exists.", a.topic);
    } else if a.dry_run {
        say!(
            "Topic {} is valid: {} partitions, replication factor {} (nothing created).",
            a.topic,
            result.num_partitions,
            result.replication_factor
        );
    } else {
        say!(
            "Created topic {} with {} partitions, replication factor {}.",
            a.topic,
            result.num_partitions,
            result.replication_factor
        );
    }
    Ok(())
}

/// One partition as a metadata reply shows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct PartitionRow {
    partition: i32,
    /// -1: no leader (an election is under way, or every in-sync replica is offline).
    leader: i32,
    /// -1 when the broker's Metadata version has no epochs (before v7).
    leader_epoch: i32,
    replicas: Vec<i32>,
    isr: Vec<i32>,
    /// Replicas on brokers that are fenced or gone (Metadata v5+).
    offline: Vec<i32>,
    error: i16,
}

/// One topic as a metadata reply shows it.
struct TopicInfo {
    name: String,
    id: String,
    internal: bool,
    partitions: Vec<PartitionRow>,
}

fn topics_of(meta: &MetadataResponse) -> Vec<(TopicInfo, i16)> {
    let mut out: Vec<(TopicInfo, i16)> = meta
        .topics
        .iter()
        .map(|t| {
            let mut partitions: Vec<_> = t
                .partitions
                .iter()
                .map(|p| PartitionRow {
                    partition: p.partition_index,
                    leader: p.leader_id.0,
                    leader_epoch: p.leader_epoch,
                    replicas: p.replica_nodes.iter().map(|b| b.0).collect(),
                    isr: p.isr_nodes.iter().map(|b| b.0).collect(),
                    offline: p.offline_replicas.iter().map(|b| b.0).collect(),
                    error: p.error_code,
                })
                .collect();
            partitions.sort();
            (
                TopicInfo {
                    name: t.name.as_ref().map(|n| n.to_string()).unwrap_or_default(),
                    id: t.topic_id.to_string(),
                    internal: t.is_internal,
                    partitions,
                },
                t.error_code,
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    out
}

fn list(a: ListArgs) -> Result<()> {
    let mut client = Client::connect(&a.connect)?;
    let meta = client.metadata(None)?;
    let topics: Vec<TopicInfo> = topics_of(&meta)
        .into_iter()
        .map(|(t, _)| t)
        .filter(|t| a.internal || !(t.internal || t.name.starts_with("__")))
        .collect();
    if a.json {
        print_json(&Value::Array(
            topics
                .iter()
                .map(|t| {
                    json!({
                        "topic": t.name,
                        "partitions": t.partitions.len(),
                        "replication_factor": replication_factor(t),
                        "internal": t.internal,
                    })
                })
                .collect(),
        ));
        return Ok(());
    }
    let mut table = Table::new(&["TOPIC", "PARTITIONS", "REPLICATION-FACTOR"]);
    for t in &topics {
        table.row(vec![
            t.name.clone(),
            t.partitions.len().to_string(),
            replication_factor(t).to_string(),
        ]);
    }
    out(&table.render());
    Ok(())
}

fn replication_factor(t: &TopicInfo) -> usize {
    t.partitions.first().map_or(0, |p| p.replicas.len())
}

/// Earliest and latest offset of every partition that has a leader, asked of the leader (a
/// leaderless partition has none to tell: it is left out rather than failing the describe).
fn log_offsets(
    client: &mut Client,
    meta: &MetadataResponse,
    topic: &TopicInfo,
) -> Result<BTreeMap<i32, (i64, i64)>> {
    let addrs = Client::broker_addrs(meta);
    let mut by_leader: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for p in topic.partitions.iter().filter(|p| p.leader >= 0) {
        let addr = addrs.get(&p.leader).with_context(|| {
            format!(
                "{}/{}: leader {} is not among the brokers listed",
                topic.name, p.partition, p.leader
            )
        })?;
        by_leader.entry(addr.clone()).or_default().push(p.partition);
    }
    let mut out = BTreeMap::new();
    for (addr, parts) in by_leader {
        let conn = client.broker(&addr)?;
        let start = list_offsets(conn, &topic.name, &parts, LogEnd::Earliest)?;
        let end = list_offsets(conn, &topic.name, &parts, LogEnd::Latest)?;
        for ((p, s), e) in parts.iter().zip(start).zip(end) {
            out.insert(*p, (s, e));
        }
    }
    Ok(out)
}

/// (name, value, source) of a topic's configs.
fn topic_configs(client: &mut Client, topic: &str) -> Result<Vec<(String, String, String)>> {
    let req =
        DescribeConfigsRequest::default().with_resources(vec![DescribeConfigsResource::default()
            .with_resource_type(RESOURCE_TOPIC)
            .with_resource_name(StrBytes::from_string(topic.to_string()))
            .with_configuration_keys(None)]);
    let (_, reply) = client.call(ApiKey::DescribeConfigs, DESCRIBE_CONFIGS_VERSIONS, &req)?;
    let result = reply
        .results
        .first()
        .context("DescribeConfigs reply has no result")?;
    check(
        result.error_code,
        result.error_message.as_deref(),
        format!("describing the configs of {topic}"),
    )?;
    Ok(result
        .configs
        .iter()
        .map(|c| {
            let source = match c.config_source {
                1 => "topic",
                2..=4 => "broker",
                5 => "default",
                _ => "unknown",
            };
            (
                c.name.to_string(),
                c.value.as_ref().map(|v| v.to_string()).unwrap_or_default(),
                source.to_string(),
            )
        })
        .collect())
}

fn describe(a: DescribeArgs) -> Result<()> {
    for t in &a.topics {
        validate_topic_name(t)?;
    }
    let mut client = Client::connect(&a.connect)?;
    let meta = client.metadata(Some(&a.topics))?;
    let mut docs = Vec::new();
    let mut text = String::new();
    for (topic, code) in topics_of(&meta) {
        check(code, None, format!("describing topic {}", topic.name))?;
        let offsets = log_offsets(&mut client, &meta, &topic)?;
        let configs = topic_configs(&mut client, &topic.name)?;
        if a.json {
            docs.push(json!({
                "topic": topic.name,
                "topic_id": topic.id,
                "internal": topic.internal,
                "partitions": topic.partitions.iter().map(|p| {
                    let (start, end) = offsets.get(&p.partition).copied().unwrap_or((-1, -1));
                    json!({
                        "partition": p.partition,
                        "leader": p.leader,
                        "leader_epoch": p.leader_epoch,
                        "replicas": p.replicas,
                        "isr": p.isr,
                        "offline_replicas": p.offline,
                        "log_start_offset": start,
                        "log_end_offset": end,
                    })
                }).collect::<Vec<_>>(),
                "configs": configs.iter().map(|(k, v, s)| {
                    (k.clone(), json!({"value": v, "source": s}))
                }).collect::<serde_json::Map<_, _>>(),
            }));
            continue;
        }
        text.push_str(&format!(
            "Topic: {}  TopicId: {}  Partitions: {}  ReplicationFactor: {}\n\n",
            topic.name,
            topic.id,
            topic.partitions.len(),
            replication_factor(&topic)
        ));
        let mut table = Table::new(&[
            "PARTITION",
            "LEADER",
            "EPOCH",
            "REPLICAS",
            "ISR",
            "OFFLINE",
            "LOG-START-OFFSET",
            "LOG-END-OFFSET",
        ]);
        for p in &topic.partitions {
            let (start, end) = offsets.get(&p.partition).copied().unwrap_or((-1, -1));
            let or_none = |v: i32| {
                if v < 0 {
                    "-".to_string()
                } else {
                    v.to_string()
                }
            };
            table.row(vec![
                p.partition.to_string(),
                or_none(p.leader),
                or_none(p.leader_epoch),
                ids(&p.replicas),
                ids(&p.isr),
                if p.offline.is_empty() {
                    "-".to_string()
                } else {
                    ids(&p.offline)
                },
                start.to_string(),
                end.to_string(),
            ]);
        }
        text.push_str(&table.render());
        text.push('\n');
        let mut table = Table::new(&["CONFIG", "VALUE", "SOURCE"]);
        for (k, v, s) in configs {
            table.row(vec![k, v, s]);
        }
        text.push_str(&table.render());
        text.push('\n');
    }
    if a.json {
        print_json(&Value::Array(docs));
    } else {
        out(&format!("{}\n", text.trim_end_matches('\n')));
        out("\n");
    }
    Ok(())
}

fn ids(list: &[i32]) -> String {
    list.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn delete(a: DeleteArgs) -> Result<()> {
    for t in &a.topics {
        validate_topic_name(t)?;
    }
    let mut client = Client::connect(&a.connect)?;
    let version = client
        .bootstrap
        .versions
        .pick(ApiKey::DeleteTopics, DELETE_TOPICS_VERSIONS)
        .context("the broker cannot serve DeleteTopics")?;
    let mut req = DeleteTopicsRequest::default().with_timeout_ms(TOPIC_OPERATION_TIMEOUT_MS);
    if version >= DELETE_TOPICS_BY_STATE_VERSION {
        req.topics = a
            .topics
            .iter()
            .map(|t| DeleteTopicState::default().with_name(Some(topic_name(t))))
            .collect();
    } else {
        req.topic_names = a.topics.iter().map(|t| topic_name(t)).collect();
    }
    let reply = client
        .bootstrap
        .call(ApiKey::DeleteTopics, version, &req)
        .context("DeleteTopics request")?;
    let mut results = Vec::new();
    let mut first_error = None;
    for r in &reply.responses {
        let name = r.name.as_ref().map(|n| n.to_string()).unwrap_or_default();
        let missing = r.error_code == UNKNOWN_TOPIC_OR_PARTITION;
        if r.error_code != 0 && !(missing && a.if_exists) && first_error.is_none() {
            first_error = Some(kafka_error(
                r.error_code,
                r.error_message.as_deref(),
                format!("deleting topic {name}"),
            ));
        }
        results.push((name, r.error_code == 0, missing));
    }
    if a.json {
        print_json(&Value::Array(
            results
                .iter()
                .map(|(n, deleted, missing)| {
                    json!({"topic": n, "deleted": deleted, "existed": !missing})
                })
                .collect(),
        ));
    } else {
        for (n, deleted, missing) in &results {
            if *deleted {
                say!("Deleted topic {n}.");
            } else if *missing && a.if_exists {
                say!("Topic {n} does not exist.");
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn alter_config(a: AlterConfigArgs) -> Result<()> {
    validate_topic_name(&a.topic)?;
    if a.set.is_empty() && a.delete.is_empty() {
        bail!("nothing to change: give --set KEY=VALUE and/or --delete KEY");
    }
    let mut entries = Vec::new();
    for s in &a.set {
        let (k, v) = key_value("--set", s)?;
        entries.push(
            AlterableConfig::default()
                .with_name(StrBytes::from_string(k))
                .with_config_operation(OP_SET)
                .with_value(Some(StrBytes::from_string(v))),
        );
    }
    for k in &a.delete {
        if k.is_empty() || k.contains('=') {
            bail!("--delete {k:?}: expected a config name such as retention.ms");
        }
        entries.push(
            AlterableConfig::default()
                .with_name(StrBytes::from_string(k.clone()))
                .with_config_operation(OP_DELETE)
                .with_value(None),
        );
    }
    let mut client = Client::connect(&a.connect)?;
    let req = IncrementalAlterConfigsRequest::default()
        .with_resources(vec![AlterConfigsResource::default()
            .with_resource_type(RESOURCE_TOPIC)
            .with_resource_name(StrBytes::from_string(a.topic.clone()))
            .with_configs(entries)])
        .with_validate_only(a.dry_run);
    let (_, reply) = client.call(
        ApiKey::IncrementalAlterConfigs,
        INCREMENTAL_ALTER_CONFIGS_VERSIONS,
        &req,
    )?;
    for r in &reply.responses {
        check(
            r.error_code,
            r.error_message.as_deref(),
            format!("altering the configs of {}", a.topic),
        )?;
    }
    let configs = topic_configs(&mut client, &a.topic)?;
    if a.json {
        print_json(&json!({
            "topic": a.topic,
            "dry_run": a.dry_run,
            "configs": configs.iter().map(|(k, v, s)| {
                (k.clone(), json!({"value": v, "source": s}))
            }).collect::<serde_json::Map<_, _>>(),
        }));
    } else {
        say!(
            "{} the configs of topic {}.",
            if a.dry_run { "Validated" } else { "Updated" },
            a.topic
        );
    }
    Ok(())
}

fn add_partitions(a: AddPartitionsArgs) -> Result<()> {
    validate_topic_name(&a.topic)?;
    let mut client = Client::connect(&a.connect)?;
    let req = CreatePartitionsRequest::default()
        .with_topics(vec![CreatePartitionsTopic::default()
            .with_name(topic_name(&a.topic))
            .with_count(a.total)
            .with_assignments(None)])
        .with_timeout_ms(TOPIC_OPERATION_TIMEOUT_MS)
        .with_validate_only(a.dry_run);
    let (_, reply) = client.call(ApiKey::CreatePartitions, CREATE_PARTITIONS_VERSIONS, &req)?;
    let result = reply
        .results
        .first()
        .context("CreatePartitions reply names no topic")?;
    check(
        result.error_code,
        result.error_message.as_deref(),
        format!("raising the partitions of {} to {}", a.topic, a.total),
    )?;
    if a.json {
        print_json(&json!({"topic": a.topic, "partitions": a.total, "dry_run": a.dry_run}));
    } else if a.dry_run {
        say!(
            "Topic {} can grow to {} partitions (nothing changed).",
            a.topic,
            a.total
        );
    } else {
        say!("Topic {} now has {} partitions.", a.topic, a.total);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(validate_topic_name("orders.v1_eu-west").is_ok());
        assert!(validate_topic_name("").is_err());
        assert!(validate_topic_name("..").is_err());
        assert!(validate_topic_name("a b").is_err());
        assert!(validate_topic_name(&"x".repeat(250)).is_err());
    }
}
