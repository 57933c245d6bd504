//! Connections: each shard accepts on the shared port (SO_REUSEPORT) and the least loaded
//! shard serves the connection. A connection's reader decodes frames and starts one task per
//! request (up to `max_in_flight_per_connection`); its writer sends the replies back in
//! request order.

use std::cell::Cell;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_lite::AsyncWriteExt;
use glommio::channels::local_channel;
use glommio::net::{TcpListener, TcpStream};
use glommio::Task;

use kafka_protocol::messages::ApiKey;

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

/// Accepts connections until shutdown, then waits for this shard's connections to finish.
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, open: Arc<AtomicUsize>) {
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
        if open.fetch_add(1, Ordering::AcqRel) >= shard.config.max_connections {
            open.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(
                limit = shard.config.max_connections,
                "connection limit reached; closing new connection"
            );
            continue;
        }
        // The least loaded shard serves it (see Router::claim_connection).
        let target = shard.router.claim_connection(shard.id);
        if target == shard.id {
            adopt_connection(&shard, stream, open.clone());
            continue;
        }
        // SAFETY: into_raw_fd hands over the only owner of the descriptor, with this shard's
        // reactor state cleaned up; it is closed if it never reaches the target.
        let fd = unsafe { OwnedFd::from_raw_fd(stream.into_raw_fd()) };
        let (router, open) = (shard.router.clone(), open.clone());
        glommio::spawn_local(async move {
            let open2 = open.clone();
            let handed = router
                .run_on(target, move |s| async move {
                    // SAFETY: `fd` is an open, owned TCP socket, given up here.
                    let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
                    adopt_connection(&s, stream, open2);
                })
                .await;
            if handed.is_err() {
                router.release_connection(target);
                open.fetch_sub(1, Ordering::AcqRel);
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

/// Serves a connection counted on this shard by `Router::claim_connection` and in `open`.
fn adopt_connection(shard: &Rc<Shard>, stream: TcpStream, open: Arc<AtomicUsize>) {
    if shard.is_shutting_down() {
        // Handed over while this shard drains: it may already have stopped waiting for its
        // connections, so it must not take a new one.
        shard.router.release_connection(shard.id);
        open.fetch_sub(1, Ordering::AcqRel);
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
        open.fetch_sub(1, Ordering::AcqRel);
        shard2.router.release_connection(shard2.id);
        shard2.connections.set(shard2.connections.get() - 1);
        shard2.metrics.connections.dec();
        shard2.connections_changed.notify();
    })
    .detach();
}

type InFlight = Task<Result<Option<Frame>, NetError>>;

async fn serve_connection(shard: Rc<Shard>, stream: TcpStream) -> Result<(), NetError> {
    let mut sock = Socket::new(&stream)?;
    let mut writer = stream;
    let (tx, rx) =
        local_channel::new_bounded::<InFlight>(shard.config.max_in_flight_per_connection);
    let closed = Rc::new(Signal::default());
    let failed = Rc::new(Cell::new(false));

    let writer_task = {
        let (closed, failed) = (closed.clone(), failed.clone());
        glommio::spawn_local(async move {
            let mut result = Ok(());
            while let Some(task) = rx.recv().await {
                match task.await {
                    Ok(Some(frame)) => {
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
            }
            let _ = writer.close().await;
            failed.set(true);
            closed.notify();
            result
        })
    };

    let max_frame = shard.config.max_frame_bytes;
    let produce_order = Rc::new(ProduceOrder::default());
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let read_result: Result<(), NetError> = async {
        loop {
            // Hand every complete frame to a task.
            while let Some(len) = frame_len(&buf, max_frame)? {
                let frame: Bytes = if buf.len() >= FRAME_PREFIX_BYTES + len {
                    buf.split_to(FRAME_PREFIX_BYTES + len)
                        .freeze()
                        .slice(FRAME_PREFIX_BYTES..)
                } else if len >= OWN_BUFFER_MIN_FRAME_BYTES {
                    match read_own_frame(&mut sock, &mut buf, len, &shard, &closed).await? {
                        Some(frame) => frame,
                        // Shut down, or the peer went away mid-frame.
                        None => return Ok(()),
                    }
                } else {
                    break;
                };
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
                let ctx = RequestContext {
                    produce_turn: (req.api_key == ApiKey::Produce)
                        .then(|| produce_order.take_ticket()),
                };
                let task = glommio::spawn_local(dispatch_frame(shard.clone(), req, ctx));
                if tx.send(task).await.is_err() {
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
            match sock.read_into(&mut buf, want, &shard, &closed).await? {
                None | Some(0) => return Ok(()),
                Some(_) => {}
            }
        }
    }
    .await;
    // Let in-flight requests finish and their replies go out, then close.
    drop(tx);
    let write_result = writer_task.await;
    read_result.and(write_result)
}

/// Reads the rest of a `len`-byte frame whose first bytes are in `buf` (after the length
/// prefix) into a buffer of its own, emptying `buf`. `len` was capped by `max_frame_bytes`
/// before this. The memory is only reserved: the socket writes into it directly (see
/// [`Socket::read_into`]), so a peer that announces a large frame and stalls does not make the
/// shard touch all of it, and no byte is zero-filled before it is received.
async fn read_own_frame(
    sock: &mut Socket,
    buf: &mut BytesMut,
    len: usize,
    shard: &Shard,
    closed: &Signal,
) -> Result<Option<Bytes>, NetError> {
    let mut own = BytesMut::with_capacity(len);
    own.extend_from_slice(&buf[FRAME_PREFIX_BYTES..]);
    buf.clear();
    while own.len() < len {
        let want = len - own.len();
        match sock.read_into(&mut own, want, shard, closed).await? {
            None | Some(0) => return Ok(None),
            Some(_) => {}
        }
    }
    assert_eq!(own.len(), len, "a frame buffer holds exactly its frame");
    Ok(Some(own.freeze()))
}

/// A connection's receiving side: a second descriptor of the socket, so reads need not share
/// the stream with the task writing replies.
struct Socket {
    stream: TcpStream,
    /// The last `recv` left the socket empty (it returned less than asked), so the next read
    /// waits at once instead of trying a `recv` that would find nothing.
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
            drained: false,
        })
    }

    /// Appends at most `max` (> 0) received bytes to `buf`; Some(0) at end of stream, None if
    /// the shard shuts down or the connection's writer is gone first.
    ///
    /// Safe reads need initialised destination bytes, and zero-filling every byte before the
    /// kernel overwrote it cost about 7% of a shard's CPU at 1.5 GB/s. So the bytes that are
    /// there are taken with a non-blocking `recv` into `buf`'s spare capacity, and only when the
    /// socket is empty does the task wait, on a peek that takes nothing.
    async fn read_into(
        &mut self,
        buf: &mut BytesMut,
        max: usize,
        shard: &Shard,
        closed: &Signal,
    ) -> Result<Option<usize>, NetError> {
        assert!(max > 0, "a read asks for at least one byte");
        buf.reserve(max);
        if !self.drained {
            if let Some(n) = self.recv_available(buf, max)? {
                return Ok(Some(n));
            }
        }
        loop {
            if !self.wait_readable(shard, closed).await? {
                return Ok(None);
            }
            // Readable means data, or the end of the stream (Some(0)).
            if let Some(n) = self.recv_available(buf, max)? {
                return Ok(Some(n));
            }
        }
    }

    /// Waits until the socket has data or reached its end, without taking any: a one-byte
    /// `MSG_PEEK` through the executor's ring. False if the shard shuts down or the
    /// connection's writer is gone first.
    async fn wait_readable(&mut self, shard: &Shard, closed: &Signal) -> Result<bool, NetError> {
        let stop = shard.shutdown.changed(0);
        let writer_gone = closed.changed(0);
        let mut probe = [0u8; 1];
        let stream = &self.stream;
        let peeked =
            futures_lite::future::or(async { Some(stream.peek(&mut probe).await) }, async {
                futures_lite::future::or(stop, writer_gone).await;
                None
            })
            .await;
        match peeked {
            None => Ok(false),
            Some(Ok(_)) => {
                self.drained = false;
                Ok(true)
            }
            Some(Err(e)) => Err(NetError::Io(e.into())),
        }
    }

    /// One non-blocking `recv` of at most `max` bytes into `buf`'s spare capacity (reserved by
    /// the caller); None if nothing is waiting.
    fn recv_available(
        &mut self,
        buf: &mut BytesMut,
        max: usize,
    ) -> Result<Option<usize>, NetError> {
        let fd = self.stream.as_raw_fd();
        let spare = buf.spare_capacity_mut();
        let want = spare.len().min(max);
        loop {
            // SAFETY: the kernel writes at most `want` bytes at `spare`, which is writable,
            // owned by `buf` and at least that long; nothing reads those bytes before `recv`
            // reports them written, and `set_len` below covers exactly those.
            let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), want, libc::MSG_DONTWAIT) };
            if n >= 0 {
                let n = n as usize;
                assert!(n <= want, "recv wrote at most what it was given");
                // SAFETY: the first `n` spare bytes were just written by the kernel.
                unsafe { buf.set_len(buf.len() + n) };
                self.drained = n < want;
                return Ok(Some(n));
            }
            let err = std::io::Error::last_os_error();
            match err.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => {
                    self.drained = true;
                    return Ok(None);
                }
                _ => return Err(err.into()),
            }
        }
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
