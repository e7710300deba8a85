//! The nn ops (matmul, softmax, log_softmax, layer_norm, rms_norm, embedding, cross_entropy,
//! adamw, sgd; the fused bias activations and `skip_layer_norm` against their unfused chains) against PyTorch goldens (`scripts/golden/nn.py`), finite differences in f64,
//! multi-threaded runs, and bad input.

mod common;

use common::{
    assert_close, check_group, expect_error, finite_differences, op, tensor, values, Case, Golden,
    Tolerance,
};
use meshflow_ops::eager::Tape;
use meshflow_ops::ops::adamw::AdamW;
use meshflow_ops::ops::add::Add;
use meshflow_ops::ops::bias_act::{BiasAct, BiasActGrad};
use meshflow_ops::ops::cross_entropy::{CrossEntropy, CrossEntropyGrad};
use meshflow_ops::ops::embedding::{Embedding, EmbeddingGrad, VocabShard};
use meshflow_ops::ops::gelu::Gelu;
use meshflow_ops::ops::layer_norm::{LayerNorm, NormGrad};
use meshflow_ops::ops::log_softmax::LogSoftmax;
use meshflow_ops::ops::matmul::{MatMul, MatMulSumBatch};
use meshflow_ops::ops::relu::Relu;
use meshflow_ops::ops::rms_norm::RmsNorm;
use meshflow_ops::ops::sgd::Sgd;
use meshflow_ops::ops::silu::Silu;
use meshflow_ops::ops::skip_layer_norm::{SkipLayerNorm, SkipLayerNormGrad};
use meshflow_ops::ops::softmax::Softmax;
use meshflow_ops::ops::sum::Sum;
use meshflow_ops::ops::unary::{Differentiable, GradOf, Unary};
use meshflow_ops::{Context, DType, Emit, Op, OpRef, Tensor};

fn make(case: &Case) -> Option<OpRef> {
    Some(match case.op.as_str() {
        "matmul" => op(MatMul {
            transpose_a: case.flag("transpose_a"),
            transpose_b: case.flag("transpose_b"),
        }),
        "softmax" => op(Softmax),
        "log_softmax" => op(LogSoftmax),
        "layer_norm" => op(LayerNorm { eps: case.float("eps") }),
        "rms_norm" => op(RmsNorm { eps: case.float("eps") }),
        "embedding" => op(Embedding::default()),
        "cross_entropy" => op(CrossEntropy::default()),
        "adamw" => op(adamw(case)),
        "sgd" => op(sgd(case)),
        _ => return None,
    })
}

fn adamw(case: &Case) -> AdamW {
    AdamW {
        lr: case.float("lr"),
        beta1: case.float("beta1"),
        beta2: case.float("beta2"),
        eps: case.float("eps"),
        weight_decay: case.float("weight_decay"),
        step: case.int("step") as u64,
    }
}

fn sgd(case: &Case) -> Sgd {
    Sgd {
        lr: case.float("lr"),
        momentum: case.float("momentum"),
        dampening: case.float("dampening"),
        weight_decay: case.float("weight_decay"),
        step: case.int("step") as u64,
    }
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data = (0..shape.iter().product::<usize>())
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect();
    tensor(data, shape, DType::F64)
}

fn ids(values: &[i64], shape: &[usize]) -> Tensor {
    Tensor::from_slice(values, shape.to_vec()).expect("ids")
}

#[test]
fn every_nn_case_matches_pytorch_and_finite_differences() {
    // Forward and gradients of all 54 cases against torch; f32/f64 cases with gradients also
    // against central differences in f64 (see common::check_group).
    assert_eq!(check_group("nn", make), 54);
}

#[test]
fn optimizers_chained_over_three_steps_match_torch_optim() {
    let golden = Golden::load("nn");
    let cases = golden.cases();
    for prefix in ["adamw_f32", "adamw_f64", "sgd_f32", "sgd_f64"] {
        let steps: Vec<&Case> = cases.iter().filter(|c| c.name.starts_with(prefix)).collect();
        assert_eq!(steps.len(), 3, "{prefix}");
        // Start from torch's initial state and feed our own outputs forward.
        let mut state: Vec<Tensor> = steps[0].inputs.clone();
        for case in &steps {
            let mut inputs = state.clone();
            inputs[1] = case.inputs[1].clone(); // this step's gradient
            let outputs =
                make(case).expect("op").forward(&Context::single_thread(), &inputs).expect("step");
            for (j, (ours, theirs)) in outputs.iter().zip(&case.outputs).enumerate() {
                let tol = Tolerance { atol: 1e-6, rtol: 1e-5 };
                assert_close(ours, theirs, tol, &format!("{} out.{j}", case.name));
            }
            state = outputs.clone();
            state.insert(1, case.inputs[1].clone()); // replaced by the next step's gradient
        }
    }
}

