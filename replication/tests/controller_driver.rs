//! The controller driver without sockets: three voters and a non-voting broker, wired through
//! an in-memory network with a simulated clock, each with its metadata log on disk. The
//! cluster forms, survives the loss of its controller, fences the dead broker, and takes the
//! node back after a restart that replays its log.

use std::collections::BTreeMap;

#[path = "support/controller.rs"]
mod controller_support;
use controller_support::*;

use spate_replication::controller::driver::{Driver, Outgoing};
use spate_replication::controller::store::MetadataStore;
use spate_replication::controller::DEFAULT_BROKER_SESSION_TIMEOUT_MS;
use spate_replication::rpc::Frame;
use spate_replication::NodeId;

#[test]
fn the_cluster_forms_fails_over_and_takes_a_restarted_node_back() {
    let mut net = Net::new(&[1, 2, 3, 4]);
    assert!(!net.nodes[&4].is_voter());
    net.until(5_000, "cluster formed", |n| {
        n.controllers().len() == 1 && n.all_see_live(&[1, 2, 3, 4])
    });
    let c = net.controllers()[0];
    for d in net.nodes.values() {
        let v = d.view();
        assert_eq!(
            v.controller,
            Some(c),
            "node {} names the controller",
            d.node_id()
        );
        assert_eq!(v.voters, VOTERS);
        assert!(d.broker_epoch().is_some());
    }

    // The controller dies: another voter takes over within the election bound, and the dead
    // broker is fenced once its session (started afresh by the new controller) expires.
    net.kill(c);
    let took = net.until(3_000, "new controller", |n| n.controllers().len() == 1);
    let c2 = net.controllers()[0];
    assert_ne!(c2, c);
    assert!(took <= 2_000, "failover took {took} ms");
    let live: Vec<NodeId> = [1, 2, 3, 4].into_iter().filter(|&n| n != c).collect();
    net.until(
        DEFAULT_BROKER_SESSION_TIMEOUT_MS + 2_000,
        "dead broker fenced",
        |n| n.all_see_live(&live),
    );

    // Restarted from its directory: the log replays, the node re-registers and is unfenced.
    let before = net.nodes[&c2].applied();
    net.start(c);
    assert!(net.nodes[&c].applied() == 0, "applied only once committed");
    net.until(3_000, "restarted node back", |n| {
        n.all_see_live(&[1, 2, 3, 4]) && n.nodes[&c].applied() >= before
    });
    assert_eq!(
        net.controllers(),
        vec![c2],
        "a rejoining voter does not disrupt"
    );

    // A restarted non-voter catches up from a voter as well.
    net.kill(4);
    net.start(4);
    net.until(3_000, "non-voter back", |n| {
        n.nodes[&4].applied() == n.nodes[&c2].applied() && n.all_see_live(&[1, 2, 3, 4])
    });
}

#[test]
fn a_peer_cannot_register_or_heartbeat_for_another_node() {
    use spate_replication::controller::{HeartbeatRequest, RegisterRequest};
    use spate_replication::rpc::{RpcErrorCode, RpcMessage};
    let mut net = Net::new(&[1, 2, 3]);
    net.until(5_000, "cluster formed", |n| n.all_see_live(&[1, 2, 3]));
    let c = net.controllers()[0];
    let forger = VOTERS.into_iter().find(|&n| n != c).unwrap();
    let victim = VOTERS.into_iter().find(|&n| n != c && n != forger).unwrap();
    let epoch = net.nodes[&c].state().brokers[&victim].broker_epoch;
    let requests = [
        RpcMessage::RegisterBroker(RegisterRequest {
            node: victim,
            node_uuid: 0xBAD,
            rpc: cfg(victim).rpc,
            kafka: cfg(victim).kafka,
            shards: 1,
        }),
        RpcMessage::Heartbeat(HeartbeatRequest {
            node: victim,
            broker_epoch: epoch,
            want_fence: true,
        }),
    ];
    for (i, message) in requests.into_iter().enumerate() {
        let frame = Frame {
            correlation_id: 1000 + i as u64,
            message,
        };
        let d = net.nodes.get_mut(&c).unwrap();
        d.receive(forger, frame, forger).unwrap();
        let out = d.take_outgoing();
        let refused = out.iter().any(|o| match o {
            Outgoing::Reply { frame, .. } => matches!(
                &frame.message,
                RpcMessage::RegisterBrokerResponse(Err(e)) | RpcMessage::HeartbeatResponse(Err(e))
                    if e.code == RpcErrorCode::InvalidRequest
            ),
            _ => false,
        });
        assert!(refused, "forged request {i} not refused: {out:?}");
    }
    for _ in 0..10 {
        net.step();
    }
    assert!(
        net.all_see_live(&[1, 2, 3]),
        "the victim was fenced or re-registered"
    );
}

