//! The rpc port on glommio: TCP between nodes, around the sans-IO frame codec and handshake.
//!
//! Each node dials one outbound connection per peer it sends to and accepts inbound ones. A
//! connection starts with a [`Hello`] each way, checked by the [`PeerDirectory`] (cluster id,
//! node id, node UUID); a refused peer gets a `HandshakeRefused` frame with the reason, a warning
//! is logged, and the connection closes. After the handshake every frame read is handed to the
//! owner as an [`Incoming`] with a [`ReplyTo`] for answering on the same connection; frames to a
//! peer go through its bounded send queue, written by the connection's writer.
//!
//! Nothing on the rpc port is trusted: a length above the cap is refused before its body is
//! awaited, a frame must arrive whole within the read timeout, a connection silent both ways
//! for the idle timeout is closed, and any malformed frame closes that connection only.
//! Consensus retransmits, so a full send queue drops its oldest frames rather than growing.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_lite::AsyncWriteExt;
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::{TcpListener, TcpStream};

use crate::identity::NodeIdentity;
use crate::rpc::frame::{EncodedFrame, Frame, FrameCodec, RpcError, RpcMessage};
use crate::rpc::handshake::{Hello, PeerDirectory};
use crate::rpc::recv::{read_window, MAX_HANDSHAKE_FRAME_BYTES};
use crate::shard::Deadline;
use crate::types::NodeId;

/// Bytes of frames queued for one peer (or one inbound connection's replies). When a frame
/// would pass it, the oldest queued frames are dropped: consensus resends what was lost, and a
/// request's sender times out and retries.
pub const DEFAULT_PEER_SEND_QUEUE_BYTES: usize = 64 << 20;
/// The peer must complete its hello within this long after the TCP connection is up.
pub const DEFAULT_RPC_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// A frame whose first byte has arrived must arrive whole within this long; a frame being
/// written must be taken by the peer within this long.
pub const DEFAULT_RPC_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no frame either way for this long is closed (it is re-dialed on demand).
pub const DEFAULT_RPC_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A dial that does not connect within this long fails (then backs off).
pub const DEFAULT_RPC_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The first wait after a failed dial or handshake; doubles up to the maximum.
pub const DEFAULT_RPC_RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// A dead peer is retried this often at most: short enough that a restarted node is reached
/// well inside the failover budget, long enough to cost nothing.
pub const DEFAULT_RPC_RECONNECT_BACKOFF_MAX: Duration = Duration::from_millis(500);
/// Frames read and not yet taken by the owner: a fast peer waits (TCP backpressure) rather than
/// queueing without bound.
pub const DEFAULT_RPC_INBOX_FRAMES: usize = 1024;
/// Slices one vectored write takes at most (the kernel's `IOV_MAX`).
const MAX_IOVECS_PER_WRITE: usize = 1024;
/// Queued frames gathered into one vectored write, in bytes at most (a larger frame goes
/// alone): small frames share a syscall, and frames taken off the queue, where a full queue
/// can no longer drop them, stay bounded.
const MAX_GATHER_BYTES: usize = 4 << 20;

