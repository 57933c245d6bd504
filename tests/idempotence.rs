//! Idempotent producer state: duplicates, gaps and fenced epochs, before and after a restart;
//! producer ids stay unique across restarts.

mod common;

use bytes::Bytes;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use common::{record_batch, Broker, Raw};

fn init_pid(raw: &mut Raw) -> (i64, i16) {
    let mut req = InitProducerIdRequest::default();
    req.transactional_id = None;
    req.transaction_timeout_ms = 60_000;
    req.producer_id = ProducerId(-1);
    req.producer_epoch = -1;
    let resp = raw.call(4, &req);
    assert_eq!(resp.error_code, 0);
    (resp.producer_id.0, resp.producer_epoch)
}

fn produce(raw: &mut Raw, batch: Vec<u8>) -> (i16, i64) {
    let mut pd = PartitionProduceData::default();
    pd.index = 0;
    pd.records = Some(Bytes::from(batch));
    let mut td = TopicProduceData::default();
    td.name = TopicName(StrBytes::from_static_str("idem"));
    td.partition_data = vec![pd];
    let mut req = ProduceRequest::default();
    req.acks = -1;
    req.timeout_ms = 10_000;
    req.topic_data = vec![td];
    let resp = raw.call(8, &req);
    let p = &resp.responses[0].partition_responses[0];
    (p.error_code, p.base_offset)
}

fn create_topic(raw: &mut Raw) {
    let mut req = MetadataRequest::default();
    let mut t = metadata_request::MetadataRequestTopic::default();
    t.name = Some(TopicName(StrBytes::from_static_str("idem")));
    req.topics = Some(vec![t]);
    req.allow_auto_topic_creation = true;
    let resp = raw.call(9, &req);
    assert_eq!(resp.topics[0].error_code, 0);
}

#[test]
fn duplicates_gaps_and_epochs_survive_restart() {
    let mut broker = Broker::start();
    let mut raw = Raw::connect(&broker.addr());
    create_topic(&mut raw);
    let (pid, epoch) = init_pid(&mut raw);

    assert_eq!(produce(&mut raw, record_batch(pid, epoch, 0, 3)), (0, 0));
    assert_eq!(produce(&mut raw, record_batch(pid, epoch, 3, 2)), (0, 3));
    // A retry of the first batch: a duplicate, answered as success at its original offset.
    assert_eq!(produce(&mut raw, record_batch(pid, epoch, 0, 3)), (0, 0));
    // A gap.
    assert_eq!(produce(&mut raw, record_batch(pid, epoch, 9, 1)).0, 45);
    // A newer epoch fences the old one.
    assert_eq!(
        produce(&mut raw, record_batch(pid, epoch + 1, 0, 1)),
        (0, 5)
    );
    assert_eq!(produce(&mut raw, record_batch(pid, epoch, 5, 1)).0, 47);

    drop(raw);
    broker.kill();
    broker.spawn();
    let mut raw = Raw::connect(&broker.addr());
    assert_eq!(
        produce(&mut raw, record_batch(pid, epoch + 1, 0, 1)),
        (0, 5)
    );
    assert_eq!(produce(&mut raw, record_batch(pid, epoch, 5, 1)).0, 47);
    assert_eq!(
        produce(&mut raw, record_batch(pid, epoch + 1, 1, 1)),
        (0, 6)
    );

    let status = broker.terminate();
    assert!(status.success());
    broker.spawn();
    let mut raw = Raw::connect(&broker.addr());
    assert_eq!(
        produce(&mut raw, record_batch(pid, epoch + 1, 1, 1)),
        (0, 6)
    );
    let (pid2, _) = init_pid(&mut raw);
    assert!(pid2 > pid, "producer ids are not reused after restarts");

    // A corrupted batch is refused with CORRUPT_MESSAGE.
    let mut bad = record_batch(pid2, 0, 0, 1);
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    assert_eq!(produce(&mut raw, bad).0, 2);
}
