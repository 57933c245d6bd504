//! Runs produce, consume and e2e: one sender and one receiver thread per connection, a reporter
//! printing a line a second, and histograms merged at the end.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::{ApiKey, FetchRequest, FetchResponse, TopicName};
use kafka_protocol::protocol::StrBytes;

use crate::batch::{batches, encode_batch, read_stamp, record_values};
use crate::cluster::{self, OffsetSpec, TopicLayout};
use crate::config::{Mode, RunConfig, StartFrom};
use crate::error::{PerfError, Result};
use crate::producer::{self, Episode, ProducerSpec, PRODUCE_VERSIONS};
use crate::schedule::RatePlan;
use crate::stats::{Failover, IntervalStats, Latency, RunSummary};
use crate::wire::{decode_response, encode_request, Connection};
// v11 is the last version without tagged fields: some brokers (Tansu 0.6) send tags that are
// not valid for the version they answer, which a strict decoder refuses.
const FETCH_VERSIONS: std::ops::RangeInclusive<i16> = 4..=11;
/// Framing and metadata a fetch reply may carry beyond its record bytes.
const FETCH_REPLY_SLACK_BYTES: usize = 1 << 20;
/// How long e2e consumers may take, after the producers stop, to receive what was acked.
pub const E2E_DRAIN_TIMEOUT_MS: u64 = 10_000;
/// How often waiting threads look at the stop flag.
pub(crate) const STOP_POLL_MS: u64 = 20;
/// Seconds between progress lines.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// State every worker of a run shares.
pub(crate) struct Shared {
    /// Origin of e2e stamps (nanoseconds since it).
    pub(crate) epoch: Instant,
    /// The wall clock at `epoch`, to report failovers in Unix time.
    epoch_unix_ms: i64,
    /// Samples due before this are warm-up.
    pub(crate) measure_from: Instant,
    pub(crate) stop: AtomicBool,
    pub(crate) interval: IntervalStats,
}

impl Shared {
    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// What one worker measured after warm-up.
#[derive(Default)]
pub(crate) struct Measured {
    latency: Latency,
    records: u64,
    bytes: u64,
    last: Option<Instant>,
    /// Fixed rate: per batch, how late it went on the wire.
    pub(crate) send_lag: Latency,
    /// Batches sent again after a refusal or a lost connection.
    retries: u64,
    /// Producers' failovers: first refusal to first acknowledgement after it.
    episodes: Vec<Episode>,
    /// Refused or lost batches by cause.
    causes: std::collections::BTreeMap<i16, u64>,
}

impl Measured {
    pub(crate) fn add(&mut self, records: u64, bytes: u64, latency_ns: u64, at: Instant) {
        self.latency.record_n(latency_ns, records);
        self.records += records;
        self.bytes += bytes;
        self.last = Some(self.last.map_or(at, |l| l.max(at)));
    }

    /// A consumer's fetch refused with a retriable error, or its connection lost.
    pub(crate) fn count_refusal(&mut self, cause: i16) {
        self.retries += 1;
        *self.causes.entry(cause).or_default() += 1;
    }

