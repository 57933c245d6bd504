//! The controller's decisions, one rule per test: registration and node UUIDs, fencing on a
//! missed session (it drops the broker's leaderships; the partition group's election, reported
//! with a newer epoch, installs the next leader), ISR shrink and expand with leader-epoch
//! fencing, producer-id blocks, topic creation and placement (with property tests for balance).
//! Every record decided is also applied to a follower's state through its encoding, which must
//! end up identical to the controller's.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use spate_replication::controller::{
    default_min_insync_replicas, default_replication_factor, ActiveController, AlterIsrRequest,
    ApplyError, BrokerRegistration, ControllerConfig, ControllerError, CreateTopicRequest, Effect,
    Endpoint, HeartbeatRequest, MetadataState, PartitionState, PlacementError, Placer, Record,
    RecordBatch, RegisterRequest, DEFAULT_BROKER_SESSION_TIMEOUT_MS,
};

const SESSION: u64 = DEFAULT_BROKER_SESSION_TIMEOUT_MS;

struct Harness {
    ctl: ActiveController,
    /// A follower applying the committed batches.
    follower: MetadataState,
    epochs: BTreeMap<u64, u64>,
    effects: Vec<Effect>,
}

fn uuid(node: u64) -> u128 {
    0xABCD_0000 + u128::from(node)
}

fn endpoint(port: u16) -> Endpoint {
    Endpoint {
        host: "127.0.0.1".into(),
        port,
    }
}

impl Harness {
    fn new() -> Self {
        Harness {
            ctl: ActiveController::new(ControllerConfig::default(), MetadataState::new(), 0),
            follower: MetadataState::new(),
            epochs: BTreeMap::new(),
            effects: Vec::new(),
        }
    }

    /// "Commits" a decision: encode, decode, apply on the follower, compare states.
    fn commit(&mut self, records: Vec<Record>) {
        let bytes = RecordBatch::new(records).encode();
        let batch = RecordBatch::decode(bytes).unwrap();
        let (effects, res) = self.follower.apply_batch(&batch);
        res.unwrap();
        self.effects.extend(effects);
        assert_eq!(&self.follower, self.ctl.state(), "follower diverged");
        check_invariants(&self.follower);
    }

    fn register_with(&mut self, node: u64, node_uuid: u128, shards: u32, now: u64) {
        let recs = self
            .ctl
            .register(
                RegisterRequest {
                    node,
                    node_uuid,
                    rpc: endpoint(9192),
                    kafka: endpoint(9092),
                    shards,
                },
                now,
            )
            .unwrap();
        let Some(Record::RegisterBroker(reg)) = recs.last() else {
            panic!("no registration: {recs:?}")
        };
        self.epochs.insert(node, reg.broker_epoch);
        self.commit(recs);
    }

    /// Registers and unfences `node`.
    fn join(&mut self, node: u64, shards: u32, now: u64) {
        self.register_with(node, uuid(node), shards, now);
        self.heartbeat(node, now);
    }

    fn heartbeat(&mut self, node: u64, now: u64) -> bool {
        let (recs, fenced) = self
            .ctl
            .heartbeat(
                HeartbeatRequest {
                    node,
                    broker_epoch: self.epochs[&node],
                    want_fence: false,
                },
                now,
            )
            .unwrap();
        self.commit(recs);
        fenced
    }

    fn create(&mut self, name: &str, partitions: usize, rf: Option<usize>) {
        let recs = self
            .ctl
            .create_topic(CreateTopicRequest {
                name: name.into(),
                topic_id: 1 + self.follower.topics.len() as u128,
                partitions,
                replication_factor: rf,
                configs: vec![("min.insync.replicas".into(), "2".into())],
            })
            .unwrap();
        self.commit(recs);
    }

    fn p(&self, topic: &str, i: u32) -> PartitionState {
        self.follower.partition(topic, i).unwrap().clone()
    }
}

