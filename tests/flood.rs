//! Hostile connections: a flood of large frames stays within the request memory budget while
//! small requests still get answers; idle and slow connections are closed; the per-address
//! limit; memory of closed connections is given back.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Broker, Raw};

const FLOOD_CONNECTIONS: usize = 50;
const FLOOD_FRAME_BYTES: usize = 52_000_000;
/// How long the flooders keep sending before they give up and close.
const FLOOD_SEND_TIMEOUT: Duration = Duration::from_secs(25);
/// Bytes of each frame held back until the flooders are released.
const FLOOD_TAIL_BYTES: usize = 1024;
/// No byte accepted by the broker for this long: it stopped reading (backpressure).
const FLOOD_STALL: Duration = Duration::from_millis(1500);
const RSS_LIMIT_BYTES: u64 = 1 << 30;
const RSS_RETURN_SLACK_BYTES: u64 = 256 << 20;
const RSS_RETURN_TIMEOUT: Duration = Duration::from_secs(5);

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS value");
    kib * 1024
}

/// ApiVersions v0 on a fresh connection, answered within `timeout`.
fn api_versions_answers(addr: &str, timeout: Duration) -> bool {
    let Ok(s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let mut raw = Raw { stream: s };
    raw.send_raw(&[0, 0, 0, 10, 0, 18, 0, 0, 0, 0, 0, 1, 0, 0])
        .is_ok()
        && raw.read_frame().is_some()
}

/// A Produce v3 request header announcing a frame of `frame_bytes`; the body follows.
fn produce_header(frame_bytes: usize) -> Vec<u8> {
    let mut h = (frame_bytes as i32).to_be_bytes().to_vec();
    h.extend_from_slice(&0i16.to_be_bytes()); // Produce
    h.extend_from_slice(&3i16.to_be_bytes());
    h.extend_from_slice(&1i32.to_be_bytes()); // correlation id
    h.extend_from_slice(&(-1i16).to_be_bytes()); // null client id
    h
}

/// Polls RSS until it is at most `limit` or `timeout` passes; the last reading.
fn rss_settles_below(pid: u32, limit: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let rss = rss_bytes(pid);
        if rss <= limit || Instant::now() > deadline {
            return rss;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_flood_of_large_frames_stays_within_memory_and_small_requests_still_answer() {
    let broker = Broker::start();
    let pid = broker.pid();
    let start_rss = rss_bytes(pid);
    // Each flooder sends all of its frame but the tail and holds it until every flooder has
    // (or the broker stopped reading: no progress for a while), so frames wait in memory at
    // once, as slow clients' frames do; then all finish.
    let sent = Arc::new(AtomicUsize::new(0));
    let holding = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..FLOOD_CONNECTIONS)
        .map(|_| {
            let addr = broker.addr();
            let (sent, holding, release) = (sent.clone(), holding.clone(), release.clone());
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(&addr).expect("connect");
                s.set_write_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let header = produce_header(FLOOD_FRAME_BYTES);
                let _ = s.write_all(&header);
                let chunk = vec![0u8; 64 * 1024];
                let mut left = FLOOD_FRAME_BYTES - (header.len() - 4);
                let deadline = Instant::now() + FLOOD_SEND_TIMEOUT;
                let mut held = false;
                while left > 0 && Instant::now() < deadline {
                    if left <= FLOOD_TAIL_BYTES && !release.load(Ordering::Acquire) {
                        if !held {
                            held = true;
                            holding.fetch_add(1, Ordering::AcqRel);
                        }
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    let n = (left
                        - if release.load(Ordering::Acquire) {
                            0
                        } else {
                            FLOOD_TAIL_BYTES
                        })
                    .clamp(1, chunk.len());
                    match s.write(&chunk[..n]) {
                        Ok(w) => {
                            left -= w;
                            sent.fetch_add(w, Ordering::AcqRel);
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => break,
                    }
                }
                left
            })
        })
        .collect();
    let mut peak = 0u64;
    let mut answered = 0;
    let mut next_probe = Instant::now() + Duration::from_millis(500);
    let (mut last_sent, mut last_progress) = (0, Instant::now());
    while senders.iter().any(|t| !t.is_finished()) {
        peak = peak.max(rss_bytes(pid));
        if Instant::now() >= next_probe {
            assert!(
                api_versions_answers(&broker.addr(), Duration::from_secs(5)),
                "ApiVersions on a fresh connection is answered during the flood (rss {peak})"
            );
            answered += 1;
            next_probe = Instant::now() + Duration::from_millis(500);
        }
        let now_sent = sent.load(Ordering::Acquire);
        if now_sent != last_sent {
            (last_sent, last_progress) = (now_sent, Instant::now());
        }
        if holding.load(Ordering::Acquire) == FLOOD_CONNECTIONS
            || last_progress.elapsed() > FLOOD_STALL
        {
            release.store(true, Ordering::Release);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let unsent: usize = senders.into_iter().map(|t| t.join().unwrap()).sum();
    peak = peak.max(rss_bytes(pid));
    eprintln!(
        "flood: start rss {start_rss}, peak {peak}, {answered} ApiVersions answered, \
         {unsent} bytes unsent"
    );
    assert!(answered > 0, "the flood ended before a probe");
    assert!(
        peak < RSS_LIMIT_BYTES,
        "RSS peaked at {peak} bytes during the flood"
    );
    // Every flooder closed its connection when its thread ended.
    let settled = rss_settles_below(pid, start_rss + RSS_RETURN_SLACK_BYTES, RSS_RETURN_TIMEOUT);
    assert!(
        settled <= start_rss + RSS_RETURN_SLACK_BYTES,
        "RSS {settled} five seconds after the flood closed, from {start_rss}"
    );
    assert!(api_versions_answers(&broker.addr(), Duration::from_secs(5)));
}

#[test]
fn an_idle_connection_is_closed() {
    let broker = Broker::start_with(&["--connections-max-idle-ms", "300"]);
    let mut raw = Raw::connect(&broker.addr());
    raw.send_raw(&[0, 0, 0, 10, 0, 18, 0, 0, 0, 0, 0, 1, 0, 0])
        .unwrap();
    assert!(raw.read_frame().is_some(), "answered while active");
    let since = Instant::now();
    assert!(raw.is_closed(), "an idle connection is closed");
    assert!(
        since.elapsed() >= Duration::from_millis(250),
        "not before it is idle"
    );
    let log = broker.log();
    assert!(log.contains("closing idle connection"), "{log}");
}

#[test]
fn a_request_that_does_not_arrive_in_time_closes_its_connection() {
    let broker = Broker::start_with(&["--request-read-timeout-ms", "300"]);
    // A small frame and a large one (read into a buffer of its own), each left incomplete.
    for (announced, sent) in [(100usize, 10usize), (1 << 20, 100 << 10)] {
        let mut raw = Raw::connect(&broker.addr());
        let mut bytes = produce_header(announced);
        bytes.resize(4 + sent, 0);
        raw.send_raw(&bytes).unwrap();
        let since = Instant::now();
        assert!(raw.is_closed(), "a stalled {announced}-byte request closes");
        assert!(since.elapsed() < Duration::from_secs(10));
    }
    // A connection that sends nothing is idle, not late: it stays open.
    let mut raw = Raw::connect(&broker.addr());
    raw.stream
        .set_read_timeout(Some(Duration::from_millis(900)))
        .unwrap();
    assert!(
        !raw.is_closed(),
        "an idle connection is not timed out as a request"
    );
    let log = broker.log();
    assert!(log.contains("request_read_timeout_ms"), "{log}");
}

#[test]
fn connections_over_the_limit_per_address_are_closed() {
    let broker = Broker::start_with(&["--max-connections-per-ip", "2"]);
    // The harness's readiness probe may hold a slot for a moment after it closed: poll.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (_a, _b) = loop {
        let (mut a, mut b) = (Raw::connect(&broker.addr()), Raw::connect(&broker.addr()));
        let ok = |r: &mut Raw| {
            r.send_raw(&[0, 0, 0, 10, 0, 18, 0, 0, 0, 0, 0, 1, 0, 0])
                .is_ok()
                && r.read_frame().is_some()
        };
        if ok(&mut a) && ok(&mut b) {
            break (a, b);
        }
        assert!(Instant::now() < deadline, "two connections never fit");
    };
    let mut c = Raw::connect(&broker.addr());
    assert!(
        c.is_closed(),
        "a third connection from the address is refused"
    );
    let log = broker.log();
    assert!(
        log.contains("connection limit per address reached"),
        "{log}"
    );
}

#[test]
fn memory_of_closed_connections_is_given_back() {
    const ROUNDS: usize = 6;
    const CONNECTIONS: usize = 500;
    const SLACK_BYTES: u64 = 32 << 20;
    let broker = Broker::start();
    let pid = broker.pid();
    let round = || {
        let conns: Vec<_> = (0..CONNECTIONS)
            .map(|_| {
                let mut s = TcpStream::connect(broker.addr()).expect("connect");
                // Half a request: the connection holds a receive buffer.
                s.write_all(&produce_header(1000)[..6]).unwrap();
                s
            })
            .collect();
        // Every connection was served before they close.
        assert!(api_versions_answers(
            &broker.addr(),
            Duration::from_secs(10)
        ));
        drop(conns);
    };
    round();
    let after_first = rss_settles_below(pid, 0, Duration::from_secs(3));
    for _ in 1..ROUNDS {
        round();
    }
    let settled = rss_settles_below(pid, after_first + SLACK_BYTES, Duration::from_secs(10));
    eprintln!("closed connections: rss after one round {after_first}, after {ROUNDS}: {settled}");
    assert!(
        settled <= after_first + SLACK_BYTES,
        "RSS {settled} after {ROUNDS} rounds of {CONNECTIONS} connections, {after_first} after one"
    );
}
