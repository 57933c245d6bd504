//! Hostile and broken input: each bad connection is closed (or answered with an error) and the
//! broker keeps serving everyone else.

mod common;

use bytes::Buf;
use kafka_protocol::messages::{ApiVersionsRequest, ApiVersionsResponse, MetadataRequest};
use kafka_protocol::protocol::Decodable;

use common::{Broker, Raw};

fn still_serves(broker: &Broker) {
    let mut raw = Raw::connect(&broker.addr());
    let resp: ApiVersionsResponse = raw.call(3, &ApiVersionsRequest::default());
    assert_eq!(resp.error_code, 0);
    assert!(resp
        .api_keys
        .iter()
        .any(|k| k.api_key == 0 && k.min_version == 3));
}

#[test]
fn malformed_frames_close_only_their_connection() {
    let broker = Broker::start_with(&[
        "--max-frame-bytes",
        "1048576",
        "--max-batch-bytes",
        "524288",
    ]);
    let addr = broker.addr();

    // Oversized length: closed before anything is allocated.
    let mut raw = Raw::connect(&addr);
    raw.send_raw(&0x7fff_ffffu32.to_be_bytes()).unwrap();
    assert!(raw.is_closed());
    // Negative length.
    let mut raw = Raw::connect(&addr);
    raw.send_raw(&(-5i32).to_be_bytes()).unwrap();
    assert!(raw.is_closed());
    // Garbage API key.
    let mut raw = Raw::connect(&addr);
    raw.send_raw(&[0, 0, 0, 10, 0x03, 0xe7, 0, 0, 0, 0, 0, 1, 0, 0])
        .unwrap();
    assert!(raw.is_closed());
    // A Metadata request whose body is garbage: an error, the connection closes.
    let mut raw = Raw::connect(&addr);
    let mut frame = vec![0, 3, 0, 9, 0, 0, 0, 1, 0, 0];
    frame.extend_from_slice(&[0xff; 40]);
    let mut framed = (frame.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&frame);
    raw.send_raw(&framed).unwrap();
    assert!(raw.is_closed());
    // Truncated frame, then the client goes away.
    let mut raw = Raw::connect(&addr);
    raw.send_raw(&[0, 0, 1, 0, 0, 18, 0, 3]).unwrap();
    drop(raw);
    // A huge array count inside an otherwise small request.
    let mut raw = Raw::connect(&addr);
    let mut frame = vec![0, 3, 0, 4, 0, 0, 0, 1, 0, 0];
    frame.extend_from_slice(&0x7fff_fff0i32.to_be_bytes());
    let mut framed = (frame.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&frame);
    raw.send_raw(&framed).unwrap();
    assert!(raw.is_closed());

    still_serves(&broker);
    let mut raw = Raw::connect(&addr);
    let mut req = MetadataRequest::default();
    req.topics = None;
    let _ = raw.call(9, &req);
}

#[test]
fn unsupported_versions_get_error_35() {
    let broker = Broker::start();
    // ApiVersions v99: error 35 in the v0 layout with a v0 header.
    let mut raw = Raw::connect(&broker.addr());
    raw.send_raw(&[0, 0, 0, 11, 0, 18, 0, 99, 0, 0, 0, 5, 0, 0, 0])
        .unwrap();
    let frame = raw.read_frame().expect("a response");
    let mut b = bytes::Bytes::from(frame);
    assert_eq!(b.get_i32(), 5, "correlation id");
    let resp = ApiVersionsResponse::decode(&mut b, 0).unwrap();
    assert_eq!(resp.error_code, 35);
    assert!(!resp.api_keys.is_empty());

    // Produce v2 (advertised for librdkafka's sake, not served): UNSUPPORTED_VERSION.
    let mut body = vec![0, 0x12, 0, 2, 0, 0, 0, 6, 0, 0]; // key 0, v2, corr 6, no client id
    body[0] = 0;
    body[1] = 0;
    body.extend_from_slice(&1i16.to_be_bytes()); // acks
    body.extend_from_slice(&1000i32.to_be_bytes()); // timeout
    body.extend_from_slice(&1i32.to_be_bytes()); // 1 topic
    body.extend_from_slice(&1i16.to_be_bytes());
    body.push(b't');
    body.extend_from_slice(&1i32.to_be_bytes()); // 1 partition
    body.extend_from_slice(&0i32.to_be_bytes());
    body.extend_from_slice(&0i32.to_be_bytes()); // empty message set
    let mut framed = (body.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&body);
    raw.send_raw(&framed).unwrap();
    let frame = raw.read_frame().expect("a produce response");
    let mut b = bytes::Bytes::from(frame);
    assert_eq!(b.get_i32(), 6);
    assert_eq!(b.get_i32(), 1, "one topic");
    let n = b.get_i16() as usize;
    b.advance(n);
    assert_eq!(b.get_i32(), 1, "one partition");
    assert_eq!(b.get_i32(), 0);
    assert_eq!(b.get_i16(), 35);
    still_serves(&broker);
}
