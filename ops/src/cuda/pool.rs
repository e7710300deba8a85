//! The caching allocator's bookkeeping: free device buffers by size class, so that a training
//! step, which makes the same tensors every step, takes every buffer from the cache after the
//! first step instead of calling the driver's allocator.
//!
//! Sizes round up to a class (512 bytes below 1 MiB, 2 MiB above, as PyTorch's allocator does),
//! so near-equal sizes share buffers. The pool is generic over the buffer type so that this
//! arithmetic is tested without a GPU; the device keeps one pool of `CudaSlice<u8>` behind a
//! mutex. Buffers are reused in stream order: the device issues all its work on one stream, so a
//! buffer given back after its last use was enqueued is safe for any later enqueued work.

use std::collections::HashMap;

/// Granularity of classes up to [`LARGE_THRESHOLD`] bytes.
pub const SMALL_GRANULE: usize = 512;
/// Sizes above this round up to [`LARGE_GRANULE`].
pub const LARGE_THRESHOLD: usize = 1 << 20;
/// Granularity of large classes.
pub const LARGE_GRANULE: usize = 2 << 20;

/// The class (the bytes actually allocated) of a request of `bytes` bytes (at least one granule).
pub fn size_class(bytes: usize) -> usize {
    let granule = if bytes <= LARGE_THRESHOLD { SMALL_GRANULE } else { LARGE_GRANULE };
    bytes.max(1).div_ceil(granule) * granule
}

/// Counters of a pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Requests served by a fresh allocation.
    pub allocations: u64,
    /// Requests served from the cache.
    pub reuses: u64,
    /// Bytes of free buffers held now.
    pub held_bytes: usize,
}

/// Free buffers by size class, holding at most `limit` bytes.
#[derive(Debug)]
pub struct CachingPool<B> {
    free: HashMap<usize, Vec<B>>,
    limit: usize,
    stats: PoolStats,
}

impl<B> CachingPool<B> {
    /// An empty pool that keeps at most `limit` bytes of free buffers.
    pub fn new(limit: usize) -> Self {
        CachingPool { free: HashMap::new(), limit, stats: PoolStats::default() }
    }

    /// A cached buffer of class `class`, or `None` (then the caller allocates `class` bytes; the
    /// miss is counted).
    pub fn take(&mut self, class: usize) -> Option<B> {
        match self.free.get_mut(&class).and_then(Vec::pop) {
            Some(buffer) => {
                self.stats.reuses += 1;
                self.stats.held_bytes -= class;
                Some(buffer)
            }
            None => {
                self.stats.allocations += 1;
                None
            }
        }
    }

    /// Gives a buffer of class `class` back; returns it when the pool is full (the caller frees
    /// it).
    pub fn give(&mut self, class: usize, buffer: B) -> Option<B> {
        if self.stats.held_bytes + class > self.limit {
            return Some(buffer);
        }
        self.stats.held_bytes += class;
        self.free.entry(class).or_default().push(buffer);
        None
    }

    /// Takes every free buffer out (to free them, e.g. before an out-of-memory retry).
    pub fn drain(&mut self) -> Vec<B> {
        self.stats.held_bytes = 0;
        self.free.drain().flat_map(|(_, buffers)| buffers).collect()
    }

    /// The counters.
    pub fn stats(&self) -> PoolStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_their_class() {
        assert_eq!(size_class(0), 512);
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(512), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class(1 << 20), 1 << 20);
        assert_eq!(size_class((1 << 20) + 1), 2 << 20);
        assert_eq!(size_class(5 << 20), 6 << 20);
    }

    #[test]
    fn a_repeated_step_allocates_only_in_its_first_pass() {
        let mut pool: CachingPool<Vec<u8>> = CachingPool::new(1 << 30);
        let sizes = [4096usize, 3 << 20, 100, 4096];
        for _step in 0..3 {
            let taken: Vec<(usize, Vec<u8>)> = sizes
                .iter()
                .map(|&bytes| {
                    let class = size_class(bytes);
                    (class, pool.take(class).unwrap_or_else(|| vec![0; class]))
                })
                .collect();
            for (class, buffer) in taken {
                assert_eq!(buffer.len(), class);
                assert!(pool.give(class, buffer).is_none());
            }
        }
        let stats = pool.stats();
        assert_eq!(stats.allocations, 4, "only the first step allocates");
        assert_eq!(stats.reuses, 8);
        assert_eq!(stats.held_bytes, 2 * 4096 + (4 << 20) + 512);
    }

    #[test]
    fn a_full_pool_hands_the_buffer_back_and_drain_empties_it() {
        let mut pool: CachingPool<u32> = CachingPool::new(1024);
        assert_eq!(pool.give(1024, 7), None);
        assert_eq!(pool.give(512, 8), Some(8), "over the limit: the caller frees it");
        assert_eq!(pool.drain(), vec![7]);
        assert_eq!(pool.stats().held_bytes, 0);
        assert_eq!(pool.take(1024), None);
    }
}
