//! The `spate serve` configuration: one struct read from the command line and, with
//! `--config FILE`, from TOML with the same keys (kebab-case). Command-line values win over the
//! file, the file over the defaults. Every limit carries its unit in its name.

use crate::cpus::parse_cpuset;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use spate_engine::FlushPolicy;
use spate_net::BrokerConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlushMode {
    /// Every acknowledged write is on disk (group-committed fdatasync before the reply).
    Always,
    /// fdatasync every --flush-interval-ms or --flush-interval-bytes, whichever comes first.
    /// Write caching: writes are acknowledged and readable before they are durable, and a
    /// process crash or power loss may lose the last interval's.
    Interval,
    /// Never fdatasync (write caching): writes are acknowledged and readable while still in
    /// the broker's memory; a process crash or power loss may lose them.
    Never,
}

#[derive(Clone, Debug, Default, Args, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServeConfig {
    /// TOML file with any of these settings (same names as the flags, without the dashes in
    /// front); flags given on the command line override it.
    #[arg(long, env = "SPATE_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to accept Kafka clients on [default: 127.0.0.1:9092].
    #[arg(long, env = "SPATE_LISTEN", value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Address clients are told to connect to, if different from --listen.
    #[arg(long, env = "SPATE_ADVERTISED_LISTENER", value_name = "HOST:PORT")]
    pub advertised_listener: Option<String>,
    /// Directory holding the partition logs and metadata [default: ./spate-data].
    #[arg(long, env = "SPATE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Number of cores (shards) to run on, one pinned executor each [default: all cores].
    #[arg(long, env = "SPATE_CORES", value_name = "N")]
    pub cores: Option<usize>,
    /// Pin each shard's thread to one CPU (shard N on CPU N modulo the CPUs); `false` leaves
    /// their placement to the kernel, for brokers that share cores with others (several on one
    /// machine, as Redpanda's --overprovisioned), where pinned shards of every broker would
    /// all land on the same first CPUs [default: true].
    #[arg(long, env = "SPATE_THREAD_AFFINITY", value_name = "BOOL")]
    pub thread_affinity: Option<bool>,
    /// CPUs the shards are pinned to, as a list such as `1` or `0-3,6` (shard N on the Nth
    /// CPU of the list, modulo its length; every other thread of the broker kept on them too).
    /// Several brokers on one machine each get CPUs of their own, as Redpanda's --cpuset
    /// [default: the CPUs this process may run on, as `taskset` or a cgroup set them].
    #[arg(long, env = "SPATE_CPUSET", value_name = "LIST")]
    pub cpuset: Option<String>,
    /// This broker's node id in Metadata responses [default: 0].
    #[arg(long, env = "SPATE_NODE_ID", value_name = "N")]
    pub node_id: Option<i32>,
    /// When appended data is made durable [default: always].
    #[arg(long, env = "SPATE_FLUSH", value_enum)]
    pub flush: Option<FlushMode>,
    /// With --flush interval: longest time between fdatasyncs [default: 1000].
    #[arg(long, env = "SPATE_FLUSH_INTERVAL_MS", value_name = "MS")]
    pub flush_interval_ms: Option<u64>,
    /// With --flush interval: most bytes appended between fdatasyncs [default: 67108864].
    #[arg(long, env = "SPATE_FLUSH_INTERVAL_BYTES", value_name = "BYTES")]
    pub flush_interval_bytes: Option<u64>,
    /// Partitions of topics created without a count (auto-created ones too) [default: 1].
    #[arg(long, env = "SPATE_DEFAULT_PARTITIONS", value_name = "N")]
    pub default_partitions: Option<i32>,
    /// Create unknown topics when a client asks for their metadata [default: true].
    #[arg(long, env = "SPATE_AUTO_CREATE_TOPICS", value_name = "BOOL")]
    pub auto_create_topics: Option<bool>,
    /// Delete log segments older than this; -1 keeps them forever [default: 604800000 (7 days)].
    #[arg(
        long,
        env = "SPATE_RETENTION_MS",
        value_name = "MS",
        allow_negative_numbers = true
    )]
    pub retention_ms: Option<i64>,
    /// Delete the oldest segments while a partition is larger than this; -1 for no limit
    /// [default: -1].
    #[arg(
        long,
        env = "SPATE_RETENTION_BYTES",
        value_name = "BYTES",
        allow_negative_numbers = true
    )]
    pub retention_bytes: Option<i64>,
    /// Roll to a new log segment at this size [default: 1073741824].
    #[arg(long, env = "SPATE_SEGMENT_BYTES", value_name = "BYTES")]
    pub segment_bytes: Option<u64>,
    /// Largest request frame accepted; larger ones close the connection [default: 104857600].
    #[arg(long, env = "SPATE_MAX_FRAME_BYTES", value_name = "BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Most client connections open at once, over all cores [default: 10000].
    #[arg(long, env = "SPATE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Requests of one connection processed concurrently before reading pauses [default: 32].
    #[arg(long, env = "SPATE_MAX_IN_FLIGHT_PER_CONNECTION", value_name = "N")]
    pub max_in_flight_per_connection: Option<usize>,
    /// Largest record batch accepted (Kafka's message.max.bytes) [default: 8388608].
    #[arg(long, env = "SPATE_MAX_BATCH_BYTES", value_name = "BYTES")]
    pub max_batch_bytes: Option<u32>,
    /// Upper bound on how long a Fetch may wait for data [default: 30000].
    #[arg(long, env = "SPATE_MAX_FETCH_WAIT_MS", value_name = "MS")]
    pub max_fetch_wait_ms: Option<u64>,
    /// Registered io_uring buffer memory per core; writes from it skip the kernel's page
    /// pinning. 0 sizes it from the locked-memory limit (64 MiB per core when unlimited)
    /// [default: 0].
    #[arg(long, env = "SPATE_IO_MEMORY_BYTES", value_name = "BYTES")]
    pub io_memory_bytes: Option<u64>,
    /// Partitions of the internal __consumer_offsets topic; never change it once groups
    /// exist [default: 8].
    #[arg(long, env = "SPATE_OFFSETS_TOPIC_PARTITIONS", value_name = "N")]
    pub offsets_topic_partitions: Option<i32>,
    /// How long the first rebalance of a new group waits for more members [default: 3000].
    #[arg(
        long,
        env = "SPATE_GROUP_INITIAL_REBALANCE_DELAY_MS",
        value_name = "MS"
    )]
    pub group_initial_rebalance_delay_ms: Option<i64>,
    /// Smallest session timeout a group member may ask for [default: 6000].
    #[arg(long, env = "SPATE_GROUP_MIN_SESSION_TIMEOUT_MS", value_name = "MS")]
    pub group_min_session_timeout_ms: Option<i32>,
    /// Largest session timeout a group member may ask for [default: 1800000].
    #[arg(long, env = "SPATE_GROUP_MAX_SESSION_TIMEOUT_MS", value_name = "MS")]
    pub group_max_session_timeout_ms: Option<i32>,
    /// How long committed offsets of an empty group are kept [default: 604800000, 7 days].
    #[arg(long, env = "SPATE_OFFSETS_RETENTION_MS", value_name = "MS")]
    pub offsets_retention_ms: Option<i64>,
    /// Replicas of each __consumer_offsets partition in a cluster, capped at the live
    /// brokers when the topic is created [default: 3].
    #[arg(long, env = "SPATE_OFFSETS_TOPIC_REPLICATION_FACTOR", value_name = "N")]
    pub offsets_topic_replication_factor: Option<u16>,
    /// How often old segments are checked against the retention limits [default: 300000].
    #[arg(long, env = "SPATE_RETENTION_CHECK_INTERVAL_MS", value_name = "MS")]
    pub retention_check_interval_ms: Option<u64>,
    /// Address of the Prometheus endpoint (GET /metrics); `off` or an empty value disables
    /// it [default: 127.0.0.1:9644].
    #[arg(long, env = "SPATE_METRICS_LISTEN", value_name = "HOST:PORT|off")]
    pub metrics_listen: Option<String>,
    /// Most partition replicas one core (shard) may own; CreateTopics, CreatePartitions and
    /// auto-creation beyond it are refused with INVALID_PARTITIONS [default: 4000].
    #[arg(long, env = "SPATE_MAX_PARTITIONS_PER_SHARD", value_name = "N")]
    pub max_partitions_per_shard: Option<usize>,
    /// Memory for requests being read, queued or handled and for unwritten responses, over
    /// all cores (each gets an equal share); when spent, reading from sockets pauses
    /// [default: 536870912].
    #[arg(long, env = "SPATE_REQUEST_MEMORY_BYTES", value_name = "BYTES")]
    pub request_memory_bytes: Option<u64>,
    /// Close a connection with no request in flight that sent nothing for this long (Kafka's
    /// connections.max.idle.ms) [default: 600000].
    #[arg(long, env = "SPATE_CONNECTIONS_MAX_IDLE_MS", value_name = "MS")]
    pub connections_max_idle_ms: Option<u64>,
    /// Close a connection whose request does not fully arrive within this long; time spent
    /// waiting for request memory does not count [default: 30000].
    #[arg(long, env = "SPATE_REQUEST_READ_TIMEOUT_MS", value_name = "MS")]
    pub request_read_timeout_ms: Option<u64>,
    /// Most client connections open at once from one IP address; 0 for no limit [default: 0].
    #[arg(long, env = "SPATE_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    pub max_connections_per_ip: Option<usize>,
    /// With --seeds: address for node-to-node traffic (the rpc port) [default: 127.0.0.1:9192].
    #[arg(long, env = "SPATE_RPC_LISTEN", value_name = "HOST:PORT")]
    pub rpc_listen: Option<String>,
    /// Address other nodes are told to dial for the rpc port, if different from --rpc-listen.
    #[arg(long, env = "SPATE_ADVERTISED_RPC", value_name = "HOST:PORT")]
    pub advertised_rpc: Option<String>,
    /// The cluster's metadata voters, the same list on every node: ID@HOST:PORT,... (rpc
    /// ports). Without it the node is a one-node cluster of itself, as before.
    #[arg(long, env = "SPATE_SEEDS", value_name = "ID@HOST:PORT,...")]
    pub seeds: Option<String>,
    /// Replicas of new topics [default: min(3, brokers in the cluster)].
    #[arg(long, env = "SPATE_DEFAULT_REPLICATION_FACTOR", value_name = "N")]
    pub default_replication_factor: Option<usize>,
    /// With --seeds: the leader balancer moves partition leadership back to preferred replicas
    /// (skipping nodes in maintenance) every --leader-imbalance-check-interval-seconds
    /// [default: true].
    #[arg(long, env = "SPATE_AUTO_LEADER_REBALANCE_ENABLE", value_name = "BOOL")]
    pub auto_leader_rebalance_enable: Option<bool>,
    /// With --seeds: how often the leader balancer runs, in seconds [default: 30].
    #[arg(
        long,
        env = "SPATE_LEADER_IMBALANCE_CHECK_INTERVAL_SECONDS",
        value_name = "SECONDS"
    )]
    pub leader_imbalance_check_interval_seconds: Option<u64>,
    /// With --seeds: bytes per second this node sends to replicas catching up (a replica
    /// joining during a move, a follower far behind), over all its partitions; 0 = unthrottled
    /// (Kafka's leader.replication.throttled.rate) [default: 25000000].
    #[arg(
        long,
        env = "SPATE_REPLICATION_THROTTLE_BYTES_PER_SEC",
        value_name = "BYTES"
    )]
    pub replication_throttle_bytes_per_sec: Option<u64>,
    /// Memory of the log cleaner's key -> offset map over all cores (each gets an equal share,
    /// at least 1 MiB); compacted logs with more keys are cleaned in passes [default:
    /// 134217728].
    #[arg(long, env = "SPATE_CLEANER_DEDUPE_BUFFER_BYTES", value_name = "BYTES")]
    pub cleaner_dedupe_buffer_bytes: Option<u64>,
    /// Disk bytes (read plus written) per second the log cleaner may use over all cores; 0 for
    /// no limit [default: 50000000].
    #[arg(long, env = "SPATE_CLEANER_IO_BYTES_PER_SEC", value_name = "BYTES")]
    pub cleaner_io_bytes_per_sec: Option<u64>,
    /// How often each core's log cleaner looks for compacted partitions dirty enough to clean
    /// [default: 15000].
    #[arg(long, env = "SPATE_CLEANER_BACKOFF_MS", value_name = "MS")]
    pub cleaner_backoff_ms: Option<u64>,
}

