//! Moving partition replicas as controller decisions (issue 18, "Move replicas"): a
//! `Reassign` record makes the partition's replicas the union of the target and the old ones
//! (Kafka's adding/removing replicas), a `FinishReassignment` from the partition's leader makes
//! them the target, a cancel goes back to the replicas before the move. Shown here: the rules
//! and refusals, that asking again records nothing, that every decision applied through its
//! encoding on a follower gives the controller's state, and with the real driver over an
//! in-memory network that a move survives a controller failover and finishes after it.

use spate_replication::controller::driver::{AdminCall, CallAnswer};
use spate_replication::controller::reassignment::{check_request, Refusal};
use spate_replication::controller::{
    AlterIsrRequest, ControllerConfig, ControllerError, CreateTopicRequest, PartitionState, Record,
    RecordBatch,
};
use spate_replication::rpc::{Frame, FrameCodec, RpcErrorCode};
use spate_replication::NodeId;

#[path = "support/controller.rs"]
mod controller_support;
use controller_support::*;

// ---- the active controller and the rules --------------------------------------------------

impl Harness {
    /// Three live brokers and topic `t` of `n` partitions, replication factor 3, each led by
    /// its preferred replica in epoch 1.
    fn three_nodes(cfg: ControllerConfig, n: usize) -> Self {
        let mut h = Harness::new(cfg);
        for node in 1..=3 {
            h.join(node, 0);
        }
        let recs = h
            .ctl
            .create_topic(CreateTopicRequest {
                name: "t".into(),
                topic_id: 7,
                partitions: n,
                replication_factor: Some(3),
                configs: Vec::new(),
            })
            .unwrap();
        h.commit(recs);
        for i in 0..n as u32 {
            let preferred = h.p("t", i).replicas[0].node;
            h.elected("t", i, preferred, 1);
        }
        h
    }
}

// ---- the driver: across a controller failover ----------------------------------------------

fn nodes(p: &PartitionState) -> Vec<NodeId> {
    p.replicas.iter().map(|r| r.node).collect()
}

/// Three brokers holding topic `t` (one partition, replicas 1, 2, 3 in some order, led by the
/// preferred replica), and a fourth broker that holds nothing yet.
fn four_nodes() -> Harness {
    let mut h = Harness::three_nodes(ControllerConfig::default(), 1);
    h.join(4, 0);
    h
}

fn to(target: &[NodeId]) -> Vec<(String, u32, Option<Vec<NodeId>>)> {
    vec![("t".into(), 0, Some(target.to_vec()))]
}

fn cancel() -> Vec<(String, u32, Option<Vec<NodeId>>)> {
    vec![("t".into(), 0, None)]
}

#[test]
fn a_move_lists_the_union_with_adding_and_removing_and_repeats_record_nothing() {
    let mut h = four_nodes();
    let before = h.p("t", 0);
    let leader = before.leader.unwrap();
    // Keep the leader, drop another replica, add node 4.
    let dropped = *nodes(&before).iter().find(|&&n| n != leader).unwrap();
    let target: Vec<NodeId> = nodes(&before)
        .into_iter()
        .map(|n| if n == dropped { 4 } else { n })
        .collect();
    let recs = h.ctl.reassign(&to(&target)).unwrap();
    assert_eq!(recs.len(), 1);
    h.commit(recs);
    let p = h.p("t", 0);
    let mut union = target.clone();
    union.push(dropped);
    assert_eq!(
        nodes(&p),
        union,
        "replicas while moving: the target, then the removed"
    );
    let r = h.follower.reassignment("t", 0).unwrap().clone();
    assert_eq!(r.adding(), vec![4]);
    assert_eq!(r.removing(&p.replicas), vec![dropped]);
    assert_eq!(r.original, before.replicas);
    // Leadership and ISR are untouched by recording a move.
    assert_eq!(
        (p.leader, p.isr.clone()),
        (before.leader, before.isr.clone())
    );
    // The same target again records nothing.
    assert_eq!(h.ctl.reassign(&to(&target)).unwrap(), Vec::<Record>::new());
    // Node 4 got a shard it has (it runs one).
    assert_eq!(p.replicas.iter().find(|r| r.node == 4).unwrap().shard, 0);
}

