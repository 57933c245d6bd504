//! Leadership operations on three real `spate serve --cores 1` nodes (issue 18):
//! - preferred-leader election: leaders moved off their preferred replicas by a SIGKILL and
//!   restart go back through confluent-kafka's and kafka-python's `elect_leaders` (ElectLeaders,
//!   answered per partition as Kafka does; UNCLEAN refused) and `spate partition
//!   elect-leaders`, each by a consensus transfer;
//! - `spate cluster restart-check` refuses while a node is down or another is in maintenance,
//!   and says "safe to restart node N" once every partition has its full ISR;
//! - maintenance mode under an idempotent acks=all producer: `spate node maintenance 2 on`
//!   moves every leader off node 2 within seconds, node 2 restarts and leads nothing until
//!   `off`, then the leader balancer (on a 2 s interval here) brings its leaders back; every
//!   acknowledged write is read back once at its offset, and the producer sees no error.
//!
//! Every wait is a bounded poll.

mod common;

use std::collections::BTreeMap;
use std::process::Output;
use std::time::{Duration, Instant};

use common::cluster::{
    partitions_seen, unstarted_nodes, wait_for, wait_until, Node, PartitionSeen, POLL,
};
use common::history::{check_history, Producer};
use common::{assert_success, python, spate_cli};

const TOPIC: &str = "leaders";
const PARTITIONS: usize = 6;
/// Bound on each wait for the cluster to change (leaders moved, a replica back in the ISR).
/// A transfer takes a few heartbeats; this is what a loaded 2-core machine is allowed.
const CHANGE_BOUND: Duration = Duration::from_secs(30);
/// Kafka error codes in ElectLeaders answers.
const NONE: i16 = 0;
const ELIGIBLE_LEADERS_NOT_AVAILABLE: i16 = 83;
const ELECTION_NOT_NEEDED: i16 = 84;

