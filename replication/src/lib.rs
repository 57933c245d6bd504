//! Quorum replication and the controller (metadata) log.
//!
//! Not started. The storage engine's log API (append with leader epoch, truncate to an offset,
//! last offset of an epoch) is what this crate will drive; see ../shared/ARCHITECTURE.md.
