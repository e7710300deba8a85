//! Every SBP signature of every nn op, on 2 and 3 simulated devices, equals the single-device
//! result: inputs are cut as the signature says (balanced splits, partial sums as random
//! addends), each device runs the op that [`Op::localize`] gives it, and the outputs are put back
//! together (concatenated, summed, or checked equal for B).

mod common;

use common::{assert_close, op, tensor, values, Tolerance};
use meshflow_ops::ops::adamw::AdamW;
use meshflow_ops::ops::cross_entropy::{CrossEntropy, CrossEntropyGrad};
use meshflow_ops::ops::embedding::{Embedding, EmbeddingGrad};
use meshflow_ops::ops::layer_norm::{LayerNorm, NormGrad};
use meshflow_ops::ops::log_softmax::LogSoftmax;
use meshflow_ops::ops::matmul::{MatMul, MatMulSumBatch};
use meshflow_ops::ops::rms_norm::RmsNorm;
use meshflow_ops::ops::sgd::Sgd;
use meshflow_ops::ops::softmax::{RowGrad, Softmax};
use meshflow_ops::{Context, DType, OpRef, Shape, Shard, Tensor};
use meshflow_placement::{Sbp, Signature};

const EXACT: Tolerance = Tolerance { atol: 1e-12, rtol: 1e-10 };

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

fn ids(data: &[i64], shape: &[usize]) -> Tensor {
    Tensor::from_slice(data, shape.to_vec()).expect("ids")
}

/// The `[start, end)` of device `d` of `p` on an axis of `len` (the first `len % p` get one more).
fn span(len: usize, d: usize, p: usize) -> (usize, usize) {
    let (base, extra) = (len / p, len % p);
    let start = d * base + d.min(extra);
    (start, start + base + usize::from(d < extra))
}

/// Elements `[start, end)` along `axis`, any dtype (copied as bytes).
fn narrow(t: &Tensor, axis: usize, (start, end): (usize, usize)) -> Tensor {
    let (outer, len, inner) = t.shape().split_at_axis(axis);
    let size = t.dtype().size();
    let bytes = t.bytes().expect("bytes");
    let mut out = Vec::new();
    for o in 0..outer {
        out.extend_from_slice(
            &bytes[(o * len + start) * inner * size..(o * len + end) * inner * size],
        );
    }
    Tensor::from_bytes(&out, t.shape().with_dim(axis, end - start), t.dtype()).expect("narrow")
}

/// Concatenation of float tensors along `axis` (as f64).
fn concat(parts: &[Tensor], axis: usize, logical: &Shape) -> Tensor {
    let (outer, _, inner) = logical.split_at_axis(axis);
    let mut out = Vec::new();
    for o in 0..outer {
        for part in parts {
            let rows = part.dims()[axis];
            out.extend_from_slice(&values(part)[o * rows * inner..(o + 1) * rows * inner]);
        }
    }
    tensor(out, logical.dims(), DType::F64)
}

/// Device `d`'s piece of `t` under `sbp`, and its offset along each axis.
fn piece(t: &Tensor, sbp: Sbp, d: usize, p: usize) -> (Tensor, Vec<usize>) {
    let mut offset = vec![0; t.shape().rank()];
    match sbp {
        Sbp::Broadcast => (t.clone(), offset),
        Sbp::Split(axis) => {
            let range = span(t.dims()[axis], d, p);
            offset[axis] = range.0;
            (narrow(t, axis, range), offset)
        }
        Sbp::PartialSum => {
            // Addends that sum to t: a random-ish weight per device, the last takes the rest.
            let weights: Vec<f64> = (0..p).map(|k| 0.3 + 0.2 * k as f64).collect();
            let total: f64 = weights.iter().sum();
            let v = values(t).into_iter().map(|x| x * weights[d] / total).collect();
            (tensor(v, t.dims(), DType::F64), offset)
        }
    }
}

fn shard_of(local: &Tensor, logical: &Shape, offset: Vec<usize>) -> Shard {
    Shard { local: local.meta().clone(), logical: logical.clone(), offset }
}

/// The output shards of device `d` from the logical outputs and the signature.
fn output_shards(expected: &[Tensor], signature: &Signature, d: usize, p: usize) -> Vec<Shard> {
    expected
        .iter()
        .zip(&signature.outputs)
        .map(|(out, &sbp)| {
            let (local, offset) = piece(out, sbp, d, p);
            shard_of(&local, out.shape(), offset)
        })
        .collect()
}

fn run_signature(
    op: &OpRef,
    inputs: &[Tensor],
    expected: &[Tensor],
    signature: &Signature,
    p: usize,
) {
    let ctx = Context::single_thread();
    let mut per_device: Vec<Vec<Tensor>> = Vec::new();
    for d in 0..p {
        let (locals, shards): (Vec<Tensor>, Vec<Shard>) = inputs
            .iter()
            .zip(&signature.inputs)
            .map(|(t, &sbp)| {
                let (local, offset) = piece(t, sbp, d, p);
                let shard = shard_of(&local, t.shape(), offset);
                (local, shard)
            })
            .unzip();
        let outs = output_shards(expected, signature, d, p);
        let local_op =
            op.localize(signature, &shards, &outs).expect("localize").unwrap_or(op.clone());
        let what = format!("{} {signature} device {d}/{p}", op.name());
        per_device.push(local_op.forward(&ctx, &locals).unwrap_or_else(|e| panic!("{what}: {e}")));
    }
    for (j, (want, &sbp)) in expected.iter().zip(&signature.outputs).enumerate() {
        let parts: Vec<Tensor> = per_device.iter().map(|outs| outs[j].clone()).collect();
        let what = format!("{} {signature} on {p} devices, output {j}", op.name());
        match sbp {
            Sbp::Split(axis) => {
                assert_close(&concat(&parts, axis, want.shape()), want, EXACT, &what)
            }
            Sbp::Broadcast => parts.iter().for_each(|part| assert_close(part, want, EXACT, &what)),
            Sbp::PartialSum => {
                let mut total = vec![0.0; want.numel()];
                for part in &parts {
                    total.iter_mut().zip(values(part)).for_each(|(s, v)| *s += v);
                }
                assert_close(&tensor(total, want.dims(), DType::F64), want, EXACT, &what);
            }
        }
    }
}

