//! Deterministic multi-member scenarios driven through the coordinator's inputs (requests and
//! time) and checked on its outputs (responses, deferred responses, records).

use std::collections::{BTreeMap, HashMap};

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::consumer_protocol_subscription::ConsumerProtocolSubscription;
use kafka_protocol::messages::find_coordinator_request::FindCoordinatorRequest;
use kafka_protocol::messages::join_group_request::{JoinGroupRequest, JoinGroupRequestProtocol};
use kafka_protocol::messages::leave_group_request::{LeaveGroupRequest, MemberIdentity};
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequest, OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_delete_request::{
    OffsetDeleteRequest, OffsetDeleteRequestPartition, OffsetDeleteRequestTopic,
};
use kafka_protocol::messages::sync_group_request::{SyncGroupRequest, SyncGroupRequestAssignment};
use kafka_protocol::messages::{
    GroupId, HeartbeatRequest, JoinGroupResponse, SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::{Encodable, StrBytes};
use proptest::prelude::*;

use super::records::{encode_batch, OffsetValue};
use super::*;

const SESSION_MS: i32 = 10_000;
const REBALANCE_MS: i32 = 30_000;
const NO_ERROR: i16 = 0;

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_owned())
}

fn code(e: ResponseError) -> i16 {
    e.code()
}

/// Consumer protocol metadata subscribing to `topics` (version 1 layout).
fn subscription(topics: &[&str]) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_i16(1);
    ConsumerProtocolSubscription::default()
        .with_topics(topics.iter().map(|t| s(t)).collect())
        .encode(&mut buf, 1)
        .unwrap();
    buf.freeze()
}

fn config(initial_delay_ms: i64) -> GroupConfig {
    GroupConfig {
        offsets_topic_partitions: 4,
        initial_rebalance_delay_ms: initial_delay_ms,
        ..GroupConfig::default()
    }
}

/// Drives one coordinator; checks that every deferred reply is answered exactly once and that
/// every response encodes at the version it answers.
struct Harness {
    c: GroupCoordinator,
    now: i64,
    next_reply: u64,
    versions: HashMap<ReplyId, i16>,
    joins: HashMap<ReplyId, JoinGroupResponse>,
    syncs: HashMap<ReplyId, SyncGroupResponse>,
    /// Every record in the order it must be written (group effects and durable commits).
    log: Vec<(i32, OffsetsRecord)>,
}

impl Harness {
    fn new(config: GroupConfig) -> Self {
        let partitions = config.offsets_topic_partitions;
        let mut c = GroupCoordinator::new(config).unwrap();
        for p in 0..partitions {
            c.begin_loading(p);
            c.finish_loading(p, 0);
        }
        Harness {
            c,
            now: 1_000,
            next_reply: 1,
            versions: HashMap::new(),
            joins: HashMap::new(),
            syncs: HashMap::new(),
            log: Vec::new(),
        }
    }

    fn drain(&mut self) {
        for effect in self.c.take_effects() {
            match effect {
                Effect::Join { reply, response } => {
                    let v = self.versions[&reply];
                    response.encode(&mut BytesMut::new(), v).unwrap();
                    assert!(
                        self.joins.insert(reply, response).is_none(),
                        "join reply {reply} answered twice"
                    );
                }
                Effect::Sync { reply, response } => {
                    let v = self.versions[&reply];
                    response.encode(&mut BytesMut::new(), v).unwrap();
                    assert!(
                        self.syncs.insert(reply, response).is_none(),
                        "sync reply {reply} answered twice"
                    );
                }
                Effect::Persist { partition, records } => {
                    assert!(!records.is_empty());
                    for r in records {
                        self.log.push((partition, r));
                    }
                }
            }
        }
    }

    fn advance(&mut self, ms: i64) {
        self.now += ms;
        self.c.tick(self.now);
        self.drain();
    }

    fn join_req(
        &mut self,
        version: i16,
        group: &str,
        member: &str,
        instance: Option<&str>,
        protocols: &[(&str, Bytes)],
    ) -> ReplyId {
        let reply = self.next_reply;
        self.next_reply += 1;
        self.versions.insert(reply, version);
        let req = JoinGroupRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_session_timeout_ms(SESSION_MS)
            .with_rebalance_timeout_ms(REBALANCE_MS)
            .with_member_id(s(member))
            .with_group_instance_id(instance.map(s))
            .with_protocol_type(s("consumer"))
            .with_protocols(
                protocols
                    .iter()
                    .map(|(n, m)| {
                        JoinGroupRequestProtocol::default()
                            .with_name(s(n))
                            .with_metadata(m.clone())
                    })
                    .collect(),
            );
        let client = ClientInfo {
            client_id: "client".into(),
            client_host: "/127.0.0.1".into(),
        };
        self.c.join_group(reply, version, &client, &req, self.now);
        self.drain();
        reply
    }

    fn join(&mut self, group: &str, member: &str) -> ReplyId {
        self.join_req(5, group, member, None, &[("range", subscription(&["t"]))])
    }

    /// KIP-394 join: the first JoinGroup returns MEMBER_ID_REQUIRED with the id to use.
    fn new_member(&mut self, group: &str) -> (String, ReplyId) {
        let first = self.join(group, "");
        let r = self.joins.remove(&first).expect("answered at once");
        assert_eq!(r.error_code, code(ResponseError::MemberIdRequired));
        let id = r.member_id.to_string();
        assert!(!id.is_empty());
        let second = self.join(group, &id);
        (id, second)
    }

