//! Framing and request headers, without I/O: the length prefix is capped before anything is
//! allocated, and the header is read with explicit bounds checks before the codec sees it.

use bytes::{Buf, Bytes};
use kafka_protocol::messages::{ApiKey, RequestHeader};
use kafka_protocol::protocol::Decodable;

use crate::error::NetError;

/// Bytes of the big-endian length that precedes every frame.
pub const FRAME_PREFIX_BYTES: usize = 4;
/// api_key + api_version + correlation_id.
pub const MIN_HEADER_BYTES: usize = 8;

/// Length of the frame at the start of `buf`, once its prefix is complete. A negative or
/// too-large length is an error: the connection cannot be resynchronised and must be closed.
pub fn frame_len(buf: &[u8], max_frame_bytes: usize) -> Result<Option<usize>, NetError> {
    if buf.len() < FRAME_PREFIX_BYTES {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 0 || len as usize > max_frame_bytes {
        return Err(NetError::FrameTooLarge {
            size: len as i64,
            limit: max_frame_bytes,
        });
    }
    if (len as usize) < MIN_HEADER_BYTES {
        return Err(NetError::Malformed(format!(
            "frame of {len} bytes is shorter than a request header"
        )));
    }
    Ok(Some(len as usize))
}

/// A request whose header has been decoded; `body` is what follows the header.
#[derive(Debug)]
pub struct Request {
    pub api_key: ApiKey,
    pub api_version: i16,
    pub correlation_id: i32,
    pub client_id: Option<String>,
    pub body: Bytes,
}

/// The fixed fields every request starts with, read without trusting the frame.
pub fn peek_ids(frame: &[u8]) -> Option<(i16, i16, i32)> {
    if frame.len() < MIN_HEADER_BYTES {
        return None;
    }
    let mut b = &frame[..MIN_HEADER_BYTES];
    Some((b.get_i16(), b.get_i16(), b.get_i32()))
}

/// Decodes the request header of one frame (without its length prefix).
pub fn decode_request(mut frame: Bytes) -> Result<Request, NetError> {
    let (key, version, _) = peek_ids(&frame)
        .ok_or_else(|| NetError::Malformed("frame shorter than a request header".into()))?;
    let api_key = ApiKey::try_from(key).map_err(|_| NetError::UnknownApiKey(key))?;
    if version < 0 {
        return Err(NetError::Malformed(format!(
            "negative api version {version}"
        )));
    }
    let header_version = api_key.request_header_version(version);
    let header = RequestHeader::decode(&mut frame, header_version)
        .map_err(|e| NetError::Malformed(format!("request header: {e}")))?;
    Ok(Request {
        api_key,
        api_version: header.request_api_version,
        correlation_id: header.correlation_id,
        client_id: header.client_id.map(|s| s.to_string()),
        body: frame,
    })
}

/// Decodes a request body with the codec, turning its errors into [`NetError::Malformed`].
pub fn decode_body<T: Decodable>(req: &Request) -> Result<T, NetError> {
    let mut body = req.body.clone();
    T::decode(&mut body, req.api_version)
        .map_err(|e| NetError::Malformed(format!("{:?} v{}: {e}", req.api_key, req.api_version)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_len_caps_before_allocating() {
        assert!(matches!(frame_len(&[0, 0], 100), Ok(None)));
        assert!(matches!(frame_len(&[0, 0, 0, 50], 100), Ok(Some(50))));
        assert!(frame_len(&[0, 0, 1, 0], 100).is_err());
        assert!(frame_len(&[0xff, 0xff, 0xff, 0xff], 100).is_err());
        assert!(frame_len(&[0, 0, 0, 3], 100).is_err());
    }

    #[test]
    fn unknown_api_key_is_an_error() {
        let frame = Bytes::from_static(&[0x7f, 0x00, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert!(matches!(
            decode_request(frame),
            Err(NetError::UnknownApiKey(0x7f00))
        ));
    }
}
