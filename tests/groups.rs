//! Consumer groups against the real broker with real clients: confluent-kafka members sharing
//! a topic and taking over from a killed one, kafka-python and `kcat -G` group consumers.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_success, python, Broker};

const POLL: Duration = Duration::from_millis(50);
const PARTITIONS: i32 = 6;

/// A client process killed when dropped, so a failing test leaves nothing behind.
struct ClientProcess {
    child: Child,
    name: String,
}

impl ClientProcess {
    fn python(name: &str, script: &str, args: &[&str], log: &Path) -> ClientProcess {
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
        ClientProcess {
            child,
            name: name.to_owned(),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (bounded) for a clean exit.
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

impl Drop for ClientProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `cond` until it holds; panics with `what` and `context()` after `within`.
fn wait_until(
    within: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            context()
        );
        std::thread::sleep(POLL);
    }
}

/// The file's text up to its last newline: a line without one is still being written.
fn complete_lines(path: &Path) -> String {
    let mut text = std::fs::read_to_string(path).unwrap_or_default();
    text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
    text
}

/// What one consumer wrote to its event file (see tests/python/groups_consumer.py).
#[derive(Debug, Default)]
struct ConsumerLog {
    assignments: Vec<BTreeSet<i32>>,
    revocations: usize,
    /// (partition, offset) → value, in consumption order.
    consumed: Vec<((i32, i64), String)>,
    /// partition → highest acknowledged committed offset.
    committed: BTreeMap<i32, i64>,
}

fn read_consumer_log(path: &Path) -> ConsumerLog {
    let text = complete_lines(path);
    let mut log = ConsumerLog::default();
    for line in text.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        match parts.as_slice() {
            ["A", list] => log
                .assignments
                .push(list.split(',').filter_map(|p| p.parse().ok()).collect()),
            ["A"] => log.assignments.push(BTreeSet::new()),
            ["R", ..] => log.revocations += 1,
            ["M", p, o, v] => {
                if let (Ok(p), Ok(o)) = (p.parse(), o.parse()) {
                    log.consumed.push(((p, o), v.to_string()));
                }
            }
            ["C", p, o] => {
                let (Ok(p), Ok(o)) = (p.parse::<i32>(), o.parse::<i64>()) else {
                    continue;
                };
                let e = log.committed.entry(p).or_insert(o);
                *e = (*e).max(o);
            }
            _ => {}
        }
    }
    log
}

/// (partition, offset) → value of every acknowledged produce.
fn read_produced(path: &Path) -> BTreeMap<(i32, i64), String> {
    let text = complete_lines(path);
    text.lines()
        .filter_map(|line| {
            let parts: Vec<&str> = line.split(' ').collect();
            match parts.as_slice() {
                ["P", p, o, v] => Some(((p.parse().ok()?, o.parse().ok()?), v.to_string())),
                _ => None,
            }
        })
        .collect()
}

fn file_has_line(path: &Path, line: &str) -> bool {
    std::fs::read_to_string(path)
        .map(|t| t.lines().any(|l| l == line))
        .unwrap_or(false)
}

