//! The partition log API. (skeleton: signatures agreed between engine and net; the engine
//! branch implements them.)
#![allow(unused_variables, dead_code)]

use std::path::Path;

use bytes::Bytes;

use crate::{EngineError, LogConfig};

/// Where an appended batch landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendInfo {
    pub base_offset: u64,
    pub last_offset: u64,
    pub max_timestamp: i64,
}

/// Whole batches read from the log, in offset order, each a Kafka RecordBatch v2 with its
/// assigned base offset and leader epoch stamped in (no frame headers).
#[derive(Clone, Debug, Default)]
pub struct ReadResult {
    pub batches: Vec<Bytes>,
    pub log_start_offset: u64,
    pub log_end_offset: u64,
}

pub struct PartitionLog {}

impl PartitionLog {
    /// Opens (creating if missing) the log in `dir` and recovers it.
    pub async fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Self, EngineError> {
        todo!()
    }
    /// Appends one RecordBatch v2; stamps base offset and leader epoch. Returns once the batch
    /// is readable; durability is awaited separately with [`Self::sync_to`].
    pub async fn append(&self, batch: Bytes, leader_epoch: i32) -> Result<AppendInfo, EngineError> {
        todo!()
    }
    /// Resolves once every offset `< end_offset` is durable (group commit: joins the fdatasync in
    /// flight or starts one), whatever the flush policy.
    pub async fn sync_to(&self, end_offset: u64) -> Result<(), EngineError> {
        todo!()
    }
    /// Whole batches from the one containing `offset`, up to `max_bytes` (at least one batch if
    /// any exists at or after `offset`, even if larger than `max_bytes`).
    pub async fn read(&self, offset: u64, max_bytes: usize) -> Result<ReadResult, EngineError> {
        todo!()
    }
    pub fn log_start_offset(&self) -> u64 {
        todo!()
    }
    /// The next offset to assign.
    pub fn log_end_offset(&self) -> u64 {
        todo!()
    }
    /// Every offset below this is on disk.
    pub fn durable_offset(&self) -> u64 {
        todo!()
    }
    /// First offset whose batch max timestamp is `>= timestamp_ms`, with that timestamp.
    pub async fn offset_for_timestamp(
        &self,
        timestamp_ms: i64,
    ) -> Result<Option<(u64, i64)>, EngineError> {
        todo!()
    }
    /// Removes every batch at or after `offset` (which must be a batch boundary or the end).
    pub async fn truncate_to(&self, offset: u64) -> Result<(), EngineError> {
        todo!()
    }
    /// Kafka OffsetsForLeaderEpoch: the largest epoch `<= epoch` in the log and its end offset
    /// (the start of the next higher epoch, or the log end). None if the log has no such epoch.
    pub fn end_offset_for_epoch(&self, epoch: i32) -> Option<(i32, u64)> {
        todo!()
    }
    /// Deletes whole segments past the size or age limits; returns the new log start offset.
    pub async fn apply_retention(&self, now_ms: i64) -> Result<u64, EngineError> {
        todo!()
    }
    /// Flushes everything and writes the recovery point.
    pub async fn close(&self) -> Result<(), EngineError> {
        todo!()
    }
    /// Closes the log and removes its directory (topic deletion).
    pub async fn delete(&self) -> Result<(), EngineError> {
        todo!()
    }
}
