//! The strategies that run on this machine ([`SessionStrategy`]: the calibration and `meshflow
//! bench train` run the same list), and the one place a strategy becomes a training session
//! ([`StrategySession`]): meshes of CPU devices in one process, pipelines in the 1F1B order,
//! ZeRO, gradient accumulation, and data parallelism across launched processes.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use meshflow_ops::ops::adamw::AdamW;
use meshflow_ops::{DType, Tensor as HostTensor};
use meshflow_placement::{DeviceType, Placement};

use super::acts::{actor_medians, measured_acts, MeasuredActs};
use super::model::ModelSpec;
use crate::compile::actors::{step_slots, ActorConfig};
use crate::compile::CompileConfig;
use crate::dist::Job;
use crate::nn::{Gpt, Layouts, WeightInit};
use crate::schedule::Schedule;
use crate::session::{Optimizer, Session, SessionConfig, Training};
use crate::{Error, Graph, Result, Tensor};

/// What kind of parallelism a calibrated strategy stands for (the list of strategies
/// that run here; [`StrategyKind::ALL`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StrategyKind {
    /// One device.
    OneDevice,
    /// Data parallel.
    Data,
    /// Tensor parallel (Megatron MLP and attention splits).
    Tensor,
    /// Data × tensor parallel on a 2-D mesh.
    DataTensor,
    /// Pipeline stages over micro-batches (1F1B).
    Pipeline,
    /// Data parallel with the optimizer state sharded over the data axis (ZeRO).
    Zero,
    /// Data parallel with gradients accumulated over micro-batches.
    GradientAccumulation,
    /// Data-parallel pipeline stages.
    DataPipeline,
    /// Data parallel across launched processes (QUIC on loopback).
    Processes,
}

impl StrategyKind {
    /// Every kind.
    pub const ALL: [StrategyKind; 9] = [
        StrategyKind::OneDevice,
        StrategyKind::Data,
        StrategyKind::Tensor,
        StrategyKind::DataTensor,
        StrategyKind::Pipeline,
        StrategyKind::Zero,
        StrategyKind::GradientAccumulation,
        StrategyKind::DataPipeline,
        StrategyKind::Processes,
    ];
}

/// One strategy that runs on this machine, for `meshflow plan --calibrate` and `meshflow bench
/// train` alike: `pp` stages of `[dp, tp]` meshes of CPU devices (mesh axes of size 1 left
/// out), over `micro_batches` pieces, optionally with ZeRO, in one process or one device per
/// launched process. [`SessionStrategy::every`] is the one list both run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SessionStrategy {
    /// Data-parallel size.
    pub dp: usize,
    /// Tensor-parallel size (Megatron column/row splits).
    pub tp: usize,
    /// Pipeline stages.
    #[serde(default = "one")]
    pub pp: usize,
    /// Micro-batches per step.
    #[serde(default = "one")]
    pub micro_batches: usize,
    /// Optimizer state sharded over the data axis (ZeRO).
    #[serde(default)]
    pub zero: bool,
    /// Processes the devices live in (one device each when more than one), under
    /// `meshflow launch`, talking QUIC on loopback.
    #[serde(default = "one")]
    pub processes: usize,
    /// Kernel threads per device.
    #[serde(default = "one")]
    pub threads: usize,
}

fn one() -> usize {
    1
}

impl SessionStrategy {
    /// A `[dp, tp]` mesh in one process, one micro-batch, one kernel thread per device.
    pub const fn mesh(dp: usize, tp: usize) -> Self {
        SessionStrategy { dp, tp, pp: 1, micro_batches: 1, zero: false, processes: 1, threads: 1 }
    }

    /// One device with `threads` kernel threads.
    pub const fn single(threads: usize) -> Self {
        SessionStrategy { threads, ..Self::mesh(1, 1) }
    }

    /// `pp` stages of `dp` devices over `micro_batches` pieces.
    pub const fn pipeline(dp: usize, pp: usize, micro_batches: usize) -> Self {
        SessionStrategy { pp, micro_batches, ..Self::mesh(dp, 1) }
    }

    /// The list: one of every [`StrategyKind`], one kernel thread per device.
    pub fn every() -> Vec<Self> {
        vec![
            Self::mesh(1, 1),
            Self::mesh(2, 1),
            Self::mesh(1, 2),
            Self::mesh(2, 2),
            Self::pipeline(1, 2, 4),
            SessionStrategy { zero: true, ..Self::mesh(2, 1) },
            SessionStrategy { micro_batches: 2, ..Self::mesh(2, 1) },
            Self::pipeline(2, 2, 4),
            SessionStrategy { processes: 2, ..Self::mesh(2, 1) },
        ]
    }

