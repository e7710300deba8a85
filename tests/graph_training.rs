//! Training features of the graph: activation checkpointing (the backward recomputes a block's
//! forward: same losses and gradients, less memory) and dropout (masks that depend on the step
//! and the logical position only, so every layout and micro-batching draws the same masks).

use meshflow::compile::{compile, CompileConfig, Request};
use meshflow::graph::Source;
use meshflow::nn::{Gpt, GptConfig, Layouts, WeightInit};
use meshflow::ops::ops::adamw::AdamW;
use meshflow::ops::{DType, Tensor as HostTensor};
use meshflow::placement::{DeviceType, Placement};
use meshflow::plan::memory::memory;
use meshflow::schedule::Schedule;
use meshflow::session::{Optimizer, Session, SessionConfig, Training};
use meshflow::{Graph, Tensor};

mod common;
use common::{assert_close, token_batch, PATTERN};

const CONFIG: GptConfig = GptConfig { vocab: 16, ctx: 8, n_layer: 3, n_head: 2, d_model: 16 };
const BATCH: usize = 8;

/// How a GPT is built and laid out.
#[derive(Clone, Copy)]
struct Model {
    config: GptConfig,
    batch: usize,
    /// Devices (1: one device), data parallel unless `tensor_parallel` (4 tensor-parallel
    /// devices: DP2 × TP2 on a 2-D mesh).
    devices: usize,
    tensor_parallel: bool,
    micro_batches: usize,
    checkpointing: bool,
    /// Dropout probability (0: none) and seed.
    dropout: f64,
    dropout_seed: u64,
    lr: f64,
}

impl Model {
    const fn small() -> Self {
        Model {
            config: CONFIG,
            batch: BATCH,
            devices: 1,
            tensor_parallel: false,
            micro_batches: 1,
            checkpointing: false,
            dropout: 0.0,
            dropout_seed: 5,
            lr: 1e-2,
        }
    }

    /// The graph, the two inputs and the loss.
    fn build(&self) -> (Graph, Tensor, Tensor, Tensor) {
        let layouts = if self.devices == 4 && self.tensor_parallel {
            // DP2 × TP2 on a 2-D mesh: a shard is localized once per mesh axis.
            let placement = Placement::grid(DeviceType::Cpu, &[2, 2]).unwrap();
            Layouts { placement, data_axis: Some(0), tensor_axis: Some(1) }
        } else {
            let placement = Placement::line(DeviceType::Cpu, self.devices).unwrap();
            let (split, tensor) = (self.devices > 1, self.tensor_parallel);
            let (data_axis, tensor_axis) = ((split && !tensor).then_some(0), tensor.then_some(0));
            Layouts { placement, data_axis, tensor_axis }
        };
        let g = Graph::new();
        let (shape, batch) = ([self.batch, self.config.ctx], Some(layouts.batch()));
        let ids = g.input("ids", shape, DType::I64, &layouts.placement, batch.clone()).unwrap();
        let targets = g.input("targets", shape, DType::I64, &layouts.placement, batch).unwrap();
        let init = WeightInit { std: 0.02, seed: 11 };
        let model = Gpt::new(&g, self.config, &layouts, init).unwrap();
        let model = model.with_activation_checkpointing(self.checkpointing);
        let model = model.with_dropout(self.dropout, self.dropout_seed);
        let loss = model.loss(&ids, &targets).unwrap();
        (g, ids, targets, loss)
    }

    fn session(&self) -> (Session, Tensor, Tensor) {
        let (g, ids, targets, loss) = self.build();
        let optimizer = Optimizer::AdamW(AdamW { weight_decay: 0.1, ..AdamW::new(self.lr) });
        let training = Training::new(&loss, optimizer, Schedule::Constant);
        let config = SessionConfig {
            devices: self.devices,
            micro_batches: self.micro_batches,
            ..SessionConfig::default()
        };
        (Session::new(&g, &[&loss], Some(training), config).unwrap(), ids, targets)
    }
}

