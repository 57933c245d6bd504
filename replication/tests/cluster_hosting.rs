//! Which partition groups a node hosts, on which shard, under which group id, and how consensus
//! traffic is split per shard and gathered per peer: derived from a controller state built by
//! the real active controller.

use std::collections::BTreeSet;

use spate_replication::cluster::{
    gather_outgoing, partition_group_id, plan_hosting, split_by_shard,
};
use spate_replication::controller::{
    ActiveController, ControllerConfig, CreateTopicRequest, Endpoint, HeartbeatRequest,
    MetadataState, Record, RegisterRequest, METADATA_GROUP,
};
use spate_replication::{Message, NodeMessage};

fn endpoint(port: u16) -> Endpoint {
    Endpoint {
        host: "127.0.0.1".into(),
        port,
    }
}

/// Three brokers with two shards each, registered and unfenced.
fn cluster() -> ActiveController {
    let mut ctl = ActiveController::new(ControllerConfig::default(), MetadataState::new(), 0);
    for node in 1..=3u64 {
        let recs = ctl
            .register(
                RegisterRequest {
                    node,
                    node_uuid: u128::from(node),
                    rpc: endpoint(9192),
                    kafka: endpoint(9092),
                    shards: 2,
                },
                0,
            )
            .unwrap();
        let Some(Record::RegisterBroker(reg)) = recs.last() else {
            panic!("no registration")
        };
        let broker_epoch = reg.broker_epoch;
        ctl.heartbeat(
            HeartbeatRequest {
                node,
                broker_epoch,
                want_fence: false,
            },
            0,
        )
        .unwrap();
    }
    ctl
}

fn create(ctl: &mut ActiveController, name: &str, topic_id: u128, partitions: usize, rf: usize) {
    ctl.create_topic(CreateTopicRequest {
        name: name.into(),
        topic_id,
        partitions,
        replication_factor: Some(rf),
        configs: Vec::new(),
    })
    .unwrap();
}

fn heartbeat(epoch: i32) -> Message {
    Message::TimeoutNow { epoch }
}

#[test]
fn every_node_derives_the_same_groups_on_the_assigned_shards() {
    let mut ctl = cluster();
    create(&mut ctl, "a", 0xfeed, 6, 3);
    create(&mut ctl, "b", 0xbeef, 4, 2);
    let state = ctl.state().clone();
    let mut ids = BTreeSet::new();
    for (name, t) in &state.topics {
        for (i, p) in t.partitions.iter().enumerate() {
            let g = partition_group_id(t.topic_id, i as u32);
            assert_ne!(g, METADATA_GROUP);
            assert!(ids.insert(g), "group ids are distinct");
            for node in 1..=3 {
                let (plan, conflicts) = plan_hosting(&state, node);
                assert!(conflicts.is_empty());
                let hosted = plan.groups.get(&g);
                match p.replicas.iter().find(|r| r.node == node) {
                    Some(r) => {
                        let h = hosted.expect("a replica's node hosts its group");
                        assert_eq!((h.topic.as_str(), h.partition), (name.as_str(), i as u32));
                        assert_eq!(h.shard, r.shard);
                        let voters: Vec<u64> = p.replicas.iter().map(|r| r.node).collect();
                        assert_eq!(h.voters, voters);
                    }
                    None => assert!(hosted.is_none(), "only replicas host a group"),
                }
            }
        }
    }
    // Partitions of one topic, and the same partition of two topics, get different ids.
    assert_ne!(partition_group_id(7, 0), partition_group_id(7, 1));
    assert_ne!(partition_group_id(7, 0), partition_group_id(8, 0));
}

#[test]
fn new_partitions_open_and_nothing_else_moves() {
    let mut ctl = cluster();
    create(&mut ctl, "a", 0xfeed, 3, 3);
    let (before, _) = plan_hosting(ctl.state(), 1);
    ctl.create_partitions("a", 5).unwrap();
    let (after, _) = plan_hosting(ctl.state(), 1);
    let c = before.changes_to(&after);
    assert!(c.close.is_empty());
    let opened: Vec<u32> = c.open.iter().map(|(_, h)| h.partition).collect();
    assert_eq!(opened, {
        let mut v = vec![3, 4];
        v.sort_by_key(|&p| partition_group_id(0xfeed, p));
        v
    });
    // Losing the topic's state closes every group.
    let c = after.changes_to(&Default::default());
    assert_eq!(c.close.len(), 5);
    assert!(c.open.is_empty());
}

