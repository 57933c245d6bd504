//! `spate node maintenance ID [on|off]`: a broker's maintenance mode, before a restart. On,
//! every partition it leads hands leadership to another in-sync replica (a consensus transfer)
//! and nothing elects it; off, it is a leader candidate again and the leader balancer brings
//! its preferred leaderships back. Without on/off: the mode and how many partitions the node
//! still leads. Carried as the dynamic broker config `spate.maintenance.mode`
//! (IncrementalAlterConfigs / DescribeConfigs of a BROKER resource).
//!
//! `spate node decommission ID [--wait]`: drains every replica off a node before it is
//! retired (the controller moves them, a bounded number at a time; refused when the brokers
//! left cannot hold a partition's replication factor), printing the replicas left and the
//! moves under way; `--wait` polls until the node holds nothing. `spate node
//! decommission-status ID` shows the same; `spate node recommission ID` stops new moves.
//! Carried as the dynamic broker config `spate.decommission`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::incremental_alter_configs_request::{
    AlterConfigsResource, AlterableConfig,
};
use kafka_protocol::messages::{ApiKey, DescribeConfigsRequest, IncrementalAlterConfigsRequest};
use kafka_protocol::protocol::StrBytes;
use serde_json::json;

use super::client::{check, Client, ConnectArgs};
use super::table::{print_json, say};

/// The broker config that holds maintenance mode (net/src/handlers/maintenance.rs).
pub const MAINTENANCE_CONFIG: &str = "spate.maintenance.mode";
/// The broker config that holds decommissioning (net/src/handlers/maintenance.rs).
pub const DECOMMISSION_CONFIG: &str = "spate.decommission";
/// How often `decommission --wait` asks for progress.
const DECOMMISSION_POLL: Duration = Duration::from_millis(500);
/// `decommission --wait`'s default bound, in seconds: a node of a few thousand small
/// partitions drains well within it; a bigger one is given a --timeout.
const DEFAULT_DECOMMISSION_TIMEOUT_SECS: u64 = 600;
const RESOURCE_BROKER: i8 = 4;
const OP_SET: i8 = 0;
const DESCRIBE_CONFIGS_VERSIONS: std::ops::RangeInclusive<i16> = 1..=4;
const INCREMENTAL_ALTER_CONFIGS_VERSIONS: std::ops::RangeInclusive<i16> = 0..=1;

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Turn a node's maintenance mode on (its leaders move to other in-sync replicas before a
    /// restart) or off; without on/off, show it and how many partitions the node leads.
    Maintenance(MaintenanceArgs),
    /// Drain every replica off a node so it can be retired: the controller moves them to
    /// other brokers, a few at a time. Refused when the brokers left could not hold some
    /// partition's replication factor. Prints the replicas left and the moves under way.
    Decommission(DecommissionArgs),
    /// Show a node's decommissioning: whether it is on, replicas left, moves under way.
    DecommissionStatus(NodeArgs),
    /// Cancel a decommission: no new moves start (moves under way run to their end).
    Recommission(NodeArgs),
}

#[derive(Args, Debug)]
pub struct DecommissionArgs {
    /// The node (broker) id.
    #[arg(value_parser = clap::value_parser!(i32).range(0..))]
    pub id: i32,
    /// Wait until the node holds no replica, printing progress.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up (exit 1) after this many seconds.
    #[arg(long, default_value_t = DEFAULT_DECOMMISSION_TIMEOUT_SECS,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: u64,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// The node (broker) id.
    #[arg(value_parser = clap::value_parser!(i32).range(0..))]
    pub id: i32,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Args, Debug)]
pub struct MaintenanceArgs {
    /// The node (broker) id.
    #[arg(value_parser = clap::value_parser!(i32).range(0..))]
    pub id: i32,
    /// `on` or `off`; absent: show the status.
    pub state: Option<OnOff>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: NodeCommand) -> Result<()> {
    match cmd {
        NodeCommand::Maintenance(a) => maintenance(a),
        NodeCommand::Decommission(a) => decommission(a),
        NodeCommand::DecommissionStatus(a) => decommission_status(a),
        NodeCommand::Recommission(a) => recommission(a),
    }
}

