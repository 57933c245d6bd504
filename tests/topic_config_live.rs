//! A topic config change reaches the topic's open logs: lowering retention.bytes on a topic
//! that already holds data makes the broker delete its old segments.

mod common;

use common::spate_cli as spate;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn log_start(broker: &str) -> i64 {
    let out = spate(broker, &["topic", "describe", "live", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["partitions"][0]["log_start_offset"].as_i64().unwrap()
}

#[test]
fn lowering_retention_deletes_old_segments_of_an_open_log() {
    let broker = common::Broker::start_with(&["--retention-check-interval-ms", "50"]);
    let b = broker.addr();
    let out = spate(
        &b,
        &[
            "topic",
            "create",
            "live",
            "-p",
            "1",
            "--config",
            "segment.bytes=1048576",
            "--config",
            "max.message.bytes=262144",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ~4 MiB in small batches: several 1 MiB segments.
    let mut child = Command::new(env!("CARGO_BIN_EXE_spate"))
        .args(["produce", "-t", "live", "--batch-records", "100", "-b", &b])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        let line = "x".repeat(1000);
        for _ in 0..4000 {
            writeln!(stdin, "{line}").unwrap();
        }
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(log_start(&b), 0, "no retention limit yet");

    let out = spate(
        &b,
        &[
            "topic",
            "alter-config",
            "live",
            "--set",
            "retention.bytes=1048576",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let start = loop {
        let start = log_start(&b);
        if start > 0 || Instant::now() > deadline {
            break start;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(start > 0, "retention never ran on the open log");
    assert!(start < 4000);
}
