//! Topic metadata known on every shard: names, topic ids, partition counts, per-topic configs,
//! the shard owning each partition, and the producer-id allocator. Persisted to one
//! checksummed file in the data dir.
//!
//! Changes are rare (admin requests) and serialised by a mutex; readers on the data path only
//! compare an atomic version with the snapshot they cached, so a request takes no lock unless
//! the metadata changed since the shard last looked.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::partition::ReplicaError;
use crate::shard::table::{least_loaded, shard_loads, shard_of};

pub const METADATA_FILE: &str = "spate-metadata.json";
/// Producer ids are reserved on disk in blocks of this many, so ids stay unique across
/// restarts without a write per InitProducerId.
pub const PRODUCER_ID_BLOCK: i64 = 1000;
/// Longest topic name Kafka allows.
pub const MAX_TOPIC_NAME_BYTES: usize = 249;
/// Space kept aside (a file of zeros) so the metadata file can be rewritten on a full disk.
pub const METADATA_RESERVE_FILE: &str = "spate-metadata.reserve";
/// Size of that reserve; it grows to twice the metadata file if that is larger.
pub const METADATA_RESERVE_BYTES: u64 = 1 << 20;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TopicMeta {
    pub name: String,
    pub id: u128,
    pub partitions: i32,
    pub internal: bool,
    /// Kafka topic configs given at creation (`retention.ms`, ...), as strings.
    pub configs: BTreeMap<String, String>,
    /// The shard owning each partition's replica, by partition: decided when the partition is
    /// created and kept across restarts (see `shard::table`). Missing from a file written
    /// before placement was stored; [`MetadataStore::settle_placement`] fills it in.
    #[serde(default)]
    pub shards: Vec<u32>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Persisted {
    cluster_id: String,
    topics: BTreeMap<String, TopicMeta>,
    /// Every producer id below this may have been handed out.
    producer_id_reserved: i64,
}

/// An immutable view of the topics, shared by reference between shards.
pub type Topics = Arc<BTreeMap<String, TopicMeta>>;

/// The shard of a partition this node holds no replica of, in a mirrored store's
/// [`TopicMeta::shards`]: past every shard count, so `ShardTable::owner` knows no owner and
/// the Kafka layer answers NOT_LEADER_OR_FOLLOWER.
pub const NOT_HOSTED: u32 = u32::MAX;

pub struct MetadataStore {
    path: PathBuf,
    version: AtomicU64,
    inner: Mutex<Inner>,
    /// A cluster node's store: the controller's topics, in memory only (see
    /// [`MetadataStore::mirrored`]).
    mirrored: bool,
}

struct Inner {
    state: Persisted,
    snapshot: Topics,
    next_producer_id: i64,
}

/// Kafka's rule for topic names: 1-249 of `[a-zA-Z0-9._-]`, not "." or "..".
pub fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TOPIC_NAME_BYTES
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// The group coordinator's internal topic, created by the broker when first needed.
pub const CONSUMER_OFFSETS_TOPIC: &str = "__consumer_offsets";

/// Names the broker keeps for itself (Kafka's internal topics). Clients may not create them
/// nor write to them: `__consumer_offsets` is the group coordinator's compacted topic.
pub const RESERVED_TOPIC_NAMES: [&str; 2] = [CONSUMER_OFFSETS_TOPIC, "__transaction_state"];

pub fn is_reserved_topic_name(name: &str) -> bool {
    RESERVED_TOPIC_NAMES.contains(&name)
}

/// A create the store refused: the Kafka error code and a message for the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub code: i16,
    pub message: String,
}

impl Refused {
    fn new(error: kafka_protocol::ResponseError, message: String) -> Self {
        Refused {
            code: error.code(),
            message,
        }
    }
}

/// The per-shard bound on partition replicas, with the shard count placement spreads over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardLimit {
    pub shards: usize,
    pub max_partitions_per_shard: usize,
}

