//! A data directory written by `spate` before the cluster wiring (tests/fixtures/
//! upgrade-main-13f6d1d, see its README) opens unchanged: without `--seeds` the broker serves
//! its records and writes no cluster files; with `--seeds` a cluster node refuses it (it would
//! not serve its single-node topics) and writes nothing.

mod common;

use std::path::Path;
use std::process::Command;

use common::Broker;

const FIXTURE: &str = "tests/fixtures/upgrade-main-13f6d1d/data";

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

fn read_back(b: &Broker) -> Vec<String> {
    let out = Command::new("kcat")
        .args([
            "-C",
            "-b",
            &b.addr(),
            "-t",
            "upgrade",
            "-e",
            "-q",
            "-f",
            "%k=%s\\n",
        ])
        .output()
        .expect("run kcat");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn expected() -> Vec<String> {
    (1..=5).map(|i| format!("k=upgrade-{i}")).collect()
}

/// The broker under test gets the fixture as its data dir before it starts.
fn start_on_fixture(args: &[&str]) -> Broker {
    let mut b = Broker::start_with(args);
    b.kill();
    let data = b.data_dir();
    std::fs::remove_dir_all(&data).unwrap();
    copy_dir(Path::new(FIXTURE), &data);
    b.spawn();
    b
}

#[test]
fn a_data_dir_from_before_the_cluster_opens_unchanged() {
    let mut b = start_on_fixture(&[]);
    assert_eq!(read_back(&b), expected());
    b.terminate();
    let data = b.data_dir();
    assert!(
        !data.join("node.identity").exists(),
        "single node wrote an identity"
    );
    assert!(!data.join("__cluster_metadata").exists());
}

#[test]
fn a_data_dir_from_before_the_cluster_is_refused_by_a_cluster_node_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    copy_dir(Path::new(FIXTURE), &data);
    let before = std::fs::read(data.join("spate-metadata.json")).ok();
    let rpc = common::free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_spate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
        ])
        .args(["--seeds", &format!("0@127.0.0.1:{rpc}")])
        .args(["--rpc-listen", &format!("127.0.0.1:{rpc}")])
        .arg("--data-dir")
        .arg(&data)
        .output()
        .expect("run spate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a cluster node started: {stderr}");
    assert!(
        stderr.contains("holds 1 topics of a single-node broker (upgrade)")
            && stderr.contains("without --seeds"),
        "{stderr}"
    );
    assert!(
        !data.join("node.identity").exists(),
        "refused, yet wrote an identity"
    );
    assert!(!data.join("__cluster_metadata").exists());
    assert_eq!(std::fs::read(data.join("spate-metadata.json")).ok(), before);
    // And it still opens unchanged without --seeds.
    let mut b = start_on_fixture(&[]);
    assert_eq!(read_back(&b), expected());
    b.terminate();
}
