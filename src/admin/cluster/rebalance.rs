//! `spate cluster rebalance [--execute] [--max-moves N] [--json]`: evens out replicas, then
//! preferred leaders, across the brokers that may take replicas (live, not in maintenance, not
//! being decommissioned). The plan is made here, from Metadata, DescribeCluster, the brokers'
//! dynamic configs and ListPartitionReassignments, by the planner in
//! `spate_replication::controller::rebalance` (as Kafka's tools plan client-side). A dry run
//! prints it; `--execute` submits it as AlterPartitionReassignments, waits (bounded by
//! `--timeout`) until those moves end, then asks for a preferred-leader election so the new
//! preferred replicas lead.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use kafka_protocol::messages::alter_partition_reassignments_request::{
    ReassignablePartition, ReassignableTopic,
};
use kafka_protocol::messages::{
    AlterPartitionReassignmentsRequest, ApiKey, BrokerId, ElectLeadersRequest,
};
use serde_json::json;
use spate_replication::controller::rebalance::{self, Broker, PartitionReplicas};
use spate_replication::controller::ReplicaAssignment;

use crate::admin::client::{check, error_name, kafka_error, topic_name, Client, ConnectArgs};
use crate::admin::node::broker_flags;
use crate::admin::table::{out, print_json, say, Table};

/// Replica moves one plan makes unless told otherwise (`--max-moves`): one request's worth.
const DEFAULT_MAX_MOVES: u64 = 10_000;
/// How often `--execute` asks whether the moves have ended.
const POLL: Duration = Duration::from_millis(500);
/// ELECTION_NOT_NEEDED: the preferred replica already leads (not a failure).
const ELECTION_NOT_NEEDED: i16 = 84;
const ELECTION_PREFERRED: i8 = 0;
/// Moves listed at most in the text output (the counts are always given).
const MAX_LISTED_MOVES: usize = 200;

#[derive(Args, Debug)]
pub struct RebalanceArgs {
    /// Submit the plan (default: print it only).
    #[arg(long)]
    pub execute: bool,
    /// Replica moves in the plan at most (leader reorders move no data and are not counted).
    #[arg(long, default_value_t = DEFAULT_MAX_MOVES,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub max_moves: u64,
    /// With --execute: seconds to wait for the moves to end before the leader election.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: u64,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Partitions being moved, from ListPartitionReassignments.
fn moving(client: &mut Client) -> Result<BTreeSet<(String, u32)>> {
    let reply = client.list_reassignments()?;
    Ok(reply
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(move |p| (t.name.to_string(), p.partition_index as u32))
        })
        .collect())
}

