//! The group APIs on the wire: decodes each request, sends it to the shard whose group
//! coordinator owns the group (the shard of the group's `__consumer_offsets` partition), and
//! encodes the answer. Also starts and stops each shard's coordinator.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::Bytes;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::{
    ApiKey, DeleteGroupsRequest, DeleteGroupsResponse, DescribeGroupsRequest,
    DescribeGroupsResponse, FindCoordinatorRequest, HeartbeatRequest, HeartbeatResponse,
    JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse, ListGroupsRequest,
    ListGroupsResponse, OffsetCommitRequest, OffsetCommitResponse, OffsetDeleteRequest,
    OffsetDeleteResponse, OffsetFetchRequest, SyncGroupRequest, SyncGroupResponse,
};
use spate_replication::controller::CreateTopicRequest;

use super::config::DEFAULT_OFFSETS_TOPIC_REPLICATION_FACTOR;
use super::records::{partition_for, OFFSETS_TOPIC};
use super::{
    find_coordinator_response, offset_fetch_response, offsets_topic_configs, ClientInfo,
    GroupOffsets, GroupShard, DEFAULT_TICK_INTERVAL_MS,
};
use crate::dispatch::encode_response;
use crate::error::NetError;
use crate::leader_hint::Endpoint;
use crate::request::{decode_body, Request};
use crate::shard::Shard;

/// Topics and their partitions named in a request.
type TopicPartitions = Vec<(String, Vec<i32>)>;

/// The API keys answered here.
pub const GROUP_API_KEYS: &[ApiKey] = &[
    ApiKey::FindCoordinator,
    ApiKey::JoinGroup,
    ApiKey::SyncGroup,
    ApiKey::Heartbeat,
    ApiKey::LeaveGroup,
    ApiKey::OffsetCommit,
    ApiKey::OffsetFetch,
    ApiKey::DescribeGroups,
    ApiKey::ListGroups,
    ApiKey::DeleteGroups,
    ApiKey::OffsetDelete,
];

thread_local! {
    /// This shard's coordinator (one per executor thread, like the shard itself).
    static GROUPS: RefCell<Option<Rc<GroupShard>>> = const { RefCell::new(None) };
}

fn current() -> Option<Rc<GroupShard>> {
    GROUPS.with(|g| g.borrow().clone())
}

/// The committed offsets of the groups this shard coordinates (none before it started).
pub fn committed_offsets() -> Vec<crate::metrics::CommittedOffset> {
    let Some(groups) = current() else {
        return Vec::new();
    };
    let Some(table) = Shard::current().map(|s| s.shard_table()) else {
        return Vec::new();
    };
    groups
        .committed_offsets()
        .into_iter()
        .map(
            |(group, topic, partition, offset)| crate::metrics::CommittedOffset {
                owner: table.owner(&topic, partition),
                group,
                topic,
                partition,
                offset,
            },
        )
        .collect()
}

/// Starts this shard's group coordinator and its ticker, which loads the `__consumer_offsets`
/// partitions this shard leads (alone: owns) and unloads those it stops leading.
pub fn start_shard(shard: &Rc<Shard>) {
    let config = shard.config.groups.clone();
    let clustered = shard.in_cluster();
    let legacy = (!clustered).then(|| legacy_offsets_dir(&shard.config.data_dir));
    let groups = match GroupShard::new(
        config,
        shard.replicas.clone(),
        shard.id,
        clustered,
        legacy,
        shard.cleaner_wake.clone(),
    ) {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(error = %e, "invalid group coordinator configuration; groups disabled");
            return;
        }
    };
    GROUPS.with(|g| *g.borrow_mut() = Some(groups.clone()));
    groups.follow_leadership();
    groups.start_ticker(DEFAULT_TICK_INTERVAL_MS);
    {
        // Pending JoinGroups would otherwise hold their connections (and the shutdown, which
        // drains connections first) until a rebalance timeout.
        let (shard, groups) = (shard.clone(), groups.clone());
        glommio::spawn_local(async move {
            shard.shutdown.changed(0).await;
            groups.stop_serving();
        })
        .detach();
    }
    // A data dir of the layout before `__consumer_offsets` was a topic: create the topic now,
    // so its partitions load (and migrate the old logs) before groups are asked for.
    if shard.id == 0 && !clustered && legacy_offsets_dir(&shard.config.data_dir).exists() {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            ensure_offsets_topic(&shard).await;
        })
        .detach();
    }
}

