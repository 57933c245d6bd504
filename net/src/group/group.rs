//! One consumer group: members, generations and the classic rebalance state machine.
//!
//! The state machine follows Kafka's classic group coordinator:
//!
//! ```text
//!   Empty ──join──▶ PreparingRebalance ──all joined / timeout──▶ CompletingRebalance
//!     ▲                 ▲        │                                   │ leader's SyncGroup
//!     │                 │        └──no member left──▶ Empty          ▼
//!     └──last leaves────┴──────── join / leave / expiry ◀──────── Stable
//! ```
//!
//! `Dead` is a group that was deleted (or whose partition was unloaded); it is removed from the
//! coordinator at once, so a `Dead` group is only ever seen by the code that kills it.

use std::collections::BTreeMap;

use bytes::Bytes;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::join_group_response::{JoinGroupResponse, JoinGroupResponseMember};
use kafka_protocol::messages::sync_group_response::SyncGroupResponse;
use kafka_protocol::protocol::StrBytes;

use super::records::{GroupMetadataValue, MemberMetadata, OffsetValue, OffsetsRecord};
use super::{Effect, PendingReply};

/// The classic group states, named as DescribeGroups and ListGroups report them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
    Dead,
}

impl GroupState {
    pub fn name(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
            GroupState::Dead => "Dead",
        }
    }

    /// Which state may follow which, as in Kafka's `GroupState.validPreviousStates`.
    fn may_follow(self, previous: GroupState) -> bool {
        use GroupState::*;
        match self {
            Empty => matches!(previous, PreparingRebalance | Empty),
            PreparingRebalance => matches!(previous, Stable | CompletingRebalance | Empty),
            CompletingRebalance => previous == PreparingRebalance,
            Stable => previous == CompletingRebalance,
            Dead => true,
        }
    }
}

/// A joined member.
#[derive(Clone, Debug)]
pub struct Member {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub rebalance_timeout_ms: i32,
    pub session_timeout_ms: i32,
    pub protocol_type: String,
    /// Supported protocols with their metadata, in the member's order of preference.
    pub protocols: Vec<(String, Bytes)>,
    pub assignment: Bytes,
    /// A JoinGroup waiting for the rebalance to complete.
    pub awaiting_join: Option<PendingReply>,
    /// A SyncGroup waiting for the leader's assignment.
    pub awaiting_sync: Option<PendingReply>,
    /// When the member expires unless it heartbeats (ignored while a reply is pending).
    pub session_deadline_ms: i64,
}

impl Member {
    fn metadata_for(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(name, _)| name == protocol)
            .map(|(_, meta)| meta.clone())
            .unwrap_or_default()
    }

    pub fn supports(&self, protocol: &str) -> bool {
        self.protocols.iter().any(|(name, _)| name == protocol)
    }

    fn same_protocols(&self, protocols: &[(String, Bytes)]) -> bool {
        self.protocols == protocols
    }

    /// Kept alive by its pending request rather than by heartbeats.
    fn has_pending_reply(&self) -> bool {
        self.awaiting_join.is_some() || self.awaiting_sync.is_some()
    }
}

/// A group and the offsets it committed.
#[derive(Debug)]
pub struct Group {
    pub group_id: String,
    /// Its `__consumer_offsets` partition.
    pub partition: i32,
    pub state: GroupState,
    /// When `state` was entered (drives offset retention of empty groups).
    pub state_since_ms: i64,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub leader: Option<String>,
    pub members: BTreeMap<String, Member>,
    /// Member ids handed out with MEMBER_ID_REQUIRED (KIP-394), with their expiry.
    pub pending_members: BTreeMap<String, i64>,
    /// group.instance.id → member id of static members.
    pub static_members: BTreeMap<String, String>,
    /// The PreparingRebalance phase ends at this time even if members are missing.
    pub rebalance_deadline_ms: i64,
    /// Set while the first rebalance of an empty group waits for more members: the latest time
    /// the wait may be extended to.
    pub initial_join_limit_ms: Option<i64>,
    pub offsets: BTreeMap<(String, i32), OffsetValue>,
}

/// What a JoinGroup asks for, after the coordinator checked its fields.
pub struct JoinParams {
    pub reply: PendingReply,
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
}

