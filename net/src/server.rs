//! Connections: each shard accepts on the shared port (SO_REUSEPORT) and the least loaded
//! shard serves the connection. A connection's reader decodes frames and starts one task per
//! request (up to `max_in_flight_per_connection`); its writer sends the replies back in
//! request order.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::AsyncWriteExt;
use glommio::channels::local_channel;
use glommio::net::{TcpListener, TcpStream};
use glommio::Task;

use kafka_protocol::messages::ApiKey;

use spate_replication::rpc::transport::recv_into_spare;
use spate_replication::shard::Deadline;

use crate::budget::Charge;
use crate::dispatch::{dispatch_frame, RequestContext};
use crate::error::NetError;
use crate::frame::Frame;
use crate::request::{decode_request, frame_len, peek_ids, FRAME_PREFIX_BYTES};
use crate::shard::{ProduceOrder, Shard, Signal};

/// Bytes read from a socket at a time while no frame length is known.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// A frame at least this long that is not yet complete in the receive buffer is read into a
/// buffer of its own, of exactly its length: the request then owns its bytes alone, so Produce
/// hands its batches to the log without copying them (a frame cut from the shared receive
/// buffer is shared with it). Smaller frames stay in the receive buffer: copying them costs
/// less than an allocation each.
const OWN_BUFFER_MIN_FRAME_BYTES: usize = 32 * 1024;

/// Connections open over all shards, in total and per client address. Shared by the shards'
/// accept loops.
#[derive(Default)]
pub struct OpenConnections {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// An accepted connection's place in [`OpenConnections`], given back when dropped. `Send`: it
/// travels with the socket when another shard serves it.
pub struct Admission {
    open: Arc<OpenConnections>,
    /// Counted per address (only when a per-address limit is set).
    ip: Option<IpAddr>,
}

impl OpenConnections {
    /// Counts a new connection from `peer`, or says which limit it is over.
    fn admit(
        self: &Arc<Self>,
        peer: Option<IpAddr>,
        max_total: usize,
        max_per_ip: Option<usize>,
    ) -> Result<Admission, &'static str> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err("connection limit reached");
        }
        let mut admission = Admission {
            open: self.clone(),
            ip: None,
        };
        if let (Some(limit), Some(ip)) = (max_per_ip, peer) {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = per_ip.entry(ip).or_insert(0);
            if *n >= limit {
                return Err("connection limit per address reached");
            }
            *n += 1;
            admission.ip = Some(ip);
        }
        Ok(admission)
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let before = self.open.total.fetch_sub(1, Ordering::AcqRel);
        assert!(before > 0, "more connections closed than opened");
        if let Some(ip) = self.ip {
            let mut per_ip = self.open.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
    }
}

/// Accepts connections until shutdown, then waits for this shard's connections to finish.
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, open: Arc<OpenConnections>) {
    loop {
        let stop = shard.shutdown.changed(0);
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            stop.await;
            None
        })
        .await;
        let stream = match accepted {
            None => break,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "accept failed");
                // Back off briefly so an exhausted fd table does not spin the core.
                glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let peer = stream.peer_addr().ok();
        let admission = match open.admit(
            peer.map(|p| p.ip()),
            shard.config.max_connections,
            shard.config.max_connections_per_ip,
        ) {
            Ok(a) => a,
            Err(why) => {
                tracing::warn!(
                    ?peer,
                    limit = shard.config.max_connections,
                    limit_per_ip = shard.config.max_connections_per_ip,
                    "{why}; closing new connection"
                );
                continue;
            }
        };
        // The least loaded shard serves it (see Router::claim_connection).
        let target = shard.router.claim_connection(shard.id);
        if target == shard.id {
            adopt_connection(&shard, stream, admission);
            continue;
        }
        // SAFETY: into_raw_fd hands over the only owner of the descriptor, with this shard's
        // reactor state cleaned up; it is closed if it never reaches the target.
        let fd = unsafe { OwnedFd::from_raw_fd(stream.into_raw_fd()) };
        let router = shard.router.clone();
        glommio::spawn_local(async move {
            let handed = router
                .run_on(target, move |s| async move {
                    // SAFETY: `fd` is an open, owned TCP socket, given up here.
                    let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
                    adopt_connection(&s, stream, admission);
                })
                .await;
            if handed.is_err() {
                router.release_connection(target);
            }
        })
        .detach();
    }
    drop(listener);
    while shard.connections.get() > 0 {
        let seen = shard.connections_changed.generation();
        shard.connections_changed.changed(seen).await;
    }
}