    /// Devices in all.
    pub fn devices(&self) -> usize {
        self.dp * self.tp * self.pp
    }

    /// The kind of parallelism it stands for.
    pub fn kind(&self) -> StrategyKind {
        match *self {
            SessionStrategy { processes, .. } if processes > 1 => StrategyKind::Processes,
            SessionStrategy { pp, dp, .. } if pp > 1 && dp > 1 => StrategyKind::DataPipeline,
            SessionStrategy { pp, .. } if pp > 1 => StrategyKind::Pipeline,
            SessionStrategy { zero: true, .. } => StrategyKind::Zero,
            SessionStrategy { micro_batches, .. } if micro_batches > 1 => {
                StrategyKind::GradientAccumulation
            }
            SessionStrategy { dp, tp, .. } if dp > 1 && tp > 1 => StrategyKind::DataTensor,
            SessionStrategy { tp, .. } if tp > 1 => StrategyKind::Tensor,
            SessionStrategy { dp, .. } if dp > 1 => StrategyKind::Data,
            _ => StrategyKind::OneDevice,
        }
    }

    /// A short label: `1dev×2thr`, `DP2`, `TP2`, `DP2×TP2`, `PP2×4mb`, `DP2+ZeRO`, `DP2×2mb`,
    /// `DP2×PP2×4mb`, `DP2/2proc`.
    pub fn label(&self) -> String {
        let mut label = match (self.dp, self.tp) {
            (1, 1) if self.pp == 1 => format!("1dev×{}thr", self.threads),
            (1, 1) => String::new(),
            (dp, 1) => format!("DP{dp}"),
            (1, tp) => format!("TP{tp}"),
            (dp, tp) => format!("DP{dp}×TP{tp}"),
        };
        if self.pp > 1 {
            let separator = if label.is_empty() { "" } else { "×" };
            label += &format!("{separator}PP{}", self.pp);
        }
        if self.micro_batches > 1 {
            label += &format!("×{}mb", self.micro_batches);
        }
        if self.zero {
            label += "+ZeRO";
        }
        if self.processes > 1 {
            label += &format!("/{}proc", self.processes);
        }
        label
    }

    /// The layouts of each pipeline stage: stage `s` on ranks `s·dp·tp ..`, a `[dp, tp]` mesh
    /// with the batch split over the data axis and Megatron splits over the tensor axis; an
    /// axis of size 1 is left out (one device is a line of 1 with neither).
    pub fn stages(&self) -> Result<Vec<Layouts>> {
        let stage_devices = self.dp * self.tp;
        let (hierarchy, data_axis, tensor_axis) = match (self.dp > 1, self.tp > 1) {
            (true, true) => (vec![self.dp, self.tp], Some(0), Some(1)),
            (true, false) => (vec![self.dp], Some(0), None),
            (false, true) => (vec![self.tp], None, Some(0)),
            (false, false) => (vec![1], None, None),
        };
        (0..self.pp.max(1))
            .map(|s| {
                let ranks = (s * stage_devices..(s + 1) * stage_devices).collect();
                let placement = Placement::new(DeviceType::Cpu, hierarchy.clone(), ranks)?;
                Ok(Layouts { placement, data_axis, tensor_axis })
            })
            .collect()
    }

    /// The session configuration of this strategy (on `job`'s devices when given).
    pub fn session_config(&self, compile: &CompileConfig, job: Option<Arc<Job>>) -> SessionConfig {
        SessionConfig {
            devices: self.devices(),
            threads_per_device: self.threads.max(1),
            compile: compile.clone(),
            micro_batches: self.micro_batches.max(1),
            zero_axis: self.zero.then_some(0),
            job,
            ..SessionConfig::default()
        }
    }
}

impl fmt::Display for SessionStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dp{} × tp{}", self.dp, self.tp)?;
        if self.pp > 1 {
            write!(f, " × pp{}", self.pp)?;
        }
        if self.micro_batches > 1 {
            write!(f, ", {} micro-batches", self.micro_batches)?;
        }
        if self.zero {
            f.write_str(", ZeRO")?;
        }
        if self.processes > 1 {
            write!(f, ", {} processes (QUIC)", self.processes)?;
        }
        if self.threads > 1 {
            write!(f, ", {} threads per device", self.threads)?;
        }
        Ok(())
    }
}

