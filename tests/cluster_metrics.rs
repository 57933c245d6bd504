//! Replication metrics of three real `spate serve` nodes, scraped from each node's Prometheus
//! endpoint: after the AdminClient creates a topic of replication factor 3, every partition has
//! exactly one node reporting itself leader, with all three replicas in sync, nothing
//! under-replicated and no lag, and every replica agrees on the epoch; when a follower is
//! SIGKILLed and the leaders take writes, each leader reports two in-sync replicas, the
//! partition under-replicated and the dead follower's lag; when it comes back, all of that
//! clears; when a leader is killed, one survivor reports itself leader in a later epoch with
//! the old leader out of sync, until it returns; when the topic is deleted, its series go from
//! every node.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::ProduceRequest;

use common::cluster::{cluster_with_metrics, wait_for, wait_until, Node};
use common::{assert_success, python, record_batch, spate_cli, topic_name, Raw};

const TOPIC: &str = "watched";
const PARTITIONS: i32 = 2;
const REPLICATION_FACTOR: usize = 3;
/// Bound on each change the test waits for (an election, a shrink or growth of the ISR as the
/// metrics show it); a loaded 2-core machine is allowed this much.
const CHANGE_BOUND: Duration = Duration::from_secs(30);
const RECORDS_PER_PRODUCE: i32 = 5;
/// The `reason`s of `spate_cluster_service_dropped_total`, what the cluster service thread
/// drops.
const SERVICE_DROP_REASONS: [&str; 7] = [
    "consensus_unhosted",
    "consensus_inbox_full",
    "shard_send_failed",
    "report_unplaced",
    "report_ack_queue_full",
    "rpc_send_queue_full",
    "rpc_send_failed",
];

/// GET /metrics from `port`: the body, or `None` if the node does not answer.
fn scrape_text(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// Samples by (name, labels other than `shard`), summed over shards.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// Parses the exposition text's sample lines (`name{k="v",...} value`).
fn parse(text: &str) -> Samples {
    let mut out = Samples::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("a sample line");
        let value: f64 = value.parse().expect("a sample value");
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}').expect("closed labels")),
            None => (series, ""),
        };
        let labels: BTreeMap<String, String> = labels
            .split(',')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("label=value");
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .filter(|(k, _)| k != "shard")
            .collect();
        *out.entry((name.to_string(), labels)).or_default() += value;
    }
    out
}

fn scrape(node: &Node) -> Option<Samples> {
    scrape_text(node.metrics_port.expect("metrics endpoint")).map(|t| parse(&t))
}

/// A partition's gauge `name` on a node, if the node reports it.
fn gauge(s: &Samples, name: &str, partition: i32) -> Option<f64> {
    let labels = BTreeMap::from([
        ("topic".to_string(), TOPIC.to_string()),
        ("partition".to_string(), partition.to_string()),
    ]);
    s.get(&(name.to_string(), labels)).copied()
}

/// One partition's replication as its leader's metrics show it.
#[derive(Debug, Clone, PartialEq)]
struct LeaderView {
    leader: u64,
    epoch: f64,
    isr: f64,
    under_replicated: f64,
    lag: f64,
}

