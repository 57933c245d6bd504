//! The controller driver's thread: a glommio executor running the rpc transport and the
//! [`Driver`] on a tick, and publishing the [`ClusterView`] the shards read.
//!
//! It runs on its own unpinned thread rather than on a shard: its work is a few small messages
//! per tick, and on a shard it would wait behind request handling and fsyncs, which delays
//! heartbeats and elections (a failover budget of about a second leaves no room for that).
//! Unpinned, the kernel runs it on whichever core has a moment; its fsyncs of the metadata log
//! block only this thread.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};

use crate::controller::driver::{Driver, DriverConfig, Outgoing, DEFAULT_CONTROLLER_TICK_MS};
use crate::controller::records::Endpoint;
use crate::controller::store::{MetadataStore, StoreError};
use crate::controller::view::SharedClusterView;
use crate::identity::NodeIdentity;
use crate::rpc::transport::{ReplyTo, Transport, TransportConfig};
use crate::types::NodeId;

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub identity: NodeIdentity,
    pub data_dir: PathBuf,
    /// `--rpc-listen`.
    pub rpc_listen: SocketAddr,
    /// `--advertised-rpc`; `None`: the bound rpc address.
    pub advertised_rpc: Option<Endpoint>,
    /// `--seeds`: the metadata voters and where to dial them.
    pub seeds: Vec<(NodeId, String)>,
    /// Where clients reach this node's Kafka port.
    pub kafka: Endpoint,
    pub shards: u32,
    /// `--default-replication-factor`; `None`: min(3, live brokers).
    pub default_replication_factor: Option<usize>,
    pub tick: Duration,
    pub transport: TransportConfig,
}

impl ServiceConfig {
    pub fn new(
        identity: NodeIdentity,
        data_dir: PathBuf,
        rpc_listen: SocketAddr,
        seeds: Vec<(NodeId, String)>,
        kafka: Endpoint,
        shards: u32,
    ) -> Self {
        ServiceConfig {
            identity,
            data_dir,
            rpc_listen,
            advertised_rpc: None,
            seeds,
            kafka,
            shards,
            default_replication_factor: None,
            tick: Duration::from_millis(DEFAULT_CONTROLLER_TICK_MS),
            transport: TransportConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("metadata store: {0}")]
    Store(#[from] StoreError),
    #[error("rpc listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("controller thread: {0}")]
    Thread(String),
}

/// The running driver thread.
pub struct ClusterService {
    view: SharedClusterView,
    rpc_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<glommio::ExecutorJoinHandle<()>>,
}

impl ClusterService {
    /// Opens the metadata store, binds the rpc port and starts the driver thread. Returns once
    /// the port is bound (so its address is known) or failed. The driver publishes into
    /// `view` (shared with the Kafka port).
    pub fn start(
        cfg: ServiceConfig,
        view: SharedClusterView,
    ) -> Result<ClusterService, ServiceError> {
        let store = MetadataStore::open(&cfg.data_dir)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (view2, stop2) = (view.clone(), stop.clone());
        let handle = LocalExecutorBuilder::new(Placement::Unbound)
            .name("spate-controller")
            .spawn(move || async move {
                run(cfg, store, view2, stop2, ready_tx).await;
            })
            .map_err(|e| ServiceError::Thread(e.to_string()))?;
        let rpc_addr = match ready_rx.recv() {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                let _ = handle.join();
                return Err(e);
            }
            Err(_) => return Err(ServiceError::Thread("exited before binding".into())),
        };
        Ok(ClusterService {
            view,
            rpc_addr,
            stop,
            thread: Some(handle),
        })
    }

    pub fn view(&self) -> SharedClusterView {
        self.view.clone()
    }

    pub fn rpc_addr(&self) -> SocketAddr {
        self.rpc_addr
    }

    /// Stops the driver and waits for its thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn run(
    cfg: ServiceConfig,
    store: MetadataStore,
    view: SharedClusterView,
    stop: Arc<AtomicBool>,
    ready: std::sync::mpsc::Sender<Result<SocketAddr, ServiceError>>,
) {
    let (transport, inbox) =
        match Transport::bind(cfg.rpc_listen, &cfg.identity, cfg.transport.clone()) {
            Ok(t) => t,
            Err(source) => {
                let _ = ready.send(Err(ServiceError::Bind {
                    addr: cfg.rpc_listen,
                    source,
                }));
                return;
            }
        };
    let bound = transport.local_addr();
    let id = &cfg.identity;
    for (node, addr) in &cfg.seeds {
        if *node != id.node_id {
            transport.add_peer(*node, addr.clone());
        }
    }
    let rpc = cfg.advertised_rpc.clone().unwrap_or_else(|| Endpoint {
        host: bound.ip().to_string(),
        port: bound.port(),
    });
    let voters: Vec<NodeId> = cfg.seeds.iter().map(|s| s.0).collect();
    let mut dcfg = DriverConfig::new(
        id.node_id,
        id.node_uuid,
        id.cluster_id.clone(),
        voters,
        rpc,
        cfg.kafka.clone(),
        cfg.shards,
    );
    dcfg.default_replication_factor = cfg.default_replication_factor;
    let start = Instant::now();
    let now_ms = move || start.elapsed().as_millis() as u64;
    let driver: Rc<RefCell<Driver<ReplyTo>>> =
        Rc::new(RefCell::new(Driver::new(dcfg, store, now_ms())));
    let applied = driver.borrow().applied();
    tracing::info!(
        rpc = %bound,
        cluster_id = %id.cluster_id,
        voter = driver.borrow().is_voter(),
        metadata_offset = applied,
        "controller driver started"
    );
    view.set(driver.borrow().view());
    let _ = ready.send(Ok(bound));

    let publish = {
        let (driver, transport, view) = (driver.clone(), transport.clone(), view.clone());
        let last = Rc::new(std::cell::Cell::new(0u64));
        move || {
            let d = &mut *driver.borrow_mut();
            flush(d, &transport);
            if d.generation() != last.get() {
                last.set(d.generation());
                view.set(d.view());
            }
        }
    };
    let publish = Rc::new(publish);

    let receiver = {
        let (driver, publish) = (driver.clone(), publish.clone());
        glommio::spawn_local(async move {
            while let Some(m) = inbox.recv().await {
                let res = driver.borrow_mut().receive(m.from, m.frame, m.reply);
                fatal_on_error(res);
                publish();
            }
        })
    };
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        next += cfg.tick;
        let wait = next.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            // Behind (a slow fsync): skip the missed ticks rather than bursting them.
            next = Instant::now();
        } else {
            glommio::timer::sleep(wait).await;
        }
        let res = driver.borrow_mut().tick(now_ms());
        fatal_on_error(res);
        publish();
    }
    transport.stop();
    drop(receiver);
    tracing::info!("controller driver stopped");
}

fn flush(d: &mut Driver<ReplyTo>, transport: &Transport) {
    for o in d.take_outgoing() {
        let res = match o {
            Outgoing::Peer { to, frame } => transport.send(to, &frame).map_err(|e| e.to_string()),
            Outgoing::Reply { to, frame } => to.send(&frame).map_err(|e| e.to_string()),
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, "rpc frame not sent");
        }
    }
}

/// The metadata log could not be written: the node cannot keep its promises to the quorum
/// (an acknowledged entry may be lost), so it stops rather than continue.
fn fatal_on_error(res: Result<(), StoreError>) {
    if let Err(e) = res {
        tracing::error!(error = %e, "metadata store failed: stopping this node");
        std::process::exit(1);
    }
}
