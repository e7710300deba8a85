//! `meshflow bench train`: training-step time of the two reference models per strategy.
//!
//! - GPT: vocab 512, ctx 128, 4 layers, 4 heads, d 256, batch 8 ([`GPT_REFERENCE`]).
//! - MLP: 784-1024-1024-10, batch 256 ([`MLP_SIZES`], [`MLP_BATCH`]), `nn::Linear` layers
//!   (PyTorch's `[out, in]` weights), ReLU, cross-entropy.
//!
//! Both train with AdamW. A [`TrainRunner`] compiles one model on one [`SessionStrategy`] (the
//! strategies `meshflow plan --calibrate` runs: [`SessionStrategy::every`]) and runs steps on a
//! fixed batch; the criterion bench `benches/train.rs` and the harness time the same runner.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::compile::CompileConfig;
use crate::dist::Job;
use crate::nn::{Activation, Gpt, GptConfig, InitCounter, Layouts, Linear, Parallel, WeightInit};
use crate::ops::{DType, Tensor as HostTensor};
use crate::plan::acts::op_profile;
use crate::plan::strategies::{SessionStrategy, StrategySession, TrainingGraph};
use crate::session::{DeviceKind, SessionConfig};
use crate::{Graph, Result};

use super::arithmetic::{gpt_step_flops, median, mlp_step_flops};
use super::report::OpsProfile;

/// The GPT reference configuration (issue 7).
pub const GPT_REFERENCE: GptConfig =
    GptConfig { vocab: 512, ctx: 128, n_layer: 4, n_head: 4, d_model: 256 };
/// Sequences per GPT step.
pub const GPT_BATCH: usize = 8;
/// Layer widths of the reference MLP.
pub const MLP_SIZES: [usize; 4] = [784, 1024, 1024, 10];
/// Examples per MLP step.
pub const MLP_BATCH: usize = 256;

/// Which reference model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Model {
    /// [`GPT_REFERENCE`], batch [`GPT_BATCH`].
    Gpt,
    /// [`MLP_SIZES`], batch [`MLP_BATCH`].
    Mlp,
}

impl Model {
    /// Both models.
    pub const ALL: [Model; 2] = [Model::Gpt, Model::Mlp];

    /// `gpt` or `mlp`.
    pub fn name(self) -> &'static str {
        match self {
            Model::Gpt => "gpt",
            Model::Mlp => "mlp",
        }
    }

    /// Model FLOPs of one training step (PaLM count, see [`super::arithmetic`]).
    pub fn step_flops(self) -> f64 {
        match self {
            Model::Gpt => gpt_step_flops(&GPT_REFERENCE, GPT_BATCH, GPT_REFERENCE.ctx),
            Model::Mlp => mlp_step_flops(&MLP_SIZES, MLP_BATCH),
        }
    }

    /// Items one step processes: tokens for the GPT, samples for the MLP.
    pub fn items_per_step(self) -> usize {
        match self {
            Model::Gpt => GPT_BATCH * GPT_REFERENCE.ctx,
            Model::Mlp => MLP_BATCH,
        }
    }

    /// What [`Model::items_per_step`] counts.
    pub fn item_name(self) -> &'static str {
        match self {
            Model::Gpt => "tokens",
            Model::Mlp => "samples",
        }
    }
}

/// Where `bench train` runs its sessions (`--device`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum TrainDevice {
    /// CPU devices: threads with their kernel budget. The default.
    #[default]
    Cpu,
    /// GPUs: device rank `i` of the strategy on GPU `i` ([`DeviceKind::Cuda`]), PyTorch eager
    /// on GPU 0 as the reference.
    Cuda,
}

impl TrainDevice {
    /// `cpu` or `cuda`.
    pub fn name(self) -> &'static str {
        match self {
            TrainDevice::Cpu => "cpu",
            TrainDevice::Cuda => "cuda",
        }
    }

    /// Whether this is the default, [`TrainDevice::Cpu`] (reports leave it out).
    pub fn is_cpu(&self) -> bool {
        *self == TrainDevice::Cpu
    }

    /// The session's setting for this device.
    pub fn kind(self) -> DeviceKind {
        match self {
            TrainDevice::Cpu => DeviceKind::Cpu,
            TrainDevice::Cuda => DeviceKind::Cuda,
        }
    }
}

/// One model compiled on one strategy, with a fixed batch to step on.
pub struct TrainRunner {
    session: StrategySession,
    device: TrainDevice,
}

