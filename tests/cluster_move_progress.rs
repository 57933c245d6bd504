//! A replica move's progress in bytes (issue 18: "Progress is visible, bytes behind, per
//! partition"), on three real `spate serve --cores 1` nodes under a low catch-up throttle: a
//! partition with one replica and a few megabytes of data moves to all three nodes. While it
//! runs, `spate partition reassignments` (its BEHIND column comes from DescribeLogDirs on the
//! leader's and the new replicas' brokers) and the leader's Prometheus series
//! `spate_reassignment_bytes_behind` show each adding replica's bytes behind: never growing,
//! down to 0 for the first new replica while the second still catches up; the series are gone
//! once the move ends, and DescribeLogDirs (through kafka-python's admin client) shows the same
//! partition size on all three nodes.
//!
//! Every wait is a bounded poll.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::cluster::{partitions_seen, unstarted_nodes, wait_for, wait_until, Node};
use common::{assert_success, python, spate_cli};

const TOPIC: &str = "progress";
/// What the leader sends to learners, per second: the move takes seconds, so it is sampled
/// many times on its way.
const THROTTLE_BYTES_PER_SEC: u64 = 1_000_000;
/// About 5 MB: the throttle's bucket starts full (`THROTTLE_BURST_MS`, 1 MB here) and the
/// first sample comes a second or so after the move starts, so with 2.5 MB the first new
/// replica was sometimes seen 80 % caught up at the first sample (on old and new builds
/// alike); 5 MB leaves it more than a quarter behind then.
const MESSAGES: usize = 5_000;
const MESSAGE_BYTES: usize = 1_000;
const MOVE_BOUND: Duration = Duration::from_secs(90);
/// What the leader's log may grow by while the move runs: its membership batches (a control
/// batch each). A replica's bytes behind may grow by that much, never more.
const MEMBERSHIP_BATCHES_BYTES: u64 = 1_024;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn nodes() -> Vec<Node> {
    let throttle = THROTTLE_BYTES_PER_SEC.to_string();
    unstarted_nodes(
        3,
        3,
        true,
        &["--replication-throttle-bytes-per-sec", &throttle],
    )
}

/// GET /metrics from `port`: the body, or `None` if the node does not answer.
fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// `spate_reassignment_bytes_behind` of the topic's partition 0 in a scrape, by replica.
fn behind_in_metrics(text: &str) -> BTreeMap<i32, u64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("spate_reassignment_bytes_behind{"))
    {
        if !line.contains(&format!("topic=\"{TOPIC}\"")) || !line.contains("partition=\"0\"") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample line");
        let replica = series
            .split("replica=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|r| r.parse().ok())
            .expect("a replica label");
        out.insert(replica, value.parse().expect("a value"));
    }
    out
}

/// What `spate partition reassignments --json` shows for partition 0: `None` once no move
/// is listed, else the bytes behind of each adding replica (`None`: unknown at that moment).
fn behind_in_cli(addr: &str) -> Option<BTreeMap<i32, Option<u64>>> {
    let out = spate_cli(addr, &["partition", "reassignments", "--json"]);
    assert_success("spate partition reassignments", &out);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    let moves = v["reassignments"].as_array().expect("a list");
    let m = moves
        .iter()
        .find(|m| m["topic"] == TOPIC && m["partition"] == 0)?;
    let behind = m["bytes_behind"].as_object().expect("bytes_behind");
    Some(
        behind
            .iter()
            .map(|(k, v)| (k.parse().expect("a broker id"), v.as_u64()))
            .collect(),
    )
}

