//! `spate serve --seeds ...`: the node's cluster settings, its identity on disk, and the
//! controller driver's start (replication/src/controller/service.rs). Without `--seeds` none of
//! this runs and the broker is the one-node cluster it always was.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use spate_replication::cluster::{ClusterPort, ShardLink};
use spate_replication::controller::records::{Endpoint, MAX_NODE_ID};
use spate_replication::controller::service::{ClusterService, ServiceConfig};
use spate_replication::controller::view::SharedClusterView;
use spate_replication::identity::NodeIdentity;
use spate_replication::metadata::MetadataStore;
use spate_replication::NodeId;

use crate::config::ServeConfig;

/// Where the rpc port listens unless told otherwise (the Kafka default port plus 100).
pub const DEFAULT_RPC_LISTEN: &str = "127.0.0.1:9192";
/// Metadata voters at most: each is a member of the metadata group (the core's member cap).
pub const MAX_SEEDS: usize = 64;
/// Longest `--seeds` value accepted.
const MAX_SEEDS_TEXT_BYTES: usize = 64 * 1024;
/// Longest leader-balancer interval accepted (a day; turn the balancer off instead).
const MAX_LEADER_IMBALANCE_CHECK_INTERVAL_SECONDS: u64 = 86_400;

#[derive(Debug, Clone)]
pub struct ClusterArgs {
    pub rpc_listen: SocketAddr,
    pub advertised_rpc: Option<Endpoint>,
    pub seeds: Vec<(NodeId, String)>,
    pub default_replication_factor: Option<usize>,
    /// The leader balancer's interval; `None`: off.
    pub leader_balance_interval_ms: Option<u64>,
    /// `--replication-throttle-bytes-per-sec`; `None`: off (0).
    pub replication_throttle_bytes_per_sec: Option<u64>,
}

impl ClusterArgs {
    /// The cluster settings of `c`, or `None` without `--seeds`.
    pub fn from_serve(c: &ServeConfig) -> anyhow::Result<Option<ClusterArgs>> {
        let Some(seeds_text) = c.seeds.as_deref().filter(|s| !s.trim().is_empty()) else {
            return Ok(None);
        };
        let seeds = parse_seeds(seeds_text)?;
        let listen_text = c.rpc_listen.as_deref().unwrap_or(DEFAULT_RPC_LISTEN);
        let rpc_listen = listen_text
            .to_socket_addrs()
            .with_context(|| format!("--rpc-listen {listen_text}"))?
            .next()
            .with_context(|| format!("--rpc-listen {listen_text} resolves to nothing"))?;
        let advertised_rpc = c
            .advertised_rpc
            .as_deref()
            .map(|a| endpoint(a).with_context(|| format!("--advertised-rpc {a}")))
            .transpose()?;
        if c.default_replication_factor == Some(0) {
            bail!("--default-replication-factor must be at least 1");
        }
        let interval_s = c.leader_imbalance_check_interval_seconds.unwrap_or(
            spate_replication::controller::active::DEFAULT_LEADER_BALANCE_INTERVAL_MS / 1000,
        );
        if !(1..=MAX_LEADER_IMBALANCE_CHECK_INTERVAL_SECONDS).contains(&interval_s) {
            bail!(
                "--leader-imbalance-check-interval-seconds must be 1 to \
                 {MAX_LEADER_IMBALANCE_CHECK_INTERVAL_SECONDS}"
            );
        }
        let leader_balance_interval_ms = c
            .auto_leader_rebalance_enable
            .unwrap_or(true)
            .then_some(interval_s * 1000);
        Ok(Some(ClusterArgs {
            rpc_listen,
            advertised_rpc,
            seeds,
            default_replication_factor: c.default_replication_factor,
            leader_balance_interval_ms,
            // Unset means the default (these settings are read before `resolve` fills them).
            replication_throttle_bytes_per_sec: Some(c.replication_throttle_bytes_per_sec.unwrap_or(
                spate_replication::cluster::throttle::DEFAULT_REPLICATION_THROTTLE_BYTES_PER_SEC,
            ))
            .filter(|&r| r > 0),
        }))
    }
}

