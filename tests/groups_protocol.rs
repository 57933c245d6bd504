//! The group protocol on the wire, request by request: what survives a SIGKILL of the broker,
//! and the errors a member with a stale generation or an unknown member id gets (and how it
//! recovers), against the real `spate` process.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{assert_success, spate_cli, Broker, Raw};
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::{
    DescribeGroupsRequest, FindCoordinatorRequest, GroupId, HeartbeatRequest, JoinGroupRequest,
    JoinGroupResponse, LeaveGroupRequest, ListGroupsRequest, OffsetCommitRequest,
    OffsetFetchRequest, OffsetFetchResponse, SyncGroupRequest, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

const SESSION_MS: i32 = 10_000;
const LOAD_TIMEOUT: Duration = Duration::from_secs(20);

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_owned())
}

fn code(e: ResponseError) -> i16 {
    e.code()
}

fn join_request(group: &str, member: &str) -> JoinGroupRequest {
    JoinGroupRequest::default()
        .with_group_id(GroupId(s(group)))
        .with_session_timeout_ms(SESSION_MS)
        .with_rebalance_timeout_ms(SESSION_MS)
        .with_member_id(s(member))
        .with_protocol_type(s("consumer"))
        .with_protocols(vec![JoinGroupRequestProtocol::default()
            .with_name(s("range"))
            .with_metadata(Bytes::from_static(b"subscription"))])
}

/// JoinGroup v5 as a new member: MEMBER_ID_REQUIRED first, then the real join with that id.
/// Retries while the coordinator is loading (after a restart).
fn join_new_member(conn: &mut Raw, group: &str) -> JoinGroupResponse {
    let deadline = Instant::now() + LOAD_TIMEOUT;
    let first = loop {
        let r = conn.call(5, &join_request(group, ""));
        if r.error_code != code(ResponseError::CoordinatorLoadInProgress) {
            break r;
        }
        assert!(Instant::now() < deadline, "coordinator never loaded");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(first.error_code, code(ResponseError::MemberIdRequired));
    let id = first.member_id.to_string();
    assert!(!id.is_empty());
    let joined = conn.call(5, &join_request(group, &id));
    assert_eq!(joined.error_code, 0, "join with the assigned id");
    assert_eq!(joined.member_id.as_str(), id);
    joined
}

fn sync(
    conn: &mut Raw,
    group: &str,
    member: &str,
    generation: i32,
    assignments: &[(&str, &[u8])],
) -> (i16, Bytes) {
    let r = conn.call(
        3,
        &SyncGroupRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_generation_id(generation)
            .with_member_id(s(member))
            .with_assignments(
                assignments
                    .iter()
                    .map(|(m, a)| {
                        SyncGroupRequestAssignment::default()
                            .with_member_id(s(m))
                            .with_assignment(Bytes::copy_from_slice(a))
                    })
                    .collect(),
            ),
    );
    (r.error_code, r.assignment)
}

fn heartbeat(conn: &mut Raw, group: &str, member: &str, generation: i32) -> i16 {
    conn.call(
        3,
        &HeartbeatRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_member_id(s(member))
            .with_generation_id(generation),
    )
    .error_code
}

/// The topic every commit here names ("events"), with the 4 partitions the tests commit to:
/// commits for partitions that do not exist are refused, as in Kafka.
fn create_events_topic(broker: &Broker) {
    let out = spate_cli(&broker.addr(), &["topic", "create", "events", "-p", "4"]);
    assert_success("spate topic create events", &out);
}

fn commit(
    conn: &mut Raw,
    group: &str,
    member: &str,
    generation: i32,
    offsets: &[(i32, i64)],
) -> Vec<i16> {
    commit_with(conn, group, member, generation, offsets, |p| {
        format!("meta-{p}")
    })
}

/// `commit` with the metadata string of each partition chosen by `metadata`.
fn commit_with(
    conn: &mut Raw,
    group: &str,
    member: &str,
    generation: i32,
    offsets: &[(i32, i64)],
    metadata: impl Fn(i32) -> String,
) -> Vec<i16> {
    let r = conn.call(
        7,
        &OffsetCommitRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_generation_id_or_member_epoch(generation)
            .with_member_id(s(member))
            .with_topics(vec![OffsetCommitRequestTopic::default()
                .with_name(TopicName(s("events")))
                .with_partitions(
                    offsets
                        .iter()
                        .map(|(p, o)| {
                            OffsetCommitRequestPartition::default()
                                .with_partition_index(*p)
                                .with_committed_offset(*o)
                                .with_committed_leader_epoch(0)
                                .with_committed_metadata(Some(s(&metadata(*p))))
                        })
                        .collect(),
                )]),
    );
    r.topics[0]
        .partitions
        .iter()
        .map(|p| p.error_code)
        .collect()
}

fn fetch_all(conn: &mut Raw, group: &str) -> OffsetFetchResponse {
    conn.call(
        7,
        &OffsetFetchRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_topics(None),
    )
}

fn fetch_some(conn: &mut Raw, group: &str, partitions: Vec<i32>) -> OffsetFetchResponse {
    conn.call(
        5,
        &OffsetFetchRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_topics(Some(vec![OffsetFetchRequestTopic::default()
                .with_name(TopicName(s("events")))
                .with_partition_indexes(partitions)])),
    )
}

fn offsets_of(r: &OffsetFetchResponse) -> Vec<(i32, i64, String)> {
    assert_eq!(r.error_code, 0);
    let mut out: Vec<(i32, i64, String)> = r
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(|p| {
                assert_eq!(p.error_code, 0);
                (
                    p.partition_index,
                    p.committed_offset,
                    p.metadata.as_deref().unwrap_or("").to_owned(),
                )
            })
        })
        .collect();
    out.sort();
    out
}

