//! The strategies the calibration runs on this machine, and the char GPT's training session for
//! each: meshes of CPU devices in one process, pipelines in the 1F1B order, ZeRO, gradient
//! accumulation, and data parallelism across launched processes.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use meshflow_ops::ops::adamw::AdamW;
use meshflow_ops::{DType, Tensor as HostTensor};
use meshflow_placement::{DeviceType, Placement};

use super::model::ModelSpec;
use crate::compile::actors::{step_slots, ActorConfig};
use crate::compile::CompileConfig;
use crate::dist::Job;
use crate::nn::{Gpt, Layouts, WeightInit};
use crate::schedule::Schedule;
use crate::session::{Optimizer, Session, SessionConfig, Training};
use crate::{Graph, Result};

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

/// One strategy the calibration predicts and runs: the char GPT on `pp` stages of `[dp, tp]`
/// meshes of CPU devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalibrationStrategy {
    /// Data-parallel size.
    pub dp: usize,
    /// Tensor-parallel size.
    pub tp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Micro-batches per step.
    pub micro_batches: usize,
    /// Optimizer state sharded over the data axis (ZeRO).
    pub zero: bool,
    /// Processes the devices live in (one device each when more than one), under
    /// `meshflow launch`, talking QUIC on loopback.
    pub processes: usize,
}

impl CalibrationStrategy {
    /// A `[dp, tp]` mesh in one process, one micro-batch.
    pub const fn mesh(dp: usize, tp: usize) -> Self {
        CalibrationStrategy { dp, tp, pp: 1, micro_batches: 1, zero: false, processes: 1 }
    }

    /// `pp` stages of `dp` devices over `micro_batches` pieces.
    pub const fn pipeline(dp: usize, pp: usize, micro_batches: usize) -> Self {
        CalibrationStrategy { pp, micro_batches, ..Self::mesh(dp, 1) }
    }

    /// The default list: one of every [`StrategyKind`].
    pub fn every() -> Vec<Self> {
        vec![
            Self::mesh(1, 1),
            Self::mesh(2, 1),
            Self::mesh(1, 2),
            Self::mesh(2, 2),
            Self::pipeline(1, 2, 4),
            CalibrationStrategy { zero: true, ..Self::mesh(2, 1) },
            CalibrationStrategy { micro_batches: 2, ..Self::mesh(2, 1) },
            Self::pipeline(2, 2, 4),
            CalibrationStrategy { processes: 2, ..Self::mesh(2, 1) },
        ]
    }

    /// Devices in all.
    pub fn devices(&self) -> usize {
        self.dp * self.tp * self.pp
    }

    /// The kind of parallelism it stands for.
    pub fn kind(&self) -> StrategyKind {
        match *self {
            CalibrationStrategy { processes, .. } if processes > 1 => StrategyKind::Processes,
            CalibrationStrategy { pp, dp, .. } if pp > 1 && dp > 1 => StrategyKind::DataPipeline,
            CalibrationStrategy { pp, .. } if pp > 1 => StrategyKind::Pipeline,
            CalibrationStrategy { zero: true, .. } => StrategyKind::Zero,
            CalibrationStrategy { micro_batches, .. } if micro_batches > 1 => {
                StrategyKind::GradientAccumulation
            }
            CalibrationStrategy { dp, tp, .. } if dp > 1 && tp > 1 => StrategyKind::DataTensor,
            CalibrationStrategy { tp, .. } if tp > 1 => StrategyKind::Tensor,
            CalibrationStrategy { dp, .. } if dp > 1 => StrategyKind::Data,
            _ => StrategyKind::OneDevice,
        }
    }
}

impl fmt::Display for CalibrationStrategy {
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
        Ok(())
    }
}

/// A session of the char GPT that ran, and its median step.
pub struct Ran {
    /// The session (its program and actor plan).
    pub session: Session,
    /// Median measured step, seconds.
    pub step: f64,
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
    strategy: &CalibrationStrategy,
    steps: Steps,
    compile: &CompileConfig,
    job: Option<Arc<Job>>,
) -> Result<Ran> {
    let model = ModelSpec::CHAR.config;
    let stage_devices = strategy.dp * strategy.tp;
    let stages = (0..strategy.pp.max(1))
        .map(|s| {
            let ranks = (s * stage_devices..(s + 1) * stage_devices).collect();
            let placement = Placement::new(DeviceType::Cpu, vec![strategy.dp, strategy.tp], ranks)?;
            Ok(Layouts { placement, data_axis: Some(0), tensor_axis: Some(1) })
        })
        .collect::<Result<Vec<_>>>()?;
    let (first, last) = (&stages[0], &stages[stages.len() - 1]);
    let graph = Graph::new();
    let shape = [steps.batch, model.ctx];
    let ids = graph.input("ids", shape, DType::I64, &first.placement, Some(first.batch()))?;
    let targets = graph.input("targets", shape, DType::I64, &last.placement, Some(last.batch()))?;
    let gpt = Gpt::pipelined(&graph, model, &stages, WeightInit { std: 0.02, seed: 1 })?;
    let loss = gpt.loss(&ids, &targets)?;
    let optimizer = Optimizer::AdamW(AdamW::new(1e-3));
    let training = Training::new(&loss, optimizer, Schedule::Constant);
    let config = SessionConfig {
        devices: strategy.devices(),
        compile: compile.clone(),
        micro_batches: strategy.micro_batches.max(1),
        zero_axis: strategy.zero.then_some(0),
        job,
        ..SessionConfig::default()
    };
    let mut session = Session::new(&graph, &[&loss], Some(training), config)?;
    let tokens: Vec<i64> =
        (0..steps.batch * model.ctx).map(|k| ((k * 7 + k / 13) % model.vocab) as i64).collect();
    let feed = HostTensor::from_vec(tokens, shape)?;
    let mut step = || session.step(&[(&ids, feed.clone()), (&targets, feed.clone())]);
    for _ in 0..steps.warmup {
        step()?;
    }
    let mut times = Vec::new();
    for _ in 0..steps.measured.max(1) {
        let started = Instant::now();
        step()?;
        times.push(started.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(Ran { session, step: times[times.len() / 2] })
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
