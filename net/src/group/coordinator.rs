//! The per-shard group coordinator: routes group requests to groups, owns the loading state of
//! its `__consumer_offsets` partitions, and turns requests into responses and records.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound::{Included, Unbounded};

use bytes::{Buf, Bytes};
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::consumer_protocol_subscription::ConsumerProtocolSubscription;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::find_coordinator_request::FindCoordinatorRequest;
use kafka_protocol::messages::find_coordinator_response::{Coordinator, FindCoordinatorResponse};
use kafka_protocol::messages::heartbeat_request::HeartbeatRequest;
use kafka_protocol::messages::heartbeat_response::HeartbeatResponse;
use kafka_protocol::messages::join_group_request::JoinGroupRequest;
use kafka_protocol::messages::leave_group_request::LeaveGroupRequest;
use kafka_protocol::messages::leave_group_response::{LeaveGroupResponse, MemberResponse};
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::offset_commit_request::OffsetCommitRequest;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponse, OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_delete_request::OffsetDeleteRequest;
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponse, OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponse, OffsetFetchResponseGroup, OffsetFetchResponsePartition,
    OffsetFetchResponsePartitions, OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::sync_group_request::SyncGroupRequest;
use kafka_protocol::messages::{BrokerId, GroupId, TopicName};
use kafka_protocol::protocol::{Decodable, Message};

use super::config::GroupConfig;
use super::group::{join_error, str_bytes, sync_error, Group, GroupState, JoinParams, Member};
use super::records::{
    decode_raw_batches, partition_for, uncompressed_records, GroupRecordError, OffsetValue,
    OffsetsRecord, RecordView, MAX_STRING_BYTES, OFFSETS_TOPIC,
};
use super::{Effect, PendingReply, ReplyId};

/// Most protocols one member may offer in a JoinGroup.
pub const MAX_PROTOCOLS_PER_MEMBER: usize = 64;
/// Longest client id kept as the prefix of a generated member id.
const MAX_MEMBER_ID_PREFIX_BYTES: usize = 200;
/// Longest topic name (Kafka's limit).
const MAX_TOPIC_NAME_BYTES: usize = 249;
/// The group type this coordinator implements (ListGroups v5).
pub const CLASSIC_GROUP_TYPE: &str = "classic";
/// The protocol type whose member metadata is a ConsumerProtocolSubscription.
const CONSUMER_PROTOCOL_TYPE: &str = "consumer";

/// Who sent a request: kept with members for DescribeGroups.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientInfo {
    pub client_id: String,
    /// The peer address as Kafka shows it, e.g. `/127.0.0.1`.
    pub client_host: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LoadState {
    Loading,
    Loaded,
}

/// A validated OffsetCommit: persist `records` to `partition`, then call
/// [`GroupCoordinator::finish_offset_commit`].
#[derive(Debug)]
pub struct OffsetCommitOutcome {
    pub partition: i32,
    /// The offsets to write; empty when every partition failed validation (nothing to write).
    pub records: Vec<OffsetsRecord>,
    response: OffsetCommitResponse,
}

/// One group's part of an OffsetFetch answer, before it is shaped for the request version.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupOffsets {
    pub group_id: String,
    pub error: Option<ResponseError>,
    /// topic → (partition, offset, leader epoch, metadata); offset -1 when none is committed.
    pub topics: BTreeMap<String, Vec<(i32, i64, i32, String)>>,
}

pub struct GroupCoordinator {
    config: GroupConfig,
    partitions: BTreeMap<i32, LoadState>,
    groups: HashMap<String, Group>,
    effects: Vec<Effect>,
    member_seq: u64,
    next_retention_check_ms: i64,
    /// The (topic, partition) key of the offset being replayed, reused so that looking up a
    /// held offset needs no allocation.
    replay_key: (String, i32),
}

impl GroupCoordinator {
    pub fn new(config: GroupConfig) -> Result<Self, String> {
        config.validate()?;
        Ok(GroupCoordinator {
            config,
            partitions: BTreeMap::new(),
            groups: HashMap::new(),
            effects: Vec::new(),
            member_seq: 0,
            next_retention_check_ms: i64::MIN,
            replay_key: (String::new(), 0),
        })
    }

    pub fn config(&self) -> &GroupConfig {
        &self.config
    }

    /// The `__consumer_offsets` partition of a group.
    pub fn partition_for(&self, group_id: &str) -> i32 {
        partition_for(group_id, self.config.offsets_topic_partitions)
    }

