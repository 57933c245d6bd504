//! Write-behind for the active segment: frames are copied into aligned DMA buffers, full buffers
//! are handed out as write jobs at once, and a sync seals the partial last buffer. The partial
//! last page stays in memory (`carry`) so the next buffer starts with it and rewrites that page.
//!
//! Sans-IO: this module decides what to write where; the log runs the jobs on the executor and
//! reports completions back with [`Writer::complete`].

use std::collections::VecDeque;

use glommio::io::DmaBuffer;

/// O_DIRECT granularity used for every write (a multiple of any device's logical block size).
pub const PAGE_BYTES: usize = 4096;
/// Size of one write-behind buffer, i.e. of the largest single write.
pub const WRITE_BUF_BYTES: usize = 1 << 20;
/// Appends wait while this many buffer writes are in flight.
pub const MAX_INFLIGHT_WRITES: usize = 4;
/// Full-size buffers kept for reuse after their write completes.
const MAX_FREE_BUFS: usize = 4;

pub struct WriteJob {
    pub id: u64,
    pub buf: DmaBuffer,
    pub pos: u64,
    /// The previous job rewrites this job's first page: wait for it to land first, so the
    /// older, shorter copy of that page can never overwrite the newer one.
    pub wait_for: Option<u64>,
}

struct Inflight {
    id: u64,
    data_end: u64,
    done: bool,
}

pub struct Writer {
    cur: Option<DmaBuffer>,
    /// Segment position of the current buffer's first byte (page aligned).
    cur_start: u64,
    /// Bytes of the current buffer in use (valid data; `< WRITE_BUF_BYTES`).
    cur_len: usize,
    /// While `cur` is None: the first `cur_len` bytes of the page at `cur_start`.
    carry: Box<[u8; PAGE_BYTES]>,
    /// The current buffer holds bytes no job has written yet.
    dirty: bool,
    last_partial: Option<u64>,
    next_id: u64,
    inflight: VecDeque<Inflight>,
    /// Every segment byte below this has been written (not necessarily synced).
    pub written_pos: u64,
    free_bufs: Vec<DmaBuffer>,
    /// Jobs sealed but not yet started by the log.
    pub ready: Vec<WriteJob>,
}

impl Writer {
    /// A writer for a segment whose data ends at `size`; `tail` holds the bytes of the partial
    /// last page (`size % PAGE_BYTES` of them).
    pub fn new(size: u64, tail: &[u8]) -> Self {
        let cur_start = size - size % PAGE_BYTES as u64;
        assert_eq!(tail.len() as u64, size - cur_start);
        let mut carry = Box::new([0u8; PAGE_BYTES]);
        carry[..tail.len()].copy_from_slice(tail);
        Writer {
            cur: None,
            cur_start,
            cur_len: tail.len(),
            carry,
            dirty: false,
            last_partial: None,
            next_id: 0,
            inflight: VecDeque::new(),
            written_pos: size,
            free_bufs: Vec::new(),
            ready: Vec::new(),
        }
    }

    /// Segment position of the next byte to be appended.
    pub fn end(&self) -> u64 {
        self.cur_start + self.cur_len as u64
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len() + self.ready.len()
    }

    pub fn is_done(&self, id: u64) -> bool {
        !self.inflight.iter().any(|w| w.id == id && !w.done)
    }

    fn take_buffer(&mut self) -> DmaBuffer {
        self.free_bufs
            .pop()
            .unwrap_or_else(|| glommio::allocate_dma_buffer(WRITE_BUF_BYTES))
    }

