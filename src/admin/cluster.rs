//! `spate cluster info`: cluster id, controller (and its epoch), nodes (alive, voter, replicas,
//! leaders, maintenance, decommissioning), topic and partition counts, and the API versions the
//! bootstrap broker speaks.
//! `spate cluster unregister ID`: declares a stopped broker gone for good (its data directory
//! wiped), so its id may join again as a new node (Kafka's UnregisterBroker, KIP-631).
//! `spate cluster restart-check ID`: whether node ID can be restarted now without leaving a
//! partition short of replicas (a rolling upgrade runs it before each node).
//! `spate cluster rebalance`: see [`rebalance`].

pub mod rebalance;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kafka_protocol::messages::describe_quorum_request::{PartitionData, TopicData};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, BrokerId, DescribeClusterRequest, DescribeQuorumRequest, TopicName,
    UnregisterBrokerRequest,
};
use kafka_protocol::protocol::StrBytes;
use serde_json::{json, Value};

use super::client::{check, kafka_error, Client, ConnectArgs};
use super::table::{out, print_json, say, Table};

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Show the cluster id, controller, brokers and what the brokers speak.
    Info(InfoArgs),
    /// Forget a stopped broker whose data directory is gone: it leaves every ISR, and its id
    /// may join again with a new (empty) data directory. A live broker is refused.
    Unregister(UnregisterArgs),
    /// Exit 0 ("safe to restart node ID") only when every partition has its full ISR (ISR =
    /// replicas), every node is up, and no node other than ID is in maintenance; otherwise
    /// exit 1 naming what is not.
    RestartCheck(RestartCheckArgs),
    /// Even out replicas, then preferred leaders, across the brokers (after adding one):
    /// prints the fewest moves that do it; --execute submits them, waits for them to end and
    /// elects the preferred leaders.
    Rebalance(rebalance::RebalanceArgs),
}

