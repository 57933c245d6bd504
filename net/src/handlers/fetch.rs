//! Fetch with long polling: read every requested partition on its owning shard; if fewer than
//! `min_bytes` came back, wait until any owning shard appends or `max_wait_ms` passes, then read
//! again. Whole batches only; a fetch starting inside a batch gets that batch.
//!
//! In a cluster a partition is read on its writable leader only. A fetcher's
//! `current_leader_epoch` (v9+) is fenced, and its `last_fetched_epoch` (v12+, KIP-320) may get
//! a diverging epoch back instead of records. A Fetch claiming to come from a replica
//! (`replica_id >= 0`) is refused: replicas fetch over the rpc port, and a forged replica id
//! must not read past the high watermark (CVE-2018-1288 was such a forgery).

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::{BrokerId, FetchRequest, FetchResponse};
use kafka_protocol::ResponseError;

use crate::cross_wake;
use crate::dispatch::encode_response_frame;
use crate::error::{NetError, NONE};
use crate::frame::Frame;
use crate::leader_epoch::{check_current_epoch, EpochLog};
use crate::request::{decode_body, Request};
use crate::shard::{Shard, TopicPartition};
use spate_replication::controller::view::ClusterView;
use spate_replication::partition::BatchHeader;
use spate_replication::shard::deadline::Deadline;

/// One partition's read on its owner.
#[derive(Clone, Debug)]
pub struct PartitionRead {
    pub error_code: i16,
    pub high_watermark: i64,
    pub log_start_offset: i64,
    pub records: Option<Bytes>,
    /// KIP-320: the fetcher's last fetched epoch ended before its offset here: (epoch, end).
    pub diverging: Option<(i32, i64)>,
}

impl PartitionRead {
    /// The answer is ready without waiting for more data (an error, or a diverging epoch the
    /// fetcher must act on).
    fn is_final(&self) -> bool {
        self.error_code != NONE || self.diverging.is_some()
    }
}

/// One partition of a Fetch, for its owner shard.
#[derive(Clone, Debug)]
struct ReadWork {
    ti: usize,
    pi: usize,
    tp: TopicPartition,
    offset: i64,
    limit: usize,
    /// -1: unchecked (before v9, or the client does not know it).
    current_leader_epoch: i32,
    /// -1: unchecked (before v12, or consumers, which validate with OffsetForLeaderEpoch).
    last_fetched_epoch: i32,
}

/// Most bytes one partition contributes to one Fetch reply (beyond a single larger batch),
/// whatever `partition_max_bytes` asks: the partition's records are one buffer, kept small
/// enough that glibc can serve it from its arenas rather than a fresh mapping faulted in page by
/// page. A consumer asking for more simply fetches again.
pub const MAX_PARTITION_READ_BYTES: usize = 16 << 20;

pub async fn handle(shard: &Rc<Shard>, req: &Request) -> Result<Bytes, NetError> {
    handle_frame(shard, req, &std::cell::Cell::new(NONE))
        .await
        .map(|f| f.to_bytes())
}

