//! The fused `causal_attention` op against the attention it replaces (narrow, reshape,
//! permute, batched products, a causal `masked_fill`, softmax), without and with the bias it
//! can add (against an `add` before the composite): forward values and gradients on shapes
//! whose time is below, at and past the kernel's row blocks; every SBP signature of the op and
//! of its gradient on 2 and 3 devices; the errors of bad inputs.

mod common;

use common::{assert_close, expect_error, tensor, values, Tolerance};
use meshflow_ops::eager::Tape;
use meshflow_ops::ops::attention::{causal_attention, CausalAttention, CausalAttentionGrad};
use meshflow_ops::ops::{add, masked_fill, matmul, mul_scalar, narrow, permute, reshape, softmax};
use meshflow_ops::{Context, DType, Op, Shape, Tensor, TensorMeta, Value};
use meshflow_placement::{Sbp, Signature};
use proptest::prelude::*;

const F64: Tolerance = Tolerance { atol: 1e-12, rtol: 1e-10 };
const F32: Tolerance = Tolerance { atol: 1e-5, rtol: 1e-5 };

/// Uniform values in `[-2, 2)` from an xorshift generator seeded by `seed`.
fn random(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data = (0..shape.iter().product::<usize>())
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 / (1u64 << 52) as f64 - 1.0) * 2.0
        })
        .collect();
    tensor(data, shape, dtype)
}

/// `y` of the composite attention on `qkv [B, T, 3, H, D]`, built on `tape`.
fn composite(tape: &mut Tape, qkv: Value, scale: f64) -> Value {
    let dims = tape.tensor(qkv).dims().to_vec();
    let [b, t, _, h, d] = dims[..] else { panic!("qkv rank") };
    let mask: Vec<u8> = (0..t * t).map(|k| u8::from(k % t > k / t)).collect();
    let mask = tape.leaf(Tensor::from_bytes(&mask, [t, t], DType::Bool).expect("mask"));
    let e = tape;
    let mut heads = |index: usize| -> Value {
        let x = narrow::narrow(e, qkv, 2, index, 1).expect("narrow");
        let x = reshape::reshape(e, x, &Shape::new([b, t, h, d])).expect("reshape");
        permute::permute(e, x, &[0, 2, 1, 3]).expect("permute")
    };
    let (q, k, v) = (heads(0), heads(1), heads(2));
    let scores = matmul::matmul_transposed(e, q, k, false, true).expect("scores");
    let scores = mul_scalar::mul_scalar(e, scores, scale).expect("scale");
    let scores = masked_fill::masked_fill(e, scores, mask, f64::NEG_INFINITY).expect("mask");
    let weights = softmax::softmax(e, scores).expect("softmax");
    let y = matmul::matmul(e, weights, v).expect("weighted values");
    permute::permute(e, y, &[0, 2, 1, 3]).expect("permute back")
}

/// `(y, dqkv, dbias)` of `Σ y ⊙ cotangent` through the fused op (or the composite one, after
/// an `add` of the bias), with `bias [3, H, D]` when given.
fn run(
    (qkv, bias): (&Tensor, Option<&Tensor>),
    cotangent: &Tensor,
    fused: bool,
    threads: usize,
) -> (Tensor, Tensor, Option<Tensor>) {
    let mut tape = Tape::new(Context::with_threads(threads));
    let x = tape.leaf(qkv.clone());
    let b = bias.map(|bias| tape.leaf(bias.clone()));
    let scale = 1.0 / (qkv.dims()[4] as f64).sqrt();
    let y = if fused {
        causal_attention(&mut tape, x, b, scale).expect("fused attention")
    } else {
        let x = match b {
            Some(b) => add::add(&mut tape, x, b).expect("bias"),
            None => x,
        };
        composite(&mut tape, x, scale)
    };
    let cot = tape.leaf(cotangent.clone());
    let wrt: Vec<Value> = [x].into_iter().chain(b).collect();
    let grads = tape.gradients(&[y], &[cot], &wrt).expect("gradients");
    let dqkv = grads[0].expect("a gradient of qkv");
    let dbias = grads.get(1).map(|g| tape.tensor(g.expect("a gradient of the bias")).clone());
    (tape.tensor(y).clone(), tape.tensor(dqkv).clone(), dbias)
}

