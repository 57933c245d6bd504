//! A node's identity on disk: its node id, a node UUID created once per data directory, and the
//! id of the cluster it belongs to.
//!
//! The UUID tells a restarted node (same directory, same UUID) from a wiped one reusing an id
//! (new directory, new UUID), which must not be counted as holding data it lost. The cluster id
//! keeps a node from joining a cluster that is not the one its data came from. Both are checked
//! here when the directory is opened, and again by peers in the rpc handshake.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::types::NodeId;

/// The file in the data directory.
pub const IDENTITY_FILE: &str = "node.identity";
/// A cluster id is 1 to this many bytes of `[A-Za-z0-9._-]` (Kafka's are 22 base64url chars).
pub const MAX_CLUSTER_ID_BYTES: usize = 64;
/// The identity file is a few short lines; a larger one is not ours.
const MAX_IDENTITY_FILE_BYTES: u64 = 4096;
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid node identity file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{path} belongs to node {on_disk}, but this node is configured as {configured}: \
         use that node id or another data directory"
    )]
    NodeIdMismatch {
        path: PathBuf,
        on_disk: NodeId,
        configured: NodeId,
    },
    #[error(
        "{path} belongs to cluster {on_disk:?}, not {expected:?}: this data directory is from \
         another cluster"
    )]
    ClusterMismatch {
        path: PathBuf,
        on_disk: String,
        expected: String,
    },
    #[error("invalid cluster id {0:?}: 1-{MAX_CLUSTER_ID_BYTES} bytes of [A-Za-z0-9._-]")]
    InvalidClusterId(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub node_id: NodeId,
    pub node_uuid: u128,
    pub cluster_id: String,
}

pub fn check_cluster_id(id: &str) -> Result<(), IdentityError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_CLUSTER_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(IdentityError::InvalidClusterId(id.to_string()))
    }
}

/// 128 random bits from the kernel; never zero (zero means "no UUID" on the wire).
pub fn random_node_uuid() -> std::io::Result<u128> {
    let mut f = std::fs::File::open("/dev/urandom")?;
    loop {
        let mut b = [0u8; 16];
        f.read_exact(&mut b)?;
        let v = u128::from_be_bytes(b);
        if v != 0 {
            return Ok(v);
        }
    }
}

impl NodeIdentity {
    /// Reads the identity in `dir`, if there is one.
    pub fn read(dir: &Path) -> Result<Option<Self>, IdentityError> {
        let path = dir.join(IDENTITY_FILE);
        let io = |source| IdentityError::Io {
            path: path.clone(),
            source,
        };
        let f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let mut text = String::new();
        f.take(MAX_IDENTITY_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(io)?;
        if text.len() as u64 > MAX_IDENTITY_FILE_BYTES {
            return Err(IdentityError::Corrupt {
                path,
                reason: "too large".into(),
            });
        }
        parse(&text)
            .map(Some)
            .map_err(|reason| IdentityError::Corrupt { path, reason })
    }

    /// Opens the identity of the node `node_id` in `dir`, creating it on first start (with
    /// `expected_cluster`, or a cluster id from `new_cluster_id` when this node founds the
    /// cluster). An existing identity must match `node_id` and, when given, `expected_cluster`.
    pub fn open_or_create(
        dir: &Path,
        node_id: NodeId,
        expected_cluster: Option<&str>,
        new_cluster_id: impl FnOnce() -> String,
    ) -> Result<Self, IdentityError> {
        let path = dir.join(IDENTITY_FILE);
        if let Some(id) = NodeIdentity::read(dir)? {
            if id.node_id != node_id {
                return Err(IdentityError::NodeIdMismatch {
                    path,
                    on_disk: id.node_id,
                    configured: node_id,
                });
            }
            if let Some(expected) = expected_cluster {
                if id.cluster_id != expected {
                    return Err(IdentityError::ClusterMismatch {
                        path,
                        on_disk: id.cluster_id,
                        expected: expected.to_string(),
                    });
                }
            }
            return Ok(id);
        }
        let cluster_id = expected_cluster.map_or_else(new_cluster_id, str::to_string);
        check_cluster_id(&cluster_id)?;
        let id = NodeIdentity {
            node_id,
            node_uuid: random_node_uuid().map_err(|source| IdentityError::Io {
                path: PathBuf::from("/dev/urandom"),
                source,
            })?,
            cluster_id,
        };
        id.write(dir)?;
        tracing::info!(
            node_id,
            node_uuid = %format!("{:032x}", id.node_uuid),
            cluster_id = %id.cluster_id,
            "created node identity"
        );
        Ok(id)
    }

    /// Temp file, fsync, rename, fsync of the directory: a crash leaves the old file or the new
    /// one, never a torn one.
    fn write(&self, dir: &Path) -> Result<(), IdentityError> {
        let path = dir.join(IDENTITY_FILE);
        let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
        let body = format!(
            "version={FORMAT_VERSION}\nnode_id={}\nnode_uuid={:032x}\ncluster_id={}\n",
            self.node_id, self.node_uuid, self.cluster_id
        );
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(body.as_bytes())?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        result.map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            IdentityError::Io { path, source }
        })
    }
}

