//! The rpc frame codec: every message round-trips (also fed a byte at a time), batch bytes come
//! out as slices of the receive buffer, and random, truncated or mutated bytes give an error,
//! never a panic, and never an allocation beyond what the frame's own size allows (measured
//! with a counting allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use spate_replication::controller::records::MAX_NODE_ID;
use spate_replication::controller::{
    AlterIsrRequest, CreateTopicRequest, Endpoint, HeartbeatRequest, RegisterRequest,
};
use spate_replication::rpc::{
    Frame, FrameCodec, Hello, MetadataChunk, RpcError, RpcErrorCode, RpcErrorReply, RpcMessage,
    DEFAULT_MAX_RPC_FRAME_BYTES,
};
use spate_replication::{
    AppendRequest, AppendResponse, Batch, Membership, Message, NodeMessage, Ping, VoteRequest,
    VoteResponse,
};

// ---- a per-thread counting allocator -------------------------------------------------------

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static BYTES: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = COUNTING.try_with(|c| {
            if c.get() {
                let _ = BYTES.try_with(|b| b.set(b.get() + layout.size()));
            }
        });
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = COUNTING.try_with(|c| {
            if c.get() {
                let _ = BYTES.try_with(|b| b.set(b.get() + new_size));
            }
        });
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Bytes allocated on this thread while `f` runs.
fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
    BYTES.with(|b| b.set(0));
    COUNTING.with(|c| c.set(true));
    let out = f();
    COUNTING.with(|c| c.set(false));
    (out, BYTES.with(Cell::get))
}

/// What decoding `len` bytes may allocate: the decoded values are a small multiple of their
/// encoding (a 13-byte group entry becomes a ~100-byte `Message`), and nothing scales with a
/// claimed length or count.
fn allocation_budget(len: usize) -> usize {
    16 * len + 4096
}

// ---- strategies ----------------------------------------------------------------------------

fn batch() -> impl Strategy<Value = Batch> {
    (
        0u64..1 << 40,
        1u32..1000,
        -1i32..100,
        prop_oneof![0usize..64, 200usize..2000],
        proptest::option::of((
            proptest::collection::vec(any::<u64>(), 0..5),
            proptest::collection::vec(any::<u64>(), 0..3),
        )),
    )
        .prop_map(|(base, count, epoch, len, m)| Batch {
            base,
            count,
            epoch,
            bytes: Bytes::from(
                (0..len)
                    .map(|i| (i * 7 + base as usize) as u8)
                    .collect::<Vec<_>>(),
            ),
            membership: m.map(|(voters, learners)| Membership { voters, learners }),
        })
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            any::<i32>(),
            any::<u64>(),
            any::<i32>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(batch(), 0..4),
            // A quiescing heartbeat's liveness token, or (mostly, as on the wire) none.
            prop_oneof![Just(0u64), any::<u64>()],
        )
            .prop_map(
                |(epoch, prev_offset, prev_epoch, commit, fill_end, batches, quiesce)| {
                    Message::Append(AppendRequest {
                        epoch,
                        prev_offset,
                        prev_epoch,
                        commit,
                        batches,
                        fill_end,
                        quiesce,
                    })
                }
            ),
        (
            any::<i32>(),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
            any::<i32>(),
            any::<u64>()
        )
            .prop_map(
                |(epoch, success, written_end, durable_end, last_epoch, log_end)| {
                    Message::AppendResponse(AppendResponse {
                        epoch,
                        success,
                        written_end,
                        durable_end,
                        last_epoch,
                        log_end,
                    })
                }
            ),
        (
            any::<i32>(),
            any::<i32>(),
            any::<u64>(),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(epoch, last_epoch, log_end, pre_vote, transfer)| {
                Message::Vote(VoteRequest {
                    epoch,
                    last_epoch,
                    log_end,
                    pre_vote,
                    transfer,
                })
            }),
        (any::<i32>(), any::<bool>(), any::<bool>()).prop_map(|(epoch, granted, pre_vote)| {
            Message::VoteResponse(VoteResponse {
                epoch,
                granted,
                pre_vote,
            })
        }),
        any::<i32>().prop_map(|epoch| Message::TimeoutNow { epoch }),
        any::<i32>().prop_map(|epoch| Message::Wake { epoch }),
    ]
}