/// Where the layout before `__consumer_offsets` became a topic kept its partitions
/// (`<data>/__consumer_offsets/<partition>`). Topics live in `<data>/<topic>-<partition>`,
/// so this never names a topic's directory.
pub fn legacy_offsets_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(OFFSETS_TOPIC)
}

/// Checks a single node's data dir before it starts: partitions of the previous
/// `__consumer_offsets` layout are migrated into the topic's partitions of the same number,
/// which needs the same partition count; anything else is refused with what to do.
pub fn check_legacy_offsets(data_dir: &Path, partitions: i32) -> Result<(), String> {
    let dir = legacy_offsets_dir(data_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        match name.parse::<i32>() {
            Ok(p) if (0..partitions).contains(&p) => {}
            _ => {
                return Err(format!(
                    "{} holds {name}, which is not a partition below --offsets-topic-partitions \
                     ({partitions}): start with the --offsets-topic-partitions these offsets \
                     were written with, so they are migrated into the __consumer_offsets topic",
                    dir.display()
                ))
            }
        }
    }
    Ok(())
}

thread_local! {
    /// A controller call creating `__consumer_offsets` is in flight from this shard.
    static CREATING: Cell<bool> = const { Cell::new(false) };
}

/// Makes sure `__consumer_offsets` exists, creating it when first needed (Kafka creates it
/// on the first FindCoordinator too). Returns whether it exists in what this node knows.
/// Alone, it is created in the metadata store with `offsets.topic.partitions` partitions and
/// opened on its owners, whose coordinators then load it. In a cluster, the controller is
/// asked (in the background: the answer is COORDINATOR_NOT_AVAILABLE until the partition has
/// a leader) with `offsets.topic.replication.factor` replicas, at most the live brokers;
/// TOPIC_ALREADY_EXISTS means another node was first.
async fn ensure_offsets_topic(shard: &Rc<Shard>) -> bool {
    let groups = &shard.config.groups;
    match &shard.config.cluster {
        None => {
            if shard.topics().contains_key(OFFSETS_TOPIC) {
                return true;
            }
            let limit = crate::handlers::admin::shard_limit(shard);
            let created = shard.metadata.create_topic(
                OFFSETS_TOPIC,
                groups.offsets_topic_partitions,
                offsets_topic_configs(),
                true,
                limit,
            );
            match created {
                Ok(Ok(_)) => {
                    tracing::info!(
                        partitions = groups.offsets_topic_partitions,
                        "created the __consumer_offsets topic"
                    );
                    shard.open_topic_on_owners(OFFSETS_TOPIC).await;
                    let _ = shard
                        .router
                        .broadcast(|_| async {
                            if let Some(g) = current() {
                                g.follow_leadership();
                                g.wait_loaded().await;
                            }
                        })
                        .await;
                    true
                }
                Ok(Err(refused)) if refused.code == ResponseError::TopicAlreadyExists.code() => {
                    true
                }
                Ok(Err(refused)) => {
                    tracing::error!(
                        code = refused.code,
                        msg = refused.message,
                        "cannot create the __consumer_offsets topic"
                    );
                    false
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot create the __consumer_offsets topic");
                    false
                }
            }
        }
        Some(port) => {
            let view = port.view();
            if view.metadata.topics.contains_key(OFFSETS_TOPIC) {
                return true;
            }
            if CREATING.with(|c| c.replace(true)) {
                return false;
            }
            let live = view.live_brokers().count().max(1);
            let factor = usize::from(groups.offsets_topic_replication_factor);
            // The default leaves the count to the controller, which counts every metadata
            // voter whether registered yet or not: a topic asked for while nodes are still
            // starting is refused until enough are live, rather than made smaller for good.
            let replication_factor = (groups.offsets_topic_replication_factor
                != DEFAULT_OFFSETS_TOPIC_REPLICATION_FACTOR)
                .then(|| factor.min(live));
            let create = CreateTopicRequest {
                name: OFFSETS_TOPIC.to_string(),
                topic_id: fastrand::u128(1..),
                partitions: usize::try_from(groups.offsets_topic_partitions).unwrap_or(1),
                replication_factor,
                configs: offsets_topic_configs().into_iter().collect(),
            };
            let port = port.clone();
            glommio::spawn_local(async move {
                match port.create_topic(create, false).await {
                    Ok(()) => tracing::info!("created the __consumer_offsets topic"),
                    Err(e) if e.code == ResponseError::TopicAlreadyExists.code() => {}
                    Err(e) => {
                        tracing::info!(
                            code = e.code,
                            msg = e.message,
                            "cannot create the __consumer_offsets topic yet"
                        )
                    }
                }
                CREATING.with(|c| c.set(false));
            })
            .detach();
            false
        }
    }
}

