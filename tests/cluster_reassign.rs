//! Replica moves on four real `spate serve --cores 1` nodes (issue 18, "Move replicas"): three
//! nodes hold a topic of replication factor 3, a fourth joins, and while an idempotent acks=all
//! confluent-kafka producer writes, kafka-python's KafkaAdminClient moves partition 0 onto
//! node 4 (alter_partition_reassignments, listed by list_partition_reassignments) and `spate
//! partition move` moves partition 1 onto node 4 away from its own leader (which hands
//! leadership over first). Afterwards Metadata on every node shows the targets with full ISRs,
//! node 4 holds both partitions' logs, the removed replicas' files are gone, a cancel of a
//! finished move is refused, node 4 restarts and rejoins both ISRs (its membership recovered
//! from its log), and every acknowledged write is read back once at its offset. Catch-up
//! traffic runs under `--replication-throttle-bytes-per-sec`.
//!
//! Every wait is a bounded poll.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::cluster::{
    partitions_seen, unstarted_nodes, wait_for, wait_until, Node, PartitionSeen,
};
use common::history::{check_history, Producer};
use common::{assert_success, python, spate_cli};

const TOPIC: &str = "moves";
const PARTITIONS: usize = 2;
/// Bound on each wait for the cluster to change (a move, a replica in the ISR). A move copies
/// a few thousand small records; this is what a loaded 2-core machine is allowed.
const CHANGE_BOUND: Duration = Duration::from_secs(60);

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn cli(nodes: &[Node], args: &[&str]) -> Output {
    let live = nodes
        .iter()
        .find(|n| n.child.is_some())
        .expect("a live node");
    spate_cli(&live.addr(), args)
}

/// Four nodes: the first three the metadata voters and started first; the fourth (a broker
/// only) is made but not started. Every port distinct.
fn make_nodes() -> Vec<Node> {
    // Catch-up traffic throttled (well above what this test writes, so it only paces).
    unstarted_nodes(
        4,
        3,
        false,
        &["--replication-throttle-bytes-per-sec", "4000000"],
    )
}

/// The partitions as every running node shows them, when they all agree that each is led by
/// a running node with every replica in sync.
fn settled(nodes: &[Node]) -> Option<Vec<PartitionSeen>> {
    let mut first: Option<Vec<PartitionSeen>> = None;
    for n in nodes.iter().filter(|n| n.child.is_some()) {
        let ps = partitions_seen(&n.addr(), TOPIC)?;
        let ok = ps.len() == PARTITIONS
            && ps
                .iter()
                .all(|p| p.error == 0 && p.leader > 0 && p.isr.len() == p.replicas.len());
        if !ok || first.as_ref().is_some_and(|f| *f != ps) {
            return None;
        }
        first.get_or_insert(ps);
    }
    first
}

fn log_dir(n: &Node, partition: usize) -> std::path::PathBuf {
    n.dir
        .path()
        .join("data")
        .join(format!("{TOPIC}-{partition}"))
}