/// A model's training graph on a strategy's stages: its loss and the values fed every step.
pub type TrainingGraph = (Tensor, Vec<(Tensor, HostTensor)>);

/// A training session of one model on one [`SessionStrategy`], with a fixed batch to step on:
/// the one place a strategy becomes a session (the calibration and `bench train` build theirs
/// here).
pub struct StrategySession {
    /// The session.
    pub session: Session,
    feeds: Vec<(Tensor, HostTensor)>,
}

impl StrategySession {
    /// Builds the model with `build` on `strategy`'s stages (it returns the loss and the
    /// feeds), trains it with AdamW (lr 1e-3, weight decay 0.01) and compiles the session (on
    /// `job`'s devices when given); with `trace`, the driver records every act
    /// ([`StrategySession::acts`]).
    pub fn new(
        strategy: &SessionStrategy,
        build: impl FnOnce(&Graph, &[Layouts]) -> Result<TrainingGraph>,
        compile: &CompileConfig,
        job: Option<Arc<Job>>,
        trace: bool,
    ) -> Result<Self> {
        let config = SessionConfig { trace, ..strategy.session_config(compile, job) };
        Self::with_config(strategy, build, config)
    }

    /// [`StrategySession::new`] with the session configuration given whole, e.g. on GPUs:
    /// `SessionConfig { device: DeviceKind::Cuda, ..strategy.session_config(..) }`.
    pub fn with_config(
        strategy: &SessionStrategy,
        build: impl FnOnce(&Graph, &[Layouts]) -> Result<TrainingGraph>,
        config: SessionConfig,
    ) -> Result<Self> {
        let graph = Graph::new();
        let (loss, feeds) = build(&graph, &strategy.stages()?)?;
        let optimizer = Optimizer::AdamW(AdamW { weight_decay: 0.01, ..AdamW::new(1e-3) });
        let training = Training::new(&loss, optimizer, Schedule::Constant);
        let session = Session::new(&graph, &[&loss], Some(training), config)?;
        Ok(StrategySession { session, feeds })
    }

    /// One training step on the fixed batch; returns the loss (NaN if none came back).
    pub fn step(&mut self) -> Result<f32> {
        let feeds: Vec<(&Tensor, HostTensor)> =
            self.feeds.iter().map(|(tensor, value)| (tensor, value.clone())).collect();
        let out = self.session.step(&feeds)?;
        let loss = out.first().map(|t| t.to_vec::<f32>()).transpose()?;
        Ok(loss.and_then(|v| v.first().copied()).unwrap_or(f32::NAN))
    }

    /// Stops the session's driver and cuts its trace into steps: what the busiest rank's acts
    /// took in the steps from `first` on, of `steps` run ([`measured_acts`]; `None` without a
    /// trace).
    pub fn acts(&mut self, steps: usize, first: usize) -> Result<Option<MeasuredActs>> {
        Ok(self.traced(steps, first)?.0)
    }

    /// Like [`StrategySession::acts`], with each actor's median act ([`actor_medians`]).
    pub fn traced(
        &mut self,
        steps: usize,
        first: usize,
    ) -> Result<(Option<MeasuredActs>, Vec<Option<f64>>)> {
        let report = self.session.stop()?;
        let (program, lowered) = (self.session.program(), self.session.actors());
        let acts = measured_acts(&report.trace, program, lowered, steps, first);
        let medians = actor_medians(&report.trace, lowered.plan.actors.len(), steps, first);
        Ok((acts, medians))
    }
}

/// The char GPT ([`ModelSpec::CHAR`]) on `stages`, `batch` sequences: ids on the first stage,
/// targets on the last.
pub fn char_gpt(graph: &Graph, stages: &[Layouts], batch: usize) -> Result<TrainingGraph> {
    let model = ModelSpec::CHAR.config;
    let (first, last) = (&stages[0], &stages[stages.len() - 1]);
    let shape = [batch, model.ctx];
    let ids = graph.input("ids", shape, DType::I64, &first.placement, Some(first.batch()))?;
    let targets = graph.input("targets", shape, DType::I64, &last.placement, Some(last.batch()))?;
    let gpt = Gpt::pipelined(graph, model, stages, WeightInit { std: 0.02, seed: 1 })?;
    let loss = gpt.loss(&ids, &targets)?;
    let tokens: Vec<i64> =
        (0..batch * model.ctx).map(|k| ((k * 7 + k / 13) % model.vocab) as i64).collect();
    let feed = HostTensor::from_vec(tokens, shape)?;
    Ok((loss, vec![(ids, feed.clone()), (targets, feed)]))
}

