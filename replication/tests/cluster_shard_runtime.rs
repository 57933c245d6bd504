//! Three cluster nodes of two shards each, in one process on one glommio executor: every shard
//! has a `ReplicaSet` over its node's temporary data dir and runs the shard runtime
//! (`cluster::run_shard_runtime`). The test is the cluster service: it carries each shard's
//! `ShardEvent::Send` to the destination node's shards (split by that node's hosting plan),
//! collects leader reports and accepts them, and publishes `ClusterView`s whose metadata comes
//! from applying the active controller's real records.
//!
//! The node-local topic mirror the service keeps in the `MetadataStore` is not built here: the
//! runtime opens, closes and deletes groups from the view's applied metadata alone (each node's
//! store is an empty single-node one).
//!
//! Ticks are manual (one message per tick), so the test knows when groups tick and can show
//! that an acks=all produce completes with no tick at all.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spate_replication::cluster::{
    partition_group_id, plan_hosting, run_shard_runtime, split_by_shard, ClusterPort, LeaderReport,
    RuntimeConfig, RuntimeStats, ShardEvent, ShardLink, TickSource,
};
use spate_replication::controller::view::{ClusterView, SharedClusterView};
use spate_replication::controller::{
    ActiveController, ControllerConfig, CreateTopicRequest, Endpoint, HeartbeatRequest,
    MetadataState, Record, RecordBatch, RegisterRequest,
};
use spate_replication::metadata::MetadataStore;
use spate_replication::partition::{
    hard_state_path, Acks, FlushPolicy, LogConfig, PartitionGroup, ReplicaObserver, TopicPartition,
};
use spate_replication::shard::incarnation::topic_id_path;
use spate_replication::shard::{
    cross_wake, producer_state_path, ReplicaSet, ReplicaSettings, Signal,
};
use spate_replication::{Epoch, NodeId, NodeMessage};

#[path = "support/batches.rs"]
mod batches;
use batches::{batch, small_log_config};

const NODES: u64 = 3;
const SHARDS: u32 = 2;
const PARTITIONS: u32 = 2;
const TOPIC: &str = "orders";
/// Partitions of the busy-group test: more leaders than node shards (6), so two share one.
const BUSY_PARTITIONS: u32 = 8;
/// Manual ticks a busy group's lock is held: three times the longest election timeout.
const BUSY_TICKS: u64 = 60;
/// Ticks an idle cluster is given to settle, then watched for.
const IDLE_SETTLE_TICKS: u64 = 20;
const IDLE_TICKS: u64 = 100;
/// Produces tried while leadership settles after the busy group frees.
const MAX_PRODUCE_ATTEMPTS: i32 = 50;
const FIRST_TOPIC_ID: u128 = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;
const SECOND_TOPIC_ID: u128 = 0x7766_5544_3322_1100_fedc_ba98_7654_3210;
/// How long any awaited condition may take (elections take 10 to 20 ticks of a few ms).
const DEADLINE: Duration = Duration::from_secs(60);
/// The test's ticker: one tick to every shard this often while ticking is on.
const TICK_EVERY: Duration = Duration::from_millis(5);
/// Short, so repeats of unaccepted reports show within a few ticks.
const REPORT_INTERVAL: Duration = Duration::from_millis(20);

/// Records each replica's high-watermark advances as told to the layer above (what wakes
/// long-polling fetches).
struct Watch {
    key: (NodeId, String),
    committed: Rc<RefCell<HashMap<(NodeId, String), u64>>>,
}

impl ReplicaObserver for Watch {
    fn appended(&self, _bytes: u64, _records: u64) {}
    fn offsets(&self, _log_end: u64, _high_watermark: u64) {}
    fn committed(&self, high_watermark: u64) {
        self.committed
            .borrow_mut()
            .insert(self.key.clone(), high_watermark);
    }
    fn removed(&self) {}
}

struct Shard {
    replicas: Rc<ReplicaSet>,
    ticks: flume::Sender<()>,
    inbox: flume::Sender<NodeMessage>,
    accepted: flume::Sender<LeaderReport>,
    stats: Rc<RefCell<RuntimeStats>>,
    task: Option<glommio::Task<RuntimeStats>>,
}

struct Node {
    id: NodeId,
    port: ClusterPort,
    dir: PathBuf,
    view: SharedClusterView,
    shards: Vec<Shard>,
}

struct Cluster {
    nodes: Vec<Node>,
    ctl: ActiveController,
    /// The applied metadata, as every node has it.
    state: Rc<RefCell<MetadataState>>,
    generation: u64,
    /// Messages from or to these nodes are dropped.
    cut: Rc<RefCell<Vec<NodeId>>>,
    /// Reports received, in order: (from node, report).
    reports: Rc<RefCell<Vec<(NodeId, LeaderReport)>>>,
    accept_reports: Rc<Cell<bool>>,
    ticking: Rc<Cell<bool>>,
    ticks_sent: Rc<Cell<u64>>,
    committed: Rc<RefCell<HashMap<(NodeId, String), u64>>>,
    stop: Rc<Signal>,
}

