//! `meshflow bench train`: training-step time of the two reference models per strategy.
//!
//! - GPT: vocab 512, ctx 128, 4 layers, 4 heads, d 256, batch 8 ([`GPT_REFERENCE`]).
//! - MLP: 784-1024-1024-10, batch 256 ([`MLP_SIZES`], [`MLP_BATCH`]), `nn::Linear` layers
//!   (PyTorch's `[out, in]` weights), ReLU, cross-entropy.
//!
//! Both train with AdamW. A [`TrainRunner`] compiles one model on one [`Strategy`] and runs steps
//! on a fixed batch; the criterion bench `benches/train.rs` and the harness time the same runner.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::nn::{Gpt, GptConfig, InitCounter, Layouts, Linear, Parallel, WeightInit};
use crate::ops::ops::adamw::AdamW;
use crate::ops::{DType, Tensor as HostTensor};
use crate::placement::{DeviceType, Placement};
use crate::schedule::Schedule;
use crate::session::{Optimizer, Session, SessionConfig, Training};
use crate::{Graph, Result, Tensor};

use super::arithmetic::{gpt_step_flops, median, mlp_step_flops};

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

/// A mesh of CPU devices `[dp, tp]`: data parallel on axis 0, tensor parallel on axis 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Strategy {
    /// Data-parallel size.
    pub dp: usize,
    /// Tensor-parallel size (Megatron column/row splits).
    pub tp: usize,
    /// Kernel threads per device.
    pub threads: usize,
}

impl Strategy {
    /// One device with `threads` kernel threads.
    pub fn single(threads: usize) -> Self {
        Strategy { dp: 1, tp: 1, threads }
    }

    /// The strategies that run on this machine's CPU devices, one kernel thread per device
    /// (the single device gets `threads`): 1 device, DP2, TP2, DP2×TP2.
    pub fn defaults(threads: usize) -> Vec<Strategy> {
        vec![
            Strategy::single(threads),
            Strategy { dp: 2, tp: 1, threads: 1 },
            Strategy { dp: 1, tp: 2, threads: 1 },
            Strategy { dp: 2, tp: 2, threads: 1 },
        ]
    }

    /// Devices of the mesh.
    pub fn devices(&self) -> usize {
        self.dp * self.tp
    }

    /// A short label: `1dev×2thr`, `DP2`, `TP2`, `DP2×TP2`.
    pub fn label(&self) -> String {
        match (self.dp, self.tp) {
            (1, 1) => format!("1dev×{}thr", self.threads),
            (dp, 1) => format!("DP{dp}"),
            (1, tp) => format!("TP{tp}"),
            (dp, tp) => format!("DP{dp}×TP{tp}"),
        }
    }

    fn layouts(&self) -> Result<Layouts> {
        if self.devices() == 1 {
            return Ok(Layouts::single(Placement::line(DeviceType::Cpu, 1)?));
        }
        let placement = Placement::grid(DeviceType::Cpu, &[self.dp, self.tp])?;
        Ok(Layouts { placement, data_axis: Some(0), tensor_axis: Some(1) })
    }
}

/// One model compiled on one strategy, with a fixed batch to step on.
pub struct TrainRunner {
    session: Session,
    feeds: Vec<(Tensor, HostTensor)>,
}

impl TrainRunner {
    /// Builds and compiles `model` on `strategy` (AdamW, lr 1e-3, weight decay 0.01).
    pub fn new(model: Model, strategy: Strategy) -> Result<Self> {
        let layouts = strategy.layouts()?;
        let graph = Graph::new();
        let (loss, feeds) = match model {
            Model::Gpt => gpt_loss(&graph, &layouts)?,
            Model::Mlp => mlp_loss(&graph, &layouts)?,
        };
        let optimizer = Optimizer::AdamW(AdamW { weight_decay: 0.01, ..AdamW::new(1e-3) });
        let training = Training::new(&loss, optimizer, Schedule::Constant);
        let config = SessionConfig {
            devices: strategy.devices(),
            threads_per_device: strategy.threads,
            ..SessionConfig::default()
        };
        let session = Session::new(&graph, &[&loss], Some(training), config)?;
        Ok(TrainRunner { session, feeds })
    }

