//! Frames on the rpc port and the messages they carry.
//!
//! A frame is a `u32` length (of what follows), a message kind, a correlation id and the
//! message body. The length is checked against the cap before a byte of the body is awaited or
//! allocated. Decoding takes the frame off the receive buffer as one `Bytes` without copying,
//! and record batches inside come out as slices of it. Encoding hands back the frame as parts
//! for a vectored write: small fields are gathered in one buffer, batch bytes are referenced,
//! not copied.

use bytes::{Buf, Bytes, BytesMut};

use crate::codec::{DecodeError, Reader, Writer};
use crate::controller::active::{MAX_CONFIG_CHANGES_PER_CALL, MAX_PARTITIONS_PER_ELECTION};
use crate::controller::placement::PlacementError;
use crate::controller::reassignment::MAX_PARTITIONS_PER_REASSIGNMENT;
use crate::controller::records::{
    Endpoint, MAX_CONFIGS_PER_TOPIC, MAX_CONFIG_KEY_BYTES, MAX_CONFIG_VALUE_BYTES, MAX_HOST_BYTES,
    MAX_NODE_ID, MAX_REPLICAS_PER_PARTITION, MAX_SHARDS_PER_BROKER, MAX_TOPIC_NAME_BYTES,
};
use crate::controller::{
    AlterIsrRequest, ControllerError, CreateTopicRequest, HeartbeatRequest, RegisterRequest,
};
use crate::identity::MAX_CLUSTER_ID_BYTES;
use crate::liveness::Ping;
use crate::node::NodeMessage;
use crate::rpc::handshake::Hello;
use crate::types::{
    AppendRequest, AppendResponse, Batch, Membership, Message, NodeId, VoteRequest, VoteResponse,
};

/// The largest frame a node accepts or sends. Consensus senders bound each message's batch
/// bytes well below it (the core's `fill_end` asks for "as many as fit").
pub const DEFAULT_MAX_RPC_FRAME_BYTES: usize = 32 << 20;
/// The length prefix.
pub const FRAME_LENGTH_BYTES: usize = 4;
/// Kind and correlation id, after the length.
const FRAME_HEADER_BYTES: usize = 1 + 8;
/// Group entries one consensus message may carry (one per group hosted by both nodes).
pub const MAX_GROUPS_PER_MESSAGE: usize = 1 << 20;
/// Batches one append may carry.
pub const MAX_BATCHES_PER_APPEND: usize = 1 << 16;
/// Voters plus learners of one group.
pub const MAX_GROUP_MEMBERS: usize = 64;
/// An error message in a reply.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;
/// Batches below this size are copied into the frame's header buffer instead of being
/// referenced: an iovec per tiny batch costs more than the copy.
const INLINE_BATCH_BYTES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("frame of {len} bytes is above the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("cannot send: {0} is above its limit")]
    FieldTooLarge(&'static str),
    #[error("malformed frame: {0}")]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Handshake(#[from] crate::rpc::handshake::HandshakeError),
}

/// Why a controller request was refused, as carried on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum RpcErrorCode {
    /// This node is not the active controller; `leader_hint` names the one it knows.
    NotController = 1,
    StaleBrokerEpoch = 2,
    /// The node id is registered with another node UUID.
    NodeIdInUse = 3,
    UnknownBroker = 4,
    InvalidRequest = 5,
    /// The controller could not decide now (for example an election in progress): retry.
    Unavailable = 6,
    /// A partition leader's request named an old leader epoch.
    FencedLeaderEpoch = 7,
    TopicExists = 8,
    UnknownTopic = 9,
    InvalidTopic = 10,
    InvalidPartitions = 11,
    InvalidReplicationFactor = 12,
    InvalidConfig = 13,
}

