//! Three replicas of one partition, each a `PartitionGroup` over a real engine log in its own
//! directory, on one glommio executor. The test routes their messages itself (with links it can
//! cut) and drives their ticks; durability comes from the logs' own fdatasyncs. After every
//! delivered message: no high watermark passes its log end or goes down.

use std::cell::Cell;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::ResponseError;
use spate_replication::cluster::throttle::{
    ReplicationThrottle, THROTTLE_BURST_MS, THROTTLE_LAG_OFFSETS,
};
use spate_replication::partition::{
    hard_state_path, Acks, BatchHeader, Completion, FlushPolicy, GroupConfig, NoObserver,
    PartitionGroup, PartitionReplica, ReplicaConfig, TopicPartition,
};
use spate_replication::partition::{MAX_APPEND_FILL_BYTES, MAX_DEFERRED_BYTES, MAX_DEFERRED_STEPS};
use spate_replication::replica::MAX_CATCHUP_APPENDS_IN_FLIGHT;
use spate_replication::shard::{hard_state_store_path, HardStateStore};
use spate_replication::LiveNodes;
use spate_replication::{AppendRequest, Message, NodeId};

#[path = "support/batches.rs"]
mod batches;
use batches::{batch, batch_of, run, small_log_config};

/// Rounds (one tick each, then every message delivered) a condition may take: elections take
/// 10 to 20 ticks, but a round waits only 1 ms for the logs' fdatasyncs, and on a loaded disk
/// (several builds beside the suite) one takes tens of ms while ticks go on, so elections
/// repeat before one commits: 400 rounds failed there. Still a bound, of a few seconds.
const MAX_ROUNDS: usize = 2_000;
/// Delivery passes per round before it gives up on the cluster going quiet.
const MAX_DELIVERY_PASSES: usize = 64;

/// A produce's answer, once its completion has resolved.
type Answer = Rc<Cell<Option<Result<(), i16>>>>;

/// Waits for a completion in its own task; the test reads the answer when it is there.
fn watch(c: Completion) -> Answer {
    let answer = Rc::new(Cell::new(None));
    let a = answer.clone();
    glommio::spawn_local(async move { a.set(Some(c.wait().await)) }).detach();
    answer
}

struct Slot {
    id: NodeId,
    group: Option<Rc<PartitionGroup>>,
    /// The high watermark last seen in this incarnation.
    last_hw: u64,
}

struct Cluster {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    slots: Vec<Slot>,
    /// Directed links that drop everything.
    down: HashSet<(NodeId, NodeId)>,
    /// Share of the remaining messages dropped at random (seeded), in percent.
    drop_percent: u32,
    rng: fastrand::Rng,
    min_insync: usize,
    /// Committed before the current incarnations started: a leader that serves reads must
    /// show a high watermark at least this high.
    read_floor: u64,
    /// Seen at some check: a writable leader whose high watermark is below `read_floor`.
    saw_lagging_writable_leader: bool,
    /// The most appends with batches one `take_messages` call gave for one peer.
    most_appends_per_take: usize,
}