/// Every setting of [`ServeConfig`] but `config` itself, once: merging and the defaults use it,
/// so a new setting cannot be forgotten in one of them.
macro_rules! each_setting {
    ($m:ident, $a:expr, $b:expr) => {
        $m!(
            $a,
            $b,
            listen,
            advertised_listener,
            data_dir,
            cores,
            thread_affinity,
            cpuset,
            node_id,
            flush,
            flush_interval_ms,
            flush_interval_bytes,
            default_partitions,
            auto_create_topics,
            retention_ms,
            retention_bytes,
            segment_bytes,
            max_frame_bytes,
            max_connections,
            max_in_flight_per_connection,
            max_batch_bytes,
            max_fetch_wait_ms,
            io_memory_bytes,
            offsets_topic_partitions,
            group_initial_rebalance_delay_ms,
            group_min_session_timeout_ms,
            group_max_session_timeout_ms,
            offsets_retention_ms,
            offsets_topic_replication_factor,
            retention_check_interval_ms,
            metrics_listen,
            max_partitions_per_shard,
            request_memory_bytes,
            connections_max_idle_ms,
            request_read_timeout_ms,
            max_connections_per_ip,
            rpc_listen,
            advertised_rpc,
            seeds,
            default_replication_factor,
            auto_leader_rebalance_enable,
            leader_imbalance_check_interval_seconds,
            replication_throttle_bytes_per_sec,
            cleaner_dedupe_buffer_bytes,
            cleaner_io_bytes_per_sec,
            cleaner_backoff_ms
        )
    };
}

