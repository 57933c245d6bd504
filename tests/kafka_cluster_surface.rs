//! The Kafka surface of a two-node cluster that needs no replicated data: FindCoordinator on
//! either node names the same coordinator (the lowest live broker id) and the other node
//! answers group requests with NOT_COORDINATOR; a Fetch claiming to be a replica is refused in
//! a cluster too.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{api_versions_answered, free_port, topic_name, Raw, START_TIMEOUT};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

const POLL: Duration = Duration::from_millis(50);
/// Bound on forming the cluster (a controller elected, both brokers registered and unfenced).
const CLUSTER_DEADLINE: Duration = Duration::from_secs(20);
const NOT_COORDINATOR: i16 = 16;
const TOPIC_AUTHORIZATION_FAILED: i16 = 29;

struct Node {
    id: u64,
    kafka_port: u16,
    rpc_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Node {
    fn new(id: u64) -> Node {
        Node {
            id,
            kafka_port: free_port(),
            rpc_port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.kafka_port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("spate.log")).unwrap_or_default()
    }

    fn spawn(&mut self, seeds: &str) {
        let log = std::fs::File::create(self.dir.path().join("spate.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_spate"))
            .arg("serve")
            .args(["--node-id", &self.id.to_string()])
            .args(["--listen", &self.addr()])
            .args(["--rpc-listen", &format!("127.0.0.1:{}", self.rpc_port)])
            .args(["--seeds", seeds])
            .args([
                "--data-dir",
                &self.dir.path().join("data").to_string_lossy(),
            ])
            .args(["--cores", "1"])
            .args(["--segment-bytes", &common::TEST_SEGMENT_BYTES.to_string()])
            .args(["--metrics-listen", "off"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while !api_versions_answered(&self.addr()) {
            if let Some(s) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("node {} exited ({s}); log:\n{}", self.id, self.log());
            }
            assert!(Instant::now() < deadline, "node {} did not start", self.id);
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- node {} log ---\n{}", self.id, self.log());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

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
    let mut nodes = [Node::new(1), Node::new(2)];
    let seeds = nodes
        .iter()
        .map(|n| format!("{}@127.0.0.1:{}", n.id, n.rpc_port))
        .collect::<Vec<_>>()
        .join(",");
    for n in &mut nodes {
        n.spawn(&seeds);
    }
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
