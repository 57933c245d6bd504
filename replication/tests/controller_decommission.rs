//! Decommissioning as controller decisions (issue 18, "Decommission"): `SetDecommission` in
//! the metadata log, refused with INVALID_REPLICATION_FACTOR when the brokers left could not
//! hold a partition's replication factor; the active controller's tick then records drain moves
//! (at most `MAX_DECOMMISSION_MOVES_IN_FLIGHT` under way) and more as they finish, until the
//! node holds nothing. A decommissioning node gets no new replicas and leads nothing by choice
//! (placement, preferred elections, leadership transfers). Every decision also applies through
//! its encoding on a follower state, and with the real driver over an in-memory network the
//! drain survives a controller failover and a repeated request records nothing.

use spate_replication::controller::decommission::{progress, MAX_DECOMMISSION_MOVES_IN_FLIGHT};
use spate_replication::controller::driver::{AdminCall, CallAnswer};
use spate_replication::controller::leadership::{
    preferred_election, transfer_target, PreferredElection,
};
use spate_replication::controller::{
    AlterIsrRequest, ControllerConfig, ControllerError, CreateTopicRequest, PartitionState, Record,
    RecordBatch,
};
use spate_replication::rpc::{Frame, FrameCodec, RpcErrorCode, RpcErrorReply};
use spate_replication::NodeId;

#[path = "support/controller.rs"]
mod controller_support;
use controller_support::*;

// ---- the active controller and the rules --------------------------------------------------

// ---- the driver: across a controller failover ----------------------------------------------

fn nodes(p: &PartitionState) -> Vec<NodeId> {
    p.replicas.iter().map(|r| r.node).collect()
}

impl Harness {
    fn topic(&mut self, name: &str, id: u128, partitions: usize, rf: usize) {
        let recs = self
            .ctl
            .create_topic(CreateTopicRequest {
                name: name.into(),
                topic_id: id,
                partitions,
                replication_factor: Some(rf),
                configs: Vec::new(),
            })
            .unwrap();
        self.commit(recs);
    }

    /// Ends every move under way as its leader would: a target replica leads (reporting a new
    /// epoch if the leader is leaving) and reports the end.
    fn finish_moves(&mut self) {
        let moving: Vec<(String, u32, Vec<NodeId>)> = self
            .follower
            .reassignments
            .iter()
            .map(|((t, p), r)| (t.clone(), *p, r.target_nodes()))
            .collect();
        for (topic, partition, target) in moving {
            let p = self.p(&topic, partition);
            let leader = p.leader.filter(|l| target.contains(l));
            let leader = match leader {
                Some(l) => l,
                None => {
                    let l = target[0];
                    let recs = self
                        .ctl
                        .alter_isr(AlterIsrRequest {
                            topic: topic.clone(),
                            partition,
                            leader: l,
                            leader_epoch: p.leader_epoch + 1,
                            isr: nodes(&p),
                        })
                        .unwrap();
                    self.commit(recs);
                    l
                }
            };
            let recs = self
                .ctl
                .finish_reassignment(leader, &topic, partition, &target)
                .unwrap();
            self.commit(recs);
        }
    }

    fn tick(&mut self) -> usize {
        let recs = self.ctl.drain_decommissioned();
        let n = recs.len();
        if n > 0 {
            self.commit(recs);
        }
        n
    }
}

/// Four live brokers; topic `t` of `n` partitions, replication factor 3, each led by its
/// preferred replica in epoch 1.
fn four(n: usize) -> Harness {
    let mut h = Harness::new(ControllerConfig::default());
    for node in 1..=4 {
        h.join(node, 0);
    }
    h.topic("t", 7, n, 3);
    for i in 0..n as u32 {
        let preferred = h.p("t", i).replicas[0].node;
        h.elected("t", i, preferred, 1);
    }
    h
}