impl Cluster {
    async fn new(nodes: u64, min_insync: usize) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = Cluster {
            root: tmp.path().to_path_buf(),
            _tmp: tmp,
            slots: Vec::new(),
            down: HashSet::new(),
            drop_percent: 0,
            rng: fastrand::Rng::with_seed(0x5eed),
            min_insync,
            read_floor: 0,
            saw_lagging_writable_leader: false,
            most_appends_per_take: 0,
        };
        for id in 1..=nodes {
            c.slots.push(Slot {
                id,
                group: None,
                last_hw: 0,
            });
        }
        for id in 1..=nodes {
            c.start(id).await;
        }
        c
    }

    fn voters(&self) -> Vec<NodeId> {
        self.slots.iter().map(|s| s.id).collect()
    }

    fn node_dir(&self, id: NodeId) -> PathBuf {
        self.root.join(format!("node-{id}"))
    }

    async fn start(&mut self, id: NodeId) {
        let dir = self.node_dir(id);
        let group = open_group(&dir, id, self.voters(), self.min_insync).await;
        let slot = self.slot_mut(id);
        slot.group = Some(group);
        slot.last_hw = 0;
    }

    /// Stops a node: its group and log are closed and dropped (its files stay).
    async fn kill(&mut self, id: NodeId) {
        let g = self.slot_mut(id).group.take().expect("running");
        g.close().await.expect("close");
    }

    fn slot_mut(&mut self, id: NodeId) -> &mut Slot {
        self.slots.iter_mut().find(|s| s.id == id).unwrap()
    }

    fn group(&self, id: NodeId) -> &Rc<PartitionGroup> {
        self.slots
            .iter()
            .find(|s| s.id == id)
            .and_then(|s| s.group.as_ref())
            .expect("running")
    }

    fn live(&self) -> Vec<(NodeId, Rc<PartitionGroup>)> {
        self.slots
            .iter()
            .filter_map(|s| s.group.clone().map(|g| (s.id, g)))
            .collect()
    }

    fn isolate(&mut self, id: NodeId) {
        for o in self.voters() {
            if o != id {
                self.down.insert((id, o));
                self.down.insert((o, id));
            }
        }
    }

    fn heal(&mut self) {
        self.down.clear();
    }

    /// The leader that has published its epoch (committed in it), if one node is.
    fn ready_leader(&self) -> Option<NodeId> {
        self.live()
            .into_iter()
            .find(|(_, g)| g.is_leader() && g.replica().leader_epoch() == g.epoch())
            .map(|(id, _)| id)
    }

    fn check(&mut self) {
        for s in &mut self.slots {
            let Some(g) = &s.group else { continue };
            let r = g.replica();
            let (hw, end) = (r.high_watermark(), r.log_end_offset());
            assert!(
                hw <= end,
                "node {}: high watermark {hw} past log end {end}",
                s.id
            );
            assert!(
                hw >= s.last_hw,
                "node {}: high watermark went down from {} to {hw}",
                s.id,
                s.last_hw
            );
            s.last_hw = hw;
            if g.is_writable_leader() && hw < self.read_floor {
                self.saw_lagging_writable_leader = true;
            }
            if g.is_ready_leader() {
                assert!(
                    hw >= self.read_floor,
                    "node {}: serves reads with high watermark {hw} below the committed {}",
                    s.id,
                    self.read_floor
                );
            }
        }
    }

    async fn deliver(&mut self) {
        for _ in 0..MAX_DELIVERY_PASSES {
            let mut any = false;
            for (from, g) in self.live() {
                let msgs = g.take_messages().await;
                for peer in self.voters() {
                    let appends = msgs
                        .iter()
                        .filter(|(to, m)| {
                            *to == peer && matches!(m, Message::Append(a) if !a.batches.is_empty())
                        })
                        .count();
                    self.most_appends_per_take = self.most_appends_per_take.max(appends);
                }
                for (to, msg) in msgs {
                    any = true;
                    if self.down.contains(&(from, to)) || self.rng.u32(0..100) < self.drop_percent {
                        continue;
                    }
                    let Some(target) = self.slots.iter().find(|s| s.id == to) else {
                        continue;
                    };
                    let Some(target) = target.group.clone() else {
                        continue;
                    };
                    target.step(from, msg).await;
                    self.check();
                }
            }
            if !any {
                return;
            }
        }
    }

    async fn round(&mut self) {
        for (_, g) in self.live() {
            g.tick().await;
        }
        self.deliver().await;
        // Lets the logs' flushers finish their fdatasyncs (and report them) before the next
        // round; the loop around rounds is what bounds the wait.
        glommio::timer::sleep(Duration::from_millis(1)).await;
        self.deliver().await;
        self.check();
    }

    async fn run_until(&mut self, what: &str, cond: impl Fn(&Cluster) -> bool) {
        for _ in 0..MAX_ROUNDS {
            if cond(self) {
                return;
            }
            self.round().await;
        }
        panic!("not reached in {MAX_ROUNDS} rounds: {what}");
    }

    async fn elect(&mut self) -> NodeId {
        self.run_until("a leader publishes its epoch", |c| {
            c.ready_leader().is_some()
        })
        .await;
        self.ready_leader().unwrap()
    }

    /// Every running replica's log ends where the leader's does and is committed to there.
    fn all_caught_up(&self) -> bool {
        let Some(l) = self.ready_leader() else {
            return false;
        };
        let end = self.group(l).replica().log_end_offset();
        self.live().iter().all(|(_, g)| {
            g.replica().log_end_offset() == end && g.replica().high_watermark() == end
        })
    }
}

async fn open_group(
    dir: &Path,
    id: NodeId,
    voters: Vec<NodeId>,
    min_insync: usize,
) -> Rc<PartitionGroup> {
    let config = ReplicaConfig {
        log: small_log_config(FlushPolicy::Always),
        high_watermark_cap: None,
    };
    let log_dir = dir.join("t-0");
    let replica = PartitionReplica::open_replicated(
        TopicPartition::new("t", 0),
        log_dir.clone(),
        Some(dir.join("state").join("t-0.json")),
        config,
        Box::new(NoObserver),
    )
    .await
    .expect("open replica");
    let mut cfg = GroupConfig::new(1, id, voters);
    cfg.seed = 0x5eed ^ id;
    cfg.min_insync_replicas = min_insync;
    // The node's shard store, opened afresh: a restarted node reads what was flushed.
    let store = HardStateStore::open(&hard_state_store_path(dir, 0))
        .await
        .expect("open hard-state store");
    PartitionGroup::open(Rc::new(replica), hard_state_path(&log_dir), store, cfg)
        .await
        .expect("open group")
}

/// Every batch of the replica's log, as stored.
async fn log_batches(g: &PartitionGroup) -> Vec<Bytes> {
    let r = g.replica();
    let (mut at, end) = (r.log_start_offset(), r.log_end_offset());
    let mut out = Vec::new();
    while at < end {
        let read = r.read_local(at, 1 << 20).await.expect("read");
        assert!(!read.batches.is_empty(), "nothing read at {at} below {end}");
        for b in read.batches {
            let h = BatchHeader::parse(&b).unwrap();
            if (h.last_offset() as u64) < at {
                continue;
            }
            at = h.last_offset() as u64 + 1;
            out.push(b);
        }
    }
    out
}

async fn assert_logs_identical(c: &Cluster) {
    let live = c.live();
    let reference = log_batches(&live[0].1).await;
    for (id, g) in &live[1..] {
        let mine = log_batches(g).await;
        assert_eq!(
            mine.len(),
            reference.len(),
            "node {id}: batch count differs"
        );
        for (i, (a, b)) in mine.iter().zip(&reference).enumerate() {
            assert_eq!(a, b, "node {id}: batch {i} differs");
        }
    }
}

