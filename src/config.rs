//! The `spate serve` configuration: one struct read from the command line and, with
//! `--config FILE`, from TOML with the same keys (kebab-case). Command-line values win over the
//! file, the file over the defaults. Every limit carries its unit in its name.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde::Deserialize;
use spate_engine::FlushPolicy;
use spate_net::BrokerConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlushMode {
    /// Every acknowledged write is on disk (group-committed fdatasync before the reply).
    Always,
    /// fdatasync every --flush-interval-ms or --flush-interval-bytes, whichever comes first.
    Interval,
    /// Leave flushing to the OS (data survives a process crash, not a power loss).
    Never,
}

#[derive(Clone, Debug, Default, Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServeConfig {
    /// TOML file with any of these settings (same names as the flags, without the dashes in
    /// front); flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to accept Kafka clients on [default: 127.0.0.1:9092].
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Address clients are told to connect to, if different from --listen.
    #[arg(long, value_name = "HOST:PORT")]
    pub advertised_listener: Option<String>,
    /// Directory holding the partition logs and metadata [default: ./spate-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Number of cores (shards) to run on, one pinned executor each [default: all cores].
    #[arg(long, value_name = "N")]
    pub cores: Option<usize>,
    /// This broker's node id in Metadata responses [default: 0].
    #[arg(long, value_name = "N")]
    pub node_id: Option<i32>,
    /// When appended data is made durable [default: always].
    #[arg(long, value_enum)]
    pub flush: Option<FlushMode>,
    /// With --flush interval: longest time between fdatasyncs [default: 1000].
    #[arg(long, value_name = "MS")]
    pub flush_interval_ms: Option<u64>,
    /// With --flush interval: most bytes appended between fdatasyncs [default: 67108864].
    #[arg(long, value_name = "BYTES")]
    pub flush_interval_bytes: Option<u64>,
    /// Partitions of topics created without a count (auto-created ones too) [default: 1].
    #[arg(long, value_name = "N")]
    pub default_partitions: Option<i32>,
    /// Create unknown topics when a client asks for their metadata [default: true].
    #[arg(long, value_name = "BOOL")]
    pub auto_create_topics: Option<bool>,
    /// Delete log segments older than this; -1 keeps them forever [default: 604800000 (7 days)].
    #[arg(long, value_name = "MS", allow_negative_numbers = true)]
    pub retention_ms: Option<i64>,
    /// Delete the oldest segments while a partition is larger than this; -1 for no limit
    /// [default: -1].
    #[arg(long, value_name = "BYTES", allow_negative_numbers = true)]
    pub retention_bytes: Option<i64>,
    /// Roll to a new log segment at this size [default: 1073741824].
    #[arg(long, value_name = "BYTES")]
    pub segment_bytes: Option<u64>,
    /// Largest request frame accepted; larger ones close the connection [default: 104857600].
    #[arg(long, value_name = "BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Most client connections open at once, over all cores [default: 10000].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Requests of one connection processed concurrently before reading pauses [default: 32].
    #[arg(long, value_name = "N")]
    pub max_in_flight_per_connection: Option<usize>,
    /// Largest record batch accepted (Kafka's message.max.bytes) [default: 8388608].
    #[arg(long, value_name = "BYTES")]
    pub max_batch_bytes: Option<u32>,
    /// Upper bound on how long a Fetch may wait for data [default: 30000].
    #[arg(long, value_name = "MS")]
    pub max_fetch_wait_ms: Option<u64>,
    /// Partitions of the internal __consumer_offsets topic; never change it once groups
    /// exist [default: 8].
    #[arg(long, value_name = "N")]
    pub offsets_topic_partitions: Option<i32>,
    /// How long the first rebalance of a new group waits for more members [default: 3000].
    #[arg(long, value_name = "MS")]
    pub group_initial_rebalance_delay_ms: Option<i64>,
    /// Smallest session timeout a group member may ask for [default: 6000].
    #[arg(long, value_name = "MS")]
    pub group_min_session_timeout_ms: Option<i32>,
    /// Largest session timeout a group member may ask for [default: 1800000].
    #[arg(long, value_name = "MS")]
    pub group_max_session_timeout_ms: Option<i32>,
    /// How long committed offsets of an empty group are kept [default: 604800000, 7 days].
    #[arg(long, value_name = "MS")]
    pub offsets_retention_ms: Option<i64>,
    /// How often old segments are checked against the retention limits [default: 300000].
    #[arg(long, value_name = "MS")]
    pub retention_check_interval_ms: Option<u64>,
}

