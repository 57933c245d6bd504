//! The producer of produce and e2e runs, one per connection slot: it sends each scheduled unit
//! (one batch to each of its partitions) to the partitions' leaders, and follows leadership
//! changes. A retriable refusal (NOT_LEADER_OR_FOLLOWER, LEADER_NOT_AVAILABLE, fenced or unknown
//! leader epoch, NOT_ENOUGH_REPLICAS(_AFTER_APPEND), REQUEST_TIMED_OUT, an unknown partition) or
//! a dropped connection stops sending, refreshes the leaders, re-sends what was not acknowledged
//! and carries on; such re-sends are counted as retries, not failures. Latency of a re-sent batch
//! is still measured from its first (intended) send, and the schedule of fixed-rate mode keeps
//! running through a failover, so a leader kill shows in the tail.
//!
//! With `--idempotent` every slot is an idempotent producer of its own (InitProducerId): unit
//! `n` carries base sequence `n * records_per_batch` on each partition, so a re-send repeats
//! the same sequence and the broker answers a batch it already has with its original offset
//! instead of appending it twice. Without it a re-send of a batch the old leader did append may
//! store it twice; the counts are of acknowledged batches either way.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, ProduceResponse};

use crate::batch::ProduceTemplate;
use crate::cluster::{self, Leaders};
use crate::config::RunConfig;
use crate::error::{PerfError, Result};
use crate::runner::{nanos, sleep_until, tighten_timer_slack, wall_ms, Handoff, Measured, Shared};
use crate::schedule::Schedule;
use crate::stats::Latency;
use crate::wire::{
    decode_response, set_correlation_id, Connection, FrameReader, FrameWriter,
    MAX_CONTROL_FRAME_BYTES,
};

/// Produce versions spate-perf speaks (v10 and later carry KIP-951 leader hints).
pub const PRODUCE_VERSIONS: std::ops::RangeInclusive<i16> = 3..=12;
/// A producer failing over for longer than this (no acknowledgement of what it re-sends) fails
/// the run: the cluster is down, not electing.
pub const FAILOVER_GIVE_UP_MS: u64 = 30_000;
/// Pause between attempts while a partition has no leader or a re-send was refused again.
pub const RETRY_BACKOFF_MS: u64 = 20;

/// Kafka error codes that mean "not now, not here": refresh the leaders and send again.
pub(crate) const RETRIABLE: [i16; 8] = [
    3,  // UNKNOWN_TOPIC_OR_PARTITION: a restarted replica that has not applied the topic yet
    5,  // LEADER_NOT_AVAILABLE
    6,  // NOT_LEADER_OR_FOLLOWER
    7,  // REQUEST_TIMED_OUT
    19, // NOT_ENOUGH_REPLICAS
    20, // NOT_ENOUGH_REPLICAS_AFTER_APPEND
    74, // FENCED_LEADER_EPOCH
    75, // UNKNOWN_LEADER_EPOCH
];
/// The refusal cause counted for a batch lost with its connection.
pub const CONNECTION_LOST: i16 = -1;
/// OUT_OF_ORDER_SEQUENCE_NUMBER: retriable only behind an earlier refusal of the same producer
/// (the batches after a refused one are refused for the gap), an error otherwise.
const OUT_OF_ORDER_SEQUENCE: i16 = 45;

/// Everything one producer slot is given before the run starts.
pub(crate) struct ProducerSpec {
    pub partitions: Vec<i32>,
    /// The connection to the partitions' leader at the start.
    pub conn: Connection,
    pub version: i16,
    /// The batch every partition gets in every unit.
    pub batch: Bytes,
    pub value_bytes_per_batch: u64,
    pub interval_ns: Option<f64>,
    /// Stop after this many units (and once none waits for a re-send).
    pub max_units: Option<u64>,
    /// Idempotent producer id and epoch.
    pub producer: Option<(i64, i16)>,
}

