//! `spate partition elect-leaders [--topic T [--partition P]]`: a preferred-leader election
//! (Kafka's ElectLeaders, PREFERRED). Each partition whose preferred replica (the first of its
//! replicas) is live, in the ISR and not in maintenance, but does not lead, has its leadership
//! transferred to it; the command returns once the elections are initiated.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use kafka_protocol::messages::elect_leaders_request::TopicPartitions;
use kafka_protocol::messages::{ApiKey, ElectLeadersRequest};
use serde_json::json;

use super::client::{error_name, kafka_error, topic_name, Client, ConnectArgs};
use super::table::{out, print_json, say, Table};

#[derive(Subcommand, Debug)]
pub enum PartitionCommand {
    /// Move leadership back to each partition's preferred replica (every partition, one
    /// topic's, or one partition). Partitions whose preferred replica is down, out of the ISR
    /// or in maintenance are reported and left as they are.
    ElectLeaders(ElectLeadersArgs),
}

#[derive(Args, Debug)]
pub struct ElectLeadersArgs {
    /// Only this topic's partitions (default: every partition of the cluster).
    #[arg(long)]
    pub topic: Option<String>,
    /// Only this partition of --topic.
    #[arg(long, requires = "topic", value_parser = clap::value_parser!(i32).range(0..))]
    pub partition: Option<i32>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// ElectLeaders versions this command speaks (v1 adds the election type, v2 is flexible).
const ELECT_LEADERS_VERSIONS: std::ops::RangeInclusive<i16> = 0..=2;
const ELECTION_PREFERRED: i8 = 0;
/// ELECTION_NOT_NEEDED: the preferred replica already leads (not a failure).
const ELECTION_NOT_NEEDED: i16 = 84;

pub fn run(cmd: PartitionCommand) -> Result<()> {
    match cmd {
        PartitionCommand::ElectLeaders(a) => elect_leaders(a),
    }
}

fn elect_leaders(a: ElectLeadersArgs) -> Result<()> {
    let mut client = Client::connect(&a.connect)?;
    let topic_partitions = match (&a.topic, a.partition) {
        (None, _) => None,
        (Some(t), Some(p)) => Some(vec![(t.clone(), vec![p])]),
        (Some(t), None) => {
            let meta = client.metadata(Some(std::slice::from_ref(t)))?;
            let topic = meta
                .topics
                .iter()
                .find(|x| x.name.as_ref().is_some_and(|n| n.as_str() == t))
                .with_context(|| format!("no topic {t} in the metadata"))?;
            if topic.error_code != 0 {
                return Err(kafka_error(topic.error_code, None, format!("topic {t}")));
            }
            let partitions = topic.partitions.iter().map(|p| p.partition_index).collect();
            Some(vec![(t.clone(), partitions)])
        }
    };
    let req = ElectLeadersRequest::default()
        .with_election_type(ELECTION_PREFERRED)
        .with_timeout_ms(i32::try_from(a.connect.request_timeout_ms).unwrap_or(i32::MAX))
        .with_topic_partitions(topic_partitions.map(|tps| {
            tps.into_iter()
                .map(|(t, ps)| {
                    TopicPartitions::default()
                        .with_topic(topic_name(&t))
                        .with_partitions(ps)
                })
                .collect()
        }));
    let (_, reply) = client.call(ApiKey::ElectLeaders, ELECT_LEADERS_VERSIONS, &req)?;
    if reply.error_code != 0 {
        return Err(kafka_error(
            reply.error_code,
            None,
            "electing preferred leaders",
        ));
    }
    let mut rows = Vec::new();
    for t in &reply.replica_election_results {
        for p in &t.partition_result {
            rows.push((
                t.topic.to_string(),
                p.partition_id,
                p.error_code,
                p.error_message.as_ref().map(|m| m.to_string()),
            ));
        }
    }
    rows.sort_by(|x, y| (&x.0, x.1).cmp(&(&y.0, y.1)));
    let failed = rows
        .iter()
        .filter(|r| r.2 != 0 && r.2 != ELECTION_NOT_NEEDED)
        .count();
    if a.json {
        print_json(&json!({
            "results": rows.iter().map(|(t, p, code, msg)| json!({
                "topic": t, "partition": p, "error_code": code, "error": error_name(*code),
                "message": msg,
            })).collect::<Vec<_>>(),
        }));
    } else if rows.is_empty() {
        say!("Every partition is led by its preferred replica: no election needed.");
    } else {
        let mut table = Table::new(&["TOPIC", "PARTITION", "RESULT", "DETAIL"]);
        for (t, p, code, msg) in &rows {
            let result = match *code {
                0 => "initiated".to_string(),
                ELECTION_NOT_NEEDED => "not needed".to_string(),
                c => error_name(c).to_string(),
            };
            table.row(vec![
                t.clone(),
                p.to_string(),
                result,
                msg.clone().unwrap_or_default(),
            ]);
        }
        out(&table.render());
    }
    if failed > 0 {
        bail!("{failed} partition(s) could not move to their preferred replica");
    }
    Ok(())
}
