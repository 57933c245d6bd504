//! Durability across restarts: with flush `always`, every message acknowledged before a
//! SIGKILL is read back; after SIGTERM everything is, and the broker exits 0.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{assert_success, python, Broker};

fn consume_all(broker: &Broker, topic: &str) -> Vec<String> {
    let out = python("consume_all.py", &[&broker.addr(), topic]);
    assert_success("consume_all.py", &out);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn acknowledged_messages_survive_sigkill() {
    let mut broker = Broker::start_with(&["--default-partitions", "3", "--flush", "always"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/produce_acked.py");
    let mut producer = Command::new("python3")
        .args([script, &broker.addr(), "durable", "1000000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut acked = HashSet::new();
    let mut lines = BufReader::new(producer.stdout.take().unwrap()).lines();
    // Kill the broker mid-stream, once a good number of writes were acknowledged.
    while acked.len() < 5000 {
        let line = lines
            .next()
            .expect("producer ended early")
            .expect("read producer output");
        acked.insert(line);
    }
    broker.kill();
    // Everything the producer printed before it noticed the broker died was acknowledged.
    let _ = producer.kill();
    let _ = producer.wait();
    for line in lines.map_while(Result::ok) {
        acked.insert(line);
    }
    broker.spawn();
    let read: HashSet<String> = consume_all(&broker, "durable").into_iter().collect();
    let lost: Vec<_> = acked.difference(&read).take(5).collect();
    assert!(
        lost.is_empty(),
        "acknowledged but lost after SIGKILL: {lost:?}"
    );
}

#[test]
fn everything_survives_sigterm() {
    let mut broker = Broker::start_with(&["--default-partitions", "2", "--flush", "never"]);
    let out = python("produce_acked.py", &[&broker.addr(), "clean", "20000"]);
    assert_success("produce_acked.py", &out);
    let acked = String::from_utf8(out.stdout).unwrap().lines().count();
    assert_eq!(acked, 20000);
    let status = broker.terminate();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(broker.log().contains("stopped cleanly"));
    broker.spawn();
    let mut read: Vec<u64> = consume_all(&broker, "clean")
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    read.sort_unstable();
    assert_eq!(read, (0..20000).collect::<Vec<u64>>());
}
