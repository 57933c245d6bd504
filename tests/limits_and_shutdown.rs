//! Connection limits, and a SIGTERM that lets an in-flight long poll finish before exiting 0.

mod common;

use std::time::{Duration, Instant};

use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use common::{Broker, Raw};

fn api_versions_ok(raw: &mut Raw) -> bool {
    let resp: ApiVersionsResponse = raw.call(3, &ApiVersionsRequest::default());
    resp.error_code == 0
}

/// Sends ApiVersions v0; false if the broker closed the connection instead of answering.
fn answers(raw: &mut Raw) -> bool {
    raw.send_raw(&[0, 0, 0, 10, 0, 18, 0, 0, 0, 0, 0, 1, 0, 0])
        .is_ok()
        && raw.read_frame().is_some()
}

#[test]
fn connections_over_the_limit_are_closed() {
    let broker = Broker::start_with(&["--max-connections", "2"]);
    // The harness's readiness probe may hold a slot for a moment after it closed: poll.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut a, b) = loop {
        let (mut a, mut b) = (Raw::connect(&broker.addr()), Raw::connect(&broker.addr()));
        if answers(&mut a) && answers(&mut b) {
            break (a, b);
        }
        assert!(
            Instant::now() < deadline,
            "two connections never fit the limit"
        );
    };
    let mut c = Raw::connect(&broker.addr());
    assert!(c.is_closed(), "a third connection is refused");
    assert!(api_versions_ok(&mut a), "the first two keep working");
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !answers(&mut Raw::connect(&broker.addr())) {
        assert!(Instant::now() < deadline, "the freed slot is never reused");
    }
    assert!(api_versions_ok(&mut a));
}

#[test]
fn sigterm_finishes_an_in_flight_long_poll_then_exits_0() {
    let mut broker = Broker::start();
    let mut raw = Raw::connect(&broker.addr());
    let mut md = MetadataRequest::default();
    let mut t = metadata_request::MetadataRequestTopic::default();
    t.name = Some(TopicName(StrBytes::from_static_str("sd")));
    md.topics = Some(vec![t]);
    md.allow_auto_topic_creation = true;
    assert_eq!(raw.call(9, &md).topics[0].error_code, 0);

    let addr = broker.addr();
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let poller = std::thread::spawn(move || {
        let mut raw = Raw::connect(&addr);
        let mut p = FetchPartition::default();
        p.partition_max_bytes = 1 << 20;
        let mut t = FetchTopic::default();
        t.topic = TopicName(StrBytes::from_static_str("sd"));
        t.partitions = vec![p];
        let mut req = FetchRequest::default();
        req.replica_id = BrokerId(-1);
        req.max_wait_ms = 25_000;
        req.min_bytes = 1;
        req.max_bytes = 1 << 20;
        req.topics = vec![t];
        sent_tx.send(()).unwrap();
        let start = Instant::now();
        let resp: FetchResponse = raw.call(11, &req);
        (resp.responses[0].partitions[0].error_code, start.elapsed())
    });
    sent_rx.recv().unwrap();
    // Make it likely the fetch is parked in its long poll when the signal lands (either way
    // it must be answered).
    let mut probe = Raw::connect(&broker.addr());
    assert!(api_versions_ok(&mut probe));
    let status = broker.terminate();
    assert!(status.success(), "exit status {status}");
    let (code, elapsed) = poller.join().expect("the in-flight fetch got its response");
    assert_eq!(code, 0);
    assert!(
        elapsed < Duration::from_secs(20),
        "shutdown cut the poll short ({elapsed:?})"
    );
}
