//! The GPT of `meshflow::nn` trains to the same losses (2e-4) for 20 steps from the same initial
//! weights on one device and in data, tensor, pipeline (micro-batches) and hybrid layouts, with
//! ZeRO-sharded optimizer state, and with global-norm clipping; tensor-parallel attention
//! computes each device's own heads, fused or composed (masked softmax, dropout).

use meshflow::nn::{Gpt, GptConfig, Layouts, WeightInit};
use meshflow::ops::ops::adamw::AdamW;
use meshflow::ops::ops::sgd::Sgd;
use meshflow::ops::DType;
use meshflow::placement::{DeviceType, NdSbp, Placement, Sbp};
use meshflow::schedule::Schedule;
use meshflow::session::{Optimizer, Session, SessionConfig, Training};
use meshflow::{Graph, Tensor};

mod common;
use common::{token_batch, PATTERN};

const CONFIG: GptConfig = GptConfig { vocab: 16, ctx: 8, n_layer: 2, n_head: 4, d_model: 16 };
const BATCH: usize = 8;
const STEPS: usize = 20;

/// One stage of a run: its mesh and which of its axes are data and tensor parallel.
#[derive(Clone, Copy)]
struct Stage {
    hierarchy: &'static [usize],
    data_axis: Option<usize>,
    tensor_axis: Option<usize>,
}

/// How a run is laid out and trained.
#[derive(Clone, Copy)]
struct Run {
    stages: &'static [Stage],
    micro_batches: usize,
    zero_axis: Option<usize>,
    clip: Option<f64>,
    /// Matrix products in this dtype (bf16 mixed precision), f32 otherwise.
    compute: DType,
    /// SGD with momentum instead of AdamW (whose steps hardly change when gradients are scaled).
    sgd: bool,
    /// Attention through the fused op (else products, a masked softmax and permutations).
    fused: bool,
    /// Dropout probability (0: none).
    dropout: f64,
    /// Kernel threads per device.
    threads: usize,
    /// With several threads: kernels as a task graph (`SessionConfig::inter_op`).
    inter_op: bool,
}

const fn mesh(hierarchy: &'static [usize], data: Option<usize>, tensor: Option<usize>) -> Stage {
    Stage { hierarchy, data_axis: data, tensor_axis: tensor }
}

const ONE: &[Stage] = &[mesh(&[1], None, None)];
const DP4: &[Stage] = &[mesh(&[4], Some(0), None)];
const TP4: &[Stage] = &[mesh(&[4], None, Some(0))];
const DP2_TP2: &[Stage] = &[mesh(&[2, 2], Some(0), Some(1))];
const PP2: &[Stage] = &[mesh(&[1], None, None), mesh(&[1], None, None)];
const DP2_PP2: &[Stage] = &[mesh(&[2], Some(0), None), mesh(&[2], Some(0), None)];

impl Run {
    const fn on(stages: &'static [Stage]) -> Self {
        Run {
            stages,
            micro_batches: 1,
            zero_axis: None,
            clip: None,
            compute: DType::F32,
            sgd: false,
            fused: true,
            dropout: 0.0,
            threads: 1,
            inter_op: true,
        }
    }
}

/// A training session of `run` and its two inputs.
fn session(run: Run) -> (Session, Tensor, Tensor) {
    let mut next_rank = 0;
    let stages: Vec<Layouts> = run
        .stages
        .iter()
        .map(|stage| {
            let size: usize = stage.hierarchy.iter().product();
            let ranks = (next_rank..next_rank + size).collect();
            next_rank += size;
            let placement = Placement::new(DeviceType::Cpu, stage.hierarchy.to_vec(), ranks);
            let placement = placement.unwrap();
            Layouts { placement, data_axis: stage.data_axis, tensor_axis: stage.tensor_axis }
        })
        .collect();
    let (first, last) = (&stages[0], &stages[stages.len() - 1]);
    let g = Graph::new();
    let t = CONFIG.ctx;
    let batch = |l: &Layouts| Some(l.batch());
    let ids = g.input("ids", [BATCH, t], DType::I64, &first.placement, batch(first)).unwrap();
    let targets = g.input("targets", [BATCH, t], DType::I64, &last.placement, batch(last));
    let targets = targets.unwrap();
    let init = WeightInit { std: 0.02, seed: 7 };
    let model = Gpt::pipelined(&g, CONFIG, &stages, init).unwrap().with_compute_dtype(run.compute);
    let model = model.with_fused_attention(run.fused).with_dropout(run.dropout, 3);
    let loss = model.loss(&ids, &targets).unwrap();
    let optimizer = if run.sgd {
        Optimizer::Sgd(Sgd { momentum: 0.9, ..Sgd::new(0.5) })
    } else {
        Optimizer::AdamW(AdamW { weight_decay: 0.1, ..AdamW::new(1e-2) })
    };
    let mut training = Training::new(&loss, optimizer, Schedule::Constant);
    if let Some(max_norm) = run.clip {
        training = training.clip_grad_norm(max_norm);
    }
    let config = SessionConfig {
        devices: next_rank,
        micro_batches: run.micro_batches,
        zero_axis: run.zero_axis,
        threads_per_device: run.threads,
        inter_op: run.inter_op,
        ..SessionConfig::default()
    };
    (Session::new(&g, &[&loss], Some(training), config).unwrap(), ids, targets)
}

