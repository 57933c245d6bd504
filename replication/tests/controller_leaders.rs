//! Leadership operations as controller decisions (issue 18): preferred-leader elections, the
//! leader balancer and maintenance mode. Each is a record in the metadata log (a wished leader
//! per partition, a broker's maintenance flag) that the current partition leader acts on by a
//! consensus transfer (`leadership::transfer_target` picks the node). Shown here: the rules,
//! that asking again records nothing (idempotent), that every decision applied through its
//! encoding on a follower gives the controller's state, and, with the real driver over an
//! in-memory network, that the records survive a controller failover and a repeated request
//! after it records nothing more.

use spate_replication::controller::active::DEFAULT_LEADER_BALANCE_INTERVAL_MS;
use spate_replication::controller::driver::{AdminCall, CallAnswer};
use spate_replication::controller::leadership::{
    balance_wishes, leaders_of, preferred_election, transfer_target, PreferredElection,
};
use spate_replication::controller::DEFAULT_BROKER_SESSION_TIMEOUT_MS as DEFAULT_SESSION;
use spate_replication::controller::{
    AlterIsrRequest, ControllerConfig, ControllerError, CreateTopicRequest, MetadataState,
    PartitionState, Record, RecordBatch,
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

    fn preferred(&self, i: u32) -> NodeId {
        self.p("t", i).replicas[0].node
    }

    fn second(&self, i: u32) -> NodeId {
        self.p("t", i).replicas[1].node
    }
}

fn all(n: u32) -> Vec<(String, u32)> {
    (0..n).map(|i| ("t".to_string(), i)).collect()
}

fn everyone() -> Vec<NodeId> {
    vec![1, 2, 3]
}

#[test]
fn a_preferred_election_is_recorded_once_and_cleared_when_the_preferred_replica_leads() {
    let mut h = Harness::three_nodes(ControllerConfig::default(), 3);
    // Partition 0 fails over to its second replica.
    let (pref, second) = (h.preferred(0), h.second(0));
    h.elected("t", 0, second, 2);
    assert_eq!(
        preferred_election(&h.follower, "t", 0),
        PreferredElection::Eligible(pref)
    );
    assert_eq!(
        preferred_election(&h.follower, "t", 1),
        PreferredElection::NotNeeded
    );
    assert_eq!(
        preferred_election(&h.follower, "t", 9),
        PreferredElection::UnknownPartition
    );
    // Only partition 0 gets a wish.
    let recs = h.ctl.elect_preferred(&all(3)).unwrap();
    assert_eq!(
        recs,
        vec![Record::ElectLeader {
            topic: "t".into(),
            partition: 0,
            leader: pref
        }]
    );
    h.commit(recs);
    assert_eq!(h.follower.leader_wish("t", 0), Some(pref));
    // Asking again records nothing.
    assert!(h.ctl.elect_preferred(&all(3)).unwrap().is_empty());
    // The current leader hands over to the preferred replica once it is in sync; nobody
    // else moves anything.
    assert_eq!(
        transfer_target(&h.follower, "t", 0, second, &everyone()),
        Some(pref)
    );
    assert_eq!(
        transfer_target(&h.follower, "t", 0, second, &[second]),
        None
    );
    assert_eq!(
        transfer_target(&h.follower, "t", 1, h.preferred(1), &everyone()),
        None
    );
    // The preferred replica's group wins epoch 3 and reports: the wish is done.
    h.elected("t", 0, pref, 3);
    assert_eq!(h.follower.leader_wish("t", 0), None);
    assert_eq!(
        preferred_election(&h.follower, "t", 0),
        PreferredElection::NotNeeded
    );
    assert!(h.ctl.elect_preferred(&all(3)).unwrap().is_empty());
}

