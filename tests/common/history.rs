//! An idempotent acks=all producer (tests/python/cluster_produce.py, confluent-kafka) run
//! beside a cluster test, and the check over its history: every acknowledged value read back
//! exactly once at its acknowledged partition and offset, no error seen by the application.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::cluster::wait_until;

/// Bound on each wait for more acknowledgements.
pub const ACK_BOUND: Duration = Duration::from_secs(60);

pub enum Report {
    Ack {
        partition: usize,
        offset: i64,
        value: u64,
    },
    Err(String),
}

pub struct Producer {
    child: Child,
    stop_file: std::path::PathBuf,
    out_file: std::path::PathBuf,
}

impl Producer {
    /// Writes to `partitions` partitions of `topic` at about `rate` messages a second.
    pub fn start(
        dir: &Path,
        bootstrap: &str,
        topic: &str,
        partitions: usize,
        rate: u32,
    ) -> Producer {
        let stop_file = dir.join("stop");
        let out_file = dir.join("acks.txt");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/cluster_produce.py");
        let child = Command::new("python3")
            .arg(script)
            .args([
                bootstrap,
                topic,
                &partitions.to_string(),
                &rate.to_string(),
                &stop_file.to_string_lossy(),
                &out_file.to_string_lossy(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run python3");
        Producer {
            child,
            stop_file,
            out_file,
        }
    }

    pub fn reports(&self) -> Vec<Report> {
        let text = std::fs::read_to_string(&self.out_file).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                match f[0] {
                    "ack" if f.len() == 5 && !f[4].is_empty() => Some(Report::Ack {
                        partition: f[1].parse().ok()?,
                        offset: f[2].parse().ok()?,
                        value: f[3].parse().ok()?,
                    }),
                    "err" => Some(Report::Err(l.to_string())),
                    _ => None,
                }
            })
            .collect()
    }

    pub fn acks(&self) -> usize {
        self.reports()
            .iter()
            .filter(|r| matches!(r, Report::Ack { .. }))
            .count()
    }

    /// Waits until `n` more writes are acknowledged.
    pub fn wait_more(&mut self, n: usize, what: &str) {
        let base = self.acks();
        wait_until(what, ACK_BOUND, || {
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!("producer exited early ({s})");
            }
            (self.acks() >= base + n).then_some(())
        });
    }

    pub fn stop(mut self) -> Vec<Report> {
        std::fs::write(&self.stop_file, b"").unwrap();
        let status = wait_until("producer finished", Duration::from_secs(120), || {
            self.child.try_wait().unwrap()
        });
        let reports = self.reports();
        let out = self.child.wait_with_output().unwrap();
        assert!(
            status.success(),
            "producer: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        reports
    }
}

/// Every acknowledged value is read back once, at its acknowledged partition and offset (so in
/// order per partition), and the application saw no error. Returns the producer's value at each
/// offset read.
pub fn check_history(reports: &[Report], records: &str) -> HashMap<(usize, i64), u64> {
    let mut at: HashMap<(usize, i64), u64> = HashMap::new();
    let mut values: HashMap<u64, (usize, i64)> = HashMap::new();
    let mut offsets: std::collections::HashSet<(usize, i64)> = Default::default();
    for line in records.lines() {
        let f: Vec<&str> = line.splitn(3, ' ').collect();
        let (p, o): (usize, i64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        assert!(offsets.insert((p, o)), "offset {p}/{o} read twice");
        // Records the test wrote otherwise (bulk data before the producer ran) have other values.
        let Some(v) = f.get(2).and_then(|v| v.parse::<u64>().ok()) else {
            continue;
        };
        at.insert((p, o), v);
        if let Some(first) = values.insert(v, (p, o)) {
            panic!("value {v} read twice: at {first:?} and {p}/{o}");
        }
    }
    let mut acked = 0;
    for r in reports {
        match r {
            Report::Ack {
                partition,
                offset,
                value,
            } => {
                acked += 1;
                assert_eq!(
                    at.get(&(*partition, *offset)),
                    Some(value),
                    "acknowledged value {value} at {partition}/{offset}"
                );
            }
            Report::Err(line) => panic!("the producer saw an error: {line}"),
        }
    }
    eprintln!("history: {acked} acknowledged, {} records read", at.len());
    assert!(acked > 0);
    at
}