impl RpcErrorCode {
    fn from_u16(v: u16) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => RpcErrorCode::NotController,
            2 => RpcErrorCode::StaleBrokerEpoch,
            3 => RpcErrorCode::NodeIdInUse,
            4 => RpcErrorCode::UnknownBroker,
            5 => RpcErrorCode::InvalidRequest,
            6 => RpcErrorCode::Unavailable,
            7 => RpcErrorCode::FencedLeaderEpoch,
            8 => RpcErrorCode::TopicExists,
            9 => RpcErrorCode::UnknownTopic,
            10 => RpcErrorCode::InvalidTopic,
            11 => RpcErrorCode::InvalidPartitions,
            12 => RpcErrorCode::InvalidReplicationFactor,
            13 => RpcErrorCode::InvalidConfig,
            _ => {
                return Err(DecodeError::Invalid {
                    what: "rpc error code",
                    reason: "unknown",
                })
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcErrorReply {
    pub code: RpcErrorCode,
    pub leader_hint: Option<NodeId>,
    pub message: String,
}

impl RpcErrorReply {
    /// This node is not the active controller; `leader` is the controller leader it knows.
    pub fn not_controller(leader: Option<NodeId>) -> Self {
        RpcErrorReply {
            code: RpcErrorCode::NotController,
            leader_hint: leader,
            message: "not the active controller".into(),
        }
    }
}

impl From<&ControllerError> for RpcErrorReply {
    fn from(e: &ControllerError) -> Self {
        let code = match e {
            ControllerError::StaleBrokerEpoch { .. } => RpcErrorCode::StaleBrokerEpoch,
            ControllerError::NodeIdInUse { .. } => RpcErrorCode::NodeIdInUse,
            ControllerError::UnknownBroker(_) => RpcErrorCode::UnknownBroker,
            ControllerError::FencedLeaderEpoch { .. } | ControllerError::NotLeader { .. } => {
                RpcErrorCode::FencedLeaderEpoch
            }
            ControllerError::TopicExists(_) => RpcErrorCode::TopicExists,
            ControllerError::UnknownTopic(_) | ControllerError::UnknownPartition { .. } => {
                RpcErrorCode::UnknownTopic
            }
            ControllerError::InvalidTopicName(_) => RpcErrorCode::InvalidTopic,
            ControllerError::InvalidPartitions(_)
            | ControllerError::Placement(PlacementError::InvalidPartitionCount { .. }) => {
                RpcErrorCode::InvalidPartitions
            }
            ControllerError::Placement(
                PlacementError::NotEnoughBrokers { .. }
                | PlacementError::InvalidReplicationFactor { .. },
            ) => RpcErrorCode::InvalidReplicationFactor,
            ControllerError::InvalidConfig(_) => RpcErrorCode::InvalidConfig,
            ControllerError::CannotDecommission(_) => RpcErrorCode::InvalidReplicationFactor,
            ControllerError::FencedBroker(_)
            | ControllerError::InternalTopic(_)
            | ControllerError::Invalid(_) => RpcErrorCode::InvalidRequest,
        };
        RpcErrorReply {
            code,
            leader_hint: None,
            message: e.to_string(),
        }
    }
}

/// Committed metadata-log batches from an offset (the batch bytes are encoded `RecordBatch`es).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataChunk {
    pub high_watermark: u64,
    pub batches: Vec<Batch>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpcMessage {
    /// The first frame each way on a connection.
    Hello(Hello),
    /// The handshake failed; the connection closes after this frame.
    HandshakeRefused {
        reason: String,
    },
    /// Every group's consensus messages from one node to another.
    Consensus(NodeMessage),
    RegisterBroker(RegisterRequest),
    /// The broker epoch of the new registration.
    RegisterBrokerResponse(Result<u64, RpcErrorReply>),
    Heartbeat(HeartbeatRequest),
    /// Whether the broker is fenced.
    HeartbeatResponse(Result<bool, RpcErrorReply>),
    /// Committed metadata batches from `from_offset`, up to about `max_bytes`.
    FetchMetadata {
        from_offset: u64,
        max_bytes: u32,
    },
    FetchMetadataResponse(Result<MetadataChunk, RpcErrorReply>),
    /// A broker asks for a block of producer ids (KIP-730).
    AllocateProducerIds {
        node: NodeId,
        broker_epoch: u64,
    },
    /// `(first, len)`: ids `first..first + len` are the broker's.
    AllocateProducerIdsResponse(Result<(u64, u32), RpcErrorReply>),
    /// A partition leader reports its in-sync replicas.
    AlterIsr(AlterIsrRequest),
    AlterIsrResponse(Result<(), RpcErrorReply>),
    /// The admin requests of the Kafka layer, forwarded to the active controller. Each is
    /// answered with an [`RpcMessage::AdminResponse`].
    CreateTopic {
        req: CreateTopicRequest,
        validate_only: bool,
    },
    CreatePartitions {
        topic: String,
        total: u32,
        validate_only: bool,
    },
    DeleteTopic {
        topic: String,
    },
    SetTopicConfigs {
        topic: String,
        changes: Vec<(String, Option<String>)>,
    },
    /// An operator declares `node` gone (its data directory wiped): its id may register again
    /// with a new node UUID. The controller refuses a live (unfenced) broker.
    UnregisterBroker {
        node: NodeId,
    },
    /// A preferred-leader election of these partitions (topic, partition).
    ElectLeaders {
        partitions: Vec<(String, u32)>,
    },
    /// Broker `node`'s maintenance mode, on or off.
    SetMaintenance {
        node: NodeId,
        on: bool,
    },
    /// Broker `node`'s decommissioning, on or off.
    SetDecommission {
        node: NodeId,
        on: bool,
    },
    /// Moves of partitions' replicas to target nodes, or cancels (`None`): Kafka's
    /// AlterPartitionReassignments.
    AlterReassignments {
        moves: Vec<(String, u32, Option<Vec<NodeId>>)>,
    },
    /// Partition leader `leader` reports that its group's voters are the move's target
    /// `replicas`: the move ends.
    FinishReassignment {
        leader: NodeId,
        topic: String,
        partition: u32,
        replicas: Vec<NodeId>,
    },
    /// The metadata-log offset after which the decision is applied (0 for validate_only):
    /// the requester answers its client once it has applied that far.
    AdminResponse(Result<u64, RpcErrorReply>),
    /// A shard of the sending node is alive (see [`crate::liveness`]); not answered.
    Liveness(Ping),
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const HANDSHAKE_REFUSED: u8 = 2;
    pub const CONSENSUS: u8 = 3;
    pub const REGISTER: u8 = 4;
    pub const REGISTER_RESPONSE: u8 = 5;
    pub const HEARTBEAT: u8 = 6;
    pub const HEARTBEAT_RESPONSE: u8 = 7;
    pub const FETCH_METADATA: u8 = 8;
    pub const FETCH_METADATA_RESPONSE: u8 = 9;
    pub const ALLOCATE_PRODUCER_IDS: u8 = 10;
    pub const ALLOCATE_PRODUCER_IDS_RESPONSE: u8 = 11;
    pub const ALTER_ISR: u8 = 12;
    pub const ALTER_ISR_RESPONSE: u8 = 13;
    pub const CREATE_TOPIC: u8 = 14;
    pub const CREATE_PARTITIONS: u8 = 15;
    pub const DELETE_TOPIC: u8 = 16;
    pub const SET_TOPIC_CONFIGS: u8 = 17;
    pub const ADMIN_RESPONSE: u8 = 18;
    pub const UNREGISTER_BROKER: u8 = 19;
    pub const ELECT_LEADERS: u8 = 20;
    pub const SET_MAINTENANCE: u8 = 21;
    pub const ALTER_REASSIGNMENTS: u8 = 22;
    pub const FINISH_REASSIGNMENT: u8 = 23;
    pub const SET_DECOMMISSION: u8 = 24;
    pub const LIVENESS: u8 = 25;
}

mod msg_tag {
    pub const APPEND: u8 = 1;
    pub const APPEND_RESPONSE: u8 = 2;
    pub const VOTE: u8 = 3;
    pub const VOTE_RESPONSE: u8 = 4;
    pub const TIMEOUT_NOW: u8 = 5;
    pub const WAKE: u8 = 6;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Chosen by the requester and echoed in the response.
    pub correlation_id: u64,
    pub message: RpcMessage,
}

/// A frame ready for a vectored write: its parts, in order.
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    parts: Vec<Bytes>,
    len: usize,
}

impl EncodedFrame {
    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }
    /// Bytes on the wire, length prefix included.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The frame in one buffer (a copy; for small frames and tests).
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.len);
        for p in &self.parts {
            b.extend_from_slice(p);
        }
        b.freeze()
    }
}

