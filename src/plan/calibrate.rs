//! Calibration: the cost model's `cpu` figures measured on this machine ([`machine`](super::machine)), and the
//! simulator's predicted step times for every strategy that runs here ([`StrategyKind::ALL`]:
//! meshes of CPU devices in one process, 1F1B pipelines, ZeRO, gradient accumulation, and data
//! parallelism across processes launched on loopback) against real steps of the [`Session`]
//! measured in the same run.
//!
//! Each strategy is predicted from the session's own program and actor configuration (pieces,
//! piece order, end of the forward, accumulated gradients), twice: with the roofline of the
//! machine's figures, and with every distinct kernel of its program timed on this machine after
//! each of its rounds ([`KernelProfile`]: the kernels come from the program, whatever ops it
//! holds; the median of the rounds' predictions, [`predict_row`]). The second
//! leaves the simulator only the schedule, the communication and the runtime between kernels to
//! predict. Device threads that outnumber the cores take turns on them ([`predict_sharing_cores`]:
//! each thread bound to a core as the session binds it, every act holds that core while it
//! runs; pipeline stages are not all busy at once).
//!
//! [`Session`]: crate::session::Session

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::acts::{format_kernel_table, kernel_table, MeasuredActs};
use super::cluster::Cluster;
use super::cores::{step_on_cores_waiting, BarrierWait, Cores, BARRIER_SPIN};
use super::cost::ActCosts;
use super::profile::KernelProfile;
use super::{predict_measured, processes, Prediction};
use crate::compile::actors::{lower_to_actors, ActorConfig};
use crate::compile::{CompileConfig, Program};
use crate::session::Session;
use crate::Result;

pub use super::machine::{empty_step, measure, Measured};
pub use super::strategies::{SessionStrategy, Steps, StrategyKind};
pub use super::table::scale_table;

use super::strategies::{actor_config, Ran, RunningSession};

/// How to calibrate.
#[derive(Clone, Debug)]
pub struct CalibrationConfig {
    /// Measured steps per strategy and round.
    pub steps: usize,
    /// Rounds: each runs `steps` steps of every one-process strategy in turn, and a strategy's
    /// measured step is the median of its rounds' medians, so a slow spell of a shared host
    /// that falls in one round moves no row (one round in a run of 7 steps once measured TP2
    /// at 47.5 ms against 33–35 in the runs around it). The strategy across processes runs
    /// its steps in one round, after the others.
    pub rounds: usize,
    /// Unmeasured steps first.
    pub warmup: usize,
    /// Sequences per step.
    pub batch: usize,
    /// The strategies to run. Default: [`SessionStrategy::every`].
    pub strategies: Vec<SessionStrategy>,
    /// The `meshflow` binary, which launches the workers of strategies across processes
    /// (`meshflow launch … meshflow plan --calibrate-worker …`). `None`: such strategies are
    /// an error.
    pub binary: Option<PathBuf>,
}

impl Default for CalibrationConfig {
    fn default() -> Self {
        CalibrationConfig {
            steps: 5,
            rounds: 3,
            warmup: 2,
            batch: 16,
            strategies: SessionStrategy::every(),
            binary: None,
        }
    }
}

impl CalibrationConfig {
    /// The steps of each session.
    pub fn session_steps(&self) -> Steps {
        Steps { measured: self.steps, warmup: self.warmup, batch: self.batch }
    }
}

/// One strategy: predicted against measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationRow {
    /// The strategy.
    pub strategy: SessionStrategy,
    /// Simulated step (roofline kernels and boxing) plus the measured empty-step cost.
    pub predicted: f64,
    /// Simulated step with measured kernel times ([`KernelProfile`]) plus the empty-step cost.
    pub profiled: f64,
    /// Distinct kernels profiled, and those that could not run on made-up inputs.
    pub kernels: (usize, usize),
    /// Of which the empty step.
    pub fixed: f64,
    /// Median measured step.
    pub measured: f64,
    /// The link the strategy's collectives and transfers were priced with: per-hop latency and
    /// bytes per second (measured in the same run).
    pub link: (f64, f64),
    /// The factor the profiled kernels were slowed by for device threads sharing cores
    /// ([`predict_sharing_cores`]).
    pub slowdown: f64,
    /// Of the profiled prediction: seconds of kernels on the busiest rank (what the schedule
    /// adds to it is waiting: pipeline bubbles, collectives).
    pub busiest_compute: f64,
    /// What the real session's busiest rank spent in kernels and in boxing, and the span of
    /// its acts, in the measured steps (the driver's trace; rank 0's process only across
    /// processes).
    #[serde(default)]
    pub acts: Option<MeasuredActs>,
}

impl CalibrationRow {
    /// `(predicted − measured) / measured`.
    pub fn error(&self) -> f64 {
        (self.predicted - self.measured) / self.measured
    }

    /// `(profiled − measured) / measured`.
    pub fn profiled_error(&self) -> f64 {
        (self.profiled - self.measured) / self.measured
    }
}

