//! The admin commands' view of a cluster: one bootstrap connection (from spate-perf's blocking
//! Kafka client), lazily opened connections to partition leaders and group coordinators, and
//! Kafka error codes turned into messages that name the error.

use std::collections::HashMap;
use std::fmt::Display;
use std::ops::RangeInclusive;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use kafka_protocol::messages::find_coordinator_request::FindCoordinatorRequest;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    ApiKey, DescribeClusterRequest, DescribeClusterResponse, ListPartitionReassignmentsRequest,
    ListPartitionReassignmentsResponse, MetadataRequest, MetadataResponse, TopicName,
};
use kafka_protocol::protocol::{Request, StrBytes};
use spate_client::wire::Connection;

/// Where the broker listens unless told otherwise (`spate serve`'s default --listen).
pub const DEFAULT_BOOTSTRAP: &str = "127.0.0.1:9092";
/// Default limit on each request's round trip.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 10_000;
/// Upper bound on --request-timeout-ms.
pub const MAX_REQUEST_TIMEOUT_MS: u64 = 600_000;

const METADATA_VERSIONS: RangeInclusive<i16> = 1..=12;
const FIND_COORDINATOR_VERSIONS: RangeInclusive<i16> = 1..=3;
/// FindCoordinator key type of a consumer group.
const COORDINATOR_KEY_GROUP: i8 = 0;

/// How to reach the cluster; shared by every admin subcommand.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectArgs {
    /// Broker(s) to bootstrap from, HOST:PORT, comma-separated.
    #[arg(
        short = 'b',
        long = "bootstrap-server",
        env = "SPATE_BOOTSTRAP_SERVER",
        default_value = DEFAULT_BOOTSTRAP,
        value_delimiter = ','
    )]
    pub bootstrap: Vec<String>,
    /// Longest wait for any one reply from a broker, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_REQUEST_TIMEOUT_MS,
          value_parser = clap::value_parser!(u64).range(1..=MAX_REQUEST_TIMEOUT_MS))]
    pub request_timeout_ms: u64,
}

/// A connection to the cluster plus connections to other brokers, opened on first use.
pub struct Client {
    pub bootstrap: Connection,
    timeout: Duration,
    brokers: HashMap<String, Connection>,
}

impl Client {
    /// Connects to the first bootstrap server that answers; an unreachable cluster is an error
    /// within the connect timeout.
    pub fn connect(args: &ConnectArgs) -> Result<Client> {
        let timeout = Duration::from_millis(args.request_timeout_ms);
        let bootstrap = spate_client::cluster::connect_any(&args.bootstrap, timeout)
            .with_context(|| format!("no broker reachable at {}", args.bootstrap.join(",")))?;
        Ok(Client {
            bootstrap,
            timeout,
            brokers: HashMap::new(),
        })
    }

    /// Calls `body` on the bootstrap connection at the highest version both sides speak.
    pub fn call<R: Request>(
        &mut self,
        key: ApiKey,
        ours: RangeInclusive<i16>,
        body: &R,
    ) -> Result<(i16, R::Response)> {
        call_on(&mut self.bootstrap, key, ours, body)
    }

    /// The connection to the broker at `addr` (HOST:PORT), opened if needed.
    pub fn broker(&mut self, addr: &str) -> Result<&mut Connection> {
        if !self.brokers.contains_key(addr) {
            let conn = Connection::connect(addr, self.timeout)
                .with_context(|| format!("connecting to broker {addr}"))?;
            self.brokers.insert(addr.to_string(), conn);
        }
        Ok(self.brokers.get_mut(addr).expect("inserted above"))
    }

    /// Metadata for the named topics, or for every topic when `topics` is None.
    pub fn metadata(&mut self, topics: Option<&[String]>) -> Result<MetadataResponse> {
        let req = MetadataRequest::default()
            .with_topics(topics.map(|ts| {
                ts.iter()
                    .map(|t| MetadataRequestTopic::default().with_name(Some(topic_name(t))))
                    .collect()
            }))
            .with_allow_auto_topic_creation(false);
        Ok(self.call(ApiKey::Metadata, METADATA_VERSIONS, &req)?.1)
    }

    /// Every partition being moved (ListPartitionReassignments v0), the broker's refusal as an
    /// error; the broker waits at most this client's request timeout for the controller.
    pub fn list_reassignments(&mut self) -> Result<ListPartitionReassignmentsResponse> {
        let timeout_ms = i32::try_from(self.timeout.as_millis()).unwrap_or(i32::MAX);
        let req = ListPartitionReassignmentsRequest::default().with_timeout_ms(timeout_ms);
        let (_, reply) = self.call(ApiKey::ListPartitionReassignments, 0..=0, &req)?;
        check(
            reply.error_code,
            reply.error_message.as_deref(),
            "listing replica moves",
        )?;
        Ok(reply)
    }

