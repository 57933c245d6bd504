//! Consumer groups in a three-node cluster: a group's coordinator is the leader of its
//! `__consumer_offsets` partition, whose commits are replicated like data. Real confluent-kafka
//! consumers commit after every message; the coordinator's node is SIGKILLed; the group finds
//! the new coordinator (the partition's new leader), its committed offsets are all there, and
//! consumption goes on from them without reading again what was committed.
//!
//! A node that restarts tells clients about the cluster only once it knows it: a restarted
//! node's Metadata named an existing topic UNKNOWN_TOPIC_OR_PARTITION and itself as the only
//! broker, which librdkafka takes as the topic deleted and every other broker (the group
//! coordinator's included) gone; after a rolling restart in a chaos soak both group consumers
//! then hung in close().

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{cluster, wait_for, Node, POLL};
use common::{assert_success, python, Raw};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::{
    FindCoordinatorRequest, GroupId, MetadataRequest, MetadataResponse, OffsetFetchRequest,
    OffsetFetchResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

const TOPIC: &str = "events";
const GROUP: &str = "failover";
const PARTITIONS: i32 = 3;
/// Commits the group must make before the kill, and again after it.
const COMMITS_EACH_SIDE: usize = 30;
/// Bound on the group committing again after its coordinator's node was killed: the
/// partition's new leader is elected in about a second, the members' sessions (6 s) may run
/// out and they rejoin.
const RECOVERY_BOUND: Duration = Duration::from_secs(60);

/// A client process killed when dropped, so a failing test leaves nothing behind.
struct Client {
    child: Child,
    name: String,
}

impl Client {
    fn python(name: &str, script: &str, args: &[&str], log: &Path) -> Client {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/python")
            .join(script);
        let log = std::fs::File::create(log).expect("client log");
        let child = Command::new("python3")
            .arg(path)
            .args(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn python3");
        Client {
            child,
            name: name.to_owned(),
        }
    }

    fn wait_success(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{} exited with {status}", self.name);
                return;
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.name);
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One consumer's events (tests/python/groups_consumer.py), complete lines only.
#[derive(Debug, Default)]
struct Events {
    /// (partition, offset) of every message consumed, in order.
    consumed: Vec<(i32, i64)>,
    /// (partition, next offset) of every acknowledged commit, in order.
    commits: Vec<(i32, i64)>,
}

fn read_events(path: &Path) -> Events {
    let mut text = std::fs::read_to_string(path).unwrap_or_default();
    text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
    let mut e = Events::default();
    for line in text.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        match parts.as_slice() {
            ["M", p, o, _] => e.consumed.push((p.parse().unwrap(), o.parse().unwrap())),
            ["C", p, o] => e.commits.push((p.parse().unwrap(), o.parse().unwrap())),
            _ => {}
        }
    }
    e
}

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_owned())
}

/// The node `addr` names as the group's coordinator, if it names one.
fn find_coordinator(addr: &str) -> Option<i32> {
    let mut raw = Raw::connect(addr);
    let r = raw.call(2, &FindCoordinatorRequest::default().with_key(s(GROUP)));
    (r.error_code == 0).then_some(r.node_id.0)
}

fn fetch_offsets(addr: &str) -> OffsetFetchResponse {
    let mut raw = Raw::connect(addr);
    raw.call(
        5,
        &OffsetFetchRequest::default()
            .with_group_id(GroupId(s(GROUP)))
            .with_topics(Some(vec![OffsetFetchRequestTopic::default()
                .with_name(TopicName(s(TOPIC)))
                .with_partition_indexes((0..PARTITIONS).collect())])),
    )
}

/// partition -> highest acknowledged commit over `events`.
fn highest_commits<'a>(events: impl Iterator<Item = &'a Events>) -> BTreeMap<i32, i64> {
    let mut out = BTreeMap::new();
    for e in events {
        for &(p, o) in &e.commits {
            let c = out.entry(p).or_insert(o);
            *c = (*c).max(o);
        }
    }
    out
}