    /// Everything the caller must do since the last call.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    pub fn group_state(&self, group_id: &str) -> Option<GroupState> {
        self.groups.get(group_id).map(|g| g.state)
    }

    pub fn group_generation(&self, group_id: &str) -> Option<i32> {
        self.groups.get(group_id).map(|g| g.generation)
    }

    // ---------------------------------------------------------------- loading

    /// Takes ownership of a partition; its groups are unavailable until `finish_loading`.
    pub fn begin_loading(&mut self, partition: i32) {
        assert!((0..self.config.offsets_topic_partitions).contains(&partition));
        self.unload(partition);
        self.partitions.insert(partition, LoadState::Loading);
    }

    /// Applies one record read back from a loading partition, in log order.
    pub fn replay(&mut self, partition: i32, record: OffsetsRecord, now_ms: i64) {
        match record {
            OffsetsRecord::Offset {
                group_id,
                topic,
                partition: p,
                value,
            } => {
                let view = RecordView::Offset {
                    group_id: &group_id,
                    topic: &topic,
                    partition: p,
                    value: value.as_ref().map(OffsetValue::view),
                };
                self.replay_view(partition, view, now_ms)
            }
            OffsetsRecord::Group { group_id, value } => {
                let view = RecordView::Group {
                    group_id: &group_id,
                    value,
                };
                self.replay_view(partition, view, now_ms)
            }
        }
    }

    /// Applies every record of one stored batch of a loading partition, in log order, and
    /// returns how many; a batch that does not decode whole is applied not at all.
    pub fn replay_batch(
        &mut self,
        partition: i32,
        batch: &Bytes,
        now_ms: i64,
    ) -> Result<usize, GroupRecordError> {
        let owned;
        let views = match uncompressed_records(batch, RecordView::decode)? {
            Some(views) => views,
            None => {
                owned = decode_raw_batches(batch.clone())?;
                owned
                    .iter()
                    .map(|(k, v)| RecordView::decode(k, v.as_deref()))
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        // A batch holds one commit request: a run of offsets of one group, applied with one
        // look-up of the group.
        let mut rest = &views[..];
        while let Some(first) = rest.first() {
            let run = match first {
                RecordView::Offset { group_id, .. } => rest
                    .iter()
                    .take_while(
                        |v| matches!(v, RecordView::Offset { group_id: g, .. } if g == group_id),
                    )
                    .count(),
                RecordView::Group { .. } => 1,
            };
            let (records, after) = rest.split_at(run);
            match first {
                RecordView::Offset { group_id, .. } => {
                    self.replay_offsets(partition, group_id, records, now_ms)
                }
                RecordView::Group { .. } => self.replay_view(partition, first.clone(), now_ms),
            }
            rest = after;
        }
        Ok(views.len())
    }

    /// [`Self::replay`] of a record borrowed from the bytes it was read in.
    pub fn replay_view(&mut self, partition: i32, record: RecordView<'_>, now_ms: i64) {
        match record {
            RecordView::Offset { group_id, .. } => {
                self.replay_offsets(partition, group_id, std::slice::from_ref(&record), now_ms)
            }
            RecordView::Group { group_id, value } => {
                if !self.replays_here(partition, group_id) {
                    return;
                }
                match value {
                    Some(v) => self
                        .groups
                        .entry(group_id.to_owned())
                        .or_insert_with(|| Group::new(group_id.to_owned(), partition, now_ms))
                        .restore(v, now_ms),
                    None => {
                        // The group was deleted or expired; offsets written after this record
                        // (if any) start a fresh group.
                        self.groups.remove(group_id);
                    }
                }
            }
        }
    }

    /// Whether a record of `group_id` read from `partition` belongs there (a group held was
    /// placed by its id's hash when it was created; only a new one is hashed here).
    fn replays_here(&self, partition: i32, group_id: &str) -> bool {
        assert_eq!(
            self.partitions.get(&partition),
            Some(&LoadState::Loading),
            "replay only while loading"
        );
        let home = match self.groups.get(group_id) {
            Some(g) => g.partition,
            None => self.partition_for(group_id),
        };
        if home != partition {
            // Only possible if the partition count changed, which the config forbids.
            tracing::warn!(group = %group_id, partition, "record of a group that hashes elsewhere; skipped");
        }
        home == partition
    }

    /// Replays offset records of one group, in log order. Start-up runs this for every commit
    /// in the log, so replacing an offset the group holds allocates nothing.
    fn replay_offsets<'a>(
        &mut self,
        partition: i32,
        group_id: &str,
        records: &[RecordView<'a>],
        now_ms: i64,
    ) {
        if !self.replays_here(partition, group_id) {
            return;
        }
        if !self.groups.contains_key(group_id) {
            let commits = records
                .iter()
                .any(|r| matches!(r, RecordView::Offset { value: Some(_), .. }));
            if !commits {
                return;
            }
            let group = Group::new(group_id.to_owned(), partition, now_ms);
            self.groups.insert(group_id.to_owned(), group);
        }
        let offsets = &mut self.groups.get_mut(group_id).expect("held").offsets;
        let key = &mut self.replay_key;
        let fields = |r: &RecordView<'a>| match *r {
            RecordView::Offset {
                topic,
                partition,
                value,
                ..
            } => (topic, partition, value),
            RecordView::Group { .. } => unreachable!("offset records only"),
        };
        let mut rest = records;
        while let Some(first) = rest.first() {
            let (topic, p, value) = fields(first);
            key.0.clear();
            key.0.push_str(topic);
            key.1 = p;
            // A commit request lists its offsets in the order the map keeps them (topic, then
            // partition), so after one is found the next is tried just after it, not searched.
            let mut replaced = 0;
            let mut held = offsets.range_mut::<(String, i32), _>((Included(&*key), Unbounded));
            for record in rest {
                let (topic, p, value) = fields(record);
                let Some(v) = value else { break };
                match held.next() {
                    Some(((t, hp), slot)) if t == topic && *hp == p => *slot = v.to_value(),
                    _ => break,
                }
                replaced += 1;
            }
            if replaced == 0 {
                match value {
                    Some(v) => {
                        offsets.insert(key.clone(), v.to_value());
                    }
                    None => {
                        offsets.remove(key);
                    }
                }
                replaced = 1;
            }
            rest = &rest[replaced..];
        }
    }

    /// Ends loading: groups become available, sessions of restored members start now.
    pub fn finish_loading(&mut self, partition: i32, now_ms: i64) {
        assert_eq!(self.partitions.get(&partition), Some(&LoadState::Loading));
        let mut loaded = 0usize;
        for g in self
            .groups
            .values_mut()
            .filter(|g| g.partition == partition)
        {
            g.start_sessions(now_ms);
            loaded += 1;
        }
        // One line per partition at startup: detail, not news.
        tracing::debug!(
            partition,
            groups = loaded,
            "__consumer_offsets partition loaded"
        );
        self.partitions.insert(partition, LoadState::Loaded);
    }

    /// Gives a partition up: its groups are dropped and their pending replies answered with
    /// NOT_COORDINATOR.
    pub fn unload(&mut self, partition: i32) {
        if self.partitions.remove(&partition).is_none() {
            return;
        }
        let ids: Vec<String> = self
            .groups
            .values()
            .filter(|g| g.partition == partition)
            .map(|g| g.group_id.clone())
            .collect();
        for id in ids {
            if let Some(mut g) = self.groups.remove(&id) {
                g.fail_pending(ResponseError::NotCoordinator, &mut self.effects);
            }
        }
    }

    /// The partitions this coordinator owns, loading or loaded.
    pub fn owned_partitions(&self) -> Vec<i32> {
        self.partitions.keys().copied().collect()
    }

    pub fn is_loading(&self, partition: i32) -> bool {
        self.partitions.get(&partition) == Some(&LoadState::Loading)
    }

    pub fn is_loaded(&self, partition: i32) -> bool {
        self.partitions.get(&partition) == Some(&LoadState::Loaded)
    }

    fn check_group(&self, group_id: &str, allow_empty: bool) -> Result<i32, ResponseError> {
        if (!allow_empty && group_id.is_empty()) || group_id.len() > MAX_STRING_BYTES {
            return Err(ResponseError::InvalidGroupId);
        }
        let partition = self.partition_for(group_id);
        match self.partitions.get(&partition) {
            None => Err(ResponseError::NotCoordinator),
            Some(LoadState::Loading) => Err(ResponseError::CoordinatorLoadInProgress),
            Some(LoadState::Loaded) => Ok(partition),
        }
    }

    fn new_member_id(&mut self, prefix: &str, now_ms: i64) -> String {
        self.member_seq += 1;
        let mut end = prefix.len().min(MAX_MEMBER_ID_PREFIX_BYTES);
        while !prefix.is_char_boundary(end) {
            end -= 1;
        }
        // Unique within a coordinator's life by the sequence number, and across restarts by
        // the time.
        format!("{}-{:x}-{:x}", &prefix[..end], now_ms, self.member_seq)
    }

    // ---------------------------------------------------------------- JoinGroup

    /// JoinGroup. The answer comes out as an [`Effect::Join`] for `reply`, now or when the
    /// rebalance completes.
    pub fn join_group(
        &mut self,
        reply: ReplyId,
        version: i16,
        client: &ClientInfo,
        req: &JoinGroupRequest,
        now_ms: i64,
    ) {
        let pending = PendingReply { reply, version };
        let member_id = req.member_id.to_string();
        if let Err(e) = self.try_join(pending, client, req, now_ms) {
            self.effects.push(join_error(pending, &member_id, e));
        }
    }

    fn try_join(
        &mut self,
        pending: PendingReply,
        client: &ClientInfo,
        req: &JoinGroupRequest,
        now_ms: i64,
    ) -> Result<(), ResponseError> {
        let group_id = req.group_id.as_str();
        let partition = self.check_group(group_id, false)?;
        let session_timeout_ms = req.session_timeout_ms;
        if session_timeout_ms < self.config.min_session_timeout_ms
            || session_timeout_ms > self.config.max_session_timeout_ms
        {
            return Err(ResponseError::InvalidSessionTimeout);
        }
        // v0 has no rebalance timeout: the session timeout serves as both.
        let rebalance_timeout_ms = if pending.version == 0 || req.rebalance_timeout_ms <= 0 {
            session_timeout_ms
        } else {
            req.rebalance_timeout_ms
        };
        if req.protocols.len() > MAX_PROTOCOLS_PER_MEMBER
            || req.member_id.len() > MAX_STRING_BYTES
            || req
                .group_instance_id
                .as_ref()
                .is_some_and(|i| i.is_empty() || i.len() > MAX_STRING_BYTES)
            || req.protocol_type.len() > MAX_STRING_BYTES
            || req
                .protocols
                .iter()
                .any(|p| p.name.len() > MAX_STRING_BYTES)
        {
            return Err(ResponseError::InvalidRequest);
        }
        let protocols: Vec<(String, Bytes)> = req
            .protocols
            .iter()
            .map(|p| (p.name.to_string(), p.metadata.clone()))
            .collect();
        let protocol_type = req.protocol_type.to_string();
        if protocol_type.is_empty() || protocols.is_empty() {
            return Err(ResponseError::InconsistentGroupProtocol);
        }
        let member_id = req.member_id.to_string();
        let instance_id = req.group_instance_id.as_ref().map(|i| i.to_string());

        if !self.groups.contains_key(group_id) {
            if !member_id.is_empty() {
                return Err(ResponseError::UnknownMemberId);
            }
            if self.groups.len() >= self.config.max_groups {
                tracing::warn!(group = %group_id, limit = self.config.max_groups, "group limit reached");
                return Err(ResponseError::CoordinatorNotAvailable);
            }
            self.groups.insert(
                group_id.to_owned(),
                Group::new(group_id.to_owned(), partition, now_ms),
            );
        }
        let mut params = JoinParams {
            reply: pending,
            member_id: member_id.clone(),
            group_instance_id: instance_id.clone(),
            client_id: client.client_id.clone(),
            client_host: client.client_host.clone(),
            session_timeout_ms,
            rebalance_timeout_ms,
            protocol_type: protocol_type.clone(),
            protocols,
        };

        if member_id.is_empty() {
            let prefix = instance_id
                .clone()
                .unwrap_or_else(|| client.client_id.clone());
            let new_id = self.new_member_id(&prefix, now_ms);
            let delay_ms = self.config.initial_rebalance_delay_ms;
            let max_members = self.config.max_group_members;
            let group = self.groups.get_mut(group_id).expect("present");
            let static_old_id = instance_id
                .as_ref()
                .and_then(|i| group.static_members.get(i).cloned());
            if let Some(old_id) = static_old_id {
                params.member_id = new_id;
                return replace_static_member(group, &old_id, params, now_ms, &mut self.effects);
            }
            if !group.accepts_protocols(&protocol_type, &params.protocols) {
                return Err(ResponseError::InconsistentGroupProtocol);
            }
            if group.member_count() >= max_members {
                return Err(ResponseError::GroupMaxSizeReached);
            }
            if instance_id.is_none() && pending.version >= 4 {
                // KIP-394: hand out the id and let the client come back with it, so that a
                // client that never gets this answer leaves no member behind.
                group
                    .pending_members
                    .insert(new_id.clone(), now_ms + i64::from(session_timeout_ms));
                self.effects.push(join_error(
                    pending,
                    &new_id,
                    ResponseError::MemberIdRequired,
                ));
                return Ok(());
            }
            params.member_id = new_id;
            add_new_member(group, params, delay_ms, now_ms, &mut self.effects);
            return Ok(());
        }

        let delay_ms = self.config.initial_rebalance_delay_ms;
        let max_members = self.config.max_group_members;
        let group = self.groups.get_mut(group_id).expect("present");
        if group.pending_members.contains_key(&member_id) {
            if !group.accepts_protocols(&protocol_type, &params.protocols) {
                return Err(ResponseError::InconsistentGroupProtocol);
            }
            if group.members.len() >= max_members {
                return Err(ResponseError::GroupMaxSizeReached);
            }
            group.pending_members.remove(&member_id);
            add_new_member(group, params, delay_ms, now_ms, &mut self.effects);
            return Ok(());
        }
        check_member(group, &member_id, instance_id.as_deref())?;
        if group.state == GroupState::Empty {
            return Err(ResponseError::UnknownMemberId);
        }
        if group.protocol_type.as_deref() != Some(protocol_type.as_str())
            || !group.can_update_protocols(&member_id, &params.protocols)
        {
            return Err(ResponseError::InconsistentGroupProtocol);
        }
        group.rejoin(params, now_ms, &mut self.effects);
        Ok(())
    }

    // ---------------------------------------------------------------- SyncGroup

    /// SyncGroup. The answer comes out as an [`Effect::Sync`] for `reply`: at once, or when the
    /// leader's assignment arrives.
    pub fn sync_group(
        &mut self,
        reply: ReplyId,
        version: i16,
        req: &SyncGroupRequest,
        now_ms: i64,
    ) {
        let pending = PendingReply { reply, version };
        if let Err(e) = self.try_sync(pending, req, now_ms) {
            self.effects.push(sync_error(pending, e));
        }
    }

    fn try_sync(
        &mut self,
        pending: PendingReply,
        req: &SyncGroupRequest,
        now_ms: i64,
    ) -> Result<(), ResponseError> {
        let group_id = req.group_id.as_str();
        self.check_group(group_id, false)?;
        let group = self
            .groups
            .get_mut(group_id)
            .ok_or(ResponseError::UnknownMemberId)?;
        let member_id = req.member_id.as_str();
        check_member(group, member_id, req.group_instance_id.as_deref())?;
        if req.generation_id != group.generation {
            return Err(ResponseError::IllegalGeneration);
        }
        if req
            .protocol_type
            .as_ref()
            .is_some_and(|t| Some(t.as_str()) != group.protocol_type.as_deref())
            || req
                .protocol_name
                .as_ref()
                .is_some_and(|n| Some(n.as_str()) != group.protocol.as_deref())
        {
            return Err(ResponseError::InconsistentGroupProtocol);
        }
        match group.state {
            GroupState::Empty | GroupState::Dead => Err(ResponseError::UnknownMemberId),
            GroupState::PreparingRebalance => Err(ResponseError::RebalanceInProgress),
            GroupState::CompletingRebalance => {
                let member = group.members.get_mut(member_id).expect("checked");
                if let Some(old) = member.awaiting_sync.replace(pending) {
                    self.effects
                        .push(sync_error(old, ResponseError::RebalanceInProgress));
                }
                if group.leader.as_deref() == Some(member_id) {
                    let assignments: BTreeMap<String, Bytes> = req
                        .assignments
                        .iter()
                        .filter(|a| group.members.contains_key(a.member_id.as_str()))
                        .map(|a| (a.member_id.to_string(), a.assignment.clone()))
                        .collect();
                    group.complete_sync(assignments, now_ms, &mut self.effects);
                }
                Ok(())
            }
            GroupState::Stable => {
                let member = group.members.get_mut(member_id).expect("checked");
                member.session_deadline_ms = now_ms + i64::from(member.session_timeout_ms);
                self.effects.push(Effect::Sync {
                    reply: pending.reply,
                    response: kafka_protocol::messages::SyncGroupResponse::default()
                        .with_protocol_type(group.protocol_type.as_deref().map(str_bytes))
                        .with_protocol_name(group.protocol.as_deref().map(str_bytes))
                        .with_assignment(member.assignment.clone()),
                });
                Ok(())
            }
        }
    }

    // ---------------------------------------------------------------- Heartbeat, LeaveGroup

    pub fn heartbeat(&mut self, req: &HeartbeatRequest, now_ms: i64) -> HeartbeatResponse {
        let error = match self.try_heartbeat(req, now_ms) {
            Ok(()) => 0,
            Err(e) => e.code(),
        };
        HeartbeatResponse::default().with_error_code(error)
    }

    fn try_heartbeat(&mut self, req: &HeartbeatRequest, now_ms: i64) -> Result<(), ResponseError> {
        let group_id = req.group_id.as_str();
        self.check_group(group_id, false)?;
        let group = self
            .groups
            .get_mut(group_id)
            .ok_or(ResponseError::UnknownMemberId)?;
        if matches!(group.state, GroupState::Empty | GroupState::Dead) {
            return Err(ResponseError::UnknownMemberId);
        }
        let member_id = req.member_id.as_str();
        check_member(group, member_id, req.group_instance_id.as_deref())?;
        if req.generation_id != group.generation {
            return Err(ResponseError::IllegalGeneration);
        }
        let member = group.members.get_mut(member_id).expect("checked");
        member.session_deadline_ms = now_ms + i64::from(member.session_timeout_ms);
        match group.state {
            GroupState::PreparingRebalance => Err(ResponseError::RebalanceInProgress),
            _ => Ok(()),
        }
    }

    pub fn leave_group(
        &mut self,
        version: i16,
        req: &LeaveGroupRequest,
        now_ms: i64,
    ) -> LeaveGroupResponse {
        let identities: Vec<(String, Option<String>)> = if version <= 2 {
            vec![(req.member_id.to_string(), None)]
        } else {
            req.members
                .iter()
                .map(|m| {
                    (
                        m.member_id.to_string(),
                        m.group_instance_id.as_ref().map(|i| i.to_string()),
                    )
                })
                .collect()
        };
        let group_id = req.group_id.as_str();
        let mut results: Vec<(String, Option<String>, Option<ResponseError>)> = Vec::new();
        let top_error = match self.check_group(group_id, false) {
            Err(e) => Some(e),
            Ok(_) => {
                match self.groups.get_mut(group_id) {
                    None => {
                        for (m, i) in identities {
                            results.push((m, i, Some(ResponseError::UnknownMemberId)));
                        }
                    }
                    Some(group) => {
                        for (m, i) in identities {
                            let e = leave_one(group, &m, i.as_deref(), now_ms, &mut self.effects);
                            results.push((m, i, e));
                        }
                    }
                }
                None
            }
        };
        let mut response = LeaveGroupResponse::default();
        if version <= 2 {
            let e = top_error.or_else(|| results.first().and_then(|r| r.2));
            response.error_code = e.map_or(0, |e| e.code());
        } else {
            response.error_code = top_error.map_or(0, |e| e.code());
            if top_error.is_none() {
                response.members = results
                    .into_iter()
                    .map(|(m, i, e)| {
                        MemberResponse::default()
                            .with_member_id(str_bytes(&m))
                            .with_group_instance_id(i.as_deref().map(str_bytes))
                            .with_error_code(e.map_or(0, |e| e.code()))
                    })
                    .collect();
            }
        }
        response
    }

    // ---------------------------------------------------------------- offsets

    /// OffsetCommit: validates and returns the records to persist. Offsets become visible only
    /// in [`Self::finish_offset_commit`], once they are durable. `partition_exists` answers from
    /// the topic metadata: like Kafka, a commit for a partition that does not exist is refused
    /// with UNKNOWN_TOPIC_OR_PARTITION rather than stored.
    pub fn offset_commit(
        &mut self,
        version: i16,
        req: &OffsetCommitRequest,
        now_ms: i64,
        partition_exists: &dyn Fn(&str, i32) -> bool,
    ) -> OffsetCommitOutcome {
        let group_id = req.group_id.as_str();
        let partition = self.partition_for(group_id);
        let group_error = self.check_commit(req, now_ms).err();
        let mut records = Vec::new();
        let mut topics = Vec::with_capacity(req.topics.len());
        for t in &req.topics {
            let name = t.name.as_str();
            let mut partitions = Vec::with_capacity(t.partitions.len());
            for p in &t.partitions {
                let metadata = p.committed_metadata.as_deref().unwrap_or("");
                let error = if let Some(e) = group_error {
                    Some(e)
                } else if name.is_empty()
                    || name.len() > MAX_TOPIC_NAME_BYTES
                    || p.partition_index < 0
                    || !partition_exists(name, p.partition_index)
                {
                    Some(ResponseError::UnknownTopicOrPartition)
                } else if metadata.len() > self.config.offset_metadata_max_bytes {
                    Some(ResponseError::OffsetMetadataTooLarge)
                } else {
                    None
                };
                if error.is_none() {
                    records.push(OffsetsRecord::Offset {
                        group_id: group_id.to_owned(),
                        topic: name.to_owned(),
                        partition: p.partition_index,
                        value: Some(OffsetValue {
                            offset: p.committed_offset,
                            leader_epoch: if version >= 6 {
                                p.committed_leader_epoch
                            } else {
                                -1
                            },
                            metadata: metadata.to_owned(),
                            commit_timestamp_ms: now_ms,
                        }),
                    });
                }
                partitions.push(
                    OffsetCommitResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(error.map_or(0, |e| e.code())),
                );
            }
            topics.push(
                OffsetCommitResponseTopic::default()
                    .with_name(t.name.clone())
                    .with_partitions(partitions),
            );
        }
        OffsetCommitOutcome {
            partition,
            records,
            response: OffsetCommitResponse::default().with_topics(topics),
        }
    }

    fn check_commit(
        &mut self,
        req: &OffsetCommitRequest,
        now_ms: i64,
    ) -> Result<(), ResponseError> {
        let group_id = req.group_id.as_str();
        let partition = self.check_group(group_id, true)?;
        let generation = req.generation_id_or_member_epoch;
        let Some(group) = self.groups.get_mut(group_id) else {
            if generation >= 0 {
                return Err(ResponseError::IllegalGeneration);
            }
            // A group that only stores offsets (no membership): created by its first commit.
            if self.groups.len() >= self.config.max_groups {
                return Err(ResponseError::CoordinatorNotAvailable);
            }
            self.groups.insert(
                group_id.to_owned(),
                Group::new(group_id.to_owned(), partition, now_ms),
            );
            return Ok(());
        };
        if let Some(instance) = req.group_instance_id.as_deref() {
            if group
                .static_members
                .get(instance)
                .is_some_and(|id| id != req.member_id.as_str())
            {
                return Err(ResponseError::FencedInstanceId);
            }
        }
        if generation < 0 && group.state == GroupState::Empty {
            return Ok(());
        }
        if group.state == GroupState::CompletingRebalance {
            return Err(ResponseError::RebalanceInProgress);
        }
        let Some(member) = group.members.get_mut(req.member_id.as_str()) else {
            return Err(ResponseError::UnknownMemberId);
        };
        if generation != group.generation {
            return Err(ResponseError::IllegalGeneration);
        }
        // A commit shows the member is alive, like a heartbeat.
        member.session_deadline_ms = now_ms + i64::from(member.session_timeout_ms);
        Ok(())
    }

    /// Completes an OffsetCommit once its records are durable (`Ok`) or failed to persist
    /// (`Err`: every partition that was going to succeed gets that error instead).
    pub fn finish_offset_commit(
        &mut self,
        outcome: OffsetCommitOutcome,
        written: Result<(), ResponseError>,
    ) -> OffsetCommitResponse {
        let OffsetCommitOutcome {
            partition,
            records,
            mut response,
        } = outcome;
        match written {
            Ok(()) if self.is_loaded(partition) => {
                for record in records {
                    let OffsetsRecord::Offset {
                        group_id,
                        topic,
                        partition: p,
                        value: Some(value),
                    } = record
                    else {
                        unreachable!("commits only produce offset values")
                    };
                    let group = self.groups.entry(group_id.clone()).or_insert_with(|| {
                        Group::new(group_id, partition, value.commit_timestamp_ms)
                    });
                    group.offsets.insert((topic, p), value);
                }
            }
            Ok(()) => {
                // The partition moved away while the write was in flight.
                set_ok_partitions(&mut response, ResponseError::NotCoordinator);
            }
            Err(e) => set_ok_partitions(&mut response, e),
        }
        response
    }

    /// One group's committed offsets: all of them when `topics` is `None`.
    pub fn fetch_offsets(
        &self,
        group_id: &str,
        topics: Option<&[(String, Vec<i32>)]>,
    ) -> GroupOffsets {
        let mut result = GroupOffsets {
            group_id: group_id.to_owned(),
            error: None,
            topics: BTreeMap::new(),
        };
        if let Err(e) = self.check_group(group_id, true) {
            result.error = Some(e);
            // Versions without a group-level error code report it per requested partition.
            for (t, ps) in topics.unwrap_or_default() {
                result.topics.insert(
                    t.clone(),
                    ps.iter().map(|p| (*p, -1, -1, String::new())).collect(),
                );
            }
            return result;
        }
        let group = self.groups.get(group_id);
        match topics {
            Some(topics) => {
                for (t, ps) in topics {
                    let entry = result.topics.entry(t.clone()).or_default();
                    for p in ps {
                        let committed = group.and_then(|g| g.offsets.get(&(t.clone(), *p)));
                        entry.push(match committed {
                            Some(v) => (*p, v.offset, v.leader_epoch, v.metadata.clone()),
                            None => (*p, -1, -1, String::new()),
                        });
                    }
                }
            }
            None => {
                if let Some(g) = group {
                    for ((t, p), v) in &g.offsets {
                        result.topics.entry(t.clone()).or_default().push((
                            *p,
                            v.offset,
                            v.leader_epoch,
                            v.metadata.clone(),
                        ));
                    }
                }
            }
        }
        result
    }

    /// Every committed offset of the groups this coordinator owns: (group, topic, partition,
    /// offset), for the metrics scrape.
    pub fn committed_offsets(&self) -> Vec<(String, String, i32, i64)> {
        let mut out = Vec::new();
        for (id, g) in &self.groups {
            for ((t, p), v) in &g.offsets {
                out.push((id.clone(), t.clone(), *p, v.offset));
            }
        }
        out
    }

    /// OffsetDelete (v0): removes committed offsets of topics the group no longer consumes.
    pub fn offset_delete(
        &mut self,
        req: &OffsetDeleteRequest,
        now_ms: i64,
    ) -> OffsetDeleteResponse {
        let group_id = req.group_id.as_str();
        let top = |e: ResponseError| OffsetDeleteResponse::default().with_error_code(e.code());
        let partition = match self.check_group(group_id, false) {
            Ok(p) => p,
            Err(e) => return top(e),
        };
        let Some(group) = self.groups.get_mut(group_id) else {
            return top(ResponseError::GroupIdNotFound);
        };
        let subscribed: Option<Vec<String>> = match group.state {
            GroupState::Empty => Some(Vec::new()),
            _ if group.protocol_type.as_deref() == Some(CONSUMER_PROTOCOL_TYPE) => {
                subscribed_topics(group)
            }
            _ => return top(ResponseError::NonEmptyGroup),
        };
        let mut tombstones = Vec::new();
        let mut topics = Vec::with_capacity(req.topics.len());
        for t in &req.topics {
            let name = t.name.as_str();
            // Undecodable subscriptions count as subscribed to everything: refuse rather than
            // delete offsets a member may be using.
            let in_use = subscribed
                .as_ref()
                .is_none_or(|s| s.iter().any(|s| s == name));
            let partitions = t
                .partitions
                .iter()
                .map(|p| {
                    let error = if in_use {
                        ResponseError::GroupSubscribedToTopic.code()
                    } else {
                        let key = (name.to_owned(), p.partition_index);
                        if group.offsets.remove(&key).is_some() {
                            tombstones.push(OffsetsRecord::Offset {
                                group_id: group_id.to_owned(),
                                topic: key.0,
                                partition: key.1,
                                value: None,
                            });
                        }
                        0
                    };
                    OffsetDeleteResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(error)
                })
                .collect();
            topics.push(
                OffsetDeleteResponseTopic::default()
                    .with_name(t.name.clone())
                    .with_partitions(partitions),
            );
        }
        if !tombstones.is_empty() {
            self.effects.push(Effect::Persist {
                partition,
                records: tombstones,
            });
        }
        let _ = now_ms;
        OffsetDeleteResponse::default().with_topics(topics)
    }

    // ---------------------------------------------------------------- admin

    pub fn describe_group(&self, version: i16, group_id: &str) -> DescribedGroup {
        let mut described = DescribedGroup::default().with_group_id(GroupId(str_bytes(group_id)));
        if let Err(e) = self.check_group(group_id, true) {
            return described.with_error_code(e.code());
        }
        let Some(group) = self.groups.get(group_id) else {
            // Kafka reports an unknown group as Dead; v6 (KIP-1043) as GROUP_ID_NOT_FOUND.
            described.group_state = str_bytes(GroupState::Dead.name());
            if version >= 6 {
                described.error_code = ResponseError::GroupIdNotFound.code();
                described.error_message = Some(str_bytes("group not found"));
            }
            return described;
        };
        described.group_state = str_bytes(group.state.name());
        described.protocol_type = str_bytes(group.protocol_type.as_deref().unwrap_or(""));
        let stable = group.state == GroupState::Stable;
        let protocol = group.protocol.clone().unwrap_or_default();
        if stable {
            described.protocol_data = str_bytes(&protocol);
        }
        described.members = group
            .members
            .values()
            .map(|m| {
                let mut d = DescribedGroupMember::default()
                    .with_member_id(str_bytes(&m.member_id))
                    .with_client_id(str_bytes(&m.client_id))
                    .with_client_host(str_bytes(&m.client_host));
                if version >= 4 {
                    d.group_instance_id = m.group_instance_id.as_deref().map(str_bytes);
                }
                // Metadata and assignment are only meaningful once the group is stable.
                if stable {
                    d.member_metadata = m
                        .protocols
                        .iter()
                        .find(|(n, _)| *n == protocol)
                        .map(|(_, b)| b.clone())
                        .unwrap_or_default();
                    d.member_assignment = m.assignment.clone();
                }
                d
            })
            .collect();
        described
    }

    /// The groups of every loaded partition; the error is COORDINATOR_LOAD_IN_PROGRESS while
    /// any partition is still loading.
    pub fn list_groups(
        &self,
        states_filter: &[String],
        types_filter: &[String],
    ) -> (i16, Vec<ListedGroup>) {
        let error = if self.partitions.values().any(|s| *s == LoadState::Loading) {
            ResponseError::CoordinatorLoadInProgress.code()
        } else {
            0
        };
        if !types_filter.is_empty()
            && !types_filter
                .iter()
                .any(|t| t.eq_ignore_ascii_case(CLASSIC_GROUP_TYPE))
        {
            return (error, Vec::new());
        }
        let mut groups: Vec<ListedGroup> = self
            .groups
            .values()
            .filter(|g| self.is_loaded(g.partition))
            .filter(|g| {
                states_filter.is_empty()
                    || states_filter
                        .iter()
                        .any(|s| s.eq_ignore_ascii_case(g.state.name()))
            })
            .map(|g| {
                ListedGroup::default()
                    .with_group_id(GroupId(str_bytes(&g.group_id)))
                    .with_protocol_type(str_bytes(g.protocol_type.as_deref().unwrap_or("")))
                    .with_group_state(str_bytes(g.state.name()))
                    .with_group_type(str_bytes(CLASSIC_GROUP_TYPE))
            })
            .collect();
        groups.sort_by(|a, b| a.group_id.cmp(&b.group_id));
        (error, groups)
    }

    /// DeleteGroups for one group: only a group without members can go; its offsets and
    /// metadata get tombstones.
    pub fn delete_group(&mut self, group_id: &str) -> DeletableGroupResult {
        let result = DeletableGroupResult::default().with_group_id(GroupId(str_bytes(group_id)));
        let partition = match self.check_group(group_id, true) {
            Ok(p) => p,
            Err(e) => return result.with_error_code(e.code()),
        };
        let Some(group) = self.groups.get(group_id) else {
            return result.with_error_code(ResponseError::GroupIdNotFound.code());
        };
        if !group.is_empty_of_members() {
            return result.with_error_code(ResponseError::NonEmptyGroup.code());
        }
        let mut group = self.groups.remove(group_id).expect("present");
        group.transition(GroupState::Dead, 0);
        self.effects.push(Effect::Persist {
            partition,
            records: tombstones_of(&group),
        });
        tracing::info!(group = %group_id, "group deleted");
        result
    }

    // ---------------------------------------------------------------- time

    /// Advances time: expires sessions and pending member ids, ends overdue rebalances, and
    /// (every `offsets_retention_check_interval_ms`) expires offsets of long-empty groups.
    pub fn tick(&mut self, now_ms: i64) {
        let mut ids: Vec<&String> = self.groups.keys().collect();
        ids.sort();
        let ids: Vec<String> = ids.into_iter().cloned().collect();
        for id in &ids {
            let group = self.groups.get_mut(id).expect("listed");
            if self.partitions.get(&group.partition) == Some(&LoadState::Loaded) {
                group.tick(now_ms, &mut self.effects);
            }
        }
        if now_ms >= self.next_retention_check_ms {
            self.next_retention_check_ms = now_ms + self.config.offsets_retention_check_interval_ms;
            self.expire_offsets(now_ms, &ids);
        }
    }

    fn expire_offsets(&mut self, now_ms: i64, ids: &[String]) {
        let retention = self.config.offsets_retention_ms;
        for id in ids {
            let Some(group) = self.groups.get_mut(id) else {
                continue;
            };
            if group.state != GroupState::Empty
                || self.partitions.get(&group.partition) != Some(&LoadState::Loaded)
            {
                continue;
            }
            let empty_since = group.state_since_ms;
            let expired: Vec<(String, i32)> = group
                .offsets
                .iter()
                .filter(|(_, v)| v.commit_timestamp_ms.max(empty_since) + retention <= now_ms)
                .map(|(k, _)| k.clone())
                .collect();
            let mut records: Vec<OffsetsRecord> = expired
                .into_iter()
                .map(|(topic, p)| {
                    group.offsets.remove(&(topic.clone(), p));
                    OffsetsRecord::Offset {
                        group_id: id.clone(),
                        topic,
                        partition: p,
                        value: None,
                    }
                })
                .collect();
            let partition = group.partition;
            let remove_group = group.offsets.is_empty()
                && group.is_empty_of_members()
                && empty_since + retention <= now_ms;
            if remove_group {
                records.push(OffsetsRecord::Group {
                    group_id: id.clone(),
                    value: None,
                });
                self.groups.remove(id);
                tracing::info!(group = %id, "empty group expired");
            }
            if !records.is_empty() {
                self.effects.push(Effect::Persist { partition, records });
            }
        }
    }
}

