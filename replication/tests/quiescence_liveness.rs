//! Quiescence and liveness: three replicas driven by hand as a shard runtime drives them
//! (liveness checked before each tick and before each message; a quiet replica takes no
//! ticks), the node-level liveness given as a table. Each test is a liveness hole a review
//! found (the first three on the build before a7b0606, the last before 68ef502).

use std::collections::VecDeque;

use bytes::Bytes;
use spate_replication::{
    Action, Config, Membership, Message, NodeId, Persisted, Replica, DEFAULT_ELECTION_TIMEOUT_TICKS,
};

const N: u64 = 3;

struct C {
    reps: Vec<Replica>,
    net: VecDeque<(NodeId, NodeId, Message)>,
    /// Nodes whose messages (both ways) are dropped.
    cut: Vec<NodeId>,
    /// Nodes that receive nothing (they still send).
    deaf: Vec<NodeId>,
    /// live[i][j]: node i+1 hears node j+1's pings.
    live: [[bool; N as usize]; N as usize],
}

fn token(n: NodeId) -> u64 {
    100 + n
}

impl C {
    fn new(quiesce: bool) -> Self {
        let m = Membership::voters(&(1..=N).collect::<Vec<_>>());
        let reps = (1..=N)
            .map(|id| {
                let cfg = Config {
                    quiesce: quiesce.then_some(token(id)),
                    ..Config::default()
                };
                Replica::new(id, cfg, id, Persisted::new_group(m.clone()))
            })
            .collect();
        C {
            reps,
            net: VecDeque::new(),
            cut: vec![],
            deaf: vec![],
            live: [[true; 3]; 3],
        }
    }
    fn r(&mut self, id: NodeId) -> &mut Replica {
        &mut self.reps[(id - 1) as usize]
    }
    /// Every append written and durable at once; batches carried in the message.
    fn perform(&mut self, id: NodeId, out: Vec<Action>) {
        for a in out {
            match a {
                Action::Send { to, msg } => self.net.push_back((id, to, msg)),
                Action::Append { batches } => {
                    if let Some(end) = batches.last().map(|b| b.end()) {
                        let mut o = Vec::new();
                        self.r(id).on_appended(end, &mut o);
                        self.r(id).on_durable(end, &mut o);
                        self.perform(id, o);
                    }
                }
                _ => {}
            }
        }
    }
    fn call(&mut self, id: NodeId, f: impl FnOnce(&mut Replica, &mut Vec<Action>)) {
        let mut out = Vec::new();
        f(self.r(id), &mut out);
        self.perform(id, out);
    }
    fn deliver(&mut self) {
        while let Some((from, to, msg)) = self.net.pop_front() {
            if self.cut.contains(&from) || self.cut.contains(&to) || self.deaf.contains(&to) {
                continue;
            }
            // Heartbeats only in these tests after the first write: fill from nothing.
            let msg = match msg {
                Message::Append(mut req) if req.fill_end > req.prev_offset => {
                    req.batches = vec![spate_replication::Batch {
                        base: req.prev_offset,
                        count: (req.fill_end - req.prev_offset) as u32,
                        epoch: req.epoch,
                        bytes: Bytes::new(),
                        membership: None,
                    }];
                    Message::Append(req)
                }
                m => m,
            };
            // As the runtime does: a quiet replica hears the liveness before the message.
            let row = self.live[(to - 1) as usize];
            self.call(to, |r, out| {
                r.check_liveness(|n| row[(n - 1) as usize].then_some(token(n)), out);
                r.step(from, msg, out)
            });
        }
    }
    /// One runtime tick of `id`: liveness check, then the tick unless quiet.
    fn tick(&mut self, id: NodeId) {
        let row = self.live[(id - 1) as usize];
        self.call(id, |r, out| {
            r.check_liveness(|n| row[(n - 1) as usize].then_some(token(n)), out);
            if !r.is_quiesced() {
                r.tick(out);
            }
        });
    }
    fn tick_all(&mut self) {
        for id in 1..=N {
            if !self.cut.contains(&id) {
                self.tick(id);
            }
        }
        self.deliver();
    }
    /// Quiescence on, `shift` ticks first (a different election-timeout jitter), a leader
    /// settled and every replica quiet. Returns the leader.
    fn all_quiet(shift: u64) -> (C, NodeId) {
        let mut c = C::new(true);
        for _ in 0..shift {
            c.tick_all();
        }
        let l = c.settle();
        for _ in 0..20 {
            c.tick_all();
        }
        assert!((1..=N).all(|i| c.r(i).is_quiesced()), "all quiet");
        (c, l)
    }