/// Fills each setting of `$into` that is unset from `$from`.
macro_rules! fill_missing {
    ($into:expr, $from:expr, $($f:ident),*) => {
        $( if $into.$f.is_none() { $into.$f = $from.$f.clone(); } )*
    };
}

impl ServeConfig {
    /// Every setting's default, in one place: `resolve` fills from it and `spate config
    /// defaults` prints it. `advertised_listener` has none (it follows `listen`), nor has
    /// `cpuset` (it follows the process's CPU affinity).
    pub fn defaults() -> ServeConfig {
        let groups = BrokerConfig::for_dir(PathBuf::new()).groups;
        ServeConfig {
            config: None,
            listen: Some("127.0.0.1:9092".into()),
            advertised_listener: None,
            cpuset: None,
            data_dir: Some(PathBuf::from("spate-data")),
            cores: Some(std::thread::available_parallelism().map_or(1, |n| n.get())),
            thread_affinity: Some(true),
            node_id: Some(0),
            flush: Some(FlushMode::Always),
            flush_interval_ms: Some(1000),
            flush_interval_bytes: Some(64 << 20),
            default_partitions: Some(1),
            auto_create_topics: Some(true),
            retention_ms: Some(7 * 24 * 3600 * 1000),
            retention_bytes: Some(-1),
            segment_bytes: Some(1 << 30),
            max_frame_bytes: Some(100 << 20),
            max_connections: Some(10_000),
            max_in_flight_per_connection: Some(32),
            max_batch_bytes: Some(spate_net::config::DEFAULT_MAX_BATCH_BYTES),
            max_fetch_wait_ms: Some(30_000),
            io_memory_bytes: Some(0),
            offsets_topic_partitions: Some(groups.offsets_topic_partitions),
            group_initial_rebalance_delay_ms: Some(groups.initial_rebalance_delay_ms),
            group_min_session_timeout_ms: Some(groups.min_session_timeout_ms),
            group_max_session_timeout_ms: Some(groups.max_session_timeout_ms),
            offsets_retention_ms: Some(groups.offsets_retention_ms),
            offsets_topic_replication_factor: Some(groups.offsets_topic_replication_factor),
            retention_check_interval_ms: Some(300_000),
            metrics_listen: Some(DEFAULT_METRICS_LISTEN.into()),
            max_partitions_per_shard: Some(spate_net::config::DEFAULT_MAX_PARTITIONS_PER_SHARD),
            request_memory_bytes: Some(spate_net::config::DEFAULT_REQUEST_MEMORY_BYTES as u64),
            connections_max_idle_ms: Some(spate_net::config::DEFAULT_CONNECTIONS_MAX_IDLE_MS),
            request_read_timeout_ms: Some(spate_net::config::DEFAULT_REQUEST_READ_TIMEOUT_MS),
            max_connections_per_ip: Some(0),
            rpc_listen: Some(crate::cluster::DEFAULT_RPC_LISTEN.into()),
            advertised_rpc: None,
            seeds: None,
            default_replication_factor: None,
            auto_leader_rebalance_enable: Some(true),
            leader_imbalance_check_interval_seconds: Some(
                spate_replication::controller::active::DEFAULT_LEADER_BALANCE_INTERVAL_MS / 1000,
            ),
            replication_throttle_bytes_per_sec: Some(
                spate_replication::cluster::throttle::DEFAULT_REPLICATION_THROTTLE_BYTES_PER_SEC,
            ),
            cleaner_dedupe_buffer_bytes: Some(
                spate_net::config::DEFAULT_CLEANER_DEDUPE_BUFFER_BYTES as u64,
            ),
            cleaner_io_bytes_per_sec: Some(spate_net::config::DEFAULT_CLEANER_IO_BYTES_PER_SEC),
            cleaner_backoff_ms: Some(spate_net::config::DEFAULT_CLEANER_BACKOFF_MS),
        }
    }

