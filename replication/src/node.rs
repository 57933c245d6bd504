//! The node-level multiplexer: every group hosted on a node, and one message per peer per call.
//!
//! Groups never send on their own. Everything the groups of one node address to one peer during
//! one call (a tick, a received message, a local append or fsync) travels as a single
//! [`NodeMessage`] carrying an entry per group, as Redpanda's heartbeat_manager batches
//! heartbeats. So the per-tick message count between two nodes is one, whatever the number of
//! groups; an idle group costs a counter increment per tick and a small entry per heartbeat.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::error::Error;
use crate::liveness::{PeerLiveness, Ping};
use crate::replica::Replica;
use crate::types::{Action, GroupId, Membership, Message, NodeId, Offset};

/// Every group's messages from one node to another, produced by one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMessage {
    pub from: NodeId,
    pub to: NodeId,
    pub items: Vec<(GroupId, Message)>,
}

/// What the caller must do after a call, in this order: perform `actions` (each group's in the
/// order given; a PersistHardState completes before anything after it), then send `messages`.
#[derive(Debug, Default)]
pub struct Output {
    pub actions: Vec<(GroupId, Action)>,
    pub messages: Vec<NodeMessage>,
}

pub struct Node {
    id: NodeId,
    /// This node's liveness token (0: it sends no pings and its groups never go quiet).
    token: u64,
    /// What the peers' pings say (see [`crate::liveness`]).
    liveness: PeerLiveness,
    groups: BTreeMap<GroupId, Replica>,
    scratch: Vec<Action>,
    actions: Vec<(GroupId, Action)>,
    outbox: BTreeMap<NodeId, Vec<(GroupId, Message)>>,
}

impl Node {
    pub fn new(id: NodeId) -> Self {
        Self::with_liveness(id, 0, crate::replica::DEFAULT_ELECTION_TIMEOUT_TICKS)
    }

