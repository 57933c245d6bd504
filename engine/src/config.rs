//! Per-log configuration. Every limit is named with its unit.

/// When appended batches are made durable with fdatasync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushPolicy {
    /// Group commit: one fdatasync covers every batch appended since the previous one; callers
    /// that need durability wait on it with [`crate::PartitionLog::sync_to`].
    Always,
    /// fdatasync every `interval_ms` milliseconds or every `interval_bytes` appended bytes,
    /// whichever comes first.
    Interval {
        interval_ms: u64,
        interval_bytes: u64,
    },
    /// Never fdatasync except on close (the OS and the disk decide).
    Never,
}

/// The one default for the largest batch a partition takes (Kafka's `max.message.bytes`,
/// `--max-batch-bytes`): the engine, the broker's configuration and the CLI all use it.
pub const DEFAULT_MAX_BATCH_BYTES: u32 = 8 << 20;

#[derive(Clone, Debug)]
pub struct LogConfig {
    /// A segment rolls when it would grow past this size.
    pub segment_bytes: u64,
    /// A segment rolls when its first batch is older than this (None: no age limit).
    pub segment_ms: Option<u64>,
    /// One sparse offset/time index entry per this many bytes of batches.
    pub index_interval_bytes: u32,
    /// Appends of larger batches fail with [`crate::EngineError::BatchTooLarge`].
    pub max_batch_bytes: u32,
    /// Delete the oldest whole segments while the log is larger than this (None: no limit).
    pub retention_bytes: Option<u64>,
    /// Delete whole segments whose newest batch is older than this (None: no limit).
    pub retention_ms: Option<u64>,
    pub flush: FlushPolicy,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 1 << 30,
            segment_ms: Some(7 * 24 * 3600 * 1000),
            index_interval_bytes: 4096,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            retention_bytes: None,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            flush: FlushPolicy::Always,
        }
    }
}

impl LogConfig {
    /// Checks the limits against each other (a batch must fit in a segment, and so on): the
    /// same check `PartitionLog::open` makes, for callers that want to refuse a setting early.
    pub fn validate(&self) -> Result<(), crate::EngineError> {
        crate::recovery::validate(self)
    }
}
