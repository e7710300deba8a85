//! [`wait`]: runs a future to completion on a thread outside the endpoint's runtime, polling
//! for a short span before it sleeps.
//!
//! A device thread that waits in a collective is woken by the runtime thread that decrypted the
//! peer's packet. Sleeping in the kernel and being woken costs tens of microseconds on this
//! 2-core virtual machine, as much as a small all-reduce's whole network path (measured on
//! loopback, 2 processes, 1-element all-reduces back to back after a 4 MB one: the time from
//! the later rank's arrival to each rank's return fell from a mean of 45 µs to 16 µs with a
//! 100 µs spin). While it spins the thread yields its core every few polls, so the runtime's
//! threads, and the peer process, still get it.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;

/// Polls between two yields of the core while spinning.
const POLLS_PER_YIELD: u32 = 16;

/// Runs `future` on this thread inside `runtime`'s context (its timers and I/O are the
/// runtime's); after each pending poll it spins for up to `spin` waiting for a wake-up, then
/// parks. `spin` zero is tokio's own `block_on`. Must not be called from inside an async task.
pub(crate) fn wait<F: Future>(runtime: &Handle, spin: Duration, future: F) -> F::Output {
    if spin.is_zero() {
        return runtime.block_on(future);
    }
    let _context = runtime.enter();
    let signal = Arc::new(Signal { woken: AtomicBool::new(false), thread: std::thread::current() });
    let waker = Waker::from(Arc::clone(&signal));
    let mut context = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        signal.wait(spin);
    }
}

/// The waiting thread and whether it was woken since it last looked.
struct Signal {
    woken: AtomicBool,
    thread: Thread,
}

impl Signal {
    /// Returns once woken: spins (yielding the core every few polls) for up to `spin`, then
    /// parks.
    fn wait(&self, spin: Duration) {
        let deadline = Instant::now() + spin;
        let mut polls = 0u32;
        while !self.woken.swap(false, Ordering::Acquire) {
            if Instant::now() >= deadline {
                while !self.woken.swap(false, Ordering::Acquire) {
                    std::thread::park();
                }
                return;
            }
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(POLLS_PER_YIELD) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        // Costs no system call unless the thread is parked.
        self.thread.unpark();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        let built =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build();
        built.expect("runtime")
    }

    #[test]
    fn a_future_woken_by_the_runtime_completes_with_its_value_whether_spinning_or_parked() {
        let runtime = runtime();
        for (spin, delay) in [(1_000, 0), (1_000, 5), (0, 5), (100, 20)] {
            let (sender, receiver) = tokio::sync::oneshot::channel();
            runtime.spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let _ = sender.send(delay * 2 + spin);
            });
            let spin = Duration::from_micros(spin);
            let value = wait(runtime.handle(), spin, async { receiver.await.expect("sent") });
            assert_eq!(value, delay * 2 + spin.as_micros() as u64);
        }
    }

    #[test]
    fn timers_of_the_runtime_work_inside_the_wait() {
        let runtime = runtime();
        let started = Instant::now();
        let late = wait(runtime.handle(), Duration::from_micros(50), async {
            tokio::time::timeout(Duration::from_millis(10), std::future::pending::<()>()).await
        });
        assert!(late.is_err(), "a pending future times out");
        assert!(started.elapsed() >= Duration::from_millis(10));
    }
}