    fn join_response(&mut self, reply: ReplyId) -> JoinGroupResponse {
        self.joins.remove(&reply).expect("join answered")
    }

    fn sync(
        &mut self,
        group: &str,
        member: &str,
        generation: i32,
        assignments: &[(&str, &str)],
    ) -> ReplyId {
        let reply = self.next_reply;
        self.next_reply += 1;
        self.versions.insert(reply, 5);
        let req = SyncGroupRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_generation_id(generation)
            .with_member_id(s(member))
            .with_assignments(
                assignments
                    .iter()
                    .map(|(m, a)| {
                        SyncGroupRequestAssignment::default()
                            .with_member_id(s(m))
                            .with_assignment(Bytes::copy_from_slice(a.as_bytes()))
                    })
                    .collect(),
            );
        self.c.sync_group(reply, 5, &req, self.now);
        self.drain();
        reply
    }

    fn heartbeat(&mut self, group: &str, member: &str, generation: i32) -> i16 {
        self.heartbeat_static(group, member, None, generation)
    }

    fn heartbeat_static(
        &mut self,
        group: &str,
        member: &str,
        instance: Option<&str>,
        generation: i32,
    ) -> i16 {
        let req = HeartbeatRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_member_id(s(member))
            .with_group_instance_id(instance.map(s))
            .with_generation_id(generation);
        let r = self.c.heartbeat(&req, self.now);
        r.encode(&mut BytesMut::new(), 4).unwrap();
        self.drain();
        r.error_code
    }

    fn commit(
        &mut self,
        group: &str,
        member: &str,
        generation: i32,
        offsets: &[(&str, i32, i64)],
    ) -> Vec<i16> {
        let mut topics: BTreeMap<&str, Vec<OffsetCommitRequestPartition>> = BTreeMap::new();
        for (t, p, o) in offsets {
            topics.entry(t).or_default().push(
                OffsetCommitRequestPartition::default()
                    .with_partition_index(*p)
                    .with_committed_offset(*o)
                    .with_committed_metadata(Some(s("meta"))),
            );
        }
        let req = OffsetCommitRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_generation_id_or_member_epoch(generation)
            .with_member_id(s(member))
            .with_topics(
                topics
                    .into_iter()
                    .map(|(t, ps)| {
                        OffsetCommitRequestTopic::default()
                            .with_name(TopicName(s(t)))
                            .with_partitions(ps)
                    })
                    .collect(),
            );
        let outcome = self.c.offset_commit(8, &req, self.now, &|_, _| true);
        let partition = outcome.partition;
        for r in &outcome.records {
            self.log.push((partition, r.clone()));
        }
        let response = self.c.finish_offset_commit(outcome, Ok(()));
        response.encode(&mut BytesMut::new(), 8).unwrap();
        self.drain();
        response
            .topics
            .iter()
            .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
            .collect()
    }

    fn committed(&self, group: &str, topic: &str, partition: i32) -> i64 {
        let r = self
            .c
            .fetch_offsets(group, Some(&[(topic.to_owned(), vec![partition])]));
        assert_eq!(r.error, None);
        r.topics[topic][0].1
    }

    fn state(&self, group: &str) -> Option<GroupState> {
        self.c.group_state(group)
    }

    /// Brings members (by id) through a full join + sync; returns the generation.
    fn rebalance_all(&mut self, group: &str, members: &[&str]) -> i32 {
        let replies: Vec<ReplyId> = members.iter().map(|m| self.join(group, m)).collect();
        let responses: Vec<JoinGroupResponse> =
            replies.iter().map(|r| self.join_response(*r)).collect();
        for r in &responses {
            assert_eq!(r.error_code, NO_ERROR);
        }
        let generation = responses[0].generation_id;
        let leader = responses[0].leader.to_string();
        let assignments: Vec<(String, String)> = members
            .iter()
            .map(|m| (m.to_string(), format!("assignment-of-{m}")))
            .collect();
        let refs: Vec<(&str, &str)> = assignments
            .iter()
            .map(|(m, a)| (m.as_str(), a.as_str()))
            .collect();
        let mut sync_replies = Vec::new();
        for m in members.iter().filter(|m| **m != leader) {
            sync_replies.push(self.sync(group, m, generation, &[]));
        }
        sync_replies.push(self.sync(group, &leader, generation, &refs));
        for r in sync_replies {
            assert_eq!(
                self.syncs.remove(&r).expect("sync answered").error_code,
                NO_ERROR
            );
        }
        assert_eq!(self.state(group), Some(GroupState::Stable));
        generation
    }
}

#[test]
fn kip394_join_then_sync_makes_a_stable_single_member_group() {
    let mut h = Harness::new(config(0));
    let (id, reply) = h.new_member("g");
    let r = h.join_response(reply);
    assert_eq!(r.error_code, NO_ERROR);
    assert_eq!(r.generation_id, 1);
    assert_eq!(r.leader.as_str(), id);
    assert_eq!(r.members.len(), 1);
    assert_eq!(r.protocol_name.as_deref(), Some("range"));
    assert_eq!(h.state("g"), Some(GroupState::CompletingRebalance));
    let sync = h.sync("g", &id, 1, &[(&id, "p0,p1")]);
    let sr = h.syncs.remove(&sync).unwrap();
    assert_eq!(sr.error_code, NO_ERROR);
    assert_eq!(&sr.assignment[..], b"p0,p1");
    assert_eq!(h.state("g"), Some(GroupState::Stable));
    assert_eq!(h.heartbeat("g", &id, 1), NO_ERROR);
    // The rebalance persisted a metadata snapshot.
    assert!(h.log.iter().any(
        |(_, r)| matches!(r, OffsetsRecord::Group { value: Some(v), .. } if v.generation == 1)
    ));
}