/// Shapes per-group offsets as an OffsetFetch response of `version`.
pub fn offset_fetch_response(version: i16, groups: Vec<GroupOffsets>) -> OffsetFetchResponse {
    let mut response = OffsetFetchResponse::default();
    if version >= 8 {
        response.groups = groups
            .into_iter()
            .map(|g| {
                let error = g.error.map_or(0, |e| e.code());
                let topics = if g.error.is_some() {
                    Vec::new()
                } else {
                    g.topics
                        .into_iter()
                        .map(|(t, ps)| {
                            OffsetFetchResponseTopics::default()
                                .with_name(TopicName(str_bytes(&t)))
                                .with_partitions(
                                    ps.into_iter()
                                        .map(|(p, o, e, m)| {
                                            OffsetFetchResponsePartitions::default()
                                                .with_partition_index(p)
                                                .with_committed_offset(o)
                                                .with_committed_leader_epoch(e)
                                                .with_metadata(Some(str_bytes(&m)))
                                        })
                                        .collect(),
                                )
                        })
                        .collect()
                };
                OffsetFetchResponseGroup::default()
                    .with_group_id(GroupId(str_bytes(&g.group_id)))
                    .with_error_code(error)
                    .with_topics(topics)
            })
            .collect();
        return response;
    }
    let Some(g) = groups.into_iter().next() else {
        return response;
    };
    let error = g.error.map_or(0, |e| e.code());
    if version >= 2 {
        response.error_code = error;
        if error != 0 {
            return response;
        }
    }
    response.topics = g
        .topics
        .into_iter()
        .map(|(t, ps)| {
            OffsetFetchResponseTopic::default()
                .with_name(TopicName(str_bytes(&t)))
                .with_partitions(
                    ps.into_iter()
                        .map(|(p, o, e, m)| {
                            OffsetFetchResponsePartition::default()
                                .with_partition_index(p)
                                .with_committed_offset(o)
                                .with_committed_leader_epoch(e)
                                .with_metadata(Some(str_bytes(&m)))
                                .with_error_code(error)
                        })
                        .collect(),
                )
        })
        .collect();
    response
}