fn endpoint() -> impl Strategy<Value = Endpoint> {
    ("[a-z0-9.:]{1,40}", any::<u16>()).prop_map(|(host, port)| Endpoint { host, port })
}

fn error_reply() -> impl Strategy<Value = RpcErrorReply> {
    (
        prop_oneof![
            Just(RpcErrorCode::NotController),
            Just(RpcErrorCode::StaleBrokerEpoch),
            Just(RpcErrorCode::NodeIdInUse),
            Just(RpcErrorCode::UnknownBroker),
            Just(RpcErrorCode::InvalidRequest),
            Just(RpcErrorCode::Unavailable),
            Just(RpcErrorCode::FencedLeaderEpoch),
            Just(RpcErrorCode::TopicExists),
            Just(RpcErrorCode::UnknownTopic),
            Just(RpcErrorCode::InvalidTopic),
            Just(RpcErrorCode::InvalidPartitions),
            Just(RpcErrorCode::InvalidReplicationFactor),
            Just(RpcErrorCode::InvalidConfig),
        ],
        proptest::option::of(any::<u64>()),
        ".{0,40}",
    )
        .prop_map(|(code, leader_hint, message)| RpcErrorReply {
            code,
            leader_hint,
            message,
        })
}

fn rpc_message() -> impl Strategy<Value = RpcMessage> {
    prop_oneof![
        1 => (
            any::<u16>(),
            "[a-zA-Z0-9_-]{1,40}",
            any::<u64>(),
            any::<u128>()
        )
            .prop_map(|(protocol_version, cluster_id, node_id, node_uuid)| {
                RpcMessage::Hello(Hello {
                    protocol_version,
                    cluster_id,
                    node_id,
                    node_uuid,
                })
            }),
        1 => ".{0,60}".prop_map(|reason| RpcMessage::HandshakeRefused { reason }),
        // Consensus frames carry batches: weighted up so most cases hold one.
        6 => (
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec((any::<u64>(), message()), 0..6)
        )
            .prop_map(|(from, to, items)| RpcMessage::Consensus(NodeMessage {
                from,
                to,
                items
            })),
        1 => (
            any::<u64>(),
            any::<u128>(),
            endpoint(),
            endpoint(),
            1u32..1024
        )
            .prop_map(|(node, node_uuid, rpc, kafka, shards)| {
                RpcMessage::RegisterBroker(RegisterRequest {
                    node,
                    node_uuid,
                    rpc,
                    kafka,
                    shards,
                })
            }),
        1 => prop_oneof![any::<u64>().prop_map(Ok), error_reply().prop_map(Err)]
            .prop_map(RpcMessage::RegisterBrokerResponse),
        1 => (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(node, broker_epoch, want_fence)| {
            RpcMessage::Heartbeat(HeartbeatRequest {
                node,
                broker_epoch,
                want_fence,
            })
        }),
        1 => prop_oneof![any::<bool>().prop_map(Ok), error_reply().prop_map(Err)]
            .prop_map(RpcMessage::HeartbeatResponse),
        1 => (any::<u64>(), any::<u32>()).prop_map(|(from_offset, max_bytes)| {
            RpcMessage::FetchMetadata {
                from_offset,
                max_bytes,
            }
        }),
        1 => prop_oneof![
            (any::<u64>(), proptest::collection::vec(batch(), 0..4)).prop_map(
                |(high_watermark, batches)| Ok(MetadataChunk {
                    high_watermark,
                    batches
                })
            ),
            error_reply().prop_map(Err)
        ]
        .prop_map(RpcMessage::FetchMetadataResponse),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(node, broker_epoch)| {
            RpcMessage::AllocateProducerIds { node, broker_epoch }
        }),
        1 => prop_oneof![
            (any::<u64>(), any::<u32>()).prop_map(Ok),
            error_reply().prop_map(Err)
        ]
        .prop_map(RpcMessage::AllocateProducerIdsResponse),
        1 => (
            "[a-z0-9._-]{1,30}",
            any::<u32>(),
            any::<u64>(),
            any::<i32>(),
            proptest::collection::vec(any::<u64>(), 0..5)
        )
            .prop_map(|(topic, partition, leader, leader_epoch, isr)| {
                RpcMessage::AlterIsr(AlterIsrRequest {
                    topic,
                    partition,
                    leader,
                    leader_epoch,
                    isr,
                })
            }),
        1 => prop_oneof![Just(Ok(())), error_reply().prop_map(Err)]
            .prop_map(RpcMessage::AlterIsrResponse),
        1 => (
            "[a-z0-9._-]{1,30}",
            any::<u128>(),
            0usize..100_000,
            proptest::option::of(0usize..20),
            proptest::collection::vec(("[a-z.]{0,20}", ".{0,30}"), 0..4),
            any::<bool>(),
        )
            .prop_map(|(name, topic_id, partitions, replication_factor, configs, validate_only)| {
                RpcMessage::CreateTopic {
                    req: CreateTopicRequest {
                        name,
                        topic_id,
                        partitions,
                        replication_factor,
                        configs,
                    },
                    validate_only,
                }
            }),
        1 => ("[a-z0-9._-]{1,30}", any::<u32>(), any::<bool>()).prop_map(
            |(topic, total, validate_only)| RpcMessage::CreatePartitions {
                topic,
                total,
                validate_only,
            }
        ),
        1 => "[a-z0-9._-]{0,30}".prop_map(|topic| RpcMessage::DeleteTopic { topic }),
        1 => (
            "[a-z0-9._-]{1,30}",
            proptest::collection::vec(("[a-z.]{0,20}", proptest::option::of(".{0,30}")), 0..5),
        )
            .prop_map(|(topic, changes)| RpcMessage::SetTopicConfigs { topic, changes }),
        1 => prop_oneof![any::<u64>().prop_map(Ok), error_reply().prop_map(Err)]
            .prop_map(RpcMessage::AdminResponse),
        1 => (0..=MAX_NODE_ID).prop_map(|node| RpcMessage::UnregisterBroker { node }),
        1 => (any::<u64>(), any::<u32>())
            .prop_map(|(token, shard)| RpcMessage::Liveness(Ping { token, shard })),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    (any::<u64>(), rpc_message()).prop_map(|(correlation_id, message)| Frame {
        correlation_id,
        message,
    })
}