/// Kafka's Topic.hasCollision: metric names turn `.` into `_`, so names equal after that
/// would share metrics.
pub fn topic_names_collide(a: &str, b: &str) -> bool {
    let unify = |c: u8| if c == b'.' { b'_' } else { c };
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| unify(x) == unify(y))
}

/// An existing topic other than `name` that `name` collides with (the least, so the message
/// is the same every time).
fn colliding_topic<'a>(topics: &'a BTreeMap<String, TopicMeta>, name: &str) -> Option<&'a str> {
    if !name.contains(['.', '_']) {
        return None;
    }
    topics
        .keys()
        .map(String::as_str)
        .find(|t| *t != name && topic_names_collide(t, name))
}

/// Places `count` new partitions of topic `name`, each on the least-loaded shard (the lowest
/// index on a tie), and returns their shards; refuses if a partition would take a shard past
/// the limit. Least-loaded placement fills every shard before any passes the limit, so a
/// refusal means the node is full, not that one shard happened to be crowded.
fn place_partitions(
    topics: &BTreeMap<String, TopicMeta>,
    name: &str,
    count: i32,
    limit: ShardLimit,
) -> Result<Vec<u32>, Refused> {
    let shards = limit.shards.max(1);
    let mut loads = shard_loads(topics.values(), shards);
    let used: usize = loads.iter().sum();
    let max = limit.max_partitions_per_shard;
    // Least-loaded placement fills every shard to the limit before refusing, so what fits is
    // exactly the room left under it (counted before allocating anything for the placement).
    let room: usize = loads.iter().map(|&l| max.saturating_sub(l)).sum();
    let count = usize::try_from(count).unwrap_or(0);
    if count > room {
        return Err(Refused::new(
            kafka_protocol::ResponseError::InvalidPartitions,
            format!(
                "topic '{name}': {count} more partitions, with {used} placed, would pass the \
                 limit of {max} partition replicas per shard ({shards} shards); raise \
                 --max-partitions-per-shard (SPATE_MAX_PARTITIONS_PER_SHARD), run on more \
                 cores, or delete topics"
            ),
        ));
    }
    let mut placed = Vec::with_capacity(count);
    for _ in 0..count {
        let s = least_loaded(&loads);
        debug_assert!(loads[s] < max, "room was counted");
        loads[s] += 1;
        placed.push(s as u32);
    }
    Ok(placed)
}

/// What [`MetadataStore::settle_placement`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SettledPlacement {
    /// Partitions with no stored shard (a data dir from before placement was stored), given
    /// the shard the old hash rule put them on.
    pub filled: usize,
    /// Partitions whose stored shard is past the shard count (`--cores` shrank), moved to the
    /// least-loaded shard.
    pub replaced: usize,
}

/// Gives every partition of `topics` a shard below `shards`: see
/// [`MetadataStore::settle_placement`].
fn settle(topics: &mut BTreeMap<String, TopicMeta>, shards: usize) -> SettledPlacement {
    let shards = shards.max(1);
    let mut out = SettledPlacement::default();
    for t in topics.values_mut() {
        let want = t.partitions.max(0) as usize;
        t.shards.truncate(want);
        for p in t.shards.len()..want {
            t.shards.push(shard_of(&t.name, p as i32, shards) as u32);
            out.filled += 1;
        }
    }
    let mut loads = shard_loads(topics.values(), shards);
    for t in topics.values_mut() {
        for s in t.shards.iter_mut().filter(|s| **s as usize >= shards) {
            let to = least_loaded(&loads);
            loads[to] += 1;
            *s = to as u32;
            out.replaced += 1;
        }
    }
    out
}