#[test]
fn matmul_gradients_match_finite_differences_in_every_layout() {
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let matmul = op(MatMul { transpose_a: ta, transpose_b: tb });
        let a = random(if ta { &[2, 4, 3] } else { &[2, 3, 4] }, 1);
        let b2 = random(if tb { &[5, 4] } else { &[4, 5] }, 2);
        let b3 = random(if tb { &[2, 5, 4] } else { &[2, 4, 5] }, 3);
        let a2 = random(if ta { &[4, 3] } else { &[3, 4] }, 4);
        finite_differences(matmul.clone(), &[a.clone(), b2], 16).expect("weight case");
        finite_differences(matmul.clone(), &[a, b3.clone()], 16).expect("batched");
        finite_differences(matmul, &[a2, b3], 16).expect("shared lhs");
        let sum_batch = op(MatMulSumBatch { transpose_a: ta, transpose_b: tb });
        let a = random(if ta { &[3, 4, 2] } else { &[3, 2, 4] }, 5);
        let b = random(if tb { &[3, 5, 4] } else { &[3, 4, 5] }, 6);
        finite_differences(sum_batch, &[a, b], 16).expect("sum over batches");
    }
}

#[test]
fn fused_gradient_ops_match_finite_differences_of_their_forward() {
    // Embedding's table gradient (scatter-add with repeated ids) and the cross-entropy gradient
    // on a vocab shard and with a global position count.
    let table = random(&[8, 3], 7);
    let shard = Some(VocabShard { offset: 2, vocab: 12 });
    let id_list = ids(&[1, 3, 3, 11, 2, 9], &[2, 3]);
    finite_differences(op(Embedding { shard }), &[table, id_list.clone()], 24).expect("shard");
    let logits = random(&[4, 6], 8);
    let targets = ids(&[5, 0, 2, 2], &[4]);
    finite_differences(op(CrossEntropy { positions: Some(10) }), &[logits, targets], 24)
        .expect("ce");
    let dy = random(&[2, 3, 3], 9);
    let grad = op(EmbeddingGrad { rows: 8, shard })
        .forward(&Context::single_thread(), &[id_list, dy.clone()]);
    let grad = values(&grad.expect("scatter")[0]);
    let dy = values(&dy);
    // Row of id 3 (local row 1) receives positions 1 and 2; ids 1 and 11 fall outside the shard.
    for column in 0..3 {
        assert_eq!(grad[3 + column], dy[3 + column] + dy[6 + column]);
        assert_eq!(grad[column], dy[12 + column]); // id 2 (position 4) → local row 0
        assert_eq!(grad[21 + column], dy[15 + column]); // id 9 (position 5) → local row 7
    }
    assert_eq!(grad.iter().filter(|v| **v != 0.0).count(), 3 * 3);
}

/// `bias_gelu` (and `bias_relu`, `bias_silu`) is `gelu(x + b)` bit for bit in f32 (the add
/// rounds to f32 either way), and its gradient gives the unfused chain's `dx` and `db` (`sum` of
/// that `dx` over the rows) bit for bit, on one thread and two, in place and into fresh storage;
/// both match finite differences.
#[test]
fn bias_activations_equal_the_unfused_chain() {
    for tanh in [false, true] {
        equals_unfused_chain(Gelu { tanh });
    }
    equals_unfused_chain(Relu);
    equals_unfused_chain(Silu);
}

