//! Node-to-node transport, sans-IO: the frame codec and messages of the rpc port
//! (`--rpc-listen`), and the handshake that opens every connection. The caller owns the
//! sockets: it reads into a `BytesMut`, calls [`FrameCodec::decode`] until it returns `None`,
//! and writes each [`EncodedFrame`]'s parts with one vectored write. Any error closes that
//! connection and nothing else.

pub mod frame;
pub mod handshake;

pub use frame::{
    EncodedFrame, Frame, FrameCodec, MetadataChunk, RpcError, RpcErrorCode, RpcErrorReply,
    RpcMessage, DEFAULT_MAX_RPC_FRAME_BYTES,
};
pub use handshake::{HandshakeError, Hello, PeerDirectory, RPC_PROTOCOL_VERSION};