/// FindCoordinator answered by this node for group keys (v0-3: one key; v4+: batched keys).
/// Other key types (transactions) get COORDINATOR_NOT_AVAILABLE until transactions exist; a
/// node whose offsets partitions are not all loaded says so with COORDINATOR_NOT_AVAILABLE.
pub fn find_coordinator_response(
    version: i16,
    req: &FindCoordinatorRequest,
    locate: impl Fn(&str) -> Option<crate::leader_hint::Endpoint>,
) -> FindCoordinatorResponse {
    let answer = |key: &str| -> (i16, i32, String, i32) {
        if req.key_type != 0 {
            (
                ResponseError::CoordinatorNotAvailable.code(),
                -1,
                String::new(),
                -1,
            )
        } else if key.len() > MAX_STRING_BYTES {
            (ResponseError::InvalidGroupId.code(), -1, String::new(), -1)
        } else {
            match locate(key) {
                Some(e) => (0, e.node_id, e.host, i32::from(e.port)),
                None => (
                    ResponseError::CoordinatorNotAvailable.code(),
                    -1,
                    String::new(),
                    -1,
                ),
            }
        }
    };
    let mut response = FindCoordinatorResponse::default();
    if version >= 4 {
        response.coordinators = req
            .coordinator_keys
            .iter()
            .map(|k| {
                let (error, node, host, port) = answer(k.as_str());
                Coordinator::default()
                    .with_key(k.clone())
                    .with_node_id(BrokerId(node))
                    .with_host(str_bytes(&host))
                    .with_port(port)
                    .with_error_code(error)
            })
            .collect();
    } else {
        let (error, node, host, port) = answer(req.key.as_str());
        response.error_code = error;
        response.node_id = BrokerId(node);
        response.host = str_bytes(&host);
        response.port = port;
        if version >= 1 && error != 0 {
            response.error_message = Some(str_bytes("the coordinator is not available"));
        }
    }
    response
}

