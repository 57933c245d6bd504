//! The fault harness in tests/chaos/ (Python): the checker's own tests (every anomaly kind
//! planted in a synthetic history is flagged, a clean history passes), the namespace toolkit on
//! the real kernel, and bounded runs of the release `spate` with real confluent-kafka clients,
//! which must find no anomaly: a single node under SIGKILL and SIGSTOP, and a three-node
//! cluster under the mixed nemesis (leader and random kills, pauses, restarts, slow links and,
//! in namespaces, cuts), and a four-node cluster whose partitions move while nodes are killed.
//! `SPATE_CHAOS_SEED` replays a run's fault schedule; a failing run keeps its directory
//! (history.jsonl, summary.json, timeline.svg, node logs) and prints where it is.

use std::path::Path;
use std::process::{Command, Output};

/// Seconds during which faults start in the bounded run; with kill and pause faults (a pause
/// is 6.5-7.5 s, a gap 1-2.5 s) the schedule holds at least `MIN_FAULTS`.
const SINGLE_NODE_RUN_SECONDS: u32 = 60;
const MIN_FAULTS: u32 = 6;
/// Seconds during which faults start in the bounded three-node run (mixed faults: kills of the
/// leader and of random nodes, pauses, restarts, slow links, and with namespaces cuts): about
/// two minutes, as the harness's issue asks of every change; a fault lasts up to ~8 s and a
/// gap 1-2.5 s, so the schedule holds at least `CLUSTER_MIN_FAULTS`.
const CLUSTER_RUN_SECONDS: u32 = 120;
const CLUSTER_MIN_FAULTS: u32 = 10;
/// The four-node move run: a move is planned at 6 s and a gap is 1-2.5 s, so 40 s hold at
/// least four faults.
const MOVE_RUN_SECONDS: u32 = 40;
const MOVE_MIN_FAULTS: u32 = 4;

/// Seconds past its duration after which the planted-loss run's watchdog ends it as hung
/// (every phase after the faults is bounded well below this; see tests/chaos/run.py).
const PLANTED_RUN_WATCHDOG_SLACK_S: &str = "240";

fn chaos_python(args: &[&str]) -> Output {
    chaos_python_env(args, &[])
}

fn chaos_python_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new("python3")
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests"))
        .args(args)
        .env("SPATE_BIN", env!("CARGO_BIN_EXE_spate"))
        .envs(env.iter().copied())
        .output()
        .expect("run python3")
}

