//! What the controller tests share: an active controller whose every decision is also applied,
//! through its encoding, on a follower state (`Harness`), and real drivers of three voters over
//! an in-memory network that encodes and decodes every frame (`Net`).

// Each test binary that includes this uses part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use spate_replication::controller::driver::{
    AdminCall, CallAnswer, Driver, DriverConfig, Outgoing,
};
use spate_replication::controller::store::MetadataStore;
use spate_replication::controller::{
    ActiveController, AlterIsrRequest, ControllerConfig, Endpoint, HeartbeatRequest, MetadataState,
    PartitionState, Record, RecordBatch, RegisterRequest,
};
use spate_replication::rpc::{Frame, FrameCodec, RpcErrorCode};
use spate_replication::NodeId;

pub fn endpoint(port: u16) -> Endpoint {
    Endpoint {
        host: "127.0.0.1".into(),
        port,
    }
}

pub struct Harness {
    pub ctl: ActiveController,
    pub follower: MetadataState,
    pub epochs: BTreeMap<u64, u64>,
}

impl Harness {
    pub fn new(cfg: ControllerConfig) -> Self {
        Harness {
            ctl: ActiveController::new(cfg, MetadataState::new(), 0),
            follower: MetadataState::new(),
            epochs: BTreeMap::new(),
        }
    }

    /// "Commits" a decision: encode, decode, apply on the follower, compare states.
    pub fn commit(&mut self, records: Vec<Record>) {
        let batch = RecordBatch::decode(RecordBatch::new(records).encode()).unwrap();
        let (_, res) = self.follower.apply_batch(&batch);
        res.unwrap();
        assert_eq!(&self.follower, self.ctl.state(), "follower diverged");
    }

    pub fn join(&mut self, node: u64, now: u64) {
        let recs = self
            .ctl
            .register(
                RegisterRequest {
                    node,
                    node_uuid: 0xABC0 + u128::from(node),
                    rpc: endpoint(9192),
                    kafka: endpoint(9092),
                    shards: 1,
                },
                now,
            )
            .unwrap();
        let Some(Record::RegisterBroker(reg)) = recs.last() else {
            panic!("no registration")
        };
        self.epochs.insert(node, reg.broker_epoch);
        self.commit(recs);
        self.heartbeat(node, now);
    }

    pub fn heartbeat(&mut self, node: u64, now: u64) {
        let req = HeartbeatRequest {
            node,
            broker_epoch: self.epochs[&node],
            want_fence: false,
        };
        let (recs, _) = self.ctl.heartbeat(req, now).unwrap();
        self.commit(recs);
    }

    pub fn p(&self, topic: &str, i: u32) -> PartitionState {
        self.follower.partition(topic, i).unwrap().clone()
    }

    /// The partition's group elected `leader` in `epoch` with every replica in sync.
    pub fn elected(&mut self, topic: &str, i: u32, leader: NodeId, epoch: i32) {
        let isr = self.p(topic, i).replicas.iter().map(|r| r.node).collect();
        let recs = self
            .ctl
            .alter_isr(AlterIsrRequest {
                topic: topic.into(),
                partition: i,
                leader,
                leader_epoch: epoch,
                isr,
            })
            .unwrap();
        self.commit(recs);
    }
}

pub const TICK_MS: u64 = 50;
pub const VOTERS: [NodeId; 3] = [1, 2, 3];

pub struct Net {
    pub dirs: BTreeMap<NodeId, tempfile::TempDir>,
    pub nodes: BTreeMap<NodeId, Driver<NodeId>>,
    pub down: BTreeSet<NodeId>,
    pub now_ms: u64,
    pub codec: FrameCodec,
}

pub fn cfg(id: NodeId) -> DriverConfig {
    let mut c = DriverConfig::new(
        id,
        0xC0DE_0000 + u128::from(id),
        "test-cluster".into(),
        VOTERS.to_vec(),
        endpoint(9100 + id as u16),
        endpoint(9000 + id as u16),
        1,
    );
    c.seed = id * 7919;
    // The balancer stays out of these tests: they are about explicit requests and failover.
    c.controller.leader_balance_interval_ms = None;
    c
}