/// Which topic names a consumer group's members subscribe to; `None` when a member's
/// subscription cannot be decoded.
fn subscribed_topics(group: &Group) -> Option<Vec<String>> {
    let protocol = group.protocol.as_deref()?;
    let mut topics = Vec::new();
    for member in group.members.values() {
        let meta = member
            .protocols
            .iter()
            .find(|(n, _)| n == protocol)
            .map(|(_, m)| m.clone())?;
        let mut buf = meta;
        if buf.remaining() < 2 {
            return None;
        }
        let v = buf.get_i16().clamp(
            ConsumerProtocolSubscription::VERSIONS.min,
            ConsumerProtocolSubscription::VERSIONS.max,
        );
        let sub = ConsumerProtocolSubscription::decode(&mut buf, v).ok()?;
        topics.extend(sub.topics.iter().map(|t| t.to_string()));
    }
    Some(topics)
}

fn tombstones_of(group: &Group) -> Vec<OffsetsRecord> {
    let mut records: Vec<OffsetsRecord> = group
        .offsets
        .keys()
        .map(|(t, p)| OffsetsRecord::Offset {
            group_id: group.group_id.clone(),
            topic: t.clone(),
            partition: *p,
            value: None,
        })
        .collect();
    records.push(OffsetsRecord::Group {
        group_id: group.group_id.clone(),
        value: None,
    });
    records
}

