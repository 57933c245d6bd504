//! spate-perf against a real broker process on 127.0.0.1: the spate broker when the workspace
//! builds one with a `serve` command, else the peer (Tansu) when it is installed. Also the CLI's
//! behaviour on bad input, which needs no broker.

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest a single spate-perf invocation may take in these tests.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a broker may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);

fn perf_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_spate-perf"))
}

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Runs spate-perf with a deadline; kills it if it overruns.
fn run_perf(args: &[&str]) -> Output {
    let started = Instant::now();
    let mut child = Command::new(perf_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn spate-perf");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).ok();
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).ok();
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if started.elapsed() > RUN_TIMEOUT {
            child.kill().ok();
            child.wait().ok();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        code: status.and_then(|s| s.code()),
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
        elapsed: started.elapsed(),
    }
}

struct Broker {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(child: &mut Child, addr: &str) {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("broker exited during start-up: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("broker not listening on {addr} after {START_TIMEOUT:?}");
}

/// The spate binary built next to spate-perf, or `SPATE_BIN`.
fn spate_bin() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("SPATE_BIN").map(PathBuf::from),
        Some(perf_bin().with_file_name("spate")),
    ];
    candidates.into_iter().flatten().find(|bin| {
        Command::new(bin)
            .args(["serve", "--help"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn tansu_bin() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("TANSU").map(PathBuf::from),
        Some(PathBuf::from("/work/tansu-build/root/bin/tansu")),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

/// Starts the broker under test, or None when neither is available.
fn start_broker() -> Option<Broker> {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = if let Some(spate) = spate_bin() {
        Command::new(spate)
            // No metrics endpoint: its default port would clash between parallel tests.
            .args([
                "serve",
                "--metrics-listen",
                "off",
                "--listen",
                &addr,
                "--data-dir",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    } else if let Some(tansu) = tansu_bin() {
        // Tansu reads the sqlite URL's path relative to its working directory.
        Command::new(tansu)
            .current_dir(dir.path())
            .arg("broker")
            .args(["--listener-url", &format!("tcp://{addr}")])
            .args(["--advertised-listener-url", &format!("tcp://{addr}")])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    } else {
        return None;
    };
    wait_listening(&mut child, &addr);
    Some(Broker {
        child,
        addr,
        _dir: dir,
    })
}

fn summary(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn produce_then_consume_then_e2e_against_a_real_broker() {
    let Some(broker) = start_broker() else {
        eprintln!("SKIPPED: no broker to test against (no `spate serve`, no tansu)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let produced = dir.path().join("produce.json");
    let out = run_perf(&[
        "produce",
        "-b",
        &broker.addr,
        "-t",
        "it-perf",
        "-p",
        "2",
        "-c",
        "2",
        "-s",
        "100",
        "--batch-bytes",
        "10000",
        "-n",
        "20000",
        "--json",
        produced.to_str().unwrap(),
    ]);
    assert_eq!(
        out.code,
        Some(0),
        "produce failed: {}{}",
        out.stdout,
        out.stderr
    );
    let p = summary(&produced);
    // 20,000 over 2 connections in batches of 100: exactly 20,000 acked.
    assert_eq!(p["records"], 20_000, "{}", out.stdout);
    assert!(p["latency"]["samples"].as_u64().unwrap() == 20_000);
    assert!(out.stdout.contains("records/sec"));

    let consumed = dir.path().join("consume.json");
    let out = run_perf(&[
        "consume",
        "-b",
        &broker.addr,
        "-t",
        "it-perf",
        "-c",
        "2",
        "--json",
        consumed.to_str().unwrap(),
    ]);
    assert_eq!(
        out.code,
        Some(0),
        "consume failed: {}{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(summary(&consumed)["records"], 20_000, "{}", out.stdout);

    let e2e = dir.path().join("e2e.json");
    let out = run_perf(&[
        "e2e",
        "-b",
        &broker.addr,
        "-t",
        "it-e2e",
        "-s",
        "64",
        "--acks",
        "-1",
        "--rate",
        "2000",
        "--duration-secs",
        "2",
        "--fetch-max-wait-ms",
        "50",
        "--json",
        e2e.to_str().unwrap(),
    ]);
    assert_eq!(
        out.code,
        Some(0),
        "e2e failed: {}{}",
        out.stdout,
        out.stderr
    );
    let e = summary(&e2e);
    let n = e["records"].as_u64().unwrap();
    // 2 s at 2,000 records/s, every acked record seen by the consumer.
    assert!((3_000..=4_100).contains(&n), "e2e saw {n} records");
    assert!(e["latency"]["p50_ms"].as_f64().unwrap() > 0.0);
}

/// A broker frozen for a while must show in the latencies of every batch due while it was frozen,
/// not only in the one request that was stuck: fixed-rate latency starts at the intended send.
#[test]
fn a_stalled_broker_shows_in_fixed_rate_latencies() {
    let Some(broker) = start_broker() else {
        eprintln!("SKIPPED: no broker to test against (no `spate serve`, no tansu)");
        return;
    };
    let addr = broker.addr.clone();
    // Create the topic first, so the measured run spends no time on set-up.
    let out = run_perf(&[
        "produce", "-b", &addr, "-t", "it-stall", "-n", "10", "-s", "10",
    ]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("stall.json");
    let json_arg = json.to_str().unwrap().to_string();
    let runner = std::thread::spawn(move || {
        run_perf(&[
            "produce",
            "-b",
            &addr,
            "-t",
            "it-stall",
            "-s",
            "10",
            "--rate",
            "2000",
            "--duration-secs",
            "3",
            "--json",
            &json_arg,
        ])
    });
    // Freeze the broker from about 1 s into the run for at least 800 ms.
    std::thread::sleep(Duration::from_millis(1000));
    let pid = broker.child.id().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    };
    signal("-STOP");
    std::thread::sleep(Duration::from_millis(800));
    signal("-CONT");
    let out = runner.join().unwrap();
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let lat = &summary(&json)["latency"];
    let max = lat["max_ms"].as_f64().unwrap();
    let p90 = lat["p90_ms"].as_f64().unwrap();
    // Batches due during the 800 ms stall waited up to 800 ms: over a quarter of the run's
    // batches, so the 90th percentile is far above a healthy broker's few milliseconds. A
    // generator timing from the actual send would report one slow request and a low p90.
    assert!(max >= 700.0, "max {max} ms");
    assert!(p90 >= 50.0, "p90 {p90} ms");
    // The in-flight window filled during the stall, so later batches left late: the send lag
    // says how much of the latency was spent inside spate-perf.
    let lag = summary(&json)["send_lag"]["max_ms"].as_f64().unwrap();
    assert!(lag >= 500.0, "send lag max {lag} ms");
    assert!(
        lag <= max,
        "send lag {lag} ms above the latency max {max} ms"
    );
}

#[test]
fn unreachable_broker_is_an_error_within_seconds() {
    let port = free_port();
    let out = run_perf(&["produce", "-b", &format!("127.0.0.1:{port}"), "-n", "10"]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("cannot connect"), "{}", out.stderr);
    assert!(out.elapsed < Duration::from_secs(10));
}

#[test]
fn bad_arguments_get_a_message_and_a_failure_code() {
    let out = run_perf(&["produce", "--record-size", "0"]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("--record-size"), "{}", out.stderr);
    let out = run_perf(&["produce", "--acks", "0"]);
    assert_eq!(out.code, Some(2)); // clap's usage error
    assert!(out.stderr.contains("nothing to time"), "{}", out.stderr);
}
