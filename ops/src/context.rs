//! The execution context a kernel runs in: the device's thread budget.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::Yield;

use crate::buffers::BufferPool;

/// Bytes of free output buffers a context keeps for reuse by default ([`Context::buffers`]).
pub const DEFAULT_POOL_BYTES: usize = 256 << 20;

/// How long a pool's other threads keep looking for work after the last parallel kernel began,
/// by default ([`Context::with_keep_warm`]).
pub const DEFAULT_KEEP_WARM: Duration = Duration::from_micros(500);

/// Per-device execution context. A CPU device owns a thread budget: several CPU devices in one
/// process each get a share of the cores (a device may be given 1 thread).
#[derive(Clone, Debug)]
pub struct Context {
    threads: usize,
    pool: Option<Arc<rayon::ThreadPool>>,
    buffers: Arc<BufferPool>,
    warm: Option<Arc<Warmth>>,
    /// Matrix products running now on the pool's threads ([`Context::enter_product`]), shared
    /// by the clones of this context.
    products: Arc<AtomicUsize>,
}

impl Context {
    /// A context whose kernels run on the calling thread only.
    pub fn single_thread() -> Self {
        Context {
            threads: 1,
            pool: None,
            buffers: Arc::new(BufferPool::new(DEFAULT_POOL_BYTES)),
            warm: None,
            products: Arc::new(AtomicUsize::new(0)),
        }
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

    /// This context with its pool kept warm for `span` after each parallel kernel that begins on
    /// one of the pool's threads (a device thread serving inside its pool, as a session's CPU
    /// rank does): the other threads keep looking for work instead of going to sleep between
    /// the kernels of a step, so the next kernel's tasks start at once instead of after a
    /// futex wake-up (an inter-processor interrupt, slow in a VM). A pool that sees no new
    /// kernel and finds no work for `span` sleeps as before: an idle context keeps no core busy.
    /// `Duration::ZERO` turns it off (the default). Give it to a device whose threads have cores
    /// of their own: the spinning threads hold their cores while they look.
    pub fn with_keep_warm(mut self, span: Duration) -> Self {
        self.warm = (self.pool.is_some() && !span.is_zero()).then(|| Arc::new(Warmth::new(span)));
        self
    }

    /// The number of threads kernels may use.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Counts the calling matrix product among those running on this context's threads until
    /// the returned [`ProductSlot`] drops; the slot says over how many threads the product may
    /// split. Products of a device whose kernels run as a task graph (a session's CPU rank, by
    /// default) may run at once, one per thread: a product that splits then packs its shared
    /// operand once per part on one thread, which costs more than running whole, and waits for
    /// its parts while the other product holds the other thread.
    pub fn enter_product(&self) -> ProductSlot {
        let others = self.products.fetch_add(1, Ordering::AcqRel);
        let threads = if others == 0 { self.threads } else { 1 };
        ProductSlot { products: Arc::clone(&self.products), threads }
    }

    /// The pool kernels take their output buffers from (shared by the clones of this context).
    pub fn buffers(&self) -> &Arc<BufferPool> {
        &self.buffers
    }

    /// Runs `f` inside this context's pool (rayon work inside `f` uses the budget).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => {
                if let (Some(warm), Some(index)) = (&self.warm, pool.current_thread_index()) {
                    warm.touch(pool, index);
                }
                pool.install(f)
            }
            None => f(),
        }
    }

    /// Runs `f` on this context's pool without waiting for it (on the calling thread, before
    /// returning, when there is no pool). From a thread of the pool the task goes on that
    /// thread's own queue, where the pool's other threads steal it.
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) {
        match &self.pool {
            Some(pool) => pool.spawn(f),
            None => f(),
        }
    }
}

/// A matrix product counted as running ([`Context::enter_product`]) until it drops.
#[derive(Debug)]
pub struct ProductSlot {
    products: Arc<AtomicUsize>,
    threads: usize,
}

