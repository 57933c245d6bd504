//! What the broker needs to know at start. The `spate` binary builds this from its CLI/TOML
//! configuration; every limit carries its unit in its name.

use std::net::SocketAddr;
use std::path::PathBuf;

use spate_replication::partition::{FlushPolicy, LogConfig};

/// Room for 3,000 partitions of replication factor 3 on three single-core nodes (3,000 a
/// shard) with a third to spare. It also bounds a Metadata response for every topic: about
/// 30 bytes a partition, 120 KB a shard at this limit.
pub const DEFAULT_MAX_PARTITIONS_PER_SHARD: usize = 4_000;

#[derive(Clone, Debug)]
pub struct BrokerConfig {
    pub listen: SocketAddr,
    /// Host and port clients are told to connect to (Metadata, FindCoordinator).
    pub advertised_host: String,
    pub advertised_port: u16,
    pub data_dir: PathBuf,
    pub cores: usize,
    /// Each shard's executor pinned to one CPU (shard N on the Nth of the shard CPUs, modulo
    /// their number); otherwise the kernel places them.
    pub pin_shards: bool,
    /// The CPUs for the shards (`--cpuset`), the whole process kept on them; `None`: the CPUs
    /// the process may run on.
    pub cpuset: Option<Vec<usize>>,
    pub node_id: i32,
    pub flush: FlushPolicy,
    pub default_partitions: i32,
    pub auto_create_topics: bool,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub segment_bytes: u64,
    pub max_frame_bytes: usize,
    pub max_connections: usize,
    pub max_in_flight_per_connection: usize,
    pub max_batch_bytes: u32,
    /// Upper bound on a Fetch's max_wait_ms, so a hostile request cannot park a task for days.
    pub max_fetch_wait_ms: u64,
    /// Upper bound on partitions in one topic.
    pub max_partitions_per_topic: i32,
    /// Registered io_uring buffer memory per shard (memlock is small on many hosts).
    pub io_memory_bytes: usize,
    /// Consumer group coordinator settings (sessions, rebalances, offsets topic, retention).
    pub groups: crate::group::GroupConfig,
    /// How often each shard applies retention to its partitions.
    pub retention_check_interval_ms: u64,
    /// Where to serve Prometheus metrics (`GET /metrics`); `None` disables the endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Upper bound on partition replicas one shard owns; creates beyond it are refused.
    pub max_partitions_per_shard: usize,
    /// Request memory budget of the whole broker, split evenly across the shards (see
    /// `budget`): bytes of requests being read, queued or handled, and of unwritten responses.
    pub request_memory_bytes: usize,
    /// A connection with nothing in flight that sends nothing for this long is closed
    /// (Kafka's `connections.max.idle.ms`).
    pub connections_max_idle_ms: u64,
    /// A request whose bytes do not all arrive within this long closes its connection; time
    /// spent waiting for request memory does not count.
    pub request_read_timeout_ms: u64,
    /// Most connections open at once from one client address; `None` for no limit.
    pub max_connections_per_ip: Option<usize>,
    /// Test hook: no partition's high watermark passes this offset (as if followers lagged);
    /// `None` (always, outside tests) lets it follow the log end.
    pub test_high_watermark_cap: Option<u64>,
    /// In a cluster (`--seeds`): the handle on the controller: its applied view (brokers,
    /// topics, partitions, leaders) for Metadata, DescribeCluster, DescribeQuorum and the
    /// leader checks, and the calls admin requests and InitProducerId make. `None`: a one-node
    /// cluster of this broker.
    pub cluster: Option<spate_replication::cluster::ClusterPort>,
    /// Memory of the log cleaner's key -> offset map, over all shards (each gets an equal
    /// share); a log with more keys than fit is cleaned in passes.
    pub cleaner_dedupe_buffer_bytes: usize,
    /// Disk bytes (read plus written) per second the log cleaner may use, over all shards;
    /// `None` for no limit (default [`DEFAULT_CLEANER_IO_BYTES_PER_SEC`]).
    pub cleaner_io_bytes_per_sec: Option<u64>,
    /// How often each shard's cleaner looks for compacted logs to clean.
    pub cleaner_backoff_ms: u64,
}

/// Default `cleaner_dedupe_buffer_bytes` (Kafka's `log.cleaner.dedupe.buffer.size`), the
/// engine's.
pub const DEFAULT_CLEANER_DEDUPE_BUFFER_BYTES: usize =
    spate_replication::partition::DEFAULT_DEDUPE_BUFFER_BYTES;