fn encode(f: &Frame) -> Bytes {
    FrameCodec::default().encode(f).unwrap().to_bytes()
}

/// Decodes every frame in `bytes`, fed in chunks of `chunk` bytes.
fn decode_all(bytes: &[u8], chunk: usize) -> Result<Vec<Frame>, RpcError> {
    let codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        while let Some(f) = codec.decode(&mut buf)? {
            out.push(f);
        }
    }
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn every_frame_round_trips(frames in proptest::collection::vec(frame(), 1..4), chunk in 1usize..300) {
        let mut wire = Vec::new();
        for f in &frames {
            let enc = FrameCodec::default().encode(f).unwrap();
            prop_assert_eq!(enc.len(), enc.to_bytes().len());
            wire.extend_from_slice(&enc.to_bytes());
        }
        prop_assert_eq!(decode_all(&wire, chunk).unwrap(), frames);
    }

    #[test]
    fn truncated_frames_wait_for_more_and_never_decode_early(f in frame(), cut in any::<prop::sample::Index>()) {
        let wire = encode(&f);
        let at = cut.index(wire.len());
        let mut buf = BytesMut::from(&wire[..at]);
        prop_assert!(FrameCodec::default().decode(&mut buf).unwrap().is_none());
        prop_assert_eq!(buf.len(), at, "nothing consumed from a partial frame");
    }

    #[test]
    fn mutated_frames_never_panic_nor_overallocate(
        f in frame(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut raw = encode(&f).to_vec();
        for (i, v) in flips {
            let at = i.index(raw.len());
            raw[at] = v;
        }
        let len = raw.len();
        let (_, bytes) = allocated_by(|| decode_all(&raw, raw.len()));
        prop_assert!(bytes <= allocation_budget(len), "{} bytes allocated decoding {}", bytes, len);
    }

    #[test]
    fn random_bytes_never_panic_nor_overallocate(raw in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let len = raw.len();
        let (_, bytes) = allocated_by(|| decode_all(&raw, 64));
        prop_assert!(bytes <= allocation_budget(len), "{} bytes allocated decoding {}", bytes, len);
    }

    /// A well-formed length prefix over random bytes: every body decoder sees hostile input
    /// (every kind up to Liveness, 25, and one past the last).
    #[test]
    fn random_bodies_never_panic_nor_overallocate(
        kind in 0u8..27,
        body in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        let mut raw = BytesMut::new();
        raw.put_u32(body.len() as u32 + 9);
        raw.put_u8(kind);
        raw.put_u64(7);
        raw.put_slice(&body);
        let len = raw.len();
        let (_, bytes) = allocated_by(|| decode_all(&raw, len));
        prop_assert!(bytes <= allocation_budget(len), "{} bytes allocated decoding {}", bytes, len);
    }
}

