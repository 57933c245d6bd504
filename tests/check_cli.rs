//! `spate check` run as an operator would: a usable data dir passes, an unusable one fails with
//! the fix to apply, and `--json` is machine-readable.

use std::process::Command;

fn check(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_spate"))
        .arg("check")
        .args(args)
        .output()
        .expect("run spate check")
}

#[test]
fn a_usable_data_dir_passes_and_an_unusable_one_fails_with_a_fix() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = check(&["--data-dir", data.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("OK    io_uring"), "{text}");
    assert!(text.contains("OK    direct_io"), "{text}");
    assert!(text.contains("the machine can run spate"), "{text}");

    // procfs takes no new files: the direct I/O probe must fail and say what to change.
    let out = check(&["--data-dir", "/proc/spate-data", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(v["ok"], false);
    let direct = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "direct_io")
        .expect("direct_io check");
    assert_eq!(direct["status"], "fail");
    assert!(direct["fix"]
        .as_str()
        .is_some_and(|f| f.contains("filesystem")));
}