#[test]
fn second_member_triggers_rebalance_and_follower_waits_for_leader() {
    let mut h = Harness::new(config(0));
    let (a, ra) = h.new_member("g");
    h.join_response(ra);
    let s = h.sync("g", &a, 1, &[(&a, "all")]);
    h.syncs.remove(&s).unwrap();

    let (b, rb) = h.new_member("g");
    assert_eq!(h.state("g"), Some(GroupState::PreparingRebalance));
    assert!(!h.joins.contains_key(&rb), "b waits for a to rejoin");
    assert_eq!(
        h.heartbeat("g", &a, 1),
        code(ResponseError::RebalanceInProgress)
    );
    let ra2 = h.join("g", &a);
    let (ja, jb) = (h.join_response(ra2), h.join_response(rb));
    assert_eq!((ja.generation_id, jb.generation_id), (2, 2));
    assert_eq!(ja.leader.as_str(), a, "the old leader stays leader");
    assert_eq!(ja.members.len(), 2);
    assert!(
        jb.members.is_empty(),
        "only the leader gets the member list"
    );

    // The follower's SyncGroup waits for the leader's.
    let sb = h.sync("g", &b, 2, &[]);
    assert!(!h.syncs.contains_key(&sb));
    let sa = h.sync("g", &a, 2, &[(&a, "half-a"), (&b, "half-b")]);
    assert_eq!(&h.syncs.remove(&sb).unwrap().assignment[..], b"half-b");
    assert_eq!(&h.syncs.remove(&sa).unwrap().assignment[..], b"half-a");
    assert_eq!(h.state("g"), Some(GroupState::Stable));
}

#[test]
fn initial_delay_collects_members_into_one_generation() {
    let mut h = Harness::new(config(3_000));
    let (_a, ra) = h.new_member("g");
    h.advance(1_000);
    let (_b, rb) = h.new_member("g");
    h.advance(1_000);
    let (_c, rc) = h.new_member("g");
    assert!(h.joins.is_empty(), "nobody answered during the delay");
    h.advance(2_999);
    assert!(h.joins.is_empty());
    h.advance(1);
    for r in [ra, rb, rc] {
        let j = h.join_response(r);
        assert_eq!(j.error_code, NO_ERROR);
        assert_eq!(j.generation_id, 1);
    }
}

#[test]
fn expired_member_is_removed_and_the_rest_rebalance() {
    let mut h = Harness::new(config(0));
    let (a, ra) = h.new_member("g");
    h.join_response(ra);
    let (b, rb) = h.new_member("g");
    let g = {
        let ra2 = h.join("g", &a);
        h.joins.remove(&ra2);
        h.joins.remove(&rb);
        2
    };
    let sb = h.sync("g", &b, g, &[]);
    let sa = h.sync("g", &a, g, &[(&a, "x"), (&b, "y")]);
    h.syncs.remove(&sa);
    h.syncs.remove(&sb);
    // Only a heartbeats; b's session runs out.
    for _ in 0..4 {
        h.advance(3_000);
        if h.state("g") == Some(GroupState::Stable) {
            assert_eq!(h.heartbeat("g", &a, g), NO_ERROR);
        }
    }
    assert_eq!(h.state("g"), Some(GroupState::PreparingRebalance));
    assert_eq!(
        h.heartbeat("g", &a, g),
        code(ResponseError::RebalanceInProgress)
    );
    assert_eq!(
        h.heartbeat("g", &b, g),
        code(ResponseError::UnknownMemberId)
    );
    let ra3 = h.join("g", &a);
    let j = h.join_response(ra3);
    assert_eq!(j.generation_id, 3);
    assert_eq!(j.members.len(), 1);
}

#[test]
fn member_that_does_not_rejoin_is_dropped_at_the_rebalance_timeout() {
    let mut h = Harness::new(config(0));
    let (a, ra) = h.new_member("g");
    h.join_response(ra);
    let (b, rb) = h.new_member("g");
    let ra2 = h.join("g", &a);
    h.join_response(ra2);
    h.join_response(rb);
    let sa = h.sync("g", &a, 2, &[]);
    h.syncs.remove(&sa);
    // A third member arrives; b keeps heartbeating (so it does not expire) but never rejoins.
    let (_c, rc) = h.new_member("g");
    let ra3 = h.join("g", &a);
    let mut waited = 0;
    while h.state("g") == Some(GroupState::PreparingRebalance) {
        assert!(waited <= i64::from(REBALANCE_MS), "rebalance never ended");
        h.heartbeat("g", &b, 2);
        h.advance(1_000);
        waited += 1_000;
    }
    let j = h.join_response(ra3);
    assert_eq!(j.members.len(), 2, "b was dropped");
    h.join_response(rc);
    assert_eq!(
        h.heartbeat("g", &b, 2),
        code(ResponseError::UnknownMemberId)
    );
}

