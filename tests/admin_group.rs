//! `spate group list|describe|reset-offsets` against a real broker with a real consumer
//! (kafka-python) in the group: lag per partition, members and assignments, resets refused
//! while the member is active, dry run by default, and a reset the consumer then follows.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::spate_cli as spate;
use common::Broker;
use serde_json::Value;

const TOPIC: &str = "work";
const GROUP: &str = "workers";
const RECORDS: i64 = 120;
const DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

/// A group member: consumes from the committed offsets (earliest if none), commits after each
/// poll, and leaves once STOP exists and it has seen WANT records, or after 60 s. Prints the
/// number of records it consumed.
const MEMBER: &str = r#"
import os, sys, time
from kafka import KafkaConsumer
bootstrap, topic, group, stop, want = sys.argv[1:6]
c = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, client_id="admin-test",
                  auto_offset_reset="earliest", enable_auto_commit=False)
got = 0
deadline = time.time() + 60
while time.time() < deadline and not (os.path.exists(stop) and got >= int(want)):
    batch = c.poll(timeout_ms=100)
    for records in batch.values():
        got += len(records)
    if batch:
        c.commit()
c.close()
print(got)
"#;

fn ok(broker: &str, args: &[&str]) -> String {
    let out = spate(broker, args);
    assert!(
        out.status.success(),
        "spate {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(broker: &str, args: &[&str]) -> Value {
    let out = ok(broker, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

fn member(broker: &str, stop: &std::path::Path, want: i64) -> Child {
    Command::new("python3")
        .args(["-c", MEMBER, broker, TOPIC, GROUP])
        .arg(stop)
        .arg(want.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3")
}

fn consumed(child: Child) -> i64 {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "member failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Polls `group describe --json` until `done` holds, within [`DEADLINE`].
fn wait_for(broker: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let out = spate(broker, &["group", "describe", GROUP, "--json"]);
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            if done(&v) {
                return v;
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(POLL);
    }
}

fn committed(v: &Value) -> Vec<(i64, i64)> {
    v["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["partition"].as_i64().unwrap(),
                o["committed_offset"].as_i64().unwrap_or(-1),
            )
        })
        .collect()
}

#[test]
fn groups_are_described_and_reset_like_kafka_consumer_groups() {
    let broker = Broker::start();
    let b = &broker.addr();
    ok(b, &["topic", "create", TOPIC, "-p", "2"]);
    let input: String = (0..RECORDS).map(|i| format!("k{i}:v{i}\n")).collect();
    let mut producer = Command::new(env!("CARGO_BIN_EXE_spate"))
        .args(["produce", "-t", TOPIC, "-K", ":", "-b", b])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        producer
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    assert!(producer.wait().unwrap().success());
    let ends: Vec<i64> = json(b, &["topic", "describe", TOPIC, "--json"])[0]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["log_end_offset"].as_i64().unwrap())
        .collect();
    assert_eq!(ends.iter().sum::<i64>(), RECORDS);

    let err = String::from_utf8_lossy(&spate(b, &["group", "describe", GROUP]).stderr).to_string();
    assert!(
        err.contains("consumer group workers does not exist"),
        "{err}"
    );

    // An active member that has read and committed everything.
    let dir = tempfile::tempdir().unwrap();
    let stop = dir.path().join("stop");
    let first = member(b, &stop, RECORDS);
    let active = wait_for(b, "the member to commit every record", |v| {
        v["state"] == "Stable"
            && v["members"].as_array().is_some_and(|m| m.len() == 1)
            && v["offsets"]
                .as_array()
                .is_some_and(|o| o.len() == 2 && o.iter().all(|p| p["lag"].as_i64() == Some(0)))
    });
    let m = &active["members"][0];
    assert_eq!(m["client_id"], "admin-test");
    assert_eq!(m["assignment"].as_array().unwrap().len(), 2);
    assert_eq!(active["protocol_type"], "consumer");
    for o in active["offsets"].as_array().unwrap() {
        assert_eq!(o["member_id"], m["member_id"]);
        let p = o["partition"].as_i64().unwrap() as usize;
        assert_eq!(o["committed_offset"].as_i64().unwrap(), ends[p]);
        assert_eq!(o["log_end_offset"].as_i64().unwrap(), ends[p]);
    }
    let table = ok(b, &["group", "describe", GROUP]);
    assert!(table.contains("State: Stable  Members: 1"), "{table}");
    assert!(table.contains("admin-test"), "{table}");
    let list = json(b, &["group", "list", "--json"]);
    assert_eq!(list[0]["group"], GROUP);
    assert_eq!(list[0]["state"], "Stable");

    // Refused while the member is active; nothing changes.
    let out = spate(
        b,
        &[
            "group",
            "reset-offsets",
            GROUP,
            "--topic",
            TOPIC,
            "--to-earliest",
            "--execute",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has active members (state Stable"), "{err}");

    std::fs::write(&stop, b"").unwrap();
    assert_eq!(consumed(first), RECORDS);
    let empty = wait_for(b, "the group to empty", |v| v["state"] == "Empty");
    let before = committed(&empty);
    assert_eq!(before, [(0, ends[0]), (1, ends[1])]);

    // A dry run shows the plan and changes nothing.
    let plan = json(
        b,
        &[
            "group",
            "reset-offsets",
            GROUP,
            "--topic",
            TOPIC,
            "--to-earliest",
            "--json",
        ],
    );
    assert_eq!(plan["executed"], false);
    assert!(plan["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .all(|o| o["new_offset"] == 0));
    assert_eq!(
        committed(&json(b, &["group", "describe", GROUP, "--json"])),
        before
    );

    // Shift one partition back, clamped at the start of the log.
    let shifted = json(
        b,
        &[
            "group",
            "reset-offsets",
            GROUP,
            "--topic",
            &format!("{TOPIC}:1"),
            "--shift-by",
            "-5",
            "--execute",
            "--json",
        ],
    );
    assert_eq!(shifted["offsets"].as_array().unwrap().len(), 1);
    let after = committed(&json(b, &["group", "describe", GROUP, "--json"]));
    assert_eq!(after, [(0, ends[0]), (1, (ends[1] - 5).max(0))]);

    // To an explicit offset beyond the end: clamped to the end.
    ok(
        b,
        &[
            "group",
            "reset-offsets",
            GROUP,
            "--all-topics",
            "--to-offset",
            "100000",
            "--execute",
        ],
    );
    assert_eq!(
        committed(&json(b, &["group", "describe", GROUP, "--json"])),
        [(0, ends[0]), (1, ends[1])]
    );

    // Back to the beginning: a new member of the group reads everything again.
    let text = ok(
        b,
        &[
            "group",
            "reset-offsets",
            GROUP,
            "--topic",
            TOPIC,
            "--to-earliest",
            "--execute",
        ],
    );
    assert!(text.lines().next().unwrap().starts_with("GROUP"), "{text}");
    assert_eq!(
        committed(&json(b, &["group", "describe", GROUP, "--json"])),
        [(0, 0), (1, 0)]
    );
    assert_eq!(consumed(member(b, &stop, RECORDS)), RECORDS);
}