impl Net {
    pub fn new(ids: &[NodeId]) -> Self {
        let mut n = Net {
            dirs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            down: BTreeSet::new(),
            now_ms: 0,
            codec: FrameCodec::default(),
        };
        for &id in ids {
            n.dirs.insert(id, tempfile::tempdir().unwrap());
            n.start(id);
        }
        n
    }

    /// Starts (or restarts) a node from its directory: its metadata log replays.
    pub fn start(&mut self, id: NodeId) {
        let store = MetadataStore::open(&self.dir(id)).unwrap();
        self.nodes
            .insert(id, Driver::new(cfg(id), store, self.now_ms));
        self.down.remove(&id);
    }

    pub fn dir(&self, id: NodeId) -> PathBuf {
        self.dirs[&id].path().to_path_buf()
    }

    pub fn kill(&mut self, id: NodeId) {
        self.nodes.remove(&id);
        self.down.insert(id);
    }

    /// One tick on every node, then messages delivered until none are left.
    pub fn step(&mut self) {
        self.now_ms += TICK_MS;
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let mut queue: Vec<(NodeId, NodeId, Frame)> = Vec::new();
        for id in &ids {
            let d = self.nodes.get_mut(id).unwrap();
            d.tick(self.now_ms).unwrap();
            collect(*id, d, &mut queue);
        }
        for _ in 0..10_000 {
            if queue.is_empty() {
                return;
            }
            for (from, to, frame) in std::mem::take(&mut queue) {
                // Every frame crosses the real codec.
                let bytes = self.codec.encode(&frame).unwrap().to_bytes();
                let mut buf = bytes::BytesMut::from(&bytes[..]);
                let frame = self.codec.decode(&mut buf).unwrap().unwrap();
                if let Some(d) = self.nodes.get_mut(&to) {
                    d.receive(from, frame, from).unwrap();
                    collect(to, d, &mut queue);
                }
            }
        }
        panic!("messages did not settle");
    }

    /// Steps until `f` holds, for at most `max_ms` simulated; returns the time taken.
    pub fn until(&mut self, max_ms: u64, what: &str, f: impl Fn(&Net) -> bool) -> u64 {
        let start = self.now_ms;
        while !f(self) {
            assert!(
                self.now_ms - start <= max_ms,
                "{what}: not within {max_ms} ms"
            );
            self.step();
        }
        self.now_ms - start
    }

    /// Every running node sees exactly `live` as the unfenced brokers.
    pub fn all_see_live(&self, live: &[NodeId]) -> bool {
        self.nodes.values().all(|d| {
            let v = d.view();
            let seen: Vec<NodeId> = v.live_brokers().map(|b| b.node).collect();
            seen == live
        })
    }

    pub fn controllers(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, d)| d.is_active_controller())
            .map(|(&id, _)| id)
            .collect()
    }

    pub fn call(
        &mut self,
        on: NodeId,
        id: u64,
        call: AdminCall,
    ) -> Result<CallAnswer, RpcErrorCode> {
        self.nodes
            .get_mut(&on)
            .unwrap()
            .submit_call(id, call)
            .unwrap();
        self.until(3_000, "call answered", |n| {
            n.nodes[&on].calls_in_flight() == 0
        });
        let mut got = self.nodes.get_mut(&on).unwrap().take_finished_calls();
        assert_eq!(got.len(), 1, "{got:?}");
        got.pop().unwrap().1.map_err(|e| e.code)
    }

    /// Every running node applied the same metadata.
    pub fn agree(&self) -> bool {
        let states: Vec<&MetadataState> = self.nodes.values().map(|d| d.state()).collect();
        states.windows(2).all(|w| w[0] == w[1])
    }
}

pub fn collect(from: NodeId, d: &mut Driver<NodeId>, queue: &mut Vec<(NodeId, NodeId, Frame)>) {
    for o in d.take_outgoing() {
        match o {
            Outgoing::Peer { to, frame } | Outgoing::Reply { to, frame } => {
                queue.push((from, to, frame))
            }
        }
    }
}
