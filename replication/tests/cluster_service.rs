//! Three cluster services on 127.0.0.1 with real rpc transports and metadata logs on disk; the
//! test plays each node's shards by reading and writing their `ShardLink` channels, and its
//! Kafka layer through `ClusterPort`. Shows: the cluster forms; controller calls from a node
//! that is not the controller answer after that node applied them (mirror and view already
//! show the result); partition consensus is routed to the hosting shard of the peer, unhosted
//! traffic dropped and counted; a leader report reaches the controller and comes back
//! acknowledged; producer-id blocks do not overlap; refusals carry Kafka codes; a call survives
//! the loss of the controller.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spate_replication::cluster::{
    partition_group_id, CallError, ClusterPort, LeaderReport, ShardEvent, ShardLink,
};
use spate_replication::controller::service::{ClusterService, ServiceConfig, ServiceError};
use spate_replication::controller::view::{ClusterView, SharedClusterView};
use spate_replication::controller::{CreateTopicRequest, Endpoint};
use spate_replication::identity::NodeIdentity;
use spate_replication::metadata::{MetadataStore, NOT_HOSTED};
use spate_replication::{Message, NodeId, NodeMessage};

const IDS: [NodeId; 3] = [1, 2, 3];
/// Shards per node (1 or 2, so routing to a shard other than 0 is exercised).
const SHARDS: [u32; 3] = [2, 1, 2];
/// Bound of every wait in this test (formation, failover); each is far shorter in practice.
const WAIT: Duration = Duration::from_secs(15);
/// Attempts to find three free ports (a probed port may be taken before the service binds it).
const BIND_ATTEMPTS: usize = 5;

// Kafka error codes the controller answers with.
const TOPIC_ALREADY_EXISTS: i16 = 36;
const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
const INVALID_TOPIC_EXCEPTION: i16 = 17;
const INVALID_REPLICATION_FACTOR: i16 = 38;
const INVALID_PARTITIONS: i16 = 37;
const INVALID_REQUEST: i16 = 42;

struct Node {
    id: NodeId,
    svc: Option<ClusterService>,
    links: Vec<ShardLink>,
    port: ClusterPort,
    mirror: Arc<MetadataStore>,
    _dir: tempfile::TempDir,
}