/// Gathers small fields in one buffer and references large byte slices.
struct Parts {
    cur: BytesMut,
    parts: Vec<Bytes>,
}

impl Parts {
    fn w(&mut self) -> Writer<'_> {
        Writer::new(&mut self.cur)
    }
    /// An oversized slice is not refused here: `encode` refuses the whole frame.
    fn attach(&mut self, bytes: &Bytes, max: usize) {
        if bytes.len() < INLINE_BATCH_BYTES {
            self.w().bytes(bytes, max);
            return;
        }
        self.w().u32(bytes.len() as u32);
        self.parts.push(self.cur.split().freeze());
        self.parts.push(bytes.clone());
    }
    fn finish(mut self) -> Vec<Bytes> {
        if !self.cur.is_empty() {
            self.parts.push(self.cur.split().freeze());
        }
        self.parts
    }
}

/// Encodes and decodes frames under one size cap.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_frame_bytes: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_RPC_FRAME_BYTES)
    }
}

impl FrameCodec {
    pub fn new(max_frame_bytes: usize) -> Self {
        assert!(max_frame_bytes >= FRAME_HEADER_BYTES && max_frame_bytes <= u32::MAX as usize);
        FrameCodec { max_frame_bytes }
    }

    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Takes one whole frame off the front of `buf` if it holds one (`Ok(None)`: read more).
    /// A frame above the cap is an error as soon as its length prefix arrives; so is any
    /// malformed frame. Either way the connection should close: the stream is out of step.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, RpcError> {
        if buf.len() < FRAME_LENGTH_BYTES {
            return Ok(None);
        }
        let len =
            u32::from_be_bytes(buf[..FRAME_LENGTH_BYTES].try_into().expect("4 bytes")) as usize;
        if len > self.max_frame_bytes {
            return Err(RpcError::FrameTooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        if buf.len() < FRAME_LENGTH_BYTES + len {
            return Ok(None);
        }
        buf.advance(FRAME_LENGTH_BYTES);
        let body = buf.split_to(len).freeze();
        self.decode_body(body).map(Some)
    }

    /// Decodes one frame's bytes after the length prefix.
    pub fn decode_body(&self, body: Bytes) -> Result<Frame, RpcError> {
        if body.len() > self.max_frame_bytes {
            return Err(RpcError::FrameTooLarge {
                len: body.len(),
                max: self.max_frame_bytes,
            });
        }
        let mut r = Reader::new(body);
        let k = r.u8("frame kind")?;
        let correlation_id = r.u64("correlation id")?;
        let max = self.max_frame_bytes;
        let message = match k {
            kind::HELLO => RpcMessage::Hello(decode_hello(&mut r)?),
            kind::HANDSHAKE_REFUSED => RpcMessage::HandshakeRefused {
                reason: r.string("refusal reason", MAX_ERROR_MESSAGE_BYTES)?,
            },
            kind::CONSENSUS => RpcMessage::Consensus(decode_node_message(&mut r, max)?),
            kind::REGISTER => RpcMessage::RegisterBroker(RegisterRequest {
                node: r.u64("node")?,
                node_uuid: r.u128("node uuid")?,
                rpc: decode_endpoint(&mut r)?,
                kafka: decode_endpoint(&mut r)?,
                shards: {
                    let s = r.u32("shards")?;
                    if s == 0 || s > MAX_SHARDS_PER_BROKER {
                        return Err(DecodeError::Invalid {
                            what: "shards",
                            reason: "out of range",
                        }
                        .into());
                    }
                    s
                },
            }),
            kind::REGISTER_RESPONSE => {
                RpcMessage::RegisterBrokerResponse(decode_result(&mut r, |r| r.u64("epoch"))?)
            }
            kind::HEARTBEAT => RpcMessage::Heartbeat(HeartbeatRequest {
                node: r.u64("node")?,
                broker_epoch: r.u64("broker epoch")?,
                want_fence: r.bool("want fence")?,
            }),
            kind::HEARTBEAT_RESPONSE => {
                RpcMessage::HeartbeatResponse(decode_result(&mut r, |r| r.bool("fenced"))?)
            }
            kind::LIVENESS => RpcMessage::Liveness(Ping {
                token: r.u64("liveness token")?,
                shard: r.u32("shard")?,
            }),
            kind::FETCH_METADATA => RpcMessage::FetchMetadata {
                from_offset: r.u64("from offset")?,
                max_bytes: r.u32("max bytes")?,
            },
            kind::FETCH_METADATA_RESPONSE => {
                RpcMessage::FetchMetadataResponse(decode_result(&mut r, |r| {
                    Ok(MetadataChunk {
                        high_watermark: r.u64("high watermark")?,
                        batches: decode_batches(r, max)?,
                    })
                })?)
            }
            kind::ALLOCATE_PRODUCER_IDS => RpcMessage::AllocateProducerIds {
                node: r.u64("node")?,
                broker_epoch: r.u64("broker epoch")?,
            },
            kind::ALLOCATE_PRODUCER_IDS_RESPONSE => {
                RpcMessage::AllocateProducerIdsResponse(decode_result(&mut r, |r| {
                    Ok((r.u64("first producer id")?, r.u32("block length")?))
                })?)
            }
            kind::ALTER_ISR => RpcMessage::AlterIsr(AlterIsrRequest {
                topic: r.string("topic", MAX_TOPIC_NAME_BYTES)?,
                partition: r.u32("partition")?,
                leader: r.u64("leader")?,
                leader_epoch: r.i32("leader epoch")?,
                isr: r.u64_list("isr", MAX_REPLICAS_PER_PARTITION)?,
            }),
            kind::ALTER_ISR_RESPONSE => {
                RpcMessage::AlterIsrResponse(decode_result(&mut r, |_| Ok(()))?)
            }
            kind::CREATE_TOPIC => decode_create_topic(&mut r)?,
            kind::CREATE_PARTITIONS => RpcMessage::CreatePartitions {
                topic: r.string("topic", MAX_TOPIC_NAME_BYTES)?,
                total: r.u32("partition count")?,
                validate_only: r.bool("validate only")?,
            },
            kind::DELETE_TOPIC => RpcMessage::DeleteTopic {
                topic: r.string("topic", MAX_TOPIC_NAME_BYTES)?,
            },
            kind::SET_TOPIC_CONFIGS => {
                let topic = r.string("topic", MAX_TOPIC_NAME_BYTES)?;
                // Smallest change: an empty key and the absent-value flag.
                let n = r.count("config changes", MAX_CONFIG_CHANGES_PER_CALL, 3)?;
                let mut changes = Vec::with_capacity(n);
                for _ in 0..n {
                    let key = r.string("config key", MAX_CONFIG_KEY_BYTES)?;
                    let value = if r.bool("config value present")? {
                        Some(r.string("config value", MAX_CONFIG_VALUE_BYTES)?)
                    } else {
                        None
                    };
                    changes.push((key, value));
                }
                RpcMessage::SetTopicConfigs { topic, changes }
            }
            kind::ADMIN_RESPONSE => {
                RpcMessage::AdminResponse(decode_result(&mut r, |r| r.u64("applied at"))?)
            }
            kind::UNREGISTER_BROKER => {
                let node = broker_node(&mut r)?;
                RpcMessage::UnregisterBroker { node }
            }
            kind::ELECT_LEADERS => {
                // Smallest entry: an empty topic name and a partition.
                let n = r.count("partitions", MAX_PARTITIONS_PER_ELECTION, 6)?;
                let mut partitions = Vec::with_capacity(n);
                for _ in 0..n {
                    partitions.push((
                        r.string("topic", MAX_TOPIC_NAME_BYTES)?,
                        r.u32("partition")?,
                    ));
                }
                RpcMessage::ElectLeaders { partitions }
            }
            kind::SET_MAINTENANCE => {
                let node = broker_node(&mut r)?;
                RpcMessage::SetMaintenance {
                    node,
                    on: r.bool("maintenance on")?,
                }
            }
            kind::SET_DECOMMISSION => {
                let node = broker_node(&mut r)?;
                RpcMessage::SetDecommission {
                    node,
                    on: r.bool("decommission on")?,
                }
            }
            kind::ALTER_REASSIGNMENTS => {
                // Smallest entry: an empty topic name, a partition and an absent target.
                let n = r.count("reassignments", MAX_PARTITIONS_PER_REASSIGNMENT, 7)?;
                let mut moves = Vec::with_capacity(n);
                for _ in 0..n {
                    let topic = r.string("topic", MAX_TOPIC_NAME_BYTES)?;
                    let partition = r.u32("partition")?;
                    let target = if r.bool("target present")? {
                        Some(r.u64_list("target replicas", MAX_REPLICAS_PER_PARTITION)?)
                    } else {
                        None
                    };
                    moves.push((topic, partition, target));
                }
                RpcMessage::AlterReassignments { moves }
            }
            kind::FINISH_REASSIGNMENT => RpcMessage::FinishReassignment {
                leader: r.u64("leader")?,
                topic: r.string("topic", MAX_TOPIC_NAME_BYTES)?,
                partition: r.u32("partition")?,
                replicas: r.u64_list("replicas", MAX_REPLICAS_PER_PARTITION)?,
            },
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "frame kind",
                    tag,
                }
                .into())
            }
        };
        r.finish()?;
        Ok(Frame {
            correlation_id,
            message,
        })
    }

    /// Encodes `frame`; a frame above the cap is refused (the sender must send less).
    pub fn encode(&self, frame: &Frame) -> Result<EncodedFrame, RpcError> {
        check_sendable(&frame.message)?;
        let mut p = Parts {
            cur: BytesMut::with_capacity(64),
            parts: Vec::new(),
        };
        let max = self.max_frame_bytes;
        let (k, corr) = (kind_of(&frame.message), frame.correlation_id);
        p.w().u8(k);
        p.w().u64(corr);
        match &frame.message {
            RpcMessage::Hello(h) => encode_hello(&mut p.w(), h),
            RpcMessage::HandshakeRefused { reason } => p.w().string(
                truncate(reason, MAX_ERROR_MESSAGE_BYTES),
                MAX_ERROR_MESSAGE_BYTES,
            ),
            RpcMessage::Consensus(m) => encode_node_message(&mut p, m, max),
            RpcMessage::RegisterBroker(req) => {
                let mut w = p.w();
                w.u64(req.node);
                w.u128(req.node_uuid);
                encode_endpoint(&mut w, &req.rpc);
                encode_endpoint(&mut w, &req.kafka);
                w.u32(req.shards);
            }
            RpcMessage::RegisterBrokerResponse(res) => {
                encode_result(&mut p, res, |p, e| p.w().u64(*e))
            }
            RpcMessage::Heartbeat(h) => {
                let mut w = p.w();
                w.u64(h.node);
                w.u64(h.broker_epoch);
                w.bool(h.want_fence);
            }
            RpcMessage::HeartbeatResponse(res) => encode_result(&mut p, res, |p, f| p.w().bool(*f)),
            RpcMessage::Liveness(ping) => {
                let mut w = p.w();
                w.u64(ping.token);
                w.u32(ping.shard);
            }
            RpcMessage::FetchMetadata {
                from_offset,
                max_bytes,
            } => {
                p.w().u64(*from_offset);
                p.w().u32(*max_bytes);
            }
            RpcMessage::FetchMetadataResponse(res) => encode_result(&mut p, res, |p, c| {
                p.w().u64(c.high_watermark);
                encode_batches(p, &c.batches, max);
            }),
            RpcMessage::AllocateProducerIds { node, broker_epoch } => {
                p.w().u64(*node);
                p.w().u64(*broker_epoch);
            }
            RpcMessage::AllocateProducerIdsResponse(res) => {
                encode_result(&mut p, res, |p, (first, len)| {
                    p.w().u64(*first);
                    p.w().u32(*len);
                })
            }
            RpcMessage::AlterIsr(req) => {
                let mut w = p.w();
                w.string(&req.topic, MAX_TOPIC_NAME_BYTES);
                w.u32(req.partition);
                w.u64(req.leader);
                w.i32(req.leader_epoch);
                w.u64_list(&req.isr, MAX_REPLICAS_PER_PARTITION);
            }
            RpcMessage::AlterIsrResponse(res) => encode_result(&mut p, res, |_, ()| {}),
            RpcMessage::CreateTopic { req, validate_only } => {
                let mut w = p.w();
                w.string(&req.name, MAX_TOPIC_NAME_BYTES);
                w.u128(req.topic_id);
                w.u32(saturate_u32(req.partitions));
                w.bool(req.replication_factor.is_some());
                w.u32(saturate_u32(req.replication_factor.unwrap_or(0)));
                w.count(req.configs.len(), MAX_CONFIGS_PER_TOPIC);
                for (k, v) in &req.configs {
                    w.string(k, MAX_CONFIG_KEY_BYTES);
                    w.string(v, MAX_CONFIG_VALUE_BYTES);
                }
                w.bool(*validate_only);
            }
            RpcMessage::CreatePartitions {
                topic,
                total,
                validate_only,
            } => {
                let mut w = p.w();
                w.string(topic, MAX_TOPIC_NAME_BYTES);
                w.u32(*total);
                w.bool(*validate_only);
            }
            RpcMessage::DeleteTopic { topic } => p.w().string(topic, MAX_TOPIC_NAME_BYTES),
            RpcMessage::SetTopicConfigs { topic, changes } => {
                let mut w = p.w();
                w.string(topic, MAX_TOPIC_NAME_BYTES);
                w.count(changes.len(), MAX_CONFIG_CHANGES_PER_CALL);
                for (k, v) in changes {
                    w.string(k, MAX_CONFIG_KEY_BYTES);
                    w.bool(v.is_some());
                    if let Some(v) = v {
                        w.string(v, MAX_CONFIG_VALUE_BYTES);
                    }
                }
            }
            RpcMessage::AdminResponse(res) => encode_result(&mut p, res, |p, at| p.w().u64(*at)),
            RpcMessage::UnregisterBroker { node } => p.w().u64(*node),
            RpcMessage::ElectLeaders { partitions } => {
                let mut w = p.w();
                w.count(partitions.len(), MAX_PARTITIONS_PER_ELECTION);
                for (topic, partition) in partitions {
                    w.string(topic, MAX_TOPIC_NAME_BYTES);
                    w.u32(*partition);
                }
            }
            RpcMessage::SetMaintenance { node, on } | RpcMessage::SetDecommission { node, on } => {
                let mut w = p.w();
                w.u64(*node);
                w.bool(*on);
            }
            RpcMessage::AlterReassignments { moves } => {
                let mut w = p.w();
                w.count(moves.len(), MAX_PARTITIONS_PER_REASSIGNMENT);
                for (topic, partition, target) in moves {
                    w.string(topic, MAX_TOPIC_NAME_BYTES);
                    w.u32(*partition);
                    w.bool(target.is_some());
                    if let Some(t) = target {
                        w.u64_list(t, MAX_REPLICAS_PER_PARTITION);
                    }
                }
            }
            RpcMessage::FinishReassignment {
                leader,
                topic,
                partition,
                replicas,
            } => {
                let mut w = p.w();
                w.u64(*leader);
                w.string(topic, MAX_TOPIC_NAME_BYTES);
                w.u32(*partition);
                w.u64_list(replicas, MAX_REPLICAS_PER_PARTITION);
            }
        }
        let mut parts = p.finish();
        let body: usize = parts.iter().map(Bytes::len).sum();
        if body > max {
            return Err(RpcError::FrameTooLarge { len: body, max });
        }
        // The length goes in a part of its own so no part is copied to prepend it.
        parts.insert(0, Bytes::copy_from_slice(&(body as u32).to_be_bytes()));
        Ok(EncodedFrame {
            parts,
            len: body + FRAME_LENGTH_BYTES,
        })
    }
}

