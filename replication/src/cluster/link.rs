//! The channels between a cluster node's shards and its cluster service thread (the rpc
//! transport and the controller driver), and the Kafka layer's handle on the controller.
//!
//! Everything here is `Send`: the service thread and the shards are different executors. The
//! shard side awaits with [`crate::shard::cross_wake`] (flume's own wakers do not cross glommio
//! executors promptly).
//!
//! ```text
//!   transport ──Consensus──> service ──split_by_shard──> ShardLink::inbox  (one per shard)
//!   shard ──ShardEvent::Send / ::Report──> ShardLink::to_service ──> transport / AlterIsr
//!   controller accepts a report ──> ShardLink::accepted (the shard stops re-sending it)
//!   Kafka handler ──ClusterPort::create_topic, ...──> service ──rpc──> active controller
//! ```

use std::sync::{Arc, Mutex};

use crate::cluster::LeaderReport;
use crate::controller::active::CreateTopicRequest;
use crate::controller::service::{ServiceStats, StatCells};
use crate::controller::view::{ClusterView, SharedClusterView};
use crate::liveness::{Ping, PingBoard};
use crate::node::NodeMessage;
use crate::shard::cross_wake;
use crate::types::NodeId;

/// Calls from the Kafka layer waiting for the service thread at most (each is one admin or
/// InitProducerId request; a full queue answers "controller busy" rather than queueing).
pub const CONTROLLER_CALL_QUEUE: usize = 1024;

/// A controller request refused or failed, as the Kafka client should see it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (error code {code})")]
pub struct CallError {
    /// A Kafka error code (`kafka_protocol::ResponseError::...code()`).
    pub code: i16,
    pub message: String,
}

impl CallError {
    pub fn new(code: i16, message: impl Into<String>) -> Self {
        CallError {
            code,
            message: message.into(),
        }
    }

    /// The service thread is gone or its queue is full: clients retry.
    pub fn unavailable(what: &str) -> Self {
        CallError::new(
            kafka_protocol::ResponseError::RequestTimedOut.code(),
            format!("the controller could not be reached: {what}"),
        )
    }
}

/// Where a call's answer goes (a bounded(1) channel; the caller may have gone away).
pub type Reply<T> = flume::Sender<Result<T, CallError>>;

/// A request of the Kafka layer for the active controller, carried by the service thread
/// (which forwards it over the rpc port, or decides it when this node is the controller) and
/// answered once its records are committed and applied on this node.
#[derive(Debug)]
pub enum ControllerCall {
    CreateTopic {
        req: CreateTopicRequest,
        /// Check everything (name, configs, placement) but record nothing.
        validate_only: bool,
        reply: Reply<()>,
    },
    /// Grow `topic` to `total` partitions.
    CreatePartitions {
        topic: String,
        total: usize,
        validate_only: bool,
        reply: Reply<()>,
    },
    DeleteTopic {
        topic: String,
        reply: Reply<()>,
    },
    /// Set (`Some`) or remove (`None`) each key, as one decision.
    SetTopicConfigs {
        topic: String,
        changes: Vec<(String, Option<String>)>,
        reply: Reply<()>,
    },
    /// A block of producer ids for this node: `(first, len)`.
    AllocateProducerIds {
        reply: Reply<(u64, u32)>,
    },
    /// An operator declares broker `node` gone (its data directory wiped), so its id may
    /// register again with a new node UUID (Kafka's UnregisterBroker, KIP-631).
    UnregisterBroker {
        node: NodeId,
        reply: Reply<()>,
    },
    /// A preferred-leader election of these partitions (Kafka's ElectLeaders, PREFERRED).
    ElectPreferredLeaders {
        partitions: Vec<(String, u32)>,
        reply: Reply<()>,
    },
    /// Broker `node`'s maintenance mode, on or off.
    SetMaintenance {
        node: NodeId,
        on: bool,
        reply: Reply<()>,
    },
    /// Broker `node`'s decommissioning, on or off.
    SetDecommission {
        node: NodeId,
        on: bool,
        reply: Reply<()>,
    },
    /// Moves of partitions' replicas to target nodes, or cancels (`None`).
    Reassign {
        moves: Vec<(String, u32, Option<Vec<NodeId>>)>,
        reply: Reply<()>,
    },
    /// This node leads the partition and its group's voters are the move's target.
    FinishReassignment {
        topic: String,
        partition: u32,
        replicas: Vec<NodeId>,
        reply: Reply<()>,
    },
}