fn check_create_topic(
    topics: &BTreeMap<String, TopicMeta>,
    name: &str,
    partitions: i32,
    internal: bool,
    limit: ShardLimit,
) -> Result<Vec<u32>, Refused> {
    use kafka_protocol::ResponseError as E;
    if !valid_topic_name(name) {
        return Err(Refused::new(
            E::InvalidTopicException,
            format!(
                "Topic name '{name}' is illegal: it must be 1-{MAX_TOPIC_NAME_BYTES} characters \
                 of [a-zA-Z0-9._-], and not '.' or '..'"
            ),
        ));
    }
    if !internal && is_reserved_topic_name(name) {
        return Err(Refused::new(
            E::InvalidTopicException,
            format!("Topic name '{name}' is reserved for the broker's internal use"),
        ));
    }
    if topics.contains_key(name) {
        return Err(Refused::new(
            E::TopicAlreadyExists,
            format!("Topic '{name}' already exists."),
        ));
    }
    if let Some(existing) = colliding_topic(topics, name) {
        return Err(Refused::new(
            E::InvalidTopicException,
            format!("Topic '{name}' collides with existing topic: {existing}"),
        ));
    }
    if partitions < 1 {
        return Err(Refused::new(
            E::InvalidPartitions,
            "a topic needs at least one partition".into(),
        ));
    }
    place_partitions(topics, name, partitions, limit)
}

/// Checks growing `name` to `count` partitions; returns its current count and the shards of
/// the new partitions.
fn check_create_partitions(
    topics: &BTreeMap<String, TopicMeta>,
    name: &str,
    count: i32,
    max_per_topic: i32,
    limit: ShardLimit,
) -> Result<(i32, Vec<u32>), Refused> {
    use kafka_protocol::ResponseError as E;
    let Some(topic) = topics.get(name) else {
        return Err(Refused::new(
            E::UnknownTopicOrPartition,
            format!("no topic '{name}'"),
        ));
    };
    if count <= topic.partitions || count > max_per_topic {
        return Err(Refused::new(
            E::InvalidPartitions,
            format!(
                "the new count must exceed the current one ({}) and be at most {max_per_topic}",
                topic.partitions
            ),
        ));
    }
    let placed = place_partitions(topics, name, count - topic.partitions, limit)?;
    Ok((topic.partitions, placed))
}

