//! A deterministic simulator for the consensus core: N nodes running the real [`Node`] and
//! [`Replica`] code, a disk per node and group with written and durable parts, a network that
//! drops, delays, duplicates and reorders messages and partitions nodes (one-way too), crashes
//! (also in the middle of performing a call's actions), restarts, leadership transfers,
//! membership changes and a client proposing batches. One seed fixes everything; every step
//! checks the invariants listed in [`Sim::check_step`].
//!
//! Quiescence is on (see `Replica::quiesced`): every node start draws a fresh liveness token,
//! and each tick of a node pings every peer through the same faulty network. After the faulty
//! phase and the settle phase, an idle phase requires every group to go quiet, and a failover
//! phase then crashes or isolates a quiet leader's node: its groups must elect elsewhere (the
//! quiet followers have only the pings to tell them) and an isolated leader must step down.
//! Those two run with the clocks at one rate and the links in order (`Sim::fair_clocks`,
//! `Sim::fifo_links`): what the liveness and quiescence rely on, as a broker provides them.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;

use bytes::Bytes;
use spate_replication::replica::MAX_CATCHUP_APPENDS_IN_FLIGHT;
use spate_replication::{
    Action, Batch, Config, Epoch, GroupId, HardState, Membership, Message, Node, NodeId,
    NodeMessage, Offset, Output, Persisted, Ping, Quiesced, Replica,
};

/// Events kept for the failure report.
const TRACE_EVENTS: usize = 400;
/// Steps of the final fault-free phase in which every group must elect a leader and commit.
const SETTLE_STEPS: u64 = 20_000;
/// Steps with no faults and no client after the settle phase within which every group must
/// go quiet (as many as the settle phase has: a learner far behind may need most of them).
const IDLE_MAX_STEPS: u64 = 20_000;
/// Steps every group must then stay quiet. Each node ticks once per (nodes / 0.2) steps:
/// with 5 nodes, 80 ticks, 8 election timeouts.
const IDLE_HOLD_STEPS: u64 = 2_000;
/// Steps at the start of the idle phase before a quiet group must stay quiet: a node's view
/// of its peers' liveness may still count silence from the random clocks before (it is
/// afresh once each node has ticked a couple of times; this is some 20 ticks each).
const IDLE_WARMUP_STEPS: u64 = 500;
/// Groups a node hosts at most in the simulator (its quiet groups are kept as a bit mask).
const MAX_GROUPS: usize = 64;

/// splitmix64: small, fast, and the same on every platform.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next_u64() % n
    }
    pub fn per_mille(&mut self, p: u32) -> bool {
        self.below(1000) < u64::from(p)
    }
}

/// What one run does. Probabilities are per mille.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub nodes: usize,
    /// Voters each group starts with (the rest of the nodes may join through membership changes).
    pub initial_voters: usize,
    pub groups: usize,
    pub steps: u64,
    pub drop: u32,
    pub duplicate: u32,
    pub max_delay_steps: u64,
    pub membership_changes: bool,
    /// Chance, per performed call, that the node crashes after a random prefix of its actions.
    pub crash_mid_actions: u32,
    /// Chance a new leader appends a batch of its epoch at once (else it waits for the client).
    pub leader_start_batch: u32,
    /// Client proposals and crashes, per mille of steps.
    pub propose_weight: u64,
    pub crash_weight: u64,
    /// Batches a leader attaches to one append at most (the real sender's byte limit): a
    /// follower further behind gets a window of appends (`Replica::on_append_filled`).
    pub max_fill_batches: usize,
    /// Idle groups go quiet (`Config::quiesce`) and nodes ping each other. Off: the old
    /// behaviour (no pings, leaders heartbeat for as long as they lead), and no idle and
    /// failover phases.
    pub quiesce: bool,
}

impl SimConfig {
    pub fn three_nodes(steps: u64) -> Self {
        SimConfig {
            nodes: 3,
            initial_voters: 3,
            groups: 2,
            steps,
            drop: 50,
            duplicate: 30,
            max_delay_steps: 25,
            membership_changes: false,
            crash_mid_actions: 3,
            leader_start_batch: 500,
            propose_weight: 100,
            crash_weight: 4,
            max_fill_batches: 3,
            quiesce: true,
        }
    }
    pub fn five_nodes(steps: u64) -> Self {
        SimConfig {
            nodes: 5,
            initial_voters: 5,
            ..SimConfig::three_nodes(steps)
        }
    }
    /// Five nodes, rare writes, new leaders that wait for the client and more crashes: batches of
    /// old epochs sit uncommitted across elections (the Raft figure-8 situation).
    pub fn five_nodes_sparse_writes(steps: u64) -> Self {
        SimConfig {
            leader_start_batch: 0,
            propose_weight: 15,
            crash_weight: 12,
            ..SimConfig::five_nodes(steps)
        }
    }
    /// Five nodes, groups starting on three of them, with learners added, promoted and removed.
    pub fn five_nodes_membership(steps: u64) -> Self {
        SimConfig {
            initial_voters: 3,
            membership_changes: true,
            ..SimConfig::five_nodes(steps)
        }
    }
    /// Five nodes, a client that writes seldom, and new leaders that write at once (so they
    /// can commit and go quiet): groups spend much of the run quiet while nodes crash,
    /// restart and are partitioned: quiet followers of a dead leader, quiet leaders of dead
    /// followers, and pings lost with the rest.
    pub fn five_nodes_quiet_spells(steps: u64) -> Self {
        SimConfig {
            leader_start_batch: 1000,
            propose_weight: 3,
            ..SimConfig::five_nodes(steps)
        }
    }
    /// The same run without quiescence (the core as it was before it).
    pub fn without_quiescence(self) -> Self {
        SimConfig {
            quiesce: false,
            ..self
        }
    }
}

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn batch_hash(prev: u64, b: &Batch) -> u64 {
    let mut h = fnv(prev ^ 0xcbf2_9ce4_8422_2325, &b.base.to_le_bytes());
    h = fnv(h, &b.count.to_le_bytes());
    h = fnv(h, &b.epoch.to_le_bytes());
    fnv(h, &b.bytes)
}

/// One group's log on one node: batches written, a durable prefix, and the persisted vote.
#[derive(Default, Clone)]
struct Disk {
    batches: Vec<Batch>,
    /// Hash of batches[..=i], for cheap prefix comparison.
    prefix: Vec<u64>,
    durable: usize,
    hard: HardState,
}