/// The caps the receiver enforces, checked before encoding so an oversized value (from a
/// configuration, say) is an error for the caller rather than a panic in the writer.
fn check_sendable(m: &RpcMessage) -> Result<(), RpcError> {
    let fits = |ok: bool, what| {
        if ok {
            Ok(())
        } else {
            Err(RpcError::FieldTooLarge(what))
        }
    };
    let batches_fit = |batches: &[Batch]| {
        fits(batches.len() <= MAX_BATCHES_PER_APPEND, "batch count")?;
        for b in batches {
            if let Some(m) = &b.membership {
                fits(
                    m.voters.len() + m.learners.len() <= MAX_GROUP_MEMBERS,
                    "group members",
                )?;
            }
        }
        Ok(())
    };
    match m {
        RpcMessage::Hello(h) => fits(h.cluster_id.len() <= MAX_CLUSTER_ID_BYTES, "cluster id"),
        RpcMessage::Consensus(n) => {
            fits(n.items.len() <= MAX_GROUPS_PER_MESSAGE, "group entries")?;
            for (_, msg) in &n.items {
                if let Message::Append(a) = msg {
                    batches_fit(&a.batches)?;
                }
            }
            Ok(())
        }
        RpcMessage::RegisterBroker(r) => fits(
            r.rpc.host.len() <= MAX_HOST_BYTES && r.kafka.host.len() <= MAX_HOST_BYTES,
            "endpoint host",
        ),
        RpcMessage::FetchMetadataResponse(Ok(c)) => batches_fit(&c.batches),
        RpcMessage::AlterIsr(r) => fits(
            r.topic.len() <= MAX_TOPIC_NAME_BYTES && r.isr.len() <= MAX_REPLICAS_PER_PARTITION,
            "topic name or ISR",
        ),
        RpcMessage::CreateTopic { req, .. } => {
            fits(req.name.len() <= MAX_TOPIC_NAME_BYTES, "topic name")?;
            fits(req.configs.len() <= MAX_CONFIGS_PER_TOPIC, "config count")?;
            fits(
                req.configs.iter().all(|(k, v)| {
                    k.len() <= MAX_CONFIG_KEY_BYTES && v.len() <= MAX_CONFIG_VALUE_BYTES
                }),
                "config key or value",
            )
        }
        RpcMessage::UnregisterBroker { node }
        | RpcMessage::SetMaintenance { node, .. }
        | RpcMessage::SetDecommission { node, .. } => fits(*node <= MAX_NODE_ID, "node id"),
        RpcMessage::ElectLeaders { partitions } => fits(
            partitions.len() <= MAX_PARTITIONS_PER_ELECTION
                && partitions
                    .iter()
                    .all(|(t, _)| t.len() <= MAX_TOPIC_NAME_BYTES),
            "partitions",
        ),
        RpcMessage::AlterReassignments { moves } => fits(
            moves.len() <= MAX_PARTITIONS_PER_REASSIGNMENT
                && moves.iter().all(|(t, _, target)| {
                    t.len() <= MAX_TOPIC_NAME_BYTES
                        && target
                            .as_ref()
                            .is_none_or(|v| v.len() <= MAX_REPLICAS_PER_PARTITION)
                }),
            "reassignments",
        ),
        RpcMessage::FinishReassignment {
            topic, replicas, ..
        } => fits(
            topic.len() <= MAX_TOPIC_NAME_BYTES && replicas.len() <= MAX_REPLICAS_PER_PARTITION,
            "topic name or replicas",
        ),
        RpcMessage::CreatePartitions { topic, .. } | RpcMessage::DeleteTopic { topic } => {
            fits(topic.len() <= MAX_TOPIC_NAME_BYTES, "topic name")
        }
        RpcMessage::SetTopicConfigs { topic, changes } => {
            fits(topic.len() <= MAX_TOPIC_NAME_BYTES, "topic name")?;
            fits(
                changes.len() <= MAX_CONFIG_CHANGES_PER_CALL,
                "config changes",
            )?;
            fits(
                changes.iter().all(|(k, v)| {
                    k.len() <= MAX_CONFIG_KEY_BYTES
                        && v.as_ref().is_none_or(|v| v.len() <= MAX_CONFIG_VALUE_BYTES)
                }),
                "config key or value",
            )
        }
        _ => Ok(()),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn kind_of(m: &RpcMessage) -> u8 {
    match m {
        RpcMessage::Hello(_) => kind::HELLO,
        RpcMessage::HandshakeRefused { .. } => kind::HANDSHAKE_REFUSED,
        RpcMessage::Consensus(_) => kind::CONSENSUS,
        RpcMessage::RegisterBroker(_) => kind::REGISTER,
        RpcMessage::RegisterBrokerResponse(_) => kind::REGISTER_RESPONSE,
        RpcMessage::Heartbeat(_) => kind::HEARTBEAT,
        RpcMessage::HeartbeatResponse(_) => kind::HEARTBEAT_RESPONSE,
        RpcMessage::FetchMetadata { .. } => kind::FETCH_METADATA,
        RpcMessage::FetchMetadataResponse(_) => kind::FETCH_METADATA_RESPONSE,
        RpcMessage::AllocateProducerIds { .. } => kind::ALLOCATE_PRODUCER_IDS,
        RpcMessage::AllocateProducerIdsResponse(_) => kind::ALLOCATE_PRODUCER_IDS_RESPONSE,
        RpcMessage::AlterIsr(_) => kind::ALTER_ISR,
        RpcMessage::AlterIsrResponse(_) => kind::ALTER_ISR_RESPONSE,
        RpcMessage::CreateTopic { .. } => kind::CREATE_TOPIC,
        RpcMessage::CreatePartitions { .. } => kind::CREATE_PARTITIONS,
        RpcMessage::DeleteTopic { .. } => kind::DELETE_TOPIC,
        RpcMessage::SetTopicConfigs { .. } => kind::SET_TOPIC_CONFIGS,
        RpcMessage::AdminResponse(_) => kind::ADMIN_RESPONSE,
        RpcMessage::UnregisterBroker { .. } => kind::UNREGISTER_BROKER,
        RpcMessage::ElectLeaders { .. } => kind::ELECT_LEADERS,
        RpcMessage::SetMaintenance { .. } => kind::SET_MAINTENANCE,
        RpcMessage::SetDecommission { .. } => kind::SET_DECOMMISSION,
        RpcMessage::AlterReassignments { .. } => kind::ALTER_REASSIGNMENTS,
        RpcMessage::FinishReassignment { .. } => kind::FINISH_REASSIGNMENT,
        RpcMessage::Liveness(_) => kind::LIVENESS,
    }
}

/// Counts above `u32::MAX` are far above every cap the controller applies: sent as `u32::MAX`
/// they are refused there like any other count past the limit.
fn saturate_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn decode_create_topic(r: &mut Reader) -> Result<RpcMessage, DecodeError> {
    let name = r.string("topic", MAX_TOPIC_NAME_BYTES)?;
    let topic_id = r.u128("topic id")?;
    let partitions = r.u32("partition count")? as usize;
    let has_rf = r.bool("replication factor present")?;
    let rf = r.u32("replication factor")? as usize;
    // Smallest config: two empty strings.
    let n = r.count("topic configs", MAX_CONFIGS_PER_TOPIC, 4)?;
    let mut configs = Vec::with_capacity(n);
    for _ in 0..n {
        configs.push((
            r.string("config key", MAX_CONFIG_KEY_BYTES)?,
            r.string("config value", MAX_CONFIG_VALUE_BYTES)?,
        ));
    }
    Ok(RpcMessage::CreateTopic {
        req: CreateTopicRequest {
            name,
            topic_id,
            partitions,
            replication_factor: has_rf.then_some(rf),
            configs,
        },
        validate_only: r.bool("validate only")?,
    })
}

fn encode_hello(w: &mut Writer<'_>, h: &Hello) {
    w.u16(h.protocol_version);
    w.string(&h.cluster_id, MAX_CLUSTER_ID_BYTES);
    w.u64(h.node_id);
    w.u128(h.node_uuid);
}

fn decode_hello(r: &mut Reader) -> Result<Hello, DecodeError> {
    Ok(Hello {
        protocol_version: r.u16("protocol version")?,
        cluster_id: r.string("cluster id", MAX_CLUSTER_ID_BYTES)?,
        node_id: r.u64("node id")?,
        node_uuid: r.u128("node uuid")?,
    })
}

fn encode_endpoint(w: &mut Writer<'_>, e: &Endpoint) {
    w.string(&e.host, MAX_HOST_BYTES);
    w.u16(e.port);
}

fn decode_endpoint(r: &mut Reader) -> Result<Endpoint, DecodeError> {
    Ok(Endpoint {
        host: r.string("endpoint host", MAX_HOST_BYTES)?,
        port: r.u16("endpoint port")?,
    })
}

fn encode_result<T>(
    p: &mut Parts,
    res: &Result<T, RpcErrorReply>,
    ok: impl FnOnce(&mut Parts, &T),
) {
    match res {
        Ok(v) => {
            p.w().u8(0);
            ok(p, v);
        }
        Err(e) => {
            let mut w = p.w();
            w.u8(1);
            w.u16(e.code as u16);
            w.bool(e.leader_hint.is_some());
            w.u64(e.leader_hint.unwrap_or(0));
            w.string(
                truncate(&e.message, MAX_ERROR_MESSAGE_BYTES),
                MAX_ERROR_MESSAGE_BYTES,
            );
        }
    }
}

/// A broker id an admin request names: refused outside Kafka's broker id range.
fn broker_node(r: &mut Reader) -> Result<NodeId, DecodeError> {
    let node = r.u64("node")?;
    if node > MAX_NODE_ID {
        return Err(DecodeError::Invalid {
            what: "node",
            reason: "outside Kafka's broker id range",
        });
    }
    Ok(node)
}

fn decode_result<T>(
    r: &mut Reader,
    ok: impl FnOnce(&mut Reader) -> Result<T, DecodeError>,
) -> Result<Result<T, RpcErrorReply>, DecodeError> {
    match r.u8("result tag")? {
        0 => ok(r).map(Ok),
        1 => {
            let code = RpcErrorCode::from_u16(r.u16("error code")?)?;
            let has_hint = r.bool("leader hint present")?;
            let hint = r.u64("leader hint")?;
            Ok(Err(RpcErrorReply {
                code,
                leader_hint: has_hint.then_some(hint),
                message: r.string("error message", MAX_ERROR_MESSAGE_BYTES)?,
            }))
        }
        tag => Err(DecodeError::UnknownTag {
            what: "result",
            tag,
        }),
    }
}

fn encode_node_message(p: &mut Parts, m: &NodeMessage, max: usize) {
    p.w().u64(m.from);
    p.w().u64(m.to);
    p.w().count(m.items.len(), MAX_GROUPS_PER_MESSAGE);
    for (group, msg) in &m.items {
        p.w().u64(*group);
        match msg {
            Message::Append(a) => {
                let mut w = p.w();
                w.u8(msg_tag::APPEND);
                w.i32(a.epoch);
                w.u64(a.prev_offset);
                w.i32(a.prev_epoch);
                w.u64(a.commit);
                w.u64(a.fill_end);
                w.u64(a.quiesce);
                encode_batches(p, &a.batches, max);
            }
            Message::AppendResponse(a) => {
                let mut w = p.w();
                w.u8(msg_tag::APPEND_RESPONSE);
                w.i32(a.epoch);
                w.bool(a.success);
                w.u64(a.written_end);
                w.u64(a.durable_end);
                w.i32(a.last_epoch);
                w.u64(a.log_end);
            }
            Message::Vote(v) => {
                let mut w = p.w();
                w.u8(msg_tag::VOTE);
                w.i32(v.epoch);
                w.i32(v.last_epoch);
                w.u64(v.log_end);
                w.bool(v.pre_vote);
                w.bool(v.transfer);
            }
            Message::VoteResponse(v) => {
                let mut w = p.w();
                w.u8(msg_tag::VOTE_RESPONSE);
                w.i32(v.epoch);
                w.bool(v.granted);
                w.bool(v.pre_vote);
            }
            Message::TimeoutNow { epoch } => {
                let mut w = p.w();
                w.u8(msg_tag::TIMEOUT_NOW);
                w.i32(*epoch);
            }
            Message::Wake { epoch } => {
                let mut w = p.w();
                w.u8(msg_tag::WAKE);
                w.i32(*epoch);
            }
        }
    }
}

fn decode_node_message(r: &mut Reader, max: usize) -> Result<NodeMessage, DecodeError> {
    let from = r.u64("from")?;
    let to = r.u64("to")?;
    // The smallest entry: a group id, a tag and TimeoutNow's epoch.
    let n = r.count("group entries", MAX_GROUPS_PER_MESSAGE, 13)?;
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        let group = r.u64("group")?;
        let msg = match r.u8("consensus message tag")? {
            msg_tag::APPEND => Message::Append(AppendRequest {
                epoch: r.i32("epoch")?,
                prev_offset: r.u64("prev offset")?,
                prev_epoch: r.i32("prev epoch")?,
                commit: r.u64("commit")?,
                fill_end: r.u64("fill end")?,
                quiesce: r.u64("quiesce")?,
                batches: decode_batches(r, max)?,
            }),
            msg_tag::APPEND_RESPONSE => Message::AppendResponse(AppendResponse {
                epoch: r.i32("epoch")?,
                success: r.bool("success")?,
                written_end: r.u64("written end")?,
                durable_end: r.u64("durable end")?,
                last_epoch: r.i32("last epoch")?,
                log_end: r.u64("log end")?,
            }),
            msg_tag::VOTE => Message::Vote(VoteRequest {
                epoch: r.i32("epoch")?,
                last_epoch: r.i32("last epoch")?,
                log_end: r.u64("log end")?,
                pre_vote: r.bool("pre vote")?,
                transfer: r.bool("transfer")?,
            }),
            msg_tag::VOTE_RESPONSE => Message::VoteResponse(VoteResponse {
                epoch: r.i32("epoch")?,
                granted: r.bool("granted")?,
                pre_vote: r.bool("pre vote")?,
            }),
            msg_tag::TIMEOUT_NOW => Message::TimeoutNow {
                epoch: r.i32("epoch")?,
            },
            msg_tag::WAKE => Message::Wake {
                epoch: r.i32("epoch")?,
            },
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "consensus message",
                    tag,
                })
            }
        };
        items.push((group, msg));
    }
    Ok(NodeMessage { from, to, items })
}