    /// The defaults as a commented TOML file that `--config` accepts as it is.
    pub fn defaults_toml() -> String {
        use clap::Args as _;
        let values = toml::Table::try_from(Self::defaults()).expect("defaults serialize");
        let cmd = ServeConfig::augment_args(clap::Command::new("serve"));
        let mut out = String::from(
            "# spate serve: every setting with its default. Precedence: command-line flag, then\n\
             # the SPATE_<NAME> environment variable, then this file (--config), then the default.\n",
        );
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "config" {
                continue;
            }
            let key = id.replace('_', "-");
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let help = match help.find(" [default") {
                Some(i) => help[..i].to_string(),
                None => help,
            };
            out.push('\n');
            for line in help.lines() {
                out.push_str(&format!("# {line}\n"));
            }
            out.push_str(&format!("# env: SPATE_{}\n", id.to_uppercase()));
            match values.get(&key) {
                Some(v) => out.push_str(&format!("{key} = {v}\n")),
                None => out.push_str(&format!("# {key} = (unset)\n")),
            }
        }
        out
    }

    /// Fills settings missing on the command line from the `--config` file, if any.
    pub fn with_file(mut self) -> anyhow::Result<ServeConfig> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let file: ServeConfig = toml::from_str(&text)
            .with_context(|| format!("parsing config file {}", path.display()))?;
        each_setting!(fill_missing, self, file);
        Ok(self)
    }

    /// Resolves defaults and checks every value.
    pub fn resolve(&self) -> anyhow::Result<BrokerConfig> {
        let mut filled = self.clone();
        each_setting!(fill_missing, filled, Self::defaults());
        filled.check_filled()
    }

    /// Converts and checks a configuration whose every defaulted setting is present.
    fn check_filled(&self) -> anyhow::Result<BrokerConfig> {
        // Present by construction: `resolve` filled them from `defaults()`.
        fn set<T: Clone>(v: &Option<T>) -> T {
            v.clone().expect("filled from ServeConfig::defaults")
        }
        let listen_text = set(&self.listen);
        let listen: SocketAddr = listen_text
            .to_socket_addrs()
            .with_context(|| format!("--listen {listen_text}"))?
            .next()
            .with_context(|| format!("--listen {listen_text} resolves to nothing"))?;
        let (advertised_host, advertised_port) = match &self.advertised_listener {
            Some(a) => {
                let (host, port) = a
                    .rsplit_once(':')
                    .with_context(|| format!("--advertised-listener {a}: expected HOST:PORT"))?;
                let port: u16 = port
                    .parse()
                    .with_context(|| format!("--advertised-listener {a}: bad port"))?;
                (host.trim_matches(['[', ']']).to_string(), port)
            }
            None => (listen.ip().to_string(), listen.port()),
        };
        let cores = set(&self.cores);
        if cores == 0 {
            bail!("--cores must be at least 1");
        }
        let flush = match set(&self.flush) {
            FlushMode::Always => FlushPolicy::Always,
            FlushMode::Never => FlushPolicy::Never,
            FlushMode::Interval => FlushPolicy::Interval {
                interval_ms: set(&self.flush_interval_ms),
                interval_bytes: set(&self.flush_interval_bytes),
            },
        };
        let default_partitions = set(&self.default_partitions);
        if default_partitions < 1 {
            bail!("--default-partitions must be at least 1");
        }
        // Kafka's convention: a negative retention means no limit.
        let non_negative = |v: i64| (v >= 0).then_some(v as u64);
        // Absolute from here on: glommio opens directories by path from its own threads, and a
        // relative one failed every partition with data at the next start ("Bad file
        // descriptor" opening its directory).
        let data_dir = set(&self.data_dir);
        let data_dir = std::path::absolute(&data_dir)
            .with_context(|| format!("--data-dir {}: not a usable path", data_dir.display()))?;
        let mut c = BrokerConfig::for_dir(data_dir);
        c.listen = listen;
        c.advertised_host = advertised_host;
        c.advertised_port = advertised_port;
        c.cores = cores;
        c.pin_shards = set(&self.thread_affinity);
        c.cpuset = match &self.cpuset {
            Some(list) => Some(parse_cpuset(list).with_context(|| format!("--cpuset {list:?}"))?),
            None => None,
        };
        c.node_id = set(&self.node_id);
        c.flush = flush;
        c.default_partitions = default_partitions;
        c.auto_create_topics = set(&self.auto_create_topics);
        c.retention_ms = non_negative(set(&self.retention_ms));
        c.retention_bytes = non_negative(set(&self.retention_bytes));
        c.segment_bytes = set(&self.segment_bytes);
        c.max_frame_bytes = set(&self.max_frame_bytes);
        c.max_connections = set(&self.max_connections);
        c.max_in_flight_per_connection = set(&self.max_in_flight_per_connection);
        c.max_batch_bytes = set(&self.max_batch_bytes);
        c.max_fetch_wait_ms = set(&self.max_fetch_wait_ms);
        c.io_memory_bytes = match set(&self.io_memory_bytes) {
            0 => auto_io_memory_bytes(
                cores,
                crate::check::read_limit("Max locked memory").map(|(soft, _)| soft),
            ),
            n => usize::try_from(n).context("--io-memory-bytes is too large")?,
        };
        let g = &mut c.groups;
        g.offsets_topic_partitions = set(&self.offsets_topic_partitions);
        g.initial_rebalance_delay_ms = set(&self.group_initial_rebalance_delay_ms);
        g.min_session_timeout_ms = set(&self.group_min_session_timeout_ms);
        g.max_session_timeout_ms = set(&self.group_max_session_timeout_ms);
        g.offsets_retention_ms = set(&self.offsets_retention_ms);
        g.offsets_topic_replication_factor = set(&self.offsets_topic_replication_factor);
        if let Err(e) = g.validate() {
            bail!("consumer groups: {e}");
        }
        c.retention_check_interval_ms = set(&self.retention_check_interval_ms);
        if c.retention_check_interval_ms == 0 {
            bail!("--retention-check-interval-ms must be at least 1");
        }
        c.metrics_listen = metrics_listen(&set(&self.metrics_listen))?;
        c.max_partitions_per_shard = set(&self.max_partitions_per_shard);
        if c.max_partitions_per_shard == 0 {
            bail!("--max-partitions-per-shard must be at least 1");
        }
        if c.max_in_flight_per_connection == 0 || c.max_connections == 0 {
            bail!("--max-in-flight-per-connection and --max-connections must be at least 1");
        }
        if c.max_frame_bytes < 1024 || c.max_frame_bytes > i32::MAX as usize {
            bail!("--max-frame-bytes must be between 1024 and {}", i32::MAX);
        }
        if c.max_batch_bytes as usize > c.max_frame_bytes {
            bail!("--max-batch-bytes cannot exceed --max-frame-bytes");
        }
        if c.segment_bytes < c.max_batch_bytes as u64 {
            bail!("--segment-bytes must be at least --max-batch-bytes");
        }
        c.request_memory_bytes = usize::try_from(set(&self.request_memory_bytes))
            .context("--request-memory-bytes is too large")?;
        let min_request_memory = spate_net::budget::MIN_SHARD_BUDGET_BYTES * cores;
        if c.request_memory_bytes < min_request_memory {
            bail!("--request-memory-bytes must be at least {min_request_memory} ({cores} cores)");
        }
        c.connections_max_idle_ms = set(&self.connections_max_idle_ms);
        c.request_read_timeout_ms = set(&self.request_read_timeout_ms);
        if c.connections_max_idle_ms == 0 || c.request_read_timeout_ms == 0 {
            bail!("--connections-max-idle-ms and --request-read-timeout-ms must be at least 1");
        }
        c.max_connections_per_ip = match set(&self.max_connections_per_ip) {
            0 => None,
            n => Some(n),
        };
        c.cleaner_dedupe_buffer_bytes = usize::try_from(set(&self.cleaner_dedupe_buffer_bytes))
            .context("--cleaner-dedupe-buffer-bytes is too large")?;
        if c.cleaner_dedupe_buffer_bytes == 0 {
            bail!("--cleaner-dedupe-buffer-bytes must be at least 1");
        }
        c.cleaner_io_bytes_per_sec = match set(&self.cleaner_io_bytes_per_sec) {
            0 => None,
            n => Some(n),
        };
        c.cleaner_backoff_ms = set(&self.cleaner_backoff_ms);
        if c.cleaner_backoff_ms == 0 {
            bail!("--cleaner-backoff-ms must be at least 1");
        }
        c.test_high_watermark_cap = test_high_watermark_cap()?;
        Ok(c)
    }
}