/// The Fetch reply with each partition's records left in the buffers they were read into.
pub async fn handle_frame(
    shard: &Rc<Shard>,
    req: &Request,
    error_code: &std::cell::Cell<i16>,
) -> Result<Frame, NetError> {
    let r: FetchRequest = decode_body(req)?;
    let max_wait = Duration::from_millis(r.max_wait_ms.max(0) as u64)
        .min(Duration::from_millis(shard.config.max_fetch_wait_ms));
    let deadline = Instant::now() + max_wait;
    let min_bytes = r.min_bytes.max(0) as usize;
    let max_bytes = if r.max_bytes <= 0 {
        usize::MAX
    } else {
        r.max_bytes as usize
    };

    let mut resp = FetchResponse::default();
    let mut work: BTreeMap<usize, Vec<ReadWork>> = BTreeMap::new();
    let forged_replica = r.replica_id >= BrokerId(0);
    if forged_replica {
        tracing::info!(
            replica_id = r.replica_id.0,
            "refused a Fetch claiming to be a replica on the Kafka port"
        );
    }
    for (ti, topic) in r.topics.iter().enumerate() {
        let mut tr = FetchableTopicResponse::default();
        tr.topic = topic.topic.clone();
        tr.topic_id = topic.topic_id;
        for (pi, p) in topic.partitions.iter().enumerate() {
            let mut pd = PartitionData::default();
            pd.partition_index = p.partition;
            pd.high_watermark = -1;
            pd.last_stable_offset = -1;
            pd.log_start_offset = -1;
            let owner = if forged_replica {
                // Kafka's answer to a replica fetch without ClusterAction.
                Err(ResponseError::TopicAuthorizationFailed.code())
            } else {
                shard.owner(&topic.topic, p.partition)
            };
            match owner {
                Ok(owner) => {
                    work.entry(owner).or_default().push(ReadWork {
                        ti,
                        pi,
                        tp: TopicPartition::new(&topic.topic, p.partition),
                        offset: p.fetch_offset,
                        limit: p.partition_max_bytes.max(0) as usize,
                        current_leader_epoch: p.current_leader_epoch,
                        last_fetched_epoch: p.last_fetched_epoch,
                    });
                }
                Err(code) => pd.error_code = code,
            }
            tr.partitions.push(pd);
        }
        resp.responses.push(tr);
    }

    if work.len() == 1 {
        // One owner (the usual case): the whole long poll runs there, one hop each way,
        // instead of a hop to read, a hop to wait and a hop to read again.
        let (&owner, items) = work.iter().next().expect("one owner");
        let items = items.clone();
        let shutting_down = shard.is_shutting_down();
        match shard
            .router
            .run_on(owner, move |s| {
                long_poll_on_owner(s, items, max_bytes, min_bytes, deadline, shutting_down)
            })
            .await
        {
            Ok(reads) => fill(&mut resp, reads, req.api_version),
            Err(e) => set_error(
                &mut resp,
                &work[&owner],
                crate::error::net_error_code(&e.into()),
            ),
        }
    } else {
        loop {
            let generations = read_all(shard, &work, max_bytes, req.api_version, &mut resp).await;
            let total: usize = resp
                .responses
                .iter()
                .flat_map(|t| &t.partitions)
                .map(|p| p.records.as_ref().map_or(0, |r| r.len()))
                .sum();
            let any_error = resp
                .responses
                .iter()
                .flat_map(|t| &t.partitions)
                .any(|p| p.error_code != NONE || p.diverging_epoch.epoch >= 0);
            let now = Instant::now();
            if total >= min_bytes || any_error || now >= deadline || work.is_empty() {
                break;
            }
            if shard.is_shutting_down() {
                break;
            }
            wait_for_data(shard, &work, generations, deadline).await;
        }
    }
    add_leader_hints(shard, &mut resp, req.api_version);
    for t in &resp.responses {
        for p in &t.partitions {
            if p.error_code != NONE && error_code.get() == NONE {
                error_code.set(p.error_code);
            }
            if let Some(r) = p.records.as_ref().filter(|r| !r.is_empty()) {
                shard.metrics.fetched(
                    &t.topic,
                    p.partition_index,
                    r.len() as u64,
                    count_records(r),
                );
            }
        }
    }
    let records: Vec<Bytes> = resp
        .responses
        .iter()
        .flat_map(|t| &t.partitions)
        .filter_map(|p| p.records.clone())
        .collect();
    encode_response_frame(req.correlation_id, req.api_version, &resp, records)
}