    /// One training step; returns the loss.
    pub fn step(&mut self) -> Result<f32> {
        let feeds: Vec<(&Tensor, HostTensor)> =
            self.feeds.iter().map(|(t, v)| (t, v.clone())).collect();
        let out = self.session.step(&feeds)?;
        let loss = out.first().map(|t| t.to_vec::<f32>()).transpose()?;
        Ok(loss.and_then(|v| v.first().copied()).unwrap_or(f32::NAN))
    }
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
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepTimes {
    /// Median seconds per step.
    pub median: f64,
    /// Mean seconds per step.
    pub mean: f64,
    /// Timed steps.
    pub steps: usize,
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
    Ok(StepTimes { median: median(&samples), mean, steps: samples.len() })
}

fn gpt_loss(graph: &Graph, layouts: &Layouts) -> Result<(Tensor, Vec<(Tensor, HostTensor)>)> {
    let (batch, ctx, vocab) = (GPT_BATCH, GPT_REFERENCE.ctx, GPT_REFERENCE.vocab);
    let p = &layouts.placement;
    let ids = graph.input("ids", [batch, ctx], DType::I64, p, Some(layouts.batch()))?;
    let targets = graph.input("targets", [batch, ctx], DType::I64, p, Some(layouts.batch()))?;
    let model = Gpt::new(graph, GPT_REFERENCE, layouts, WeightInit { std: 0.02, seed: 1 })?;
    let loss = model.loss(&ids, &targets)?;
    let tokens: Vec<i64> =
        (0..batch * (ctx + 1)).map(|k| ((k * 7919 + k / 13) % vocab) as i64).collect();
    let (x, y) = crate::data::inputs_and_targets(&tokens, batch, ctx);
    let feeds = vec![
        (ids, HostTensor::from_vec(x, [batch, ctx])?),
        (targets, HostTensor::from_vec(y, [batch, ctx])?),
    ];
    Ok((loss, feeds))
}

/// Megatron layouts on the tensor axis: the first layer column-parallel, the second
/// row-parallel (one all-reduce), the classifier whole.
fn mlp_loss(graph: &Graph, layouts: &Layouts) -> Result<(Tensor, Vec<(Tensor, HostTensor)>)> {
    let p = &layouts.placement;
    let x = graph.input("x", [MLP_BATCH, MLP_SIZES[0]], DType::F32, p, Some(layouts.batch()))?;
    let y = graph.input("y", [MLP_BATCH], DType::I64, p, Some(layouts.batch()))?;
    let mut init = InitCounter::new(WeightInit { std: 0.02, seed: 2 });
    let parallel = [Parallel::Column, Parallel::Row, Parallel::None];
    let mut h = x.clone();
    for (layer, pair) in MLP_SIZES.windows(2).enumerate() {
        let name = format!("fc{layer}");
        let linear = Linear::new(
            graph,
            &name,
            (pair[0], pair[1]),
            true,
            parallel[layer],
            layouts,
            &mut init,
        )?;
        h = linear.forward(&h)?;
        if layer + 2 < MLP_SIZES.len() {
            h = h.relu()?;
        }
    }
    let loss = h.cross_entropy(&y)?;
    let inputs = HostTensor::randn(vec![MLP_BATCH, MLP_SIZES[0]], 0.0, 1.0, DType::F32, 3)?;
    let classes = MLP_SIZES[MLP_SIZES.len() - 1];
    let labels: Vec<i64> = (0..MLP_BATCH).map(|i| ((i * 7) % classes) as i64).collect();
    let feeds = vec![(x, inputs), (y, HostTensor::from_vec(labels, [MLP_BATCH])?)];
    Ok((loss, feeds))
}