#[test]
fn stale_generation_and_unknown_member_get_errors_then_recover_by_rejoining() {
    let mut h = Harness::new(config(0));
    let (a, ra) = h.new_member("g");
    h.join_response(ra);
    let sa = h.sync("g", &a, 1, &[]);
    h.syncs.remove(&sa);
    let (b, rb) = h.new_member("g");
    let ra2 = h.join("g", &a);
    h.join_response(ra2);
    h.join_response(rb);
    let g = h.rebalance_all("g", &[&a, &b]);
    assert_eq!(g, 2);

    assert_eq!(
        h.heartbeat("g", &a, 1),
        code(ResponseError::IllegalGeneration)
    );
    assert_eq!(
        h.commit("g", &a, 1, &[("t", 0, 5)]),
        vec![code(ResponseError::IllegalGeneration)]
    );
    assert_eq!(
        h.heartbeat("g", "nobody", g),
        code(ResponseError::UnknownMemberId)
    );
    assert_eq!(
        h.commit("g", "nobody", g, &[("t", 0, 5)]),
        vec![code(ResponseError::UnknownMemberId)]
    );
    let stale_sync = h.sync("g", &a, 1, &[]);
    assert_eq!(
        h.syncs.remove(&stale_sync).unwrap().error_code,
        code(ResponseError::IllegalGeneration)
    );
    let unknown_join = h.join("g", "nobody");
    assert_eq!(
        h.join_response(unknown_join).error_code,
        code(ResponseError::UnknownMemberId)
    );
    assert_eq!(h.committed("g", "t", 0), -1, "failed commits store nothing");

    // Recovery: a fresh join of the unknown client, then everybody rejoins.
    let (c, rc) = h.new_member("g");
    let g2 = h.rebalance_all("g", &[&a, &b]);
    h.join_response(rc);
    // c joined in the same generation but did not sync before the leader did: it gets its
    // (empty) assignment at once.
    let sc = h.sync("g", &c, g2, &[]);
    assert_eq!(h.syncs.remove(&sc).unwrap().error_code, NO_ERROR);
    assert_eq!(h.commit("g", &a, g2, &[("t", 0, 5)]), vec![NO_ERROR]);
    assert_eq!(h.committed("g", "t", 0), 5);
}

#[test]
fn static_member_restart_keeps_assignment_without_rebalance() {
    let mut h = Harness::new(config(0));
    let p = [("range", subscription(&["t"]))];
    let r1 = h.join_req(5, "g", "", Some("inst-1"), &p);
    let j1 = h.join_response(r1);
    assert_eq!(
        j1.error_code, NO_ERROR,
        "static members skip MEMBER_ID_REQUIRED"
    );
    let a = j1.member_id.to_string();
    let (b, rb) = h.new_member("g");
    let r1b = h.join_req(5, "g", &a, Some("inst-1"), &p);
    let leader_join = h.join_response(r1b);
    h.join_response(rb);
    let g = leader_join.generation_id;
    let sb = h.sync("g", &b, g, &[]);
    let sa = h.sync("g", &a, g, &[(&a, "for-a"), (&b, "for-b")]);
    h.syncs.remove(&sa);
    h.syncs.remove(&sb);

    // The static member restarts: empty member id, same instance id.
    let r2 = h.join_req(5, "g", "", Some("inst-1"), &p);
    let j2 = h.join_response(r2);
    assert_eq!(j2.error_code, NO_ERROR);
    assert_eq!(j2.generation_id, g, "no new generation");
    assert_ne!(j2.member_id.as_str(), a);
    assert_eq!(h.state("g"), Some(GroupState::Stable));
    let new_a = j2.member_id.to_string();
    let s2 = h.sync("g", &new_a, g, &[]);
    assert_eq!(&h.syncs.remove(&s2).unwrap().assignment[..], b"for-a");
    // The old incarnation is fenced; the other member never noticed.
    assert_eq!(
        h.heartbeat_static("g", &a, Some("inst-1"), g),
        code(ResponseError::FencedInstanceId)
    );
    assert_eq!(h.heartbeat("g", &b, g), NO_ERROR);
}

#[test]
fn batch_leave_removes_members_and_reports_unknown_ones() {
    let mut h = Harness::new(config(0));
    let (a, ra) = h.new_member("g");
    h.join_response(ra);
    let (b, rb) = h.new_member("g");
    let ra2 = h.join("g", &a);
    h.join_response(ra2);
    h.join_response(rb);
    let req = LeaveGroupRequest::default()
        .with_group_id(GroupId(s("g")))
        .with_members(vec![
            MemberIdentity::default().with_member_id(s(&a)),
            MemberIdentity::default().with_member_id(s("ghost")),
        ]);
    let r = h.c.leave_group(3, &req, h.now);
    r.encode(&mut BytesMut::new(), 3).unwrap();
    h.drain();
    assert_eq!(r.error_code, NO_ERROR);
    assert_eq!(r.members[0].error_code, NO_ERROR);
    assert_eq!(
        r.members[1].error_code,
        code(ResponseError::UnknownMemberId)
    );
    assert_eq!(h.state("g"), Some(GroupState::PreparingRebalance));
    let rb2 = h.join("g", &b);
    let j = h.join_response(rb2);
    assert_eq!(j.leader.as_str(), b, "leadership passes on");
    assert_eq!(j.members.len(), 1);

    // v0 leave of the last member: the group empties.
    let sb = h.sync("g", &b, j.generation_id, &[]);
    h.syncs.remove(&sb);
    let v0 = LeaveGroupRequest::default()
        .with_group_id(GroupId(s("g")))
        .with_member_id(s(&b));
    let r = h.c.leave_group(0, &v0, h.now);
    r.encode(&mut BytesMut::new(), 0).unwrap();
    h.drain();
    assert_eq!(r.error_code, NO_ERROR);
    assert_eq!(h.state("g"), Some(GroupState::Empty));
}