/// Metadata v9 about `topics` as a consumer asks for it (no auto-creation).
fn consumer_metadata(addr: &str, topics: &[&str]) -> MetadataResponse {
    let mut raw = Raw::connect(addr);
    raw.call(
        9,
        &MetadataRequest::default()
            .with_topics(Some(
                topics
                    .iter()
                    .map(|t| MetadataRequestTopic::default().with_name(Some(TopicName(s(t)))))
                    .collect(),
            ))
            .with_allow_auto_topic_creation(false),
    )
}

/// (broker ids, topic error code, partition count) of a Metadata answer about one topic.
fn seen(r: &MetadataResponse) -> (Vec<i32>, i16, usize) {
    let mut brokers: Vec<i32> = r.brokers.iter().map(|b| b.node_id.0).collect();
    brokers.sort_unstable();
    let t = r.topics.first().expect("the topic asked about");
    (brokers, t.error_code, t.partitions.len())
}

/// A three-node cluster with TOPIC created (replication factor 3), every node agreeing.
fn cluster_with_topic() -> Vec<Node> {
    let nodes = cluster(3);
    let all = [1, 2, 3];
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_for(&refs, &all, &all, "cluster formed");
    let bootstrap = nodes.iter().map(Node::addr).collect::<Vec<_>>().join(",");
    let out = python(
        "cluster_admin.py",
        &[&bootstrap, TOPIC, &PARTITIONS.to_string(), "3"],
    );
    assert_success("cluster_admin.py", &out);
    nodes
}

fn logs(nodes: &[Node]) -> String {
    nodes
        .iter()
        .map(|n| format!("--- node {} ---\n{}", n.id, n.log()))
        .collect()
}