fn ids(v: &[ReplicaAssignment]) -> String {
    v.iter()
        .map(|r| r.node.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

pub fn run(a: RebalanceArgs) -> Result<()> {
    let mut client = Client::connect(&a.connect)?;
    let described = client.describe_cluster()?;
    let all: Vec<(i32, bool)> = described
        .brokers
        .iter()
        .map(|b| (b.broker_id.0, b.is_fenced))
        .collect();
    let flags = broker_flags(&mut client, &all.iter().map(|b| b.0).collect::<Vec<_>>())?;
    let draining: BTreeSet<u64> = flags
        .iter()
        .filter(|(_, f)| f.1)
        .map(|(&id, _)| id as u64)
        .collect();
    let mut brokers: Vec<Broker> = all
        .iter()
        .filter(|(id, fenced)| !fenced && !flags.get(id).is_some_and(|f| f.0 || f.1))
        .map(|&(id, _)| Broker {
            node: id as u64,
            shards: 1,
        })
        .collect();
    brokers.sort_by_key(|b| b.node);
    if brokers.is_empty() {
        bail!("no broker may take replicas (every one is down, in maintenance or decommissioning)");
    }
    let under_way = moving(&mut client)?;
    let meta = client.metadata(None)?;
    let mut parts = Vec::new();
    for t in &meta.topics {
        let Some(name) = t.name.as_ref().map(|n| n.to_string()) else {
            continue;
        };
        for p in &t.partitions {
            let replicas: Vec<ReplicaAssignment> = p
                .replica_nodes
                .iter()
                .map(|b| ReplicaAssignment {
                    node: b.0 as u64,
                    shard: 0,
                })
                .collect();
            if replicas.is_empty() {
                continue;
            }
            let partition = p.partition_index as u32;
            let movable = !under_way.contains(&(name.clone(), partition))
                && !replicas.iter().any(|r| draining.contains(&r.node));
            parts.push(PartitionReplicas {
                topic: name.clone(),
                partition,
                replicas,
                movable,
            });
        }
    }
    let plan = rebalance::plan(&brokers, &parts, a.max_moves as usize);
    print_plan(&plan, a.execute, a.json);
    if !a.execute || plan.moves.is_empty() {
        return Ok(());
    }
    submit(&mut client, &plan, a.connect.request_timeout_ms)?;
    let ours: BTreeSet<(String, u32)> = plan
        .moves
        .iter()
        .filter(|m| m.replica_moves() > 0)
        .map(|m| (m.topic.clone(), m.partition))
        .collect();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(a.timeout);
    let mut last = usize::MAX;
    loop {
        let left = moving(&mut client)?.intersection(&ours).count();
        if left == 0 {
            break;
        }
        if left != last && !a.json {
            say!("  {left} move(s) under way");
        }
        last = left;
        if Instant::now() >= deadline {
            bail!("{left} move(s) still under way after {} s", a.timeout);
        }
        std::thread::sleep(POLL);
    }
    let failed = elect_preferred(&mut client, a.connect.request_timeout_ms)?;
    if a.json {
        print_json(&json!({
            "done": true, "seconds": started.elapsed().as_secs_f64(),
            "elections_refused": failed,
        }));
    } else {
        say!(
            "Moves done in {:.1} s; preferred-leader election asked ({} partition(s) could not \
             move to their preferred replica now; the leader balancer retries).",
            started.elapsed().as_secs_f64(),
            failed
        );
    }
    Ok(())
}

fn print_plan(plan: &rebalance::Plan, execute: bool, json: bool) {
    if json {
        print_json(&json!({
            "execute": execute,
            "replica_moves": plan.replica_moves(),
            "leader_changes": plan.leader_changes(),
            "moves": plan.moves.iter().map(|m| json!({
                "topic": m.topic, "partition": m.partition,
                "from": m.from.iter().map(|r| r.node).collect::<Vec<_>>(),
                "to": m.to.iter().map(|r| r.node).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "nodes": plan.replicas_before.keys().map(|n| json!({
                "node": n,
                "replicas_before": plan.replicas_before[n], "replicas_after": plan.replicas_after[n],
                "preferred_leaders_before": plan.leaders_before[n],
                "preferred_leaders_after": plan.leaders_after[n],
            })).collect::<Vec<_>>(),
        }));
        return;
    }
    if plan.moves.is_empty() {
        say!("Balanced: replicas and preferred leaders are even across the brokers; nothing to move.");
        return;
    }
    let mode = if execute {
        "Executing"
    } else {
        "Dry run (--execute to act)"
    };
    say!(
        "{mode}: {} replica move(s), {} preferred-leader change(s).",
        plan.replica_moves(),
        plan.leader_changes()
    );
    out("\n");
    let mut table = Table::new(&["TOPIC", "PARTITION", "FROM", "TO"]);
    for m in plan.moves.iter().take(MAX_LISTED_MOVES) {
        table.row(vec![
            m.topic.clone(),
            m.partition.to_string(),
            ids(&m.from),
            ids(&m.to),
        ]);
    }
    out(&table.render());
    if plan.moves.len() > MAX_LISTED_MOVES {
        say!("... and {} more", plan.moves.len() - MAX_LISTED_MOVES);
    }
    out("\n");
    let mut table = Table::new(&["BROKER", "REPLICAS", "PREFERRED LEADERS"]);
    for n in plan.replicas_before.keys() {
        table.row(vec![
            n.to_string(),
            format!("{} -> {}", plan.replicas_before[n], plan.replicas_after[n]),
            format!("{} -> {}", plan.leaders_before[n], plan.leaders_after[n]),
        ]);
    }
    out(&table.render());
}

fn submit(client: &mut Client, plan: &rebalance::Plan, timeout_ms: u64) -> Result<()> {
    let mut topics: BTreeMap<&str, Vec<ReassignablePartition>> = BTreeMap::new();
    for m in &plan.moves {
        topics.entry(&m.topic).or_default().push(
            ReassignablePartition::default()
                .with_partition_index(m.partition as i32)
                .with_replicas(Some(m.to.iter().map(|r| BrokerId(r.node as i32)).collect())),
        );
    }
    let req = AlterPartitionReassignmentsRequest::default()
        .with_timeout_ms(i32::try_from(timeout_ms).unwrap_or(i32::MAX))
        .with_topics(
            topics
                .into_iter()
                .map(|(t, ps)| {
                    ReassignableTopic::default()
                        .with_name(topic_name(t))
                        .with_partitions(ps)
                })
                .collect(),
        );
    let (_, reply) = client
        .call(ApiKey::AlterPartitionReassignments, 0..=0, &req)
        .context("submitting the plan")?;
    if reply.error_code != 0 {
        return Err(kafka_error(
            reply.error_code,
            reply.error_message.as_ref().map(|m| m.as_str()),
            "submitting the plan",
        ));
    }
    let refused: Vec<String> = reply
        .responses
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .filter(|p| p.error_code != 0)
                .map(move |p| {
                    format!(
                        "{}-{}: {} {}",
                        t.name.as_str(),
                        p.partition_index,
                        error_name(p.error_code),
                        p.error_message.as_ref().map_or("", |m| m.as_str())
                    )
                })
        })
        .collect();
    if !refused.is_empty() {
        bail!(
            "{} partition move(s) refused (the cluster changed since the plan? run again): {}",
            refused.len(),
            refused.join("; ")
        );
    }
    Ok(())
}

/// Asks for a preferred-leader election of every partition; returns how many could not move
/// to their preferred replica now (other than "not needed").
fn elect_preferred(client: &mut Client, timeout_ms: u64) -> Result<usize> {
    let req = ElectLeadersRequest::default()
        .with_election_type(ELECTION_PREFERRED)
        .with_timeout_ms(i32::try_from(timeout_ms).unwrap_or(i32::MAX))
        .with_topic_partitions(None);
    let (_, reply) = client.call(ApiKey::ElectLeaders, 0..=2, &req)?;
    check(reply.error_code, None, "electing preferred leaders")?;
    Ok(reply
        .replica_election_results
        .iter()
        .flat_map(|t| t.partition_result.iter())
        .filter(|p| p.error_code != 0 && p.error_code != ELECTION_NOT_NEEDED)
        .count())
}
