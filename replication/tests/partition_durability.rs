//! What a partition replica lets consumers see, and what producers are told, around durability:
//! under flush `always` the high watermark is the durable end (a record a crash can take back is
//! never read), and a log end that moves back (a rewind after a write failed for lack of space)
//! takes producer state and the high watermark with it.

use std::cell::RefCell;
use std::rc::Rc;

use kafka_protocol::ResponseError;
use spate_replication::partition::{
    Acks, BatchHeader, FlushPolicy, PartitionReplica, ReplicaConfig, ReplicaObserver,
    TopicPartition,
};

#[path = "support/batches.rs"]
mod batches;
use batches::{batch, run, small_log_config};

/// Records every high watermark the replica reports as committed, and refusals for lack of
/// space.
#[derive(Clone, Default)]
struct Seen(Rc<RefCell<Vec<u64>>>, Rc<std::cell::Cell<u32>>);

impl ReplicaObserver for Seen {
    fn appended(&self, _bytes: u64, _records: u64) {}
    fn offsets(&self, _log_end: u64, _high_watermark: u64) {}
    fn removed(&self) {}
    fn committed(&self, high_watermark: u64) {
        self.0.borrow_mut().push(high_watermark);
    }
    fn refused_no_space(&self) {
        self.1.set(self.1.get() + 1);
    }
}

async fn open(dir: &std::path::Path, flush: FlushPolicy, seen: Seen) -> Rc<PartitionReplica> {
    let config = ReplicaConfig {
        log: small_log_config(flush),
        high_watermark_cap: None,
    };
    Rc::new(
        PartitionReplica::open(
            TopicPartition::new("t", 0),
            dir.join("t-0"),
            Some(dir.join("state").join("t-0.json")),
            config,
            Box::new(seen),
        )
        .await
        .expect("open"),
    )
}

/// Offsets of the batches a consumer reads from 0.
async fn consumed(r: &PartitionReplica) -> Vec<(i64, i64)> {
    let read = r.read(0, 1 << 20).await.expect("read");
    let mut out = Vec::new();
    let mut rest = &read.records[..];
    while let Some(len) = BatchHeader::total_len_from_prefix(rest) {
        let h = BatchHeader::parse(&rest[..len]).expect("a whole batch");
        out.push((h.base_offset(), h.last_offset()));
        rest = &rest[len..];
    }
    out
}

#[test]
fn under_flush_always_consumers_read_only_what_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let seen = Seen::default();
        let r = open(dir.path(), FlushPolicy::Always, seen.clone()).await;
        r.pause_syncs(true);
        let (outcome, completion) = r.append(vec![batch(7, 0, 5)], Acks::Leader).await;
        assert_eq!((outcome.error_code, outcome.base_offset), (0, 0));
        assert_eq!(r.log_end_offset(), 5, "appended");
        assert_eq!(r.high_watermark(), 0, "not durable, so not committed");
        assert_eq!(consumed(&r).await, vec![], "a consumer reads nothing yet");
        assert!(seen.0.borrow().is_empty(), "no fetch is woken for it");
        // acks=0 appends are held back the same way.
        let (outcome, none) = r.append(vec![batch(7, 5, 2)], Acks::None).await;
        assert_eq!((outcome.error_code, outcome.base_offset), (0, 5));
        none.wait().await.unwrap();
        assert_eq!(r.high_watermark(), 0);

        let waiting = glommio::spawn_local(completion.wait());
        r.pause_syncs(false);
        waiting.await.expect("durable");
        assert_eq!(r.high_watermark(), 7, "durable, so committed");
        assert_eq!(seen.0.borrow().last(), Some(&7), "fetches are woken");
        assert_eq!(consumed(&r).await, vec![(0, 4), (5, 6)]);
        r.close().await.unwrap();
    });
}

#[test]
fn under_flush_never_the_high_watermark_is_the_log_end() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let seen = Seen::default();
        let r = open(dir.path(), FlushPolicy::Never, seen.clone()).await;
        r.pause_syncs(true);
        let (outcome, completion) = r.append(vec![batch(7, 0, 5)], Acks::Leader).await;
        assert_eq!(outcome.error_code, 0);
        completion.wait().await.unwrap();
        assert_eq!(
            r.high_watermark(),
            5,
            "write caching: readable before durable"
        );
        assert_eq!(*seen.0.borrow(), vec![5]);
        assert_eq!(consumed(&r).await, vec![(0, 4)]);
        r.pause_syncs(false);
        r.close().await.unwrap();
    });
}