#[test]
fn a_preferred_replica_down_out_of_sync_or_in_maintenance_is_not_available() {
    let mut h = Harness::three_nodes(ControllerConfig::default(), 3);
    let (pref, second) = (h.preferred(0), h.second(0));
    h.elected("t", 0, second, 2);
    // Out of the ISR (the leader reported it lagging).
    let isr: Vec<NodeId> = everyone().into_iter().filter(|&n| n != pref).collect();
    let recs = h
        .ctl
        .alter_isr(AlterIsrRequest {
            topic: "t".into(),
            partition: 0,
            leader: second,
            leader_epoch: 2,
            isr,
        })
        .unwrap();
    h.commit(recs);
    assert!(matches!(
        preferred_election(&h.follower, "t", 0),
        PreferredElection::NotAvailable(why) if why.contains("ISR")
    ));
    assert!(h.ctl.elect_preferred(&all(3)).unwrap().is_empty());
    // Back in sync, but in maintenance.
    h.elected("t", 0, second, 2);
    let recs = h.ctl.set_maintenance(pref, true).unwrap();
    h.commit(recs);
    assert!(matches!(
        preferred_election(&h.follower, "t", 0),
        PreferredElection::NotAvailable(why) if why.contains("maintenance")
    ));
    assert!(h.ctl.elect_preferred(&all(3)).unwrap().is_empty());
    let recs = h.ctl.set_maintenance(pref, false).unwrap();
    h.commit(recs);
    // Fenced (its session ran out): not available, and a wish for it is dropped.
    let recs = h.ctl.elect_preferred(&all(3)).unwrap();
    h.commit(recs);
    assert_eq!(h.follower.leader_wish("t", 0), Some(pref));
    let mut now = 0;
    while !h.follower.brokers[&pref].fenced {
        now += 250;
        for n in everyone().into_iter().filter(|&n| n != pref) {
            h.heartbeat(n, now);
        }
        let recs = h.ctl.tick(now);
        h.commit(recs);
    }
    assert_eq!(
        h.follower.leader_wish("t", 0),
        None,
        "a fenced target's wish"
    );
    assert!(matches!(
        preferred_election(&h.follower, "t", 0),
        PreferredElection::NotAvailable(_)
    ));
}

#[test]
fn maintenance_moves_leaders_away_one_broker_at_a_time_and_is_idempotent() {
    let mut h = Harness::three_nodes(ControllerConfig::default(), 6);
    assert_eq!(
        leaders_of(&h.follower, 2),
        2,
        "placement: two leaders per node"
    );
    let recs = h.ctl.set_maintenance(2, true).unwrap();
    assert_eq!(recs, vec![Record::SetMaintenance { node: 2, on: true }]);
    h.commit(recs);
    assert!(h.follower.maintenance.contains(&2));
    // Again: nothing to record.
    assert!(h.ctl.set_maintenance(2, true).unwrap().is_empty());
    // A second broker in maintenance is refused.
    assert!(matches!(
        h.ctl.set_maintenance(3, true),
        Err(ControllerError::Invalid(m)) if m.contains("one broker at a time")
    ));
    assert!(matches!(
        h.ctl.set_maintenance(9, true),
        Err(ControllerError::UnknownBroker(9))
    ));
    // Every partition node 2 leads goes to the first other in-sync replica; no other leader
    // moves, and nothing moves to node 2.
    for i in 0..6 {
        let p = h.p("t", i);
        let leader = p.leader.unwrap();
        let target = transfer_target(&h.follower, "t", i, leader, &everyone());
        if leader == 2 {
            let first_other = p.replicas.iter().map(|r| r.node).find(|&n| n != 2);
            assert_eq!(target, first_other, "partition {i}");
            // Not to a follower that is not in sync.
            assert_eq!(
                transfer_target(&h.follower, "t", i, 2, &[2, first_other.unwrap()]),
                first_other
            );
            assert_eq!(transfer_target(&h.follower, "t", i, 2, &[2]), None);
        } else {
            assert_eq!(target, None, "partition {i}");
        }
    }
    // Node 2's partitions move; neither an election nor the balancer names node 2.
    for i in 0..6 {
        if h.p("t", i).leader == Some(2) {
            let to = h
                .p("t", i)
                .replicas
                .iter()
                .map(|r| r.node)
                .find(|&n| n != 2);
            h.elected("t", i, to.unwrap(), 2);
        }
    }
    assert_eq!(leaders_of(&h.follower, 2), 0);
    assert!(h.ctl.elect_preferred(&all(6)).unwrap().is_empty());
    assert!(balance_wishes(&h.follower).is_empty());
    // Off: the balancer brings node 2's preferred leaderships back.
    let recs = h.ctl.set_maintenance(2, false).unwrap();
    h.commit(recs);
    assert!(h.ctl.set_maintenance(2, false).unwrap().is_empty());
    let wishes = balance_wishes(&h.follower);
    assert_eq!(wishes.len(), 2, "{wishes:?}");
    for w in &wishes {
        assert!(matches!(w, Record::ElectLeader { leader: 2, .. }), "{w:?}");
    }
}