/// The calibration's result.
#[derive(Clone, Debug)]
pub struct CalibrationTable {
    /// The machine's figures.
    pub measured: Measured,
    /// Sequences per step.
    pub batch: usize,
    /// One row per strategy.
    pub rows: Vec<CalibrationRow>,
}

/// Measures this machine, then predicts and runs the char GPT with every strategy of `config`
/// (the one-process ones in alternating rounds, [`CalibrationConfig::rounds`]).
pub fn calibrate(config: &CalibrationConfig, compile: &CompileConfig) -> Result<CalibrationTable> {
    let measured = measure()?;
    let (launched, in_process): (Vec<_>, Vec<_>) =
        config.strategies.iter().copied().partition(|strategy| strategy.processes > 1);
    let mut running = Vec::new();
    for strategy in &in_process {
        let session = RunningSession::start(strategy, config.session_steps(), compile, None)?;
        running.push((session, Vec::new()));
    }
    for _ in 0..config.rounds.max(1) {
        for ((session, profiles), strategy) in running.iter_mut().zip(&in_process) {
            session.round()?;
            profiles.push(profile_kernels(session.session(), strategy.threads)?);
        }
    }
    let mut rows = Vec::new();
    for (strategy, (session, profiles)) in in_process.into_iter().zip(running) {
        let ran = session.finish()?;
        let fixed = empty_step(strategy.devices(), 1)?;
        let cluster = measured.cluster(strategy.devices());
        rows.push(predict_row(&strategy, &ran, &cluster, &measured, fixed, profiles)?);
    }
    for strategy in launched {
        rows.push(processes::calibrate(&strategy, config, compile, &measured)?);
    }
    // The table keeps the order of the strategies asked for.
    let position = |row: &CalibrationRow| config.strategies.iter().position(|s| *s == row.strategy);
    rows.sort_by_key(position);
    Ok(CalibrationTable { measured, batch: config.batch, rows })
}

/// Times every distinct kernel of `session`'s program, and the additions of its accumulated
/// gradients, on this machine now, with `threads` threads per kernel (20 ms per kernel and
/// cache state). Alone on one core: with every core busy at real-time priority (`chrt`), the
/// kernel's real-time throttling stopped them for 50 ms of every second, a whole kernel's
/// timing.
pub fn profile_kernels(session: &Session, threads: usize) -> Result<KernelProfile> {
    let (threads, budget) = (threads.max(1), Duration::from_millis(20));
    let program = session.program();
    let mut profile = KernelProfile::measure(program, threads, budget)?;
    profile.measure_sums(program, &session.actors().accumulated, threads, budget);
    Ok(profile)
}

/// Predicts the session that `ran` on `cluster` (roofline, and profiled kernels) and pairs the
/// predictions, plus the empty-step cost `fixed`, with its measured step. `profiles`: the
/// session's kernels timed after each of its rounds ([`profile_kernels`]; one is timed now
/// when there are none); the profiled prediction is the median of one per profile, so the
/// kernels are timed next to the steps they predict, and a slow spell of a shared host that
/// slows a round's steps slows the kernels timed after it too (a profile timed once, after
/// every round, priced DP2 at 28.7 ms against 37.7 measured in rounds that ran slow).
pub fn predict_row(
    strategy: &SessionStrategy,
    ran: &Ran,
    cluster: &Cluster,
    measured: &Measured,
    fixed: f64,
    mut profiles: Vec<KernelProfile>,
) -> Result<CalibrationRow> {
    let program = ran.session.program();
    let actors = actor_config(&ran.session);
    let roofline = predict_measured(program, &actors, cluster, None, false)?;
    if profiles.is_empty() {
        profiles.push(profile_kernels(&ran.session, strategy.threads)?);
    }
    let barrier = BarrierWait { spin: BARRIER_SPIN, wake: measured.wake_latency };
    let mut predictions = Vec::new();
    for profile in &profiles {
        let sharing = (measured.cores, barrier);
        predictions.push(predict_sharing_cores(program, &actors, cluster, profile, sharing)?);
    }
    let middle = median_index(&predictions, |(prediction, _)| prediction.step_seconds);
    let (profile, (profiled, slowdown)) = (&profiles[middle], predictions.swap_remove(middle));
    if std::env::var_os(KERNELS_VARIABLE).is_some() {
        let lowered = ran.session.actors();
        let costs = ActCosts::with_kernels(program, lowered, cluster, Some((profile, 1.0)));
        let roofline = ActCosts::new(program, lowered, cluster);
        let cache = cluster.device.cache_bytes;
        let (rank, lines) =
            kernel_table(program, lowered, (&costs, &roofline), profile, cache, &ran.actor_seconds);
        let span = ran.acts.map_or(0.0, |acts| acts.span);
        eprintln!(
            "{strategy}: step {:.3} ms, span of its acts {:.3} ms\n{}",
            ran.step * 1e3,
            span * 1e3,
            format_kernel_table(rank, &lines)
        );
    }
    Ok(CalibrationRow {
        strategy: *strategy,
        predicted: roofline.step_seconds + fixed,
        profiled: profiled.step_seconds + fixed,
        kernels: (profile.len(), profile.failed),
        fixed,
        measured: ran.step,
        link: (cluster.intra.latency, cluster.intra.bandwidth),
        slowdown,
        busiest_compute: profiled.breakdown.compute,
        acts: ran.acts,
    })
}