/// Asserts that the fused op and the composite one agree on `[b, t, 3, h, d]` in `dtype`,
/// without a bias and with one.
fn check(dims: [usize; 4], dtype: DType, tolerance: Tolerance, seed: u64) {
    let [b, t, h, d] = dims;
    let qkv = random(&[b, t, 3, h, d], seed, dtype);
    let cotangent = random(&[b, t, h, d], seed + 1, dtype);
    let bias = random(&[3, h, d], seed + 2, dtype);
    for bias in [None, Some(&bias)] {
        let (y_ref, dqkv_ref, dbias_ref) = run((&qkv, bias), &cotangent, false, 1);
        // One thread runs every head on one scratch; two threads share them out.
        for threads in [1, 2] {
            let (y, dqkv, dbias) = run((&qkv, bias), &cotangent, true, threads);
            let biased = if bias.is_some() { " with a bias" } else { "" };
            let what = format!("{dims:?} {dtype:?}{biased} on {threads} threads");
            assert_close(&y, &y_ref, tolerance, &format!("y of {what}"));
            assert_close(&dqkv, &dqkv_ref, tolerance, &format!("dqkv of {what}"));
            if let (Some(got), Some(want)) = (&dbias, &dbias_ref) {
                // Sums over b·t rows of the gradient, so the tolerance scales with them.
                let rows = (b * t) as f64;
                let tolerance = Tolerance { atol: tolerance.atol * rows, ..tolerance };
                assert_close(got, want, tolerance, &format!("dbias of {what}"));
            }
            assert_eq!(dbias.is_some(), bias.is_some(), "a bias gradient with a bias only");
        }
    }
}

#[test]
fn fused_attention_matches_the_composite_attention() {
    // Time 1, below one row block, at it, past it by one and past several blocks by a bit; the
    // GPT's head_dim of 64 with score blocks up to 96 wide (f32 products on the AVX-512
    // microkernels where present: whole and partial panels, strips of 6 and of 2 rows, the
    // causal trims of every block's diagonal, where `T` 128 runs every product on them).
    let shapes = [
        [1, 1, 1, 4],
        [2, 5, 3, 8],
        [1, 32, 2, 16],
        [2, 33, 4, 8],
        [1, 70, 3, 5],
        [1, 100, 2, 64],
        [1, 128, 2, 16],
    ];
    for (seed, dims) in shapes.into_iter().enumerate() {
        check(dims, DType::F64, F64, seed as u64 * 10);
        check(dims, DType::F32, F32, seed as u64 * 10 + 5);
    }
}

#[test]
fn the_first_row_attends_to_itself_only_and_lse_is_the_log_partition() {
    let qkv = random(&[1, 4, 3, 2, 3], 11, DType::F64);
    let outputs = CausalAttention { scale: 0.5 }
        .forward(&Context::single_thread(), std::slice::from_ref(&qkv));
    let [y, lse] = &outputs.expect("forward")[..] else { panic!("two outputs") };
    let (q, y, lse) = (values(&qkv), values(y), values(lse));
    let at = |t: usize, c: usize, h: usize, j: usize| q[((t * 3 + c) * 2 + h) * 3 + j];
    // Row 0 of each head is v_0; lse of row 0 is its one score.
    for h in 0..2 {
        for j in 0..3 {
            assert!((y[h * 3 + j] - at(0, 2, h, j)).abs() < 1e-14);
        }
        let score: f64 = (0..3).map(|j| at(0, 0, h, j) * at(0, 1, h, j)).sum::<f64>() * 0.5;
        assert!((lse[h * 4] - score).abs() < 1e-14, "lse {} vs {score}", lse[h * 4]);
        // Row 3: the log of the sum of e^s over keys 0..=3.
        let s = |key: usize| (0..3).map(|j| at(3, 0, h, j) * at(key, 1, h, j)).sum::<f64>() * 0.5;
        let want = (0..4).map(|key| s(key).exp()).sum::<f64>().ln();
        assert!((lse[h * 4 + 3] - want).abs() < 1e-12);
    }
}

