//! `spate partition elect-leaders [--topic T [--partition P]]`: a preferred-leader election
//! (Kafka's ElectLeaders, PREFERRED). Each partition whose preferred replica (the first of its
//! replicas) is live, in the ISR and not in maintenance, but does not lead, has its leadership
//! transferred to it; the command returns once the elections are initiated.
//!
//! `spate partition move TOPIC PARTITION --to 1,2,4`, `spate partition move --plan FILE`
//! (Kafka's reassignment JSON) and `--cancel`: replica moves (AlterPartitionReassignments);
//! `spate partition reassignments` lists the moves under way (ListPartitionReassignments).

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use kafka_protocol::messages::alter_partition_reassignments_request::{
    ReassignablePartition, ReassignableTopic,
};
use kafka_protocol::messages::describe_log_dirs_request::DescribableLogDirTopic;
use kafka_protocol::messages::elect_leaders_request::TopicPartitions;
use kafka_protocol::messages::{
    AlterPartitionReassignmentsRequest, ApiKey, BrokerId, DescribeLogDirsRequest,
    ElectLeadersRequest,
};
use serde_json::json;
use std::collections::BTreeMap;

use super::client::{call_on, error_name, kafka_error, topic_name, Client, ConnectArgs};
use super::table::{out, print_json, say, Table};

#[derive(Subcommand, Debug)]
pub enum PartitionCommand {
    /// Move leadership back to each partition's preferred replica (every partition, one
    /// topic's, or one partition). Partitions whose preferred replica is down, out of the ISR
    /// or in maintenance are reported and left as they are.
    ElectLeaders(ElectLeadersArgs),
    /// Move a partition's replicas to other brokers (or many partitions, from a plan file in
    /// Kafka's reassignment JSON), or cancel a move with --cancel. New replicas join as
    /// learners and catch up before they vote; the command returns once the move is recorded
    /// (`spate partition reassignments` shows it until it ends).
    Move(MoveArgs),
    /// List the replica moves under way: replicas, adding and removing replicas, and how many
    /// bytes each adding replica is behind the leader (from DescribeLogDirs on their brokers).
    Reassignments(ReassignmentsArgs),
}

