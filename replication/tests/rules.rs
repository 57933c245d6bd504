//! One test per rule of the consensus core, driving replicas by hand (no simulator): every
//! message is delivered explicitly, so each test shows exactly the exchange the rule governs.

use std::collections::VecDeque;

use bytes::Bytes;
use proptest::prelude::*;
use spate_replication::{
    Action, Config, Error, HardState, Membership, Message, NodeId, Offset, Persisted, Replica, Role,
};

#[path = "support/node_pair.rs"]
mod node_pair;
use node_pair::{idle_node_pair, pump};

struct Cluster {
    reps: Vec<Replica>,
    /// (from, to, message) in flight, delivered in order by `deliver_all`.
    net: VecDeque<(NodeId, NodeId, Message)>,
    /// Every action performed, per node (index = id - 1).
    log: Vec<Vec<Action>>,
    /// Durable end per node: `fsync` makes everything written durable.
    cut: Vec<bool>,
}

impl Cluster {
    fn new(n: u64) -> Self {
        let members = Membership::voters(&(1..=n).collect::<Vec<_>>());
        let reps = (1..=n)
            .map(|id| {
                Replica::new(
                    id,
                    Config::default(),
                    id,
                    Persisted::new_group(members.clone()),
                )
            })
            .collect();
        Cluster {
            reps,
            net: VecDeque::new(),
            log: vec![Vec::new(); n as usize],
            cut: vec![false; n as usize],
        }
    }
    fn r(&mut self, id: NodeId) -> &mut Replica {
        &mut self.reps[(id - 1) as usize]
    }
    fn perform(&mut self, id: NodeId, out: Vec<Action>) {
        let mut written = None;
        for a in out {
            match &a {
                Action::Send { to, msg } => self.net.push_back((id, *to, msg.clone())),
                Action::Append { batches } => written = batches.last().map(|b| b.end()),
                _ => {}
            }
            self.log[(id - 1) as usize].push(a);
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
    fn deliver_all(&mut self) {
        for _ in 0..10_000 {
            let Some((from, to, msg)) = self.net.pop_front() else {
                return;
            };
            if self.cut[(from - 1) as usize] || self.cut[(to - 1) as usize] {
                continue;
            }
            // The core leaves batches to the sender: fill them from the sender's own actions.
            let msg = match msg {
                Message::Append(mut req) if req.fill_end > req.prev_offset => {
                    req.batches = self.log[(from - 1) as usize]
                        .iter()
                        .filter_map(|a| match a {
                            Action::Append { batches } => Some(batches.clone()),
                            _ => None,
                        })
                        .flatten()
                        .filter(|b| b.base >= req.prev_offset && b.end() <= req.fill_end)
                        .collect();
                    Message::Append(req)
                }
                m => m,
            };
            self.call(to, |r, out| r.step(from, msg, out));
        }
        panic!("messages did not quiesce");
    }
    fn fsync(&mut self, id: NodeId) {
        let end = self.r(id).log_end();
        self.call(id, |r, out| r.on_durable(end, out));
    }
    fn tick_until_leader(&mut self, id: NodeId) {
        for _ in 0..100 {
            self.call(id, |r, out| r.tick(out));
            self.deliver_all();
            if self.r(id).is_leader() {
                return;
            }
        }
        panic!("n{id} did not become leader");
    }
    /// Ticks every node not cut off until one of them (not `old`) leads a newer epoch.
    fn elect_other_than(&mut self, old: NodeId) -> NodeId {
        let n = self.reps.len() as u64;
        for _ in 0..200 {
            for id in 1..=n {
                if !self.cut[(id - 1) as usize] {
                    self.call(id, |r, out| r.tick(out));
                }
            }
            self.deliver_all();
            if let Some(id) = (1..=n).find(|&id| id != old && self.r(id).is_leader()) {
                return id;
            }
        }
        panic!("no new leader");
    }
    fn propose(&mut self, id: NodeId, records: u32) -> Offset {
        let mut out = Vec::new();
        let base = self
            .r(id)
            .propose(&[(records, Bytes::from_static(b"x"))], &mut out)
            .unwrap();
        self.perform(id, out);
        base
    }
}

#[test]
fn a_node_campaigns_after_its_election_timeout_and_wins_with_a_majority() {
    let mut c = Cluster::new(3);
    c.tick_until_leader(1);
    assert_eq!(c.r(1).epoch(), 1);
    assert_eq!(c.r(2).leader(), Some(1));
    assert_eq!(
        c.r(3).hard_state(),
        HardState {
            epoch: 1,
            voted_for: Some(1)
        }
    );
}

#[test]
fn the_vote_is_persisted_before_the_reply_is_sent() {
    let mut c = Cluster::new(3);
    c.tick_until_leader(1);
    for id in 2..=3 {
        let log = &c.log[id - 1];
        let persist = log
            .iter()
            .position(|a| matches!(a, Action::PersistHardState(h) if h.voted_for == Some(1)));
        let reply = log.iter().position(|a| matches!(a, Action::Send { msg: Message::VoteResponse(v), .. } if v.granted && !v.pre_vote));
        assert!(persist.unwrap() < reply.unwrap(), "n{id}: {log:?}");
    }
}

#[test]
fn commit_needs_durable_on_a_majority_not_just_written() {
    let mut c = Cluster::new(3);
    c.tick_until_leader(1);
    let base = c.propose(1, 5);
    assert_eq!(base, 0);
    c.deliver_all();
    assert_eq!(
        c.r(1).high_watermark(),
        0,
        "written everywhere, durable nowhere"
    );
    c.fsync(1);
    c.deliver_all();
    assert_eq!(c.r(1).high_watermark(), 0, "durable on the leader only");
    c.fsync(2);
    c.deliver_all();
    assert_eq!(c.r(1).high_watermark(), 5);
    assert!(c.r(1).is_epoch_ready());
    // The followers learn the commit with the next heartbeat.
    for _ in 0..3 {
        c.call(1, |r, out| r.tick(out));
    }
    c.deliver_all();
    assert_eq!(c.r(2).high_watermark(), 5);
}

#[test]
fn a_new_leader_commits_earlier_epochs_only_with_a_batch_of_its_own() {
    let mut c = Cluster::new(3);
    c.tick_until_leader(1);
    c.propose(1, 2);
    c.deliver_all();
    // Node 2 takes over before anything committed, with epoch 1's batch written everywhere.
    c.call(1, |r, out| r.transfer_leadership(2, out).unwrap());
    c.deliver_all();
    assert!(c.r(2).is_leader());
    for id in 1..=3 {
        c.fsync(id);
    }
    c.deliver_all();
    assert_eq!(
        c.r(2).high_watermark(),
        0,
        "epoch 1's batch must not be committed by counting"
    );
    assert!(!c.r(2).is_epoch_ready());
    c.propose(2, 1);
    c.deliver_all();
    for id in 1..=3 {
        c.fsync(id);
    }
    c.deliver_all();
    assert_eq!(c.r(2).high_watermark(), 3, "epoch 1's batch rides along");
    assert!(c.log[1]
        .iter()
        .any(|a| matches!(a, Action::LeaderReady { epoch: 2 })));
}

#[test]
fn a_diverged_follower_truncates_to_the_leaders_end_offset_for_its_epoch() {
    let mut c = Cluster::new(3);
    c.tick_until_leader(1);
    c.propose(1, 2);
    c.deliver_all();
    for id in 1..=3 {
        c.fsync(id);
    }
    c.deliver_all();
    // Node 1 appends in epoch 1 while cut off; node 2 leads epoch 2 and appends there.
    c.cut[0] = true;
    c.propose(1, 3);
    let l = c.elect_other_than(1);
    c.propose(l, 1);
    c.deliver_all();
    c.cut[0] = false;
    for _ in 0..3 {
        c.call(l, |r, out| r.tick(out));
        c.deliver_all();
    }
    // Node 1 had epoch 1 up to 5; the leader's epoch 1 ends at 2: truncate there, then copy.
    assert!(
        c.log[0]
            .iter()
            .any(|a| matches!(a, Action::Truncate { end: 2 })),
        "{:?}",
        c.log[0]
    );
    assert_eq!(c.r(1).log_end(), 3);
    assert_eq!(c.r(1).end_offset_for_epoch(1), (1, 2));
    assert_eq!(c.r(1).epoch_history().entries(), &[(1, 0), (2, 2)]);
}

#[test]
fn a_stale_append_never_truncates_what_the_leader_already_sent() {
    let mut c = Cluster::new(3);
    c.tick_until_leader(1);
    c.propose(1, 1);
    c.propose(1, 1);
    // Deliver in reverse: the later request (with both batches) first, then the older one.
    let msgs: Vec<_> = c.net.drain(..).collect();
    for (from, to, msg) in msgs.into_iter().rev() {
        c.net.push_back((from, to, msg));
    }
    c.deliver_all();
    assert_eq!(c.r(2).log_end(), 2);
    assert!(!c.log[1]
        .iter()
        .any(|a| matches!(a, Action::Truncate { .. })));
}

#[test]
fn pre_vote_from_a_partitioned_node_does_not_bump_epochs_or_depose_the_leader() {
    let mut c = Cluster::new(3);
    c.tick_until_leader(1);
    // Node 3 stops hearing the leader and campaigns: its pre-vote is refused (leader lease).
    c.cut[0] = true;
    for _ in 0..40 {
        c.call(3, |r, out| r.tick(out));
    }
    c.cut[0] = false;
    c.net.retain(|(from, to, _)| *from != 1 && *to != 1);
    c.deliver_all();
    assert_eq!(c.r(2).epoch(), 1, "a pre-vote changes no epoch");
    assert_eq!(c.r(3).epoch(), 1);
    assert!(c.r(1).is_leader());
    assert_eq!(c.r(2).leader(), Some(1));
}

#[test]
fn check_quorum_steps_down_a_leader_that_hears_from_no_majority() {
    let mut c = Cluster::new(3);
    c.tick_until_leader(1);
    c.cut[1] = true;
    c.cut[2] = true;
    for _ in 0..30 {
        c.call(1, |r, out| r.tick(out));
        c.deliver_all();
    }
    assert_eq!(c.r(1).role(), Role::Follower);
    assert_eq!(c.r(1).epoch(), 1, "stepping down starts no epoch");
}

#[test]
fn leadership_transfer_hands_over_to_a_caught_up_voter_at_once() {
    let mut c = Cluster::new(3);
    c.tick_until_leader(1);
    c.propose(1, 2);
    c.deliver_all();
    c.call(1, |r, out| r.transfer_leadership(3, out).unwrap());
    let mut out = Vec::new();
    assert_eq!(
        c.r(1).propose(&[(1, Bytes::from_static(b"x"))], &mut out),
        Err(Error::TransferInProgress { target: 3 })
    );
    c.deliver_all();
    assert!(c.r(3).is_leader(), "no election timeout needed");
    assert_eq!(c.r(3).epoch(), 2);
    assert_eq!(c.r(1).leader(), Some(3));
}

#[test]
fn proposals_to_a_follower_name_the_leader() {
    let mut c = Cluster::new(3);
    c.tick_until_leader(1);
    let mut out = Vec::new();
    assert_eq!(
        c.r(2).propose(&[(1, Bytes::from_static(b"x"))], &mut out),
        Err(Error::NotLeader { leader: Some(1) })
    );
    assert!(out.is_empty());
}

#[test]
fn membership_changes_one_at_a_time_through_a_learner() {
    let mut c = Cluster::new(4);
    // Start the group on nodes 1-3; node 4 hosts a replica that knows it is not a member.
    let three = Membership::voters(&[1, 2, 3]);
    for id in 1..=4 {
        c.reps[id - 1] = Replica::new(
            id as u64,
            Config::default(),
            9,
            Persisted::new_group(three.clone()),
        );
    }
    c.tick_until_leader(1);
    let mut out = Vec::new();
    let refused =
        c.r(1)
            .propose_membership(Membership::voters(&[1, 2, 3, 4]), Bytes::new(), &mut out);
    assert!(
        matches!(refused, Err(Error::MembershipChangeRefused { .. })),
        "{refused:?}"
    );
    c.propose(1, 1);
    c.deliver_all();
    for id in 1..=3 {
        c.fsync(id);
    }
    c.deliver_all();
    // A voter straight from outside is refused; a learner first.
    let skip = c
        .r(1)
        .propose_membership(Membership::voters(&[1, 2, 3, 4]), Bytes::new(), &mut out);
    assert!(
        matches!(skip, Err(Error::MembershipChangeRefused { .. })),
        "{skip:?}"
    );
    let with_learner = Membership {
        voters: vec![1, 2, 3],
        learners: vec![4],
    };
    c.call(1, |r, out| {
        r.propose_membership(with_learner.clone(), Bytes::from_static(b"m"), out)
            .unwrap();
    });
    for _ in 0..4 {
        c.call(1, |r, out| r.tick(out));
        c.deliver_all();
        for id in 1..=4 {
            c.fsync(id);
        }
        c.deliver_all();
    }
    assert_eq!(c.r(4).membership(), &with_learner);
    assert_eq!(c.r(1).high_watermark(), c.r(1).log_end());
    c.call(1, |r, out| {
        r.propose_membership(
            Membership::voters(&[1, 2, 3, 4]),
            Bytes::from_static(b"m"),
            out,
        )
        .unwrap();
    });
    assert_eq!(c.r(1).membership().quorum(), 3);
    let second = c
        .r(1)
        .propose_membership(Membership::voters(&[1, 2, 3]), Bytes::new(), &mut out);
    assert!(
        matches!(second, Err(Error::MembershipChangeRefused { .. })),
        "one change at a time"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    /// Idle groups share the node-to-node message: one per tick per direction, whatever their
    /// number, and each idle group adds at most one entry to it.
    #[test]
    fn per_tick_messages_between_two_nodes_do_not_grow_with_idle_groups(groups in 1u64..300, ticks in 1u32..30) {
        let (mut a, mut b) = idle_node_pair(groups);
        for _ in 0..ticks {
            a.tick();
            b.tick();
            let (oa, ob) = (a.take_output(), b.take_output());
            prop_assert!(oa.messages.len() <= 1 && ob.messages.len() <= 1);
            for m in oa.messages.iter().chain(ob.messages.iter()) {
                prop_assert!(m.items.len() as u64 <= groups);
            }
            for m in oa.messages {
                b.receive(m);
            }
            for m in ob.messages {
                a.receive(m);
            }
            pump(&mut a, &mut b);
        }
    }
}

#[test]
fn a_thousand_groups_elect_and_heartbeat_through_one_message_per_tick() {
    let (mut a, mut b) = idle_node_pair(1000);
    a.tick();
    b.tick();
    let (oa, ob) = (a.take_output(), b.take_output());
    assert!(oa.messages.len() <= 1 && ob.messages.len() <= 1);
}

#[test]
fn a_restarted_voter_does_not_vote_twice_in_one_epoch() {
    let mut c = Cluster::new(3);
    c.tick_until_leader(1);
    // Node 3 restarts from what it persisted: epoch 1, vote for node 1.
    let hard = c.log[2]
        .iter()
        .rev()
        .find_map(|a| match a {
            Action::PersistHardState(h) => Some(*h),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        hard,
        HardState {
            epoch: 1,
            voted_for: Some(1)
        }
    );
    let members = Membership::voters(&[1, 2, 3]);
    c.reps[2] = Replica::new(
        3,
        Config::default(),
        3,
        Persisted {
            hard,
            ..Persisted::new_group(members)
        },
    );
    let ask = spate_replication::VoteRequest {
        epoch: 1,
        last_epoch: spate_replication::NO_EPOCH,
        log_end: 0,
        pre_vote: false,
        transfer: false,
    };
    let mut out = Vec::new();
    c.r(3).step(2, Message::Vote(ask), &mut out);
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Send { msg: Message::VoteResponse(v), .. } if !v.granted)),
        "{out:?}"
    );
}

#[test]
fn a_learner_receives_the_log_but_does_not_count_toward_commit() {
    let mut c = Cluster::new(4);
    let m = Membership {
        voters: vec![1, 2, 3],
        learners: vec![4],
    };
    for id in 1..=4u64 {
        c.reps[(id - 1) as usize] =
            Replica::new(id, Config::default(), id, Persisted::new_group(m.clone()));
    }
    c.tick_until_leader(1);
    c.propose(1, 3);
    c.deliver_all();
    c.call(1, |r, out| r.tick(out));
    c.call(1, |r, out| r.tick(out));
    c.deliver_all();
    assert_eq!(c.r(4).log_end(), 3, "the learner has the batch");
    c.fsync(1);
    c.fsync(4);
    c.deliver_all();
    assert_eq!(
        c.r(1).high_watermark(),
        0,
        "leader + learner are not a majority of voters"
    );
    c.fsync(3);
    c.deliver_all();
    assert_eq!(c.r(1).high_watermark(), 3);
    // A learner never campaigns.
    for _ in 0..100 {
        c.call(4, |r, out| r.tick(out));
    }
    assert!(!c
        .net
        .iter()
        .any(|(from, _, m)| *from == 4 && matches!(m, Message::Vote(_))));
}

/// The ticks a caller owes a replica it could not tick while busy, taken at once: the clocks
/// advance by all of them, and what falls due is done once.
#[test]
fn ticks_owed_at_once_elect_when_their_sum_reaches_the_timeout() {
    let members = Membership::voters(&[1, 2, 3]);
    let fresh = || {
        Replica::new(
            1,
            Config::default(),
            7,
            Persisted::new_group(members.clone()),
        )
    };
    // One tick at a time: the timeout (drawn from the seed) in ticks.
    let mut one = fresh();
    let mut timeout = 0;
    for t in 1..=100 {
        let mut out = Vec::new();
        one.tick(&mut out);
        if !out.is_empty() {
            timeout = t;
            break;
        }
    }
    assert!(
        timeout >= Config::default().election_timeout_ticks,
        "{timeout}"
    );
    let mut owed = fresh();
    let mut out = Vec::new();
    owed.tick_by(0, &mut out);
    owed.tick_by(timeout - 1, &mut out);
    assert!(out.is_empty(), "nothing due before the timeout: {out:?}");
    assert_eq!(owed.role(), Role::Follower);
    owed.tick_by(1, &mut out);
    assert_eq!(
        owed.role(),
        Role::PreCandidate,
        "a pre-vote, as one tick at a time"
    );
    let mut late = fresh();
    let mut late_out = Vec::new();
    late.tick_by(5 * timeout, &mut late_out);
    assert_eq!(late_out, out, "one campaign however late the ticks come");
}

#[test]
fn a_leader_owed_many_ticks_heartbeats_once_and_keeps_its_quorum() {
    let mut c = Cluster::new(3);
    c.tick_until_leader(1);
    c.deliver_all();
    let heartbeats = |out: &[Action]| {
        out.iter()
            .filter(|a| {
                matches!(
                    a,
                    Action::Send {
                        msg: Message::Append(_),
                        ..
                    }
                )
            })
            .count()
    };
    let mut out = Vec::new();
    // More than a heartbeat interval and a check-quorum window: one heartbeat round (one
    // append per follower), and the followers that answered keep it leading.
    c.r(1)
        .tick_by(Config::default().election_timeout_ticks * 3, &mut out);
    assert_eq!(heartbeats(&out), 2, "{out:?}");
    assert!(c.r(1).is_leader());
    c.perform(1, out);
    c.deliver_all();
    // The heartbeat clock restarted: the next round after a whole interval, as usual.
    let mut out = Vec::new();
    c.r(1)
        .tick_by(Config::default().heartbeat_interval_ticks - 1, &mut out);
    assert_eq!(heartbeats(&out), 0, "{out:?}");
    c.r(1).tick_by(1, &mut out);
    assert_eq!(heartbeats(&out), 2, "{out:?}");
    // Cut off from both followers for a check-quorum window's worth of owed ticks: it steps
    // down, as it would one tick at a time.
    c.cut[1] = true;
    c.cut[2] = true;
    let mut out = Vec::new();
    c.r(1)
        .tick_by(Config::default().election_timeout_ticks, &mut out);
    c.r(1)
        .tick_by(Config::default().election_timeout_ticks, &mut out);
    assert_eq!(c.r(1).role(), Role::Follower);
    assert_eq!(c.r(1).epoch(), 1, "stepping down starts no epoch");
}

/// `quiet_ticks` is exact: that many ticks do nothing, and the next one does what is due.
#[test]
fn quiet_ticks_are_the_ticks_before_something_is_due() {
    let mut c = Cluster::new(3);
    // A fresh follower: quiet until its election timeout.
    let q = c.r(2).quiet_ticks();
    assert!(q + 1 >= Config::default().election_timeout_ticks, "{q}");
    for _ in 0..q {
        let mut out = Vec::new();
        c.r(2).tick(&mut out);
        assert!(out.is_empty(), "{out:?}");
    }
    let mut out = Vec::new();
    c.r(2).tick(&mut out);
    assert!(!out.is_empty(), "a campaign after the quiet ticks");
    // The campaign restarted the clock: quiet (votes come as messages) until it times out.
    assert!(c.r(2).quiet_ticks() + 1 >= Config::default().election_timeout_ticks);

    // A leader just after its heartbeat: quiet until the next one.
    let mut c = Cluster::new(3);
    c.tick_until_leader(1);
    c.deliver_all();
    let heartbeat = |out: &[Action]| {
        out.iter().any(|a| {
            matches!(
                a,
                Action::Send {
                    msg: Message::Append(_),
                    ..
                }
            )
        })
    };
    for _ in 0..Config::default().heartbeat_interval_ticks {
        let mut out = Vec::new();
        c.r(1).tick(&mut out);
        if heartbeat(&out) {
            break;
        }
    }
    let q = c.r(1).quiet_ticks();
    assert_eq!(q, Config::default().heartbeat_interval_ticks - 1);
    let mut out = Vec::new();
    c.r(1).tick_by(q, &mut out);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(c.r(1).quiet_ticks(), 0);
    c.r(1).tick(&mut out);
    assert!(heartbeat(&out), "{out:?}");

    // A leader handing over: its transfer's clock runs on every tick.
    c.deliver_all();
    let mut out = Vec::new();
    c.r(1).transfer_leadership(2, &mut out).unwrap();
    assert_eq!(c.r(1).quiet_ticks(), 0);
}