/// Flushes the coordinator's queued writes (at shutdown, before the shard closes its
/// partitions).
pub async fn close_shard() {
    if let Some(groups) = GROUPS.with(|g| g.borrow_mut().take()) {
        groups.close().await;
    }
}

/// Runs `f` with the coordinator of the shard holding `group_id`'s `__consumer_offsets`
/// partition; `err` builds the answer when that coordinator cannot be reached. A node where
/// that partition is not led (in a cluster: not its ready leader) answers NOT_COORDINATOR, so
/// a member that asked a stale node finds the coordinator again instead of forming a second
/// group there.
async fn on_owner<T, F, Fut>(
    shard: &Rc<Shard>,
    group_id: &str,
    f: F,
    err: impl FnOnce(i16) -> T,
) -> T
where
    T: Send + 'static,
    F: FnOnce(Rc<GroupShard>) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    if !ensure_offsets_topic(shard).await {
        return err(ResponseError::CoordinatorNotAvailable.code());
    }
    let partition = partition_for(group_id, shard.config.groups.offsets_topic_partitions);
    let Ok(owner) = shard.replicas.owner(OFFSETS_TOPIC, partition) else {
        return err(ResponseError::NotCoordinator.code());
    };
    let result = shard
        .router
        .run_on(owner, move |_| async move {
            match current() {
                Some(groups) => Ok(f(groups).await),
                None => Err(ResponseError::CoordinatorNotAvailable.code()),
            }
        })
        .await;
    match result {
        Ok(Ok(t)) => t,
        Ok(Err(code)) => err(code),
        Err(_) => err(ResponseError::CoordinatorNotAvailable.code()),
    }
}

/// Where FindCoordinator sends the members of group `key`: alone, this node; in a cluster,
/// the leader of the group's `__consumer_offsets` partition as the applied metadata names
/// it (`None`, COORDINATOR_NOT_AVAILABLE, while it has none or the topic is being created).
async fn locate_coordinators(shard: &Rc<Shard>, keys: &[&str]) -> Vec<Option<Endpoint>> {
    let c = &shard.config;
    let exists = ensure_offsets_topic(shard).await;
    keys.iter()
        .map(|key| match &c.cluster {
            None => Some(Endpoint {
                node_id: c.node_id,
                host: c.advertised_host.clone(),
                port: c.advertised_port,
            }),
            Some(port) if exists => {
                let partition = partition_for(key, c.groups.offsets_topic_partitions);
                crate::leader_hint::group_coordinator(&port.view(), partition)
            }
            Some(_) => None,
        })
        .collect()
}

