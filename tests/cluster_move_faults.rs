//! SIGKILL in the middle of replica moves (issue 18: "the fault mix where Jepsen found Redpanda
//! losing messages"), on four real `spate serve --cores 1` nodes under a catch-up throttle,
//! while an idempotent acks=all producer (confluent-kafka) writes to every partition:
//!
//! (a) every partition moves one replica, and the controller leader (Metadata's
//!     `controller_id`) is SIGKILLed while the moves run, then restarted;
//! (b) every partition moves again, and the node being added to partition 0 is SIGKILLed in the
//!     middle of its catch-up, then restarted;
//! (c) every partition moves again, and partition 0's leader is SIGKILLed mid-move, then
//!     restarted.
//!
//! After each round every move finishes (the replicas are the targets, every ISR full, on
//! every node). At the end every acknowledged record is read back exactly once at its offset,
//! the producer saw no error (only retriable ones, which it retried), and no node keeps the
//! files of a partition it no longer holds.
//!
//! Every wait is a bounded poll.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{
    metadata, partitions_seen, unstarted_nodes, wait_for, wait_until, Node, PartitionSeen,
};
use common::history::{check_history, Producer};
use common::{assert_success, python, spate_cli};

const TOPIC: &str = "faults";
const PARTITIONS: usize = 3;
/// Catch-up per sending node: a partition's new replica takes a few seconds to catch up, so
/// the kill lands in the middle of it.
const THROTTLE_BYTES_PER_SEC: u64 = 500_000;
/// Data written to each partition before the first move.
const PREFILL_MESSAGES: usize = 1_500;
const PREFILL_MESSAGE_BYTES: usize = 1_000;
/// Bound on each round's moves ending (kill and restart included), on a loaded 2-core machine.
const ROUND_BOUND: Duration = Duration::from_secs(120);
const PRODUCE_RATE: u32 = 150;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Four nodes, the first three the metadata voters. Every port distinct.
fn make_nodes() -> Vec<Node> {
    let throttle = THROTTLE_BYTES_PER_SEC.to_string();
    unstarted_nodes(
        4,
        3,
        false,
        &["--replication-throttle-bytes-per-sec", &throttle],
    )
}

fn live_addr(nodes: &[Node]) -> String {
    nodes
        .iter()
        .find(|n| n.child.is_some())
        .expect("a live node")
        .addr()
}

/// The partitions as every running node shows them, when they all agree that each is led by
/// a running node with every replica in sync.
fn settled(nodes: &[Node]) -> Option<Vec<PartitionSeen>> {
    let mut first: Option<Vec<PartitionSeen>> = None;
    for n in nodes.iter().filter(|n| n.child.is_some()) {
        let ps = partitions_seen(&n.addr(), TOPIC)?;
        let ok = ps.len() == PARTITIONS
            && ps.iter().all(|p| {
                p.error == 0
                    && p.leader > 0
                    && nodes[p.leader as usize - 1].child.is_some()
                    && p.isr.len() == p.replicas.len()
            });
        if !ok || first.as_ref().is_some_and(|f| *f != ps) {
            return None;
        }
        first.get_or_insert(ps);
    }
    first
}

/// Moves every partition: the one node outside its replicas takes the place of `drop(p)`.
fn targets(ps: &[PartitionSeen], drop: impl Fn(&PartitionSeen) -> i32) -> Vec<Vec<i32>> {
    ps.iter()
        .map(|p| {
            let out = (1..=4)
                .find(|n| !p.replicas.contains(n))
                .expect("RF 3 of 4");
            let gone = drop(p);
            p.replicas
                .iter()
                .map(|&n| if n == gone { out } else { n })
                .collect()
        })
        .collect()
}

/// Asks for the moves with a plan file through `spate partition move --plan`.
fn start_moves(nodes: &[Node], dir: &std::path::Path, targets: &[Vec<i32>]) {
    let plan = serde_json::json!({
        "version": 1,
        "partitions": targets.iter().enumerate().map(|(p, t)| serde_json::json!({
            "topic": TOPIC, "partition": p, "replicas": t,
        })).collect::<Vec<_>>(),
    });
    let path = dir.join("plan.json");
    std::fs::write(&path, plan.to_string()).unwrap();
    let out = spate_cli(
        &live_addr(nodes),
        &["partition", "move", "--plan", &path.to_string_lossy()],
    );
    assert_success("spate partition move --plan", &out);
}

