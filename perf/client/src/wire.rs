//! Kafka framing over a blocking TCP socket: connect with a deadline, negotiate versions with
//! ApiVersions, encode requests with the `kafka-protocol` codecs and read length-capped replies.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::ops::RangeInclusive;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};

use crate::error::{ClientError, Result};

/// How long a TCP connect may take before the broker counts as unreachable.
pub const CONNECT_TIMEOUT_MS: u64 = 3_000;
/// Largest reply frame accepted for requests that are not fetches.
pub const MAX_CONTROL_FRAME_BYTES: usize = 16 << 20;
/// Bytes of a request header up to and including the correlation id, after the length prefix.
const CORRELATION_ID_END: usize = 8;

/// The client id every request carries.
pub const CLIENT_ID: &str = "spate-perf";

/// API versions the broker supports, from its ApiVersions reply.
#[derive(Debug, Clone, Default)]
pub struct BrokerVersions {
    ranges: HashMap<i16, (i16, i16)>,
}

impl BrokerVersions {
    /// Builds the table from (api key, min, max) triples.
    pub fn from_ranges(ranges: impl IntoIterator<Item = (i16, i16, i16)>) -> Self {
        BrokerVersions {
            ranges: ranges
                .into_iter()
                .map(|(k, min, max)| (k, (min, max)))
                .collect(),
        }
    }

    /// The highest version both we (`ours`) and the broker support.
    pub fn pick(&self, key: ApiKey, ours: RangeInclusive<i16>) -> Result<i16> {
        let Some(&(min, max)) = self.ranges.get(&(key as i16)) else {
            return Err(ClientError::Protocol(format!(
                "the broker does not support {key:?} at all"
            )));
        };
        let hi = max.min(*ours.end());
        let lo = min.max(*ours.start());
        if hi < lo {
            return Err(ClientError::Protocol(format!(
                "no common {key:?} version: broker {min}..={max}, spate-perf {}..={}",
                ours.start(),
                ours.end()
            )));
        }
        Ok(hi)
    }
}