fn equals_unfused_chain<P: Differentiable>(f: P) {
    let x = random(&[130, 96], 21).to_dtype(DType::F32).expect("f32");
    let b = random(&[96], 22).to_dtype(DType::F32).expect("f32");
    let g = random(&[130, 96], 23).to_dtype(DType::F32).expect("f32");
    let exact = Tolerance { atol: 0.0, rtol: 0.0 };
    for ctx in [Context::single_thread(), Context::with_threads(2)] {
        let sum = Add.forward(&ctx, &[x.clone(), b.clone()]).expect("add").remove(0);
        let unfused = Unary(f.clone()).forward(&ctx, std::slice::from_ref(&sum));
        let fused = BiasAct(f.clone()).forward(&ctx, &[x.clone(), b.clone()]);
        assert_close(&fused.expect("fused")[0], &unfused.expect("f")[0], exact, P::BIAS_NAME);
        let dx = GradOf(f.clone()).forward(&ctx, &[sum, g.clone()]).expect("derivative");
        let db = Sum { axes: vec![0], keepdim: false }.forward(&ctx, &dx).expect("sum");
        let fresh = BiasActGrad(f.clone()).forward(&ctx, &[x.clone(), b.clone(), g.clone()]);
        let unique = g.to_dtype(DType::F64).and_then(|g| g.to_dtype(DType::F32)).expect("copy");
        let inputs = vec![x.clone(), b.clone(), unique];
        let owned = BiasActGrad(f.clone()).forward_owned(&ctx, inputs);
        for (how, grads) in [("fresh", fresh.expect("fresh")), ("owned", owned.expect("owned"))] {
            let name = P::BIAS_GRAD_NAME;
            assert_close(&grads[0], &dx[0], exact, &format!("{name} dx {how}"));
            assert_close(&grads[1], &db[0], exact, &format!("{name} db {how}"));
        }
    }
    let (x, b) = (random(&[2, 3, 5], 24), random(&[5], 25));
    finite_differences(op(BiasAct(f)), &[x, b], 24).expect(P::BIAS_NAME);
}

/// `skip_layer_norm` is `add(x, add(y, bias))` and `layer_norm` of that bit for bit in f32, on
/// one thread and two; its gradient op gives `layer_norm_grad`'s parameter gradients, `dx + ds`
/// and the bias gradient as `sum` over the rows of that, bit for bit (130 rows: the tasks of
/// two threads split `sum`'s blocks of rows, whose sums are then folded again). Both match
/// finite differences in f64.
#[test]
fn skip_layer_norm_equals_the_unfused_chain() {
    // [1000, 64] on two threads: tasks of 256 rows split `sum`'s blocks of 125.
    for (rows, width) in [(130, 96), (1000, 64)] {
        skip_equals_unfused(rows, width);
    }
    let inputs = [[2, 3, 5].as_slice(), &[2, 3, 5], &[5], &[5], &[5]];
    let inputs: Vec<Tensor> = inputs.iter().zip(40..).map(|(s, seed)| random(s, seed)).collect();
    finite_differences(op(SkipLayerNorm { eps: 1e-5 }), &inputs, 24).expect("skip_layer_norm");
}

fn skip_equals_unfused(rows: usize, width: usize) {
    let f32s = |shape: &[usize], seed| random(shape, seed).to_dtype(DType::F32).expect("f32");
    let (x, y, g) = (f32s(&[rows, width], 31), f32s(&[rows, width], 32), f32s(&[rows, width], 33));
    let (bias, w, b) = (f32s(&[width], 34), f32s(&[width], 35), f32s(&[width], 36));
    let ds = f32s(&[rows, width], 37);
    let exact = Tolerance { atol: 0.0, rtol: 0.0 };
    let norm = LayerNorm { eps: 1e-5 };
    for ctx in [Context::single_thread(), Context::with_threads(2)] {
        let branch = Add.forward(&ctx, &[y.clone(), bias.clone()]).expect("add").remove(0);
        let sum = Add.forward(&ctx, &[x.clone(), branch]).expect("add").remove(0);
        let normed = norm.forward(&ctx, &[sum.clone(), w.clone(), b.clone()]).expect("norm");
        let inputs = [x.clone(), y.clone(), bias.clone(), w.clone(), b.clone()];
        let fused = SkipLayerNorm { eps: 1e-5 }.forward(&ctx, &inputs).expect("fused");
        assert_close(&fused[0], &sum, exact, "skip_layer_norm sum");
        assert_close(&fused[1], &normed[0], exact, "skip_layer_norm norm");
        let grad = NormGrad(norm.clone()).forward(&ctx, &[sum.clone(), w.clone(), g.clone()]);
        let grad = grad.expect("layer_norm_grad");
        let skip = SkipLayerNormGrad { eps: 1e-5 };
        let with_ds = Add.forward(&ctx, &[grad[0].clone(), ds.clone()]).expect("add").remove(0);
        for (residual, dsum) in [(None, &grad[0]), (Some(&ds), &with_ds)] {
            let mut operands = vec![sum.clone(), w.clone(), g.clone()];
            operands.extend(residual.cloned());
            let fused = skip.forward(&ctx, &operands).expect("skip_layer_norm_grad");
            let what = if residual.is_some() { "with ds" } else { "without ds" };
            assert_close(&fused[0], dsum, exact, &format!("dsum {what}"));
            assert_close(&fused[1], &grad[1], exact, &format!("dweight {what}"));
            assert_close(&fused[2], &grad[2], exact, &format!("dnorm_bias {what}"));
            let rows = Sum { axes: vec![0], keepdim: false };
            let dbias = rows.forward(&ctx, std::slice::from_ref(dsum)).expect("sum");
            assert_close(&fused[3], &dbias[0], exact, &format!("dbias {what}"));
        }
    }
}

