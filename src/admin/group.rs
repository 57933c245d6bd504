//! `spate group list|describe|reset-offsets`, after Kafka's kafka-consumer-groups tool: lag per
//! partition, and offset resets that are a dry run unless --execute is given and are refused
//! while the group has members.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;

use anyhow::{bail, Context, Result};
use bytes::Buf;
use clap::{Args, Subcommand};
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::{
    ApiKey, ConsumerProtocolAssignment, DescribeGroupsRequest, GroupId, ListGroupsRequest,
    OffsetCommitRequest, OffsetFetchRequest,
};
use kafka_protocol::protocol::{Decodable, StrBytes};
use serde_json::{json, Value};
use spate_client::wire::Connection;

use super::client::{
    call_on, check, kafka_error, list_offsets, topic_name, Client, ConnectArgs, LogEnd,
};
use super::table::{out, print_json, say, Table};
use super::topic::validate_topic_name;

const LIST_GROUPS_VERSIONS: RangeInclusive<i16> = 0..=4;
const DESCRIBE_GROUPS_VERSIONS: RangeInclusive<i16> = 0..=5;
const OFFSET_FETCH_VERSIONS: RangeInclusive<i16> = 2..=7;
const OFFSET_COMMIT_VERSIONS: RangeInclusive<i16> = 2..=8;
/// Kafka's limit on a group id's length is the string codec's; ours keeps tables sane.
const MAX_GROUP_ID_BYTES: usize = 255;
const CONSUMER_PROTOCOL: &str = "consumer";
/// OffsetCommit from outside the group: no generation, no member.
const NO_GENERATION: i32 = -1;

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// List consumer groups and their states.
    List(ListArgs),
    /// Show a group's state, members, committed offsets and lag per partition.
    Describe(DescribeArgs),
    /// Move a group's committed offsets (dry run unless --execute; the group must be empty).
    ResetOffsets(ResetArgs),
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct DescribeArgs {
    /// The group id.
    pub group: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true)
    .args(["to_earliest", "to_latest", "to_offset", "shift_by"])))]
#[command(group(clap::ArgGroup::new("scope").required(true).args(["topics", "all_topics"])))]
pub struct ResetArgs {
    /// The group id.
    pub group: String,
    /// A topic, or TOPIC:P,P,... for some of its partitions (repeatable).
    #[arg(long = "topic", value_name = "TOPIC[:PARTITIONS]")]
    pub topics: Vec<String>,
    /// Every topic the group has committed offsets for.
    #[arg(long)]
    pub all_topics: bool,
    /// To the earliest offset still in each log.
    #[arg(long)]
    pub to_earliest: bool,
    /// To the end of each log.
    #[arg(long)]
    pub to_latest: bool,
    /// To this offset (kept within each log's earliest..latest).
    #[arg(long, value_name = "OFFSET", value_parser = clap::value_parser!(i64).range(0..))]
    pub to_offset: Option<i64>,
    /// Move each committed offset by N (negative moves back; kept within the log).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub shift_by: Option<i64>,
    /// Apply the change; without it only the plan is shown.
    #[arg(long, conflicts_with = "dry_run")]
    pub execute: bool,
    /// Only show the plan (the default).
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: GroupCommand) -> Result<()> {
    match cmd {
        GroupCommand::List(a) => list(a),
        GroupCommand::Describe(a) => describe(a),
        GroupCommand::ResetOffsets(a) => reset_offsets(a),
    }
}

fn validate_group_id(group: &str) -> Result<()> {
    if group.is_empty() {
        bail!("the group id must not be empty");
    }
    if group.len() > MAX_GROUP_ID_BYTES {
        bail!(
            "the group id is {} bytes; the limit is {MAX_GROUP_ID_BYTES}",
            group.len()
        );
    }
    Ok(())
}