#[derive(Args, Debug)]
pub struct RestartCheckArgs {
    /// The node (broker) id about to be restarted.
    #[arg(value_parser = clap::value_parser!(i32).range(0..))]
    pub id: i32,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct UnregisterArgs {
    /// The broker (node) id to unregister.
    #[arg(value_parser = clap::value_parser!(i32).range(0..))]
    pub id: i32,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// UnregisterBroker versions this command speaks (KIP-631 defines only v0).
const UNREGISTER_BROKER_VERSIONS: std::ops::RangeInclusive<i16> = 0..=0;

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Also list every API the bootstrap broker supports, with its version range.
    #[arg(long)]
    pub api_versions: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: ClusterCommand) -> Result<()> {
    match cmd {
        ClusterCommand::Info(a) => info(a),
        ClusterCommand::Unregister(a) => unregister(a),
        ClusterCommand::RestartCheck(a) => restart_check(a),
        ClusterCommand::Rebalance(a) => rebalance::run(a),
    }
}

/// Partitions listed at most in the text output of restart-check (the count is always given).
const MAX_LISTED_PARTITIONS: usize = 50;

fn restart_check(a: RestartCheckArgs) -> Result<()> {
    let mut client = Client::connect(&a.connect)?;
    let described = client.describe_cluster()?;
    let mut problems: Vec<String> = Vec::new();
    if !described.brokers.iter().any(|b| b.broker_id.0 == a.id) {
        anyhow::bail!("node {} is not a registered broker of this cluster", a.id);
    }
    let mut brokers: Vec<(i32, bool)> = described
        .brokers
        .iter()
        .map(|b| (b.broker_id.0, b.is_fenced))
        .collect();
    brokers.sort();
    for &(id, fenced) in &brokers {
        if fenced && id != a.id {
            problems.push(format!("node {id} is down (fenced)"));
        }
        if id != a.id && super::node::maintenance_of(&mut client, id)? {
            problems.push(format!("node {id} is in maintenance mode"));
        }
    }
    let meta = client.metadata(None)?;
    let mut short: Vec<(String, i32, Vec<i32>, Vec<i32>)> = Vec::new();
    for t in &meta.topics {
        let name = t.name.as_ref().map(|n| n.to_string()).unwrap_or_default();
        for p in &t.partitions {
            let mut replicas: Vec<i32> = p.replica_nodes.iter().map(|b| b.0).collect();
            let mut isr: Vec<i32> = p.isr_nodes.iter().map(|b| b.0).collect();
            replicas.sort_unstable();
            isr.sort_unstable();
            if replicas != isr || p.leader_id.0 < 0 {
                short.push((name.clone(), p.partition_index, replicas, isr));
            }
        }
    }
    short.sort();
    if !short.is_empty() {
        problems.push(format!(
            "{} partition(s) not fully replicated (ISR short of its replicas, or no leader)",
            short.len()
        ));
    }
    let safe = problems.is_empty();
    if a.json {
        print_json(&json!({
            "node": a.id,
            "safe": safe,
            "problems": problems,
            "under_replicated": short.iter().map(|(t, p, r, i)| json!({
                "topic": t, "partition": p, "replicas": r, "isr": i,
            })).collect::<Vec<_>>(),
        }));
    } else if safe {
        say!("safe to restart node {}", a.id);
    } else {
        say!("NOT safe to restart node {}:", a.id);
        for p in &problems {
            say!("  {p}");
        }
        if !short.is_empty() {
            out("\n");
            let mut table = Table::new(&["TOPIC", "PARTITION", "REPLICAS", "ISR"]);
            let list = |v: &[i32]| {
                v.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            for (t, p, r, i) in short.iter().take(MAX_LISTED_PARTITIONS) {
                table.row(vec![t.clone(), p.to_string(), list(r), list(i)]);
            }
            out(&table.render());
            if short.len() > MAX_LISTED_PARTITIONS {
                say!("... and {} more", short.len() - MAX_LISTED_PARTITIONS);
            }
        }
    }
    if !safe {
        anyhow::bail!("not safe to restart node {} yet", a.id);
    }
    Ok(())
}

fn unregister(a: UnregisterArgs) -> Result<()> {
    let mut client = Client::connect(&a.connect)?;
    let req = UnregisterBrokerRequest::default().with_broker_id(BrokerId(a.id));
    let (_, reply) = client
        .call(ApiKey::UnregisterBroker, UNREGISTER_BROKER_VERSIONS, &req)
        .context("UnregisterBroker request")?;
    if reply.error_code != 0 {
        return Err(kafka_error(
            reply.error_code,
            reply.error_message.as_deref(),
            format!("unregistering broker {}", a.id),
        ));
    }
    if a.json {
        print_json(&json!({"unregistered": a.id}));
    } else {
        say!(
            "Unregistered broker {}: it is in no ISR now, and its id may join again with a new \
             data directory.",
            a.id
        );
    }
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    let mut client = Client::connect(&a.connect)?;
    let meta = client.metadata(None)?;
    let reply = client
        .bootstrap
        .call(ApiKey::ApiVersions, 0, &ApiVersionsRequest::default())?;
    check(reply.error_code, None, "ApiVersions")?;
    let mut apis: Vec<(String, i16, i16, i16)> = reply
        .api_keys
        .iter()
        .map(|k| {
            let name = ApiKey::try_from(k.api_key)
                .map(|key| format!("{key:?}"))
                .unwrap_or_else(|_| format!("Unknown({})", k.api_key));
            (name, k.api_key, k.min_version, k.max_version)
        })
        .collect();
    apis.sort_by_key(|a| a.1);
    // Every registered node, fenced ones too (alive = not fenced), from DescribeCluster v2.
    let mut brokers: Vec<(i32, String, i32, Option<String>, bool)> = meta
        .brokers
        .iter()
        .map(|b| {
            (
                b.node_id.0,
                b.host.to_string(),
                b.port,
                b.rack.as_ref().map(|r| r.to_string()),
                true,
            )
        })
        .collect();
    let described = client.call(
        ApiKey::DescribeCluster,
        0..=2,
        &DescribeClusterRequest::default().with_include_fenced_brokers(true),
    );
    if let Ok((_, d)) = described {
        if d.error_code == 0 {
            brokers = d
                .brokers
                .iter()
                .map(|b| {
                    (
                        b.broker_id.0,
                        b.host.to_string(),
                        b.port,
                        b.rack.as_ref().map(|r| r.to_string()),
                        !b.is_fenced,
                    )
                })
                .collect();
        }
    }
    brokers.sort();
    let ids: Vec<i32> = brokers.iter().map(|b| b.0).collect();
    // A single node (no --seeds) has neither mode: shown as off.
    let flags = super::node::broker_flags(&mut client, &ids).unwrap_or_default();
    let loads = super::node::node_loads(&mut client).unwrap_or_default();
    let load = |id: &i32| loads.get(id).copied().unwrap_or_default();
    let flag = |id: &i32| flags.get(id).copied().unwrap_or_default();
    let quorum = describe_quorum(&mut client);
    let voters: Vec<i32> = quorum.as_ref().map(|q| q.2.clone()).unwrap_or_default();
    let (controller, controller_epoch) = match &quorum {
        Some((leader, epoch, _)) => (*leader, Some(*epoch)),
        None => (meta.controller_id.0, None),
    };
    let user_topics = meta
        .topics
        .iter()
        .filter(|t| !t.is_internal)
        .collect::<Vec<_>>();
    let partitions: usize = user_topics.iter().map(|t| t.partitions.len()).sum();
    let cluster_id = meta
        .cluster_id
        .as_ref()
        .map(|c| c.to_string())
        .unwrap_or_default();
    if a.json {
        let mut doc = json!({
            "cluster_id": cluster_id,
            "controller_id": controller,
            "controller_epoch": controller_epoch,
            "brokers": brokers.iter().map(|(id, host, port, rack, alive)| {
                json!({"id": id, "host": host, "port": port, "rack": rack, "alive": alive,
                       "voter": voters.contains(id), "replicas": load(id).replicas,
                       "leaders": load(id).leaders, "maintenance": flag(id).0,
                       "decommissioning": flag(id).1})
            }).collect::<Vec<_>>(),
            "topics": user_topics.len(),
            "partitions": partitions,
        });
        if a.api_versions {
            doc["api_versions"] = Value::Array(
                apis.iter()
                    .map(|(n, k, min, max)| json!({"api": n, "key": k, "min": min, "max": max}))
                    .collect(),
            );
        }
        print_json(&doc);
        return Ok(());
    }
    say!("Cluster id:  {cluster_id}");
    match controller_epoch {
        Some(e) => say!("Controller:  {controller} (epoch {e})"),
        None => say!("Controller:  {controller}"),
    }
    say!("Topics:      {}", user_topics.len());
    say!("Partitions:  {partitions}");
    out("\n");
    let mut table = Table::new(&[
        "BROKER",
        "HOST",
        "PORT",
        "RACK",
        "ALIVE",
        "VOTER",
        "REPLICAS",
        "LEADERS",
        "MAINTENANCE",
        "DECOMMISSIONING",
    ]);
    for (id, host, port, rack, alive) in &brokers {
        let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
        table.row(vec![
            id.to_string(),
            host.clone(),
            port.to_string(),
            rack.clone().unwrap_or_else(|| "-".into()),
            yes_no(*alive),
            yes_no(voters.contains(id)),
            load(id).replicas.to_string(),
            load(id).leaders.to_string(),
            yes_no(flag(id).0),
            yes_no(flag(id).1),
        ]);
    }
    out(&table.render());
    if a.api_versions {
        out("\n");
        let mut table = Table::new(&["API", "KEY", "MIN", "MAX"]);
        for (n, k, min, max) in &apis {
            table.row(vec![
                n.clone(),
                k.to_string(),
                min.to_string(),
                max.to_string(),
            ]);
        }
        out(&table.render());
    }
    Ok(())
}

/// The metadata quorum's leader, epoch and voters, if the broker answers DescribeQuorum.
fn describe_quorum(client: &mut Client) -> Option<(i32, i32, Vec<i32>)> {
    let req = DescribeQuorumRequest::default().with_topics(vec![TopicData::default()
        .with_topic_name(TopicName(StrBytes::from_static_str("__cluster_metadata")))
        .with_partitions(vec![PartitionData::default().with_partition_index(0)])]);
    let (_, resp) = client.call(ApiKey::DescribeQuorum, 0..=2, &req).ok()?;
    let p = resp.topics.first()?.partitions.first()?;
    if resp.error_code != 0 || p.error_code != 0 {
        return None;
    }
    let voters = p.current_voters.iter().map(|v| v.replica_id.0).collect();
    Some((p.leader_id.0, p.leader_epoch, voters))
}
