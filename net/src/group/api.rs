//! The group APIs on the wire: decodes each request, sends it to the shard whose group
//! coordinator owns the group (the shard of the group's `__consumer_offsets` partition), and
//! encodes the answer. Also starts and stops each shard's coordinator.

use std::cell::RefCell;
use std::future::Future;
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
use spate_replication::partition::{NoObserver, PartitionReplica, ReplicaConfig, TopicPartition};
use spate_replication::shard::shard_of;

use super::records::{partition_for, OFFSETS_TOPIC};
use super::{
    find_coordinator_response, offset_fetch_response, offsets_log_config, ClientInfo, GroupOffsets,
    GroupShard, DEFAULT_TICK_INTERVAL_MS,
};
use crate::dispatch::encode_response;
use crate::error::NetError;
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

/// Starts this shard's group coordinator: marks its `__consumer_offsets` partitions as
/// loading, then opens and replays each in the background, and starts the ticker.
pub fn start_shard(shard: &Rc<Shard>) {
    let config = shard.config.groups.clone();
    let groups = match GroupShard::new(config) {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(error = %e, "invalid group coordinator configuration; groups disabled");
            return;
        }
    };
    GROUPS.with(|g| *g.borrow_mut() = Some(groups.clone()));
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
    for partition in 0..groups.partitions() {
        if offsets_owner(shard, partition) != shard.id {
            continue;
        }
        groups.begin_loading(partition);
        let dir = offsets_partition_dir(&shard.config.data_dir, partition);
        let mut log_config = offsets_log_config();
        log_config.flush = shard.config.flush;
        let groups = groups.clone();
        glommio::spawn_local(async move {
            // A replica like any partition's; its producer state stays empty (only this broker
            // writes it) and nothing exports its metrics.
            let config = ReplicaConfig {
                log: log_config,
                high_watermark_cap: None,
            };
            let tp = TopicPartition::new(OFFSETS_TOPIC, partition);
            let opened = PartitionReplica::open(tp, dir, None, config, Box::new(NoObserver)).await;
            let log = match opened {
                Ok(replica) => Rc::new(replica),
                Err(e) => {
                    tracing::error!(partition, error = %e, "cannot open __consumer_offsets partition; its groups stay unavailable");
                    return;
                }
            };
            if let Err(e) = groups.load_partition(partition, log).await {
                tracing::error!(partition, error = %e, "cannot load __consumer_offsets partition; its groups stay unavailable");
            }
        })
        .detach();
    }
}

/// The shard coordinating the groups of a `__consumer_offsets` partition. These partitions are
/// not in the topic table (their count is fixed by configuration), so they keep the hash rule
/// rather than a stored placement.
pub fn offsets_owner(shard: &Shard, partition: i32) -> usize {
    shard_of(OFFSETS_TOPIC, partition, shard.router.shards())
}

/// Where a `__consumer_offsets` partition lives: `<data>/__consumer_offsets/<partition>`. User
/// topics live in `<data>/<topic>-<partition>`, so no topic name can ever share these
/// directories (not even a user topic called `__consumer_offsets`).
pub fn offsets_partition_dir(data_dir: &std::path::Path, partition: i32) -> std::path::PathBuf {
    data_dir.join(OFFSETS_TOPIC).join(partition.to_string())
}

/// Flushes and closes this shard's `__consumer_offsets` logs (at shutdown).
pub async fn close_shard() {
    if let Some(groups) = GROUPS.with(|g| g.borrow_mut().take()) {
        groups.close().await;
    }
}

/// Runs `f` with the coordinator of the shard owning `group_id`; `err` builds the answer when
/// that coordinator cannot be reached. In a cluster, a node other than the one FindCoordinator
/// names answers NOT_COORDINATOR, so a member that asked a stale node finds the coordinator
/// again instead of forming a second group there.
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
    if let Some(port) = &shard.config.cluster {
        let me = shard.config.node_id;
        let coordinator = crate::leader_hint::group_coordinator(&port.view());
        if coordinator.is_none_or(|c| c.node_id != me) {
            return err(ResponseError::NotCoordinator.code());
        }
    }
    let partition = partition_for(group_id, shard.config.groups.offsets_topic_partitions);
    let owner = offsets_owner(shard, partition);
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

/// Answers one group API request.
pub async fn handle(shard: &Rc<Shard>, req: &Request) -> Result<Bytes, NetError> {
    let v = req.api_version;
    let cid = req.correlation_id;
    match req.api_key {
        ApiKey::FindCoordinator => {
            let r: FindCoordinatorRequest = decode_body(req)?;
            let c = &shard.config;
            let resp = match &c.cluster {
                None => find_coordinator_response(
                    v,
                    &r,
                    c.node_id,
                    &c.advertised_host,
                    i32::from(c.advertised_port),
                    true,
                ),
                Some(port) => match crate::leader_hint::group_coordinator(&port.view()) {
                    Some(e) => find_coordinator_response(
                        v,
                        &r,
                        e.node_id,
                        &e.host,
                        i32::from(e.port),
                        true,
                    ),
                    None => find_coordinator_response(v, &r, -1, "", -1, false),
                },
            };
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