    fn settle(&mut self) -> NodeId {
        for _ in 0..200 {
            self.tick_all();
            if self.r(1).is_leader() {
                break;
            }
        }
        assert!(self.r(1).is_leader() || (2..=N).any(|i| self.r(i).is_leader()));
        let l = (1..=N).find(|&i| self.r(i).is_leader()).unwrap();
        let mut out = Vec::new();
        // One record so the epoch is committed.
        for _ in 0..50 {
            self.tick_all();
            if self.r(l).is_epoch_ready() {
                break;
            }
        }
        let _ = self
            .r(l)
            .propose(&[(1, Bytes::from_static(b"x"))], &mut out);
        self.perform(l, out);
        self.deliver();
        l
    }
}

/// A quiet leader cut off from both followers (pings and messages) steps down, as one that
/// never went quiet does: the liveness wakes it, and a woken leader counts no member as
/// acknowledged (it would go quiet again at once) nor the silent ones towards check-quorum.
#[test]
fn a_partitioned_quiet_leader_steps_down() {
    for quiesce in [false, true] {
        let mut c = C::new(quiesce);
        let l = c.settle();
        for _ in 0..20 {
            c.tick_all();
        }
        if quiesce {
            assert!((1..=N).all(|i| c.r(i).is_quiesced()), "all quiet");
        }
        let others: Vec<NodeId> = (1..=N).filter(|&i| i != l).collect();
        for &o in &others {
            c.live[(l - 1) as usize][(o - 1) as usize] = false;
        }
        c.cut = others.clone();
        let mut stepped_down_at = None;
        for t in 0..500 {
            c.tick(l);
            c.net.clear();
            if !c.r(l).is_leader() {
                stepped_down_at = Some(t);
                break;
            }
        }
        let t = stepped_down_at
            .unwrap_or_else(|| panic!("quiesce {quiesce}: still leading after 500 ticks alone"));
        assert!(
            t <= 2 * DEFAULT_ELECTION_TIMEOUT_TICKS,
            "quiesce {quiesce}: stepped down after {t} ticks"
        );
    }
}

/// A quiet leader whose follower's node died lets the follower's silence show (so it leaves
/// the in-sync set) instead of waking and going quiet again for ever.
#[test]
fn a_dead_follower_of_a_quiet_leader_falls_silent() {
    let mut c = C::new(true);
    let l = c.settle();
    for _ in 0..20 {
        c.tick_all();
    }
    let dead = (1..=N).find(|&i| i != l).unwrap();
    c.cut = vec![dead];
    for i in 1..=N {
        c.live[(i - 1) as usize][(dead - 1) as usize] = false;
    }
    for _ in 0..600 {
        c.tick_all();
    }
    assert!(c.r(l).is_leader());
    assert!(
        !c.r(l).is_quiesced(),
        "a leader with a dead member stays awake"
    );
    let silent = c.r(l).peer_silent_ticks(dead).unwrap();
    assert!(
        silent >= 500,
        "the dead follower silent for only {silent} ticks"
    );
}