/// A batch whose write failed for lack of space is dropped; its retry must be stored, not
/// answered as a duplicate of what is no longer there.
#[test]
fn a_retry_after_a_dropped_write_is_stored_not_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let seen = Seen::default();
        let r = open(dir.path(), FlushPolicy::Always, seen.clone()).await;
        let (o, c) = r.append(vec![batch(7, 0, 5)], Acks::All).await;
        assert_eq!(o.error_code, 0);
        c.wait().await.unwrap();

        r.inject_no_space_writes(1);
        let (o, c) = r.append(vec![batch(7, 5, 3)], Acks::All).await;
        assert_eq!((o.error_code, o.base_offset), (0, 5));
        let err = c.wait().await.unwrap_err();
        assert_eq!(err, ResponseError::KafkaStorageError.code());
        assert_eq!(seen.1.get(), 1, "counted as refused for lack of space");
        assert_eq!(r.log_end_offset(), 5, "the batch was dropped");
        assert_eq!(r.high_watermark(), 5);

        let (o, c) = r.append(vec![batch(7, 5, 3)], Acks::All).await;
        assert_eq!(
            (o.error_code, o.base_offset),
            (0, 5),
            "the retry is stored at the offset the dropped batch had"
        );
        c.wait().await.unwrap();
        assert_eq!(consumed(&r).await, vec![(0, 4), (5, 7)]);
        r.close().await.unwrap();

        // Producer state agrees with the log after a restart too.
        let r = open(dir.path(), FlushPolicy::Always, Seen::default()).await;
        let (o, _) = r.append(vec![batch(7, 5, 3)], Acks::None).await;
        assert_eq!(
            (o.error_code, o.base_offset),
            (0, 5),
            "a duplicate is answered as success at its original offset"
        );
        r.close().await.unwrap();
    });
}

/// Under write caching the high watermark was at the log end; a rewind moves it back with the
/// log end instead of leaving it above (which the replica asserts against).
#[test]
fn a_rewind_under_write_caching_takes_the_high_watermark_back() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let r = open(dir.path(), FlushPolicy::Never, Seen::default()).await;
        let (o, _) = r.append(vec![batch(7, 0, 5)], Acks::Leader).await;
        assert_eq!(o.error_code, 0);
        r.wait_durable(5).await.unwrap();
        r.inject_no_space_writes(1);
        let (o, _) = r.append(vec![batch(7, 5, 3)], Acks::Leader).await;
        assert_eq!((o.error_code, o.base_offset), (0, 5));
        assert_eq!(r.high_watermark(), 8);
        assert!(r.wait_durable(8).await.is_err(), "its write failed");
        assert_eq!(r.log_end_offset(), 5);
        assert!(r.high_watermark() <= r.log_end_offset());

        let (o, _) = r.append(vec![batch(7, 5, 3)], Acks::Leader).await;
        assert_eq!((o.error_code, o.base_offset), (0, 5), "the retry is stored");
        assert_eq!(r.high_watermark(), 8);
        assert_eq!(consumed(&r).await, vec![(0, 4), (5, 7)]);
        r.close().await.unwrap();
    });
}

/// A request stored in part and retried whole: the stored batches are skipped, the rest
/// appended, and the answer is the first batch's original offset.
#[test]
fn a_partly_stored_request_retried_whole_stores_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let r = open(dir.path(), FlushPolicy::Always, Seen::default()).await;
        let (o, c) = r.append(vec![batch(7, 0, 2)], Acks::All).await;
        assert_eq!(o.error_code, 0);
        c.wait().await.unwrap();
        let (o, c) = r
            .append(vec![batch(7, 0, 2), batch(7, 2, 3)], Acks::All)
            .await;
        assert_eq!((o.error_code, o.base_offset), (0, 0));
        c.wait().await.unwrap();
        assert_eq!(consumed(&r).await, vec![(0, 1), (2, 4)]);

        // Out of order within one request refuses all of it, storing nothing.
        let (o, _) = r
            .append(vec![batch(7, 5, 1), batch(7, 9, 1)], Acks::All)
            .await;
        assert_eq!(o.error_code, ResponseError::OutOfOrderSequenceNumber.code());
        assert_eq!(r.log_end_offset(), 5);
        r.close().await.unwrap();
    });
}
