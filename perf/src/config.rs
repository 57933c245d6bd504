//! Command line: the options of a run, their limits, and their validation.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kafka_protocol::records::Compression;
use serde::Serialize;

use crate::batch::{MAX_BATCH_BYTES, STAMP_BYTES};
use crate::cluster::MAX_PARTITIONS;
use crate::error::{PerfError, Result};

/// Largest record value spate-perf sends.
pub const MAX_RECORD_BYTES: usize = 16 << 20;
/// Most connections one run opens.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most requests in flight on one connection.
pub const MAX_IN_FLIGHT: usize = 1024;
/// Largest fetch reply requested (and accepted, plus framing slack).
pub const MAX_FETCH_BYTES: usize = 256 << 20;
/// Longest run.
pub const MAX_DURATION_SECS: u64 = 24 * 3600;

#[derive(Debug, Parser)]
#[command(
    name = "spate-perf",
    version,
    about = "Load generator and latency benchmark for Kafka-compatible brokers"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Produce as fast as possible (or at --rate) and time each produce request's ack.
    Produce(RunArgs),
    /// Fetch the topic's records (from --from up to its end at start) and time each fetch.
    Consume(RunArgs),
    /// Produce and consume at once; latency from each batch's (intended) send to its receipt.
    E2e(RunArgs),
    /// Draw the latency-percentile curves of runs saved with --json on one chart.
    Plot(PlotArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionArg {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl CompressionArg {
    pub fn codec(self) -> Compression {
        match self {
            CompressionArg::None => Compression::None,
            CompressionArg::Gzip => Compression::Gzip,
            CompressionArg::Snappy => Compression::Snappy,
            CompressionArg::Lz4 => Compression::Lz4,
            CompressionArg::Zstd => Compression::Zstd,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    Earliest,
    Latest,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct RunArgs {
    /// Brokers to bootstrap from, comma-separated host:port.
    #[arg(short, long, value_delimiter = ',', default_value = "127.0.0.1:9092")]
    pub bootstrap_servers: Vec<String>,
    /// Topic to use; created with --partitions partitions if missing.
    #[arg(short, long, default_value = "spate-perf")]
    pub topic: String,
    /// Partitions of the topic when spate-perf creates it.
    #[arg(short, long, default_value_t = 1)]
    pub partitions: i32,
    /// Replication factor when spate-perf creates the topic.
    #[arg(long, default_value_t = 1)]
    pub replication_factor: i16,
    /// TCP connections (each with its own sender and receiver thread).
    #[arg(short, long, default_value_t = 1)]
    pub connections: usize,
    /// Bytes of each record value.
    #[arg(short = 's', long, default_value_t = 100)]
    pub record_size: usize,
    /// Record value bytes per batch (records per batch = batch_bytes / record_size, at least 1).
    #[arg(long, default_value_t = 1 << 20)]
    pub batch_bytes: usize,
    /// In --rate mode, how long a batch gathers records before it is due.
    #[arg(long, default_value_t = 5.0)]
    pub linger_ms: f64,
    /// Produce acks: 1 (leader) or -1 / all (all in-sync replicas).
    #[arg(short, long, default_value = "1", value_parser = parse_acks, allow_hyphen_values = true)]
    pub acks: i16,
    /// Compression codec of produced batches.
    #[arg(long, value_enum, default_value_t = CompressionArg::None)]
    pub compression: CompressionArg,
    /// Stop after this many records (after warm-up is not counted separately).
    #[arg(short = 'n', long)]
    pub records: Option<u64>,
    /// Stop after this many seconds of measurement (default 10 unless --records is given).
    #[arg(short, long)]
    pub duration_secs: Option<f64>,
    /// Seconds at the start whose samples are left out of the summary.
    #[arg(long, default_value_t = 0.0)]
    pub warmup_secs: f64,
    /// Fixed total rate in records/s; latency is then measured from each batch's intended time.
    #[arg(short, long)]
    pub rate: Option<f64>,
    /// Idempotent producer (one producer id per connection): a batch re-sent after a failover
    /// is stored once.
    #[arg(long)]
    pub idempotent: bool,
    /// Produce requests in flight per connection.
    #[arg(long, default_value_t = 5)]
    pub max_in_flight: usize,
    /// A reply slower than this fails the run.
    #[arg(long, default_value_t = 30_000)]
    pub request_timeout_ms: u64,
    /// Fetch size limit per request (and per partition).
    #[arg(long, default_value_t = 32 << 20)]
    pub fetch_max_bytes: usize,
    /// How long a fetch may wait at the broker for new data.
    #[arg(long, default_value_t = 500)]
    pub fetch_max_wait_ms: i32,
    /// Where `consume` starts reading.
    #[arg(long, value_enum, default_value_t = StartFrom::Earliest)]
    pub from: StartFrom,
    /// Write the summary and full percentile distribution to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw this run's latency-percentile curve to an .svg or .png file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Name of the run in JSON and on plots.
    #[arg(long)]
    pub label: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct PlotArgs {
    /// Output file, .svg or .png.
    #[arg(short, long)]
    pub out: PathBuf,
    /// Chart title.
    #[arg(long, default_value = "Latency by percentile")]
    pub title: String,
    /// Latency axis: `auto` turns logarithmic when the curves span more than 100x.
    #[arg(long, value_enum, default_value_t = crate::plot::YScale::Auto)]
    pub y_scale: crate::plot::YScale,
    /// JSON files written by --json.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
}

fn parse_acks(s: &str) -> std::result::Result<i16, String> {
    match s {
        "1" => Ok(1),
        "-1" | "all" => Ok(-1),
        "0" => Err("acks=0 gets no reply, so there is nothing to time; use 1 or -1".into()),
        _ => Err(format!("acks must be 1, -1 or all, not {s:?}")),
    }
}

/// Which of the run modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Produce,
    Consume,
    E2e,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Produce => "produce",
            Mode::Consume => "consume",
            Mode::E2e => "e2e",
        }
    }
}

/// Validated options of a run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub mode: Mode,
    pub args: RunArgs,
    pub records_per_batch: usize,
    pub duration: Option<Duration>,
    pub warmup: Duration,
    pub request_timeout: Duration,
}

fn bad(msg: impl Into<String>) -> PerfError {
    PerfError::Args(msg.into())
}

impl RunArgs {
    /// Checks every limit and the combinations that make no sense.
    pub fn validate(self, mode: Mode) -> Result<RunConfig> {
        let a = &self;
        if a.bootstrap_servers.is_empty() || a.bootstrap_servers.iter().any(|s| s.is_empty()) {
            return Err(bad("--bootstrap-servers needs at least one host:port"));
        }
        if a.topic.is_empty()
            || a.topic.len() > 249
            || !a
                .topic
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(bad("--topic must be 1..=249 characters of [a-zA-Z0-9._-]"));
        }
        if !(1..=MAX_PARTITIONS).contains(&a.partitions) {
            return Err(bad(format!("--partitions must be 1..={MAX_PARTITIONS}")));
        }
        if a.replication_factor < 1 {
            return Err(bad("--replication-factor must be at least 1"));
        }
        if !(1..=MAX_CONNECTIONS).contains(&a.connections) {
            return Err(bad(format!("--connections must be 1..={MAX_CONNECTIONS}")));
        }
        if !(1..=MAX_RECORD_BYTES).contains(&a.record_size) {
            return Err(bad(format!(
                "--record-size must be 1..={MAX_RECORD_BYTES} bytes"
            )));
        }
        if mode == Mode::E2e && a.record_size < STAMP_BYTES {
            return Err(bad(format!(
                "e2e carries the send time in the record: --record-size must be at least {STAMP_BYTES}"
            )));
        }
        if mode == Mode::E2e && a.compression != CompressionArg::None {
            return Err(bad(
                "e2e stamps the send time into each batch in place: use --compression none",
            ));
        }
        if a.batch_bytes < a.record_size || a.batch_bytes > MAX_BATCH_BYTES {
            return Err(bad(format!(
                "--batch-bytes must be from --record-size ({}) to {MAX_BATCH_BYTES}",
                a.record_size
            )));
        }
        if !(a.linger_ms.is_finite() && a.linger_ms >= 0.0) {
            return Err(bad("--linger-ms must be a finite number >= 0"));
        }
        if let Some(r) = a.rate {
            if !(r.is_finite() && r > 0.0) {
                return Err(bad("--rate must be a positive number of records/s"));
            }
            if mode == Mode::Consume {
                return Err(bad("--rate applies to produce and e2e, not consume"));
            }
        }
        if a.records == Some(0) {
            return Err(bad("--records must be at least 1"));
        }
        let max_secs = MAX_DURATION_SECS as f64;
        let duration = match (a.duration_secs, a.records) {
            (Some(d), _) if !(d.is_finite() && d > 0.0 && d <= max_secs) => {
                return Err(bad(format!("--duration-secs must be in (0, {max_secs}]")));
            }
            (Some(d), _) => Some(Duration::from_secs_f64(d)),
            (None, Some(_)) => None,
            (None, None) if mode == Mode::Consume => None,
            (None, None) => Some(Duration::from_secs(10)),
        };
        if !(a.warmup_secs.is_finite() && a.warmup_secs >= 0.0 && a.warmup_secs <= max_secs) {
            return Err(bad(format!("--warmup-secs must be in [0, {max_secs}]")));
        }
        if !(1..=MAX_IN_FLIGHT).contains(&a.max_in_flight) {
            return Err(bad(format!("--max-in-flight must be 1..={MAX_IN_FLIGHT}")));
        }
        if !(1..=3_600_000).contains(&a.request_timeout_ms) {
            return Err(bad("--request-timeout-ms must be 1..=3600000"));
        }
        if !(1024..=MAX_FETCH_BYTES).contains(&a.fetch_max_bytes) {
            return Err(bad(format!(
                "--fetch-max-bytes must be 1024..={MAX_FETCH_BYTES}"
            )));
        }
        if !(0..=60_000).contains(&a.fetch_max_wait_ms) {
            return Err(bad("--fetch-max-wait-ms must be 0..=60000"));
        }
        for (flag, path) in [("--json", &a.json), ("--plot", &a.plot)] {
            if let Some(p) = path {
                if p.as_os_str().is_empty() {
                    return Err(bad(format!("{flag} needs a file name")));
                }
            }
        }
        if let Some(p) = &a.plot {
            crate::plot::Format::of(p)?;
        }
        let records_per_batch = (a.batch_bytes / a.record_size).max(1);
        Ok(RunConfig {
            mode,
            records_per_batch,
            duration,
            warmup: Duration::from_secs_f64(a.warmup_secs),
            request_timeout: Duration::from_millis(a.request_timeout_ms),
            args: self,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("spate-perf").chain(args.iter().copied()))
    }

    fn run_args(args: &[&str]) -> (Mode, RunArgs) {
        match parse(args).unwrap().command {
            Command::Produce(a) => (Mode::Produce, a),
            Command::Consume(a) => (Mode::Consume, a),
            Command::E2e(a) => (Mode::E2e, a),
            Command::Plot(_) => panic!("not a run"),
        }
    }

    fn validate(args: &[&str]) -> Result<RunConfig> {
        let (mode, a) = run_args(args);
        a.validate(mode)
    }

    #[test]
    fn defaults_are_valid() {
        let c = validate(&["produce"]).unwrap();
        assert_eq!(c.args.acks, 1);
        assert_eq!(c.records_per_batch, (1 << 20) / 100);
        assert_eq!(c.duration, Some(Duration::from_secs(10)));
        let c = validate(&["consume"]).unwrap();
        assert_eq!(c.duration, None);
        let c = validate(&["produce", "-n", "5"]).unwrap();
        assert_eq!(c.duration, None);
    }

    #[test]
    fn acks_accepts_all_and_minus_one_and_refuses_zero() {
        assert_eq!(run_args(&["produce", "--acks", "all"]).1.acks, -1);
        assert_eq!(run_args(&["produce", "--acks", "-1"]).1.acks, -1);
        let err = parse(&["produce", "--acks", "0"]).unwrap_err().to_string();
        assert!(err.contains("nothing to time"), "{err}");
        assert!(parse(&["produce", "--acks", "2"]).is_err());
    }

    #[test]
    fn out_of_range_values_get_clear_messages() {
        let cases: &[(&[&str], &str)] = &[
            (&["produce", "--record-size", "0"], "--record-size"),
            (&["produce", "--connections", "0"], "--connections"),
            (&["produce", "--partitions", "0"], "--partitions"),
            (
                &["produce", "--batch-bytes", "10", "--record-size", "100"],
                "--batch-bytes",
            ),
            (&["produce", "--rate", "0"], "--rate"),
            (&["produce", "--rate", "NaN"], "--rate"),
            (&["consume", "--rate", "10"], "not consume"),
            (&["produce", "--duration-secs=-1"], "--duration-secs"),
            (&["produce", "--max-in-flight", "0"], "--max-in-flight"),
            (&["produce", "--topic", "a b"], "--topic"),
            (&["produce", "-n", "0"], "--records"),
            (&["e2e", "--record-size", "4"], "at least 8"),
            (&["e2e", "--compression", "zstd"], "compression none"),
            (&["produce", "--plot", "x.pdf"], ".svg or .png"),
        ];
        for (args, want) in cases {
            let err = validate(args)
                .err()
                .unwrap_or_else(|| panic!("{args:?} accepted"));
            assert!(err.to_string().contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn unknown_flags_and_values_are_refused_by_the_parser() {
        assert!(parse(&["produce", "--no-such-flag"]).is_err());
        assert!(parse(&["produce", "--compression", "brotli"]).is_err());
        assert!(parse(&["produce", "--record-size", "ten"]).is_err());
        assert!(parse(&["plot", "--out", "x.svg"]).is_err());
    }
}