fn endpoint(text: &str) -> anyhow::Result<Endpoint> {
    let (host, port) = text.rsplit_once(':').context("expected HOST:PORT")?;
    let host = host.trim_matches(['[', ']']);
    if host.is_empty() {
        bail!("empty host");
    }
    Ok(Endpoint {
        host: host.to_string(),
        port: port.parse().context("bad port")?,
    })
}

/// `ID@HOST:PORT,...`: distinct ids in Kafka's broker id range, each with an address.
pub fn parse_seeds(text: &str) -> anyhow::Result<Vec<(NodeId, String)>> {
    if text.len() > MAX_SEEDS_TEXT_BYTES {
        bail!("--seeds is longer than {MAX_SEEDS_TEXT_BYTES} bytes");
    }
    let mut seeds: Vec<(NodeId, String)> = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (id, addr) = item
            .split_once('@')
            .with_context(|| format!("--seeds {item:?}: expected ID@HOST:PORT"))?;
        let id: NodeId = id
            .parse()
            .with_context(|| format!("--seeds {item:?}: bad node id"))?;
        if id > MAX_NODE_ID {
            bail!("--seeds {item:?}: node id above {MAX_NODE_ID}");
        }
        endpoint(addr).with_context(|| format!("--seeds {item:?}"))?;
        if seeds.iter().any(|s| s.0 == id) {
            bail!("--seeds names node {id} twice");
        }
        if seeds.len() == MAX_SEEDS {
            bail!("--seeds lists more than {MAX_SEEDS} voters");
        }
        seeds.push((id, addr.to_string()));
    }
    if seeds.is_empty() {
        bail!("--seeds lists no node");
    }
    Ok(seeds)
}

/// The cluster id a new node derives from the seeds: every voter, given the same list,
/// derives the same id, and a node started with another list derives another and is refused.
pub fn cluster_id_from_seeds(seeds: &[(NodeId, String)]) -> String {
    let mut sorted: Vec<String> = seeds.iter().map(|(i, a)| format!("{i}@{a}")).collect();
    sorted.sort();
    // FNV-1a, 64 bits: stable across builds and platforms (std's hasher is not).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sorted.join(",").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("spate-{h:016x}")
}

/// Stops a cluster node started on the data directory of a single-node broker that holds
/// topics: a cluster node serves the controller's topics only, so those would silently vanish
/// for clients (their files stay untouched either way). Nothing is written before this check.
pub fn refuse_single_node_topics(data_dir: &Path) -> anyhow::Result<()> {
    let names = spate_replication::metadata::stored_topic_names(data_dir)
        .context("reading the data directory's single-node topics")?;
    if !names.is_empty() {
        const SHOWN: usize = 5;
        let mut listed = names
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if names.len() > SHOWN {
            listed.push_str(&format!(" and {} more", names.len() - SHOWN));
        }
        bail!(
            "{} holds {} topics of a single-node broker ({listed}); a cluster node would not \
             serve them. Start it without --seeds (a one-node broker, as before), or start the \
             cluster node on a new data directory (moving single-node topics into a cluster is \
             not supported yet)",
            data_dir.display(),
            names.len()
        );
    }
    Ok(())
}