    fn push_job(&mut self, buf: DmaBuffer, data_end: u64) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.inflight.push_back(Inflight {
            id,
            data_end,
            done: false,
        });
        self.ready.push(WriteJob {
            id,
            buf,
            pos: self.cur_start,
            wait_for: self.last_partial.take(),
        });
        id
    }

    /// Appends bytes (zeros if `src` is None) at the end, sealing every buffer that fills.
    pub fn push(&mut self, src: Option<&[u8]>, mut len: usize) {
        let mut src = src;
        while len > 0 {
            if self.cur.is_none() {
                let mut buf = self.take_buffer();
                buf.as_bytes_mut()[..self.cur_len].copy_from_slice(&self.carry[..self.cur_len]);
                self.cur = Some(buf);
            }
            let buf = self.cur.as_mut().expect("current buffer");
            let n = len.min(WRITE_BUF_BYTES - self.cur_len);
            let dst = &mut buf.as_bytes_mut()[self.cur_len..self.cur_len + n];
            match src {
                Some(s) => {
                    dst.copy_from_slice(&s[..n]);
                    src = Some(&s[n..]);
                }
                None => dst.fill(0),
            }
            self.cur_len += n;
            len -= n;
            self.dirty = true;
            if self.cur_len == WRITE_BUF_BYTES {
                let buf = self.cur.take().expect("current buffer");
                let end = self.cur_start + WRITE_BUF_BYTES as u64;
                self.push_job(buf, end);
                self.cur_start = end;
                self.cur_len = 0;
                self.dirty = false;
            }
        }
    }

    /// Seals the unwritten part of the current buffer into a job (through its partial last
    /// page, zero-padded), keeping that page in memory for the appends that follow.
    pub fn seal_partial(&mut self) {
        if !self.dirty {
            return;
        }
        let mut buf = self.cur.take().expect("dirty implies a buffer");
        let len = self.cur_len;
        let aligned = len.next_multiple_of(PAGE_BYTES);
        buf.as_bytes_mut()[len..aligned].fill(0);
        let tail = len % PAGE_BYTES;
        let tail_start = len - tail;
        self.carry[..tail].copy_from_slice(&buf.as_bytes()[tail_start..len]);
        buf.trim_to_size(aligned);
        let id = self.push_job(buf, self.cur_start + len as u64);
        self.cur_start += tail_start as u64;
        self.cur_len = tail;
        self.dirty = false;
        if tail > 0 {
            self.last_partial = Some(id);
        }
    }

    /// Records that job `id` finished (successfully or not) and advances `written_pos`.
    pub fn complete(&mut self, id: u64, buf: Option<DmaBuffer>) {
        if let Some(w) = self.inflight.iter_mut().find(|w| w.id == id) {
            w.done = true;
        }
        while self.inflight.front().is_some_and(|w| w.done) {
            let w = self.inflight.pop_front().expect("front");
            assert!(
                w.data_end >= self.written_pos,
                "written position only grows"
            );
            self.written_pos = w.data_end;
        }
        if let Some(b) = buf {
            if b.len() == WRITE_BUF_BYTES && self.free_bufs.len() < MAX_FREE_BUFS {
                self.free_bufs.push(b);
            }
        }
    }

    pub fn idle(&self) -> bool {
        self.inflight.is_empty() && self.ready.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_executor(f: impl FnOnce()) {
        glommio::LocalExecutorBuilder::default()
            .make()
            .unwrap()
            .run(async move { f() });
    }

    #[test]
    fn full_buffers_become_jobs_and_partial_pages_are_rewritten() {
        on_executor(|| {
            let mut w = Writer::new(0, &[]);
            w.push(Some(&[1u8; 100]), 100);
            assert!(
                w.ready.is_empty(),
                "nothing is written before a buffer fills or a sync"
            );
            w.seal_partial();
            assert_eq!(w.ready.len(), 1);
            let job = &w.ready[0];
            assert_eq!(
                (job.pos, job.buf.len(), job.wait_for),
                (0, PAGE_BYTES, None)
            );
            assert_eq!(&job.buf.as_bytes()[..100], &[1u8; 100][..]);
            assert!(job.buf.as_bytes()[100..].iter().all(|b| *b == 0));
            // The next buffer starts with the same page and must wait for the first write.
            w.push(Some(&[2u8; 50]), 50);
            w.push(None, 6);
            w.seal_partial();
            let job = &w.ready[1];
            assert_eq!(
                (job.pos, job.buf.len(), job.wait_for),
                (0, PAGE_BYTES, Some(0))
            );
            assert_eq!(&job.buf.as_bytes()[..100], &[1u8; 100][..]);
            assert_eq!(&job.buf.as_bytes()[100..150], &[2u8; 50][..]);
            assert_eq!(w.end(), 156);
            // Completion out of order: written_pos only moves over a contiguous prefix.
            assert_eq!(w.written_pos, 0);
            w.complete(1, None);
            assert_eq!(w.written_pos, 0);
            w.complete(0, None);
            assert_eq!(w.written_pos, 156);
            w.ready.clear();
            assert!(w.idle());
            // A large push fills whole buffers, each a full-size job.
            let big = vec![3u8; 2 * WRITE_BUF_BYTES];
            w.push(Some(&big), big.len());
            assert_eq!(w.ready.len(), 2);
            assert_eq!(w.ready[0].pos, 0);
            assert_eq!(
                w.ready[0].wait_for,
                Some(1),
                "it rewrites the partial page of job 1"
            );
            assert_eq!(w.ready[1].wait_for, None);
            assert_eq!(w.ready[1].pos, WRITE_BUF_BYTES as u64);
            assert_eq!(w.end(), 156 + 2 * WRITE_BUF_BYTES as u64);
            assert_eq!(w.inflight(), 4);
        });
    }

    #[test]
    fn resumes_after_a_partial_page() {
        on_executor(|| {
            let tail = vec![9u8; 1000];
            let mut w = Writer::new(3 * PAGE_BYTES as u64 + 1000, &tail);
            assert_eq!(w.end(), 3 * PAGE_BYTES as u64 + 1000);
            w.push(Some(&[4u8; 10]), 10);
            w.seal_partial();
            let job = &w.ready[0];
            assert_eq!(job.pos, 3 * PAGE_BYTES as u64);
            assert_eq!(&job.buf.as_bytes()[..1000], &tail[..]);
            assert_eq!(&job.buf.as_bytes()[1000..1010], &[4u8; 10][..]);
        });
    }
}
