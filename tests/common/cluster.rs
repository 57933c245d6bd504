//! A cluster of real `spate serve` nodes on loopback for integration tests: each node with
//! its own Kafka and rpc ports, data dir and log file, `--cores 1` (several fit on a 2-core
//! machine), started, killed (SIGKILL), paused and restarted by the test; raw Metadata
//! requests to see what a node tells clients.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kafka_protocol::messages::{MetadataRequest, MetadataResponse};
use kafka_protocol::protocol::Decodable;

use super::{api_versions_answered, free_port, request_frame, wait_port_free, START_TIMEOUT};

pub const POLL: Duration = Duration::from_millis(50);
/// Bound on forming the cluster and on each change a test waits for.
pub const CLUSTER_DEADLINE: Duration = Duration::from_secs(20);

pub struct Node {
    pub id: u64,
    pub kafka_port: u16,
    pub rpc_port: u16,
    pub dir: tempfile::TempDir,
    pub seeds: String,
    /// Arguments added to `spate serve`'s.
    pub extra_args: Vec<String>,
    pub child: Option<Child>,
    /// Where the node serves GET /metrics; `None` (the default): no endpoint.
    pub metrics_port: Option<u16>,
}

impl Node {
    pub fn new(id: u64) -> Node {
        Node {
            id,
            kafka_port: free_port(),
            rpc_port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            seeds: String::new(),
            extra_args: Vec::new(),
            child: None,
            metrics_port: None,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.kafka_port)
    }

    pub fn seed(&self) -> String {
        format!("{}@127.0.0.1:{}", self.id, self.rpc_port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("spate.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the node (again) and waits until its Kafka port answers.
    pub fn spawn(&mut self) {
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
            .args(["--segment-bytes", &super::TEST_SEGMENT_BYTES.to_string()])
            .args([
                "--metrics-listen",
                &self
                    .metrics_port
                    .map_or("off".to_string(), |p| format!("127.0.0.1:{p}")),
            ])
            .args(&self.extra_args)
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
    pub fn terminate(&mut self) {
        let mut c = self.child.take().expect("running");
        let ok = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + super::STOP_TIMEOUT;
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

    pub fn kill(&mut self) {
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
pub fn metadata(addr: &str) -> Option<(i32, Vec<i32>)> {
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
pub fn wait_for(nodes: &[&Node], want: &[i32], controllers: &[i32], what: &str) -> i32 {
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

pub fn cluster(n: u64) -> Vec<Node> {
    cluster_of((1..=n).map(Node::new).collect())
}

/// As [`cluster`], each node also serving GET /metrics on a port of its own.
pub fn cluster_with_metrics(n: u64) -> Vec<Node> {
    cluster_of(
        (1..=n)
            .map(|id| {
                let mut node = Node::new(id);
                node.metrics_port = Some(free_port());
                node
            })
            .collect(),
    )
}

fn cluster_of(mut nodes: Vec<Node>) -> Vec<Node> {
    let seeds: Vec<String> = nodes.iter().map(Node::seed).collect();
    for node in &mut nodes {
        node.seeds = seeds.join(",");
    }
    for node in &mut nodes {
        node.spawn();
    }
    nodes
}

/// `count` nodes, not started: every port distinct (Kafka, rpc and, with `metrics`, a metrics
/// port of its own), the first `voters` the metadata voters (the rest join as brokers), each
/// run with the flags `extra`.
pub fn unstarted_nodes(count: u64, voters: usize, metrics: bool, extra: &[&str]) -> Vec<Node> {
    assert!(voters >= 1 && voters as u64 <= count);
    let mut nodes: Vec<Node> = Vec::new();
    let mut taken: Vec<u16> = Vec::new();
    while (nodes.len() as u64) < count {
        let mut n = Node::new(nodes.len() as u64 + 1);
        if metrics {
            n.metrics_port = Some(free_port());
        }
        let mut ports = vec![n.kafka_port, n.rpc_port];
        ports.extend(n.metrics_port);
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        if unique.len() == ports.len() && !ports.iter().any(|p| taken.contains(p)) {
            taken.extend(ports);
            nodes.push(n);
        }
    }
    let seeds: Vec<String> = nodes[..voters].iter().map(Node::seed).collect();
    for n in &mut nodes {
        n.seeds = seeds.join(",");
        n.extra_args = extra.iter().map(|s| s.to_string()).collect();
    }
    nodes
}

/// Polls `f` until it gives a value; fails the test after `bound`.
pub fn wait_until<T>(what: &str, bound: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {bound:?}");
        std::thread::sleep(POLL);
    }
}

/// Node `id`'s process id while it runs.
impl Node {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A full Metadata (v9) answer about `topics` (all topics if `None`), or `None` if the node
    /// does not answer.
    pub fn metadata_of(&self, topics: Option<&[&str]>) -> Option<MetadataResponse> {
        metadata_full(&self.addr(), topics)
    }
}

/// Metadata v9 from `addr` about `topics` (`None`: all), or `None` if it does not answer.
pub fn metadata_full(addr: &str, topics: Option<&[&str]>) -> Option<MetadataResponse> {
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let req = MetadataRequest::default().with_topics(topics.map(|ts| {
        ts.iter()
            .map(|t| MetadataRequestTopic::default().with_name(Some(super::topic_name(t))))
            .collect()
    }));
    s.write_all(&request_frame(9, 1, &req)).ok()?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let n = u32::from_be_bytes(len) as usize;
    assert!(n < 64 << 20);
    let mut body = vec![0u8; n];
    s.read_exact(&mut body).ok()?;
    // Correlation id, then the v9 (flexible) response header's tagged fields.
    let mut b = bytes::Bytes::from(body).slice(5..);
    MetadataResponse::decode(&mut b, 9).ok()
}

/// One partition as a node's Metadata shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionSeen {
    pub partition: i32,
    pub error: i16,
    pub leader: i32,
    pub epoch: i32,
    pub replicas: Vec<i32>,
    pub isr: Vec<i32>,
    pub offline: Vec<i32>,
}

/// The partitions of `topic` as `addr` shows them (sorted by partition), or `None`.
pub fn partitions_seen(addr: &str, topic: &str) -> Option<Vec<PartitionSeen>> {
    let r = metadata_full(addr, Some(&[topic]))?;
    let t = r
        .topics
        .iter()
        .find(|t| t.name.as_ref().map(|n| n.as_str()) == Some(topic))?;
    if t.error_code != 0 {
        return None;
    }
    let mut out: Vec<PartitionSeen> = t
        .partitions
        .iter()
        .map(|p| PartitionSeen {
            partition: p.partition_index,
            error: p.error_code,
            leader: p.leader_id.0,
            epoch: p.leader_epoch,
            replicas: p.replica_nodes.iter().map(|b| b.0).collect(),
            isr: p.isr_nodes.iter().map(|b| b.0).collect(),
            offline: p.offline_replicas.iter().map(|b| b.0).collect(),
        })
        .collect();
    out.sort_by_key(|p| p.partition);
    Some(out)
}