/// Records of [`big_batch`], and the bytes of each record's value.
const BIG_BATCH_RECORDS: i32 = 50;
const BIG_VALUE_BYTES: usize = 1_000;

/// An idempotent producer's batch of about 50 KB (under the tests' 64 KiB batch limit).
fn big_batch(pid: i64, first_seq: i32) -> spate_replication::partition::VerifiedBatch {
    batch_of(pid, first_seq, BIG_BATCH_RECORDS, |_| {
        Bytes::from(vec![b'x'; BIG_VALUE_BYTES])
    })
}

/// Cuts follower `f` off and has the leader `l` write `batches` big batches (acks=1), committed
/// by the leader and the other follower; returns the next sequence of producer 1.
async fn leave_behind(c: &mut Cluster, l: NodeId, f: NodeId, batches: i32) -> i32 {
    c.isolate(f);
    let mut seq = 0;
    for _ in 0..batches / 10 {
        let list = (0..10)
            .map(|i| big_batch(1, seq + i * BIG_BATCH_RECORDS))
            .collect();
        let (o, _) = c.group(l).produce(list, Acks::Leader).await;
        assert_eq!(o.error_code, 0);
        seq += 10 * BIG_BATCH_RECORDS;
        c.round().await;
    }
    c.run_until("committed on two", |c| {
        let r = c.group(l).replica();
        r.high_watermark() == r.log_end_offset()
    })
    .await;
    seq
}

/// Produces one batch on `leader` and returns the completion's answer cell.
async fn produce(c: &Cluster, leader: NodeId, pid: i64, seq: i32, acks: Acks) -> (i16, Answer) {
    let (outcome, completion) = c
        .group(leader)
        .produce(vec![batch(pid, seq, 3)], acks)
        .await;
    (outcome.error_code, watch(completion))
}

#[test]
fn a_leader_is_elected_and_publishes_its_epoch_once_committed() {
    run(async {
        let mut c = Cluster::new(3, 2).await;
        let l = c.elect().await;
        let g = c.group(l).clone();
        assert!(g.epoch() >= 1);
        assert_eq!(g.replica().leader_epoch(), g.epoch());
        // Its leader-change batch is committed: the epoch was published only once it was.
        assert!(g.replica().high_watermark() >= 1);
        c.run_until("followers follow it", |c| {
            c.live()
                .iter()
                .all(|(_, f)| f.leader() == Some(l) && f.replica().leader_epoch() == f.epoch())
        })
        .await;
        let first = log_batches(&g).await;
        assert!(BatchHeader::parse(&first[0]).unwrap().is_control());
        // A follower refuses writes.
        let f = c.voters().into_iter().find(|&n| n != l).unwrap();
        let (code, _) = produce(&c, f, 1, 0, Acks::Leader).await;
        assert_eq!(code, ResponseError::NotLeaderOrFollower.code());
    });
}

#[test]
fn acks_all_completes_only_once_a_majority_is_durable() {
    run(async {
        let mut c = Cluster::new(3, 2).await;
        let l = c.elect().await;
        c.run_until("all caught up", Cluster::all_caught_up).await;
        let followers: Vec<NodeId> = c.voters().into_iter().filter(|&n| n != l).collect();
        for &f in &followers {
            c.group(f).replica().pause_syncs(true);
        }
        let hw_before = c.group(l).replica().high_watermark();
        let (code, all) = produce(&c, l, 7, 0, Acks::All).await;
        assert_eq!(code, 0);
        let (code, one) = produce(&c, l, 7, 3, Acks::Leader).await;
        assert_eq!(code, 0);
        // Both followers have the batches written, none durable: no majority.
        c.run_until("followers have written the batches", |c| {
            let end = c.group(l).replica().log_end_offset();
            followers
                .iter()
                .all(|&f| c.group(f).replica().log_end_offset() == end)
        })
        .await;
        for _ in 0..30 {
            c.round().await;
        }
        assert_eq!(one.get(), Some(Ok(())), "acks=1 waits for the leader only");
        assert_eq!(
            all.get(),
            None,
            "acks=all answered without a durable majority"
        );
        assert_eq!(c.group(l).replica().high_watermark(), hw_before);
        // One follower's fdatasync is a majority with the leader's.
        c.group(followers[0]).replica().pause_syncs(false);
        c.run_until("acks=all answered", |_| all.get().is_some())
            .await;
        assert_eq!(all.get(), Some(Ok(())));
        assert_eq!(
            c.group(l).replica().high_watermark(),
            c.group(l).replica().log_end_offset()
        );
        c.group(followers[1]).replica().pause_syncs(false);
        c.run_until("all caught up", Cluster::all_caught_up).await;
        assert_logs_identical(&c).await;
    });
}