fn check_invariants(s: &MetadataState) {
    for (name, t) in &s.topics {
        for (i, p) in t.partitions.iter().enumerate() {
            if let Some(l) = p.leader {
                assert!(p.isr.contains(&l), "{name}/{i}: leader outside ISR {p:?}");
                assert!(s.is_live(l), "{name}/{i}: fenced leader {l}");
            }
            let nodes: BTreeSet<_> = p.replicas.iter().map(|r| r.node).collect();
            assert_eq!(
                nodes.len(),
                p.replicas.len(),
                "{name}/{i}: two replicas on a node"
            );
        }
    }
}

#[test]
fn a_new_broker_starts_fenced_and_is_unfenced_by_its_heartbeat() {
    let mut h = Harness::new();
    h.register_with(1, uuid(1), 2, 0);
    assert!(h.follower.brokers[&1].fenced);
    assert!(!h.heartbeat(1, 10));
    assert!(!h.follower.brokers[&1].fenced);
    assert!(matches!(
        h.effects.as_slice(),
        [
            Effect::BrokerRegistered { node: 1, .. },
            Effect::BrokerUnfenced { node: 1 }
        ]
    ));
    // A heartbeat from an older incarnation is refused.
    let e = h
        .ctl
        .heartbeat(
            HeartbeatRequest {
                node: 1,
                broker_epoch: h.epochs[&1] + 5,
                want_fence: false,
            },
            20,
        )
        .unwrap_err();
    assert!(matches!(e, ControllerError::StaleBrokerEpoch { .. }));
}

#[test]
fn registrations_outside_the_kafka_id_range_are_refused() {
    let mut h = Harness::new();
    for (node, node_uuid) in [(u64::MAX, 1), (1 << 31, 1), (1, 0)] {
        let e = h
            .ctl
            .register(
                RegisterRequest {
                    node,
                    node_uuid,
                    rpc: endpoint(1),
                    kafka: endpoint(2),
                    shards: 1,
                },
                0,
            )
            .unwrap_err();
        assert!(matches!(e, ControllerError::Invalid(_)), "{e}");
    }
    let mut s = MetadataState::new();
    let reg = BrokerRegistration {
        node: u64::MAX,
        node_uuid: 1,
        broker_epoch: 1,
        rpc: endpoint(1),
        kafka: endpoint(2),
        shards: 1,
    };
    assert!(s.apply(&Record::RegisterBroker(reg)).is_err());
}

#[test]
fn a_node_id_reused_with_another_uuid_is_refused_until_unregistered() {
    let mut h = Harness::new();
    for n in 1..=3 {
        h.join(n, 1, 0);
    }
    h.create("t", 3, Some(3));
    let wiped = RegisterRequest {
        node: 2,
        node_uuid: 0xDEAD,
        rpc: endpoint(1),
        kafka: endpoint(2),
        shards: 1,
    };
    let e = h.ctl.register(wiped.clone(), 5).unwrap_err();
    assert_eq!(e, ControllerError::NodeIdInUse { node: 2 });
    assert!(e.to_string().contains("unregister"), "{e}");
    // The record itself is refused by every node's state too.
    let mut s = h.follower.clone();
    let reg = BrokerRegistration {
        node: 2,
        node_uuid: 0xDEAD,
        broker_epoch: s.last_broker_epoch + 1,
        rpc: endpoint(1),
        kafka: endpoint(2),
        shards: 1,
    };
    assert_eq!(
        s.apply(&Record::RegisterBroker(reg)),
        Err(ApplyError::UuidMismatch { node: 2 })
    );

    // The operator unregisters node 2: it leaves every ISR (it may have lost its data).
    let recs = h.ctl.unregister(2).unwrap();
    h.commit(recs);
    assert!(!h.follower.brokers.contains_key(&2));
    for i in 0..3 {
        assert!(!h.p("t", i).isr.contains(&2), "{:?}", h.p("t", i));
    }
    h.register_with(2, 0xDEAD, 1, 6);
    assert_eq!(h.follower.brokers[&2].node_uuid, 0xDEAD);
}

