//! Starting and stopping the broker: one glommio executor per core (a shard, pinned to a CPU
//! of its cpuset unless `pin_shards` is off), each listening on the same port, sharing only the metadata
//! store and the cross-shard queues.
//! The wiring of the layers: the metadata store and placement (spate-replication), the shards'
//! replicas, and the Kafka serving of each shard (spate-net).

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};

use spate_net::config::BrokerConfig;
use spate_net::cross_wake;
use spate_net::error::NetError;
use spate_net::metadata::MetadataStore;
use spate_net::metrics::Metrics;
use spate_net::metrics_http::MetricsServer;
use spate_net::server::{accept_loop, OpenConnections};
use spate_net::shard::{Job, Router, Shard};
use spate_replication::cluster::throttle::ReplicationThrottle;
use spate_replication::cluster::{run_shard_runtime, RuntimeConfig, ShardLink};

/// How often a shard that finished draining checks whether the others have too.
const SHUTDOWN_POLL: Duration = Duration::from_millis(10);
/// How long a start waits for a port held by someone listening to be freed: 10 times the
/// longest the listener of a SIGKILLed predecessor was seen to outlive it (160 ms), and short
/// enough that starting beside a live broker still fails promptly.
const LISTEN_RETRY_MS: u64 = 2_000;
/// How often a start tries the port again while waiting for it.
const LISTEN_RETRY_POLL_MS: u64 = 20;
/// How long to wait for a connection when checking whether someone listens on our port.
const LISTEN_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a shard checks whether connections closed while it is quiet, to give the
/// allocator's free memory back (see `give_back_freed_memory`).
const ALLOCATOR_TRIM_CHECK_INTERVAL_MS: u64 = 1_000;
/// How often changed producer state is snapshotted (bounds the log replay after a crash).
const PRODUCER_SNAPSHOT_INTERVAL_MS: u64 = 60_000;
/// CPU shares of the log cleaner's task queue; the shard's default queue (requests, replication)
/// has glommio's default of 1000, so when both are runnable the cleaner gets about 1/11 of the
/// core. Its work is all background: it only has to finish eventually.
const CLEANER_TASK_QUEUE_SHARES: usize = 100;

/// What a cluster node's shards take from its cluster service (src/cluster.rs): the node-local
/// topic store the service mirrors the controller's topics into, and each shard's link.
pub struct ClusterWiring {
    pub mirror: Arc<MetadataStore>,
    /// One per shard, in shard order.
    pub links: Vec<ShardLink>,
    /// The node's catch-up replication throttle, shared by its shards; `None`: off.
    pub throttle: Option<Arc<ReplicationThrottle>>,
}

pub struct Broker {
    handles: Vec<ExecutorJoinHandle<()>>,
    shutdown: ShutdownHandle,
    metrics_server: Option<MetricsServer>,
}

/// Asks every shard to stop. `Send + Clone`, for signal handlers.
#[derive(Clone)]
pub struct ShutdownHandle {
    router: Router,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        for i in 0..self.router.shards() {
            let router = self.router.clone();
            // Sent from a plain thread: block on the queue, it is drained by the shard.
            let job: Job = Box::new(|s: Rc<Shard>| {
                Box::pin(async move {
                    s.begin_shutdown();
                })
            });
            let _ = router.send_blocking(i, job);
        }
    }
}