    pub(crate) fn merge(&mut self, other: Measured) {
        self.latency.merge(&other.latency);
        self.retries += other.retries;
        for (code, n) in other.causes {
            *self.causes.entry(code).or_default() += n;
        }
        self.episodes.extend(other.episodes);
        self.send_lag.merge(&other.send_lag);
        self.records += other.records;
        self.bytes += other.bytes;
        self.last = match (self.last, other.last) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
}

/// The partitions each connection serves and the broker it talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub addr: String,
    pub partitions: Vec<i32>,
}

/// Spreads partitions over connections so that each connection's partitions share a leader.
/// Every leader gets at least one connection (so a run may open more than `connections`); the
/// rest go one by one to the leader with the most partitions per connection so far. Within a
/// leader, with at least as many connections as partitions each connection serves one partition
/// (several may share it); otherwise its partitions go round-robin over its connections.
pub fn assign(leaders: &[(i32, String)], connections: usize) -> Result<Vec<Assignment>> {
    assert!(connections > 0);
    if leaders.is_empty() {
        return Err(PerfError::Protocol("topic has no partitions".into()));
    }
    let mut groups: Vec<(String, Vec<i32>)> = Vec::new();
    for (p, addr) in leaders {
        match groups.iter_mut().find(|(a, _)| a == addr) {
            Some((_, ps)) => ps.push(*p),
            None => groups.push((addr.clone(), vec![*p])),
        }
    }
    let mut per_group = vec![1usize; groups.len()];
    for _ in groups.len()..connections {
        // Most partitions per connection first (ties: the first leader), compared exactly.
        let (best, _) = groups
            .iter()
            .enumerate()
            .max_by(|(i, (_, a)), (j, (_, b))| {
                (a.len() * per_group[*j])
                    .cmp(&(b.len() * per_group[*i]))
                    .then(j.cmp(i))
            })
            .expect("at least one leader");
        per_group[best] += 1;
    }
    let mut out = Vec::with_capacity(connections.max(groups.len()));
    for ((addr, parts), &n) in groups.iter().zip(&per_group) {
        for c in 0..n {
            let mine: Vec<i32> = if n >= parts.len() {
                vec![parts[c % parts.len()]]
            } else {
                parts.iter().skip(c).step_by(n).copied().collect()
            };
            out.push(Assignment {
                addr: addr.clone(),
                partitions: mine,
            });
        }
    }
    Ok(out)
}

pub(crate) fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Lets this thread's timed sleeps end within a microsecond of their deadline: the default
/// timer slack (50 µs) would otherwise be added to every batch's latency in fixed-rate mode.
pub(crate) fn tighten_timer_slack() {
    const SLACK_NS: libc::c_ulong = 1_000;
    // SAFETY: PR_SET_TIMERSLACK takes plain integers and changes only the calling thread.
    let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, SLACK_NS, 0, 0, 0) };
    debug_assert_eq!(
        rc, 0,
        "PR_SET_TIMERSLACK is available on every supported kernel"
    );
}

/// Sleeps until `t` unless the run stops first.
pub(crate) fn sleep_until(t: Instant, stop: &AtomicBool) {
    loop {
        let now = Instant::now();
        if now >= t || stop.load(Ordering::Relaxed) {
            return;
        }
        thread::sleep((t - now).min(Duration::from_millis(STOP_POLL_MS)));
    }
}

/// Runs one benchmark and returns its summary. Progress lines go to stdout.
pub fn run(cfg: &RunConfig) -> Result<RunSummary> {
    let a = &cfg.args;
    let mut meta = cluster::connect_any(&a.bootstrap_servers, cfg.request_timeout)?;
    let layout = cluster::ensure_topic(&mut meta, &a.topic, a.partitions, a.replication_factor)?;
    if layout.leaders.len() != a.partitions as usize {
        eprintln!(
            "note: topic {} exists with {} partitions; using those",
            a.topic,
            layout.leaders.len()
        );
    }
    let plan = assign(&layout.leaders, a.connections)?;
    if plan.len() > a.connections {
        eprintln!(
            "note: {} partition leaders: using {} connections (at least one per leader)",
            plan.iter()
                .map(|p| p.addr.as_str())
                .collect::<std::collections::HashSet<_>>()
                .len(),
            plan.len()
        );
    }
    // Closed before the load starts: an idle connection would count on a broker that spreads
    // connections by count (spate does), and unbalance the ones that carry the load.
    drop(meta);
    match cfg.mode {
        Mode::Produce => run_produce(cfg, &plan, &layout),
        Mode::Consume => run_consume(cfg, &plan, &layout),
        Mode::E2e => run_e2e(cfg, &plan, &layout),
    }
}

