//! Logs: JSON or text on stderr, a startup banner, and a bad filter refused at start.

mod common;

use common::Broker;

#[test]
fn json_logs_parse_and_start_with_the_banner() {
    let mut broker = Broker::start_with(&["--log-format", "json", "--flush", "interval"]);
    let status = broker.terminate();
    assert!(status.success(), "SIGTERM exits 0: {status}");
    let log = broker.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let banner = lines
        .iter()
        .find(|v| v["fields"]["message"] == "starting spate")
        .unwrap_or_else(|| panic!("no banner in:\n{log}"));
    let f = &banner["fields"];
    assert_eq!(f["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(f["listen"], broker.addr());
    assert_eq!(f["cores"], 2);
    assert_eq!(
        f["flush"].as_str().map(|s| s.starts_with("Interval")),
        Some(true),
        "{f}"
    );
    assert_eq!(
        f["data_dir"].as_str(),
        Some(broker.data_dir().to_str().unwrap())
    );
    assert!(
        lines
            .iter()
            .any(|v| v["fields"]["message"] == "stopped cleanly"),
        "clean stop logged:\n{log}"
    );
}

#[test]
fn a_bad_log_filter_names_the_flag_and_fails() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spate"))
        .args(["--log-level", "nonsense=[", "check"])
        .output()
        .expect("run spate");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--log-level"), "{err}");
}