#[test]
fn half_precision_inputs_are_computed_in_f32() {
    let qkv = random(&[2, 9, 3, 2, 8], 3, DType::F32);
    let cotangent = random(&[2, 9, 2, 8], 4, DType::F32);
    let bias = random(&[3, 2, 8], 5, DType::F32);
    let (y, dqkv, dbias) = run((&qkv, Some(&bias)), &cotangent, true, 2);
    let dbias = dbias.expect("a bias gradient");
    for dtype in [DType::BF16, DType::F16] {
        let low = |x: &Tensor| x.to_dtype(dtype).expect("to 16 bits");
        let inputs = (&low(&qkv), Some(&low(&bias)));
        let (y16, dqkv16, dbias16) = run(inputs, &low(&cotangent), true, 2);
        let dbias16 = dbias16.expect("a bias gradient");
        assert_eq!((y16.dtype(), dqkv16.dtype(), dbias16.dtype()), (dtype, dtype, dtype));
        let tolerance = Tolerance { atol: 0.06, rtol: 0.03 };
        assert_close(&y16, &y, tolerance, &format!("y in {dtype:?}"));
        assert_close(&dqkv16, &dqkv, tolerance, &format!("dqkv in {dtype:?}"));
        let sums = Tolerance { atol: 0.5, rtol: 0.03 };
        assert_close(&dbias16, &dbias, sums, &format!("dbias in {dtype:?}"));
    }
}

#[test]
fn bad_inputs_are_errors_naming_the_op_and_shape() {
    let meta = |dims: &[usize], dtype| TensorMeta::new(dims.to_vec(), dtype);
    let op = CausalAttention { scale: 1.0 };
    expect_error(
        op.infer(&[meta(&[2, 4, 3, 8], DType::F32)]),
        &["causal_attention", "[2, 4, 3, 8]"],
    );
    expect_error(op.infer(&[meta(&[2, 4, 2, 1, 8], DType::F32)]), &["causal_attention", "qkv"]);
    expect_error(op.infer(&[meta(&[2, 4, 3, 1, 8], DType::I64)]), &["causal_attention", "i64"]);
    let nan = CausalAttention { scale: f64::NAN };
    expect_error(nan.infer(&[meta(&[2, 4, 3, 1, 8], DType::F32)]), &["scale"]);
    let grad = CausalAttentionGrad { scale: 1.0 };
    let qkv = meta(&[2, 4, 3, 1, 8], DType::F32);
    let y = meta(&[2, 4, 1, 8], DType::F32);
    let wrong_lse = meta(&[2, 4, 1], DType::F32);
    let lse = meta(&[2, 1, 4], DType::F32);
    expect_error(
        grad.infer(&[qkv.clone(), y.clone(), wrong_lse, y.clone()]),
        &["causal_attention_grad", "lse"],
    );
    let bias = meta(&[3, 8], DType::F32);
    expect_error(
        op.infer(&[qkv.clone(), bias.clone()]),
        &["causal_attention", "bias", "[3, 1, 8]", "[3, 8]"],
    );
    expect_error(
        grad.infer(&[qkv.clone(), y.clone(), lse.clone(), y.clone(), bias.clone()]),
        &["causal_attention_grad", "bias", "[3, 8]"],
    );
    // An optional input: both counts are named.
    expect_error(
        op.infer(&[qkv.clone(), bias.clone(), bias.clone()]),
        &["causal_attention", "expected 1 or 2 inputs, got 3"],
    );
    expect_error(
        grad.infer(&[qkv, y.clone(), lse, y, bias.clone(), bias]),
        &["causal_attention_grad", "expected 4 or 5 inputs, got 6"],
    );
}