fn set_ok_partitions(response: &mut OffsetCommitResponse, error: ResponseError) {
    for t in &mut response.topics {
        for p in &mut t.partitions {
            if p.error_code == 0 {
                p.error_code = error.code();
            }
        }
    }
}

/// A member id (and instance id, for static members) must name a current member.
fn check_member(
    group: &Group,
    member_id: &str,
    instance_id: Option<&str>,
) -> Result<(), ResponseError> {
    if let Some(instance) = instance_id {
        match group.static_members.get(instance) {
            Some(id) if id != member_id => return Err(ResponseError::FencedInstanceId),
            Some(_) => {}
            None => return Err(ResponseError::UnknownMemberId),
        }
    }
    match group.members.get(member_id) {
        None => Err(ResponseError::UnknownMemberId),
        Some(m) if m.group_instance_id.as_deref() != instance_id && instance_id.is_some() => {
            Err(ResponseError::FencedInstanceId)
        }
        Some(_) => Ok(()),
    }
}

fn add_new_member(
    group: &mut Group,
    params: JoinParams,
    initial_delay_ms: i64,
    now_ms: i64,
    out: &mut Vec<Effect>,
) {
    let member = Member {
        member_id: params.member_id,
        group_instance_id: params.group_instance_id,
        client_id: params.client_id,
        client_host: params.client_host,
        rebalance_timeout_ms: params.rebalance_timeout_ms,
        session_timeout_ms: params.session_timeout_ms,
        protocol_type: params.protocol_type,
        protocols: params.protocols,
        assignment: Bytes::new(),
        awaiting_join: Some(params.reply),
        awaiting_sync: None,
        session_deadline_ms: now_ms,
    };
    tracing::info!(group = %group.group_id, member = %member.member_id, "member joins");
    group.add_member(member, now_ms, out);
    group.extend_initial_delay(initial_delay_ms, now_ms);
    group.maybe_complete_join(now_ms, out);
}

