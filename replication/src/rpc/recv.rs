//! Where the next read of an rpc connection goes, without the socket.
//!
//! The socket is read straight into the receive buffer's spare capacity (no bounce buffer), and
//! the buffer is sized from the frame being read: once a length prefix is in, the whole frame is
//! reserved at once (the length checked against the cap first), so a large frame is moved at
//! most once, when its first bytes are carried over into the frame-sized allocation; growing
//! by doubling while it arrives copied it again at every step. Between frames a read asks for
//! [`READ_WINDOW_BYTES`], enough to take many small frames with one `recv`.

use bytes::BytesMut;

use crate::rpc::frame::{RpcError, FRAME_LENGTH_BYTES};

/// What a read asks for when no frame length is known or the frame needs less: small frames
/// (acknowledgements, heartbeats) arrive many to a read.
pub const READ_WINDOW_BYTES: usize = 64 << 10;

/// The largest frame before the peer is admitted: a hello or a refusal (a reason of at most
/// [`crate::rpc::frame::MAX_ERROR_MESSAGE_BYTES`]). An unauthenticated connection cannot make
/// the node reserve a full-size frame.
pub const MAX_HANDSHAKE_FRAME_BYTES: usize = 4 << 10;

/// Makes room in `buf` for the next read and returns how many bytes to ask for (at least one;
/// `buf` has at least that much spare capacity). A length prefix above `max_frame_bytes` is
/// refused here, before anything is reserved for it.
pub fn read_window(buf: &mut BytesMut, max_frame_bytes: usize) -> Result<usize, RpcError> {
    let frame_left = match frame_length(buf) {
        Some(len) if len > max_frame_bytes => {
            return Err(RpcError::FrameTooLarge {
                len,
                max: max_frame_bytes,
            })
        }
        // `decode` takes whole frames off the front first, so the frame at the front is
        // incomplete here; an empty left would only mean a frame is waiting to be decoded.
        Some(len) => (FRAME_LENGTH_BYTES + len).saturating_sub(buf.len()),
        None => 0,
    };
    let want = frame_left.max(READ_WINDOW_BYTES);
    buf.reserve(want);
    debug_assert!(buf.capacity() - buf.len() >= want);
    Ok(want)
}