#[test]
fn a_missed_session_fences_the_broker_and_its_partitions_wait_for_their_group_leader() {
    let mut h = Harness::new();
    for n in 1..=3 {
        h.join(n, 2, 0);
    }
    h.create("t", 6, Some(3));
    let led_by_1: Vec<u32> = (0..6).filter(|&i| h.p("t", i).leader == Some(1)).collect();
    assert_eq!(led_by_1.len(), 2, "leaders spread: two per node");
    let before: Vec<PartitionState> = (0..6).map(|i| h.p("t", i)).collect();

    // Nodes 2 and 3 heartbeat; node 1 goes silent.
    let mut now = 0;
    while now < SESSION - 1 {
        now += 250;
        h.heartbeat(2, now);
        h.heartbeat(3, now);
        assert!(
            h.ctl.tick(now.min(SESSION - 1)).is_empty(),
            "fenced too early"
        );
    }
    let recs = h.ctl.tick(SESSION);
    assert!(matches!(
        recs.last(),
        Some(Record::FenceBroker { node: 1, .. })
    ));
    h.commit(recs);
    assert!(h.follower.brokers[&1].fenced);
    for i in 0..6 {
        let p = h.p("t", i);
        let was = &before[i as usize];
        assert!(!p.isr.contains(&1));
        assert_eq!(p.leader_epoch, was.leader_epoch, "fencing decides no epoch");
        if led_by_1.contains(&i) {
            assert_eq!(p.leader, None, "the controller chooses no leader");
        } else {
            assert_eq!(p.leader, was.leader);
        }
        assert_eq!(h.follower.offline_replicas(&p), vec![1]);
    }
    // The group of a partition node 1 led elects node 2 or 3 in a newer epoch; its report
    // installs it. A stale or concurrent claim to that epoch is refused.
    let i = led_by_1[0];
    let p = h.p("t", i);
    let winner = p.isr[0];
    let loser = p.isr[1];
    let report = |leader, leader_epoch| AlterIsrRequest {
        topic: "t".into(),
        partition: i,
        leader,
        leader_epoch,
        isr: p.isr.clone(),
    };
    let recs = h.ctl.alter_isr(report(winner, 3)).unwrap();
    h.commit(recs);
    assert_eq!(h.p("t", i).leader, Some(winner));
    assert_eq!(h.p("t", i).leader_epoch, 3);
    assert!(matches!(
        h.ctl.alter_isr(report(loser, 3)),
        Err(ControllerError::NotLeader { .. })
    ));
    assert!(matches!(
        h.ctl.alter_isr(report(loser, 2)),
        Err(ControllerError::FencedLeaderEpoch { got: 2, current: 3 })
    ));
    // A fenced broker's claim is refused even in a newer epoch.
    assert!(matches!(
        h.ctl.alter_isr(AlterIsrRequest {
            isr: vec![1, winner],
            ..report(1, 4)
        }),
        Err(ControllerError::FencedBroker(1))
    ));
    // The default replication factor is the cluster's (three nodes: three), not the live
    // brokers': with one fenced, a topic created without a count is refused (clients retry)
    // rather than created under-replicated for good.
    assert!(matches!(
        h.ctl.create_topic(CreateTopicRequest {
            name: "u".into(),
            topic_id: 99,
            partitions: 4,
            replication_factor: None,
            configs: Vec::new(),
        }),
        Err(ControllerError::Placement(_))
    ));
    // Fenced brokers get no new partitions.
    h.create("u", 4, Some(2));
    for i in 0..4 {
        let p = h.p("u", i);
        assert_eq!(p.replicas.len(), 2);
        assert!(!p.has_replica(1));
    }
}

