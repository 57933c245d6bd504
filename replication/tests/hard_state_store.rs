//! The shard's hard-state store under real partition groups (engine logs in temporary
//! directories, one glommio executor): votes of many groups in one pass leave after one
//! flush and never before it; a crash that kept a vote from the store kept it from every peer
//! too; a log that took batches of an epoch the store lacks opens in that epoch; files
//! written by releases before the store (a partition's own `.hard-state`) open unchanged and
//! are migrated.

use std::path::Path;
use std::rc::Rc;

use spate_replication::partition::{
    hard_state_path, FlushPolicy, GroupConfig, NoObserver, PartitionGroup, PartitionReplica,
    ReplicaConfig, ReplicaError, TopicPartition,
};
use spate_replication::shard::{hard_state_store_path, HardStateStore};
use spate_replication::types::{AppendRequest, Batch, HardState, Message, VoteRequest, NO_EPOCH};
use spate_replication::NodeId;

#[path = "support/batches.rs"]
mod batches;
use batches::{batch, run, small_log_config};

const VOTERS: [NodeId; 3] = [1, 2, 3];

fn group_id(p: u32) -> u64 {
    1_000 + u64::from(p)
}

async fn open_group(
    dir: &Path,
    store: &Rc<HardStateStore>,
    node: NodeId,
    p: u32,
) -> Result<Rc<PartitionGroup>, ReplicaError> {
    let config = ReplicaConfig {
        log: small_log_config(FlushPolicy::Always),
        high_watermark_cap: None,
    };
    let log_dir = dir.join(format!("t-{p}"));
    let replica = PartitionReplica::open_replicated(
        TopicPartition::new("t", p as i32),
        log_dir.clone(),
        Some(dir.join("state").join(format!("t-{p}.json"))),
        config,
        Box::new(NoObserver),
    )
    .await?;
    let replica = Rc::new(replica);
    let mut cfg = GroupConfig::new(group_id(p), node, VOTERS.to_vec());
    cfg.seed = 7 + u64::from(p);
    let opened = PartitionGroup::open(
        replica.clone(),
        hard_state_path(&log_dir),
        store.clone(),
        cfg,
    )
    .await;
    if opened.is_err() {
        replica.close().await?;
    }
    opened
}

async fn open_store(dir: &Path) -> Rc<HardStateStore> {
    HardStateStore::open(&hard_state_store_path(dir, 0))
        .await
        .expect("open hard-state store")
}

fn vote_request(epoch: i32) -> Message {
    Message::Vote(VoteRequest {
        epoch,
        last_epoch: 0,
        log_end: 0,
        pre_vote: false,
        transfer: false,
    })
}

/// A partition's hard state as releases before the store wrote it (`<log dir>.hard-state`,
/// one 22-byte slot: magic, version, epoch, vote flag, vote, CRC-32C): the upgrade fixture.
fn legacy_hard_state_file(hard: HardState) -> Vec<u8> {
    let mut b = Vec::with_capacity(22);
    b.extend_from_slice(b"SPHS");
    b.push(1);
    b.extend_from_slice(&hard.epoch.to_be_bytes());
    b.push(u8::from(hard.voted_for.is_some()));
    b.extend_from_slice(&hard.voted_for.unwrap_or(0).to_be_bytes());
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_be_bytes());
    b
}

#[test]
fn the_votes_of_a_pass_leave_after_one_flush_and_not_before() {
    const GROUPS: u32 = 24;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    run(async move {
        let store = open_store(&dir).await;
        let mut groups = Vec::new();
        for p in 0..GROUPS {
            groups.push(open_group(&dir, &store, 2, p).await.expect("open"));
        }
        // What a runtime does after an open pass: one flush for all the groups opened.
        store.sync().await.unwrap();
        assert_eq!(store.stats().flushes, 1);
        for g in &groups {
            g.step(1, vote_request(1)).await;
            assert!(g.has_messages());
            assert!(!g.hard_state_durable(), "nothing written yet");
        }
        // The first group to hand out its messages flushes every group's vote at once.
        for g in &groups {
            let msgs = g.take_messages().await;
            assert!(
                matches!(msgs.as_slice(), [(1, Message::VoteResponse(r))] if r.granted),
                "{msgs:?}"
            );
            assert!(g.hard_state_durable());
        }
        assert_eq!(store.stats().flushes, 2, "one flush for {GROUPS} votes");
        assert_eq!(store.stats().records_written, u64::from(2 * GROUPS));

        // Votes of epoch 2 recorded, then a crash before anything is handed out: the store
        // reopened has the epoch-1 votes (the peers saw those), not the unrevealed ones.
        for g in &groups {
            g.step(3, vote_request(2)).await;
        }
        for g in &groups {
            g.close().await.unwrap();
        }
        drop(groups);
        drop(store);
        let store = open_store(&dir).await;
        for p in 0..GROUPS {
            let g = open_group(&dir, &store, 2, p).await.expect("reopen");
            assert_eq!(
                g.hard_state(),
                HardState {
                    epoch: 1,
                    voted_for: Some(1)
                }
            );
            g.close().await.unwrap();
        }
    });
}