fn parse(text: &str) -> Result<NodeIdentity, String> {
    let mut version = None;
    let mut node_id = None;
    let mut node_uuid = None;
    let mut cluster_id = None;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line without '=': {line:?}"))?;
        let slot_set = match k {
            "version" => version
                .replace(v.parse::<u32>().map_err(|e| format!("version: {e}"))?)
                .is_some(),
            "node_id" => node_id
                .replace(v.parse::<NodeId>().map_err(|e| format!("node_id: {e}"))?)
                .is_some(),
            "node_uuid" => {
                if v.len() != 32 {
                    return Err("node_uuid must be 32 hex digits".into());
                }
                node_uuid
                    .replace(u128::from_str_radix(v, 16).map_err(|e| format!("node_uuid: {e}"))?)
                    .is_some()
            }
            "cluster_id" => {
                check_cluster_id(v).map_err(|e| e.to_string())?;
                cluster_id.replace(v.to_string()).is_some()
            }
            other => return Err(format!("unknown key {other:?}")),
        };
        if slot_set {
            return Err(format!("{k} given twice"));
        }
    }
    if version != Some(FORMAT_VERSION) {
        return Err(format!("unsupported version {version:?}"));
    }
    let node_uuid = node_uuid.ok_or("node_uuid missing")?;
    if node_uuid == 0 {
        return Err("node_uuid is zero".into());
    }
    Ok(NodeIdentity {
        node_id: node_id.ok_or("node_id missing")?,
        node_uuid,
        cluster_id: cluster_id.ok_or("cluster_id missing")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let a = NodeIdentity::open_or_create(dir.path(), 3, None, || "c-1".into()).unwrap();
        assert_eq!((a.node_id, a.cluster_id.as_str()), (3, "c-1"));
        assert_ne!(a.node_uuid, 0);
        let b =
            NodeIdentity::open_or_create(dir.path(), 3, Some("c-1"), || unreachable!()).unwrap();
        assert_eq!(a, b);
        assert!(!dir.path().join("node.identity.tmp").exists());
    }

    #[test]
    fn a_wiped_directory_gets_a_new_uuid() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = NodeIdentity::open_or_create(d1.path(), 1, Some("c"), String::new).unwrap();
        let b = NodeIdentity::open_or_create(d2.path(), 1, Some("c"), String::new).unwrap();
        assert_ne!(a.node_uuid, b.node_uuid);
    }

    #[test]
    fn mismatches_are_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        NodeIdentity::open_or_create(dir.path(), 1, Some("alpha"), String::new).unwrap();
        let e = NodeIdentity::open_or_create(dir.path(), 1, Some("beta"), String::new).unwrap_err();
        assert!(matches!(e, IdentityError::ClusterMismatch { .. }), "{e}");
        assert!(e.to_string().contains("another cluster"), "{e}");
        let e = NodeIdentity::open_or_create(dir.path(), 2, None, String::new).unwrap_err();
        assert!(matches!(
            e,
            IdentityError::NodeIdMismatch {
                on_disk: 1,
                configured: 2,
                ..
            }
        ));
    }

    #[test]
    fn damaged_or_hostile_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(IDENTITY_FILE);
        for body in [
            "".to_string(),
            "version=1\nnode_id=1\ncluster_id=c\n".into(),
            "version=1\nnode_id=1\nnode_uuid=zz\ncluster_id=c\n".into(),
            "version=2\nnode_id=1\nnode_uuid=0000000000000000000000000000000a\ncluster_id=c\n".into(),
            "version=1\nnode_id=1\nnode_id=2\nnode_uuid=0000000000000000000000000000000a\ncluster_id=c\n".into(),
            "version=1\nnode_id=1\nnode_uuid=0000000000000000000000000000000a\ncluster_id=a b\n".into(),
            "x".repeat(10_000),
        ] {
            std::fs::write(&path, &body).unwrap();
            let e = NodeIdentity::read(dir.path()).unwrap_err();
            assert!(matches!(e, IdentityError::Corrupt { .. }), "{body:?}: {e}");
        }
        assert!(check_cluster_id(&"a".repeat(MAX_CLUSTER_ID_BYTES + 1)).is_err());
    }
}
