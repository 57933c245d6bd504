//! kcat (librdkafka) against the real broker: metadata listing, 100k keyed messages with
//! headers across 3 partitions, read back exactly and in order per partition.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use common::Broker;

const MESSAGES: usize = 100_000;

#[test]
fn kcat_lists_produces_and_consumes_100k() {
    let broker = Broker::start_with(&["--default-partitions", "3"]);
    let addr = broker.addr();

    let list = Command::new("kcat")
        .args(["-b", &addr, "-L", "-t", "kc"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success(), "kcat -L: {text}");
    assert!(text.contains(&format!("broker 0 at {addr}")), "{text}");
    assert!(text.contains("topic \"kc\" with 3 partitions"), "{text}");

    let mut producer = Command::new("kcat")
        .args([
            "-b",
            &addr,
            "-P",
            "-t",
            "kc",
            "-K",
            ":",
            "-H",
            "origin=kcat",
            "-z",
            "snappy",
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut input = String::with_capacity(MESSAGES * 24);
        for i in 0..MESSAGES {
            input.push_str(&format!("key{}:message-{i}\n", i % 1000));
        }
        producer
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = producer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kcat -P: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let consumer = Command::new("kcat")
        .args([
            "-b",
            &addr,
            "-C",
            "-t",
            "kc",
            "-e",
            "-f",
            "%p %o %k %h %s\n",
        ])
        .output()
        .unwrap();
    assert!(consumer.status.success());
    let text = String::from_utf8(consumer.stdout).unwrap();
    let mut per_partition: BTreeMap<u32, Vec<(u64, usize)>> = BTreeMap::new();
    let mut seen = vec![false; MESSAGES];
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 5, "line {line:?}");
        let i: usize = f[4].strip_prefix("message-").unwrap().parse().unwrap();
        assert_eq!(f[2], format!("key{}", i % 1000));
        assert_eq!(f[3], "origin=kcat");
        assert!(!seen[i], "message {i} read twice");
        seen[i] = true;
        per_partition
            .entry(f[0].parse().unwrap())
            .or_default()
            .push((f[1].parse().unwrap(), i));
    }
    assert!(seen.iter().all(|s| *s), "some messages were not read back");
    assert_eq!(per_partition.len(), 3, "keys spread over 3 partitions");
    for (p, msgs) in per_partition {
        for (n, w) in msgs.windows(2).enumerate() {
            assert_eq!(
                w[1].0,
                w[0].0 + 1,
                "partition {p} offsets contiguous at {n}"
            );
            assert!(w[1].1 > w[0].1, "partition {p} keeps produce order at {n}");
        }
    }
}
