//! `spate cluster info`: cluster id, controller, brokers, topic and partition counts, and the
//! API versions the bootstrap broker speaks.

use anyhow::Result;
use clap::{Args, Subcommand};
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest};
use serde_json::{json, Value};

use super::client::{check, Client, ConnectArgs};
use super::table::{out, print_json, say, Table};

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Show the cluster id, controller, brokers and what the brokers speak.
    Info(InfoArgs),
}

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
    }
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
    let mut brokers: Vec<_> = meta
        .brokers
        .iter()
        .map(|b| {
            (
                b.node_id.0,
                b.host.to_string(),
                b.port,
                b.rack.as_ref().map(|r| r.to_string()),
            )
        })
        .collect();
    brokers.sort();
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
            "controller_id": meta.controller_id.0,
            "brokers": brokers.iter().map(|(id, host, port, rack)| {
                json!({"id": id, "host": host, "port": port, "rack": rack})
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
    say!("Controller:  {}", meta.controller_id.0);
    say!("Topics:      {}", user_topics.len());
    say!("Partitions:  {partitions}");
    out("\n");
    let mut table = Table::new(&["BROKER", "HOST", "PORT", "RACK"]);
    for (id, host, port, rack) in &brokers {
        table.row(vec![
            id.to_string(),
            host.clone(),
            port.to_string(),
            rack.clone().unwrap_or_else(|| "-".into()),
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