/// The two tests run one at a time: three nodes each on a 2-core machine is enough, and ports
/// are picked while no other cluster of this file is starting.
static ONE_CLUSTER_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Three nodes started with `extra` flags, formed into a cluster; every port distinct.
fn start(extra: &[&str]) -> Vec<Node> {
    let mut nodes = unstarted_nodes(3, 3, false, extra);
    for n in &mut nodes {
        n.spawn();
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_for(&refs, &[1, 2, 3], &[1, 2, 3], "cluster formed");
    nodes
}

fn cli(nodes: &[Node], args: &[&str]) -> Output {
    let live = nodes
        .iter()
        .find(|n| n.child.is_some())
        .expect("a live node");
    spate_cli(&live.addr(), args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Every running node shows every partition led by a running node with all three replicas in
/// sync; the partitions as the first shows them.
fn settled(nodes: &[Node]) -> Option<Vec<PartitionSeen>> {
    let live: Vec<i32> = nodes
        .iter()
        .filter(|n| n.child.is_some())
        .map(|n| n.id as i32)
        .collect();
    let mut first = None;
    for n in nodes.iter().filter(|n| n.child.is_some()) {
        let ps = partitions_seen(&n.addr(), TOPIC)?;
        let ok = ps.len() == PARTITIONS
            && ps
                .iter()
                .all(|p| p.error == 0 && live.contains(&p.leader) && p.isr.len() == 3);
        if !ok {
            return None;
        }
        first.get_or_insert(ps);
    }
    first
}

fn on_preferred(ps: &[PartitionSeen]) -> bool {
    ps.iter().all(|p| p.leader == p.replicas[0])
}

/// Every running node shows every partition led by its preferred replica.
fn wait_preferred(nodes: &[Node], what: &str) -> Duration {
    let start = Instant::now();
    wait_until(what, CHANGE_BOUND, || {
        nodes
            .iter()
            .filter(|n| n.child.is_some())
            .all(|n| partitions_seen(&n.addr(), TOPIC).is_some_and(|ps| on_preferred(&ps)))
            .then_some(())
    });
    start.elapsed()
}

fn create_topic(nodes: &[Node]) {
    let out = cli(
        nodes,
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
    wait_until("topic settled", CHANGE_BOUND, || settled(nodes));
}

/// "PARTITION CODE" lines of elect_leaders.py.
fn elect(client: &str, nodes: &[Node], kind: &str, partitions: &[i32]) -> BTreeMap<i32, i16> {
    let bootstrap = nodes
        .iter()
        .filter(|n| n.child.is_some())
        .map(Node::addr)
        .collect::<Vec<_>>()
        .join(",");
    let ps: Vec<String> = partitions.iter().map(|p| p.to_string()).collect();
    let mut args = vec![client, bootstrap.as_str(), TOPIC, kind];
    args.extend(ps.iter().map(String::as_str));
    let out = python("elect_leaders.py", &args);
    assert_success("elect_leaders.py", &out);
    stdout(&out)
        .lines()
        .map(|l| {
            let (p, c) = l.split_once(' ').expect("PARTITION CODE");
            (p.parse().unwrap(), c.trim().parse().unwrap())
        })
        .collect()
}

#[test]
fn preferred_leaders_come_back_through_kafka_admin_clients_and_the_cli() {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    // The balancer is off: only the elections asked for move leaders.
    let mut nodes = start(&["--auto-leader-rebalance-enable", "false"]);
    create_topic(&nodes);

    // Node 1 is killed: its partitions fail over. While it is down, no node may restart.
    nodes[0].kill();
    wait_for(
        &[&nodes[1], &nodes[2]],
        &[2, 3],
        &[1, 2, 3],
        "node 1 fenced",
    );
    wait_until("node 1's leaders replaced", CHANGE_BOUND, || {
        let ps = partitions_seen(&nodes[1].addr(), TOPIC)?;
        ps.iter()
            .all(|p| p.leader == 2 || p.leader == 3)
            .then_some(())
    });
    let out = cli(&nodes, &["cluster", "restart-check", "3"]);
    assert!(
        !out.status.success(),
        "restart-check with a node down: {}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("NOT safe to restart node 3"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("node 1 is down"), "{}", stdout(&out));
    nodes[0].spawn();
    let ps = wait_until("node 1 back in every ISR", CHANGE_BOUND, || settled(&nodes));
    let off: Vec<i32> = ps
        .iter()
        .filter(|p| p.leader != p.replicas[0])
        .map(|p| p.partition)
        .collect();
    assert!(
        !off.is_empty(),
        "the restart moved no preferred leader: {ps:?}"
    );
    let out = cli(&nodes, &["cluster", "restart-check", "3"]);
    assert_success("restart-check with every ISR full", &out);
    assert!(
        stdout(&out).contains("safe to restart node 3"),
        "{}",
        stdout(&out)
    );

    // UNCLEAN elections are refused, per partition.
    let unclean = elect("confluent", &nodes, "unclean", &[0, 1]);
    assert_eq!(
        unclean.values().copied().collect::<Vec<_>>(),
        vec![ELIGIBLE_LEADERS_NOT_AVAILABLE; 2],
        "{unclean:?}"
    );

    // confluent-kafka elects the first half, kafka-python the second.
    let (first, second): (Vec<i32>, Vec<i32>) = (0..PARTITIONS as i32).partition(|&p| p < 3);
    let mut codes = elect("confluent", &nodes, "preferred", &first);
    codes.extend(elect("kafka-python", &nodes, "preferred", &second));
    assert_eq!(codes.len(), PARTITIONS, "{codes:?}");
    for (p, code) in &codes {
        let want = if off.contains(p) {
            NONE
        } else {
            ELECTION_NOT_NEEDED
        };
        assert_eq!(*code, want, "partition {p}: {codes:?}");
    }
    let took = wait_preferred(&nodes, "preferred leaders back");
    eprintln!("preferred leaders back {took:?} after the elections were initiated");

    // Nothing left to do: the CLI says so (a null list leaves out ELECTION_NOT_NEEDED).
    let out = cli(&nodes, &["partition", "elect-leaders"]);
    assert_success("spate partition elect-leaders", &out);
    assert!(
        stdout(&out).contains("no election needed"),
        "{}",
        stdout(&out)
    );
    let out = cli(
        &nodes,
        &[
            "partition",
            "elect-leaders",
            "--topic",
            TOPIC,
            "--partition",
            "0",
        ],
    );
    assert_success("elect-leaders one partition", &out);
    assert!(stdout(&out).contains("not needed"), "{}", stdout(&out));
    let out = cli(&nodes, &["partition", "elect-leaders", "--topic", "nope"]);
    assert!(!out.status.success(), "an unknown topic: {}", stdout(&out));

    // Maintenance on node 2 drains it; restart-check then allows node 2 only.
    let out = cli(&nodes, &["node", "maintenance", "2", "on"]);
    assert_success("maintenance on", &out);
    wait_until("node 2 drained", CHANGE_BOUND, || {
        let ps = settled(&nodes)?;
        ps.iter().all(|p| p.leader != 2).then_some(())
    });
    let out = cli(&nodes, &["node", "maintenance", "2"]);
    assert_success("maintenance status", &out);
    assert!(
        stdout(&out).contains("maintenance on, leads 0 partition(s)"),
        "{}",
        stdout(&out)
    );
    // Preferred elections skip a node in maintenance.
    let skipped = elect("confluent", &nodes, "preferred", &[0, 1, 2, 3, 4, 5]);
    assert!(skipped.values().any(|&c| c == 80), "{skipped:?}");
    let out = cli(&nodes, &["cluster", "restart-check", "2"]);
    assert_success("restart-check of the node in maintenance", &out);
    let out = cli(&nodes, &["cluster", "restart-check", "3"]);
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("node 2 is in maintenance mode"),
        "{}",
        stdout(&out)
    );
    // Another broker cannot go in maintenance meanwhile.
    let out = cli(&nodes, &["node", "maintenance", "3", "on"]);
    assert!(
        !out.status.success(),
        "two in maintenance: {}",
        stdout(&out)
    );

    // Off, and the CLI's election (the balancer is off here) brings node 2's leaders back.
    let out = cli(&nodes, &["node", "maintenance", "2", "off"]);
    assert_success("maintenance off", &out);
    let out = cli(&nodes, &["partition", "elect-leaders", "--topic", TOPIC]);
    assert_success("spate partition elect-leaders --topic", &out);
    assert!(stdout(&out).contains("initiated"), "{}", stdout(&out));
    wait_preferred(&nodes, "node 2's leaders back");
}

#[test]
fn maintenance_drains_a_node_under_a_producer_and_the_balancer_brings_its_leaders_back() {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    // The balancer every 2 s (the shipped 30 s would make this test slow, not different).
    let mut nodes = start(&["--leader-imbalance-check-interval-seconds", "2"]);
    create_topic(&nodes);
    wait_preferred(&nodes, "placement's leaders");
    let work = tempfile::tempdir().unwrap();
    let bootstrap = nodes.iter().map(Node::addr).collect::<Vec<_>>().join(",");
    let mut producer = Producer::start(work.path(), &bootstrap, TOPIC, PARTITIONS, 200);
    producer.wait_more(200, "acks before maintenance");

    let started = Instant::now();
    let out = cli(&nodes, &["node", "maintenance", "2", "on"]);
    assert_success("maintenance on", &out);
    wait_until("node 2 drained", CHANGE_BOUND, || {
        nodes
            .iter()
            .all(|n| {
                partitions_seen(&n.addr(), TOPIC).is_some_and(|ps| ps.iter().all(|p| p.leader != 2))
            })
            .then_some(())
    });
    eprintln!(
        "node 2 drained {:?} after maintenance on",
        started.elapsed()
    );
    producer.wait_more(200, "acks with node 2 drained");
    let out = cli(&nodes, &["cluster", "restart-check", "2"]);
    assert_success("restart-check 2", &out);
    assert!(
        stdout(&out).contains("safe to restart node 2"),
        "{}",
        stdout(&out)
    );

    // The restart: node 2 rejoins every ISR but leads nothing while in maintenance, though
    // the balancer runs every 2 s.
    nodes[1].terminate();
    nodes[1].spawn();
    wait_until("node 2 back in every ISR", CHANGE_BOUND, || settled(&nodes));
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(5) {
        let ps = partitions_seen(&nodes[0].addr(), TOPIC).expect("metadata");
        assert!(
            ps.iter().all(|p| p.leader != 2),
            "node 2 leads in maintenance: {ps:?}"
        );
        std::thread::sleep(POLL);
    }
    producer.wait_more(200, "acks after the restart");

    // Off: the balancer moves node 2's preferred leaderships back.
    let out = cli(&nodes, &["node", "maintenance", "2", "off"]);
    assert_success("maintenance off", &out);
    let took = wait_preferred(&nodes, "the balancer brought node 2's leaders back");
    eprintln!("the balancer returned node 2's leaders {took:?} after maintenance off");
    producer.wait_more(200, "acks after the balancer");
    let reports = producer.stop();
    let out = python("consume_all.py", &[&bootstrap, TOPIC, "--offsets"]);
    assert_success("consume_all.py", &out);
    check_history(&reports, &stdout(&out));
}