#[test]
fn the_last_in_sync_replica_stays_in_the_isr_and_leads_again_when_back() {
    let mut h = Harness::new();
    h.join(1, 1, 0);
    h.join(2, 1, 0);
    h.create("t", 1, Some(2));
    let p = h.p("t", 0);
    let (first, second) = (p.replicas[0].node, p.replicas[1].node);
    // The follower falls behind: the leader shrinks the ISR to itself.
    let recs = h
        .ctl
        .alter_isr(AlterIsrRequest {
            topic: "t".into(),
            partition: 0,
            leader: first,
            leader_epoch: 0,
            isr: vec![first],
        })
        .unwrap();
    h.commit(recs);
    // Then the leader dies; only the out-of-sync follower heartbeats.
    h.heartbeat(second, SESSION / 2);
    let recs = h.ctl.tick(SESSION);
    h.commit(recs);
    let p = h.p("t", 0);
    assert_eq!(p.leader, None, "no unclean election");
    assert_eq!(p.isr, vec![first], "the last in-sync replica is kept");
    assert_eq!(p.leader_epoch, 0);
    // The old leader restarts (same UUID): registers, catches up, is unfenced; its group
    // elects it again and its report makes it the leader.
    h.register_with(first, uuid(first), 1, SESSION + 10);
    h.heartbeat(first, SESSION + 20);
    assert_eq!(h.p("t", 0).leader, None, "unfencing elects nobody");
    let recs = h
        .ctl
        .alter_isr(AlterIsrRequest {
            topic: "t".into(),
            partition: 0,
            leader: first,
            leader_epoch: 1,
            isr: vec![first],
        })
        .unwrap();
    h.commit(recs);
    let p = h.p("t", 0);
    assert_eq!(p.leader, Some(first));
    assert_eq!(p.leader_epoch, 1);
}

#[test]
fn isr_changes_come_only_from_the_current_leader_in_its_epoch() {
    let mut h = Harness::new();
    for n in 1..=3 {
        h.join(n, 1, 0);
    }
    h.create("t", 1, Some(3));
    let p = h.p("t", 0);
    let leader = p.leader.unwrap();
    let follower = p.replicas[1].node;
    let req = |leader, leader_epoch, isr: Vec<u64>| AlterIsrRequest {
        topic: "t".into(),
        partition: 0,
        leader,
        leader_epoch,
        isr,
    };
    let shrunk: Vec<u64> = p.isr.iter().copied().filter(|&n| n != follower).collect();
    assert!(matches!(
        h.ctl.alter_isr(req(leader, -1, shrunk.clone())),
        Err(ControllerError::FencedLeaderEpoch {
            got: -1,
            current: 0
        })
    ));
    assert!(matches!(
        h.ctl.alter_isr(req(follower, 0, shrunk.clone())),
        Err(ControllerError::NotLeader { .. })
    ));
    assert!(matches!(
        h.ctl.alter_isr(req(leader, 0, vec![follower])),
        Err(ControllerError::Invalid(_))
    ));
    let recs = h.ctl.alter_isr(req(leader, 0, shrunk.clone())).unwrap();
    h.commit(recs);
    assert_eq!(h.p("t", 0).isr, shrunk);
    assert_eq!(
        h.p("t", 0).leader_epoch,
        0,
        "an ISR change keeps the leader epoch"
    );
    // The follower catches up and is added back, unless it is fenced meanwhile.
    let third = p.replicas[2].node;
    h.heartbeat(leader, SESSION - 1);
    h.heartbeat(third, SESSION - 1);
    let recs = h.ctl.tick(SESSION);
    assert!(matches!(recs.as_slice(), [Record::FenceBroker { node, .. }] if *node == follower));
    h.commit(recs);
    // A fenced follower is left out of the reported ISR (the rest of the report stands):
    // nothing changes, so nothing is written.
    assert_eq!(
        h.ctl.alter_isr(req(leader, 0, p.isr.clone())).unwrap(),
        vec![]
    );
    assert_eq!(h.p("t", 0).isr, shrunk);
    h.heartbeat(follower, SESSION + 1);
    let recs = h.ctl.alter_isr(req(leader, 0, p.isr.clone())).unwrap();
    h.commit(recs);
    assert_eq!(h.p("t", 0).isr, p.isr);
    assert_eq!(h.p("t", 0).leader_epoch, 0);
}