/// Default `cleaner_backoff_ms` (Kafka's `log.cleaner.backoff.ms`).
pub const DEFAULT_CLEANER_BACKOFF_MS: u64 = 15_000;
/// Default `cleaner_io_bytes_per_sec`, over all shards. Kafka leaves its cleaner unthrottled;
/// measured here (docs/benchmarks.md, "Log cleaner"), an unthrottled cleaner raised a
/// producer's p99 many times over on a loaded machine even when paced by time, and at 50 MB/s
/// it stayed within 1.5x. 50 MB/s still cleans a compacted topic written at 20 MB/s or more
/// (the cleaner reads the dirty part twice), far above what changelog topics and
/// `__consumer_offsets` take; bigger brokers raise it.
pub const DEFAULT_CLEANER_IO_BYTES_PER_SEC: u64 = 50_000_000;
/// Smallest share of the dedupe buffer a shard's cleaner gets.
pub const MIN_SHARD_DEDUPE_BUFFER_BYTES: usize = 1 << 20;

/// The shipped `max_batch_bytes`, defined once in the engine.
pub const DEFAULT_MAX_BATCH_BYTES: u32 = spate_replication::partition::DEFAULT_MAX_BATCH_BYTES;

/// Default `request_memory_bytes`: with 100 MiB frames, a few large requests per shard on a
/// small machine; well under the RAM of any host that runs many shards.
pub const DEFAULT_REQUEST_MEMORY_BYTES: usize = 512 << 20;
/// Kafka's default `connections.max.idle.ms`, 10 minutes.
pub const DEFAULT_CONNECTIONS_MAX_IDLE_MS: u64 = 600_000;
/// Default `request_read_timeout_ms`: a client on a slow link still sends a 100 MiB frame at
/// 4 MB/s in time, while a stalled one holds its request memory for at most this long.
pub const DEFAULT_REQUEST_READ_TIMEOUT_MS: u64 = 30_000;

impl BrokerConfig {
    /// A configuration for tests and defaults: everything on loopback, one core.
    pub fn for_dir(data_dir: PathBuf) -> Self {
        BrokerConfig {
            listen: "127.0.0.1:9092".parse().expect("valid literal"),
            advertised_host: "127.0.0.1".into(),
            advertised_port: 9092,
            data_dir,
            cores: 1,
            pin_shards: true,
            cpuset: None,
            node_id: 0,
            flush: FlushPolicy::Always,
            default_partitions: 1,
            auto_create_topics: true,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            retention_bytes: None,
            segment_bytes: 1 << 30,
            max_frame_bytes: 100 << 20,
            max_connections: 10_000,
            max_in_flight_per_connection: 32,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_fetch_wait_ms: 30_000,
            max_partitions_per_topic: 10_000,
            io_memory_bytes: 2 << 20,
            groups: crate::group::GroupConfig::default(),
            retention_check_interval_ms: 300_000,
            metrics_listen: None,
            max_partitions_per_shard: DEFAULT_MAX_PARTITIONS_PER_SHARD,
            request_memory_bytes: DEFAULT_REQUEST_MEMORY_BYTES,
            connections_max_idle_ms: DEFAULT_CONNECTIONS_MAX_IDLE_MS,
            request_read_timeout_ms: DEFAULT_REQUEST_READ_TIMEOUT_MS,
            max_connections_per_ip: None,
            test_high_watermark_cap: None,
            cluster: None,
            cleaner_dedupe_buffer_bytes: DEFAULT_CLEANER_DEDUPE_BUFFER_BYTES,
            cleaner_io_bytes_per_sec: Some(DEFAULT_CLEANER_IO_BYTES_PER_SEC),
            cleaner_backoff_ms: DEFAULT_CLEANER_BACKOFF_MS,
        }
    }

    /// Each shard's share of `request_memory_bytes`.
    pub fn shard_request_memory_bytes(&self) -> usize {
        (self.request_memory_bytes / self.cores.max(1)).max(crate::budget::MIN_SHARD_BUDGET_BYTES)
    }

    /// Each shard's log cleaner settings: its share of the memory and I/O limits.
    pub fn shard_cleaner_config(&self) -> spate_replication::partition::CleanerConfig {
        let cores = self.cores.max(1);
        spate_replication::partition::CleanerConfig {
            dedupe_buffer_bytes: (self.cleaner_dedupe_buffer_bytes / cores)
                .max(MIN_SHARD_DEDUPE_BUFFER_BYTES),
            io_bytes_per_sec: self
                .cleaner_io_bytes_per_sec
                .map(|b| (b / cores as u64).max(1)),
            ..spate_replication::partition::CleanerConfig::default()
        }
    }

    pub fn log_config(&self) -> LogConfig {
        LogConfig {
            segment_bytes: self.segment_bytes,
            max_batch_bytes: self.max_batch_bytes,
            retention_bytes: self.retention_bytes,
            retention_ms: self.retention_ms,
            flush: self.flush,
            ..LogConfig::default()
        }
    }
}