/// Prints the broker's log if the test fails while it is in scope.
struct LogOnPanic(std::path::PathBuf);

impl Drop for LogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "broker log:\n{}",
                std::fs::read_to_string(&self.0).unwrap_or_default()
            );
        }
    }
}

#[test]
fn committed_offsets_and_group_metadata_survive_sigkill() {
    let mut broker = Broker::start_with(&[
        "--flush",
        "always",
        "--group-initial-rebalance-delay-ms",
        "200",
    ]);
    let _log = LogOnPanic(broker.dir.path().join("spate.log"));
    create_events_topic(&broker);
    let mut conn = Raw::connect(&broker.addr());
    let fc = conn.call(
        2,
        &FindCoordinatorRequest::default().with_key(s("survivors")),
    );
    assert_eq!(fc.error_code, 0);
    assert_eq!(fc.port as u16, broker.port);

    let joined = join_new_member(&mut conn, "survivors");
    let member = joined.member_id.to_string();
    let generation = joined.generation_id;
    assert_eq!(joined.leader.as_str(), member);
    let (err, assignment) = sync(
        &mut conn,
        "survivors",
        &member,
        generation,
        &[(&member, b"partitions 0-2")],
    );
    assert_eq!((err, &assignment[..]), (0, &b"partitions 0-2"[..]));
    assert_eq!(
        commit(
            &mut conn,
            "survivors",
            &member,
            generation,
            &[(0, 5), (1, 7), (2, 9)]
        ),
        vec![0, 0, 0]
    );
    assert_eq!(
        commit(&mut conn, "survivors", &member, generation, &[(1, 8)]),
        vec![0]
    );
    // A group that only stores offsets, and one that emptied after committing.
    assert_eq!(
        commit(&mut conn, "offsets-only", "", -1, &[(0, 42)]),
        vec![0]
    );
    let left = join_new_member(&mut conn, "emptied");
    let (err, _) = sync(
        &mut conn,
        "emptied",
        left.member_id.as_str(),
        left.generation_id,
        &[],
    );
    assert_eq!(err, 0);
    assert_eq!(
        commit(
            &mut conn,
            "emptied",
            left.member_id.as_str(),
            left.generation_id,
            &[(3, 3)]
        ),
        vec![0]
    );
    let leave = conn.call(
        1,
        &LeaveGroupRequest::default()
            .with_group_id(GroupId(s("emptied")))
            .with_member_id(left.member_id.clone()),
    );
    assert_eq!(leave.error_code, 0);

    // Every commit above was acknowledged, so it is on disk: kill without any flush.
    drop(conn);
    broker.kill();
    broker.spawn();
    let mut conn = Raw::connect(&broker.addr());

    // Until a group's __consumer_offsets partition is replayed, its requests are answered
    // with COORDINATOR_LOAD_IN_PROGRESS (which clients retry); wait for all three.
    let deadline = Instant::now() + LOAD_TIMEOUT;
    loop {
        let described = conn.call(
            5,
            &DescribeGroupsRequest::default().with_groups(
                ["survivors", "emptied", "offsets-only"]
                    .iter()
                    .map(|g| GroupId(s(g)))
                    .collect(),
            ),
        );
        let loading = described
            .groups
            .iter()
            .filter(|g| g.error_code == code(ResponseError::CoordinatorLoadInProgress))
            .count();
        if loading == 0 {
            assert!(described.groups.iter().all(|g| g.error_code == 0));
            break;
        }
        assert!(Instant::now() < deadline, "coordinator never loaded");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The member carries on with its generation: the group came back Stable with it.
    let hb = heartbeat(&mut conn, "survivors", &member, generation);
    assert_eq!(hb, 0, "the member and its generation survived the restart");
    let (err, assignment) = sync(&mut conn, "survivors", &member, generation, &[]);
    assert_eq!(
        (err, &assignment[..]),
        (0, &b"partitions 0-2"[..]),
        "and so did its assignment"
    );

    let described = conn.call(
        5,
        &DescribeGroupsRequest::default()
            .with_groups(vec![GroupId(s("survivors")), GroupId(s("emptied"))]),
    );
    let g = &described.groups[0];
    assert_eq!((g.error_code, g.group_state.as_str()), (0, "Stable"));
    assert_eq!(
        (g.protocol_type.as_str(), g.protocol_data.as_str()),
        ("consumer", "range")
    );
    assert_eq!(g.members.len(), 1);
    assert_eq!(g.members[0].member_id.as_str(), member);
    assert_eq!(&g.members[0].member_assignment[..], b"partitions 0-2");
    assert_eq!(described.groups[1].group_state.as_str(), "Empty");

    assert_eq!(
        offsets_of(&fetch_all(&mut conn, "survivors")),
        vec![
            (0, 5, "meta-0".to_owned()),
            (1, 8, "meta-1".to_owned()),
            (2, 9, "meta-2".to_owned())
        ]
    );
    assert_eq!(
        offsets_of(&fetch_all(&mut conn, "offsets-only")),
        vec![(0, 42, "meta-0".to_owned())]
    );
    assert_eq!(
        offsets_of(&fetch_all(&mut conn, "emptied")),
        vec![(3, 3, "meta-3".to_owned())]
    );
    // A partition without a commit answers -1.
    assert_eq!(
        offsets_of(&fetch_some(&mut conn, "survivors", vec![2, 4])),
        vec![(2, 9, "meta-2".to_owned()), (4, -1, String::new())]
    );

    let listed = conn.call(4, &ListGroupsRequest::default());
    let mut names: Vec<&str> = listed.groups.iter().map(|g| g.group_id.as_str()).collect();
    names.sort();
    assert_eq!(names, vec!["emptied", "offsets-only", "survivors"]);
}

#[test]
fn stale_generation_and_unknown_member_get_errors_then_recover() {
    let broker = Broker::start_with(&["--group-initial-rebalance-delay-ms", "200"]);
    create_events_topic(&broker);
    let _log = LogOnPanic(broker.dir.path().join("spate.log"));
    let addr = broker.addr();
    let group = "recovering";
    let mut a = Raw::connect(&addr);
    let joined = join_new_member(&mut a, group);
    let (ma, g1) = (joined.member_id.to_string(), joined.generation_id);
    assert_eq!(sync(&mut a, group, &ma, g1, &[(&ma, b"all")]).0, 0);
    assert_eq!(heartbeat(&mut a, group, &ma, g1), 0);

    // A stale generation and an unknown member id get the errors clients act on.
    assert_eq!(
        heartbeat(&mut a, group, &ma, g1 - 1),
        code(ResponseError::IllegalGeneration)
    );
    assert_eq!(
        commit(&mut a, group, &ma, g1 - 1, &[(0, 1)]),
        vec![code(ResponseError::IllegalGeneration)]
    );
    assert_eq!(
        sync(&mut a, group, &ma, g1 - 1, &[]).0,
        code(ResponseError::IllegalGeneration)
    );
    assert_eq!(
        heartbeat(&mut a, group, "ghost", g1),
        code(ResponseError::UnknownMemberId)
    );
    assert_eq!(
        commit(&mut a, group, "ghost", g1, &[(0, 1)]),
        vec![code(ResponseError::UnknownMemberId)]
    );
    let unknown = a.call(5, &join_request(group, "ghost"));
    assert_eq!(unknown.error_code, code(ResponseError::UnknownMemberId));
    assert_eq!(
        offsets_of(&fetch_some(&mut a, group, vec![0])),
        vec![(0, -1, String::new())]
    );

    // Recovery of the unknown client: it joins afresh (its JoinGroup waits for the rebalance,
    // so it runs on its own connection), which sends the existing member through a rebalance.
    let b_addr = addr.clone();
    let b_thread = std::thread::spawn(move || {
        let mut b = Raw::connect(&b_addr);
        let joined = join_new_member(&mut b, "recovering");
        (b, joined)
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let e = heartbeat(&mut a, group, &ma, g1);
        if e == code(ResponseError::RebalanceInProgress) {
            break;
        }
        assert_eq!(e, 0);
        assert!(
            Instant::now() < deadline,
            "the new member never started a rebalance"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The old member rejoins with its id, as a client does on REBALANCE_IN_PROGRESS.
    let rejoined = a.call(5, &join_request(group, &ma));
    assert_eq!(rejoined.error_code, 0);
    let (mut b, b_joined) = b_thread.join().unwrap();
    let g2 = rejoined.generation_id;
    assert_eq!(b_joined.generation_id, g2);
    assert!(g2 > g1);
    assert_eq!(rejoined.leader.as_str(), ma, "the old leader stays leader");
    assert_eq!(rejoined.members.len(), 2);
    let mb = b_joined.member_id.to_string();

    // Everybody syncs on the new generation; the old one is now stale.
    let b_sync = std::thread::spawn({
        let mb = mb.clone();
        move || {
            let r = sync(&mut b, "recovering", &mb, g2, &[]);
            (b, r)
        }
    });
    assert_eq!(
        sync(
            &mut a,
            group,
            &ma,
            g2,
            &[(&ma, b"half-a"), (&mb, b"half-b")]
        ),
        (0, Bytes::from_static(b"half-a"))
    );
    let (mut b, b_result) = b_sync.join().unwrap();
    assert_eq!(b_result, (0, Bytes::from_static(b"half-b")));
    assert_eq!(
        heartbeat(&mut a, group, &ma, g1),
        code(ResponseError::IllegalGeneration)
    );
    assert_eq!(heartbeat(&mut a, group, &ma, g2), 0);
    assert_eq!(heartbeat(&mut b, group, &mb, g2), 0);
    assert_eq!(commit(&mut b, group, &mb, g2, &[(0, 11)]), vec![0]);
    assert_eq!(
        offsets_of(&fetch_some(&mut a, group, vec![0])),
        vec![(0, 11, "meta-0".to_owned())]
    );
    // "events" has partitions 0-3: a commit for partition 4 is refused and not stored, while
    // the valid partition beside it in the same request is.
    assert_eq!(
        commit(&mut b, group, &mb, g2, &[(3, 12), (4, 13)]),
        vec![0, code(ResponseError::UnknownTopicOrPartition)]
    );
    assert_eq!(
        offsets_of(&fetch_some(&mut a, group, vec![3, 4])),
        vec![(3, 12, "meta-3".to_owned()), (4, -1, String::new())]
    );
}

/// The Prometheus text of the broker's metrics endpoint.
fn http_get_metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Bytes the log cleaner reclaimed from `__consumer_offsets`, over its partitions.
fn offsets_bytes_reclaimed(metrics_port: u16) -> f64 {
    http_get_metrics(metrics_port)
        .lines()
        .filter(|l| {
            l.starts_with("spate_cleaner_bytes_reclaimed_total{")
                && l.contains("topic=\"__consumer_offsets\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the group's offsets are loaded again after a restart.
fn fetch_loaded(conn: &mut Raw, group: &str) -> OffsetFetchResponse {
    let deadline = Instant::now() + LOAD_TIMEOUT;
    loop {
        let r = fetch_all(conn, group);
        let retry = [
            code(ResponseError::CoordinatorLoadInProgress),
            code(ResponseError::NotCoordinator),
            code(ResponseError::CoordinatorNotAvailable),
        ];
        if !retry.contains(&r.error_code) {
            return r;
        }
        assert!(Instant::now() < deadline, "coordinator never loaded");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Bytes of padding in each [`round_metadata`]: the rounds fill `__consumer_offsets` segments
/// quickly, and a record is at least this long.
const ROUND_METADATA_BYTES: usize = 3000;

/// The metadata committed for partition `p` in round `round` of [`commit_rounds`].
fn round_metadata(round: i64, p: i32) -> String {
    format!("{round}-{p}-{}", "m".repeat(ROUND_METADATA_BYTES))
}

/// What OffsetFetch gives back after `rounds` of [`commit_rounds`] over `partitions`.
fn last_round(partitions: i32, rounds: i64) -> Vec<(i32, i64, String)> {
    (0..partitions)
        .map(|p| (p, rounds - 1, round_metadata(rounds - 1, p)))
        .collect()
}

/// Creates topic `events` of `partitions` partitions, then commits offset `round` of every
/// partition for `group` (a standalone consumer), with [`round_metadata`], for each round in
/// `0..rounds`; every commit must be acknowledged. Returns the connection.
fn commit_rounds(broker: &Broker, group: &str, partitions: i32, rounds: i64) -> Raw {
    let out = spate_cli(
        &broker.addr(),
        &["topic", "create", "events", "-p", &partitions.to_string()],
    );
    assert_success("spate topic create events", &out);
    let mut conn = Raw::connect(&broker.addr());
    for round in 0..rounds {
        let commits: Vec<(i32, i64)> = (0..partitions).map(|p| (p, round)).collect();
        let errors = commit_with(&mut conn, group, "", -1, &commits, |p| {
            round_metadata(round, p)
        });
        assert!(errors.iter().all(|e| *e == 0), "round {round}: {errors:?}");
    }
    conn
}

#[test]
fn consumer_offsets_are_compacted_by_the_cleaner_and_survive_sigkill() {
    const PARTITIONS: i32 = 50;
    const ROUNDS: i64 = 200;
    let mut broker = Broker::start_with(&["--flush", "always", "--cleaner-backoff-ms", "100"]);
    let _log = LogOnPanic(broker.dir.path().join("spate.log"));
    // 200 rounds of 50 partitions write ~30 MiB, almost four of the partition's 8 MiB
    // segments, of which the live set is 50 records.
    let conn = commit_rounds(&broker, "compacted", PARTITIONS, ROUNDS);
    // One mechanism: the topic's partitions, kept small by the log cleaner.
    assert!(
        !broker.data_dir().join("__consumer_offsets").exists(),
        "a log of the coordinator's own"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reclaimed = offsets_bytes_reclaimed(broker.metrics_port);
        if reclaimed > 10_000_000.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cleaner reclaimed only {reclaimed} bytes of __consumer_offsets"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Every commit was acknowledged: kill without a flush; the replay of what remains (the
    // cleaned segments and the active one) must give back the last round.
    drop(conn);
    broker.kill();
    broker.spawn();
    let mut conn = Raw::connect(&broker.addr());
    let fetched = fetch_loaded(&mut conn, "compacted");
    assert_eq!(offsets_of(&fetched), last_round(PARTITIONS, ROUNDS));
}

/// A burst of commits faster than the log cleaner may clean (its byte rate at 1 MB/s here)
/// leaves a load no more than a bounded dirty tail to replay: writes to an offsets partition
/// past `OFFSETS_MAX_UNCLEANED_BYTES` wait for the cleaner, which then cleans it at once. Without
/// that bound the cleaner is still at the start of the 75 MiB burst when the broker is killed,
/// and the restart replays nearly all of it (about 25,000 records against at most about 9,800).
#[test]
fn a_burst_of_commits_leaves_a_restart_only_a_bounded_tail_to_replay() {
    use spate_replication::partition::OFFSETS_MAX_UNCLEANED_BYTES;
    const PARTITIONS: i32 = 50;
    const ROUNDS: i64 = 500;
    let mut broker = Broker::start_with(&["--cleaner-io-bytes-per-sec", "1000000"]);
    let _log = LogOnPanic(broker.dir.path().join("spate.log"));
    // 500 rounds of 50 partitions write about 75 MiB to the group's offsets partition, nine
    // bounds' worth.
    let conn = commit_rounds(&broker, "burst", PARTITIONS, ROUNDS);
    drop(conn);
    broker.kill();
    let before = broker.log().len();
    broker.spawn();
    let mut conn = Raw::connect(&broker.addr());
    let fetched = fetch_loaded(&mut conn, "burst");
    assert_eq!(offsets_of(&fetched), last_round(PARTITIONS, ROUNDS));
    let replayed: u64 = common::offsets_loads(&broker.log()[before..]).iter().sum();
    // The bound, the last write before the kill and writes that went ahead after a cleaning
    // took over a second (a loaded machine), at 3 KB a record at least; the cleaned part
    // (the live set, and the batches producer snapshots are anchored to) besides.
    let most = (OFFSETS_MAX_UNCLEANED_BYTES + (4 << 20)) / ROUND_METADATA_BYTES as u64
        + 4 * PARTITIONS as u64;
    assert!(
        replayed <= most,
        "the restart replayed {replayed} records of __consumer_offsets (at most {most})"
    );
}

/// A data dir of the layout before `__consumer_offsets` became a topic kept each partition's
/// log in `<data>/__consumer_offsets/<p>` (the same log format). Such a dir is migrated on
/// start: its records go into the topic's partition of the same number, the old dir goes.
#[test]
fn offsets_of_the_previous_layout_are_migrated_into_the_topic() {
    let mut broker = Broker::start();
    let _log = LogOnPanic(broker.dir.path().join("spate.log"));
    let out = spate_cli(&broker.addr(), &["topic", "create", "events", "-p", "4"]);
    assert_success("spate topic create events", &out);
    let mut conn = Raw::connect(&broker.addr());
    let commits = [(0, 5), (1, 6), (3, 8)];
    let errors = commit_with(&mut conn, "migrated", "", -1, &commits, |p| format!("m{p}"));
    assert_eq!(errors, vec![0, 0, 0]);
    drop(conn);
    assert!(broker.terminate().success());

    // The old layout: the same partitions' logs under `__consumer_offsets/<p>`, in a data dir
    // that knows no `__consumer_offsets` topic.
    let old = broker.data_dir();
    let moved = tempfile::tempdir().unwrap();
    let legacy = moved.path().join("__consumer_offsets");
    for p in 0..8 {
        let from = old.join(format!("__consumer_offsets-{p}"));
        let to = legacy.join(p.to_string());
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(&from).unwrap() {
            let f = f.unwrap();
            let name = f.file_name().to_string_lossy().into_owned();
            if [".log", ".index", ".timeindex"]
                .iter()
                .any(|e| name.ends_with(e))
            {
                std::fs::copy(f.path(), to.join(&name)).unwrap();
            }
        }
    }
    std::fs::remove_dir_all(&old).unwrap();
    std::fs::create_dir_all(&old).unwrap();
    // The topic "events" again, then the old offsets.
    broker.spawn();
    let out = spate_cli(&broker.addr(), &["topic", "create", "events", "-p", "4"]);
    assert_success("spate topic create events", &out);
    assert!(broker.terminate().success());
    std::fs::rename(&legacy, old.join("__consumer_offsets")).unwrap();
    broker.spawn();

    let mut conn = Raw::connect(&broker.addr());
    let fetched = fetch_loaded(&mut conn, "migrated");
    assert_eq!(
        offsets_of(&fetched),
        vec![
            (0, 5, "m0".to_owned()),
            (1, 6, "m1".to_owned()),
            (3, 8, "m3".to_owned())
        ]
    );
    // Each partition migrates as it loads; the old directory goes with the last one.
    let deadline = Instant::now() + LOAD_TIMEOUT;
    while old.join("__consumer_offsets").exists() {
        assert!(Instant::now() < deadline, "old layout not removed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // And they stay after another restart, now from the topic alone.
    drop(conn);
    broker.kill();
    broker.spawn();
    let mut conn = Raw::connect(&broker.addr());
    assert_eq!(offsets_of(&fetch_loaded(&mut conn, "migrated")).len(), 3);
}

/// A partition of the previous layout that the configured partition count would not migrate
/// (written with another `--offsets-topic-partitions`) is refused at start with what to do,
/// and nothing is written.
#[test]
fn offsets_of_the_previous_layout_with_another_partition_count_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("__consumer_offsets").join("12")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
        ])
        .args(["--offsets-topic-partitions", "8"])
        .arg("--data-dir")
        .arg(&data)
        .output()
        .expect("run spate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {stderr}");
    assert!(
        stderr.contains("--offsets-topic-partitions these offsets were written with"),
        "{stderr}"
    );
    assert!(data.join("__consumer_offsets").join("12").exists());
    assert!(!data.join("spate-metadata.json").exists(), "wrote metadata");
}