/// A batch that was refused or lost with its connection: unit, its (intended) send time, and
/// the partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Pending {
    unit: u64,
    due: Instant,
    partition: i32,
}

/// One connection of a producer: both halves of the socket and its correlation ids.
struct Link {
    addr: String,
    reader: FrameReader,
    writer: FrameWriter,
    version: i16,
    next_id: i32,
}

impl Link {
    fn connect(addr: &str, timeout: Duration) -> Result<Link> {
        let conn = Connection::connect(addr, timeout)?;
        Link::of(addr, conn)
    }

    fn of(addr: &str, conn: Connection) -> Result<Link> {
        let version = conn.versions.pick(ApiKey::Produce, PRODUCE_VERSIONS)?;
        let Connection { reader, writer, .. } = conn;
        Ok(Link {
            addr: addr.to_string(),
            reader,
            writer,
            version,
            next_id: 0,
        })
    }

    fn next_id(&mut self) -> i32 {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.next_id
    }
}

/// The partitions one link carries in an epoch, and their request.
struct Route {
    link: Link,
    partitions: Vec<i32>,
    template: ProduceTemplate,
}

/// Finds partition leaders for one producer (or consumer), asking the brokers it knows in turn.
pub(crate) struct Router {
    topic: String,
    known: Vec<String>,
    next: usize,
    conn: Option<Connection>,
    timeout: Duration,
}

impl Router {
    pub(crate) fn new(topic: &str, known: Vec<String>, timeout: Duration) -> Router {
        Router {
            topic: topic.to_string(),
            known,
            next: 0,
            conn: None,
            timeout,
        }
    }

    pub(crate) fn refresh(&mut self) -> Result<Leaders> {
        let mut last = None;
        for _ in 0..self.known.len() {
            if self.conn.is_none() {
                let addr = &self.known[self.next % self.known.len()];
                self.next += 1;
                match Connection::connect(addr, self.timeout) {
                    Ok(c) => self.conn = Some(c),
                    Err(e) => {
                        last = Some(e);
                        continue;
                    }
                }
            }
            let conn = self.conn.as_mut().expect("connected above");
            match cluster::leaders(conn, &self.topic) {
                Ok(l) => {
                    for b in &l.brokers {
                        if !self.known.contains(b) {
                            self.known.push(b.clone());
                        }
                    }
                    return Ok(l);
                }
                Err(e) => {
                    self.conn = None;
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| PerfError::Protocol("no broker to ask for metadata".into())))
    }

    /// The next refresh asks another broker (this one's view may be stale).
    pub(crate) fn rotate(&mut self) {
        self.conn = None;
    }
}

/// A failover seen by one producer: the first refusal or lost connection, and the first
/// acknowledgement after it.
#[derive(Debug, Clone, Copy)]
pub struct Episode {
    pub start: Instant,
    pub first_ack: Instant,
}

/// What a producer measured, with its retries and failovers.
pub(crate) struct ProducerOutcome {
    pub(crate) measured: Measured,
    pub retries: u64,
    /// Refused or lost batches by Kafka error code ([`CONNECTION_LOST`]: the connection).
    pub causes: BTreeMap<i16, u64>,
    pub episodes: Vec<Episode>,
}

fn retriable(code: i16) -> bool {
    RETRIABLE.contains(&code)
}

/// KIP-951: where a refusal says the partition's leader is now.
fn hints(reply: &ProduceResponse) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for t in &reply.responses {
        for p in &t.partition_responses {
            if p.error_code == 0 || p.current_leader.leader_id.0 < 0 {
                continue;
            }
            if let Some(n) = reply
                .node_endpoints
                .iter()
                .find(|n| n.node_id == p.current_leader.leader_id)
            {
                out.push((p.index, format!("{}:{}", n.host.as_str(), n.port)));
            }
        }
    }
    out
}

struct InFlight {
    correlation_id: i32,
    unit: u64,
    due: Instant,
}