/// The index of the middle of `items` by `key` (the upper one of an even count, as
/// [`upper_median`](super::strategies::upper_median)); `items` is not empty.
fn median_index<T>(items: &[T], key: impl Fn(&T) -> f64) -> usize {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| key(&items[a]).total_cmp(&key(&items[b])));
    order[order.len() / 2]
}

/// The step of `program` with profiled kernels when its device threads share `cores` cores,
/// their collectives meeting as `barrier` says. With no more device threads than cores, the
/// simulated step; with more, the step of [`step_on_cores_waiting`] on [`Cores::bound`]: each
/// device thread bound to a core round-robin, as the session binds them
/// ([`crate::session::SessionConfig`]'s `bind_threads`); every act that computes or copies
/// holds its thread's core, and the ready acts of one core take it in turn (a rank waiting for
/// a collective partner that waits for a core waits too, polling a core away for the barrier's
/// spin, then sleeping). Returns the prediction and its ratio to the step with a core per
/// thread.
pub fn predict_sharing_cores(
    program: &Program,
    actors: &ActorConfig,
    cluster: &Cluster,
    profile: &KernelProfile,
    (cores, barrier): (usize, BarrierWait),
) -> Result<(Prediction, f64)> {
    let unshared = predict_measured(program, actors, cluster, Some((profile, 1.0)), false)?;
    if program.ranks.len() <= cores.max(1) {
        return Ok((unshared, 1.0));
    }
    let full = lower_to_actors(program, actors)?;
    let costs = ActCosts::with_kernels(program, &full, cluster, Some((profile, 1.0)));
    let (step, _) = step_on_cores_waiting(program, &full, &costs, Cores::bound(cores), barrier);
    let slowdown = step / unshared.step_seconds.max(1e-12);
    Ok((Prediction { step_seconds: step, ..unshared }, slowdown))
}

/// The environment variable that, when set, makes the calibration print each one-process
/// strategy's busiest rank's kernels per op, measured against priced ([`kernel_table`]), to
/// standard error.
pub const KERNELS_VARIABLE: &str = "MESHFLOW_CALIB_KERNELS";

/// Bytes per MiB.
const MIB: f64 = 1024.0 * 1024.0;

impl fmt::Display for CalibrationTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.measured;
        writeln!(
            f,
            "this machine ({} cores): GEMM {:.1} GFLOP/s, element-wise {:.2} GFLOP/s, copy {:.1} GB/s, \
             kernel {:.2} µs, all-reduce hop {:.1} µs, {:.2} GB/s, wake-up at a barrier {:.1} µs, \
             cache {:.1} MiB per core + {:.1} MiB shared",
            m.cores,
            m.gemm_flops / 1e9,
            m.vector_flops / 1e9,
            m.memory_bandwidth / 1e9,
            m.kernel_overhead * 1e6,
            m.hop_latency * 1e6,
            m.link_bandwidth / 1e9,
            m.wake_latency * 1e6,
            m.private_cache / MIB,
            m.shared_cache / MIB
        )?;
        writeln!(
            f,
            "| char GPT, batch {} (median of rounds' step medians) | measured ms | roofline ms | error | \
             profiled kernels ms | error | busiest rank's kernels ms | measured: kernels, boxing (waiting) ms | \
             of which empty step ms | kernels profiled (failed) | cores shared, slowdown | \
             link hop µs, GB/s |",
            self.batch
        )?;
        writeln!(
            f,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        )?;
        for row in &self.rows {
            writeln!(
                f,
                "| {} | {:.2} | {:.2} | {:+.1}% | {:.2} | {:+.1}% | {:.2} | {} | {:.2} | {} ({}) | \
                 ×{:.2} | {:.1}, {:.2} |",
                row.strategy,
                row.measured * 1e3,
                row.predicted * 1e3,
                row.error() * 100.0,
                row.profiled * 1e3,
                row.profiled_error() * 100.0,
                row.busiest_compute * 1e3,
                row.acts.map_or("-".into(), |acts| format!(
                    "{:.2}, {:.2} ({:.2})",
                    acts.compute * 1e3,
                    acts.communication * 1e3,
                    acts.waiting * 1e3
                )),
                row.fixed * 1e3,
                row.kernels.0,
                row.kernels.1,
                row.slowdown,
                row.link.0 * 1e6,
                row.link.1 / 1e9,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::median_index;

    #[test]
    fn the_median_round_is_the_middle_prediction_not_the_last() {
        let rounds = [(0, 31.0), (1, 27.5), (2, 29.0)];
        assert_eq!(median_index(&rounds, |r| r.1), 2);
        // An even count takes the upper middle, as the measured side's median does.
        let four = [40.0, 10.0, 30.0, 20.0];
        assert_eq!(four[median_index(&four, |x| *x)], 30.0);
        assert_eq!(median_index(&[5.0], |x| *x), 0);
    }
}