/// Serves a connection counted on this shard by `Router::claim_connection` and in `admission`.
fn adopt_connection(shard: &Rc<Shard>, stream: TcpStream, admission: Admission) {
    if shard.is_shutting_down() {
        // Handed over while this shard drains: it may already have stopped waiting for its
        // connections, so it must not take a new one.
        shard.router.release_connection(shard.id);
        drop(admission);
        return;
    }
    let _ = stream.set_nodelay(true);
    tracing::debug!(shard = shard.id, peer = ?stream.peer_addr().ok(), "accepted connection");
    shard.connections.set(shard.connections.get() + 1);
    shard.metrics.connections.inc();
    let shard2 = shard.clone();
    glommio::spawn_local(async move {
        let peer = stream.peer_addr().ok();
        if let Err(e) = serve_connection(shard2.clone(), stream).await {
            tracing::info!(?peer, error = %e, "connection closed");
        }
        drop(admission);
        shard2.router.release_connection(shard2.id);
        shard2.connections.set(shard2.connections.get() - 1);
        shard2
            .connections_closed
            .set(shard2.connections_closed.get() + 1);
        shard2.metrics.connections.dec();
        shard2.connections_changed.notify();
    })
    .detach();
}

/// A request being handled, and the request memory it holds until its reply is written.
type InFlight = (Task<Result<Option<Frame>, NetError>>, Charge);

/// What a wait for a connection's next bytes ended with.
enum Received {
    /// This many bytes were appended (0: the peer closed the connection).
    Bytes(usize),
    /// The shard shuts down or the connection's writer is gone.
    Stopped,
    /// The deadline passed first.
    TimedOut,
}

fn timed_out(what: &str) -> NetError {
    NetError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
}