#[test]
fn a_leader_moved_off_by_fencing_is_reinstated_by_its_report_in_the_same_epoch() {
    let mut h = Harness::new();
    h.join(1, 1, 0);
    h.join(2, 1, 0);
    h.create("t", 2, Some(2));
    // The group of partition 0 elects node 2 in epoch 1.
    let recs = h
        .ctl
        .alter_isr(AlterIsrRequest {
            topic: "t".into(),
            partition: 0,
            leader: 2,
            leader_epoch: 1,
            isr: vec![1, 2],
        })
        .unwrap();
    h.commit(recs);
    // Node 2 loses the controller (not its group): fenced, its leadership dropped.
    h.heartbeat(1, SESSION - 1);
    let recs = h.ctl.tick(SESSION);
    h.commit(recs);
    assert_eq!(h.p("t", 0).leader, None);
    assert_eq!(h.p("t", 0).leader_epoch, 1);
    // Its claim is refused while fenced; once back it is still the epoch-1 leader of its
    // group (one epoch, one leader) and its report reinstates it. A new controller behaves
    // the same: nothing here depends on state outside the log.
    let report = AlterIsrRequest {
        topic: "t".into(),
        partition: 0,
        leader: 2,
        leader_epoch: 1,
        isr: vec![1, 2],
    };
    assert!(matches!(
        h.ctl.alter_isr(report.clone()),
        Err(ControllerError::FencedBroker(2))
    ));
    h.heartbeat(2, SESSION + 1);
    let mut next = ActiveController::new(ControllerConfig::default(), h.follower.clone(), 0);
    assert!(next.tick(1).is_empty(), "a new controller elects nobody");
    let recs = next.alter_isr(report).unwrap();
    let mut committed = h.follower.clone();
    for r in &recs {
        committed.apply(r).unwrap();
    }
    let p = &committed.topics["t"].partitions[0];
    assert_eq!((p.leader, p.leader_epoch), (Some(2), 1));
    assert_eq!(p.isr, vec![1, 2]);
    // Another node claiming that epoch is refused by the state's own rule too.
    let forged = Record::PartitionChange {
        topic: "t".into(),
        partition: 0,
        leader: Some(1),
        leader_epoch: 1,
        isr: vec![1, 2],
    };
    assert!(committed.apply(&forged).is_err());
}

#[test]
fn producer_id_blocks_are_handed_out_in_order_and_never_overlap() {
    let mut h = Harness::new();
    h.join(1, 1, 0);
    h.join(2, 1, 0);
    let mut seen = Vec::new();
    for i in 0..10u64 {
        let node = 1 + i % 2;
        let (recs, first, len) = h.ctl.allocate_producer_ids(node, h.epochs[&node]).unwrap();
        h.commit(recs);
        seen.push((first, first + u64::from(len)));
    }
    for w in seen.windows(2) {
        assert_eq!(w[0].1, w[1].0, "blocks are contiguous and disjoint");
    }
    // A new controller (after failover) continues from the committed state.
    let mut next = ActiveController::new(ControllerConfig::default(), h.follower.clone(), 0);
    let (_, first, _) = next.allocate_producer_ids(1, h.epochs[&1]).unwrap();
    assert_eq!(first, seen.last().unwrap().1);
    // A block that does not follow the last one is refused on apply.
    let mut s = h.follower.clone();
    assert!(matches!(
        s.apply(&Record::ProducerIdBlock {
            node: 1,
            first: 0,
            len: 10
        }),
        Err(ApplyError::ProducerIdGap { .. })
    ));
    assert!(matches!(
        h.ctl.allocate_producer_ids(1, 999),
        Err(ControllerError::StaleBrokerEpoch { .. })
    ));
}

#[test]
fn topic_requests_are_checked() {
    let mut h = Harness::new();
    h.join(1, 1, 0);
    h.join(2, 1, 0);
    let req = |name: &str, partitions, rf| CreateTopicRequest {
        name: name.into(),
        topic_id: 77,
        partitions,
        replication_factor: rf,
        configs: Vec::new(),
    };
    let e = h.ctl.create_topic(req("t", 1, Some(3))).unwrap_err();
    assert_eq!(
        e,
        ControllerError::Placement(PlacementError::NotEnoughBrokers {
            replication_factor: 3,
            live: 2
        })
    );
    assert!(
        e.to_string().contains("larger than the 2 live brokers"),
        "{e}"
    );
    assert!(h.ctl.create_topic(req("bad name", 1, None)).is_err());
    assert!(h.ctl.create_topic(req("t", 0, None)).is_err());
    let recs = h.ctl.create_topic(req("t", 2, None)).unwrap();
    h.commit(recs);
    assert!(matches!(
        h.ctl.create_topic(req("t", 1, None)),
        Err(ControllerError::TopicExists(_))
    ));
    let recs = h.ctl.create_partitions("t", 5).unwrap();
    h.commit(recs);
    assert_eq!(h.follower.topics["t"].partitions.len(), 5);
    assert!(h.ctl.create_partitions("t", 5).is_err());
    let recs = h
        .ctl
        .set_topic_config("t", "retention.ms", Some("1000"))
        .unwrap();
    h.commit(recs);
    assert_eq!(h.follower.topics["t"].configs["retention.ms"], "1000");
    let recs = h.ctl.set_topic_config("t", "retention.ms", None).unwrap();
    h.commit(recs);
    assert!(!h.follower.topics["t"].configs.contains_key("retention.ms"));
}