// ---- SBP: each signature, cut over 2 and 3 devices, equals the single-device result ----

/// Elements `[start, end)` along `axis`.
fn slice(t: &Tensor, axis: usize, (start, end): (usize, usize)) -> Tensor {
    let mut tape = Tape::new(Context::single_thread());
    let x = tape.leaf(t.clone());
    let y = narrow::narrow(&mut tape, x, axis as isize, start, end - start).expect("narrow");
    tape.tensor(y).clone()
}

/// The `[start, end)` of device `d` of `p` on an axis of `len` (the first `len % p` get one more).
fn span(len: usize, d: usize, p: usize) -> (usize, usize) {
    let (base, extra) = (len / p, len % p);
    let start = d * base + d.min(extra);
    (start, start + base + usize::from(d < extra))
}

/// Device `d`'s input under `sbp`; a partial sum gives device 0 the value minus the others'
/// random addends.
fn piece(t: &Tensor, sbp: Sbp, (d, p): (usize, usize), seed: u64) -> Tensor {
    match sbp {
        Sbp::Broadcast => t.clone(),
        Sbp::Split(axis) => slice(t, axis, span(t.dims()[axis], d, p)),
        Sbp::PartialSum => {
            let addend = |k: usize| values(&random(t.dims(), seed + k as u64, DType::F64));
            let data = if d > 0 {
                addend(d)
            } else {
                let mut rest = values(t);
                for k in 1..p {
                    rest.iter_mut().zip(addend(k)).for_each(|(r, a)| *r -= a);
                }
                rest
            };
            tensor(data, t.dims(), DType::F64)
        }
    }
}

/// Puts per-device outputs back together under `sbp` (concatenation or sum) as f64 values in
/// logical order.
fn assemble(parts: &[Tensor], sbp: Sbp, logical: &[usize]) -> Tensor {
    match sbp {
        Sbp::Broadcast => {
            for part in &parts[1..] {
                assert_close(part, &parts[0], F64, "broadcast copies");
            }
            parts[0].clone()
        }
        Sbp::PartialSum => {
            let mut total = vec![0.0; logical.iter().product()];
            for part in parts {
                total.iter_mut().zip(values(part)).for_each(|(t, v)| *t += v);
            }
            tensor(total, logical, DType::F64)
        }
        Sbp::Split(axis) => {
            let outer: usize = logical[..axis].iter().product();
            let mut out = Vec::new();
            for o in 0..outer {
                for part in parts {
                    let chunk = part.numel() / outer;
                    out.extend_from_slice(&values(part)[o * chunk..(o + 1) * chunk]);
                }
            }
            tensor(out, logical, DType::F64)
        }
    }
}

/// Every signature of `op` on `inputs`, on `p` devices, against one device.
fn check_signatures(op: &dyn Op, inputs: &[Tensor], p: usize) -> usize {
    let ctx = Context::single_thread();
    let whole = op.forward(&ctx, inputs).expect("one device");
    let metas: Vec<TensorMeta> = inputs.iter().map(|t| t.meta().clone()).collect();
    let signatures: Vec<Signature> = op.signatures(&metas);
    for signature in &signatures {
        let per_device: Vec<Vec<Tensor>> = (0..p)
            .map(|d| {
                let pieces: Vec<Tensor> = (0..inputs.len())
                    .map(|i| piece(&inputs[i], signature.inputs[i], (d, p), 40 + i as u64))
                    .collect();
                op.forward(&ctx, &pieces).expect("one shard")
            })
            .collect();
        for (k, expected) in whole.iter().enumerate() {
            let parts: Vec<Tensor> = per_device.iter().map(|outs| outs[k].clone()).collect();
            let got = assemble(&parts, signature.outputs[k], expected.dims());
            assert_close(
                &got,
                expected,
                F64,
                &format!("{} output {k} under {signature:?}", op.name()),
            );
        }
    }
    signatures.len()
}

