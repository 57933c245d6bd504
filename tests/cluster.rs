//! Three real `spate serve` nodes on loopback form a cluster: every node's Metadata (and
//! `kcat -L`) lists all three brokers and one controller; SIGKILL of the controller leader gets
//! a new controller within a bound; the dead broker leaves Metadata after its session times
//! out and comes back when restarted. A node started with another seed list (so another
//! cluster id) is refused by the rpc handshake with a clear log line.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{api_versions_answered, free_port, request_frame, wait_port_free, START_TIMEOUT};
use kafka_protocol::messages::{MetadataRequest, MetadataResponse};
use kafka_protocol::protocol::Decodable;

const POLL: Duration = Duration::from_millis(50);
/// Bound on forming the cluster and on each change the test waits for.
const CLUSTER_DEADLINE: Duration = Duration::from_secs(20);
/// A new controller after the old one is killed: elections take 0.5-1 s, plus the new
/// leader's first commit; 10 s leaves room for a loaded test machine.
const FAILOVER_BOUND: Duration = Duration::from_secs(10);

struct Node {
    id: u64,
    kafka_port: u16,
    rpc_port: u16,
    dir: tempfile::TempDir,
    seeds: String,
    child: Option<Child>,
}

impl Node {
    fn new(id: u64) -> Node {
        Node {
            id,
            kafka_port: free_port(),
            rpc_port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            seeds: String::new(),
            child: None,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.kafka_port)
    }