impl Group {
    pub fn new(group_id: String, partition: i32, now_ms: i64) -> Self {
        Group {
            group_id,
            partition,
            state: GroupState::Empty,
            state_since_ms: now_ms,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            pending_members: BTreeMap::new(),
            static_members: BTreeMap::new(),
            rebalance_deadline_ms: 0,
            initial_join_limit_ms: None,
            offsets: BTreeMap::new(),
        }
    }

    pub fn transition(&mut self, to: GroupState, now_ms: i64) {
        assert!(
            to.may_follow(self.state),
            "group {}: illegal transition {:?} -> {:?}",
            self.group_id,
            self.state,
            to
        );
        if to != self.state {
            tracing::debug!(group = %self.group_id, from = self.state.name(), to = to.name(), generation = self.generation, "group state");
        }
        self.state = to;
        self.state_since_ms = now_ms;
    }

    pub fn is_empty_of_members(&self) -> bool {
        self.members.is_empty() && self.pending_members.is_empty()
    }

    pub fn member_count(&self) -> usize {
        self.members.len() + self.pending_members.len()
    }

    /// Whether a new member with these protocols may join: same protocol type, and at least one
    /// protocol that every member (and the new one) supports.
    pub fn accepts_protocols(&self, protocol_type: &str, protocols: &[(String, Bytes)]) -> bool {
        if protocol_type.is_empty() || protocols.is_empty() {
            return false;
        }
        if self.members.is_empty() {
            return true;
        }
        if self.protocol_type.as_deref() != Some(protocol_type) {
            return false;
        }
        protocols
            .iter()
            .any(|(name, _)| self.members.values().all(|m| m.supports(name)))
    }

    /// Like [`Self::accepts_protocols`] for an existing member changing its protocols: the others
    /// must still share one with it.
    fn accepts_update(&self, member_id: &str, protocols: &[(String, Bytes)]) -> bool {
        !protocols.is_empty()
            && protocols.iter().any(|(name, _)| {
                self.members
                    .values()
                    .filter(|m| m.member_id != member_id)
                    .all(|m| m.supports(name))
            })
    }

    /// The protocol every member supports with the most first-preference votes (ties go to the
    /// leader's preference order), as Kafka's `selectProtocol`.
    pub fn select_protocol(&self) -> Option<String> {
        let first = self
            .leader_member()
            .or_else(|| self.members.values().next())?;
        let candidates: Vec<&str> = first
            .protocols
            .iter()
            .map(|(name, _)| name.as_str())
            .filter(|name| self.members.values().all(|m| m.supports(name)))
            .collect();
        let mut best: Option<(&str, usize)> = None;
        for candidate in &candidates {
            let votes = self
                .members
                .values()
                .filter(|m| {
                    m.protocols
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .find(|n| candidates.contains(n))
                        == Some(candidate)
                })
                .count();
            if best.is_none_or(|(_, v)| votes > v) {
                best = Some((candidate, votes));
            }
        }
        best.map(|(name, _)| name.to_owned())
    }

    fn leader_member(&self) -> Option<&Member> {
        self.leader.as_ref().and_then(|l| self.members.get(l))
    }

    pub fn add_member(&mut self, mut member: Member, now_ms: i64, out: &mut Vec<Effect>) {
        assert!(
            !self.members.contains_key(&member.member_id),
            "member added twice"
        );
        if self.members.is_empty() {
            self.protocol_type = Some(member.protocol_type.clone());
        }
        if self.leader.is_none() {
            self.leader = Some(member.member_id.clone());
        }
        if let Some(instance) = &member.group_instance_id {
            self.static_members
                .insert(instance.clone(), member.member_id.clone());
        }
        member.session_deadline_ms = now_ms + i64::from(member.session_timeout_ms);
        let id = member.member_id.clone();
        self.members.insert(id, member);
        self.prepare_rebalance(now_ms, out);
    }

