//! Connections are spread over the shards by count: SO_REUSEPORT alone hashes the peer's
//! address and can put every connection of a client on one shard (it did, in e2e benchmarks).
//! Each shard's `spate_connections` gauge must end within one of the others, and connections
//! handed to another shard must be served (a request on each is answered).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use kafka_protocol::messages::{ApiVersionsRequest, ApiVersionsResponse};

use common::{Broker, Raw};

/// Enough that an even split by chance is unlikely (about 1 in 10 for 64 hashed connections).
const CONNECTIONS: usize = 64;
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

/// `spate_connections` per shard, from the metrics endpoint.
fn connections_per_shard(port: u16) -> Vec<(String, f64)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.lines()
        .filter_map(|l| l.strip_prefix("spate_connections{shard=\""))
        .filter_map(|rest| {
            let (shard, value) = rest.split_once("\"} ")?;
            Some((shard.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

#[test]
fn connections_are_spread_evenly_over_shards() {
    let broker = Broker::start();
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut raw = Raw::connect(&broker.addr());
        // Answered: the connection is served, wherever it was handed.
        let resp: ApiVersionsResponse = raw.call(3, &ApiVersionsRequest::default());
        assert_eq!(resp.error_code, 0);
        conns.push(raw);
    }
    // The harness's own start-up probe connection may still be counted for a moment.
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let per_shard = loop {
        let per_shard = connections_per_shard(broker.metrics_port);
        let total: f64 = per_shard.iter().map(|(_, v)| v).sum();
        if total == CONNECTIONS as f64 {
            break per_shard;
        }
        assert!(
            Instant::now() < deadline,
            "connections never settled at {CONNECTIONS}: {per_shard:?}"
        );
        std::thread::sleep(POLL);
    };
    assert_eq!(per_shard.len(), 2, "two shards: {per_shard:?}");
    let counts: Vec<f64> = per_shard.iter().map(|(_, v)| *v).collect();
    assert!(
        (counts[0] - counts[1]).abs() <= 1.0,
        "unbalanced: {per_shard:?}"
    );
    // Every connection still works after the others arrived.
    for raw in &mut conns {
        let resp: ApiVersionsResponse = raw.call(3, &ApiVersionsRequest::default());
        assert_eq!(resp.error_code, 0);
    }
}