#[test]
fn bytes_behind_of_each_new_replica_fall_to_zero_in_the_cli_and_in_prometheus() {
    let mut nodes = nodes();
    for n in &mut nodes {
        n.spawn();
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_for(&refs, &[1, 2, 3], &[1, 2, 3], "three nodes formed");
    let addr = nodes[0].addr();
    let out = spate_cli(&addr, &["topic", "create", TOPIC, "-p", "1", "-r", "1"]);
    assert_success("spate topic create", &out);
    let leader = wait_until("topic led", MOVE_BOUND, || {
        let ps = partitions_seen(&addr, TOPIC)?;
        (ps.len() == 1 && ps[0].leader > 0).then(|| ps[0].leader)
    });
    let all = nodes.iter().map(Node::addr).collect::<Vec<_>>().join(",");
    let out = python(
        "produce_bulk.py",
        &[
            &all,
            TOPIC,
            "0",
            &MESSAGES.to_string(),
            &MESSAGE_BYTES.to_string(),
        ],
    );
    assert_success("produce_bulk.py", &out);
    assert_eq!(stdout(&out).trim(), MESSAGES.to_string());

    let others: Vec<i32> = (1..=3).filter(|&n| n != leader).collect();
    let target = format!("{leader},{},{}", others[0], others[1]);
    let out = spate_cli(&addr, &["partition", "move", TOPIC, "0", "--to", &target]);
    assert_success("spate partition move", &out);
    let started = Instant::now();
    let metrics_port = nodes[leader as usize - 1].metrics_port.unwrap();

    // Samples in time order until the move is no longer listed.
    let mut cli: Vec<BTreeMap<i32, Option<u64>>> = Vec::new();
    let mut prom: Vec<BTreeMap<i32, u64>> = Vec::new();
    let mut text_table = None;
    loop {
        assert!(
            started.elapsed() < MOVE_BOUND,
            "the move did not end; seen {cli:?} / {prom:?}"
        );
        if let Some(text) = scrape(metrics_port) {
            let b = behind_in_metrics(&text);
            if !b.is_empty() {
                prom.push(b);
            }
        }
        match behind_in_cli(&addr) {
            Some(b) => {
                if text_table.is_none() {
                    text_table = Some(stdout(&spate_cli(&addr, &["partition", "reassignments"])));
                }
                cli.push(b)
            }
            None => break,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "move took {:?}; {} CLI samples, {} Prometheus samples",
        started.elapsed(),
        cli.len(),
        prom.len()
    );
    eprintln!("CLI: {cli:?}\nPrometheus: {prom:?}");
    let table = text_table.expect("the move was listed at least once");
    eprintln!("{table}");
    assert!(table.contains("BEHIND"), "{table}");

    let (first, second) = (others[0], others[1]);
    // The data is a few megabytes: the first samples show the first new replica far behind.
    let data_bytes = (MESSAGES * MESSAGE_BYTES) as u64;
    for (what, series) in [
        (
            "CLI",
            cli.iter()
                .map(|s| s.iter().filter_map(|(k, v)| Some((*k, (*v)?))).collect())
                .collect::<Vec<BTreeMap<i32, u64>>>(),
        ),
        ("Prometheus", prom.clone()),
    ] {
        let of = |n: i32| {
            series
                .iter()
                .filter_map(|s| s.get(&n).copied())
                .collect::<Vec<u64>>()
        };
        let (a, b) = (of(first), of(second));
        assert!(
            a.first().is_some_and(|&x| x > data_bytes / 4),
            "{what}: replica {first} not seen far behind at first: {a:?}"
        );
        let never_grows = |v: &[u64]| {
            v.iter().enumerate().all(|(i, &x)| {
                let least = v[..i].iter().min().copied().unwrap_or(u64::MAX);
                x <= least.saturating_add(MEMBERSHIP_BATCHES_BYTES)
            })
        };
        assert!(
            never_grows(&a),
            "{what}: replica {first}'s bytes behind grew: {a:?}"
        );
        assert!(
            never_grows(&b),
            "{what}: replica {second}'s bytes behind grew: {b:?}"
        );
        // Caught up, and still listed (the second new replica is catching up behind it).
        assert!(
            series
                .iter()
                .any(|s| s.get(&first) == Some(&0) && s.get(&second).is_some_and(|&x| x > 0)),
            "{what}: replica {first} never at 0 while {second} caught up: {series:?}"
        );
    }

    // The move ended: the series are gone, and every node holds the same bytes.
    wait_until("bytes-behind series gone", MOVE_BOUND, || {
        nodes
            .iter()
            .all(|n| {
                scrape(n.metrics_port.unwrap())
                    .is_some_and(|t| !t.contains("spate_reassignment_bytes_behind{"))
            })
            .then_some(())
    });
    let sizes = wait_until("equal sizes on all three nodes", MOVE_BOUND, || {
        let out = python("reassign.py", &[&all, "logdirs", TOPIC]);
        assert_success("reassign.py logdirs", &out);
        let sizes: BTreeMap<i32, u64> = stdout(&out)
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                assert_eq!(f.len(), 3, "{l}");
                assert_eq!(f[1], "0", "{l}");
                (f[0].parse().unwrap(), f[2].parse().unwrap())
            })
            .collect();
        let first = *sizes.values().next()?;
        (sizes.len() == 3 && first >= data_bytes && sizes.values().all(|&s| s == first))
            .then_some(sizes)
    });
    eprintln!("partition size per node: {sizes:?}");
}
