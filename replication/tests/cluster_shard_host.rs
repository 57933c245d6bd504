//! Three nodes' shard hosts, each hosting two partition groups (real engine logs in temporary
//! directories) on one glommio executor; the test carries their node messages between them as
//! the transport would. Groups elect, the leaders report to the (test's) controller, and an
//! acks=all produce commits on every replica. One node message per peer per round, however
//! many groups.

use std::cell::Cell;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use spate_replication::cluster::{partition_group_id, ShardGroups};
use spate_replication::partition::{
    hard_state_path, Acks, FlushPolicy, GroupConfig, NoObserver, PartitionGroup, PartitionReplica,
    ReplicaConfig, TopicPartition,
};
use spate_replication::shard::{hard_state_store_path, HardStateStore};
use spate_replication::{NodeId, NodeMessage};

#[path = "support/batches.rs"]
mod batches;
use batches::{batch, small_log_config};

/// Rounds (a tick of every host, then every message delivered) a condition may take: an
/// election takes 10 to 20 ticks.
const MAX_ROUNDS: usize = 400;
/// Delivery passes per round before it stops waiting for the hosts to go quiet.
const MAX_DELIVERY_PASSES: usize = 64;
const TOPIC_ID: u128 = 0x5fa7e;

async fn open_group(
    dir: &Path,
    store: &Rc<HardStateStore>,
    node: NodeId,
    partition: u32,
) -> Rc<PartitionGroup> {
    let config = ReplicaConfig {
        log: small_log_config(FlushPolicy::Always),
        high_watermark_cap: None,
    };
    let log_dir = dir.join(format!("t-{partition}"));
    let replica = PartitionReplica::open_replicated(
        TopicPartition::new("t", partition as i32),
        log_dir.clone(),
        Some(dir.join("state").join(format!("t-{partition}.json"))),
        config,
        Box::new(NoObserver),
    )
    .await
    .expect("open replica");
    let mut cfg = GroupConfig::new(partition_group_id(TOPIC_ID, partition), node, vec![1, 2, 3]);
    cfg.seed = 0x5eed ^ node ^ (u64::from(partition) << 8);
    PartitionGroup::open(
        Rc::new(replica),
        hard_state_path(&log_dir),
        store.clone(),
        cfg,
    )
    .await
    .expect("open group")
}

struct Net {
    hosts: Vec<ShardGroups>,
}

impl Net {
    fn host(&self, node: NodeId) -> &ShardGroups {
        &self.hosts[node as usize - 1]
    }

    fn count(&self, out: &[NodeMessage]) {
        let mut peers: Vec<NodeId> = out.iter().map(|m| m.to).collect();
        let all = peers.len();
        peers.dedup();
        assert_eq!(peers.len(), all, "one node message per peer per call");
    }

    async fn round(&mut self) {
        let mut queue = Vec::new();
        for i in 0..self.hosts.len() {
            let out = self.hosts[i].tick();
            self.count(&out);
            queue.extend(out);
        }
        for _ in 0..MAX_DELIVERY_PASSES {
            glommio::timer::sleep(Duration::from_millis(1)).await;
            for h in &self.hosts {
                queue.extend(h.take_outgoing());
            }
            if queue.is_empty() {
                return;
            }
            for m in std::mem::take(&mut queue) {
                let out = self.host(m.to).deliver(m);
                self.count(&out);
                queue.extend(out);
            }
        }
    }

    async fn run_until(&mut self, what: &str, cond: impl Fn(&Net) -> bool) {
        for _ in 0..MAX_ROUNDS {
            if cond(self) {
                return;
            }
            self.round().await;
        }
        panic!("not reached in {MAX_ROUNDS} rounds: {what}");
    }
}

#[test]
fn groups_on_three_hosts_elect_report_and_commit() {
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("glommio executor")
        .run(async {
            let tmp = tempfile::tempdir().unwrap();
            let mut net = Net { hosts: Vec::new() };
            for node in 1..=3u64 {
                let host = ShardGroups::new(node);
                let dir = tmp.path().join(format!("node-{node}"));
                let store = HardStateStore::open(&hard_state_store_path(&dir, 0))
                    .await
                    .expect("open hard-state store");
                for p in 0..2 {
                    host.insert(open_group(&dir, &store, node, p).await);
                }
                net.hosts.push(host);
            }
            let groups: Vec<u64> = (0..2).map(|p| partition_group_id(TOPIC_ID, p)).collect();
            // Every group elects a leader, which reports with all three voters in sync.
            net.run_until("every group's leader reports a full ISR", |n| {
                groups.iter().all(|g| {
                    n.hosts
                        .iter()
                        .flat_map(|h| h.pending_reports())
                        .any(|r| r.group == *g && r.isr.len() == 3)
                })
            })
            .await;
            for h in &net.hosts {
                for r in h.pending_reports() {
                    assert!(r.epoch >= 1, "a Raft epoch: {r:?}");
                    assert_eq!(r.leader, h.node());
                    let led = h.get(r.group).unwrap();
                    assert!(led.is_leader());
                    h.acknowledge(r);
                }
                assert!(
                    h.pending_reports().is_empty(),
                    "acknowledged reports are not repeated"
                );
            }

            // acks=all on group 0's leader commits on every replica.
            let leader = net
                .hosts
                .iter()
                .find(|h| h.get(groups[0]).unwrap().is_writable_leader())
                .map(|h| h.node())
                .unwrap();
            let g = net.host(leader).get(groups[0]).unwrap();
            let (outcome, completion) = g.produce(vec![batch(7, 0, 3)], Acks::All).await;
            assert_eq!(outcome.error_code, 0);
            let done = Rc::new(Cell::new(None));
            let d = done.clone();
            glommio::spawn_local(async move { d.set(Some(completion.wait().await)) }).detach();
            net.run_until("the acks=all produce is answered", |_| done.get().is_some())
                .await;
            assert_eq!(done.get(), Some(Ok(())));
            // The leader's log ends past the three records (after its epoch's leader-change
            // batch); every replica commits to there.
            let end = g.replica().log_end_offset();
            assert!(end >= 3);
            net.run_until("every replica knows the commit", |n| {
                n.hosts
                    .iter()
                    .all(|h| h.get(groups[0]).unwrap().replica().high_watermark() == end)
            })
            .await;
            // A follower refuses the write.
            let follower = (1..=3).find(|&n| n != leader).unwrap();
            let fg = net.host(follower).get(groups[0]).unwrap();
            let (outcome, _) = fg.produce(vec![batch(8, 0, 1)], Acks::All).await;
            assert_eq!(
                outcome.error_code,
                kafka_protocol::ResponseError::NotLeaderOrFollower.code()
            );
            for h in &net.hosts {
                for g in &groups {
                    h.close(*g).await.unwrap();
                }
                assert!(h.is_empty());
            }
        });
}
