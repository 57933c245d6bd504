//! KafkaJS, a pure-JavaScript Kafka client, against the real broker (tests/js/roundtrip.js).
//! scripts/test.sh installs node and the pinned kafkajs (tests/js/package-lock.json).

mod common;

use std::path::Path;
use std::process::Command;

use common::{assert_success, Broker};

#[test]
fn kafkajs_admin_idempotent_producer_and_group_consumer() {
    let broker = Broker::start();
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    assert!(
        js.join("node_modules/kafkajs").is_dir(),
        "kafkajs is not installed: run `npm ci --prefix tests/js` (scripts/test.sh does)"
    );
    let out = Command::new("node")
        .arg(js.join("roundtrip.js"))
        .args([&broker.addr(), "js-roundtrip", "6000"])
        .env("KAFKAJS_NO_PARTITIONER_WARNING", "1")
        .output()
        .expect("run node");
    assert_success("tests/js/roundtrip.js", &out);
}