/// Token ids and targets of step `step` (the same batch every step when `step` is fixed).
fn batch(model: &Model, step: usize) -> (HostTensor, HostTensor) {
    token_batch(model.batch, model.config.ctx, model.config.vocab, step, PATTERN)
}

/// Losses of `steps` training steps (the batch of step `k`, or of step 0 every time when
/// `same_batch`) and the variables after them.
fn train(model: Model, steps: usize, same_batch: bool) -> (Vec<f32>, Vec<(String, HostTensor)>) {
    let (mut session, ids, targets) = model.session();
    let losses = (0..steps)
        .map(|step| {
            let (x, y) = batch(&model, if same_batch { 0 } else { step });
            session.step(&[(&ids, x), (&targets, y)]).unwrap()[0].to_vec::<f32>().unwrap()[0]
        })
        .collect();
    (losses, session.variables().unwrap())
}

fn parameters(g: &Graph) -> Vec<Tensor> {
    let data = g.data();
    let is_parameter =
        |v: &&meshflow::graph::ValueInfo| matches!(v.source, Source::Parameter { .. });
    let count = data.values.len();
    (0..count)
        .filter(|&i| is_parameter(&&data.values[i]))
        .map(|i| Tensor::from_value(g, meshflow::ops::Value(i as u32)))
        .collect()
}

/// The loss and the gradient of every parameter, fetched from one run of `model`'s graph with
/// its backward, and the activation peak (bytes) of that program on rank 0.
fn loss_and_gradients(model: Model) -> (Vec<Vec<f32>>, u64) {
    let (g, ids, targets, loss) = model.build();
    let params = parameters(&g);
    let refs: Vec<&Tensor> = params.iter().collect();
    let grads: Vec<Tensor> = g.gradients(&loss, &refs).unwrap().into_iter().flatten().collect();
    assert_eq!(grads.len(), params.len(), "every parameter reaches the loss");
    let mut fetches = vec![&loss];
    fetches.extend(grads.iter());
    let config = SessionConfig { devices: model.devices, ..SessionConfig::default() };
    let mut session = Session::new(&g, &fetches, None, config).unwrap();
    let peak = memory(session.program(), &[], &[])[0].activations_peak;
    let (x, y) = batch(&model, 0);
    let out = session.step(&[(&ids, x), (&targets, y)]).unwrap();
    (out.iter().map(|t| t.to_vec::<f32>().unwrap()).collect(), peak)
}

/// The activation peak (bytes, rank 0) of `model`'s loss and gradients, compiled only.
fn planned_peak(model: Model) -> u64 {
    let (g, _, _, loss) = model.build();
    let params = parameters(&g);
    let refs: Vec<&Tensor> = params.iter().collect();
    let grads = g.gradients(&loss, &refs).unwrap();
    let mut requests = vec![Request { value: loss.value(), layout: None }];
    requests.extend(grads.iter().flatten().map(|t| Request { value: t.value(), layout: None }));
    let program = compile(&g.snapshot(), &requests, &CompileConfig::default()).unwrap();
    memory(&program, &[], &[])[0].activations_peak
}

#[test]
fn checkpointing_gives_the_same_gradients_with_a_smaller_activation_peak() {
    let plain = Model::small();
    let recomputed = Model { checkpointing: true, ..plain };
    let (expected, plain_peak) = loss_and_gradients(plain);
    let (got, recomputed_peak) = loss_and_gradients(recomputed);
    assert_eq!(expected.len(), got.len());
    for (k, (a, b)) in expected.iter().zip(&got).enumerate() {
        assert_close(a, b, 1e-6, &format!("fetch {k} (0: loss, then gradients)"));
    }
    assert!(
        recomputed_peak < plain_peak,
        "checkpointing must lower the activation peak: {recomputed_peak} vs {plain_peak} bytes"
    );
}

