//! Three real `spate serve` nodes on loopback form a cluster: every node's Metadata (and
//! `kcat -L`) lists all three brokers and one controller; SIGKILL of the controller leader gets
//! a new controller within a bound; the dead broker leaves Metadata after its session times
//! out and comes back when restarted. A wiped node is refused until `spate cluster unregister`
//! (refused for a live broker) and then joins as a new node. A node started with another seed
//! list (so another cluster id) is refused by the rpc handshake with a clear log line.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{cluster, metadata, wait_for, Node, CLUSTER_DEADLINE, POLL};
/// A new controller after the old one is killed: elections take 0.5-1 s, plus the new
/// leader's first commit; 10 s leaves room for a loaded test machine.
const FAILOVER_BOUND: Duration = Duration::from_secs(10);

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

    // The operator's way in. A live broker is refused (stop it first), an unknown id too.
    let (a, b) = (survivors[0], survivors[1]);
    let out = common::spate_cli(&a.addr(), &["cluster", "unregister", &b.id.to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a live broker was unregistered");
    assert!(
        err.contains("INVALID_REQUEST") && err.contains("stop it first"),
        "{err}"
    );
    let out = common::spate_cli(&a.addr(), &["cluster", "unregister", "42"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an unknown id was unregistered");
    assert!(err.contains("BROKER_ID_NOT_REGISTERED"), "{err}");
    // The wiped node's old incarnation is fenced (it left Metadata above): unregistering it
    // through a node that is not the controller succeeds, and the wiped node then registers
    // with its new node UUID and is listed again by every node.
    let registrations = |n: &Node| n.log().matches("registered with the controller").count();
    let before = registrations(&nodes[victim]);
    let out = common::spate_cli(
        &b.addr(),
        &["cluster", "unregister", &controller.to_string()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("Unregistered broker {controller}")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_for(&refs, &all, &all, "wiped node joined as a new node");
    assert!(
        registrations(&nodes[victim]) > before,
        "{}",
        nodes[victim].log()
    );
    // Now live again, it cannot be unregistered.
    let out = common::spate_cli(
        &nodes[0].addr(),
        &["cluster", "unregister", &controller.to_string()],
    );
    assert!(!out.status.success(), "the rejoined node was unregistered");

    // `spate topic describe` on a replicated topic: every partition led in an elected epoch,
    // three replicas, all in sync, none offline.
    let out = common::spate_cli(
        &nodes[0].addr(),
        &[
            "topic",
            "create",
            "replicated",
            "--partitions",
            "2",
            "--replication-factor",
            "3",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + CLUSTER_DEADLINE;
    loop {
        let out = common::spate_cli(
            &nodes[1].addr(),
            &["topic", "describe", "replicated", "--json"],
        );
        let doc: Option<serde_json::Value> = out
            .status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten();
        let settled = doc.as_ref().is_some_and(|d| {
            let parts = d[0]["partitions"].as_array().cloned().unwrap_or_default();
            parts.len() == 2
                && parts.iter().all(|p| {
                    p["leader"].as_i64().is_some_and(|l| l >= 1)
                        && p["leader_epoch"].as_i64().is_some_and(|e| e >= 1)
                        && p["replicas"].as_array().is_some_and(|r| r.len() == 3)
                        && p["isr"].as_array().is_some_and(|r| r.len() == 3)
                        && p["offline_replicas"] == serde_json::json!([])
                })
        });
        if settled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replicated topic not described as settled: {doc:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(POLL);
    }
    let text = common::spate_cli(&nodes[1].addr(), &["topic", "describe", "replicated"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("EPOCH") && text.contains("OFFLINE"), "{text}");
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
    // A cluster node stops cleanly on SIGTERM, cluster service thread included.
    nodes[0].terminate();
    assert!(nodes[0].log().contains("cluster service stopped"));
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