#[test]
fn a_minority_elects_no_controller_and_a_restored_majority_does() {
    let mut net = Net::new(&[1, 2, 3]);
    net.until(5_000, "cluster formed", |n| n.all_see_live(&[1, 2, 3]));
    let c = net.controllers()[0];
    let others: Vec<NodeId> = VOTERS.into_iter().filter(|&n| n != c).collect();
    net.kill(others[0]);
    net.kill(others[1]);
    // Check-quorum: a leader that hears from no majority steps down.
    net.until(3_000, "isolated controller steps down", |n| {
        n.controllers().is_empty()
    });
    for _ in 0..40 {
        net.step();
        assert!(
            net.controllers().is_empty(),
            "a minority elected a controller"
        );
    }
    net.start(others[0]);
    net.until(3_000, "majority restored", |n| n.controllers().len() == 1);
    assert!(net.down.contains(&others[1]));
}

#[test]
fn calls_finish_once_applied_here_and_fail_at_the_deadline_without_a_quorum() {
    use spate_replication::controller::driver::{
        AdminCall, CallAnswer, DEFAULT_CONTROLLER_CALL_DEADLINE_MS,
    };
    use spate_replication::controller::CreateTopicRequest;
    use spate_replication::rpc::RpcErrorCode;

    let mut net = Net::new(&[1, 2, 3, 4]);
    net.until(5_000, "cluster formed", |n| {
        n.controllers().len() == 1 && n.all_see_live(&[1, 2, 3, 4])
    });
    // From the non-voter, which follows the log by fetching: the answer waits for that.
    let call = AdminCall::CreateTopic {
        req: CreateTopicRequest {
            name: "t".into(),
            topic_id: 42,
            partitions: 2,
            replication_factor: Some(3),
            configs: Vec::new(),
        },
        validate_only: false,
    };
    net.nodes.get_mut(&4).unwrap().submit_call(7, call).unwrap();
    // Whenever the call is done, the topic is applied here (checked after every step).
    let mut finished = Vec::new();
    net.until(2_000, "create finished", |n| {
        let done = n.nodes[&4].calls_in_flight() == 0;
        assert!(!done || n.nodes[&4].state().topics.contains_key("t"));
        done
    });
    finished.extend(net.nodes.get_mut(&4).unwrap().take_finished_calls());
    assert_eq!(finished, vec![(7, Ok(CallAnswer::Done))]);
    assert_eq!(net.nodes[&4].state().topics["t"].topic_id, 42);

    // Refused at once with its reason (not retried).
    let again = AdminCall::DeleteTopic {
        topic: "nope".into(),
    };
    net.nodes
        .get_mut(&4)
        .unwrap()
        .submit_call(8, again)
        .unwrap();
    net.until(2_000, "refusal", |n| n.nodes[&4].calls_in_flight() == 0);
    let got = net.nodes.get_mut(&4).unwrap().take_finished_calls();
    assert!(
        matches!(&got[..], [(8, Err(e))] if e.code == RpcErrorCode::UnknownTopic),
        "{got:?}"
    );

    // Two voters gone: no controller can decide; the call is retried until its deadline.
    let c = net.controllers()[0];
    let others: Vec<NodeId> = VOTERS.iter().copied().filter(|&v| v != c).collect();
    net.kill(others[0]);
    net.kill(c);
    let start = net.now_ms;
    let call = AdminCall::DeleteTopic { topic: "t".into() };
    net.nodes.get_mut(&4).unwrap().submit_call(9, call).unwrap();
    let took = net.until(
        DEFAULT_CONTROLLER_CALL_DEADLINE_MS + 1_000,
        "deadline",
        |n| n.nodes[&4].calls_in_flight() == 0,
    );
    assert!(
        net.now_ms - start >= DEFAULT_CONTROLLER_CALL_DEADLINE_MS,
        "gave up after {took} ms"
    );
    let got = net.nodes.get_mut(&4).unwrap().take_finished_calls();
    assert!(
        matches!(&got[..], [(9, Err(e))] if e.code == RpcErrorCode::Unavailable),
        "{got:?}"
    );
}

