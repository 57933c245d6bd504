//! Topic set-up and discovery: metadata, CreateTopics, and partition offsets (ListOffsets).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    ApiKey, BrokerId, CreateTopicsRequest, InitProducerIdRequest, ListOffsetsRequest,
    MetadataRequest, MetadataResponse, ProducerId, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use crate::error::{ClientError, Result};
use crate::wire::Connection;

/// Metadata versions spate-perf speaks (v13 drops nothing we need; v12 keeps topic names).
const METADATA_VERSIONS: std::ops::RangeInclusive<i16> = 1..=12;
const CREATE_TOPICS_VERSIONS: std::ops::RangeInclusive<i16> = 2..=7;
const LIST_OFFSETS_VERSIONS: std::ops::RangeInclusive<i16> = 1..=7;
const INIT_PRODUCER_ID_VERSIONS: std::ops::RangeInclusive<i16> = 0..=4;
/// How long a created topic may take to get a leader for every partition.
pub const TOPIC_READY_TIMEOUT_MS: u64 = 10_000;
/// Pause between metadata polls while waiting for leaders.
const TOPIC_POLL_INTERVAL_MS: u64 = 100;
/// Upper bound on the partitions of a benchmark topic.
pub const MAX_PARTITIONS: i32 = 10_000;

const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
const LEADER_NOT_AVAILABLE: i16 = 5;
const TOPIC_ALREADY_EXISTS: i16 = 36;

/// Where each partition of the topic lives.
#[derive(Debug, Clone)]
pub struct TopicLayout {
    pub topic: String,
    /// Partition index → leader address (host:port), sorted by partition.
    pub leaders: Vec<(i32, String)>,
}

/// Offset to ask ListOffsets for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    Earliest,
    Latest,
}

/// Connects to the first bootstrap server that answers.
pub fn connect_any(bootstrap: &[String], request_timeout: Duration) -> Result<Connection> {
    let mut last = None;
    for addr in bootstrap {
        match Connection::connect(addr, request_timeout) {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| ClientError::Args("no bootstrap server given".into())))
}

fn metadata(conn: &mut Connection, topic: &str) -> Result<MetadataResponse> {
    let version = conn.versions.pick(ApiKey::Metadata, METADATA_VERSIONS)?;
    let req = MetadataRequest::default()
        .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(
            TopicName(StrBytes::from_string(topic.to_string())),
        ))]))
        .with_allow_auto_topic_creation(false);
    conn.call(ApiKey::Metadata, version, &req)
}

/// What one metadata reply says about the topic.
enum TopicState {
    Missing,
    NotReady,
    Ready(TopicLayout),
}

fn topic_state(reply: &MetadataResponse, topic: &str) -> Result<TopicState> {
    let brokers: HashMap<BrokerId, String> = reply
        .brokers
        .iter()
        .map(|b| (b.node_id, format!("{}:{}", b.host.as_str(), b.port)))
        .collect();
    let Some(t) = reply
        .topics
        .iter()
        .find(|t| t.name.as_ref().map(|n| n.0.as_str()) == Some(topic))
    else {
        return Ok(TopicState::Missing);
    };
    match t.error_code {
        0 => {}
        UNKNOWN_TOPIC_OR_PARTITION => return Ok(TopicState::Missing),
        LEADER_NOT_AVAILABLE => return Ok(TopicState::NotReady),
        code => return Err(ClientError::broker(format!("Metadata for {topic}"), code)),
    }
    if t.partitions.is_empty() {
        return Ok(TopicState::NotReady);
    }
    let mut leaders = Vec::with_capacity(t.partitions.len());
    for p in &t.partitions {
        match brokers.get(&p.leader_id) {
            Some(addr) if p.error_code == 0 => leaders.push((p.partition_index, addr.clone())),
            _ => return Ok(TopicState::NotReady),
        }
    }
    leaders.sort();
    Ok(TopicState::Ready(TopicLayout {
        topic: topic.to_string(),
        leaders,
    }))
}

/// Where a topic's partitions are led now, as one Metadata answer says, ready or not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leaders {
    /// Partition index → leader address, None while it has none; sorted by partition.
    pub partitions: Vec<(i32, Option<String>)>,
    /// Every broker the answer lists (host:port), for the next refresh to ask.
    pub brokers: Vec<String>,
}

impl Leaders {
    /// The leader of `partition`, if it has one.
    pub fn of(&self, partition: i32) -> Option<&str> {
        self.partitions
            .binary_search_by_key(&partition, |(p, _)| *p)
            .ok()
            .and_then(|i| self.partitions[i].1.as_deref())
    }
}

