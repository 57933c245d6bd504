//! `spate produce` and `spate consume` against a real broker, cross-checked with kcat
//! (librdkafka) in both directions: keys, headers, partitioning, compression, formats, offsets,
//! stop conditions, and input errors that keep the records before them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::Broker;
use serde_json::Value;

const RECORDS: usize = 3_000;
const KEYS: usize = 50;

fn spate_with_input(broker: &str, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spate"))
        .args(args)
        .env("SPATE_BOOTSTRAP_SERVER", broker)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run spate");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

fn ok(broker: &str, args: &[&str], input: &[u8]) -> String {
    let out = spate_with_input(broker, args, input);
    assert!(
        out.status.success(),
        "spate {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Every record of one partition from offset 0, read by kcat: (offset, key, value, headers).
fn kcat_read(broker: &str, topic: &str, partition: i32) -> Vec<(i64, String, String, String)> {
    let out = Command::new("kcat")
        .args([
            "-b",
            broker,
            "-C",
            "-t",
            topic,
            "-p",
            &partition.to_string(),
            "-o",
            "0",
            "-e",
            "-q",
            "-f",
            "%o\t%k\t%s\t%h\n",
        ])
        .output()
        .expect("run kcat");
    assert!(
        out.status.success(),
        "kcat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 4, "{l}");
            (f[0].parse().unwrap(), f[1].into(), f[2].into(), f[3].into())
        })
        .collect()
}

#[test]
fn produced_records_reach_kcat_and_consume_reads_them_back() {
    let broker = Broker::start();
    let b = &broker.addr();
    ok(b, &["topic", "create", "events", "-p", "3"], b"");

    let mut input = String::new();
    for i in 0..RECORDS {
        input.push_str(&format!("user{}|event {i}: a=b\n", i % KEYS));
    }
    let summary: Value = serde_json::from_str(&ok(
        b,
        &[
            "produce",
            "-t",
            "events",
            "--key-separator",
            "|",
            "--header",
            "source=cli",
            "-H",
            "run=1",
            "--batch-records",
            "200",
            "--compression",
            "lz4",
            "--json",
        ],
        input.as_bytes(),
    ))
    .unwrap();
    assert_eq!(summary["records"], RECORDS);
    assert_eq!(summary["failed"], 0);

    // The broker holds every record once, each key in one partition, in input order.
    let mut partition_of_key: BTreeMap<String, i32> = BTreeMap::new();
    let mut values: BTreeSet<String> = BTreeSet::new();
    for p in 0..3 {
        let records = kcat_read(b, "events", p);
        let mut last_index = -1i64;
        for (i, (offset, key, value, headers)) in records.iter().enumerate() {
            assert_eq!(*offset, i as i64);
            assert_eq!(headers, "source=cli,run=1");
            assert_eq!(
                *partition_of_key.entry(key.clone()).or_insert(p),
                p,
                "{key}"
            );
            let index: i64 = value
                .strip_prefix("event ")
                .and_then(|v| v.strip_suffix(": a=b"))
                .unwrap()
                .parse()
                .unwrap();
            assert!(index > last_index, "order within a partition");
            last_index = index;
            assert!(values.insert(value.clone()), "duplicate {value}");
        }
    }
    assert_eq!(values.len(), RECORDS);
    assert_eq!(partition_of_key.len(), KEYS);
    assert!(
        partition_of_key.values().collect::<BTreeSet<_>>().len() > 1,
        "keys spread over partitions"
    );

    // JSON lines carry everything.
    let lines = ok(
        b,
        &[
            "consume",
            "-t",
            "events",
            "--from-beginning",
            "--exit-at-end",
            "--format",
            "json",
        ],
        b"",
    );
    let mut seen = BTreeSet::new();
    for line in lines.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["topic"], "events");
        assert_eq!(v["headers"]["source"], "cli");
        let key = v["key"].as_str().unwrap();
        assert_eq!(
            v["partition"].as_i64().unwrap() as i32,
            partition_of_key[key]
        );
        assert!(seen.insert(v["value"].as_str().unwrap().to_string()));
    }
    assert_eq!(seen, values);

    // A pattern, one partition, a start offset and a record limit.
    let some = ok(
        b,
        &[
            "consume", "-t", "events", "-p", "1", "--offset", "5", "-n", "3", "-f", "%p:%o %k",
        ],
        b"",
    );
    let expected: Vec<String> = kcat_read(b, "events", 1)[5..8]
        .iter()
        .map(|(o, k, _, _)| format!("1:{o} {k}"))
        .collect();
    assert_eq!(some.lines().collect::<Vec<_>>(), expected);

    // Records produced by kcat are read by spate consume, keys and headers included.
    // Created before kcat starts: its metadata request would auto-create the topic first.
    ok(b, &["topic", "create", "fromkcat", "-p", "1"], b"");
    let mut kcat = Command::new("kcat")
        .args([
            "-b", b, "-P", "-t", "fromkcat", "-p", "0", "-K", ":", "-H", "via=kcat", "-z", "snappy",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = kcat.stdin.take().unwrap();
        for i in 0..100 {
            writeln!(stdin, "k{i}:v{i}").unwrap();
        }
    }
    assert!(kcat.wait().unwrap().success());
    let read = ok(
        b,
        &[
            "consume",
            "-t",
            "fromkcat",
            "--from-beginning",
            "-e",
            "-f",
            "%o %k=%v %h",
        ],
        b"",
    );
    let expected: Vec<String> = (0..100)
        .map(|i| format!("{i} k{i}=v{i} via=kcat"))
        .collect();
    assert_eq!(read.lines().collect::<Vec<_>>(), expected);
}

#[test]
fn consume_stops_on_idle_timeout_and_reports_bad_offsets() {
    let broker = Broker::start();
    let b = &broker.addr();
    ok(b, &["topic", "create", "quiet", "-p", "2"], b"");
    let started = Instant::now();
    let out = ok(b, &["consume", "-t", "quiet", "--timeout-ms", "300"], b"");
    assert!(out.is_empty());
    assert!(started.elapsed() < Duration::from_secs(5));

    ok(b, &["produce", "-t", "quiet", "-p", "1"], b"a\nb\n");
    let out = spate_with_input(
        b,
        &["consume", "-t", "quiet", "-p", "1", "--offset", "9"],
        b"",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("offset 9 is out of range for quiet/1: the log holds 0..2"),
        "{err}"
    );

    let out = spate_with_input(b, &["consume", "-t", "quiet", "-p", "5"], b"");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--partition 5"));
    let out = spate_with_input(b, &["consume", "-t", "missing"], b"");
    assert!(String::from_utf8_lossy(&out.stderr).contains("topic missing does not exist"));
}

#[test]
fn produce_errors_name_the_line_and_keep_earlier_records() {
    let broker = Broker::start_with(&["--max-batch-bytes", "16384"]);
    let b = &broker.addr();
    ok(b, &["topic", "create", "strict", "-p", "1"], b"");

    let out = spate_with_input(
        b,
        &["produce", "-t", "strict", "-K", "="],
        b"a=1\nb=2\nno separator here\nc=3\n",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3 has no key separator \"=\""), "{err}");
    let kept: Vec<String> = kcat_read(b, "strict", 0)
        .into_iter()
        .map(|(_, k, v, _)| format!("{k}={v}"))
        .collect();
    assert_eq!(kept, ["a=1", "b=2"]);

    let long = vec![b'x'; 2_000];
    let out = spate_with_input(
        b,
        &["produce", "-t", "strict", "--max-line-bytes", "1000"],
        &long,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1 is longer than --max-line-bytes"));
    assert_eq!(kcat_read(b, "strict", 0).len(), 2);

    // A batch over the broker's size limit is refused by the broker: the failure names the
    // batch, its input lines and the Kafka error, and the command fails.
    let mut input = b"small\n".to_vec();
    input.extend(vec![b'y'; 20_000]);
    let out = spate_with_input(
        b,
        &[
            "produce",
            "-t",
            "strict",
            "--max-line-bytes",
            "100000",
            "--batch-records",
            "1",
        ],
        &input,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("batch of 1 records (input lines 2..=2) to strict/0: MESSAGE_TOO_LARGE"),
        "{err}"
    );
    assert!(err.contains("1 of 2 records were not written"), "{err}");
    assert_eq!(kcat_read(b, "strict", 0).len(), 3);

    let out = spate_with_input(b, &["produce", "-t", "absent"], b"x\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("topic absent does not exist"));
}

#[test]
fn lines_are_sent_while_stdin_stays_open_and_acks_zero_writes() {
    let broker = Broker::start();
    let b = &broker.addr();
    ok(b, &["topic", "create", "live", "-p", "1"], b"");

    // An interactive producer: the first line must reach the broker before stdin closes.
    let mut producer = Command::new(env!("CARGO_BIN_EXE_spate"))
        .args(["produce", "-t", "live", "--linger-ms", "10", "-b", b])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = producer.stdin.take().unwrap();
    writeln!(stdin, "typed").unwrap();
    stdin.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while kcat_read(b, "live", 0).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the line never reached the broker"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    writeln!(stdin, "second").unwrap();
    drop(stdin);
    let out = producer.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Produced 2 records to live"));

    // acks=0 gets no reply; the records still arrive, in order.
    let input: String = (0..500).map(|i| format!("z{i}\n")).collect();
    ok(
        b,
        &[
            "produce",
            "-t",
            "live",
            "--acks",
            "0",
            "--batch-records",
            "100",
        ],
        input.as_bytes(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let values = loop {
        let all = kcat_read(b, "live", 0);
        if all.len() >= 502 {
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "acks=0 records did not all arrive"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let values: Vec<String> = values.into_iter().map(|(_, _, v, _)| v).collect();
    let mut expected = vec!["typed".to_string(), "second".to_string()];
    expected.extend((0..500).map(|i| format!("z{i}")));
    assert_eq!(values, expected);
}