/// The harness's watchdog fired: a client call never returned (its stacks are on stderr).
fn watchdog_fired(out: &Output) -> bool {
    String::from_utf8_lossy(&out.stderr).contains("Thread 0x")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn checker_flags_every_planted_anomaly_and_schedules_replay_from_their_seed() {
    let out = chaos_python(&[
        "-m",
        "unittest",
        "-v",
        "chaos.test_checker",
        "chaos.test_nemesis",
    ]);
    assert!(out.status.success(), "{}", text(&out));
}

/// The whole pipeline on a real broker can fail: a planted fault that must lose acknowledged
/// writes (the node's data dir deleted while it is down: one node has no replica to repair
/// from) makes the run fail with lost writes.
#[test]
fn a_run_with_a_planted_data_loss_fails_with_lost_writes() {
    let run = || {
        let dir = tempfile::tempdir().expect("tempdir");
        let out_dir = dir.path().to_str().expect("utf-8 path").to_string();
        chaos_python_env(
            &[
                "-m",
                "chaos.run",
                "--binary",
                env!("CARGO_BIN_EXE_spate"),
                "--nemesis",
                "kill_wipe",
                "--duration",
                "5",
                "--seed",
                "3",
                "--out",
                &out_dir,
            ],
            &[("SPATE_CHAOS_WATCHDOG_SLACK_S", PLANTED_RUN_WATCHDOG_SLACK_S)],
        )
    };
    let mut out = run();
    if watchdog_fired(&out) {
        // A hang of the harness is not what this test judges: show where it hung, then judge
        // one more run. (Runs hung under load until the history stopped writing under a lock
        // that a producer thread could leave held: see tests/chaos/history.py.)
        eprintln!("first run hung; its stacks:\n{}", text(&out));
        out = run();
    }
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ANOMALIES: lost "), "{}", text(&out));
}

#[test]
fn namespace_toolkit_cuts_slows_and_heals_links() {
    // Skips itself (and says why) where namespaces are unavailable; CI runs as root.
    let out = chaos_python(&["-m", "unittest", "-v", "chaos.test_netns"]);
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{}", text(&out));
}

/// A three-node cluster (each node in its own network namespace when run as root, as CI is)
/// under the seeded mixed nemesis, with idempotent producers and a reader: every acknowledged
/// write read back once at its offset, and consumer groups committing through coordinators
/// that move with their `__consumer_offsets` partitions' leaders: no anomaly (a commit lost
/// with a node would be flagged as commit_backwards).
///
/// Seed 1030119476 once failed here with 6,676 acknowledged values "lost": the final reader
/// asked for watermarks 0.1 s after the last partition healed, gave up on two partitions still
/// electing, and a restarted leader could answer a high watermark of 0 before its epoch
/// committed. The reader now asks again until a deadline, and a leader serves reads only once
/// its epoch has committed (`PartitionGroup::is_ready_leader`).
#[test]
fn three_node_cluster_under_mixed_faults_has_no_anomalies() {
    judged_run(&[
        "--nodes",
        "3",
        "--nemesis",
        "mixed",
        "--network",
        "auto",
        "--duration",
        &CLUSTER_RUN_SECONDS.to_string(),
        "--min-faults",
        &CLUSTER_MIN_FAULTS.to_string(),
    ]);
}

/// Four nodes, replication factor 3: partitions moved onto other replica sets by kafka-python's
/// AlterPartitionReassignments while a node of the old or the new set is SIGKILLed in the
/// middle of the move (the fault mix where Jepsen found Redpanda losing messages), and plain
/// kills. The run fails if no move finished (a harness that asks and is always refused tests
/// nothing).
#[test]
fn four_node_cluster_under_replica_moves_and_kills_has_no_anomalies() {
    judged_run(&[
        "--nodes",
        "4",
        "--nemesis",
        "move,move_kill,kill",
        "--network",
        "auto",
        "--duration",
        &MOVE_RUN_SECONDS.to_string(),
        "--min-faults",
        &MOVE_MIN_FAULTS.to_string(),
    ]);
}

#[test]
fn single_node_under_kill_and_pause_has_no_anomalies() {
    judged_run(&[
        "--nodes",
        "1",
        "--nemesis",
        "kill,pause",
        "--duration",
        &SINGLE_NODE_RUN_SECONDS.to_string(),
        "--min-faults",
        &MIN_FAULTS.to_string(),
    ]);
}

/// One bounded run of the harness with `extra` arguments, which must find no anomaly;
/// `SPATE_CHAOS_SEED` replays a schedule. A failed run keeps its directory.
fn judged_run(extra: &[&str]) {
    let dir = tempfile::Builder::new()
        .prefix("spate-chaos-")
        .tempdir()
        .expect("tempdir");
    let out_dir = dir.path().to_str().expect("utf-8 path").to_string();
    let mut args = vec![
        "-m",
        "chaos.run",
        "--binary",
        env!("CARGO_BIN_EXE_spate"),
        "--out",
        &out_dir,
    ];
    args.extend_from_slice(extra);
    let seed = std::env::var("SPATE_CHAOS_SEED").ok();
    if let Some(seed) = seed.as_deref() {
        args.extend(["--seed", seed]);
    }
    let out = chaos_python(&args);
    if !out.status.success() {
        let kept = dir.keep();
        panic!(
            "chaos run failed; its history, summary and node logs are in {}\n{}",
            kept.display(),
            text(&out)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(stdout.contains("anomalies: none"), "{}", text(&out));
}
