//! A two-layer MLP trained with AdamW gives the same losses on one device, data parallel,
//! tensor parallel (Megatron column- then row-parallel) and hybrid meshes: only placement and SBP
//! annotations change.

use meshflow::ops::ops::adamw::AdamW;
use meshflow::ops::{DType, Tensor as HostTensor};
use meshflow::placement::{DeviceType, NdSbp, Placement, Sbp};
use meshflow::schedule::Schedule;
use meshflow::session::{Optimizer, Session, SessionConfig, Training};
use meshflow::Graph;

const BATCH: usize = 8;
const INPUT: usize = 12;
const HIDDEN: usize = 16;
const CLASSES: usize = 5;

/// SBPs of (x, w1, b1, w2, b2) on one mesh axis.
struct Layouts {
    x: Sbp,
    w1: Sbp,
    b1: Sbp,
    w2: Sbp,
    b2: Sbp,
}

const DP: Layouts = Layouts {
    x: Sbp::Split(0),
    w1: Sbp::Broadcast,
    b1: Sbp::Broadcast,
    w2: Sbp::Broadcast,
    b2: Sbp::Broadcast,
};
const TP: Layouts = Layouts {
    x: Sbp::Broadcast,
    w1: Sbp::Split(1),
    b1: Sbp::Split(0),
    w2: Sbp::Split(0),
    b2: Sbp::Broadcast,
};

fn train(hierarchy: &[usize], layouts: &[&Layouts], steps: usize) -> (Vec<f32>, Session) {
    train_on(hierarchy, layouts, steps, true)
}

/// Trains for `steps`; with `fresh` each step draws a new batch, else every step sees the first.
fn train_on(
    hierarchy: &[usize],
    layouts: &[&Layouts],
    steps: usize,
    fresh: bool,
) -> (Vec<f32>, Session) {
    let placement = Placement::grid(DeviceType::Cpu, hierarchy).unwrap();
    let nd = |f: fn(&Layouts) -> Sbp| Some(NdSbp(layouts.iter().map(|l| f(l)).collect()));
    let g = Graph::new();
    let x = g.input("x", [BATCH, INPUT], DType::F32, &placement, nd(|l| l.x)).unwrap();
    let y = g.input("y", [BATCH], DType::I64, &placement, nd(|l| l.x)).unwrap();
    let init = |shape: &[usize], seed| {
        HostTensor::randn(shape.to_vec(), 0.0, 0.3, DType::F32, seed).unwrap()
    };
    let w1 = g.parameter("w1", init(&[INPUT, HIDDEN], 1), &placement, nd(|l| l.w1)).unwrap();
    let b1 = g.parameter("b1", init(&[HIDDEN], 2), &placement, nd(|l| l.b1)).unwrap();
    let w2 = g.parameter("w2", init(&[HIDDEN, CLASSES], 3), &placement, nd(|l| l.w2)).unwrap();
    let b2 = g.parameter("b2", init(&[CLASSES], 4), &placement, nd(|l| l.b2)).unwrap();
    let h = x.matmul(&w1).unwrap().add(&b1).unwrap().relu().unwrap();
    let logits = h.matmul(&w2).unwrap().add(&b2).unwrap();
    let loss = logits.cross_entropy(&y).unwrap();
    let training = Training::new(&loss, Optimizer::AdamW(AdamW::new(0.05)), Schedule::Constant);
    let devices = hierarchy.iter().product();
    let config = SessionConfig { devices, ..SessionConfig::default() };
    let mut session = Session::new(&g, &[&loss], Some(training), config).unwrap();
    let mut losses = Vec::new();
    for step in 0..steps {
        let step = if fresh { step } else { 0 };
        let xs =
            HostTensor::randn(vec![BATCH, INPUT], 0.0, 1.0, DType::F32, 100 + step as u64).unwrap();
        let ys: Vec<i64> = (0..BATCH).map(|i| ((i * 7 + step * 3) % CLASSES) as i64).collect();
        let ys = HostTensor::from_vec(ys, [BATCH]).unwrap();
        let out = session.step(&[(&x, xs), (&y, ys)]).unwrap();
        losses.push(out[0].to_vec::<f32>().unwrap()[0]);
    }
    (losses, session)
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    for (step, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() < 2e-5, "{what}: step {step}: {x} vs {y} (all {a:?} vs {b:?})");
    }
}

#[test]
fn losses_fall_on_one_device() {
    let (losses, _) = train_on(&[1], &[&DP], 8, false);
    assert!(losses[7] < losses[0] * 0.8, "loss did not fall: {losses:?}");
}

#[test]
fn data_parallel_matches_one_device() {
    let (one, _) = train(&[1], &[&DP], 5);
    let (dp2, s2) = train(&[2], &[&DP], 5);
    let (dp4, _) = train(&[4], &[&DP], 5);
    assert_close(&one, &dp2, "dp2");
    assert_close(&one, &dp4, "dp4");
    // Data parallel: the gradients of the four replicated parameters are reduced across the
    // replicas (all-reduce, or reduce-scatter into a sharded update then all-gather).
    let program = s2.program();
    let reductions = program.count_boxing("all-reduce") + program.count_boxing("reduce-scatter");
    assert!(reductions >= 4, "{program}");
    // Every shard that is neither fetched nor written back is dropped once, after its last use.
    let mut kept = program.requested.clone();
    kept.sort();
    kept.dedup();
    let freed: Vec<_> = program.frees.iter().flatten().collect();
    assert_eq!(freed.len(), program.slots.len() - kept.len());
    assert!(freed.iter().all(|slot| !kept.contains(slot)));
}

#[test]
fn tensor_parallel_matches_one_device_with_one_all_reduce_forward() {
    let (one, _) = train(&[1], &[&DP], 5);
    let (tp2, s2) = train(&[2], &[&TP], 5);
    let (tp4, _) = train(&[4], &[&TP], 5);
    assert_close(&one, &tp2, "tp2");
    assert_close(&one, &tp4, "tp4");
    let text = s2.program().to_string();
    assert!(text.contains("all-reduce"), "{text}");
}

#[test]
fn hybrid_mesh_matches_one_device_and_variables_assemble() {
    let (one, s1) = train(&[1], &[&DP], 4);
    let (hybrid, s4) = train(&[2, 2], &[&DP, &TP], 4);
    assert_close(&one, &hybrid, "dp2 x tp2");
    let a = s1.variables().unwrap();
    let b = s4.variables().unwrap();
    for ((name, x), (other, y)) in a.iter().zip(&b) {
        assert_eq!(name, other);
        let (x, y) = (x.to_vec::<f32>().unwrap(), y.to_vec::<f32>().unwrap());
        let diff = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max);
        assert!(diff < 1e-5, "{name} differs by {diff}");
    }
}