/// A liveness ping is a fixed 12-byte body (token, shard): it round-trips with the extremes,
/// and a body cut short is an error, not a ping with a zero shard.
#[test]
fn a_liveness_ping_round_trips_and_a_short_one_is_refused() {
    let codec = FrameCodec::default();
    for (token, shard) in [(1, 0), (u64::MAX, u32::MAX), (0x5eed, 7)] {
        let f = Frame {
            correlation_id: 9,
            message: RpcMessage::Liveness(Ping { token, shard }),
        };
        let wire = encode(&f);
        // Length, kind, correlation id, then the 12 bytes.
        assert_eq!(wire.len(), 4 + 1 + 8 + 12);
        assert_eq!(decode_all(&wire, 1).unwrap(), vec![f.clone()]);
        let mut raw = BytesMut::from(&wire[..]);
        assert_eq!(codec.decode(&mut raw).unwrap(), Some(f));
    }
    // The same frame by hand, its shard cut to two bytes.
    let mut body = BytesMut::new();
    body.put_u8(25);
    body.put_u64(9);
    body.put_u64(1);
    body.put_u16(0);
    let mut raw = BytesMut::new();
    raw.put_u32(body.len() as u32);
    raw.put_slice(&body);
    assert!(matches!(codec.decode(&mut raw), Err(RpcError::Decode(_))));
}

#[test]
fn admin_requests_over_their_caps_are_refused_before_encoding() {
    let codec = FrameCodec::default();
    let frame = |message| Frame {
        correlation_id: 1,
        message,
    };
    let too_many = (0..1000).map(|i| (format!("k{i}"), None)).collect();
    let long_value = vec![("k".to_string(), Some("v".repeat(5000)))];
    let oversized = [
        RpcMessage::SetTopicConfigs {
            topic: "t".into(),
            changes: too_many,
        },
        RpcMessage::SetTopicConfigs {
            topic: "t".into(),
            changes: long_value,
        },
        RpcMessage::DeleteTopic {
            topic: "t".repeat(300),
        },
        RpcMessage::CreateTopic {
            req: CreateTopicRequest {
                name: "t".into(),
                topic_id: 1,
                partitions: 1,
                replication_factor: None,
                configs: (0..100).map(|i| (format!("k{i}"), String::new())).collect(),
            },
            validate_only: false,
        },
    ];
    for m in oversized {
        assert!(
            matches!(
                codec.encode(&frame(m.clone())),
                Err(RpcError::FieldTooLarge(_))
            ),
            "{m:?} encoded"
        );
    }
}

#[test]
fn batch_bytes_are_slices_of_the_receive_buffer() {
    let payload = Bytes::from(vec![0x5A; 4096]);
    let f = Frame {
        correlation_id: 1,
        message: RpcMessage::Consensus(NodeMessage {
            from: 1,
            to: 2,
            items: vec![(
                9,
                Message::Append(AppendRequest {
                    epoch: 3,
                    prev_offset: 0,
                    prev_epoch: -1,
                    commit: 0,
                    fill_end: 10,
                    quiesce: 0,
                    batches: vec![Batch {
                        base: 0,
                        count: 10,
                        epoch: 3,
                        bytes: payload.clone(),
                        membership: None,
                    }],
                }),
            )],
        }),
    };
    let enc = FrameCodec::default().encode(&f).unwrap();
    // The sender references the batch instead of copying it into the frame.
    assert!(enc.parts().iter().any(|p| p.as_ptr() == payload.as_ptr()));
    let mut buf = BytesMut::from(&enc.to_bytes()[..]);
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let got = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
    let RpcMessage::Consensus(m) = &got.message else {
        panic!()
    };
    let Message::Append(a) = &m.items[0].1 else {
        panic!()
    };
    let p = a.batches[0].bytes.as_ptr() as usize;
    assert!(
        range.contains(&p),
        "batch bytes were copied out of the buffer"
    );
    assert_eq!(got, f);
}

