//! Partition replicas on shards: the layer between the Kafka protocol (net/) and the storage
//! engine (engine/).
//!
//! [`PartitionReplica`] is one partition's replica on this node, owned by one shard: the engine
//! log (private to it), producer state and the high watermark. It is the only way to a log from
//! above. Not to be confused with [`crate::Replica`], the consensus state machine of one
//! replication group: a replicated partition's [`PartitionGroup`] owns both and performs the
//! core's actions on the replica.

mod clean;
mod config;
mod error;
mod group;
mod producer_state;
mod record_check;
mod replica;
mod topic_partition;

pub use clean::{clean_logs, cleaner_wake, OFFSETS_MAX_UNCLEANED_BYTES};
pub use config::{apply_topic_configs, parse_topic_configs, TopicPolicy};
pub use error::{engine_error_code, ReplicaError};
pub use group::{
    hard_state_path, membership_path, GroupConfig, GroupSignals, PartitionGroup, TickTaken,
    HARD_STATE_SUFFIX, LEADER_CHANGE_CONTROL_TYPE, MAX_APPEND_FILL_BYTES, MAX_DEFERRED_BYTES,
    MAX_DEFERRED_STEPS, MAX_SHARD_DEFERRED_BYTES,
};
pub use producer_state::{
    last_seq, next_seq, BatchMeta, ProducerEntry, ProducerTable, Verdict,
    CACHED_BATCHES_PER_PRODUCER, MAX_PRODUCERS_PER_PARTITION, MAX_SNAPSHOT_FILE_BYTES,
    SNAPSHOTS_KEPT,
};
pub use record_check::{RecordError, MAX_RECORD_ERRORS};
pub use replica::{
    Acks, Completion, NoObserver, PartitionReplica, ProduceOutcome, ReplicaConfig, ReplicaObserver,
    ReplicaRead, ReplicationGauges, LEADER_EPOCH, PRODUCER_SNAPSHOT_EVERY_BYTES,
};
pub use spate_engine::clean::{
    CleanStats, CleanerConfig, WriterWaits, DEFAULT_DEDUPE_BUFFER_BYTES,
};
pub use spate_engine::topic_config::{
    AlterOp, ConfigSource, ConfigType, TopicConfigError, TopicConfigs,
};
pub use topic_partition::TopicPartition;

// Storage types the layers above need, so that they name the engine only through replicas.
pub use spate_engine::batch::{BatchHeader, VerifiedBatch, BATCH_HEADER_BYTES};
pub use spate_engine::{
    is_no_space_io, observe, EngineError, FlushPolicy, LiveLimits, LogConfig, ReadResult,
    DEFAULT_MAX_BATCH_BYTES,
};
