//! One partition on its owning shard: the engine log plus the idempotent-producer state that
//! decides which batches reach it.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::path::PathBuf;

use glommio::sync::Semaphore;
use kafka_protocol::ResponseError;
use serde::{Deserialize, Serialize};
use spate_engine::batch::{BatchHeader, VerifiedBatch};
use spate_engine::validate::{validate_batch, Refusal};
use spate_engine::{LogConfig, PartitionLog};

use crate::error::{engine_error_code, NetError, NONE};
use crate::metrics::PartitionMetrics;
use crate::producer_state::{last_seq, BatchMeta, ProducerTable, Verdict};
use crate::shard::TopicPartition;

/// Bytes read per step while rebuilding producer state from the log.
const RECOVERY_READ_BYTES: usize = 1 << 20;
/// Leader epoch stamped into batches until replication assigns real epochs.
pub const LEADER_EPOCH: i32 = 0;

pub struct Partition {
    pub tp: TopicPartition,
    pub log: PartitionLog,
    producers: RefCell<ProducerTable>,
    /// Held across the producer check and the append, so both see the same log end.
    write_lock: Semaphore,
    state_path: PathBuf,
    /// Log end covered by the last snapshot written.
    snapshot_end: Cell<Option<u64>>,
    pub metrics: PartitionMetrics,
}

/// Outcome of one partition's share of a Produce request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProduceOutcome {
    pub error_code: i16,
    pub base_offset: i64,
    pub log_start_offset: i64,
    /// Why the partition's batches were refused (the Produce response's `error_message`); set
    /// only on that error path.
    pub error_message: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    /// The table covers every batch below this offset.
    end_offset: u64,
    table: ProducerTable,
}

impl Partition {
    pub async fn open(
        tp: TopicPartition,
        dir: PathBuf,
        state_path: PathBuf,
        config: LogConfig,
        metrics: PartitionMetrics,
    ) -> Result<Partition, NetError> {
        let log = PartitionLog::open(&dir, config).await?;
        let partition = Partition {
            tp,
            log,
            producers: RefCell::default(),
            write_lock: Semaphore::new(1),
            state_path,
            snapshot_end: Cell::new(None),
            metrics,
        };
        partition.recover_producers().await?;
        partition.publish_offsets();
        Ok(partition)
    }