impl Disk {
    fn end(&self) -> Offset {
        self.batches.last().map_or(0, |b| b.end())
    }
    /// Number of batches below `offset`, which must be a batch boundary of this log.
    fn index_of_end(&self, offset: Offset) -> Option<usize> {
        if offset == 0 {
            return Some(0);
        }
        let i = self.batches.partition_point(|b| b.end() < offset);
        (i < self.batches.len() && self.batches[i].end() == offset).then_some(i + 1)
    }
    fn find(&self, base: Offset) -> Option<&Batch> {
        let i = self.batches.partition_point(|b| b.base < base);
        self.batches.get(i).filter(|b| b.base == base)
    }
    fn push(&mut self, b: Batch) {
        assert_eq!(b.base, self.end(), "disk append not contiguous");
        let prev = self.prefix.last().copied().unwrap_or(0);
        self.prefix.push(batch_hash(prev, &b));
        self.batches.push(b);
    }
    fn truncate_batches(&mut self, n: usize) {
        self.batches.truncate(n);
        self.prefix.truncate(n);
        self.durable = self.durable.min(n);
    }
    fn persisted(&self, bootstrap: &Membership) -> Persisted {
        let mut epochs: Vec<(Epoch, Offset)> = Vec::new();
        let mut memberships = Vec::new();
        for b in &self.batches[..self.durable] {
            if epochs.last().is_none_or(|e| e.0 != b.epoch) {
                epochs.push((b.epoch, b.base));
            }
            if let Some(m) = &b.membership {
                memberships.push((b.base, m.clone()));
            }
        }
        Persisted {
            hard: self.hard,
            epochs,
            log_end: self.end(),
            bootstrap: bootstrap.clone(),
            memberships,
        }
    }
}

struct SimNode {
    id: NodeId,
    node: Option<Node>,
    /// The liveness token of the node's current start (0 with quiescence off).
    token: u64,
    disks: Vec<Disk>,
    /// Last high watermark each group reported since the node (re)started: (offset, batches).
    hw: Vec<(Offset, usize)>,
    /// While leader: (epoch, high watermark) to check it never decreases.
    leader_hw: Vec<Option<(Epoch, Offset)>>,
}

/// What travels between nodes: the groups' messages and the node-level liveness pings.
#[derive(Clone)]
enum Packet {
    Consensus(NodeMessage),
    Ping {
        from: NodeId,
        to: NodeId,
        ping: Ping,
    },
}

impl Packet {
    fn link(&self) -> (NodeId, NodeId) {
        match self {
            Packet::Consensus(m) => (m.from, m.to),
            Packet::Ping { from, to, .. } => (*from, *to),
        }
    }
}

struct InFlight {
    at: u64,
    /// Order of sending (see `Sim::fifo_links`).
    seq: u64,
    packet: Packet,
}

#[derive(Clone)]
struct Proposal {
    base: Offset,
    epoch: Epoch,
    bytes: Bytes,
}

/// What a run did, for the soak summary.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub steps: u64,
    pub elections: u64,
    pub crashes: u64,
    pub transfers: u64,
    pub membership_changes: u64,
    pub committed_batches: u64,
    pub acked_batches: u64,
    pub messages: u64,
    /// Keep-alives busy leaders sent (see `Sim::keepalive`).
    pub keepalives: u64,
    /// Liveness pings sent (one per tick of a node to each peer).
    pub pings: u64,
    /// Times a replica went quiet, and times a quiet one woke; the first also counted for
    /// the faulty phase alone.
    pub quiesces: u64,
    pub wakes: u64,
    pub quiesces_in_faults: u64,
    /// Quiet replicas (leaders and followers) counted in all at the end of the idle phase.
    pub quiet_at_idle_end: u64,
    /// Groups left out of the idle phase's check: a removed voter disturbs them.
    pub idle_stale_voter_groups: u64,
    /// Steps the idle phase took until every group was quiet.
    pub idle_steps_to_quiet: u64,
    /// Failover phases run: a quiet leader's node crashed, or isolated.
    pub failovers_crash: u64,
    pub failovers_isolate: u64,
}

impl Stats {
    pub fn add(&mut self, s: &Stats) {
        self.steps += s.steps;
        self.elections += s.elections;
        self.crashes += s.crashes;
        self.transfers += s.transfers;
        self.membership_changes += s.membership_changes;
        self.committed_batches += s.committed_batches;
        self.acked_batches += s.acked_batches;
        self.messages += s.messages;
        self.keepalives += s.keepalives;
        self.pings += s.pings;
        self.quiesces += s.quiesces;
        self.wakes += s.wakes;
        self.quiesces_in_faults += s.quiesces_in_faults;
        self.quiet_at_idle_end += s.quiet_at_idle_end;
        self.idle_stale_voter_groups += s.idle_stale_voter_groups;
        self.idle_steps_to_quiet += s.idle_steps_to_quiet;
        self.failovers_crash += s.failovers_crash;
        self.failovers_isolate += s.failovers_isolate;
    }
}

pub struct Sim {
    seed: u64,
    cfg: SimConfig,
    rng: Rng,
    now: u64,
    nodes: Vec<SimNode>,
    net: Vec<InFlight>,
    /// Blocked directed links (from, to).
    blocked: BTreeSet<(NodeId, NodeId)>,
    bootstrap: Membership,
    /// (group, epoch) -> the node that became leader in it.
    leaders: BTreeMap<(GroupId, Epoch), NodeId>,
    /// Per group: the committed prefix every replica must agree on, as prefix hashes.
    committed: Vec<Vec<u64>>,
    /// Per group: proposals not yet known committed, and the acknowledged ones.
    pending: Vec<Vec<Proposal>>,
    acked: Vec<Vec<Proposal>>,
    next_payload: u64,
    trace: VecDeque<String>,
    pub stats: Stats,
    faults: bool,
    /// A phase's own fault stays until the phase ends: no restarts, no heals.
    pinned: bool,
    /// Every live node ticks in turn rather than a random one: clocks at one rate. Random
    /// ticking lets one node's clock race another's by ten ticks now and then, which the
    /// liveness (rightly) takes for a silent node, and a quiet group wakes.
    fair_clocks: bool,
    next_tick: usize,
    /// Consensus messages on a link arrive in the order sent, as over the one connection a
    /// broker keeps per peer. Otherwise the network reorders them, as the faults need; but
    /// then a heartbeat that overtakes the leader's quiescing one wakes followers under a
    /// leader that sends nothing more, and once their leases lapse they elect one of them:
    /// no fault-free phase could require quiet groups to keep their leaders.
    fifo_links: bool,
    /// Packets sent so far (the `seq` of the last), and per link the latest arrival time a
    /// consensus message was given (with `fifo_links`, the next arrives no earlier).
    sent: u64,
    link_due: BTreeMap<(NodeId, NodeId), u64>,
}

type Check = Result<(), String>;