#[derive(Debug, Clone)]
pub struct TransportConfig {
    pub max_frame_bytes: usize,
    pub send_queue_bytes: usize,
    pub handshake_timeout: Duration,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub reconnect_backoff_min: Duration,
    pub reconnect_backoff_max: Duration,
    pub inbox_frames: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            max_frame_bytes: crate::rpc::frame::DEFAULT_MAX_RPC_FRAME_BYTES,
            send_queue_bytes: DEFAULT_PEER_SEND_QUEUE_BYTES,
            handshake_timeout: DEFAULT_RPC_HANDSHAKE_TIMEOUT,
            read_timeout: DEFAULT_RPC_READ_TIMEOUT,
            idle_timeout: DEFAULT_RPC_IDLE_TIMEOUT,
            connect_timeout: DEFAULT_RPC_CONNECT_TIMEOUT,
            reconnect_backoff_min: DEFAULT_RPC_RECONNECT_BACKOFF_MIN,
            reconnect_backoff_max: DEFAULT_RPC_RECONNECT_BACKOFF_MAX,
            inbox_frames: DEFAULT_RPC_INBOX_FRAMES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("rpc i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("rpc handshake refused by the peer: {0}")]
    RefusedByPeer(String),
    #[error("peer did not complete the handshake in time")]
    HandshakeTimeout,
    #[error("peer sent {0} before its hello")]
    NoHello(&'static str),
    #[error("a frame did not arrive whole within the read timeout")]
    ReadTimeout,
    #[error("unknown peer {0}")]
    UnknownPeer(NodeId),
}

/// Counters for tests and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TransportStats {
    pub connections_accepted: u64,
    pub handshakes_refused: u64,
    /// Connections closed for a malformed or oversized frame, a timeout or an i/o error.
    pub connections_failed: u64,
    pub frames_received: u64,
    pub frames_sent: u64,
    /// Frames dropped from a full send queue.
    pub frames_dropped: u64,
}

/// A frame from a peer that passed the handshake.
pub struct Incoming {
    pub from: NodeId,
    pub frame: Frame,
    /// The connection it came on, for the answer.
    pub reply: ReplyTo,
}

/// Wakes the tasks waiting on it; a generation counter makes a notify before the wait count.
#[derive(Default)]
struct Signal {
    generation: Cell<u64>,
    wakers: RefCell<Vec<Waker>>,
}

impl Signal {
    fn notify(&self) {
        self.generation.set(self.generation.get() + 1);
        for w in self.wakers.take() {
            w.wake();
        }
    }
    fn changed(&self, since: u64) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.generation.get() != since {
                Poll::Ready(())
            } else {
                self.wakers.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}

/// Encoded frames waiting for a connection's writer, bounded in bytes.
struct SendQueue {
    frames: RefCell<VecDeque<EncodedFrame>>,
    bytes: Cell<usize>,
    cap: usize,
    signal: Signal,
    /// The connection behind it is gone for good (inbound connections only).
    closed: Cell<bool>,
}

impl SendQueue {
    fn new(cap: usize) -> Self {
        SendQueue {
            frames: RefCell::new(VecDeque::new()),
            bytes: Cell::new(0),
            cap,
            signal: Signal::default(),
            closed: Cell::new(false),
        }
    }

    /// Queues `f`, dropping the oldest frames to make room; returns how many were dropped.
    fn push(&self, f: EncodedFrame) -> u64 {
        if self.closed.get() {
            return 1;
        }
        let mut frames = self.frames.borrow_mut();
        let mut dropped = 0;
        while self.bytes.get() + f.len() > self.cap {
            match frames.pop_front() {
                Some(old) => {
                    self.bytes.set(self.bytes.get() - old.len());
                    dropped += 1;
                }
                None => break,
            }
        }
        self.bytes.set(self.bytes.get() + f.len());
        frames.push_back(f);
        drop(frames);
        self.signal.notify();
        dropped
    }

    #[cfg(test)]
    fn pop(&self) -> Option<EncodedFrame> {
        let f = self.frames.borrow_mut().pop_front()?;
        self.bytes.set(self.bytes.get() - f.len());
        Some(f)
    }

    /// Moves the oldest frames into `out` (empty) for one vectored write: as many as stay
    /// within `max_slices` parts and `max_bytes`, and at least one if any is queued.
    fn pop_gather(&self, out: &mut Vec<EncodedFrame>, max_slices: usize, max_bytes: usize) {
        debug_assert!(out.is_empty());
        let (mut slices, mut bytes) = (0, 0);
        let mut frames = self.frames.borrow_mut();
        while let Some(f) = frames.front() {
            let fits = slices + f.parts().len() <= max_slices && bytes + f.len() <= max_bytes;
            if !out.is_empty() && !fits {
                break;
            }
            let f = frames.pop_front().expect("a front frame");
            slices += f.parts().len();
            bytes += f.len();
            self.bytes.set(self.bytes.get() - f.len());
            out.push(f);
        }
    }

    fn is_empty(&self) -> bool {
        self.frames.borrow().is_empty()
    }