#[test]
fn the_balancer_runs_on_its_interval_only_and_can_be_turned_off() {
    let interval = DEFAULT_LEADER_BALANCE_INTERVAL_MS;
    let mut h = Harness::three_nodes(ControllerConfig::default(), 6);
    // Every leader moves off node 1 (it restarted).
    for i in 0..6 {
        if h.p("t", i).leader == Some(1) {
            let second = h.second(i);
            h.elected("t", i, second, 2);
        }
    }
    assert_eq!(leaders_of(&h.follower, 1), 0);
    assert!(h.ctl.balance_leaders(interval - 1).is_empty(), "too early");
    let recs = h.ctl.balance_leaders(interval);
    assert_eq!(recs.len(), 2, "{recs:?}");
    h.commit(recs);
    // Pending wishes are not recorded again, at the next round either.
    assert!(h.ctl.balance_leaders(interval + 1).is_empty());
    assert!(h.ctl.balance_leaders(3 * interval).is_empty());

    let off = ControllerConfig {
        leader_balance_interval_ms: None,
        ..ControllerConfig::default()
    };
    let mut h = Harness::three_nodes(off, 3);
    let second = h.second(0);
    h.elected("t", 0, second, 2);
    assert!(h.ctl.balance_leaders(100 * interval).is_empty(), "off");
}

#[test]
fn wishes_go_with_their_topic_and_records_round_trip() {
    let mut h = Harness::three_nodes(ControllerConfig::default(), 2);
    let second = h.second(1);
    h.elected("t", 1, second, 2);
    let recs = h.ctl.elect_preferred(&all(2)).unwrap();
    h.commit(recs);
    assert_eq!(h.follower.leader_wishes.len(), 1);
    let recs = h.ctl.delete_topic("t").unwrap();
    h.commit(recs);
    assert!(h.follower.leader_wishes.is_empty());
    // Hostile or foreign values are refused by every node alike.
    let mut s = h.follower.clone();
    assert!(s
        .apply(&Record::SetMaintenance { node: 42, on: true })
        .is_err());
    assert!(s
        .apply(&Record::ElectLeader {
            topic: "t".into(),
            partition: 0,
            leader: 1
        })
        .is_err());
    for r in [
        Record::ElectLeader {
            topic: "x".into(),
            partition: 7,
            leader: 3,
        },
        Record::SetMaintenance { node: 2, on: true },
        Record::SetMaintenance { node: 2, on: false },
    ] {
        let bytes = RecordBatch::new(vec![r.clone()]).encode();
        assert_eq!(RecordBatch::decode(bytes.clone()).unwrap().records, vec![r]);
        for cut in 0..bytes.len() {
            assert!(
                RecordBatch::decode(bytes.slice(..cut)).is_err(),
                "prefix {cut}"
            );
        }
    }
}

// ---- the driver: across a controller failover ----------------------------------------------

