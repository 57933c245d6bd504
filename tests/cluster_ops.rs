//! Issue 18's scenario on real `spate serve --cores 1` nodes: three nodes under an idempotent
//! acks=all confluent-kafka producer and a confluent-kafka consumer group; a fourth node joins;
//! `spate cluster rebalance --execute` evens out replicas (and then preferred leaders); `spate
//! node decommission 1 --wait` drains node 1 until it holds nothing (its partition files
//! deleted); `spate node maintenance 2 on`, node 2 restarts, `off`; `spate partition
//! elect-leaders`; node 1 is stopped. Then every acknowledged record is read back exactly once
//! at its acknowledged offset (in order per partition), what the group read at each offset is
//! what was acknowledged there (no offset changed meaning), its commits never went back, and
//! the producer's application saw no error (retriable errors are retried inside the client).
//!
//! Node 1 stays running until the end: it is a metadata voter, and while node 2 restarts the
//! metadata quorum needs both other voters (a decommissioned voter stays a voter: voter
//! changes are not supported yet).
//!
//! Every wait is a bounded poll.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{metadata_full, unstarted_nodes, wait_for, wait_until, Node};
use common::history::{check_history, Producer};
use common::{assert_success, python, spate_cli};

const TOPIC: &str = "ops";
const PARTITIONS: usize = 6;
const GROUP: &str = "ops-group";
/// Bound on each wait for the cluster to change. The scenario takes well under a minute on a
/// quiet machine; a loaded 2-core one running other tests is allowed this per step.
const CHANGE_BOUND: Duration = Duration::from_secs(60);

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Runs the CLI against a running node other than `avoid`.
fn cli(nodes: &[Node], avoid: u64, args: &[&str]) -> Output {
    let live = nodes
        .iter()
        .find(|n| n.child.is_some() && n.id != avoid)
        .expect("a live node");
    spate_cli(&live.addr(), args)
}

fn make_nodes() -> Vec<Node> {
    unstarted_nodes(4, 3, false, &[])
}

/// Every partition of every topic as all running nodes show it, when they agree and each is
/// led with its full ISR: (topic, partition) -> (leader, replicas).
type Layout = BTreeMap<(String, i32), (i32, Vec<i32>)>;

fn settled(nodes: &[Node]) -> Option<Layout> {
    let mut first: Option<Layout> = None;
    for n in nodes.iter().filter(|n| n.child.is_some()) {
        let meta = metadata_full(&n.addr(), None)?;
        let mut layout = Layout::new();
        for t in &meta.topics {
            let name = t.name.as_ref()?.to_string();
            if t.error_code != 0 {
                return None;
            }
            for p in &t.partitions {
                let replicas: Vec<i32> = p.replica_nodes.iter().map(|b| b.0).collect();
                let mut isr: Vec<i32> = p.isr_nodes.iter().map(|b| b.0).collect();
                let mut sorted = replicas.clone();
                sorted.sort_unstable();
                isr.sort_unstable();
                if p.error_code != 0 || p.leader_id.0 < 0 || isr != sorted {
                    return None;
                }
                layout.insert((name.clone(), p.partition_index), (p.leader_id.0, replicas));
            }
        }
        if !layout.contains_key(&(TOPIC.to_string(), 0)) {
            return None;
        }
        if first.as_ref().is_some_and(|f| *f != layout) {
            return None;
        }
        first.get_or_insert(layout);
    }
    first
}

fn replicas_per_node(layout: &Layout, nodes: &[i32]) -> BTreeMap<i32, usize> {
    let mut c: BTreeMap<i32, usize> = nodes.iter().map(|&n| (n, 0)).collect();
    for (_, replicas) in layout.values() {
        for r in replicas {
            *c.entry(*r).or_default() += 1;
        }
    }
    c
}

fn spread(c: &BTreeMap<i32, usize>) -> usize {
    c.values().max().unwrap() - c.values().min().unwrap()
}