#[derive(Args, Debug)]
pub struct MoveArgs {
    /// The topic of the partition to move (not with --plan).
    pub topic: Option<String>,
    /// The partition to move.
    #[arg(value_parser = clap::value_parser!(i32).range(0..))]
    pub partition: Option<i32>,
    /// The target replicas, by broker id, the first the preferred leader: `--to 1,2,4`.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["plan", "cancel"])]
    pub to: Option<Vec<i32>>,
    /// A plan file: {"partitions":[{"topic":"t","partition":0,"replicas":[1,2,4]},...]}
    /// (Kafka's kafka-reassign-partitions JSON; "version" and other keys are ignored).
    #[arg(long, conflicts_with_all = ["topic", "partition"])]
    pub plan: Option<std::path::PathBuf>,
    /// Cancel the move of TOPIC PARTITION (or of every partition of --plan): back to the
    /// replicas before the move started.
    #[arg(long)]
    pub cancel: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ReassignmentsArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Partitions one plan file may name (the broker's cap on one request).
const MAX_PLAN_PARTITIONS: usize = 10_000;
/// Bytes of a plan file read at most.
const MAX_PLAN_FILE_BYTES: u64 = 16 << 20;
/// A plan's replica list per partition at most (the controller's cap).
const MAX_PLAN_REPLICAS: usize = 16;

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

/// DescribeLogDirs versions this command speaks (v2 is flexible, v4 adds volume sizes).
const DESCRIBE_LOG_DIRS_VERSIONS: std::ops::RangeInclusive<i16> = 1..=4;

/// ElectLeaders versions this command speaks (v1 adds the election type, v2 is flexible).
const ELECT_LEADERS_VERSIONS: std::ops::RangeInclusive<i16> = 0..=2;
const ELECTION_PREFERRED: i8 = 0;
/// ELECTION_NOT_NEEDED: the preferred replica already leads (not a failure).
const ELECTION_NOT_NEEDED: i16 = 84;

pub fn run(cmd: PartitionCommand) -> Result<()> {
    match cmd {
        PartitionCommand::ElectLeaders(a) => elect_leaders(a),
        PartitionCommand::Move(a) => move_replicas(a),
        PartitionCommand::Reassignments(a) => reassignments(a),
    }
}

/// One requested move: topic, partition, target (`None`: cancel).
type PlannedMove = (String, i32, Option<Vec<i32>>);

/// The moves of a plan file (Kafka's reassignment JSON); with `cancel`, a cancel of each.
fn read_plan(path: &std::path::Path, cancel: bool) -> Result<Vec<PlannedMove>> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .with_context(|| format!("opening the plan {}", path.display()))?
        .take(MAX_PLAN_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading the plan {}", path.display()))?;
    if text.len() as u64 > MAX_PLAN_FILE_BYTES {
        bail!(
            "the plan {} is over {MAX_PLAN_FILE_BYTES} bytes",
            path.display()
        );
    }
    let plan: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let parts = plan
        .get("partitions")
        .and_then(|p| p.as_array())
        .context("the plan has no \"partitions\" list")?;
    if parts.len() > MAX_PLAN_PARTITIONS {
        bail!(
            "the plan names {} partitions; at most {MAX_PLAN_PARTITIONS}",
            parts.len()
        );
    }
    let mut out = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        let topic = p
            .get("topic")
            .and_then(|t| t.as_str())
            .with_context(|| format!("plan entry {i}: no \"topic\""))?;
        let partition = p
            .get("partition")
            .and_then(|t| t.as_i64())
            .and_then(|n| i32::try_from(n).ok())
            .filter(|&n| n >= 0)
            .with_context(|| format!("plan entry {i}: no valid \"partition\""))?;
        let target = if cancel {
            None
        } else {
            let list = p
                .get("replicas")
                .and_then(|r| r.as_array())
                .with_context(|| format!("plan entry {i}: no \"replicas\" list"))?;
            if list.is_empty() || list.len() > MAX_PLAN_REPLICAS {
                bail!("plan entry {i}: 1 to {MAX_PLAN_REPLICAS} replicas");
            }
            let ids = list
                .iter()
                .map(|v| {
                    v.as_i64()
                        .and_then(|n| i32::try_from(n).ok())
                        .filter(|&n| n >= 0)
                })
                .collect::<Option<Vec<i32>>>()
                .with_context(|| format!("plan entry {i}: replicas must be broker ids"))?;
            Some(ids)
        };
        out.push((topic.to_string(), partition, target));
    }
    Ok(out)
}

fn move_replicas(a: MoveArgs) -> Result<()> {
    let moves = match (&a.plan, &a.topic, a.partition) {
        (Some(path), _, _) => read_plan(path, a.cancel)?,
        (None, Some(t), Some(p)) => match (&a.to, a.cancel) {
            (Some(to), false) => vec![(t.clone(), p, Some(to.clone()))],
            (None, true) => vec![(t.clone(), p, None)],
            _ => bail!("give the target replicas with --to 1,2,4, or --cancel"),
        },
        _ => bail!("name TOPIC PARTITION with --to or --cancel, or give --plan FILE"),
    };
    let mut topics: Vec<ReassignableTopic> = Vec::new();
    for (topic, partition, target) in &moves {
        let p = ReassignablePartition::default()
            .with_partition_index(*partition)
            .with_replicas(
                target
                    .as_ref()
                    .map(|ids| ids.iter().map(|&n| BrokerId(n)).collect()),
            );
        match topics.last_mut() {
            Some(t) if t.name.as_str() == topic => t.partitions.push(p),
            _ => topics.push(
                ReassignableTopic::default()
                    .with_name(topic_name(topic))
                    .with_partitions(vec![p]),
            ),
        }
    }
    let req = AlterPartitionReassignmentsRequest::default()
        .with_timeout_ms(i32::try_from(a.connect.request_timeout_ms).unwrap_or(i32::MAX))
        .with_topics(topics);
    let mut client = Client::connect(&a.connect)?;
    let (_, reply) = client.call(ApiKey::AlterPartitionReassignments, 0..=0, &req)?;
    if reply.error_code != 0 {
        return Err(kafka_error(
            reply.error_code,
            reply.error_message.as_ref().map(|m| m.as_str()),
            "moving replicas",
        ));
    }
    let mut rows = Vec::new();
    for t in &reply.responses {
        for p in &t.partitions {
            rows.push((
                t.name.to_string(),
                p.partition_index,
                p.error_code,
                p.error_message.as_ref().map(|m| m.to_string()),
            ));
        }
    }
    rows.sort_by(|x, y| (&x.0, x.1).cmp(&(&y.0, y.1)));
    let failed = rows.iter().filter(|r| r.2 != 0).count();
    if a.json {
        print_json(&json!({
            "results": rows.iter().map(|(t, p, code, msg)| json!({
                "topic": t, "partition": p, "error_code": code, "error": error_name(*code),
                "message": msg,
            })).collect::<Vec<_>>(),
        }));
    } else {
        let done = if a.cancel { "cancelling" } else { "moving" };
        let mut table = Table::new(&["TOPIC", "PARTITION", "RESULT", "DETAIL"]);
        for (t, p, code, msg) in &rows {
            let result = if *code == 0 {
                done.to_string()
            } else {
                error_name(*code).to_string()
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
        bail!("{failed} partition(s) were not moved");
    }
    Ok(())
}

fn reassignments(a: ReassignmentsArgs) -> Result<()> {
    let mut client = Client::connect(&a.connect)?;
    let reply = client.list_reassignments()?;
    let ids = |v: &[BrokerId]| v.iter().map(|b| b.0).collect::<Vec<i32>>();
    let mut rows = Vec::new();
    for t in &reply.topics {
        for p in &t.partitions {
            rows.push((
                t.name.to_string(),
                p.partition_index,
                ids(&p.replicas),
                ids(&p.adding_replicas),
                ids(&p.removing_replicas),
            ));
        }
    }
    rows.sort_by(|x, y| (&x.0, x.1).cmp(&(&y.0, y.1)));
    let moving: Vec<(String, i32, Vec<i32>)> = rows
        .iter()
        .filter(|r| !r.3.is_empty())
        .map(|r| (r.0.clone(), r.1, r.3.clone()))
        .collect();
    let behind = bytes_behind(&mut client, &moving);
    let behind_of = |t: &str, p: i32, n: i32| behind.get(&(t.to_string(), p, n)).copied().flatten();
    if a.json {
        print_json(&json!({
            "reassignments": rows.iter().map(|(t, p, r, add, rm)| json!({
                "topic": t, "partition": p, "replicas": r, "adding_replicas": add,
                "removing_replicas": rm,
                "bytes_behind": add.iter().map(|n| (n.to_string(), json!(behind_of(t, *p, *n))))
                    .collect::<serde_json::Map<_, _>>(),
            })).collect::<Vec<_>>(),
        }));
    } else if rows.is_empty() {
        say!("No replica moves under way.");
    } else {
        let list = |v: &[i32]| {
            v.iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut table = Table::new(&[
            "TOPIC",
            "PARTITION",
            "REPLICAS",
            "ADDING",
            "REMOVING",
            "BEHIND",
        ]);
        for (t, p, r, add, rm) in &rows {
            let behind = add
                .iter()
                .map(|n| match behind_of(t, *p, *n) {
                    Some(b) => format!("{n}:{b}"),
                    None => format!("{n}:?"),
                })
                .collect::<Vec<_>>()
                .join(",");
            table.row(vec![
                t.clone(),
                p.to_string(),
                list(r),
                list(add),
                list(rm),
                behind,
            ]);
        }
        out(&table.render());
    }
    Ok(())
}

/// A partition's size on each broker asked, by (topic, partition, broker); a broker that
/// answered without the partition holds none of it yet (0 bytes).
type Sizes = BTreeMap<(String, i32, i32), u64>;

/// How many bytes each adding replica of `moving` (topic, partition, adding replicas) is behind
/// its partition's leader: the leader's size minus the replica's, as DescribeLogDirs reports
/// them on both brokers (Kafka's schema has no progress in ListPartitionReassignments; its
/// tools compare log dir sizes the same way). `None` for a replica whose figure is unknown (no
/// leader now, a broker that did not answer).
fn bytes_behind(
    client: &mut Client,
    moving: &[(String, i32, Vec<i32>)],
) -> BTreeMap<(String, i32, i32), Option<u64>> {
    let mut out = BTreeMap::new();
    if moving.is_empty() {
        return out;
    }
    let mut topics: Vec<String> = moving.iter().map(|m| m.0.clone()).collect();
    topics.dedup();
    // Without metadata no figure is known: every replica shows as unknown.
    let Ok(meta) = client.metadata(Some(&topics)) else {
        return out;
    };
    let addrs = Client::broker_addrs(&meta);
    let leader_of = |t: &str, p: i32| {
        meta.topics
            .iter()
            .filter(|x| x.name.as_ref().is_some_and(|n| n.as_str() == t))
            .flat_map(|x| x.partitions.iter())
            .find(|x| x.partition_index == p)
            .map(|x| x.leader_id.0)
            .filter(|&l| l >= 0)
    };
    // Every broker to ask, with the partitions to ask it about.
    let mut ask: BTreeMap<i32, BTreeMap<String, Vec<i32>>> = BTreeMap::new();
    for (t, p, adding) in moving {
        let brokers = leader_of(t, *p).into_iter().chain(adding.iter().copied());
        for b in brokers {
            let ps = ask.entry(b).or_default().entry(t.clone()).or_default();
            if !ps.contains(p) {
                ps.push(*p);
            }
        }
    }
    let mut sizes: Sizes = BTreeMap::new();
    let mut answered: Vec<i32> = Vec::new();
    for (broker, wanted) in ask {
        let Some(addr) = addrs.get(&broker) else {
            continue;
        };
        let req = DescribeLogDirsRequest::default().with_topics(Some(
            wanted
                .iter()
                .map(|(t, ps)| {
                    DescribableLogDirTopic::default()
                        .with_topic(topic_name(t))
                        .with_partitions(ps.clone())
                })
                .collect(),
        ));
        let reply = client.broker(addr).and_then(|conn| {
            call_on(
                conn,
                ApiKey::DescribeLogDirs,
                DESCRIBE_LOG_DIRS_VERSIONS,
                &req,
            )
        });
        // A broker that is down or refuses leaves its replicas' figures unknown ("?").
        let reply = match reply {
            Ok((_, r)) if r.error_code == 0 => r,
            _ => continue,
        };
        answered.push(broker);
        for dir in reply.results.iter().filter(|d| d.error_code == 0) {
            for t in &dir.topics {
                for p in &t.partitions {
                    let size = u64::try_from(p.partition_size).unwrap_or(0);
                    *sizes
                        .entry((t.name.to_string(), p.partition_index, broker))
                        .or_default() += size;
                }
            }
        }
    }
    let size_on = |t: &str, p: i32, b: i32| {
        answered
            .contains(&b)
            .then(|| sizes.get(&(t.to_string(), p, b)).copied().unwrap_or(0))
    };
    for (t, p, adding) in moving {
        let leader = leader_of(t, *p).and_then(|l| size_on(t, *p, l));
        for &n in adding {
            let behind = match (leader, size_on(t, *p, n)) {
                (Some(l), Some(r)) => Some(l.saturating_sub(r)),
                _ => None,
            };
            out.insert((t.clone(), *p, n), behind);
        }
    }
    out
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