#[test]
fn checkpointing_trains_to_the_same_losses_and_weights() {
    let plain = Model::small();
    for (what, other) in [
        ("1 device", Model { checkpointing: true, ..plain }),
        (
            "dp2, 2 micro-batches",
            Model { checkpointing: true, devices: 2, micro_batches: 2, ..plain },
        ),
    ] {
        let base = Model { devices: other.devices, micro_batches: other.micro_batches, ..plain };
        let (losses, variables) = train(base, 3, false);
        let (got_losses, got_variables) = train(other, 3, false);
        assert_close(&losses, &got_losses, 1e-6, what);
        assert_eq!(variables.len(), got_variables.len());
        for ((name, a), (other_name, b)) in variables.iter().zip(&got_variables) {
            assert_eq!(name, other_name);
            let (a, b) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
            assert_close(&a, &b, 1e-6, &format!("{what}: {name}"));
        }
    }
}

#[test]
fn checkpointing_lowers_the_peak_of_the_reference_gpt() {
    let config = GptConfig { vocab: 512, ctx: 128, n_layer: 4, n_head: 4, d_model: 256 };
    let plain = Model { config, batch: 8, ..Model::small() };
    let kept = planned_peak(plain);
    let recomputed = planned_peak(Model { checkpointing: true, ..plain });
    eprintln!(
        "reference GPT (batch 8), loss + gradients, activation peak on one device: \
         {:.1} MiB without checkpointing, {:.1} MiB with ({:.2}x)",
        kept as f64 / (1 << 20) as f64,
        recomputed as f64 / (1 << 20) as f64,
        recomputed as f64 / kept as f64
    );
    assert!(recomputed * 10 < kept * 8, "less than 80% of the peak: {recomputed} vs {kept}");
}

#[test]
fn dropout_draws_the_same_masks_on_every_layout_and_micro_batching() {
    let one = Model { dropout: 0.3, ..Model::small() };
    let (expected, _) = train(one, 3, false);
    let (without, _) = train(Model::small(), 3, false);
    let (reseeded, _) = train(Model { dropout_seed: 6, ..one }, 3, false);
    for (what, other) in [("no dropout", without), ("other masks", reseeded)] {
        assert!(
            (expected[2] - other[2]).abs() > 1e-3,
            "{what} must change the losses well beyond the tolerance: {expected:?} vs {other:?}"
        );
    }
    for (what, other) in [
        ("dp2", Model { devices: 2, ..one }),
        ("tp2", Model { devices: 2, tensor_parallel: true, ..one }),
        ("2 micro-batches", Model { micro_batches: 2, ..one }),
        ("dp2, 2 micro-batches", Model { devices: 2, micro_batches: 2, ..one }),
        ("dp2 × tp2", Model { devices: 4, tensor_parallel: true, ..one }),
        (
            "dp2 × tp2, 2 micro-batches",
            Model { devices: 4, tensor_parallel: true, micro_batches: 2, ..one },
        ),
        ("checkpointing", Model { checkpointing: true, ..one }),
    ] {
        assert_close(&expected, &train(other, 3, false).0, 2e-4, what);
    }
}

#[test]
fn dropout_masks_change_with_the_step() {
    // lr 0: the weights never change, the batch is the same: only the masks can differ.
    let frozen = Model { dropout: 0.3, lr: 0.0, ..Model::small() };
    let (losses, variables) = train(frozen, 3, true);
    for (a, b) in [(0, 1), (1, 2), (0, 2)] {
        assert_ne!(losses[a], losses[b], "steps {a} and {b}: {losses:?}");
    }
    let (still, _) = train(Model { dropout: 0.0, ..frozen }, 2, true);
    assert_eq!(still[0], still[1], "without dropout a frozen model repeats its loss");
    let counter = variables.iter().find(|(name, _)| name == "rng.step.0").expect("a step counter");
    assert_eq!(counter.1.to_vec::<f64>().unwrap(), [3.0], "three steps were counted");
}