#[test]
fn a_drain_moves_every_replica_off_in_bounded_rounds_and_ends_empty() {
    let mut h = four(40);
    let (held, _) = progress(&h.follower, 2);
    assert!(held > MAX_DECOMMISSION_MOVES_IN_FLIGHT, "{held}");
    let recs = h.ctl.set_decommission(2, true).unwrap();
    assert_eq!(recs, vec![Record::SetDecommission { node: 2, on: true }]);
    h.commit(recs);
    // Asking again records nothing.
    assert_eq!(
        h.ctl.set_decommission(2, true).unwrap(),
        Vec::<Record>::new()
    );
    // Nothing new lands on it, and it is no leader candidate.
    h.topic("u", 8, 6, 3);
    for i in 0..6 {
        assert!(
            !h.p("u", i).has_replica(2),
            "new partition placed on node 2"
        );
    }
    let led_by_2 = (0..40u32).find(|&i| h.p("t", i).leader == Some(2)).unwrap();
    assert_eq!(
        preferred_election(&h.follower, "t", led_by_2),
        PreferredElection::NotNeeded
    );
    let p = h.p("t", led_by_2);
    let others: Vec<NodeId> = nodes(&p).into_iter().filter(|&n| n != 2).collect();
    assert!(
        transfer_target(&h.follower, "t", led_by_2, 2, &nodes(&p))
            .is_some_and(|t| others.contains(&t)),
        "a decommissioning leader hands leadership over"
    );
    let preferred_2 =
        (0..40u32).find(|&i| h.p("t", i).replicas[0].node == 2 && h.p("t", i).leader != Some(2));
    if let Some(i) = preferred_2 {
        assert!(matches!(
            preferred_election(&h.follower, "t", i),
            PreferredElection::NotAvailable(_)
        ));
    }
    let mut rounds = 0;
    loop {
        let planned = h.tick();
        assert!(planned <= MAX_DECOMMISSION_MOVES_IN_FLIGHT);
        assert!(
            h.follower.reassignments.len() <= MAX_DECOMMISSION_MOVES_IN_FLIGHT,
            "{} moves under way",
            h.follower.reassignments.len()
        );
        // A second tick before anything finishes plans nothing more.
        assert_eq!(h.tick(), 0);
        if h.follower.reassignments.is_empty() {
            break;
        }
        for r in h.follower.reassignments.values() {
            assert!(!r.target_nodes().contains(&2), "{r:?}");
        }
        h.finish_moves();
        rounds += 1;
        assert!(rounds < 100, "no end");
    }
    assert!(rounds >= 2, "{rounds} rounds");
    assert_eq!(progress(&h.follower, 2), (0, 0));
    for t in h.follower.topics.values() {
        for p in &t.partitions {
            assert_eq!(p.replicas.len(), 3);
            assert!(!p.has_replica(2) && p.leader != Some(2));
        }
    }
    // Recommission: a candidate again, and placement uses it.
    let recs = h.ctl.set_decommission(2, false).unwrap();
    h.commit(recs);
    assert!(h.follower.is_leader_candidate(2));
    h.topic("v", 9, 4, 3);
    assert!((0..4).any(|i| h.p("v", i).has_replica(2)));
}

#[test]
fn too_few_brokers_left_is_refused_with_a_message_and_records_nothing() {
    let mut h = Harness::new(ControllerConfig::default());
    for node in 1..=3 {
        h.join(node, 0);
    }
    h.topic("t", 7, 2, 3);
    let e = h.ctl.set_decommission(1, true).unwrap_err();
    assert!(
        matches!(&e, ControllerError::CannotDecommission(m) if m.contains("replication factor 3")),
        "{e}"
    );
    let reply = RpcErrorReply::from(&e);
    assert_eq!(reply.code, RpcErrorCode::InvalidReplicationFactor);
    assert!(
        reply.message.contains("cannot decommission node 1"),
        "{}",
        reply.message
    );
    assert!(matches!(
        h.ctl.set_decommission(9, true),
        Err(ControllerError::UnknownBroker(9))
    ));
    assert!(h.ctl.state().decommissioning.is_empty());
    // A fourth broker makes room; a second decommission would not leave enough again.
    h.join(4, 0);
    let recs = h.ctl.set_decommission(1, true).unwrap();
    h.commit(recs);
    assert!(h.ctl.set_decommission(2, true).is_err());
    // Moves onto a decommissioning broker are refused by the request checks.
    let free = (0..2u32).find(|&i| !h.p("t", i).has_replica(1));
    if let Some(i) = free {
        let mut target = nodes(&h.p("t", i));
        target[2] = 1;
        assert!(spate_replication::controller::reassignment::check_request(
            &h.follower,
            "t",
            i,
            Some(&target)
        )
        .is_err());
    }
}

#[test]
fn recommission_stops_new_moves_and_lets_recorded_ones_finish() {
    let mut h = four(40);
    let recs = h.ctl.set_decommission(3, true).unwrap();
    h.commit(recs);
    assert_eq!(h.tick(), MAX_DECOMMISSION_MOVES_IN_FLIGHT);
    let under_way = h.follower.reassignments.clone();
    let recs = h.ctl.set_decommission(3, false).unwrap();
    h.commit(recs);
    assert_eq!(h.tick(), 0);
    assert_eq!(h.follower.reassignments, under_way, "recorded moves stay");
    h.finish_moves();
    assert_eq!(h.tick(), 0, "recommissioned: no new moves");
    let (left, moving) = progress(&h.follower, 3);
    assert!(left > 0 && moving == 0);
    // The records round-trip.
    for on in [true, false] {
        let b = RecordBatch::new(vec![Record::SetDecommission { node: 3, on }]);
        assert_eq!(RecordBatch::decode(b.encode()).unwrap(), b);
    }
}

