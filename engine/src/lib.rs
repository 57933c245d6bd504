//! Spate storage engine: partition logs of opaque Kafka record batches.
//!
//! No networking and no Kafka request types live here. A [`PartitionLog`] belongs to one glommio
//! executor (shard); it is `!Send` and every method takes `&self`, so many tasks of that shard may
//! append and read concurrently.
//!
//! Layout: `log.rs` (the API and the append/read paths), `writer.rs` (direct-I/O write-behind),
//! `frame.rs` (the on-disk frame header), `segment.rs` and `index.rs` (segment files and their
//! sparse indexes), `recovery.rs` (open), `truncate.rs` (truncation and retention),
//! `checkpoint.rs` (the recovery-point file), `checkpointer.rs` (background recovery-point
//! writes and the finishing of sealed segments), `cache.rs` (the per-shard batch cache), `crc.rs`
//! (CRC-32C combination), `validate.rs` (full validation of a produced batch's insides),
//! `foreground.rs` (the shard's foreground disk work, which the cleaner stays out of the way of).

pub mod batch;
mod cache;
mod checkpoint;
mod checkpoint_budget;
mod checkpointer;
pub mod clean;
mod config;
mod crc;
pub mod deadline;
mod error;
pub mod frame;
// Replica support: reads bounded by an offset, follower appends, durability waits.
mod follower;
pub mod foreground;
mod index;
mod log;
pub mod observe;
pub mod records;
mod recovery;
mod segment;
mod signal;
pub mod topic_config;
mod truncate;
pub mod validate;
mod writer;

pub use cache::{set_shard_cache_bytes, shard_cache_used_bytes, DEFAULT_SHARD_CACHE_BYTES};
pub use checkpoint::{write_file_atomic, RECOVERY_POINT_FILE};
pub use checkpoint_budget::{
    CHECKPOINTS_PER_SEC, CHECKPOINT_DEADLINE_SPREAD_MS, CHECKPOINT_MAX_INTERVAL_MS,
};
pub use config::{FlushPolicy, LogConfig, DEFAULT_MAX_BATCH_BYTES};
pub use error::{is_no_space_io, EngineError};
pub use follower::LogListener;
pub use log::{
    AppendInfo, JoinedRead, LiveLimits, PartitionLog, ReadResult, CHECKPOINT_INTERVAL_MS,
    MAX_FRAME_PAYLOAD_BYTES, RETENTION_NO_SPACE_ATTEMPTS,
};
pub use writer::{MAX_INFLIGHT_WRITES, PAGE_BYTES, WRITE_BUF_BYTES};