#[test]
fn an_oversized_length_is_refused_before_the_body_arrives() {
    let codec = FrameCodec::new(1 << 20);
    let mut buf = BytesMut::new();
    buf.put_u32((1 << 20) + 1);
    let (res, bytes) = allocated_by(|| codec.decode(&mut buf));
    assert!(matches!(
        res,
        Err(RpcError::FrameTooLarge {
            len: 1_048_577,
            max: 1_048_576
        })
    ));
    assert_eq!(bytes, 0, "nothing allocated for a refused length");
    let mut buf = BytesMut::new();
    buf.put_u32(u32::MAX);
    assert!(FrameCodec::default().decode(&mut buf).is_err());
    assert!(DEFAULT_MAX_RPC_FRAME_BYTES < u32::MAX as usize);
}

#[test]
fn the_sender_refuses_a_frame_above_the_cap() {
    let codec = FrameCodec::new(1024);
    let f = Frame {
        correlation_id: 1,
        message: RpcMessage::FetchMetadataResponse(Ok(MetadataChunk {
            high_watermark: 5,
            batches: vec![Batch {
                base: 0,
                count: 5,
                epoch: 1,
                bytes: Bytes::from(vec![1; 2000]),
                membership: None,
            }],
        })),
    };
    assert!(matches!(
        codec.encode(&f),
        Err(RpcError::FrameTooLarge { .. })
    ));
}

#[test]
fn oversized_fields_are_an_error_for_the_sender_not_a_panic() {
    let f = Frame {
        correlation_id: 1,
        message: RpcMessage::RegisterBroker(RegisterRequest {
            node: 1,
            node_uuid: 1,
            rpc: Endpoint {
                host: "h".repeat(300),
                port: 1,
            },
            kafka: Endpoint {
                host: "h".into(),
                port: 2,
            },
            shards: 1,
        }),
    };
    assert!(matches!(
        FrameCodec::default().encode(&f),
        Err(RpcError::FieldTooLarge("endpoint host"))
    ));
    let f = Frame {
        correlation_id: 1,
        message: RpcMessage::Hello(Hello {
            protocol_version: 1,
            cluster_id: "c".repeat(65),
            node_id: 1,
            node_uuid: 1,
        }),
    };
    assert!(FrameCodec::default().encode(&f).is_err());
}

#[test]
fn hostile_counts_inside_a_frame_are_refused_without_allocating_for_them() {
    // A consensus message claiming a million group entries in a 30-byte frame.
    let mut body = BytesMut::new();
    body.put_u8(3);
    body.put_u64(1);
    body.put_u64(1);
    body.put_u64(2);
    body.put_u32(1 << 20);
    let mut raw = BytesMut::new();
    raw.put_u32(body.len() as u32);
    raw.put_slice(&body);
    let (res, bytes) = allocated_by(|| FrameCodec::default().decode(&mut raw));
    assert!(matches!(res, Err(RpcError::Decode(_))), "{res:?}");
    assert!(bytes < 1024, "{bytes} bytes allocated");
}

#[test]
fn an_unregistration_outside_the_broker_id_range_is_refused() {
    let codec = FrameCodec::default();
    let message = RpcMessage::UnregisterBroker {
        node: MAX_NODE_ID + 1,
    };
    assert!(matches!(
        codec.encode(&Frame {
            correlation_id: 1,
            message
        }),
        Err(RpcError::FieldTooLarge("node id"))
    ));
    // The same frame written by hand: kind 19, a correlation id, the node.
    let mut body = BytesMut::new();
    body.put_u8(19);
    body.put_u64(7);
    body.put_u64(MAX_NODE_ID + 1);
    let mut raw = BytesMut::new();
    raw.put_u32(body.len() as u32);
    raw.put_slice(&body);
    assert!(matches!(codec.decode(&mut raw), Err(RpcError::Decode(_))));
    // And the largest id in range goes through.
    let f = Frame {
        correlation_id: 7,
        message: RpcMessage::UnregisterBroker { node: MAX_NODE_ID },
    };
    let mut raw = BytesMut::from(&encode(&f)[..]);
    assert_eq!(codec.decode(&mut raw).unwrap(), Some(f));
}