#[test]
fn a_drain_survives_a_controller_failover_and_a_repeat_records_nothing() {
    let mut net = Net::new(&[1, 2, 3, 4]);
    net.until(8_000, "cluster formed", |n| {
        n.controllers().len() == 1
            && n.nodes
                .values()
                .all(|d| d.view().live_brokers().count() == 4)
    });
    let create = AdminCall::CreateTopic {
        req: CreateTopicRequest {
            name: "t".into(),
            topic_id: 42,
            partitions: 24,
            replication_factor: Some(2),
            configs: Vec::new(),
        },
        validate_only: false,
    };
    assert_eq!(net.call(1, 1, create), Ok(CallAnswer::Done));
    let decommission = |on| AdminCall::SetDecommission { node: 4, on };
    assert_eq!(net.call(2, 2, decommission(true)), Ok(CallAnswer::Done));
    net.until(3_000, "first drain moves recorded", |n| {
        n.agree() && !n.nodes[&1].state().reassignments.is_empty()
    });
    let first = net.nodes[&1].state().reassignments.len();
    assert!(first <= MAX_DECOMMISSION_MOVES_IN_FLIGHT, "{first}");
    let ctl = net.controllers()[0];
    net.kill(ctl);
    net.until(5_000, "new controller", |n| n.controllers().len() == 1);
    let survivors: Vec<NodeId> = net.nodes.keys().copied().collect();
    let asker = survivors[0];
    // Asked again of the new controller: answered, and the drain goes on from the log.
    assert_eq!(net.call(asker, 3, decommission(true)), Ok(CallAnswer::Done));
    assert!(net.nodes[&asker].state().decommissioning.contains(&4));
    // Finish moves as partition leaders would, until node 4 holds nothing. The dead
    // controller's replicas are fenced, so only moves whose target is alive can finish; the
    // drain never targets a fenced broker.
    let mut call = 10;
    for _ in 0..200 {
        net.until(3_000, "agreed", |n| n.agree());
        let state = net.nodes[&asker].state().clone();
        if progress(&state, 4) == (0, 0) {
            break;
        }
        for ((topic, partition), r) in &state.reassignments {
            let target = r.target_nodes();
            assert!(!target.contains(&4));
            let p = state.partition(topic, *partition).unwrap();
            let Some(&leader) = target.iter().find(|n| !net.down.contains(n)) else {
                continue;
            };
            if p.leader != Some(leader) {
                let req = AlterIsrRequest {
                    topic: topic.clone(),
                    partition: *partition,
                    leader,
                    leader_epoch: p.leader_epoch + 1,
                    isr: nodes(p)
                        .into_iter()
                        .filter(|n| !net.down.contains(n))
                        .collect(),
                };
                net.nodes
                    .get_mut(&leader)
                    .unwrap()
                    .report_leader(0, req)
                    .unwrap();
                net.until(3_000, "leader recorded", |n| {
                    n.agree()
                        && n.nodes[&asker]
                            .state()
                            .partition(topic, *partition)
                            .unwrap()
                            .leader
                            == Some(leader)
                });
            }
            call += 1;
            let finish = AdminCall::FinishReassignment {
                topic: topic.clone(),
                partition: *partition,
                replicas: target.clone(),
            };
            assert_eq!(net.call(leader, call, finish), Ok(CallAnswer::Done));
        }
        for _ in 0..4 {
            net.step();
        }
    }
    let state = net.nodes[&asker].state().clone();
    assert_eq!(progress(&state, 4), (0, 0), "node 4 still holds replicas");
    for p in state.topics["t"].partitions.iter() {
        assert_eq!(p.replicas.len(), 2);
    }
    // Recommission goes through any node and is applied everywhere.
    assert_eq!(
        net.call(asker, 9, decommission(false)),
        Ok(CallAnswer::Done)
    );
    net.until(2_000, "recommission applied", |n| {
        n.agree()
            && n.nodes
                .values()
                .all(|d| d.state().decommissioning.is_empty())
    });
}

#[test]
fn decommission_frames_round_trip_and_hostile_ids_are_refused() {
    use spate_replication::rpc::RpcMessage;
    let codec = FrameCodec::default();
    for message in [
        RpcMessage::SetDecommission { node: 2, on: true },
        RpcMessage::SetDecommission { node: 0, on: false },
    ] {
        let frame = Frame {
            correlation_id: 5,
            message,
        };
        let bytes = codec.encode(&frame).unwrap().to_bytes();
        let mut buf = bytes::BytesMut::from(&bytes[..]);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap(), frame);
    }
    let too_big = Frame {
        correlation_id: 1,
        message: RpcMessage::SetDecommission {
            node: u64::MAX,
            on: true,
        },
    };
    assert!(codec.encode(&too_big).is_err());
}