/// Runs every signature of `op` on `inputs` over 2 and 3 devices; returns how many it checked.
fn check(op: OpRef, inputs: &[Tensor]) -> usize {
    let metas: Vec<_> = inputs.iter().map(|t| t.meta().clone()).collect();
    let expected = op.forward(&Context::single_thread(), inputs).expect("logical run");
    let signatures = op.signatures(&metas);
    assert!(signatures.contains(&Signature::broadcast(inputs.len(), expected.len())));
    for signature in &signatures {
        for p in [2, 3] {
            run_signature(&op, inputs, &expected, signature, p);
        }
    }
    signatures.len()
}

#[test]
fn matmul_signatures_are_exact_for_every_layout() {
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let m = op(MatMul { transpose_a: ta, transpose_b: tb });
        let a2 = random(if ta { &[4, 5] } else { &[5, 4] }, 1);
        let b2 = random(if tb { &[6, 4] } else { &[4, 6] }, 2);
        let a3 = random(if ta { &[3, 4, 5] } else { &[3, 5, 4] }, 3);
        let b3 = random(if tb { &[3, 6, 4] } else { &[3, 4, 6] }, 4);
        assert_eq!(check(m.clone(), &[a2.clone(), b2.clone()]), 6);
        assert_eq!(check(m.clone(), &[a3.clone(), b2]), 7);
        assert_eq!(check(m.clone(), &[a2, b3.clone()]), 7);
        assert_eq!(check(m, &[a3.clone(), b3.clone()]), 7);
        assert_eq!(check(op(MatMulSumBatch { transpose_a: ta, transpose_b: tb }), &[a3, b3]), 7);
    }
}

#[test]
fn row_op_signatures_are_exact() {
    let x = random(&[5, 3, 7], 5);
    let dy = random(&[5, 3, 7], 6);
    let (w, b) = (random(&[7], 7), random(&[7], 8));
    assert_eq!(check(op(Softmax), std::slice::from_ref(&x)), 3);
    assert_eq!(check(op(LogSoftmax), std::slice::from_ref(&x)), 3);
    assert_eq!(check(op(RowGrad(Softmax)), &[x.clone(), dy.clone()]), 3);
    assert_eq!(check(op(RowGrad(LogSoftmax)), &[x.clone(), dy.clone()]), 3);
    assert_eq!(check(op(LayerNorm { eps: 1e-5 }), &[x.clone(), w.clone(), b]), 3);
    assert_eq!(
        check(op(NormGrad(LayerNorm { eps: 1e-5 })), &[x.clone(), w.clone(), dy.clone()]),
        3
    );
    assert_eq!(check(op(RmsNorm { eps: 1e-6 }), &[x.clone(), w.clone()]), 3);
    assert_eq!(check(op(NormGrad(RmsNorm { eps: 1e-6 })), &[x, w, dy]), 3);
}

#[test]
fn embedding_signatures_are_exact_including_vocab_shards() {
    let table = random(&[10, 4], 9);
    let positions = ids(&[0, 9, 3, 3, 7, 5], &[2, 3]);
    // B,B  S(1),B  S(0),B->P (localized: out-of-shard ids give zeros)  P,B  B,S(0)  B,S(1)
    assert_eq!(check(op(Embedding::default()), &[table, positions.clone()]), 6);
    let dy = random(&[2, 3, 4], 10);
    // B,B  B,S(2)->S(1)  B,B->S(0) (localized)  B,P  S(0),S(0)->P  S(1),S(1)->P
    assert_eq!(check(op(EmbeddingGrad { rows: 10, shard: None }), &[positions, dy]), 6);
}

#[test]
fn cross_entropy_over_split_positions_sums_to_the_global_mean() {
    let logits = random(&[7, 5], 11);
    let targets = ids(&[4, 0, 1, 1, 3, 2, 0], &[7]);
    assert_eq!(check(op(CrossEntropy::default()), &[logits.clone(), targets.clone()]), 2);
    let dloss = tensor(vec![0.75], &[], DType::F64);
    assert_eq!(check(op(CrossEntropyGrad::default()), &[logits, targets, dloss]), 3);
    let logits = random(&[2, 3, 5], 12);
    let targets = ids(&[4, 0, 1, 1, 3, 2], &[2, 3]);
    assert_eq!(check(op(CrossEntropy::default()), &[logits, targets]), 3);
}

#[test]
fn optimizer_updates_shard_elementwise() {
    let state: Vec<Tensor> = (0..4).map(|i| random(&[4, 5], 20 + i)).collect();
    let v = values(&state[3]).into_iter().map(f64::abs).collect();
    let adam_inputs =
        [state[0].clone(), state[1].clone(), state[2].clone(), tensor(v, &[4, 5], DType::F64)];
    assert_eq!(check(op(AdamW { step: 3, ..AdamW::new(0.01) }), &adam_inputs), 3);
    let sgd = Sgd { lr: 0.1, momentum: 0.9, dampening: 0.1, weight_decay: 0.01, step: 2 };
    assert_eq!(check(op(sgd), &state[..3]), 3);
}