    fn close(&self) {
        self.closed.set(true);
        self.frames.borrow_mut().clear();
        self.bytes.set(0);
        self.signal.notify();
    }
}

/// Answers on the connection a frame came on.
#[derive(Clone)]
pub struct ReplyTo {
    queue: Rc<SendQueue>,
    inner: Rc<Inner>,
}

impl ReplyTo {
    pub fn send(&self, frame: &Frame) -> Result<(), RpcError> {
        let f = self.inner.codec.encode(frame)?;
        self.inner.enqueue(&self.queue, f);
        Ok(())
    }
}

struct Peer {
    addr: RefCell<String>,
    queue: Rc<SendQueue>,
}

struct Inner {
    cfg: TransportConfig,
    codec: FrameCodec,
    directory: RefCell<PeerDirectory>,
    local: Hello,
    peers: RefCell<BTreeMap<NodeId, Rc<Peer>>>,
    inbox: LocalSender<Incoming>,
    stats: Cell<TransportStats>,
    stopped: Cell<bool>,
    stop: Signal,
}

impl Inner {
    fn stat(&self, f: impl FnOnce(&mut TransportStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    fn enqueue(&self, q: &SendQueue, f: EncodedFrame) {
        let dropped = q.push(f);
        if dropped > 0 {
            self.stat(|s| s.frames_dropped += dropped);
        }
    }
}

/// The rpc port of one node. Single-threaded: it lives on the executor that created it.
#[derive(Clone)]
pub struct Transport {
    inner: Rc<Inner>,
    local_addr: SocketAddr,
}

impl Transport {
    /// Binds `listen` and starts accepting. Frames from peers arrive on the returned receiver.
    pub fn bind(
        listen: SocketAddr,
        identity: &NodeIdentity,
        cfg: TransportConfig,
    ) -> std::io::Result<(Transport, LocalReceiver<Incoming>)> {
        let listener = TcpListener::bind(listen)?;
        let local_addr = listener.local_addr()?;
        let (tx, rx) = local_channel::new_bounded(cfg.inbox_frames);
        let directory = PeerDirectory::new(identity);
        let inner = Rc::new(Inner {
            codec: FrameCodec::new(cfg.max_frame_bytes),
            local: directory.hello(),
            directory: RefCell::new(directory),
            cfg,
            peers: RefCell::new(BTreeMap::new()),
            inbox: tx,
            stats: Cell::new(TransportStats::default()),
            stopped: Cell::new(false),
            stop: Signal::default(),
        });
        glommio::spawn_local(accept_loop(inner.clone(), listener)).detach();
        Ok((Transport { inner, local_addr }, rx))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> TransportStats {
        self.inner.stats.get()
    }

    /// Where to dial `node`; a known peer's address is updated (it re-registered elsewhere).
    pub fn add_peer(&self, node: NodeId, addr: String) {
        let mut peers = self.inner.peers.borrow_mut();
        if let Some(p) = peers.get(&node) {
            *p.addr.borrow_mut() = addr;
            return;
        }
        let peer = Rc::new(Peer {
            addr: RefCell::new(addr),
            queue: Rc::new(SendQueue::new(self.inner.cfg.send_queue_bytes)),
        });
        peers.insert(node, peer.clone());
        glommio::spawn_local(dial_loop(self.inner.clone(), node, peer)).detach();
    }

    pub fn has_peer(&self, node: NodeId) -> bool {
        self.inner.peers.borrow().contains_key(&node)
    }

    /// Records a peer's UUID learned from the metadata log (see [`PeerDirectory::learn`]).
    pub fn learn_peer_uuid(&self, node: NodeId, node_uuid: u128) {
        if let Err(e) = self.inner.directory.borrow_mut().learn(node, node_uuid) {
            tracing::warn!(node, error = %e, "metadata names a node UUID the rpc port knows otherwise");
        }
    }

    /// The operator unregistered `node`: its id may connect with a new UUID (see
    /// [`PeerDirectory::forget`]).
    pub fn forget_peer_uuid(&self, node: NodeId) {
        self.inner.directory.borrow_mut().forget(node);
    }

    /// Queues `frame` for `to` (dialing it if needed). Never waits.
    pub fn send(&self, to: NodeId, frame: &Frame) -> Result<(), TransportError> {
        let peer = self
            .inner
            .peers
            .borrow()
            .get(&to)
            .cloned()
            .ok_or(TransportError::UnknownPeer(to))?;
        let f = self.inner.codec.encode(frame)?;
        self.inner.enqueue(&peer.queue, f);
        Ok(())
    }

    /// Stops dialing and accepting; open connections close as their tasks notice.
    pub fn stop(&self) {
        self.inner.stopped.set(true);
        self.inner.stop.notify();
        for p in self.inner.peers.borrow().values() {
            p.queue.signal.notify();
        }
    }
}

async fn accept_loop(inner: Rc<Inner>, listener: TcpListener) {
    loop {
        let gen = inner.stop.generation.get();
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            inner.stop.changed(gen).await;
            None
        })
        .await;
        let stream = match accepted {
            None => return,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "rpc accept failed");
                glommio::timer::sleep(inner.cfg.reconnect_backoff_min).await;
                continue;
            }
        };
        if inner.stopped.get() {
            return;
        }
        inner.stat(|s| s.connections_accepted += 1);
        let inner = inner.clone();
        glommio::spawn_local(async move {
            let peer_addr = stream.peer_addr().ok();
            if let Err(e) = serve_inbound(inner.clone(), stream).await {
                inner.stat(|s| s.connections_failed += 1);
                tracing::info!(peer = ?peer_addr, error = %e, "rpc connection closed");
            }
        })
        .detach();
    }
}

async fn serve_inbound(inner: Rc<Inner>, stream: TcpStream) -> Result<(), TransportError> {
    stream.set_nodelay(true).map_err(glommio_io)?;
    let peer_addr = stream.peer_addr().ok();
    let mut reader = SocketReader::new(dup_stream(&stream)?);
    let mut writer = stream;
    writer
        .set_write_timeout(Some(inner.cfg.read_timeout))
        .map_err(glommio_io)?;
    let mut buf = BytesMut::new();
    let hello = read_hello(&inner, &mut reader, &mut buf).await?;
    let admitted = inner.directory.borrow_mut().admit(&hello, None);
    if let Err(e) = admitted {
        inner.stat(|s| s.handshakes_refused += 1);
        tracing::warn!(peer = ?peer_addr, peer_node = hello.node_id, error = %e,
            "rpc handshake refused");
        let refusal = Frame {
            correlation_id: 0,
            message: RpcMessage::HandshakeRefused {
                reason: e.to_string(),
            },
        };
        let _ = write_frames(&mut writer, &[inner.codec.encode(&refusal)?]).await;
        let _ = writer.close().await;
        return Ok(());
    }
    let ours = Frame {
        correlation_id: 0,
        message: RpcMessage::Hello(inner.local.clone()),
    };
    write_frames(&mut writer, &[inner.codec.encode(&ours)?]).await?;
    tracing::debug!(peer = ?peer_addr, peer_node = hello.node_id, "rpc peer connected");
    let queue = Rc::new(SendQueue::new(inner.cfg.send_queue_bytes));
    let result = run_connection(&inner, hello.node_id, &queue, reader, writer, buf).await;
    queue.close();
    result
}

/// Reads the first frame, which must be a hello, within the handshake timeout.
async fn read_hello(
    inner: &Inner,
    reader: &mut SocketReader,
    buf: &mut BytesMut,
) -> Result<Hello, TransportError> {
    let deadline = Instant::now() + inner.cfg.handshake_timeout;
    // The peer is not admitted yet: only a hello-sized frame is read, or reserved for.
    let codec = FrameCodec::new(MAX_HANDSHAKE_FRAME_BYTES);
    let frame = loop {
        if let Some(f) = codec.decode(buf)? {
            break f;
        }
        if reader.read_some(buf, &codec, deadline).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    };
    match frame.message {
        RpcMessage::Hello(h) => Ok(h),
        RpcMessage::HandshakeRefused { reason } => Err(TransportError::RefusedByPeer(reason)),
        _ => Err(TransportError::NoHello("another frame")),
    }
}

/// The read half of a connection. Safe reads need initialised bytes, and zeroing a buffer
/// only for the kernel to overwrite it costs a pass over every byte, as does copying out of a
/// bounce buffer: so what is waiting is taken with a non-blocking `recv` straight into the
/// receive buffer's spare capacity, and only an empty socket is waited on, with a peek that
/// takes nothing.
struct SocketReader {
    stream: TcpStream,
    /// The last `recv` emptied the socket: wait before the next.
    drained: bool,
}

impl SocketReader {
    fn new(stream: TcpStream) -> Self {
        SocketReader {
            stream,
            drained: false,
        }
    }

