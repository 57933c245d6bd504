//! The Kafka surface of a two-node cluster: FindCoordinator on either node names the same
//! coordinator for a group (the leader of its `__consumer_offsets` partition) and the other
//! node answers its group requests with NOT_COORDINATOR; a Fetch claiming to be a replica is
//! refused in a cluster too.

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

const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;

#[test]
fn groups_meet_on_their_offsets_partition_leader_and_replica_fetches_are_refused() {
    let nodes = cluster(2);
    for group in ["g1", "another-group", "x"] {
        // Both nodes name the same coordinator once `__consumer_offsets` (created by the
        // first FindCoordinator) has a leader for the group's partition; until then
        // COORDINATOR_NOT_AVAILABLE.
        let deadline = Instant::now() + CLUSTER_DEADLINE;
        let coordinator = loop {
            let answers: Vec<_> = nodes
                .iter()
                .map(|n| find_coordinator(&n.addr(), group))
                .collect();
            let agreed = answers
                .iter()
                .all(|a| a.0 == 0 && (a.1, a.2) == (answers[0].1, answers[0].2));
            if agreed {
                break answers[0].1;
            }
            assert!(
                Instant::now() < deadline,
                "no agreement on the coordinator of {group}: {answers:?}"
            );
            std::thread::sleep(POLL);
        };
        let (at, other) = if coordinator == 1 {
            (&nodes[0], &nodes[1])
        } else {
            (&nodes[1], &nodes[0])
        };
        assert_eq!(at.id as i32, coordinator);
        assert_eq!(join_group(&other.addr(), group), NOT_COORDINATOR);
        // The coordinator takes the group once it loaded the partition: a new member is
        // asked to join again with its member id.
        let deadline = Instant::now() + CLUSTER_DEADLINE;
        loop {
            let code = join_group(&at.addr(), group);
            if code != COORDINATOR_LOAD_IN_PROGRESS && code != NOT_COORDINATOR {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{group}: JoinGroup answered {code}"
            );
            std::thread::sleep(POLL);
        }
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
