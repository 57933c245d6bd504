//! Prometheus metrics. One registry for the broker, but every series carries a `shard` label
//! and is written only by that shard: a shard looks its metric instances up once (the only
//! time a family's lock is taken) and keeps the handles, so the hot path is an uncontended
//! atomic add. The scrape thread reads them; what is cheaper to gather than to keep
//! (consumer group lag) it asks the shards for at scrape time (see [`crate::metrics_http`]).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kafka_protocol::messages::ApiKey;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use spate_replication::cluster::ClusterPort;
use spate_replication::controller::service::ServiceStats;
use spate_replication::NodeId;

use crate::shard::TopicPartition;

/// Latency buckets: 50 µs doubling up to about 6.5 s.
const LATENCY_BUCKET_START_SECONDS: f64 = 0.000_05;
const LATENCY_BUCKETS: u16 = 18;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    pub shard: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub shard: u32,
    pub api: String,
    pub error_code: i16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub shard: u32,
    pub topic: String,
    pub partition: i32,
}

/// One replica a move adds to a partition (`spate_reassignment_bytes_behind`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReassignmentLabels {
    pub shard: u32,
    pub topic: String,
    pub partition: i32,
    pub replica: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub shard: u32,
    pub reason: String,
}

/// Why a cluster node's shard dropped a message for the cluster service (the label of
/// `spate_cluster_dropped_messages_total`): the shard never waits on the channel, it drops
/// and relies on consensus retransmits and repeated reports.
pub const DROP_CONSENSUS_CHANNEL_FULL: &str = "consensus_channel_full";
pub const DROP_REPORT_CHANNEL_FULL: &str = "report_channel_full";
/// A peer message for a group busy with disk I/O, past what its shard holds for busy groups
/// (`MAX_DEFERRED_STEPS`, `MAX_DEFERRED_BYTES`, `MAX_SHARD_DEFERRED_BYTES`): retransmitted.
pub const DROP_BUSY_GROUP_FULL: &str = "busy_group_full";

/// Why the cluster service thread dropped something (`spate_cluster_service_dropped_total`;
/// the reasons are [`ServiceStats::by_reason`]'s).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceDropLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub group: String,
    pub topic: String,
    pub partition: i32,
}