/// Every partition's leader view, if each partition has exactly one running node reporting
/// itself leader, every running node reports the partition's replicas and the leader's epoch,
/// and followers report no leader-only series.
fn leader_views(nodes: &[Node]) -> Option<Vec<LeaderView>> {
    let scraped: Vec<(u64, Samples)> = nodes
        .iter()
        .filter(|n| n.child.is_some())
        .map(|n| Some((n.id, scrape(n)?)))
        .collect::<Option<_>>()?;
    let mut views = Vec::new();
    for p in 0..PARTITIONS {
        let leaders: Vec<&(u64, Samples)> = scraped
            .iter()
            .filter(|(_, s)| gauge(s, "spate_partition_leader", p) == Some(1.0))
            .collect();
        let [(leader, s)] = leaders[..] else {
            return None;
        };
        let view = LeaderView {
            leader: *leader,
            epoch: gauge(s, "spate_partition_leader_epoch", p)?,
            isr: gauge(s, "spate_partition_in_sync_replicas", p)?,
            under_replicated: gauge(s, "spate_partition_under_replicated", p)?,
            lag: gauge(s, "spate_partition_replication_lag_records", p)?,
        };
        for (id, s) in &scraped {
            let replicas = gauge(s, "spate_partition_replicas", p);
            assert!(
                replicas.is_none() || replicas == Some(REPLICATION_FACTOR as f64),
                "node {id} partition {p}: replicas {replicas:?}"
            );
            if replicas.is_none() || gauge(s, "spate_partition_leader_epoch", p) != Some(view.epoch)
            {
                return None;
            }
            if id != leader {
                assert_eq!(
                    gauge(s, "spate_partition_leader", p),
                    Some(0.0),
                    "node {id}"
                );
                for leader_only in [
                    "spate_partition_in_sync_replicas",
                    "spate_partition_under_replicated",
                    "spate_partition_replication_lag_records",
                ] {
                    assert_eq!(
                        gauge(s, leader_only, p),
                        None,
                        "{leader_only} on follower {id}"
                    );
                }
            }
        }
        views.push(view);
    }
    Some(views)
}

/// One acks=all produce of a few records to `partition` through `addr`: its error code.
fn produce(addr: &str, partition: i32) -> i16 {
    let mut pd = PartitionProduceData::default();
    pd.index = partition;
    pd.records = Some(Bytes::from(record_batch(-1, -1, -1, RECORDS_PER_PRODUCE)));
    let mut td = TopicProduceData::default();
    td.name = topic_name(TOPIC);
    td.partition_data = vec![pd];
    let mut req = ProduceRequest::default();
    req.acks = -1;
    req.timeout_ms = 10_000;
    req.topic_data = vec![td];
    let mut raw = Raw::connect(addr);
    raw.call(7, &req).responses[0].partition_responses[0].error_code
}

