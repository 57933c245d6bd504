//! The Kafka surface of a two-node cluster that needs no replicated data: FindCoordinator on
//! either node names the same coordinator (the lowest live broker id) and the other node
//! answers group requests with NOT_COORDINATOR; a Fetch claiming to be a replica is refused in
//! a cluster too.

mod common;

use std::time::Instant;

use common::cluster::{cluster, CLUSTER_DEADLINE, POLL};
use common::{topic_name, Raw};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

const NOT_COORDINATOR: i16 = 16;
const TOPIC_AUTHORIZATION_FAILED: i16 = 29;

/// FindCoordinator (v3) for `group`: (error, node id, port).
fn find_coordinator(addr: &str, group: &str) -> (i16, i32, i32) {
    let req = FindCoordinatorRequest::default().with_key(StrBytes::from_string(group.into()));
    let resp = Raw::connect(addr).call(3, &req);
    (resp.error_code, resp.node_id.0, resp.port)
}

fn join_group(addr: &str, group: &str) -> i16 {
    let req = JoinGroupRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.into())))
        .with_session_timeout_ms(10_000)
        .with_rebalance_timeout_ms(10_000)
        .with_protocol_type(StrBytes::from_static_str("consumer"))
        .with_protocols(vec![join_group_request::JoinGroupRequestProtocol::default(
        )
        .with_name(StrBytes::from_static_str("range"))]);
    Raw::connect(addr).call(5, &req).error_code
}

#[test]
fn groups_meet_on_the_lowest_live_broker_and_replica_fetches_are_refused() {
    let nodes = cluster(2);
    // Both nodes name node 1 once they see it live (before that: COORDINATOR_NOT_AVAILABLE
    // or, for a moment, the lowest broker they know).
    let deadline = Instant::now() + CLUSTER_DEADLINE;
    loop {
        let answers: Vec<_> = nodes
            .iter()
            .map(|n| find_coordinator(&n.addr(), "g1"))
            .collect();
        let expected = (0, 1, i32::from(nodes[0].kafka_port));
        if answers.iter().all(|a| *a == expected) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no agreement on the coordinator: {answers:?}"
        );
        std::thread::sleep(POLL);
    }
    // Every group goes to node 1; node 2 sends members back to FindCoordinator.
    for group in ["g1", "another-group", "x"] {
        assert_eq!(find_coordinator(&nodes[1].addr(), group).1, 1);
        assert_eq!(join_group(&nodes[1].addr(), group), NOT_COORDINATOR);
        // Node 1 coordinates it: a new member is asked to join again with its member id.
        assert_ne!(join_group(&nodes[0].addr(), group), NOT_COORDINATOR);
    }

    // A Fetch claiming a replica id is refused on every node's Kafka port.
    for n in &nodes {
        let mut req = common::fetch_request("any", 0, 0);
        req.replica_id = BrokerId(2);
        let resp = Raw::connect(&n.addr()).call(11, &req);
        assert_eq!(
            resp.responses[0].partitions[0].error_code,
            TOPIC_AUTHORIZATION_FAILED
        );
        assert_eq!(resp.responses[0].topic, topic_name("any"));
    }
}