    /// Appends what arrives before `deadline` to `buf`, at most what [`read_window`] asks for
    /// under `codec`'s frame cap; 0 means the peer closed.
    async fn read_some(
        &mut self,
        buf: &mut BytesMut,
        codec: &FrameCodec,
        deadline: Instant,
    ) -> Result<usize, TransportError> {
        let want = read_window(buf, codec.max_frame_bytes())?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::ReadTimeout);
            }
            if !self.drained {
                if let Some(n) = self.recv_available(buf, want)? {
                    return Ok(n);
                }
            }
            let mut probe = [0u8; 1];
            // Not `glommio::future::timeout`: its timer registers again on every wake-up of
            // this task (each frame written), see `Deadline`.
            let readable = futures_lite::future::or(
                async { Some(self.stream.peek(&mut probe).await) },
                async {
                    Deadline::after(left).await;
                    None
                },
            );
            match readable.await {
                // Readable: data, or the end of the stream (the next `recv` returns 0).
                Some(Ok(_)) => self.drained = false,
                Some(Err(e)) => return Err(glommio_io(e).into()),
                None => return Err(TransportError::ReadTimeout),
            }
        }
    }

    /// One non-blocking `recv` of at most `want` bytes into `buf`'s spare capacity; None if
    /// nothing is waiting.
    fn recv_available(
        &mut self,
        buf: &mut BytesMut,
        want: usize,
    ) -> Result<Option<usize>, TransportError> {
        let got = recv_into_spare(self.stream.as_raw_fd(), buf, want)?;
        self.drained = got.is_none_or(|n| n < want);
        Ok(got)
    }
}