    fn seed(&self) -> String {
        format!("{}@127.0.0.1:{}", self.id, self.rpc_port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("spate.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the node (again) and waits until its Kafka port answers.
    fn spawn(&mut self) {
        assert!(self.child.is_none());
        wait_port_free(self.kafka_port);
        wait_port_free(self.rpc_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_spate"))
            .arg("serve")
            .args(["--node-id", &self.id.to_string()])
            .args(["--listen", &self.addr()])
            .args(["--rpc-listen", &format!("127.0.0.1:{}", self.rpc_port)])
            .args(["--seeds", &self.seeds])
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

    /// SIGTERM; the node must exit 0 within the stop timeout.
    fn terminate(&mut self) {
        let mut c = self.child.take().expect("running");
        let ok = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + common::STOP_TIMEOUT;
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                assert!(status.success(), "node {} exited with {status}", self.id);
                return;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("node {} did not stop after SIGTERM", self.id);
            }
            std::thread::sleep(POLL);
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- node {} log ---\n{}", self.id, self.log());
        }
        self.kill();
    }
}

/// (controller id, broker ids) from a Metadata v1 request, or `None` if the node does not
/// answer.
fn metadata(addr: &str) -> Option<(i32, Vec<i32>)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let req = MetadataRequest::default().with_topics(Some(Vec::new()));
    s.write_all(&request_frame(1, 1, &req)).ok()?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let n = u32::from_be_bytes(len) as usize;
    assert!(n < 1 << 20);
    let mut body = vec![0u8; n];
    s.read_exact(&mut body).ok()?;
    let mut b = bytes::Bytes::from(body).slice(4..);
    let r = MetadataResponse::decode(&mut b, 1).ok()?;
    let mut ids: Vec<i32> = r.brokers.iter().map(|b| b.node_id.0).collect();
    ids.sort();
    Some((r.controller_id.0, ids))
}

/// Polls until every node in `nodes` reports the brokers `want` and one controller among
/// `controllers`; returns that controller.
fn wait_for(nodes: &[&Node], want: &[i32], controllers: &[i32], what: &str) -> i32 {
    let deadline = Instant::now() + CLUSTER_DEADLINE;
    loop {
        let seen: Vec<Option<(i32, Vec<i32>)>> =
            nodes.iter().map(|n| metadata(&n.addr())).collect();
        let c = seen[0].as_ref().map(|s| s.0);
        let agreed = seen.iter().all(|s| {
            s.as_ref().is_some_and(|(ctl, ids)| {
                ids == want && Some(*ctl) == c && controllers.contains(ctl)
            })
        });
        if agreed {
            return c.unwrap();
        }
        assert!(Instant::now() < deadline, "{what}: last seen {seen:?}");
        std::thread::sleep(POLL);
    }
}

fn cluster(n: u64) -> Vec<Node> {
    let mut nodes: Vec<Node> = (1..=n).map(Node::new).collect();
    let seeds: Vec<String> = nodes.iter().map(Node::seed).collect();
    for node in &mut nodes {
        node.seeds = seeds.join(",");
    }
    for node in &mut nodes {
        node.spawn();
    }
    nodes
}

#[test]
fn three_nodes_form_a_cluster_fail_over_and_take_a_node_back() {
    let mut nodes = cluster(3);
    let all = [1, 2, 3];
    let refs: Vec<&Node> = nodes.iter().collect();
    let controller = wait_for(&refs, &all, &all, "cluster formed");

    // librdkafka sees the three brokers through any node.
    let out = Command::new("kcat")
        .args(["-L", "-b", &nodes[1].addr(), "-m", "10"])
        .output()
        .expect("run kcat");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "kcat -L: {text}");
    assert!(text.contains(" 3 brokers:"), "kcat -L: {text}");
    for n in &nodes {
        assert!(
            text.contains(&format!("broker {} at {}", n.id, n.addr())),
            "{text}"
        );
    }

    // `spate cluster info`: every node alive, every node a voter, the controller and epoch.
    let out = common::spate_cli(&nodes[0].addr(), &["cluster", "info", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["controller_id"], controller);
    assert!(doc["controller_epoch"].as_i64().unwrap() >= 1, "{doc}");
    let brokers = doc["brokers"].as_array().unwrap();
    assert_eq!(brokers.len(), 3, "{doc}");
    for b in brokers {
        assert_eq!(
            (&b["alive"], &b["voter"]),
            (&true.into(), &true.into()),
            "{doc}"
        );
    }

    // SIGKILL the controller: the two others agree on a new one within the bound.
    let victim = (controller - 1) as usize;
    nodes[victim].kill();
    let killed = Instant::now();
    let survivors: Vec<&Node> = nodes.iter().filter(|n| n.id != controller as u64).collect();
    let others: Vec<i32> = all.iter().copied().filter(|&i| i != controller).collect();
    let deadline = killed + FAILOVER_BOUND;
    let new_controller = loop {
        let seen: Vec<Option<(i32, Vec<i32>)>> =
            survivors.iter().map(|n| metadata(&n.addr())).collect();
        let c: Vec<i32> = seen.iter().flatten().map(|s| s.0).collect();
        if c.len() == 2 && c[0] == c[1] && others.contains(&c[0]) {
            break c[0];
        }
        assert!(
            Instant::now() < deadline,
            "no new controller in {FAILOVER_BOUND:?}: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let failover = killed.elapsed();
    eprintln!("new controller {new_controller} after {failover:?}");

    // The dead broker is fenced once its session expires, and leaves Metadata.
    wait_for(&survivors, &others, &others, "dead broker left Metadata");
    eprintln!(
        "dead broker gone from Metadata after {:?}",
        killed.elapsed()
    );

    // Restarted on its directory, it rejoins.
    nodes[victim].spawn();
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_for(&refs, &all, &all, "restarted node rejoined");
    let log = nodes[victim].log();
    assert!(log.contains("registered with the controller"), "{log}");

    // The same node id on a wiped directory (a new node UUID) is refused, with a log line
    // saying what to do, and never listed.
    nodes[victim].kill();
    std::fs::remove_dir_all(nodes[victim].dir.path().join("data")).unwrap();
    nodes[victim].spawn();
    let deadline = Instant::now() + CLUSTER_DEADLINE;
    while !nodes[victim]
        .log()
        .contains("unregister the old node first")
    {
        assert!(Instant::now() < deadline, "wiped node not refused");
        std::thread::sleep(POLL);
    }
    // Its old incarnation's session runs out; the new one never registers.
    let survivors: Vec<&Node> = nodes.iter().filter(|n| n.id != controller as u64).collect();
    wait_for(&survivors, &others, &others, "wiped node not listed");
    for _ in 0..20 {
        let (_, listed) = metadata(&survivors[0].addr()).unwrap();
        assert_eq!(listed, others, "a wiped node must not be listed");
        std::thread::sleep(POLL);
    }
}

#[test]
fn a_node_of_another_cluster_is_refused() {
    // A one-voter cluster.
    let mut nodes = cluster(1);
    wait_for(&[&nodes[0]], &[1], &[1], "one-node cluster formed");
    // Node 2 names node 1 as a seed, but with another list, hence another cluster id.
    let mut stranger = Node::new(2);
    stranger.seeds = format!("{},{}", nodes[0].seed(), stranger.seed());
    stranger.spawn();
    let deadline = Instant::now() + CLUSTER_DEADLINE;
    loop {
        let log = nodes[0].log();
        if log.contains("rpc handshake refused") && log.contains("belongs to cluster") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stranger not refused; log:\n{log}"
        );
        std::thread::sleep(POLL);
    }
    // It never joined: node 1 still lists itself only.
    assert_eq!(metadata(&nodes[0].addr()), Some((1, vec![1])));
    stranger.kill();
    nodes[0].kill();
    // A stored identity is checked before anything opens: restarting node 1 with the
    // stranger's list keeps its own cluster id (and says so).
    nodes[0].seeds = stranger.seeds.clone();
    nodes[0].spawn();
    assert!(nodes[0].log().contains("stored cluster id differs"));
    // A cluster node stops cleanly on SIGTERM, controller thread included.
    nodes[0].terminate();
    assert!(nodes[0].log().contains("controller driver stopped"));
}

#[test]
fn a_node_outside_the_seeds_joins_as_a_broker() {
    let mut nodes = cluster(1);
    wait_for(&[&nodes[0]], &[1], &[1], "one-voter cluster formed");
    // Same seed list (so the same cluster id), but not a seed itself: a broker, not a voter.
    let mut broker = Node::new(7);
    broker.seeds = nodes[0].seeds.clone();
    broker.spawn();
    wait_for(&[&nodes[0], &broker], &[1, 7], &[1], "non-voter joined");
    let out = common::spate_cli(&broker.addr(), &["cluster", "info", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let voter = |id: i64| {
        doc["brokers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["id"] == id)
            .map(|b| b["voter"].clone())
    };
    assert_eq!(voter(1), Some(true.into()), "{doc}");
    assert_eq!(voter(7), Some(false.into()), "{doc}");
    broker.kill();
    nodes[0].kill();
}