fn producer_setups(cfg: &RunConfig, plan: &[Assignment]) -> Result<Vec<ProducerSpec>> {
    let a = &cfg.args;
    let mut setups = Vec::with_capacity(plan.len());
    for assignment in plan {
        let mut conn = Connection::connect(&assignment.addr, cfg.request_timeout)?;
        let version = conn.versions.pick(ApiKey::Produce, PRODUCE_VERSIONS)?;
        let parts = assignment.partitions.len();
        let (records_per_batch, interval) = match a.rate {
            Some(rate) => {
                let per_partition = rate / plan.len() as f64 / parts as f64;
                let p = RatePlan::new(per_partition, a.linger_ms, cfg.records_per_batch);
                (p.records_per_batch, Some(p.interval_ns))
            }
            None => (cfg.records_per_batch, None),
        };
        let values = record_values(records_per_batch, a.record_size, 0x5EED);
        let batch = encode_batch(&values, a.compression.codec(), wall_ms())?;
        let producer = if a.idempotent {
            Some(cluster::init_producer_id(&mut conn)?)
        } else {
            None
        };
        let records_per_unit = (records_per_batch * parts) as u64;
        let max_units = a.records.map(|n| {
            let per_conn = n.div_ceil(plan.len() as u64);
            per_conn.div_ceil(records_per_unit).max(1)
        });
        setups.push(ProducerSpec {
            partitions: assignment.partitions.clone(),
            conn,
            version,
            batch,
            value_bytes_per_batch: (records_per_batch * a.record_size) as u64,
            interval_ns: interval,
            max_units,
            producer,
        });
    }
    Ok(setups)
}

/// What an e2e consumer needs to know about its producer to tell when it has seen everything.
#[derive(Default)]
pub(crate) struct Handoff {
    pub(crate) acked_records: AtomicU64,
    pub(crate) done: AtomicBool,
}

/// Runs one producer slot; its retries and failovers go with what it measured.
fn run_producer(
    spec: ProducerSpec,
    cfg: &RunConfig,
    shared: &Shared,
    topic: &str,
    stamp: bool,
    handoff: Option<&Handoff>,
) -> Result<Measured> {
    let out = producer::run(spec, cfg, shared, topic, stamp, handoff)?;
    let mut m = out.measured;
    m.retries = out.retries;
    m.episodes = out.episodes;
    m.causes = out.causes;
    Ok(m)
}

struct ConsumerPlan {
    conn: Connection,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    /// Stop a partition at this offset (consume mode from earliest: the end at start).
    ends: Option<Vec<i64>>,
    max_records: Option<u64>,
}

/// The partitions (indexes into the consumer's lists) one connection fetches: those its
/// broker leads.
struct FetchLink {
    conn: Connection,
    version: i16,
    members: Vec<usize>,
}

/// Groups the consumer's partitions by leader, reusing the links it has to those brokers; waits
/// (bounded by [`producer::FAILOVER_GIVE_UP_MS`]) while a partition has no leader or its
/// leader, as the metadata still names it, cannot be reached (a killed broker not yet replaced).
fn regroup(
    mut old: Vec<FetchLink>,
    partitions: &[i32],
    router: &mut producer::Router,
    cfg: &RunConfig,
) -> Result<Vec<FetchLink>> {
    let give_up = Instant::now() + Duration::from_millis(producer::FAILOVER_GIVE_UP_MS);
    loop {
        let attempt = router.refresh().and_then(|leaders| {
            let mut out: Vec<FetchLink> = Vec::new();
            for (i, &p) in partitions.iter().enumerate() {
                let Some(addr) = leaders.of(p) else {
                    return Err(PerfError::Protocol(format!("partition {p} has no leader")));
                };
                if let Some(l) = out.iter_mut().find(|l| l.conn.writer.addr() == addr) {
                    l.members.push(i);
                    continue;
                }
                let conn = match old.iter().position(|l| l.conn.writer.addr() == addr) {
                    Some(k) => old.swap_remove(k).conn,
                    None => Connection::connect(addr, cfg.request_timeout)?,
                };
                let version = conn.versions.pick(ApiKey::Fetch, FETCH_VERSIONS)?;
                out.push(FetchLink {
                    conn,
                    version,
                    members: vec![i],
                });
            }
            Ok(out)
        });
        match attempt {
            Ok(links) => return Ok(links),
            Err(e) if Instant::now() >= give_up => {
                return Err(PerfError::Protocol(format!(
                    "partitions {partitions:?} not readable for {} ms: {e}",
                    producer::FAILOVER_GIVE_UP_MS
                )))
            }
            Err(_) => {
                router.rotate();
                thread::sleep(Duration::from_millis(producer::RETRY_BACKOFF_MS));
            }
        }
    }
}