impl TrainRunner {
    /// Builds and compiles `model` on `strategy` ([`StrategySession`]: AdamW, lr 1e-3, weight
    /// decay 0.01) in this process, or on `job`'s devices when given.
    pub fn new(model: Model, strategy: SessionStrategy, job: Option<Arc<Job>>) -> Result<Self> {
        let config = strategy.session_config(&CompileConfig::default(), job);
        Self::with_config(model, strategy, config, TrainDevice::Cpu)
    }

    /// [`TrainRunner::new`] in this process on `device`: on [`TrainDevice::Cuda`] device rank
    /// `i` runs on GPU `i`, and a missing driver or GPU is the session's typed
    /// [`crate::ops::Error::Device`] naming it.
    pub fn on_device(model: Model, strategy: SessionStrategy, device: TrainDevice) -> Result<Self> {
        let config = SessionConfig {
            device: device.kind(),
            ..strategy.session_config(&CompileConfig::default(), None)
        };
        Self::with_config(model, strategy, config, device)
    }

    fn with_config(
        model: Model,
        strategy: SessionStrategy,
        config: SessionConfig,
        device: TrainDevice,
    ) -> Result<Self> {
        let build = |graph: &Graph, stages: &[Layouts]| match model {
            Model::Gpt => gpt_loss(graph, stages),
            Model::Mlp => mlp_loss(graph, stages),
        };
        let session = StrategySession::with_config(&strategy, build, config)?;
        Ok(TrainRunner { session, device })
    }

    /// One training step; returns the loss.
    pub fn step(&mut self) -> Result<f32> {
        self.session.step()
    }

    /// Where the session runs.
    pub fn device(&self) -> TrainDevice {
        self.device
    }
}

/// Steps a traced session of [`ops_profile`] runs before the ones it measures.
pub const OPS_WARMUP: usize = 3;

/// Where `model` on `strategy` (in this process, on `device`) spends a training step, per op:
/// a traced session runs [`OPS_WARMUP`] steps, then `steps` measured ones, and its busiest
/// rank's acts are summed per op ([`op_profile`]: medians over the measured steps). Tracing
/// records every act's start and end, so the session is a separate one from the timed figure;
/// its kernels run one after another, each split between the threads (no inter-op
/// parallelism), so the per-op times add up to more than the timed figure's step.
pub fn ops_profile(
    model: Model,
    strategy: SessionStrategy,
    device: TrainDevice,
    steps: usize,
) -> Result<OpsProfile> {
    // Each act runs its kernel to the end, so that a traced act times its kernel, not the
    // kernel's submission to the task graph ([`SessionConfig::inter_op`]).
    let config = SessionConfig {
        device: device.kind(),
        trace: true,
        inter_op: false,
        ..strategy.session_config(&CompileConfig::default(), None)
    };
    let mut runner = TrainRunner::with_config(model, strategy, config, device)?;
    let steps = steps.max(1);
    for _ in 0..OPS_WARMUP + steps {
        runner.step()?;
    }
    let session = &mut runner.session;
    let (_, medians) = session.traced(OPS_WARMUP + steps, OPS_WARMUP)?;
    let (program, lowered) = (session.session.program(), session.session.actors());
    let (rank, ops) = op_profile(program, lowered, &medians);
    Ok(OpsProfile { rank, steps, ops })
}

/// How long to time one figure.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Untimed steps first.
    pub warmup: usize,
    /// At least this many timed steps.
    pub min_steps: usize,
    /// And at least this long.
    pub seconds: f64,
}

/// Median and mean step time of `step` in seconds, and the steps timed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepTimes {
    /// Median seconds per step (of several rounds: the median of the rounds' medians).
    pub median: f64,
    /// Mean seconds per step.
    pub mean: f64,
    /// Timed steps.
    pub steps: usize,
    /// The median of each round, in order, when the figure was timed in rounds that alternate
    /// with its reference's (`meshflow bench --rounds`); empty for one round.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<f64>,
}

impl StepTimes {
    /// One figure of several rounds' figures: the median of their medians, the mean of all
    /// their steps, and each round's median (empty for a single round, which is returned as it
    /// is; `None` for none).
    pub fn merged(rounds: &[StepTimes]) -> Option<StepTimes> {
        match rounds {
            [] => None,
            [one] => Some(one.clone()),
            _ => {
                let medians: Vec<f64> = rounds.iter().map(|r| r.median).collect();
                let steps = rounds.iter().map(|r| r.steps).sum::<usize>();
                let total = rounds.iter().map(|r| r.mean * r.steps as f64).sum::<f64>();
                Some(StepTimes {
                    median: median(&medians),
                    mean: total / steps.max(1) as f64,
                    steps,
                    rounds: medians,
                })
            }
        }
    }
}