/// The body length the frame at the front of `buf` announces, once its prefix is in.
fn frame_length(buf: &[u8]) -> Option<usize> {
    let prefix: [u8; FRAME_LENGTH_BYTES] = buf.get(..FRAME_LENGTH_BYTES)?.try_into().ok()?;
    Some(u32::from_be_bytes(prefix) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::NodeMessage;
    use crate::rpc::frame::{Frame, FrameCodec, RpcMessage};
    use crate::types::{AppendRequest, Batch, Message};
    use bytes::{Bytes, BytesMut};

    fn append(group: u64, batch_bytes: &[usize]) -> Frame {
        let mut base = 0;
        let batches = batch_bytes
            .iter()
            .map(|&n| {
                let b = Batch {
                    base,
                    count: 1,
                    epoch: 1,
                    bytes: Bytes::from((0..n).map(|i| (i * 7 + n) as u8).collect::<Vec<_>>()),
                    membership: None,
                };
                base += 1;
                b
            })
            .collect();
        Frame {
            correlation_id: group,
            message: RpcMessage::Consensus(NodeMessage {
                from: 1,
                to: 2,
                items: vec![(
                    group,
                    Message::Append(AppendRequest {
                        epoch: 1,
                        prev_offset: 0,
                        prev_epoch: 0,
                        commit: 0,
                        fill_end: base,
                        quiesce: 0,
                        batches,
                    }),
                )],
            }),
        }
    }

    /// The socket as the transport reads it: each read takes at most what the window asks for,
    /// and at most `chunk` (what the kernel happens to hold), straight into the spare capacity.
    fn feed(codec: &FrameCodec, wire: &[u8], mut chunk: impl FnMut() -> usize) -> Vec<Frame> {
        let mut buf = BytesMut::new();
        let mut at = 0;
        let mut out = Vec::new();
        loop {
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                out.push(f);
            }
            if at == wire.len() {
                assert!(buf.is_empty(), "bytes left after the last frame");
                return out;
            }
            let frame_left =
                frame_length(&buf).map_or(0, |len| FRAME_LENGTH_BYTES + len - buf.len());
            let want = read_window(&mut buf, codec.max_frame_bytes()).unwrap();
            assert!(want >= 1 && buf.capacity() - buf.len() >= want);
            assert!(
                want >= frame_left,
                "the rest of a started frame fits one read"
            );
            let n = want.min(chunk().max(1)).min(wire.len() - at);
            buf.extend_from_slice(&wire[at..at + n]);
            at += n;
        }
    }

    #[test]
    fn frames_come_out_whole_whatever_the_read_sizes() {
        let codec = FrameCodec::default();
        let frames = [
            append(1, &[10]),
            append(2, &[300, 5, 70_000]),
            append(3, &[READ_WINDOW_BYTES - 20, 100]),
            append(4, &[1]),
        ];
        let wire: Vec<u8> = frames
            .iter()
            .flat_map(|f| codec.encode(f).unwrap().to_bytes())
            .collect();
        // Split once at every point: a read ends there, the next takes the rest.
        for split in 1..wire.len() {
            let mut first = true;
            let got = feed(&codec, &wire, || {
                if std::mem::take(&mut first) {
                    split
                } else {
                    usize::MAX
                }
            });
            assert_eq!(got, frames, "split at {split}");
        }
        // A byte at a time, and a few uneven read sizes.
        assert_eq!(feed(&codec, &wire, || 1), frames);
        for step in [3, 4, 5, 4095, 65_537] {
            assert_eq!(feed(&codec, &wire, || step), frames, "reads of {step}");
        }
    }

    #[test]
    fn a_large_frame_is_reserved_whole_once_its_length_is_in() {
        let codec = FrameCodec::default();
        let wire = codec.encode(&append(9, &[3 << 20])).unwrap().to_bytes();
        let mut buf = BytesMut::new();
        read_window(&mut buf, codec.max_frame_bytes()).unwrap();
        buf.extend_from_slice(&wire[..100]);
        let want = read_window(&mut buf, codec.max_frame_bytes()).unwrap();
        assert_eq!(want, wire.len() - 100);
        let cap = buf.capacity();
        buf.extend_from_slice(&wire[100..]);
        assert_eq!(
            buf.capacity(),
            cap,
            "the rest of the frame fit without growing"
        );
        assert!(codec.decode(&mut buf).unwrap().is_some());
    }

    #[test]
    fn an_oversized_length_is_refused_before_anything_is_reserved() {
        for (max, len) in [
            (MAX_HANDSHAKE_FRAME_BYTES, MAX_HANDSHAKE_FRAME_BYTES + 1),
            (1 << 20, u32::MAX as usize),
        ] {
            let mut buf = BytesMut::with_capacity(8);
            buf.extend_from_slice(&(len as u32).to_be_bytes());
            let cap = buf.capacity();
            match read_window(&mut buf, max) {
                Err(RpcError::FrameTooLarge { len: l, max: m }) => {
                    assert_eq!((l, m), (len, max));
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(buf.capacity(), cap, "nothing reserved for a refused frame");
        }
        // At the cap exactly: reserved whole.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&(1u32 << 20).to_be_bytes());
        assert_eq!(read_window(&mut buf, 1 << 20).unwrap(), 1 << 20);
    }

    #[test]
    fn a_handshake_frame_fits_the_handshake_cap() {
        use crate::rpc::frame::MAX_ERROR_MESSAGE_BYTES;
        use crate::rpc::handshake::Hello;
        let codec = FrameCodec::default();
        let hello = Frame {
            correlation_id: u64::MAX,
            message: RpcMessage::Hello(Hello {
                protocol_version: u16::MAX,
                cluster_id: "c".repeat(crate::identity::MAX_CLUSTER_ID_BYTES),
                node_id: u64::MAX,
                node_uuid: u128::MAX,
            }),
        };
        let refusal = Frame {
            correlation_id: u64::MAX,
            message: RpcMessage::HandshakeRefused {
                reason: "r".repeat(MAX_ERROR_MESSAGE_BYTES * 2),
            },
        };
        for f in [hello, refusal] {
            let len = codec.encode(&f).unwrap().len() - FRAME_LENGTH_BYTES;
            assert!(len <= MAX_HANDSHAKE_FRAME_BYTES, "{len}");
        }
    }
}