    /// Every broker, fenced ones included (DescribeCluster v0-2), the broker's refusal as an
    /// error.
    pub fn describe_cluster(&mut self) -> Result<DescribeClusterResponse> {
        let req = DescribeClusterRequest::default().with_include_fenced_brokers(true);
        let (_, described) = self.call(ApiKey::DescribeCluster, 0..=2, &req)?;
        check(
            described.error_code,
            described.error_message.as_deref(),
            "DescribeCluster",
        )?;
        Ok(described)
    }

    /// HOST:PORT of every broker in a metadata reply, by node id.
    pub fn broker_addrs(meta: &MetadataResponse) -> HashMap<i32, String> {
        meta.brokers
            .iter()
            .map(|b| (b.node_id.0, format!("{}:{}", b.host.as_str(), b.port)))
            .collect()
    }

    /// The connection to the coordinator of consumer group `group`.
    pub fn coordinator(&mut self, group: &str) -> Result<&mut Connection> {
        let req = FindCoordinatorRequest::default()
            .with_key(StrBytes::from_string(group.to_string()))
            .with_key_type(COORDINATOR_KEY_GROUP);
        let (_, reply) = self.call(ApiKey::FindCoordinator, FIND_COORDINATOR_VERSIONS, &req)?;
        check(
            reply.error_code,
            reply.error_message.as_deref(),
            format!("finding the coordinator of group {group}"),
        )?;
        let addr = format!("{}:{}", reply.host.as_str(), reply.port);
        self.broker(&addr)
    }
}

/// Calls `body` on `conn` at the highest version both sides speak.
pub fn call_on<R: Request>(
    conn: &mut Connection,
    key: ApiKey,
    ours: RangeInclusive<i16>,
    body: &R,
) -> Result<(i16, R::Response)> {
    let version = conn
        .versions
        .pick(key, ours)
        .with_context(|| format!("the broker cannot serve {key:?}"))?;
    let reply = conn
        .call(key, version, body)
        .with_context(|| format!("{key:?} request"))?;
    Ok((version, reply))
}

/// Which end of a log [`list_offsets`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogEnd {
    /// The log start offset.
    Earliest,
    /// The log end offset (the high watermark).
    Latest,
}

/// The earliest or latest offset of each of `partitions` of `topic`, in the order given, asked
/// of their leader `conn`.
pub fn list_offsets(
    conn: &mut Connection,
    topic: &str,
    partitions: &[i32],
    end: LogEnd,
) -> Result<Vec<i64>> {
    use spate_client::cluster::OffsetSpec;
    use spate_client::ClientError;
    let spec = match end {
        LogEnd::Earliest => OffsetSpec::Earliest,
        LogEnd::Latest => OffsetSpec::Latest,
    };
    spate_client::cluster::list_offsets(conn, topic, partitions, spec).map_err(|e| match e {
        ClientError::Broker { code, context, .. } => {
            kafka_error(code, None, format!("listing offsets ({context})"))
        }
        other => anyhow!(other),
    })
}

pub fn topic_name(name: &str) -> TopicName {
    TopicName(StrBytes::from_string(name.to_string()))
}

/// The Kafka name of an error code (one table, shared with spate-perf).
pub use spate_client::error::kafka_error_name as error_name;

/// An error naming the Kafka error code and what was being done.
pub fn kafka_error(code: i16, message: Option<&str>, context: impl Display) -> anyhow::Error {
    let detail = message
        .filter(|m| !m.is_empty())
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    anyhow!(
        "{context}: {} (Kafka error {code}){detail}",
        error_name(code)
    )
}

/// Ok for error code 0, otherwise [`kafka_error`].
pub fn check(code: i16, message: Option<&str>, context: impl Display) -> Result<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(kafka_error(code, message, context))
    }
}

/// Parses `KEY=VALUE`, naming the flag when the `=` is missing or the key is empty.
pub fn key_value(flag: &str, text: &str) -> Result<(String, String)> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => bail!("{flag} {text:?}: expected KEY=VALUE"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_get_their_kafka_names() {
        assert_eq!(error_name(3), "UNKNOWN_TOPIC_OR_PARTITION");
        assert_eq!(error_name(36), "TOPIC_ALREADY_EXISTS");
        assert_eq!(error_name(0), "NONE");
        assert_eq!(error_name(-1), "UNKNOWN_SERVER_ERROR");
        let e = kafka_error(36, Some("Topic 'x' already exists."), "creating x").to_string();
        assert_eq!(
            e,
            "creating x: TOPIC_ALREADY_EXISTS (Kafka error 36): Topic 'x' already exists."
        );
    }

    #[test]
    fn key_value_names_the_flag() {
        assert_eq!(
            key_value("--config", "a=b=c").unwrap(),
            ("a".to_string(), "b=c".to_string())
        );
        let e = key_value("--config", "novalue").unwrap_err().to_string();
        assert!(e.contains("--config") && e.contains("KEY=VALUE"), "{e}");
    }
}
