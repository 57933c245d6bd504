//! The listen port: one broker per port, and port 0 resolved once for every shard.

mod common;

use std::process::Command;

#[test]
fn a_second_broker_on_a_taken_port_fails_with_a_clear_message() {
    let first = common::Broker::start();
    let dir = tempfile::tempdir().unwrap();
    // Bounded: were the port shared (SO_REUSEPORT), the second broker would serve instead.
    let out = Command::new("timeout")
        .args(["20", env!("CARGO_BIN_EXE_spate"), "serve", "--cores", "2"])
        .args(["--listen", &first.addr(), "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("run spate");
    assert_eq!(
        out.status.code(),
        Some(1),
        "second broker must refuse the port"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen on"), "{err}");
    // The first one still serves.
    common::Raw::connect(&first.addr());
}

#[test]
fn port_zero_gives_every_shard_the_same_port() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_spate"))
        .args(["--log-format", "json", "serve", "--cores", "2"])
        .args(["--metrics-listen", "off"])
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn spate");
    let stderr = child.stderr.take().unwrap();
    let mut ports = Vec::new();
    let mut banner_port = None;
    use std::io::BufRead;
    for line in std::io::BufReader::new(stderr).lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        let f = &v["fields"];
        if f["message"] == "shard listening" {
            let addr: std::net::SocketAddr = f["addr"].as_str().unwrap().parse().unwrap();
            ports.push(addr.port());
        }
        if f["message"] == "starting spate" {
            banner_port = f["advertised"].as_str().map(str::to_string);
        }
        if ports.len() == 2 {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(ports.len(), 2);
    assert_ne!(ports[0], 0);
    assert_eq!(ports[0], ports[1], "both shards on one port");
    assert!(banner_port.is_some());
}
