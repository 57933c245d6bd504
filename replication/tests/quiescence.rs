//! Quiescence of idle groups (`Replica::quiesced`), one rule per test, driving a group's
//! replicas by hand as rules.rs does. The caller's part is played here as `Node::tick` plays
//! it: on each tick a replica first hears the node-level liveness (`check_liveness`), then
//! ticks.

// Planted bugs these tests caught (each planted alone in replica.rs as of 5fbaedd, then
// removed): keep-alives sent while quiet (`keepalives_send_nothing_while_quiet`); a leader
// quiescing before its followers made everything durable, and a follower taking a quiescing
// heartbeat with its tail not durable (`a_follower_missing_anything_...`); a quiet replica's
// clocks running (`an_idle_group_goes_quiet_...`, `a_vote_to_a_quiet_follower_...`); the
// leader's liveness compared without its token (`a_quiet_follower_whose_leader_is_not_live_
// ...`); a proposal leaving the leader quiet (`a_proposal_wakes_...`). On 595081e the tests
// marked so below failed.

use std::collections::VecDeque;

use bytes::Bytes;
use spate_replication::{
    Action, AppendRequest, Config, Membership, Message, NodeId, Persisted, Quiesced, Replica, Role,
    VoteRequest,
};

/// Each node's liveness token (its incarnation): any non-zero value, distinct per node.
fn token(id: NodeId) -> u64 {
    0x5eed_0000 + id
}

/// The node-level liveness of a healthy cluster: every node live under its token.
fn all_live(n: NodeId) -> Option<u64> {
    Some(token(n))
}

/// Node `id`'s config: with its token, or (`quiesce` false) without, the old behaviour.
fn cfg(id: NodeId, quiesce: bool) -> Config {
    Config {
        quiesce: quiesce.then(|| token(id)),
        ..Config::default()
    }
}

const T: u32 = spate_replication::DEFAULT_ELECTION_TIMEOUT_TICKS;
const HB: u32 = spate_replication::DEFAULT_HEARTBEAT_INTERVAL_TICKS;

struct Cluster {
    reps: Vec<Replica>,
    /// (from, to, message) in flight, delivered in order.
    net: VecDeque<(NodeId, NodeId, Message)>,
    /// Every batch each node appended, to fill the appends it sends.
    written: Vec<Vec<spate_replication::Batch>>,
    /// A node cut off: nothing to or from it is delivered, and it is not ticked.
    cut: Vec<bool>,
}

