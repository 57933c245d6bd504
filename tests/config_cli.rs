//! Configuration from the outside: `spate config defaults`, environment overrides, and bad
//! keys, values and flags refused at start with a message naming them.

mod common;

use std::process::Command;

fn spate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_spate"))
}

#[test]
fn defaults_are_printed_and_accepted_back() {
    let out = spate().args(["config", "defaults"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for key in [
        "listen = \"127.0.0.1:9092\"",
        "flush = \"always\"",
        "segment-bytes = ",
    ] {
        assert!(text.contains(key), "{key} in:\n{text}");
    }
    assert!(text.contains("# env: SPATE_FLUSH"));
    // The printed file starts a broker as it is (port and dir overridden by flags).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spate.toml");
    std::fs::write(&path, &text).unwrap();
    let mut b = common::Broker::start_with(&["--config", path.to_str().unwrap()]);
    assert!(b.terminate().success());
}

#[test]
fn environment_overrides_the_file_and_flags_override_both() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spate.toml");
    std::fs::write(&path, "flush = \"never\"\nnode-id = 5\n").unwrap();
    // SPATE_FLUSH beats the file; --node-id beats SPATE_NODE_ID.
    std::env::set_var("SPATE_FLUSH", "interval");
    std::env::set_var("SPATE_NODE_ID", "6");
    let mut b = common::Broker::start_with(&["--config", path.to_str().unwrap(), "--node-id", "7"]);
    std::env::remove_var("SPATE_FLUSH");
    std::env::remove_var("SPATE_NODE_ID");
    assert!(b.terminate().success());
    let log = b.log();
    let banner = log
        .lines()
        .find(|l| l.contains("starting spate"))
        .expect("banner");
    assert!(banner.contains("Interval"), "{banner}");
    assert!(
        banner.contains("node_id") && banner.contains('7'),
        "{banner}"
    );
}

fn serve_fails(args: &[&str], envs: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    // Bounded: were a bad setting ever accepted, the broker would serve instead of failing.
    let mut cmd = Command::new("timeout");
    cmd.args(["20", env!("CARGO_BIN_EXE_spate"), "serve"])
        .args(["--listen", "127.0.0.1:1", "--data-dir"])
        .arg(dir.path())
        .args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{args:?} {envs:?} must fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_keys_values_and_flags_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "colours = 3\n").unwrap();
    let err = serve_fails(&["--config", unknown.to_str().unwrap()], &[]);
    assert!(err.contains("colours"), "{err}");

    let bad_value = dir.path().join("bad.toml");
    std::fs::write(&bad_value, "cores = \"two\"\n").unwrap();
    let err = serve_fails(&["--config", bad_value.to_str().unwrap()], &[]);
    assert!(err.contains("cores"), "{err}");

    let err = serve_fails(&[], &[("SPATE_CORES", "abc")]);
    assert!(err.contains("--cores"), "{err}");

    let err = serve_fails(&["--flush", "sometimes"], &[]);
    assert!(
        err.contains("--flush") && err.contains("sometimes"),
        "{err}"
    );

    let err = serve_fails(
        &["--segment-bytes", "1000", "--max-batch-bytes", "4096"],
        &[],
    );
    assert!(err.contains("--segment-bytes"), "{err}");

    let err = serve_fails(&["--no-such-flag"], &[]);
    assert!(err.contains("--no-such-flag"), "{err}");
}

#[test]
fn the_binary_hands_jemalloc_its_options() {
    // jemalloc reads `malloc_conf` under the symbol its bundled build expects; a renamed symbol
    // would leave the default (huge allocations' pages returned to the kernel at every free)
    // without any error. `confirm_conf` makes jemalloc print what it applied.
    let out = spate()
        .arg("--help")
        .env("_RJEM_MALLOC_CONF", "confirm_conf:true")
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Set conf value: oversize_threshold:0"),
        "jemalloc's start-up report:\n{err}"
    );
}

/// The `Cpus_allowed_list` of a /proc status file (a thread that just ended has none).
fn cpus_allowed(status: impl AsRef<std::path::Path>) -> Option<String> {
    let status = std::fs::read_to_string(status).ok()?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    Some(list.trim().to_string())
}

/// The CPUs a thread of `pid` may run on, per thread name.
fn thread_cpus(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if let Some(list) = cpus_allowed(task.join("status")) {
            out.push((name.trim().to_string(), list));
        }
    }
    out
}

#[test]
fn a_cpuset_pins_the_shards_and_keeps_every_thread_on_it() {
    let err = serve_fails(&["--cpuset", "0-4000000000"], &[]);
    assert!(
        err.contains("--cpuset") && err.contains("past the largest"),
        "{err}"
    );
    let err = serve_fails(&["--cpuset", "0,,1"], &[]);
    assert!(err.contains("--cpuset"), "{err}");
    // A CPU this machine does not have: refused by the kernel, named in the error.
    let err = serve_fails(&["--cpuset", "1023"], &[]);
    assert!(err.contains("--cpuset") && err.contains("1023"), "{err}");

    // The last CPU the test may use: with the default (CPU 0 first), the shard would sit there
    // only by chance on a one-CPU machine, which the assertion on other threads still covers.
    let allowed = cpus_allowed("/proc/self/status").unwrap();
    let last: String = allowed
        .rsplit([',', '-'])
        .next()
        .unwrap()
        .trim()
        .to_string();
    let mut b = common::Broker::start_with(&["--cores", "2", "--cpuset", &last]);
    let threads = thread_cpus(b.pid());
    assert!(
        threads
            .iter()
            .any(|(name, _)| name.starts_with("spate-shard-1")),
        "{threads:?}"
    );
    for (name, cpus) in &threads {
        assert_eq!(
            cpus, &last,
            "thread {name} of a broker on --cpuset {last}: {threads:?}"
        );
    }
    assert!(b.terminate().success());
}