#[test]
fn delete_groups_needs_an_empty_group_and_writes_tombstones() {
    let mut h = Harness::new(config(0));
    let (a, ra) = h.new_member("g");
    h.join_response(ra);
    let sa = h.sync("g", &a, 1, &[]);
    h.syncs.remove(&sa);
    assert_eq!(
        h.commit("g", &a, 1, &[("t", 0, 7), ("t", 1, 9)]),
        vec![0, 0]
    );
    assert_eq!(
        h.c.delete_group("g").error_code,
        code(ResponseError::NonEmptyGroup)
    );
    assert_eq!(
        h.c.delete_group("missing").error_code,
        code(ResponseError::GroupIdNotFound)
    );
    let leave = LeaveGroupRequest::default()
        .with_group_id(GroupId(s("g")))
        .with_member_id(s(&a));
    h.c.leave_group(1, &leave, h.now);
    h.drain();
    assert_eq!(h.c.delete_group("g").error_code, NO_ERROR);
    h.drain();
    assert_eq!(h.state("g"), None);
    assert_eq!(h.committed("g", "t", 0), -1);
    let tombstones = h
        .log
        .iter()
        .rev()
        .take(3)
        .filter(|(_, r)| match r {
            OffsetsRecord::Offset { value, .. } => value.is_none(),
            OffsetsRecord::Group { value, .. } => value.is_none(),
        })
        .count();
    assert_eq!(tombstones, 3);
}

#[test]
fn commits_are_invisible_until_durable_and_failures_become_errors() {
    let mut h = Harness::new(config(0));
    let req = OffsetCommitRequest::default()
        .with_group_id(GroupId(s("simple")))
        .with_generation_id_or_member_epoch(-1)
        .with_topics(vec![OffsetCommitRequestTopic::default()
            .with_name(TopicName(s("t")))
            .with_partitions(vec![
                OffsetCommitRequestPartition::default()
                    .with_partition_index(0)
                    .with_committed_offset(42)
                    .with_committed_metadata(Some(s("hello"))),
                OffsetCommitRequestPartition::default()
                    .with_partition_index(1)
                    .with_committed_offset(1)
                    .with_committed_metadata(Some(s(&"x".repeat(5000)))),
            ])]);
    let outcome = h.c.offset_commit(2, &req, h.now, &|_, _| true);
    assert_eq!(
        outcome.records.len(),
        1,
        "the oversized metadata is refused"
    );
    assert_eq!(h.committed("simple", "t", 0), -1, "not durable yet");
    let r = h.c.finish_offset_commit(outcome, Ok(()));
    assert_eq!(r.topics[0].partitions[0].error_code, NO_ERROR);
    assert_eq!(
        r.topics[0].partitions[1].error_code,
        code(ResponseError::OffsetMetadataTooLarge)
    );
    assert_eq!(h.committed("simple", "t", 0), 42);
    let fetched = h.c.fetch_offsets("simple", None);
    assert_eq!(fetched.topics["t"], vec![(0, 42, -1, "hello".to_owned())]);

    // A partition the topic does not have is refused, not stored (Kafka does the same).
    let only_partition_0 = |topic: &str, partition: i32| topic == "t" && partition == 0;
    let mut beyond = req.clone();
    beyond.topics[0].partitions[0].committed_offset = 7;
    beyond.topics[0].partitions[1].committed_metadata = None;
    let outcome = h.c.offset_commit(2, &beyond, h.now, &only_partition_0);
    assert_eq!(outcome.records.len(), 1, "only partition 0 exists");
    let r = h.c.finish_offset_commit(outcome, Ok(()));
    assert_eq!(r.topics[0].partitions[0].error_code, NO_ERROR);
    assert_eq!(
        r.topics[0].partitions[1].error_code,
        code(ResponseError::UnknownTopicOrPartition)
    );
    assert_eq!(h.committed("simple", "t", 0), 7);
    assert_eq!(h.committed("simple", "t", 1), -1);

    let failing = h.c.offset_commit(2, &req, h.now, &|_, _| true);
    let r =
        h.c.finish_offset_commit(failing, Err(ResponseError::CoordinatorNotAvailable));
    assert_eq!(
        r.topics[0].partitions[0].error_code,
        code(ResponseError::CoordinatorNotAvailable)
    );

    // A group with members refuses generation -1 commits.
    let (a, ra) = h.new_member("g");
    h.join_response(ra);
    let simple = OffsetCommitRequest::default()
        .with_group_id(GroupId(s("g")))
        .with_generation_id_or_member_epoch(-1)
        .with_topics(req.topics.clone());
    let outcome = h.c.offset_commit(2, &simple, h.now, &|_, _| true);
    let r = h.c.finish_offset_commit(outcome, Ok(()));
    assert_eq!(
        r.topics[0].partitions[0].error_code,
        code(ResponseError::RebalanceInProgress)
    );
    let _ = a;
}