/// With a gradient for only one of its outputs, `skip_layer_norm`'s backward is that of the
/// add (the sum's gradient reaches `x`, `y` and, summed over rows, the bias) or of the norm (its
/// `dx` reaches `x`, `y` and the bias, the parameters get theirs).
#[test]
fn skip_layer_norm_gradients_of_either_output_alone() {
    let mut tape = Tape::new(Context::single_thread());
    let shapes = [[4, 6].as_slice(), &[4, 6], &[6], &[6], &[6]];
    let tensors: Vec<Tensor> = shapes.iter().zip(50..).map(|(s, seed)| random(s, seed)).collect();
    let leaves: Vec<_> = tensors.iter().map(|t| tape.leaf(t.clone())).collect();
    let outputs = tape.emit(op(SkipLayerNorm { eps: 1e-5 }), &leaves).expect("skip_layer_norm");
    let cot = tape.leaf(random(&[4, 6], 56));
    let exact = Tolerance { atol: 0.0, rtol: 0.0 };
    let grads = tape.gradients(&[outputs[0]], &[cot], &leaves).expect("through the sum");
    let cot_values = tape.tensor(cot).clone();
    for (input, name) in [(0, "x"), (1, "y")] {
        let grad = tape.tensor(grads[input].expect("a gradient"));
        assert_close(grad, &cot_values, exact, &format!("d{name} through the sum"));
    }
    let column_sums = Sum { axes: vec![0], keepdim: false }
        .forward(&Context::single_thread(), std::slice::from_ref(&cot_values))
        .expect("sum");
    let dbias = tape.tensor(grads[2].expect("a bias gradient"));
    assert_close(dbias, &column_sums[0], exact, "dbias through the sum");
    assert!(grads[3].is_none() && grads[4].is_none(), "the norm's parameters have no gradient");
    let grads = tape.gradients(&[outputs[1]], &[cot], &leaves).expect("through the norm");
    let sum = tape.tensor(outputs[0]).clone();
    let norm = NormGrad(LayerNorm { eps: 1e-5 })
        .forward(&Context::single_thread(), &[sum, tensors[3].clone(), cot_values])
        .expect("layer_norm_grad");
    let expected = [(0, &norm[0]), (1, &norm[0]), (3, &norm[1]), (4, &norm[2])];
    for (input, want) in expected {
        let grad = tape.tensor(grads[input].expect("a gradient"));
        assert_close(grad, want, exact, &format!("input {input} through the norm"));
    }
    let dbias = tape.tensor(grads[2].expect("a bias gradient"));
    let rows = Sum { axes: vec![0], keepdim: false };
    let column_sums = rows.forward(&Context::single_thread(), &[norm[0].clone()]).expect("sum");
    assert_close(dbias, &column_sums[0], exact, "dbias through the norm");
}

