//! Per-worker buffer pool and the chunked byte queue each session uses for
//! its two directions.
//!
//! Why chunks: an io_uring send holds a pointer into the queue until its
//! completion arrives, so bytes already queued must never move. A queue is a
//! list of fixed-size chunks; appends go to the tail chunk while it has room
//! and to a new chunk otherwise, so a chunk's bytes are never reallocated or
//! compacted while queued. Why a pool: an idle session holds no chunk at all,
//! and a busy one reuses the worker's free chunks instead of calling the
//! allocator per message.
//!
//! No locks, no syscalls: a pool belongs to one worker thread.

use std::collections::VecDeque;

/// Free chunks of one worker, all `chunk_bytes` long.
#[derive(Debug)]
pub struct BufPool {
    free: Vec<Box<[u8]>>,
    chunk_bytes: usize,
    max_free: usize,
    /// Chunks handed out and not yet returned (for the memory gauge).
    pub outstanding: usize,
}

impl BufPool {
    pub fn new(chunk_bytes: usize, max_free: usize) -> Self {
        Self {
            free: Vec::new(),
            chunk_bytes,
            max_free,
            outstanding: 0,
        }
    }

    pub fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    fn take(&mut self) -> Box<[u8]> {
        self.outstanding += 1;
        self.free
            .pop()
            .unwrap_or_else(|| vec![0u8; self.chunk_bytes].into_boxed_slice())
    }

    fn give(&mut self, chunk: Box<[u8]>) {
        self.outstanding = self.outstanding.saturating_sub(1);
        if self.free.len() < self.max_free && chunk.len() == self.chunk_bytes {
            self.free.push(chunk);
        }
    }

    /// Chunks kept for reuse.
    pub fn free_len(&self) -> usize {
        self.free.len()
    }

    /// Lend a chunk whose first `headroom` bytes are kept free, outside any
    /// queue: the IO layer receives payload into [`Lent::room`] (on io_uring
    /// while other frames are queued and sent), then
    /// [`ByteQueue::append_with_header`] queues it, or [`BufPool::give_back`]
    /// returns it. None when the headroom leaves no room.
    pub fn lend(&mut self, headroom: usize) -> Option<Lent> {
        if headroom >= self.chunk_bytes {
            return None;
        }
        Some(Lent {
            data: self.take(),
            headroom,
        })
    }

    /// Return a lent chunk unused.
    pub fn give_back(&mut self, lent: Lent) {
        self.give(lent.data);
    }
}

/// A pool chunk lent out with room for a frame header at its front (see
/// [`BufPool::lend`]). Its bytes live on the heap: moving a `Lent` does not
/// move them, so a kernel operation may write into [`Lent::room`] while the
/// `Lent` is held (and not dropped) elsewhere.
#[derive(Debug)]
pub struct Lent {
    data: Box<[u8]>,
    headroom: usize,
}

impl Lent {
    /// The bytes after the headroom.
    pub fn room(&mut self) -> &mut [u8] {
        &mut self.data[self.headroom..]
    }
}

#[derive(Debug)]
struct Chunk {
    data: Box<[u8]>,
    /// First queued byte.
    head: usize,
    /// One past the last queued byte.
    tail: usize,
}

/// A FIFO of bytes made of pool chunks. Bytes never move once queued.
#[derive(Debug, Default)]
pub struct ByteQueue {
    chunks: VecDeque<Chunk>,
    len: usize,
}

impl ByteQueue {
    pub const fn new() -> Self {
        Self {
            chunks: VecDeque::new(),
            len: 0,
        }
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append bytes, taking chunks from the pool as needed.
    pub fn push(&mut self, pool: &mut BufPool, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let spare = self.spare(pool, 1);
            let n = spare.len().min(bytes.len());
            spare[..n].copy_from_slice(&bytes[..n]);
            self.commit(n);
            bytes = &bytes[n..];
        }
    }

