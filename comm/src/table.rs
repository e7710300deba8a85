//! nccl-tests-style benchmark tables of collectives, in one place for the comm crate's criterion
//! bench (`cargo bench -p meshflow-comm --bench comm`) and `meshflow bench comm`: the message
//! sizes, the calls per size, the timing loop (wall and CPU time) and the table's rows.
//!
//! Every member of a group must make the same calls, so [`sizes`] and [`iterations`] depend on
//! the message size alone.

use std::time::Instant;

/// 8 B, 1 KiB, 64 KiB, 1 MiB, 16 MiB, 64 MiB, 256 MiB, up to `max_bytes`.
pub fn sizes(max_bytes: usize) -> Vec<usize> {
    [8, 1 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20, 256 << 20]
        .into_iter()
        .filter(|&size| size <= max_bytes)
        .collect()
}

/// Timed calls for a message of `bytes`: 512 MiB worth, from 20 for small messages down to 2
/// at 256 MiB.
pub fn iterations(bytes: usize) -> usize {
    ((512usize << 20) / bytes.max(1)).clamp(2, 20)
}

/// The warm-up calls [`time`] makes before it starts the clocks: buffers that alternate between
/// calls are then both allocated.
pub const WARM_UP_CALLS: usize = 2;

/// Mean wall-clock and CPU seconds of one call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    /// Wall-clock seconds per call.
    pub seconds: f64,
    /// CPU seconds per call of this process (user plus system, every thread), or NaN where
    /// the platform does not report them.
    pub cpu_seconds: f64,
}

/// Runs `run` [`WARM_UP_CALLS`] times, then `iterations` times under the clocks.
pub fn time(iterations: usize, mut run: impl FnMut()) -> Timing {
    for _ in 0..WARM_UP_CALLS {
        run();
    }
    let cpu = cpu_seconds();
    let started = Instant::now();
    for _ in 0..iterations {
        run();
    }
    let calls = iterations.max(1) as f64;
    Timing {
        seconds: started.elapsed().as_secs_f64() / calls,
        cpu_seconds: (cpu_seconds() - cpu) / calls,
    }
}

/// User plus system CPU seconds of this process (every thread) so far; NaN off Unix.
pub fn cpu_seconds() -> f64 {
    #[cfg(unix)]
    {
        // SAFETY: `usage` is a plain C struct that getrusage fills; RUSAGE_SELF is always valid.
        let usage = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut usage);
            usage
        };
        let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
        seconds(usage.ru_utime) + seconds(usage.ru_stime)
    }
    #[cfg(not(unix))]
    f64::NAN
}

/// GB/s of moving `bytes` in `seconds`.
pub fn algorithm_bandwidth(bytes: usize, seconds: f64) -> f64 {
    bytes as f64 / seconds / 1e9
}

/// nccl-tests' bus bandwidth of an all-reduce over `ranks`: algbw · 2(n−1)/n.
pub fn all_reduce_bus_bandwidth(bytes: usize, seconds: f64, ranks: usize) -> f64 {
    let ranks = ranks.max(1) as f64;
    algorithm_bandwidth(bytes, seconds) * 2.0 * (ranks - 1.0) / ranks
}

/// One row of a table: a message size and how the collective did on it.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Message size in bytes.
    pub bytes: usize,
    /// Elements of the message.
    pub count: usize,
    /// Element type as nccl-tests names it (`float`).
    pub dtype: &'static str,
    /// Reduction (`sum`), or `none`.
    pub redop: &'static str,
    /// Seconds per call.
    pub seconds: f64,
    /// Algorithm bandwidth, GB/s.
    pub algbw: f64,
    /// Bus bandwidth, GB/s.
    pub busbw: f64,
    /// Output elements that differ from the expected values.
    pub wrong: usize,
}

/// The column titles, nccl-tests style.
pub fn header() -> String {
    format!(
        "#{:>12} {:>12} {:>6} {:>6} {:>12} {:>12} {:>12} {:>7}",
        "size", "count", "type", "redop", "time(us)", "algbw(GB/s)", "busbw(GB/s)", "#wrong"
    )
}

impl Row {
    /// The row as [`header`] lays it out.
    pub fn line(&self) -> String {
        format!(
            " {:>12} {:>12} {:>6} {:>6} {:>12.1} {:>12.3} {:>12.3} {:>7}",
            self.bytes,
            self.count,
            self.dtype,
            self.redop,
            self.seconds * 1e6,
            self.algbw,
            self.busbw,
            self.wrong
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_iterations_and_bandwidths() {
        assert_eq!(sizes(1 << 20), vec![8, 1 << 10, 64 << 10, 1 << 20]);
        assert_eq!((iterations(8), iterations(64 << 20), iterations(256 << 20)), (20, 8, 2));
        assert_eq!(algorithm_bandwidth(2_000_000_000, 2.0), 1.0);
        assert_eq!(all_reduce_bus_bandwidth(1_000_000_000, 1.0, 4), 1.5);
        let mut calls = 0;
        let timing = time(3, || calls += 1);
        assert_eq!(calls, 3 + WARM_UP_CALLS);
        assert!(timing.seconds >= 0.0 && timing.cpu_seconds >= 0.0, "{timing:?}");
        let row = Row {
            bytes: 1024,
            count: 256,
            dtype: "float",
            redop: "sum",
            seconds: 1e-5,
            algbw: 0.1,
            busbw: 0.1,
            wrong: 0,
        };
        assert_eq!(row.line().split_whitespace().nth(4), Some("10.0"));
        assert_eq!(header().split_whitespace().count(), row.line().split_whitespace().count() + 1);
    }
}