#[test]
fn the_leader_finishes_a_move_only_for_the_recorded_target() {
    let mut h = four_nodes();
    let before = h.p("t", 0);
    let leader = before.leader.unwrap();
    let dropped = *nodes(&before).iter().find(|&&n| n != leader).unwrap();
    let target: Vec<NodeId> = nodes(&before)
        .into_iter()
        .map(|n| if n == dropped { 4 } else { n })
        .collect();
    let recs = h.ctl.reassign(&to(&target)).unwrap();
    h.commit(recs);
    // The group promoted node 4: the leader reports it in sync (a replica while moving).
    let recs = h
        .ctl
        .alter_isr(AlterIsrRequest {
            topic: "t".into(),
            partition: 0,
            leader,
            leader_epoch: 1,
            isr: vec![1, 2, 3, 4],
        })
        .unwrap();
    h.commit(recs);
    // Another target, or a node that does not lead, is refused.
    let mut other = target.clone();
    other.reverse();
    assert!(matches!(
        h.ctl.finish_reassignment(leader, "t", 0, &other),
        Err(ControllerError::Invalid(_))
    ));
    assert!(matches!(
        h.ctl.finish_reassignment(4, "t", 0, &target),
        Err(ControllerError::NotLeader { node: 4 })
    ));
    let recs = h.ctl.finish_reassignment(leader, "t", 0, &target).unwrap();
    h.commit(recs);
    let p = h.p("t", 0);
    assert_eq!(nodes(&p), target);
    assert!(
        !p.isr.contains(&dropped),
        "a removed replica leaves the ISR"
    );
    assert_eq!(p.leader, Some(leader));
    assert!(h.follower.reassignment("t", 0).is_none());
    // A repeat after the end records nothing; a cancel now is refused on the requester side.
    assert_eq!(
        h.ctl.finish_reassignment(leader, "t", 0, &target).unwrap(),
        Vec::<Record>::new()
    );
    assert_eq!(
        check_request(&h.follower, "t", 0, None),
        Err(Refusal::NoReassignmentInProgress)
    );
    assert_eq!(h.ctl.reassign(&cancel()).unwrap(), Vec::<Record>::new());
}

#[test]
fn a_cancel_moves_back_to_the_replicas_before_the_move() {
    let mut h = four_nodes();
    let before = h.p("t", 0);
    let leader = before.leader.unwrap();
    let target = vec![leader, 4];
    let recs = h.ctl.reassign(&to(&target)).unwrap();
    h.commit(recs);
    // A second target while moving: the original stays what the first move started from, and
    // every replica held since stays listed until the move ends.
    let recs = h.ctl.reassign(&to(&[4, leader])).unwrap();
    h.commit(recs);
    assert_eq!(
        h.follower.reassignment("t", 0).unwrap().original,
        before.replicas
    );
    let recs = h.ctl.reassign(&cancel()).unwrap();
    assert_eq!(recs.len(), 1);
    h.commit(recs);
    let p = h.p("t", 0);
    let r = h.follower.reassignment("t", 0).unwrap().clone();
    // Node 4 may have joined the group: it is removed like any replica outside the target.
    assert_eq!(r.target, before.replicas);
    assert_eq!(r.adding(), Vec::<NodeId>::new());
    assert_eq!(r.removing(&p.replicas), vec![4]);
    let recs = h
        .ctl
        .finish_reassignment(leader, "t", 0, &nodes(&before))
        .unwrap();
    h.commit(recs);
    assert_eq!(h.p("t", 0).replicas, before.replicas);
    // A reorder of the same nodes takes effect at once: nothing joins or leaves the group.
    let mut reordered = nodes(&before);
    reordered.rotate_left(1);
    let recs = h.ctl.reassign(&to(&reordered)).unwrap();
    h.commit(recs);
    assert_eq!(nodes(&h.p("t", 0)), reordered);
    assert!(h.follower.reassignment("t", 0).is_none());
}