fn run_consumer(
    plan: ConsumerPlan,
    cfg: &RunConfig,
    shared: &Shared,
    topic: &str,
    handoff: Option<&Handoff>,
) -> Result<Measured> {
    let a = &cfg.args;
    let ConsumerPlan {
        conn,
        partitions,
        mut offsets,
        ends,
        max_records,
    } = plan;
    let version = conn.versions.pick(ApiKey::Fetch, FETCH_VERSIONS)?;
    // A partition's leader can move mid-run (a failover, the cluster's leader balancer): the
    // consumer then fetches each partition from its new leader, one request per leader.
    let mut links = vec![FetchLink {
        conn,
        version,
        members: (0..partitions.len()).collect(),
    }];
    let mut router = producer::Router::new(topic, a.bootstrap_servers.clone(), cfg.request_timeout);
    let e2e = handoff.is_some();
    let mut measured = Measured::default();
    let mut received: u64 = 0;
    let mut drain_deadline: Option<Instant> = None;
    let mut frame = BytesMut::new();
    let topic_name = TopicName(StrBytes::from_string(topic.to_string()));
    let max_bytes = i32::try_from(a.fetch_max_bytes).unwrap_or(i32::MAX);
    let reached_end = |offsets: &[i64]| {
        ends.as_ref()
            .is_some_and(|e| offsets.iter().zip(e).all(|(o, e)| o >= e))
    };
    loop {
        if reached_end(&offsets) || max_records.is_some_and(|m| received >= m) {
            break;
        }
        match handoff {
            Some(h) if h.done.load(Ordering::Acquire) => {
                let acked = h.acked_records.load(Ordering::Relaxed);
                if received >= acked {
                    break;
                }
                let deadline = *drain_deadline.get_or_insert_with(|| {
                    Instant::now() + Duration::from_millis(E2E_DRAIN_TIMEOUT_MS)
                });
                if Instant::now() > deadline {
                    return Err(PerfError::Protocol(format!(
                        "{} acked records were not fetched within {E2E_DRAIN_TIMEOUT_MS} ms",
                        acked - received
                    )));
                }
            }
            Some(_) => {}
            None if shared.stopped() => break,
            None => {}
        }
        // Every leader's request goes out before any reply is read, so one long poll does not
        // hold the others back.
        let mut sent_ids = Vec::with_capacity(links.len());
        let mut stale = false;
        let sent = Instant::now();
        for link in &mut links {
            let fetch_partitions = link
                .members
                .iter()
                .map(|&i| {
                    FetchPartition::default()
                        .with_partition(partitions[i])
                        .with_fetch_offset(offsets[i])
                        .with_partition_max_bytes(max_bytes)
                })
                .collect();
            let req = FetchRequest::default()
                .with_max_wait_ms(a.fetch_max_wait_ms)
                .with_min_bytes(1)
                .with_max_bytes(max_bytes)
                .with_topics(vec![FetchTopic::default()
                    .with_topic(topic_name.clone())
                    .with_partitions(fetch_partitions)]);
            let id = link.conn.next_correlation_id();
            encode_request(&mut frame, ApiKey::Fetch, link.version, id, &req)?;
            match link.conn.writer.write_frame(&frame) {
                Ok(()) => sent_ids.push(Some(id)),
                Err(_) => {
                    stale = true;
                    sent_ids.push(None);
                }
            }
        }
        let mut fetched_records = 0u64;
        let mut fetched_bytes = 0u64;
        let mut broken: Vec<bool> = sent_ids.iter().map(Option::is_none).collect();
        for ((link, id), broken) in links.iter_mut().zip(&sent_ids).zip(&mut broken) {
            let Some(id) = *id else { continue };
            let reply_frame = match link
                .conn
                .reader
                .read_frame(a.fetch_max_bytes + FETCH_REPLY_SLACK_BYTES)
            {
                Ok(f) => f,
                Err(_) => {
                    // The connection is gone (a killed broker): find the leaders again.
                    *broken = true;
                    stale = true;
                    measured.count_refusal(producer::CONNECTION_LOST);
                    continue;
                }
            };
            let now = Instant::now();
            let reply: FetchResponse =
                decode_response(reply_frame, ApiKey::Fetch, link.version, id)?;
            if reply.error_code != 0 {
                if producer::RETRIABLE.contains(&reply.error_code) {
                    stale = true;
                    measured.count_refusal(reply.error_code);
                    continue;
                }
                return Err(PerfError::broker("Fetch", reply.error_code));
            }
            for t in &reply.responses {
                for p in &t.partitions {
                    if p.error_code != 0 {
                        if producer::RETRIABLE.contains(&p.error_code) {
                            stale = true;
                            measured.count_refusal(p.error_code);
                            continue;
                        }
                        return Err(PerfError::broker(
                            format!("Fetch partition {}", p.partition_index),
                            p.error_code,
                        ));
                    }
                    let Some(i) = partitions.iter().position(|&x| x == p.partition_index) else {
                        continue;
                    };
                    let Some(records) = &p.records else { continue };
                    for (view, bytes) in batches(records) {
                        let next = view.next_offset();
                        if next <= offsets[i] {
                            continue; // a batch before the fetch offset
                        }
                        if view.control {
                            // A replicated log's leader marks its epoch with a control batch:
                            // it takes offsets but holds no produced record.
                            offsets[i] = next;
                            continue;
                        }
                        let n = if view.base_offset >= offsets[i] {
                            u64::try_from(view.record_count).unwrap_or(0)
                        } else {
                            u64::try_from(next - offsets[i]).unwrap_or(0)
                        };
                        offsets[i] = next;
                        fetched_records += n;
                        fetched_bytes += bytes.len() as u64;
                        if e2e {
                            let stamp = read_stamp(bytes, view.compressed).ok_or_else(|| {
                                PerfError::Protocol(
                                    "fetched batch carries no send-time stamp".into(),
                                )
                            })?;
                            let sent_at = shared.epoch + Duration::from_nanos(stamp);
                            let latency = nanos(now.saturating_duration_since(sent_at));
                            shared.interval.add(n, bytes.len() as u64, latency);
                            if sent_at >= shared.measure_from {
                                measured.add(n, bytes.len() as u64, latency, now);
                            }
                        }
                    }
                }
            }
        }
        let now = Instant::now();
        received += fetched_records;
        if !e2e && fetched_records > 0 {
            let latency = nanos(now - sent);
            shared.interval.add(fetched_records, fetched_bytes, latency);
            if sent >= shared.measure_from {
                measured.add(fetched_records, fetched_bytes, latency, now);
            }
        }
        if stale {
            // A link whose request or reply failed is dropped (its socket may hold a reply
            // not read); the others are kept for their leaders.
            let kept: Vec<FetchLink> = links
                .into_iter()
                .zip(&broken)
                .filter(|(_, broken)| !**broken)
                .map(|(l, _)| l)
                .collect();
            links = regroup(kept, &partitions, &mut router, cfg)?;
        }
    }
    Ok(measured)
}