#[test]
fn two_threads_give_the_single_thread_results() {
    let one = Context::single_thread();
    let two = Context::with_threads(2);
    let x = random(&[300, 96], 10).to_dtype(DType::F32).expect("f32");
    let w = random(&[96], 11).to_dtype(DType::F32).expect("f32");
    let b = random(&[96], 12).to_dtype(DType::F32).expect("f32");
    let exact = Tolerance { atol: 0.0, rtol: 0.0 };
    let row_ops: [(OpRef, Vec<Tensor>); 4] = [
        (op(Softmax), vec![x.clone()]),
        (op(LogSoftmax), vec![x.clone()]),
        (op(LayerNorm { eps: 1e-5 }), vec![x.clone(), w.clone(), b]),
        (op(RmsNorm { eps: 1e-5 }), vec![x.clone(), w]),
    ];
    for (row_op, inputs) in row_ops {
        let serial = row_op.forward(&one, &inputs).expect("serial");
        let parallel = row_op.forward(&two, &inputs).expect("parallel");
        assert_close(&parallel[0], &serial[0], exact, row_op.name());
    }
    let a = random(&[130, 70], 13).to_dtype(DType::F32).expect("f32");
    let m = random(&[70, 90], 14).to_dtype(DType::F32).expect("f32");
    let product = MatMul::default().forward(&two, &[a.clone(), m.clone()]).expect("matmul");
    let (av, mv, pv) = (values(&a), values(&m), values(&product[0]));
    for (i, j) in [(0, 0), (129, 89), (64, 33)] {
        let expected: f64 = (0..70).map(|k| av[i * 70 + k] * mv[k * 90 + j]).sum();
        assert!((pv[i * 90 + j] - expected).abs() < 1e-4, "matmul [{i}, {j}]");
    }
}