fn endpoint(port: u16) -> Endpoint {
    Endpoint {
        host: "127.0.0.1".into(),
        port,
    }
}

fn log_config() -> LogConfig {
    small_log_config(FlushPolicy::Always)
}

fn tp(p: u32) -> TopicPartition {
    TopicPartition::new(TOPIC, p as i32)
}

impl Cluster {
    fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize - 1]
    }

    /// Applies a controller decision through its encoding, as every node applies the log.
    fn commit(&mut self, records: Vec<Record>) {
        let batch = RecordBatch::decode(RecordBatch::new(records).encode()).unwrap();
        let (_, res) = self.state.borrow_mut().apply_batch(&batch);
        res.unwrap();
    }

    /// Every node sees the applied metadata in a new view.
    fn publish(&mut self) {
        self.generation += 1;
        let metadata = Arc::new(self.state.borrow().clone());
        for n in &self.nodes {
            n.view.set(ClusterView {
                node_id: n.id,
                metadata: metadata.clone(),
                generation: self.generation,
                ..ClusterView::default()
            });
        }
    }

    fn create_topic(&mut self, topic_id: u128) {
        self.create_topic_of(topic_id, PARTITIONS);
    }

    fn create_topic_of(&mut self, topic_id: u128, partitions: u32) {
        let recs = self
            .ctl
            .create_topic(CreateTopicRequest {
                name: TOPIC.into(),
                topic_id,
                partitions: partitions as usize,
                replication_factor: Some(3),
                configs: vec![("min.insync.replicas".into(), "2".into())],
            })
            .unwrap();
        self.commit(recs);
        self.publish();
    }

    /// The replica of partition `p` on `node`: its shard's group, if open.
    fn group(&self, node: NodeId, p: u32) -> Option<Rc<PartitionGroup>> {
        let shard = self
            .state
            .borrow()
            .partition(TOPIC, p)?
            .replicas
            .iter()
            .find(|r| r.node == node)?
            .shard;
        self.node(node).shards[shard as usize]
            .replicas
            .group(&tp(p))
    }

    fn groups(&self, p: u32) -> Vec<(NodeId, Rc<PartitionGroup>)> {
        (1..=NODES)
            .filter_map(|n| self.group(n, p).map(|g| (n, g)))
            .collect()
    }

    fn writable_leader(&self, p: u32) -> Option<(NodeId, Rc<PartitionGroup>)> {
        self.groups(p)
            .into_iter()
            .find(|(n, g)| !self.cut.borrow().contains(n) && g.is_writable_leader())
    }

    async fn until(&self, what: &str, cond: impl Fn(&Cluster) -> bool) {
        let end = Instant::now() + DEADLINE;
        while !cond(self) {
            assert!(
                Instant::now() < end,
                "not reached within {DEADLINE:?}: {what}"
            );
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
    }

    fn total(&self, f: impl Fn(&RuntimeStats) -> u64) -> u64 {
        self.nodes
            .iter()
            .flat_map(|n| &n.shards)
            .map(|s| f(&s.stats.borrow()))
            .sum()
    }

    /// Each of partitions `0..n`: its writable leader and that leader's epoch.
    fn leaders(&self, n: u32) -> Vec<(NodeId, Epoch)> {
        (0..n)
            .map(|p| {
                let (n, g) = self.writable_leader(p).unwrap();
                (n, g.epoch())
            })
            .collect()
    }

    /// No partition of `leaders` (from [`Self::leaders`]) elected again since.
    fn assert_leaders_kept(&self, leaders: &[(NodeId, Epoch)]) {
        for (p, &was) in leaders.iter().enumerate() {
            let (n, g) = self.writable_leader(p as u32).unwrap();
            assert_eq!((n, g.epoch()), was, "partition {p} elected again");
        }
    }

    /// Waits until `n` more ticks were sent to every shard and every shard handled them.
    async fn ticks_handled(&self, n: u64) {
        self.ticks(n).await;
        let target = self.ticks_sent.get();
        self.until("every shard handled the ticks sent", |c| {
            c.nodes
                .iter()
                .flat_map(|n| &n.shards)
                .all(|s| s.stats.borrow().ticks >= target)
        })
        .await;
    }

    /// Waits until `n` more ticks were sent to every shard.
    async fn ticks(&self, n: u64) {
        let target = self.ticks_sent.get() + n;
        self.until("ticks sent", |c| c.ticks_sent.get() >= target)
            .await;
    }
}