/// What one route's reader saw in an epoch.
#[derive(Default)]
struct RouteEnd {
    measured: Measured,
    failed: Vec<Pending>,
    hints: Vec<(i32, String)>,
    broken: bool,
    causes: BTreeMap<i16, u64>,
    first_fail: Option<Instant>,
    first_ok: Option<Instant>,
}

struct Run<'a> {
    cfg: &'a RunConfig,
    shared: &'a Shared,
    stamp: bool,
    handoff: Option<&'a Handoff>,
    topic: &'a str,
    batch: Bytes,
    value_bytes: u64,
    producer: Option<(i64, i16)>,
    records_per_batch: u64,
}

impl Run<'_> {
    fn template(&self, partitions: &[i32], version: i16) -> Result<ProduceTemplate> {
        let a = &self.cfg.args;
        let mut t = ProduceTemplate::build(
            self.topic,
            partitions,
            &self.batch,
            self.value_bytes,
            a.acks,
            i32::try_from(a.request_timeout_ms).unwrap_or(i32::MAX),
            version,
        )?;
        if let Some((id, epoch)) = self.producer {
            t.set_producer(id, epoch);
        }
        Ok(t)
    }

    /// Base sequence of unit `n` (Kafka sequences wrap from i32::MAX to 0).
    fn sequence(&self, unit: u64) -> i32 {
        ((unit.wrapping_mul(self.records_per_batch)) % (i32::MAX as u64 + 1)) as i32
    }

    /// Sets what changes per send: the sequence and, in e2e, the send-time stamp.
    fn prepare(&self, t: &mut ProduceTemplate, unit: u64, due: Instant) {
        if self.producer.is_some() {
            t.set_sequence(self.sequence(unit));
        }
        if self.stamp {
            let ok = t.stamp(nanos(due - self.shared.epoch), wall_ms());
            assert!(ok, "e2e validation keeps batches uncompressed");
        }
    }

    fn acked(&self, m: &mut Measured, due: Instant, now: Instant) {
        let latency = nanos(now.saturating_duration_since(due));
        if !self.stamp {
            // In e2e the consumers report; acks would double count.
            self.shared
                .interval
                .add(self.records_per_batch, self.value_bytes, latency);
        }
        if due >= self.shared.measure_from {
            m.add(self.records_per_batch, self.value_bytes, latency, now);
        }
        if let Some(h) = self.handoff {
            h.acked_records
                .fetch_add(self.records_per_batch, Ordering::Relaxed);
        }
    }
}

/// Runs one producer slot to the end of the run.
pub(crate) fn run(
    spec: ProducerSpec,
    cfg: &RunConfig,
    shared: &Shared,
    topic: &str,
    stamp: bool,
    handoff: Option<&Handoff>,
) -> Result<ProducerOutcome> {
    let result = run_inner(spec, cfg, shared, topic, stamp, handoff);
    if let Some(h) = handoff {
        h.done.store(true, Ordering::Release);
    }
    if result.is_err() {
        shared.stop.store(true, Ordering::Relaxed);
    }
    result
}