#[test]
fn colliding_group_ids_host_neither_partition() {
    // Two topic ids that fold to the same 64 bits, hence the same group for each partition.
    let a: u128 = 0x1234;
    let b: u128 = (1u128 << 64) | (0x1234 ^ 1u128.rotate_left(29));
    assert_eq!(partition_group_id(a, 0), partition_group_id(b, 0));
    let mut ctl = cluster();
    create(&mut ctl, "a", a, 1, 3);
    create(&mut ctl, "b", b, 1, 3);
    let (plan, conflicts) = plan_hosting(ctl.state(), 1);
    assert_eq!(conflicts.len(), 1);
    assert!(plan.groups.is_empty(), "{plan:?}");
}

#[test]
fn incoming_traffic_is_split_per_shard_and_outgoing_gathered_per_peer() {
    let mut ctl = cluster();
    create(&mut ctl, "a", 0xfeed, 8, 3);
    let (plan, _) = plan_hosting(ctl.state(), 1);
    let groups: Vec<_> = plan.groups.keys().copied().collect();
    assert_eq!(
        groups.len(),
        8,
        "rf 3 on 3 nodes: node 1 hosts every partition"
    );
    let mut items: Vec<_> = groups.iter().map(|&g| (g, heartbeat(1))).collect();
    items.push((12345, heartbeat(1))); // not hosted here
    let (per_shard, dropped) = split_by_shard(
        NodeMessage {
            from: 2,
            to: 1,
            items,
        },
        &plan,
    );
    assert_eq!(dropped, 1);
    let mut seen = 0;
    for (shard, m) in &per_shard {
        assert_eq!((m.from, m.to), (2, 1));
        for (g, _) in &m.items {
            assert_eq!(plan.shard_of(*g), Some(*shard));
            seen += 1;
        }
    }
    assert_eq!(seen, 8);
    assert_eq!(per_shard.len(), 2, "node 1 has two shards, both hosting");

    let out = gather_outgoing(
        1,
        groups
            .iter()
            .map(|&g| (g, vec![(2, heartbeat(1)), (3, heartbeat(1))])),
    );
    assert_eq!(
        out.len(),
        2,
        "one message per peer whatever the group count"
    );
    for m in &out {
        assert_eq!(m.from, 1);
        assert_eq!(m.items.len(), 8);
    }
}

#[test]
fn a_peer_gets_more_than_one_message_only_when_the_batches_pass_the_gathered_limit() {
    use bytes::Bytes;
    use spate_replication::cluster::MAX_GATHERED_BATCH_BYTES;
    use spate_replication::rpc::frame::DEFAULT_MAX_RPC_FRAME_BYTES;
    use spate_replication::{AppendRequest, Batch};
    // Ten groups catching up at once, each with a window of four 1 MiB appends to node 2 (40
    // MiB: over the frame cap in one message), and a heartbeat each to node 3.
    let append = |base: u64| {
        Message::Append(AppendRequest {
            epoch: 1,
            prev_offset: base,
            prev_epoch: 1,
            commit: 0,
            batches: vec![Batch {
                base,
                count: 1,
                epoch: 1,
                bytes: Bytes::from(vec![0u8; 1 << 20]),
                membership: None,
            }],
            fill_end: base + 1,
            quiesce: 0,
        })
    };
    let per_group = (0..10u64).map(|g| {
        let mut msgs: Vec<_> = (0..4).map(|i| (2, append(i))).collect();
        msgs.push((3, heartbeat(1)));
        (g, msgs)
    });
    let out = gather_outgoing(1, per_group);
    let to_2: Vec<&NodeMessage> = out.iter().filter(|m| m.to == 2).collect();
    let to_3: Vec<&NodeMessage> = out.iter().filter(|m| m.to == 3).collect();
    assert_eq!(to_3.len(), 1, "small messages still share one");
    const { assert!(MAX_GATHERED_BATCH_BYTES < DEFAULT_MAX_RPC_FRAME_BYTES) };
    assert_eq!(to_2.len(), 3, "40 MiB in messages of at most 16 MiB");
    let mut seen = Vec::new();
    for m in &to_2 {
        let bytes: usize = m
            .items
            .iter()
            .map(|(_, msg)| match msg {
                Message::Append(a) => a.batches.iter().map(|b| b.bytes.len()).sum(),
                _ => 0,
            })
            .sum();
        assert!(
            bytes <= MAX_GATHERED_BATCH_BYTES,
            "{bytes} bytes of batches in one message"
        );
        seen.extend(m.items.iter().map(|(g, msg)| match msg {
            Message::Append(a) => (*g, a.prev_offset),
            _ => unreachable!(),
        }));
    }
    // Every append once, each group's in order.
    assert_eq!(seen.len(), 40);
    for g in 0..10u64 {
        let mine: Vec<u64> = seen.iter().filter(|s| s.0 == g).map(|s| s.1).collect();
        assert_eq!(mine, vec![0, 1, 2, 3]);
    }
}