/// The topic's partition leaders now; a partition without one (an election under way) has None.
/// A topic that does not exist is an error.
pub fn leaders(conn: &mut Connection, topic: &str) -> Result<Leaders> {
    let reply = metadata(conn, topic)?;
    let brokers: HashMap<BrokerId, String> = reply
        .brokers
        .iter()
        .map(|b| (b.node_id, format!("{}:{}", b.host.as_str(), b.port)))
        .collect();
    let t = reply
        .topics
        .iter()
        .find(|t| t.name.as_ref().map(|n| n.0.as_str()) == Some(topic))
        .ok_or_else(|| {
            ClientError::broker(format!("Metadata for {topic}"), UNKNOWN_TOPIC_OR_PARTITION)
        })?;
    if !matches!(t.error_code, 0 | LEADER_NOT_AVAILABLE) {
        return Err(ClientError::broker(
            format!("Metadata for {topic}"),
            t.error_code,
        ));
    }
    let mut partitions: Vec<(i32, Option<String>)> = t
        .partitions
        .iter()
        .map(|p| {
            let leader = (p.error_code == 0 || p.error_code == LEADER_NOT_AVAILABLE)
                .then(|| brokers.get(&p.leader_id).cloned())
                .flatten();
            (p.partition_index, leader)
        })
        .collect();
    partitions.sort();
    let mut all: Vec<String> = brokers.into_values().collect();
    all.sort();
    Ok(Leaders {
        partitions,
        brokers: all,
    })
}

/// A new idempotent producer's id and epoch (InitProducerId without a transactional id).
pub fn init_producer_id(conn: &mut Connection) -> Result<(i64, i16)> {
    let version = conn
        .versions
        .pick(ApiKey::InitProducerId, INIT_PRODUCER_ID_VERSIONS)?;
    let req = InitProducerIdRequest::default()
        .with_transactional_id(None)
        .with_transaction_timeout_ms(-1)
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    let reply = conn.call(ApiKey::InitProducerId, version, &req)?;
    if reply.error_code != 0 {
        return Err(ClientError::broker("InitProducerId", reply.error_code));
    }
    Ok((reply.producer_id.0, reply.producer_epoch))
}

/// Finds the topic's partition leaders, creating the topic with `partitions` partitions if it
/// does not exist. An existing topic keeps its partition count.
pub fn ensure_topic(
    conn: &mut Connection,
    topic: &str,
    partitions: i32,
    replication_factor: i16,
) -> Result<TopicLayout> {
    if !(1..=MAX_PARTITIONS).contains(&partitions) {
        return Err(ClientError::Args(format!(
            "--partitions must be 1..={MAX_PARTITIONS}"
        )));
    }
    let deadline = Instant::now() + Duration::from_millis(TOPIC_READY_TIMEOUT_MS);
    let mut created = false;
    loop {
        let reply = metadata(conn, topic)?;
        match topic_state(&reply, topic)? {
            TopicState::Ready(layout) => return Ok(layout),
            TopicState::Missing if !created => {
                create_topic(conn, topic, partitions, replication_factor)?;
                created = true;
            }
            TopicState::Missing | TopicState::NotReady => {
                if Instant::now() >= deadline {
                    return Err(ClientError::Protocol(format!(
                        "topic {topic} has no leader for every partition after \
                         {TOPIC_READY_TIMEOUT_MS} ms"
                    )));
                }
                std::thread::sleep(Duration::from_millis(TOPIC_POLL_INTERVAL_MS));
            }
        }
    }
}

fn create_topic(
    conn: &mut Connection,
    topic: &str,
    partitions: i32,
    replication_factor: i16,
) -> Result<()> {
    let version = conn
        .versions
        .pick(ApiKey::CreateTopics, CREATE_TOPICS_VERSIONS)?;
    let req = CreateTopicsRequest::default()
        .with_topics(vec![CreatableTopic::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_num_partitions(partitions)
            .with_replication_factor(replication_factor)])
        .with_timeout_ms(TOPIC_READY_TIMEOUT_MS as i32);
    let reply = conn.call(ApiKey::CreateTopics, version, &req)?;
    for t in &reply.topics {
        if t.error_code != 0 && t.error_code != TOPIC_ALREADY_EXISTS {
            return Err(ClientError::broker(
                format!("CreateTopics {topic}"),
                t.error_code,
            ));
        }
    }
    Ok(())
}

/// The earliest or latest offset of each partition, in the order given.
pub fn list_offsets(
    conn: &mut Connection,
    topic: &str,
    partitions: &[i32],
    spec: OffsetSpec,
) -> Result<Vec<i64>> {
    let version = conn
        .versions
        .pick(ApiKey::ListOffsets, LIST_OFFSETS_VERSIONS)?;
    let timestamp = match spec {
        OffsetSpec::Earliest => -2,
        OffsetSpec::Latest => -1,
    };
    let req = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(vec![ListOffsetsTopic::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partitions(
                partitions
                    .iter()
                    .map(|&p| {
                        ListOffsetsPartition::default()
                            .with_partition_index(p)
                            .with_current_leader_epoch(-1)
                            .with_timestamp(timestamp)
                    })
                    .collect(),
            )]);
    let reply = conn.call(ApiKey::ListOffsets, version, &req)?;
    let mut found: HashMap<i32, i64> = HashMap::new();
    for t in &reply.topics {
        for p in &t.partitions {
            if p.error_code != 0 {
                return Err(ClientError::broker(
                    format!("ListOffsets {topic}/{}", p.partition_index),
                    p.error_code,
                ));
            }
            found.insert(p.partition_index, p.offset);
        }
    }
    partitions
        .iter()
        .map(|p| {
            found.get(p).copied().ok_or_else(|| {
                ClientError::Protocol(format!("ListOffsets reply lacks partition {p}"))
            })
        })
        .collect()
}