#[test]
fn follower_logs_end_up_byte_identical_to_the_leaders() {
    run(async {
        let mut c = Cluster::new(3, 2).await;
        let l = c.elect().await;
        let mut answers = Vec::new();
        for i in 0..20 {
            let (code, a) = produce(&c, l, 1 + i % 3, (i / 3) as i32 * 3, Acks::All).await;
            assert_eq!(code, 0);
            answers.push(a);
            if i % 4 == 0 {
                c.round().await;
            }
        }
        // A retry of a stored batch is a duplicate, answered as success with the original's
        // offset (as Kafka's log answers it).
        let (outcome, _) = c.group(l).produce(vec![batch(1, 18, 3)], Acks::All).await;
        assert_eq!(outcome.error_code, 0);
        assert!(outcome.base_offset >= 0);
        c.run_until("all caught up", Cluster::all_caught_up).await;
        c.run_until("every acks=all answered", |_| {
            answers.iter().all(|a| a.get().is_some())
        })
        .await;
        assert!(answers.iter().all(|a| a.get() == Some(Ok(()))));
        assert_logs_identical(&c).await;
        // 1 control record + 20 batches of 3.
        assert_eq!(c.group(l).replica().log_end_offset(), 61);
    });
}

#[test]
fn an_isolated_leader_is_replaced_and_truncates_its_uncommitted_suffix_on_healing() {
    run(async {
        let mut c = Cluster::new(3, 2).await;
        let old = c.elect().await;
        let (code, first) = produce(&c, old, 1, 0, Acks::All).await;
        assert_eq!(code, 0);
        c.run_until("first write committed", |_| first.get().is_some())
            .await;
        assert_eq!(first.get(), Some(Ok(())));
        c.run_until("all caught up", Cluster::all_caught_up).await;
        let committed = c.group(old).replica().high_watermark();

        c.isolate(old);
        let (code, lost_all) = produce(&c, old, 1, 3, Acks::All).await;
        assert_eq!(code, 0);
        let (code, lost_one) = produce(&c, old, 1, 6, Acks::Leader).await;
        assert_eq!(code, 0, "acks=1 is answered by the leader alone");
        let uncommitted_end = c.group(old).replica().log_end_offset();
        assert!(uncommitted_end > committed);

        c.run_until("the majority elects a new leader", |c| {
            c.ready_leader().is_some_and(|l| l != old)
        })
        .await;
        let new = c.ready_leader().unwrap();
        assert!(c.group(new).epoch() > c.group(old).epoch() || !c.group(old).is_leader());
        c.run_until("the isolated leader gives up", |c| {
            !c.group(old).is_leader()
        })
        .await;
        c.run_until("its acks=all write fails", |_| lost_all.get().is_some())
            .await;
        assert_eq!(
            lost_all.get(),
            Some(Err(ResponseError::NotLeaderOrFollower.code()))
        );
        assert_eq!(lost_one.get(), Some(Ok(())));
        assert_eq!(c.group(old).replica().high_watermark(), committed);

        // Writes go on with the new leader; the producer's retry of its lost batch is new
        // there (the old leader's copy never committed).
        let (code, retried) = produce(&c, new, 1, 3, Acks::All).await;
        assert_eq!(code, 0);
        c.run_until("written on the majority", |_| retried.get().is_some())
            .await;
        assert_eq!(retried.get(), Some(Ok(())));

        c.heal();
        c.run_until("the old leader follows and catches up", |c| {
            c.group(old).leader() == Some(new) && c.all_caught_up()
        })
        .await;
        assert_logs_identical(&c).await;
        // The batches only the old leader had are gone from its log.
        let batches = log_batches(c.group(old)).await;
        let epochs: Vec<i32> = batches
            .iter()
            .map(|b| BatchHeader::parse(b).unwrap().partition_leader_epoch())
            .collect();
        let old_epoch = epochs[0];
        assert_eq!(
            epochs.iter().filter(|&&e| e == old_epoch).count(),
            2,
            "only the committed batches of the first epoch remain: {epochs:?}"
        );
    });
}

#[test]
fn a_killed_leader_is_replaced_and_restarts_from_its_hard_state_and_log() {
    run(async {
        let mut c = Cluster::new(3, 2).await;
        let old = c.elect().await;
        let (first, completion) = c.group(old).produce(vec![batch(1, 0, 3)], Acks::All).await;
        assert_eq!(first.error_code, 0);
        let a = watch(completion);
        c.run_until("committed", |_| a.get().is_some()).await;
        c.run_until("all caught up", Cluster::all_caught_up).await;
        let hard = c.group(old).hard_state();
        assert_eq!(hard.voted_for, Some(old));

        c.kill(old).await;
        c.run_until("a new leader", |c| c.ready_leader().is_some())
            .await;
        let new = c.ready_leader().unwrap();
        assert_ne!(new, old);
        // The new leader rebuilt producer state from its log: the producer's retry of its
        // committed batch is a duplicate at the original offset, never a second copy.
        let (dup, completion) = c.group(new).produce(vec![batch(1, 0, 3)], Acks::All).await;
        assert_eq!(dup.error_code, 0);
        assert_eq!(dup.base_offset, first.base_offset);
        assert_eq!(completion.wait().await, Ok(()));
        for seq in [3, 6] {
            let (code, a) = produce(&c, new, 1, seq, Acks::All).await;
            assert_eq!(code, 0);
            c.run_until("committed without the old leader", |_| a.get().is_some())
                .await;
            assert_eq!(a.get(), Some(Ok(())));
        }

        c.start(old).await;
        let restarted = c.group(old).clone();
        assert_eq!(
            restarted.hard_state(),
            hard,
            "hard state read back as persisted"
        );
        c.run_until("the restarted node catches up", |c| {
            c.group(old).leader() == Some(new) && c.all_caught_up()
        })
        .await;
        assert_logs_identical(&c).await;
        assert!(c.group(old).hard_state().epoch > hard.epoch);
    });
}