/// Test hook, deliberately not a setting: holds every partition's high watermark at or below
/// this offset, as lagging followers would (tests/high_watermark.rs).
pub const TEST_HIGH_WATERMARK_CAP_ENV: &str = "SPATE_TEST_HIGH_WATERMARK_CAP";

fn test_high_watermark_cap() -> anyhow::Result<Option<u64>> {
    match std::env::var(TEST_HIGH_WATERMARK_CAP_ENV) {
        Ok(v) => v
            .parse()
            .map(Some)
            .with_context(|| format!("{TEST_HIGH_WATERMARK_CAP_ENV}={v} is not an offset")),
        Err(_) => Ok(None),
    }
}

/// Where `spate serve` serves metrics unless told otherwise (Redpanda's metrics port).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9644";

/// `--metrics-listen`: an address, or `off` / empty for no endpoint.
fn metrics_listen(text: &str) -> anyhow::Result<Option<SocketAddr>> {
    let text = text.trim();
    if text.is_empty() || text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let addr = text
        .to_socket_addrs()
        .with_context(|| format!("--metrics-listen {text}: expected HOST:PORT or off"))?
        .next()
        .with_context(|| format!("--metrics-listen {text} resolves to nothing"))?;
    Ok(Some(addr))
}

/// Registered buffer memory per core when locked memory is unlimited.
pub const IO_MEMORY_AUTO_MAX_BYTES: usize = 64 << 20;
/// Registered buffer memory per core when the locked-memory limit is unknown.
pub const IO_MEMORY_FALLBACK_BYTES: usize = 2 << 20;
/// glommio registers a core's buffer memory with each of its three io_uring rings, and each
/// registration counts against the locked-memory limit.
const IO_MEMORY_REGISTRATIONS: u64 = 3;