#[test]
fn a_group_follows_its_coordinator_to_the_new_leader_and_keeps_its_commits() {
    let mut nodes = cluster_with_topic();
    let bootstrap = nodes.iter().map(Node::addr).collect::<Vec<_>>().join(",");

    let work = tempfile::tempdir().unwrap();
    let file = |name: &str| -> PathBuf { work.path().join(name) };
    let stop = file("stop");
    let stop_s = stop.to_string_lossy().into_owned();
    let mut producer = Client::python(
        "producer",
        "groups_producer.py",
        &[
            &bootstrap,
            TOPIC,
            &PARTITIONS.to_string(),
            "100000",
            "20",
            &file("produced").to_string_lossy(),
            &stop_s,
        ],
        &file("producer.log"),
    );
    let members: Vec<PathBuf> = (0..2).map(|i| file(&format!("member{i}"))).collect();
    let mut consumers: Vec<Client> = members
        .iter()
        .enumerate()
        .map(|(i, out)| {
            Client::python(
                &format!("member{i}"),
                "groups_consumer.py",
                &[
                    &bootstrap,
                    TOPIC,
                    GROUP,
                    &out.to_string_lossy(),
                    &stop_s,
                    "180",
                ],
                &file(&format!("member{i}.log")),
            )
        })
        .collect();
    let events = || members.iter().map(|m| read_events(m)).collect::<Vec<_>>();
    let commits = || events().iter().map(|e| e.commits.len()).sum::<usize>();
    let context = |nodes: &[Node]| {
        let clients: String = ["producer.log", "member0.log", "member1.log"]
            .iter()
            .map(|f| {
                format!(
                    "--- {f} ---\n{}\n",
                    std::fs::read_to_string(file(f)).unwrap_or_default()
                )
            })
            .collect();
        format!("{clients}{}", logs(nodes))
    };

    let deadline = Instant::now() + Duration::from_secs(60);
    while commits() < COMMITS_EACH_SIDE {
        assert!(
            Instant::now() < deadline,
            "the group never committed\n{}",
            context(&nodes)
        );
        std::thread::sleep(POLL);
    }
    // The coordinator every node names is the leader of the group's offsets partition.
    let coordinator = common::cluster::wait_until("a coordinator", Duration::from_secs(10), || {
        let named: Vec<Option<i32>> = nodes.iter().map(|n| find_coordinator(&n.addr())).collect();
        (named.iter().all(|c| c.is_some() && *c == named[0])).then(|| named[0].unwrap())
    });
    let victim = nodes
        .iter()
        .position(|n| n.id as i32 == coordinator)
        .expect("a node of the cluster");
    let before = events();
    let acked_before = highest_commits(before.iter());
    let consumed_before: Vec<usize> = before.iter().map(|e| e.consumed.len()).collect();
    let commits_before = commits();
    nodes[victim].kill();

    // The survivors name a new coordinator, and the group commits again through it.
    let survivor = nodes[(victim + 1) % nodes.len()].addr();
    let moved = common::cluster::wait_until("a new coordinator", RECOVERY_BOUND, || {
        find_coordinator(&survivor).filter(|&c| c != coordinator)
    });
    let deadline = Instant::now() + RECOVERY_BOUND;
    while commits() < commits_before + COMMITS_EACH_SIDE {
        assert!(
            Instant::now() < deadline,
            "the group did not commit again after its coordinator {coordinator} was killed \
             (new coordinator {moved})\n{}",
            context(&nodes)
        );
        std::thread::sleep(POLL);
    }
    std::fs::write(&stop, b"").unwrap();
    producer.wait_success(Duration::from_secs(60));
    for c in &mut consumers {
        c.wait_success(Duration::from_secs(60));
    }

    let after = events();
    // Committed offsets read back from the new coordinator never went backwards: each is at
    // least every commit acknowledged for its partition, before the kill or after.
    let acked = highest_commits(after.iter());
    let now = find_coordinator(&survivor).expect("a coordinator");
    let now_addr = nodes.iter().find(|n| n.id as i32 == now).unwrap().addr();
    let fetched = fetch_offsets(&now_addr);
    // Any other node is not the coordinator and says so.
    let other = nodes
        .iter()
        .find(|n| n.id as i32 != now && n.id as i32 != coordinator)
        .unwrap();
    assert_eq!(
        fetch_offsets(&other.addr()).error_code,
        kafka_protocol::ResponseError::NotCoordinator.code()
    );
    assert_eq!(fetched.error_code, 0, "{fetched:?}");
    for p in &fetched.topics[0].partitions {
        assert_eq!(p.error_code, 0);
        let want = acked.get(&p.partition_index).copied().unwrap_or(-1);
        assert!(
            p.committed_offset >= want,
            "partition {}: committed {} read back, but {want} was acknowledged",
            p.partition_index,
            p.committed_offset
        );
        let before = acked_before.get(&p.partition_index).copied().unwrap_or(-1);
        assert!(p.committed_offset >= before);
    }
    // Nothing committed before the kill was read again after it: the group went on from its
    // commits, not from an older position (or the start, had the offsets been lost).
    for (e, &seen) in after.iter().zip(&consumed_before) {
        for &(p, o) in &e.consumed[seen..] {
            let committed = acked_before.get(&p).copied().unwrap_or(0);
            assert!(
                o >= committed,
                "partition {p}: offset {o} read again after the failover, below the commit \
                 {committed} acknowledged before it\n{}",
                context(&nodes)
            );
        }
    }
    println!(
        "coordinator {coordinator} killed, new coordinator {moved}; commits before {}, after {}",
        commits_before,
        commits()
    );
    // A node coordinating groups stops cleanly on SIGTERM (its pending writes do not hold the
    // shutdown).
    for n in nodes.iter_mut().filter(|n| n.child.is_some()) {
        n.terminate();
    }
}

/// Bound on a restarted node's first Metadata answer: it waits for the cluster metadata at most
/// the broker's METADATA_CATCH_UP_WAIT_MS (3 s); slack for a loaded test machine.
const FIRST_ANSWER_BOUND: Duration = Duration::from_secs(10);