#[test]
fn refusals_name_what_is_wrong() {
    let mut h = Harness::new();
    h.join(1, 1, 0);
    let req = |name: &str, partitions| CreateTopicRequest {
        name: name.into(),
        topic_id: 5,
        partitions,
        replication_factor: None,
        configs: Vec::new(),
    };
    // `__consumer_offsets` is the brokers' to create (the Kafka layer refuses clients').
    for bad in ["bad name", "", "..", "__transaction_state"] {
        assert!(
            matches!(
                h.ctl.create_topic(req(bad, 1)),
                Err(ControllerError::InvalidTopicName(_))
            ),
            "{bad:?}"
        );
    }
    h.create("a.b", 1, None);
    // Equal to "a.b" but for '.' and '_': their metric names would collide.
    assert!(matches!(
        h.ctl.create_topic(req("a_b", 1)),
        Err(ControllerError::InvalidTopicName(_))
    ));
    assert!(matches!(
        h.ctl.create_topic(req("zero", 0)),
        Err(ControllerError::Placement(
            PlacementError::InvalidPartitionCount { .. }
        ))
    ));
    assert!(matches!(
        h.ctl.create_partitions("a.b", 1),
        Err(ControllerError::InvalidPartitions(_))
    ));
    assert!(matches!(
        h.ctl.create_partitions("nope", 3),
        Err(ControllerError::UnknownTopic(_))
    ));
    let mut dup = req("dup", 1);
    dup.configs = vec![("k".into(), "1".into()), ("k".into(), "2".into())];
    assert!(matches!(
        h.ctl.create_topic(dup),
        Err(ControllerError::InvalidConfig(_))
    ));
}

#[test]
fn topic_configs_change_together_or_not_at_all() {
    let mut h = Harness::new();
    h.join(1, 1, 0);
    h.create("t", 1, None);
    let before = h.ctl.state().clone();
    // The second change is invalid (empty key): the first is not made either.
    let e = h
        .ctl
        .set_topic_configs(
            "t",
            &[
                ("retention.ms".into(), Some("5".into())),
                (String::new(), Some("x".into())),
            ],
        )
        .unwrap_err();
    assert!(matches!(e, ControllerError::InvalidConfig(_)), "{e}");
    assert_eq!(h.ctl.state(), &before);
    let recs = h
        .ctl
        .set_topic_configs(
            "t",
            &[
                ("retention.ms".into(), Some("5".into())),
                ("min.insync.replicas".into(), None),
            ],
        )
        .unwrap();
    h.commit(recs);
    let configs = &h.follower.topics["t"].configs;
    assert_eq!(configs.len(), 1);
    assert_eq!(configs["retention.ms"], "5");
}