fn list(a: ListArgs) -> Result<()> {
    let mut client = Client::connect(&a.connect)?;
    let meta = client.metadata(Some(&[]))?;
    let mut groups: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut addrs: Vec<String> = Client::broker_addrs(&meta).into_values().collect();
    addrs.sort();
    for addr in addrs {
        let conn = client.broker(&addr)?;
        let (_, reply) = call_on(
            conn,
            ApiKey::ListGroups,
            LIST_GROUPS_VERSIONS,
            &ListGroupsRequest::default(),
        )?;
        check(
            reply.error_code,
            None,
            format!("listing the groups of {addr}"),
        )?;
        for g in reply.groups {
            groups.insert(
                g.group_id.to_string(),
                (g.group_state.to_string(), g.protocol_type.to_string()),
            );
        }
    }
    if a.json {
        print_json(&Value::Array(
            groups
                .iter()
                .map(|(g, (state, ptype))| {
                    json!({"group": g, "state": state, "protocol_type": ptype})
                })
                .collect(),
        ));
        return Ok(());
    }
    let mut table = Table::new(&["GROUP", "STATE", "PROTOCOL-TYPE"]);
    for (g, (state, ptype)) in groups {
        table.row(vec![
            g,
            if state.is_empty() { "-".into() } else { state },
            ptype,
        ]);
    }
    out(&table.render());
    Ok(())
}

/// A member of a group and the partitions it was assigned.
struct Member {
    member_id: String,
    client_id: String,
    host: String,
    assigned: Vec<(String, i32)>,
}

/// What DescribeGroups says of one group.
struct GroupInfo {
    state: String,
    protocol_type: String,
    protocol: String,
    members: Vec<Member>,
}

fn describe_group(conn: &mut Connection, group: &str) -> Result<GroupInfo> {
    let req = DescribeGroupsRequest::default()
        .with_groups(vec![GroupId(StrBytes::from_string(group.to_string()))]);
    let (_, reply) = call_on(conn, ApiKey::DescribeGroups, DESCRIBE_GROUPS_VERSIONS, &req)?;
    let g = reply
        .groups
        .into_iter()
        .next()
        .context("DescribeGroups reply names no group")?;
    check(
        g.error_code,
        g.error_message.as_deref(),
        format!("describing group {group}"),
    )?;
    let consumer = g.protocol_type.as_str() == CONSUMER_PROTOCOL;
    let members = g
        .members
        .iter()
        .map(|m| Member {
            member_id: m.member_id.to_string(),
            client_id: m.client_id.to_string(),
            host: m.client_host.to_string(),
            assigned: if consumer {
                decode_assignment(m.member_assignment.clone())
            } else {
                Vec::new()
            },
        })
        .collect();
    Ok(GroupInfo {
        state: g.group_state.to_string(),
        protocol_type: g.protocol_type.to_string(),
        protocol: g.protocol_data.to_string(),
        members,
    })
}

/// The partitions in a consumer-protocol assignment; empty when it does not decode (another
/// protocol, or a group mid-rebalance).
fn decode_assignment(mut bytes: bytes::Bytes) -> Vec<(String, i32)> {
    if bytes.remaining() < 2 {
        return Vec::new();
    }
    let version = bytes.get_i16();
    let Ok(a) = ConsumerProtocolAssignment::decode(&mut bytes, version.clamp(0, 3)) else {
        return Vec::new();
    };
    a.assigned_partitions
        .iter()
        .flat_map(|t| t.partitions.iter().map(|p| (t.topic.to_string(), *p)))
        .collect()
}

/// Committed offsets of every topic partition the group has committed for.
fn committed(conn: &mut Connection, group: &str) -> Result<BTreeMap<(String, i32), i64>> {
    let req = OffsetFetchRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
        .with_topics(None);
    let (_, reply) = call_on(conn, ApiKey::OffsetFetch, OFFSET_FETCH_VERSIONS, &req)?;
    check(
        reply.error_code,
        None,
        format!("fetching the offsets of {group}"),
    )?;
    let mut out = BTreeMap::new();
    for t in reply.topics {
        for p in t.partitions {
            check(
                p.error_code,
                None,
                format!(
                    "offset of {group} on {}/{}",
                    t.name.as_str(),
                    p.partition_index
                ),
            )?;
            if p.committed_offset >= 0 {
                out.insert((t.name.to_string(), p.partition_index), p.committed_offset);
            }
        }
    }
    Ok(out)
}