    /// Starts (or joins) a rebalance: every member must send JoinGroup again.
    pub fn prepare_rebalance(&mut self, now_ms: i64, out: &mut Vec<Effect>) {
        if self.state == GroupState::CompletingRebalance {
            // The assignment being distributed is void: members waiting for it rejoin.
            for member in self.members.values_mut() {
                member.assignment = Bytes::new();
                if let Some(reply) = member.awaiting_sync.take() {
                    out.push(sync_error(reply, ResponseError::RebalanceInProgress));
                }
            }
        }
        let max_rebalance_ms = self
            .members
            .values()
            .map(|m| i64::from(m.rebalance_timeout_ms))
            .max()
            .unwrap_or(0);
        match self.state {
            GroupState::PreparingRebalance => {}
            GroupState::Empty => {
                self.transition(GroupState::PreparingRebalance, now_ms);
                self.initial_join_limit_ms = Some(now_ms + max_rebalance_ms);
                self.rebalance_deadline_ms = now_ms; // set by extend_initial_delay
            }
            GroupState::Stable | GroupState::CompletingRebalance => {
                self.transition(GroupState::PreparingRebalance, now_ms);
                self.initial_join_limit_ms = None;
                self.rebalance_deadline_ms = now_ms + max_rebalance_ms;
            }
            GroupState::Dead => unreachable!("a dead group is never kept"),
        }
    }

    /// During the initial delayed join, each new member pushes the end of the wait out by
    /// `delay_ms`, but never past the rebalance timeout (Kafka's `InitialDelayedJoin`).
    pub fn extend_initial_delay(&mut self, delay_ms: i64, now_ms: i64) {
        if let Some(limit) = self.initial_join_limit_ms {
            self.rebalance_deadline_ms = (now_ms + delay_ms).min(limit).max(now_ms);
        }
    }

    /// Ends the PreparingRebalance phase if it may end now: all members rejoined (outside the
    /// initial delay), or the deadline passed.
    pub fn maybe_complete_join(&mut self, now_ms: i64, out: &mut Vec<Effect>) {
        if self.state != GroupState::PreparingRebalance {
            return;
        }
        let all_joined = self.pending_members.is_empty()
            && self.members.values().all(|m| m.awaiting_join.is_some());
        let deadline_passed = now_ms >= self.rebalance_deadline_ms;
        let may_end = if self.initial_join_limit_ms.is_some() {
            deadline_passed
        } else {
            all_joined || deadline_passed
        };
        if may_end {
            self.complete_join(now_ms, out);
        }
    }

    fn complete_join(&mut self, now_ms: i64, out: &mut Vec<Effect>) {
        // Dynamic members that did not rejoin in time leave; static members stay (their old
        // subscription still counts) until their session expires.
        let gone: Vec<String> = self
            .members
            .values()
            .filter(|m| m.awaiting_join.is_none() && m.group_instance_id.is_none())
            .map(|m| m.member_id.clone())
            .collect();
        for id in gone {
            tracing::info!(group = %self.group_id, member = %id, "member did not rejoin in time");
            self.remove_member_only(&id, out);
        }
        self.pending_members.clear();
        self.initial_join_limit_ms = None;

        if self.members.is_empty() {
            self.generation += 1;
            self.protocol = None;
            self.protocol_type = None;
            self.leader = None;
            self.transition(GroupState::Empty, now_ms);
            out.push(self.metadata_record());
            return;
        }
        let joined_leader = self
            .leader_member()
            .is_some_and(|m| m.awaiting_join.is_some());
        if !joined_leader {
            match self.members.values().find(|m| m.awaiting_join.is_some()) {
                Some(m) => self.leader = Some(m.member_id.clone()),
                None => {
                    // Only static members that have not rejoined are left: wait for them to
                    // rejoin or for their sessions to expire.
                    let wait = self
                        .members
                        .values()
                        .map(|m| i64::from(m.rebalance_timeout_ms))
                        .max()
                        .unwrap_or(0);
                    self.rebalance_deadline_ms = now_ms + wait.max(1);
                    return;
                }
            }
        }
        self.generation += 1;
        self.protocol = self.select_protocol();
        assert!(
            self.protocol.is_some(),
            "members always share a protocol: joins are checked"
        );
        self.transition(GroupState::CompletingRebalance, now_ms);
        let protocol = self.protocol.clone().unwrap_or_default();
        let leader = self.leader.clone().unwrap_or_default();
        tracing::info!(group = %self.group_id, generation = self.generation, %protocol, %leader, members = self.members.len(), "rebalance: join phase complete");
        let all_members: Vec<JoinGroupResponseMember> = self
            .members
            .values()
            .map(|m| {
                JoinGroupResponseMember::default()
                    .with_member_id(str_bytes(&m.member_id))
                    .with_group_instance_id(m.group_instance_id.as_deref().map(str_bytes))
                    .with_metadata(m.metadata_for(&protocol))
            })
            .collect();
        let generation = self.generation;
        let protocol_type = self.protocol_type.clone();
        for member in self.members.values_mut() {
            member.session_deadline_ms = now_ms + i64::from(member.session_timeout_ms);
            let Some(reply) = member.awaiting_join.take() else {
                continue;
            };
            let members = if member.member_id == leader {
                all_members
                    .iter()
                    .cloned()
                    .map(|m| strip_instance_id(m, reply.version))
                    .collect()
            } else {
                Vec::new()
            };
            let response = JoinGroupResponse::default()
                .with_generation_id(generation)
                .with_protocol_type(protocol_type.as_deref().map(str_bytes))
                .with_protocol_name(Some(str_bytes(&protocol)))
                .with_leader(str_bytes(&leader))
                .with_member_id(str_bytes(&member.member_id))
                .with_members(members);
            out.push(Effect::Join {
                reply: reply.reply,
                response,
            });
        }
    }

