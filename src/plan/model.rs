//! The models the planner knows by name and the parallel strategies it lays them out with, built
//! into a training program (forward, backward, AdamW) without allocating any weight.

use std::fmt;
use std::str::FromStr;

use meshflow_ops::ops::adamw::{adamw, AdamW};
use meshflow_ops::{DType, Value};
use meshflow_placement::{DeviceType, Layout, NdSbp, Placement};

use crate::compile::actors::ActorConfig;
use crate::compile::{compile, CompileConfig, Program, Request};
use crate::graph::{Init, Source};
use crate::nn::{Gpt, GptConfig, Layouts, WeightInit};
use crate::{Error, Graph, Result, Tensor};

/// A GPT by name: `char` (the character GPT of `examples/gpt.rs`), `gpt2` (124M) or `1.3b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    /// Its name.
    pub name: &'static str,
    /// Its shape.
    pub config: GptConfig,
}

impl ModelSpec {
    /// The character GPT of `examples/gpt.rs` (vocabulary of its Genesis corpus, context 64,
    /// 4 layers of width 128, 4 heads).
    pub const CHAR: ModelSpec = ModelSpec {
        name: "char",
        config: GptConfig { vocab: 60, ctx: 64, n_layer: 4, n_head: 4, d_model: 128 },
    };
    /// GPT-2 small: 12 layers, width 768, 12 heads, context 1024, vocabulary 50257.
    pub const GPT2: ModelSpec = ModelSpec {
        name: "gpt2",
        config: GptConfig { vocab: 50257, ctx: 1024, n_layer: 12, n_head: 12, d_model: 768 },
    };
    /// A 1.3B GPT (GPT-3 XL shape): 24 layers, width 2048, 16 heads, context 1024.
    pub const GPT_1_3B: ModelSpec = ModelSpec {
        name: "1.3b",
        config: GptConfig { vocab: 50257, ctx: 1024, n_layer: 24, n_head: 16, d_model: 2048 },
    };

    /// Training FLOPs per token, PaLM-style: `6·N + 12·L·d·T` (N parameters without the
    /// position table, attention over the whole context).
    pub fn flops_per_token(&self) -> f64 {
        let c = &self.config;
        let parameters = (c.parameters() - c.ctx * c.d_model) as f64;
        6.0 * parameters + 12.0 * (c.n_layer * c.d_model * c.ctx) as f64
    }
}

impl FromStr for ModelSpec {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().as_str() {
            "char" => Ok(ModelSpec::CHAR),
            "gpt2" | "124m" => Ok(ModelSpec::GPT2),
            "1.3b" | "gpt-1.3b" => Ok(ModelSpec::GPT_1_3B),
            _ => Err(Error::Graph(format!("unknown model {text:?} (known: char, gpt2, 1.3b)"))),
        }
    }
}

/// How a model is laid out over the devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Megatron layouts on `pp` pipeline stages, each a `[dp, tp]` mesh of its own devices
    /// (batch split over axis 0, MLP weights over axis 1; blocks spread evenly over the stages).
    Mesh {
        /// Data-parallel size.
        dp: usize,
        /// Tensor-parallel size.
        tp: usize,
        /// Pipeline stages.
        pp: usize,
    },
    /// Nothing fixed on a flat mesh of `devices`: signature selection chooses every layout.
    Auto {
        /// Devices.
        devices: usize,
    },
}

impl Strategy {
    /// Devices used.
    pub fn devices(&self) -> usize {
        match *self {
            Strategy::Mesh { dp, tp, pp } => dp * tp * pp,
            Strategy::Auto { devices } => devices,
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Strategy::Mesh { dp, tp, pp } => {
                let axes = [("dp", dp), ("tp", tp), ("pp", pp)];
                let named: Vec<String> = axes
                    .iter()
                    .filter(|(_, size)| **size > 1)
                    .map(|(name, size)| format!("{name}{size}"))
                    .collect();
                if named.is_empty() {
                    f.write_str("dp1")
                } else {
                    f.write_str(&named.join("x"))
                }
            }
            Strategy::Auto { devices } => write!(f, "auto{devices}"),
        }
    }
}

/// What to build: model, strategy, sequences per step and micro-batches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Workload {
    /// The model.
    pub model: ModelSpec,
    /// The layout.
    pub strategy: Strategy,
    /// Sequences per step (global batch).
    pub batch: usize,
    /// Micro-batches per step (the batch is split into this many pieces).
    pub pieces: u32,
    /// Device type of the placement.
    pub device: DeviceType,
}

/// A training program and what the planner needs to know about its values.
#[derive(Clone, Debug)]
pub struct Built {
    /// The compiled program of one micro-batch (forward, backward, AdamW).
    pub program: Program,
    /// How to lower it to actors (pieces, gradients to accumulate, variable updates).
    pub actors: ActorConfig,
    /// Model parameters.
    pub parameters: Vec<Value>,
    /// Optimizer state (AdamW moments).
    pub states: Vec<Value>,
    /// Tokens per step (all pieces).
    pub tokens: usize,
}