#[test]
fn offset_fetch_is_shaped_per_version() {
    let mut h = Harness::new(config(0));
    assert_eq!(
        h.commit("g1", "", -1, &[("t", 0, 3), ("u", 2, 8)]),
        vec![0, 0]
    );
    let all = h.c.fetch_offsets("g1", None);
    let some = h.c.fetch_offsets("g1", Some(&[("t".into(), vec![0, 5])]));
    assert_eq!(
        some.topics["t"],
        vec![(0, 3, -1, "meta".into()), (5, -1, -1, String::new())]
    );
    for v in 1..=9 {
        let groups = if v >= 8 {
            vec![all.clone(), some.clone()]
        } else {
            vec![all.clone()]
        };
        let r = offset_fetch_response(v, groups);
        r.encode(&mut BytesMut::new(), v).unwrap();
        if v >= 8 {
            assert_eq!(r.groups.len(), 2);
            assert_eq!(r.groups[0].topics.len(), 2);
        } else {
            assert_eq!(r.topics.len(), 2);
        }
    }
    // A group on a partition this coordinator does not own.
    let mut other = GroupCoordinator::new(config(0)).unwrap();
    let miss = other.fetch_offsets("g1", Some(&[("t".into(), vec![0])]));
    assert_eq!(miss.error, Some(ResponseError::NotCoordinator));
    let v1 = offset_fetch_response(1, vec![miss.clone()]);
    assert_eq!(
        v1.topics[0].partitions[0].error_code,
        code(ResponseError::NotCoordinator)
    );
    let v3 = offset_fetch_response(3, vec![miss]);
    assert_eq!(v3.error_code, code(ResponseError::NotCoordinator));
    other.tick(0);
}

#[test]
fn loading_partitions_answer_load_in_progress_and_unowned_answer_not_coordinator() {
    let mut c = GroupCoordinator::new(config(0)).unwrap();
    let p = c.partition_for("g");
    let req = HeartbeatRequest::default()
        .with_group_id(GroupId(s("g")))
        .with_member_id(s("m"));
    assert_eq!(
        c.heartbeat(&req, 0).error_code,
        code(ResponseError::NotCoordinator)
    );
    c.begin_loading(p);
    assert_eq!(
        c.heartbeat(&req, 0).error_code,
        code(ResponseError::CoordinatorLoadInProgress)
    );
    assert_eq!(
        c.list_groups(&[], &[]).0,
        code(ResponseError::CoordinatorLoadInProgress)
    );
    c.finish_loading(p, 0);
    assert_eq!(
        c.heartbeat(&req, 0).error_code,
        code(ResponseError::UnknownMemberId)
    );
    let empty = HeartbeatRequest::default();
    assert_eq!(
        c.heartbeat(&empty, 0).error_code,
        code(ResponseError::InvalidGroupId)
    );
}

#[test]
fn unload_answers_every_pending_reply() {
    let mut h = Harness::new(config(60_000));
    let (_a, ra) = h.new_member("g");
    assert!(!h.joins.contains_key(&ra));
    let p = h.c.partition_for("g");
    h.c.unload(p);
    h.drain();
    assert_eq!(
        h.join_response(ra).error_code,
        code(ResponseError::NotCoordinator)
    );
}

#[test]
fn protocol_selection_and_inconsistent_protocols() {
    let mut h = Harness::new(config(0));
    let both = [
        ("range", subscription(&["t"])),
        ("roundrobin", subscription(&["t"])),
    ];
    let rr = [("roundrobin", subscription(&["t"]))];
    let r1 = h.join_req(3, "g", "", None, &both);
    let a = h.join_response(r1).member_id.to_string();
    let r2 = h.join_req(3, "g", "", None, &rr);
    assert!(!h.joins.contains_key(&r2), "v3 joins directly (no KIP-394)");
    let r3 = h.join_req(3, "g", &a, None, &both);
    let j = h.join_response(r3);
    assert_eq!(j.protocol_name.as_deref(), Some("roundrobin"));
    h.join_response(r2);
    let bad = h.join_req(3, "g", "", None, &[("sticky", subscription(&["t"]))]);
    assert_eq!(
        h.join_response(bad).error_code,
        code(ResponseError::InconsistentGroupProtocol)
    );
    let short = JoinGroupRequest::default()
        .with_group_id(GroupId(s("g")))
        .with_session_timeout_ms(10)
        .with_protocol_type(s("consumer"));
    h.versions.insert(999, 5);
    h.c.join_group(999, 5, &ClientInfo::default(), &short, h.now);
    h.drain();
    assert_eq!(
        h.join_response(999).error_code,
        code(ResponseError::InvalidSessionTimeout)
    );
}

#[test]
fn describe_and_list_groups() {
    let mut h = Harness::new(config(0));
    let (a, ra) = h.new_member("g");
    h.join_response(ra);
    let sa = h.sync("g", &a, 1, &[(&a, "asg")]);
    h.syncs.remove(&sa);
    h.commit("offsets-only", "", -1, &[("t", 0, 1)]);
    for v in 0..=6 {
        let d = h.c.describe_group(v, "g");
        d.encode(&mut BytesMut::new(), v).unwrap();
        assert_eq!(d.group_state.as_str(), "Stable");
        assert_eq!(d.protocol_data.as_str(), "range");
        assert_eq!(&d.members[0].member_assignment[..], b"asg");
        assert_eq!(d.members[0].client_host.as_str(), "/127.0.0.1");
        let missing = h.c.describe_group(v, "missing");
        missing.encode(&mut BytesMut::new(), v).unwrap();
        assert_eq!(missing.group_state.as_str(), "Dead");
    }
    let (err, all) = h.c.list_groups(&[], &[]);
    assert_eq!(err, NO_ERROR);
    let names: Vec<&str> = all.iter().map(|g| g.group_id.as_str()).collect();
    assert_eq!(names, vec!["g", "offsets-only"]);
    let (_, stable) = h.c.list_groups(&["stable".into()], &[]);
    assert_eq!(stable.len(), 1);
    let (_, consumer) = h.c.list_groups(&[], &["consumer".into()]);
    assert!(
        consumer.is_empty(),
        "no groups of the new consumer protocol"
    );
}

