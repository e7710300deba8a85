//! Recycled host buffers of a [`crate::Context`].
//!
//! A kernel's output usually has the size of one that was just dropped (a training step makes
//! the same tensors every step). Taking a fresh allocation for it costs a zero fill (or, for
//! a fresh mapping, a page fault per 4 KiB), one more pass over memory than the kernel itself
//! makes. Kernels that overwrite every element take their output from the pool instead
//! ([`crate::Tensor::for_overwrite`]); the storage goes back to the pool when its last tensor is
//! dropped. The pool keeps at most [`BufferPool::limit`] bytes; small buffers are not pooled.

use std::collections::HashMap;
use std::sync::Mutex;

/// Buffers below this many bytes come from the allocator (cheap at that size).
const MIN_POOLED_BYTES: usize = 64 * 1024;

/// Free buffers by length in 8-byte words, up to a byte limit.
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Free>,
    limit: usize,
}

#[derive(Debug, Default)]
struct Free {
    by_words: HashMap<usize, Vec<Vec<u64>>>,
    bytes: usize,
}

impl BufferPool {
    /// A pool keeping at most `limit` bytes of free buffers.
    pub fn new(limit: usize) -> Self {
        BufferPool { free: Mutex::new(Free::default()), limit }
    }

    /// The most bytes of free buffers the pool keeps.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes of free buffers held now.
    pub fn held(&self) -> usize {
        self.lock().bytes
    }

    /// A buffer of exactly `words` words: a recycled one (holding stale values) or a zeroed one.
    pub fn take(&self, words: usize) -> Vec<u64> {
        if words * 8 >= MIN_POOLED_BYTES {
            let mut free = self.lock();
            if let Some(buffer) = free.by_words.get_mut(&words).and_then(Vec::pop) {
                free.bytes -= words * 8;
                return buffer;
            }
        }
        vec![0; words]
    }

    /// Gives `buffer` back; it is freed instead when it is small or the pool is full.
    pub fn give(&self, buffer: Vec<u64>) {
        let bytes = buffer.len() * 8;
        if bytes < MIN_POOLED_BYTES || buffer.capacity() != buffer.len() {
            return;
        }
        let mut free = self.lock();
        if free.bytes + bytes <= self.limit {
            free.bytes += bytes;
            free.by_words.entry(buffer.len()).or_default().push(buffer);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Free> {
        // A panic while holding the lock leaves the map consistent (every update is one step).
        self.free.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::CpuStorage;

    #[test]
    fn buffers_come_back_up_to_the_limit() {
        let pool = BufferPool::new(3 * MIN_POOLED_BYTES);
        let words = MIN_POOLED_BYTES / 8;
        let mut first = pool.take(words);
        first[0] = 7;
        pool.give(first);
        assert_eq!(pool.held(), MIN_POOLED_BYTES);
        let again = pool.take(words);
        assert_eq!(again[0], 7, "the recycled buffer is handed out again");
        assert_eq!(pool.held(), 0);
        pool.give(vec![0; 4 * words]);
        assert_eq!(pool.held(), 0, "a buffer over the limit is freed");
        pool.give(vec![0; 16]);
        assert_eq!(pool.held(), 0, "small buffers are not pooled");
    }

    #[test]
    fn copies_on_write_do_not_grow_the_pool() {
        let pool = Arc::new(BufferPool::new(64 * MIN_POOLED_BYTES));
        for step in 0..10u8 {
            // One step: a kernel output, copied on write once (as a shared tensor written to).
            let mut original = CpuStorage::for_overwrite(MIN_POOLED_BYTES, &pool);
            original.bytes_mut()[0] = step;
            let copy = original.clone();
            assert_eq!(copy.bytes()[0], step, "the copy holds the original's bytes");
            drop((original, copy));
            assert_eq!(pool.held(), 2 * MIN_POOLED_BYTES, "step {step}: the pool stays at 2");
        }
    }
}