    /// A JoinGroup answer for a member of the current generation, without a rebalance.
    pub fn current_join_response(&self, member_id: &str, version: i16) -> JoinGroupResponse {
        let protocol = self.protocol.clone().unwrap_or_default();
        let leader = self.leader.clone().unwrap_or_default();
        let members = if member_id == leader {
            self.members
                .values()
                .map(|m| {
                    strip_instance_id(
                        JoinGroupResponseMember::default()
                            .with_member_id(str_bytes(&m.member_id))
                            .with_group_instance_id(m.group_instance_id.as_deref().map(str_bytes))
                            .with_metadata(m.metadata_for(&protocol)),
                        version,
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        JoinGroupResponse::default()
            .with_generation_id(self.generation)
            .with_protocol_type(self.protocol_type.as_deref().map(str_bytes))
            .with_protocol_name(Some(str_bytes(&protocol)))
            .with_leader(str_bytes(&leader))
            .with_member_id(str_bytes(member_id))
            .with_members(members)
    }

    /// A known member rejoins (state is not Empty).
    pub fn rejoin(&mut self, params: JoinParams, now_ms: i64, out: &mut Vec<Effect>) {
        let id = params.member_id.clone();
        let member = self.members.get(&id).expect("caller checked membership");
        let same = member.same_protocols(&params.protocols);
        let is_leader = self.leader.as_deref() == Some(id.as_str());
        match self.state {
            GroupState::CompletingRebalance | GroupState::Stable
                if same && !(self.state == GroupState::Stable && is_leader) =>
            {
                // Nothing changed: hand back the current generation (a client that lost the
                // JoinGroup response retries like this).
                let response = self.current_join_response(&id, params.reply.version);
                let member = self.members.get_mut(&id).expect("present");
                member.session_deadline_ms = now_ms + i64::from(member.session_timeout_ms);
                out.push(Effect::Join {
                    reply: params.reply.reply,
                    response,
                });
            }
            _ => {
                self.update_member(params, now_ms, out);
                self.prepare_rebalance(now_ms, out);
                self.maybe_complete_join(now_ms, out);
            }
        }
    }

    /// Records a member's new join request (protocols, timeouts, pending reply).
    pub fn update_member(&mut self, params: JoinParams, now_ms: i64, out: &mut Vec<Effect>) {
        let member = self
            .members
            .get_mut(&params.member_id)
            .expect("caller checked membership");
        if let Some(old) = member.awaiting_join.replace(params.reply) {
            // The client gave up on its previous JoinGroup; answer it so no reply is left hanging.
            out.push(join_error(
                old,
                &params.member_id,
                ResponseError::RebalanceInProgress,
            ));
        }
        member.protocols = params.protocols;
        member.protocol_type = params.protocol_type;
        member.session_timeout_ms = params.session_timeout_ms;
        member.rebalance_timeout_ms = params.rebalance_timeout_ms;
        member.client_id = params.client_id;
        member.client_host = params.client_host;
        member.session_deadline_ms = now_ms + i64::from(member.session_timeout_ms);
    }

    pub fn can_update_protocols(&self, member_id: &str, protocols: &[(String, Bytes)]) -> bool {
        self.accepts_update(member_id, protocols)
    }

    /// Removes a member without changing the group state; answers its pending replies.
    fn remove_member_only(&mut self, member_id: &str, out: &mut Vec<Effect>) {
        let Some(member) = self.members.remove(member_id) else {
            return;
        };
        if let Some(reply) = member.awaiting_join {
            out.push(join_error(reply, member_id, ResponseError::UnknownMemberId));
        }
        if let Some(reply) = member.awaiting_sync {
            out.push(sync_error(reply, ResponseError::UnknownMemberId));
        }
        if let Some(instance) = &member.group_instance_id {
            if self.static_members.get(instance).map(String::as_str) == Some(member_id) {
                self.static_members.remove(instance);
            }
        }
        if self.leader.as_deref() == Some(member_id) {
            self.leader = self.members.keys().next().cloned();
        }
    }

    /// A member leaves (LeaveGroup) or expires: the others rebalance.
    pub fn remove_member(&mut self, member_id: &str, now_ms: i64, out: &mut Vec<Effect>) {
        self.remove_member_only(member_id, out);
        match self.state {
            GroupState::Stable | GroupState::CompletingRebalance => {
                self.prepare_rebalance(now_ms, out);
            }
            GroupState::PreparingRebalance => self.maybe_complete_join(now_ms, out),
            GroupState::Empty | GroupState::Dead => {}
        }
        // A rebalance with nobody left ends at once.
        if self.state == GroupState::PreparingRebalance && self.members.is_empty() {
            self.complete_join(now_ms, out);
        }
    }

    /// The leader's SyncGroup: store every assignment and answer everyone waiting.
    pub fn complete_sync(
        &mut self,
        assignments: BTreeMap<String, Bytes>,
        now_ms: i64,
        out: &mut Vec<Effect>,
    ) {
        assert_eq!(self.state, GroupState::CompletingRebalance);
        for member in self.members.values_mut() {
            member.assignment = assignments
                .get(&member.member_id)
                .cloned()
                .unwrap_or_default();
        }
        self.transition(GroupState::Stable, now_ms);
        out.push(self.metadata_record());
        let protocol_type = self.protocol_type.clone();
        let protocol = self.protocol.clone();
        for member in self.members.values_mut() {
            if let Some(reply) = member.awaiting_sync.take() {
                member.session_deadline_ms = now_ms + i64::from(member.session_timeout_ms);
                out.push(Effect::Sync {
                    reply: reply.reply,
                    response: SyncGroupResponse::default()
                        .with_protocol_type(protocol_type.as_deref().map(str_bytes))
                        .with_protocol_name(protocol.as_deref().map(str_bytes))
                        .with_assignment(member.assignment.clone()),
                });
            }
        }
    }

    /// Expires members whose session ran out and ends overdue join phases.
    pub fn tick(&mut self, now_ms: i64, out: &mut Vec<Effect>) {
        let expired_pending: Vec<String> = self
            .pending_members
            .iter()
            .filter(|(_, deadline)| **deadline <= now_ms)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired_pending {
            self.pending_members.remove(&id);
        }
        let expired: Vec<String> = self
            .members
            .values()
            .filter(|m| !m.has_pending_reply() && m.session_deadline_ms <= now_ms)
            .map(|m| m.member_id.clone())
            .collect();
        for id in expired {
            tracing::info!(group = %self.group_id, member = %id, "member session expired");
            self.remove_member(&id, now_ms, out);
        }
        self.maybe_complete_join(now_ms, out);
    }

    /// The group metadata record to persist (a snapshot of members and assignments).
    pub fn metadata_record(&self) -> Effect {
        let protocol = self.protocol.clone().unwrap_or_default();
        let value = GroupMetadataValue {
            protocol_type: self.protocol_type.clone().unwrap_or_default(),
            generation: self.generation,
            protocol: self.protocol.clone(),
            leader: self.leader.clone(),
            state_timestamp_ms: self.state_since_ms,
            members: self
                .members
                .values()
                .map(|m| MemberMetadata {
                    member_id: m.member_id.clone(),
                    group_instance_id: m.group_instance_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    rebalance_timeout_ms: m.rebalance_timeout_ms,
                    session_timeout_ms: m.session_timeout_ms,
                    subscription: m.metadata_for(&protocol),
                    assignment: m.assignment.clone(),
                })
                .collect(),
        };
        Effect::Persist {
            partition: self.partition,
            records: vec![OffsetsRecord::Group {
                group_id: self.group_id.clone(),
                value: Some(value),
            }],
        }
    }

    /// Rebuilds a group from its last metadata record. Members come back as they were; a group
    /// that had members is Stable with fresh session deadlines, so members that still run carry
    /// on with their generation and the others expire.
    pub fn restore(&mut self, value: GroupMetadataValue, now_ms: i64) {
        self.generation = value.generation;
        self.protocol_type = (!value.protocol_type.is_empty()).then_some(value.protocol_type);
        self.protocol = value.protocol;
        self.leader = value.leader;
        self.state_since_ms = value.state_timestamp_ms;
        self.members.clear();
        self.static_members.clear();
        self.pending_members.clear();
        let protocol = self.protocol.clone().unwrap_or_default();
        for m in value.members {
            if let Some(instance) = &m.group_instance_id {
                self.static_members
                    .insert(instance.clone(), m.member_id.clone());
            }
            self.members.insert(
                m.member_id.clone(),
                Member {
                    member_id: m.member_id,
                    group_instance_id: m.group_instance_id,
                    client_id: m.client_id,
                    client_host: m.client_host,
                    rebalance_timeout_ms: m.rebalance_timeout_ms,
                    session_timeout_ms: m.session_timeout_ms,
                    protocol_type: self.protocol_type.clone().unwrap_or_default(),
                    protocols: vec![(protocol.clone(), m.subscription)],
                    assignment: m.assignment,
                    awaiting_join: None,
                    awaiting_sync: None,
                    session_deadline_ms: now_ms,
                },
            );
        }
        let restorable = !self.members.is_empty()
            && self.protocol.is_some()
            && self
                .leader
                .as_ref()
                .is_some_and(|l| self.members.contains_key(l));
        if restorable {
            self.state = GroupState::Stable;
        } else {
            self.members.clear();
            self.static_members.clear();
            self.leader = None;
            self.protocol = None;
            self.state = GroupState::Empty;
        }
    }

    /// Session deadlines start when loading ends, not when the record was written.
    pub fn start_sessions(&mut self, now_ms: i64) {
        for m in self.members.values_mut() {
            m.session_deadline_ms = now_ms + i64::from(m.session_timeout_ms);
        }
    }

    /// Answers every pending reply with `error` (partition unloaded or group deleted).
    pub fn fail_pending(&mut self, error: ResponseError, out: &mut Vec<Effect>) {
        for member in self.members.values_mut() {
            if let Some(reply) = member.awaiting_join.take() {
                out.push(join_error(reply, &member.member_id, error));
            }
            if let Some(reply) = member.awaiting_sync.take() {
                out.push(sync_error(reply, error));
            }
        }
    }
}

/// JoinGroup members carry a group instance id only from v5.
fn strip_instance_id(m: JoinGroupResponseMember, version: i16) -> JoinGroupResponseMember {
    if version >= 5 {
        m
    } else {
        m.with_group_instance_id(None)
    }
}

pub fn str_bytes(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_owned())
}

pub fn join_error(reply: PendingReply, member_id: &str, error: ResponseError) -> Effect {
    Effect::Join {
        reply: reply.reply,
        response: JoinGroupResponse::default()
            .with_error_code(error.code())
            .with_generation_id(-1)
            .with_member_id(str_bytes(member_id)),
    }
}

pub fn sync_error(reply: PendingReply, error: ResponseError) -> Effect {
    Effect::Sync {
        reply: reply.reply,
        response: SyncGroupResponse::default().with_error_code(error.code()),
    }
}
