//! The replicated partitions one shard hosts: their ticks, their incoming and outgoing consensus
//! traffic (one [`NodeMessage`] per peer per round, whatever the group count) and the leadership
//! reports the controller needs. Lives on the shard's executor; not `Send`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::cluster::{gather_outgoing, GroupMap};
use crate::liveness::LiveNodes;
use crate::node::NodeMessage;
use crate::partition::{GroupSignals, PartitionGroup, ReplicaError, TickTaken};
use crate::shard::Signal;
use crate::types::{Epoch, GroupId, NodeId};

/// What a group leader tells the controller: it leads in `epoch` with these voters in sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderReport {
    pub group: GroupId,
    pub leader: NodeId,
    pub epoch: Epoch,
    pub isr: Vec<NodeId>,
}

pub struct ShardGroups {
    node: NodeId,
    /// Looked up once per incoming message entry: hashed, not ordered.
    groups: RefCell<GroupMap<Rc<PartitionGroup>>>,
    /// Every hosted group in ascending id order, for the passes over all of them (a tick);
    /// rebuilt on the next pass after a group comes or goes, not on every tick.
    ordered: RefCell<Option<Rc<[Rc<PartitionGroup>]>>>,
    /// The buffer the groups queue their ids in next, swapped with theirs on each flush so
    /// neither is allocated again.
    spare: RefCell<Vec<GroupId>>,
    /// The last report per group the controller accepted.
    acknowledged: RefCell<BTreeMap<GroupId, LeaderReport>>,
    /// Every hosted group notifies these (see [`GroupSignals`]).
    signals: GroupSignals,
    /// Who the node-level liveness said was live at the last tick: a quiet group a message
    /// reaches is checked against it first.
    live: RefCell<LiveNodes>,
}

impl ShardGroups {
    pub fn new(node: NodeId) -> Self {
        ShardGroups {
            node,
            groups: RefCell::default(),
            ordered: RefCell::default(),
            spare: RefCell::default(),
            acknowledged: RefCell::default(),
            live: RefCell::default(),
            signals: GroupSignals {
                outbox: Rc::new(Signal::default()),
                queued: Rc::default(),
                leadership: Rc::new(Signal::default()),
                deferred_bytes: Rc::default(),
                deferred_dropped: Rc::default(),
            },
        }
    }

    /// Notified when a hosted group has messages to send: the runtime flushes at once.
    pub fn outbox_signal(&self) -> &Signal {
        &self.signals.outbox
    }

    /// Peer messages the hosted groups dropped because they were busy and the shard held all
    /// it may for busy groups.
    pub fn deferred_dropped(&self) -> u64 {
        self.signals.deferred_dropped.get()
    }

