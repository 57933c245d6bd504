//! The log cleaner under SIGKILL, on the real broker: a compacted topic with small segments and
//! a cleaner that runs every few milliseconds takes rounds of updates to every key (an
//! idempotent acks=all producer, confluent-kafka); after each round the broker is SIGKILLed,
//! at a different point of the cleaner's cycle each round (at once, or after it finished a
//! pass over the new data), and restarted. After every restart, reading from the start
//! gives exactly the last acknowledged value of every key, with strictly increasing offsets.
//! The engine's own tests kill the cleaner at each of its steps in-process
//! (engine/tests/clean.rs); this shows the whole broker recovers from a kill mid-cleaning.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{assert_success, python, spate_cli, Broker};

const TOPIC: &str = "crash-compacted";
const KEYS: usize = 2000;
/// Values per key per round: most of each round's data is dirty for the cleaner.
const UPDATES_PER_ROUND: usize = 5;
/// Kill and restart rounds (each kill at another point of the cleaner's cycle).
const ROUNDS: usize = 6;
/// Bound on waiting for the cleaner to make a pass over a round's data.
const CLEAN_BOUND: Duration = Duration::from_secs(60);

fn cleaner_runs(b: &Broker) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", b.metrics_port)) else {
        return 0.0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return 0.0;
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with("spate_cleaner_runs_total{") && l.contains(TOPIC))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn latest_values(b: &Broker) -> BTreeMap<String, String> {
    let out = python("compaction_crash.py", &["read", &b.addr(), TOPIC]);
    assert_success("compaction_crash.py read", &out);
    serde_json::from_slice(&out.stdout).expect("read output")
}

#[test]
fn the_last_value_of_every_key_survives_sigkill_during_cleaning() {
    let mut broker = Broker::start_with(&["--cleaner-backoff-ms", "10"]);
    let out = spate_cli(
        &broker.addr(),
        &[
            "topic",
            "create",
            TOPIC,
            "--partitions",
            "1",
            "--config",
            "cleanup.policy=compact",
            "--config",
            "segment.bytes=65536",
            "--config",
            "max.message.bytes=60000",
            "--config",
            "min.cleanable.dirty.ratio=0.01",
        ],
    );
    assert_success("spate topic create", &out);
    let mut cleaned_total = 0.0;
    for round in 0..ROUNDS {
        // Counted before the round's data goes in: a pass over it may finish while it is
        // still being produced.
        let before = cleaner_runs(&broker);
        let out = python(
            "compaction_crash.py",
            &[
                "produce",
                &broker.addr(),
                TOPIC,
                &round.to_string(),
                &KEYS.to_string(),
                &UPDATES_PER_ROUND.to_string(),
            ],
        );
        assert_success("compaction_crash.py produce", &out);
        // Even rounds: kill at once (a pass over the new data may be starting or midway);
        // odd rounds: once a pass finished (the cleaner may be writing the next, or idle).
        let passes = (round % 2) as f64;
        let deadline = Instant::now() + CLEAN_BOUND;
        while cleaner_runs(&broker) < before + passes {
            assert!(
                Instant::now() < deadline,
                "round {round}: no cleaner pass within {CLEAN_BOUND:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        cleaned_total += cleaner_runs(&broker) - before;
        broker.kill();
        broker.spawn();
        let latest = latest_values(&broker);
        assert_eq!(latest.len(), KEYS, "round {round}: keys after restart");
        let want = format!("r{round}-u{}", UPDATES_PER_ROUND - 1);
        for (k, v) in &latest {
            assert_eq!(
                v, &want,
                "round {round}: key {k} has {v}, its last acknowledged value is {want}"
            );
        }
    }
    // The kills landed while the cleaner was working: it made passes in the rounds.
    assert!(cleaned_total >= 1.0, "the cleaner never ran");
    eprintln!("cleaner passes seen before the kills: {cleaned_total}");
}