/// Opens this node's identity (creating it on first start with the id derived from the seeds;
/// a stored id wins, so a later change to the seed list does not change the cluster).
pub fn open_identity(
    data_dir: &Path,
    node_id: i32,
    args: &ClusterArgs,
) -> anyhow::Result<NodeIdentity> {
    if node_id < 0 {
        bail!("--node-id must be at least 0 in a cluster");
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let derived = cluster_id_from_seeds(&args.seeds);
    let id = NodeIdentity::open_or_create(data_dir, node_id as NodeId, None, || derived.clone())
        .context("node identity")?;
    if id.cluster_id != derived {
        tracing::warn!(
            stored = %id.cluster_id,
            derived = %derived,
            "this node's stored cluster id differs from the one these --seeds give: peers \
             started with other seeds are refused (the stored id is kept)"
        );
    }
    Ok(id)
}

/// Starts the cluster service thread; `kafka` is where clients reach this node. `mirror` is
/// the topic store the shards read, opened with `MetadataStore::mirrored` (the service fills
/// it from the controller). Returns the shards' links (one per shard, in shard order) and the
/// Kafka layer's controller port.
#[allow(clippy::too_many_arguments)]
pub fn start(
    args: &ClusterArgs,
    identity: NodeIdentity,
    data_dir: &Path,
    kafka: Endpoint,
    shards: usize,
    view: SharedClusterView,
    mirror: Arc<MetadataStore>,
) -> anyhow::Result<(ClusterService, Vec<ShardLink>, ClusterPort)> {
    let voter = args.seeds.iter().any(|s| s.0 == identity.node_id);
    tracing::info!(
        node_id = identity.node_id,
        cluster_id = %identity.cluster_id,
        voter,
        seeds = args.seeds.len(),
        rpc_listen = %args.rpc_listen,
        "joining the cluster"
    );
    let mut cfg = ServiceConfig::new(
        identity,
        data_dir.to_path_buf(),
        args.rpc_listen,
        args.seeds.clone(),
        kafka,
        u32::try_from(shards).context("--cores")?,
    );
    cfg.advertised_rpc = args.advertised_rpc.clone();
    cfg.default_replication_factor = args.default_replication_factor;
    cfg.leader_balance_interval_ms = args.leader_balance_interval_ms;
    let (svc, links, port) =
        ClusterService::start(cfg, view, mirror).context("starting the cluster service")?;
    tracing::info!(rpc = %svc.rpc_addr(), "rpc port listening");
    Ok((svc, links, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_parse_and_refuse_bad_lists() {
        let s = parse_seeds("1@127.0.0.1:9192, 2@host:9193,3@[::1]:9194").unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[2], (3, "[::1]:9194".to_string()));
        for bad in [
            "",
            "1",
            "x@h:1",
            "1@h",
            "1@h:99999",
            "1@h:1,1@h:2",
            "3000000000@h:1",
        ] {
            assert!(parse_seeds(bad).is_err(), "{bad:?} accepted");
        }
        let many: Vec<String> = (0..=MAX_SEEDS).map(|i| format!("{i}@h:1")).collect();
        assert!(parse_seeds(&many.join(",")).is_err());
    }

    #[test]
    fn the_cluster_id_depends_on_the_seed_set_not_its_order() {
        let a = parse_seeds("1@h:1,2@h:2").unwrap();
        let b = parse_seeds("2@h:2,1@h:1").unwrap();
        let c = parse_seeds("1@h:1,2@h:3").unwrap();
        assert_eq!(cluster_id_from_seeds(&a), cluster_id_from_seeds(&b));
        assert_ne!(cluster_id_from_seeds(&a), cluster_id_from_seeds(&c));
        spate_replication::identity::check_cluster_id(&cluster_id_from_seeds(&a)).unwrap();
    }

    #[test]
    fn the_replication_throttle_is_on_by_default_and_zero_turns_it_off() {
        use spate_replication::cluster::throttle::DEFAULT_REPLICATION_THROTTLE_BYTES_PER_SEC;
        let with = |rate: Option<u64>| {
            let c = ServeConfig {
                seeds: Some("1@127.0.0.1:9192".into()),
                rpc_listen: Some("127.0.0.1:0".into()),
                replication_throttle_bytes_per_sec: rate,
                ..ServeConfig::default()
            };
            ClusterArgs::from_serve(&c)
                .unwrap()
                .unwrap()
                .replication_throttle_bytes_per_sec
        };
        assert_eq!(with(None), Some(DEFAULT_REPLICATION_THROTTLE_BYTES_PER_SEC));
        assert_eq!(with(Some(0)), None);
        assert_eq!(with(Some(7)), Some(7));
    }
}