#[test]
fn offset_delete_refuses_subscribed_topics() {
    let mut h = Harness::new(config(0));
    let (a, ra) = h.new_member("g");
    h.join_response(ra);
    let sa = h.sync("g", &a, 1, &[]);
    h.syncs.remove(&sa);
    h.commit("g", &a, 1, &[("t", 0, 1), ("old", 0, 2)]);
    let req = |topic: &str| {
        OffsetDeleteRequest::default()
            .with_group_id(GroupId(s("g")))
            .with_topics(vec![OffsetDeleteRequestTopic::default()
                .with_name(TopicName(s(topic)))
                .with_partitions(vec![
                    OffsetDeleteRequestPartition::default().with_partition_index(0)
                ])])
    };
    let r = h.c.offset_delete(&req("t"), h.now);
    assert_eq!(
        r.topics[0].partitions[0].error_code,
        code(ResponseError::GroupSubscribedToTopic)
    );
    let r = h.c.offset_delete(&req("old"), h.now);
    r.encode(&mut BytesMut::new(), 0).unwrap();
    assert_eq!(r.error_code, NO_ERROR);
    assert_eq!(r.topics[0].partitions[0].error_code, NO_ERROR);
    assert_eq!(h.committed("g", "old", 0), -1);
    assert_eq!(h.committed("g", "t", 0), 1);
    let missing = h.c.offset_delete(
        &OffsetDeleteRequest::default().with_group_id(GroupId(s("nope"))),
        h.now,
    );
    assert_eq!(missing.error_code, code(ResponseError::GroupIdNotFound));
}

#[test]
fn offsets_of_empty_groups_expire_after_retention() {
    let mut cfg = config(0);
    cfg.offsets_retention_ms = 60_000;
    cfg.offsets_retention_check_interval_ms = 1_000;
    let mut h = Harness::new(cfg);
    h.commit("g", "", -1, &[("t", 0, 1)]);
    h.advance(59_000);
    assert_eq!(h.committed("g", "t", 0), 1);
    h.advance(2_000);
    assert_eq!(h.committed("g", "t", 0), -1);
    assert_eq!(
        h.state("g"),
        None,
        "an empty group without offsets goes away"
    );
    assert!(matches!(
        h.log.last(),
        Some((_, OffsetsRecord::Group { value: None, .. }))
    ));
}

#[test]
fn find_coordinator_answers_each_group_its_coordinator() {
    for v in 0..=6i16 {
        let req = if v >= 4 {
            FindCoordinatorRequest::default().with_coordinator_keys(vec![s("a"), s("b")])
        } else {
            FindCoordinatorRequest::default().with_key(s("a"))
        };
        // Group "b" has no coordinator yet (its partition has no leader).
        let locate = |key: &str| {
            (key == "a").then(|| crate::leader_hint::Endpoint {
                node_id: 7,
                host: "127.0.0.1".into(),
                port: 9092,
            })
        };
        let r = find_coordinator_response(v, &req, locate);
        r.encode(&mut BytesMut::new(), v).unwrap();
        if v >= 4 {
            assert_eq!(r.coordinators.len(), 2);
            assert_eq!(r.coordinators[0].port, 9092);
            assert_eq!(
                r.coordinators[1].error_code,
                ResponseError::CoordinatorNotAvailable.code()
            );
        } else {
            assert_eq!(r.node_id.0, 7);
        }
        let txn = req.clone().with_key_type(1);
        let r = find_coordinator_response(v, &txn, locate);
        r.encode(&mut BytesMut::new(), v).unwrap();
    }
}

/// Replays what a coordinator wrote into a fresh one, through the batch codec, as a restart
/// does.
fn restart(h: &Harness, now: i64) -> GroupCoordinator {
    let cfg = h.c.config().clone();
    let mut c = GroupCoordinator::new(cfg.clone()).unwrap();
    for p in 0..cfg.offsets_topic_partitions {
        c.begin_loading(p);
        let records: Vec<OffsetsRecord> = h
            .log
            .iter()
            .filter(|(lp, _)| *lp == p)
            .map(|(_, r)| r.clone())
            .collect();
        for chunk in records.chunks(3) {
            c.replay_batch(p, &encode_batch(chunk, now), now).unwrap();
        }
        c.finish_loading(p, now);
    }
    c
}

#[test]
fn replay_restores_offsets_and_a_stable_group_whose_members_carry_on() {
    let mut h = Harness::new(config(0));
    let (a, ra) = h.new_member("g");
    h.join_response(ra);
    let (b, rb) = h.new_member("g");
    let ra2 = h.join("g", &a);
    h.join_response(ra2);
    h.join_response(rb);
    let g = h.rebalance_all("g", &[&a, &b]);
    h.commit("g", &a, g, &[("t", 0, 10), ("t", 1, 20)]);
    h.commit("g", &b, g, &[("t", 1, 25)]);

    let mut c = restart(&h, h.now + 500);
    assert_eq!(c.group_state("g"), Some(GroupState::Stable));
    assert_eq!(c.group_generation("g"), Some(g));
    let offsets = c.fetch_offsets("g", None);
    assert_eq!(
        offsets.topics["t"]
            .iter()
            .map(|(p, o, _, _)| (*p, *o))
            .collect::<Vec<_>>(),
        vec![(0, 10), (1, 25)]
    );
    // Both members heartbeat with their old generation as if nothing happened.
    for m in [&a, &b] {
        let hb = HeartbeatRequest::default()
            .with_group_id(GroupId(s("g")))
            .with_member_id(s(m))
            .with_generation_id(g);
        assert_eq!(c.heartbeat(&hb, h.now + 600).error_code, NO_ERROR);
    }
    let d = c.describe_group(5, "g");
    assert_eq!(d.members.len(), 2);
    // Members that do not come back expire after their session timeout.
    c.tick(h.now + 600 + i64::from(SESSION_MS) + 1);
    let _ = c.take_effects();
    assert_eq!(c.group_state("g"), Some(GroupState::Empty));
}

