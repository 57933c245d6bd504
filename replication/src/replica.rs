//! One replication group's consensus state machine: Raft with Kafka offsets as log positions,
//! whole record batches as entries and the Kafka leader epoch as the term. No I/O, no clock, no
//! randomness from outside: the caller feeds events and performs the returned [`Action`]s.

use bytes::Bytes;

use crate::epochs::EpochHistory;
use crate::error::Error;
use crate::types::{
    Action, AppendRequest, AppendResponse, Batch, Epoch, HardState, Membership, Message, NodeId,
    Offset, VoteRequest, VoteResponse, NO_EPOCH,
};

/// Ticks a follower waits without hearing from a leader before it campaigns. The actual timeout
/// is drawn in `[election_timeout_ticks, 2 * election_timeout_ticks)` from the replica's seed.
pub const DEFAULT_ELECTION_TIMEOUT_TICKS: u32 = 10;
/// Ticks between a leader's heartbeats (each one also retransmits to a silent follower).
pub const DEFAULT_HEARTBEAT_INTERVAL_TICKS: u32 = 2;
/// Batches one proposal may carry; bounds the work and the Append action of one call.
pub const DEFAULT_MAX_BATCHES_PER_PROPOSAL: usize = 1024;
/// Catch-up appends (ones the sender filled short of what was asked, at its byte limit: a
/// follower far behind) the leader keeps in flight to one follower. One at a time, a follower
/// behind by gigabytes would get one fill per round trip, and the leader's read, the link and
/// the follower's write would take turns; a window keeps all three busy. The bytes in flight
/// are at most this many times the sender's fill limit.
pub const MAX_CATCHUP_APPENDS_IN_FLIGHT: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub election_timeout_ticks: u32,
    pub heartbeat_interval_ticks: u32,
    pub max_batches_per_proposal: usize,
    /// Quiescence: `Some(token)` lets an idle group go quiet (see [`Replica::is_quiesced`]);
    /// the token is this node's liveness token (its incarnation, non-zero), which the caller's
    /// node-level liveness pings carry. `None`: the group heartbeats for as long as it leads.
    pub quiesce: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            election_timeout_ticks: DEFAULT_ELECTION_TIMEOUT_TICKS,
            heartbeat_interval_ticks: DEFAULT_HEARTBEAT_INTERVAL_TICKS,
            max_batches_per_proposal: DEFAULT_MAX_BATCHES_PER_PROPOSAL,
            quiesce: None,
        }
    }
}

/// What a replica restarts from: exactly what was durable. Everything else (high watermark,
/// leader, progress) is relearned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Persisted {
    pub hard: HardState,
    /// (epoch, first offset) of the durable log, from its batches.
    pub epochs: Vec<(Epoch, Offset)>,
    /// End of the durable log (everything not durable is gone after a crash).
    pub log_end: Offset,
    /// The membership the group was created with (before any membership batch).
    pub bootstrap: Membership,
    /// (base offset, membership) of each membership batch in the log, ascending.
    pub memberships: Vec<(Offset, Membership)>,
}