impl Broker {
    pub fn start(
        mut config: BrokerConfig,
        cluster: Option<ClusterWiring>,
    ) -> Result<Broker, NetError> {
        if config.cores == 0 {
            return Err(NetError::Config("cores must be at least 1".into()));
        }
        claim_listen_port(&mut config)?;
        std::fs::create_dir_all(&config.data_dir)?;
        if cluster.is_none() {
            // Before anything is written: offsets of the layout before `__consumer_offsets`
            // was a topic are migrated on start, or refused here with what to do.
            spate_net::group::check_legacy_offsets(
                &config.data_dir,
                config.groups.offsets_topic_partitions,
            )
            .map_err(NetError::Config)?;
        }
        let throttle = cluster.as_ref().and_then(|w| w.throttle.clone());
        let (metadata, mut links) = match cluster {
            Some(w) => {
                if w.links.len() != config.cores {
                    return Err(NetError::Config(format!(
                        "{} cluster links for {} shards",
                        w.links.len(),
                        config.cores
                    )));
                }
                (w.mirror, w.links.into_iter().map(Some).collect())
            }
            None => (
                MetadataStore::open(&config.data_dir)?,
                (0..config.cores).map(|_| None).collect::<Vec<_>>(),
            ),
        };
        // Before any shard opens a log: every partition gets its shard among these cores (a
        // cluster node's placement is the controller's; its mirror settles nothing).
        let settled = metadata.settle_placement(config.cores)?;
        if settled.filled > 0 {
            tracing::info!(
                partitions = settled.filled,
                "stored the shard placement of partitions from a data dir written before it was stored"
            );
        }
        if settled.replaced > 0 {
            tracing::warn!(
                partitions = settled.replaced,
                cores = config.cores,
                "partitions placed on shards past --cores moved to the least-loaded shards"
            );
        }
        let config = Arc::new(config);
        let (router, receivers) = Router::new(config.cores);
        let cpus = crate::cpus::shard_cpus(config.cpuset.as_deref())
            .map_err(|e| NetError::Config(format!("--cpuset: {e:#}")))?;
        let open_connections = Arc::new(OpenConnections::default());
        let drained = Arc::new(AtomicUsize::new(0));
        let metrics = Arc::new(Metrics::new());
        // Before the shards, so the endpoint answers once the broker does (after the Kafka
        // port check, which is reported first); scrapes queue until the shards run.
        let metrics_server = match config.metrics_listen {
            Some(listen) => Some(MetricsServer::start(
                listen,
                metrics.clone(),
                router.clone(),
            )?),
            None => None,
        };
        let (ready_tx, ready_rx) = flume::bounded::<Result<SocketAddr, String>>(config.cores);
        let mut handles = Vec::with_capacity(config.cores);
        for (id, inbox) in receivers.into_iter().enumerate() {
            let (config, metadata, router) = (config.clone(), metadata.clone(), router.clone());
            let metrics = metrics.clone();
            let link = links[id].take().map(|l| (l, throttle.clone()));
            let (open, drained, ready) =
                (open_connections.clone(), drained.clone(), ready_tx.clone());
            let placement = if config.pin_shards {
                Placement::Fixed(cpus[id % cpus.len()])
            } else {
                Placement::Unbound
            };
            let handle = LocalExecutorBuilder::new(placement)
                .name(&format!("spate-shard-{id}"))
                .io_memory(config.io_memory_bytes)
                .spawn(move || async move {
                    run_shard(
                        id, config, metadata, router, inbox, open, drained, ready, metrics, link,
                    )
                    .await
                })
                .map_err(|e| NetError::Config(format!("cannot start shard {id}: {e}")))?;
            handles.push(handle);
        }
        drop(ready_tx);
        for _ in 0..config.cores {
            match ready_rx.recv() {
                // Each shard logs the address it listens on (the port resolved from 0).
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    let broker = Broker {
                        handles,
                        shutdown: ShutdownHandle { router },
                        metrics_server,
                    };
                    broker.shutdown.shutdown();
                    let _ = broker.wait();
                    return Err(NetError::Config(e));
                }
                Err(_) => return Err(NetError::Config("a shard exited during start".into())),
            }
        }
        Ok(Broker {
            handles,
            shutdown: ShutdownHandle { router },
            metrics_server,
        })
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Blocks until every shard has stopped.
    pub fn wait(mut self) -> Result<(), NetError> {
        let mut failed = false;
        for h in std::mem::take(&mut self.handles) {
            if h.join().is_err() {
                failed = true;
            }
        }
        if let Some(mut m) = self.metrics_server.take() {
            m.stop();
        }
        if failed {
            return Err(NetError::Config("a shard panicked".into()));
        }
        Ok(())
    }
}

/// Every shard's listener sets SO_REUSEPORT so that the shards can share the port, but that
/// would also let this broker share it silently with another process that set it too (another
/// broker, say), splitting clients between them. A bind without the option first fails if anyone
/// holds the port. Port 0 is resolved here once, so that every shard listens on the same port.
pub fn claim_listen_port(config: &mut BrokerConfig) -> Result<(), NetError> {
    let deadline = std::time::Instant::now() + Duration::from_millis(LISTEN_RETRY_MS);
    let probe = loop {
        match std::net::TcpListener::bind(config.listen) {
            Ok(p) => break Some(p),
            // Connections of a stopped predecessor linger (FIN-WAIT-2, up to a minute) and
            // block a plain bind, though the shards' SO_REUSEPORT binds would succeed: only a
            // listener that answers means the port is taken.
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse && !someone_listens(config.listen) =>
            {
                break None
            }
            // A predecessor killed with SIGKILL keeps its listening socket, still completing
            // handshakes, until the kernel tears its io_uring down (60-160 ms measured): wait
            // that out rather than fail a restart. A live broker still holds the port when
            // the wait ends, and is then refused as before.
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(LISTEN_RETRY_POLL_MS));
            }
            Err(e) => {
                return Err(NetError::Config(format!(
                    "cannot listen on {}: {e} (is another broker running there?)",
                    config.listen
                )))
            }
        }
    };
    let Some(probe) = probe else {
        return Ok(());
    };
    let bound = probe.local_addr()?;
    if config.listen.port() == 0 {
        config.listen.set_port(bound.port());
        if config.advertised_port == 0 {
            config.advertised_port = bound.port();
        }
    }
    // Dropped before the shards bind: the probe never accepts anything.
    drop(probe);
    Ok(())
}