/// Encodes a whole request frame (length prefix, header, body) into `out`, replacing its contents.
pub fn encode_request<R: Request>(
    out: &mut BytesMut,
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &R,
) -> Result<()> {
    out.clear();
    out.put_i32(0);
    let header = RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str(CLIENT_ID)));
    header
        .encode(out, R::header_version(version))
        .map_err(|e| ClientError::Protocol(format!("encode {key:?} header: {e}")))?;
    body.encode(out, version)
        .map_err(|e| ClientError::Protocol(format!("encode {key:?} v{version}: {e}")))?;
    let len = i32::try_from(out.len() - 4)
        .map_err(|_| ClientError::Protocol(format!("{key:?} request over 2 GiB")))?;
    out[0..4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Rewrites the correlation id of a frame built by [`encode_request`], so one encoded request can
/// be sent many times.
pub fn set_correlation_id(frame: &mut [u8], correlation_id: i32) {
    assert!(
        frame.len() >= 4 + CORRELATION_ID_END,
        "frame shorter than a request header"
    );
    frame[8..12].copy_from_slice(&correlation_id.to_be_bytes());
}

/// Decodes a reply frame (without its length prefix) and checks the correlation id.
pub fn decode_response<R: Decodable + HeaderVersion>(
    mut frame: Bytes,
    key: ApiKey,
    version: i16,
    correlation_id: i32,
) -> Result<R> {
    let header = ResponseHeader::decode(&mut frame, key.response_header_version(version))
        .map_err(|e| ClientError::Protocol(format!("decode {key:?} reply header: {e}")))?;
    if header.correlation_id != correlation_id {
        return Err(ClientError::Protocol(format!(
            "{key:?} reply has correlation id {} where {correlation_id} was due",
            header.correlation_id
        )));
    }
    R::decode(&mut frame, version)
        .map_err(|e| ClientError::Protocol(format!("decode {key:?} v{version} reply: {e}")))
}

/// The receiving side of a connection: reads length-prefixed frames into a reused buffer.
pub struct FrameReader {
    stream: TcpStream,
    addr: String,
    buf: BytesMut,
}

impl FrameReader {
    /// Reads one frame of at most `max_frame_bytes`. Returned bytes share the reader's buffer,
    /// which is reclaimed once they are dropped.
    pub fn read_frame(&mut self, max_frame_bytes: usize) -> Result<Bytes> {
        let mut len_buf = [0u8; 4];
        self.stream
            .read_exact(&mut len_buf)
            .map_err(|source| self.io(source))?;
        let len = i32::from_be_bytes(len_buf);
        let len = usize::try_from(len)
            .map_err(|_| ClientError::Protocol(format!("negative frame length {len}")))?;
        if len > max_frame_bytes {
            return Err(ClientError::Protocol(format!(
                "reply frame of {len} bytes exceeds the {max_frame_bytes}-byte limit"
            )));
        }
        self.buf.clear();
        self.buf.reserve(len);
        self.buf.resize(len, 0);
        self.stream
            .read_exact(&mut self.buf[..])
            .map_err(|source| self.io(source))?;
        Ok(self.buf.split_to(len).freeze())
    }

    fn io(&self, source: std::io::Error) -> ClientError {
        ClientError::Io {
            addr: self.addr.clone(),
            source,
        }
    }
}

/// The sending side of a connection.
pub struct FrameWriter {
    stream: TcpStream,
    addr: String,
}

impl FrameWriter {
    /// Writes a complete frame.
    pub fn write_frame(&mut self, frame: &[u8]) -> Result<()> {
        self.stream
            .write_all(frame)
            .map_err(|source| ClientError::Io {
                addr: self.addr.clone(),
                source,
            })
    }

    /// Closes both directions of the socket, so a reader blocked on it returns at once (a
    /// writer that failed mid-frame leaves the stream unusable).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// The broker this writes to.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

/// A negotiated connection to one broker, used for request/reply calls; split it for pipelining.
pub struct Connection {
    pub reader: FrameReader,
    pub writer: FrameWriter,
    pub versions: BrokerVersions,
    next_correlation_id: i32,
    scratch: BytesMut,
}

impl Connection {
    /// Connects within [`CONNECT_TIMEOUT_MS`] and negotiates API versions. Replies slower than
    /// `request_timeout` fail the call instead of hanging.
    pub fn connect(addr: &str, request_timeout: Duration) -> Result<Connection> {
        let connect_err = |source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        };
        let targets: Vec<_> = addr.to_socket_addrs().map_err(connect_err)?.collect();
        let mut last_err = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        let mut stream = None;
        for target in targets {
            match TcpStream::connect_timeout(&target, Duration::from_millis(CONNECT_TIMEOUT_MS)) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last_err = e,
            }
        }
        let stream = stream.ok_or_else(|| connect_err(last_err))?;
        let setup = |s: &TcpStream| -> std::io::Result<()> {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(request_timeout))?;
            s.set_write_timeout(Some(request_timeout))
        };
        setup(&stream).map_err(connect_err)?;
        let read_half = stream.try_clone().map_err(connect_err)?;
        let mut conn = Connection {
            reader: FrameReader {
                stream: read_half,
                addr: addr.to_string(),
                buf: BytesMut::new(),
            },
            writer: FrameWriter {
                stream,
                addr: addr.to_string(),
            },
            versions: BrokerVersions::default(),
            next_correlation_id: 1,
            scratch: BytesMut::new(),
        };
        conn.negotiate()?;
        Ok(conn)
    }

    /// The next correlation id for this connection.
    pub fn next_correlation_id(&mut self) -> i32 {
        let id = self.next_correlation_id;
        self.next_correlation_id = self.next_correlation_id.wrapping_add(1).max(1);
        id
    }

    /// Sends one request and waits for its reply.
    pub fn call<R: Request>(&mut self, key: ApiKey, version: i16, body: &R) -> Result<R::Response> {
        let id = self.next_correlation_id();
        let mut scratch = std::mem::take(&mut self.scratch);
        encode_request(&mut scratch, key, version, id, body)?;
        let sent = self.writer.write_frame(&scratch);
        self.scratch = scratch;
        sent?;
        let frame = self.reader.read_frame(MAX_CONTROL_FRAME_BYTES)?;
        decode_response::<R::Response>(frame, key, version, id)
    }

    /// Asks the broker which versions it speaks. A broker that does not know ApiVersions v3
    /// answers in v0 with UNSUPPORTED_VERSION, so v0 is the fallback.
    fn negotiate(&mut self) -> Result<()> {
        let v3 = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str(CLIENT_ID))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        let reply = match self.call(ApiKey::ApiVersions, 3, &v3) {
            Ok(r) if r.error_code == 0 => r,
            _ => self.call(ApiKey::ApiVersions, 0, &ApiVersionsRequest::default())?,
        };
        if reply.error_code != 0 {
            return Err(ClientError::broker("ApiVersions", reply.error_code));
        }
        self.versions = BrokerVersions::from_ranges(
            reply
                .api_keys
                .iter()
                .map(|k| (k.api_key, k.min_version, k.max_version)),
        );
        Ok(())
    }
}