#[test]
fn leaders_report_isr_under_replication_and_lag_as_a_follower_dies_and_returns() {
    let mut nodes = cluster_with_metrics(3);
    let all = [1, 2, 3];
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_for(&refs, &all, &all, "cluster formed");

    let out = python(
        "cluster_admin.py",
        &[
            &nodes[0].addr(),
            TOPIC,
            &PARTITIONS.to_string(),
            &REPLICATION_FACTOR.to_string(),
        ],
    );
    assert_success("cluster_admin.py", &out);

    let full = |v: &LeaderView| v.isr == 3.0 && v.under_replicated == 0.0 && v.lag == 0.0;
    let views = wait_until(
        "one leader per partition, all in sync",
        CHANGE_BOUND,
        || leader_views(&nodes).filter(|vs| vs.iter().all(full)),
    );
    eprintln!("settled: {views:?}");
    for text in nodes
        .iter()
        .filter_map(|n| scrape_text(n.metrics_port.unwrap()))
    {
        assert!(
            text.contains("spate_cluster_dropped_messages_total{shard=\"0\",reason=\"consensus_channel_full\"}"),
            "{text}"
        );
        // The cluster service thread's own drops, one series per reason.
        let samples = parse(&text);
        for reason in SERVICE_DROP_REASONS {
            let key = (
                "spate_cluster_service_dropped_total".to_string(),
                BTreeMap::from([("reason".to_string(), reason.to_string())]),
            );
            let n = samples
                .get(&key)
                .unwrap_or_else(|| panic!("{key:?} missing:\n{text}"));
            assert!(*n >= 0.0, "{key:?} = {n}");
        }
    }

    // A node leading nothing (three nodes, two partitions) is killed: only followers die.
    let victim = nodes
        .iter()
        .position(|n| views.iter().all(|v| v.leader != n.id))
        .expect("a node that leads no partition");
    nodes[victim].kill();

    // A follower silent past the lag bound leaves the ISR with no write at all (an idle
    // partition does not keep a dead follower in sync).
    wait_until(
        "the idle leaders drop the dead follower",
        CHANGE_BOUND,
        || {
            leader_views(&nodes).filter(|vs| {
                vs.iter().zip(&views).all(|(now, before)| {
                    now.leader == before.leader && now.isr == 2.0 && now.under_replicated == 1.0
                })
            })
        },
    );

    // Writes move the high watermark past the dead follower: the lag shows. Two of three
    // replicas still make acks=all.
    for (p, v) in views.iter().enumerate() {
        let leader = nodes.iter().find(|n| n.id == v.leader).unwrap();
        let code = produce(&leader.addr(), p as i32);
        assert_eq!(
            code, 0,
            "acks=all produce to partition {p} with one follower down"
        );
    }
    let shrunk = wait_until(
        "leaders report the follower out of sync",
        CHANGE_BOUND,
        || {
            leader_views(&nodes).filter(|vs| {
                vs.iter().zip(&views).all(|(now, before)| {
                    now.leader == before.leader
                        && now.isr == 2.0
                        && now.under_replicated == 1.0
                        && now.lag >= RECORDS_PER_PRODUCE as f64
                })
            })
        },
    );
    eprintln!("follower {} down: {shrunk:?}", nodes[victim].id);

    // Back: it catches up and every partition is fully replicated again.
    nodes[victim].spawn();
    let healed = wait_until("the follower is back in sync", CHANGE_BOUND, || {
        leader_views(&nodes).filter(|vs| vs.iter().all(full))
    });
    eprintln!("healed: {healed:?}");

    // The leader of partition 0 dies: a survivor takes over in a later epoch and is the only
    // one to say so; the dead replica is out of its ISR once writes move past it.
    let dead = healed[0].leader;
    let dead_at = nodes.iter().position(|n| n.id == dead).unwrap();
    nodes[dead_at].kill();
    // What the leaders said, each time it changed (read when the wait fails).
    let mut last_said = String::new();
    let failed_over = wait_until(
        "a new leader reports the old one out of sync",
        CHANGE_BOUND,
        || {
            let vs = leader_views(&nodes);
            let said = format!("{vs:?}");
            if said != last_said {
                eprintln!("after the leader's death: {said}");
                last_said = said;
            }
            let vs = vs?;
            for (p, v) in vs.iter().enumerate() {
                let leader = nodes.iter().find(|n| n.id == v.leader)?;
                // Writes until the dead replica shows as out of sync and behind: it can leave
                // the ISR by time alone (no write), and then only a write makes the lag show.
                if (v.isr != 2.0 || v.lag == 0.0) && produce(&leader.addr(), p as i32) != 0 {
                    return None;
                }
            }
            vs.iter()
                .zip(&healed)
                .all(|(now, before)| {
                    now.leader != dead
                        && (before.leader != dead || now.epoch > before.epoch)
                        && now.isr == 2.0
                        && now.under_replicated == 1.0
                        && now.lag > 0.0
                })
                .then_some(vs)
        },
    );
    eprintln!("leader {dead} down: {failed_over:?}");
    nodes[dead_at].spawn();
    wait_until("the old leader is back in sync", CHANGE_BOUND, || {
        leader_views(&nodes).filter(|vs| vs.iter().all(full))
    });

    // Deleted: its groups close on every node and their replication series go with them.
    let out = spate_cli(&nodes[0].addr(), &["topic", "delete", TOPIC]);
    assert_success("spate topic delete", &out);
    wait_until(
        "the topic's replication series are gone",
        CHANGE_BOUND,
        || {
            let texts: Vec<String> = nodes
                .iter()
                .map(|n| scrape_text(n.metrics_port.unwrap()))
                .collect::<Option<_>>()?;
            let topic = format!("topic=\"{TOPIC}\"");
            texts
                .iter()
                .all(|t| {
                    !t.lines()
                        .any(|l| l.starts_with("spate_partition_") && l.contains(&topic))
                })
                .then_some(())
        },
    );
}