/// One committed offset of a consumer group, as its coordinator shard reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommittedOffset {
    /// The shard owning the partition (its gauges carry that label); None if no shard does
    /// (the topic is gone).
    pub owner: Option<usize>,
    pub group: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(
        LATENCY_BUCKET_START_SECONDS,
        2.0,
        LATENCY_BUCKETS,
    ))
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric family of the broker.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    bytes_in: Family<PartitionLabels, Counter>,
    records_in: Family<PartitionLabels, Counter>,
    bytes_out: Family<PartitionLabels, Counter>,
    records_out: Family<PartitionLabels, Counter>,
    log_end_offset: Family<PartitionLabels, Gauge>,
    high_watermark: Family<PartitionLabels, Gauge>,
    produce_latency: HistogramFamily<ShardLabels>,
    fetch_latency: HistogramFamily<ShardLabels>,
    fsync_latency: HistogramFamily<ShardLabels>,
    connections: Family<ShardLabels, Gauge>,
    request_memory_used: Family<ShardLabels, Gauge>,
    request_memory_waits: Family<ShardLabels, Counter>,
    no_space_refusals: Family<PartitionLabels, Counter>,
    cleaner_runs: Family<PartitionLabels, Counter>,
    cleaner_bytes_read: Family<PartitionLabels, Counter>,
    cleaner_bytes_reclaimed: Family<PartitionLabels, Counter>,
    dirty_ratio: Family<PartitionLabels, Gauge<f64, AtomicU64>>,
    replica_leader: Family<PartitionLabels, Gauge>,
    leader_epoch: Family<PartitionLabels, Gauge>,
    replicas: Family<PartitionLabels, Gauge>,
    in_sync_replicas: Family<PartitionLabels, Gauge>,
    under_replicated: Family<PartitionLabels, Gauge>,
    replication_lag: Family<PartitionLabels, Gauge>,
    reassignment_bytes_behind: Family<ReassignmentLabels, Gauge>,
    cluster_dropped: Family<DropLabels, Counter>,
    cluster_quiet: Family<ShardLabels, Gauge>,
    /// A cluster node's port, whose service-thread counters are read at each scrape.
    cluster_port: OnceLock<ClusterPort>,
    scrape: Arc<ScrapeTime>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let hist = || Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            bytes_in: Family::default(),
            records_in: Family::default(),
            bytes_out: Family::default(),
            records_out: Family::default(),
            log_end_offset: Family::default(),
            high_watermark: Family::default(),
            produce_latency: hist(),
            fetch_latency: hist(),
            fsync_latency: hist(),
            connections: Family::default(),
            request_memory_used: Family::default(),
            request_memory_waits: Family::default(),
            no_space_refusals: Family::default(),
            cleaner_runs: Family::default(),
            cleaner_bytes_read: Family::default(),
            cleaner_bytes_reclaimed: Family::default(),
            dirty_ratio: Family::default(),
            replica_leader: Family::default(),
            leader_epoch: Family::default(),
            replicas: Family::default(),
            in_sync_replicas: Family::default(),
            under_replicated: Family::default(),
            replication_lag: Family::default(),
            reassignment_bytes_behind: Family::default(),
            cluster_dropped: Family::default(),
            cluster_quiet: Family::default(),
            cluster_port: OnceLock::new(),
            scrape: Arc::default(),
        };
        let mut r = Registry::default();
        r.register(
            "spate_requests",
            "Requests handled, by API and error code (Produce/Fetch: the first partition error)",
            m.requests.clone(),
        );
        r.register(
            "spate_partition_bytes_in",
            "Record batch bytes appended to the partition",
            m.bytes_in.clone(),
        );
        r.register(
            "spate_partition_records_in",
            "Records appended to the partition",
            m.records_in.clone(),
        );
        r.register(
            "spate_partition_bytes_out",
            "Record batch bytes returned by Fetch from the partition (shard: the one that served the Fetch)",
            m.bytes_out.clone(),
        );
        r.register(
            "spate_partition_records_out",
            "Records returned by Fetch from the partition (shard: the one that served the Fetch)",
            m.records_out.clone(),
        );
        r.register(
            "spate_partition_log_end_offset",
            "Offset the next appended record gets",
            m.log_end_offset.clone(),
        );
        r.register(
            "spate_partition_high_watermark",
            "Offset up to which consumers may read (on a single node: the durable end under flush always, else the log end)",
            m.high_watermark.clone(),
        );
        r.register(
            "spate_produce_latency_seconds",
            "Produce request time, from decoded request to response",
            m.produce_latency.clone(),
        );
        r.register(
            "spate_fetch_latency_seconds",
            "Fetch request time, long-poll waits included",
            m.fetch_latency.clone(),
        );
        r.register(
            "spate_fsync_latency_seconds",
            "Group-commit fdatasync time of partition logs",
            m.fsync_latency.clone(),
        );
        r.register(
            "spate_connections",
            "Open client connections",
            m.connections.clone(),
        );
        r.register(
            "spate_request_memory_used_bytes",
            "Bytes charged to the shard's request memory budget: requests being read, queued or handled, and responses not yet written",
            m.request_memory_used.clone(),
        );
        r.register(
            "spate_request_memory_waits",
            "Requests whose reading waited for the shard's request memory budget (backpressure)",
            m.request_memory_waits.clone(),
        );
        r.register(
            "spate_partition_no_space_refusals",
            "Produce requests refused with KAFKA_STORAGE_ERROR because the disk had no space for them",
            m.no_space_refusals.clone(),
        );
        r.register(
            "spate_cleaner_runs",
            "Times the log cleaner cleaned the partition (compacted topics)",
            m.cleaner_runs.clone(),
        );
        r.register(
            "spate_cleaner_bytes_read",
            "Bytes the log cleaner read from the partition's segments",
            m.cleaner_bytes_read.clone(),
        );
        r.register(
            "spate_cleaner_bytes_reclaimed",
            "Segment bytes the log cleaner freed in the partition",
            m.cleaner_bytes_reclaimed.clone(),
        );
        r.register(
            "spate_partition_dirty_ratio",
            "Dirty bytes over cleanable bytes of a compacted partition, when the cleaner last looked",
            m.dirty_ratio.clone(),
        );
        r.register(
            "spate_partition_leader",
            "1 if this node's replica of the partition is its leader and takes writes, else 0 (cluster nodes)",
            m.replica_leader.clone(),
        );
        r.register(
            "spate_partition_leader_epoch",
            "The leader epoch this node's replica of the partition is in (cluster nodes)",
            m.leader_epoch.clone(),
        );
        r.register(
            "spate_partition_replicas",
            "Replicas (voters) of the partition (cluster nodes)",
            m.replicas.clone(),
        );
        r.register(
            "spate_partition_in_sync_replicas",
            "Replicas caught up to the high watermark, the leader included (reported by the leader only)",
            m.in_sync_replicas.clone(),
        );
        r.register(
            "spate_partition_under_replicated",
            "1 if fewer replicas are in sync than the partition has (reported by the leader only)",
            m.under_replicated.clone(),
        );
        r.register(
            "spate_partition_replication_lag_records",
            "Records below the high watermark the furthest-behind follower has not written (reported by the leader only)",
            m.replication_lag.clone(),
        );
        r.register(
            "spate_reassignment_bytes_behind",
            "Bytes of the leader's log a replica being added by a move has not written yet (reported by the partition's leader while the move is under way)",
            m.reassignment_bytes_behind.clone(),
        );
        r.register(
            "spate_cluster_quiet_partitions",
            "Replicated partitions of the shard that are quiet at its last tick: idle, sending no heartbeats, relying on node-level liveness",
            m.cluster_quiet.clone(),
        );
        r.register(
            "spate_cluster_dropped_messages",
            "Messages a shard dropped instead of waiting for the cluster service's channel, by reason (consensus retransmits, reports repeat)",
            m.cluster_dropped.clone(),
        );
        r.register_collector(Box::new(m.scrape.clone()));
        Metrics { registry: r, ..m }
    }

    /// Exports the counters of `port`'s cluster service thread from now on (a cluster node has
    /// one service thread; every shard holds the same port, the first call wins).
    pub fn watch_cluster_service(&self, port: &ClusterPort) {
        let _ = self.cluster_port.set(port.clone());
    }

    /// This shard's handles; call once per shard, on its thread.
    pub fn for_shard(self: &Arc<Self>, shard: usize) -> ShardMetrics {
        let labels = ShardLabels {
            shard: shard as u32,
        };
        ShardMetrics {
            shard: shard as u32,
            produce_latency: self.produce_latency.get_or_create_owned(&labels),
            fetch_latency: self.fetch_latency.get_or_create_owned(&labels),
            fsync_latency: self.fsync_latency.get_or_create_owned(&labels),
            connections: self.connections.get_or_create_owned(&labels),
            request_memory_used: self.request_memory_used.get_or_create_owned(&labels),
            request_memory_waits: self.request_memory_waits.get_or_create_owned(&labels),
            requests: RefCell::default(),
            fetched: RefCell::default(),
            metrics: self.clone(),
        }
    }

    /// The exposition text (OpenMetrics, which Prometheus reads), with `committed` as the
    /// consumer group offsets known at this scrape.
    pub fn render(&self, committed: Vec<CommittedOffset>) -> String {
        let lag = committed
            .into_iter()
            .map(|c| {
                let end = c.owner.and_then(|owner| {
                    let labels = PartitionLabels {
                        shard: owner as u32,
                        topic: c.topic.clone(),
                        partition: c.partition,
                    };
                    self.log_end_offset.get(&labels).map(|g| g.get())
                });
                (c, end)
            })
            .collect();
        let mut snapshot = self
            .scrape
            .snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *snapshot = Snapshot {
            lag,
            rss_bytes: resident_bytes(),
            cluster_service: self.cluster_port.get().map(ClusterPort::service_stats),
        };
        drop(snapshot);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What the scrape thread gathered just before encoding.
#[derive(Debug, Default)]
struct Snapshot {
    /// Committed offset and the partition's log end, if the partition is open.
    lag: Vec<(CommittedOffset, Option<i64>)>,
    rss_bytes: Option<u64>,
    /// The cluster service thread's counters (cluster nodes).
    cluster_service: Option<ServiceStats>,
}

/// Metrics computed at scrape time. The lock is taken only by the scrape thread.
#[derive(Debug, Default)]
struct ScrapeTime {
    snapshot: Mutex<Snapshot>,
}

impl Collector for ScrapeTime {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rss) = snap.rss_bytes {
            let g = ConstGauge::new(rss as i64);
            let m = encoder.encode_descriptor(
                "spate_memory_resident_bytes",
                "Resident memory of the broker process",
                None,
                g.metric_type(),
            )?;
            g.encode(m)?;
        }
        let committed: Family<GroupLabels, Gauge> = Family::default();
        let lag: Family<GroupLabels, Gauge> = Family::default();
        for (c, end) in &snap.lag {
            let labels = GroupLabels {
                group: c.group.clone(),
                topic: c.topic.clone(),
                partition: c.partition,
            };
            committed.get_or_create(&labels).set(c.offset);
            if let Some(end) = end {
                lag.get_or_create(&labels).set(group_lag(*end, c.offset));
            }
        }
        let m = encoder.encode_descriptor(
            "spate_consumer_group_committed_offset",
            "Offset committed by the consumer group",
            None,
            committed.metric_type(),
        )?;
        committed.encode(m)?;
        let m = encoder.encode_descriptor(
            "spate_consumer_group_lag",
            "Records between the committed offset and the log end (partitions open on a shard)",
            None,
            lag.metric_type(),
        )?;
        lag.encode(m)?;
        if let Some(stats) = &snap.cluster_service {
            let dropped: Family<ServiceDropLabels, Counter> = Family::default();
            for (reason, n) in stats.by_reason() {
                dropped
                    .get_or_create(&ServiceDropLabels {
                        reason: reason.to_string(),
                    })
                    .inc_by(n);
            }
            let m = encoder.encode_descriptor(
                "spate_cluster_service_dropped",
                "What the cluster service thread dropped, by reason: consensus entries for groups not hosted here or for a full shard inbox (consensus resends), shard consensus messages and controller frames the rpc transport refused or dropped from a full send queue, leader reports for groups not placed here and their acknowledgements to a full shard queue (reports repeat)",
                None,
                dropped.metric_type(),
            )?;
            dropped.encode(m)?;
        }
        Ok(())
    }
}