/// Moves still listed by `spate partition reassignments`.
fn moves_listed(nodes: &[Node]) -> usize {
    let out = spate_cli(&live_addr(nodes), &["partition", "reassignments", "--json"]);
    assert_success("spate partition reassignments", &out);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    v["reassignments"].as_array().map_or(0, Vec::len)
}

/// Waits for the moves to `targets` to end with every replica in sync; returns the partitions.
fn wait_moved(nodes: &[Node], targets: &[Vec<i32>], what: &str) -> Vec<PartitionSeen> {
    let started = Instant::now();
    let ps = wait_until(what, ROUND_BOUND, || {
        let ps = settled(nodes)?;
        ps.iter()
            .zip(targets)
            .all(|(p, t)| p.replicas == *t)
            .then_some(ps)
    });
    wait_until("no move listed", ROUND_BOUND, || {
        (moves_listed(nodes) == 0).then_some(())
    });
    eprintln!("{what}: {:?}", started.elapsed());
    ps
}

/// SIGKILLs node `id` once the moves are seen under way, and starts it again.
fn kill_mid_move(nodes: &mut [Node], id: i32, what: &str) {
    let listed = moves_listed(nodes);
    assert!(listed > 0, "{what}: the moves ended before the kill");
    eprintln!("{what}: SIGKILL node {id} with {listed} moves under way");
    nodes[id as usize - 1].kill();
    // The others notice (an election timeout, a session) before it comes back.
    std::thread::sleep(Duration::from_millis(1_500));
    nodes[id as usize - 1].spawn();
}

#[test]
fn moves_finish_and_lose_nothing_when_nodes_are_killed_mid_move() {
    let mut nodes = make_nodes();
    for n in &mut nodes[..3] {
        n.spawn();
    }
    let refs: Vec<&Node> = nodes[..3].iter().collect();
    wait_for(&refs, &[1, 2, 3], &[1, 2, 3], "three nodes formed");
    let out = spate_cli(
        &nodes[0].addr(),
        &[
            "topic",
            "create",
            TOPIC,
            "-p",
            &PARTITIONS.to_string(),
            "-r",
            "3",
        ],
    );
    assert_success("spate topic create", &out);
    let mut ps = wait_until("topic settled", ROUND_BOUND, || settled(&nodes));
    nodes[3].spawn();
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_for(&refs, &[1, 2, 3, 4], &[1, 2, 3], "node 4 joined");

    let all = nodes.iter().map(Node::addr).collect::<Vec<_>>().join(",");
    for p in 0..PARTITIONS {
        let out = python(
            "produce_bulk.py",
            &[
                &all,
                TOPIC,
                &p.to_string(),
                &PREFILL_MESSAGES.to_string(),
                &PREFILL_MESSAGE_BYTES.to_string(),
            ],
        );
        assert_success("produce_bulk.py", &out);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut producer = Producer::start(dir.path(), &all, TOPIC, PARTITIONS, PRODUCE_RATE);
    producer.wait_more(200, "acks before the moves");

    // (a) The controller leader dies while the moves run.
    let t = targets(&ps, |p| {
        *p.replicas.iter().find(|&&n| n != p.leader).unwrap()
    });
    start_moves(&nodes, dir.path(), &t);
    let (controller, _) = metadata(&live_addr(&nodes)).expect("metadata");
    assert!((1..=3).contains(&controller), "controller {controller}");
    kill_mid_move(&mut nodes, controller, "(a) controller leader");
    ps = wait_moved(
        &nodes,
        &t,
        "(a) moves done after the controller leader's kill",
    );
    producer.wait_more(200, "acks after (a)");

    // (b) A node being added dies in the middle of its catch-up.
    let t = targets(&ps, |p| {
        *p.replicas.iter().find(|&&n| n != p.leader).unwrap()
    });
    let adding = *t[0].iter().find(|n| !ps[0].replicas.contains(n)).unwrap();
    start_moves(&nodes, dir.path(), &t);
    kill_mid_move(&mut nodes, adding, "(b) adding replica of partition 0");
    ps = wait_moved(&nodes, &t, "(b) moves done after the adding replica's kill");
    producer.wait_more(200, "acks after (b)");

    // (c) Partition 0's leader dies mid-move (the leader carries the move out).
    let t = targets(&ps, |p| {
        *p.replicas.iter().find(|&&n| n != p.leader).unwrap()
    });
    let leader = ps[0].leader;
    start_moves(&nodes, dir.path(), &t);
    kill_mid_move(&mut nodes, leader, "(c) partition 0's leader");
    ps = wait_moved(&nodes, &t, "(c) moves done after the leader's kill");
    producer.wait_more(200, "acks after (c)");

    let reports = producer.stop();
    let out = python("consume_all.py", &[&all, TOPIC, "--offsets"]);
    assert_success("consume_all.py", &out);
    check_history(&reports, &stdout(&out));

    // A node keeps the files of exactly the partitions it holds.
    wait_until("files only where replicas are", ROUND_BOUND, || {
        nodes
            .iter()
            .all(|n| {
                ps.iter().all(|p| {
                    let dir = n
                        .dir
                        .path()
                        .join("data")
                        .join(format!("{TOPIC}-{}", p.partition));
                    dir.exists() == p.replicas.contains(&(n.id as i32))
                })
            })
            .then_some(())
    });
}

const ORPHANS: &str = "orphans";

/// Every file of partition 0 of [`ORPHANS`] in a node's data dir: the log directory and the
/// files beside it (hard state, membership list, topic id), and the producer state.
fn partition_files(n: &Node) -> Vec<std::path::PathBuf> {
    let data = n.dir.path().join("data");
    let prefix = format!("{ORPHANS}-0");
    let mut out: Vec<std::path::PathBuf> = std::fs::read_dir(&data)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|f| f.to_str())
                        .is_some_and(|f| f == prefix || f.starts_with(&format!("{prefix}.")))
                })
                .collect()
        })
        .unwrap_or_default();
    let state = data.join("producer-state").join(format!("{prefix}.json"));
    if state.exists() {
        out.push(state);
    }
    out.sort();
    out
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy_tree(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}