#[test]
fn a_restarted_node_answers_metadata_once_it_knows_the_brokers_and_topics() {
    let mut nodes = cluster_with_topic();
    let all: Vec<i32> = vec![1, 2, 3];
    assert_eq!(
        seen(&consumer_metadata(&nodes[0].addr(), &[TOPIC])),
        (all.clone(), 0, PARTITIONS as usize)
    );
    nodes[0].terminate();
    nodes[0].spawn();
    // The first request right after the node answers ApiVersions: it has not applied the
    // cluster metadata yet, and must not answer from the empty view it starts with.
    let asked = Instant::now();
    let first = consumer_metadata(&nodes[0].addr(), &[TOPIC]);
    let took = asked.elapsed();
    assert_eq!(
        seen(&first),
        (all, 0, PARTITIONS as usize),
        "a restarted node's first Metadata answer (after {took:?}) must name every broker \
         and the topic's partitions\n{}",
        logs(&nodes)
    );
    assert!(took < FIRST_ANSWER_BOUND, "answered after {took:?}");
}

#[test]
fn a_node_that_cannot_catch_up_calls_no_topic_unknown() {
    let mut nodes = cluster_with_topic();
    for n in &mut nodes {
        n.kill();
    }
    // Alone it cannot reach a quorum, so it never applies the cluster metadata: it knows
    // neither the topic nor the other brokers, and says so with a retriable error.
    nodes[0].spawn();
    let asked = Instant::now();
    let r = consumer_metadata(&nodes[0].addr(), &[TOPIC, "never-created"]);
    let took = asked.elapsed();
    assert!(took < FIRST_ANSWER_BOUND, "answered after {took:?}");
    for t in &r.topics {
        assert_eq!(
            t.error_code,
            ResponseError::LeaderNotAvailable.code(),
            "{:?} from a node that has not caught up (UNKNOWN_TOPIC_OR_PARTITION is {})\n{}",
            t,
            ResponseError::UnknownTopicOrPartition.code(),
            logs(&nodes)
        );
    }
    assert_eq!(r.topics.len(), 2);
}