#[test]
fn an_operator_unregisters_a_fenced_broker_and_its_id_rejoins_with_a_new_uuid() {
    use spate_replication::controller::driver::{AdminCall, CallAnswer};
    use spate_replication::rpc::RpcErrorCode;

    let mut net = Net::new(&[1, 2, 3, 4]);
    net.until(5_000, "cluster formed", |n| {
        n.controllers().len() == 1 && n.all_see_live(&[1, 2, 3, 4])
    });
    let call = |net: &mut Net, on: NodeId, id: u64, node: NodeId| {
        net.nodes
            .get_mut(&on)
            .unwrap()
            .submit_call(id, AdminCall::UnregisterBroker { node })
            .unwrap();
        net.until(2_000, "unregister answered", |n| {
            n.nodes[&on].calls_in_flight() == 0
        });
        let mut got = net.nodes.get_mut(&on).unwrap().take_finished_calls();
        assert_eq!(got.len(), 1, "{got:?}");
        got.pop().unwrap().1
    };
    // A live broker: refused, with what to do.
    let e = call(&mut net, 1, 1, 4).unwrap_err();
    assert_eq!(e.code, RpcErrorCode::InvalidRequest, "{e:?}");
    assert!(e.message.contains("stop it first"), "{e:?}");
    // An unknown id: refused as such, and the asking node does not take it for its own
    // registration's loss (it stays registered, still live).
    let epoch = net.nodes[&1].broker_epoch();
    let e = call(&mut net, 1, 2, 99).unwrap_err();
    assert_eq!(e.code, RpcErrorCode::UnknownBroker, "{e:?}");
    assert_eq!(net.nodes[&1].broker_epoch(), epoch);

    // Node 4 dies and its directory is wiped: the new incarnation (a new UUID) is refused
    // while the old one is registered.
    net.kill(4);
    net.until(
        DEFAULT_BROKER_SESSION_TIMEOUT_MS + 2_000,
        "dead broker fenced",
        |n| n.all_see_live(&[1, 2, 3]),
    );
    net.dirs.insert(4, tempfile::tempdir().unwrap());
    let mut wiped = cfg(4);
    wiped.node_uuid ^= 0xFFFF;
    let store = MetadataStore::open(&net.dir(4)).unwrap();
    net.nodes.insert(4, Driver::new(wiped, store, net.now_ms));
    net.down.remove(&4);
    for _ in 0..40 {
        net.step();
        for v in VOTERS {
            let live: Vec<NodeId> = net.nodes[&v]
                .view()
                .live_brokers()
                .map(|b| b.node)
                .collect();
            assert_eq!(live, [1, 2, 3], "a wiped node joined");
        }
    }
    // Unregistered through a voter that need not be the controller: answered once applied
    // there; the id then registers with its new UUID on every node.
    assert_eq!(call(&mut net, 2, 3, 4), Ok(CallAnswer::Done));
    net.until(3_000, "wiped node joined", |n| {
        n.all_see_live(&[1, 2, 3, 4])
            && n.nodes.values().all(|d| {
                d.state().brokers.get(&4).map(|b| b.node_uuid) == Some(cfg(4).node_uuid ^ 0xFFFF)
            })
    });
    // Live again: refused.
    let e = call(&mut net, 3, 4, 4).unwrap_err();
    assert_eq!(e.code, RpcErrorCode::InvalidRequest, "{e:?}");
}

