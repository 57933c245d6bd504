//! Response frames as a list of byte segments, so record batches read from the log are written
//! to the socket from the buffers they were read into instead of being copied into the frame.
//!
//! [`SegmentedBuf`] is a `BufMut` for the codec: every `put_slice` whose bytes are one of the
//! registered record buffers (same address and length) becomes a reference to that `Bytes`;
//! everything else is copied into the current tail segment as usual.

use bytes::buf::UninitSlice;
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::protocol::buf::ByteBufMut;

/// Registered buffers shorter than this are copied anyway: a segment costs a write.
pub const ZERO_COPY_MIN_BYTES: usize = 4096;

/// A framed response: length prefix, header and body, as consecutive segments.
#[derive(Debug, Default)]
pub struct Frame {
    pub segments: Vec<Bytes>,
}

impl Frame {
    pub fn len(&self) -> usize {
        self.segments.iter().map(Bytes::len).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The frame as one buffer (copies if it has several segments).
    pub fn to_bytes(&self) -> Bytes {
        match self.segments.as_slice() {
            [one] => one.clone(),
            many => {
                let mut b = BytesMut::with_capacity(self.len());
                for s in many {
                    b.extend_from_slice(s);
                }
                b.freeze()
            }
        }
    }
}

impl From<Bytes> for Frame {
    fn from(b: Bytes) -> Frame {
        Frame { segments: vec![b] }
    }
}

pub struct SegmentedBuf {
    done: Vec<Bytes>,
    done_len: usize,
    tail: BytesMut,
    candidates: Vec<Bytes>,
}

impl SegmentedBuf {
    pub fn new(candidates: Vec<Bytes>) -> Self {
        SegmentedBuf {
            done: Vec::new(),
            done_len: 0,
            tail: BytesMut::with_capacity(1024),
            candidates: candidates
                .into_iter()
                .filter(|b| b.len() >= ZERO_COPY_MIN_BYTES)
                .collect(),
        }
    }

    pub fn into_frame(mut self) -> Frame {
        if !self.tail.is_empty() {
            self.done.push(self.tail.freeze());
        }
        Frame {
            segments: self.done,
        }
    }
}

// SAFETY: chunk_mut/advance_mut delegate to the tail BytesMut, which upholds the contract.
unsafe impl BufMut for SegmentedBuf {
    fn remaining_mut(&self) -> usize {
        self.tail.remaining_mut()
    }
    unsafe fn advance_mut(&mut self, cnt: usize) {
        self.tail.advance_mut(cnt)
    }
    fn chunk_mut(&mut self) -> &mut UninitSlice {
        self.tail.chunk_mut()
    }
    fn put_slice(&mut self, src: &[u8]) {
        let found = self
            .candidates
            .iter()
            .position(|c| c.as_ptr() == src.as_ptr() && c.len() == src.len());
        match found {
            Some(i) => {
                let segment = self.candidates.swap_remove(i);
                if !self.tail.is_empty() {
                    let tail = self.tail.split().freeze();
                    self.done_len += tail.len();
                    self.done.push(tail);
                }
                self.done_len += segment.len();
                self.done.push(segment);
            }
            None => self.tail.extend_from_slice(src),
        }
    }
}

impl ByteBufMut for SegmentedBuf {
    fn offset(&self) -> usize {
        self.done_len + self.tail.len()
    }
    // Message encoding never seeks (only record-batch encoding does, which is not done here);
    // moves inside the tail are supported and anything else is ignored rather than a panic.
    fn seek(&mut self, offset: usize) {
        if offset >= self.done_len {
            self.tail.resize(offset - self.done_len, 0);
        }
    }
    fn range(&mut self, r: std::ops::Range<usize>) -> &mut [u8] {
        let base = self.done_len;
        if r.start >= base && r.end >= r.start && r.end - base <= self.tail.len() {
            &mut self.tail[r.start - base..r.end - base]
        } else {
            &mut []
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_buffers_become_segments_and_the_bytes_match() {
        let big = Bytes::from(vec![7u8; 10_000]);
        let mut buf = SegmentedBuf::new(vec![big.clone()]);
        buf.put_i32(5);
        buf.put_slice(&big);
        buf.put_slice(&[1, 2, 3]);
        let copy = Bytes::from(vec![7u8; 10_000]);
        buf.put_slice(&copy);
        assert_eq!(buf.offset(), 4 + 10_000 + 3 + 10_000);
        let frame = buf.into_frame();
        assert_eq!(frame.segments.len(), 3);
        assert_eq!(frame.segments[1].as_ptr(), big.as_ptr(), "not copied");
        let mut expected = vec![0, 0, 0, 5];
        expected.extend_from_slice(&big);
        expected.extend_from_slice(&[1, 2, 3]);
        expected.extend_from_slice(&copy);
        assert_eq!(frame.to_bytes(), Bytes::from(expected));
    }
}