impl Cluster {
    /// `members` on nodes 1..=n; `quiesce` says whether their config carries their node's
    /// token.
    fn new(members: &Membership, quiesce: bool) -> Self {
        let n = (members.voters.len() + members.learners.len()) as NodeId;
        let reps = (1..=n)
            .map(|id| {
                Replica::new(
                    id,
                    cfg(id, quiesce),
                    id,
                    Persisted::new_group(members.clone()),
                )
            })
            .collect();
        Cluster {
            reps,
            net: VecDeque::new(),
            written: vec![Vec::new(); n as usize],
            cut: vec![false; n as usize],
        }
    }
    fn ids(&self) -> std::ops::RangeInclusive<NodeId> {
        1..=self.reps.len() as NodeId
    }
    fn r(&mut self, id: NodeId) -> &mut Replica {
        &mut self.reps[(id - 1) as usize]
    }
    fn perform(&mut self, id: NodeId, out: Vec<Action>) {
        let mut written = None;
        for a in out {
            match a {
                Action::Send { to, msg } => self.net.push_back((id, to, msg)),
                Action::Append { batches } => {
                    written = batches.last().map(|b| b.end());
                    self.written[(id - 1) as usize].extend(batches);
                }
                Action::Truncate { end } => {
                    self.written[(id - 1) as usize].retain(|b| b.end() <= end)
                }
                _ => {}
            }
        }
        if let Some(end) = written {
            let mut out = Vec::new();
            self.r(id).on_appended(end, &mut out);
            self.perform(id, out);
        }
    }
    fn call(&mut self, id: NodeId, f: impl FnOnce(&mut Replica, &mut Vec<Action>)) {
        let mut out = Vec::new();
        f(self.r(id), &mut out);
        self.perform(id, out);
    }
    /// Delivers the next message in flight (filling an append's batches from the sender's log).
    fn deliver_one(&mut self) -> Option<(NodeId, NodeId)> {
        let (from, to, msg) = self.net.pop_front()?;
        // Node 4, where a test plays one, is hosted nowhere: what is sent to it is lost.
        if to as usize > self.reps.len()
            || self.cut[(from - 1) as usize]
            || self.cut[(to - 1) as usize]
        {
            return Some((from, to));
        }
        let msg = match msg {
            Message::Append(mut req) if req.fill_end > req.prev_offset => {
                req.batches = self.written[(from - 1) as usize]
                    .iter()
                    .filter(|b| b.base >= req.prev_offset && b.end() <= req.fill_end)
                    .cloned()
                    .collect();
                Message::Append(req)
            }
            m => m,
        };
        self.call(to, |r, out| r.step(from, msg, out));
        Some((from, to))
    }
    fn deliver_all(&mut self) {
        for _ in 0..10_000 {
            if self.deliver_one().is_none() {
                return;
            }
        }
        panic!("messages did not stop");
    }
    fn fsync(&mut self, id: NodeId) {
        let end = self.r(id).log_end();
        self.call(id, |r, out| r.on_durable(end, out));
    }
    /// One tick of node `id` as `Node::tick` gives it: the liveness first, then the clock.
    fn tick(&mut self, id: NodeId, live: impl Fn(NodeId) -> Option<u64>) {
        self.call(id, |r, out| {
            r.check_liveness(live, out);
            r.tick(out);
        });
    }
    /// One tick of every node not cut off, then everything delivered.
    fn tick_all(&mut self, live: impl Fn(NodeId) -> Option<u64> + Copy) {
        for id in self.ids() {
            if !self.cut[(id - 1) as usize] {
                self.tick(id, live);
            }
        }
        self.deliver_all();
    }
    fn propose(&mut self, id: NodeId) {
        let mut out = Vec::new();
        self.r(id)
            .propose(&[(1, Bytes::from_static(b"x"))], &mut out)
            .unwrap();
        self.perform(id, out);
    }
    /// Three voters, node 1 leading with a batch of its epoch committed, durable everywhere,
    /// nothing in flight (the group is idle, not yet quiet).
    fn idle(quiesce: bool) -> Self {
        Cluster::idle_with(&Membership::voters(&[1, 2, 3]), quiesce)
    }
    fn idle_with(members: &Membership, quiesce: bool) -> Self {
        let mut c = Cluster::new(members, quiesce);
        for _ in 0..100 {
            c.tick(1, all_live);
            c.deliver_all();
            if c.r(1).is_leader() {
                break;
            }
        }
        assert!(c.r(1).is_leader());
        c.propose(1);
        c.deliver_all();
        for id in c.ids() {
            c.fsync(id);
        }
        c.deliver_all();
        assert!(c.r(1).is_epoch_ready());
        assert_eq!(c.r(1).high_watermark(), c.r(1).log_end());
        c
    }
    /// An idle group of three voters ticked until the leader and both followers are quiet;
    /// returns the ticks.
    fn quiet() -> (Self, u32) {
        Cluster::quiet_with(&Membership::voters(&[1, 2, 3]))
    }
    fn quiet_with(members: &Membership) -> (Self, u32) {
        let mut c = Cluster::idle_with(members, true);
        for t in 1..=10 * HB {
            c.tick_all(all_live);
            if c.ids().all(|id| c.reps[(id - 1) as usize].is_quiesced()) {
                return (c, t);
            }
        }
        panic!(
            "the group did not go quiet: {:?}",
            c.reps.iter().map(|r| r.quiesced()).collect::<Vec<_>>()
        );
    }
}

fn appends_to(out: &[Action], to: NodeId) -> Vec<AppendRequest> {
    out.iter()
        .filter_map(|a| match a {
            Action::Send {
                to: t,
                msg: Message::Append(req),
            } if *t == to => Some(req.clone()),
            _ => None,
        })
        .collect()
}