fn run_inner(
    spec: ProducerSpec,
    cfg: &RunConfig,
    shared: &Shared,
    topic: &str,
    stamp: bool,
    handoff: Option<&Handoff>,
) -> Result<ProducerOutcome> {
    let ProducerSpec {
        partitions,
        conn,
        version,
        batch,
        value_bytes_per_batch,
        interval_ns,
        max_units,
        producer,
    } = spec;
    let records_per_batch = crate::batch::BatchView::parse(&batch)
        .map(|v| v.record_count as u64)
        .ok_or_else(|| PerfError::Protocol("template batch is not a batch".into()))?;
    let run = Run {
        cfg,
        shared,
        stamp,
        handoff,
        topic,
        batch,
        value_bytes: value_bytes_per_batch,
        producer,
        records_per_batch,
    };
    if interval_ns.is_some() {
        tighten_timer_slack();
    }
    let start = Instant::now().max(shared.epoch);
    let schedule = match interval_ns {
        Some(i) => Schedule::fixed(start, i),
        None => Schedule::unthrottled(start),
    };
    let mut router = Router {
        topic: topic.to_string(),
        known: cfg.args.bootstrap_servers.clone(),
        next: 0,
        conn: None,
        timeout: cfg.request_timeout,
    };
    let first_addr = conn.writer.addr().to_string();
    let first = Link::of(&first_addr, conn)?;
    debug_assert_eq!(first.version, version);
    let template = run.template(&partitions, first.version)?;
    let mut routes = vec![Route {
        link: first,
        partitions: partitions.clone(),
        template,
    }];
    let mut out = ProducerOutcome {
        measured: Measured::default(),
        retries: 0,
        causes: BTreeMap::new(),
        episodes: Vec::new(),
    };
    let mut unit: u64 = 0;
    let mut open_failure: Option<Instant> = None;
    let mut send_lag = Latency::default();
    loop {
        let ends = run_epoch(
            &run,
            &mut routes,
            &schedule,
            &mut unit,
            max_units,
            &mut send_lag,
        )?;
        let mut pending = Vec::new();
        let mut hinted = Vec::new();
        let mut first_fail: Option<Instant> = None;
        let mut first_ok: Option<Instant> = None;
        let mut broken_addrs = Vec::new();
        for (route, end) in routes.iter().zip(ends) {
            out.measured.merge(end.measured);
            pending.extend(end.failed);
            for (code, n) in end.causes {
                *out.causes.entry(code).or_default() += n;
            }
            hinted.extend(end.hints);
            first_fail = min_opt(first_fail, end.first_fail);
            first_ok = min_opt(first_ok, end.first_ok);
            if end.broken {
                broken_addrs.push(route.link.addr.clone());
            }
        }
        if let (Some(s), Some(ok)) = (open_failure, first_ok) {
            out.episodes.push(Episode {
                start: s,
                first_ack: ok,
            });
            open_failure = None;
        }
        if first_fail.is_none() {
            break; // stopped, or every unit sent and acknowledged
        }
        open_failure = open_failure.or(first_fail);
        let failed_at = open_failure.expect("set above");
        // Failover: find the leaders, re-send what was refused in unit order, then carry on.
        let mut links: Vec<Link> = routes
            .drain(..)
            .map(|r| r.link)
            .filter(|l| !broken_addrs.contains(&l.addr))
            .collect();
        pending.sort();
        let mut trust_hints = !hinted.is_empty();
        let leaders = loop {
            if shared.stopped() {
                out.measured.send_lag = send_lag;
                return Ok(out);
            }
            if failed_at.elapsed() > Duration::from_millis(FAILOVER_GIVE_UP_MS) {
                return Err(PerfError::Protocol(format!(
                    "partitions {partitions:?} of {topic} not writable for {FAILOVER_GIVE_UP_MS} ms"
                )));
            }
            let mut leaders: HashMap<i32, String> = HashMap::new();
            if trust_hints {
                // Only once per failover round: a wrong hint is followed by a metadata refresh.
                trust_hints = false;
                leaders.extend(hinted.iter().cloned());
            }
            if !partitions.iter().all(|p| leaders.contains_key(p)) {
                match router.refresh() {
                    Ok(l) => {
                        for p in &partitions {
                            if !leaders.contains_key(p) {
                                if let Some(a) = l.of(*p) {
                                    leaders.insert(*p, a.to_string());
                                }
                            }
                        }
                    }
                    Err(e) => tracing_note(&format!("metadata refresh failed: {e}")),
                }
            }
            if !partitions.iter().all(|p| leaders.contains_key(p)) {
                router.rotate();
                thread::sleep(Duration::from_millis(RETRY_BACKOFF_MS));
                continue;
            }
            match resend(
                &run,
                &mut pending,
                &leaders,
                &mut links,
                &mut out,
                &mut open_failure,
            ) {
                Ok(true) => break leaders,
                Ok(false) => {
                    router.rotate();
                    thread::sleep(Duration::from_millis(RETRY_BACKOFF_MS));
                }
                Err(e) => return Err(e),
            }
        };
        routes = build_routes(&run, &partitions, &leaders, links)?;
    }
    out.measured.send_lag = send_lag;
    Ok(out)
}