/// Answers one group API request.
pub async fn handle(shard: &Rc<Shard>, req: &Request) -> Result<Bytes, NetError> {
    let v = req.api_version;
    let cid = req.correlation_id;
    match req.api_key {
        ApiKey::FindCoordinator => {
            let r: FindCoordinatorRequest = decode_body(req)?;
            let keys: Vec<&str> = if v >= 4 {
                r.coordinator_keys.iter().map(|k| k.as_str()).collect()
            } else {
                vec![r.key.as_str()]
            };
            // Transaction coordinators are not offered (key type 1): no lookup.
            let located = if r.key_type == 0 {
                locate_coordinators(shard, &keys).await
            } else {
                vec![None; keys.len()]
            };
            let found: HashMap<&str, Endpoint> = keys
                .iter()
                .zip(located)
                .filter_map(|(k, e)| Some((*k, e?)))
                .collect();
            let resp = find_coordinator_response(v, &r, |key| found.get(key).cloned());
            encode_response(cid, v, &resp)
        }
        ApiKey::JoinGroup => {
            let r: JoinGroupRequest = decode_body(req)?;
            let client = ClientInfo {
                client_id: req.client_id.clone().unwrap_or_default(),
                client_host: String::new(),
            };
            let group = r.group_id.to_string();
            let resp = on_owner(
                shard,
                &group,
                move |g| async move { g.join_group(v, &client, &r).await },
                |e| {
                    JoinGroupResponse::default()
                        .with_error_code(e)
                        .with_generation_id(-1)
                },
            )
            .await;
            encode_response(cid, v, &resp)
        }
        ApiKey::SyncGroup => {
            let r: SyncGroupRequest = decode_body(req)?;
            let group = r.group_id.to_string();
            let resp = on_owner(
                shard,
                &group,
                move |g| async move { g.sync_group(v, &r).await },
                |e| SyncGroupResponse::default().with_error_code(e),
            )
            .await;
            encode_response(cid, v, &resp)
        }
        ApiKey::Heartbeat => {
            let r: HeartbeatRequest = decode_body(req)?;
            let group = r.group_id.to_string();
            let resp = on_owner(
                shard,
                &group,
                move |g| async move { g.heartbeat(&r).await },
                |e| HeartbeatResponse::default().with_error_code(e),
            )
            .await;
            encode_response(cid, v, &resp)
        }
        ApiKey::LeaveGroup => {
            let r: LeaveGroupRequest = decode_body(req)?;
            let group = r.group_id.to_string();
            let resp = on_owner(
                shard,
                &group,
                move |g| async move { g.leave_group(v, &r).await },
                |e| LeaveGroupResponse::default().with_error_code(e),
            )
            .await;
            encode_response(cid, v, &resp)
        }
        ApiKey::OffsetCommit => {
            let r: OffsetCommitRequest = decode_body(req)?;
            let group = r.group_id.to_string();
            let fallback = r.clone();
            let topics = shard.metadata.topics();
            let exists = move |name: &str, partition: i32| {
                topics.get(name).is_some_and(|t| partition < t.partitions)
            };
            let resp = on_owner(
                shard,
                &group,
                move |g| async move { g.offset_commit(v, &r, &exists).await },
                move |e| commit_error(&fallback, e),
            )
            .await;
            encode_response(cid, v, &resp)
        }
        ApiKey::OffsetFetch => {
            let r: OffsetFetchRequest = decode_body(req)?;
            let mut wanted: Vec<(String, Option<TopicPartitions>)> = Vec::new();
            if v >= 8 {
                for g in &r.groups {
                    let topics = g.topics.as_ref().map(|ts| {
                        ts.iter()
                            .map(|t| (t.name.to_string(), t.partition_indexes.clone()))
                            .collect()
                    });
                    wanted.push((g.group_id.to_string(), topics));
                }
            } else {
                let topics = r.topics.as_ref().map(|ts| {
                    ts.iter()
                        .map(|t| (t.name.to_string(), t.partition_indexes.clone()))
                        .collect()
                });
                wanted.push((r.group_id.to_string(), topics));
            }
            let mut results = Vec::with_capacity(wanted.len());
            for (group, topics) in wanted {
                let g2 = group.clone();
                let t2 = topics.clone();
                let offsets = on_owner(
                    shard,
                    &group,
                    move |g| async move { g.fetch_offsets(&g2, t2.as_deref()) },
                    |e| unreachable_offsets(&group, topics.as_deref(), e),
                )
                .await;
                results.push(offsets);
            }
            encode_response(cid, v, &offset_fetch_response(v, results))
        }
        ApiKey::DescribeGroups => {
            let r: DescribeGroupsRequest = decode_body(req)?;
            let mut resp = DescribeGroupsResponse::default();
            for group in r.groups {
                let id = group.to_string();
                let id2 = id.clone();
                let described = on_owner(
                    shard,
                    &id,
                    move |g| async move { g.describe_group(v, &id2) },
                    move |e| {
                        kafka_protocol::messages::describe_groups_response::DescribedGroup::default(
                        )
                        .with_group_id(group)
                        .with_error_code(e)
                    },
                )
                .await;
                resp.groups.push(described);
            }
            encode_response(cid, v, &resp)
        }
        ApiKey::ListGroups => {
            let r: ListGroupsRequest = decode_body(req)?;
            let states: Vec<String> = r.states_filter.iter().map(|s| s.to_string()).collect();
            let types: Vec<String> = r.types_filter.iter().map(|s| s.to_string()).collect();
            let answers = shard
                .router
                .broadcast(move |_| {
                    let (states, types) = (states.clone(), types.clone());
                    async move {
                        match current() {
                            Some(g) => g.list_groups(&states, &types),
                            None => (ResponseError::CoordinatorNotAvailable.code(), Vec::new()),
                        }
                    }
                })
                .await;
            let mut resp = ListGroupsResponse::default();
            for answer in answers {
                match answer {
                    Ok((error, groups)) => {
                        if error != 0 {
                            resp.error_code = error;
                        }
                        resp.groups.extend(groups);
                    }
                    Err(_) => resp.error_code = ResponseError::CoordinatorNotAvailable.code(),
                }
            }
            if v < 4 {
                for g in &mut resp.groups {
                    g.group_state = Default::default();
                }
            }
            if v < 5 {
                for g in &mut resp.groups {
                    g.group_type = Default::default();
                }
            }
            encode_response(cid, v, &resp)
        }
        ApiKey::DeleteGroups => {
            let r: DeleteGroupsRequest = decode_body(req)?;
            let mut resp = DeleteGroupsResponse::default();
            for group in r.groups_names {
                let id = group.to_string();
                let id2 = id.clone();
                let result = on_owner(
                    shard,
                    &id,
                    move |g| async move { g.delete_group(&id2).await },
                    move |e| {
                        kafka_protocol::messages::delete_groups_response::DeletableGroupResult::default()
                            .with_group_id(group)
                            .with_error_code(e)
                    },
                )
                .await;
                resp.results.push(result);
            }
            encode_response(cid, v, &resp)
        }
        ApiKey::OffsetDelete => {
            let r: OffsetDeleteRequest = decode_body(req)?;
            let group = r.group_id.to_string();
            let resp = on_owner(
                shard,
                &group,
                move |g| async move { g.offset_delete(&r).await },
                |e| OffsetDeleteResponse::default().with_error_code(e),
            )
            .await;
            encode_response(cid, v, &resp)
        }
        other => Err(NetError::Malformed(format!("{other:?} is not a group API"))),
    }
}