fn sends_vote(out: &[Action]) -> bool {
    out.iter().any(|a| {
        matches!(
            a,
            Action::Send {
                msg: Message::Vote(_),
                ..
            }
        )
    })
}

/// The leader's quiescing heartbeat as the core builds it, for a follower to take by hand.
fn quiescing_heartbeat(leader: &Replica) -> AppendRequest {
    let end = leader.log_end();
    AppendRequest {
        epoch: leader.epoch(),
        prev_offset: end,
        prev_epoch: leader.epoch_history().epoch_before(end),
        commit: leader.high_watermark(),
        batches: Vec::new(),
        fill_end: end,
        quiesce: token(leader.id()),
    }
}

#[test]
fn an_idle_group_goes_quiet_within_a_few_heartbeats_and_then_sends_nothing() {
    let (mut c, ticks) = Cluster::quiet();
    // One heartbeat carries the commit point, the answers to it settle every follower, the
    // next one carries the token.
    assert!(ticks <= 3 * HB, "quiet after {ticks} ticks");
    assert_eq!(c.r(1).quiesced(), Some(Quiesced::Leader));
    for id in 2..=3 {
        assert_eq!(
            c.r(id).quiesced(),
            Some(Quiesced::Follower {
                leader: 1,
                token: token(1)
            })
        );
        assert_eq!(c.r(1).peer_silent_ticks(id), Some(0));
    }
    // Far more than any check-quorum window or election timeout: nothing at all happens
    // while the liveness says every node is live.
    for _ in 0..50 * T {
        for id in 1..=3 {
            let mut out = Vec::new();
            let r = c.r(id);
            r.check_liveness(all_live, &mut out);
            r.tick(&mut out);
            assert!(out.is_empty(), "n{id} quiet: {out:?}");
            assert!(r.is_quiesced());
            assert_eq!(r.quiet_ticks(), u32::MAX);
        }
    }
    assert_eq!(c.r(1).role(), Role::Leader);
    assert_eq!(c.r(2).leader(), Some(1));
    assert_eq!(c.r(3).epoch(), 1);
}

#[test]
fn a_quiet_follower_whose_leader_is_not_live_campaigns_within_two_election_timeouts() {
    // The leader's node silent (None), or live but restarted (another token).
    for leader in [None, Some(token(1) + 1)] {
        let (mut c, _) = Cluster::quiet();
        let live = move |n: NodeId| if n == 1 { leader } else { Some(token(n)) };
        let mut campaigned = None;
        for t in 1..=2 * T {
            let mut out = Vec::new();
            c.r(2).check_liveness(live, &mut out);
            assert!(!c.r(2).is_quiesced(), "woken by the first liveness check");
            c.r(2).tick(&mut out);
            if sends_vote(&out) {
                campaigned = Some(t);
                break;
            }
        }
        assert!(
            campaigned.is_some(),
            "{leader:?}: no campaign within {} ticks",
            2 * T
        );
        assert_eq!(c.r(2).role(), Role::PreCandidate);
    }
}

#[test]
fn a_proposal_wakes_a_quiet_leader_and_its_followers_before_its_append_arrives() {
    let (mut c, _) = Cluster::quiet();
    let end = c.r(1).log_end();
    c.propose(1);
    assert!(!c.r(1).is_quiesced());
    // To each follower, first a heartbeat without the token, then the proposal's append.
    for to in 2..=3 {
        let to_follower: Vec<&AppendRequest> = c
            .net
            .iter()
            .filter_map(|(_, t, m)| match m {
                Message::Append(req) if *t == to => Some(req),
                _ => None,
            })
            .collect();
        assert!(to_follower.len() >= 2, "{to_follower:?}");
        let (first, second) = (to_follower[0], to_follower[1]);
        assert_eq!(first.quiesce, 0);
        assert_eq!(
            (first.prev_offset, first.fill_end),
            (end, end),
            "a heartbeat"
        );
        assert_eq!((second.quiesce, second.prev_offset), (0, end));
        assert!(second.fill_end > end, "the proposal's batch");
    }
    // The first message a follower takes wakes it.
    while let Some((_, to)) = c.deliver_one() {
        if to != 1 {
            assert!(!c.r(to).is_quiesced(), "n{to} still quiet");
        }
    }
    for id in 2..=3 {
        assert_eq!(c.r(id).log_end(), end + 1);
    }
    // Once the batch is committed and durable everywhere, the group goes quiet again.
    for id in 1..=3 {
        c.fsync(id);
    }
    c.deliver_all();
    for _ in 0..3 * HB {
        c.tick_all(all_live);
    }
    assert!((1..=3).all(|id| c.r(id).is_quiesced()));
}