/// Records a group has yet to consume; never negative (a log truncated below the commit).
pub fn group_lag(log_end: i64, committed: i64) -> i64 {
    (log_end - committed.max(0)).max(0)
}

/// Resident set size from /proc/self/statm (pages), if readable.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (page > 0).then(|| pages * page as u64)
}

/// A shard's own metric handles. Not `Send`: only its shard writes them.
pub struct ShardMetrics {
    shard: u32,
    pub produce_latency: Histogram,
    pub fetch_latency: Histogram,
    pub fsync_latency: Histogram,
    pub connections: Gauge,
    pub request_memory_used: Gauge,
    pub request_memory_waits: Counter,
    requests: RefCell<HashMap<(ApiKey, i16), Counter>>,
    /// Fetch output (bytes, records) by partition, counted by the shard that served the Fetch:
    /// only it knows what went into the response.
    fetched: RefCell<HashMap<(String, i32), (Counter, Counter)>>,
    metrics: Arc<Metrics>,
}

impl ShardMetrics {
    /// Counts one handled request.
    pub fn request(&self, api: ApiKey, error_code: i16) {
        if let Some(c) = self.requests.borrow().get(&(api, error_code)) {
            c.inc();
            return;
        }
        let counter = self.metrics.requests.get_or_create_owned(&RequestLabels {
            shard: self.shard,
            api: format!("{api:?}"),
            error_code,
        });
        counter.inc();
        self.requests
            .borrow_mut()
            .insert((api, error_code), counter);
    }