/// A session of the char GPT that ran, and its median step.
pub struct Ran {
    /// The session (its program and actor plan; its driver stopped).
    pub session: Session,
    /// Median measured step, seconds.
    pub step: f64,
    /// What the busiest rank's acts of this process took in the measured steps (from the
    /// driver's trace); `None` when nothing was traced.
    pub acts: Option<MeasuredActs>,
    /// Per actor of the session's plan, its median act in the measured steps (seconds).
    pub actor_seconds: Vec<Option<f64>>,
}

/// How long a calibration session runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Steps {
    /// Measured steps.
    pub measured: usize,
    /// Unmeasured steps first.
    pub warmup: usize,
    /// Sequences per step.
    pub batch: usize,
}

/// Builds the char GPT's training session of `strategy` (on `job`'s devices when given) and
/// runs it for `steps`.
pub fn run_session(
    strategy: &SessionStrategy,
    steps: Steps,
    compile: &CompileConfig,
    job: Option<Arc<Job>>,
) -> Result<Ran> {
    let mut running = RunningSession::start(strategy, steps, compile, job)?;
    running.round()?;
    running.finish()
}

/// A calibration session between its start and its [`Ran`]: it can run several rounds of
/// measured steps, taking turns with other sessions (`meshflow plan --calibrate`'s rounds).
pub struct RunningSession {
    run: StrategySession,
    steps: Steps,
    /// The median step of each round so far.
    rounds: Vec<f64>,
}

impl RunningSession {
    /// Compiles the char GPT on `strategy` (on `job`'s devices when given) and runs its
    /// unmeasured steps.
    pub fn start(
        strategy: &SessionStrategy,
        steps: Steps,
        compile: &CompileConfig,
        job: Option<Arc<Job>>,
    ) -> Result<Self> {
        let build = |graph: &Graph, stages: &[Layouts]| char_gpt(graph, stages, steps.batch);
        let mut run = StrategySession::new(strategy, build, compile, job, true)?;
        for _ in 0..steps.warmup {
            run.step()?;
        }
        Ok(RunningSession { run, steps, rounds: Vec::new() })
    }

    /// The running session (its program and actor plan).
    pub fn session(&self) -> &Session {
        &self.run.session
    }

    /// One round of `steps.measured` timed steps; returns their median.
    pub fn round(&mut self) -> Result<f64> {
        let mut times = Vec::new();
        for _ in 0..self.steps.measured.max(1) {
            let started = Instant::now();
            self.run.step()?;
            times.push(started.elapsed().as_secs_f64());
        }
        let median = upper_median(&times);
        self.rounds.push(median);
        Ok(median)
    }

    /// Stops the session: its step is the median of its rounds' medians (a spell of a shared
    /// host that slowed one round is outvoted by the others), its acts those of every measured
    /// step.
    pub fn finish(mut self) -> Result<Ran> {
        if self.rounds.is_empty() {
            return Err(Error::Runtime(
                "calibration session stopped before any measured round".into(),
            ));
        }
        let step = upper_median(&self.rounds);
        let measured = self.rounds.len() * self.steps.measured.max(1);
        let warmup = self.steps.warmup;
        let (acts, actor_seconds) = self.run.traced(warmup + measured, warmup)?;
        Ok(Ran { session: self.run.session, step, acts, actor_seconds })
    }
}

/// The middle of `values` (the upper one of an even count), which the calibration's step
/// figures have always used; `values` is not empty.
pub(crate) fn upper_median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// The actor configuration the planner simulates a session with: the session's own pieces,
/// piece order, end of the forward and accumulated values, with joins (the simulator's
/// collectives wait for their whole group).
pub fn actor_config(session: &Session) -> ActorConfig {
    let (program, lowered) = (session.program(), session.actors());
    // The value whose producing slot the forward's last step writes.
    let forward = lowered.forward_end.and_then(|step| {
        step_slots(&program.steps[step]).1.into_iter().find_map(|slot| {
            let value = program.slot(slot).value;
            (program.produced.get(value.0 as usize) == Some(&slot)).then_some(value)
        })
    });
    let accumulate = lowered
        .accumulated
        .iter()
        .enumerate()
        .filter(|(_, summed)| **summed)
        .map(|(slot, _)| program.slots[slot].value)
        .collect();
    ActorConfig {
        pieces: lowered.pieces,
        order: lowered.order,
        forward,
        accumulate,
        ..ActorConfig::default()
    }
}