/// A vote request to a quiet follower is answered as by a follower that hears its leader
/// (refused: its lease holds while the leader's node is live) and leaves it quiet (since
/// 5fbaedd; before, it woke and started a fresh lease). A transfer's vote bypasses the lease:
/// granted, it ends the quiet.
#[test]
fn a_vote_to_a_quiet_follower_is_refused_within_its_lease() {
    for pre_vote in [true, false] {
        let (mut c, _) = Cluster::quiet();
        let ask = VoteRequest {
            epoch: 2,
            last_epoch: c.r(3).epoch_history().last_epoch(),
            log_end: c.r(3).log_end(),
            pre_vote,
            transfer: false,
        };
        let mut out = Vec::new();
        c.r(2).step(3, Message::Vote(ask), &mut out);
        assert!(
            out.iter().any(|a| matches!(
                a,
                Action::Send { to: 3, msg: Message::VoteResponse(v) } if !v.granted
            )),
            "pre-vote {pre_vote}: {out:?}"
        );
        assert_eq!(c.r(2).epoch(), 1);
        assert_eq!(c.r(2).leader(), Some(1));
        assert!(
            !out.iter().any(|a| matches!(a, Action::PersistHardState(_))),
            "{out:?}"
        );
        assert!(
            c.r(2).is_quiesced(),
            "pre-vote {pre_vote}: a refused vote wakes nothing"
        );
        // Still in its lease however long the quiet lasts.
        for _ in 0..5 * T {
            c.tick(2, all_live);
        }
        let mut out = Vec::new();
        c.r(2).step(3, Message::Vote(ask), &mut out);
        assert!(
            out.iter().any(|a| matches!(
                a,
                Action::Send { to: 3, msg: Message::VoteResponse(v) } if !v.granted
            )),
            "pre-vote {pre_vote}, later: {out:?}"
        );
    }
    let (mut c, _) = Cluster::quiet();
    let transfer = VoteRequest {
        epoch: 2,
        last_epoch: c.r(3).epoch_history().last_epoch(),
        log_end: c.r(3).log_end(),
        pre_vote: false,
        transfer: true,
    };
    let mut out = Vec::new();
    c.r(2).step(3, Message::Vote(transfer), &mut out);
    assert!(
        out.iter().any(|a| matches!(
            a,
            Action::Send { to: 3, msg: Message::VoteResponse(v) } if v.granted
        )),
        "{out:?}"
    );
    assert!(!c.r(2).is_quiesced());
    assert_eq!(c.r(2).epoch(), 2);
}

/// A campaign that reaches quiet followers but not their leader (a removed voter's, or one
/// across a one-way partition) must not start their election clocks: the leader is quiet and
/// sends nothing, so their lease would lapse together, and they would elect one of them
/// though the leader is healthy. (A voter that is a member also asks the leader, which wakes
/// and heartbeats.) Failed on 595081e, where a vote woke a quiet follower; the simulator's
/// idle phase found it (a removed voter deposing a quiet leader).
#[test]
fn a_strangers_campaign_leaves_quiet_followers_election_clocks_stopped() {
    let (mut c, _) = Cluster::quiet();
    // Node 4 was removed from the group without learning of it; it still campaigns, among
    // the members of the group as it knew it: 2, 3 and itself.
    let ask = VoteRequest {
        epoch: 2,
        last_epoch: c.r(2).epoch_history().last_epoch(),
        log_end: c.r(2).log_end(),
        pre_vote: true,
        transfer: false,
    };
    for t in 0..4 * T {
        if t % T == 0 {
            for id in 2..=3 {
                c.call(id, |r, out| r.step(4, Message::Vote(ask), out));
            }
        }
        for id in 1..=3 {
            c.tick(id, all_live);
        }
        let campaigns: Vec<_> = c
            .net
            .iter()
            .filter(|(from, _, m)| *from != 4 && matches!(m, Message::Vote(_)))
            .collect();
        assert!(campaigns.is_empty(), "tick {t}: {campaigns:?}");
        c.deliver_all();
    }
    assert_eq!((c.r(1).role(), c.r(1).epoch()), (Role::Leader, 1));
}

