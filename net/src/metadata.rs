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

use crate::error::NetError;

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

impl MetadataStore {
    /// Loads the store from `data_dir`, creating an empty one if there is none. A file whose
    /// checksum does not match is an error, never silently replaced.
    pub fn open(data_dir: &Path) -> Result<Arc<Self>, NetError> {
        let path = data_dir.join(METADATA_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => decode_file(&bytes).map_err(|reason| NetError::Metadata {
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
    fn update<T>(
        &self,
        change: impl FnOnce(&mut Persisted) -> Result<T, i16>,
    ) -> Result<Result<T, i16>, NetError> {
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

    /// Creates a topic; the inner error is a Kafka error code.
    pub fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        configs: BTreeMap<String, String>,
        internal: bool,
    ) -> Result<Result<TopicMeta, i16>, NetError> {
        use kafka_protocol::ResponseError as E;
        self.update(|s| {
            if !valid_topic_name(name) || (!internal && is_reserved_topic_name(name)) {
                return Err(E::InvalidTopicException.code());
            }
            if s.topics.contains_key(name) {
                return Err(E::TopicAlreadyExists.code());
            }
            if partitions < 1 {
                return Err(E::InvalidPartitions.code());
            }
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

    pub fn delete_topic(&self, name: &str) -> Result<Result<TopicMeta, i16>, NetError> {
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
    ) -> Result<Result<(), i16>, NetError> {
        self.update(|s| {
            let topic = s
                .topics
                .get_mut(name)
                .ok_or(kafka_protocol::ResponseError::UnknownTopicOrPartition.code())?;
            topic.configs = configs;
            Ok(())
        })
    }

    /// Grows a topic to `count` partitions; returns the old count.
    pub fn create_partitions(
        &self,
        name: &str,
        count: i32,
        limit: i32,
    ) -> Result<Result<i32, i16>, NetError> {
        use kafka_protocol::ResponseError as E;
        self.update(|s| {
            let topic = s
                .topics
                .get_mut(name)
                .ok_or(E::UnknownTopicOrPartition.code())?;
            if count <= topic.partitions || count > limit {
                return Err(E::InvalidPartitions.code());
            }
            let old = topic.partitions;
            topic.partitions = count;
            Ok(old)
        })
    }

    /// A producer id never handed out before, even across restarts.
    pub fn allocate_producer_id(&self) -> Result<i64, NetError> {
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
    fn persist(&self, state: &Persisted) -> Result<(), NetError> {
        let body = serde_json::to_vec(state).map_err(|e| NetError::Metadata {
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

    #[test]
    fn topics_and_producer_ids_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetadataStore::open(dir.path()).unwrap();
        let t = store
            .create_topic("a", 3, BTreeMap::new(), false)
            .unwrap()
            .unwrap();
        assert!(store
            .create_topic("a", 1, BTreeMap::new(), false)
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
}
