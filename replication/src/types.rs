//! Identifiers, batches, wire messages and the actions the core asks its caller to perform.

use bytes::Bytes;

/// A node (broker) id.
pub type NodeId = u64;
/// One replication group (a partition, or the controller's metadata log).
pub type GroupId = u64;
/// The Raft term, which is the Kafka leader epoch. `NO_EPOCH` means "no entry".
pub type Epoch = i32;
/// A Kafka offset. Ends are exclusive: a log holding offsets 0..10 has end 10.
pub type Offset = u64;

/// The epoch of an empty prefix (Kafka's UNDEFINED_EPOCH).
pub const NO_EPOCH: Epoch = -1;

/// A whole record batch: opaque bytes covering offsets `base..base + count`, written in `epoch`.
/// The core never looks inside `bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub base: Offset,
    pub count: u32,
    pub epoch: Epoch,
    pub bytes: Bytes,
    /// Set on a membership batch: the configuration it installs from its own offset on (Raft
    /// single-server changes take effect when appended, not when committed). The bytes remain
    /// the caller's encoding (on a Kafka partition, a control batch); the caller stores this
    /// beside it and hands it back on restart.
    pub membership: Option<Membership>,
}

impl Batch {
    /// The offset after this batch's last record.
    pub fn end(&self) -> Offset {
        self.base + u64::from(self.count)
    }
}

/// A group's members. Voters elect and count toward commit; learners only receive the log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Membership {
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
}

impl Membership {
    pub fn voters(voters: &[NodeId]) -> Self {
        Membership {
            voters: voters.to_vec(),
            learners: Vec::new(),
        }
    }
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id)
    }
    pub fn is_learner(&self, id: NodeId) -> bool {
        self.learners.contains(&id)
    }
    pub fn contains(&self, id: NodeId) -> bool {
        self.is_voter(id) || self.is_learner(id)
    }
    /// Votes (or durable reports) needed for a majority of the voters.
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }
    /// Every member but `me`.
    pub fn peers(&self, me: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        self.voters
            .iter()
            .chain(self.learners.iter())
            .copied()
            .filter(move |&n| n != me)
    }
}

/// What must be on disk before the replica acts on it: the epoch it is in and whom it voted for
/// in that epoch. Losing either lets a node vote twice in one epoch (two leaders).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HardState {
    pub epoch: Epoch,
    pub voted_for: Option<NodeId>,
}

/// Leader -> follower: batches (or none: a heartbeat) after `prev_offset`, whose preceding entry
/// has `prev_epoch`, and the leader's high watermark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendRequest {
    pub epoch: Epoch,
    pub prev_offset: Offset,
    pub prev_epoch: Epoch,
    pub commit: Offset,
    /// Batches from `prev_offset` on, contiguous. The core leaves this empty and sets
    /// `fill_end`; the sender attaches batches from its log or cache (see [`AppendRequest::fill_end`]).
    pub batches: Vec<Batch>,
    /// The core asks the sender to attach the batches covering `prev_offset..fill_end` (as many
    /// whole batches from `prev_offset` as fit its byte limit). Equal to `prev_offset` for a
    /// heartbeat. The receiver ignores it.
    pub fill_end: Offset,
    /// Non-zero on a leader's last heartbeat before it goes quiet (see
    /// [`crate::replica::Replica::is_quiesced`]): the leader's liveness token (its node's
    /// incarnation), under which a caught-up follower stops counting towards an election for as
    /// long as that node stays live. Zero on every other append.
    pub quiesce: u64,
}

/// Follower -> leader. On success, the follower's written and durable ends, both counted only
/// over the prefix it has verified matches this leader's log. On rejection, what KIP-101 needs
/// for the leader to answer with its `end_offset_for_epoch`: the follower's last epoch at or
/// below the probed offset and its log end there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResponse {
    pub epoch: Epoch,
    pub success: bool,
    pub written_end: Offset,
    pub durable_end: Offset,
    pub last_epoch: Epoch,
    pub log_end: Offset,
}

/// A request for a vote (or a pre-vote, which changes no state on the receiver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VoteRequest {
    pub epoch: Epoch,
    pub last_epoch: Epoch,
    pub log_end: Offset,
    pub pre_vote: bool,
    /// Sent after a TimeoutNow: the voter ignores its leader lease.
    pub transfer: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VoteResponse {
    pub epoch: Epoch,
    pub granted: bool,
    pub pre_vote: bool,
}

/// One group's message between two replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Append(AppendRequest),
    AppendResponse(AppendResponse),
    Vote(VoteRequest),
    VoteResponse(VoteResponse),
    /// Leadership transfer: the leader tells a caught-up voter to campaign now.
    TimeoutNow {
        epoch: Epoch,
    },
    /// A follower woken from quiet because its leader's node fell silent asks that leader to
    /// heartbeat (a quiet leader that is alive, its node only stalled, wakes and keeps its
    /// followers instead of letting them elect). Nothing else heeds it.
    Wake {
        epoch: Epoch,
    },
}

impl Message {
    pub fn epoch(&self) -> Epoch {
        match self {
            Message::Append(m) => m.epoch,
            Message::AppendResponse(m) => m.epoch,
            Message::Vote(m) => m.epoch,
            Message::VoteResponse(m) => m.epoch,
            Message::TimeoutNow { epoch } | Message::Wake { epoch } => *epoch,
        }
    }
}

/// What one group asks its caller to do, in order. Local actions (persist, append, truncate)
/// are performed before any message produced in the same call is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write the epoch and vote durably before sending any message of this call. A caller
    /// may write the log ahead of it if, after a crash, it restarts in the log's last epoch
    /// when that is newer (with no vote: a replica holding an epoch's batches never grants a
    /// vote in it).
    PersistHardState(HardState),
    /// Write these contiguous batches at `batches[0].base` (each carries its epoch). The log's
    /// epoch history (epoch -> first offset) follows from the batches; persist it with them.
    Append {
        batches: Vec<Batch>,
    },
    /// Remove every batch at or after `end` (a batch boundary).
    Truncate {
        end: Offset,
    },
    /// Everything below this offset is committed; readers may see it.
    HighWatermark(Offset),
    BecomeLeader {
        epoch: Epoch,
    },
    BecomeFollower {
        epoch: Epoch,
        leader: Option<NodeId>,
    },
    /// The leader committed a batch of its own epoch: publish the epoch to clients now.
    LeaderReady {
        epoch: Epoch,
    },
    /// The active membership changed (a membership batch was appended or truncated away).
    MembershipChanged(Membership),
    /// Send `msg` to `to` (gathered per destination by the node multiplexer).
    Send {
        to: NodeId,
        msg: Message,
    },
}