/// The topics a single-node broker stored in `data_dir`, read without writing anything (none
/// when it has no metadata file). A cluster node checks this before it starts: it would not
/// serve them.
pub fn stored_topic_names(data_dir: &Path) -> Result<Vec<String>, ReplicaError> {
    let path = data_dir.join(METADATA_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(decode_file(&bytes)
            .map_err(|reason| ReplicaError::Metadata {
                path: path.display().to_string(),
                reason,
            })?
            .topics
            .into_keys()
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

impl MetadataStore {
    /// Loads the store from `data_dir`, creating an empty one if there is none. A file whose
    /// checksum does not match is an error, never silently replaced.
    pub fn open(data_dir: &Path) -> Result<Arc<Self>, ReplicaError> {
        let path = data_dir.join(METADATA_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => decode_file(&bytes).map_err(|reason| ReplicaError::Metadata {
                path: path.display().to_string(),
                reason,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted {
                cluster_id: format!("spate-{:016x}", fastrand::u64(..)),
                ..Persisted::default()
            },
            Err(e) => return Err(e.into()),
        };
        let next_producer_id = state.producer_id_reserved;
        let store = MetadataStore {
            path,
            version: AtomicU64::new(1),
            inner: Mutex::new(Inner {
                snapshot: Arc::new(state.topics.clone()),
                state,
                next_producer_id,
            }),
            mirrored: false,
        };
        store.persist(&store.lock().state)?;
        Ok(Arc::new(store))
    }

    /// The store of a cluster node: empty until the cluster service mirrors the controller's
    /// topics into it ([`Self::mirror_cluster`]). It never reads or writes the data dir's
    /// metadata file, so a single-node data dir started by mistake with `--seeds` keeps its
    /// topics; its own create, delete, config and producer-id methods refuse (those go to the
    /// controller).
    pub fn mirrored(cluster_id: &str) -> Arc<Self> {
        Arc::new(MetadataStore {
            path: PathBuf::new(),
            version: AtomicU64::new(1),
            inner: Mutex::new(Inner {
                snapshot: Arc::new(BTreeMap::new()),
                state: Persisted {
                    cluster_id: cluster_id.to_string(),
                    ..Persisted::default()
                },
                next_producer_id: 0,
            }),
            mirrored: true,
        })
    }

    pub fn is_mirrored(&self) -> bool {
        self.mirrored
    }

    /// Replaces the topics with the controller's (each topic's `shards[p]` the shard of this
    /// node's replica of partition `p`, or [`NOT_HOSTED`]) and bumps the version so the shards
    /// refresh. In memory only.
    pub fn mirror_cluster(&self, topics: BTreeMap<String, TopicMeta>) {
        assert!(
            self.mirrored,
            "mirroring the cluster into a single-node store"
        );
        let mut inner = self.lock();
        inner.snapshot = Arc::new(topics.clone());
        inner.state.topics = topics;
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    fn refuse_if_mirrored(&self, what: &str) -> Result<(), ReplicaError> {
        if self.mirrored {
            return Err(ReplicaError::Metadata {
                path: "(cluster metadata)".into(),
                reason: format!(
                    "{what} on a cluster node goes through the controller, not the local store"
                ),
            });
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every change is applied to a
        // copy and persisted before it is swapped in), so poisoning is not fatal.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn topics(&self) -> Topics {
        self.lock().snapshot.clone()
    }

    pub fn cluster_id(&self) -> String {
        self.lock().state.cluster_id.clone()
    }

    /// Applies `change` to a copy of the state, persists it, then publishes it.
    fn update<T, E>(
        &self,
        change: impl FnOnce(&mut Persisted) -> Result<T, E>,
    ) -> Result<Result<T, E>, ReplicaError> {
        self.refuse_if_mirrored("changing topics")?;
        let mut inner = self.lock();
        let mut next = inner.state.clone();
        let out = match change(&mut next) {
            Ok(out) => out,
            Err(code) => return Ok(Err(code)),
        };
        self.persist(&next)?;
        inner.snapshot = Arc::new(next.topics.clone());
        inner.state = next;
        self.version.fetch_add(1, Ordering::AcqRel);
        Ok(Ok(out))
    }

    /// Creates a topic; the inner error is a Kafka error code with a message. Every rule that
    /// depends on the other topics (exists, collides, shard limit) is checked here, under the
    /// store's lock, so concurrent creates on different shards cannot both pass it.
    pub fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        configs: BTreeMap<String, String>,
        internal: bool,
        limit: ShardLimit,
    ) -> Result<Result<TopicMeta, Refused>, ReplicaError> {
        self.update(|s| {
            let shards = check_create_topic(&s.topics, name, partitions, internal, limit)?;
            let meta = TopicMeta {
                name: name.to_string(),
                id: random_topic_id(),
                partitions,
                internal,
                configs,
                shards,
            };
            s.topics.insert(name.to_string(), meta.clone());
            Ok(meta)
        })
    }

    /// What [`Self::create_topic`] would answer, without creating anything (validate_only).
    pub fn check_create_topic(
        &self,
        name: &str,
        partitions: i32,
        limit: ShardLimit,
    ) -> Result<(), Refused> {
        check_create_topic(&self.lock().state.topics, name, partitions, false, limit).map(|_| ())
    }

    pub fn delete_topic(&self, name: &str) -> Result<Result<TopicMeta, i16>, ReplicaError> {
        self.update(|s| {
            s.topics
                .remove(name)
                .ok_or(kafka_protocol::ResponseError::UnknownTopicOrPartition.code())
        })
    }

    /// Replaces a topic's configs (already validated by the caller).
    pub fn set_topic_configs(
        &self,
        name: &str,
        configs: BTreeMap<String, String>,
    ) -> Result<Result<(), i16>, ReplicaError> {
        self.update(|s| {
            let topic = s
                .topics
                .get_mut(name)
                .ok_or(kafka_protocol::ResponseError::UnknownTopicOrPartition.code())?;
            topic.configs = configs;
            Ok(())
        })
    }

    /// Grows a topic to `count` partitions; returns the old count. `validate_only` checks
    /// without changing anything.
    pub fn create_partitions(
        &self,
        name: &str,
        count: i32,
        max_per_topic: i32,
        limit: ShardLimit,
        validate_only: bool,
    ) -> Result<Result<i32, Refused>, ReplicaError> {
        self.refuse_if_mirrored("adding partitions")?;
        if validate_only {
            let inner = self.lock();
            return Ok(check_create_partitions(
                &inner.state.topics,
                name,
                count,
                max_per_topic,
                limit,
            )
            .map(|(old, _)| old));
        }
        self.update(|s| {
            let (old, placed) =
                check_create_partitions(&s.topics, name, count, max_per_topic, limit)?;
            let topic = s.topics.get_mut(name).expect("checked above");
            topic.partitions = count;
            topic.shards.extend(placed);
            Ok(old)
        })
    }

    /// Gives every partition a shard below `shards` and persists what changed; run once at
    /// start-up, before any shard opens a log. A partition with no stored shard (a data dir
    /// written before placement was stored) gets the one the old hash rule gave it, so its log
    /// opens where it did; one stored on a shard past `shards` (`--cores` shrank) moves to the
    /// least-loaded shard. The per-shard limit is not applied here: the partitions exist and
    /// must stay reachable; it applies to the next creates.
    pub fn settle_placement(&self, shards: usize) -> Result<SettledPlacement, ReplicaError> {
        if self.mirrored {
            // The controller places a cluster's replicas; nothing is stored here.
            return Ok(SettledPlacement::default());
        }
        let mut inner = self.lock();
        let mut next = inner.state.clone();
        let settled = settle(&mut next.topics, shards);
        if settled != SettledPlacement::default() {
            self.persist(&next)?;
            inner.snapshot = Arc::new(next.topics.clone());
            inner.state = next;
            self.version.fetch_add(1, Ordering::AcqRel);
        }
        Ok(settled)
    }

    /// A producer id never handed out before, even across restarts.
    pub fn allocate_producer_id(&self) -> Result<i64, ReplicaError> {
        self.refuse_if_mirrored("allocating a producer id")?;
        let mut inner = self.lock();
        if inner.next_producer_id >= inner.state.producer_id_reserved {
            let mut next = inner.state.clone();
            next.producer_id_reserved = inner.next_producer_id + PRODUCER_ID_BLOCK;
            self.persist(&next)?;
            inner.state = next;
        }
        let id = inner.next_producer_id;
        inner.next_producer_id += 1;
        Ok(id)
    }

    /// Writes the file atomically (see `write_atomic`). Deleting a topic must work on a full
    /// disk (it is how space is freed), and it starts with this write: so a reserve file is kept
    /// beside it and given up when the write runs out of space, then the write is tried again.
    /// The alternatives were worse: deleting partition directories before the metadata write
    /// frees space too, but a crash in between brings the topic back empty; the reserve keeps
    /// the order (metadata first, then data) and so every crash point as it was. Another shard
    /// may take the freed space first, in which case the delete fails with a storage error, as
    /// before, and can be retried. The reserve is made again after every successful write.
    fn persist(&self, state: &Persisted) -> Result<(), ReplicaError> {
        assert!(!self.mirrored, "a mirrored store never writes the data dir");
        let body = serde_json::to_vec(state).map_err(|e| ReplicaError::Metadata {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        })?;
        let reserve = self.path.with_file_name(METADATA_RESERVE_FILE);
        let written = match self.write_atomic(&body) {
            Err(e) if spate_engine::is_no_space_io(&e) => {
                tracing::warn!(path = %self.path.display(),
                    "no disk space for the metadata file: using its reserve");
                let _ = std::fs::remove_file(&reserve);
                self.write_atomic(&body)
            }
            other => other,
        };
        written?;
        let want = METADATA_RESERVE_BYTES.max(2 * body.len() as u64);
        if let Err(e) = ensure_reserve(&reserve, want) {
            tracing::debug!(error = %e, "cannot (re)make the metadata reserve yet");
        }
        Ok(())
    }

    /// Temp file, fsync, rename, fsync of the directory; the temp file is removed if that fails.
    fn write_atomic(&self, body: &[u8]) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let written = self.write_atomic_via(&tmp, body);
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    fn write_atomic_via(&self, tmp: &Path, body: &[u8]) -> std::io::Result<()> {
        {
            let mut f = std::fs::File::create(tmp)?;
            writeln!(f, "{:08x}", crc32c::crc32c(body))?;
            f.write_all(body)?;
            f.sync_all()?;
        }
        std::fs::rename(tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Makes `path` a file of at least `bytes` written zeros (blocks really allocated: a sparse file
/// would reserve nothing). Best effort: on a full disk it stays as large as it got.
fn ensure_reserve(path: &Path, bytes: u64) -> std::io::Result<()> {
    let have = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    if have >= bytes {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let zeros = vec![0u8; (bytes - have) as usize];
    f.write_all(&zeros)?;
    f.sync_all()
}

fn decode_file(bytes: &[u8]) -> Result<Persisted, String> {
    let newline = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no checksum line")?;
    let crc_text = std::str::from_utf8(&bytes[..newline]).map_err(|e| e.to_string())?;
    let stored = u32::from_str_radix(crc_text.trim(), 16).map_err(|e| e.to_string())?;
    let body = &bytes[newline + 1..];
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(format!(
            "checksum mismatch: stored {stored:08x}, computed {computed:08x}"
        ));
    }
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

fn random_topic_id() -> u128 {
    // Version-4 style UUID; topic ids only need to be unique, not secret.
    let mut id = fastrand::u128(..);
    id = (id & !(0xf << 76)) | (0x4 << 76);
    id = (id & !(0x3 << 62)) | (0x2 << 62);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOMY: ShardLimit = ShardLimit {
        shards: 4,
        max_partitions_per_shard: 1000,
    };

    #[test]
    fn topics_and_producer_ids_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetadataStore::open(dir.path()).unwrap();
        let t = store
            .create_topic("a", 3, BTreeMap::new(), false, ROOMY)
            .unwrap()
            .unwrap();
        assert!(store
            .create_topic("a", 1, BTreeMap::new(), false, ROOMY)
            .unwrap()
            .is_err());
        let p1 = store.allocate_producer_id().unwrap();
        drop(store);
        let store = MetadataStore::open(dir.path()).unwrap();
        assert_eq!(store.topics().get("a"), Some(&t));
        assert!(store.allocate_producer_id().unwrap() > p1);
    }

    #[test]
    fn a_mirrored_store_never_touches_the_data_dir_and_refuses_local_changes() {
        let dir = tempfile::tempdir().unwrap();
        let single = MetadataStore::open(dir.path()).unwrap();
        single
            .create_topic("kept", 1, BTreeMap::new(), false, ROOMY)
            .unwrap()
            .unwrap();
        drop(single);
        let before = std::fs::read(dir.path().join(METADATA_FILE)).unwrap();
        let m = MetadataStore::mirrored("spate-test");
        assert!(m.is_mirrored() && m.topics().is_empty());
        let v = m.version();
        let meta = TopicMeta {
            name: "t".into(),
            id: 7,
            partitions: 2,
            internal: false,
            configs: BTreeMap::new(),
            shards: vec![0, NOT_HOSTED],
        };
        m.mirror_cluster(BTreeMap::from([("t".to_string(), meta.clone())]));
        assert!(m.version() > v);
        assert_eq!(m.topics()["t"], meta);
        assert!(m
            .create_topic("u", 1, BTreeMap::new(), false, ROOMY)
            .is_err());
        assert!(m.delete_topic("t").is_err());
        assert!(m.set_topic_configs("t", BTreeMap::new()).is_err());
        assert!(m.create_partitions("t", 3, 100, ROOMY, false).is_err());
        assert!(m.allocate_producer_id().is_err());
        assert_eq!(m.settle_placement(4).unwrap(), SettledPlacement::default());
        assert_eq!(m.topics()["t"], meta, "refusals change nothing");
        assert_eq!(
            std::fs::read(dir.path().join(METADATA_FILE)).unwrap(),
            before
        );
    }

    #[test]
    fn corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        drop(MetadataStore::open(dir.path()).unwrap());
        let path = dir.path().join(METADATA_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0x55;
        std::fs::write(&path, bytes).unwrap();
        assert!(MetadataStore::open(dir.path()).is_err());
    }

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(valid_topic_name("orders-1.v2_x"));
        assert!(!valid_topic_name(""));
        assert!(!valid_topic_name(".."));
        assert!(!valid_topic_name("a/b"));
        assert!(!valid_topic_name(&"x".repeat(250)));
    }

    #[test]
    fn names_equal_but_for_dot_and_underscore_collide() {
        assert!(topic_names_collide("foo.bar", "foo_bar"));
        assert!(topic_names_collide("a_b.c", "a.b_c"));
        assert!(!topic_names_collide("foo.bar", "foo-bar"));
        assert!(!topic_names_collide("foo.bar", "foo.bars"));
        let dir = tempfile::tempdir().unwrap();
        let store = MetadataStore::open(dir.path()).unwrap();
        for (first, second) in [("foo.bar", "foo_bar"), ("x_y", "x.y")] {
            store
                .create_topic(first, 1, BTreeMap::new(), false, ROOMY)
                .unwrap()
                .unwrap();
            let refused = store
                .create_topic(second, 1, BTreeMap::new(), false, ROOMY)
                .unwrap()
                .unwrap_err();
            assert_eq!(
                refused.code,
                kafka_protocol::ResponseError::InvalidTopicException.code()
            );
            assert_eq!(
                refused.message,
                format!("Topic '{second}' collides with existing topic: {first}")
            );
            assert!(!store.topics().contains_key(second));
        }
    }

    /// Partitions per shard of every topic in the store.
    fn loads(store: &MetadataStore, shards: usize) -> Vec<usize> {
        shard_loads(store.topics().values(), shards)
    }

    #[test]
    fn partitions_spread_evenly_over_shards() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetadataStore::open(dir.path()).unwrap();
        let mut total = 0;
        for (i, n) in [1, 5, 7, 13, 64, 3, 2].into_iter().enumerate() {
            store
                .create_topic(&format!("t{i}"), n, BTreeMap::new(), false, ROOMY)
                .unwrap()
                .unwrap();
            total += n as usize;
            let l = loads(&store, ROOMY.shards);
            assert_eq!(l.iter().sum::<usize>(), total);
            let (min, max) = (l.iter().min().unwrap(), l.iter().max().unwrap());
            assert!(max - min <= 1, "after t{i}: {l:?}");
        }
        // Growing a topic fills the emptiest shards first, lowest index on a tie.
        let before = loads(&store, ROOMY.shards);
        store
            .create_partitions("t0", 3, 100, ROOMY, false)
            .unwrap()
            .unwrap();
        let added = &store.topics()["t0"].shards[1..];
        let mut expect = Vec::new();
        let mut l = before.clone();
        for _ in 0..2 {
            let s = least_loaded(&l);
            l[s] += 1;
            expect.push(s as u32);
        }
        assert_eq!(added, &expect[..]);
        // A deleted topic's shards are free again.
        store.delete_topic("t4").unwrap().unwrap();
        let l = loads(&store, ROOMY.shards);
        assert_eq!(l.iter().sum::<usize>(), total + 2 - 64);
    }

    #[test]
    fn placement_is_stored_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetadataStore::open(dir.path()).unwrap();
        store
            .create_topic("a", 6, BTreeMap::new(), false, ROOMY)
            .unwrap()
            .unwrap();
        let placed = store.topics()["a"].shards.clone();
        assert_eq!(placed, [0, 1, 2, 3, 0, 1]);
        drop(store);
        let text = std::fs::read_to_string(dir.path().join(METADATA_FILE)).unwrap();
        assert!(text.contains("\"shards\":[0,1,2,3,0,1]"), "{text}");
        let store = MetadataStore::open(dir.path()).unwrap();
        assert_eq!(
            store.settle_placement(4).unwrap(),
            SettledPlacement::default()
        );
        assert_eq!(store.topics()["a"].shards, placed);
    }

    #[test]
    fn a_file_without_placement_gets_the_old_hash_placement() {
        let dir = tempfile::tempdir().unwrap();
        // The format written before placement was stored: no "shards" in a topic.
        let body = br#"{"cluster_id":"spate-old","topics":{"old":{"name":"old","id":7,"partitions":5,"internal":false,"configs":{}}},"producer_id_reserved":1000}"#;
        let mut file = format!("{:08x}\n", crc32c::crc32c(body)).into_bytes();
        file.extend_from_slice(body);
        std::fs::write(dir.path().join(METADATA_FILE), file).unwrap();
        let store = MetadataStore::open(dir.path()).unwrap();
        assert!(store.topics()["old"].shards.is_empty());
        let settled = store.settle_placement(3).unwrap();
        assert_eq!(
            settled,
            SettledPlacement {
                filled: 5,
                replaced: 0
            }
        );
        let want: Vec<u32> = (0..5).map(|p| shard_of("old", p, 3) as u32).collect();
        assert_eq!(store.topics()["old"].shards, want);
        // Persisted: the next start finds it stored.
        drop(store);
        let store = MetadataStore::open(dir.path()).unwrap();
        assert_eq!(store.topics()["old"].shards, want);
        assert_eq!(store.cluster_id(), "spate-old");
        assert_eq!(
            store.settle_placement(3).unwrap(),
            SettledPlacement::default()
        );
    }

    #[test]
    fn fewer_cores_re_place_only_the_partitions_past_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetadataStore::open(dir.path()).unwrap();
        store
            .create_topic("a", 8, BTreeMap::new(), false, ROOMY)
            .unwrap()
            .unwrap();
        assert_eq!(store.topics()["a"].shards, [0, 1, 2, 3, 0, 1, 2, 3]);
        let settled = store.settle_placement(2).unwrap();
        assert_eq!(
            settled,
            SettledPlacement {
                filled: 0,
                replaced: 4
            }
        );
        let after = store.topics()["a"].shards.clone();
        for p in [0, 1, 4, 5] {
            assert_eq!(after[p], [0, 1, 2, 3, 0, 1, 2, 3][p], "partition {p} stays");
        }
        assert_eq!(loads(&store, 2), [4, 4]);
        drop(store);
        let store = MetadataStore::open(dir.path()).unwrap();
        assert_eq!(store.topics()["a"].shards, after);
    }

    #[test]
    fn shard_limit_refuses_whole_creates_only() {
        let limit = ShardLimit {
            shards: 2,
            max_partitions_per_shard: 10,
        };
        let dir = tempfile::tempdir().unwrap();
        let store = MetadataStore::open(dir.path()).unwrap();
        let code = kafka_protocol::ResponseError::InvalidPartitions.code();
        let refused = store
            .create_topic("big", 21, BTreeMap::new(), false, limit)
            .unwrap()
            .unwrap_err();
        assert_eq!(refused.code, code);
        assert!(
            refused.message.contains("limit of 10"),
            "{}",
            refused.message
        );
        assert!(store.topics().is_empty());
        store
            .create_topic("a", 16, BTreeMap::new(), false, limit)
            .unwrap()
            .unwrap();
        // 8 a shard used: 4 more fit, 5 do not (20 in all).
        assert_eq!(
            store
                .create_partitions("a", 21, 100, limit, false)
                .unwrap()
                .unwrap_err()
                .code,
            code
        );
        assert_eq!(store.topics()["a"].partitions, 16);
        assert_eq!(
            store.create_partitions("a", 20, 100, limit, true).unwrap(),
            Ok(16)
        );
        assert_eq!(store.topics()["a"].partitions, 16);
        assert_eq!(
            store.create_partitions("a", 20, 100, limit, false).unwrap(),
            Ok(16)
        );
        let refused = store
            .create_topic("b", 1, BTreeMap::new(), false, limit)
            .unwrap()
            .unwrap_err();
        assert_eq!(refused.code, code);
    }
}
