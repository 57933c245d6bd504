//! Topic metadata known on every shard: names, topic ids, partition counts, per-topic configs,
//! and the producer-id allocator. Persisted to one checksummed file in the data dir.
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
use crate::shard_table::shard_of;

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

pub struct MetadataStore {
    path: PathBuf,
    version: AtomicU64,
    inner: Mutex<Inner>,
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

/// Names the broker keeps for itself (Kafka's internal topics). Clients may not create them:
/// `__consumer_offsets` is the group coordinator's log, outside the topic table.
pub const RESERVED_TOPIC_NAMES: [&str; 2] = ["__consumer_offsets", "__transaction_state"];

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

/// Adds one to `counts[shard]` for each partition in `from..to` of a topic whose partition 0
/// is on shard `base`: partitions are placed on consecutive shards ([`shard_of`]).
fn count_placed(counts: &mut [usize], base: usize, from: i32, to: i32) {
    let shards = counts.len();
    let n = (to - from).max(0) as usize;
    let (full, rest) = (n / shards, n % shards);
    if full > 0 {
        counts.iter_mut().for_each(|c| *c += full);
    }
    let start = (base + from.max(0) as usize) % shards;
    for i in 0..rest {
        counts[(start + i) % shards] += 1;
    }
}

/// Refuses adding partitions `from..to` to topic `name` if a shard receiving one of them would
/// then hold more than the limit. Placement is a hash known in advance, so the count is exact
/// per shard (not cores x limit in total): a hash that happens to crowd one shard is refused
/// rather than left to overload that core.
fn check_shard_limit(
    topics: &BTreeMap<String, TopicMeta>,
    name: &str,
    from: i32,
    to: i32,
    limit: ShardLimit,
) -> Result<(), Refused> {
    let shards = limit.shards.max(1);
    let mut used = vec![0usize; shards];
    for t in topics.values() {
        count_placed(&mut used, shard_of(&t.name, 0, shards), 0, t.partitions);
    }
    let mut added = vec![0usize; shards];
    count_placed(&mut added, shard_of(name, 0, shards), from, to);
    let max = limit.max_partitions_per_shard;
    for s in 0..shards {
        if added[s] > 0 && used[s] + added[s] > max {
            return Err(Refused::new(
                kafka_protocol::ResponseError::InvalidPartitions,
                format!(
                    "topic '{name}': {} more partitions on shard {s}, which holds {}, would pass \
                     the limit of {max} partition replicas per shard ({shards} shards); raise \
                     --max-partitions-per-shard (SPATE_MAX_PARTITIONS_PER_SHARD), run on more \
                     cores, or delete topics",
                    added[s], used[s]
                ),
            ));
        }
    }
    Ok(())
}

fn check_create_topic(
    topics: &BTreeMap<String, TopicMeta>,
    name: &str,
    partitions: i32,
    internal: bool,
    limit: ShardLimit,
) -> Result<(), Refused> {
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
    check_shard_limit(topics, name, 0, partitions, limit)
}

/// Checks growing `name` to `count` partitions; returns its current count.
fn check_create_partitions(
    topics: &BTreeMap<String, TopicMeta>,
    name: &str,
    count: i32,
    max_per_topic: i32,
    limit: ShardLimit,
) -> Result<i32, Refused> {
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
    check_shard_limit(topics, name, topic.partitions, count, limit)?;
    Ok(topic.partitions)
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
        };
        store.persist(&store.lock().state)?;
        Ok(Arc::new(store))
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
            check_create_topic(&s.topics, name, partitions, internal, limit)?;
            let meta = TopicMeta {
                name: name.to_string(),
                id: random_topic_id(),
                partitions,
                internal,
                configs,
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
        check_create_topic(&self.lock().state.topics, name, partitions, false, limit)
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
        if validate_only {
            let inner = self.lock();
            return Ok(check_create_partitions(
                &inner.state.topics,
                name,
                count,
                max_per_topic,
                limit,
            ));
        }
        self.update(|s| {
            let old = check_create_partitions(&s.topics, name, count, max_per_topic, limit)?;
            let topic = s.topics.get_mut(name).expect("checked above");
            topic.partitions = count;
            Ok(old)
        })
    }

    /// A producer id never handed out before, even across restarts.
    pub fn allocate_producer_id(&self) -> Result<i64, ReplicaError> {
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

    #[test]
    fn counted_placement_matches_shard_of() {
        let mut topics = BTreeMap::new();
        for (i, n) in [1, 5, 7, 13, 64].into_iter().enumerate() {
            let name = format!("t{i}");
            topics.insert(
                name.clone(),
                TopicMeta {
                    name,
                    id: 0,
                    partitions: n,
                    internal: false,
                    configs: BTreeMap::new(),
                },
            );
        }
        for shards in 1..=6 {
            let mut by_hash = vec![0usize; shards];
            let mut counted = vec![0usize; shards];
            for t in topics.values() {
                for p in 0..t.partitions {
                    by_hash[shard_of(&t.name, p, shards)] += 1;
                }
                count_placed(
                    &mut counted,
                    shard_of(&t.name, 0, shards),
                    0,
                    3.min(t.partitions),
                );
                count_placed(
                    &mut counted,
                    shard_of(&t.name, 0, shards),
                    3.min(t.partitions),
                    t.partitions,
                );
            }
            assert_eq!(by_hash, counted, "{shards} shards");
        }
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
        // 8 a shard used: 4 more fit, 5 do not (one shard would get 3).
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