#[test]
fn a_corrupt_batch_from_a_peer_is_refused_and_never_stored() {
    run(async {
        let mut c = Cluster::new(3, 2).await;
        let l = c.elect().await;
        c.run_until("all caught up", Cluster::all_caught_up).await;
        let f = c.voters().into_iter().find(|&n| n != l).unwrap();
        let (code, _) = produce(&c, l, 1, 0, Acks::All).await;
        assert_eq!(code, 0);
        let msgs = c.group(l).take_messages().await;
        let (_, Message::Append(good)) = msgs
            .iter()
            .find(|(to, m)| *to == f && matches!(m, Message::Append(r) if !r.batches.is_empty()))
            .cloned()
            .expect("an append carrying the batch")
        else {
            unreachable!()
        };
        let end_before = c.group(f).replica().log_end_offset();
        let mut bad = good.clone();
        let b = &mut bad.batches[0];
        let mut bytes = b.bytes.to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        b.bytes = Bytes::from(bytes);
        c.group(f).step(l, Message::Append(bad)).await;
        assert_eq!(c.group(f).refused_batches(), 1);
        assert_eq!(c.group(f).replica().log_end_offset(), end_before);

        // A batch whose CRC is right but whose header disagrees with the append is refused too.
        let mut lying = good.clone();
        lying.batches[0].epoch += 1;
        lying.epoch += 1;
        c.group(f).step(l, Message::Append(lying)).await;
        assert_eq!(c.group(f).refused_batches(), 2);
        assert_eq!(c.group(f).replica().log_end_offset(), end_before);

        c.group(f).step(l, Message::Append(good)).await;
        assert!(c.group(f).replica().log_end_offset() > end_before);
        c.run_until("all caught up", Cluster::all_caught_up).await;
        assert_logs_identical(&c).await;
    });
}

#[test]
fn acks_all_is_refused_while_fewer_than_min_insync_replicas_are_caught_up() {
    run(async {
        let mut c = Cluster::new(3, 3).await;
        let l = c.elect().await;
        c.run_until("all caught up", Cluster::all_caught_up).await;
        let (code, a) = produce(&c, l, 1, 0, Acks::All).await;
        assert_eq!(code, 0);
        c.run_until("committed", |_| a.get().is_some()).await;
        let f = c.voters().into_iter().find(|&n| n != l).unwrap();
        c.isolate(f);
        // Committed by the leader and the other follower; the cut one falls behind.
        let (code, b) = produce(&c, l, 1, 3, Acks::Leader).await;
        assert_eq!(code, 0);
        c.run_until("committed on two", |c| {
            b.get().is_some()
                && c.group(l).replica().high_watermark() == c.group(l).replica().log_end_offset()
        })
        .await;
        assert_eq!(c.group(l).in_sync_voters(), 2);
        let (code, _) = produce(&c, l, 1, 6, Acks::All).await;
        assert_eq!(code, ResponseError::NotEnoughReplicas.code());
        let (code, _) = produce(&c, l, 1, 6, Acks::Leader).await;
        assert_eq!(code, 0, "acks=1 does not need in-sync replicas");
        c.heal();
        c.run_until("all caught up", Cluster::all_caught_up).await;
        assert_eq!(c.group(l).in_sync_voters(), 3);
        let (code, _) = produce(&c, l, 1, 9, Acks::All).await;
        assert_eq!(code, 0);
    });
}

#[test]
fn every_acknowledged_write_is_in_the_log_once_after_drops_and_failovers() {
    const BATCHES: i32 = 60;
    run(async {
        let mut c = Cluster::new(3, 2).await;
        c.drop_percent = 10;
        // One idempotent producer, one batch in flight, retried (same sequence) until it is
        // acknowledged, on whichever node is leader, while leaders are cut off now and then.
        let mut next_seq = 0;
        let mut inflight: Option<Answer> = None;
        let mut rounds = 0;
        while next_seq < BATCHES * 3 {
            rounds += 1;
            assert!(
                rounds < 20 * MAX_ROUNDS,
                "only {} batches acknowledged",
                next_seq / 3
            );
            if rounds % 150 == 50 {
                if let Some(l) = c.ready_leader() {
                    c.isolate(l);
                }
            }
            if rounds % 150 == 120 {
                c.heal();
            }
            match inflight.as_ref().map(|a| a.get()) {
                Some(Some(Ok(()))) => {
                    next_seq += 3;
                    inflight = None;
                }
                Some(Some(Err(_))) => inflight = None,
                Some(None) => {}
                None => {
                    if let Some(l) = c.ready_leader() {
                        let (o, completion) = c
                            .group(l)
                            .produce(vec![batch(1, next_seq, 3)], Acks::All)
                            .await;
                        if o.error_code == 0 {
                            inflight = Some(watch(completion));
                        }
                    }
                }
            }
            c.round().await;
        }
        c.drop_percent = 0;
        c.heal();
        c.run_until("all caught up", Cluster::all_caught_up).await;
        assert_logs_identical(&c).await;
        let l = c.ready_leader().unwrap();
        let sequences: Vec<i32> = log_batches(c.group(l))
            .await
            .iter()
            .map(|b| BatchHeader::parse(b).unwrap())
            .filter(|h| !h.is_control())
            .map(|h| h.base_sequence())
            .collect();
        let expected: Vec<i32> = (0..BATCHES).map(|i| i * 3).collect();
        assert_eq!(
            sequences, expected,
            "each acknowledged batch exactly once, in order"
        );
        assert!(c.group(l).epoch() >= 3, "the writes went through failovers");
    });
}