    /// Loads the last snapshot (if it is consistent with the log) and replays the batches
    /// written after it.
    async fn recover_producers(&self) -> Result<(), NetError> {
        let (log_start, log_end) = (self.log.log_start_offset(), self.log.log_end_offset());
        let mut from = log_start;
        match std::fs::read(&self.state_path) {
            Ok(bytes) => match serde_json::from_slice::<Snapshot>(&bytes) {
                Ok(s) if s.end_offset <= log_end && s.end_offset >= log_start => {
                    *self.producers.borrow_mut() = s.table;
                    from = s.end_offset;
                }
                Ok(_) => tracing::info!(topic = %self.tp.topic, partition = self.tp.partition,
                    "producer snapshot does not match the log; rebuilding from the log"),
                Err(e) => tracing::warn!(topic = %self.tp.topic, partition = self.tp.partition,
                    error = %e, "unreadable producer snapshot; rebuilding from the log"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let mut offset = from;
        while offset < log_end {
            let read = self.log.read(offset, RECOVERY_READ_BYTES).await?;
            if read.batches.is_empty() {
                break;
            }
            for batch in &read.batches {
                let h = BatchHeader::parse(batch)?;
                if (h.last_offset() as u64) < offset {
                    continue;
                }
                if h.producer_id() >= 0 {
                    self.producers.borrow_mut().record(
                        h.producer_id(),
                        h.producer_epoch(),
                        batch_meta(&h),
                    );
                }
                offset = h.last_offset() as u64 + 1;
            }
        }
        Ok(())
    }

    /// Appends verified batches after the idempotence checks. With `wait_durable`, returns once
    /// they are on disk.
    pub async fn produce(&self, batches: Vec<VerifiedBatch>, wait_durable: bool) -> ProduceOutcome {
        let mut outcome = ProduceOutcome {
            error_code: NONE,
            base_offset: -1,
            log_start_offset: self.log.log_start_offset() as i64,
            error_message: None,
        };
        // Every batch of the request is checked before any is stored: a refused one leaves the
        // partition's share of the request unstored as a whole.
        let max_uncompressed_bytes = self.log.limits().max_batch_bytes as usize;
        for (i, batch) in batches.iter().enumerate() {
            if let Err(e) = validate_batch(batch.header().as_bytes(), max_uncompressed_bytes) {
                tracing::debug!(topic = %self.tp.topic, partition = self.tp.partition, error = %e, "batch refused");
                outcome.error_code = match e.refusal {
                    Refusal::InvalidRecord => ResponseError::InvalidRecord.code(),
                    Refusal::CorruptMessage => ResponseError::CorruptMessage.code(),
                };
                outcome.error_message = Some(format!("batch {i}: {e}"));
                return outcome;
            }
        }
        let Ok(_permit) = self.write_lock.acquire_permit(1).await else {
            outcome.error_code = ResponseError::NotLeaderOrFollower.code();
            return outcome;
        };
        let mut end = None;
        for batch in batches {
            let h = batch.header();
            let (pid, epoch, mut meta) = (h.producer_id(), h.producer_epoch(), batch_meta(&h));
            let (batch_bytes, records) = (batch.len() as u64, h.records_count().max(0) as u64);
            if h.is_transactional() {
                // Transactions are not implemented: storing their batches without markers
                // would expose uncommitted data.
                outcome.error_code = ResponseError::TransactionalIdAuthorizationFailed.code();
                return outcome;
            }
            if pid >= 0 {
                match self
                    .producers
                    .borrow()
                    .check(pid, epoch, meta.first_seq, meta.last_seq)
                {
                    Verdict::Append => {}
                    Verdict::Duplicate { base_offset } => {
                        outcome.error_code = ResponseError::DuplicateSequenceNumber.code();
                        outcome.base_offset = base_offset;
                        return outcome;
                    }
                    Verdict::Reject { error_code } => {
                        outcome.error_code = error_code;
                        return outcome;
                    }
                }
            }
            let info = match self.log.append(batch, LEADER_EPOCH).await {
                Ok(info) => info,
                Err(e) => {
                    tracing::warn!(topic = %self.tp.topic, partition = self.tp.partition, error = %e, "append failed");
                    outcome.error_code = engine_error_code(&e);
                    return outcome;
                }
            };
            debug_assert!(info.last_offset >= info.base_offset);
            self.metrics.bytes_in.inc_by(batch_bytes);
            self.metrics.records_in.inc_by(records);
            self.publish_offsets();
            if pid >= 0 {
                meta.base_offset = info.base_offset as i64;
                meta.last_offset = info.last_offset as i64;
                self.producers.borrow_mut().record(pid, epoch, meta);
            }
            if outcome.base_offset < 0 {
                outcome.base_offset = info.base_offset as i64;
            }
            end = Some(info.last_offset + 1);
        }
        drop(_permit);
        if let (true, Some(end)) = (wait_durable, end) {
            if let Err(e) = self.log.sync_to(end).await {
                tracing::error!(topic = %self.tp.topic, partition = self.tp.partition, error = %e, "sync failed");
                outcome.error_code = engine_error_code(&e);
            }
        }
        outcome
    }

    /// Sets the offset gauges from the log (after open, appends and retention).
    pub fn publish_offsets(&self) {
        // The high watermark is the log end: a single node has no followers to wait for.
        let end = self.log.log_end_offset();
        self.metrics.set_offsets(end, end);
    }

    /// Snapshots producer state if it changed since the last snapshot, so recovery after a
    /// crash replays only the log written since. Taken under the write lock: the table and the
    /// log end must describe the same batches.
    pub async fn snapshot_producers(&self) -> Result<(), NetError> {
        let Ok(_permit) = self.write_lock.acquire_permit(1).await else {
            return Ok(());
        };
        let end = self.log.log_end_offset();
        if self.producers.borrow().is_empty() || self.snapshot_end.get() == Some(end) {
            return Ok(());
        }
        self.write_snapshot()
    }

    /// Writes the producer snapshot atomically (temp file, fsync, rename).
    fn write_snapshot(&self) -> Result<(), NetError> {
        let snap = Snapshot {
            end_offset: self.log.log_end_offset(),
            table: self.producers.borrow().clone(),
        };
        self.snapshot_end.set(Some(snap.end_offset));
        let body = serde_json::to_vec(&snap).map_err(|e| NetError::Encode(e.to_string()))?;
        if let Some(dir) = self.state_path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.state_path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.state_path)?;
        Ok(())
    }

    /// Flushes the log, snapshots producer state, closes.
    pub async fn close(&self) -> Result<(), NetError> {
        let _permit = self.write_lock.acquire_permit(1).await;
        self.log.close().await?;
        self.write_snapshot()
    }

    pub async fn delete(&self) -> Result<(), NetError> {
        let _permit = self.write_lock.acquire_permit(1).await;
        self.log.delete().await?;
        let _ = std::fs::remove_file(&self.state_path);
        Ok(())
    }
}

fn batch_meta(h: &BatchHeader<'_>) -> BatchMeta {
    BatchMeta {
        first_seq: h.base_sequence(),
        last_seq: last_seq(h.base_sequence(), h.last_offset_delta()),
        base_offset: h.base_offset(),
        last_offset: h.last_offset(),
    }
}