/// Copies node `n`'s files of the partition to `backup` (paths kept relative to its data dir).
fn back_up(n: &Node, backup: &std::path::Path) {
    let data = n.dir.path().join("data");
    for f in partition_files(n) {
        copy_tree(&f, &backup.join(f.strip_prefix(&data).unwrap()));
    }
}

/// Puts the backed-up files back into node `n`'s data dir, over whatever is there.
fn restore(n: &Node, backup: &std::path::Path) {
    let data = n.dir.path().join("data");
    for f in partition_files(n) {
        if f.is_dir() {
            std::fs::remove_dir_all(&f).unwrap();
        } else {
            std::fs::remove_file(&f).unwrap();
        }
    }
    copy_tree(backup, &data);
}

/// The partition's records as a consumer reads them, one value a line.
fn read_all(nodes: &[Node]) -> Vec<String> {
    let all = nodes.iter().map(Node::addr).collect::<Vec<_>>().join(",");
    let out = python("consume_all.py", &[&all, ORPHANS]);
    assert_success("consume_all.py", &out);
    stdout(&out).lines().map(str::to_string).collect()
}

/// Issue 18's orphan files: a node down while a move takes its replica away, a node killed
/// after the move ended but before it removed the files (its metadata says it no longer holds
/// the partition, so nothing would ever open or delete them), and a topic deleted and created
/// again under the same name while a node holds the old incarnation's files.
#[test]
fn files_of_a_partition_moved_away_or_deleted_are_removed_at_restart() {
    let mut nodes = make_nodes();
    nodes.truncate(3);
    for n in &mut nodes {
        n.spawn();
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_for(&refs, &[1, 2, 3], &[1, 2, 3], "three nodes formed");
    let addr = nodes[0].addr();
    let out = spate_cli(&addr, &["topic", "create", ORPHANS, "-p", "1", "-r", "3"]);
    assert_success("spate topic create", &out);
    let all = nodes.iter().map(Node::addr).collect::<Vec<_>>().join(",");
    let ps = wait_until("topic led", ROUND_BOUND, || {
        let ps = partitions_seen(&addr, ORPHANS)?;
        (ps.len() == 1 && ps[0].leader > 0 && ps[0].isr.len() == 3).then_some(ps)
    });
    let out = python("produce_bulk.py", &[&all, ORPHANS, "0", "300", "500"]);
    assert_success("produce_bulk.py", &out);

    // A follower goes down; the partition moves off it (3 replicas -> the other 2).
    let gone = *ps[0].replicas.iter().find(|&&n| n != ps[0].leader).unwrap();
    let x = gone as usize - 1;
    nodes[x].kill();
    let target: Vec<i32> = ps[0]
        .replicas
        .iter()
        .copied()
        .filter(|&n| n != gone)
        .collect();
    let t = target
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let live = live_addr(&nodes);
    let out = spate_cli(&live, &["partition", "move", ORPHANS, "0", "--to", &t]);
    assert_success("spate partition move", &out);
    wait_until("moved off the downed node", ROUND_BOUND, || {
        let ps = partitions_seen(&live, ORPHANS)?;
        (ps[0].replicas == target && ps[0].isr.len() == 2 && moves_listed(&nodes) == 0)
            .then_some(())
    });
    let backup = tempfile::tempdir().unwrap();
    let files = partition_files(&nodes[x]);
    // At least the log directory and its topic-id claim (the hard state lives in the shard's
    // store, which prunes the entries of groups the node no longer hosts).
    assert!(files.len() >= 2, "the downed node's files: {files:?}");
    back_up(&nodes[x], backup.path());

    // (1) Down when the move ended: its files go when it comes back.
    nodes[x].spawn();
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_for(&refs, &[1, 2, 3], &[1, 2, 3], "the node is back");
    wait_until("files gone after a restart", ROUND_BOUND, || {
        partition_files(&nodes[x]).is_empty().then_some(())
    });

    // (2) Killed before it removed them (its metadata already says it holds no replica): put
    // them back under a stopped node and start it.
    nodes[x].kill();
    restore(&nodes[x], backup.path());
    assert_eq!(partition_files(&nodes[x]).len(), files.len());
    nodes[x].spawn();
    wait_until("files gone after the second restart", ROUND_BOUND, || {
        partition_files(&nodes[x]).is_empty().then_some(())
    });
    assert!(
        nodes[x]
            .log()
            .contains("removed the files of a partition this node no longer holds"),
        "the sweep did not run"
    );

    // (3) The topic is deleted and made again under its name, with a replica on the node; the
    // node is killed and the old incarnation's files put where the new one's are. It must
    // never serve or keep the old records.
    let before = read_all(&nodes);
    assert_eq!(before.len(), 300);
    let out = spate_cli(&addr, &["topic", "delete", ORPHANS]);
    assert_success("spate topic delete", &out);
    wait_until("topic gone", ROUND_BOUND, || {
        let out = spate_cli(&addr, &["topic", "list"]);
        (out.status.success()
            && !stdout(&out)
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ORPHANS)))
        .then_some(())
    });
    let out = spate_cli(&addr, &["topic", "create", ORPHANS, "-p", "1", "-r", "3"]);
    assert_success("spate topic create again", &out);
    wait_until("new incarnation in sync", ROUND_BOUND, || {
        let ps = partitions_seen(&addr, ORPHANS)?;
        (ps[0].leader > 0 && ps[0].isr.len() == 3).then_some(())
    });
    let out = python("produce_bulk.py", &[&all, ORPHANS, "0", "20", "100"]);
    assert_success("produce_bulk.py", &out);
    nodes[x].kill();
    restore(&nodes[x], backup.path());
    nodes[x].spawn();
    wait_until(
        "the node back in the new incarnation's ISR",
        ROUND_BOUND,
        || {
            let ps = partitions_seen(&addr, ORPHANS)?;
            (ps[0].leader > 0 && ps[0].isr.len() == 3).then_some(())
        },
    );
    // Lead it from the node, so what is read is what the node holds.
    let out = spate_cli(
        &addr,
        &["partition", "move", ORPHANS, "0", "--to", &{
            let mut order = vec![gone];
            order.extend((1..=3).filter(|&n| n != gone));
            order
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(",")
        }],
    );
    assert_success("spate partition move (reorder)", &out);
    // The election is refused (retriable) until the reordering has ended: asked again.
    wait_until("the node leads", ROUND_BOUND, || {
        let ps = partitions_seen(&addr, ORPHANS)?;
        if ps[0].leader == gone && ps[0].isr.len() == 3 {
            return Some(());
        }
        spate_cli(&addr, &["partition", "elect-leaders", "--topic", ORPHANS]);
        std::thread::sleep(Duration::from_millis(200));
        None
    });
    let after = read_all(&nodes);
    assert_eq!(after.len(), 20, "the new incarnation holds 20 records");
}