fn log_dirs(n: &Node) -> Vec<String> {
    std::fs::read_dir(n.dir.path().join("data"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|name| name.starts_with(&format!("{TOPIC}-")))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn grow_rebalance_decommission_maintenance_under_producer_and_group() {
    let started = Instant::now();
    let mut nodes = make_nodes();
    for n in &mut nodes[..3] {
        n.spawn();
    }
    let refs: Vec<&Node> = nodes[..3].iter().collect();
    wait_for(&refs, &[1, 2, 3], &[1, 2, 3], "three nodes formed");
    let out = cli(&nodes, 0, &["topic", "create", TOPIC, "-p", "6", "-r", "3"]);
    assert_success("spate topic create", &out);
    wait_until("topic settled", CHANGE_BOUND, || settled(&nodes));

    let bootstrap = nodes[..3]
        .iter()
        .map(Node::addr)
        .collect::<Vec<_>>()
        .join(",");
    let dir = tempfile::tempdir().unwrap();
    let mut producer = Producer::start(dir.path(), &bootstrap, TOPIC, PARTITIONS, 200);
    let mut consumer = GroupConsumer::start(dir.path(), &bootstrap);
    producer.wait_more(200, "acks before the fourth node");
    consumer.wait_more(100, "the group reads before the fourth node");

    // Grow: node 4 joins empty; the rebalance moves replicas onto it.
    nodes[3].spawn();
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_for(&refs, &[1, 2, 3, 4], &[1, 2, 3], "node 4 joined");
    let before = wait_until("settled with node 4", CHANGE_BOUND, || settled(&nodes));
    assert_eq!(replicas_per_node(&before, &[4])[&4], 0);
    let dry = cli(&nodes, 0, &["cluster", "rebalance", "--json"]);
    assert_success("spate cluster rebalance (dry run)", &dry);
    let plan: serde_json::Value = serde_json::from_str(&stdout(&dry)).unwrap();
    assert!(plan["replica_moves"].as_u64().unwrap() > 0, "{plan}");
    assert_eq!(
        settled(&nodes).map(|l| replicas_per_node(&l, &[4])[&4]),
        Some(0),
        "a dry run moved something"
    );
    let t = Instant::now();
    let out = cli(
        &nodes,
        0,
        &["cluster", "rebalance", "--execute", "--timeout", "60"],
    );
    assert_success("spate cluster rebalance --execute", &out);
    let even = wait_until("replicas even over four nodes", CHANGE_BOUND, || {
        let l = settled(&nodes)?;
        (spread(&replicas_per_node(&l, &[1, 2, 3, 4])) <= 1).then_some(l)
    });
    eprintln!(
        "rebalance: {:?}, replicas per node {:?}",
        t.elapsed(),
        replicas_per_node(&even, &[1, 2, 3, 4])
    );
    let again = cli(&nodes, 0, &["cluster", "rebalance", "--json"]);
    assert_success("spate cluster rebalance (after)", &again);
    let plan: serde_json::Value = serde_json::from_str(&stdout(&again)).unwrap();
    assert_eq!(plan["replica_moves"], 0, "{plan}");
    producer.wait_more(200, "acks after the rebalance");

    // Decommission node 1: every replica leaves it, its partition files go.
    let t = Instant::now();
    let out = cli(
        &nodes,
        1,
        &["node", "decommission", "1", "--wait", "--timeout", "60"],
    );
    assert_success("spate node decommission 1 --wait", &out);
    assert!(stdout(&out).contains("can be stopped"), "{}", stdout(&out));
    let drained = wait_until("settled without node 1", CHANGE_BOUND, || {
        let l = settled(&nodes)?;
        (replicas_per_node(&l, &[1])[&1] == 0).then_some(l)
    });
    eprintln!("decommission: {:?}", t.elapsed());
    assert!(drained.values().all(|(leader, _)| *leader != 1));
    wait_until("node 1's partition files deleted", CHANGE_BOUND, || {
        log_dirs(&nodes[0]).is_empty().then_some(())
    });
    let out = cli(&nodes, 1, &["node", "decommission-status", "1", "--json"]);
    assert_success("spate node decommission-status", &out);
    let status: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status["done"], true, "{status}");
    let out = cli(&nodes, 1, &["cluster", "info", "--json"]);
    assert_success("spate cluster info", &out);
    let info: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let b1 = info["brokers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == 1)
        .unwrap()
        .clone();
    assert_eq!(
        (b1["decommissioning"].clone(), b1["replicas"].clone()),
        (true.into(), 0.into()),
        "{info}"
    );
    // A second decommission would leave two brokers for replication factor 3: refused.
    let out = cli(&nodes, 1, &["node", "decommission", "2"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("INVALID_REPLICATION_FACTOR") && err.contains("replication factor 3"),
        "{err}"
    );
    producer.wait_more(200, "acks after the decommission");

    // Maintenance on node 2, restart it, maintenance off.
    let out = cli(&nodes, 2, &["node", "maintenance", "2", "on"]);
    assert_success("spate node maintenance 2 on", &out);
    wait_until("node 2 leads nothing", CHANGE_BOUND, || {
        let l = settled(&nodes)?;
        l.values().all(|(leader, _)| *leader != 2).then_some(())
    });
    wait_until(
        "restart-check says node 2 may restart",
        CHANGE_BOUND,
        || {
            cli(&nodes, 2, &["cluster", "restart-check", "2"])
                .status
                .success()
                .then_some(())
        },
    );
    nodes[1].terminate();
    nodes[1].spawn();
    wait_until("node 2 back in every ISR", CHANGE_BOUND, || settled(&nodes));
    let out = cli(&nodes, 0, &["node", "maintenance", "2", "off"]);
    assert_success("spate node maintenance 2 off", &out);
    producer.wait_more(200, "acks after node 2's restart");

    // Preferred leaders: every partition ends led by its preferred replica.
    wait_until("settled before the election", CHANGE_BOUND, || {
        settled(&nodes)
    });
    let out = cli(&nodes, 1, &["partition", "elect-leaders"]);
    assert_success("spate partition elect-leaders", &out);
    wait_until("preferred replicas lead", CHANGE_BOUND, || {
        let l = settled(&nodes)?;
        l.values()
            .all(|(leader, replicas)| replicas[0] == *leader)
            .then_some(())
    });

    // Node 1 holds nothing: stopping it changes nothing for clients.
    nodes[0].terminate();
    producer.wait_more(200, "acks with node 1 stopped");
    consumer.wait_more(100, "the group reads at the end");
    let reports = producer.stop();
    let events = consumer.stop();
    let all = nodes[1..]
        .iter()
        .map(Node::addr)
        .collect::<Vec<_>>()
        .join(",");
    let out = python("consume_all.py", &[&all, TOPIC, "--offsets"]);
    assert_success("consume_all.py", &out);
    let log = check_history(&reports, &stdout(&out));
    check_group(&events, &log);
    eprintln!("whole scenario: {:?}", started.elapsed());
}

struct GroupConsumer {
    child: Child,
    stop_file: std::path::PathBuf,
    out_file: std::path::PathBuf,
}

/// What the group member read and committed (tests/python/groups_consumer.py's events).
#[derive(Debug, Default)]
struct Events {
    /// (partition, offset, value) in order.
    consumed: Vec<(usize, i64, u64)>,
    /// (partition, next offset) of acknowledged commits, in order.
    commits: Vec<(usize, i64)>,
}

impl GroupConsumer {
    fn start(dir: &Path, bootstrap: &str) -> GroupConsumer {
        let stop_file = dir.join("stop-consumer");
        let out_file = dir.join("group.txt");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/groups_consumer.py");
        let child = Command::new("python3")
            .arg(script)
            .args([
                bootstrap,
                TOPIC,
                GROUP,
                &out_file.to_string_lossy(),
                &stop_file.to_string_lossy(),
                "600",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run python3");
        GroupConsumer {
            child,
            stop_file,
            out_file,
        }
    }

    /// Messages the member has read so far.
    fn read(&self) -> usize {
        std::fs::read_to_string(&self.out_file)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("M "))
            .count()
    }

    fn wait_more(&mut self, n: usize, what: &str) {
        let base = self.read();
        wait_until(what, CHANGE_BOUND, || {
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!("group consumer exited early ({s})");
            }
            (self.read() >= base + n).then_some(())
        });
    }

    fn stop(mut self) -> Events {
        std::fs::write(&self.stop_file, b"").unwrap();
        let status = wait_until("group consumer finished", Duration::from_secs(60), || {
            self.child.try_wait().unwrap()
        });
        assert!(status.success(), "group consumer exited with {status}");
        let mut text = std::fs::read_to_string(&self.out_file).unwrap_or_default();
        text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
        let mut e = Events::default();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            match f.as_slice() {
                ["M", p, o, v] => {
                    e.consumed
                        .push((p.parse().unwrap(), o.parse().unwrap(), v.parse().unwrap()))
                }
                ["C", p, o] => e.commits.push((p.parse().unwrap(), o.parse().unwrap())),
                _ => {}
            }
        }
        e
    }
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the group read at each offset is what the log holds there, it read something from
/// every partition, and its acknowledged commits never went back.
fn check_group(events: &Events, log: &HashMap<(usize, i64), u64>) {
    assert!(!events.consumed.is_empty(), "the group read nothing");
    for &(p, o, v) in &events.consumed {
        assert_eq!(log.get(&(p, o)), Some(&v), "the group read {v} at {p}/{o}");
    }
    let mut last: BTreeMap<usize, i64> = BTreeMap::new();
    for &(p, o) in &events.commits {
        let prev = last.entry(p).or_insert(o);
        assert!(
            o >= *prev,
            "partition {p}: commit went back from {prev} to {o}"
        );
        *prev = o;
    }
    eprintln!(
        "group: {} read, {} commits, partitions {:?}",
        events.consumed.len(),
        events.commits.len(),
        last.keys().collect::<Vec<_>>()
    );
}