macro_rules! merge {
    ($cli:ident, $file:ident, $($f:ident),*) => {
        $( if $cli.$f.is_none() { $cli.$f = $file.$f.clone(); } )*
    };
}

impl ServeConfig {
    /// Fills settings missing on the command line from the `--config` file, if any.
    pub fn with_file(mut self) -> anyhow::Result<ServeConfig> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let file: ServeConfig = toml::from_str(&text)
            .with_context(|| format!("parsing config file {}", path.display()))?;
        merge!(
            self,
            file,
            listen,
            advertised_listener,
            data_dir,
            cores,
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
            offsets_topic_partitions,
            group_initial_rebalance_delay_ms,
            group_min_session_timeout_ms,
            group_max_session_timeout_ms,
            offsets_retention_ms,
            retention_check_interval_ms
        );
        Ok(self)
    }

    /// Resolves defaults and checks every value.
    pub fn resolve(&self) -> anyhow::Result<BrokerConfig> {
        let listen_text = self.listen.as_deref().unwrap_or("127.0.0.1:9092");
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
        let cores = match self.cores {
            Some(0) => bail!("--cores must be at least 1"),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let flush = match self.flush.unwrap_or(FlushMode::Always) {
            FlushMode::Always => FlushPolicy::Always,
            FlushMode::Never => FlushPolicy::Never,
            FlushMode::Interval => FlushPolicy::Interval {
                interval_ms: self.flush_interval_ms.unwrap_or(1000),
                interval_bytes: self.flush_interval_bytes.unwrap_or(64 << 20),
            },
        };
        let default_partitions = self.default_partitions.unwrap_or(1);
        if default_partitions < 1 {
            bail!("--default-partitions must be at least 1");
        }
        let non_negative = |v: Option<i64>, default: Option<u64>| match v {
            None => default,
            Some(v) if v < 0 => None,
            Some(v) => Some(v as u64),
        };
        let mut c = BrokerConfig::for_dir(
            self.data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("spate-data")),
        );
        c.listen = listen;
        c.advertised_host = advertised_host;
        c.advertised_port = advertised_port;
        c.cores = cores;
        c.node_id = self.node_id.unwrap_or(0);
        c.flush = flush;
        c.default_partitions = default_partitions;
        c.auto_create_topics = self.auto_create_topics.unwrap_or(true);
        c.retention_ms = non_negative(self.retention_ms, Some(7 * 24 * 3600 * 1000));
        c.retention_bytes = non_negative(self.retention_bytes, None);
        c.segment_bytes = self.segment_bytes.unwrap_or(1 << 30);
        c.max_frame_bytes = self.max_frame_bytes.unwrap_or(100 << 20);
        c.max_connections = self.max_connections.unwrap_or(10_000);
        c.max_in_flight_per_connection = self.max_in_flight_per_connection.unwrap_or(32);
        c.max_batch_bytes = self.max_batch_bytes.unwrap_or(8 << 20);
        c.max_fetch_wait_ms = self.max_fetch_wait_ms.unwrap_or(30_000);
        let g = &mut c.groups;
        g.offsets_topic_partitions = self
            .offsets_topic_partitions
            .unwrap_or(g.offsets_topic_partitions);
        g.initial_rebalance_delay_ms = self
            .group_initial_rebalance_delay_ms
            .unwrap_or(g.initial_rebalance_delay_ms);
        g.min_session_timeout_ms = self
            .group_min_session_timeout_ms
            .unwrap_or(g.min_session_timeout_ms);
        g.max_session_timeout_ms = self
            .group_max_session_timeout_ms
            .unwrap_or(g.max_session_timeout_ms);
        g.offsets_retention_ms = self.offsets_retention_ms.unwrap_or(g.offsets_retention_ms);
        if let Err(e) = g.validate() {
            bail!("consumer groups: {e}");
        }
        c.retention_check_interval_ms = self.retention_check_interval_ms.unwrap_or(300_000);
        if c.retention_check_interval_ms == 0 {
            bail!("--retention-check-interval-ms must be at least 1");
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
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