/// Reads a big-endian i32 at `at`, if the slice is long enough.
pub fn i32_at(buf: &[u8], at: usize) -> Option<i32> {
    buf.get(at..at + 4).map(|mut b| b.get_i32())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::MetadataRequest;

    #[test]
    fn version_pick_takes_the_highest_common_version() {
        let v = BrokerVersions::from_ranges([(ApiKey::Produce as i16, 3, 11)]);
        assert_eq!(v.pick(ApiKey::Produce, 3..=9).unwrap(), 9);
        assert_eq!(v.pick(ApiKey::Produce, 3..=12).unwrap(), 11);
        assert!(v.pick(ApiKey::Produce, 12..=13).is_err());
        assert!(v.pick(ApiKey::Fetch, 4..=12).is_err());
    }

    #[test]
    fn correlation_id_patch_matches_a_fresh_encode() {
        let body = MetadataRequest::default();
        let mut a = BytesMut::new();
        let mut b = BytesMut::new();
        encode_request(&mut a, ApiKey::Metadata, 9, 1, &body).unwrap();
        encode_request(&mut b, ApiKey::Metadata, 9, 77, &body).unwrap();
        set_correlation_id(&mut a, 77);
        assert_eq!(a, b);
        assert_eq!(i32_at(&a, 0).unwrap() as usize, a.len() - 4);
    }

    #[test]
    fn unreachable_broker_fails_fast() {
        // A port nobody listens on: bind, learn the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let started = std::time::Instant::now();
        let err = Connection::connect(&format!("127.0.0.1:{port}"), Duration::from_secs(1))
            .err()
            .expect("nothing listens there");
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_millis(CONNECT_TIMEOUT_MS + 1_000));
    }

    #[test]
    fn silent_broker_is_an_error_not_a_hang() {
        // Accepts the connection, then never answers ApiVersions.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let hold = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let err = Connection::connect(&addr, Duration::from_millis(200))
            .err()
            .expect("no reply must fail");
        assert!(matches!(err, ClientError::Io { .. }), "{err}");
        drop(hold.join());
    }

    #[test]
    fn oversized_reply_frame_is_refused_before_allocating() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(&i32::MAX.to_be_bytes()).unwrap();
            s
        });
        let stream = TcpStream::connect(addr).unwrap();
        let mut reader = FrameReader {
            stream,
            addr: addr.to_string(),
            buf: BytesMut::new(),
        };
        let err = reader.read_frame(MAX_CONTROL_FRAME_BYTES).unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
        drop(server.join());
    }
}