/// Builds and compiles the training program of `workload` (see [`Built`]).
pub fn build(workload: &Workload, config: &CompileConfig) -> Result<Built> {
    let pieces = workload.pieces.max(1) as usize;
    if !workload.batch.is_multiple_of(pieces) {
        return Err(Error::Graph(format!(
            "batch {} is not a multiple of {pieces} micro-batches",
            workload.batch
        )));
    }
    let micro = workload.batch / pieces;
    let model = workload.model.config;
    let (stages, auto) = match workload.strategy {
        Strategy::Mesh { dp, tp, pp } => {
            let stage = |s: usize| -> Result<Layouts> {
                let ranks = (s * dp * tp..(s + 1) * dp * tp).collect();
                let placement = Placement::new(workload.device, vec![dp, tp], ranks)?;
                Ok(Layouts { placement, data_axis: Some(0), tensor_axis: Some(1) })
            };
            ((0..pp.max(1)).map(stage).collect::<Result<Vec<_>>>()?, false)
        }
        Strategy::Auto { devices } => {
            let placement = Placement::line(workload.device, devices)?;
            (vec![Layouts::single(placement)], true)
        }
    };
    let (first, last) = (&stages[0], &stages[stages.len() - 1]);
    let graph = Graph::new();
    let shape = [micro, model.ctx];
    let ids = graph.input("ids", shape, DType::I64, &first.placement, Some(first.batch()))?;
    let targets = graph.input("targets", shape, DType::I64, &last.placement, Some(last.batch()))?;
    let gpt = Gpt::pipelined(&graph, model, &stages, WeightInit { std: 0.02, seed: 1 })?;
    let loss = gpt.loss(&ids, &targets)?;
    let training = append_adamw(&graph, &loss)?;
    let mut data = graph.snapshot();
    if auto {
        for info in &mut data.values {
            if matches!(info.source, Source::Input | Source::Parameter { .. }) {
                info.sbp = None;
            }
        }
    }
    let mut requests = vec![Request { value: loss.value(), layout: None }];
    for &(_, new_value, ref layout) in &training.assigns {
        let layout = if auto { None } else { Some(layout.clone()) };
        requests.push(Request { value: new_value, layout });
    }
    let program = compile(&data, &requests, config)?;
    let updates = training
        .assigns
        .iter()
        .zip(&program.requested[1..])
        .map(|(&(variable, _, _), &slot)| (variable, slot))
        .collect();
    let actors = ActorConfig {
        pieces: workload.pieces.max(1),
        updates,
        accumulate: training.gradients,
        forward: Some(loss.value()),
        ..ActorConfig::default()
    };
    Ok(Built {
        program,
        actors,
        parameters: training.parameters,
        states: training.states,
        tokens: workload.batch * model.ctx,
    })
}

/// The backward and AdamW updates appended to a graph, as the session appends them.
struct Appended {
    parameters: Vec<Value>,
    gradients: Vec<Value>,
    states: Vec<Value>,
    /// (variable, its new value, its layout).
    assigns: Vec<(Value, Value, Layout)>,
}

fn append_adamw(graph: &Graph, loss: &Tensor) -> Result<Appended> {
    let parameters: Vec<Tensor> = {
        let data = graph.data();
        let values = data.values.iter().enumerate();
        values
            .filter(|(_, v)| matches!(v.source, Source::Parameter { .. }))
            .map(|(i, _)| Tensor::from_value(graph, Value(i as u32)))
            .collect()
    };
    let refs: Vec<&Tensor> = parameters.iter().collect();
    let gradients = graph.gradients(loss, &refs)?;
    let mut appended = Appended {
        parameters: Vec::new(),
        gradients: Vec::new(),
        states: Vec::new(),
        assigns: Vec::new(),
    };
    for (parameter, gradient) in parameters.iter().zip(gradients) {
        let Some(gradient) = gradient else { continue };
        let name = graph.data().label(parameter.value());
        let placement = parameter.placement();
        let sbp = parameter.sbp().unwrap_or_else(|| NdSbp::broadcast(placement.mesh_axes()));
        let layout = Layout::new(placement.clone(), sbp.clone());
        let state = |suffix: &str| {
            let name = format!("{name}.{suffix}");
            graph.parameter_init(
                &name,
                parameter.meta(),
                Init::ZEROS,
                &placement,
                Some(sbp.clone()),
            )
        };
        let (m, v) = (state("exp_avg")?, state("exp_avg_sq")?);
        let values = [parameter.value(), gradient.value(), m.value(), v.value()];
        let outputs = graph.with_emit(|e| adamw(e, AdamW::new(1e-3), values))?;
        appended.parameters.push(parameter.value());
        appended.gradients.push(gradient.value());
        appended.states.extend([m.value(), v.value()]);
        appended.assigns.push((parameter.value(), outputs[0], layout.clone()));
        appended.assigns.push((m.value(), outputs[1], layout.clone()));
        appended.assigns.push((v.value(), outputs[2], layout));
    }
    Ok(appended)
}