    /// Counts what one Fetch response returned from a partition.
    pub fn fetched(&self, topic: &str, partition: i32, bytes: u64, records: u64) {
        let key = (topic.to_string(), partition);
        let mut cache = self.fetched.borrow_mut();
        let (b, r) = cache.entry(key).or_insert_with(|| {
            let labels = PartitionLabels {
                shard: self.shard,
                topic: topic.to_string(),
                partition,
            };
            (
                self.metrics.bytes_out.get_or_create_owned(&labels),
                self.metrics.records_out.get_or_create_owned(&labels),
            )
        });
        b.inc_by(bytes);
        r.inc_by(records);
    }

    /// The counters of this shard's replication runtime (cluster nodes), for
    /// [`spate_replication::cluster::RuntimeConfig::observer`].
    pub fn cluster_runtime(&self) -> ClusterRuntimeMetrics {
        let counter = |reason: &str| {
            self.metrics
                .cluster_dropped
                .get_or_create_owned(&DropLabels {
                    shard: self.shard,
                    reason: reason.to_string(),
                })
        };
        ClusterRuntimeMetrics {
            quiet: self
                .metrics
                .cluster_quiet
                .get_or_create_owned(&ShardLabels { shard: self.shard }),
            messages_dropped: counter(DROP_CONSENSUS_CHANNEL_FULL),
            reports_dropped: counter(DROP_REPORT_CHANNEL_FULL),
            deferred_dropped: counter(DROP_BUSY_GROUP_FULL),
            seen: Cell::default(),
        }
    }