#[test]
fn three_confluent_consumers_share_a_topic_and_take_over_from_a_killed_one() {
    let broker = Broker::start();
    let addr = broker.addr();
    let work = tempfile::tempdir().unwrap();
    let path = |name: &str| -> PathBuf { work.path().join(name) };
    let (topic, group) = ("orders", "order-workers");
    let produced_path = path("produced.txt");
    let stop_producer = path("stop-producer");
    let stop_consumers = path("stop-consumers");

    // The producer creates the topic and keeps producing for the whole test.
    let mut producer = ClientProcess::python(
        "producer",
        "groups_producer.py",
        &[
            &addr,
            topic,
            &PARTITIONS.to_string(),
            "100000",
            "15",
            produced_path.to_str().unwrap(),
            stop_producer.to_str().unwrap(),
        ],
        &path("producer.log"),
    );
    wait_until(
        Duration::from_secs(30),
        "the first acknowledged messages",
        || read_produced(&produced_path).len() >= 12,
        || std::fs::read_to_string(path("producer.log")).unwrap_or_default(),
    );
    // The group starts at offset 0 of every partition.
    let seed = python(
        "groups_precommit.py",
        &[&addr, group, topic, &PARTITIONS.to_string(), "0"],
    );
    assert_success("groups_precommit.py", &seed);

    let consumer_paths: Vec<PathBuf> = (0..3).map(|i| path(&format!("consumer-{i}.txt"))).collect();
    let mut consumers: Vec<ClientProcess> = consumer_paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            ClientProcess::python(
                &format!("consumer-{i}"),
                "groups_consumer.py",
                &[
                    &addr,
                    topic,
                    group,
                    p.to_str().unwrap(),
                    stop_consumers.to_str().unwrap(),
                    "120",
                ],
                &path(&format!("consumer-{i}.log")),
            )
        })
        .collect();
    let logs = || -> Vec<ConsumerLog> {
        consumer_paths
            .iter()
            .map(|p| read_consumer_log(p))
            .collect()
    };
    let describe = || {
        format!(
            "{:#?}\nbroker log:\n{}",
            logs()
                .iter()
                .map(|l| (&l.assignments, l.consumed.len(), &l.committed))
                .collect::<Vec<_>>(),
            broker.log()
        )
    };

    // Stable: every member owns two partitions, together all six, and each makes progress.
    wait_until(
        Duration::from_secs(40),
        "a stable three-member assignment with progress",
        || {
            let logs = logs();
            let current: Vec<BTreeSet<i32>> = logs
                .iter()
                .filter_map(|l| l.assignments.last().cloned())
                .collect();
            current.len() == 3
                && current.iter().all(|a| a.len() == 2)
                && current.iter().flatten().collect::<BTreeSet<_>>().len() == PARTITIONS as usize
                && logs.iter().all(|l| l.consumed.len() >= 10)
        },
        describe,
    );
    let victim_partitions = logs()[0].assignments.last().cloned().unwrap();

    // SIGKILL one member: no LeaveGroup, so the coordinator notices only by session timeout.
    consumers[0].kill();
    let victim = read_consumer_log(&consumer_paths[0]);
    let killed_at_produced = read_produced(&produced_path).len();

    // The other two take over all six partitions and consume what is produced after the kill.
    wait_until(
        Duration::from_secs(40),
        "the survivors to take over every partition",
        || {
            let logs = logs();
            let survivors: Vec<BTreeSet<i32>> = logs[1..]
                .iter()
                .filter_map(|l| l.assignments.last().cloned())
                .collect();
            survivors.iter().flatten().collect::<BTreeSet<_>>().len() == PARTITIONS as usize
                && survivors.iter().all(|a| a.len() == 3)
        },
        describe,
    );
    wait_until(
        Duration::from_secs(30),
        "more messages after the takeover",
        || read_produced(&produced_path).len() >= killed_at_produced + 60,
        describe,
    );
    std::fs::write(&stop_producer, b"").unwrap();
    producer.wait_success(Duration::from_secs(40));
    assert!(file_has_line(&produced_path, "DONE"));
    let produced = read_produced(&produced_path);

    // No gap: every acknowledged message reaches a member.
    wait_until(
        Duration::from_secs(40),
        "every produced message to be consumed",
        || {
            let seen: BTreeSet<(i32, i64)> = logs()
                .iter()
                .flat_map(|l| l.consumed.iter().map(|(k, _)| *k))
                .collect();
            produced.keys().all(|k| seen.contains(k))
        },
        describe,
    );
    std::fs::write(&stop_consumers, b"").unwrap();
    for c in &mut consumers[1..] {
        c.wait_success(Duration::from_secs(30));
    }

    let logs = logs();
    let mut readers: BTreeMap<(i32, i64), Vec<usize>> = BTreeMap::new();
    for (i, log) in logs.iter().enumerate() {
        for (key, value) in &log.consumed {
            assert_eq!(
                produced.get(key),
                Some(value),
                "member {i} read {key:?} = {value}, which was not produced there"
            );
            readers.entry(*key).or_default().push(i);
        }
    }
    let mut duplicates = 0;
    for (key @ (partition, offset), who) in &readers {
        if who.len() == 1 {
            continue;
        }
        duplicates += 1;
        // A message may be read twice only if a reader had not committed past it: every member
        // commits each message right after reading it, so only the killed member's last
        // uncommitted message per partition (or a commit refused by a rebalance) can repeat.
        let committed_readers = who
            .iter()
            .filter(|i| {
                logs[**i]
                    .committed
                    .get(partition)
                    .is_some_and(|c| *c > *offset)
            })
            .count();
        assert!(
            committed_readers <= 1,
            "{key:?} was read by members {who:?} although {committed_readers} of them committed past it"
        );
        if who.contains(&0) {
            assert!(victim_partitions.contains(partition));
            assert!(victim
                .committed
                .get(partition)
                .is_none_or(|c| *c <= *offset));
        }
    }
    assert!(
        duplicates <= PARTITIONS as usize * 2,
        "{duplicates} duplicates is more than the uncommitted windows allow"
    );
}