/// What a shard sends the service thread.
#[derive(Debug)]
pub enum ShardEvent {
    /// Consensus traffic of this shard's groups for one peer.
    Send(NodeMessage),
    /// A group this shard leads: its epoch and in-sync voters, for the controller (AlterIsr).
    Report(LeaderReport),
    /// This shard is alive: to every peer node (see [`crate::liveness`]).
    Ping(Ping),
}

/// One shard's end of the channels to the service thread.
pub struct ShardLink {
    pub shard: usize,
    /// Consensus traffic for this shard's groups (bounded by
    /// [`crate::cluster::SHARD_CONSENSUS_CHANNEL_CAPACITY`]; the service drops on full).
    pub inbox: flume::Receiver<NodeMessage>,
    /// To the service thread (bounded; a shard drops on full: consensus resends, reports are
    /// repeated until accepted).
    pub to_service: flume::Sender<ShardEvent>,
    /// Reports the controller accepted (or answered with a newer epoch): the shard stops
    /// sending them.
    pub accepted: flume::Receiver<LeaderReport>,
    pub port: ClusterPort,
}

/// The Kafka layer's handle on the cluster: the applied view, and calls to the controller.
/// Cheap to clone; `Send + Sync`.
#[derive(Clone, Debug)]
pub struct ClusterPort {
    view: SharedClusterView,
    calls: flume::Sender<ControllerCall>,
    /// The unused rest of this node's producer-id block: `(next, end)`.
    producer_ids: Arc<Mutex<(u64, u64)>>,
    /// The service thread's counters (what it dropped), for the Kafka layer's metrics.
    service_stats: Arc<StatCells>,
    /// This node's liveness token, and the peers' pings for the shards (see
    /// [`crate::liveness`]).
    pings: Arc<PingBoard>,
}

impl ClusterPort {
    pub fn new(view: SharedClusterView, calls: flume::Sender<ControllerCall>) -> Self {
        ClusterPort {
            view,
            calls,
            producer_ids: Arc::new(Mutex::new((0, 0))),
            service_stats: Arc::default(),
            pings: Arc::default(),
        }
    }

    /// This node's liveness token and the pings its peers' shards sent.
    pub fn pings(&self) -> &Arc<PingBoard> {
        &self.pings
    }

    /// The cluster service thread's counters so far (all zero without a service thread).
    pub fn service_stats(&self) -> ServiceStats {
        self.service_stats.snapshot()
    }

    /// The cells the service thread counts into.
    pub(crate) fn service_stat_cells(&self) -> Arc<StatCells> {
        self.service_stats.clone()
    }

    /// The cluster as this node has applied it (brokers, topics, partitions).
    pub fn view(&self) -> Arc<ClusterView> {
        self.view.get()
    }

    pub fn shared_view(&self) -> &SharedClusterView {
        &self.view
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> ControllerCall) -> Result<T, CallError> {
        let (tx, rx) = flume::bounded(1);
        self.calls.try_send(make(tx)).map_err(|e| match e {
            flume::TrySendError::Full(_) => CallError::unavailable("too many calls queued"),
            flume::TrySendError::Disconnected(_) => CallError::unavailable("service stopped"),
        })?;
        cross_wake::recv(&rx)
            .await
            .map_err(|_| CallError::unavailable("the call was dropped"))?
    }

    pub async fn create_topic(
        &self,
        req: CreateTopicRequest,
        validate_only: bool,
    ) -> Result<(), CallError> {
        self.call(|reply| ControllerCall::CreateTopic {
            req,
            validate_only,
            reply,
        })
        .await
    }

    pub async fn create_partitions(
        &self,
        topic: String,
        total: usize,
        validate_only: bool,
    ) -> Result<(), CallError> {
        self.call(|reply| ControllerCall::CreatePartitions {
            topic,
            total,
            validate_only,
            reply,
        })
        .await
    }

    pub async fn delete_topic(&self, topic: String) -> Result<(), CallError> {
        self.call(|reply| ControllerCall::DeleteTopic { topic, reply })
            .await
    }

    pub async fn set_topic_configs(
        &self,
        topic: String,
        changes: Vec<(String, Option<String>)>,
    ) -> Result<(), CallError> {
        self.call(|reply| ControllerCall::SetTopicConfigs {
            topic,
            changes,
            reply,
        })
        .await
    }