    pub fn observe_latency(&self, api: ApiKey, took: Duration) {
        match api {
            ApiKey::Produce => self.produce_latency.observe(took.as_secs_f64()),
            ApiKey::Fetch => self.fetch_latency.observe(took.as_secs_f64()),
            _ => {}
        }
    }

    /// Handles for a partition this shard owns.
    pub fn partition(&self, tp: &TopicPartition) -> PartitionMetrics {
        let labels = PartitionLabels {
            shard: self.shard,
            topic: tp.topic.to_string(),
            partition: tp.partition,
        };
        let m = &self.metrics;
        PartitionMetrics {
            bytes_in: m.bytes_in.get_or_create_owned(&labels),
            records_in: m.records_in.get_or_create_owned(&labels),
            log_end_offset: m.log_end_offset.get_or_create_owned(&labels),
            high_watermark: m.high_watermark.get_or_create_owned(&labels),
            no_space_refusals: m.no_space_refusals.get_or_create_owned(&labels),
            moving: RefCell::default(),
            labels,
            metrics: m.clone(),
        }
    }
}

/// A shard's replication runtime counters. The runtime keeps running totals; these counters
/// are moved by what the totals gained since the last look.
pub struct ClusterRuntimeMetrics {
    quiet: Gauge,
    messages_dropped: Counter,
    reports_dropped: Counter,
    deferred_dropped: Counter,
    /// (messages_dropped, reports_dropped, deferred_dropped) at the last look.
    seen: Cell<(u64, u64, u64)>,
}

impl spate_replication::cluster::shard_runtime::RuntimeObserver for ClusterRuntimeMetrics {
    fn stats(&self, stats: &spate_replication::cluster::RuntimeStats) {
        let (messages, reports, deferred) = self.seen.get();
        assert!(
            stats.messages_dropped >= messages
                && stats.reports_dropped >= reports
                && stats.deferred_dropped >= deferred,
            "runtime counters only grow"
        );
        self.messages_dropped
            .inc_by(stats.messages_dropped - messages);
        self.reports_dropped.inc_by(stats.reports_dropped - reports);
        self.deferred_dropped
            .inc_by(stats.deferred_dropped - deferred);
        self.seen.set((
            stats.messages_dropped,
            stats.reports_dropped,
            stats.deferred_dropped,
        ));
        self.quiet
            .set(i64::try_from(stats.quiet_groups).unwrap_or(i64::MAX));
    }
}

/// Sets the gauge of `labels` in `family` to `value`, or removes it when there is none.
fn set_or_remove(
    family: &Family<PartitionLabels, Gauge>,
    labels: &PartitionLabels,
    value: Option<i64>,
) {
    match value {
        Some(v) => {
            family.get_or_create(labels).set(v);
        }
        None => {
            family.remove(labels);
        }
    }
}