/// Sets boolean broker config `name` of node `id` (IncrementalAlterConfigs of a BROKER
/// resource).
fn set_broker_flag(client: &mut Client, id: i32, name: &'static str, on: bool) -> Result<()> {
    let value = if on { "true" } else { "false" };
    let req = IncrementalAlterConfigsRequest::default().with_resources(vec![
        AlterConfigsResource::default()
            .with_resource_type(RESOURCE_BROKER)
            .with_resource_name(StrBytes::from_string(id.to_string()))
            .with_configs(vec![AlterableConfig::default()
                .with_name(StrBytes::from_static_str(name))
                .with_config_operation(OP_SET)
                .with_value(Some(StrBytes::from_static_str(value)))]),
    ]);
    let (_, reply) = client.call(
        ApiKey::IncrementalAlterConfigs,
        INCREMENTAL_ALTER_CONFIGS_VERSIONS,
        &req,
    )?;
    for r in &reply.responses {
        check(
            r.error_code,
            r.error_message.as_deref(),
            format!("setting {name} of node {id} to {value}"),
        )?;
    }
    Ok(())
}

/// A node's share of the cluster, from Metadata and ListPartitionReassignments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeLoad {
    pub replicas: usize,
    pub leaders: usize,
    /// Moves under way that take a replica off the node.
    pub leaving: usize,
}

/// Replicas, leaderships and outgoing moves of every node that holds anything.
pub fn node_loads(client: &mut Client) -> Result<BTreeMap<i32, NodeLoad>> {
    let meta = client.metadata(None)?;
    let mut loads: BTreeMap<i32, NodeLoad> = BTreeMap::new();
    for p in meta.topics.iter().flat_map(|t| t.partitions.iter()) {
        for r in &p.replica_nodes {
            loads.entry(r.0).or_default().replicas += 1;
        }
        if p.leader_id.0 >= 0 {
            loads.entry(p.leader_id.0).or_default().leaders += 1;
        }
    }
    let reply = client.list_reassignments()?;
    for p in reply.topics.iter().flat_map(|t| t.partitions.iter()) {
        for r in &p.removing_replicas {
            loads.entry(r.0).or_default().leaving += 1;
        }
    }
    Ok(loads)
}

/// `(maintenance, decommissioning)` of each node of `ids`, as the answering node has applied
/// them (one DescribeConfigs request).
pub fn broker_flags(client: &mut Client, ids: &[i32]) -> Result<BTreeMap<i32, (bool, bool)>> {
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let keys = vec![
        StrBytes::from_static_str(MAINTENANCE_CONFIG),
        StrBytes::from_static_str(DECOMMISSION_CONFIG),
    ];
    let req = DescribeConfigsRequest::default().with_resources(
        ids.iter()
            .map(|id| {
                DescribeConfigsResource::default()
                    .with_resource_type(RESOURCE_BROKER)
                    .with_resource_name(StrBytes::from_string(id.to_string()))
                    .with_configuration_keys(Some(keys.clone()))
            })
            .collect(),
    );
    let (_, reply) = client.call(ApiKey::DescribeConfigs, DESCRIBE_CONFIGS_VERSIONS, &req)?;
    let mut out = BTreeMap::new();
    for r in &reply.results {
        let Ok(id) = r.resource_name.as_str().parse::<i32>() else {
            continue;
        };
        check(
            r.error_code,
            r.error_message.as_deref(),
            format!("describing node {id}"),
        )?;
        let flag = |name: &str| {
            r.configs
                .iter()
                .find(|c| c.name.as_str() == name)
                .and_then(|c| c.value.as_ref())
                .is_some_and(|v| v.as_str() == "true")
        };
        out.insert(id, (flag(MAINTENANCE_CONFIG), flag(DECOMMISSION_CONFIG)));
    }
    Ok(out)
}

/// Whether node `id` is being decommissioned, as the answering node has applied it.
fn decommissioning_of(client: &mut Client, id: i32) -> Result<bool> {
    Ok(broker_flags(client, &[id])?.get(&id).is_some_and(|f| f.1))
}

fn print_decommission(id: i32, on: bool, load: NodeLoad, json: bool) {
    if json {
        print_json(&json!({
            "node": id, "decommissioning": on, "replicas": load.replicas,
            "moves_in_flight": load.leaving, "leaders": load.leaders,
            "done": on && load.replicas == 0,
        }));
        return;
    }
    let state = if on {
        "decommissioning"
    } else {
        "not decommissioning"
    };
    say!(
        "Node {id}: {state}, {} replica(s) left, {} move(s) under way, leads {}.",
        load.replicas,
        load.leaving,
        load.leaders
    );
    if on && load.replicas == 0 {
        say!("It holds no replica: it can be stopped.");
    }
}

