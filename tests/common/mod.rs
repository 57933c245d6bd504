//! Shared harness for integration tests: runs the real `spate` binary on a free loopback port
//! with a temporary data dir, waits (bounded poll) until it accepts connections, kills it on
//! drop. Also a minimal raw Kafka client for tests that need exact bytes on the wire.
#![allow(dead_code)]

pub mod cluster;
pub mod history;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const TEST_SEGMENT_BYTES: u64 = 16 << 20;
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    /// Where this broker serves GET /metrics (a free port of its own: tests run in parallel).
    pub metrics_port: u16,
    pub dir: tempfile::TempDir,
    extra_args: Vec<String>,
}

/// Ports handed to test brokers: below the kernel's ephemeral range (32768-60999 by default),
/// so no `bind(0)` and no outgoing connection takes one. Tests run in parallel, each in a
/// process of its own (nextest), and an ephemeral port bound and released here could be handed
/// to a second test a moment later: one test's node then held another's port ("port N stays
/// taken"). So a port is reserved across processes by creating a file named for it.
const TEST_PORTS: std::ops::Range<u32> = 20_000..32_000;
/// A reservation older than this is left from an earlier run (no test runs this long).
const PORT_RESERVATION_STALE: Duration = Duration::from_secs(15 * 60);
const PORT_ATTEMPTS: usize = 10_000;

pub fn free_port() -> u16 {
    let dir = std::env::temp_dir().join("spate-test-ports");
    std::fs::create_dir_all(&dir).expect("the port reservation directory");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let mut x = (u64::from(std::process::id()) << 32 | u64::from(nanos)) | 1;
    for _ in 0..PORT_ATTEMPTS {
        // xorshift64: any spread will do.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = (TEST_PORTS.start + (x % u64::from(TEST_PORTS.len() as u32)) as u32) as u16;
        let path = dir.join(port.to_string());
        let reserve = || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .is_ok()
        };
        let mut reserved = reserve();
        if !reserved {
            let stale = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > PORT_RESERVATION_STALE);
            // Of two processes reclaiming it, one creates it again.
            if stale && std::fs::remove_file(&path).is_ok() {
                reserved = reserve();
            }
        }
        if reserved && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free test port in {TEST_PORTS:?} after {PORT_ATTEMPTS} attempts");
}

