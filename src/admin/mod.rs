//! Operator subcommands that speak the Kafka protocol to a running broker: topics, consumer
//! groups, produce and consume on stdin/stdout, and cluster information. Text tables by
//! default, `--json` for scripts. The Kafka client underneath is spate-perf's.

pub mod client;
pub mod cluster;
pub mod consume;
pub mod group;
pub mod node;
pub mod partition;
pub mod partitioner;
pub mod produce;
pub mod table;
pub mod topic;

pub use cluster::ClusterCommand;
pub use consume::ConsumeArgs;
pub use group::GroupCommand;
pub use node::NodeCommand;
pub use partition::PartitionCommand;
pub use produce::ProduceArgs;
pub use topic::TopicCommand;

/// Ends an admin command: exit status 0, or 1 with the error (and its causes) on stderr.
/// The broker's log line for errors is left out: these commands talk to people and scripts.
pub fn finish(result: anyhow::Result<()>) -> ! {
    use std::io::Write;
    let flushed = std::io::stdout().flush();
    match result.and(flushed.map_err(anyhow::Error::from)) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("spate: {e:#}");
            std::process::exit(1)
        }
    }
}