impl Sim {
    pub fn new(seed: u64, cfg: SimConfig) -> Self {
        assert!(cfg.initial_voters <= cfg.nodes && cfg.initial_voters > 0);
        let bootstrap =
            Membership::voters(&(1..=cfg.initial_voters as NodeId).collect::<Vec<NodeId>>());
        let mut sim = Sim {
            seed,
            rng: Rng::new(seed),
            now: 0,
            nodes: Vec::new(),
            net: Vec::new(),
            blocked: BTreeSet::new(),
            bootstrap,
            leaders: BTreeMap::new(),
            committed: vec![Vec::new(); cfg.groups],
            pending: vec![Vec::new(); cfg.groups],
            acked: vec![Vec::new(); cfg.groups],
            next_payload: 0,
            trace: VecDeque::new(),
            stats: Stats::default(),
            faults: true,
            pinned: false,
            fair_clocks: false,
            next_tick: 0,
            fifo_links: false,
            sent: 0,
            link_due: BTreeMap::new(),
            cfg,
        };
        assert!(sim.cfg.groups <= MAX_GROUPS);
        for id in 1..=sim.cfg.nodes as NodeId {
            sim.nodes.push(SimNode {
                id,
                node: None,
                token: 0,
                disks: vec![Disk::default(); sim.cfg.groups],
                hw: vec![(0, 0); sim.cfg.groups],
                leader_hw: vec![None; sim.cfg.groups],
            });
            sim.start(id);
        }
        sim
    }

    fn log(&mut self, s: String) {
        if self.trace.len() == TRACE_EVENTS {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("[{}] {s}", self.now));
    }

    /// Runs the faulty phase, then a fault-free phase in which every group must make progress.
    /// On failure the error names the seed and holds the last events.
    pub fn run(mut self) -> Result<Stats, String> {
        let res = self.run_inner();
        res.map(|_| self.stats).map_err(|e| {
            let mut s = format!(
                "simulation failed: seed {} ({:?}): {e}\nreplay: SPATE_SIM_SEED={} cargo nextest run --release -p spate-replication --test simulation replay\nlast events:\n",
                self.seed, self.cfg, self.seed
            );
            for t in &self.trace {
                let _ = writeln!(s, "  {t}");
            }
            s
        })
    }

    fn run_inner(&mut self) -> Check {
        for _ in 0..self.cfg.steps {
            self.step()?;
        }
        self.settle()?;
        if self.cfg.quiesce {
            self.idle()?;
            self.failover()?;
            self.settle()?;
        }
        Ok(())
    }

    fn idx(id: NodeId) -> usize {
        (id - 1) as usize
    }