    /// A node whose groups may go quiet (their config's `quiesce` is `Some(token)`): it pings
    /// its peers ([`Self::ping`]) and wakes its quiet groups when a peer they rely on falls
    /// silent for `timeout_ticks` ticks or restarts.
    pub fn with_liveness(id: NodeId, token: u64, timeout_ticks: u32) -> Self {
        Node {
            id,
            token,
            liveness: PeerLiveness::new(timeout_ticks),
            groups: BTreeMap::new(),
            scratch: Vec::new(),
            actions: Vec::new(),
            outbox: BTreeMap::new(),
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Hosts `replica` as group `group` (replacing any previous replica of that group).
    pub fn add_group(&mut self, group: GroupId, replica: Replica) {
        assert_eq!(replica.id(), self.id);
        self.groups.insert(group, replica);
    }

    pub fn remove_group(&mut self, group: GroupId) -> Option<Replica> {
        self.groups.remove(&group)
    }

    pub fn group(&self, group: GroupId) -> Option<&Replica> {
        self.groups.get(&group)
    }

    pub fn groups(&self) -> impl Iterator<Item = (GroupId, &Replica)> {
        self.groups.iter().map(|(g, r)| (*g, r))
    }

    /// The ping the caller sends every peer node on each tick (none without a token).
    pub fn ping(&self) -> Option<Ping> {
        (self.token != 0).then_some(Ping {
            token: self.token,
            shard: 0,
        })
    }

    /// A peer's ping.
    pub fn receive_ping(&mut self, from: NodeId, ping: Ping) {
        self.liveness.heard(from, ping);
    }

    /// One tick for every group: quiet groups first hear what the peers' liveness says.
    pub fn tick(&mut self) {
        self.liveness.tick();
        let live = self.liveness.snapshot();
        let mut out = std::mem::take(&mut self.scratch);
        for (&g, r) in self.groups.iter_mut() {
            r.check_liveness(|n| live.live(n), &mut out);
            r.tick(&mut out);
            route(g, &mut out, &mut self.actions, &mut self.outbox);
        }
        self.scratch = out;
    }

    /// A message from a peer; entries for groups not hosted here are dropped.
    pub fn receive(&mut self, msg: NodeMessage) {
        debug_assert_eq!(msg.to, self.id);
        let from = msg.from;
        let live = self.liveness.snapshot();
        for (g, m) in msg.items {
            if self.groups.contains_key(&g) {
                // As a shard runtime does: a quiet group hears the liveness before the message
                // (its leader gone, it must not answer a candidate from a lease that lapsed),
                // and after it (a quiescing heartbeat from a leader not known live wakes it
                // now rather than at the next tick).
                self.with_group(g, |r, out| {
                    r.check_liveness(|n| live.live(n), out);
                    r.step(from, m, out);
                    r.check_liveness(|n| live.live(n), out);
                });
            }
        }
    }

    pub fn propose(&mut self, group: GroupId, batches: &[(u32, Bytes)]) -> Result<Offset, Error> {
        self.try_with_group(group, |r, out| r.propose(batches, out))
    }

    pub fn propose_membership(
        &mut self,
        group: GroupId,
        next: Membership,
        bytes: Bytes,
    ) -> Result<Offset, Error> {
        self.try_with_group(group, |r, out| r.propose_membership(next, bytes, out))
    }

    pub fn transfer_leadership(&mut self, group: GroupId, target: NodeId) -> Result<(), Error> {
        self.try_with_group(group, |r, out| r.transfer_leadership(target, out))
    }

    pub fn on_appended(&mut self, group: GroupId, end: Offset) {
        if self.groups.contains_key(&group) {
            self.with_group(group, |r, out| r.on_appended(end, out));
        }
    }

    pub fn on_durable(&mut self, group: GroupId, end: Offset) {
        if self.groups.contains_key(&group) {
            self.with_group(group, |r, out| r.on_durable(end, out));
        }
    }

    /// The sender of `group`'s append to `to` attached only the batches below `filled_end`
    /// of the `prev_offset..fill_end` asked for ([`Replica::on_append_filled`]).
    pub fn on_append_filled(
        &mut self,
        group: GroupId,
        to: NodeId,
        epoch: crate::types::Epoch,
        prev_offset: Offset,
        fill_end: Offset,
        filled_end: Offset,
    ) {
        if self.groups.contains_key(&group) {
            self.with_group(group, |r, out| {
                r.on_append_filled(to, epoch, prev_offset, fill_end, filled_end, out)
            });
        }
    }

    /// Everything produced since the last call: local actions, then one message per peer.
    pub fn take_output(&mut self) -> Output {
        let from = self.id;
        let messages = std::mem::take(&mut self.outbox)
            .into_iter()
            .map(|(to, items)| NodeMessage { from, to, items })
            .collect();
        Output {
            actions: std::mem::take(&mut self.actions),
            messages,
        }
    }

    fn with_group(&mut self, group: GroupId, f: impl FnOnce(&mut Replica, &mut Vec<Action>)) {
        let _ = self.try_with_group(group, |r, out| {
            f(r, out);
            Ok(())
        });
    }

    fn try_with_group<T>(
        &mut self,
        group: GroupId,
        f: impl FnOnce(&mut Replica, &mut Vec<Action>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let r = self
            .groups
            .get_mut(&group)
            .ok_or(Error::UnknownGroup(group))?;
        let mut out = std::mem::take(&mut self.scratch);
        let res = f(r, &mut out);
        route(group, &mut out, &mut self.actions, &mut self.outbox);
        self.scratch = out;
        res
    }
}

/// Moves one group's actions out of `out`: sends into the per-peer outbox, the rest in order.
fn route(
    group: GroupId,
    out: &mut Vec<Action>,
    actions: &mut Vec<(GroupId, Action)>,
    outbox: &mut BTreeMap<NodeId, Vec<(GroupId, Message)>>,
) {
    for a in out.drain(..) {
        match a {
            Action::Send { to, msg } => outbox.entry(to).or_default().push((group, msg)),
            other => actions.push((group, other)),
        }
    }
}
