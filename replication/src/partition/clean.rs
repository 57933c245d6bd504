//! The background log cleaner of one shard: a round over the shard's compacted partitions,
//! the dirtiest first (logs that asked for an urgent cleaning before them), each cleaned by the
//! engine's cleaner with the shard's share of the dedupe memory and I/O budget. It runs in its
//! own task (never on the produce or fetch path) and yields between logs so the shard's
//! requests keep their turn.

use std::rc::Rc;

use spate_engine::clean::CleanerConfig;

use super::replica::PartitionReplica;
use crate::shard::Signal;

/// Most bytes a `__consumer_offsets` replica holds past its cleaned part (its dirty closed
/// segments and the active one) before its writer waits for the log cleaner; a replica whose
/// cleaned part is bigger (many live groups) may hold as much dirty again, so it is not
/// rewritten whole for every few segments of commits. Two thirds of the way there the cleaner
/// is asked to clean it at once (see [`PartitionReplica::keep_cleaned`]). What a coordinator's
/// load replays is then the cleaned part (the live groups), this much (or the cleaned part's
/// size) and one write: three of the coordinator's 8 MiB segments, since the active one and
/// the one just closed (the recovery point may still name it) are not yet cleanable.
pub const OFFSETS_MAX_UNCLEANED_BYTES: u64 = 24 << 20;

thread_local! {
    static CLEANER_WAKE: Rc<Signal> = Rc::default();
}

/// This thread's (shard's) cleaner wake-up: notified when a replica asks for an urgent
/// cleaning or the group coordinator has written a segment's worth; the shard's cleaner task
/// waits on it between rounds.
pub fn cleaner_wake() -> Rc<Signal> {
    CLEANER_WAKE.with(Rc::clone)
}

/// Cleans every partition of `replicas` that is due (see [`PartitionReplica::cleaning_due`]),
/// the dirtiest first; stops early once `stop` says so (shutdown). Errors are logged: a log
/// the cleaner fails on is tried again next round. Returns how many logs it cleaned.
pub async fn clean_logs(
    replicas: &[Rc<PartitionReplica>],
    config: &CleanerConfig,
    stop: impl Fn() -> bool,
) -> usize {
    let now = now_ms();
    let mut due: Vec<(bool, f64, &Rc<PartitionReplica>)> = replicas
        .iter()
        .filter_map(|r| match r.cleaning_due(config, now) {
            Some((ratio, true)) => Some((r.urgent_clean_requested(), ratio, r)),
            _ => {
                r.note_cleaner_visit();
                None
            }
        })
        .collect();
    // Logs that asked for an urgent cleaning first (see `PartitionReplica::keep_cleaned`), then
    // the dirtiest.
    due.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.total_cmp(&a.1)));
    let mut cleaned = 0;
    for (_, _, r) in due {
        if stop() {
            return cleaned;
        }
        glommio::yield_if_needed().await;
        let started = std::time::Instant::now();
        let result = r.clean(config, now_ms()).await;
        r.note_cleaner_visit();
        match result {
            Ok(Some(stats)) => {
                cleaned += 1;
                tracing::info!(
                topic = %r.tp.topic,
                partition = r.tp.partition,
                passes = stats.passes,
                bytes_read = stats.bytes_read,
                bytes_written = stats.bytes_written,
                elapsed_ms = started.elapsed().as_millis() as u64,
                bytes_reclaimed = stats.bytes_reclaimed,
                records_removed = stats.records_removed,
                tombstones_removed = stats.tombstones_removed,
                dirty_ratio = stats.dirty_ratio_before,
                deferred_ms = stats.deferred_ms,
                "log cleaned"
                )
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(topic = %r.tp.topic, partition = r.tp.partition,
                error = %e, "log cleaning failed"),
        }
    }
    cleaned
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