#[test]
fn kafka_python_group_consumer_consumes_commits_and_resumes() {
    let broker = Broker::start();
    let out = python(
        "groups_kafka_python.py",
        &[&broker.addr(), "kp-orders", "kp-group", "600"],
    );
    assert_success("groups_kafka_python.py", &out);
}

#[test]
fn kcat_balanced_consumer_reads_everything_then_resumes_from_its_commit() {
    let broker = Broker::start();
    let addr = broker.addr();
    let work = tempfile::tempdir().unwrap();
    let produced_path = work.path().join("produced.txt");
    let producer = python(
        "groups_producer.py",
        &[
            &addr,
            "kc-orders",
            "3",
            "300",
            "0",
            produced_path.to_str().unwrap(),
            work.path().join("never").to_str().unwrap(),
        ],
    );
    assert_success("groups_producer.py", &producer);
    let produced = read_produced(&produced_path);
    assert_eq!(produced.len(), 300);
    let seed = python(
        "groups_precommit.py",
        &[&addr, "kc-group", "kc-orders", "3", "0"],
    );
    assert_success("groups_precommit.py", &seed);

    let kcat = || {
        Command::new("timeout")
            .args([
                "60",
                "kcat",
                "-b",
                &addr,
                "-G",
                "kc-group",
                "kc-orders",
                "-e",
                "-q",
                "-f",
                "%p %o %s\n",
            ])
            .output()
            .expect("run kcat")
    };
    let first = kcat();
    assert!(
        first.status.success(),
        "kcat -G: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    let mut got: BTreeMap<(i32, i64), String> = BTreeMap::new();
    for line in String::from_utf8_lossy(&first.stdout).lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        let [p, o, v] = parts.as_slice() else {
            panic!("unexpected kcat line {line:?}")
        };
        let key = (p.parse().unwrap(), o.parse().unwrap());
        assert!(
            got.insert(key, v.to_string()).is_none(),
            "{key:?} read twice"
        );
    }
    assert_eq!(got, produced, "kcat -G read exactly what was produced");

    // kcat committed on exit: the same group now has nothing left to read.
    let second = kcat();
    assert!(second.status.success());
    assert_eq!(
        String::from_utf8_lossy(&second.stdout),
        "",
        "resumed from the commit"
    );

    // A group with nothing committed starts where auto.offset.reset says (OffsetFetch answers
    // -1, the client asks ListOffsets for the earliest offset).
    let fresh = Command::new("timeout")
        .args([
            "60",
            "kcat",
            "-b",
            &addr,
            "-G",
            "kc-fresh",
            "kc-orders",
            "-e",
            "-q",
            "-f",
            "%p %o\n",
            "-X",
            "auto.offset.reset=earliest",
        ])
        .output()
        .expect("run kcat");
    assert!(
        fresh.status.success(),
        "kcat -G: {}",
        String::from_utf8_lossy(&fresh.stderr)
    );
    let fresh: BTreeSet<(i32, i64)> = String::from_utf8_lossy(&fresh.stdout)
        .lines()
        .map(|l| {
            let (p, o) = l.split_once(' ').expect("partition offset");
            (p.parse().unwrap(), o.parse().unwrap())
        })
        .collect();
    assert_eq!(fresh, produced.keys().copied().collect::<BTreeSet<_>>());
}