/// True if a connection to `addr` (the loopback address for a wildcard) is accepted.
fn someone_listens(addr: SocketAddr) -> bool {
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    std::net::TcpStream::connect_timeout(&target, LISTEN_PROBE_TIMEOUT).is_ok()
}

#[allow(clippy::too_many_arguments)]
async fn run_shard(
    id: usize,
    config: Arc<BrokerConfig>,
    metadata: Arc<MetadataStore>,
    router: Router,
    inbox: flume::Receiver<Job>,
    open_connections: Arc<OpenConnections>,
    drained: Arc<AtomicUsize>,
    ready: flume::Sender<Result<SocketAddr, String>>,
    metrics: Arc<Metrics>,
    link: Option<(ShardLink, Option<Arc<ReplicationThrottle>>)>,
) {
    let shard = Shard::new(id, router.clone(), config.clone(), metadata, &metrics);
    {
        let fsync = shard.metrics.fsync_latency.clone();
        spate_replication::partition::observe::set_fsync_observer(move |took| {
            fsync.observe(took.as_secs_f64())
        });
    }
    // Every replica this shard owns is opened (and recovered) before it serves clients. A
    // cluster node's replicas are opened by its hosting runtime instead, as the applied
    // controller metadata names them.
    let hosting = match link {
        None => {
            shard.open_owned_partitions(None).await;
            None
        }
        Some((link, throttle)) => {
            let node = config.node_id as spate_replication::NodeId;
            let stop = {
                let shard = shard.clone();
                async move { shard.shutdown.changed(0).await }
            };
            let runtime = RuntimeConfig {
                observer: Some(Box::new(shard.metrics.cluster_runtime())),
                throttle,
                ..RuntimeConfig::new(node)
            };
            Some(glommio::spawn_local(run_shard_runtime(
                shard.replicas.clone(),
                link,
                runtime,
                stop,
            )))
        }
    };
    spate_net::group::start_shard(&shard);
    // Jobs from other shards run as tasks of this shard, so a slow one never blocks the queue.
    let jobs = {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            while let Ok(job) = cross_wake::recv(&inbox).await {
                glommio::spawn_local(job(shard.clone())).detach();
            }
        })
    };
    let retention = {
        let shard = shard.clone();
        let every = Duration::from_millis(config.retention_check_interval_ms.max(1));
        glommio::spawn_local(async move {
            housekeeping(shard, every).await;
        })
    };
    let trims = {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            give_back_freed_memory(shard).await;
        })
    };
    let snapshots = {
        let shard = shard.clone();
        let every = Duration::from_millis(PRODUCER_SNAPSHOT_INTERVAL_MS);
        glommio::spawn_local(async move {
            loop {
                if sleep_or_shutdown(&shard, every).await {
                    return;
                }
                shard.snapshot_producers().await;
            }
        })
    };
    let cleaner = spawn_cleaner(shard.clone(), config.cleaner_backoff_ms);
    let listener = match glommio::net::TcpListener::bind(config.listen) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot listen on {}: {e}", config.listen)));
            drop(ready);
            wait_for_shutdown(&shard).await;
            finish(&shard, &drained, router.shards()).await;
            drop(jobs);
            Shard::clear_current();
            return;
        }
    };
    let addr = listener.local_addr().unwrap_or(config.listen);
    tracing::info!(shard = id, %addr, "shard listening");
    let _ = ready.send(Ok(addr));
    drop(ready);
    accept_loop(shard.clone(), listener, open_connections).await;
    retention.await;
    trims.await;
    snapshots.await;
    cleaner.await;
    // The groups close before the replicas: their last messages and reports are dropped.
    if let Some(h) = hosting {
        h.await;
    }
    finish(&shard, &drained, router.shards()).await;
    drop(jobs);
    Shard::clear_current();
    spate_replication::partition::observe::clear_fsync_observer();
    tracing::info!(shard = id, "shard stopped");
}

