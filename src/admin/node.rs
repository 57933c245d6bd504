//! `spate node maintenance ID [on|off]`: a broker's maintenance mode, before a restart. On,
//! every partition it leads hands leadership to another in-sync replica (a consensus transfer)
//! and nothing elects it; off, it is a leader candidate again and the leader balancer brings
//! its preferred leaderships back. Without on/off: the mode and how many partitions the node
//! still leads. Carried as the dynamic broker config `spate.maintenance.mode`
//! (IncrementalAlterConfigs / DescribeConfigs of a BROKER resource).

use anyhow::{Context, Result};
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
const RESOURCE_BROKER: i8 = 4;
const OP_SET: i8 = 0;
const DESCRIBE_CONFIGS_VERSIONS: std::ops::RangeInclusive<i16> = 1..=4;
const INCREMENTAL_ALTER_CONFIGS_VERSIONS: std::ops::RangeInclusive<i16> = 0..=1;

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Turn a node's maintenance mode on (its leaders move to other in-sync replicas before a
    /// restart) or off; without on/off, show it and how many partitions the node leads.
    Maintenance(MaintenanceArgs),
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
    }
}

fn maintenance(a: MaintenanceArgs) -> Result<()> {
    let mut client = Client::connect(&a.connect)?;
    if let Some(state) = a.state {
        let value = if state == OnOff::On { "true" } else { "false" };
        let req = IncrementalAlterConfigsRequest::default().with_resources(vec![
            AlterConfigsResource::default()
                .with_resource_type(RESOURCE_BROKER)
                .with_resource_name(StrBytes::from_string(a.id.to_string()))
                .with_configs(vec![AlterableConfig::default()
                    .with_name(StrBytes::from_static_str(MAINTENANCE_CONFIG))
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
                format!("setting maintenance mode of node {} {value}", a.id),
            )?;
        }
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