#[test]
fn a_leader_after_a_full_restart_serves_reads_only_once_its_watermark_covers_the_committed_log() {
    run(async {
        let mut c = Cluster::new(3, 2).await;
        let l = c.elect().await;
        for seq in [0, 3, 6] {
            let (code, a) = produce(&c, l, 1, seq, Acks::All).await;
            assert_eq!(code, 0);
            c.run_until("committed", |_| a.get().is_some()).await;
        }
        c.run_until("all caught up", Cluster::all_caught_up).await;
        let committed = c.group(l).replica().high_watermark();
        for id in c.voters() {
            c.kill(id).await;
        }
        // The high watermark is not persisted: every restarted replica starts at 0, and so
        // does a new leader until its own epoch commits.
        c.read_floor = committed;
        for id in c.voters() {
            c.start(id).await;
        }
        let l = c.elect().await;
        assert!(c.group(l).replica().high_watermark() > committed);
        assert!(
            c.saw_lagging_writable_leader,
            "the window this guards (writable, watermark not yet known) was never seen"
        );
    });
}

#[test]
fn a_follower_far_behind_gets_a_window_of_appends_and_catches_up_in_a_few_rounds() {
    // About 12 MB behind: a dozen fills of MAX_APPEND_FILL_BYTES, more than one window.
    const BATCHES: i32 = 250;
    // Rounds (ticks) the catch-up may take after the link heals: the first heartbeat
    // restarts the stream (two ticks), then windows of appends go as fast as answers come.
    // One fill per heartbeat, as before the window, took more than twenty.
    const MAX_CATCHUP_ROUNDS: usize = 6;
    run(async {
        let mut c = Cluster::new(3, 2).await;
        let l = c.elect().await;
        c.run_until("all caught up", Cluster::all_caught_up).await;
        let f = c.voters().into_iter().find(|&n| n != l).unwrap();
        leave_behind(&mut c, l, f, BATCHES).await;
        let behind = c.group(l).replica().log_end_offset() - c.group(f).replica().log_end_offset();
        assert!(behind >= (BATCHES * BIG_BATCH_RECORDS) as u64);
        c.heal();
        c.most_appends_per_take = 0;
        let mut rounds = 0;
        while !c.all_caught_up() {
            assert!(
                rounds < MAX_CATCHUP_ROUNDS,
                "not caught up in {MAX_CATCHUP_ROUNDS} rounds: {} of {} offsets",
                c.group(f).replica().log_end_offset(),
                c.group(l).replica().log_end_offset()
            );
            c.round().await;
            rounds += 1;
        }
        assert_eq!(
            c.most_appends_per_take, MAX_CATCHUP_APPENDS_IN_FLIGHT,
            "a full window of appends leaves at once"
        );
        assert_logs_identical(&c).await;
    });
}

#[test]
fn the_throttle_bounds_a_catch_up_and_never_holds_back_the_in_sync_follower() {
    // About 20 MB behind: 20,000 offsets, so the follower stays more than
    // THROTTLE_LAG_OFFSETS behind (throttled) for seconds at RATE.
    const BATCHES: i32 = 400;
    const RATE: u64 = 1_000_000;
    // Rounds an acks=all write may wait: the leader and the in-sync follower, each an
    // fdatasync away, commit it in one or two; the throttle must not add to that.
    const MAX_TAIL_ROUNDS: usize = 20;
    run(async {
        let mut c = Cluster::new(3, 2).await;
        let l = c.elect().await;
        c.run_until("all caught up", Cluster::all_caught_up).await;
        let f = c.voters().into_iter().find(|&n| n != l).unwrap();
        leave_behind(&mut c, l, f, BATCHES).await;
        let bytes_before = c.group(f).replica().bytes_from(0);
        c.group(l)
            .set_throttle(Arc::new(ReplicationThrottle::new(RATE)));
        let started = Instant::now();
        c.heal();
        let mut checked = 0;
        for i in 0..20 {
            let (code, a) = produce(&c, l, 2, i * 3, Acks::All).await;
            assert_eq!(code, 0);
            let mut rounds = 0;
            while a.get().is_none() {
                assert!(
                    rounds < MAX_TAIL_ROUNDS,
                    "an acks=all write waited {rounds} rounds beside the throttled catch-up"
                );
                c.round().await;
                rounds += 1;
            }
            assert_eq!(a.get(), Some(Ok(())));
            let lag = c.group(l).replica().high_watermark() - c.group(f).replica().log_end_offset();
            if lag <= THROTTLE_LAG_OFFSETS {
                // Close enough to count as tailing: no longer throttled.
                break;
            }
            let sent = c.group(f).replica().bytes_from(0) - bytes_before;
            // The full bucket, what refilled since, and one fill over the grant.
            let allowed = RATE * THROTTLE_BURST_MS / 1_000
                + (RATE as f64 * started.elapsed().as_secs_f64()) as u64
                + MAX_APPEND_FILL_BYTES as u64;
            assert!(
                sent <= allowed,
                "the follower got {sent} bytes in {:?}, the throttle allows {allowed}",
                started.elapsed()
            );
            checked += 1;
        }
        assert!(checked > 0, "the throttled catch-up was never measured");
        assert!(
            c.group(f).replica().bytes_from(0) > bytes_before,
            "nothing was sent to the follower catching up"
        );
        // Unthrottled, it catches up.
        c.group(l)
            .set_throttle(Arc::new(ReplicationThrottle::new(u64::MAX / 2)));
        c.run_until("all caught up", Cluster::all_caught_up).await;
        assert_logs_identical(&c).await;
    });
}