/// Polls (bounded) until nobody listens on `port` (a connection is refused).
pub fn wait_port_free(port: u16) {
    let deadline = Instant::now() + START_TIMEOUT;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while TcpStream::connect_timeout(&addr, POLL).is_ok() {
        assert!(Instant::now() < deadline, "port {port} stays taken");
        std::thread::sleep(POLL);
    }
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> Broker {
        let mut b = Broker {
            child: None,
            port: free_port(),
            metrics_port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            extra_args: args.iter().map(|s| s.to_string()).collect(),
        };
        b.spawn();
        b
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("spate.log")
    }

    /// Starts (or restarts) the broker on the same port and data dir.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        // A killed predecessor's listeners linger a moment (its io_uring holds them), and the
        // broker refuses a port someone listens on: wait until both ports are free again.
        for port in [self.port, self.metrics_port] {
            wait_port_free(port);
        }
        self.spawn_at_once();
    }

    /// The arguments the next [`Self::spawn`] passes after the harness's own (a restart with
    /// other settings).
    pub fn set_args(&mut self, args: &[&str]) {
        self.extra_args = args.iter().map(|s| s.to_string()).collect();
    }

    /// Two cores, unless the test chose a count.
    fn cores_args(&self) -> Vec<String> {
        if self.extra_args.iter().any(|a| a == "--cores") {
            return Vec::new();
        }
        vec!["--cores".into(), "2".into()]
    }

    /// `--metrics-listen` on this broker's own port, unless the test chose its own.
    fn metrics_args(&self) -> Vec<String> {
        if self.extra_args.iter().any(|a| a == "--metrics-listen") {
            return Vec::new();
        }
        vec![
            "--metrics-listen".into(),
            format!("127.0.0.1:{}", self.metrics_port),
        ]
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, no chance to flush.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status()
            .expect("run kill");
        assert!(ok.success());
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("spate did not stop after SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Starts the broker again at once, without waiting for a killed predecessor's ports to
    /// be freed: the broker itself must cope with them.
    pub fn spawn_at_once(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_spate"))
            .arg("serve")
            .arg("--listen")
            .arg(self.addr())
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(self.cores_args())
            // Segments are pre-allocated: keep them small, the test disk is shared.
            .arg("--segment-bytes")
            .arg(TEST_SEGMENT_BYTES.to_string())
            .args(&self.extra_args)
            .args(self.metrics_args())
            .env(
                "RUST_LOG",
                std::env::var("SPATE_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn spate");
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // Only an answered ApiVersions request counts: a connect alone can reach the
            // listening socket of a killed predecessor (its io_uring keeps the socket open for
            // a moment after exit) or the client itself (TCP simultaneous open).
            if api_versions_answered(&self.addr()) {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("spate exited during start ({status}); log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "spate did not start; log:\n{}",
                self.log()
            );
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- spate log ---\n{}", self.log());
        }
        self.kill();
    }
}

pub fn api_versions_answered(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    // ApiVersions v0, correlation id 1, empty client id.
    if s.write_all(&[0, 0, 0, 10, 0, 18, 0, 0, 0, 0, 0, 1, 0, 0])
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 8];
    s.read_exact(&mut head).is_ok() && head[4..8] == [0, 0, 0, 1]
}

/// Runs a Python client script from tests/python with the given arguments.
pub fn python(script: &str, args: &[&str]) -> Output {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    Command::new("python3")
        .arg(path)
        .args(args)
        .output()
        .expect("run python3")
}

pub fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A blocking raw Kafka connection: frames out, frames in.
pub struct Raw {
    pub stream: TcpStream,
}

/// One request as a client writes it: length prefix, header (v1 or v2 as the API needs), body.
/// Encoded by the client library the CLI and spate-perf use, so the tests frame requests the
/// same way.
pub fn request_frame<Req>(version: i16, correlation_id: i32, req: &Req) -> Vec<u8>
where
    Req: kafka_protocol::protocol::Request,
{
    let key = kafka_protocol::messages::ApiKey::try_from(Req::KEY).expect("a known API key");
    let mut buf = bytes::BytesMut::new();
    spate_client::wire::encode_request(&mut buf, key, version, correlation_id, req)
        .expect("encode request");
    buf.to_vec()
}

impl Raw {
    pub fn connect(addr: &str) -> Raw {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Raw { stream }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends one request (header v1 or v2 as the API needs) and returns the response body
    /// after the correlation id (and the header tagged fields, for flexible responses).
    pub fn request<Req>(&mut self, version: i16, correlation_id: i32, req: &Req) -> bytes::Bytes
    where
        Req: kafka_protocol::protocol::Request,
    {
        let framed = request_frame(version, correlation_id, req);
        self.stream.write_all(&framed).unwrap();
        let frame = self.read_frame().expect("a response");
        let mut frame = bytes::Bytes::from(frame);
        let rhv =
            <Req::Response as kafka_protocol::protocol::HeaderVersion>::header_version(version);
        let rh = <kafka_protocol::messages::ResponseHeader as kafka_protocol::protocol::Decodable>::decode(&mut frame, rhv).unwrap();
        assert_eq!(rh.correlation_id, correlation_id);
        frame
    }

    pub fn call<Req>(&mut self, version: i16, req: &Req) -> Req::Response
    where
        Req: kafka_protocol::protocol::Request,
    {
        let mut body = self.request(version, 7, req);
        <Req::Response as kafka_protocol::protocol::Decodable>::decode(&mut body, version).unwrap()
    }

    /// One response frame, or None if the broker closed the connection.
    pub fn read_frame(&mut self) -> Option<Vec<u8>> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).ok()?;
        let n = i32::from_be_bytes(len);
        assert!((0..=(64 << 20)).contains(&n), "response length {n}");
        let mut body = vec![0u8; n as usize];
        self.stream.read_exact(&mut body).ok()?;
        Some(body)
    }

    /// True once the broker closed the connection (bounded by the read timeout).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.stream.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
            ),
        }
    }
}

/// One RecordBatch v2 with `count` records (value = "v{i}"), CRC-32C computed.
pub fn record_batch(producer_id: i64, epoch: i16, base_sequence: i32, count: i32) -> Vec<u8> {
    record_batch_at(producer_id, epoch, base_sequence, count, 1_700_000_000_000)
}