/// Reads every partition once; returns each owner shard's append generation seen at read time,
/// so a wait can tell whether anything arrived since.
async fn read_all(
    shard: &Rc<Shard>,
    work: &BTreeMap<usize, Vec<ReadWork>>,
    max_bytes: usize,
    version: i16,
    resp: &mut FetchResponse,
) -> BTreeMap<usize, u64> {
    let tasks: Vec<_> = work
        .iter()
        .map(|(&owner, items)| {
            let (router, items) = (shard.router.clone(), items.clone());
            let t = glommio::spawn_local(async move {
                router
                    .run_on(owner, move |s| read_on_owner(s, items, max_bytes))
                    .await
            });
            (owner, t)
        })
        .collect();
    let mut generations = BTreeMap::new();
    let mut results = Vec::new();
    for (owner, t) in tasks {
        match t.await {
            Ok((generation, reads)) => {
                generations.insert(owner, generation);
                results.extend(reads);
            }
            Err(e) => set_error(resp, &work[&owner], crate::error::net_error_code(&e.into())),
        }
    }
    keep_within_budget(&mut results, max_bytes);
    fill(resp, results, version);
    generations
}

type Reads = Vec<(usize, usize, PartitionRead)>;

/// Request order decides who gets the total budget; the first non-empty partition always
/// gets its data so a consumer can make progress past a batch larger than max_bytes. Records
/// over the budget are dropped (left empty). Returns the bytes kept.
fn keep_within_budget(results: &mut Reads, max_bytes: usize) -> usize {
    results.sort_by_key(|(ti, pi, _)| (*ti, *pi));
    let mut budget = max_bytes;
    let mut kept = 0;
    let mut first = true;
    for (_, _, read) in results.iter_mut() {
        let len = read.records.as_ref().map_or(0, |r| r.len());
        if len > 0 && (first || len <= budget) {
            budget = budget.saturating_sub(len);
            kept += len;
            first = false;
        } else if read.records.is_some() {
            read.records = Some(Bytes::new());
        }
    }
    kept
}

/// Copies reads (already within the budget) into the reply.
fn fill(resp: &mut FetchResponse, results: Reads, version: i16) {
    for (ti, pi, read) in results {
        let pd = &mut resp.responses[ti].partitions[pi];
        pd.error_code = read.error_code;
        pd.high_watermark = read.high_watermark;
        pd.last_stable_offset = read.high_watermark;
        if version >= 5 {
            pd.log_start_offset = read.log_start_offset;
        }
        if let Some((epoch, end_offset)) = read.diverging.filter(|_| version >= 12) {
            pd.diverging_epoch.epoch = epoch;
            pd.diverging_epoch.end_offset = end_offset;
        }
        pd.records = Some(read.records.unwrap_or_default());
    }
}

fn set_error(resp: &mut FetchResponse, items: &[ReadWork], code: i16) {
    for w in items {
        resp.responses[w.ti].partitions[w.pi].error_code = code;
    }
}

/// Fetch v12+ (KIP-951): the leader hints of a cluster node's answer.
fn add_leader_hints(shard: &Shard, resp: &mut FetchResponse, version: i16) {
    if let Some(port) = shard.config.cluster.as_ref().filter(|_| version >= 12) {
        hint_leaders(&port.view(), resp);
    }
}

/// A partition refused for want of leadership or for a stale epoch names the leader and epoch
/// `view` knows, so the client need not ask Metadata first. (Fetch's `node_endpoints` come with
/// v16, which needs topic ids.)
pub(crate) fn hint_leaders(view: &ClusterView, resp: &mut FetchResponse) {
    let hinted = [
        ResponseError::NotLeaderOrFollower.code(),
        ResponseError::FencedLeaderEpoch.code(),
    ];
    for t in &mut resp.responses {
        for p in t
            .partitions
            .iter_mut()
            .filter(|p| hinted.contains(&p.error_code))
        {
            if let Some(h) = crate::leader_hint::leader_hint(view, &t.topic, p.partition_index) {
                p.current_leader.leader_id = BrokerId(h.leader_id);
                p.current_leader.leader_epoch = h.leader_epoch;
            }
        }
    }
}