/// One non-blocking `recv(2)` of at most `want` bytes on the socket `fd`, written straight into
/// `buf`'s spare capacity (no bounce buffer): `Some(n)` bytes appended (0: the peer closed),
/// `None` if nothing is waiting. The caller reserved at least `want` bytes (asserted). Shared by
/// the rpc port and the Kafka port (`net/src/server.rs`).
pub fn recv_into_spare(
    fd: std::os::fd::RawFd,
    buf: &mut BytesMut,
    want: usize,
) -> std::io::Result<Option<usize>> {
    let spare = buf.spare_capacity_mut();
    assert!(
        want > 0 && spare.len() >= want,
        "the caller reserved the read"
    );
    loop {
        // SAFETY: the kernel writes at most `want` bytes at `spare`, which is writable, owned
        // by `buf` and at least that long; nothing reads those bytes before `recv` reports them
        // written, and `set_len` below covers exactly those.
        let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), want, libc::MSG_DONTWAIT) };
        if n >= 0 {
            let n = n as usize;
            assert!(n <= want, "recv wrote at most what it was given");
            // SAFETY: the first `n` spare bytes were just written by the kernel.
            unsafe { buf.set_len(buf.len() + n) };
            return Ok(Some(n));
        }
        let err = std::io::Error::last_os_error();
        match err.kind() {
            std::io::ErrorKind::Interrupted => continue,
            std::io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(err),
        }
    }
}

async fn dial_loop(inner: Rc<Inner>, node: NodeId, peer: Rc<Peer>) {
    let mut backoff = inner.cfg.reconnect_backoff_min;
    let mut failures = 0u32;
    while !inner.stopped.get() {
        // Dial only when there is something to send: an idle peer holds no connection.
        while peer.queue.is_empty() && !inner.stopped.get() {
            let gen = peer.queue.signal.generation.get();
            peer.queue.signal.changed(gen).await;
        }
        if inner.stopped.get() {
            return;
        }
        let addr = peer.addr.borrow().clone();
        match dial(&inner, node, &addr, &peer.queue).await {
            Ok(()) => {
                backoff = inner.cfg.reconnect_backoff_min;
                failures = 0;
                continue;
            }
            Err(e) => {
                inner.stat(|s| s.connections_failed += 1);
                failures += 1;
                // The first failure of a run is worth a line; a dead peer retried every
                // backoff is not worth one each time.
                if matches!(e, TransportError::RefusedByPeer(_)) || failures == 1 {
                    tracing::warn!(node, addr = %addr, error = %e, "rpc connection to peer failed");
                } else {
                    tracing::debug!(node, addr = %addr, error = %e, "rpc connection to peer failed");
                }
            }
        }
        glommio::timer::sleep(backoff).await;
        backoff = (backoff * 2).min(inner.cfg.reconnect_backoff_max);
    }
}