#[test]
fn batch_and_head_splits_and_partial_gradients_equal_one_device() {
    let qkv = random(&[3, 7, 3, 3, 4], 21, DType::F64);
    let op = CausalAttention { scale: 0.5 };
    let outputs =
        op.forward(&Context::single_thread(), std::slice::from_ref(&qkv)).expect("forward");
    let dy = random(&[3, 7, 3, 4], 22, DType::F64);
    let grad = CausalAttentionGrad { scale: 0.5 };
    let grad_inputs = [qkv.clone(), outputs[0].clone(), outputs[1].clone(), dy];
    for p in [2, 3] {
        assert_eq!(check_signatures(&op, std::slice::from_ref(&qkv), p), 3);
        assert_eq!(check_signatures(&grad, &grad_inputs, p), 4);
    }
    // With a bias: broadcast beside a batch split, split by heads beside a head split, and
    // its gradient partial where the rows are split or `dy` is partial.
    let bias = random(&[3, 3, 4], 23, DType::F64);
    let biased = [qkv.clone(), bias.clone()];
    let outputs = op.forward(&Context::single_thread(), &biased).expect("forward with a bias");
    let dy = random(&[3, 7, 3, 4], 24, DType::F64);
    let grad_inputs = [qkv.clone(), outputs[0].clone(), outputs[1].clone(), dy, bias];
    for p in [2, 3] {
        assert_eq!(check_signatures(&op, &biased, p), 3);
        assert_eq!(check_signatures(&grad, &grad_inputs, p), 4);
    }
    let metas = [qkv.meta().clone()];
    let heads = Signature::new([Sbp::Split(3)], [Sbp::Split(2), Sbp::Split(1)]);
    assert!(op.signatures(&metas).contains(&heads), "heads split");
    assert!(op.localize(&heads, &[], &[]).expect("localize").is_none(), "no global attributes");
}

#[test]
fn flops_count_the_causal_blocks() {
    let meta = TensorMeta::new([2, 64, 3, 4, 16], DType::F32);
    let flops = CausalAttention { scale: 0.25 }.flops(std::slice::from_ref(&meta));
    // Two blocks of 32 rows meet 32 and 64 keys: 3072 of the 4096 scores, 2080 causal.
    assert_eq!(flops, 2 * 4 * (4 * 16 * 3072 + 5 * 2080));
    let full = 2 * 4 * 2 * (2 * 16 * 64 * 64);
    assert!(flops < full, "causal work {flops} below the full products {full}");
    // Of which the two products run at the matrix roof, the softmax at the vector roof.
    let matrix = CausalAttention { scale: 0.25 }.matrix_flops(std::slice::from_ref(&meta));
    assert_eq!(matrix, 2 * 4 * 4 * 16 * 3072);
    // The gradient: five products, then p, ds and one dot product per row on the vector roof.
    let y = TensorMeta::new([2, 64, 4, 16], DType::F32);
    let lse = TensorMeta::new([2, 4, 64], DType::F32);
    let grad_inputs = [meta, y.clone(), lse, y];
    let grad = CausalAttentionGrad { scale: 0.25 };
    assert_eq!(grad.matrix_flops(&grad_inputs), 2 * 4 * 10 * 16 * 3072);
    assert_eq!(grad.flops(&grad_inputs), 2 * 4 * (10 * 16 * 3072 + 5 * 2080 + 64 * 2 * 16));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn random_shapes_match_the_composite_attention(
        b in 1usize..3, t in 1usize..80, h in 1usize..4, d in 1usize..12, seed in 0u64..1000,
    ) {
        check([b, t, h, d], DType::F32, F32, seed);
    }
}