#[test]
fn elections_and_maintenance_survive_a_controller_failover_and_repeat_as_no_ops() {
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
            partitions: 3,
            replication_factor: Some(3),
            configs: Vec::new(),
        },
        validate_only: false,
    };
    assert_eq!(net.call(1, 1, create), Ok(CallAnswer::Done));
    // The groups elect: one partition whose preferred replica is not the controller (which
    // is killed below) its second replica, the others their preferred one.
    let ctl = net.controllers()[0];
    let parts: Vec<PartitionState> = (0..3)
        .map(|i| net.nodes[&1].state().partition("t", i).unwrap().clone())
        .collect();
    let moved = parts
        .iter()
        .position(|p| p.replicas[0].node != ctl)
        .unwrap();
    for (i, p) in parts.iter().enumerate() {
        let leader = p.replicas[usize::from(i == moved)].node;
        let req = AlterIsrRequest {
            topic: "t".into(),
            partition: i as u32,
            leader,
            leader_epoch: 1,
            isr: vec![1, 2, 3],
        };
        net.nodes
            .get_mut(&leader)
            .unwrap()
            .report_leader(i as u64, req)
            .unwrap();
    }
    net.until(3_000, "leaders recorded", |n| {
        n.agree()
            && (0..3).all(|i| {
                n.nodes[&1]
                    .state()
                    .partition("t", i)
                    .is_some_and(|p| p.elected_leader().is_some())
            })
    });
    let pref0 = parts[moved].replicas[0].node;
    let moved = moved as u32;
    let elect = || AdminCall::ElectLeaders { partitions: all(3) };
    // From a node that need not be the controller: answered once applied there.
    let asker = *VOTERS.iter().find(|&&v| v != net.controllers()[0]).unwrap();
    assert_eq!(net.call(asker, 2, elect()), Ok(CallAnswer::Done));
    assert_eq!(
        net.nodes[&asker].state().leader_wish("t", moved),
        Some(pref0)
    );
    let node = *VOTERS.iter().find(|&&v| v != ctl && v != pref0).unwrap();
    let maint = |on| AdminCall::SetMaintenance { node, on };
    assert_eq!(net.call(asker, 3, maint(true)), Ok(CallAnswer::Done));
    assert!(net.nodes[&asker].state().maintenance.contains(&node));
    net.until(2_000, "all applied", |n| n.agree());
    let applied = net.nodes[&asker].applied();

    // The controller dies; a new one takes over with the records in its state.
    let old = net.controllers()[0];
    assert_eq!(old, ctl);
    net.kill(old);
    net.until(5_000, "new controller", |n| n.controllers().len() == 1);
    let survivors: Vec<NodeId> = net.nodes.keys().copied().collect();
    for &n in &survivors {
        let s = net.nodes[&n].state();
        assert_eq!(s.leader_wish("t", moved), Some(pref0), "node {n}");
        assert!(s.maintenance.contains(&node), "node {n}");
    }
    // Once the dead controller is fenced everywhere the log is quiet; asking again is then
    // answered and records nothing.
    net.until(3_000, "dead controller fenced", |n| {
        n.agree() && n.nodes.values().all(|d| d.state().brokers[&old].fenced)
    });
    let to_ask = survivors[0];
    let quiet = net.nodes[&to_ask].applied();
    assert!(quiet >= applied);
    assert_eq!(net.call(to_ask, 4, elect()), Ok(CallAnswer::Done));
    assert_eq!(net.call(to_ask, 5, maint(true)), Ok(CallAnswer::Done));
    for _ in 0..10 {
        net.step();
    }
    assert_eq!(
        net.nodes[&to_ask].applied(),
        quiet,
        "a repeated request was recorded"
    );
    let s = net.nodes[&to_ask].state();
    assert_eq!(s.maintenance, [node].into_iter().collect());
    assert_eq!(s.leader_wish("t", moved), Some(pref0));
    // Turning maintenance off is recorded once, on every survivor.
    assert_eq!(net.call(to_ask, 6, maint(false)), Ok(CallAnswer::Done));
    net.until(2_000, "off applied", |n| {
        n.agree() && n.nodes.values().all(|d| d.state().maintenance.is_empty())
    });
    // An unknown broker's maintenance is refused as such (not retried as this node's loss).
    assert_eq!(
        net.call(to_ask, 7, AdminCall::SetMaintenance { node: 99, on: true }),
        Err(RpcErrorCode::UnknownBroker)
    );
}

// ---- randomized: decisions, faults and the runtime's transfers interleaved -----------------

/// SplitMix64: a seed fixes a run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const RANDOM_SEEDS: u64 = 48;
const RANDOM_STEPS: usize = 300;
const RANDOM_PARTITIONS: u32 = 8;

