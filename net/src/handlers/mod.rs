//! Request handlers: thin adapters from Kafka requests to partition work on owning shards.

pub mod admin;
pub mod api_versions;
pub mod elect_leaders;
pub mod fetch;
pub mod init_producer_id;
pub mod list_offsets;
pub mod log_dirs;
pub mod maintenance;
pub mod metadata;
pub mod offset_for_leader_epoch;
pub mod produce;
pub mod quorum;
pub mod reassignments;
pub mod unregister_broker;

use kafka_protocol::messages::TopicName;
use kafka_protocol::protocol::StrBytes;

pub(crate) fn topic_name(name: &str) -> TopicName {
    TopicName(StrBytes::from_string(name.to_string()))
}

pub(crate) fn str_bytes(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}