fn decommission(a: DecommissionArgs) -> Result<()> {
    let mut client = Client::connect(&a.connect)?;
    set_broker_flag(&mut client, a.id, DECOMMISSION_CONFIG, true)?;
    let load = node_loads(&mut client)?
        .get(&a.id)
        .copied()
        .unwrap_or_default();
    if !a.wait || load.replicas == 0 {
        print_decommission(a.id, true, load, a.json);
        return Ok(());
    }
    if !a.json {
        print_decommission(a.id, true, load, false);
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(a.timeout);
    let mut last = load;
    loop {
        std::thread::sleep(DECOMMISSION_POLL);
        let load = node_loads(&mut client)?
            .get(&a.id)
            .copied()
            .unwrap_or_default();
        if !decommissioning_of(&mut client, a.id)? {
            bail!("node {} was recommissioned while waiting", a.id);
        }
        if load.replicas == 0 {
            if a.json {
                print_decommission(a.id, true, load, true);
            } else {
                say!(
                    "Node {}: drained in {:.1} s; it holds no replica and can be stopped.",
                    a.id,
                    started.elapsed().as_secs_f64()
                );
            }
            return Ok(());
        }
        if load != last && !a.json {
            say!(
                "  {} replica(s) left, {} move(s) under way",
                load.replicas,
                load.leaving
            );
        }
        last = load;
        if Instant::now() >= deadline {
            bail!(
                "node {} still holds {} replica(s) after {} s",
                a.id,
                load.replicas,
                a.timeout
            );
        }
    }
}

fn decommission_status(a: NodeArgs) -> Result<()> {
    let mut client = Client::connect(&a.connect)?;
    let on = decommissioning_of(&mut client, a.id)?;
    let load = node_loads(&mut client)?
        .get(&a.id)
        .copied()
        .unwrap_or_default();
    print_decommission(a.id, on, load, a.json);
    Ok(())
}

fn recommission(a: NodeArgs) -> Result<()> {
    let mut client = Client::connect(&a.connect)?;
    set_broker_flag(&mut client, a.id, DECOMMISSION_CONFIG, false)?;
    let load = node_loads(&mut client)?
        .get(&a.id)
        .copied()
        .unwrap_or_default();
    print_decommission(a.id, false, load, a.json);
    if !a.json && load.leaving > 0 {
        say!("Moves already under way run to their end; `spate cluster rebalance` evens out.");
    }
    Ok(())
}

fn maintenance(a: MaintenanceArgs) -> Result<()> {
    let mut client = Client::connect(&a.connect)?;
    if let Some(state) = a.state {
        set_broker_flag(&mut client, a.id, MAINTENANCE_CONFIG, state == OnOff::On)?;
    }
    let on = maintenance_of(&mut client, a.id)?;
    let leads = leaders_of(&mut client, a.id)?;
    if a.json {
        print_json(&json!({"node": a.id, "maintenance": on, "leaders": leads}));
    } else {
        let mode = if on { "on" } else { "off" };
        say!(
            "Node {}: maintenance {mode}, leads {leads} partition(s).",
            a.id
        );
        if on && leads > 0 {
            say!("Its leaders are moving to other in-sync replicas; ask again to see progress.");
        } else if on {
            say!("It leads nothing: it can be restarted (see `spate cluster restart-check`).");
        }
    }
    Ok(())
}

/// Whether node `id` is in maintenance mode, as the answering node has applied it.
pub fn maintenance_of(client: &mut Client, id: i32) -> Result<bool> {
    let req =
        DescribeConfigsRequest::default().with_resources(vec![DescribeConfigsResource::default()
            .with_resource_type(RESOURCE_BROKER)
            .with_resource_name(StrBytes::from_string(id.to_string()))
            .with_configuration_keys(Some(vec![StrBytes::from_static_str(MAINTENANCE_CONFIG)]))]);
    let (_, reply) = client.call(ApiKey::DescribeConfigs, DESCRIBE_CONFIGS_VERSIONS, &req)?;
    let result = reply
        .results
        .first()
        .context("DescribeConfigs reply has no result")?;
    check(
        result.error_code,
        result.error_message.as_deref(),
        format!("describing node {id}"),
    )?;
    let value = result
        .configs
        .iter()
        .find(|c| c.name.as_str() == MAINTENANCE_CONFIG)
        .and_then(|c| c.value.as_ref())
        .with_context(|| {
            format!("the broker does not report {MAINTENANCE_CONFIG} (not a cluster node?)")
        })?;
    Ok(value.as_str() == "true")
}

/// Partitions node `id` leads, from Metadata.
pub fn leaders_of(client: &mut Client, id: i32) -> Result<usize> {
    let meta = client.metadata(None)?;
    Ok(meta
        .topics
        .iter()
        .flat_map(|t| t.partitions.iter())
        .filter(|p| p.leader_id.0 == id)
        .count())
}