/// One partition's handles, kept by the partition.
pub struct PartitionMetrics {
    pub bytes_in: Counter,
    pub records_in: Counter,
    log_end_offset: Gauge,
    high_watermark: Gauge,
    no_space_refusals: Counter,
    /// The replicas whose `spate_reassignment_bytes_behind` series this partition set.
    moving: RefCell<Vec<NodeId>>,
    labels: PartitionLabels,
    metrics: Arc<Metrics>,
}

impl spate_replication::partition::ReplicaObserver for PartitionMetrics {
    fn appended(&self, bytes: u64, records: u64) {
        self.bytes_in.inc_by(bytes);
        self.records_in.inc_by(records);
    }
    fn offsets(&self, log_end: u64, high_watermark: u64) {
        self.set_offsets(log_end, high_watermark);
    }
    fn removed(&self) {
        self.remove();
    }
    fn refused_no_space(&self) {
        self.no_space_refusals.inc();
    }
    fn dirty_ratio(&self, ratio: f64) {
        self.metrics
            .dirty_ratio
            .get_or_create(&self.labels)
            .set(ratio);
    }
    fn cleaned(&self, stats: &spate_replication::partition::CleanStats) {
        let m = &self.metrics;
        m.cleaner_runs.get_or_create(&self.labels).inc();
        m.cleaner_bytes_read
            .get_or_create(&self.labels)
            .inc_by(stats.bytes_read);
        m.cleaner_bytes_reclaimed
            .get_or_create(&self.labels)
            .inc_by(stats.bytes_reclaimed);
    }
    fn replication(&self, state: &spate_replication::partition::ReplicationGauges) {
        let (m, l) = (&self.metrics, &self.labels);
        m.replica_leader
            .get_or_create(l)
            .set(i64::from(state.writable_leader));
        m.leader_epoch
            .get_or_create(l)
            .set(i64::from(state.leader_epoch));
        m.replicas.get_or_create(l).set(state.replicas as i64);
        let isr = state.in_sync_replicas.map(|n| n as i64);
        set_or_remove(&m.in_sync_replicas, l, isr);
        let under = state.under_replicated().map(i64::from);
        set_or_remove(&m.under_replicated, l, under);
        let lag = state
            .lag_records
            .map(|n| i64::try_from(n).unwrap_or(i64::MAX));
        set_or_remove(&m.replication_lag, l, lag);
        self.set_reassignment(&state.reassignment_bytes_behind);
    }
    fn replication_stopped(&self) {
        self.remove_replication();
    }
    fn committed(&self, _high_watermark: u64) {
        // Long-polling fetches wait on their shard's signal; the replica runs on that shard.
        if let Some(shard) = crate::shard::Shard::current() {
            shard.data_arrived.notify();
        }
    }
}

impl PartitionMetrics {
    pub fn set_offsets(&self, log_end: u64, high_watermark: u64) {
        self.log_end_offset.set(log_end as i64);
        self.high_watermark.set(high_watermark as i64);
    }

    /// Drops the partition's series (its topic was deleted).
    pub fn remove(&self) {
        let m = &self.metrics;
        m.bytes_in.remove(&self.labels);
        m.records_in.remove(&self.labels);
        m.log_end_offset.remove(&self.labels);
        m.high_watermark.remove(&self.labels);
        m.no_space_refusals.remove(&self.labels);
        m.cleaner_runs.remove(&self.labels);
        m.cleaner_bytes_read.remove(&self.labels);
        m.cleaner_bytes_reclaimed.remove(&self.labels);
        m.dirty_ratio.remove(&self.labels);
        self.remove_replication();
    }

