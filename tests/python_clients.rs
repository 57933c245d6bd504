//! Real Python clients against the real broker.

mod common;

use common::{assert_success, python, Broker};

#[test]
fn confluent_kafka_idempotent_every_codec_and_admin() {
    let broker = Broker::start();
    let out = python("confluent_roundtrip.py", &[&broker.addr(), "3000"]);
    assert_success("confluent_roundtrip.py", &out);
}

#[test]
fn kafka_python_produces_and_consumes() {
    let broker = Broker::start();
    let out = python("kafka_python_roundtrip.py", &[&broker.addr(), "kp", "3000"]);
    assert_success("kafka_python_roundtrip.py", &out);
}