    fn live(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|n| n.node.is_some())
            .map(|n| n.id)
            .collect()
    }

    fn pick_live(&mut self) -> Option<NodeId> {
        let live = self.live();
        if live.is_empty() {
            return None;
        }
        Some(live[self.rng.below(live.len() as u64) as usize])
    }

    /// The node to tick: any live one, or with fair clocks the next live one in turn.
    fn pick_to_tick(&mut self) -> Option<NodeId> {
        if !self.fair_clocks {
            return self.pick_live();
        }
        let live = self.live();
        if live.is_empty() {
            return None;
        }
        self.next_tick = self.next_tick.wrapping_add(1);
        Some(live[self.next_tick % live.len()])
    }

    fn leader_of(&self, g: GroupId) -> Option<NodeId> {
        self.nodes.iter().find_map(|n| {
            n.node
                .as_ref()
                .and_then(|node| node.group(g))
                .filter(|r| r.is_leader())
                .map(|_| n.id)
        })
    }

    fn step(&mut self) -> Check {
        self.now += 1;
        self.stats.steps += 1;
        self.deliver_pings();
        let r = self.rng.below(1000);
        let (p, c) = (self.cfg.propose_weight, self.cfg.crash_weight);
        if r < 400 {
            self.deliver()?;
        } else if r < 600 {
            if let Some(id) = self.pick_to_tick() {
                self.tick(id)?;
            }
        } else if r < 620 {
            self.keepalive();
        } else if r < 620 + p {
            if self.faults {
                self.client_propose()?;
            }
        } else if r < 780 + p {
            self.fsync()?;
        } else if r < 780 + p + c {
            if self.faults {
                self.crash_any();
            }
        } else if r < 800 + p + c {
            if !self.pinned {
                self.restart_any()?;
            }
        } else if r < 810 + p + c {
            if self.faults {
                self.partition();
            }
        } else if r < 830 + p + c {
            if !self.blocked.is_empty() && !self.pinned {
                self.log("heal".into());
                self.blocked.clear();
            }
        } else if r < 835 + p + c {
            if self.faults {
                self.transfer()?;
            }
        } else if r < 845 + p + c {
            if self.faults && self.cfg.membership_changes {
                self.change_membership()?;
            }
        } else {
            self.deliver()?;
        }
        self.check_step()
    }

    // ---- node calls and their actions ----------------------------------------------------------

    fn start(&mut self, id: NodeId) {
        let i = Self::idx(id);
        let mut cfg = Config::default();
        let mut node = Node::new(id);
        let mut token = 0;
        if self.cfg.quiesce {
            // A new incarnation: peers tell it apart from the one before by this alone.
            while token == 0 {
                token = self.rng.next_u64();
            }
            cfg.quiesce = Some(token);
            node = Node::with_liveness(id, token, cfg.election_timeout_ticks);
        }
        for g in 0..self.cfg.groups {
            let persisted = self.nodes[i].disks[g].persisted(&self.bootstrap);
            let seed = self.rng.next_u64();
            node.add_group(g as GroupId, Replica::new(id, cfg, seed, persisted));
        }
        self.log(format!("n{id} starts with token {token:#x}"));
        self.nodes[i].token = token;
        self.nodes[i].node = Some(node);
        self.nodes[i].hw = vec![(0, 0); self.cfg.groups];
        self.nodes[i].leader_hw = vec![None; self.cfg.groups];
    }

    /// Runs `f` on a live node, then performs everything it produced (and what that triggers).
    fn with_node<T>(
        &mut self,
        id: NodeId,
        f: impl FnOnce(&mut Node) -> T,
    ) -> Result<Option<T>, String> {
        let i = Self::idx(id);
        let Some(node) = self.nodes[i].node.as_mut() else {
            return Ok(None);
        };
        let before = quiet_mask(node);
        let res = f(node);
        let after = quiet_mask(node);
        let out = node.take_output();
        self.count_quiet(id, before, after);
        self.perform(id, out)?;
        Ok(Some(res))
    }

    /// Counts the groups of `id` that went quiet or woke in one call, and traces them in the
    /// fault-free phases (where the quiescence checks are; in the faulty phase they would
    /// crowd the trace) or with `SPATE_SIM_TRACE_QUIET` set.
    fn count_quiet(&mut self, id: NodeId, before: u64, after: u64) {
        let trace = !self.faults || std::env::var_os("SPATE_SIM_TRACE_QUIET").is_some();
        for g in 0..self.cfg.groups {
            let bit = 1u64 << g;
            let what = match (before & bit != 0, after & bit != 0) {
                (false, true) => {
                    self.stats.quiesces += 1;
                    self.stats.quiesces_in_faults += u64::from(self.faults);
                    "quiet"
                }
                (true, false) => {
                    self.stats.wakes += 1;
                    "wakes"
                }
                _ => continue,
            };
            if trace {
                self.log(format!("n{id} g{g} {what}"));
            }
        }
    }

    /// A tick of node `id`, then its liveness ping (`Node::ping`) to every peer, through the
    /// same network as everything else.
    fn tick(&mut self, id: NodeId) -> Check {
        self.with_node(id, |n| n.tick())?;
        let Some(ping) = self.nodes[Self::idx(id)]
            .node
            .as_ref()
            .and_then(|n| n.ping())
        else {
            return Ok(());
        };
        for to in 1..=self.cfg.nodes as NodeId {
            if to != id {
                self.stats.pings += 1;
                self.send_packet(Packet::Ping { from: id, to, ping });
            }
        }
        Ok(())
    }

    fn perform(&mut self, id: NodeId, out: Output) -> Check {
        let i = Self::idx(id);
        let crash_at = (self.faults && self.rng.per_mille(self.cfg.crash_mid_actions))
            .then(|| self.rng.below(out.actions.len() as u64 + 1) as usize);
        let mut appended = BTreeSet::new();
        let mut new_leaders = Vec::new();
        for (k, (g, a)) in out.actions.into_iter().enumerate() {
            if crash_at == Some(k) {
                self.log(format!("n{id} crashes after {k} actions"));
                self.crash(id);
                return Ok(());
            }
            let gi = g as usize;
            match a {
                Action::PersistHardState(h) => {
                    self.log(format!("n{id} g{g} persist {h:?}"));
                    self.nodes[i].disks[gi].hard = h;
                }
                Action::Append { batches } => {
                    for b in batches {
                        self.nodes[i].disks[gi].push(b);
                    }
                    appended.insert(g);
                }
                Action::Truncate { end } => {
                    self.log(format!("n{id} g{g} truncate to {end}"));
                    let disk = &mut self.nodes[i].disks[gi];
                    let n = disk.index_of_end(end).ok_or_else(|| {
                        format!("n{id} g{g}: truncate to {end}, not a batch boundary")
                    })?;
                    disk.truncate_batches(n);
                    appended.insert(g);
                }
                Action::HighWatermark(h) => self.on_high_watermark(id, g, h)?,
                Action::BecomeLeader { epoch } => {
                    self.log(format!("n{id} g{g} leader of epoch {epoch}"));
                    self.stats.elections += 1;
                    if let Some(other) = self.leaders.insert((g, epoch), id) {
                        return Err(format!(
                            "two leaders in g{g} epoch {epoch}: n{other} and n{id}"
                        ));
                    }
                    self.check_new_leader(id, g)?;
                    self.nodes[i].leader_hw[gi] = Some((epoch, self.nodes[i].hw[gi].0));
                    new_leaders.push(g);
                }
                Action::BecomeFollower { epoch, leader } => {
                    self.log(format!("n{id} g{g} follower in {epoch} of {leader:?}"));
                    self.nodes[i].leader_hw[gi] = None;
                }
                Action::LeaderReady { epoch } => self.log(format!("n{id} g{g} ready in {epoch}")),
                Action::MembershipChanged(m) => self.log(format!("n{id} g{g} membership {m:?}")),
                Action::Send { .. } => unreachable!("the node multiplexer gathers sends"),
            }
        }
        if crash_at.is_some() {
            self.log(format!("n{id} crashes before sending"));
            self.crash(id);
            return Ok(());
        }
        // As the real sender: appends filled short are reported at once, and the next
        // appends of the window the core then asks for travel in the same message.
        let mut messages: Vec<(NodeMessage, usize)> =
            out.messages.into_iter().map(|m| (m, 0)).collect();
        for _ in 0..=MAX_CATCHUP_APPENDS_IN_FLIGHT {
            let mut short = Vec::new();
            for (m, done) in &mut messages {
                short.extend(self.fill(m, *done));
                *done = m.items.len();
            }
            if short.is_empty() {
                break;
            }
            let node = self.nodes[i].node.as_mut().expect("a node sending is live");
            for (g, to, epoch, prev, fill_end, filled) in short {
                node.on_append_filled(g, to, epoch, prev, fill_end, filled);
            }
            let more = node.take_output();
            assert!(more.actions.is_empty(), "a short fill only sends");
            for m in more.messages {
                match messages.iter_mut().find(|(q, _)| q.to == m.to) {
                    Some((q, _)) => q.items.extend(m.items),
                    None => messages.push((m, 0)),
                }
            }
        }
        for (m, _) in messages {
            self.send(m);
        }
        for g in appended {
            let end = self.nodes[i].disks[g as usize].end();
            self.with_node(id, |n| n.on_appended(g, end))?;
        }
        // A new leader usually appends one batch of its epoch at once (the role of KRaft's
        // LeaderChange control batch) so it can commit, and publish its epoch, without waiting
        // for a client; sometimes it waits for the client, so old-epoch batches sit uncommitted.
        for g in new_leaders {
            if !self.faults || self.rng.per_mille(self.cfg.leader_start_batch) {
                self.propose_at(id, g)?;
            }
        }
        Ok(())
    }

    /// Fills the appends of `m` from item `from` on, at most `max_fill_batches` each; returns
    /// the appends filled short, (group, to, epoch, prev offset, fill end, filled end), for
    /// the sender to report. The appends after a short one to the same group are dropped, as
    /// the real sender does: they start past what was sent.
    #[allow(clippy::type_complexity)]
    fn fill(
        &self,
        m: &mut NodeMessage,
        from: usize,
    ) -> Vec<(GroupId, NodeId, Epoch, Offset, Offset, Offset)> {
        let disks = &self.nodes[Self::idx(m.from)].disks;
        let (to, max) = (m.to, self.cfg.max_fill_batches);
        let mut short = Vec::new();
        let mut cut: Vec<GroupId> = Vec::new();
        let mut tail = m.items.split_off(from);
        tail.retain_mut(|(g, item)| {
            let Message::Append(req) = item else {
                return true;
            };
            if cut.contains(g) {
                return false;
            }
            if req.fill_end > req.prev_offset {
                let disk = &disks[*g as usize];
                let start = disk.batches.partition_point(|b| b.base < req.prev_offset);
                req.batches = disk.batches[start..]
                    .iter()
                    .take_while(|b| b.end() <= req.fill_end)
                    .take(max)
                    .cloned()
                    .collect();
                let filled = req.batches.last().map_or(req.prev_offset, |b| b.end());
                if filled < req.fill_end {
                    cut.push(*g);
                    short.push((*g, to, req.epoch, req.prev_offset, req.fill_end, filled));
                }
            }
            true
        });
        m.items.extend(tail);
        short
    }

    /// A busy leader's keep-alives (`Replica::keepalives`), as a shard sends them for a group
    /// whose lock a write holds: the leader's state does not change.
    fn keepalive(&mut self) {
        let Some(id) = self.pick_live() else {
            return;
        };
        let Some(node) = self.nodes[Self::idx(id)].node.as_ref() else {
            return;
        };
        let mut to_peer: BTreeMap<NodeId, Vec<(GroupId, Message)>> = BTreeMap::new();
        for g in 0..self.cfg.groups as GroupId {
            let Some(r) = node.group(g) else {
                continue;
            };
            let mut msgs = Vec::new();
            r.keepalives(&mut msgs);
            for (to, m) in msgs {
                to_peer.entry(to).or_default().push((g, m));
            }
        }
        for (to, items) in to_peer {
            self.stats.keepalives += items.len() as u64;
            self.send(NodeMessage {
                from: id,
                to,
                items,
            });
        }
    }

    fn send(&mut self, m: NodeMessage) {
        self.stats.messages += 1;
        self.send_packet(Packet::Consensus(m));
    }

    /// Blocked links, drops, duplicates and delays apply to pings as to consensus messages.
    fn send_packet(&mut self, p: Packet) {
        if self.blocked.contains(&p.link()) || (self.faults && self.rng.per_mille(self.cfg.drop)) {
            return;
        }
        let copies = if self.faults && self.rng.per_mille(self.cfg.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut at = self.now + 1 + self.rng.below(self.cfg.max_delay_steps);
            if let Packet::Consensus(_) = p {
                let due = self.link_due.entry(p.link()).or_default();
                if self.fifo_links {
                    at = at.max(*due);
                }
                *due = at.max(*due);
            }
            self.sent += 1;
            self.net.push(InFlight {
                at,
                seq: self.sent,
                packet: p.clone(),
            });
        }
    }

    /// Delivers every ping that is due. One consensus message per delivery step stands for a
    /// node's work on it; a ping is next to no work, and every tick sends one to each peer:
    /// taking delivery steps, they would crowd the consensus messages out of the network.
    fn deliver_pings(&mut self) {
        let mut k = 0;
        while k < self.net.len() {
            let due = self.net[k].at <= self.now;
            let Packet::Ping { from, to, ping } = self.net[k].packet else {
                k += 1;
                continue;
            };
            if !due {
                k += 1;
                continue;
            }
            self.net.remove(k);
            if self.blocked.contains(&(from, to)) {
                continue;
            }
            // Nothing to perform: a ping only feeds the receiver's liveness view.
            if let Some(n) = self.nodes[Self::idx(to)].node.as_mut() {
                n.receive_ping(from, ping);
            }
        }
    }

    /// Delivers one consensus message that is due, picked at random.
    fn deliver(&mut self) -> Check {
        // With links in order, only the oldest message of each link may go.
        let mut heads: BTreeMap<(NodeId, NodeId), u64> = BTreeMap::new();
        if self.fifo_links {
            for f in self.net.iter() {
                if let Packet::Consensus(_) = f.packet {
                    let h = heads.entry(f.packet.link()).or_insert(f.seq);
                    *h = (*h).min(f.seq);
                }
            }
        }
        let ready: Vec<usize> = (0..self.net.len())
            .filter(|&k| {
                let f = &self.net[k];
                f.at <= self.now
                    && matches!(f.packet, Packet::Consensus(_))
                    && (!self.fifo_links || heads.get(&f.packet.link()) == Some(&f.seq))
            })
            .collect();
        if ready.is_empty() {
            return Ok(());
        }
        let k = ready[self.rng.below(ready.len() as u64) as usize];
        let Packet::Consensus(m) = self.net.swap_remove(k).packet else {
            unreachable!("only consensus messages are picked")
        };
        if self.blocked.contains(&(m.from, m.to)) {
            return Ok(());
        }
        if std::env::var_os("SPATE_SIM_TRACE_MESSAGES").is_some() {
            for (g, item) in &m.items {
                let short = match item {
                    Message::Append(r) => format!(
                        "append prev ({}, {}) commit {} quiesce {:#x} batches {:?}",
                        r.prev_offset,
                        r.prev_epoch,
                        r.commit,
                        r.quiesce,
                        r.batches
                            .first()
                            .map(|b| b.base)
                            .zip(r.batches.last().map(|b| b.end()))
                    ),
                    other => format!("{other:?}"),
                };
                self.log(format!("n{} -> n{} g{g}: {short}", m.from, m.to));
            }
        }
        self.with_node(m.to, |n| n.receive(m))?;
        Ok(())
    }

    // ---- faults and the client -----------------------------------------------------------------

    fn crash(&mut self, id: NodeId) {
        self.stats.crashes += 1;
        let n = &mut self.nodes[Self::idx(id)];
        n.node = None;
        for d in &mut n.disks {
            let durable = d.durable;
            d.truncate_batches(durable);
        }
    }

    fn crash_any(&mut self) {
        // Leaders crash half the time: leader churn is where consensus bugs live.
        let g = self.rng.below(self.cfg.groups as u64) as GroupId;
        let leader = if self.rng.per_mille(500) {
            self.leader_of(g)
        } else {
            None
        };
        if let Some(id) = leader.or_else(|| self.pick_live()) {
            self.log(format!("n{id} crashes"));
            self.crash(id);
        }
    }

    fn restart_any(&mut self) -> Check {
        let down: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|n| n.node.is_none())
            .map(|n| n.id)
            .collect();
        if down.is_empty() {
            return Ok(());
        }
        let id = down[self.rng.below(down.len() as u64) as usize];
        self.log(format!("n{id} restarts"));
        self.start(id);
        Ok(())
    }

    fn partition(&mut self) {
        let n = self.cfg.nodes as u64;
        let a = 1 + self.rng.below(n);
        if self.rng.per_mille(500) {
            // Isolate a node both ways.
            for b in 1..=n {
                if b != a {
                    self.blocked.insert((a, b));
                    self.blocked.insert((b, a));
                }
            }
            self.log(format!("isolate n{a}"));
        } else {
            let b = 1 + self.rng.below(n);
            if a != b {
                self.blocked.insert((a, b));
                self.log(format!("block n{a} -> n{b}"));
            }
        }
    }

    fn fsync(&mut self) -> Check {
        let Some(id) = self.pick_live() else {
            return Ok(());
        };
        let i = Self::idx(id);
        for g in 0..self.cfg.groups {
            let disk = &mut self.nodes[i].disks[g];
            disk.durable = disk.batches.len();
            let end = disk.end();
            // Reported in the same step: no truncation can slip between the fsync and the report.
            self.with_node(id, |n| n.on_durable(g as GroupId, end))?;
            if self.nodes[i].node.is_none() {
                break;
            }
        }
        Ok(())
    }

    fn client_propose(&mut self) -> Check {
        let g = self.rng.below(self.cfg.groups as u64) as GroupId;
        // Clients find the leader as Kafka clients do: they ask, and may ask a stale one.
        let target = if self.rng.per_mille(800) {
            self.leader_of(g)
        } else {
            self.pick_live()
        };
        match target {
            Some(id) => self.propose_at(id, g),
            None => Ok(()),
        }
    }

    fn propose_at(&mut self, id: NodeId, g: GroupId) -> Check {
        let n = 1 + self.rng.below(3) as usize;
        let mut batches = Vec::with_capacity(n);
        for _ in 0..n {
            self.next_payload += 1;
            let count = 1 + self.rng.below(4) as u32;
            batches.push((count, Bytes::from(format!("g{g}-p{}", self.next_payload))));
        }
        let res = self.with_node(id, |node| {
            let r = node.propose(g, &batches);
            (r, node.group(g).map(|r| r.epoch()))
        })?;
        if let Some((Ok(base), Some(epoch))) = res {
            let mut at = base;
            for (count, bytes) in batches {
                self.pending[g as usize].push(Proposal {
                    base: at,
                    epoch,
                    bytes,
                });
                at += u64::from(count);
            }
        }
        Ok(())
    }

    fn transfer(&mut self) -> Check {
        let g = self.rng.below(self.cfg.groups as u64) as GroupId;
        let Some(leader) = self.leader_of(g) else {
            return Ok(());
        };
        let target = 1 + self.rng.below(self.cfg.nodes as u64);
        let res = self.with_node(leader, |n| n.transfer_leadership(g, target))?;
        if let Some(Ok(())) = res {
            self.stats.transfers += 1;
            self.log(format!("g{g} transfer n{leader} -> n{target}"));
        }
        Ok(())
    }

    fn change_membership(&mut self) -> Check {
        let g = self.rng.below(self.cfg.groups as u64) as GroupId;
        let Some(leader) = self.leader_of(g) else {
            return Ok(());
        };
        let cur = self.nodes[Self::idx(leader)]
            .node
            .as_ref()
            .unwrap()
            .group(g)
            .unwrap()
            .membership()
            .clone();
        let mut next = cur.clone();
        let outsiders: Vec<NodeId> = (1..=self.cfg.nodes as NodeId)
            .filter(|n| !cur.contains(*n))
            .collect();
        match self.rng.below(3) {
            0 if !outsiders.is_empty() => {
                next.learners
                    .push(outsiders[self.rng.below(outsiders.len() as u64) as usize]);
            }
            1 if !cur.learners.is_empty() => {
                let l = next
                    .learners
                    .remove(self.rng.below(cur.learners.len() as u64) as usize);
                if self.rng.per_mille(700) {
                    next.voters.push(l);
                }
            }
            _ if cur.voters.len() > 3 => {
                let k = self.rng.below(cur.voters.len() as u64) as usize;
                next.voters.remove(k);
            }
            _ => return Ok(()),
        }
        let res = self.with_node(leader, |n| {
            n.propose_membership(g, next.clone(), Bytes::from_static(b"membership"))
        })?;
        if let Some(Ok(base)) = res {
            self.stats.membership_changes += 1;
            self.log(format!("g{g} n{leader} membership {next:?} at {base}"));
        }
        Ok(())
    }

    // ---- invariants ----------------------------------------------------------------------------

    fn on_high_watermark(&mut self, id: NodeId, g: GroupId, h: Offset) -> Check {
        let i = Self::idx(id);
        let gi = g as usize;
        let disk = &self.nodes[i].disks[gi];
        let Some(k) = disk.index_of_end(h) else {
            let mut logs = String::new();
            for n in &self.nodes {
                let d = &n.disks[gi];
                let tail: Vec<(Offset, u32, Epoch)> = d
                    .batches
                    .iter()
                    .filter(|b| b.end() + 60 > h)
                    .map(|b| (b.base, b.count, b.epoch))
                    .collect();
                let _ = write!(logs, "\n  n{} durable {} {:?}", n.id, d.durable, tail);
            }
            return Err(format!(
                "n{id} g{g}: high watermark {h} is not a batch end of its log (end {}){logs}",
                disk.end()
            ));
        };
        let committed = &mut self.committed[gi];
        let common = committed.len().min(k);
        if common > 0 && committed[common - 1] != disk.prefix[common - 1] {
            return Err(format!("n{id} g{g}: committed prefix differs below {h}"));
        }
        if k > committed.len() {
            self.stats.committed_batches += (k - committed.len()) as u64;
            committed.extend_from_slice(&disk.prefix[committed.len()..k]);
        }
        let prev = self.nodes[i].hw[gi].0;
        if h < prev {
            return Err(format!(
                "n{id} g{g}: high watermark went back {prev} -> {h}"
            ));
        }
        self.nodes[i].hw[gi] = (h, k);
        let is_leader = self.nodes[i]
            .node
            .as_ref()
            .and_then(|n| n.group(g))
            .is_some_and(|r| r.is_leader());
        if is_leader {
            // The client's batches below the leader's high watermark are acknowledged now.
            let disk = &self.nodes[i].disks[gi];
            let pending = std::mem::take(&mut self.pending[gi]);
            for p in pending {
                if p.base >= h {
                    self.pending[gi].push(p);
                } else if disk
                    .find(p.base)
                    .is_some_and(|b| b.bytes == p.bytes && b.epoch == p.epoch)
                {
                    self.stats.acked_batches += 1;
                    self.acked[gi].push(p);
                }
            }
        }
        Ok(())
    }

    /// Leader completeness: a new leader holds the whole committed prefix and every
    /// acknowledged batch.
    fn check_new_leader(&self, id: NodeId, g: GroupId) -> Check {
        let disk = &self.nodes[Self::idx(id)].disks[g as usize];
        let committed = &self.committed[g as usize];
        if committed.len() > disk.batches.len()
            || committed
                .last()
                .is_some_and(|c| *c != disk.prefix[committed.len() - 1])
        {
            return Err(format!(
                "n{id} g{g}: new leader lacks the committed prefix ({} batches)",
                committed.len()
            ));
        }
        for p in &self.acked[g as usize] {
            if disk.find(p.base).is_none_or(|b| b.bytes != p.bytes) {
                return Err(format!(
                    "n{id} g{g}: new leader lacks acknowledged batch at {}",
                    p.base
                ));
            }
        }
        Ok(())
    }

    /// Checked after every step: log matching between every two replicas; every replica's
    /// high watermark within its log and over the committed prefix; a leader's high watermark
    /// never decreasing.
    fn check_step(&mut self) -> Check {
        for g in 0..self.cfg.groups {
            for a in 0..self.nodes.len() {
                for b in a + 1..self.nodes.len() {
                    check_matching(&self.nodes[a].disks[g], &self.nodes[b].disks[g])
                        .map_err(|e| format!("g{g} n{} vs n{}: {e}", a + 1, b + 1))?;
                }
            }
            let committed = &self.committed[g];
            for n in &mut self.nodes {
                let Some(node) = n.node.as_ref() else {
                    continue;
                };
                let r = node
                    .group(g as GroupId)
                    .expect("every node hosts every group");
                let disk = &n.disks[g];
                if r.high_watermark() > r.log_end() || r.high_watermark() > disk.end() {
                    return Err(format!(
                        "n{} g{g}: high watermark {} past the log end {}",
                        n.id,
                        r.high_watermark(),
                        disk.end()
                    ));
                }
                let (_, k) = n.hw[g];
                if k > disk.batches.len() || (k > 0 && disk.prefix[k - 1] != committed[k - 1]) {
                    return Err(format!(
                        "n{} g{g}: lost or changed committed batches below its high watermark",
                        n.id
                    ));
                }
                if r.is_leader() {
                    let e = r.epoch();
                    match n.leader_hw[g] {
                        Some((le, lh)) if le == e && r.high_watermark() < lh => {
                            return Err(format!("n{} g{g}: leader high watermark decreased", n.id));
                        }
                        _ => n.leader_hw[g] = Some((e, r.high_watermark())),
                    }
                }
            }
        }
        Ok(())
    }

    /// Heals everything and requires each group to elect a leader that commits all it has.
    fn settle(&mut self) -> Check {
        self.log("settle".into());
        self.faults = false;
        self.pinned = false;
        self.fair_clocks = false;
        self.fifo_links = false;
        self.blocked.clear();
        let down: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|n| n.node.is_none())
            .map(|n| n.id)
            .collect();
        for id in down {
            self.start(id);
        }
        self.await_progress(None)
    }

    /// Steps until every group has a leader, not on `without`, that has committed everything
    /// it has in its own epoch, and `without` (if live) leads nothing; at most `SETTLE_STEPS`.
    fn await_progress(&mut self, without: Option<NodeId>) -> Check {
        let deadline = self.now + SETTLE_STEPS;
        while self.now < deadline {
            self.step()?;
            let mut done = true;
            for g in 0..self.cfg.groups {
                let g = g as GroupId;
                if let Some(w) = without {
                    if self.replica(w, g).is_some_and(|r| r.is_leader()) {
                        done = false;
                    }
                }
                let Some(l) = self.leader_of_without(g, without) else {
                    done = false;
                    continue;
                };
                let r = self.replica(l, g).unwrap();
                let epoch = r.epoch();
                if r.epoch_history().last_epoch() != epoch {
                    // Refused while a transfer started before the settle phase is pending.
                    done = false;
                    self.propose_at(l, g)?;
                } else if !r.is_epoch_ready()
                    || r.high_watermark() < r.log_end()
                    || self.pending[g as usize].iter().any(|p| p.epoch == epoch)
                {
                    done = false;
                }
            }
            if done {
                return Ok(());
            }
        }
        Err(format!(
            "no progress within {SETTLE_STEPS} fault-free steps{}:{}",
            without.map_or(String::new(), |w| format!(" without n{w}")),
            self.state()
        ))
    }

    /// Each live replica's state, for a failure report.
    fn state(&self) -> String {
        let mut state = String::new();
        for n in &self.nodes {
            let Some(node) = n.node.as_ref() else {
                let _ = write!(state, "\n  n{} down", n.id);
                continue;
            };
            for (g, r) in node.groups() {
                let _ = write!(
                    state,
                    "\n  n{} g{g}: {:?} epoch {} leader {:?} hw {} end {} durable {} disk {} pending {} quiet {:?} members {:?}",
                    n.id, r.role(), r.epoch(), r.leader(), r.high_watermark(), r.log_end(),
                    r.durable_end(), n.disks[g as usize].end(), self.pending[g as usize].len(),
                    r.quiesced(), r.membership()
                );
            }
        }
        state
    }

    fn replica(&self, id: NodeId, g: GroupId) -> Option<&Replica> {
        self.nodes[Self::idx(id)]
            .node
            .as_ref()
            .and_then(|n| n.group(g))
    }

    /// The live leader of `g` on a node other than `without` (the newest, should an isolated
    /// node still believe it leads an older epoch).
    fn leader_of_without(&self, g: GroupId, without: Option<NodeId>) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter(|n| Some(n.id) != without)
            .filter_map(|n| {
                self.replica(n.id, g)
                    .filter(|r| r.is_leader())
                    .map(|r| (r.epoch(), n.id))
            })
            .max()
            .map(|(_, id)| id)
    }

    /// Whether group `g` is quiet throughout: its leader, and every other member's replica
    /// quiet under that leader's current token. `Err` names the first replica that is not.
    /// One exception: a learner with all of the leader's log, committed, that some message
    /// woke (an older heartbeat that the network let overtake the quiescing one): it never
    /// campaigns, so it stays awake, and costs nothing. (A voter so woken campaigns, which
    /// wakes its leader, and the group goes quiet again.)
    fn group_quiet(&self, g: GroupId) -> Result<(), String> {
        let l = self.leader_of(g).ok_or("no leader")?;
        let leader = self.replica(l, g).unwrap();
        if leader.quiesced() != Some(Quiesced::Leader) {
            return Err(format!("leader n{l} is {:?}", leader.quiesced()));
        }
        let token = self.nodes[Self::idx(l)].token;
        let members = leader.membership().clone();
        for m in members.peers(l) {
            let Some(r) = self.replica(m, g) else {
                return Err(format!("member n{m} is down"));
            };
            let want = Some(Quiesced::Follower { leader: l, token });
            let settled_learner = members.is_learner(m)
                && r.quiesced().is_none()
                && r.leader() == Some(l)
                && r.epoch() == leader.epoch()
                && r.high_watermark() == leader.log_end()
                && r.log_end() == leader.log_end();
            if r.quiesced() != want && !settled_learner {
                return Err(format!("member n{m} is {:?}, not {want:?}", r.quiesced()));
            }
        }
        Ok(())
    }

    /// Whether a message of group `g` is in flight.
    fn in_flight(&self, g: GroupId) -> bool {
        self.net.iter().any(|f| match &f.packet {
            Packet::Consensus(m) => m.items.iter().any(|(ig, _)| *ig == g),
            Packet::Ping { .. } => false,
        })
    }

    /// A live replica of `g` outside its leader's membership that may campaign (a removed
    /// voter that never learnt of its removal: nothing reaches it any more). Its pre-votes
    /// may wake the group every election timeout (always its leader, if the stale membership
    /// holds it); in a broker the controller deletes such a replica.
    fn stale_voter(&self, g: GroupId) -> Option<NodeId> {
        let l = self.leader_of(g)?;
        let members = self.replica(l, g)?.membership().clone();
        self.live().into_iter().find(|&n| {
            !members.contains(n)
                && self
                    .replica(n, g)
                    .is_some_and(|r| r.membership().is_voter(n))
        })
    }

    /// No faults, no client, clocks at one rate and links in order: within `IDLE_MAX_STEPS`
    /// every group must go quiet throughout (leader and members quiet, nothing of it in
    /// flight: the point of quiescence, idle groups send nothing), and once so stay quiet
    /// (nothing wakes a healthy idle group), `IDLE_HOLD_STEPS` beyond the last. Groups a stale voter disturbs are left
    /// out (see [`Self::stale_voter`]), but must keep their leader (on 595081e, where a vote
    /// woke a quiet follower, the followers it woke together elected one of them: seed 1075
    /// of the membership configuration). Membership does not change here.
    fn idle(&mut self) -> Check {
        self.log("idle".into());
        self.fair_clocks = true;
        self.fifo_links = true;
        let groups = self.cfg.groups as GroupId;
        let start = self.now;
        let stale: Vec<Option<NodeId>> = (0..groups).map(|g| self.stale_voter(g)).collect();
        // Who leads each group once the warm-up is over, in which epoch.
        let mut leading: Vec<Option<(NodeId, Epoch)>> = Vec::new();
        let mut quiet_since: Vec<Option<u64>> = vec![None; self.cfg.groups];
        let mut hold_until = None;
        loop {
            self.step()?;
            let warm = self.now - start > IDLE_WARMUP_STEPS;
            if warm && leading.is_empty() {
                leading = (0..groups)
                    .map(|g| {
                        self.leader_of(g)
                            .map(|l| (l, self.replica(l, g).unwrap().epoch()))
                    })
                    .collect();
            }
            for g in 0..groups {
                if stale[g as usize].is_some() {
                    continue;
                }
                match (self.group_quiet(g), quiet_since[g as usize]) {
                    // Nothing but a node falling silent may wake it now.
                    (Ok(()), None) if warm && !self.in_flight(g) => {
                        self.log(format!("g{g} quiet throughout"));
                        quiet_since[g as usize] = Some(self.now);
                    }
                    (Err(e), Some(since)) => {
                        return Err(format!(
                            "g{g} quiet throughout since step {since} but then not: {e}{}",
                            self.state()
                        ));
                    }
                    _ => {}
                }
            }
            match hold_until {
                Some(h) if self.now >= h => break,
                Some(_) => {}
                None => {
                    let settled = (0..groups)
                        .all(|g| quiet_since[g as usize].is_some() || stale[g as usize].is_some());
                    if settled && warm {
                        self.stats.idle_steps_to_quiet += self.now - start;
                        hold_until = Some(self.now + IDLE_HOLD_STEPS);
                    } else if self.now - start >= IDLE_MAX_STEPS {
                        let mut why = String::new();
                        for g in (0..groups).filter(|&g| quiet_since[g as usize].is_none()) {
                            let e = self.group_quiet(g).err().unwrap_or("in flight".into());
                            let _ = write!(why, " g{g}: {e};");
                        }
                        return Err(format!(
                            "not quiet within {IDLE_MAX_STEPS} idle steps:{why}{}",
                            self.state()
                        ));
                    }
                }
            }
        }
        for g in 0..groups {
            let Some(n) = stale[g as usize] else {
                continue;
            };
            self.log(format!("g{g}: stale voter n{n}, quiet or not"));
            self.stats.idle_stale_voter_groups += 1;
            let now = self
                .leader_of(g)
                .map(|l| (l, self.replica(l, g).unwrap().epoch()));
            if now != leading[g as usize] {
                return Err(format!(
                    "g{g}: stale voter n{n} deposed the idle leader: {:?} then {now:?}{}",
                    leading[g as usize],
                    self.state()
                ));
            }
        }
        let quiet: u64 = self
            .nodes
            .iter()
            .filter_map(|n| n.node.as_ref())
            .map(|n| u64::from(quiet_mask(n).count_ones()))
            .sum();
        self.stats.quiet_at_idle_end += quiet;
        Ok(())
    }

    /// A quiet leader's node crashes (and stays down) or is isolated both ways (and stays
    /// so): the quiet followers of its groups hear of it only through the missing pings, and
    /// must elect elsewhere; an isolated leader must step down (check-quorum), which it does
    /// only if being woken by its members' silence keeps it awake (on 595081e it went quiet
    /// again at once: seed 1000 of the sparse-writes configuration). The clocks stay at one
    /// rate and the links in order, as in the idle phase.
    fn failover(&mut self) -> Check {
        let l = self.leader_of(0).expect("the idle phase checked a leader");
        self.pinned = true;
        if self.rng.per_mille(500) {
            self.log(format!("failover: n{l} crashes"));
            self.stats.failovers_crash += 1;
            self.crash(l);
        } else {
            self.log(format!("failover: isolate n{l}"));
            self.stats.failovers_isolate += 1;
            for b in 1..=self.cfg.nodes as NodeId {
                if b != l {
                    self.blocked.insert((l, b));
                    self.blocked.insert((b, l));
                }
            }
        }
        self.await_progress(Some(l))
    }
}

