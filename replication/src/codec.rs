//! Binary primitives shared by the metadata-log records and the node-to-node frames: big-endian
//! fixed-width integers, length-prefixed strings and byte slices, and counted lists.
//!
//! Decoding reads from a `Bytes` and never trusts a length or a count: every string, slice and
//! list is checked against a named cap and against the bytes actually left before anything is
//! allocated, so hostile input costs at most its own size. Byte slices come back as
//! `Bytes::slice`s of the input (no copy), which is how record batches cross the rpc port.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Why bytes could not be decoded. Returned, never panicked on: the input may be hostile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated: needed {needed} more bytes for {what}")]
    Truncated { what: &'static str, needed: usize },
    #[error("{what} is {len}, above the limit of {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("unknown {what} tag {tag}")]
    UnknownTag { what: &'static str, tag: u8 },
    #[error("unsupported {what} version {version}")]
    Version { what: &'static str, version: u8 },
    #[error("{what} is not valid UTF-8")]
    Utf8 { what: &'static str },
    #[error("{0} trailing bytes after the value")]
    Trailing(usize),
    #[error("invalid {what}: {reason}")]
    Invalid {
        what: &'static str,
        reason: &'static str,
    },
}

/// Reads values off the front of a `Bytes`.
pub struct Reader {
    buf: Bytes,
}

impl Reader {
    pub fn new(buf: Bytes) -> Self {
        Reader { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Succeeds only when every byte was consumed: a value followed by junk is refused.
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }

    fn need(&self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                what,
                needed: n - self.buf.len(),
            });
        }
        Ok(())
    }

    fn take<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        self.need(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&self.buf[..N]);
        // `advance`, not `split_to`: a fixed-width field needs no `Bytes` of its own, and each
        // split costs two atomic reference-count updates (a node message of thousands of
        // heartbeats has tens of thousands of fields).
        self.buf.advance(N);
        Ok(a)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take::<1>(what)?[0])
    }
    pub fn bool(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(DecodeError::UnknownTag { what, tag }),
        }
    }
    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(what)?))
    }
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(what)?))
    }
    pub fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take(what)?))
    }
    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(what)?))
    }
    pub fn u128(&mut self, what: &'static str) -> Result<u128, DecodeError> {
        Ok(u128::from_be_bytes(self.take(what)?))
    }

    /// `u32` length then that many bytes, returned as a slice of the input (no copy).
    pub fn bytes(&mut self, what: &'static str, max: usize) -> Result<Bytes, DecodeError> {
        let len = self.u32(what)? as usize;
        if len > max {
            return Err(DecodeError::TooLong {
                what,
                len: len as u64,
                max: max as u64,
            });
        }
        self.need(len, what)?;
        Ok(self.buf.split_to(len))
    }

    /// `u16` length then UTF-8.
    pub fn string(&mut self, what: &'static str, max: usize) -> Result<String, DecodeError> {
        let len = usize::from(self.u16(what)?);
        if len > max {
            return Err(DecodeError::TooLong {
                what,
                len: len as u64,
                max: max as u64,
            });
        }
        self.need(len, what)?;
        let raw = self.buf.split_to(len);
        String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::Utf8 { what })
    }

    /// A `u32` element count, checked against `max` and against the bytes left (each element
    /// takes at least `min_elem_bytes`), so a hostile count cannot make the caller allocate.
    pub fn count(
        &mut self,
        what: &'static str,
        max: usize,
        min_elem_bytes: usize,
    ) -> Result<usize, DecodeError> {
        assert!(min_elem_bytes > 0);
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(DecodeError::TooLong {
                what,
                len: n as u64,
                max: max as u64,
            });
        }
        self.need(n.saturating_mul(min_elem_bytes), what)?;
        Ok(n)
    }

    /// A list of `u64` ids.
    pub fn u64_list(&mut self, what: &'static str, max: usize) -> Result<Vec<u64>, DecodeError> {
        let n = self.count(what, max, 8)?;
        (0..n).map(|_| self.u64(what)).collect()
    }
}

/// Appends values to a `BytesMut`. Writing never fails; callers keep values within the caps
/// the reader enforces (asserted here, so an oversized value is a bug caught at the source).
pub struct Writer<'a> {
    buf: &'a mut BytesMut,
}

impl<'a> Writer<'a> {
    pub fn new(buf: &'a mut BytesMut) -> Self {
        Writer { buf }
    }
    pub fn u8(&mut self, v: u8) {
        self.buf.put_u8(v);
    }
    pub fn bool(&mut self, v: bool) {
        self.buf.put_u8(u8::from(v));
    }
    pub fn u16(&mut self, v: u16) {
        self.buf.put_u16(v);
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.put_u32(v);
    }
    pub fn i32(&mut self, v: i32) {
        self.buf.put_i32(v);
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.put_u64(v);
    }
    pub fn u128(&mut self, v: u128) {
        self.buf.put_u128(v);
    }
    pub fn bytes(&mut self, v: &[u8], max: usize) {
        assert!(v.len() <= max, "{} bytes above the cap of {max}", v.len());
        self.buf.put_u32(v.len() as u32);
        self.buf.put_slice(v);
    }
    pub fn string(&mut self, v: &str, max: usize) {
        assert!(v.len() <= max && max <= usize::from(u16::MAX));
        self.buf.put_u16(v.len() as u16);
        self.buf.put_slice(v.as_bytes());
    }
    pub fn count(&mut self, n: usize, max: usize) {
        assert!(n <= max, "{n} elements above the cap of {max}");
        self.buf.put_u32(n as u32);
    }
    pub fn u64_list(&mut self, v: &[u64], max: usize) {
        self.count(v.len(), max);
        for x in v {
            self.u64(*x);
        }
    }
}