/// A heartbeat from `l` to a follower: harmless to step any number of times.
fn heartbeat(c: &Cluster, l: NodeId) -> Message {
    let g = c.group(l);
    Message::Append(AppendRequest {
        epoch: g.epoch(),
        prev_offset: 0,
        prev_epoch: 0,
        commit: 0,
        batches: Vec::new(),
        fill_end: 0,
        quiesce: 0,
    })
}

/// Lets every task that can run, run (each yield lets the others have a turn).
async fn let_others_run() {
    for _ in 0..16 {
        futures_lite::future::yield_now().await;
    }
}

/// Messages the tests below hand a busy group.
const DEFERRED_PIECES: usize = 50;

/// Three nodes with an elected leader: the cluster, the leader, a follower and its group.
async fn cluster_with_a_follower() -> (Cluster, NodeId, NodeId, Rc<PartitionGroup>) {
    let mut c = Cluster::new(3, 2).await;
    let l = c.elect().await;
    let f = c.voters().into_iter().find(|&n| n != l).unwrap();
    let g = c.group(f).clone();
    (c, l, f, g)
}

/// Hands the follower's group [`DEFERRED_PIECES`] heartbeats from leader `l` through the
/// shard's entry point (deferred while its lock is held).
fn defer_heartbeats(c: &Cluster, l: NodeId, g: &Rc<PartitionGroup>) {
    for _ in 0..DEFERRED_PIECES {
        g.step_or_defer(l, heartbeat(c, l));
    }
}

#[test]
fn a_lone_lock_waiter_gets_the_lock_between_deferred_pieces() {
    run(async {
        let (mut c, l, f, g) = cluster_with_a_follower().await;
        let held = g.hold_lock().await.expect("the group's lock");
        defer_heartbeats(&c, l, &g);
        // All deferred behind the held lock (the drainer may have taken the first in hand).
        assert!(g.deferred().0 + 1 >= DEFERRED_PIECES, "{:?}", g.deferred());
        // A task that needs the lock (as a produce or a durability report does) waits behind
        // the drainer.
        let left_when_served = Rc::new(Cell::new(None));
        let (waiter, left) = (g.clone(), left_when_served.clone());
        glommio::spawn_local(async move {
            waiter.tick().await;
            left.set(Some(waiter.deferred().0));
        })
        .detach();
        let_others_run().await;
        drop(held);
        c.run_until("the waiter is served", |_| left_when_served.get().is_some())
            .await;
        let left = left_when_served.get().unwrap();
        // The drainer did at most a piece or two before stepping aside; glommio's semaphore
        // alone let it take the lock back after every piece, so the waiter got it only once
        // the whole queue was done.
        assert!(
            left + 3 >= DEFERRED_PIECES,
            "the waiter got the lock with {left} of {DEFERRED_PIECES} pieces left"
        );
        c.run_until("the deferred work is done", |c| {
            c.group(f).deferred().0 == 0
        })
        .await;
    });
}

#[test]
fn the_drainer_is_not_starved_by_a_stream_of_lock_waiters() {
    /// Tasks taking the group's lock in turn, and how often each takes it.
    const TAKERS: usize = 2;
    const TAKES: usize = 200;
    run(async {
        let (mut c, l, f, g) = cluster_with_a_follower().await;
        let held = g.hold_lock().await.expect("the group's lock");
        defer_heartbeats(&c, l, &g);
        // Takes (counted over all takers) when the deferred work was first seen done.
        let takes = Rc::new(Cell::new(0usize));
        let emptied_at = Rc::new(Cell::new(None));
        let finished = Rc::new(Cell::new(0usize));
        for _ in 0..TAKERS {
            let (g, takes, emptied_at, finished) = (
                g.clone(),
                takes.clone(),
                emptied_at.clone(),
                finished.clone(),
            );
            glommio::spawn_local(async move {
                for _ in 0..TAKES {
                    let p = g.hold_lock().await.expect("the group's lock");
                    takes.set(takes.get() + 1);
                    if g.deferred().0 == 0 && emptied_at.get().is_none() {
                        emptied_at.set(Some(takes.get()));
                    }
                    futures_lite::future::yield_now().await;
                    drop(p);
                    futures_lite::future::yield_now().await;
                }
                finished.set(finished.get() + 1);
            })
            .detach();
        }
        let_others_run().await;
        drop(held);
        for _ in 0..100_000 {
            if finished.get() == TAKERS {
                break;
            }
            futures_lite::future::yield_now().await;
        }
        assert_eq!(finished.get(), TAKERS, "the takers finished");
        // The drainer does a piece after every few takes (it steps aside only for the takers
        // already waiting; 145 of the 400 takes here): starved, it did its pieces only once
        // the takers had finished.
        assert!(
            emptied_at.get().is_some_and(|at| at <= TAKERS * TAKES / 2),
            "the deferred work was done after {:?} of {} takes",
            emptied_at.get(),
            TAKERS * TAKES
        );
        c.run_until("the deferred work is done", |c| {
            c.group(f).deferred().0 == 0
        })
        .await;
    });
}