/// [`record_batch`] with every record stamped `timestamp_ms`.
pub fn record_batch_at(
    producer_id: i64,
    epoch: i16,
    base_sequence: i32,
    count: i32,
    timestamp_ms: i64,
) -> Vec<u8> {
    let mut records = Vec::new();
    for i in 0..count {
        let value = format!("v{i}");
        let mut rec = Vec::new();
        rec.push(0u8); // attributes
        put_varint(&mut rec, 0); // timestamp delta
        put_varint(&mut rec, i as i64); // offset delta
        put_varint(&mut rec, -1); // key: null
        put_varint(&mut rec, value.len() as i64);
        rec.extend_from_slice(value.as_bytes());
        put_varint(&mut rec, 0); // headers
        put_varint(&mut records, rec.len() as i64);
        records.extend_from_slice(&rec);
    }
    let now = timestamp_ms;
    let mut tail = Vec::new(); // from attributes to the end: the CRC-covered part
    tail.extend_from_slice(&0i16.to_be_bytes());
    tail.extend_from_slice(&(count - 1).to_be_bytes());
    tail.extend_from_slice(&now.to_be_bytes());
    tail.extend_from_slice(&now.to_be_bytes());
    tail.extend_from_slice(&producer_id.to_be_bytes());
    tail.extend_from_slice(&epoch.to_be_bytes());
    tail.extend_from_slice(&base_sequence.to_be_bytes());
    tail.extend_from_slice(&count.to_be_bytes());
    tail.extend_from_slice(&records);
    let mut batch = Vec::new();
    batch.extend_from_slice(&0i64.to_be_bytes());
    let batch_length = (4 + 1 + 4 + tail.len()) as i32;
    batch.extend_from_slice(&batch_length.to_be_bytes());
    batch.extend_from_slice(&0i32.to_be_bytes()); // leader epoch
    batch.push(2); // magic
    batch.extend_from_slice(&crc32c::crc32c(&tail).to_be_bytes());
    batch.extend_from_slice(&tail);
    batch
}

fn put_varint(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    loop {
        let b = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

pub fn socket_addr(b: &Broker) -> SocketAddr {
    b.addr().parse().unwrap()
}

/// Runs a `spate` client subcommand (topic, group, produce, ...) against `broker`, with no
/// input, and returns its output.
pub fn spate_cli(broker: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spate"))
        .args(args)
        .env("SPATE_BOOTSTRAP_SERVER", broker)
        .stdin(Stdio::null())
        .output()
        .expect("run spate")
}

/// A topic name as the Kafka messages take it.
pub fn topic_name(s: &str) -> kafka_protocol::messages::TopicName {
    kafka_protocol::messages::TopicName(kafka_protocol::protocol::StrBytes::from_string(
        s.to_string(),
    ))
}

/// A consumer's Fetch of one partition from `offset`, up to 8 MiB, without waiting.
pub fn fetch_request(
    topic: &str,
    partition: i32,
    offset: i64,
) -> kafka_protocol::messages::FetchRequest {
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    let mut p = FetchPartition::default();
    p.partition = partition;
    p.fetch_offset = offset;
    p.partition_max_bytes = 8 << 20;
    let mut t = FetchTopic::default();
    t.topic = topic_name(topic);
    t.partitions = vec![p];
    let mut req = kafka_protocol::messages::FetchRequest::default();
    req.replica_id = kafka_protocol::messages::BrokerId(-1);
    req.max_bytes = 8 << 20;
    req.topics = vec![t];
    req
}

impl Raw {
    /// ListOffsets (v5) for one partition at `timestamp` (-1 latest, -2 earliest): its error
    /// code and offset.
    pub fn list_offset(&mut self, topic: &str, partition: i32, timestamp: i64) -> (i16, i64) {
        use kafka_protocol::messages::list_offsets_request::{
            ListOffsetsPartition, ListOffsetsTopic,
        };
        let mut p = ListOffsetsPartition::default();
        p.partition_index = partition;
        p.timestamp = timestamp;
        let mut t = ListOffsetsTopic::default();
        t.name = topic_name(topic);
        t.partitions = vec![p];
        let mut req = kafka_protocol::messages::ListOffsetsRequest::default();
        req.replica_id = kafka_protocol::messages::BrokerId(-1);
        req.topics = vec![t];
        let resp = self.call(5, &req);
        let p = &resp.topics[0].partitions[0];
        (p.error_code, p.offset)
    }
}

/// A broker log without the escape sequences of its coloured fields (`key=value` reads plain).
pub fn plain_log(log: &str) -> String {
    let mut plain = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// The records each "consumer offsets loaded" line of a broker log says the group coordinator
/// replayed, in the log's order.
pub fn offsets_loads(log: &str) -> Vec<u64> {
    plain_log(log)
        .lines()
        .filter(|l| l.contains("consumer offsets loaded"))
        .filter_map(|l| {
            let digits: String = l
                .split("records=")
                .nth(1)?
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse::<u64>().ok()
        })
        .collect()
}

/// GET /metrics from a broker's metrics `port` on the loopback address: the body, or `None` if
/// nothing answers there with 200.
pub fn scrape_metrics(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}