fn encode_batches(p: &mut Parts, batches: &[Batch], max: usize) {
    p.w().count(batches.len(), MAX_BATCHES_PER_APPEND);
    for b in batches {
        let mut w = p.w();
        w.u64(b.base);
        w.u32(b.count);
        w.i32(b.epoch);
        w.bool(b.membership.is_some());
        if let Some(m) = &b.membership {
            assert!(m.voters.len() + m.learners.len() <= MAX_GROUP_MEMBERS);
            w.u64_list(&m.voters, MAX_GROUP_MEMBERS);
            w.u64_list(&m.learners, MAX_GROUP_MEMBERS);
        }
        p.attach(&b.bytes, max);
    }
}

fn decode_batches(r: &mut Reader, max: usize) -> Result<Vec<Batch>, DecodeError> {
    // base, count, epoch, membership flag, byte length.
    let n = r.count("batches", MAX_BATCHES_PER_APPEND, 21)?;
    let mut batches = Vec::with_capacity(n);
    for _ in 0..n {
        let base = r.u64("batch base")?;
        let count = r.u32("batch record count")?;
        let epoch = r.i32("batch epoch")?;
        if count == 0 || base.checked_add(u64::from(count)).is_none() {
            return Err(DecodeError::Invalid {
                what: "batch",
                reason: "record count zero or past the offset range",
            });
        }
        let membership = if r.bool("membership present")? {
            let voters = r.u64_list("voters", MAX_GROUP_MEMBERS)?;
            let learners = r.u64_list("learners", MAX_GROUP_MEMBERS)?;
            if voters.len() + learners.len() > MAX_GROUP_MEMBERS {
                return Err(DecodeError::TooLong {
                    what: "group members",
                    len: (voters.len() + learners.len()) as u64,
                    max: MAX_GROUP_MEMBERS as u64,
                });
            }
            Some(Membership { voters, learners })
        } else {
            None
        };
        let bytes = r.bytes("batch bytes", max)?;
        batches.push(Batch {
            base,
            count,
            epoch,
            bytes,
            membership,
        });
    }
    Ok(batches)
}
