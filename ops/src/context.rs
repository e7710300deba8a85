//! The execution context a kernel runs in: the device's thread budget.

use std::sync::Arc;

use crate::buffers::BufferPool;

/// Bytes of free output buffers a context keeps for reuse by default ([`Context::buffers`]).
pub const DEFAULT_POOL_BYTES: usize = 256 << 20;

/// Per-device execution context. A CPU device owns a thread budget: several CPU devices in one
/// process each get a share of the cores (a device may be given 1 thread).
#[derive(Clone, Debug)]
pub struct Context {
    threads: usize,
    pool: Option<Arc<rayon::ThreadPool>>,
    buffers: Arc<BufferPool>,
}

impl Context {
    /// A context whose kernels run on the calling thread only.
    pub fn single_thread() -> Self {
        Context { threads: 1, pool: None, buffers: Arc::new(BufferPool::new(DEFAULT_POOL_BYTES)) }
    }

    /// A context with a private pool of `threads` worker threads (1 means no pool).
    pub fn with_threads(threads: usize) -> Self {
        let threads = threads.max(1);
        if threads == 1 {
            return Self::single_thread();
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("meshflow-cpu-{i}"))
            .build()
            .ok()
            .map(Arc::new);
        let threads = if pool.is_some() { threads } else { 1 };
        Context { threads, pool, ..Self::single_thread() }
    }

    /// The number of threads kernels may use.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The pool kernels take their output buffers from (shared by the clones of this context).
    pub fn buffers(&self) -> &Arc<BufferPool> {
        &self.buffers
    }

    /// Runs `f` inside this context's pool (rayon work inside `f` uses the budget).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.install(f),
            None => f(),
        }
    }
}

impl Default for Context {
    fn default() -> Self {
        Self::single_thread()
    }
}