#[test]
fn replicas_move_onto_a_new_node_under_an_idempotent_producer() {
    let mut nodes = make_nodes();
    for n in &mut nodes[..3] {
        n.spawn();
    }
    let refs: Vec<&Node> = nodes[..3].iter().collect();
    wait_for(&refs, &[1, 2, 3], &[1, 2, 3], "three nodes formed");
    let out = cli(&nodes, &["topic", "create", TOPIC, "-p", "2", "-r", "3"]);
    assert_success("spate topic create", &out);
    let before = wait_until("topic settled", CHANGE_BOUND, || settled(&nodes));
    nodes[3].spawn();
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_for(&refs, &[1, 2, 3, 4], &[1, 2, 3], "node 4 joined");

    let bootstrap = nodes[..3]
        .iter()
        .map(Node::addr)
        .collect::<Vec<_>>()
        .join(",");
    let dir = tempfile::tempdir().unwrap();
    let mut producer = Producer::start(dir.path(), &bootstrap, TOPIC, PARTITIONS, 200);
    producer.wait_more(300, "acks before the moves");

    // Partition 0: its leader and one follower stay, the other follower moves to node 4.
    let p0 = &before[0];
    let dropped0 = *p0.replicas.iter().find(|&&n| n != p0.leader).unwrap();
    let target0: Vec<i32> = p0
        .replicas
        .iter()
        .map(|&n| if n == dropped0 { 4 } else { n })
        .collect();
    let t0 = target0
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let started = Instant::now();
    let out = python("reassign.py", &[&bootstrap, "alter", TOPIC, "0", &t0]);
    assert_success("reassign.py alter", &out);
    assert_eq!(stdout(&out).trim(), "0 None", "{}", stdout(&out));
    // Listed while it runs (or already finished: the data is small).
    let out = python("reassign.py", &[&bootstrap, "list"]);
    assert_success("reassign.py list", &out);
    for line in stdout(&out).lines() {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f[..2], [TOPIC, "0"], "{line}");
        assert_eq!(f[3], "4", "adding: {line}");
        assert_eq!(f[4], dropped0.to_string(), "removing: {line}");
    }

    // Partition 1: its leader itself moves away, to node 4 (leadership is handed over first).
    let p1 = &before[1];
    let dropped1 = p1.leader;
    let target1: Vec<i32> = p1
        .replicas
        .iter()
        .map(|&n| if n == dropped1 { 4 } else { n })
        .collect();
    let t1 = target1
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let out = cli(&nodes, &["partition", "move", TOPIC, "1", "--to", &t1]);
    assert_success("spate partition move", &out);
    assert!(stdout(&out).contains("moving"), "{}", stdout(&out));

    let after = wait_until("both moves done", CHANGE_BOUND, || {
        let ps = settled(&nodes)?;
        (ps[0].replicas == target0 && ps[1].replicas == target1).then_some(ps)
    });
    eprintln!(
        "both moves done {:?} after the first was asked for",
        started.elapsed()
    );
    assert_ne!(after[1].leader, dropped1, "{after:?}");
    let out = cli(&nodes, &["partition", "reassignments"]);
    assert_success("spate partition reassignments", &out);
    assert!(
        stdout(&out).contains("No replica moves under way"),
        "{}",
        stdout(&out)
    );
    // The removed replicas close and delete their files; node 4 holds both partitions.
    wait_until("removed replicas' files gone", CHANGE_BOUND, || {
        let gone = |n: i32, p: usize| !log_dir(&nodes[n as usize - 1], p).exists();
        (gone(dropped0, 0) && gone(dropped1, 1)).then_some(())
    });
    assert!(log_dir(&nodes[3], 0).is_dir() && log_dir(&nodes[3], 1).is_dir());
    // Cancelling a move that ended is refused (NO_REASSIGNMENT_IN_PROGRESS).
    let out = python("reassign.py", &[&bootstrap, "alter", TOPIC, "0", "cancel"]);
    assert_success("reassign.py cancel", &out);
    assert!(
        stdout(&out).contains("NoReassignmentInProgress"),
        "{}",
        stdout(&out)
    );

    producer.wait_more(300, "acks after the moves");
    // Node 4 restarts: its groups' membership comes back from its log (the membership batches
    // listed beside it), and it rejoins both ISRs as a voter.
    nodes[3].terminate();
    nodes[3].spawn();
    wait_until("node 4 back in both ISRs", CHANGE_BOUND, || {
        let ps = settled(&nodes)?;
        (ps[0].replicas == target0 && ps[1].replicas == target1).then_some(())
    });
    producer.wait_more(300, "acks after node 4's restart");
    let reports = producer.stop();
    let all = nodes.iter().map(Node::addr).collect::<Vec<_>>().join(",");
    let out = python("consume_all.py", &[&all, TOPIC, "--offsets"]);
    assert_success("consume_all.py", &out);
    check_history(&reports, &stdout(&out));
}