fn losses(run: Run, steps: usize) -> Vec<f32> {
    let (mut session, ids, targets) = session(run);
    (0..steps)
        .map(|step| {
            let (x, y) = token_batch(BATCH, CONFIG.ctx, CONFIG.vocab, step, PATTERN);
            session.step(&[(&ids, x), (&targets, y)]).unwrap()[0].to_vec::<f32>().unwrap()[0]
        })
        .collect()
}

/// The losses of two runs agree within 2e-4 at every step.
fn assert_close(a: &[f32], b: &[f32], what: &str) {
    common::assert_close(a, b, 2e-4, what);
}

#[test]
fn gpt_strategies_agree_for_twenty_steps() {
    let one = losses(Run::on(ONE), STEPS);
    assert!(one[STEPS - 1] < one[0] - 0.3, "loss did not fall: {one:?}");
    let two = |run: Run| Run { threads: 2, ..run };
    let runs: [(&str, Run); 12] = [
        ("one device, 2 threads, kernels in flight", two(Run::on(ONE))),
        (
            "one device, 2 threads, one kernel at a time",
            Run { inter_op: false, ..two(Run::on(ONE)) },
        ),
        ("dp2 x tp2, 2 threads each, kernels in flight", two(Run::on(DP2_TP2))),
        ("pp2, 4 micro-batches, 2 threads each", Run { micro_batches: 4, ..two(Run::on(PP2)) }),
        ("dp4", Run::on(DP4)),
        ("tp4", Run::on(TP4)),
        ("dp2 x tp2", Run::on(DP2_TP2)),
        ("4 micro-batches", Run { micro_batches: 4, ..Run::on(ONE) }),
        ("pp2, 4 micro-batches", Run { micro_batches: 4, ..Run::on(PP2) }),
        ("dp2 x pp2, 2 micro-batches", Run { micro_batches: 2, ..Run::on(DP2_PP2) }),
        ("dp4 zero", Run { zero_axis: Some(0), ..Run::on(DP4) }),
        ("dp2 x tp2 zero", Run { zero_axis: Some(0), ..Run::on(DP2_TP2) }),
    ];
    for (what, run) in runs {
        assert_close(&one, &losses(run, STEPS), what);
    }
}

#[test]
fn clipping_agrees_across_layouts_and_changes_the_trajectory() {
    const STEPS: usize = 8;
    let sgd = |stages| Run { sgd: true, ..Run::on(stages) };
    let clip = |stages, micro_batches| Run { clip: Some(0.05), micro_batches, ..sgd(stages) };
    let clipped = losses(clip(ONE, 1), STEPS);
    let free = losses(sgd(ONE), STEPS);
    assert!(
        clipped.iter().zip(&free).skip(1).all(|(c, f)| (c - f).abs() > 1e-3),
        "clipping at 0.05 should change every step after the first: {clipped:?} vs {free:?}"
    );
    let loose = losses(Run { clip: Some(1e6), ..sgd(ONE) }, STEPS);
    assert_close(&free, &loose, "a clip far above the norm changes nothing");
    assert_close(&clipped, &losses(clip(DP2_TP2, 1), STEPS), "dp2xtp2");
    assert_close(&clipped, &losses(clip(PP2, 2), STEPS), "pp2 clipped");
}

#[test]
fn zero_splits_the_optimizer_state_over_the_data_axis() {
    let layout_of = |session: &Session, name: &str| {
        let program = session.program();
        let index = program.graph.values.iter().position(|v| v.name.as_deref() == Some(name));
        let index = index.unwrap_or_else(|| panic!("no value {name}"));
        program.slot(program.produced[index]).layout.nd_sbp.to_string()
    };
    let (plain, _, _) = session(Run::on(DP2_TP2));
    let (zero, _, _) = session(Run { zero_axis: Some(0), ..Run::on(DP2_TP2) });
    // c_fc is column-parallel (weight split on axis 0 over the tensor axis): ZeRO nests the
    // data-axis split inside; ln weights are replicated: ZeRO splits them over the data axis.
    for (name, before, after) in [
        ("h.0.mlp.c_fc.weight.exp_avg", "(B, S(0))", "(S(0), S(0))"),
        ("h.0.ln_1.weight.exp_avg_sq", "(B, B)", "(S(0), B)"),
        ("h.0.ln_1.weight", "(B, B)", "(B, B)"),
    ] {
        assert_eq!(layout_of(&plain, name), before, "{name} without ZeRO");
        assert_eq!(layout_of(&zero, name), after, "{name} with ZeRO");
    }
}

