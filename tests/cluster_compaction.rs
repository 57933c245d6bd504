//! A compacted topic of replication factor 3 on a three-node cluster: each replica cleans its
//! own log (only below its high watermark), and every one of them, led in turn, serves exactly
//! the last acknowledged value of every key, with the gaps of a cleaned log.

mod common;

use std::path::Path;
use std::time::Duration;

use common::cluster::{partitions_seen, unstarted_nodes, wait_for, wait_until, Node};
use common::{assert_success, python, scrape_metrics};

const TOPIC: &str = "replicated-compacted";
/// Bound on a cleaning of every replica, and on a new leader with every replica in sync.
const BOUND: Duration = Duration::from_secs(90);

/// The cleaner's runs over `TOPIC` on `node`.
fn cleaner_runs(node: &Node) -> f64 {
    scrape_metrics(node.metrics_port.expect("a metrics port"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("spate_cleaner_runs_total{") && l.contains(TOPIC))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The partition's leader and in-sync replicas as any running node shows them.
fn led(nodes: &[Node]) -> Option<(i32, Vec<i32>)> {
    nodes
        .iter()
        .filter(|n| n.child.is_some())
        .find_map(|n| partitions_seen(&n.addr(), TOPIC))
        .and_then(|p| p.first().map(|p| (p.leader, p.isr.clone())))
        .filter(|(leader, _)| *leader > 0)
}

/// Runs `compaction_replicas.py MODE` against the running nodes; fails the test (naming
/// `what`) unless it succeeds, and returns what it printed.
fn script(nodes: &[Node], mode: &str, expected: &Path, what: &str) -> String {
    let bootstrap: Vec<String> = nodes
        .iter()
        .filter(|n| n.child.is_some())
        .map(Node::addr)
        .collect();
    let out = python(
        "compaction_replicas.py",
        &[
            &bootstrap.join(","),
            TOPIC,
            mode,
            &expected.to_string_lossy(),
        ],
    );
    assert_success(what, &out);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn read_back(nodes: &[Node], expected: &Path, reader: i32) -> String {
    script(
        nodes,
        "read",
        expected,
        &format!("read with node {reader} leading"),
    )
}

#[test]
fn every_replica_of_a_compacted_topic_serves_the_last_value_of_every_key() {
    let mut nodes = unstarted_nodes(3, 3, true, &["--cleaner-backoff-ms", "200"]);
    for n in &mut nodes {
        n.spawn();
    }
    let all = [1, 2, 3];
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_for(&refs, &all, &all, "cluster formed");
    let work = tempfile::tempdir().unwrap();
    let expected = work.path().join("expected.json");
    script(
        &nodes,
        "produce",
        &expected,
        "compaction_replicas.py produce",
    );

    // Every replica cleans its own copy.
    wait_until("every replica cleaned", BOUND, || {
        nodes.iter().all(|n| cleaner_runs(n) > 0.0).then_some(())
    });

    // The leader is killed, and its successor must serve the same latest values from its own
    // cleaned log; the killed node comes back and catches up before the next kill. Elections
    // pick among two survivors, so which nodes get read is up to them: up to
    // `MOST_KILLS` kills, until all three have led (at least two have, whatever they pick).
    const MOST_KILLS: usize = 6;
    let mut read_from: Vec<i32> = Vec::new();
    for _ in 0..MOST_KILLS {
        let (leader, _) = wait_until("a leader with every replica in sync", BOUND, || {
            led(&nodes).filter(|(_, isr)| isr.len() == 3)
        });
        let said = read_back(&nodes, &expected, leader);
        println!("node {leader} leading: {said}");
        if !read_from.contains(&leader) {
            read_from.push(leader);
        }
        if read_from.len() == 3 {
            break;
        }
        let i = nodes.iter().position(|n| n.id as i32 == leader).unwrap();
        nodes[i].kill();
        let (next, _) = wait_until("a new leader", BOUND, || {
            led(&nodes).filter(|(l, _)| *l != leader)
        });
        let said = read_back(&nodes, &expected, next);
        println!("node {next} leading after node {leader} was killed: {said}");
        if !read_from.contains(&next) {
            read_from.push(next);
        }
        nodes[i].spawn();
        if read_from.len() == 3 {
            break;
        }
    }
    println!("read from nodes {read_from:?}");
    assert!(read_from.len() >= 2, "read from {read_from:?} only");
    for n in nodes.iter_mut().filter(|n| n.child.is_some()) {
        n.terminate();
    }
}
