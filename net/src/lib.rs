//! Spate Kafka wire protocol. (skeleton: the net branch replaces this)
pub mod group;