    /// Unregisters broker `node`: it leaves every ISR and its id may register again with a new
    /// node UUID. Refused for an unknown id (`BROKER_ID_NOT_REGISTERED`) and for a live,
    /// unfenced broker (`INVALID_REQUEST`: stop it first). Answered once applied here.
    pub async fn unregister_broker(&self, node: NodeId) -> Result<(), CallError> {
        self.call(|reply| ControllerCall::UnregisterBroker { node, reply })
            .await
    }

    /// Records a preferred-leader election of `partitions` in the metadata log: the current
    /// leader of each whose preferred replica could lead (live, in the ISR, not in maintenance)
    /// but does not transfers leadership to it. Answered once applied here (the election is
    /// initiated, not finished); the caller judges each partition's outcome on the view then
    /// ([`crate::controller::leadership::preferred_election`]).
    pub async fn elect_preferred_leaders(
        &self,
        partitions: Vec<(String, u32)>,
    ) -> Result<(), CallError> {
        self.call(|reply| ControllerCall::ElectPreferredLeaders { partitions, reply })
            .await
    }

    /// Turns broker `node`'s maintenance mode on or off (answered once applied here). Refused
    /// for an unknown id (`BROKER_ID_NOT_REGISTERED`) and, when turning it on, while another
    /// broker is in maintenance (`INVALID_REQUEST`).
    pub async fn set_maintenance(&self, node: NodeId, on: bool) -> Result<(), CallError> {
        self.call(|reply| ControllerCall::SetMaintenance { node, on, reply })
            .await
    }

    /// Starts (`on`) or stops decommissioning broker `node`: the controller moves every
    /// replica off it, a bounded number at a time (answered once the flag is applied here, not
    /// when the drain ends). Refused for an unknown id (`BROKER_ID_NOT_REGISTERED`) and when
    /// the brokers left could not hold a partition's replication factor
    /// (`INVALID_REPLICATION_FACTOR`, with a message naming the partition).
    pub async fn set_decommission(&self, node: NodeId, on: bool) -> Result<(), CallError> {
        self.call(|reply| ControllerCall::SetDecommission { node, on, reply })
            .await
    }

    /// Records moves of partitions' replicas (Kafka's AlterPartitionReassignments): each
    /// `(topic, partition, Some(target nodes))` starts or changes a move, `None` cancels one.
    /// Partitions [`crate::controller::reassignment::check_request`] refuses on the controller's
    /// state, and repeats, record nothing; the caller judges each partition on its view.
    /// Answered once applied here (the move is started, not finished).
    pub async fn reassign(
        &self,
        moves: Vec<(String, u32, Option<Vec<NodeId>>)>,
    ) -> Result<(), CallError> {
        self.call(|reply| ControllerCall::Reassign { moves, reply })
            .await
    }

    /// Reports, as the partition's leader, that its group's voters are the move's target
    /// `replicas`: the move ends (answered once applied here).
    pub async fn finish_reassignment(
        &self,
        topic: String,
        partition: u32,
        replicas: Vec<NodeId>,
    ) -> Result<(), CallError> {
        self.call(|reply| ControllerCall::FinishReassignment {
            topic,
            partition,
            replicas,
            reply,
        })
        .await
    }

    /// A producer id unique in the cluster and never handed out before: from this node's
    /// block, asking the controller for a new block (KIP-730) when it is used up.
    pub async fn allocate_producer_id(&self) -> Result<i64, CallError> {
        if let Some(id) = self.take_producer_id() {
            return Ok(id);
        }
        let (first, len) = self
            .call(|reply| ControllerCall::AllocateProducerIds { reply })
            .await?;
        {
            let mut ids = self.producer_ids.lock().unwrap_or_else(|p| p.into_inner());
            // Two callers may both have fetched a block: the second finds the first's still
            // in use and drops its own, which only skips ids (never reuses one).
            if ids.0 >= ids.1 {
                *ids = (first, first + u64::from(len));
            }
        }
        self.take_producer_id().ok_or_else(|| {
            CallError::unavailable("the producer-id block was used up by other requests")
        })
    }

    fn take_producer_id(&self) -> Option<i64> {
        let mut ids = self.producer_ids.lock().unwrap_or_else(|p| p.into_inner());
        (ids.0 < ids.1).then(|| {
            let id = ids.0;
            ids.0 += 1;
            id as i64
        })
    }
}