/// One outbound connection's life: connect, handshake, then frames both ways until it fails.
async fn dial(
    inner: &Rc<Inner>,
    node: NodeId,
    addr: &str,
    queue: &Rc<SendQueue>,
) -> Result<(), TransportError> {
    let stream = TcpStream::connect_timeout(addr, inner.cfg.connect_timeout)
        .await
        .map_err(glommio_io)?;
    stream.set_nodelay(true).map_err(glommio_io)?;
    let mut reader = SocketReader::new(dup_stream(&stream)?);
    let mut writer = stream;
    writer
        .set_write_timeout(Some(inner.cfg.read_timeout))
        .map_err(glommio_io)?;
    let ours = Frame {
        correlation_id: 0,
        message: RpcMessage::Hello(inner.local.clone()),
    };
    write_frames(&mut writer, &[inner.codec.encode(&ours)?]).await?;
    let mut buf = BytesMut::new();
    let hello = read_hello(inner, &mut reader, &mut buf).await?;
    let admitted = inner.directory.borrow_mut().admit(&hello, Some(node));
    if let Err(e) = admitted {
        inner.stat(|s| s.handshakes_refused += 1);
        tracing::warn!(node, addr, error = %e, "rpc handshake refused");
        return Err(TransportError::Rpc(RpcError::Handshake(e)));
    }
    tracing::info!(node, addr, "rpc connected to peer");
    run_connection(inner, node, queue, reader, writer, buf).await
}