#[test]
fn a_deleted_topic_is_gone_and_its_name_free_again() {
    let mut h = Harness::new();
    h.join(1, 1, 0);
    h.create("t", 2, None);
    let id = h.follower.topics["t"].topic_id;
    let recs = h.ctl.delete_topic("t").unwrap();
    assert_eq!(
        recs,
        vec![Record::DeleteTopic {
            name: "t".into(),
            topic_id: id
        }]
    );
    h.commit(recs);
    assert!(!h.follower.topics.contains_key("t"));
    assert!(h.effects.contains(&Effect::TopicDeleted {
        topic: "t".into(),
        topic_id: id
    }));
    assert!(matches!(
        h.ctl.delete_topic("t"),
        Err(ControllerError::UnknownTopic(_))
    ));
    assert!(matches!(
        h.ctl.delete_topic("__consumer_offsets"),
        Err(ControllerError::InternalTopic(_))
    ));
    // Created again, it is a new topic (a new id); a stale delete of the old one is refused
    // by every node alike and changes nothing.
    let recs = h
        .ctl
        .create_topic(CreateTopicRequest {
            name: "t".into(),
            topic_id: id + 100,
            partitions: 1,
            replication_factor: None,
            configs: Vec::new(),
        })
        .unwrap();
    h.commit(recs);
    let mut again = h.follower.clone();
    let stale = Record::DeleteTopic {
        name: "t".into(),
        topic_id: id,
    };
    assert!(again.apply(&stale).is_err());
    assert_eq!(again, h.follower);
    // Validation only: nothing decided.
    let before = h.ctl.state().clone();
    h.ctl.dry_run(|c| c.delete_topic("t")).unwrap();
    assert_eq!(h.ctl.state(), &before);
}

#[test]
fn defaults_follow_the_cluster_size() {
    assert_eq!(
        (1..=5).map(default_replication_factor).collect::<Vec<_>>(),
        [1, 2, 3, 3, 3]
    );
    assert_eq!(
        (1..=5).map(default_min_insync_replicas).collect::<Vec<_>>(),
        [1, 2, 2, 3, 3]
    );
}

#[test]
fn leaders_spread_across_shards_within_a_node() {
    let mut p = Placer::new(&[(1, 4), (2, 4), (3, 4)]);
    let placed = p.place(12, 3).unwrap();
    let mut leaders: BTreeMap<(u64, u32), u32> = BTreeMap::new();
    for r in &placed {
        *leaders.entry((r[0].node, r[0].shard)).or_default() += 1;
    }
    assert_eq!(leaders.len(), 12, "one leader per shard: {leaders:?}");
}