    /// Notified when a hosted group becomes a writable leader: its report goes out at once.
    pub fn leadership_signal(&self) -> &Signal {
        &self.signals.leadership
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Hosts an opened group (replacing nothing: the caller closes a group before reopening).
    pub fn insert(&self, group: Rc<PartitionGroup>) {
        assert_eq!(group.node(), self.node);
        group.set_signals(self.signals.clone());
        let prev = self.groups.borrow_mut().insert(group.group(), group);
        assert!(prev.is_none(), "a group hosted twice on one shard");
        self.ordered.take();
    }

    pub fn get(&self, group: GroupId) -> Option<Rc<PartitionGroup>> {
        self.groups.borrow().get(&group).cloned()
    }

    pub fn len(&self) -> usize {
        self.groups.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.borrow().is_empty()
    }

    /// Stops hosting `group` without closing it (its owner closes or deletes it).
    pub fn remove(&self, group: GroupId) -> Option<Rc<PartitionGroup>> {
        self.acknowledged.borrow_mut().remove(&group);
        self.ordered.take();
        self.groups.borrow_mut().remove(&group)
    }

    /// The hosted groups' ids, ascending.
    pub fn ids(&self) -> Vec<GroupId> {
        self.all().iter().map(|g| g.group()).collect()
    }

    /// Stops hosting `group` and closes it (its files stay).
    pub async fn close(&self, group: GroupId) -> Result<(), ReplicaError> {
        let g = self.groups.borrow_mut().remove(&group);
        self.ordered.take();
        self.acknowledged.borrow_mut().remove(&group);
        match g {
            Some(g) => g.close().await,
            None => Ok(()),
        }
    }

    /// Every hosted group, ascending by id (a snapshot: groups added or removed meanwhile are
    /// not in it).
    pub fn all(&self) -> Rc<[Rc<PartitionGroup>]> {
        if let Some(all) = &*self.ordered.borrow() {
            return all.clone();
        }
        let mut all: Vec<Rc<PartitionGroup>> = self.groups.borrow().values().cloned().collect();
        all.sort_unstable_by_key(|g| g.group());
        let all: Rc<[Rc<PartitionGroup>]> = all.into();
        *self.ordered.borrow_mut() = Some(all.clone());
        all
    }

    // None of these waits for a group: a group whose lock is held (a produce or an append on
    // disk) or whose work needs I/O gets it done by its own drainer, in order, and what that
    // queues comes out of a later `take_outgoing` (the outbox signal says when). So one busy
    // group never holds up the others' heartbeats and answers.

    /// One tick of every group, then everything they have to send now (no peer known live:
    /// a quiet group wakes).
    pub fn tick(&self) -> Vec<NodeMessage> {
        let _ = self.tick_all(&LiveNodes::default());
        self.take_outgoing()
    }

    /// One tick of every group; what they queue is left for [`Self::take_outgoing`]. `live`:
    /// the peers the node-level liveness says are live, for quiet groups. Returns how many
    /// groups skipped it, and how many of those are quiet (see
    /// [`PartitionGroup::tick_or_defer`]).
    pub fn tick_all(&self, live: &LiveNodes) -> (u64, u64) {
        if *self.live.borrow() != *live {
            *self.live.borrow_mut() = live.clone();
        }
        let (mut skipped, mut quiet) = (0, 0);
        for g in self.all().iter() {
            match g.tick_or_defer(live) {
                TickTaken::Taken => {}
                TickTaken::Skipped => skipped += 1,
                TickTaken::Quiet => {
                    skipped += 1;
                    quiet += 1;
                }
            }
        }
        (skipped, quiet)
    }

    /// Steps a peer's message into its groups (entries for groups not hosted here are
    /// dropped: closed, or not opened yet; consensus resends), then everything to send now.
    pub fn deliver(&self, msg: NodeMessage) -> Vec<NodeMessage> {
        self.step(msg);
        self.take_outgoing()
    }

    /// Steps a peer's message into its groups without taking what they have to send (a
    /// caller stepping several messages flushes once after them).
    pub fn step(&self, msg: NodeMessage) {
        let live = self.live.borrow();
        for (g, m) in msg.items {
            if let Some(group) = self.get(g) {
                // A quiet group whose leader is gone wakes before the message: still quiet, it
                // would refuse a candidate (a node that noticed first) from a lease that
                // lapsed, and hold up the election.
                group.check_quiet(&live);
                group.step_or_defer(msg.from, m);
            }
        }
    }

    /// What every group has to send since the last call, one message per peer.
    pub fn take_outgoing(&self) -> Vec<NodeMessage> {
        // Only the groups that queued something since the last call (each says so when its
        // outbox stops being empty): most of thousands of idle groups have nothing on most
        // calls, and this runs after every delivery. Ascending, as a pass over all would be.
        let spare = std::mem::take(&mut *self.spare.borrow_mut());
        let mut queued = std::mem::replace(&mut *self.signals.queued.borrow_mut(), spare);
        queued.sort_unstable();
        queued.dedup();
        let mut per_group = Vec::with_capacity(queued.len());
        for &id in &queued {
            // Gone (closed since), or taken already (listed twice).
            let Some(g) = self.get(id) else {
                continue;
            };
            if !g.has_messages() {
                continue;
            }
            let msgs = g.take_ready();
            if !msgs.is_empty() {
                per_group.push((g.group(), msgs));
            }
        }
        queued.clear();
        *self.spare.borrow_mut() = queued;
        gather_outgoing(self.node, per_group)
    }

    /// Reports the controller has not acknowledged yet: each group this shard leads (writable
    /// in its epoch) whose epoch or in-sync voters differ from its last accepted report.
    pub fn pending_reports(&self) -> Vec<LeaderReport> {
        let acked = self.acknowledged.borrow();
        self.all()
            .iter()
            .filter(|g| g.is_writable_leader())
            .map(|g| LeaderReport {
                group: g.group(),
                leader: self.node,
                epoch: g.epoch(),
                isr: g.in_sync_voter_ids(),
            })
            // The controller may have answered with a newer epoch: nothing to say until
            // this group leads in a newer one still.
            .filter(|r| {
                acked
                    .get(&r.group)
                    .is_none_or(|a| a != r && a.epoch <= r.epoch)
            })
            .collect()
    }

    /// The controller's record no longer shows what it accepted for `group` (fencing this
    /// broker dropped its leadership and took replicas out of the ISR): its report is pending
    /// again.
    pub fn forget_acknowledged(&self, group: GroupId) {
        self.acknowledged.borrow_mut().remove(&group);
    }

    /// The controller accepted `report` (or has a newer epoch: nothing more to say for it).
    pub fn acknowledge(&self, report: LeaderReport) {
        self.acknowledged.borrow_mut().insert(report.group, report);
    }
}
