//! spate-client: the Kafka client library shared by the `spate` CLI and `spate-perf`.
//!
//! Blocking and small on purpose: one TCP connection per broker ([`wire`]), version negotiation
//! with ApiVersions, the cluster calls a CLI or a benchmark needs ([`cluster`]), and record batch
//! encoding and decoding ([`batch`]). It links no plotting or histogram code, so the broker
//! binary can use it without the load generator.

pub mod batch;
pub mod cluster;
pub mod error;
pub mod wire;

pub use error::{ClientError, Result};
