//! Connections: each shard accepts on the shared port (SO_REUSEPORT) and the least loaded
//! shard serves the connection. A connection's reader decodes frames and starts one task per
//! request (up to `max_in_flight_per_connection`); its writer sends the replies back in
//! request order.

use std::cell::Cell;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
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
/// Most a single read grows the receive buffer by while a large frame arrives: the buffer is
/// zero-filled before each read, so growing it by the whole remaining frame at once would touch
/// up to `max_frame_bytes` ahead of the data.
const MAX_READ_GROWTH_BYTES: usize = 1 << 20;

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
    let (mut reader, mut writer) = futures_lite::io::split(stream);
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
            // Hand every complete frame in the buffer to a task.
            while let Some(len) = frame_len(&buf, max_frame)? {
                if buf.len() < FRAME_PREFIX_BYTES + len {
                    break;
                }
                let frame: Bytes = buf
                    .split_to(FRAME_PREFIX_BYTES + len)
                    .freeze()
                    .slice(FRAME_PREFIX_BYTES..);
                let req = match decode_request(frame.clone()) {
                    Ok(r) => r,
                    Err(e) => {
                        let ids = peek_ids(&frame);
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
            // Make room for the rest of a known frame, or a chunk.
            let want = match frame_len(&buf, max_frame)? {
                Some(len) => FRAME_PREFIX_BYTES + len - buf.len(),
                None => READ_CHUNK_BYTES,
            }
            .min(MAX_READ_GROWTH_BYTES);
            let old = buf.len();
            buf.resize(old + want, 0);
            let stop = shard.shutdown.changed(0);
            let writer_gone = closed.changed(0);
            let n = futures_lite::future::or(
                async { Some(reader.read(&mut buf[old..]).await) },
                async {
                    futures_lite::future::or(stop, writer_gone).await;
                    None
                },
            )
            .await;
            match n {
                None => {
                    buf.truncate(old);
                    return Ok(());
                }
                Some(Ok(0)) => return Ok(()),
                Some(Ok(n)) => buf.truncate(old + n),
                Some(Err(e)) => return Err(e.into()),
            }
        }
    }
    .await;
    // Let in-flight requests finish and their replies go out, then close.
    drop(tx);
    let write_result = writer_task.await;
    read_result.and(write_result)
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
