//! spate-perf against a real three-node spate cluster on 127.0.0.1 (`spate serve --seeds ...
//! --cores 1` per node): routing each partition to its leader from a bootstrap that does not
//! lead them all, and following a leader killed (SIGKILL) mid-run. The `spate` binary is the
//! one built next to spate-perf, or `SPATE_BIN`; without either the tests say SKIPPED.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use spate_perf::cluster;
use spate_perf::wire::Connection;

/// Longest a single spate-perf invocation may take in these tests.
const RUN_TIMEOUT: Duration = Duration::from_secs(45);
/// Bound on a node answering and on the cluster listing every node.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

fn perf_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_spate-perf"))
}

fn spate_bin() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("SPATE_BIN").map(PathBuf::from),
        Some(perf_bin().with_file_name("spate")),
    ];
    candidates.into_iter().flatten().find(|bin| {
        Command::new(bin)
            .args(["serve", "--help"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Node {
    id: u32,
    addr: String,
    rpc: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Node {
    fn spawn(&mut self, bin: &Path, seeds: &str) {
        let log = std::fs::File::create(self.dir.path().join("spate.log")).unwrap();
        self.child = Some(
            Command::new(bin)
                .arg("serve")
                .args(["--node-id", &self.id.to_string()])
                .args(["--listen", &self.addr])
                .args(["--rpc-listen", &self.rpc])
                .args(["--seeds", seeds])
                .arg("--data-dir")
                .arg(self.dir.path().join("data"))
                .args(["--cores", "1", "--metrics-listen", "off"])
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("spate.log")).unwrap_or_default()
    }
}

struct Cluster {
    nodes: Vec<Node>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if std::thread::panicking() {
                let log = n.log();
                let tail = &log[log.len().saturating_sub(4000)..];
                eprintln!("--- node {} log tail ---\n{tail}", n.id);
            }
            n.kill();
        }
    }
}

impl Cluster {
    fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.addr.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Three nodes, every one a metadata voter; returns once each lists all three brokers.
fn start_cluster(bin: &Path) -> Cluster {
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node {
            id,
            addr: format!("127.0.0.1:{}", free_port()),
            rpc: format!("127.0.0.1:{}", free_port()),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        })
        .collect();
    let seeds = nodes
        .iter()
        .map(|n| format!("{}@{}", n.id, n.rpc))
        .collect::<Vec<_>>()
        .join(",");
    for n in &mut nodes {
        n.spawn(bin, &seeds);
    }
    let cluster = Cluster { nodes };
    let deadline = Instant::now() + START_TIMEOUT;
    for n in &cluster.nodes {
        loop {
            if lists_three(&n.addr) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} did not join a 3-node cluster",
                n.id
            );
            std::thread::sleep(POLL);
        }
    }
    cluster
}

/// True when `addr` answers Metadata with three brokers.
fn lists_three(addr: &str) -> bool {
    use kafka_protocol::messages::{ApiKey, MetadataRequest};
    let Ok(mut c) = Connection::connect(addr, REQUEST_TIMEOUT) else {
        return false;
    };
    let Ok(v) = c.versions.pick(ApiKey::Metadata, 1..=12) else {
        return false;
    };
    let req = MetadataRequest::default().with_topics(Some(Vec::new()));
    c.call(ApiKey::Metadata, v, &req)
        .is_ok_and(|r| r.brokers.len() == 3)
}

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run_perf(args: &[&str]) -> Output {
    let started = Instant::now();
    let mut child = Command::new(perf_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn spate-perf");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).ok();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).ok();
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > RUN_TIMEOUT {
            child.kill().ok();
            child.wait().ok();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        code: status.and_then(|s| s.code()),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn summary(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The leader of each partition of `topic`, asked of any live node; waits for all to have one.
fn leaders_of(cluster: &Cluster, topic: &str) -> Vec<(i32, String)> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        for n in cluster.nodes.iter().filter(|n| n.child.is_some()) {
            let Ok(mut c) = Connection::connect(&n.addr, REQUEST_TIMEOUT) else {
                continue;
            };
            if let Ok(l) = cluster::leaders(&mut c, topic) {
                if !l.partitions.is_empty() && l.partitions.iter().all(|(_, a)| a.is_some()) {
                    return l
                        .partitions
                        .into_iter()
                        .map(|(p, a)| (p, a.unwrap()))
                        .collect();
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{topic} has no leader for every partition"
        );
        std::thread::sleep(POLL);
    }
}

/// Creates `topic` with replication factor 3 by producing one record to each partition;
/// returns the records acknowledged.
fn create(bootstrap: &str, topic: &str, partitions: u32, dir: &Path) -> u64 {
    let json = dir.join(format!("{topic}-create.json"));
    let out = run_perf(&[
        "produce",
        "-b",
        bootstrap,
        "-t",
        topic,
        "-p",
        &partitions.to_string(),
        "--replication-factor",
        "3",
        "-n",
        &partitions.to_string(),
        "-s",
        "10",
        "--batch-bytes",
        "10",
        "--acks",
        "all",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(out.code, Some(0), "create: {}{}", out.stdout, out.stderr);
    summary(&json)["records"].as_u64().unwrap()
}

/// Reads the whole topic back with spate-perf; returns the records it saw.
fn consume_all(bootstrap: &str, topic: &str, dir: &Path) -> u64 {
    let json = dir.join(format!("{topic}-consume.json"));
    let out = run_perf(&[
        "consume",
        "-b",
        bootstrap,
        "-t",
        topic,
        "--fetch-max-wait-ms",
        "50",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(out.code, Some(0), "consume: {}{}", out.stdout, out.stderr);
    summary(&json)["records"].as_u64().unwrap()
}

/// Lets the spate-perf run in `runner` get going, SIGKILLs the node at `victim_addr` (a
/// partition's leader), and waits for the run's end.
fn kill_mid_run(
    cluster: &mut Cluster,
    victim_addr: &str,
    runner: std::thread::JoinHandle<Output>,
) -> Output {
    std::thread::sleep(Duration::from_millis(1500));
    cluster
        .nodes
        .iter_mut()
        .find(|n| n.addr == victim_addr)
        .expect("the leader is one of the nodes")
        .kill();
    runner.join().unwrap()
}

#[test]
fn produce_to_rf3_through_a_bootstrap_that_does_not_lead_every_partition() {
    let Some(bin) = spate_bin() else {
        eprintln!("SKIPPED: no spate binary with `serve` (build it, or set SPATE_BIN)");
        return;
    };
    let cluster = start_cluster(&bin);
    let dir = tempfile::tempdir().unwrap();
    let only = cluster.nodes[0].addr.clone();
    // Create the topic first (through node 1), so the layout can be checked before the run.
    let created = create(&only, "rf3", 6, dir.path());
    let leaders = leaders_of(&cluster, "rf3");
    assert!(
        leaders.iter().any(|(_, a)| *a != only),
        "node 1 leads every partition ({leaders:?}): the run would not show routing"
    );
    let json = dir.path().join("rf3.json");
    let out = run_perf(&[
        "produce",
        "-b",
        &only,
        "-t",
        "rf3",
        "-c",
        "1",
        "-s",
        "100",
        "--batch-bytes",
        "5000",
        "--acks",
        "all",
        "--idempotent",
        "-n",
        "30000",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(out.code, Some(0), "produce: {}{}", out.stdout, out.stderr);
    let s = summary(&json);
    let acked = s["records"].as_u64().unwrap();
    assert!(acked >= 30_000, "{acked} acknowledged: {}", out.stdout);
    assert_eq!(s["latency"]["samples"].as_u64().unwrap(), acked);
    // With one connection asked for, one per leader was opened.
    let distinct: std::collections::HashSet<&String> = leaders.iter().map(|(_, a)| a).collect();
    if distinct.len() > 1 {
        assert!(
            out.stderr.contains("at least one per leader"),
            "{}",
            out.stderr
        );
    }
    // Every acknowledged record is in the topic, once.
    let consumed = consume_all(&cluster.bootstrap(), "rf3", dir.path());
    assert_eq!(consumed, acked + created);
}

#[test]
fn a_leader_killed_mid_run_is_followed_and_not_counted_as_a_failure() {
    let Some(bin) = spate_bin() else {
        eprintln!("SKIPPED: no spate binary with `serve` (build it, or set SPATE_BIN)");
        return;
    };
    let mut cluster = start_cluster(&bin);
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = cluster.bootstrap();
    let created = create(&bootstrap, "kill", 3, dir.path());
    let victim_addr = leaders_of(&cluster, "kill")[0].1.clone();
    let json = dir.path().join("kill.json");
    let json_arg = json.to_str().unwrap().to_string();
    let b = bootstrap.clone();
    // 12,000 records at 2,000 records/s: about 6 s, so the kill lands mid-run.
    let runner = std::thread::spawn(move || {
        run_perf(&[
            "produce",
            "-b",
            &b,
            "-t",
            "kill",
            "-s",
            "100",
            "--acks",
            "all",
            "--idempotent",
            "--rate",
            "2000",
            "-n",
            "12000",
            "--json",
            &json_arg,
        ])
    });
    let out = kill_mid_run(&mut cluster, &victim_addr, runner);
    assert_eq!(out.code, Some(0), "produce: {}{}", out.stdout, out.stderr);
    let s = summary(&json);
    let acked = s["records"].as_u64().unwrap();
    assert!(acked >= 12_000, "{acked} acknowledged");
    let retries = s["retries"].as_u64().unwrap();
    assert!(retries > 0, "a leader was killed, yet nothing was re-sent");
    let failovers = s["failovers"].as_array().unwrap();
    assert!(!failovers.is_empty());
    assert!(s["failover_time_ms"].as_f64().unwrap() > 0.0);
    // The batches due while the partition had no leader waited for the new one: the tail shows
    // the failover (no coordinated omission).
    let max = s["latency"]["max_ms"].as_f64().unwrap();
    assert!(max >= 100.0, "max latency {max} ms across a leader kill");
    assert!(out.stdout.contains("retries"), "{}", out.stdout);
    // Idempotent re-sends: every acknowledged record is stored once.
    let consumed = consume_all(&cluster.bootstrap(), "kill", dir.path());
    assert_eq!(consumed, acked + created);
}

/// An e2e run's consumers follow a partition's leader too: after a SIGKILL of the leader
/// mid-run, they fetch from the new one, and every acknowledged record is seen (the run ends
/// only once they have all been fetched).
#[test]
fn e2e_consumers_follow_a_killed_leader() {
    let Some(bin) = spate_bin() else {
        eprintln!("SKIPPED: no spate binary with `serve` (build it, or set SPATE_BIN)");
        return;
    };
    let mut cluster = start_cluster(&bin);
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = cluster.bootstrap();
    create(&bootstrap, "e2e-kill", 3, dir.path());
    let victim_addr = leaders_of(&cluster, "e2e-kill")[0].1.clone();
    let json = dir.path().join("e2e-kill.json");
    let json_arg = json.to_str().unwrap().to_string();
    let b = bootstrap.clone();
    let runner = std::thread::spawn(move || {
        run_perf(&[
            "e2e",
            "-b",
            &b,
            "-t",
            "e2e-kill",
            "-c",
            "1",
            "-s",
            "100",
            "--acks",
            "all",
            "--idempotent",
            "--rate",
            "2000",
            "--duration-secs",
            "6",
            "--warmup-secs",
            "0",
            "--fetch-max-wait-ms",
            "50",
            "--json",
            &json_arg,
        ])
    });
    let out = kill_mid_run(&mut cluster, &victim_addr, runner);
    assert_eq!(out.code, Some(0), "e2e: {}{}", out.stdout, out.stderr);
    let s = summary(&json);
    assert!(s["records"].as_u64().unwrap() >= 6_000, "{s}");
    assert!(
        s["retries"].as_u64().unwrap() > 0,
        "a leader was killed, yet nothing was retried: {s}"
    );
}