#[test]
fn bad_inputs_are_errors_naming_the_op() {
    let ctx = Context::single_thread();
    let f = |shape: &[usize]| Tensor::zeros(shape.to_vec(), DType::F32);
    let matmul = MatMul::default();
    expect_error(matmul.forward(&ctx, &[f(&[2, 3]), f(&[4, 5])]), &["matmul", "[2, 3]", "[4, 5]"]);
    expect_error(matmul.forward(&ctx, &[f(&[3]), f(&[3, 2])]), &["matmul", "2 axes"]);
    expect_error(matmul.forward(&ctx, &[f(&[2, 2, 3]), f(&[3, 3, 2])]), &["matmul", "batch"]);
    let f64s = Tensor::zeros([3, 2], DType::F64);
    expect_error(matmul.forward(&ctx, &[f(&[2, 3]), f64s]), &["matmul", "f32", "f64"]);
    let int = Tensor::zeros([2, 3], DType::I64);
    expect_error(Softmax.forward(&ctx, std::slice::from_ref(&int)), &["softmax", "i64"]);
    expect_error(Softmax.forward(&ctx, &[f(&[])]), &["softmax", "axis"]);
    let norm = LayerNorm { eps: 1e-5 };
    expect_error(norm.forward(&ctx, &[f(&[2, 4]), f(&[3]), f(&[4])]), &["layer_norm", "[3]"]);
    let skip = SkipLayerNorm { eps: 1e-5 };
    let params = || [f(&[4]), f(&[4]), f(&[4])];
    let [bias, weight, norm_bias] = params();
    expect_error(
        skip.forward(&ctx, &[f(&[2, 4]), f(&[4, 2]), bias, weight, norm_bias]),
        &["skip_layer_norm", "y (the branch)", "[2, 4]", "[4, 2]"],
    );
    let [bias, weight, _] = params();
    expect_error(
        skip.forward(&ctx, &[f(&[2, 4]), f(&[2, 4]), bias, weight, f(&[5])]),
        &["skip_layer_norm", "[5]"],
    );
    expect_error(skip.forward(&ctx, &[f(&[2, 4]), f(&[2, 4])]), &["skip_layer_norm", "5"]);
    expect_error(
        SkipLayerNormGrad { eps: 1e-5 }
            .forward(&ctx, &[f(&[2, 4]), f(&[4]), f(&[2, 4]), f(&[3, 4])]),
        &["skip_layer_norm_grad", "ds (the sum's gradient)", "[3, 4]"],
    );
    let five = [f(&[2, 4]), f(&[4]), f(&[2, 4]), f(&[2, 4]), f(&[2, 4])];
    expect_error(
        SkipLayerNormGrad { eps: 1e-5 }.forward(&ctx, &five),
        &["skip_layer_norm_grad", "expected 3 or 4 inputs, got 5"],
    );
    let bias_gelu = BiasAct(Gelu { tanh: false });
    expect_error(bias_gelu.forward(&ctx, &[f(&[2, 4]), f(&[3])]), &["bias_gelu", "[2, 4]", "[3]"]);
    let wide = Tensor::zeros([4], DType::F64);
    expect_error(bias_gelu.forward(&ctx, &[f(&[2, 4]), wide]), &["bias_gelu", "f32", "f64"]);
    let grad = BiasActGrad(Gelu { tanh: false });
    expect_error(
        grad.forward(&ctx, &[f(&[2, 4]), f(&[4]), f(&[4, 2])]),
        &["bias_gelu_grad", "[2, 4]", "[4, 2]"],
    );
    expect_error(
        LayerNorm { eps: -1.0 }.infer(&[
            f(&[2, 4]).meta().clone(),
            f(&[4]).meta().clone(),
            f(&[4]).meta().clone(),
        ]),
        &["layer_norm", "eps"],
    );
    expect_error(
        RmsNorm { eps: 1e-5 }.forward(&ctx, &[f(&[2, 4])]),
        &["rms_norm", "expected 2 inputs"],
    );
    let table = f(&[5, 2]);
    let embedding = Embedding::default();
    expect_error(
        embedding.forward(&ctx, &[table.clone(), ids(&[0, 5], &[2])]),
        &["embedding", "id 5", "0..5"],
    );
    expect_error(
        embedding.forward(&ctx, &[table.clone(), ids(&[-1], &[1])]),
        &["embedding", "id -1"],
    );
    expect_error(embedding.forward(&ctx, &[table, f(&[2])]), &["embedding", "f32", "i64"]);
    expect_error(
        embedding.forward(&ctx, &[int.clone(), ids(&[0], &[1])]),
        &["embedding", "i64", "float"],
    );
    expect_error(embedding.forward(&ctx, &[f(&[5]), ids(&[0], &[1])]), &["embedding", "[V, D]"]);
    let ce = CrossEntropy::default();
    expect_error(
        ce.forward(&ctx, &[f(&[2, 3]), ids(&[0, 3], &[2])]),
        &["cross_entropy", "target 3", "0..3"],
    );
    expect_error(
        ce.forward(&ctx, &[f(&[2, 3]), ids(&[0, 1, 2], &[3])]),
        &["cross_entropy", "[2, 3]", "[3]"],
    );
    expect_error(ce.forward(&ctx, &[f(&[2, 3]), f(&[2])]), &["cross_entropy", "i64"]);
    // An empty batch has no mean loss (PyTorch: NaN); a shard without targets of a larger batch
    // adds 0 to the global mean.
    let empty = (f(&[0, 3]), ids(&[], &[0]));
    expect_error(
        ce.forward(&ctx, &[empty.0.clone(), empty.1.clone()]),
        &["cross_entropy", "[0, 3]", "no positions"],
    );
    expect_error(
        CrossEntropyGrad::default().forward(&ctx, &[empty.0.clone(), empty.1.clone(), f(&[])]),
        &["cross_entropy_grad", "no positions"],
    );
    let shard = CrossEntropy { positions: Some(4) }.forward(&ctx, &[empty.0, empty.1]);
    let shard = shard.expect("an empty shard of 4 positions").remove(0);
    assert_eq!(shard.as_slice::<f32>().expect("f32"), [0.0]);
    let grad = CrossEntropyGrad::default();
    expect_error(
        grad.forward(&ctx, &[f(&[2, 3]), ids(&[0, 1], &[2]), f(&[2])]),
        &["cross_entropy_grad", "scalar"],
    );
    let adam = AdamW::new(1e-3);
    expect_error(adam.forward(&ctx, &[f(&[2]), f(&[2]), f(&[2]), f(&[3])]), &["adamw", "[3]"]);
    expect_error(
        AdamW { step: 0, ..adam }.forward(&ctx, &[f(&[2]), f(&[2]), f(&[2]), f(&[2])]),
        &["adamw", "step: 0"],
    );
    expect_error(Sgd::new(0.1).forward(&ctx, &[f(&[2]), f(&[2]), int]), &["sgd", "i64"]);
}