#[test]
fn a_quiet_leader_whose_member_is_not_live_wakes_and_heartbeats() {
    let (mut c, _) = Cluster::quiet();
    let live = |n: NodeId| (n != 3).then(|| token(n));
    let mut out = Vec::new();
    c.r(1).check_liveness(live, &mut out);
    assert!(!c.r(1).is_quiesced());
    for to in 2..=3 {
        let sent = appends_to(&out, to);
        assert_eq!(sent.len(), 1, "{out:?}");
        assert_eq!(sent[0].quiesce, 0);
    }
    // A live member's liveness keeps the leader quiet.
    let (mut c, _) = Cluster::quiet();
    let mut out = Vec::new();
    c.r(1).check_liveness(all_live, &mut out);
    assert!(out.is_empty() && c.r(1).is_quiesced());
}

/// A quiet leader woken because a member's node fell silent must keep heartbeating while that
/// member does not answer: quiet again at once, it would keep check-quorum and the in-sync
/// set (`peer_silent_ticks`) from ever seeing the silence. Failed on 595081e (`wake_leader`
/// marked every member acknowledged); fixed by a7b0606.
#[test]
fn a_leader_woken_by_a_silent_member_stays_awake_until_the_member_answers() {
    let (mut c, _) = Cluster::quiet();
    // Node 3 is gone: it neither answers nor pings.
    c.cut[2] = true;
    let live = |n: NodeId| (n != 3).then(|| token(n));
    for t in 1..=2 * T {
        c.tick_all(live);
        assert!(!c.r(1).is_quiesced(), "quiet again at tick {t}");
    }
    let silent = c.r(1).peer_silent_ticks(3).unwrap();
    assert!(
        silent >= u64::from(2 * T) - 1,
        "n3 silent for {silent} ticks"
    );
    assert_eq!(c.r(1).peer_silent_ticks(2), Some(0));
}

/// The same, for check-quorum: a quiet leader whose every follower's node falls silent steps
/// down within two election timeouts, as an awake one does.
#[test]
fn a_quiet_leader_cut_off_from_its_followers_steps_down() {
    let (mut c, _) = Cluster::quiet();
    c.cut[1] = true;
    c.cut[2] = true;
    let live = |n: NodeId| (n == 1).then(|| token(n));
    for _ in 0..2 * T {
        c.tick(1, live);
        c.deliver_all();
    }
    assert_eq!(c.r(1).role(), Role::Follower);
    assert_eq!(c.r(1).epoch(), 1, "stepping down starts no epoch");
}

/// A member whose node restarts faster than the liveness notices its silence (the leader sees
/// it live throughout, under a new token) must still hear from its leader: a voter does (it
/// campaigns, and asks the leader, which wakes), but a learner never campaigns, so it would
/// know no leader and no high watermark for as long as the group stays quiet.
#[test]
fn a_learner_that_restarts_unnoticed_hears_from_its_quiet_leader() {
    let members = Membership {
        voters: vec![1, 2, 3],
        learners: vec![4],
    };
    let (mut c, _) = Cluster::quiet_with(&members);
    let end = c.r(4).log_end();
    // Node 4 restarts from its durable log (all of it) under a new token.
    let restarted = |n: NodeId| Some(if n == 4 { token(4) + 1 } else { token(n) });
    let persisted = Persisted {
        hard: c.r(4).hard_state(),
        epochs: c.r(4).epoch_history().entries().to_vec(),
        log_end: end,
        ..Persisted::new_group(members.clone())
    };
    let mut cfg4 = cfg(4, true);
    cfg4.quiesce = restarted(4);
    c.reps[3] = Replica::new(4, cfg4, 44, persisted);
    assert_eq!(c.r(4).leader(), None);
    for _ in 0..2 * T {
        c.tick_all(restarted);
    }
    assert_eq!(c.r(4).leader(), Some(1));
    assert_eq!(c.r(4).high_watermark(), end);
}