#[test]
fn bf16_mixed_precision_tracks_f32_and_agrees_across_layouts() {
    const STEPS: usize = 8;
    let bf16 = |stages| Run { compute: DType::BF16, ..Run::on(stages) };
    let mixed = losses(bf16(ONE), STEPS);
    let full = losses(Run::on(ONE), STEPS);
    assert!(mixed.iter().zip(&full).any(|(m, f)| m != f), "bf16 products must round: {mixed:?}");
    for (step, (m, f)) in mixed.iter().zip(&full).enumerate() {
        assert!((m - f).abs() < 2e-2, "step {step}: bf16 {m} vs f32 {f}");
    }
    assert!(mixed[STEPS - 1] < mixed[0] - 0.1, "bf16 loss did not fall: {mixed:?}");
    let (session, _, _) = session(bf16(DP2_TP2));
    let variables = session.variables().unwrap();
    assert!(variables.iter().all(|(_, t)| t.dtype() == DType::F32), "master weights stay f32");
    for (step, (a, b)) in mixed.iter().zip(&losses(bf16(DP2_TP2), STEPS)).enumerate() {
        assert!((a - b).abs() < 5e-3, "dp2 x tp2 bf16 step {step}: {a} vs {b}");
    }
}

/// The chosen nd-SBP of the first input and the first output of every op named `op`.
fn chosen(session: &Session, op: &str) -> Vec<(NdSbp, NdSbp)> {
    let prefix = format!("{op}#");
    let ops = &session.program().selection.ops;
    let ops = ops.iter().filter(|choice| choice.name.starts_with(&prefix));
    ops.map(|choice| (choice.signature.inputs[0].clone(), choice.signature.outputs[0].clone()))
        .collect()
}

#[test]
fn tensor_parallel_attention_computes_each_devices_own_heads() {
    let (s, b) = (Sbp::Split, Sbp::Broadcast);
    // qkv [B, T, 3, H, D] split on its heads (axis 3) on the tensor axis, y [B, T, H, D] on
    // axis 2; with a data axis, both split on the batch there too.
    for (stages, qkv, y) in
        [(TP4, vec![s(3)], vec![s(2)]), (DP2_TP2, vec![s(0), s(3)], vec![s(0), s(2)])]
    {
        let (session, _, _) = session(Run::on(stages));
        let (qkv, y) = (NdSbp(qkv), NdSbp(y));
        let forward = chosen(&session, "causal_attention");
        assert_eq!(forward.len(), CONFIG.n_layer);
        assert!(forward.iter().all(|c| *c == (qkv.clone(), y.clone())), "{forward:?}");
        let backward = chosen(&session, "causal_attention_grad");
        assert_eq!(backward.len(), CONFIG.n_layer);
        assert!(backward.iter().all(|(input, output)| *input == qkv && *output == qkv));
    }
    // The composed attention: scores [B, H, T, T] split on the heads (axis 1).
    let (composed, _, _) = session(Run { fused: false, ..Run::on(TP4) });
    let softmax = chosen(&composed, "softmax");
    assert_eq!(softmax.len(), CONFIG.n_layer);
    assert!(softmax.iter().all(|c| *c == (NdSbp(vec![s(1)]), NdSbp(vec![s(1)]))), "{softmax:?}");
    // c_attn stays whole (the layout of the weights file); c_proj is row-parallel.
    let (hybrid, _, _) = session(Run::on(DP2_TP2));
    let program = hybrid.program();
    for (name, layout) in
        [("h.0.attn.c_attn.weight", [b, b]), ("h.1.attn.c_proj.weight", [b, s(1)])]
    {
        let index = program.graph.values.iter().position(|v| v.name.as_deref() == Some(name));
        let slot = program.produced[index.unwrap_or_else(|| panic!("no value {name}"))];
        assert_eq!(program.slot(slot).layout.nd_sbp, NdSbp(layout.to_vec()), "{name}");
    }
}

#[test]
fn composed_attention_is_tensor_parallel_too() {
    const STEPS: usize = 6;
    let composed = |stages| Run { fused: false, ..Run::on(stages) };
    let one = losses(composed(ONE), STEPS);
    assert_close(&one, &losses(Run::on(ONE), STEPS), "composed vs fused");
    assert_close(&one, &losses(composed(TP4), STEPS), "composed tp4");
    let dropout = |stages| Run { dropout: 0.1, ..Run::on(stages) };
    let dropped = losses(dropout(ONE), STEPS);
    assert!(dropped.iter().zip(&one).any(|(a, b)| (a - b).abs() > 1e-3), "dropout changes losses");
    assert_close(&dropped, &losses(dropout(DP2_TP2), STEPS), "dropout dp2 x tp2");
}

#[test]
fn heads_that_the_tensor_axis_does_not_divide_are_a_build_error() {
    let placement = Placement::new(DeviceType::Cpu, vec![4], (0..4).collect()).unwrap();
    let layouts = Layouts { placement, data_axis: None, tensor_axis: Some(0) };
    let config = GptConfig { n_head: 2, d_model: 8, ..CONFIG };
    let Err(error) = Gpt::new(&Graph::new(), config, &layouts, WeightInit { std: 0.02, seed: 1 })
    else {
        panic!("2 heads on 4 tensor-parallel devices must be refused");
    };
    let message = error.to_string();
    for part in ["causal_attention", "2 heads", "4 devices", "tensor axis 0"] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
}