/// A static member restarted (same group.instance.id, new member id): the new id takes over
/// the old member's place and assignment; the old id is fenced.
fn replace_static_member(
    group: &mut Group,
    old_id: &str,
    params: JoinParams,
    now_ms: i64,
    out: &mut Vec<Effect>,
) -> Result<(), ResponseError> {
    if group.protocol_type.as_deref() != Some(params.protocol_type.as_str())
        || !group.can_update_protocols(old_id, &params.protocols)
    {
        return Err(ResponseError::InconsistentGroupProtocol);
    }
    let mut member = group
        .members
        .remove(old_id)
        .expect("static member is a member");
    if let Some(reply) = member.awaiting_join.take() {
        out.push(join_error(reply, old_id, ResponseError::FencedInstanceId));
    }
    if let Some(reply) = member.awaiting_sync.take() {
        out.push(sync_error(reply, ResponseError::FencedInstanceId));
    }
    let new_id = params.member_id.clone();
    member.member_id = new_id.clone();
    group.members.insert(new_id.clone(), member);
    if let Some(instance) = &params.group_instance_id {
        group
            .static_members
            .insert(instance.clone(), new_id.clone());
    }
    if group.leader.as_deref() == Some(old_id) {
        group.leader = Some(new_id.clone());
    }
    tracing::info!(group = %group.group_id, old = %old_id, new = %new_id, "static member rejoins with a new member id");
    let version = params.reply.version;
    let reply = params.reply.reply;
    // As Kafka: a returning static member of a stable group only causes a rebalance if its
    // protocols would change the group's protocol (its subscription bytes may differ, e.g.
    // in owned partitions, without that).
    let keeps_protocol = group.state == GroupState::Stable && {
        let member = group.members.get_mut(&new_id).expect("inserted");
        member.protocols = params.protocols.clone();
        group.select_protocol() == group.protocol
    };
    match group.state {
        GroupState::Stable if keeps_protocol => {
            let member = group.members.get_mut(&new_id).expect("inserted");
            member.client_id = params.client_id;
            member.client_host = params.client_host;
            member.session_timeout_ms = params.session_timeout_ms;
            member.rebalance_timeout_ms = params.rebalance_timeout_ms;
            member.session_deadline_ms = now_ms + i64::from(params.session_timeout_ms);
            let is_leader = group.leader.as_deref() == Some(new_id.as_str());
            let mut response = group.current_join_response(&new_id, version);
            // KIP-814: a returning static leader must not recompute the assignment.
            if version >= 9 {
                response.skip_assignment = is_leader;
            }
            out.push(group.metadata_record());
            out.push(Effect::Join { reply, response });
        }
        _ => {
            group.update_member(params, now_ms, out);
            group.prepare_rebalance(now_ms, out);
            group.maybe_complete_join(now_ms, out);
        }
    }
    Ok(())
}

/// Removes one member named in a LeaveGroup; `None` when it left.
fn leave_one(
    group: &mut Group,
    member_id: &str,
    instance_id: Option<&str>,
    now_ms: i64,
    out: &mut Vec<Effect>,
) -> Option<ResponseError> {
    let target = match instance_id {
        Some(instance) => match group.static_members.get(instance) {
            None => return Some(ResponseError::UnknownMemberId),
            Some(id) if !member_id.is_empty() && id != member_id => {
                return Some(ResponseError::FencedInstanceId)
            }
            Some(id) => id.clone(),
        },
        None => {
            if group.pending_members.remove(member_id).is_some() {
                group.maybe_complete_join(now_ms, out);
                return None;
            }
            member_id.to_owned()
        }
    };
    if !group.members.contains_key(&target) {
        return Some(ResponseError::UnknownMemberId);
    }
    tracing::info!(group = %group.group_id, member = %target, "member leaves");
    group.remove_member(&target, now_ms, out);
    None
}

/// The name of the internal topic, for callers that filter it out of user-visible listings.
pub fn is_offsets_topic(topic: &str) -> bool {
    topic == OFFSETS_TOPIC
}