/// The long poll of a fetch whose partitions all live on this shard: read, and until
/// `min_bytes` came back (or an error, the deadline, shutdown), wait for an append here and
/// read again.
async fn long_poll_on_owner(
    shard: Rc<Shard>,
    items: Vec<ReadWork>,
    max_bytes: usize,
    min_bytes: usize,
    deadline: Instant,
    asker_shutting_down: bool,
) -> Reads {
    loop {
        let (generation, mut reads) = read_on_owner(shard.clone(), items.clone(), max_bytes).await;
        let total = keep_within_budget(&mut reads, max_bytes);
        let any_error = reads.iter().any(|(_, _, r)| r.is_final());
        if total >= min_bytes
            || any_error
            || Instant::now() >= deadline
            || asker_shutting_down
            || shard.is_shutting_down()
        {
            return reads;
        }
        let changed = shard.data_arrived.changed(generation);
        let stop = shard.shutdown.changed(shard.shutdown.generation());
        let timeout = Deadline::at(deadline);
        futures_lite::future::or(changed, futures_lite::future::or(stop, timeout)).await;
    }
}

/// Records in concatenated batches (a partial batch at the end is not counted).
fn count_records(mut batches: &[u8]) -> u64 {
    let mut records = 0;
    while let Some(len) = BatchHeader::total_len_from_prefix(batches) {
        let Some(batch) = batches.get(..len) else {
            break;
        };
        if let Ok(h) = BatchHeader::parse(batch) {
            records += h.records_count().max(0) as u64;
        }
        batches = &batches[len..];
    }
    records
}

async fn read_on_owner(
    shard: Rc<Shard>,
    items: Vec<ReadWork>,
    max_bytes: usize,
) -> (u64, Vec<(usize, usize, PartitionRead)>) {
    let generation = shard.data_arrived.generation();
    let mut out = Vec::with_capacity(items.len());
    for w in items {
        let read = read_partition(&shard, &w, w.limit.min(max_bytes)).await;
        out.push((w.ti, w.pi, read));
    }
    (generation, out)
}

async fn read_partition(shard: &Shard, w: &ReadWork, limit: usize) -> PartitionRead {
    let mut read = PartitionRead {
        error_code: NONE,
        high_watermark: -1,
        log_start_offset: -1,
        records: None,
        diverging: None,
    };
    let p = match shard
        .leader_replica(&w.tp, ResponseError::NotLeaderOrFollower.code())
        .and_then(|(p, epoch)| {
            check_current_epoch(w.current_leader_epoch, epoch).map(|()| (p, epoch))
        }) {
        Ok((p, epoch)) => {
            if w.last_fetched_epoch >= 0 {
                let history = p.epoch_history();
                let log = EpochLog {
                    history: &history,
                    current: epoch,
                    log_start: p.log_start_offset(),
                    log_end: p.log_end_offset(),
                };
                match log.diverging_epoch(w.last_fetched_epoch, w.offset) {
                    Ok(None) => {}
                    Ok(Some(diverging)) => read.diverging = Some(diverging),
                    Err(code) => read.error_code = code,
                }
            }
            p
        }
        Err(code) => {
            read.error_code = code;
            return read;
        }
    };
    read.high_watermark = p.high_watermark() as i64;
    read.log_start_offset = p.log_start_offset() as i64;
    if read.is_final() {
        // No records with a diverging epoch: the fetcher truncates first (KIP-320).
        read.records = Some(Bytes::new()).filter(|_| read.error_code == NONE);
        return read;
    }
    match p.read(w.offset, limit.min(MAX_PARTITION_READ_BYTES)).await {
        Ok(r) => {
            read.high_watermark = r.high_watermark as i64;
            read.log_start_offset = r.log_start_offset as i64;
            read.records = Some(r.records);
        }
        Err(code) => read.error_code = code,
    }
    read
}