/// What every node's state must satisfy after every applied decision.
fn check_leadership_invariants(s: &MetadataState) {
    assert!(s.maintenance.len() <= 1, "{:?}", s.maintenance);
    for n in &s.maintenance {
        assert!(
            s.brokers.contains_key(n),
            "maintenance of unknown broker {n}"
        );
    }
    for ((topic, partition), &target) in &s.leader_wishes {
        let p = s
            .partition(topic, *partition)
            .expect("a wish for a known partition");
        assert!(
            p.has_replica(target),
            "wish for a non-replica: {topic}/{partition}"
        );
        assert!(
            s.is_leader_candidate(target),
            "wish for {target}, fenced or in maintenance: {topic}/{partition}"
        );
        assert_ne!(
            p.leader,
            Some(target),
            "a wish already done stays: {topic}/{partition}"
        );
    }
    for (topic, t) in &s.topics {
        for (i, p) in t.partitions.iter().enumerate() {
            let Some(leader) = p.leader else { continue };
            let in_sync = p.isr.clone();
            if let Some(to) = transfer_target(s, topic, i as u32, leader, &in_sync) {
                assert_ne!(to, leader);
                assert!(s.is_leader_candidate(to), "transfer to {to}: {topic}/{i}");
                assert!(p.isr.contains(&to), "transfer to {to} out of the ISR");
            }
        }
    }
}

/// The runtime's part: each leader the state wants moved hands over (the transfer succeeds,
/// the target's group wins the next epoch and reports). Returns whether anything moved.
fn run_transfers(h: &mut Harness) -> bool {
    let mut moved = false;
    for i in 0..RANDOM_PARTITIONS {
        let p = h.p("t", i);
        let Some(leader) = p.leader else { continue };
        let Some(to) = transfer_target(&h.follower, "t", i, leader, &p.isr) else {
            continue;
        };
        let recs = h
            .ctl
            .alter_isr(AlterIsrRequest {
                topic: "t".into(),
                partition: i,
                leader: to,
                leader_epoch: p.leader_epoch + 1,
                isr: p.isr.clone(),
            })
            .unwrap();
        h.commit(recs);
        check_leadership_invariants(&h.follower);
        moved = true;
    }
    moved
}