#[test]
fn bad_targets_are_refused_with_their_kafka_codes_and_record_nothing() {
    let mut h = four_nodes();
    let s = &h.follower;
    let code = |r: Result<(), Refusal>| r.map_err(|e| e.error_code());
    assert_eq!(code(check_request(s, "t", 7, Some(&[1]))), Err(3));
    assert_eq!(code(check_request(s, "nope", 0, Some(&[1]))), Err(3));
    assert_eq!(code(check_request(s, "t", 0, Some(&[1, 1]))), Err(39));
    assert_eq!(code(check_request(s, "t", 0, Some(&[1, 9]))), Err(39));
    assert_eq!(code(check_request(s, "t", 0, Some(&[]))), Err(39));
    assert_eq!(code(check_request(s, "t", 0, None)), Err(85));
    assert_eq!(check_request(s, "t", 0, Some(&[4, 1])), Ok(()));
    let bad = vec![
        ("t".to_string(), 7, Some(vec![1])),
        ("t".to_string(), 0, Some(vec![1, 1])),
        ("t".to_string(), 0, Some(vec![9])),
        ("t".to_string(), 0, None),
    ];
    assert_eq!(h.ctl.reassign(&bad).unwrap(), Vec::<Record>::new());
    // A state that never sees the controller's checks still refuses what it never proposes.
    let mut s = h.follower.clone();
    assert!(s
        .apply(&Record::FinishReassignment {
            topic: "t".into(),
            partition: 0,
            replicas: vec![1]
        })
        .is_err());
    assert!(s
        .apply(&Record::Reassign {
            topic: "t".into(),
            partition: 0,
            target: None
        })
        .is_err());
    assert_eq!(s, h.follower, "a refused record changed the state");
}

#[test]
fn a_move_goes_with_its_topic_and_records_round_trip() {
    let mut h = four_nodes();
    let recs = h.ctl.reassign(&to(&[4])).unwrap();
    for r in &recs {
        let b = RecordBatch::new(vec![r.clone()]);
        assert_eq!(RecordBatch::decode(b.encode()).unwrap(), b);
    }
    let fin = RecordBatch::new(vec![Record::FinishReassignment {
        topic: "t".into(),
        partition: 0,
        replicas: vec![4, 2],
    }]);
    assert_eq!(RecordBatch::decode(fin.encode()).unwrap(), fin);
    h.commit(recs);
    assert_eq!(h.follower.reassignments.len(), 1);
    let recs = h.ctl.delete_topic("t").unwrap();
    h.commit(recs);
    assert!(h.follower.reassignments.is_empty());
}