/// The groups of `node` that are quiet, as a bit mask (bit g: group g).
fn quiet_mask(node: &Node) -> u64 {
    node.groups()
        .filter(|(_, r)| r.is_quiesced())
        .fold(0, |m, (g, _)| m | 1 << g)
}

/// Log matching: if two logs hold a batch with the same base offset and epoch at the same
/// position, everything up to it is identical. Checking the highest such position suffices.
fn check_matching(a: &Disk, b: &Disk) -> Result<(), String> {
    let n = a.batches.len().min(b.batches.len());
    for i in (0..n).rev() {
        let (x, y) = (&a.batches[i], &b.batches[i]);
        if x.base == y.base && x.epoch == y.epoch {
            if a.prefix[i] != b.prefix[i] {
                return Err(format!(
                    "same offset {} and epoch {} but different logs below",
                    x.base, x.epoch
                ));
            }
            return Ok(());
        }
    }
    Ok(())
}

/// Runs `seed` and panics with the replay line if an invariant breaks (or the core panics).
pub fn run_seed(seed: u64, cfg: SimConfig) -> Stats {
    let label = format!("{cfg:?}");
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Sim::new(seed, cfg).run())) {
        Ok(Ok(stats)) => stats,
        Ok(Err(report)) => panic!("{report}"),
        Err(p) => {
            eprintln!(
                "simulation panicked: seed {seed} ({label})\nreplay: SPATE_SIM_SEED={seed} cargo nextest run --release -p spate-replication --test simulation replay"
            );
            std::panic::resume_unwind(p)
        }
    }
}