/// True if the shard began shutting down before `every` passed.
async fn sleep_or_shutdown(shard: &Shard, every: Duration) -> bool {
    let stop = shard.shutdown.changed(0);
    futures_lite::future::or(
        async {
            // Raced: glommio's own sleep would leave a timer entry per wake-up (`Deadline`).
            spate_replication::shard::deadline::sleep(every).await;
            false
        },
        async {
            stop.await;
            true
        },
    )
    .await
}

/// The shard's log cleaner: a round over its compacted partitions every `backoff_ms`, in a
/// task queue of its own whose latency does not matter and with a tenth of the default
/// queue's CPU shares, so the shard's requests come first whenever both have work.
fn spawn_cleaner(shard: Rc<Shard>, backoff_ms: u64) -> glommio::Task<()> {
    let every = Duration::from_millis(backoff_ms.max(1));
    let queue = glommio::executor().create_task_queue(
        glommio::Shares::Static(CLEANER_TASK_QUEUE_SHARES),
        glommio::Latency::NotImportant,
        "log-cleaner",
    );
    let run = cleaner_rounds(shard.clone(), every);
    glommio::spawn_local_into(run, queue).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "no task queue for the log cleaner; running it beside requests");
        glommio::spawn_local(cleaner_rounds(shard, every))
    })
}

/// The cleaner's rounds. It backs off only after a round that found nothing to clean, as
/// Kafka's cleaner does, and its backoff ends early when the group coordinator wakes it
/// ([`Shard::cleaner_wake`]): a compacted log written faster than one segment per backoff
/// (`__consumer_offsets` under many commits) would otherwise gather a whole backoff of dirty
/// segments between rounds, and a coordinator that loads it replays every one of them.
async fn cleaner_rounds(shard: Rc<Shard>, every: Duration) {
    loop {
        let seen = shard.cleaner_wake.generation();
        let stop = shard.shutdown.changed(0);
        let stopped = futures_lite::future::or(
            async {
                futures_lite::future::or(
                    spate_replication::shard::deadline::sleep(every),
                    shard.cleaner_wake.changed(seen),
                )
                .await;
                false
            },
            async {
                stop.await;
                true
            },
        )
        .await;
        if stopped || shard.is_shutting_down() {
            return;
        }
        while !shard.is_shutting_down() && shard.clean_logs().await > 0 {
            glommio::yield_if_needed().await;
        }
    }
}

async fn housekeeping(shard: Rc<Shard>, every: Duration) {
    while !sleep_or_shutdown(&shard, every).await {
        shard.apply_retention().await;
    }
}

/// Returns the allocator's free memory to the kernel once connections closed and the shard
/// went quiet. The allocator keeps freed memory for reuse for a while (jemalloc's decay),
/// which serves a busy broker well, but after a flood of connections closes the receive
/// buffers, frames and tasks they left behind would stay resident for good. Trimming only
/// when no request was read for a whole interval keeps it off the busy path.
async fn give_back_freed_memory(shard: Rc<Shard>) {
    let every = Duration::from_millis(ALLOCATOR_TRIM_CHECK_INTERVAL_MS);
    let mut seen = (shard.connections_closed.get(), shard.requests_read.get());
    let mut trimmed_at_closed = seen.0;
    while !sleep_or_shutdown(&shard, every).await {
        let now = (shard.connections_closed.get(), shard.requests_read.get());
        let quiet = now.1 == seen.1;
        if quiet && now.0 != trimmed_at_closed && shard.request_budget.used_bytes() == 0 {
            let released = spate_net::alloc::give_back_free_memory();
            tracing::debug!(
                shard = shard.id,
                released,
                "allocator trimmed after connections closed"
            );
            trimmed_at_closed = now.0;
        }
        seen = now;
    }
}

async fn wait_for_shutdown(shard: &Shard) {
    shard.shutdown.changed(0).await;
}

/// Waits until every shard drained its connections (their in-flight requests may still need
/// this shard's partitions), then closes this shard's partitions.
async fn finish(shard: &Rc<Shard>, drained: &AtomicUsize, shards: usize) {
    drained.fetch_add(1, Ordering::AcqRel);
    while drained.load(Ordering::Acquire) < shards {
        glommio::timer::sleep(SHUTDOWN_POLL).await;
    }
    // The coordinator's queued writes go to partitions of the shard: they finish first.
    spate_net::group::close_shard().await;
    shard.close_partitions().await;
}