#[test]
fn a_move_survives_a_controller_failover_repeats_as_a_no_op_and_finishes_after_it() {
    let mut net = Net::new(&VOTERS);
    net.until(5_000, "cluster formed", |n| {
        n.controllers().len() == 1
            && n.nodes
                .values()
                .all(|d| d.view().live_brokers().count() == 3)
    });
    let create = AdminCall::CreateTopic {
        req: CreateTopicRequest {
            name: "t".into(),
            topic_id: 42,
            partitions: 1,
            replication_factor: Some(2),
            configs: Vec::new(),
        },
        validate_only: false,
    };
    assert_eq!(net.call(1, 1, create), Ok(CallAnswer::Done));
    let ctl = net.controllers()[0];
    let p = net.nodes[&1].state().partition("t", 0).unwrap().clone();
    // The partition's leader: a replica that is not the controller (which is killed below).
    let leader = *nodes(&p)
        .iter()
        .find(|&&n| n != ctl)
        .unwrap_or(&p.replicas[0].node);
    let req = AlterIsrRequest {
        topic: "t".into(),
        partition: 0,
        leader,
        leader_epoch: 1,
        isr: nodes(&p),
    };
    net.nodes
        .get_mut(&leader)
        .unwrap()
        .report_leader(0, req)
        .unwrap();
    net.until(3_000, "leader recorded", |n| {
        n.agree() && n.nodes[&1].state().partition("t", 0).unwrap().leader == Some(leader)
    });
    // Move onto the node that holds no replica, keeping the leader.
    let spare = *VOTERS.iter().find(|n| !p.has_replica(**n)).unwrap();
    let target = vec![leader, spare];
    let reassign = || AdminCall::Reassign {
        moves: vec![("t".into(), 0, Some(target.clone()))],
    };
    let asker = *VOTERS.iter().find(|&&v| v != ctl).unwrap();
    assert_eq!(net.call(asker, 2, reassign()), Ok(CallAnswer::Done));
    net.until(2_000, "all applied", |n| n.agree());
    net.kill(ctl);
    net.until(5_000, "new controller", |n| n.controllers().len() == 1);
    net.until(3_000, "dead controller fenced", |n| {
        n.agree() && n.nodes.values().all(|d| d.state().brokers[&ctl].fenced)
    });
    let survivors: Vec<NodeId> = net.nodes.keys().copied().collect();
    for &n in &survivors {
        let r = net.nodes[&n].state().reassignment("t", 0).cloned();
        assert_eq!(
            r.map(|r| r.target_nodes()),
            Some(target.clone()),
            "node {n}"
        );
    }
    let quiet = net.nodes[&asker].applied();
    assert_eq!(net.call(asker, 3, reassign()), Ok(CallAnswer::Done));
    for _ in 0..10 {
        net.step();
    }
    assert_eq!(
        net.nodes[&asker].applied(),
        quiet,
        "a repeated move was recorded"
    );
    // The leader reports the end to the new controller.
    let finish = AdminCall::FinishReassignment {
        topic: "t".into(),
        partition: 0,
        replicas: target.clone(),
    };
    assert_eq!(net.call(leader, 4, finish), Ok(CallAnswer::Done));
    net.until(2_000, "finish applied", |n| {
        n.agree()
            && n.nodes
                .values()
                .all(|d| d.state().reassignment("t", 0).is_none())
    });
    let p = net.nodes[&asker].state().partition("t", 0).unwrap().clone();
    assert_eq!(nodes(&p), target);
    // A node that does not lead cannot finish a move.
    let reassign_back = AdminCall::Reassign {
        moves: vec![("t".into(), 0, Some(vec![leader]))],
    };
    assert_eq!(net.call(asker, 5, reassign_back), Ok(CallAnswer::Done));
    let impostor = *survivors.iter().find(|&&n| n != leader).unwrap();
    let finish = AdminCall::FinishReassignment {
        topic: "t".into(),
        partition: 0,
        replicas: vec![leader],
    };
    assert_eq!(
        net.call(impostor, 6, finish),
        Err(RpcErrorCode::FencedLeaderEpoch)
    );
}

#[test]
fn reassignment_frames_round_trip_and_hostile_counts_are_refused() {
    use spate_replication::controller::reassignment::MAX_PARTITIONS_PER_REASSIGNMENT;
    use spate_replication::rpc::RpcMessage;

    let codec = FrameCodec::default();
    for message in [
        RpcMessage::AlterReassignments {
            moves: vec![("a".into(), 0, Some(vec![1, 2, 4])), ("b".into(), 3, None)],
        },
        RpcMessage::AlterReassignments { moves: Vec::new() },
        RpcMessage::FinishReassignment {
            leader: 2,
            topic: "a".into(),
            partition: 9,
            replicas: vec![2, 4],
        },
    ] {
        let frame = Frame {
            correlation_id: 17,
            message,
        };
        let bytes = codec.encode(&frame).unwrap().to_bytes();
        let mut buf = bytes::BytesMut::from(&bytes[..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(frame.clone()));
        let body = bytes.slice(4..);
        for cut in 0..body.len() {
            assert!(
                codec.decode_body(body.slice(..cut)).is_err(),
                "{frame:?} cut {cut}"
            );
        }
    }
    let frame = |message| Frame {
        correlation_id: 1,
        message,
    };
    let too_many = RpcMessage::AlterReassignments {
        moves: vec![(String::new(), 0, None); MAX_PARTITIONS_PER_REASSIGNMENT + 1],
    };
    assert!(codec.encode(&frame(too_many)).is_err());
    let too_wide = RpcMessage::AlterReassignments {
        moves: vec![("a".into(), 0, Some(vec![1; 17]))],
    };
    assert!(codec.encode(&frame(too_wide)).is_err());
    let ok = codec
        .encode(&frame(RpcMessage::AlterReassignments {
            moves: vec![("a".into(), 1, None)],
        }))
        .unwrap()
        .to_bytes();
    let mut body = bytes::BytesMut::from(&ok[4..]);
    body[9..13].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(codec.decode_body(body.freeze()).is_err());
}
