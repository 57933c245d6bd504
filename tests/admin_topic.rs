//! `spate topic ...` and `spate cluster info` against a real broker: output (text and JSON),
//! broker state seen through kcat (librdkafka), Kafka errors named, bad flags named, and an
//! unreachable broker reported within seconds.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::spate_cli as spate;
use common::Broker;
use serde_json::Value;

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(broker: &str, args: &[&str]) -> String {
    let out = spate(broker, args);
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "spate {args:?} failed: {stderr}\n{stdout}"
    );
    stdout
}

fn fails(broker: &str, args: &[&str]) -> String {
    let out = spate(broker, args);
    let (stdout, stderr) = text(&out);
    assert!(
        !out.status.success(),
        "spate {args:?} should fail:\n{stdout}"
    );
    stderr
}

fn json(broker: &str, args: &[&str]) -> Value {
    let stdout = ok(broker, args);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

fn kcat_list(broker: &str) -> String {
    let out = Command::new("kcat")
        .args(["-b", broker, "-L"])
        .output()
        .expect("run kcat");
    assert!(out.status.success(), "kcat -L: {}", text(&out).1);
    text(&out).0
}

#[test]
fn topics_are_created_listed_described_and_deleted() {
    let broker = Broker::start();
    let b = &broker.addr();

    let created = ok(b, &["topic", "create", "orders", "--partitions", "3"]);
    assert_eq!(
        created.trim(),
        "Created topic orders with 3 partitions, replication factor 1."
    );
    assert!(kcat_list(b).contains("topic \"orders\" with 3 partitions"));

    let err = fails(b, &["topic", "create", "orders", "--partitions", "3"]);
    assert!(
        err.contains("TOPIC_ALREADY_EXISTS (Kafka error 36)"),
        "{err}"
    );
    let again = ok(b, &["topic", "create", "orders", "--if-not-exists"]);
    assert!(again.contains("already exists"), "{again}");

    let err = fails(b, &["topic", "create", "bad", "--config", "no.such.key=1"]);
    assert!(err.contains("INVALID_CONFIG"), "{err}");
    assert!(!kcat_list(b).contains("\"bad\""));

    let dry = json(
        b,
        &["topic", "create", "dry", "-p", "2", "--dry-run", "--json"],
    );
    assert_eq!(dry["created"], false);
    assert_eq!(dry["partitions"], 2);
    assert!(!kcat_list(b).contains("\"dry\""));

    let made = json(
        b,
        &[
            "topic",
            "create",
            "logs",
            "-p",
            "1",
            "--config",
            "retention.ms=3600000",
            "--json",
        ],
    );
    assert_eq!(made["created"], true);
    assert_eq!(made["partitions"], 1);

    let list = ok(b, &["topic", "list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 3, "{list}");
    assert!(lines[0].starts_with("TOPIC"), "{list}");
    assert!(
        lines[1].starts_with("logs ") && lines[1].contains(" 1 "),
        "{list}"
    );
    assert!(
        lines[2].starts_with("orders") && lines[2].contains(" 3 "),
        "{list}"
    );
    let list = json(b, &["topic", "list", "--json"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["topic"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["logs", "orders"]);

    // Records written by a real client show up in the described log end offsets.
    let mut producer = Command::new("kcat")
        .args(["-b", b, "-P", "-t", "orders", "-p", "1"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = producer.stdin.take().unwrap();
        for i in 0..25 {
            writeln!(stdin, "m{i}").unwrap();
        }
    }
    assert!(producer.wait().unwrap().success());
    let d = json(b, &["topic", "describe", "orders", "--json"]);
    let parts = d[0]["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 3);
    let ends: Vec<i64> = parts
        .iter()
        .map(|p| p["log_end_offset"].as_i64().unwrap())
        .collect();
    assert_eq!(ends, [0, 25, 0]);
    assert_eq!(parts[1]["leader"], 0);
    assert_eq!(
        (&parts[1]["leader_epoch"], &parts[1]["offline_replicas"]),
        (&0.into(), &serde_json::json!([]))
    );
    assert_eq!(d[0]["configs"]["retention.ms"]["source"], "default");
    let d = json(b, &["topic", "describe", "logs", "--json"]);
    assert_eq!(d[0]["configs"]["retention.ms"]["value"], "3600000");
    assert_eq!(d[0]["configs"]["retention.ms"]["source"], "topic");
    let described = ok(b, &["topic", "describe", "orders"]);
    assert!(
        described.contains("Topic: orders") && described.contains("Partitions: 3"),
        "{described}"
    );
    assert!(
        described
            .lines()
            // Partition, leader, epoch, replicas, ISR, offline, log start and end.
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["1", "0", "0", "0", "0", "-", "0", "25"]),
        "{described}"
    );
    let err = fails(b, &["topic", "describe", "nosuch"]);
    assert!(err.contains("UNKNOWN_TOPIC_OR_PARTITION"), "{err}");

    // alter-config: applied, persisted and visible; bad values and combinations refused.
    ok(
        b,
        &[
            "topic",
            "alter-config",
            "logs",
            "--set",
            "retention.ms=7200000",
        ],
    );
    let d = json(b, &["topic", "describe", "logs", "--json"]);
    assert_eq!(d[0]["configs"]["retention.ms"]["value"], "7200000");
    assert_eq!(d[0]["configs"]["retention.ms"]["source"], "topic");
    let err = fails(
        b,
        &[
            "topic",
            "alter-config",
            "logs",
            "--set",
            "retention.ms=soon",
        ],
    );
    assert!(err.contains("INVALID_CONFIG"), "{err}");
    let err = fails(
        b,
        &["topic", "alter-config", "logs", "--set", "colour=blue"],
    );
    assert!(err.contains("INVALID_CONFIG"), "{err}");
    // A batch limit larger than a segment could never be written.
    let err = fails(
        b,
        &[
            "topic",
            "alter-config",
            "logs",
            "--set",
            "segment.bytes=1048576",
            "--set",
            "max.message.bytes=4194304",
        ],
    );
    assert!(err.contains("INVALID_CONFIG"), "{err}");
    let d = json(b, &["topic", "describe", "logs", "--json"]);
    assert_eq!(
        d[0]["configs"]["retention.ms"]["value"], "7200000",
        "unchanged"
    );
    let err = fails(b, &["topic", "alter-config", "logs"]);
    assert!(err.contains("--set"), "{err}");

    let grown = ok(b, &["topic", "add-partitions", "orders", "--total", "5"]);
    assert_eq!(grown.trim(), "Topic orders now has 5 partitions.");
    assert!(kcat_list(b).contains("topic \"orders\" with 5 partitions"));
    let err = fails(b, &["topic", "add-partitions", "orders", "--total", "2"]);
    assert!(err.contains("INVALID_PARTITIONS"), "{err}");

    let deleted = ok(b, &["topic", "delete", "orders"]);
    assert_eq!(deleted.trim(), "Deleted topic orders.");
    assert!(!kcat_list(b).contains("\"orders\""));
    let err = fails(b, &["topic", "delete", "orders"]);
    assert!(err.contains("UNKNOWN_TOPIC_OR_PARTITION"), "{err}");
    let gone = json(b, &["topic", "delete", "orders", "--if-exists", "--json"]);
    assert_eq!(gone[0]["existed"], false);
}

#[test]
fn cluster_info_shows_the_broker_and_its_apis() {
    let broker = Broker::start();
    let b = &broker.addr();
    ok(b, &["topic", "create", "c1", "-p", "4"]);
    let info = json(b, &["cluster", "info", "--json", "--api-versions"]);
    assert!(info["cluster_id"].as_str().unwrap().starts_with("spate-"));
    assert_eq!(info["brokers"][0]["port"], broker.port);
    assert_eq!(info["brokers"][0]["host"], "127.0.0.1");
    assert_eq!(info["topics"], 1);
    assert_eq!(info["partitions"], 4);
    let apis = info["api_versions"].as_array().unwrap();
    assert!(apis
        .iter()
        .any(|a| a["api"] == "Fetch" && a["max"].as_i64().unwrap() >= 4));
    let text = ok(b, &["cluster", "info"]);
    // A one-node cluster of itself: its own controller, the only voter.
    assert!(text.contains("Controller:  0 (epoch 0)"), "{text}");
    assert_eq!(info["brokers"][0]["voter"], true);
    assert_eq!(info["brokers"][0]["alive"], true);
    assert!(
        // The first six columns; replicas, leaders, maintenance and decommissioning follow.
        text.lines()
            .any(|l| l.split_whitespace().take(6).collect::<Vec<_>>()
                == [
                    "0",
                    "127.0.0.1",
                    &broker.port.to_string(),
                    "-",
                    "yes",
                    "yes"
                ]),
        "{text}"
    );
    // One node holds and leads all four partitions; no maintenance, no decommission.
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().skip(6).collect::<Vec<_>>() == ["4", "4", "no", "no"]),
        "{text}"
    );
}

#[test]
fn unreachable_broker_is_an_error_within_seconds() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    for args in [
        &["topic", "list"][..],
        &["cluster", "info"],
        &["consume", "-t", "x"],
    ] {
        let started = Instant::now();
        let err = fails(&addr, args);
        assert!(started.elapsed() < Duration::from_secs(5), "{args:?}");
        assert!(
            err.contains(&format!("no broker reachable at {addr}")),
            "{err}"
        );
        assert!(err.lines().count() <= 2, "one clear message: {err}");
    }
}

#[test]
fn bad_flags_are_named() {
    let addr = "127.0.0.1:1";
    for (args, flag) in [
        (
            &["topic", "create", "t", "--partitions", "0"][..],
            "--partitions",
        ),
        (&["topic", "create", "t", "--config", "novalue"], "--config"),
        (&["topic", "create", "bad name"], "bad name"),
        (&["produce", "-t", "t", "--acks", "2"], "--acks"),
        (&["produce", "-t", "t", "--header", "x"], "--header"),
        (
            &["consume", "-t", "t", "--from-beginning", "--offset", "3"],
            "--offset",
        ),
        (&["consume", "-t", "t", "--format", "%q"], "--format"),
        (
            &["group", "reset-offsets", "g", "--topic", "t"],
            "--to-earliest",
        ),
        (&["group", "reset-offsets", "g", "--to-latest"], "--topic"),
        (
            &["topic", "list", "--request-timeout-ms", "0"],
            "--request-timeout-ms",
        ),
    ] {
        let err = fails(addr, args);
        assert!(err.contains(flag), "{args:?}: {err}");
    }
}