/// Runs workers, printing a line a second, until they finish or the duration is up.
fn drive<T: Send>(
    cfg: &RunConfig,
    shared: &Shared,
    workers: Vec<Box<dyn FnOnce() -> Result<T> + Send + '_>>,
) -> Result<Vec<T>> {
    let deadline = cfg.duration.map(|d| shared.measure_from + d);
    thread::scope(|s| {
        let handles: Vec<_> = workers
            .into_iter()
            .map(|w| {
                s.spawn(move || {
                    let r = w();
                    if r.is_err() {
                        shared.stop.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        let mut tick = Instant::now();
        loop {
            let done = handles.iter().all(|h| h.is_finished());
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                shared.stop.store(true, Ordering::Relaxed);
            }
            if now >= tick + REPORT_INTERVAL || done {
                let snap = shared.interval.drain();
                let secs = (now - tick).as_secs_f64();
                if !done || snap.records > 0 {
                    println!("{}", snap.line(secs, tick < shared.measure_from));
                }
                tick = now;
            }
            if done {
                break;
            }
            thread::sleep(Duration::from_millis(STOP_POLL_MS));
        }
        let mut out = Vec::with_capacity(handles.len());
        let mut first_err = None;
        for h in handles {
            match h.join().expect("worker thread panicked") {
                Ok(v) => out.push(v),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    })
}

fn summarize(cfg: &RunConfig, shared: &Shared, parts: Vec<Measured>) -> RunSummary {
    let a = &cfg.args;
    let mut all = Measured::default();
    for m in parts {
        all.merge(m);
    }
    let seconds = all.last.map_or(0.0, |l| {
        l.saturating_duration_since(shared.measure_from)
            .as_secs_f64()
    });
    let per_sec = |x: u64| {
        if seconds > 0.0 {
            x as f64 / seconds
        } else {
            0.0
        }
    };
    let label = a.label.clone().unwrap_or_else(|| {
        let rate = a.rate.map(|r| format!(" @{r:.0}/s")).unwrap_or_default();
        format!(
            "{} {}B acks={}{rate}",
            cfg.mode.name(),
            a.record_size,
            a.acks
        )
    });
    RunSummary {
        label,
        mode: cfg.mode.name().to_string(),
        config: serde_json::to_value(a).unwrap_or(serde_json::Value::Null),
        records: all.records,
        bytes: all.bytes,
        seconds,
        records_per_sec: per_sec(all.records),
        mb_per_sec: per_sec(all.bytes) / 1e6,
        latency: all.latency.summary(),
        send_lag: a.rate.map(|_| all.send_lag.summary()),
        retries: all.retries,
        retry_causes: all
            .causes
            .iter()
            .map(|(&code, &n)| {
                let name = if code == producer::CONNECTION_LOST {
                    "CONNECTION_LOST".to_string()
                } else {
                    crate::error::kafka_error_name(code)
                };
                (name, n)
            })
            .collect(),
        failover_time_ms: failing_ms(&all.episodes),
        failovers: {
            let mut f: Vec<Failover> = all
                .episodes
                .iter()
                .map(|e| {
                    let unix = |t: Instant| {
                        shared.epoch_unix_ms
                            + i64::try_from(t.saturating_duration_since(shared.epoch).as_millis())
                                .unwrap_or(i64::MAX / 2)
                    };
                    Failover {
                        start_unix_ms: unix(e.start),
                        first_ack_unix_ms: unix(e.first_ack),
                        ms: (e.first_ack.saturating_duration_since(e.start)).as_secs_f64() * 1e3,
                    }
                })
                .collect();
            f.sort_by_key(|x| x.start_unix_ms);
            f
        },
    }
}

/// Milliseconds during which at least one producer was failing over (the union of episodes).
fn failing_ms(episodes: &[Episode]) -> f64 {
    let mut spans: Vec<(Instant, Instant)> =
        episodes.iter().map(|e| (e.start, e.first_ack)).collect();
    spans.sort();
    let mut total = Duration::ZERO;
    let mut current: Option<(Instant, Instant)> = None;
    for (s, e) in spans {
        current = match current {
            Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                total += ce.saturating_duration_since(cs);
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    if let Some((cs, ce)) = current {
        total += ce.saturating_duration_since(cs);
    }
    total.as_secs_f64() * 1e3
}

fn new_shared(cfg: &RunConfig) -> Shared {
    let epoch = Instant::now();
    Shared {
        epoch,
        epoch_unix_ms: wall_ms(),
        measure_from: epoch + cfg.warmup,
        stop: AtomicBool::new(false),
        interval: IntervalStats::default(),
    }
}

fn run_produce(cfg: &RunConfig, plan: &[Assignment], layout: &TopicLayout) -> Result<RunSummary> {
    let setups = producer_setups(cfg, plan)?;
    let shared = new_shared(cfg);
    let shared_ref = &shared;
    let topic = layout.topic.as_str();
    let workers: Vec<Box<dyn FnOnce() -> Result<Measured> + Send + '_>> = setups
        .into_iter()
        .map(|s| {
            Box::new(move || run_producer(s, cfg, shared_ref, topic, false, None))
                as Box<dyn FnOnce() -> Result<Measured> + Send + '_>
        })
        .collect();
    let parts = drive(cfg, &shared, workers)?;
    Ok(summarize(cfg, &shared, parts))
}

fn run_consume(cfg: &RunConfig, plan: &[Assignment], layout: &TopicLayout) -> Result<RunSummary> {
    let a = &cfg.args;
    let mut plans = Vec::with_capacity(plan.len());
    let mut total_available = 0i64;
    for assignment in plan {
        let mut conn = Connection::connect(&assignment.addr, cfg.request_timeout)?;
        let latest = cluster::list_offsets(
            &mut conn,
            &layout.topic,
            &assignment.partitions,
            OffsetSpec::Latest,
        )?;
        let (offsets, ends) = match a.from {
            StartFrom::Earliest => {
                let earliest = cluster::list_offsets(
                    &mut conn,
                    &layout.topic,
                    &assignment.partitions,
                    OffsetSpec::Earliest,
                )?;
                total_available += latest
                    .iter()
                    .zip(&earliest)
                    .map(|(l, e)| l - e)
                    .sum::<i64>();
                (earliest, Some(latest))
            }
            StartFrom::Latest => (latest, None),
        };
        plans.push(ConsumerPlan {
            conn,
            partitions: assignment.partitions.clone(),
            offsets,
            ends,
            max_records: a.records.map(|n| n.div_ceil(plan.len() as u64)),
        });
    }
    if a.from == StartFrom::Earliest && total_available == 0 {
        return Err(PerfError::Args(format!(
            "topic {} is empty: produce to it first",
            layout.topic
        )));
    }
    if a.from == StartFrom::Latest && a.records.is_none() && cfg.duration.is_none() {
        return Err(PerfError::Args(
            "--from latest needs --records or --duration-secs to know when to stop".into(),
        ));
    }
    let shared = new_shared(cfg);
    let shared_ref = &shared;
    let topic = layout.topic.as_str();
    let workers: Vec<Box<dyn FnOnce() -> Result<Measured> + Send + '_>> = plans
        .into_iter()
        .map(|p| {
            Box::new(move || run_consumer(p, cfg, shared_ref, topic, None))
                as Box<dyn FnOnce() -> Result<Measured> + Send + '_>
        })
        .collect();
    let parts = drive(cfg, &shared, workers)?;
    Ok(summarize(cfg, &shared, parts))
}

fn run_e2e(cfg: &RunConfig, plan: &[Assignment], layout: &TopicLayout) -> Result<RunSummary> {
    // Each consumer reads what its own producer writes; a shared partition would be read twice.
    let mut seen = std::collections::HashSet::new();
    if !plan
        .iter()
        .flat_map(|a| &a.partitions)
        .all(|p| seen.insert(*p))
    {
        return Err(PerfError::Args(format!(
            "e2e needs at least as many partitions as connections (topic {} has {})",
            layout.topic,
            layout.leaders.len()
        )));
    }
    let mut consumers = Vec::with_capacity(plan.len());
    for assignment in plan {
        let mut conn = Connection::connect(&assignment.addr, cfg.request_timeout)?;
        let latest = cluster::list_offsets(
            &mut conn,
            &layout.topic,
            &assignment.partitions,
            OffsetSpec::Latest,
        )?;
        consumers.push(ConsumerPlan {
            conn,
            partitions: assignment.partitions.clone(),
            offsets: latest,
            ends: None,
            max_records: None,
        });
    }
    let producers = producer_setups(cfg, plan)?;
    let handoffs: Vec<Handoff> = plan.iter().map(|_| Handoff::default()).collect();
    let shared = new_shared(cfg);
    let shared_ref = &shared;
    let topic = layout.topic.as_str();
    // e2e reports what the consumers saw, and the producers' send lag.
    let mut workers: Vec<Box<dyn FnOnce() -> Result<Measured> + Send + '_>> = Vec::new();
    for ((p, c), h) in producers.into_iter().zip(consumers).zip(&handoffs) {
        workers.push(Box::new(move || {
            // Only the send lag and retries: the rest counts acks, which e2e does not report.
            run_producer(p, cfg, shared_ref, topic, true, Some(h)).map(|m| Measured {
                send_lag: m.send_lag,
                retries: m.retries,
                episodes: m.episodes,
                causes: m.causes,
                ..Measured::default()
            })
        }));
        workers.push(Box::new(move || {
            run_consumer(c, cfg, shared_ref, topic, Some(h))
        }));
    }
    let parts = drive(cfg, &shared, workers)?;
    Ok(summarize(cfg, &shared, parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaders(n: i32, addr: &str) -> Vec<(i32, String)> {
        (0..n).map(|p| (p, addr.to_string())).collect()
    }

    #[test]
    fn more_connections_than_partitions_share_partitions() {
        let plan = assign(&leaders(2, "a:1"), 4).unwrap();
        let parts: Vec<_> = plan.iter().map(|a| a.partitions.clone()).collect();
        assert_eq!(parts, vec![vec![0], vec![1], vec![0], vec![1]]);
    }

    #[test]
    fn fewer_connections_take_partitions_round_robin() {
        let plan = assign(&leaders(5, "a:1"), 2).unwrap();
        assert_eq!(plan[0].partitions, vec![0, 2, 4]);
        assert_eq!(plan[1].partitions, vec![1, 3]);
    }

    #[test]
    fn every_leader_gets_a_connection_even_when_fewer_are_asked_for() {
        let l = vec![(0, "a:1".to_string()), (1, "b:1".to_string())];
        for n in [1, 2] {
            let plan = assign(&l, n).unwrap();
            assert_eq!(plan.len(), 2);
            assert_eq!(
                (plan[0].addr.as_str(), &plan[0].partitions[..]),
                ("a:1", &[0][..])
            );
            assert_eq!(
                (plan[1].addr.as_str(), &plan[1].partitions[..]),
                ("b:1", &[1][..])
            );
        }
    }

    #[test]
    fn extra_connections_go_to_the_leaders_with_most_partitions_each() {
        // a leads 4 partitions, b 2, c 1: the two extra connections go to a (4 per connection),
        // then, at a tie of 2 per connection, to a again (the first leader).
        let l: Vec<(i32, String)> = [
            (0, "a"),
            (1, "b"),
            (2, "a"),
            (3, "c"),
            (4, "a"),
            (5, "b"),
            (6, "a"),
        ]
        .iter()
        .map(|(p, a)| (*p, a.to_string()))
        .collect();
        let plan = assign(&l, 5).unwrap();
        let of = |addr: &str| -> Vec<Vec<i32>> {
            plan.iter()
                .filter(|a| a.addr == addr)
                .map(|a| a.partitions.clone())
                .collect()
        };
        assert_eq!(of("a"), vec![vec![0, 6], vec![2], vec![4]]);
        assert_eq!(of("b"), vec![vec![1, 5]]);
        assert_eq!(of("c"), vec![vec![3]]);
        // Every partition is served, and a connection's partitions share a leader.
        let mut all: Vec<i32> = plan.iter().flat_map(|a| a.partitions.clone()).collect();
        all.sort();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
    }

    #[test]
    fn failing_time_is_the_union_of_overlapping_failovers() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let e = |a: u64, b: u64| Episode {
            start: ms(a),
            first_ack: ms(b),
        };
        let total = failing_ms(&[e(0, 100), e(50, 150), e(300, 400)]);
        assert!((total - 250.0).abs() < 1e-6, "{total}");
        assert_eq!(failing_ms(&[]), 0.0);
    }
}
