//! `spate`: the broker binary. Parses the configuration, starts one pinned executor per core,
//! and stops cleanly on SIGTERM or Ctrl-C.

mod admin;
mod broker;
mod check;
mod cluster;
mod config;
mod cpus;
mod verify;

use anyhow::Context;
use broker::Broker;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "spate",
    version,
    about = "Spate: a Kafka-compatible streaming broker, thread-per-core, for bare-metal Linux"
)]
struct Cli {
    /// Log format on stderr: `text` for people, `json` (one object a line) for log collectors.
    #[arg(long, global = true, env = "SPATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `spate_net=debug,info`; RUST_LOG is used when this is absent.
    #[arg(long, global = true, env = "SPATE_LOG_LEVEL")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print every `spate serve` setting with its default, as a TOML file `--config` accepts.
    Defaults,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Installs the tracing subscriber; a bad filter is an error that names the flag, not a silent
/// fallback.
fn init_logging(format: LogFormat, level: Option<&str>) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).with_context(|| format!("--log-level {l:?}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

#[derive(Subcommand)]
enum Command {
    /// Run a broker. Flags override the --config file; the defaults are shown in brackets.
    // Boxed: the serve flags make this variant much larger than the others.
    Serve(Box<config::ServeConfig>),
    /// Verify this machine can run the broker: io_uring, direct I/O on the data dir, limits.
    Check {
        /// The data directory the broker will use.
        #[arg(long, default_value = "./spate-data")]
        data_dir: std::path::PathBuf,
        /// Shards the broker will run (default: all cores).
        #[arg(long)]
        cores: Option<usize>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the broker configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Create, list, describe, delete and configure topics.
    #[command(subcommand)]
    Topic(admin::TopicCommand),
    /// List and describe consumer groups; reset their committed offsets.
    #[command(subcommand)]
    Group(admin::GroupCommand),
    /// Write stdin lines to a topic as records.
    Produce(admin::ProduceArgs),
    /// Print a topic's records on stdout.
    Consume(admin::ConsumeArgs),
    /// Show the cluster: id, controller, brokers, supported APIs; check a node can restart.
    #[command(subcommand)]
    Cluster(admin::ClusterCommand),
    /// Partition leadership and placement: preferred-leader elections, replica moves.
    #[command(subcommand)]
    Partition(admin::PartitionCommand),
    /// Node operations: maintenance mode before a restart, decommissioning before retiring.
    #[command(subcommand)]
    Node(admin::NodeCommand),
    /// Check every stored batch of a data directory offline (read-only); exits 1 if any is bad.
    Verify {
        /// The broker's data directory (the broker should not be running on it).
        #[arg(long, default_value = "./spate-data")]
        data_dir: std::path::PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = init_logging(cli.log_format, cli.log_level.as_deref()) {
        eprintln!("spate: {e:#}");
        std::process::exit(2);
    }
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Check {
            data_dir,
            cores,
            json,
        } => {
            let cores = cores
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let (text, ok) = check::report(&check::run_checks(&data_dir, cores), json);
            print!("{text}");
            std::process::exit(if ok { 0 } else { 1 });
        }
        Command::Config(ConfigCommand::Defaults) => {
            print!("{}", config::ServeConfig::defaults_toml());
            Ok(())
        }
        Command::Topic(c) => admin::finish(admin::topic::run(c)),
        Command::Group(c) => admin::finish(admin::group::run(c)),
        Command::Produce(a) => admin::finish(admin::produce::run(a)),
        Command::Consume(a) => admin::finish(admin::consume::run(a)),
        Command::Cluster(c) => admin::finish(admin::cluster::run(c)),
        Command::Partition(c) => admin::finish(admin::partition::run(c)),
        Command::Node(c) => admin::finish(admin::node::run(c)),
        Command::Verify { data_dir } => verify::run(&data_dir).map(|s| {
            if s.bad > 0 {
                std::process::exit(1);
            }
        }),
    };
    if let Err(e) = result {
        tracing::error!("{e:#}");
        eprintln!("spate: {e:#}");
        std::process::exit(1);
    }
}

fn serve(args: config::ServeConfig) -> anyhow::Result<()> {
    let args = args.with_file()?;
    let mut config = args.resolve()?;
    if let Some(cpus) = &config.cpuset {
        // Before any thread starts, so that every thread of the broker inherits it.
        cpus::confine_to(cpus).context("--cpuset")?;
    }
    let cluster = cluster::ClusterArgs::from_serve(&args)?;
    // The identity is checked before anything else opens the data directory: a node of
    // another cluster stops here.
    let identity = match &cluster {
        Some(c) => {
            cluster::refuse_single_node_topics(&config.data_dir)?;
            Some(cluster::open_identity(&config.data_dir, config.node_id, c)?)
        }
        None => None,
    };
    let view = cluster
        .as_ref()
        .map(|_| spate_replication::controller::view::SharedClusterView::default());
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("installing signal handlers")?;
    // The banner: what an operator needs to know this is the broker they meant to start.
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        node_id = config.node_id,
        listen = %config.listen,
        advertised = %format!("{}:{}", config.advertised_host, config.advertised_port),
        cores = config.cores,
        data_dir = %config.data_dir.display(),
        flush = ?config.flush,
        metrics = %config.metrics_listen.map_or("off".to_string(), |a| a.to_string()),
        io_memory_bytes = config.io_memory_bytes,
        "starting spate"
    );
    let data_dir = config.data_dir.clone();
    // A cluster node's Kafka endpoint is part of its registration, and its shards need the
    // service's links and mirrored topic store: the port is resolved (port 0) and the cluster
    // service started before the shards.
    let (service, wiring) = match (&cluster, identity, view) {
        (Some(c), Some(identity), Some(view)) => {
            broker::claim_listen_port(&mut config).context("starting the broker")?;
            let kafka = spate_replication::controller::Endpoint {
                host: config.advertised_host.clone(),
                port: config.advertised_port,
            };
            let mirror = spate_replication::metadata::MetadataStore::mirrored(&identity.cluster_id);
            let (service, links, port) = cluster::start(
                c,
                identity,
                &data_dir,
                kafka,
                config.cores,
                view,
                mirror.clone(),
            )?;
            config.cluster = Some(port);
            let throttle = c.replication_throttle_bytes_per_sec.map(|rate| {
                std::sync::Arc::new(
                    spate_replication::cluster::throttle::ReplicationThrottle::new(rate),
                )
            });
            let wiring = broker::ClusterWiring {
                mirror,
                links,
                throttle,
            };
            (Some(service), Some(wiring))
        }
        _ => (None, None),
    };
    let broker = match Broker::start(config, wiring) {
        Ok(b) => b,
        Err(e) => {
            if let Some(s) = service {
                s.stop();
            }
            return Err(e).context("starting the broker");
        }
    };
    let handle = broker.shutdown_handle();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, "shutting down: finishing in-flight requests");
            handle.shutdown();
        }
    });
    let result = broker.wait().context("running the broker");
    if let Some(s) = service {
        s.stop();
    }
    result?;
    tracing::info!("stopped cleanly");
    Ok(())
}

#[global_allocator]
static ALLOC: spate_net::alloc::NoReserveLargeAlloc = spate_net::alloc::NoReserveLargeAlloc;

/// jemalloc's options, read once at its start (its `malloc_conf`, a `const char *`, under the
/// prefixed name the bundled build uses; a reference to a byte array is that pointer).
/// `oversize_threshold:0` turns off its dedicated arena for allocations of 8 MiB and more,
/// which returns their pages to the kernel as soon as they are freed: a produce request of that
/// size (a batch for each of hundreds of partitions) then faulted in and zeroed fresh pages for
/// every request, a quarter of a shard's CPU samples at 1,000 partitions (docs/benchmarks.md,
/// session 17). In the ordinary arenas freed pages are reused and decay back to the kernel over
/// seconds, as smaller buffers' do.
#[used]
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_CONF: &[u8; 21] = b"oversize_threshold:0\0";