impl Node {
    fn view(&self) -> Arc<ClusterView> {
        self.port.view()
    }
    fn svc(&self) -> &ClusterService {
        self.svc.as_ref().expect("running")
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_cluster() -> Vec<Node> {
    for _ in 0..BIND_ATTEMPTS {
        let ports: Vec<u16> = IDS.iter().map(|_| free_port()).collect();
        let seeds: Vec<(NodeId, String)> = IDS
            .iter()
            .zip(&ports)
            .map(|(&id, p)| (id, format!("127.0.0.1:{p}")))
            .collect();
        let mut nodes = Vec::new();
        let mut taken = false;
        for (i, &id) in IDS.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let identity = NodeIdentity {
                node_id: id,
                node_uuid: 0xFEED_0000 + u128::from(id),
                cluster_id: "spate-service-test".into(),
            };
            let cfg = ServiceConfig::new(
                identity,
                dir.path().to_path_buf(),
                format!("127.0.0.1:{}", ports[i]).parse().unwrap(),
                seeds.clone(),
                Endpoint {
                    host: "127.0.0.1".into(),
                    port: 9000 + id as u16,
                },
                SHARDS[i],
            );
            let mirror = MetadataStore::mirrored("spate-service-test");
            match ClusterService::start(cfg, SharedClusterView::default(), mirror.clone()) {
                Ok((svc, links, port)) => {
                    assert_eq!(links.len(), SHARDS[i] as usize);
                    for (s, l) in links.iter().enumerate() {
                        assert_eq!(l.shard, s);
                    }
                    nodes.push(Node {
                        id,
                        svc: Some(svc),
                        links,
                        port,
                        mirror,
                        _dir: dir,
                    })
                }
                Err(ServiceError::Bind { .. }) => {
                    taken = true;
                    break;
                }
                Err(e) => panic!("node {id}: {e}"),
            }
        }
        if !taken {
            return nodes;
        }
        for n in nodes {
            if let Some(s) = n.svc {
                s.stop();
            }
        }
    }
    panic!("no three free ports in {BIND_ATTEMPTS} attempts");
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    futures_lite::future::block_on(f)
}

fn create(
    port: &ClusterPort,
    name: &str,
    partitions: usize,
    rf: Option<usize>,
) -> Result<u128, CallError> {
    let topic_id = fastrand::u128(1..);
    let req = CreateTopicRequest {
        name: name.into(),
        topic_id,
        partitions,
        replication_factor: rf,
        configs: vec![("retention.ms".into(), "60000".into())],
    };
    block_on(port.create_topic(req, false)).map(|()| topic_id)
}

/// The mirror holds exactly the node's view of the topic: its id, partitions, configs and, per
/// partition, the shard of this node's replica or NOT_HOSTED.
fn assert_mirrored(n: &Node, topic: &str) -> Vec<u32> {
    let view = n.view();
    let t = view
        .metadata
        .topics
        .get(topic)
        .unwrap_or_else(|| panic!("node {}'s view lacks {topic}", n.id));
    let topics = n.mirror.topics();
    let m = topics
        .get(topic)
        .unwrap_or_else(|| panic!("node {}'s mirror lacks {topic}", n.id));
    assert_eq!(m.id, t.topic_id);
    assert_eq!(m.partitions as usize, t.partitions.len());
    assert!(!m.internal);
    assert_eq!(m.configs, t.configs);
    let want: Vec<u32> = t
        .partitions
        .iter()
        .map(|p| {
            p.replicas
                .iter()
                .find(|r| r.node == n.id)
                .map_or(NOT_HOSTED, |r| r.shard)
        })
        .collect();
    assert_eq!(m.shards, want, "node {} mirror shards of {topic}", n.id);
    want
}

fn code(r: Result<impl std::fmt::Debug, CallError>) -> i16 {
    r.expect_err("refused").code
}

#[test]
fn cluster_service_routes_consensus_and_carries_controller_calls() {
    let mut nodes = start_cluster();
    // The cluster forms: a controller, three live brokers seen by every node.
    wait_until("the cluster to form", || {
        nodes.iter().all(|n| {
            let v = n.view();
            v.controller.is_some() && v.live_brokers().count() == 3
        })
    });
    let controller = nodes[0].view().controller.unwrap();
    let other = nodes.iter().position(|n| n.id != controller).unwrap();
    let n = &nodes[other];

    // CreateTopic on a node that is not the controller answers once that node shows it.
    let started = Instant::now();
    let orders = create(&n.port, "orders", 3, Some(3)).unwrap();
    let took = started.elapsed();
    let t = n.view().metadata.topics["orders"].clone();
    assert_eq!(t.topic_id, orders);
    assert_eq!(t.configs["retention.ms"], "60000");
    assert!(t.partitions.iter().all(|p| p.replicas.len() == 3));
    let shards = assert_mirrored(n, "orders");
    assert!(
        shards.iter().all(|&s| s != NOT_HOSTED),
        "RF 3 of 3: all hosted"
    );
    // One replica per node of three: some partitions are not hosted on each node.
    create(&n.port, "single", 3, Some(1)).unwrap();
    let single = assert_mirrored(n, "single");
    assert_eq!(
        single.iter().filter(|&&s| s == NOT_HOSTED).count(),
        2,
        "{single:?}"
    );
    eprintln!("create answered in {took:?}");
    wait_until("every node to apply both topics", || {
        nodes.iter().all(|n| {
            let topics = n.mirror.topics();
            topics.contains_key("orders") && topics.contains_key("single")
        })
    });
    for n in &nodes {
        assert_mirrored(n, "orders");
        assert_mirrored(n, "single");
    }

    // A shard's consensus for a hosted group arrives in the peer's inbox of the right shard.
    let group = partition_group_id(orders, 0);
    let shard_on = |n: &Node| -> usize {
        n.view().metadata.topics["orders"].partitions[0]
            .replicas
            .iter()
            .find(|r| r.node == n.id)
            .unwrap()
            .shard as usize
    };
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let msg = NodeMessage {
        from: n1.id,
        to: n2.id,
        items: vec![(group, Message::TimeoutNow { epoch: 7 })],
    };
    n1.links[0]
        .to_service
        .send(ShardEvent::Send(msg.clone()))
        .unwrap();
    let got = n2.links[shard_on(n2)]
        .inbox
        .recv_timeout(WAIT)
        .expect("routed to the hosting shard");
    assert_eq!(got, msg);
    for (s, l) in n2.links.iter().enumerate() {
        assert!(l.inbox.is_empty(), "shard {s} got a second copy");
    }

    // A group node 2 does not host: dropped and counted, no shard sees it.
    let unhosted = NodeMessage {
        from: n1.id,
        to: n2.id,
        items: vec![(0xDEAD_BEEF, Message::TimeoutNow { epoch: 1 })],
    };
    let before = n2.svc().stats().consensus_unhosted;
    n1.links[0]
        .to_service
        .send(ShardEvent::Send(unhosted))
        .unwrap();
    wait_until("the unhosted entry to be counted", || {
        n2.svc().stats().consensus_unhosted > before
    });
    assert!(n2.links.iter().all(|l| l.inbox.is_empty()));

    // A leader report reaches the controller's view and comes back acknowledged.
    let report = LeaderReport {
        group,
        leader: n1.id,
        epoch: 1,
        isr: vec![n1.id, n2.id],
    };
    let last = n1.links.len() - 1;
    n1.links[last]
        .to_service
        .send(ShardEvent::Report(report.clone()))
        .unwrap();
    let acked = n1.links[shard_on(n1)]
        .accepted
        .recv_timeout(WAIT)
        .expect("report acknowledged");
    assert_eq!(acked, report);
    let c = nodes.iter().find(|n| n.id == controller).unwrap();
    wait_until("the controller's view to show the report", || {
        let p = c.view().metadata.topics["orders"].partitions[0].clone();
        p.leader == Some(n1.id) && p.leader_epoch == 1 && p.isr == vec![n1.id, n2.id]
    });
    // An older epoch is superseded: acknowledged too (nothing more to tell the controller).
    let stale = LeaderReport {
        epoch: 0,
        ..report.clone()
    };
    n1.links[0]
        .to_service
        .send(ShardEvent::Report(stale.clone()))
        .unwrap();
    assert_eq!(
        n1.links[shard_on(n1)].accepted.recv_timeout(WAIT).unwrap(),
        stale
    );

    // Producer ids from two nodes never overlap.
    let ids = |n: &Node| -> Vec<i64> {
        (0..5)
            .map(|_| block_on(n.port.allocate_producer_id()).unwrap())
            .collect()
    };
    let (a, b) = (ids(&nodes[0]), ids(&nodes[1]));
    assert!(a.windows(2).all(|w| w[0] < w[1]) && b.windows(2).all(|w| w[0] < w[1]));
    assert!(a.iter().all(|x| !b.contains(x)), "{a:?} {b:?}");

    // Configs, partitions, validate_only.
    block_on(n.port.set_topic_configs(
        "orders".into(),
        vec![
            ("cleanup.policy".into(), Some("compact".into())),
            ("retention.ms".into(), None),
        ],
    ))
    .unwrap();
    let configs = &n.mirror.topics()["orders"].configs;
    assert_eq!(
        configs,
        &BTreeMap::from([("cleanup.policy".to_string(), "compact".to_string())])
    );
    block_on(n.port.create_partitions("orders".into(), 5, true)).unwrap();
    assert_eq!(n.mirror.topics()["orders"].partitions, 3, "validate_only");
    block_on(n.port.create_partitions("orders".into(), 5, false)).unwrap();
    assert_eq!(n.mirror.topics()["orders"].partitions, 5);
    assert_mirrored(n, "orders");
    assert_eq!(
        code(block_on(n.port.create_partitions(
            "orders".into(),
            4,
            false
        ))),
        INVALID_PARTITIONS
    );

    // Refusals carry Kafka codes.
    assert_eq!(
        code(create(&n.port, "orders", 1, None)),
        TOPIC_ALREADY_EXISTS
    );
    assert_eq!(
        code(create(&n.port, "four", 1, Some(4))),
        INVALID_REPLICATION_FACTOR
    );
    assert_eq!(
        code(create(&n.port, "bad/name", 1, None)),
        INVALID_TOPIC_EXCEPTION
    );
    assert_eq!(
        code(block_on(n.port.delete_topic("__internal".into()))),
        INVALID_REQUEST
    );
    assert!(!n.mirror.topics().contains_key("four"));
    let valid = CreateTopicRequest {
        name: "checked".into(),
        topic_id: 99,
        partitions: 1,
        replication_factor: Some(3),
        configs: Vec::new(),
    };
    block_on(n.port.create_topic(valid, true)).unwrap();
    assert!(!n.mirror.topics().contains_key("checked"), "validate_only");

    // Delete: gone from this node's mirror and view when answered.
    block_on(n.port.delete_topic("orders".into())).unwrap();
    assert!(!n.mirror.topics().contains_key("orders"));
    assert!(!n.view().metadata.topics.contains_key("orders"));
    assert_eq!(
        code(block_on(n.port.delete_topic("orders".into()))),
        UNKNOWN_TOPIC_OR_PARTITION
    );

    // The controller stops: a call made right after goes to the next controller.
    let ci = nodes.iter().position(|n| n.id == controller).unwrap();
    nodes[ci].svc.take().unwrap().stop();
    let survivor = &nodes[(ci + 1) % 3];
    let started = Instant::now();
    create(&survivor.port, "after-failover", 1, Some(2)).expect("created after failover");
    let took = started.elapsed();
    eprintln!("failover create answered in {took:?}");
    assert!(survivor.mirror.topics().contains_key("after-failover"));
    assert_ne!(survivor.view().controller, Some(controller));

    for n in nodes {
        if let Some(s) = n.svc {
            s.stop();
        }
    }
}