    /// Writable room at the tail, contiguous and at least `min` bytes long
    /// (`min` is capped at the chunk size): a new chunk is started when the
    /// tail chunk has less. Follow with [`ByteQueue::commit`].
    pub fn spare(&mut self, pool: &mut BufPool, min: usize) -> &mut [u8] {
        let min = min.clamp(1, pool.chunk_bytes());
        let need_new = match self.chunks.back() {
            Some(c) => c.data.len() - c.tail < min,
            None => true,
        };
        if need_new {
            let data = pool.take();
            self.chunks.push_back(Chunk {
                data,
                head: 0,
                tail: 0,
            });
        }
        let c = self
            .chunks
            .back_mut()
            .expect("a tail chunk was just ensured");
        &mut c.data[c.tail..]
    }

    /// On an empty queue: a fresh chunk whose first `headroom` bytes are
    /// kept free, returning the room after them. Read payload into it, then
    /// [`ByteQueue::commit_with_header`] puts a header in front of it without
    /// moving the payload (zero-copy framing).
    pub fn fresh_with_headroom(
        &mut self,
        pool: &mut BufPool,
        headroom: usize,
    ) -> Option<&mut [u8]> {
        if !self.chunks.is_empty() || headroom >= pool.chunk_bytes() {
            return None;
        }
        let data = pool.take();
        self.chunks.push_back(Chunk {
            data,
            head: headroom,
            tail: headroom,
        });
        let c = self.chunks.back_mut().expect("just pushed");
        Some(&mut c.data[headroom..])
    }

    /// Queue `n` payload bytes written after the headroom of
    /// [`ByteQueue::fresh_with_headroom`], preceded by `header` (which must
    /// fit in the headroom). `n == 0` releases the chunk.
    pub fn commit_with_header(&mut self, pool: &mut BufPool, header: &[u8], n: usize) {
        let Some(c) = self.chunks.back_mut() else {
            return;
        };
        let n = n.min(c.data.len() - c.tail);
        if n == 0 || header.len() > c.head {
            self.clear(pool);
            return;
        }
        let start = c.head - header.len();
        c.data[start..c.head].copy_from_slice(header);
        c.head = start;
        c.tail += n;
        self.len += header.len() + n;
    }

    /// Queue `n` payload bytes written into a [`Lent`] chunk's room, preceded
    /// by `header` (which must fit in its headroom), after everything already
    /// queued: neither the payload nor queued bytes move. `n == 0` returns
    /// the chunk to the pool.
    pub fn append_with_header(&mut self, pool: &mut BufPool, lent: Lent, header: &[u8], n: usize) {
        let Lent { mut data, headroom } = lent;
        let n = n.min(data.len() - headroom);
        if n == 0 || header.len() > headroom {
            pool.give(data);
            return;
        }
        let start = headroom - header.len();
        data[start..headroom].copy_from_slice(header);
        self.chunks.push_back(Chunk {
            data,
            head: start,
            tail: headroom + n,
        });
        self.len += header.len() + n;
    }

    /// Mark `n` bytes at the start of the last [`ByteQueue::spare`] as queued.
    pub fn commit(&mut self, n: usize) {
        if let Some(c) = self.chunks.back_mut() {
            let n = n.min(c.data.len() - c.tail);
            c.tail += n;
            self.len += n;
        }
    }

    /// The first contiguous run of queued bytes (empty when nothing is queued).
    pub fn front(&self) -> &[u8] {
        match self.chunks.front() {
            Some(c) => &c.data[c.head..c.tail],
            None => &[],
        }
    }

    /// Drop `n` bytes from the front (they were sent), returning emptied
    /// chunks to the pool.
    pub fn consume(&mut self, pool: &mut BufPool, mut n: usize) {
        while n > 0 {
            let Some(c) = self.chunks.front_mut() else {
                break;
            };
            let k = n.min(c.tail - c.head);
            c.head += k;
            self.len -= k;
            n -= k;
            if c.head == c.tail {
                // An emptied chunk that is also the tail could be rewound and
                // kept, but returning it means an idle session holds nothing.
                let c = self.chunks.pop_front().expect("front exists");
                pool.give(c.data);
            } else {
                break;
            }
        }
        // A spare() that was never committed leaves an empty chunk behind.
        if self.len == 0 {
            self.clear(pool);
        }
    }