impl Persisted {
    /// A brand-new replica of a group with these members.
    pub fn new_group(bootstrap: Membership) -> Self {
        Persisted {
            bootstrap,
            ..Persisted::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

/// The leader's view of one peer.
#[derive(Debug, Clone)]
struct Progress {
    node: NodeId,
    /// Next offset to send (a batch boundary in the leader's log).
    next: Offset,
    /// Highest written end the peer reported over the prefix that matches ours.
    matched: Offset,
    /// Highest durable end the peer reported over that prefix: what commit counts.
    durable: Offset,
    /// Probing for the match point (one empty append at a time) rather than streaming.
    probing: bool,
    /// Heard from in the current check-quorum window.
    active: bool,
    /// Acknowledged something since the last heartbeat (else the next heartbeat retransmits).
    acked: bool,
    /// The leader's tick count when the peer last answered (or when it became leader).
    heard_at: u64,
    /// Ends of the catch-up appends sent and not yet acknowledged, ascending: the window,
    /// at most [`MAX_CATCHUP_APPENDS_IN_FLIGHT`] (one more per heartbeat while it is full).
    in_flight: Vec<Offset>,
    /// The sender attached nothing to the last catch-up append (its throttle had no budget
    /// left): nothing more is asked for until the next tick.
    paused: bool,
    /// The peer's node's liveness token at the last liveness check while leading (0:
    /// unknown): a quiet leader wakes when it changes (the peer restarted faster than the
    /// liveness timeout and knows no leader).
    token: u64,
}

impl Progress {
    /// Whether another append with batches may go to this peer now: not while a probe is
    /// unanswered, the window of catch-up appends is full, or the throttle paused it.
    fn may_stream(&self) -> bool {
        !self.probing && !self.paused && self.in_flight.len() < MAX_CATCHUP_APPENDS_IN_FLIGHT
    }
}

pub struct Replica {
    id: NodeId,
    cfg: Config,
    hard: HardState,
    role: Role,
    leader: Option<NodeId>,
    epochs: EpochHistory,
    /// End of the log as the core has ordered it (appends may still be in flight).
    log_end: Offset,
    written_end: Offset,
    durable_end: Offset,
    hw: Offset,
    /// Follower: the prefix known to match the current epoch's leader; only it is reported.
    verified_end: Offset,
    bootstrap: Membership,
    memberships: Vec<(Offset, Membership)>,
    election_elapsed: u32,
    election_timeout: u32,
    heartbeat_elapsed: u32,
    quorum_elapsed: u32,
    /// Ticks since the replica was made: the clock of `Progress::heard_at`.
    ticks: u64,
    rng: u64,
    /// Candidate / pre-candidate: (voter, granted).
    votes: Vec<(NodeId, bool)>,
    progress: Vec<Progress>,
    /// Leadership transfer in progress: (target, ticks elapsed).
    transfer: Option<(NodeId, u32)>,
    /// The leader has committed a batch of its own epoch.
    epoch_ready: bool,
    /// Quiet (see [`Self::is_quiesced`]): a leader, or a follower under the leader's token.
    quiesced: Option<Quiesced>,
    scratch: Vec<Offset>,
}

/// Whom a quiet replica relies on being alive instead of on heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quiesced {
    /// A quiet leader: its members are live as long as the node-level liveness says so.
    Leader,
    /// A quiet follower: its leader `leader` with liveness token `token`.
    Follower { leader: NodeId, token: u64 },
}

impl Replica {
    /// A replica restarting from `persisted`; `seed` drives its election-timeout jitter.
    pub fn new(id: NodeId, cfg: Config, seed: u64, persisted: Persisted) -> Self {
        assert!(cfg.election_timeout_ticks > cfg.heartbeat_interval_ticks);
        assert!(cfg.heartbeat_interval_ticks > 0);
        let epochs = EpochHistory::from_entries(persisted.epochs);
        if let Some(start) = epochs.last_start() {
            assert!(start < persisted.log_end, "epoch history past the log end");
        }
        assert!(epochs.last_epoch() <= persisted.hard.epoch);
        let mut r = Replica {
            id,
            cfg,
            hard: persisted.hard,
            role: Role::Follower,
            leader: None,
            epochs,
            log_end: persisted.log_end,
            written_end: persisted.log_end,
            durable_end: persisted.log_end,
            hw: 0,
            verified_end: 0,
            bootstrap: persisted.bootstrap,
            memberships: persisted.memberships,
            election_elapsed: 0,
            election_timeout: cfg.election_timeout_ticks,
            heartbeat_elapsed: 0,
            quorum_elapsed: 0,
            ticks: 0,
            // splitmix64 state: any seed, including 0, gives a usable stream.
            rng: seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            votes: Vec::new(),
            progress: Vec::new(),
            transfer: None,
            epoch_ready: false,
            quiesced: None,
            scratch: Vec::new(),
        };
        assert!(cfg.quiesce != Some(0), "a quiescence token is non-zero");
        r.reset_election_timeout();
        r
    }

    pub fn id(&self) -> NodeId {
        self.id
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader
    }
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }
    pub fn epoch(&self) -> Epoch {
        self.hard.epoch
    }
    pub fn hard_state(&self) -> HardState {
        self.hard
    }
    pub fn high_watermark(&self) -> Offset {
        self.hw
    }
    pub fn log_end(&self) -> Offset {
        self.log_end
    }
    pub fn durable_end(&self) -> Offset {
        self.durable_end
    }
    pub fn epoch_history(&self) -> &EpochHistory {
        &self.epochs
    }
    /// The leader has committed in its epoch; only then should it advertise the epoch to clients.
    pub fn is_epoch_ready(&self) -> bool {
        self.is_leader() && self.epoch_ready
    }
    /// The active membership: the last membership batch in the log, or the bootstrap one.
    pub fn membership(&self) -> &Membership {
        self.memberships.last().map_or(&self.bootstrap, |m| &m.1)
    }
    /// KIP-101: this log's answer to OffsetsForLeaderEpoch.
    pub fn end_offset_for_epoch(&self, epoch: Epoch) -> (Epoch, Offset) {
        self.epochs.end_offset_for_epoch(epoch, self.log_end)
    }
    /// Whether a proposal would be accepted now (the leader, no transfer under way): a caller
    /// that writes a batch before proposing it asks first.
    pub fn can_propose(&self) -> Result<(), Error> {
        self.check_can_propose()
    }
    /// A peer's (written, durable) ends as the leader knows them.
    pub fn peer_progress(&self, peer: NodeId) -> Option<(Offset, Offset)> {
        self.progress
            .iter()
            .find(|p| p.node == peer)
            .map(|p| (p.matched, p.durable))
    }
    /// Ticks since the leader last heard from `peer` (an answer to anything it sent); `None`
    /// when not leading or not a peer. A live follower answers every heartbeat.
    pub fn peer_silent_ticks(&self, peer: NodeId) -> Option<u64> {
        // A quiet leader hears nothing from its followers: the node-level liveness vouches for
        // them (the caller wakes the leader when a member's node goes silent).
        let quiet = self.quiesced.is_some();
        self.progress.iter().find(|p| p.node == peer).map(|p| {
            if quiet {
                0
            } else {
                self.ticks.saturating_sub(p.heard_at)
            }
        })
    }
    /// Ticks that may pass with nothing for this replica to do: [`Self::tick`] called this
    /// many times sends nothing, changes no role and starts or abandons nothing (only its
    /// clocks move). A caller hosting thousands of groups may leave such a replica unticked
    /// that long and hand it the ticks later with [`Self::tick_by`], so long as nothing else
    /// reaches it meanwhile: the result is the same as ticking it each time.
    pub fn quiet_ticks(&self) -> u32 {
        if self.quiesced.is_some() {
            return u32::MAX;
        }
        // The clocks first (fields of the replica itself); the followers' progress (memory
        // elsewhere: thousands of groups are asked on every tick) only when those allow a tick.
        match self.role {
            Role::Leader => {
                // A transfer's clock can abandon it.
                if self.transfer.is_some() {
                    return 0;
                }
                let heartbeat = self
                    .cfg
                    .heartbeat_interval_ticks
                    .saturating_sub(self.heartbeat_elapsed.saturating_add(1));
                let quorum = self
                    .cfg
                    .election_timeout_ticks
                    .saturating_sub(self.quorum_elapsed.saturating_add(1));
                let quiet = heartbeat.min(quorum);
                // A paused follower is resumed on a tick.
                if quiet == 0 || self.progress.iter().any(|p| p.paused) {
                    return 0;
                }
                quiet
            }
            // A non-voter never campaigns: its ticks are all quiet, but the clock's bound is
            // still right (fewer ticks skipped, never one that mattered).
            Role::Follower | Role::PreCandidate | Role::Candidate => self
                .election_timeout
                .saturating_sub(self.election_elapsed.saturating_add(1)),
        }
    }

    /// A leader's keep-alives: to each peer an append of nothing at the offset it is known to
    /// hold (its `matched`, with that offset's epoch) and the commit point, as any append
    /// carries. Nothing here changes: not the heartbeat clock, not a peer's progress. For a
    /// caller that cannot tick the replica now because its log is busy with a write (a tick
    /// may ask for a retransmit, which needs the log): its followers hear from a leader that
    /// is alive and do not elect another while it writes. A follower answers one as any
    /// heartbeat. Nothing unless leading.
    pub fn keepalives(&self, out: &mut Vec<(NodeId, Message)>) {
        // A quiet leader's followers are quiet too; a keep-alive (no quiescence token) would
        // wake them to a leader that sends no heartbeats.
        if self.role != Role::Leader || self.quiesced.is_some() {
            return;
        }
        for p in &self.progress {
            let req = AppendRequest {
                epoch: self.hard.epoch,
                prev_offset: p.matched,
                prev_epoch: self.epochs.epoch_before(p.matched),
                commit: self.hw,
                batches: Vec::new(),
                fill_end: p.matched,
                quiesce: 0,
            };
            out.push((p.node, Message::Append(req)));
        }
    }

    /// Nothing to do until the next heartbeat: a leader whose followers hold everything, or a
    /// follower with a leader. Used by the multiplexer to keep idle groups cheap.
    pub fn is_idle(&self) -> bool {
        match self.role {
            Role::Leader => self
                .progress
                .iter()
                .all(|p| !p.probing && p.durable == self.log_end && self.hw == self.log_end),
            Role::Follower => self.leader.is_some(),
            _ => false,
        }
    }

    /// Quiescence. An idle group heartbeating every interval costs a message each way per
    /// follower for nothing; thousands of them cost a node most of its idle CPU. So a leader
    /// whose followers hold and have made durable everything it has, and answered its last
    /// heartbeat, sends one more heartbeat carrying its liveness token and goes quiet: no more
    /// heartbeats, no check-quorum. A follower that takes that heartbeat with nothing missing
    /// goes quiet too: its election clock stops, and its lease (no votes for others) holds for
    /// as long as the leader's node is live with that token. Node-level liveness (one ping per
    /// node pair, not per group) stands in for the heartbeats: the caller calls
    /// [`Self::check_liveness`] with it on each tick, which wakes a follower whose leader's
    /// node fell silent (its election clock starts: it campaigns unless the leader heartbeats)
    /// or restarted (its lease lapsed: it campaigns soon), and a leader one of
    /// whose members' nodes did. These wake a replica too: a proposal, a transfer, a vote
    /// request to a leader, an append without the token, an answer that is not a caught-up
    /// follower's (see `wakes`). A waking leader heartbeats at once, which wakes its
    /// followers. As CockroachDB's quiesced ranges.
    /// Safety does not rest on any of this: it changes only when replicas campaign.
    pub fn quiesced(&self) -> Option<Quiesced> {
        self.quiesced
    }
    pub fn is_quiesced(&self) -> bool {
        self.quiesced.is_some()
    }

    /// Wakes a quiet replica (see [`Self::quiesced`]). `leader_silent`: the follower's leader
    /// is known gone (its node restarted), so its lease has lapsed and it campaigns within its
    /// timeout's random part; otherwise its election clock starts from zero. A leader
    /// heartbeats at once.
    pub fn unquiesce(&mut self, leader_silent: bool, out: &mut Vec<Action>) {
        match self.quiesced.take() {
            None => {}
            Some(Quiesced::Leader) => self.wake_leader(out),
            Some(Quiesced::Follower { leader, .. }) => {
                if leader_silent {
                    self.election_elapsed = self.cfg.election_timeout_ticks;
                } else {
                    self.election_elapsed = 0;
                    // The leader may be alive and quiet, its node only stalled: it heartbeats
                    // when asked. Otherwise the followers, woken together, would elect at the
                    // end of one timeout (neither in lease any more for the other's pre-vote).
                    let epoch = self.hard.epoch;
                    self.send(leader, Message::Wake { epoch }, out);
                }
            }
        }
    }

    /// For a quiet replica, what the node-level liveness says: `live(node)` is the liveness
    /// token of `node` while it is live (heard within an election timeout), `None` otherwise.
    /// A follower whose leader is not live wakes (its election clock from zero; with its
    /// lease lapsed if the leader's node restarted under a new token); a leader with a member
    /// that is not live, or restarted, wakes (and heartbeats, so check-quorum and the in-sync
    /// set see the silence).
    pub fn check_liveness(&mut self, live: impl Fn(NodeId) -> Option<u64>, out: &mut Vec<Action>) {
        let lapse = self.liveness_lapse(&live);
        self.note_member_tokens(&live);
        let Some(leader_silent) = lapse else {
            return;
        };
        self.unquiesce(leader_silent, out);
        // The members the liveness says are gone do not count towards the first check-quorum
        // window (a leader cut off from all of them steps down after one election timeout).
        for p in &mut self.progress {
            if live(p.node).is_none() {
                p.active = false;
            }
        }
    }

    /// What [`Self::check_liveness`] would do, without doing it: `None` if nothing (awake, or
    /// quiet with everyone it relies on live), else `Some(leader_silent)` for
    /// [`Self::unquiesce`].
    pub fn liveness_lapse(&self, live: impl Fn(NodeId) -> Option<u64>) -> Option<bool> {
        match self.quiesced? {
            // A new token: the leader's node restarted, so the leader is gone for sure. No
            // token: its node fell silent, which under load may be a stall (three nodes on two
            // cores stall for half a second), so the follower wakes as if it had heard the
            // leader last just now and elects only if no heartbeat follows (a woken follower
            // of a quiet leader that is alive campaigns after its timeout; the pre-vote wakes
            // the leader, and nobody moves epoch). Lapsing the lease here made every quiet
            // group of a briefly stalled node elect at once.
            Quiesced::Follower { leader, token } => match live(leader) {
                Some(t) if t == token => None,
                Some(_) => Some(true),
                None => Some(false),
            },
            Quiesced::Leader => self
                .progress
                .iter()
                .any(|p| match live(p.node) {
                    None => true,
                    Some(t) => p.token != 0 && t != p.token,
                })
                .then_some(false),
        }
    }

    /// A leader notes its members' liveness tokens (for [`Self::liveness_lapse`]: a changed
    /// one wakes it). Changes nothing else; the caller's liveness pass calls it on a quiet
    /// leader while nothing lapsed.
    pub fn note_member_tokens(&mut self, live: impl Fn(NodeId) -> Option<u64>) {
        if self.role != Role::Leader {
            return;
        }
        for p in &mut self.progress {
            p.token = live(p.node).unwrap_or(0);
        }
    }

    // ---- events ------------------------------------------------------------------------------

    /// One unit of logical time.
    pub fn tick(&mut self, out: &mut Vec<Action>) {
        self.tick_by(1, out);
    }

    /// `n` units of logical time at once: what a caller that could not tick the replica for a
    /// while (it was busy) owes it. The clocks all advance by `n`, then the replica does what
    /// is due once: one heartbeat round however many intervals passed, one check-quorum, one
    /// campaign. `tick_by(1)` is `tick`; `tick_by(0)` does nothing.
    pub fn tick_by(&mut self, n: u32, out: &mut Vec<Action>) {
        if n == 0 {
            return;
        }
        self.ticks += u64::from(n);
        if self.quiesced.is_some() {
            // Quiet: the clocks stand still (a woken replica starts them afresh).
            return;
        }
        match self.role {
            Role::Leader => {
                self.heartbeat_elapsed = self.heartbeat_elapsed.saturating_add(n);
                self.quorum_elapsed = self.quorum_elapsed.saturating_add(n);
                if let Some((target, elapsed)) = self.transfer {
                    // A transfer that has not finished in an election timeout is abandoned so
                    // the group is not left refusing proposals.
                    let elapsed = elapsed.saturating_add(n);
                    if elapsed >= self.cfg.election_timeout_ticks {
                        self.transfer = None;
                    } else {
                        self.transfer = Some((target, elapsed));
                    }
                }
                if self.quorum_elapsed >= self.cfg.election_timeout_ticks {
                    self.quorum_elapsed = 0;
                    if !self.check_quorum() {
                        tracing::debug!(
                            id = self.id,
                            epoch = self.hard.epoch,
                            "check-quorum: stepping down"
                        );
                        self.become_follower(self.hard.epoch, None, out);
                        return;
                    }
                }
                if self.heartbeat_elapsed >= self.cfg.heartbeat_interval_ticks {
                    self.heartbeat_elapsed = 0;
                    let token = self.quiesce_token();
                    self.broadcast_heartbeat(token, out);
                    if token != 0 {
                        self.quiesced = Some(Quiesced::Leader);
                    }
                } else {
                    self.resume_paused(out);
                }
            }
            Role::Follower | Role::PreCandidate | Role::Candidate => {
                self.election_elapsed = self.election_elapsed.saturating_add(n);
                if self.election_elapsed >= self.election_timeout && self.may_campaign() {
                    self.campaign(true, false, out);
                }
            }
        }
    }

    /// Starts an election now rather than after the election timeout (a pre-vote first, so
    /// it disturbs no healthy leader): the preferred replica of a new group campaigns at once,
    /// so the placement's leader usually wins the first epoch and clients wait no timeout.
    /// Ignored by a leader and by a non-voter.
    pub fn campaign_now(&mut self, out: &mut Vec<Action>) {
        if self.role != Role::Leader && self.may_campaign() {
            self.campaign(true, false, out);
        }
    }

    /// A message from `from`.
    pub fn step(&mut self, from: NodeId, msg: Message, out: &mut Vec<Action>) {
        if self.quiesced.is_some() && self.wakes(&msg) {
            self.unquiesce(false, out);
        }
        match msg {
            Message::Append(req) => self.on_append(from, req, out),
            Message::AppendResponse(resp) => self.on_append_response(from, resp, out),
            Message::Vote(req) => self.on_vote(from, req, out),
            Message::VoteResponse(resp) => self.on_vote_response(from, resp, out),
            // What it asks (a quiet leader's heartbeat) was done above, if anything.
            Message::Wake { .. } => {}
            Message::TimeoutNow { epoch } => {
                if epoch > self.hard.epoch {
                    self.become_follower(epoch, Some(from), out);
                }
                if epoch == self.hard.epoch
                    && self.role == Role::Follower
                    && self.leader == Some(from)
                    && self.may_campaign()
                {
                    self.campaign(false, true, out);
                }
            }
        }
    }

    /// Leader only: assign offsets to `batches` (record count, bytes) and append them in the
    /// current epoch. Returns the first batch's base offset.
    pub fn propose(
        &mut self,
        batches: &[(u32, Bytes)],
        out: &mut Vec<Action>,
    ) -> Result<Offset, Error> {
        self.check_can_propose()?;
        if batches.is_empty() || batches.len() > self.cfg.max_batches_per_proposal {
            return Err(Error::InvalidProposal {
                reason: "batch count out of range",
            });
        }
        if batches.iter().any(|b| b.0 == 0) {
            return Err(Error::InvalidProposal {
                reason: "a batch with no records",
            });
        }
        self.unquiesce(false, out);
        let base = self.log_end;
        let mut at = base;
        let built = batches
            .iter()
            .map(|(count, bytes)| {
                let b = Batch {
                    base: at,
                    count: *count,
                    epoch: self.hard.epoch,
                    bytes: bytes.clone(),
                    membership: None,
                };
                at = b.end();
                b
            })
            .collect();
        self.append_local(built, out);
        Ok(base)
    }

    /// Leader only: append a membership batch (one record, `bytes` in the caller's encoding)
    /// making `next` the membership. One change at a time: add a learner, promote a caught-up
    /// learner, remove a voter other than the leader, or remove a learner.
    pub fn propose_membership(
        &mut self,
        next: Membership,
        bytes: Bytes,
        out: &mut Vec<Action>,
    ) -> Result<Offset, Error> {
        self.check_can_propose()?;
        if !self.epoch_ready {
            return Err(Error::MembershipChangeRefused {
                reason: "leader has not committed in its epoch yet",
            });
        }
        if self.memberships.last().is_some_and(|m| m.0 >= self.hw) {
            return Err(Error::MembershipChangeRefused {
                reason: "previous membership change not committed",
            });
        }
        self.check_single_change(&next)?;
        self.unquiesce(false, out);
        let base = self.log_end;
        let batch = Batch {
            base,
            count: 1,
            epoch: self.hard.epoch,
            bytes,
            membership: Some(next),
        };
        self.append_local(vec![batch], out);
        Ok(base)
    }

    /// Leader only: hand leadership to `target`, a voter. Proposals are refused until it takes
    /// over or an election timeout passes.
    pub fn transfer_leadership(
        &mut self,
        target: NodeId,
        out: &mut Vec<Action>,
    ) -> Result<(), Error> {
        self.check_can_propose()?;
        if target == self.id || !self.membership().is_voter(target) {
            return Err(Error::NotMember {
                node: target,
                role: "voter other than the leader",
            });
        }
        self.unquiesce(false, out);
        self.transfer = Some((target, 0));
        self.maybe_send_timeout_now(target, out);
        if self.transfer.is_some() {
            if let Some(i) = self.progress_index(target) {
                self.send_append(i, out);
            }
        }
        Ok(())
    }

    /// The caller's log has written everything below `end` (not necessarily durable).
    pub fn on_appended(&mut self, end: Offset, out: &mut Vec<Action>) {
        let end = end.min(self.log_end);
        if end <= self.written_end {
            return;
        }
        self.written_end = end;
        if self.role == Role::Leader {
            for i in 0..self.progress.len() {
                if self.progress[i].may_stream() && self.progress[i].next < self.written_end {
                    self.send_append(i, out);
                }
            }
        } else {
            self.report_to_leader(out);
        }
    }

    /// Everything below `end` of the current log is durable. The caller must not report an
    /// fsync that began before a truncation as covering batches appended after it.
    pub fn on_durable(&mut self, end: Offset, out: &mut Vec<Action>) {
        let end = end.min(self.written_end);
        if end <= self.durable_end {
            return;
        }
        self.durable_end = end;
        if self.role == Role::Leader {
            self.maybe_commit(out);
        } else {
            self.report_to_leader(out);
        }
    }

    /// Leader: the sender of an append to `to` in `epoch`, asked to attach the batches of
    /// `prev_offset..fill_end`, attached only those below `filled_end` (its byte limit, or
    /// the throttle's grant: nothing at all). It must drop the appends queued after it for
    /// `to` (they start past what was sent); the core goes on from `filled_end`, keeping up
    /// to [`MAX_CATCHUP_APPENDS_IN_FLIGHT`] such appends in flight, or pauses until the next
    /// tick when nothing was attached.
    pub fn on_append_filled(
        &mut self,
        to: NodeId,
        epoch: Epoch,
        prev_offset: Offset,
        fill_end: Offset,
        filled_end: Offset,
        out: &mut Vec<Action>,
    ) {
        assert!(
            prev_offset <= filled_end && filled_end < fill_end,
            "filled {prev_offset}..{filled_end} of {prev_offset}..{fill_end}"
        );
        if self.role != Role::Leader || epoch != self.hard.epoch {
            return;
        }
        let Some(i) = self.progress_index(to) else {
            return;
        };
        let p = &mut self.progress[i];
        // A probe or a retransmission since (they restart from the follower's end) leaves
        // nothing of this stream to correct.
        if p.probing || p.next < fill_end {
            return;
        }
        p.next = filled_end;
        if filled_end == prev_offset {
            p.paused = true;
            return;
        }
        debug_assert!(p.in_flight.last().is_none_or(|&e| e <= prev_offset));
        p.in_flight.push(filled_end);
        if p.may_stream() && p.next < self.written_end {
            self.send_append(i, out);
        }
    }

    // ---- follower side -----------------------------------------------------------------------

    fn on_append(&mut self, from: NodeId, req: AppendRequest, out: &mut Vec<Action>) {
        // Every append decides afresh: only a quiescing heartbeat with nothing missing (below)
        // leaves the follower quiet.
        if matches!(self.quiesced, Some(Quiesced::Follower { .. })) {
            self.quiesced = None;
        }
        if req.epoch < self.hard.epoch {
            let resp = self.reject(self.log_end, NO_EPOCH);
            self.send(from, Message::AppendResponse(resp), out);
            return;
        }
        if req.epoch > self.hard.epoch || self.role != Role::Follower || self.leader != Some(from) {
            assert!(
                !(req.epoch == self.hard.epoch && self.role == Role::Leader),
                "two leaders in epoch {}: {} and {from}",
                self.hard.epoch,
                self.id
            );
            self.become_follower(req.epoch, Some(from), out);
        }
        self.election_elapsed = 0;
        if req.prev_offset > self.log_end
            || self.epochs.epoch_before(req.prev_offset) != req.prev_epoch
        {
            let resp = self.reject(req.prev_offset, req.prev_epoch);
            self.send(from, Message::AppendResponse(resp), out);
            return;
        }
        let mut at = req.prev_offset;
        for b in &req.batches {
            if b.base != at || b.count == 0 || b.epoch > req.epoch {
                tracing::warn!(
                    from,
                    base = b.base,
                    expected = at,
                    "malformed append: dropped"
                );
                return;
            }
            at = b.end();
        }
        let mut verified = req.prev_offset;
        let mut fresh = Vec::new();
        for b in req.batches {
            if b.base < self.log_end && fresh.is_empty() {
                if self.epochs.epoch_at(b.base) == b.epoch {
                    // Already here: one leader per epoch means same (offset, epoch), same batch.
                    verified = b.end();
                    continue;
                }
                self.truncate_to(b.base, out);
            }
            verified = b.end();
            fresh.push(b);
        }
        if !fresh.is_empty() {
            self.append_local(fresh, out);
        }
        self.verified_end = self.verified_end.max(verified);
        let commit = req.commit.min(self.verified_end);
        self.advance_hw(commit, out);
        let caught_up = self.verified_end == self.log_end
            && self.written_end == self.log_end
            && self.durable_end == self.log_end
            && self.hw == self.log_end
            && req.prev_offset == self.log_end
            && req.commit == self.log_end;
        if req.quiesce != 0 && self.cfg.quiesce.is_some() && caught_up {
            self.quiesced = Some(Quiesced::Follower {
                leader: from,
                token: req.quiesce,
            });
        }
        let resp = self.accept();
        self.send(from, Message::AppendResponse(resp), out);
    }

    /// The KIP-101 hint for a leader whose append at (`prev_offset`, `prev_epoch`) did not match:
    /// our last epoch at or below the probe, and where our log of that epoch ends. If our entry
    /// there is newer than the leader's, we answer with our largest epoch not above the leader's,
    /// so every round names a smaller epoch until the two logs agree.
    fn reject(&self, prev_offset: Offset, prev_epoch: Epoch) -> AppendResponse {
        let p = prev_offset.min(self.log_end);
        let mine = self.epochs.epoch_before(p);
        let (last_epoch, log_end) = if mine > prev_epoch && prev_epoch != NO_EPOCH {
            let (e, end) = self.epochs.end_offset_for_epoch(prev_epoch, self.log_end);
            (e, end.min(p))
        } else if mine > prev_epoch {
            (NO_EPOCH, 0)
        } else {
            (mine, p)
        };
        AppendResponse {
            epoch: self.hard.epoch,
            success: false,
            written_end: 0,
            durable_end: 0,
            last_epoch,
            log_end,
        }
    }

    fn accept(&self) -> AppendResponse {
        AppendResponse {
            epoch: self.hard.epoch,
            success: true,
            written_end: self.written_end.min(self.verified_end),
            durable_end: self.durable_end.min(self.verified_end),
            last_epoch: NO_EPOCH,
            log_end: self.verified_end,
        }
    }

    fn report_to_leader(&mut self, out: &mut Vec<Action>) {
        if self.role != Role::Follower || self.verified_end == 0 {
            return;
        }
        if let Some(leader) = self.leader {
            let resp = self.accept();
            self.send(leader, Message::AppendResponse(resp), out);
        }
    }

    fn truncate_to(&mut self, end: Offset, out: &mut Vec<Action>) {
        assert!(
            end >= self.hw,
            "truncating to {end} below the high watermark {}",
            self.hw
        );
        assert!(
            end >= self.verified_end,
            "truncating to {end} below what the leader verified ({})",
            self.verified_end
        );
        assert!(self.role != Role::Leader, "a leader never truncates");
        self.log_end = end;
        self.written_end = self.written_end.min(end);
        self.durable_end = self.durable_end.min(end);
        self.epochs.truncate(end);
        let before = self.memberships.len();
        self.memberships.retain(|m| m.0 < end);
        out.push(Action::Truncate { end });
        if self.memberships.len() != before {
            out.push(Action::MembershipChanged(self.membership().clone()));
        }
    }

    fn append_local(&mut self, batches: Vec<Batch>, out: &mut Vec<Action>) {
        let mut changed = false;
        for b in &batches {
            assert_eq!(b.base, self.log_end, "appends are contiguous");
            assert!(b.epoch <= self.hard.epoch);
            self.epochs.append(b.epoch, b.base);
            self.log_end = b.end();
            if let Some(m) = &b.membership {
                self.memberships.push((b.base, m.clone()));
                changed = true;
            }
        }
        out.push(Action::Append { batches });
        if changed {
            out.push(Action::MembershipChanged(self.membership().clone()));
            if self.role == Role::Leader {
                self.sync_progress();
            }
        }
    }

    fn advance_hw(&mut self, hw: Offset, out: &mut Vec<Action>) {
        if hw > self.hw {
            assert!(
                hw <= self.log_end,
                "high watermark {hw} past the log end {}",
                self.log_end
            );
            self.hw = hw;
            out.push(Action::HighWatermark(hw));
        }
    }

    // ---- leader side -------------------------------------------------------------------------

    fn check_can_propose(&self) -> Result<(), Error> {
        if self.role != Role::Leader {
            return Err(Error::NotLeader {
                leader: self.leader,
            });
        }
        if let Some((target, _)) = self.transfer {
            return Err(Error::TransferInProgress { target });
        }
        Ok(())
    }

    fn check_single_change(&self, next: &Membership) -> Result<(), Error> {
        let cur = self.membership();
        let refuse = |reason| Err(Error::MembershipChangeRefused { reason });
        let has_dupes = |v: &[NodeId]| (1..v.len()).any(|i| v[..i].contains(&v[i]));
        if has_dupes(&next.voters)
            || has_dupes(&next.learners)
            || next.voters.iter().any(|v| next.learners.contains(v))
        {
            return refuse("a node listed twice");
        }
        if !next.is_voter(self.id) {
            return refuse("the leader cannot remove or demote itself: transfer leadership first");
        }
        let added_voters: Vec<NodeId> = next
            .voters
            .iter()
            .copied()
            .filter(|v| !cur.is_voter(*v))
            .collect();
        let removed_voters = cur.voters.iter().filter(|v| !next.is_voter(**v)).count();
        let added_learners = next.learners.iter().filter(|l| !cur.contains(**l)).count();
        let removed_learners = cur.learners.iter().filter(|l| !next.contains(**l)).count();
        let changes = added_voters.len() + removed_voters + added_learners + removed_learners;
        if changes != 1 {
            return refuse("exactly one member may change at a time");
        }
        if let Some(&v) = added_voters.first() {
            if !cur.is_learner(v) {
                return refuse("a new voter must first catch up as a learner");
            }
            let caught_up = self
                .progress
                .iter()
                .any(|p| p.node == v && !p.probing && p.durable >= self.hw);
            if !caught_up {
                return refuse("the learner has not caught up to the high watermark");
            }
        }
        Ok(())
    }

    fn become_leader(&mut self, out: &mut Vec<Action>) {
        assert_eq!(self.hard.voted_for, Some(self.id));
        self.role = Role::Leader;
        self.leader = Some(self.id);
        self.quiesced = None;
        self.epoch_ready = false;
        self.heartbeat_elapsed = 0;
        self.quorum_elapsed = 0;
        self.transfer = None;
        self.progress.clear();
        self.sync_progress();
        tracing::debug!(id = self.id, epoch = self.hard.epoch, "became leader");
        out.push(Action::BecomeLeader {
            epoch: self.hard.epoch,
        });
        for i in 0..self.progress.len() {
            self.send_append(i, out);
        }
        self.maybe_commit(out);
    }

    /// Makes the progress list match the membership: new peers start probing at our log end.
    fn sync_progress(&mut self) {
        let m = self.membership().clone();
        self.progress.retain(|p| m.contains(p.node));
        for n in m.peers(self.id) {
            if !self.progress.iter().any(|p| p.node == n) {
                self.progress.push(Progress {
                    node: n,
                    next: self.log_end,
                    matched: 0,
                    durable: 0,
                    probing: true,
                    active: true,
                    acked: false,
                    heard_at: self.ticks,
                    in_flight: Vec::new(),
                    paused: false,
                    token: 0,
                });
            }
        }
    }

    fn progress_index(&self, node: NodeId) -> Option<usize> {
        self.progress.iter().position(|p| p.node == node)
    }

    fn send_append(&mut self, i: usize, out: &mut Vec<Action>) {
        self.send_append_with(i, 0, out);
    }

    /// An append to peer `i`, carrying `quiesce` (see [`AppendRequest::quiesce`]).
    fn send_append_with(&mut self, i: usize, quiesce: u64, out: &mut Vec<Action>) {
        let p = &mut self.progress[i];
        assert!(p.next <= self.log_end);
        let from = p.next;
        let fill_end = if p.probing {
            from
        } else {
            self.written_end.max(from)
        };
        p.next = fill_end;
        let to = p.node;
        let req = AppendRequest {
            epoch: self.hard.epoch,
            prev_offset: from,
            prev_epoch: self.epochs.epoch_before(from),
            commit: self.hw,
            batches: Vec::new(),
            fill_end,
            quiesce,
        };
        self.send(to, Message::Append(req), out);
    }

    /// The token to quiesce with at this heartbeat, or 0: quiescence is on, the group is the
    /// writable leader with no transfer under way, and every member holds, has made durable
    /// and has acknowledged (since the last heartbeat) everything in the log, all of it
    /// committed.
    fn quiesce_token(&self) -> u64 {
        let Some(token) = self.cfg.quiesce else {
            return 0;
        };
        let end = self.log_end;
        let settled = self.epoch_ready
            && self.transfer.is_none()
            && self.hw == end
            && self.written_end == end
            && self.durable_end == end
            && self.progress.iter().all(|p| {
                p.acked
                    && !p.probing
                    && !p.paused
                    && p.in_flight.is_empty()
                    && p.matched == end
                    && p.durable == end
                    && p.next == end
            });
        if settled {
            token
        } else {
            0
        }
    }

    /// Whether `msg` wakes a quiet replica: anything but a quiescing heartbeat or a vote request
    /// (a follower) or a caught-up follower's answer in this epoch (a leader: the answers to
    /// its quiescing heartbeat).
    fn wakes(&self, msg: &Message) -> bool {
        match (self.quiesced, msg) {
            (Some(Quiesced::Follower { .. }), Message::Append(req)) => req.quiesce == 0,
            // A vote request is answered as by any follower hearing its leader (its lease holds
            // while the leader's node is live), and leaves it quiet: woken, it would start a
            // fresh lease then and there, and if the leader had just died it would refuse the
            // candidate a whole timeout longer than a follower that heard the leader last at
            // the same time. (A transfer's vote bypasses the lease; granting it ends the quiet.)
            (Some(Quiesced::Follower { .. }), Message::Vote(_) | Message::Wake { .. }) => false,
            (Some(Quiesced::Leader), Message::AppendResponse(r)) => {
                !(r.success
                    && r.epoch == self.hard.epoch
                    && r.log_end == self.log_end
                    && r.written_end == self.log_end
                    && r.durable_end == self.log_end)
            }
            _ => true,
        }
    }

    /// A quiet leader wakes: its clocks start afresh, its members count as heard from (the
    /// node-level liveness vouched for them), and it heartbeats now, which wakes its
    /// followers before anything it does next (a proposal that fails to be written leaves
    /// them awake, so they elect once this leader falls silent).
    fn wake_leader(&mut self, out: &mut Vec<Action>) {
        self.heartbeat_elapsed = 0;
        self.quorum_elapsed = 0;
        let ticks = self.ticks;
        for p in &mut self.progress {
            p.active = true;
            p.heard_at = ticks;
        }
        // Not acknowledged until answered: a leader goes quiet again only once every member
        // has answered since (a member whose node died never does, so its silence shows).
        self.broadcast_heartbeat(0, out);
    }

    fn broadcast_heartbeat(&mut self, quiesce: u64, out: &mut Vec<Action>) {
        for i in 0..self.progress.len() {
            let p = &mut self.progress[i];
            if !p.acked && !p.probing && p.next > p.matched {
                // Nothing acknowledged for a whole heartbeat interval: resend from the last
                // offset the follower is known to hold.
                p.next = p.matched;
                p.in_flight.clear();
            }
            p.acked = false;
            p.paused = false;
            self.send_append_with(i, quiesce, out);
        }
    }

    /// Peers whose catch-up the throttle paused get their next append (a tick without a
    /// heartbeat; a heartbeat sends one anyway).
    fn resume_paused(&mut self, out: &mut Vec<Action>) {
        for i in 0..self.progress.len() {
            let p = &mut self.progress[i];
            if !p.paused {
                continue;
            }
            p.paused = false;
            if p.may_stream() && p.next < self.written_end {
                self.send_append(i, out);
            }
        }
    }

    fn on_append_response(&mut self, from: NodeId, resp: AppendResponse, out: &mut Vec<Action>) {
        if resp.epoch > self.hard.epoch {
            self.become_follower(resp.epoch, None, out);
            return;
        }
        if resp.epoch < self.hard.epoch || self.role != Role::Leader {
            return;
        }
        let Some(i) = self.progress_index(from) else {
            return;
        };
        let log_end = self.log_end;
        let ticks = self.ticks;
        let p = &mut self.progress[i];
        p.active = true;
        p.acked = true;
        p.heard_at = ticks;
        if resp.success {
            assert!(
                resp.log_end <= log_end,
                "follower verified past our log end"
            );
            p.matched = p.matched.max(resp.written_end);
            p.durable = p.durable.max(resp.durable_end);
            p.next = p.next.max(resp.log_end);
            p.probing = false;
            p.in_flight.retain(|&end| end > resp.log_end);
            if p.may_stream() && p.next < self.written_end {
                self.send_append(i, out);
            }
            self.maybe_commit(out);
            if let Some((target, _)) = self.transfer {
                if target == from {
                    self.maybe_send_timeout_now(target, out);
                }
            }
        } else {
            // KIP-101/279: our end offset for the follower's last epoch. Only when we hold that
            // epoch too is the follower's own end a batch boundary of ours (both are prefixes
            // of that epoch's leader's log), so only then may it cap the probe; otherwise the
            // next answer names an older epoch, so the exchange ends.
            let (epoch, end) = self.epochs.end_offset_for_epoch(resp.last_epoch, log_end);
            let next = if epoch == resp.last_epoch {
                end.min(resp.log_end)
            } else {
                end
            };
            p.next = next;
            p.matched = p.matched.min(next);
            p.probing = true;
            p.in_flight.clear();
            self.send_append(i, out);
        }
    }

    fn maybe_send_timeout_now(&mut self, target: NodeId, out: &mut Vec<Action>) {
        let caught_up = self
            .progress
            .iter()
            .any(|p| p.node == target && !p.probing && p.matched == self.log_end);
        if caught_up {
            let epoch = self.hard.epoch;
            self.send(target, Message::TimeoutNow { epoch }, out);
        }
    }

    /// Commit = durable on a majority of voters, counted only once it covers a batch of our
    /// own epoch (earlier epochs' batches ride along: Raft's figure-8 rule).
    fn maybe_commit(&mut self, out: &mut Vec<Action>) {
        let Some(epoch_start) = self
            .epochs
            .last_start()
            .filter(|_| self.epochs.last_epoch() == self.hard.epoch)
        else {
            return;
        };
        let m = self.memberships.last().map_or(&self.bootstrap, |m| &m.1);
        self.scratch.clear();
        for &v in &m.voters {
            if v == self.id {
                self.scratch.push(self.durable_end);
            } else if let Some(p) = self.progress.iter().find(|p| p.node == v) {
                self.scratch.push(p.durable);
            } else {
                self.scratch.push(0);
            }
        }
        let quorum = m.quorum();
        if self.scratch.len() < quorum {
            return;
        }
        self.scratch.sort_unstable_by(|a, b| b.cmp(a));
        let candidate = self.scratch[quorum - 1];
        if candidate <= epoch_start || candidate <= self.hw {
            return;
        }
        self.advance_hw(candidate, out);
        if !self.epoch_ready {
            self.epoch_ready = true;
            out.push(Action::LeaderReady {
                epoch: self.hard.epoch,
            });
        }
    }

    fn check_quorum(&mut self) -> bool {
        let m = self.memberships.last().map_or(&self.bootstrap, |m| &m.1);
        let mut heard = usize::from(m.is_voter(self.id));
        for p in &mut self.progress {
            if p.active && m.is_voter(p.node) {
                heard += 1;
            }
            p.active = false;
        }
        heard >= m.quorum()
    }

    // ---- elections ---------------------------------------------------------------------------

    fn may_campaign(&self) -> bool {
        self.membership().is_voter(self.id)
    }

    fn campaign(&mut self, pre_vote: bool, transfer: bool, out: &mut Vec<Action>) {
        self.quiesced = None;
        let epoch = if pre_vote {
            self.role = Role::PreCandidate;
            self.hard.epoch + 1
        } else {
            self.role = Role::Candidate;
            self.hard.epoch += 1;
            self.hard.voted_for = Some(self.id);
            self.verified_end = 0;
            out.push(Action::PersistHardState(self.hard));
            self.hard.epoch
        };
        if self.leader.take().is_some() {
            out.push(Action::BecomeFollower {
                epoch: self.hard.epoch,
                leader: None,
            });
        }
        self.election_elapsed = 0;
        self.reset_election_timeout();
        self.votes.clear();
        self.votes.push((self.id, true));
        if self.tally_won() {
            if pre_vote {
                self.campaign(false, transfer, out);
            } else {
                self.become_leader(out);
            }
            return;
        }
        let req = VoteRequest {
            epoch,
            last_epoch: self.epochs.last_epoch(),
            log_end: self.log_end,
            pre_vote,
            transfer,
        };
        let voters = self.membership().voters.clone();
        for v in voters.into_iter().filter(|&v| v != self.id) {
            self.send(v, Message::Vote(req), out);
        }
    }

    fn tally_won(&self) -> bool {
        let m = self.membership();
        self.votes.iter().filter(|v| v.1 && m.is_voter(v.0)).count() >= m.quorum()
    }

    fn tally_lost(&self) -> bool {
        let m = self.membership();
        self.votes
            .iter()
            .filter(|v| !v.1 && m.is_voter(v.0))
            .count()
            >= m.quorum()
    }

    fn on_vote(&mut self, from: NodeId, req: VoteRequest, out: &mut Vec<Action>) {
        // Leader lease (with check-quorum): while we hear from a leader, a node that lost touch
        // with it cannot start a new epoch here, so it cannot depose a healthy leader.
        let in_lease = !req.transfer
            && self.leader.is_some()
            && (self.role == Role::Leader
                || self.election_elapsed < self.cfg.election_timeout_ticks);
        let up_to_date = (req.last_epoch, req.log_end) >= (self.epochs.last_epoch(), self.log_end);
        if req.pre_vote {
            let granted = req.epoch > self.hard.epoch && !in_lease && up_to_date;
            let epoch = if granted { req.epoch } else { self.hard.epoch };
            let resp = VoteResponse {
                epoch,
                granted,
                pre_vote: true,
            };
            self.send(from, Message::VoteResponse(resp), out);
            return;
        }
        if req.epoch < self.hard.epoch || (req.epoch > self.hard.epoch && in_lease) {
            let resp = VoteResponse {
                epoch: self.hard.epoch,
                granted: false,
                pre_vote: false,
            };
            self.send(from, Message::VoteResponse(resp), out);
            return;
        }
        if req.epoch > self.hard.epoch {
            self.become_follower(req.epoch, None, out);
        }
        // A leader or candidate of this epoch has voted for itself, so it never grants here.
        let can_vote = self.hard.voted_for.is_none() || self.hard.voted_for == Some(from);
        let granted = can_vote && up_to_date;
        if granted {
            if self.hard.voted_for != Some(from) {
                self.hard.voted_for = Some(from);
                out.push(Action::PersistHardState(self.hard));
            }
            if self.role == Role::PreCandidate {
                self.become_follower(self.hard.epoch, None, out);
            }
            self.election_elapsed = 0;
        }
        let resp = VoteResponse {
            epoch: self.hard.epoch,
            granted,
            pre_vote: false,
        };
        self.send(from, Message::VoteResponse(resp), out);
    }

    fn on_vote_response(&mut self, from: NodeId, resp: VoteResponse, out: &mut Vec<Action>) {
        let expected = match self.role {
            Role::PreCandidate if resp.pre_vote => self.hard.epoch + 1,
            Role::Candidate if !resp.pre_vote => self.hard.epoch,
            _ => {
                if !resp.granted && resp.epoch > self.hard.epoch {
                    self.become_follower(resp.epoch, None, out);
                }
                return;
            }
        };
        if !resp.granted && resp.epoch > self.hard.epoch {
            self.become_follower(resp.epoch, None, out);
            return;
        }
        if resp.granted && resp.epoch != expected {
            return;
        }
        if !self.votes.iter().any(|v| v.0 == from) {
            self.votes.push((from, resp.granted));
        }
        if self.tally_won() {
            if self.role == Role::PreCandidate {
                self.campaign(false, false, out);
            } else {
                self.become_leader(out);
            }
        } else if self.tally_lost() {
            self.become_follower(self.hard.epoch, None, out);
        }
    }

    fn become_follower(&mut self, epoch: Epoch, leader: Option<NodeId>, out: &mut Vec<Action>) {
        assert!(epoch >= self.hard.epoch);
        if epoch > self.hard.epoch {
            self.hard = HardState {
                epoch,
                voted_for: None,
            };
            self.verified_end = 0;
            out.push(Action::PersistHardState(self.hard));
        }
        let was = (self.role, self.leader);
        self.role = Role::Follower;
        self.leader = leader;
        self.quiesced = None;
        self.transfer = None;
        self.progress.clear();
        self.epoch_ready = false;
        self.election_elapsed = 0;
        self.reset_election_timeout();
        if was != (Role::Follower, leader) {
            out.push(Action::BecomeFollower { epoch, leader });
        }
    }

    fn reset_election_timeout(&mut self) {
        let base = self.cfg.election_timeout_ticks;
        self.election_timeout = base + (self.next_random() % u64::from(base)) as u32;
    }

    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn send(&self, to: NodeId, msg: Message, out: &mut Vec<Action>) {
        out.push(Action::Send { to, msg });
    }
}