impl ProductSlot {
    /// The threads the product may split over: the context's, or 1 when another product was
    /// running on them as it entered.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

impl Drop for ProductSlot {
    fn drop(&mut self) {
        self.products.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Default for Context {
    fn default() -> Self {
        Self::single_thread()
    }
}

/// The keep-warm state of a pool: when the last kernel began, and whether the other threads
/// are looking for work now.
#[derive(Debug)]
struct Warmth {
    span: Duration,
    origin: Instant,
    /// Nanoseconds from `origin` to the start of the last parallel kernel.
    last: AtomicU64,
    /// The other threads are spinning (set by the kernel that started them, cleared by the
    /// last of them to stop).
    spinning: AtomicBool,
}

impl Warmth {
    fn new(span: Duration) -> Self {
        Warmth {
            span,
            origin: Instant::now(),
            last: AtomicU64::new(0),
            spinning: AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// A kernel begins on pool thread `caller`: the other threads keep looking for work from
    /// now until `span` after the last such start.
    fn touch(self: &Arc<Self>, pool: &rayon::ThreadPool, caller: usize) {
        self.last.store(self.now(), Ordering::Relaxed);
        if self.spinning.swap(true, Ordering::AcqRel) {
            return;
        }
        let warm = self.clone();
        let others = Arc::new(std::sync::atomic::AtomicUsize::new(pool.current_num_threads() - 1));
        pool.spawn_broadcast(move |broadcast| {
            if broadcast.index() == caller {
                return;
            }
            warm.spin();
            if others.fetch_sub(1, Ordering::AcqRel) == 1 {
                warm.spinning.store(false, Ordering::Release);
            }
        });
    }

    /// Runs the pool's pending work on this thread until, for `span`, no kernel has begun and
    /// no work was found.
    fn spin(&self) {
        let span = self.span.as_nanos() as u64;
        loop {
            match rayon::yield_now() {
                Some(Yield::Executed) => self.last.store(self.now(), Ordering::Relaxed),
                Some(Yield::Idle) => {
                    if self.now().saturating_sub(self.last.load(Ordering::Relaxed)) > span {
                        return;
                    }
                    std::hint::spin_loop();
                }
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    use super::*;

    fn parallel_sum(ctx: &Context, n: u64) -> u64 {
        ctx.install(|| (0..n).into_par_iter().map(|i| i * i).sum())
    }

    #[test]
    fn a_warm_pool_computes_and_goes_back_to_sleep_when_idle() {
        let ctx = Context::with_threads(2).with_keep_warm(Duration::from_millis(2));
        let warm = ctx.warm.clone().expect("a pool with a span is kept warm");
        let expected: u64 = (0..100_000u64).map(|i| i * i).sum();
        // Kernels that begin on a pool thread, as a device thread serving inside its pool.
        let sums = ctx.install(|| (0..50).map(|_| parallel_sum(&ctx, 100_000)).collect::<Vec<_>>());
        assert!(sums.iter().all(|&s| s == expected), "{sums:?}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while warm.spinning.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!warm.spinning.load(Ordering::Acquire), "still spinning 5 s after the last kernel");
        // It warms up again for the next kernel, and a kernel from outside the pool still runs.
        assert_eq!(ctx.install(|| parallel_sum(&ctx, 100_000)), expected);
        assert_eq!(parallel_sum(&ctx, 100_000), expected);
    }

    #[test]
    fn a_product_splits_only_while_no_other_product_runs() {
        let ctx = Context::with_threads(2);
        let first = ctx.enter_product();
        assert_eq!(first.threads(), 2, "alone: every thread");
        let clone = ctx.clone();
        let second = clone.enter_product();
        assert_eq!(second.threads(), 1, "next to another (counted across clones): its own");
        drop(first);
        drop(second);
        assert_eq!(ctx.enter_product().threads(), 2, "the slots were given back");
        let other = Context::with_threads(2);
        let _held = other.enter_product();
        assert_eq!(ctx.enter_product().threads(), 2, "another context's products do not count");
    }

    #[test]
    fn keep_warm_needs_a_pool_and_a_span() {
        assert!(Context::single_thread().with_keep_warm(DEFAULT_KEEP_WARM).warm.is_none());
        assert!(Context::with_threads(2).with_keep_warm(Duration::ZERO).warm.is_none());
        assert!(Context::with_threads(2).warm.is_none());
    }
}