#[test]
fn a_follower_missing_anything_does_not_take_a_quiescing_heartbeat() {
    // Written but not durable.
    let mut c = Cluster::idle(true);
    c.propose(1);
    c.deliver_all();
    c.fsync(1);
    c.fsync(2);
    c.deliver_all();
    for _ in 0..HB {
        c.tick_all(all_live);
    }
    assert_eq!(c.r(3).high_watermark(), c.r(3).log_end());
    let hb = quiescing_heartbeat(&c.reps[0]);
    let mut out = Vec::new();
    c.r(3).step(1, Message::Append(hb.clone()), &mut out);
    assert!(!c.r(3).is_quiesced(), "n3 has not made the batch durable");
    // The leader, knowing as much, does not go quiet either, however long it is idle.
    for _ in 0..5 * HB {
        c.tick(1, all_live);
        assert!(!c.r(1).is_quiesced());
        c.net.clear();
    }
    // The control: durable now, the same heartbeat quiets it.
    c.fsync(3);
    c.net.clear();
    let mut out = Vec::new();
    c.r(3).step(1, Message::Append(hb), &mut out);
    assert!(c.r(3).is_quiesced());

    // Behind: the heartbeat's offset is past its log (it answers with a rejection).
    let mut c = Cluster::idle(true);
    c.cut[2] = true;
    c.propose(1);
    c.deliver_all();
    c.fsync(1);
    c.fsync(2);
    c.deliver_all();
    c.cut[2] = false;
    let hb = quiescing_heartbeat(&c.reps[0]);
    let mut out = Vec::new();
    c.r(3).step(1, Message::Append(hb), &mut out);
    assert!(!c.r(3).is_quiesced(), "n3 lacks the last batch");

    // Holding everything but not knowing it committed (the heartbeat commits less).
    let mut c = Cluster::idle(true);
    c.propose(1);
    c.deliver_all();
    for id in 1..=3 {
        c.fsync(id);
    }
    c.deliver_all();
    let mut hb = quiescing_heartbeat(&c.reps[0]);
    hb.commit -= 1;
    let mut out = Vec::new();
    c.r(3).step(1, Message::Append(hb), &mut out);
    assert!(
        !c.r(3).is_quiesced(),
        "the commit point is short of the log end"
    );
}

#[test]
fn without_a_token_nothing_ever_goes_quiet() {
    let mut c = Cluster::idle(false);
    let mut heartbeats = 0;
    for _ in 0..20 * T {
        for id in 1..=3 {
            let mut out = Vec::new();
            let r = c.r(id);
            r.check_liveness(|_| None, &mut out);
            r.tick(&mut out);
            for to in 2..=3 {
                let sent = appends_to(&out, to);
                assert!(sent.iter().all(|a| a.quiesce == 0), "{sent:?}");
                heartbeats += sent.len();
            }
            c.perform(id, out);
        }
        c.deliver_all();
        assert!((1..=3).all(|id| !c.r(id).is_quiesced()));
        assert_eq!(c.r(1).role(), Role::Leader);
    }
    // Every interval, to both followers.
    assert_eq!(heartbeats as u32, 2 * 20 * T / HB);
}

#[test]
fn keepalives_send_nothing_while_quiet() {
    let mut c = Cluster::idle(true);
    let mut msgs = Vec::new();
    c.r(1).keepalives(&mut msgs);
    assert_eq!(msgs.len(), 2, "an awake leader keeps its followers alive");
    let (mut c, _) = Cluster::quiet();
    let mut msgs = Vec::new();
    c.r(1).keepalives(&mut msgs);
    assert!(msgs.is_empty(), "{msgs:?}");
}
