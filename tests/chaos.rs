//! The fault harness in tests/chaos/ (Python): the checker's own tests (every anomaly kind
//! planted in a synthetic history is flagged, a clean history passes), the namespace toolkit on
//! the real kernel, and a bounded single-node run of the release `spate` under SIGKILL and
//! SIGSTOP faults with real confluent-kafka clients, which must find no anomaly.
//! `SPATE_CHAOS_SEED` replays a run's fault schedule; a failing run keeps its directory
//! (history.jsonl, summary.json, timeline.svg, node logs) and prints where it is.

use std::path::Path;
use std::process::{Command, Output};

/// Seconds during which faults start in the bounded run; with kill and pause faults (a pause
/// is 6.5-7.5 s, a gap 1-2.5 s) the schedule holds at least `MIN_FAULTS`.
const SINGLE_NODE_RUN_SECONDS: u32 = 60;
const MIN_FAULTS: u32 = 6;

fn chaos_python(args: &[&str]) -> Output {
    Command::new("python3")
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests"))
        .args(args)
        .env("SPATE_BIN", env!("CARGO_BIN_EXE_spate"))
        .output()
        .expect("run python3")
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
fn checker_flags_every_planted_anomaly_and_passes_a_clean_history() {
    let out = chaos_python(&["-m", "unittest", "-v", "chaos.test_checker"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn namespace_toolkit_cuts_slows_and_heals_links() {
    // Skips itself (and says why) where namespaces are unavailable; CI runs as root.
    let out = chaos_python(&["-m", "unittest", "-v", "chaos.test_netns"]);
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn single_node_under_kill_and_pause_has_no_anomalies() {
    let dir = tempfile::Builder::new()
        .prefix("spate-chaos-")
        .tempdir()
        .expect("tempdir");
    let out_dir = dir.path().to_str().expect("utf-8 path").to_string();
    let duration = SINGLE_NODE_RUN_SECONDS.to_string();
    let min_faults = MIN_FAULTS.to_string();
    let mut args = vec![
        "-m",
        "chaos.run",
        "--binary",
        env!("CARGO_BIN_EXE_spate"),
        "--nodes",
        "1",
        "--nemesis",
        "kill,pause",
        "--duration",
        &duration,
        "--min-faults",
        &min_faults,
        "--out",
        &out_dir,
    ];
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