    /// Drop everything after the first `keep` bytes (those are in flight in
    /// an io_uring send and must stay where they are until it completes).
    pub fn truncate_to(&mut self, pool: &mut BufPool, keep: usize) {
        if keep == 0 {
            self.clear(pool);
            return;
        }
        let keep = keep.min(self.len);
        let front = self.chunks.front().map_or(0, |c| c.tail - c.head);
        // In-flight bytes are always a prefix of the front chunk.
        let keep = keep.min(front);
        while self.chunks.len() > 1 {
            let c = self.chunks.pop_back().expect("more than one chunk");
            pool.give(c.data);
        }
        if let Some(c) = self.chunks.front_mut() {
            c.tail = c.head + keep;
        }
        self.len = keep;
    }

    /// Drop everything, returning chunks to the pool.
    pub fn clear(&mut self, pool: &mut BufPool) {
        while let Some(c) = self.chunks.pop_front() {
            pool.give(c.data);
        }
        self.len = 0;
    }

    /// Chunks currently held.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn push_front_consume_roundtrip() {
        let mut pool = BufPool::new(8, 4);
        let mut q = ByteQueue::new();
        q.push(&mut pool, b"hello world, chunked");
        assert_eq!(q.len(), 20);
        assert_eq!(q.chunk_count(), 3);
        let mut out = Vec::new();
        while !q.is_empty() {
            let f = q.front().to_vec();
            out.extend_from_slice(&f);
            q.consume(&mut pool, f.len());
        }
        assert_eq!(out, b"hello world, chunked");
        assert_eq!(q.chunk_count(), 0);
        assert_eq!(pool.outstanding, 0);
        assert_eq!(pool.free_len(), 3);
    }

    #[test]
    fn spare_is_contiguous_and_min_sized() {
        let mut pool = BufPool::new(16, 4);
        let mut q = ByteQueue::new();
        q.push(&mut pool, b"0123456789");
        // Tail has 6 free bytes; asking for 8 must start a new chunk.
        assert_eq!(q.spare(&mut pool, 8).len(), 16);
        q.commit(3);
        assert_eq!(q.len(), 13);
        assert_eq!(q.front(), b"0123456789");
    }

    #[test]
    fn uncommitted_spare_is_released() {
        let mut pool = BufPool::new(16, 4);
        let mut q = ByteQueue::new();
        let _ = q.spare(&mut pool, 4);
        q.commit(0);
        q.consume(&mut pool, 0);
        assert_eq!(q.chunk_count(), 0);
        assert_eq!(pool.outstanding, 0);
    }

    #[test]
    fn queued_bytes_never_move() {
        let mut pool = BufPool::new(16, 4);
        let mut q = ByteQueue::new();
        q.push(&mut pool, b"abc");
        let p = q.front().as_ptr();
        q.push(&mut pool, &[7u8; 40]);
        assert_eq!(q.front().as_ptr(), p);
    }

    #[test]
    fn header_goes_in_front_without_moving_the_payload() {
        let mut pool = BufPool::new(64, 4);
        let mut q = ByteQueue::new();
        let room = q.fresh_with_headroom(&mut pool, 10).unwrap();
        room[..5].copy_from_slice(b"hello");
        let p = room.as_ptr();
        q.commit_with_header(&mut pool, &[0x82, 5], 5);
        assert_eq!(q.front(), b"\x82\x05hello");
        assert!(payload_starts_at(q.front(), p));
        assert!(
            q.fresh_with_headroom(&mut pool, 10).is_none(),
            "only on an empty queue"
        );
        q.consume(&mut pool, 7);
        let _ = q.fresh_with_headroom(&mut pool, 10).unwrap();
        q.commit_with_header(&mut pool, &[0x82, 0], 0);
        assert!(q.is_empty());
        assert_eq!(pool.outstanding, 0);
    }

    #[test]
    fn lent_chunk_is_appended_after_queued_bytes_without_moving() {
        let mut pool = BufPool::new(64, 4);
        let mut q = ByteQueue::new();
        q.push(&mut pool, b"pong");
        let queued = q.front().as_ptr();
        let mut lent = pool.lend(10).unwrap();
        assert_eq!(lent.room().len(), 54);
        lent.room()[..5].copy_from_slice(b"hello");
        let p = lent.room().as_ptr();
        // Queued while the chunk is lent (a pong during a receive).
        q.push(&mut pool, b"!");
        assert_eq!(pool.outstanding, 2);
        q.append_with_header(&mut pool, lent, &[0x82, 5], 5);
        assert_eq!(q.len(), 4 + 1 + 7);
        assert_eq!(q.front().as_ptr(), queued, "queued bytes moved");
        assert_eq!(q.front(), b"pong!");
        q.consume(&mut pool, 5);
        assert_eq!(q.front(), b"\x82\x05hello");
        assert!(payload_starts_at(q.front(), p));
        // Later pushes go after the frame, in its chunk's spare room.
        q.push(&mut pool, b"x");
        assert_eq!(q.front(), b"\x82\x05hellox");
        q.consume(&mut pool, 8);
        assert_eq!(pool.outstanding, 0);
        // Nothing received, or no headroom for the header: the chunk goes back.
        let lent = pool.lend(10).unwrap();
        q.append_with_header(&mut pool, lent, &[0x82, 0], 0);
        let lent = pool.lend(1).unwrap();
        q.append_with_header(&mut pool, lent, &[0x82, 5], 5);
        assert!(q.is_empty());
        assert_eq!(pool.outstanding, 0);
        let lent = pool.lend(3).unwrap();
        pool.give_back(lent);
        assert_eq!(pool.outstanding, 0);
        assert!(pool.lend(64).is_none(), "no room after the headroom");
    }

    /// Whether the payload (after the 2-byte header) still starts at `p`.
    fn payload_starts_at(front: &[u8], p: *const u8) -> bool {
        front[2..].as_ptr() == p
    }

    #[test]
    fn truncate_keeps_the_in_flight_prefix_in_place() {
        let mut pool = BufPool::new(8, 4);
        let mut q = ByteQueue::new();
        q.push(&mut pool, b"0123456789abcdef");
        let p = q.front().as_ptr();
        q.truncate_to(&mut pool, 5);
        assert_eq!(q.front(), b"01234");
        assert_eq!(q.front().as_ptr(), p);
        assert_eq!(q.len(), 5);
        q.consume(&mut pool, 5);
        assert_eq!(pool.outstanding, 0);
        q.push(&mut pool, b"xy");
        q.truncate_to(&mut pool, 0);
        assert!(q.is_empty());
        assert_eq!(pool.outstanding, 0);
    }

    proptest! {
        #[test]
        fn fifo_order(ops in proptest::collection::vec((0usize..40, 0usize..50), 1..60)) {
            let mut pool = BufPool::new(16, 2);
            let mut q = ByteQueue::new();
            let mut model = std::collections::VecDeque::new();
            let mut next = 0u8;
            for (push, take) in ops {
                let bytes: Vec<u8> = (0..push).map(|_| { next = next.wrapping_add(1); next }).collect();
                q.push(&mut pool, &bytes);
                model.extend(bytes);
                let take = take.min(q.front().len());
                let got = q.front()[..take].to_vec();
                let want: Vec<u8> = model.drain(..take).collect();
                prop_assert_eq!(got, want);
                q.consume(&mut pool, take);
                prop_assert_eq!(q.len(), model.len());
            }
        }
    }
}