#[test]
fn static_member_restart_keeps_its_partitions_without_a_rebalance() {
    let broker = Broker::start_with(&["--group-initial-rebalance-delay-ms", "1000"]);
    let addr = broker.addr();
    let work = tempfile::tempdir().unwrap();
    let path = |name: &str| -> PathBuf { work.path().join(name) };
    let (topic, group) = ("static-orders", "static-workers");
    let producer = python(
        "groups_producer.py",
        &[
            &addr,
            topic,
            &PARTITIONS.to_string(),
            "60",
            "0",
            path("produced.txt").to_str().unwrap(),
            path("never").to_str().unwrap(),
        ],
    );
    assert_success("groups_producer.py", &producer);
    let seed = python(
        "groups_precommit.py",
        &[&addr, group, topic, &PARTITIONS.to_string(), "0"],
    );
    assert_success("groups_precommit.py", &seed);

    let member = |name: &str, instance: &str| {
        ClientProcess::python(
            name,
            "groups_consumer.py",
            &[
                &addr,
                topic,
                group,
                path(&format!("{name}.txt")).to_str().unwrap(),
                path(&format!("stop-{name}")).to_str().unwrap(),
                "60",
                instance,
            ],
            &path(&format!("{name}.log")),
        )
    };
    let mut a = member("a", "instance-a");
    let mut b = member("b", "instance-b");
    let log_of = |name: &str| read_consumer_log(&path(&format!("{name}.txt")));
    let describe = || {
        format!(
            "a: {:?}\nb: {:?}\na2: {:?}\nbroker log:\n{}",
            log_of("a"),
            log_of("b").assignments,
            log_of("a2"),
            broker.log()
        )
    };
    wait_until(
        Duration::from_secs(40),
        "two static members sharing the six partitions",
        || {
            let (la, lb) = (log_of("a"), log_of("b"));
            match (la.assignments.last(), lb.assignments.last()) {
                (Some(x), Some(y)) => {
                    x.len() == 3 && y.len() == 3 && x.union(y).count() == PARTITIONS as usize
                }
                _ => false,
            }
        },
        describe,
    );
    let b_assignments_before = log_of("b").assignments.len();
    let a_partitions = log_of("a").assignments.last().cloned().unwrap();

    // A static member closes without leaving; its replacement (same group.instance.id) comes
    // back within the session timeout and gets the same partitions, and B never rebalances.
    std::fs::write(path("stop-a"), b"").unwrap();
    a.wait_success(Duration::from_secs(30));
    let _a2 = member("a2", "instance-a");
    wait_until(
        Duration::from_secs(20),
        "the restarted static member to get its partitions back",
        || !log_of("a2").assignments.is_empty(),
        describe,
    );
    assert_eq!(
        log_of("a2").assignments,
        vec![a_partitions],
        "{}",
        describe()
    );
    let lb = log_of("b");
    assert_eq!(lb.assignments.len(), b_assignments_before, "{}", describe());
    assert_eq!(lb.revocations, 0, "b was never revoked: {}", describe());
    std::fs::write(path("stop-b"), b"").unwrap();
    b.wait_success(Duration::from_secs(30));
}