/// Starts the nodes; `timer`: the runtimes tick on the shipped timer, not the test's ticker.
async fn start(timer: bool) -> (Cluster, tempfile::TempDir) {
    start_with(timer, false).await
}

/// [`start`], with idle groups going quiet when `quiesce` (as the broker runs them).
async fn start_with(timer: bool, quiesce: bool) -> (Cluster, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let state = Rc::new(RefCell::new(MetadataState::new()));
    let cut: Rc<RefCell<Vec<NodeId>>> = Rc::default();
    let reports: Rc<RefCell<Vec<(NodeId, LeaderReport)>>> = Rc::default();
    let accept_reports = Rc::new(Cell::new(false));
    let committed: Rc<RefCell<HashMap<(NodeId, String), u64>>> = Rc::default();
    let stop = Rc::new(Signal::default());
    let mut nodes = Vec::new();
    // Shard links first, so the carriers can reach every inbox.
    let mut service_ends = Vec::new();
    for id in 1..=NODES {
        let dir = tmp.path().join(format!("node-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let metadata = MetadataStore::open(&dir).unwrap();
        let view = SharedClusterView::new(ClusterView::default());
        let (calls, _) = flume::bounded(1);
        let port = ClusterPort::new(view.clone(), calls);
        let mut shards = Vec::new();
        for s in 0..SHARDS as usize {
            let committed = committed.clone();
            let replicas = Rc::new(ReplicaSet::new(
                s,
                SHARDS as usize,
                ReplicaSettings {
                    data_dir: dir.clone(),
                    log: log_config(),
                    high_watermark_cap: None,
                    liveness_token: quiesce.then(|| port.pings().token()),
                },
                metadata.clone(),
                Box::new(move |tp| {
                    Box::new(Watch {
                        key: (id, tp.dir_name()),
                        committed: committed.clone(),
                    })
                }),
            ));
            let (inbox_tx, inbox) = flume::bounded(1024);
            let (to_service, from_shard) = flume::bounded(1024);
            let (accepted_tx, accepted) = flume::bounded(1024);
            // Unbounded: every tick sent is handled, so the test can wait for all of them.
            let (ticks_tx, ticks) = flume::unbounded();
            let stats: Rc<RefCell<RuntimeStats>> = Rc::default();
            let link = ShardLink {
                shard: s,
                inbox,
                to_service,
                accepted,
                port: port.clone(),
            };
            let stop = stop.clone();
            let config = if timer {
                RuntimeConfig {
                    stats: stats.clone(),
                    ..RuntimeConfig::new(id)
                }
            } else {
                RuntimeConfig {
                    node: id,
                    ticks: TickSource::Manual(ticks),
                    report_interval: REPORT_INTERVAL,
                    stats: stats.clone(),
                    observer: None,
                    throttle: None,
                }
            };
            let task = glommio::spawn_local(run_shard_runtime(
                replicas.clone(),
                link,
                config,
                async move { stop.changed(0).await },
            ));
            service_ends.push((id, from_shard));
            shards.push(Shard {
                replicas,
                ticks: ticks_tx,
                inbox: inbox_tx,
                accepted: accepted_tx,
                stats,
                task: Some(task),
            });
        }
        nodes.push(Node {
            id,
            port,
            dir,
            view,
            shards,
        });
    }
    // The carriers: the service's routing, one task per shard's outgoing channel.
    let inboxes: Rc<Vec<Vec<flume::Sender<NodeMessage>>>> = Rc::new(
        nodes
            .iter()
            .map(|n| n.shards.iter().map(|s| s.inbox.clone()).collect())
            .collect(),
    );
    let ports: Rc<Vec<ClusterPort>> = Rc::new(nodes.iter().map(|n| n.port.clone()).collect());
    let accepts: Rc<Vec<Vec<flume::Sender<LeaderReport>>>> = Rc::new(
        nodes
            .iter()
            .map(|n| n.shards.iter().map(|s| s.accepted.clone()).collect())
            .collect(),
    );
    for (i, (from_node, rx)) in service_ends.into_iter().enumerate() {
        let shard = i % SHARDS as usize;
        let ports = ports.clone();
        let (inboxes, accepts, state, cut, reports, accept) = (
            inboxes.clone(),
            accepts.clone(),
            state.clone(),
            cut.clone(),
            reports.clone(),
            accept_reports.clone(),
        );
        glommio::spawn_local(async move {
            while let Ok(ev) = cross_wake::recv(&rx).await {
                match ev {
                    ShardEvent::Send(m) => {
                        assert_eq!(m.from, from_node);
                        if cut.borrow().iter().any(|&c| c == m.from || c == m.to) {
                            continue;
                        }
                        let (plan, _) = plan_hosting(&state.borrow(), m.to);
                        let to = m.to;
                        let (parts, _) = split_by_shard(m, &plan);
                        for (s, part) in parts {
                            let _ = inboxes[to as usize - 1][s as usize].try_send(part);
                        }
                    }
                    ShardEvent::Ping(ping) => {
                        for to in 1..=NODES {
                            let cut = cut.borrow();
                            if to != from_node && !cut.contains(&from_node) && !cut.contains(&to) {
                                ports[to as usize - 1].pings().record(from_node, ping);
                            }
                        }
                    }
                    ShardEvent::Report(r) => {
                        if cut.borrow().contains(&from_node) {
                            continue;
                        }
                        reports.borrow_mut().push((from_node, r.clone()));
                        if accept.get() {
                            let _ = accepts[from_node as usize - 1][shard].try_send(r);
                        }
                    }
                }
            }
        })
        .detach();
    }
    let ticking = Rc::new(Cell::new(true));
    let ticks_sent = Rc::new(Cell::new(0));
    {
        let ticks: Vec<flume::Sender<()>> = nodes
            .iter()
            .flat_map(|n| n.shards.iter().map(|s| s.ticks.clone()))
            .collect();
        let (ticking, ticks_sent, stop) = (ticking.clone(), ticks_sent.clone(), stop.clone());
        glommio::spawn_local(async move {
            while stop.generation() == 0 {
                if ticking.get() {
                    for t in &ticks {
                        let _ = t.try_send(());
                    }
                    ticks_sent.set(ticks_sent.get() + 1);
                }
                glommio::timer::sleep(TICK_EVERY).await;
            }
        })
        .detach();
    }
    let mut ctl = ActiveController::new(ControllerConfig::default(), MetadataState::new(), 0);
    let mut cluster_records = Vec::new();
    for id in 1..=NODES {
        let recs = ctl
            .register(
                RegisterRequest {
                    node: id,
                    node_uuid: 0xA000 + u128::from(id),
                    rpc: endpoint(9192),
                    kafka: endpoint(9092),
                    shards: SHARDS,
                },
                0,
            )
            .unwrap();
        let Some(Record::RegisterBroker(reg)) = recs.last() else {
            panic!("no registration: {recs:?}")
        };
        let epoch = reg.broker_epoch;
        cluster_records.push(recs);
        let (recs, _) = ctl
            .heartbeat(
                HeartbeatRequest {
                    node: id,
                    broker_epoch: epoch,
                    want_fence: false,
                },
                0,
            )
            .unwrap();
        cluster_records.push(recs);
    }
    let mut cluster = Cluster {
        nodes,
        ctl,
        state,
        generation: 0,
        cut,
        reports,
        accept_reports,
        ticking,
        ticks_sent,
        committed,
        stop,
    };
    for recs in cluster_records {
        cluster.commit(recs);
    }
    cluster.publish();
    (cluster, tmp)
}

#[test]
fn shards_host_replicated_partitions_through_leader_loss_and_topic_deletion() {
    batches::run(async {
        let (mut c, _tmp) = start(false).await;
        assert_eq!(c.state.borrow().live_brokers().len(), NODES as usize);
        c.create_topic(FIRST_TOPIC_ID);

        // Each replica opens on the shard its assignment names, and on no other shard.
        c.until("every replica opens on its assigned shard", |c| {
            (0..PARTITIONS).all(|p| c.groups(p).len() == NODES as usize)
        })
        .await;
        for p in 0..PARTITIONS {
            let assignment = c
                .state
                .borrow()
                .partition(TOPIC, p)
                .unwrap()
                .replicas
                .clone();
            for r in assignment {
                let node = c.node(r.node);
                for (s, shard) in node.shards.iter().enumerate() {
                    let open = shard.replicas.group(&tp(p));
                    assert_eq!(open.is_some(), s == r.shard as usize, "{r:?} partition {p}");
                    if let Some(g) = open {
                        assert_eq!(g.group(), partition_group_id(FIRST_TOPIC_ID, p));
                        assert_eq!(g.min_insync_replicas(), 2);
                        assert!(node.dir.join(format!("{TOPIC}-{p}")).is_dir());
                    }
                }
            }
        }

        // One leader per group is elected and reports a full ISR; until the controller
        // accepts, the report is repeated; once accepted, it is not.
        let groups: Vec<u64> = (0..PARTITIONS)
            .map(|p| partition_group_id(FIRST_TOPIC_ID, p))
            .collect();
        c.until("each leader's full-ISR report is repeated", |c| {
            groups.iter().all(|g| {
                c.reports
                    .borrow()
                    .iter()
                    .filter(|(_, r)| r.group == *g && r.isr.len() == 3)
                    .count()
                    >= 2
            })
        })
        .await;
        for p in 0..PARTITIONS {
            let leaders: Vec<_> = c
                .groups(p)
                .into_iter()
                .filter(|(_, g)| g.is_leader())
                .collect();
            assert_eq!(leaders.len(), 1, "partition {p}: one leader");
            let (n, g) = &leaders[0];
            let last = c
                .reports
                .borrow()
                .iter()
                .rev()
                .find(|(_, r)| r.group == g.group())
                .cloned()
                .unwrap();
            assert_eq!(last.0, *n);
            assert_eq!(last.1.leader, *n);
            assert_eq!(last.1.epoch, g.epoch());
            for (other, og) in c.groups(p) {
                assert_eq!(og.leader(), Some(*n), "node {other} knows the leader");
                let dir = c.node(other).dir.join(format!("{TOPIC}-{p}"));
                assert!(topic_id_path(&dir).exists());
                // The vote is in the shard's store, durable (reports wait for it), and no
                // per-partition file is written any more.
                assert!(!hard_state_path(&dir).exists());
                let stored = c.node(other).shards.iter().find_map(|s| {
                    s.replicas.group(&tp(p))?;
                    s.replicas.hard_states()?.get(og.group())
                });
                assert_eq!(stored, Some(og.hard_state()), "node {other} partition {p}");
                assert!(og.hard_state_durable());
            }
        }
        c.accept_reports.set(true);
        // The next repeat is accepted; then nothing more for a stable leadership.
        let seen = c.reports.borrow().len();
        c.until("a report after accepting", |c| {
            c.reports.borrow().len() > seen
        })
        .await;
        c.ticks(10).await;
        let quiet_from = c.reports.borrow().len();
        let start = Instant::now();
        c.ticks(40).await;
        assert!(start.elapsed() >= REPORT_INTERVAL * 3);
        let after: Vec<_> = c.reports.borrow()[quiet_from..].to_vec();
        assert!(after.is_empty(), "accepted reports repeated: {after:?}");

        // acks=all on the leader completes with no tick at all: the outbox signal flushes the
        // proposal, the followers' durability acknowledgements and the leader's commit.
        c.ticking.set(false);
        let sent = c.ticks_sent.get();
        c.until("every tick sent is handled", |c| {
            c.nodes
                .iter()
                .flat_map(|n| &n.shards)
                .all(|s| s.stats.borrow().ticks == sent)
        })
        .await;
        let flushes_before = c.total(|s| s.signalled_flushes);
        let (leader, lg) = c.writable_leader(0).unwrap();
        let (outcome, completion) = lg.produce(vec![batch(7, 0, 3)], Acks::All).await;
        assert_eq!(outcome.error_code, 0);
        let done = Rc::new(Cell::new(None));
        {
            let done = done.clone();
            glommio::spawn_local(async move { done.set(Some(completion.wait().await)) }).detach();
        }
        c.until("acks=all answered without a tick", |_| done.get().is_some())
            .await;
        assert_eq!(done.get(), Some(Ok(())));
        assert_eq!(
            c.total(|s| s.ticks),
            sent * c.nodes.len() as u64 * u64::from(SHARDS),
            "no tick was handled"
        );
        assert!(c.total(|s| s.signalled_flushes) > flushes_before);
        let committed_end = lg.high_watermark();
        assert_eq!(committed_end, lg.replica().log_end_offset());
        c.ticking.set(true);
        // Followers learn the commit (and tell their long-polling fetches, as the leader did).
        c.until("every replica's high watermark and fetch wake-up", |c| {
            c.groups(0).iter().all(|(n, g)| {
                g.replica().high_watermark() == committed_end
                    && c.committed.borrow().get(&(*n, format!("{TOPIC}-0"))) == Some(&committed_end)
            })
        })
        .await;

        // The leader is cut off. Its acks=all write stays uncommitted; another node leads in a
        // higher epoch and reports it.
        let old_epoch = lg.epoch();
        c.cut.borrow_mut().push(leader);
        let (outcome, stranded) = lg.produce(vec![batch(7, 3, 2)], Acks::All).await;
        assert_eq!(outcome.error_code, 0);
        let stranded_end = lg.replica().log_end_offset();
        assert!(stranded_end > committed_end);
        let failed = Rc::new(Cell::new(None));
        {
            let failed = failed.clone();
            glommio::spawn_local(async move { failed.set(Some(stranded.wait().await)) }).detach();
        }
        c.until("another node leads in a higher epoch", |c| {
            c.writable_leader(0)
                .is_some_and(|(n, g)| n != leader && g.epoch() > old_epoch)
        })
        .await;
        let (new_leader, ng) = c.writable_leader(0).unwrap();
        let new_epoch = ng.epoch();
        c.until("the new leader's report", |c| {
            c.reports
                .borrow()
                .iter()
                .any(|(n, r)| *n == new_leader && r.group == groups[0] && r.epoch == new_epoch)
        })
        .await;
        // The new leader commits with the two nodes left (min.insync.replicas 2).
        let (outcome, completion) = ng.produce(vec![batch(8, 0, 4)], Acks::All).await;
        assert_eq!(outcome.error_code, 0);
        assert_eq!(completion.wait().await, Ok(()));

        // Healed: the old leader learns of the new epoch, its waiter fails, it truncates its
        // uncommitted suffix and catches up.
        c.cut.borrow_mut().clear();
        c.until("the old leader's acks=all waiter fails", |_| {
            failed.get().is_some()
        })
        .await;
        assert_eq!(
            failed.get(),
            Some(Err(
                kafka_protocol::ResponseError::NotLeaderOrFollower.code()
            ))
        );
        c.until("the old leader caught up", |c| {
            let (og, ng) = (c.group(leader, 0).unwrap(), c.group(new_leader, 0).unwrap());
            og.replica().log_end_offset() == ng.replica().log_end_offset()
                && og.replica().high_watermark() == ng.replica().high_watermark()
                && og.epoch_history() == ng.epoch_history()
        })
        .await;
        let og = c.group(leader, 0).unwrap();
        assert!(!og.is_leader());
        // Its epoch ends where the new leader's says: the stranded batch is gone.
        let (e, end) = og.end_offset_for_epoch(old_epoch);
        assert_eq!(e, old_epoch);
        assert_eq!(end, committed_end);
        assert!(end < stranded_end);
        assert_eq!(
            ng.end_offset_for_epoch(old_epoch),
            (old_epoch, committed_end)
        );
        assert!(og.epoch_history().iter().any(|&(e, _)| e == new_epoch));

        // A changed topic config reaches the open groups.
        c.commit(vec![Record::SetTopicConfig {
            topic: TOPIC.into(),
            key: "min.insync.replicas".into(),
            value: Some("3".into()),
        }]);
        c.publish();
        c.until("min.insync.replicas 3 everywhere", |c| {
            (0..PARTITIONS).all(|p| {
                c.groups(p)
                    .iter()
                    .all(|(_, g)| g.min_insync_replicas() == 3)
            })
        })
        .await;

        // Deleting the topic closes every group and removes every file of it.
        c.ticks(5).await;
        c.state.borrow_mut().topics.remove(TOPIC);
        c.publish();
        c.until("every group closed and its log removed", |c| {
            c.nodes.iter().all(|n| {
                n.shards.iter().all(|s| {
                    (0..PARTITIONS).all(|p| {
                        s.replicas.group(&tp(p)).is_none()
                            && !topic_id_path(&n.dir.join(format!("{TOPIC}-{p}"))).exists()
                    })
                })
            })
        })
        .await;
        for n in &c.nodes {
            for p in 0..PARTITIONS {
                let dir = n.dir.join(format!("{TOPIC}-{p}"));
                assert!(!dir.exists(), "{dir:?}");
                assert!(!hard_state_path(&dir).exists());
                assert!(!topic_id_path(&dir).exists());
                let g = partition_group_id(FIRST_TOPIC_ID, p);
                assert!(
                    n.shards
                        .iter()
                        .all(|s| s.replicas.hard_states().is_none_or(|h| h.get(g).is_none())),
                    "node {} keeps the hard state of deleted partition {p}",
                    n.id
                );
                assert!(!producer_state_path(&n.dir, &tp(p)).exists());
            }
        }

        // Recreated under the same name with another id: new groups, starting empty.
        c.ctl = ActiveController::new(ControllerConfig::default(), c.state.borrow().clone(), 0);
        c.create_topic(SECOND_TOPIC_ID);
        c.until("the new incarnation's leaders", |c| {
            (0..PARTITIONS).all(|p| c.writable_leader(p).is_some())
        })
        .await;
        for p in 0..PARTITIONS {
            for (_, g) in c.groups(p) {
                assert_eq!(g.group(), partition_group_id(SECOND_TOPIC_ID, p));
            }
            let (_, g) = c.writable_leader(p).unwrap();
            // Only its leader-change batch.
            assert_eq!(g.replica().log_end_offset(), 1);
            assert_eq!(g.epoch_history().len(), 1);
            assert_eq!(g.epoch_history()[0].1, 0);
        }

        c.stop.notify();
        let mut all = RuntimeStats::default();
        for n in &mut c.nodes {
            for s in &mut n.shards {
                let stats = s.task.take().unwrap().await;
                all.signalled_flushes += stats.signalled_flushes;
                all.views += stats.views;
                all.open_failures += stats.open_failures;
                all.reports_dropped += stats.reports_dropped;
                assert!(s.replicas.open_groups().is_empty(), "closed at stop");
            }
        }
        assert!(all.signalled_flushes > 0);
        assert_eq!(all.open_failures, 0);
        assert_eq!(all.reports_dropped, 0);
        // The first, the topic's creation, its config change, deletion and re-creation.
        assert_eq!(all.views, 5 * NODES * u64::from(SHARDS));
    });
}

/// The shipped cadence (a `PARTITION_TICK_MS` timer): every partition elects a leader, which
/// reports, and an acks=all produce commits.
#[test]
fn the_shipped_tick_elects_and_commits() {
    batches::run(async {
        let (mut c, _tmp) = start(true).await;
        c.accept_reports.set(true);
        c.create_topic(FIRST_TOPIC_ID);
        c.until("every partition's leader reported", |c| {
            (0..PARTITIONS).all(|p| {
                c.writable_leader(p).is_some_and(|(n, g)| {
                    c.reports
                        .borrow()
                        .iter()
                        .any(|(from, r)| *from == n && r.group == g.group() && r.epoch == g.epoch())
                })
            })
        })
        .await;
        let (_, g) = c.writable_leader(1).unwrap();
        let (outcome, completion) = g.produce(vec![batch(9, 0, 2)], Acks::All).await;
        assert_eq!(outcome.error_code, 0);
        assert_eq!(completion.wait().await, Ok(()));
        c.stop.notify();
        for n in &mut c.nodes {
            for s in &mut n.shards {
                let stats = s.task.take().unwrap().await;
                assert!(stats.ticks > 0);
                assert_eq!(stats.messages_dropped, 0);
            }
        }
    });
}

/// One group whose lock is held (as a produce holds it while its batches go to a slow disk)
/// holds up no other group of its shard: the shard's other leader keeps its followers (no
/// election through three election timeouts) and commits an acks=all produce meanwhile. Once
/// the lock frees, the busy group catches up on what it was handed and commits too.
#[test]
fn a_busy_group_holds_up_no_other_group_on_its_shard() {
    batches::run(async {
        let (mut c, _tmp) = start(false).await;
        c.create_topic_of(FIRST_TOPIC_ID, BUSY_PARTITIONS);
        c.until("every partition has a writable leader", |c| {
            (0..BUSY_PARTITIONS).all(|p| c.writable_leader(p).is_some())
        })
        .await;
        // Two partitions led from one node's shard.
        let mut led: HashMap<(NodeId, u32), Vec<u32>> = HashMap::new();
        for p in 0..BUSY_PARTITIONS {
            let (node, _) = c.writable_leader(p).unwrap();
            let shard = c
                .state
                .borrow()
                .partition(TOPIC, p)
                .unwrap()
                .replicas
                .iter()
                .find(|r| r.node == node)
                .unwrap()
                .shard;
            led.entry((node, shard)).or_default().push(p);
        }
        let (&(node, _), parts) = led.iter().find(|(_, ps)| ps.len() >= 2).unwrap();
        let (busy, other) = (parts[0], parts[1]);
        let busy_group = c.group(node, busy).unwrap();
        let other_group = c.group(node, other).unwrap();
        let epoch = other_group.epoch();

        let held = busy_group.hold_lock().await.expect("the group's lock");
        c.ticks(BUSY_TICKS).await;
        let handled = c.node(node).shards.iter().map(|s| s.stats.borrow().ticks);
        assert!(
            handled.clone().all(|t| t >= BUSY_TICKS),
            "the node's shards handle their ticks: {:?}",
            handled.collect::<Vec<_>>()
        );
        assert!(
            other_group.is_writable_leader(),
            "no election for the other group"
        );
        assert_eq!(
            other_group.epoch(),
            epoch,
            "no election for the other group"
        );
        let (outcome, completion) = other_group.produce(vec![batch(5, 0, 3)], Acks::All).await;
        assert_eq!(outcome.error_code, 0);
        let done = Rc::new(Cell::new(None));
        let d = done.clone();
        glommio::spawn_local(async move { d.set(Some(completion.wait().await)) }).detach();
        c.until("the other group commits while one is busy", |_| {
            done.get().is_some()
        })
        .await;
        assert_eq!(done.get(), Some(Ok(())));
        assert_eq!(other_group.epoch(), epoch);

        // The busy group was owed ticks and handed messages: it does them in order once free
        // (its followers may have elected meanwhile: its heartbeats were held too, and until
        // it hears of the new epoch it still takes a write it will fail).
        drop(held);
        let not_leader = kafka_protocol::ResponseError::NotLeaderOrFollower.code();
        let mut answer = Err(not_leader);
        for seq in 0..MAX_PRODUCE_ATTEMPTS {
            c.until("the busy partition has a writable leader again", |c| {
                c.writable_leader(busy).is_some()
            })
            .await;
            let (_, g) = c.writable_leader(busy).unwrap();
            let (outcome, completion) = g
                .produce(vec![batch(600 + i64::from(seq), 0, 1)], Acks::All)
                .await;
            answer = match outcome.error_code {
                0 => completion.wait().await,
                code => Err(code),
            };
            if answer != Err(not_leader) {
                break;
            }
            c.ticks(1).await;
        }
        assert_eq!(answer, Ok(()));
        assert_eq!(busy_group.deferred().1, 0, "no message dropped");
        c.stop.notify();
        for n in &mut c.nodes {
            for s in &mut n.shards {
                s.task.take().unwrap().await;
            }
        }
    });
}

/// Idle groups (followers hearing their leader, leaders between heartbeats) are ticked every
/// other time with the tick they skipped handed over later: about half the group ticks of an
/// idle shard are skipped, and no group elects again meanwhile.
#[test]
fn quiet_groups_skip_every_other_tick_and_keep_their_leaders() {
    batches::run(async {
        let (mut c, _tmp) = start(false).await;
        c.create_topic_of(FIRST_TOPIC_ID, BUSY_PARTITIONS);
        c.until("every partition has a writable leader", |c| {
            (0..BUSY_PARTITIONS).all(|p| c.writable_leader(p).is_some())
        })
        .await;
        // Past the new leaders' first rounds (their epochs commit, followers catch up).
        c.ticks(IDLE_SETTLE_TICKS).await;
        let leaders = c.leaders(BUSY_PARTITIONS);
        let before = (
            c.total(|s| s.group_ticks),
            c.total(|s| s.group_ticks_skipped),
        );
        // Every tick sent is handled before the counts are read.
        c.ticks_handled(IDLE_TICKS).await;
        let ticks = c.total(|s| s.group_ticks) - before.0;
        let skipped = c.total(|s| s.group_ticks_skipped) - before.1;
        assert!(ticks > 0);
        assert!(
            skipped * 10 >= ticks * 4,
            "{skipped} of {ticks} group ticks skipped"
        );
        assert!(
            skipped * 2 <= ticks + 1,
            "at most every other tick: {skipped} of {ticks}"
        );
        c.assert_leaders_kept(&leaders);
        c.stop.notify();
        for n in &mut c.nodes {
            for s in &mut n.shards {
                s.task.take().unwrap().await;
            }
        }
    });
}

/// Idle groups go quiet: no consensus message at all passes between the nodes while nothing
/// is written (the shards' liveness pings stand in for every group's heartbeats), and no
/// group elects again. A write wakes its group and commits. Then the node leading a partition
/// is cut off: the other nodes stop hearing its pings, their quiet followers wake with their
/// leases lapsed, elect a new leader and commit a write through it.
#[test]
fn idle_groups_go_quiet_and_wake_when_their_leaders_node_falls_silent() {
    batches::run(async {
        let (mut c, _tmp) = start_with(false, true).await;
        c.create_topic_of(FIRST_TOPIC_ID, BUSY_PARTITIONS);
        c.until("every partition has a writable leader", |c| {
            (0..BUSY_PARTITIONS).all(|p| c.writable_leader(p).is_some())
        })
        .await;
        c.until("every replica of every partition is quiet", |c| {
            (0..BUSY_PARTITIONS).all(|p| {
                let gs = c.groups(p);
                gs.len() == NODES as usize && gs.iter().all(|(_, g)| g.is_quiesced())
            })
        })
        .await;
        let leaders = c.leaders(BUSY_PARTITIONS);
        let sent = c.total(|s| s.messages_sent);
        c.ticks_handled(IDLE_TICKS).await;
        assert_eq!(
            c.total(|s| s.messages_sent),
            sent,
            "quiet groups sent consensus messages"
        );
        c.assert_leaders_kept(&leaders);

        // A write wakes its group and commits.
        let (_, g) = c.writable_leader(0).unwrap();
        let (outcome, completion) = g.produce(vec![batch(7, 0, 2)], Acks::All).await;
        assert_eq!(outcome.error_code, 0);
        assert_eq!(completion.wait().await, Ok(()));

        // The leader of partition 1 falls silent (its node cut off, pings and all).
        c.until("partition 1 quiet again", |c| {
            c.groups(1).iter().all(|(_, g)| g.is_quiesced())
        })
        .await;
        let (old, g) = c.writable_leader(1).unwrap();
        let epoch = g.epoch();
        c.cut.borrow_mut().push(old);
        c.until("partition 1 led elsewhere in a newer epoch", |c| {
            c.writable_leader(1)
                .is_some_and(|(n, g)| n != old && g.epoch() > epoch)
        })
        .await;
        let (_, g) = c.writable_leader(1).unwrap();
        let (outcome, completion) = g.produce(vec![batch(11, 0, 2)], Acks::All).await;
        assert_eq!(outcome.error_code, 0);
        assert_eq!(completion.wait().await, Ok(()));
        c.stop.notify();
        for n in &mut c.nodes {
            for s in &mut n.shards {
                s.task.take().unwrap().await;
            }
        }
    });
}