#[test]
fn a_log_ahead_of_the_store_after_a_crash_opens_in_the_logs_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    run(async move {
        let store = open_store(&dir).await;
        let g = open_group(&dir, &store, 2, 0).await.expect("open");
        // As the runtime does after opening groups (else the first batch would wait for the
        // group's first record, and the flush would take epoch 3 along).
        store.sync().await.unwrap();
        // A leader of epoch 3 appends: the follower records epoch 3 and writes the batch at
        // once; its answer waits for the store. Stamped with the epoch (outside the CRC).
        let mut bytes = batch(5, 0, 2).header().as_bytes().to_vec();
        bytes[12..16].copy_from_slice(&3i32.to_be_bytes());
        g.step(
            1,
            Message::Append(AppendRequest {
                epoch: 3,
                prev_offset: 0,
                prev_epoch: NO_EPOCH,
                commit: 0,
                batches: vec![Batch {
                    base: 0,
                    count: 2,
                    epoch: 3,
                    bytes: bytes.into(),
                    membership: None,
                }],
                fill_end: 2,
                quiesce: 0,
            }),
        )
        .await;
        assert!(!g.has_failed());
        assert_eq!(g.replica().log_end_offset(), 2);
        assert!(!g.hard_state_durable());
        // The crash: the batch is in the log, epoch 3 never reached the store.
        g.close().await.unwrap();
        drop(g);
        drop(store);
        let store = open_store(&dir).await;
        assert_eq!(store.get(group_id(0)), Some(HardState::default()));
        let g = open_group(&dir, &store, 2, 0).await.expect("reopen");
        assert_eq!(
            g.hard_state(),
            HardState {
                epoch: 3,
                voted_for: None
            }
        );
        g.close().await.unwrap();
        drop(g);
        drop(store);

        // With no store entry and no old file beside a log that has epochs, the hard state is
        // lost: the group refuses to open rather than vote again.
        std::fs::remove_file(hard_state_store_path(&dir, 0)).unwrap();
        let store = open_store(&dir).await;
        let err = open_group(&dir, &store, 2, 0).await.err().expect("refused");
        assert!(err.to_string().contains("hard state lost"), "{err}");
    });
}

#[test]
fn a_data_dir_of_per_partition_files_opens_unchanged_and_is_migrated() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    run(async move {
        let old = HardState {
            epoch: 4,
            voted_for: Some(2),
        };
        std::fs::create_dir_all(&dir).unwrap();
        for p in 0..3 {
            std::fs::write(
                hard_state_path(&dir.join(format!("t-{p}"))),
                legacy_hard_state_file(old),
            )
            .unwrap();
        }
        let store = open_store(&dir).await;
        let mut groups = Vec::new();
        for p in 0..3 {
            let g = open_group(&dir, &store, 2, p).await.expect("open");
            assert_eq!(g.hard_state(), old);
            assert_eq!(store.get(group_id(p)), Some(old));
            // Still there until the store holds it durably.
            assert!(hard_state_path(&dir.join(format!("t-{p}"))).exists());
            groups.push(g);
        }
        store.sync().await.unwrap();
        for p in 0..3 {
            assert!(!hard_state_path(&dir.join(format!("t-{p}"))).exists());
        }
        for g in &groups {
            g.close().await.unwrap();
        }
        drop(groups);
        drop(store);
        let store = open_store(&dir).await;
        let g = open_group(&dir, &store, 2, 0).await.expect("reopen");
        assert_eq!(g.hard_state(), old);
        g.close().await.unwrap();
        drop(g);

        // An old file beside a store entry: the newer wins (a crash between the store's flush
        // and the file's removal leaves an older file).
        std::fs::write(
            hard_state_path(&dir.join("t-0")),
            legacy_hard_state_file(HardState {
                epoch: 3,
                voted_for: Some(1),
            }),
        )
        .unwrap();
        let g = open_group(&dir, &store, 2, 0).await.expect("reopen");
        assert_eq!(g.hard_state(), old);
        g.close().await.unwrap();
        drop(g);
        // Two different votes in one epoch: neither can be trusted.
        std::fs::write(
            hard_state_path(&dir.join("t-1")),
            legacy_hard_state_file(HardState {
                epoch: 4,
                voted_for: Some(3),
            }),
        )
        .unwrap();
        let err = open_group(&dir, &store, 2, 1).await.err().expect("refused");
        assert!(err.to_string().contains("two votes"), "{err}");
    });
}

#[test]
fn a_deleted_partition_leaves_no_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    run(async move {
        let store = open_store(&dir).await;
        let g = open_group(&dir, &store, 2, 0).await.expect("open");
        g.step(1, vote_request(1)).await;
        let _ = g.take_messages().await;
        assert!(store.get(group_id(0)).is_some());
        g.delete().await.unwrap();
        assert_eq!(store.get(group_id(0)), None);
        store.sync().await.unwrap();
        drop(g);
        drop(store);
        let store = open_store(&dir).await;
        assert!(store.is_empty());
    });
}