fn commit_error(req: &OffsetCommitRequest, error: i16) -> OffsetCommitResponse {
    use kafka_protocol::messages::offset_commit_response::{
        OffsetCommitResponsePartition, OffsetCommitResponseTopic,
    };
    OffsetCommitResponse::default().with_topics(
        req.topics
            .iter()
            .map(|t| {
                OffsetCommitResponseTopic::default()
                    .with_name(t.name.clone())
                    .with_partitions(
                        t.partitions
                            .iter()
                            .map(|p| {
                                OffsetCommitResponsePartition::default()
                                    .with_partition_index(p.partition_index)
                                    .with_error_code(error)
                            })
                            .collect(),
                    )
            })
            .collect(),
    )
}

fn unreachable_offsets(
    group: &str,
    topics: Option<&[(String, Vec<i32>)]>,
    error: i16,
) -> GroupOffsets {
    GroupOffsets {
        group_id: group.to_owned(),
        error: Some(
            ResponseError::try_from_code(error).unwrap_or(ResponseError::CoordinatorNotAvailable),
        ),
        topics: topics
            .unwrap_or_default()
            .iter()
            .map(|(t, ps)| {
                (
                    t.clone(),
                    ps.iter().map(|p| (*p, -1, -1, String::new())).collect(),
                )
            })
            .collect(),
    }
}