/// One-way partition: the quiet leader hears nothing (no pings, no answers) while its
/// followers still hear it. A write to it, then to whoever leads afterwards, commits.
#[test]
fn a_deaf_quiet_leader_does_not_block_its_partition() {
    for quiesce in [false, true] {
        let mut c = C::new(quiesce);
        let l = c.settle();
        for _ in 0..20 {
            c.tick_all();
        }
        let others: Vec<NodeId> = (1..=N).filter(|&i| i != l).collect();
        for &o in &others {
            c.live[(l - 1) as usize][(o - 1) as usize] = false;
        }
        c.deaf = vec![l];
        let mut out = Vec::new();
        let end = c
            .r(l)
            .propose(&[(1, Bytes::from_static(b"y"))], &mut out)
            .unwrap()
            + 1;
        c.perform(l, out);
        c.deliver();
        for _ in 0..1000 {
            c.tick_all();
        }
        let now = c
            .reps
            .iter()
            .find(|r| r.is_leader() && !c.deaf.contains(&r.id()))
            .unwrap_or_else(|| panic!("quiesce {quiesce}: no leader that hears"))
            .id();
        let mut out = Vec::new();
        let end2 = c
            .r(now)
            .propose(&[(1, Bytes::from_static(b"z"))], &mut out)
            .unwrap()
            + 1;
        c.perform(now, out);
        for _ in 0..50 {
            c.tick_all();
        }
        assert!(
            c.r(now).high_watermark() >= end2.max(end),
            "quiesce {quiesce}: the write to n{now} did not commit"
        );
    }
}

/// The leader's node dies. One follower notices at once (its election clock starts), the
/// other `lag` ticks later. A pre-vote reaching the second while it is still quiet must not
/// hold the election up by more than the lag (before 5fbaedd it woke the second with a fresh
/// lease: 31 ticks at a lag of 2): a new leader within two election timeouts of the second
/// noticing.
#[test]
fn quiet_followers_elect_within_two_timeouts_when_they_notice_apart() {
    for lag in [0usize, 1, 2, 3, 5] {
        let mut worst = 0;
        for seed_shift in 0..20u64 {
            let (mut c, l) = C::all_quiet(seed_shift);
            let others: Vec<NodeId> = (1..=N).filter(|&i| i != l).collect();
            c.cut = vec![l];
            c.live[(others[0] - 1) as usize][(l - 1) as usize] = false;
            let mut t = 0;
            loop {
                t += 1;
                if t == 1 + lag {
                    c.live[(others[1] - 1) as usize][(l - 1) as usize] = false;
                }
                c.tick_all();
                if others.iter().any(|&o| c.r(o).is_leader()) || t > 1000 {
                    break;
                }
            }
            worst = worst.max(t);
        }
        assert!(
            worst <= 2 * DEFAULT_ELECTION_TIMEOUT_TICKS as usize + 6 + lag,
            "lag {lag}: a new leader after {worst} ticks"
        );
    }
}

/// The leader's node falls silent for a moment (a stall under load: its pings stop) while it
/// is alive and quiet. Its followers wake, but ask it to heartbeat at once (`Message::Wake`),
/// so it keeps the partition in its epoch. Without the ask they woke together and, neither in
/// lease for the other's pre-vote at the end of one timeout, raced the leader's own wake-up
/// (by their pre-vote) to elect.
#[test]
fn a_quiet_leader_whose_node_stalls_for_a_moment_keeps_its_partition() {
    for seed_shift in 0..10u64 {
        let (mut c, l) = C::all_quiet(seed_shift);
        let epoch = c.r(l).epoch();
        let others: Vec<NodeId> = (1..=N).filter(|&i| i != l).collect();
        for &o in &others {
            c.live[(o - 1) as usize][(l - 1) as usize] = false;
        }
        c.tick_all();
        assert!(
            others.iter().all(|&o| !c.r(o).is_quiesced()),
            "followers woke"
        );
        assert!(
            !c.r(l).is_quiesced(),
            "the woken followers asked their leader to heartbeat"
        );
        for &o in &others {
            c.live[(o - 1) as usize][(l - 1) as usize] = true;
        }
        for _ in 0..10 * DEFAULT_ELECTION_TIMEOUT_TICKS {
            c.tick_all();
        }
        assert!(c.r(l).is_leader(), "shift {seed_shift}: n{l} lost the lead");
        assert_eq!(c.r(l).epoch(), epoch, "shift {seed_shift}: an election");
    }
}