/// `io-memory-bytes = 0`: half the locked-memory limit (the rest is left for the rings and
/// anything else the process locks), shared by the cores, between
/// [`IO_MEMORY_FALLBACK_BYTES`] and [`IO_MEMORY_AUTO_MAX_BYTES`]. Below the fallback, glommio
/// registers what it can (a shard whose registration fails uses the same memory unregistered),
/// as before this setting existed. `memlock`: `None` if unknown, `Some(None)` if unlimited.
pub fn auto_io_memory_bytes(cores: usize, memlock: Option<Option<u64>>) -> usize {
    const GRANULE: u64 = 1 << 20;
    match memlock {
        None => IO_MEMORY_FALLBACK_BYTES,
        Some(None) => IO_MEMORY_AUTO_MAX_BYTES,
        Some(Some(limit)) => {
            let per_core = limit / 2 / (IO_MEMORY_REGISTRATIONS * cores.max(1) as u64);
            let per_core = (per_core / GRANULE * GRANULE) as usize;
            per_core.clamp(IO_MEMORY_FALLBACK_BYTES, IO_MEMORY_AUTO_MAX_BYTES)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_memory_follows_the_locked_memory_limit() {
        // Unknown limit: the old fixed size; unlimited: the cap.
        assert_eq!(auto_io_memory_bytes(2, None), IO_MEMORY_FALLBACK_BYTES);
        assert_eq!(
            auto_io_memory_bytes(2, Some(None)),
            IO_MEMORY_AUTO_MAX_BYTES
        );
        // A common 8 MiB limit is below what registration needs: never less than before.
        assert_eq!(
            auto_io_memory_bytes(2, Some(Some(8 << 20))),
            IO_MEMORY_FALLBACK_BYTES
        );
        // 1 GiB over 4 cores: half, over 3 registrations per core, in whole MiB.
        assert_eq!(auto_io_memory_bytes(4, Some(Some(1 << 30))), 42 << 20);
        assert_eq!(
            auto_io_memory_bytes(1, Some(Some(1 << 40))),
            IO_MEMORY_AUTO_MAX_BYTES
        );
    }

    #[test]
    fn file_values_fill_in_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spate.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:7000\"\ncores = 2\nflush = \"never\"\nretention-ms = -1\n",
        )
        .unwrap();
        let cli = ServeConfig {
            config: Some(path),
            cores: Some(1),
            ..ServeConfig::default()
        };
        let c = cli.with_file().unwrap().resolve().unwrap();
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.cores, 1);
        assert_eq!(c.flush, FlushPolicy::Never);
        assert_eq!(c.retention_ms, None);
    }

    #[test]
    fn a_relative_data_dir_is_made_absolute() {
        let c = ServeConfig::default().resolve().unwrap();
        assert!(c.data_dir.is_absolute(), "{}", c.data_dir.display());
        assert_eq!(
            c.data_dir,
            std::env::current_dir().unwrap().join("spate-data")
        );
    }

    #[test]
    fn shards_are_pinned_unless_thread_affinity_is_off() {
        assert!(ServeConfig::default().resolve().unwrap().pin_shards);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spate.toml");
        std::fs::write(&path, "thread-affinity = false\n").unwrap();
        let cli = ServeConfig {
            config: Some(path),
            ..ServeConfig::default()
        };
        assert!(!cli.with_file().unwrap().resolve().unwrap().pin_shards);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spate.toml");
        std::fs::write(&path, "colors = 3\n").unwrap();
        let cli = ServeConfig {
            config: Some(path),
            ..ServeConfig::default()
        };
        assert!(cli.with_file().is_err());
        let cli = ServeConfig {
            cores: Some(0),
            ..ServeConfig::default()
        };
        assert!(cli.resolve().is_err());
    }

    #[test]
    fn printed_defaults_parse_back_to_the_defaults() {
        let text = ServeConfig::defaults_toml();
        let parsed: ServeConfig = toml::from_str(&text).expect("defaults file parses");
        let from_file = parsed.resolve().unwrap();
        let from_nothing = ServeConfig::default().resolve().unwrap();
        assert_eq!(format!("{from_file:?}"), format!("{from_nothing:?}"));
        // Every setting is in the file, each with its environment variable.
        let cmd = <ServeConfig as clap::Args>::augment_args(clap::Command::new("serve"));
        for arg in cmd.get_arguments().filter(|a| a.get_id() != "config") {
            let key = arg.get_id().as_str().replace('_', "-");
            assert!(text.contains(&format!("{key} = ")), "{key} missing");
            let env = format!("SPATE_{}", arg.get_id().as_str().to_uppercase());
            assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(env.as_str()));
        }
    }

    #[test]
    fn metrics_listen_is_an_address_or_off() {
        let with = |v: &str| {
            ServeConfig {
                metrics_listen: Some(v.into()),
                ..ServeConfig::default()
            }
            .resolve()
        };
        let default = ServeConfig::default().resolve().unwrap();
        assert_eq!(
            default.metrics_listen,
            Some(DEFAULT_METRICS_LISTEN.parse().unwrap())
        );
        assert_eq!(with("off").unwrap().metrics_listen, None);
        assert_eq!(with("").unwrap().metrics_listen, None);
        assert_eq!(
            with("127.0.0.1:0").unwrap().metrics_listen,
            Some("127.0.0.1:0".parse().unwrap())
        );
        let err = format!("{:#}", with("nonsense").unwrap_err());
        assert!(err.contains("--metrics-listen"), "{err}");
    }

    #[test]
    fn every_setting_is_taken_from_the_file() {
        // A key the merge forgot would silently keep its default.
        let defaults = toml::Table::try_from(ServeConfig::defaults()).unwrap();
        let mut file = toml::Table::new();
        file.insert("retention-check-interval-ms".into(), 1234.into());
        file.insert("max-connections".into(), 77.into());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spate.toml");
        std::fs::write(&path, toml::to_string(&file).unwrap()).unwrap();
        let cli = ServeConfig {
            config: Some(path),
            ..ServeConfig::default()
        };
        let c = cli.with_file().unwrap().resolve().unwrap();
        assert_eq!(c.retention_check_interval_ms, 1234);
        assert_eq!(c.max_connections, 77);
        assert!(defaults.len() >= 23, "defaults cover the settings");
    }
}