#[test]
fn random_elections_maintenance_faults_and_transfers_keep_the_invariants_and_settle() {
    for seed in 0..RANDOM_SEEDS {
        let mut rng = Rng(seed);
        let interval = 1_000;
        let cfg = ControllerConfig {
            leader_balance_interval_ms: Some(interval),
            ..ControllerConfig::default()
        };
        let mut h = Harness::three_nodes(cfg, RANDOM_PARTITIONS as usize);
        let mut now = 0u64;
        for _ in 0..RANDOM_STEPS {
            now += 100;
            let node = 1 + rng.below(3);
            match rng.below(7) {
                0 => {
                    let n = 1 + rng.below(u64::from(RANDOM_PARTITIONS)) as u32;
                    let recs = h.ctl.elect_preferred(&all(n)).unwrap();
                    h.commit(recs);
                }
                1 => {
                    let on = rng.below(2) == 0;
                    if let Ok(recs) = h.ctl.set_maintenance(node, on) {
                        h.commit(recs);
                    }
                }
                2 => {
                    // A group election: a live replica wins a newer epoch with the live
                    // replicas in sync.
                    let i = rng.below(u64::from(RANDOM_PARTITIONS)) as u32;
                    let p = h.p("t", i);
                    let live: Vec<NodeId> = p
                        .replicas
                        .iter()
                        .map(|r| r.node)
                        .filter(|&n| h.follower.is_live(n))
                        .collect();
                    if !live.is_empty() {
                        let leader = live[rng.below(live.len() as u64) as usize];
                        let recs = h
                            .ctl
                            .alter_isr(AlterIsrRequest {
                                topic: "t".into(),
                                partition: i,
                                leader,
                                leader_epoch: p.leader_epoch + 1,
                                isr: live,
                            })
                            .unwrap();
                        h.commit(recs);
                    }
                }
                3 => {
                    // `node` goes silent for a session: fenced.
                    let until = now + DEFAULT_SESSION + 100;
                    while now < until {
                        now += 250;
                        for n in everyone().into_iter().filter(|&n| n != node) {
                            h.heartbeat(n, now);
                        }
                        let recs = h.ctl.tick(now);
                        h.commit(recs);
                    }
                }
                4 => h.heartbeat(node, now), // back (unfenced), or a plain heartbeat
                5 => {
                    let recs = h.ctl.balance_leaders(now);
                    h.commit(recs);
                }
                _ => {
                    run_transfers(&mut h);
                }
            }
            check_leadership_invariants(&h.follower);
        }
        // Fault-free: everyone back and in sync, maintenance off, the balancer and the
        // runtime's transfers run until nothing moves: every partition led by its preferred
        // replica.
        for n in everyone() {
            h.heartbeat(n, now);
            if let Ok(recs) = h.ctl.set_maintenance(n, false) {
                h.commit(recs);
            }
        }
        for i in 0..RANDOM_PARTITIONS {
            let p = h.p("t", i);
            let leader = p.leader.unwrap_or(p.replicas[0].node);
            let recs = h
                .ctl
                .alter_isr(AlterIsrRequest {
                    topic: "t".into(),
                    partition: i,
                    leader,
                    leader_epoch: p.leader_epoch + 1,
                    isr: everyone(),
                })
                .unwrap();
            h.commit(recs);
        }
        for round in 0.. {
            assert!(round < 10, "seed {seed}: leadership did not settle");
            now += interval;
            let recs = h.ctl.balance_leaders(now);
            h.commit(recs);
            if !run_transfers(&mut h) {
                break;
            }
        }
        for i in 0..RANDOM_PARTITIONS {
            let p = h.p("t", i);
            assert_eq!(
                p.leader,
                Some(p.replicas[0].node),
                "seed {seed}: partition {i}"
            );
        }
        assert!(h.follower.leader_wishes.is_empty(), "seed {seed}");
    }
}

#[test]
fn election_and_maintenance_frames_round_trip_and_hostile_counts_are_refused() {
    use spate_replication::controller::active::MAX_PARTITIONS_PER_ELECTION;
    use spate_replication::rpc::RpcMessage;

    let codec = FrameCodec::default();
    for message in [
        RpcMessage::ElectLeaders {
            partitions: vec![("a".into(), 0), ("b.c".into(), 9_999)],
        },
        RpcMessage::ElectLeaders {
            partitions: Vec::new(),
        },
        RpcMessage::SetMaintenance { node: 2, on: true },
        RpcMessage::SetMaintenance { node: 0, on: false },
    ] {
        let frame = Frame {
            correlation_id: 17,
            message,
        };
        let bytes = codec.encode(&frame).unwrap().to_bytes();
        let mut buf = bytes::BytesMut::from(&bytes[..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(frame.clone()));
        // Every strict prefix of the body is refused (the frame itself waits for more).
        let body = bytes.slice(4..);
        for cut in 0..body.len() {
            assert!(
                codec.decode_body(body.slice(..cut)).is_err(),
                "{frame:?} cut {cut}"
            );
        }
    }
    // More partitions than the cap, or a node outside Kafka's id range, cannot be sent.
    let too_many = RpcMessage::ElectLeaders {
        partitions: vec![(String::new(), 0); MAX_PARTITIONS_PER_ELECTION + 1],
    };
    let frame = |message| Frame {
        correlation_id: 1,
        message,
    };
    assert!(codec.encode(&frame(too_many)).is_err());
    let foreign = RpcMessage::SetMaintenance {
        node: u64::MAX,
        on: true,
    };
    assert!(codec.encode(&frame(foreign)).is_err());
    // A claimed count above the cap is refused before anything is allocated for it.
    let ok = codec
        .encode(&frame(RpcMessage::ElectLeaders {
            partitions: vec![("a".into(), 1)],
        }))
        .unwrap()
        .to_bytes();
    let mut body = bytes::BytesMut::from(&ok[4..]);
    // Kind (1 byte) and correlation id (8), then the count.
    body[9..13].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(codec.decode_body(body.freeze()).is_err());
}