#[test]
fn a_wave_of_leader_reports_is_one_metadata_decision_answered_report_by_report() {
    use spate_replication::controller::driver::{AdminCall, MAX_QUEUED_ALTER_ISR};
    use spate_replication::controller::records::FIRST_ELECTED_EPOCH;
    use spate_replication::controller::{AlterIsrRequest, CreateTopicRequest};

    const PARTITIONS: usize = 600;
    // One tick's queue holds the wave.
    const _: () = assert!(PARTITIONS <= MAX_QUEUED_ALTER_ISR);
    let mut net = Net::new(&VOTERS);
    net.until(5_000, "cluster formed", |n| {
        n.controllers().len() == 1 && n.all_see_live(&VOTERS)
    });
    let create = AdminCall::CreateTopic {
        req: CreateTopicRequest {
            name: "t".into(),
            topic_id: 7,
            partitions: PARTITIONS,
            replication_factor: Some(3),
            configs: Vec::new(),
        },
        validate_only: false,
    };
    net.nodes
        .get_mut(&1)
        .unwrap()
        .submit_call(1, create)
        .unwrap();
    net.until(2_000, "topic created", |n| {
        n.nodes.values().all(|d| d.state().topics.contains_key("t"))
    });
    let c = net.controllers()[0];
    let applied_before = net.nodes[&c].applied();

    // Every partition's preferred replica reports its leadership in the first elected epoch,
    // the controller's own broker side among them; one report per node is invalid (an ISR
    // without its leader) and must be refused alone.
    let partitions = net.nodes[&c].state().topics["t"].partitions.clone();
    let mut expected: BTreeMap<NodeId, usize> = BTreeMap::new();
    let mut invalid: BTreeMap<NodeId, u64> = BTreeMap::new();
    for (i, p) in partitions.iter().enumerate() {
        let leader = p.replicas[0].node;
        let isr: Vec<NodeId> = p.replicas.iter().map(|r| r.node).collect();
        let bad = !invalid.contains_key(&leader);
        let req = AlterIsrRequest {
            topic: "t".into(),
            partition: i as u32,
            leader,
            leader_epoch: FIRST_ELECTED_EPOCH,
            isr: if bad { isr[1..].to_vec() } else { isr },
        };
        let group = 1_000 + i as u64;
        if bad {
            invalid.insert(leader, group);
        } else {
            *expected.entry(leader).or_default() += 1;
        }
        let d = net.nodes.get_mut(&leader).unwrap();
        d.report_leader(group, req).unwrap();
    }
    let mut accepted: BTreeMap<NodeId, Vec<u64>> = BTreeMap::new();
    net.until(2_000, "every valid report applied everywhere", |n| {
        n.nodes.values().all(|d| {
            let led = &d.state().topics["t"].partitions;
            led.iter()
                .filter(|p| p.leader_epoch == FIRST_ELECTED_EPOCH)
                .count()
                == PARTITIONS - invalid.len()
        })
    });
    for (&id, d) in net.nodes.iter_mut() {
        let got: Vec<u64> = d.take_accepted_reports().into_iter().map(|r| r.0).collect();
        accepted.insert(id, got);
    }
    for (node, n) in &expected {
        assert_eq!(accepted[node].len(), *n, "node {node}'s reports accepted");
        assert!(
            !accepted[node].contains(&invalid[node]),
            "node {node}'s invalid report was accepted"
        );
    }
    // The three nodes' reports arrive in the same tick or the next: a handful of decisions
    // (each a few 64 KiB batches at most), not one metadata batch per report.
    let batches = net.nodes[&c].applied() - applied_before;
    assert!(
        batches <= 12,
        "{} reports took {batches} metadata batches",
        PARTITIONS - invalid.len()
    );
    for d in net.nodes.values() {
        let t = &d.state().topics["t"];
        for (i, p) in t.partitions.iter().enumerate() {
            let was_invalid = invalid.values().any(|&g| g == 1_000 + i as u64);
            assert_eq!(
                p.leader_epoch == FIRST_ELECTED_EPOCH,
                !was_invalid,
                "partition {i}"
            );
        }
    }
}