    /// Sets the bytes behind of each replica a move adds and drops the series of replicas no
    /// longer listed (the move ended, or this node no longer leads it).
    fn set_reassignment(&self, behind: &[(NodeId, u64)]) {
        let family = &self.metrics.reassignment_bytes_behind;
        let labels = |replica: NodeId| ReassignmentLabels {
            shard: self.labels.shard,
            topic: self.labels.topic.clone(),
            partition: self.labels.partition,
            replica,
        };
        let mut moving = self.moving.borrow_mut();
        for gone in moving
            .iter()
            .filter(|n| !behind.iter().any(|(b, _)| b == *n))
        {
            family.remove(&labels(*gone));
        }
        moving.clear();
        for &(n, bytes) in behind {
            family
                .get_or_create(&labels(n))
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            moving.push(n);
        }
    }

    /// Drops the partition's replication series (its group closed on this node).
    pub fn remove_replication(&self) {
        self.set_reassignment(&[]);
        let m = &self.metrics;
        for family in [
            &m.replica_leader,
            &m.leader_epoch,
            &m.replicas,
            &m.in_sync_replicas,
            &m.under_replicated,
            &m.replication_lag,
        ] {
            family.remove(&self.labels);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_handles_show_up_labelled_and_summed_per_series() {
        let m = Arc::new(Metrics::new());
        let s0 = m.for_shard(0);
        let s1 = m.for_shard(1);
        s0.request(ApiKey::Produce, 0);
        s0.request(ApiKey::Produce, 0);
        s1.request(ApiKey::Produce, 0);
        s1.request(ApiKey::Fetch, 1);
        let tp = TopicPartition::new("t", 3);
        let p = s1.partition(&tp);
        p.bytes_in.inc_by(100);
        p.records_in.inc_by(7);
        p.set_offsets(7, 7);
        s0.observe_latency(ApiKey::Produce, Duration::from_millis(2));
        let text = m.render(vec![]);
        for line in [
            "spate_requests_total{shard=\"0\",api=\"Produce\",error_code=\"0\"} 2",
            "spate_requests_total{shard=\"1\",api=\"Produce\",error_code=\"0\"} 1",
            "spate_requests_total{shard=\"1\",api=\"Fetch\",error_code=\"1\"} 1",
            "spate_partition_bytes_in_total{shard=\"1\",topic=\"t\",partition=\"3\"} 100",
            "spate_partition_records_in_total{shard=\"1\",topic=\"t\",partition=\"3\"} 7",
            "spate_partition_log_end_offset{shard=\"1\",topic=\"t\",partition=\"3\"} 7",
            "spate_produce_latency_seconds_count{shard=\"0\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        p.remove();
        let text = m.render(vec![]);
        assert!(!text.contains("topic=\"t\""), "{text}");
    }

    #[test]
    fn lag_is_log_end_minus_committed_for_open_partitions() {
        let m = Arc::new(Metrics::new());
        let tp = TopicPartition::new("orders", 0);
        let owner = 1;
        m.for_shard(owner).partition(&tp).set_offsets(10, 10);
        let committed = |topic: &str, offset| CommittedOffset {
            owner: (topic == "orders").then_some(owner),
            group: "g".into(),
            topic: topic.into(),
            partition: 0,
            offset,
        };
        let text = m.render(vec![committed("orders", 4), committed("gone", 2)]);
        let expect = [
            "spate_consumer_group_lag{group=\"g\",topic=\"orders\",partition=\"0\"} 6",
            "spate_consumer_group_committed_offset{group=\"g\",topic=\"orders\",partition=\"0\"} 4",
            "spate_consumer_group_committed_offset{group=\"g\",topic=\"gone\",partition=\"0\"} 2",
        ];
        for line in expect {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(!text.contains("lag{group=\"g\",topic=\"gone\""), "{text}");
        assert!(text.contains("spate_memory_resident_bytes "), "{text}");
    }

    #[test]
    fn replication_series_follow_the_role_and_go_when_the_group_closes() {
        use spate_replication::cluster::shard_runtime::RuntimeObserver;
        use spate_replication::cluster::RuntimeStats;
        use spate_replication::partition::{ReplicaObserver, ReplicationGauges};
        let m = Arc::new(Metrics::new());
        let shard = m.for_shard(2);
        let p = shard.partition(&TopicPartition::new("r", 0));
        let series = |name: &str| format!("{name}{{shard=\"2\",topic=\"r\",partition=\"0\"}}");
        let leader = ReplicationGauges {
            writable_leader: true,
            leader_epoch: 4,
            replicas: 3,
            in_sync_replicas: Some(2),
            lag_records: Some(17),
            reassignment_bytes_behind: vec![(4, 5_000), (5, 0)],
        };
        p.replication(&leader);
        let text = m.render(vec![]);
        for (name, value) in [
            ("spate_partition_leader", 1),
            ("spate_partition_leader_epoch", 4),
            ("spate_partition_replicas", 3),
            ("spate_partition_in_sync_replicas", 2),
            ("spate_partition_under_replicated", 1),
            ("spate_partition_replication_lag_records", 17),
        ] {
            let line = format!("{} {value}\n", series(name));
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        let behind = |replica: u32| {
            format!("spate_reassignment_bytes_behind{{shard=\"2\",topic=\"r\",partition=\"0\",replica=\"{replica}\"}}")
        };
        assert!(text.contains(&format!("{} 5000\n", behind(4))), "{text}");
        assert!(text.contains(&format!("{} 0\n", behind(5))), "{text}");
        // Node 5 is no longer being added (the move changed): its series goes.
        p.replication(&ReplicationGauges {
            reassignment_bytes_behind: vec![(4, 10)],
            ..leader.clone()
        });
        let text = m.render(vec![]);
        assert!(text.contains(&format!("{} 10\n", behind(4))), "{text}");
        assert!(!text.contains(&behind(5)), "{text}");
        // Demoted: the leader-only series go, the others stay.
        p.replication(&ReplicationGauges {
            writable_leader: false,
            leader_epoch: 5,
            replicas: 3,
            in_sync_replicas: None,
            lag_records: None,
            reassignment_bytes_behind: Vec::new(),
        });
        let text = m.render(vec![]);
        assert!(
            text.contains(&format!("{} 0\n", series("spate_partition_leader"))),
            "{text}"
        );
        assert!(
            text.contains(&format!("{} 5\n", series("spate_partition_leader_epoch"))),
            "{text}"
        );
        for gone in [
            "spate_partition_in_sync_replicas",
            "spate_partition_under_replicated",
            "spate_partition_replication_lag_records",
        ] {
            assert!(!text.contains(&series(gone)), "{gone} still in\n{text}");
        }
        assert!(!text.contains("spate_reassignment_bytes_behind{"), "{text}");
        // Closed here: no replication series left (the partition's others are not ours).
        p.replication_stopped();
        let text = m.render(vec![]);
        for gone in [
            "spate_partition_leader",
            "spate_partition_leader_epoch",
            "spate_partition_replicas",
        ] {
            assert!(!text.contains(&series(gone)), "{gone} still in\n{text}");
        }
        assert!(
            text.contains(&series("spate_partition_log_end_offset")),
            "{text}"
        );

        let runtime = shard.cluster_runtime();
        let dropped = |reason: &str| {
            format!("spate_cluster_dropped_messages_total{{shard=\"2\",reason=\"{reason}\"}}")
        };
        let text = m.render(vec![]);
        assert!(
            text.contains(&format!("{} 0\n", dropped(DROP_CONSENSUS_CHANNEL_FULL))),
            "{text}"
        );
        let mut stats = RuntimeStats {
            messages_dropped: 3,
            reports_dropped: 1,
            ..RuntimeStats::default()
        };
        runtime.stats(&stats);
        runtime.stats(&stats);
        stats.messages_dropped = 5;
        stats.quiet_groups = 7;
        runtime.stats(&stats);
        let text = m.render(vec![]);
        assert!(
            text.contains("spate_cluster_quiet_partitions{shard=\"2\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!("{} 5\n", dropped(DROP_CONSENSUS_CHANNEL_FULL))),
            "{text}"
        );
        assert!(
            text.contains(&format!("{} 1\n", dropped(DROP_REPORT_CHANNEL_FULL))),
            "{text}"
        );
    }

    #[test]
    fn lag_never_goes_negative() {
        assert_eq!(group_lag(10, 4), 6);
        assert_eq!(group_lag(3, 4), 0);
        assert_eq!(group_lag(5, -1), 5);
    }
}