/// Times `step` under `timing`, calling `tick` after every timed step.
pub fn time_steps<E>(
    timing: Timing,
    mut step: impl FnMut() -> Result<(), E>,
    mut tick: impl FnMut(),
) -> Result<StepTimes, E> {
    for _ in 0..timing.warmup {
        step()?;
    }
    let mut samples = Vec::new();
    let started = Instant::now();
    let budget = Duration::from_secs_f64(timing.seconds.max(0.0));
    while samples.len() < timing.min_steps.max(1) || started.elapsed() < budget {
        let begin = Instant::now();
        step()?;
        samples.push(begin.elapsed().as_secs_f64());
        tick();
    }
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    Ok(StepTimes { median: median(&samples), mean, steps: samples.len(), rounds: Vec::new() })
}

fn gpt_loss(graph: &Graph, stages: &[Layouts]) -> Result<TrainingGraph> {
    let (batch, ctx, vocab) = (GPT_BATCH, GPT_REFERENCE.ctx, GPT_REFERENCE.vocab);
    let (first, last) = (&stages[0], &stages[stages.len() - 1]);
    let shape = [batch, ctx];
    let ids = graph.input("ids", shape, DType::I64, &first.placement, Some(first.batch()))?;
    let targets = graph.input("targets", shape, DType::I64, &last.placement, Some(last.batch()))?;
    let model = Gpt::pipelined(graph, GPT_REFERENCE, stages, WeightInit { std: 0.02, seed: 1 })?;
    let loss = model.loss(&ids, &targets)?;
    let tokens: Vec<i64> =
        (0..batch * (ctx + 1)).map(|k| ((k * 7919 + k / 13) % vocab) as i64).collect();
    let (x, y) = crate::data::inputs_and_targets(&tokens, batch, ctx);
    let feeds =
        vec![(ids, HostTensor::from_vec(x, shape)?), (targets, HostTensor::from_vec(y, shape)?)];
    Ok((loss, feeds))
}

/// Megatron layouts on the tensor axis: the first layer column-parallel, the second
/// row-parallel (one all-reduce), the classifier whole; layer `l` of `L` on stage `l·S/L` of
/// `S` (activations cross stages with `to_placement`).
fn mlp_loss(graph: &Graph, stages: &[Layouts]) -> Result<TrainingGraph> {
    let (first, last) = (&stages[0], &stages[stages.len() - 1]);
    let (fp, lp) = (&first.placement, &last.placement);
    let x = graph.input("x", [MLP_BATCH, MLP_SIZES[0]], DType::F32, fp, Some(first.batch()))?;
    let y = graph.input("y", [MLP_BATCH], DType::I64, lp, Some(last.batch()))?;
    let mut init = InitCounter::new(WeightInit { std: 0.02, seed: 2 });
    let parallel = [Parallel::Column, Parallel::Row, Parallel::None];
    let layers = MLP_SIZES.len() - 1;
    let mut h = x.clone();
    let mut on = 0;
    for (layer, pair) in MLP_SIZES.windows(2).enumerate() {
        let stage = layer * stages.len() / layers;
        let layouts = &stages[stage];
        if stage != on {
            h = h.to_placement(&layouts.placement, Some(layouts.batch()))?;
            on = stage;
        }
        let name = format!("fc{layer}");
        let shape = (pair[0], pair[1]);
        let linear = Linear::new(graph, &name, shape, true, parallel[layer], layouts, &mut init)?;
        h = if layer + 1 < layers {
            linear.forward_act(&h, Activation::Relu)?
        } else {
            linear.forward(&h)?
        };
    }
    let loss = h.cross_entropy(&y)?;
    let inputs = HostTensor::randn(vec![MLP_BATCH, MLP_SIZES[0]], 0.0, 1.0, DType::F32, 3)?;
    let classes = MLP_SIZES[MLP_SIZES.len() - 1];
    let labels: Vec<i64> = (0..MLP_BATCH).map(|i| ((i * 7) % classes) as i64).collect();
    let feeds = vec![(x, inputs), (y, HostTensor::from_vec(labels, [MLP_BATCH])?)];
    Ok((loss, feeds))
}