/// Earliest and latest offsets of the given partitions, from their leaders. A topic that no
/// longer exists is left out.
fn log_bounds(
    client: &mut Client,
    wanted: &BTreeSet<(String, i32)>,
) -> Result<BTreeMap<(String, i32), (i64, i64)>> {
    let topics: Vec<String> = wanted
        .iter()
        .map(|(t, _)| t.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut out = BTreeMap::new();
    if topics.is_empty() {
        return Ok(out);
    }
    let meta = client.metadata(Some(&topics))?;
    let addrs = Client::broker_addrs(&meta);
    let mut by_leader: BTreeMap<(String, String), Vec<i32>> = BTreeMap::new();
    for t in &meta.topics {
        let name = t.name.as_ref().map(|n| n.to_string()).unwrap_or_default();
        if t.error_code != 0 {
            continue;
        }
        for p in &t.partitions {
            if !wanted.contains(&(name.clone(), p.partition_index)) {
                continue;
            }
            if let Some(addr) = addrs.get(&p.leader_id.0) {
                by_leader
                    .entry((addr.clone(), name.clone()))
                    .or_default()
                    .push(p.partition_index);
            }
        }
    }
    for ((addr, topic), parts) in by_leader {
        let conn = client.broker(&addr)?;
        let start = list_offsets(conn, &topic, &parts, LogEnd::Earliest)?;
        let end = list_offsets(conn, &topic, &parts, LogEnd::Latest)?;
        for ((p, s), e) in parts.iter().zip(start).zip(end) {
            out.insert((topic.clone(), *p), (s, e));
        }
    }
    Ok(out)
}

fn describe(a: DescribeArgs) -> Result<()> {
    validate_group_id(&a.group)?;
    let mut client = Client::connect(&a.connect)?;
    let conn = client.coordinator(&a.group)?;
    let info = describe_group(conn, &a.group)?;
    let offsets = committed(conn, &a.group)?;
    if info.state == "Dead" && offsets.is_empty() {
        bail!("consumer group {} does not exist", a.group);
    }
    let mut owner: BTreeMap<(String, i32), usize> = BTreeMap::new();
    for (i, m) in info.members.iter().enumerate() {
        for tp in &m.assigned {
            owner.insert(tp.clone(), i);
        }
    }
    let partitions: BTreeSet<(String, i32)> = offsets.keys().chain(owner.keys()).cloned().collect();
    let bounds = log_bounds(&mut client, &partitions)?;
    let rows: Vec<_> = partitions
        .iter()
        .map(|tp| {
            let current = offsets.get(tp).copied();
            let end = bounds.get(tp).map(|b| b.1);
            let lag = match (current, end) {
                (Some(c), Some(e)) => Some((e - c).max(0)),
                _ => None,
            };
            let member = owner.get(tp).map(|&i| &info.members[i]);
            (tp, current, end, lag, member)
        })
        .collect();
    if a.json {
        print_json(&json!({
            "group": a.group,
            "state": info.state,
            "protocol_type": info.protocol_type,
            "protocol": info.protocol,
            "members": info.members.iter().map(|m| json!({
                "member_id": m.member_id,
                "client_id": m.client_id,
                "host": m.host,
                "assignment": m.assigned.iter().map(|(t, p)| json!({"topic": t, "partition": p}))
                    .collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "offsets": rows.iter().map(|(tp, current, end, lag, member)| json!({
                "topic": tp.0,
                "partition": tp.1,
                "committed_offset": current,
                "log_end_offset": end,
                "lag": lag,
                "member_id": member.map(|m| m.member_id.clone()),
            })).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    say!(
        "Group: {}  State: {}  Members: {}  Protocol: {}",
        a.group,
        info.state,
        info.members.len(),
        if info.protocol.is_empty() {
            "-"
        } else {
            &info.protocol
        }
    );
    out("\n");
    let mut table = Table::new(&[
        "TOPIC",
        "PARTITION",
        "CURRENT-OFFSET",
        "LOG-END-OFFSET",
        "LAG",
        "CONSUMER-ID",
        "HOST",
        "CLIENT-ID",
    ]);
    let dash = |v: Option<i64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    for (tp, current, end, lag, member) in &rows {
        table.row(vec![
            tp.0.clone(),
            tp.1.to_string(),
            dash(*current),
            dash(*end),
            dash(*lag),
            member.map_or("-".into(), |m| m.member_id.clone()),
            member.map_or("-".into(), |m| m.host.clone()),
            member.map_or("-".into(), |m| m.client_id.clone()),
        ]);
    }
    out(&table.render());
    let idle: Vec<_> = info
        .members
        .iter()
        .filter(|m| m.assigned.is_empty())
        .collect();
    if !idle.is_empty() {
        out("\n");
        let mut table = Table::new(&["MEMBER-WITHOUT-PARTITIONS", "HOST", "CLIENT-ID"]);
        for m in idle {
            table.row(vec![
                m.member_id.clone(),
                m.host.clone(),
                m.client_id.clone(),
            ]);
        }
        out(&table.render());
    }
    Ok(())
}

/// Where an offset reset moves each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTarget {
    Earliest,
    Latest,
    Offset(i64),
    Shift(i64),
}

/// The new offset of a partition whose log holds `earliest..latest` and whose committed
/// offset is `current` (None if the group has none there). Like Kafka's tool, explicit and
/// shifted offsets are kept inside the log.
pub fn new_offset(target: ResetTarget, current: Option<i64>, earliest: i64, latest: i64) -> i64 {
    assert!(earliest <= latest, "log bounds {earliest}..{latest}");
    match target {
        ResetTarget::Earliest => earliest,
        ResetTarget::Latest => latest,
        ResetTarget::Offset(o) => o.clamp(earliest, latest),
        ResetTarget::Shift(n) => current
            .unwrap_or(earliest)
            .saturating_add(n)
            .clamp(earliest, latest),
    }
}

/// Parses `TOPIC` or `TOPIC:0,2,5`.
fn parse_topic_partitions(text: &str) -> Result<(String, Option<Vec<i32>>)> {
    let (topic, parts) = match text.split_once(':') {
        None => (text, None),
        Some((t, ps)) => {
            let parts = ps
                .split(',')
                .map(|p| {
                    p.trim()
                        .parse::<i32>()
                        .ok()
                        .filter(|p| *p >= 0)
                        .with_context(|| format!("--topic {text:?}: {p:?} is not a partition"))
                })
                .collect::<Result<Vec<_>>>()?;
            (t, Some(parts))
        }
    };
    validate_topic_name(topic).with_context(|| format!("--topic {text:?}"))?;
    Ok((topic.to_string(), parts))
}

fn reset_offsets(a: ResetArgs) -> Result<()> {
    validate_group_id(&a.group)?;
    let target = match (a.to_earliest, a.to_latest, a.to_offset, a.shift_by) {
        (true, ..) => ResetTarget::Earliest,
        (_, true, ..) => ResetTarget::Latest,
        (_, _, Some(o), _) => ResetTarget::Offset(o),
        (_, _, _, Some(n)) => ResetTarget::Shift(n),
        _ => bail!("give one of --to-earliest, --to-latest, --to-offset, --shift-by"),
    };
    let scopes = a
        .topics
        .iter()
        .map(|t| parse_topic_partitions(t))
        .collect::<Result<Vec<_>>>()?;
    let mut client = Client::connect(&a.connect)?;
    let conn = client.coordinator(&a.group)?;
    let info = describe_group(conn, &a.group)?;
    if !matches!(info.state.as_str(), "Empty" | "Dead") {
        bail!(
            "group {} has active members (state {}, {} members): offsets can only be reset \
             while the group is inactive; stop its consumers first",
            a.group,
            info.state,
            info.members.len()
        );
    }
    let current = committed(conn, &a.group)?;
    let mut wanted: BTreeSet<(String, i32)> = BTreeSet::new();
    if a.all_topics {
        wanted.extend(current.keys().cloned());
        if wanted.is_empty() {
            bail!("group {} has no committed offsets to reset", a.group);
        }
    }
    if !scopes.is_empty() {
        let names: Vec<String> = scopes.iter().map(|(t, _)| t.clone()).collect();
        let meta = client.metadata(Some(&names))?;
        for (topic, parts) in &scopes {
            let t = meta
                .topics
                .iter()
                .find(|t| t.name.as_ref().map(|n| n.as_str()) == Some(topic.as_str()))
                .with_context(|| format!("metadata reply lacks topic {topic}"))?;
            if t.error_code != 0 {
                return Err(kafka_error(t.error_code, None, format!("topic {topic}")));
            }
            let exists: BTreeSet<i32> = t.partitions.iter().map(|p| p.partition_index).collect();
            match parts {
                None => wanted.extend(exists.iter().map(|p| (topic.clone(), *p))),
                Some(ps) => {
                    for p in ps {
                        if !exists.contains(p) {
                            bail!("--topic {topic}:{p}: topic {topic} has no partition {p}");
                        }
                        wanted.insert((topic.clone(), *p));
                    }
                }
            }
        }
    }
    let bounds = log_bounds(&mut client, &wanted)?;
    let mut plan = Vec::with_capacity(wanted.len());
    for tp in &wanted {
        let &(earliest, latest) = bounds
            .get(tp)
            .with_context(|| format!("no log offsets for {}/{}", tp.0, tp.1))?;
        let now = current.get(tp).copied();
        plan.push((tp.clone(), now, new_offset(target, now, earliest, latest)));
    }
    if a.execute {
        commit(client.coordinator(&a.group)?, &a.group, &plan)?;
    }
    if a.json {
        print_json(&json!({
            "group": a.group,
            "executed": a.execute,
            "offsets": plan.iter().map(|((t, p), now, new)| json!({
                "topic": t, "partition": p, "current_offset": now, "new_offset": new,
            })).collect::<Vec<_>>(),
        }));
    } else {
        let mut table = Table::new(&[
            "GROUP",
            "TOPIC",
            "PARTITION",
            "CURRENT-OFFSET",
            "NEW-OFFSET",
        ]);
        for ((t, p), now, new) in &plan {
            table.row(vec![
                a.group.clone(),
                t.clone(),
                p.to_string(),
                now.map_or("-".into(), |o| o.to_string()),
                new.to_string(),
            ]);
        }
        out(&table.render());
        if !a.execute {
            eprintln!("Dry run: nothing changed. Add --execute to apply.");
        }
    }
    Ok(())
}

fn commit(
    conn: &mut Connection,
    group: &str,
    plan: &[((String, i32), Option<i64>, i64)],
) -> Result<()> {
    let mut by_topic: BTreeMap<&str, Vec<OffsetCommitRequestPartition>> = BTreeMap::new();
    for ((t, p), _, new) in plan {
        by_topic.entry(t).or_default().push(
            OffsetCommitRequestPartition::default()
                .with_partition_index(*p)
                .with_committed_offset(*new)
                .with_committed_leader_epoch(-1)
                .with_committed_metadata(Some(StrBytes::from_static_str(""))),
        );
    }
    let req = OffsetCommitRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
        .with_generation_id_or_member_epoch(NO_GENERATION)
        .with_member_id(StrBytes::from_static_str(""))
        .with_retention_time_ms(-1)
        .with_topics(
            by_topic
                .into_iter()
                .map(|(t, ps)| {
                    OffsetCommitRequestTopic::default()
                        .with_name(topic_name(t))
                        .with_partitions(ps)
                })
                .collect(),
        );
    let (_, reply) = call_on(conn, ApiKey::OffsetCommit, OFFSET_COMMIT_VERSIONS, &req)?;
    for t in &reply.topics {
        for p in &t.partitions {
            check(
                p.error_code,
                None,
                format!(
                    "committing the offset of {group} on {}/{}",
                    t.name.as_str(),
                    p.partition_index
                ),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_offsets_stay_inside_the_log() {
        use ResetTarget::*;
        assert_eq!(new_offset(Earliest, Some(50), 10, 100), 10);
        assert_eq!(new_offset(Latest, Some(50), 10, 100), 100);
        assert_eq!(new_offset(Offset(5), None, 10, 100), 10);
        assert_eq!(new_offset(Offset(500), None, 10, 100), 100);
        assert_eq!(new_offset(Offset(42), None, 10, 100), 42);
        assert_eq!(new_offset(Shift(-20), Some(50), 10, 100), 30);
        assert_eq!(new_offset(Shift(-200), Some(50), 10, 100), 10);
        assert_eq!(new_offset(Shift(5), None, 10, 100), 15);
        assert_eq!(new_offset(Shift(i64::MAX), Some(50), 10, 100), 100);
    }

    #[test]
    fn topic_partition_lists_parse() {
        assert_eq!(parse_topic_partitions("t").unwrap(), ("t".into(), None));
        assert_eq!(
            parse_topic_partitions("t:0,2").unwrap(),
            ("t".into(), Some(vec![0, 2]))
        );
        assert!(parse_topic_partitions("t:x").is_err());
        assert!(parse_topic_partitions("t:-1").is_err());
        assert!(parse_topic_partitions("bad topic").is_err());
    }
}
