//! The engine's single-registration timers ([`spate_engine::deadline`]), under the name the
//! shard runtime and the Kafka layer already use.

pub use spate_engine::deadline::{sleep, timeout, Deadline, TimedOut, TIMER_WHEEL_SLACK};