fn cluster() -> impl Strategy<Value = Vec<(u64, u32)>> {
    proptest::collection::btree_map(1u64..50, 1u32..8, 1..10).prop_map(|m| m.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn fresh_placements_are_balanced(nodes in cluster(), count in 1usize..200, rf in 1usize..5) {
        let mut p = Placer::new(&nodes);
        let res = p.place(count, rf);
        if rf > nodes.len() {
            let refused = matches!(res, Err(PlacementError::NotEnoughBrokers { .. }));
            prop_assert!(refused);
            return Ok(());
        }
        let placed = res.unwrap();
        let mut leaders: BTreeMap<u64, usize> = nodes.iter().map(|n| (n.0, 0)).collect();
        let mut replicas = leaders.clone();
        let mut shard_leaders: BTreeMap<(u64, u32), usize> = BTreeMap::new();
        for r in &placed {
            prop_assert_eq!(r.len(), rf);
            let distinct: BTreeSet<u64> = r.iter().map(|a| a.node).collect();
            prop_assert_eq!(distinct.len(), rf, "two replicas on one node");
            *leaders.get_mut(&r[0].node).unwrap() += 1;
            *shard_leaders.entry((r[0].node, r[0].shard)).or_default() += 1;
            for a in r {
                let shards = nodes.iter().find(|n| n.0 == a.node).unwrap().1;
                prop_assert!(a.shard < shards);
                *replicas.get_mut(&a.node).unwrap() += 1;
            }
        }
        let spread = |m: &BTreeMap<u64, usize>| {
            m.values().max().unwrap() - m.values().min().unwrap()
        };
        prop_assert!(spread(&leaders) <= 1, "leaders {:?}", leaders);
        prop_assert!(spread(&replicas) <= 1, "replicas {:?}", replicas);
        // Within a node, leaders spread over its shards.
        for (node, shards) in &nodes {
            let counts: Vec<usize> = (0..*shards)
                .map(|s| shard_leaders.get(&(*node, s)).copied().unwrap_or(0))
                .collect();
            let spread = counts.iter().max().unwrap() - counts.iter().min().unwrap();
            prop_assert!(spread <= 1, "node {} shard leaders {:?}", node, counts);
        }
    }

    #[test]
    fn placement_is_deterministic(nodes in cluster(), count in 1usize..50) {
        let rf = nodes.len().min(3);
        let a = Placer::new(&nodes).place(count, rf).unwrap();
        let mut shuffled = nodes.clone();
        shuffled.reverse();
        let b = Placer::new(&shuffled).place(count, rf).unwrap();
        prop_assert_eq!(a, b);
    }

    /// Topics created one after another keep the whole cluster balanced, as one placement does.
    #[test]
    fn successive_topics_stay_balanced(nodes in cluster(), sizes in proptest::collection::vec(1usize..20, 1..6)) {
        let mut h = Harness::new();
        for &(n, shards) in &nodes {
            h.join(n, shards, 0);
        }
        let rf = nodes.len().min(3);
        for (i, &s) in sizes.iter().enumerate() {
            h.create(&format!("t{i}"), s, Some(rf));
        }
        let mut leaders: BTreeMap<u64, usize> = nodes.iter().map(|n| (n.0, 0)).collect();
        for t in h.follower.topics.values() {
            for p in &t.partitions {
                *leaders.get_mut(&p.leader.unwrap()).unwrap() += 1;
            }
        }
        let spread = leaders.values().max().unwrap() - leaders.values().min().unwrap();
        prop_assert!(spread <= 1, "leaders {:?}", leaders);
    }
}

#[test]
fn a_new_leader_reporting_a_fenced_follower_in_sync_is_recorded_without_it() {
    let mut h = Harness::new();
    h.join(1, 1, 0);
    h.join(2, 1, 0);
    h.join(3, 1, 0);
    h.create("t", 1, Some(3));
    let recs = h
        .ctl
        .alter_isr(AlterIsrRequest {
            topic: "t".into(),
            partition: 0,
            leader: 1,
            leader_epoch: 1,
            isr: vec![1, 2, 3],
        })
        .unwrap();
    h.commit(recs);
    // Node 3 loses the controller but not its peers (a one-way cut): fenced, out of the ISR.
    h.heartbeat(1, SESSION - 1);
    h.heartbeat(2, SESSION - 1);
    let recs = h.ctl.tick(SESSION);
    h.commit(recs);
    assert!(!h.p("t", 0).isr.contains(&3));
    // Node 2 wins epoch 2 and still hears node 3: its leadership is recorded, node 3 is not
    // let back in while fenced. Before, the whole report was refused and clients never
    // learned the new leader while the cut lasted (a 40 s no-ack window in a soak).
    let report = AlterIsrRequest {
        topic: "t".into(),
        partition: 0,
        leader: 2,
        leader_epoch: 2,
        isr: vec![2, 1, 3],
    };
    let recs = h.ctl.alter_isr(report.clone()).unwrap();
    h.commit(recs);
    assert_eq!(h.p("t", 0).leader, Some(2));
    assert_eq!(h.p("t", 0).leader_epoch, 2);
    assert_eq!(h.p("t", 0).isr, vec![2, 1]);
    // Reported again while node 3 is fenced: nothing new is written.
    assert_eq!(h.ctl.alter_isr(report.clone()).unwrap(), vec![]);
    // A fenced leader's claim is still refused.
    assert!(matches!(
        h.ctl.alter_isr(AlterIsrRequest {
            leader: 3,
            leader_epoch: 3,
            isr: vec![3, 2],
            ..report.clone()
        }),
        Err(ControllerError::FencedBroker(3))
    ));
    // Node 2 is fenced in turn: its leadership is dropped but epoch 2 stays its own. A claim
    // to epoch 2 by node 1 (a stale view) is refused; node 2's own report reinstates it.
    h.heartbeat(1, 2 * SESSION - 1);
    let recs = h.ctl.tick(2 * SESSION);
    h.commit(recs);
    assert_eq!(h.p("t", 0).leader, None);
    assert!(matches!(
        h.ctl.alter_isr(AlterIsrRequest {
            leader: 1,
            isr: vec![1],
            ..report.clone()
        }),
        Err(ControllerError::NotLeader { node: 1 })
    ));
}