/// Waits until any owner shard appended since `generations`, or the deadline.
async fn wait_for_data(
    shard: &Rc<Shard>,
    work: &BTreeMap<usize, Vec<ReadWork>>,
    generations: BTreeMap<usize, u64>,
    deadline: Instant,
) {
    let (tx, rx) = flume::bounded::<()>(work.len().max(1));
    let waits: Vec<_> = work
        .keys()
        .map(|&owner| {
            let seen = generations.get(&owner).copied().unwrap_or(0);
            let (router, tx) = (shard.router.clone(), tx.clone());
            glommio::spawn_local(async move {
                let _ = router
                    .run_on(owner, move |s| async move {
                        let changed = s.data_arrived.changed(seen);
                        let stop = s.shutdown.changed(s.shutdown.generation());
                        let timeout = Deadline::at(deadline);
                        futures_lite::future::or(changed, futures_lite::future::or(stop, timeout))
                            .await;
                    })
                    .await;
                let _ = tx.try_send(());
            })
        })
        .collect();
    drop(tx);
    let timeout = Deadline::at(deadline);
    futures_lite::future::or(
        async {
            let _ = cross_wake::recv(&rx).await;
        },
        timeout,
    )
    .await;
    // The waits on other shards end at the deadline at the latest; nothing to cancel here.
    for w in waits {
        w.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_cluster::{state, view_of};
    use kafka_protocol::protocol::{Decodable, Encodable};

    #[test]
    fn refused_partitions_name_the_leader_and_a_diverging_epoch_is_carried() {
        let view = view_of(state());
        let mut t = FetchableTopicResponse::default();
        t.topic = crate::handlers::topic_name("orders");
        t.partitions = (0..3)
            .map(|i| {
                let mut p = PartitionData::default();
                p.partition_index = i;
                p
            })
            .collect();
        t.partitions[0].error_code = ResponseError::FencedLeaderEpoch.code();
        t.partitions[2].error_code = ResponseError::NotLeaderOrFollower.code();
        let mut resp = FetchResponse::default();
        resp.responses = vec![t];
        // Partition 1 is served, with a diverging epoch.
        fill(
            &mut resp,
            vec![(
                0,
                1,
                PartitionRead {
                    error_code: NONE,
                    high_watermark: 9,
                    log_start_offset: 0,
                    records: Some(Bytes::new()),
                    diverging: Some((1, 7)),
                },
            )],
            12,
        );
        hint_leaders(&view, &mut resp);
        let mut buf = bytes::BytesMut::new();
        resp.encode(&mut buf, 12).unwrap();
        let back = FetchResponse::decode(&mut buf.freeze(), 12).unwrap();
        let p = &back.responses[0].partitions;
        assert_eq!(
            (
                p[0].current_leader.leader_id.0,
                p[0].current_leader.leader_epoch
            ),
            (1, 4)
        );
        assert_eq!(p[1].current_leader.leader_id.0, -1, "served: no hint");
        assert_eq!(
            (p[1].diverging_epoch.epoch, p[1].diverging_epoch.end_offset),
            (1, 7)
        );
        assert_eq!(
            (
                p[2].current_leader.leader_id.0,
                p[2].current_leader.leader_epoch
            ),
            (-1, 2)
        );
        // Before v12 there is no diverging epoch to carry: fill leaves it out.
        let mut old = FetchResponse::default();
        let mut t = FetchableTopicResponse::default();
        t.partitions = vec![PartitionData::default()];
        old.responses = vec![t];
        let read = PartitionRead {
            error_code: NONE,
            high_watermark: 9,
            log_start_offset: 0,
            records: Some(Bytes::new()),
            diverging: Some((1, 7)),
        };
        fill(&mut old, vec![(0, 0, read)], 11);
        assert_eq!(old.responses[0].partitions[0].diverging_epoch.epoch, -1);
        assert_eq!(old.responses[0].partitions[0].high_watermark, 9);
    }
}