#[test]
fn closing_a_busy_group_drops_its_deferred_work_instead_of_waiting_for_it() {
    run(async {
        let (mut c, l, f, g) = cluster_with_a_follower().await;
        let held = g.hold_lock().await.expect("the group's lock");
        defer_heartbeats(&c, l, &g);
        let closed = Rc::new(Cell::new(false));
        let (closing, done) = (g.clone(), closed.clone());
        glommio::spawn_local(async move {
            closing.close().await.expect("close");
            done.set(true);
        })
        .detach();
        let_others_run().await;
        assert_eq!(g.deferred().0, 0, "a closing group keeps no deferred work");
        // What the shard hands it now is dropped, not queued behind the close.
        g.step_or_defer(l, heartbeat(&c, l));
        assert_eq!(g.deferred().0, 0);
        assert!(!closed.get(), "the close waits for the lock's holder");
        drop(held);
        c.slot_mut(f).group = None;
        c.run_until("the close is done", |_| closed.get()).await;
        assert!(g.has_failed(), "a closed group takes no further part");
    });
}

#[test]
fn a_busy_follower_holds_at_most_its_byte_bound_of_appends() {
    run(async {
        let mut c = Cluster::new(3, 2).await;
        let l = c.elect().await;
        let f = c.voters().into_iter().find(|&n| n != l).unwrap();
        leave_behind(&mut c, l, f, 40).await;
        c.heal();
        // An append with batches for the follower, as the leader sends it.
        let append = loop {
            c.group(l).tick().await;
            let msgs = c.group(l).take_messages().await;
            let found = msgs.into_iter().find(|(to, m)| {
                *to == f && matches!(m, Message::Append(a) if !a.batches.is_empty())
            });
            if let Some((_, m)) = found {
                break m;
            }
        };
        let Message::Append(a) = &append else {
            unreachable!()
        };
        let each: usize = a.batches.iter().map(|b| b.bytes.len()).sum();
        let copies = MAX_DEFERRED_BYTES / each + 10;
        // The byte bound is what drops them, not the count bound.
        assert!(
            copies < MAX_DEFERRED_STEPS,
            "{copies} appends of {each} bytes"
        );
        let g = c.group(f).clone();
        let held = g.hold_lock().await.expect("the group's lock");
        for _ in 0..copies {
            g.step_or_defer(l, append.clone());
        }
        assert!(
            g.deferred_bytes() <= MAX_DEFERRED_BYTES,
            "{} bytes deferred, over {MAX_DEFERRED_BYTES}",
            g.deferred_bytes()
        );
        assert!(
            g.deferred_bytes() + each > MAX_DEFERRED_BYTES,
            "the byte bound was not reached: {} bytes deferred",
            g.deferred_bytes()
        );
        assert!(
            g.deferred().1 >= 5,
            "{} of {copies} appends of {each} bytes dropped",
            g.deferred().1
        );
        drop(held);
        c.run_until("the deferred work is done", |c| {
            c.group(f).deferred().0 == 0
        })
        .await;
        assert_eq!(g.deferred_bytes(), 0, "the drained bytes are released");
        c.run_until("all caught up", Cluster::all_caught_up).await;
        assert_logs_identical(&c).await;
    });
}

#[test]
fn a_leader_busy_with_a_long_write_keeps_its_followers_from_electing() {
    /// Ticks the leader's lock stays held: three times the longest election timeout.
    const BUSY_TICKS: usize = 60;
    run(async {
        let mut c = Cluster::new(3, 2).await;
        let l = c.elect().await;
        c.run_until("all caught up", Cluster::all_caught_up).await;
        let leader = c.group(l).clone();
        let epoch = leader.epoch();
        // As a produce holds it across a slow write and its fdatasync.
        let held = leader.hold_lock().await.expect("the group's lock");
        for _ in 0..BUSY_TICKS {
            // The shard's entry points, which never wait (the leader's tick is deferred).
            for (_, g) in c.live() {
                g.tick_or_defer(&LiveNodes::default());
            }
            for (from, g) in c.live() {
                for (to, msg) in g.take_ready() {
                    c.group(to).step_or_defer(from, msg);
                }
            }
            // The followers are free: let their work (and its I/O) finish.
            for _ in 0..MAX_DELIVERY_PASSES {
                let_others_run().await;
                if c.live()
                    .iter()
                    .all(|(id, g)| *id == l || g.deferred().0 == 0)
                {
                    break;
                }
            }
        }
        for (id, g) in c.live() {
            assert_eq!(g.epoch(), epoch, "node {id} moved to another epoch");
            assert!(
                id == l || g.leader() == Some(l),
                "node {id} follows {:?}",
                g.leader()
            );
        }
        assert!(leader.keepalives_sent() > 0);
        drop(held);
        // Once free it goes on leading in the same epoch.
        let (_, answer) = produce(&c, l, 1, 0, Acks::All).await;
        c.run_until("the write commits", |_| answer.get().is_some())
            .await;
        assert_eq!(answer.get(), Some(Ok(())));
        assert_eq!(c.group(l).epoch(), epoch);
    });
}