async fn serve_connection(shard: Rc<Shard>, stream: TcpStream) -> Result<(), NetError> {
    let mut sock = Socket::new(&stream)?;
    let mut writer = stream;
    let (tx, rx) =
        local_channel::new_bounded::<InFlight>(shard.config.max_in_flight_per_connection);
    let closed = Rc::new(Signal::default());
    let failed = Rc::new(Cell::new(false));
    // Requests read and not yet answered, and when the connection last read or wrote: an idle
    // connection has none in flight and did neither for `connections_max_idle_ms`.
    let in_flight = Rc::new(Cell::new(0usize));
    let last_active = Rc::new(Cell::new(Instant::now()));

    let writer_task = {
        let (closed, failed) = (closed.clone(), failed.clone());
        let (in_flight, last_active) = (in_flight.clone(), last_active.clone());
        glommio::spawn_local(async move {
            let mut result = Ok(());
            while let Some((task, mut charge)) = rx.recv().await {
                let outcome = task.await;
                match outcome {
                    Ok(Some(frame)) => {
                        // The reply's memory is taken already: charge it until it is written.
                        charge.grow_to(frame.len());
                        if let Err(e) = write_frame(&mut writer, &frame).await {
                            result = Err(NetError::Io(e));
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
                drop(charge);
                in_flight.set(in_flight.get() - 1);
                last_active.set(Instant::now());
            }
            let _ = writer.close().await;
            failed.set(true);
            closed.notify();
            result
        })
    };

    let max_frame = shard.config.max_frame_bytes;
    let idle = Duration::from_millis(shard.config.connections_max_idle_ms);
    let read_timeout = Duration::from_millis(shard.config.request_read_timeout_ms);
    let produce_order = Rc::new(ProduceOrder::default());
    // Empty until bytes arrive: an idle connection holds no receive buffer.
    let mut buf = BytesMut::new();
    // The request memory of the frame at the head of `buf`, once its length is known.
    let mut charged: Option<Charge> = None;
    // When the frame at the head of `buf` must be complete; pushed back by budget waits.
    let mut frame_deadline: Option<Instant> = None;
    let read_result: Result<(), NetError> = async {
        loop {
            // Hand every complete frame to a task.
            while let Some(len) = frame_len(&buf, max_frame)? {
                if charged.is_none() {
                    let waited = Instant::now();
                    match wait_for_budget(&shard, len, &closed).await {
                        Some(c) => charged = Some(c),
                        None => return Ok(()),
                    }
                    // Backpressure is the broker's doing: it does not count against the client.
                    if let Some(d) = frame_deadline.as_mut() {
                        *d += waited.elapsed();
                    }
                }
                let frame: Bytes = if buf.len() >= FRAME_PREFIX_BYTES + len {
                    buf.split_to(FRAME_PREFIX_BYTES + len)
                        .freeze()
                        .slice(FRAME_PREFIX_BYTES..)
                } else if len >= OWN_BUFFER_MIN_FRAME_BYTES {
                    let deadline =
                        *frame_deadline.get_or_insert_with(|| Instant::now() + read_timeout);
                    match read_own_frame(&mut sock, &mut buf, len, &shard, &closed, deadline)
                        .await?
                    {
                        Some(frame) => frame,
                        // Shut down, or the peer went away mid-frame.
                        None => return Ok(()),
                    }
                } else {
                    break;
                };
                let charge = charged.take().expect("charged before the frame was taken");
                // The next frame's clock starts with its first byte, if already here.
                frame_deadline = (!buf.is_empty()).then(|| Instant::now() + read_timeout);
                let ids = peek_ids(&frame);
                // The frame moves into the request: no handle here may keep its buffer shared.
                let req = match decode_request(frame) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(?ids, error = %e, "undecodable request; closing connection");
                        return Err(e);
                    }
                };
                tracing::debug!(api = ?req.api_key, version = req.api_version,
                    correlation_id = req.correlation_id, "request");
                shard.requests_read.set(shard.requests_read.get() + 1);
                let ctx = RequestContext {
                    produce_turn: (req.api_key == ApiKey::Produce)
                        .then(|| produce_order.take_ticket()),
                };
                let task = glommio::spawn_local(dispatch_frame(shard.clone(), req, ctx));
                in_flight.set(in_flight.get() + 1);
                if tx.send((task, charge)).await.is_err() {
                    return Ok(());
                }
            }
            if shard.is_shutting_down() || failed.get() {
                return Ok(());
            }
            // Read the rest of a known (small) frame, or a chunk.
            let want = match frame_len(&buf, max_frame)? {
                Some(len) => FRAME_PREFIX_BYTES + len - buf.len(),
                None => READ_CHUNK_BYTES,
            };
            let deadline = if buf.is_empty() {
                // An idle connection gives its receive buffer back while it waits.
                if sock.drained && buf.capacity() > 0 {
                    buf = BytesMut::new();
                }
                if in_flight.get() > 0 {
                    Instant::now() + idle
                } else {
                    last_active.get() + idle
                }
            } else {
                *frame_deadline.get_or_insert_with(|| Instant::now() + read_timeout)
            };
            match sock
                .read_into(&mut buf, want, &shard, &closed, deadline)
                .await?
            {
                Received::Stopped | Received::Bytes(0) => return Ok(()),
                Received::Bytes(_) => {
                    last_active.set(Instant::now());
                    if frame_deadline.is_none() {
                        frame_deadline = Some(Instant::now() + read_timeout);
                    }
                }
                Received::TimedOut if !buf.is_empty() => {
                    return Err(timed_out(
                        "a request did not arrive within request_read_timeout_ms",
                    ));
                }
                Received::TimedOut => {
                    let quiet = last_active.get().elapsed();
                    if in_flight.get() == 0 && quiet >= idle {
                        tracing::info!(
                            peer = ?writer_peer(&sock),
                            idle_ms = quiet.as_millis() as u64,
                            "closing idle connection"
                        );
                        return Ok(());
                    }
                }
            }
        }
    }
    .await;
    drop(charged);
    // Let in-flight requests finish and their replies go out, then close.
    drop(tx);
    let write_result = writer_task.await;
    read_result.and(write_result)
}

fn writer_peer(sock: &Socket) -> Option<std::net::SocketAddr> {
    sock.stream.peer_addr().ok()
}

/// Waits until the shard's request budget can hold a frame of `len` bytes; None if the shard
/// shuts down or the connection's writer is gone first.
async fn wait_for_budget(shard: &Rc<Shard>, len: usize, closed: &Signal) -> Option<Charge> {
    if let Some(c) = shard.request_budget.try_charge(len) {
        return Some(c);
    }
    tracing::debug!(
        shard = shard.id,
        frame_bytes = len,
        used_bytes = shard.request_budget.used_bytes(),
        "request memory spent; reading paused"
    );
    let stop = shard.shutdown.changed(0);
    let writer_gone = closed.changed(0);
    futures_lite::future::or(
        async { Some(shard.request_budget.charge(len).await) },
        async {
            futures_lite::future::or(stop, writer_gone).await;
            None
        },
    )
    .await
}

/// Reads the rest of a `len`-byte frame whose first bytes are in `buf` (after the length
/// prefix) into a buffer of its own, emptying `buf`. `len` was capped by `max_frame_bytes`
/// and charged to the request budget before this. The memory is only reserved: the socket
/// writes into it directly (see [`Socket::read_into`]), so a peer that announces a large frame
/// and stalls does not make the shard touch all of it, and no byte is zero-filled before it is
/// received. A frame not complete by `deadline` is an error.
async fn read_own_frame(
    sock: &mut Socket,
    buf: &mut BytesMut,
    len: usize,
    shard: &Shard,
    closed: &Signal,
    deadline: Instant,
) -> Result<Option<Bytes>, NetError> {
    let mut own = BytesMut::with_capacity(len);
    own.extend_from_slice(&buf[FRAME_PREFIX_BYTES..]);
    buf.clear();
    while own.len() < len {
        let want = len - own.len();
        match sock
            .read_into(&mut own, want, shard, closed, deadline)
            .await?
        {
            Received::Stopped | Received::Bytes(0) => return Ok(None),
            Received::Bytes(_) => {}
            Received::TimedOut => {
                return Err(timed_out(
                    "a request did not arrive within request_read_timeout_ms",
                ))
            }
        }
    }
    assert_eq!(own.len(), len, "a frame buffer holds exactly its frame");
    Ok(Some(own.freeze()))
}

/// A connection's receiving side: a second descriptor of the socket, so reads need not share
/// the stream with the task writing replies. Two descriptors, not one, because glommio's
/// `TcpStream` writes only through `&mut self` (`AsyncWrite`), while the reader waits for data
/// with a `peek` future that borrows the stream for as long as the connection is quiet: one
/// owner cannot lend both at once without a lock held across those waits (replies would stall
/// behind an idle reader) or aliasing a `&mut`. The duplicate is only a descriptor-table entry
/// of the same socket (no buffers of its own); it does halve the connections a given
/// `ulimit -n` allows (`spate check` asks for 65,536: 10,000 connections take 20,000).
struct Socket {
    stream: TcpStream,
    /// The last `recv` left the socket empty (it returned less than asked), so the next read
    /// waits at once instead of trying a `recv` that would find nothing. True at first: a new
    /// connection reserves no receive buffer before its first bytes arrive.
    drained: bool,
}

impl Socket {
    fn new(stream: &TcpStream) -> Result<Self, NetError> {
        // SAFETY: the descriptor belongs to `stream`, which outlives this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) }.try_clone_to_owned()?;
        // SAFETY: `fd` is a new, owned descriptor of the same connected TCP socket.
        let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
        Ok(Socket {
            stream,
            drained: true,
        })
    }

    /// Appends at most `max` (> 0) received bytes to `buf`, waiting until `deadline` at most.
    ///
    /// Safe reads need initialised destination bytes, and zero-filling every byte before the
    /// kernel overwrote it cost about 7% of a shard's CPU at 1.5 GB/s. So the bytes that are
    /// there are taken with a non-blocking `recv` into `buf`'s spare capacity, and only when the
    /// socket is empty does the task wait, on a peek that takes nothing. `buf` grows only once
    /// bytes are waiting.
    async fn read_into(
        &mut self,
        buf: &mut BytesMut,
        max: usize,
        shard: &Shard,
        closed: &Signal,
        deadline: Instant,
    ) -> Result<Received, NetError> {
        assert!(max > 0, "a read asks for at least one byte");
        if !self.drained {
            if let Some(n) = self.recv_available(buf, max)? {
                return Ok(Received::Bytes(n));
            }
        }
        loop {
            match self.wait_readable(shard, closed, deadline).await? {
                Received::Bytes(_) => {}
                other => return Ok(other),
            }
            // Readable means data, or the end of the stream (Some(0)).
            if let Some(n) = self.recv_available(buf, max)? {
                return Ok(Received::Bytes(n));
            }
        }
    }

    /// Waits until the socket has data or reached its end, without taking any: a one-byte
    /// `MSG_PEEK` through the executor's ring. `Bytes` when readable.
    async fn wait_readable(
        &mut self,
        shard: &Shard,
        closed: &Signal,
        deadline: Instant,
    ) -> Result<Received, NetError> {
        let stop = shard.shutdown.changed(0);
        let writer_gone = closed.changed(0);
        let mut probe = [0u8; 1];
        let stream = &self.stream;
        let peeked = futures_lite::future::or(
            async { Ok(stream.peek(&mut probe).await) },
            futures_lite::future::or(
                async {
                    futures_lite::future::or(stop, writer_gone).await;
                    Err(Received::Stopped)
                },
                async {
                    // Not `glommio::timer::sleep`: raced here, each wake-up of this future would
                    // leave another timer entry alive until the deadline (see `Deadline`).
                    Deadline::at(deadline).await;
                    Err(Received::TimedOut)
                },
            ),
        )
        .await;
        match peeked {
            Err(why) => Ok(why),
            Ok(Ok(_)) => {
                self.drained = false;
                Ok(Received::Bytes(0))
            }
            Ok(Err(e)) => Err(NetError::Io(e.into())),
        }
    }

    /// One non-blocking `recv` of at most `max` bytes into `buf`'s spare capacity; None if
    /// nothing is waiting.
    fn recv_available(
        &mut self,
        buf: &mut BytesMut,
        max: usize,
    ) -> Result<Option<usize>, NetError> {
        buf.reserve(max);
        let want = buf.spare_capacity_mut().len().min(max);
        let got = recv_into_spare(self.stream.as_raw_fd(), buf, want)?;
        self.drained = got.is_none_or(|n| n < want);
        Ok(got)
    }
}

/// Writes a frame's segments in order; small neighbours are coalesced so a reply of a few
/// segments does not cost a packet each.
async fn write_frame<W: futures_lite::AsyncWrite + Unpin>(
    writer: &mut W,
    frame: &Frame,
) -> std::io::Result<()> {
    if let [one] = frame.segments.as_slice() {
        return writer.write_all(one).await;
    }
    let mut pending = BytesMut::new();
    for segment in &frame.segments {
        if segment.len() < crate::frame::ZERO_COPY_MIN_BYTES {
            pending.extend_from_slice(segment);
            continue;
        }
        if !pending.is_empty() {
            writer.write_all(&pending).await?;
            pending.clear();
        }
        writer.write_all(segment).await?;
    }
    if !pending.is_empty() {
        writer.write_all(&pending).await?;
    }
    Ok(())
}