/// Reads frames into the inbox and writes the queue's frames, until either side fails or the
/// connection idles out.
async fn run_connection(
    inner: &Rc<Inner>,
    node: NodeId,
    queue: &Rc<SendQueue>,
    mut reader: SocketReader,
    mut writer: TcpStream,
    mut buf: BytesMut,
) -> Result<(), TransportError> {
    let last_active = Rc::new(Cell::new(Instant::now()));
    let reply = ReplyTo {
        queue: queue.clone(),
        inner: inner.clone(),
    };
    let read = async {
        let mut frame_deadline: Option<Instant> = None;
        loop {
            while let Some(frame) = inner.codec.decode(&mut buf)? {
                last_active.set(Instant::now());
                inner.stat(|s| s.frames_received += 1);
                let incoming = Incoming {
                    from: node,
                    frame,
                    reply: reply.clone(),
                };
                if inner.inbox.send(incoming).await.is_err() {
                    return Ok(());
                }
                frame_deadline = None;
            }
            if inner.stopped.get() {
                return Ok(());
            }
            let deadline = if buf.is_empty() {
                last_active.get() + inner.cfg.idle_timeout
            } else {
                *frame_deadline.get_or_insert_with(|| Instant::now() + inner.cfg.read_timeout)
            };
            match reader.read_some(&mut buf, &inner.codec, deadline).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(TransportError::ReadTimeout) if buf.is_empty() => {
                    // Idle reads are fine while the writer is busy.
                    if last_active.get().elapsed() >= inner.cfg.idle_timeout {
                        tracing::debug!(node, "rpc connection idle: closing");
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    };
    let write = async {
        let mut gathered = Vec::new();
        loop {
            loop {
                queue.pop_gather(&mut gathered, MAX_IOVECS_PER_WRITE, MAX_GATHER_BYTES);
                if gathered.is_empty() {
                    break;
                }
                write_frames(&mut writer, &gathered).await?;
                last_active.set(Instant::now());
                let n = gathered.len() as u64;
                inner.stat(|s| s.frames_sent += n);
                gathered.clear();
            }
            if inner.stopped.get() || queue.closed.get() {
                return Ok(());
            }
            let gen = queue.signal.generation.get();
            if queue.is_empty() {
                queue.signal.changed(gen).await;
            }
        }
    };
    let result = futures_lite::future::or(read, write).await;
    // The reader's descriptor is a dup: only a shutdown tells the peer the connection is over.
    let _ = writer.shutdown(std::net::Shutdown::Both).await;
    let _ = writer.close().await;
    result
}

/// Writes `frames` in order with vectored writes: batch bytes go from where they are to the
/// socket, and small frames share a syscall.
async fn write_frames(writer: &mut TcpStream, frames: &[EncodedFrame]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = frames
        .iter()
        .flat_map(|f| f.parts())
        .filter(|p| !p.is_empty())
        .map(|p| IoSlice::new(p))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = rest.len().min(MAX_IOVECS_PER_WRITE);
        let written = writer.write_vectored(&rest[..n]).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, written);
    }
    Ok(())
}

fn glommio_io<T>(e: glommio::GlommioError<T>) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// A second handle on the same socket, so reads and writes proceed independently.
fn dup_stream(stream: &TcpStream) -> std::io::Result<TcpStream> {
    // SAFETY: the descriptor belongs to `stream`, which outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) }.try_clone_to_owned()?;
    // SAFETY: `fd` is a new, owned descriptor of the same connected TCP socket.
    Ok(unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::NodeMessage;
    use crate::types::Message;

    fn frame(epoch: i32) -> EncodedFrame {
        let f = Frame {
            correlation_id: 0,
            message: RpcMessage::Consensus(NodeMessage {
                from: 1,
                to: 2,
                items: vec![(7, Message::TimeoutNow { epoch })],
            }),
        };
        FrameCodec::default().encode(&f).unwrap()
    }

    #[test]
    fn a_full_send_queue_drops_its_oldest_frames() {
        let one = frame(0).len();
        let q = SendQueue::new(3 * one);
        for e in 0..3 {
            assert_eq!(q.push(frame(e)), 0);
        }
        assert_eq!(q.bytes.get(), 3 * one);
        // Two more: the two oldest go, the total stays within the cap.
        assert_eq!(q.push(frame(3)), 1);
        assert_eq!(q.push(frame(4)), 1);
        assert_eq!(q.bytes.get(), 3 * one);
        let epochs: Vec<i32> = std::iter::from_fn(|| q.pop())
            .map(|f| epoch_of(&f))
            .collect();
        assert_eq!(epochs, [2, 3, 4]);
        assert_eq!(q.bytes.get(), 0);
        // A frame larger than the whole queue is still sent alone (the codec caps frames).
        let tiny = SendQueue::new(1);
        assert_eq!(tiny.push(frame(5)), 0);
        assert_eq!(tiny.push(frame(6)), 1);
        assert!(tiny.pop().is_some() && tiny.pop().is_none());
        // A closed queue takes nothing.
        tiny.close();
        assert_eq!(tiny.push(frame(7)), 1);
        assert!(tiny.is_empty());
    }

    /// The epoch of the one consensus entry `frame(e)` carries, decoded back from the wire.
    fn epoch_of(f: &EncodedFrame) -> i32 {
        let mut b = BytesMut::from(&f.to_bytes()[..]);
        match FrameCodec::default()
            .decode(&mut b)
            .unwrap()
            .unwrap()
            .message
        {
            RpcMessage::Consensus(m) => m.items[0].1.epoch(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_write_gathers_queued_frames_within_its_limits() {
        let one = frame(0);
        let (len, parts) = (one.len(), one.parts().len());
        let q = SendQueue::new(1 << 20);
        for e in 0..10 {
            q.push(frame(e));
        }
        let mut out = Vec::new();
        // Bounded by bytes: three whole frames.
        q.pop_gather(&mut out, usize::MAX, 3 * len + len / 2);
        assert_eq!(out.len(), 3);
        assert_eq!(q.bytes.get(), 7 * len);
        out.clear();
        // Bounded by slices.
        q.pop_gather(&mut out, 2 * parts, usize::MAX);
        assert_eq!(out.len(), 2);
        out.clear();
        // A frame above both limits still goes, alone.
        q.pop_gather(&mut out, 0, 0);
        assert_eq!(out.len(), 1);
        out.clear();
        // The rest, oldest first; then nothing.
        q.pop_gather(&mut out, usize::MAX, usize::MAX);
        let epochs: Vec<i32> = out.iter().map(epoch_of).collect();
        assert_eq!(epochs, [6, 7, 8, 9]);
        assert_eq!(q.bytes.get(), 0);
        out.clear();
        q.pop_gather(&mut out, usize::MAX, usize::MAX);
        assert!(out.is_empty());
    }
}
