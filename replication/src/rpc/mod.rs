//! Node-to-node transport: the frame codec and messages of the rpc port (`--rpc-listen`) and
//! the handshake that opens every connection (both sans-IO), and [`transport`], the glommio
//! TCP around them. The caller owns the
//! sockets: it reads into a `BytesMut` (sized by [`recv::read_window`]), calls
//! [`FrameCodec::decode`] until it returns `None`, and writes [`EncodedFrame`]s' parts with
//! vectored writes. Any error closes that connection and nothing else.

pub mod frame;
pub mod handshake;
pub mod recv;
pub mod transport;

pub use frame::{
    EncodedFrame, Frame, FrameCodec, MetadataChunk, RpcError, RpcErrorCode, RpcErrorReply,
    RpcMessage, DEFAULT_MAX_RPC_FRAME_BYTES,
};
pub use handshake::{HandshakeError, Hello, PeerDirectory, RPC_PROTOCOL_VERSION};
pub use transport::{
    Incoming, ReplyTo, Transport, TransportConfig, TransportError, TransportStats,
};