#[derive(Clone, Debug)]
enum Op {
    Commit {
        group: u8,
        topic: u8,
        partition: u8,
        offset: i64,
    },
    Delete {
        group: u8,
    },
    DeleteOffset {
        group: u8,
        topic: u8,
        partition: u8,
    },
    Tick {
        ms: i64,
    },
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4, 0u8..3, 0u8..3, 0i64..1_000).prop_map(|(group, topic, partition, offset)| Op::Commit { group, topic, partition, offset }),
        1 => (0u8..4).prop_map(|group| Op::Delete { group }),
        1 => (0u8..4, 0u8..3, 0u8..3).prop_map(|(group, topic, partition)| Op::DeleteOffset { group, topic, partition }),
        1 => (0i64..40_000).prop_map(|ms| Op::Tick { ms }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Whatever sequence of commits, deletes and expiries ran, replaying the written records
    /// rebuilds exactly the offsets the live coordinator serves.
    #[test]
    fn replay_rebuilds_the_live_offsets(ops in proptest::collection::vec(arb_op(), 1..60)) {
        let mut cfg = config(0);
        cfg.offsets_retention_ms = 100_000;
        cfg.offsets_retention_check_interval_ms = 5_000;
        let mut h = Harness::new(cfg);
        for op in ops {
            match op {
                Op::Commit { group, topic, partition, offset } => {
                    let errors = h.commit(&format!("g{group}"), "", -1, &[(&format!("t{topic}"), i32::from(partition), offset)]);
                    prop_assert_eq!(errors, vec![NO_ERROR]);
                }
                Op::Delete { group } => {
                    h.c.delete_group(&format!("g{group}"));
                    h.drain();
                }
                Op::DeleteOffset { group, topic, partition } => {
                    let req = OffsetDeleteRequest::default()
                        .with_group_id(GroupId(s(&format!("g{group}"))))
                        .with_topics(vec![OffsetDeleteRequestTopic::default()
                            .with_name(TopicName(s(&format!("t{topic}"))))
                            .with_partitions(vec![OffsetDeleteRequestPartition::default().with_partition_index(i32::from(partition))])]);
                    h.c.offset_delete(&req, h.now);
                    h.drain();
                }
                Op::Tick { ms } => h.advance(ms),
            }
        }
        let c = restart(&h, h.now);
        for g in 0..4 {
            let group = format!("g{g}");
            prop_assert_eq!(c.fetch_offsets(&group, None), h.c.fetch_offsets(&group, None));
            prop_assert_eq!(c.group_state(&group), h.c.group_state(&group));
        }
    }
}

fn arb_replayed() -> impl Strategy<Value = OffsetsRecord> {
    let value = |offset| OffsetValue {
        offset,
        leader_epoch: -1,
        metadata: String::new(),
        commit_timestamp_ms: 0,
    };
    prop_oneof![
        8 => (0u8..3, 0u8..2, 0i32..4, proptest::option::of(0i64..1_000)).prop_map(move |(g, t, p, o)| OffsetsRecord::Offset {
            group_id: format!("g{g}"),
            topic: format!("t{t}"),
            partition: p,
            value: o.map(value),
        }),
        1 => (0u8..3).prop_map(|g| OffsetsRecord::Group { group_id: format!("g{g}"), value: None }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Replaying whole batches (runs of one group's offsets applied together, each looked for
    /// just after the previous one) ends in the same offsets as replaying record by record,
    /// whatever the order, repeats and tombstones in a batch.
    #[test]
    fn batch_replay_matches_record_replay(records in proptest::collection::vec(arb_replayed(), 1..80),
                                          per_batch in 1usize..20) {
        let cfg = GroupConfig { offsets_topic_partitions: 1, ..config(0) };
        let mut by_record = GroupCoordinator::new(cfg.clone()).unwrap();
        let mut by_batch = GroupCoordinator::new(cfg).unwrap();
        by_record.begin_loading(0);
        by_batch.begin_loading(0);
        let mut replayed = 0;
        for chunk in records.chunks(per_batch) {
            for r in chunk {
                by_record.replay(0, r.clone(), 0);
            }
            replayed += by_batch.replay_batch(0, &encode_batch(chunk, 0), 0).unwrap();
        }
        prop_assert_eq!(replayed, records.len());
        by_record.finish_loading(0, 0);
        by_batch.finish_loading(0, 0);
        for g in 0..3 {
            let group = format!("g{g}");
            prop_assert_eq!(by_batch.fetch_offsets(&group, None), by_record.fetch_offsets(&group, None));
            prop_assert_eq!(by_batch.group_state(&group), by_record.group_state(&group));
        }
    }
}