/// A follower's replica of `__consumer_offsets` is kept as clean as the leader's: the
/// coordinator that takes the partition over after its leader is killed right after a burst
/// of commits replays a bounded tail, not the burst. The cleaners' byte rate is 1 MB/s, so
/// without urgent cleanings (asked for by the replicas themselves as they fill) a follower
/// is still at the start of the 75 MiB burst and replays nearly all of it (25,000 records).
#[test]
fn a_new_coordinator_replays_only_a_bounded_tail_after_a_burst_of_commits() {
    use kafka_protocol::messages::offset_commit_request::{
        OffsetCommitRequestPartition, OffsetCommitRequestTopic,
    };
    use kafka_protocol::messages::OffsetCommitRequest;
    use spate_replication::partition::OFFSETS_MAX_UNCLEANED_BYTES;
    const BURST_TOPIC: &str = "burst";
    const BURST_GROUP: &str = "burst";
    const BURST_PARTITIONS: i32 = 25;
    const ROUNDS: i64 = 1000;
    const VALUE_BYTES: u64 = 3000;
    let mut nodes = common::cluster::unstarted_nodes(
        3,
        3,
        false,
        &[
            "--cleaner-io-bytes-per-sec",
            "1000000",
            "--offsets-topic-partitions",
            "1",
        ],
    );
    for n in &mut nodes {
        n.spawn();
    }
    let all = [1, 2, 3];
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_for(&refs, &all, &all, "cluster formed");
    let out = common::spate_cli(
        &nodes[0].addr(),
        &[
            "topic",
            "create",
            BURST_TOPIC,
            "-p",
            &BURST_PARTITIONS.to_string(),
            "-r",
            "3",
        ],
    );
    assert_success("spate topic create", &out);
    let coordinator = common::cluster::wait_until("a coordinator", Duration::from_secs(30), || {
        let mut raw = Raw::connect(&nodes[0].addr());
        let r = raw.call(
            2,
            &FindCoordinatorRequest::default().with_key(s(BURST_GROUP)),
        );
        (r.error_code == 0).then_some(r.node_id.0)
    });
    let victim = nodes
        .iter()
        .position(|n| n.id as i32 == coordinator)
        .expect("a node of the cluster");
    // 1,000 rounds of 25 partitions at about 3 KiB a record: about 75 MiB written to the one
    // offsets partition, nine bounds' worth.
    let metadata = |round: i64, p: i32| format!("{round}-{p}-{}", "m".repeat(3000));
    let commit = |raw: &mut Raw, round: i64| {
        raw.call(
            2,
            &OffsetCommitRequest::default()
                .with_group_id(GroupId(s(BURST_GROUP)))
                .with_generation_id_or_member_epoch(-1)
                .with_topics(vec![OffsetCommitRequestTopic::default()
                    .with_name(TopicName(s(BURST_TOPIC)))
                    .with_partitions(
                        (0..BURST_PARTITIONS)
                            .map(|p| {
                                OffsetCommitRequestPartition::default()
                                    .with_partition_index(p)
                                    .with_committed_offset(round)
                                    .with_committed_metadata(Some(s(&metadata(round, p))))
                            })
                            .collect(),
                    )]),
        )
    };
    let mut raw = Raw::connect(&nodes[victim].addr());
    for round in 0..ROUNDS {
        let r = commit(&mut raw, round);
        let errors: Vec<i16> = r.topics[0]
            .partitions
            .iter()
            .map(|p| p.error_code)
            .collect();
        assert!(
            errors.iter().all(|e| *e == 0),
            "round {round}: {errors:?}\n{}",
            logs(&nodes)
        );
    }
    drop(raw);
    let logged: Vec<usize> = nodes.iter().map(|n| n.log().len()).collect();
    nodes[victim].kill();

    let survivor = nodes[(victim + 1) % nodes.len()].addr();
    let moved = common::cluster::wait_until("a new coordinator", RECOVERY_BOUND, || {
        let mut raw = Raw::connect(&survivor);
        let r = raw.call(
            2,
            &FindCoordinatorRequest::default().with_key(s(BURST_GROUP)),
        );
        (r.error_code == 0 && r.node_id.0 != coordinator).then_some(r.node_id.0)
    });
    let new = nodes.iter().position(|n| n.id as i32 == moved).unwrap();
    let fetched = common::cluster::wait_until("the offsets loaded", RECOVERY_BOUND, || {
        let mut raw = Raw::connect(&nodes[new].addr());
        let r: OffsetFetchResponse = raw.call(
            5,
            &OffsetFetchRequest::default()
                .with_group_id(GroupId(s(BURST_GROUP)))
                .with_topics(Some(vec![OffsetFetchRequestTopic::default()
                    .with_name(TopicName(s(BURST_TOPIC)))
                    .with_partition_indexes((0..BURST_PARTITIONS).collect())])),
        );
        (r.error_code == 0).then_some(r)
    });
    for p in &fetched.topics[0].partitions {
        assert_eq!(
            (p.error_code, p.committed_offset),
            (0, ROUNDS - 1),
            "partition {}",
            p.partition_index
        );
        assert_eq!(
            p.metadata.as_deref(),
            Some(metadata(ROUNDS - 1, p.partition_index).as_str())
        );
    }
    let log = nodes[new].log();
    let replayed = common::offsets_loads(&log[logged[new]..])
        .pop()
        .unwrap_or_else(|| {
            panic!(
                "node {moved} answered without a load logged after the kill\n{}",
                logs(&nodes)
            )
        });
    // The bound, the writes after it that went ahead while a cleaning took over a second (a
    // loaded machine), at 3 KB a record at least, and the cleaned part (the live set and the
    // batches producer snapshots are anchored to).
    let most =
        (OFFSETS_MAX_UNCLEANED_BYTES + (8 << 20)) / VALUE_BYTES + 4 * BURST_PARTITIONS as u64;
    assert!(
        replayed <= most,
        "the new coordinator replayed {replayed} records of __consumer_offsets (at most {most})"
    );
    for n in nodes.iter_mut().filter(|n| n.child.is_some()) {
        n.terminate();
    }
}