fn min_opt(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

/// A note on stderr (spate-perf's progress goes to stdout, notes and errors to stderr).
fn tracing_note(msg: &str) {
    eprintln!("note: {msg}");
}

/// Groups the producer's partitions by leader into routes, reusing healthy links.
fn build_routes(
    run: &Run<'_>,
    partitions: &[i32],
    leaders: &HashMap<i32, String>,
    mut links: Vec<Link>,
) -> Result<Vec<Route>> {
    let mut by_leader: Vec<(String, Vec<i32>)> = Vec::new();
    for p in partitions {
        let addr = &leaders[p];
        match by_leader.iter_mut().find(|(a, _)| a == addr) {
            Some((_, ps)) => ps.push(*p),
            None => by_leader.push((addr.clone(), vec![*p])),
        }
    }
    let mut routes = Vec::with_capacity(by_leader.len());
    for (addr, ps) in by_leader {
        let link = match links.iter().position(|l| l.addr == addr) {
            Some(i) => links.swap_remove(i),
            None => Link::connect(&addr, run.cfg.request_timeout)?,
        };
        let template = run.template(&ps, link.version)?;
        routes.push(Route {
            link,
            partitions: ps,
            template,
        });
    }
    Ok(routes)
}

/// Re-sends the pending batches, oldest unit first, one request per leader and unit, each
/// waited for. True when all are acknowledged; false when one was refused again (retriable;
/// the rest stay pending, in order).
fn resend(
    run: &Run<'_>,
    pending: &mut Vec<Pending>,
    leaders: &HashMap<i32, String>,
    links: &mut Vec<Link>,
    out: &mut ProducerOutcome,
    open_failure: &mut Option<Instant>,
) -> Result<bool> {
    while let Some(first) = pending.first().copied() {
        let unit = first.unit;
        let of_unit = pending.iter().take_while(|p| p.unit == unit).count();
        let mut groups: Vec<(String, Vec<Pending>)> = Vec::new();
        for p in &pending[..of_unit] {
            let addr = &leaders[&p.partition];
            match groups.iter_mut().find(|(a, _)| a == addr) {
                Some((_, v)) => v.push(*p),
                None => groups.push((addr.clone(), vec![*p])),
            }
        }
        for (addr, group) in groups {
            let i = match links.iter().position(|l| l.addr == addr) {
                Some(i) => i,
                None => match Link::connect(&addr, run.cfg.request_timeout) {
                    Ok(l) => {
                        links.push(l);
                        links.len() - 1
                    }
                    Err(_) => return Ok(false),
                },
            };
            let link = &mut links[i];
            let parts: Vec<i32> = group.iter().map(|p| p.partition).collect();
            let due = group[0].due;
            let mut t = run.template(&parts, link.version)?;
            run.prepare(&mut t, unit, due);
            let id = link.next_id();
            set_correlation_id(&mut t.frame, id);
            out.retries += group.len() as u64;
            let reply = link
                .writer
                .write_frame(&t.frame)
                .and_then(|()| link.reader.read_frame(MAX_CONTROL_FRAME_BYTES))
                .and_then(|f| {
                    decode_response::<ProduceResponse>(f, ApiKey::Produce, link.version, id)
                });
            let reply = match reply {
                Ok(r) => r,
                Err(PerfError::Io { .. }) => {
                    *out.causes.entry(CONNECTION_LOST).or_default() += group.len() as u64;
                    links.swap_remove(i);
                    return Ok(false);
                }
                Err(e) => return Err(e),
            };
            let now = Instant::now();
            let mut refused = false;
            for tr in &reply.responses {
                for p in &tr.partition_responses {
                    let Some(at) = pending
                        .iter()
                        .position(|x| x.unit == unit && x.partition == p.index)
                    else {
                        continue;
                    };
                    if p.error_code == 0 {
                        let done = pending.remove(at);
                        run.acked(&mut out.measured, done.due, now);
                        if let Some(start) = open_failure.take() {
                            // The first acknowledgement after the refusals: the failover is
                            // over for this producer.
                            out.episodes.push(Episode {
                                start,
                                first_ack: now,
                            });
                        }
                    } else if retriable(p.error_code) {
                        *out.causes.entry(p.error_code).or_default() += 1;
                        refused = true;
                    } else {
                        return Err(PerfError::broker(
                            format!("Produce (re-send) to partition {}", p.index),
                            p.error_code,
                        ));
                    }
                }
            }
            if refused {
                return Ok(false);
            }
        }
        if pending.first().is_some_and(|p| p.unit == unit) {
            // A partition the reply did not mention: ask again.
            return Ok(false);
        }
    }
    Ok(true)
}

/// Sends units on every route until the run stops, the last unit is sent, or a route fails;
/// then waits for the replies of what is in flight.
fn run_epoch(
    run: &Run<'_>,
    routes: &mut [Route],
    schedule: &Schedule,
    unit: &mut u64,
    max_units: Option<u64>,
    send_lag: &mut Latency,
) -> Result<Vec<RouteEnd>> {
    let shared = run.shared;
    let window = run.cfg.args.max_in_flight;
    let failing = AtomicBool::new(false);
    let failing = &failing;
    thread::scope(|s| {
        let mut senders: Vec<(Sender<InFlight>, Receiver<()>)> = Vec::with_capacity(routes.len());
        let mut writers: Vec<(&mut FrameWriter, &mut ProduceTemplate, &mut i32)> =
            Vec::with_capacity(routes.len());
        let mut readers = Vec::with_capacity(routes.len());
        for route in routes.iter_mut() {
            let (slot_tx, slot_rx) = sync_channel::<()>(window);
            for _ in 0..window {
                slot_tx
                    .send(())
                    .expect("the window channel has room for every slot");
            }
            let (tx, rx) = channel::<InFlight>();
            senders.push((tx, slot_rx));
            let Route {
                link,
                partitions,
                template,
            } = route;
            let Link {
                reader,
                writer,
                version,
                next_id,
                ..
            } = link;
            let version = *version;
            let partitions: &[i32] = partitions;
            writers.push((writer, template, next_id));
            readers.push(s.spawn(move || {
                read_replies(run, reader, version, partitions, rx, slot_tx, failing)
            }));
        }
        let mut write_err = None;
        'units: loop {
            if shared.stopped()
                || failing.load(Ordering::Relaxed)
                || max_units.is_some_and(|m| *unit >= m)
            {
                break;
            }
            let intended = schedule.intended(*unit);
            if let Some(t) = intended {
                sleep_until_or(t, &shared.stop, failing);
                if shared.stopped() || failing.load(Ordering::Relaxed) {
                    break;
                }
            }
            // A unit goes out on every route, even if one fails meanwhile: the reader of a
            // failed route turns what it cannot deliver into pending batches.
            for ((tx, slot_rx), (writer, template, next_id)) in
                senders.iter().zip(writers.iter_mut())
            {
                if slot_rx.recv().is_err() {
                    break 'units; // the reader ended with an error; reported below
                }
                let due = intended.unwrap_or_else(Instant::now);
                if intended.is_some() && due >= shared.measure_from {
                    send_lag.record_n(nanos(Instant::now().saturating_duration_since(due)), 1);
                }
                run.prepare(template, *unit, due);
                **next_id = next_id.wrapping_add(1).max(1);
                set_correlation_id(&mut template.frame, **next_id);
                if tx
                    .send(InFlight {
                        correlation_id: **next_id,
                        unit: *unit,
                        due,
                    })
                    .is_err()
                {
                    break 'units;
                }
                if let Err(e) = writer.write_frame(&template.frame) {
                    // The reader finds the socket closed and turns the batch into a pending one.
                    writer.shutdown();
                    write_err.get_or_insert(e);
                }
            }
            *unit += 1;
        }
        drop(senders);
        let mut ends = Vec::with_capacity(readers.len());
        let mut first_err = None;
        for h in readers {
            match h.join().expect("reader thread panicked") {
                Ok(e) => ends.push(e),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if let Some(e) = write_err {
            if ends.iter().all(|e| e.first_fail.is_none()) {
                return Err(e);
            }
        }
        Ok(ends)
    })
}

/// Sleeps until `t` unless the run stops or the producer starts failing over first.
fn sleep_until_or(t: Instant, stop: &AtomicBool, failing: &AtomicBool) {
    loop {
        let now = Instant::now();
        if now >= t || failing.load(Ordering::Relaxed) {
            return;
        }
        sleep_until(
            t.min(now + Duration::from_millis(crate::runner::STOP_POLL_MS)),
            stop,
        );
        if stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

/// Reads one route's replies in order. Fatal errors end the run; refusals and a lost
/// connection become pending batches.
fn read_replies(
    run: &Run<'_>,
    reader: &mut FrameReader,
    version: i16,
    partitions: &[i32],
    rx: Receiver<InFlight>,
    slot_tx: SyncSender<()>,
    failing: &AtomicBool,
) -> Result<RouteEnd> {
    let mut end = RouteEnd::default();
    let fail = |end: &mut RouteEnd, now: Instant| {
        end.first_fail.get_or_insert(now);
        failing.store(true, Ordering::Relaxed);
    };
    for item in rx {
        let reply = if end.broken {
            None
        } else {
            match reader.read_frame(MAX_CONTROL_FRAME_BYTES).and_then(|f| {
                decode_response::<ProduceResponse>(f, ApiKey::Produce, version, item.correlation_id)
            }) {
                Ok(r) => Some(r),
                Err(PerfError::Io { .. }) => {
                    end.broken = true;
                    None
                }
                Err(e) => return Err(e),
            }
        };
        let now = Instant::now();
        match reply {
            None => {
                fail(&mut end, now);
                *end.causes.entry(CONNECTION_LOST).or_default() += partitions.len() as u64;
                end.failed
                    .extend(partitions.iter().map(|&partition| Pending {
                        unit: item.unit,
                        due: item.due,
                        partition,
                    }));
            }
            Some(reply) => {
                let mut seen = 0;
                for t in &reply.responses {
                    for p in &t.partition_responses {
                        seen += 1;
                        let code = p.error_code;
                        if code == 0 {
                            end.first_ok.get_or_insert(now);
                            run.acked(&mut end.measured, item.due, now);
                        } else if retriable(code)
                            || (code == OUT_OF_ORDER_SEQUENCE && failing.load(Ordering::Relaxed))
                        {
                            fail(&mut end, now);
                            *end.causes.entry(code).or_default() += 1;
                            end.failed.push(Pending {
                                unit: item.unit,
                                due: item.due,
                                partition: p.index,
                            });
                        } else {
                            return Err(PerfError::broker(
                                format!("Produce to partition {}", p.index),
                                code,
                            ));
                        }
                    }
                }
                if seen != partitions.len() {
                    return Err(PerfError::Protocol(format!(
                        "Produce reply names {seen} partitions where {} were sent",
                        partitions.len()
                    )));
                }
                if end.first_fail.is_some() {
                    end.hints.extend(hints(&reply));
                }
            }
        }
        // The sender may have stopped already; a lost slot no longer matters then.
        let _ = slot_tx.send(());
    }
    Ok(end)
}
