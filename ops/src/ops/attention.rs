//! `causal_attention`: fused causal scaled-dot-product attention over packed queries, keys and
//! values, `y = softmax(scale · q kᵀ + causal mask) v` per batch and head, and its fused gradient
//! [`CausalAttentionGrad`].
//!
//! The input is the output of a fused `c_attn` projection `[B, T, 3·H·D]` viewed (a free reshape)
//! as `qkv [B, T, 3, H, D]`: index 0 of axis 2 holds the queries, 1 the keys, 2 the values. The
//! output `y [B, T, H, D]` reshapes (free again) to `[B, T, H·D]` for the output projection, so
//! no permutation copies happen on either side. The second output `lse [B, H, T]` holds each
//! row's log-sum-exp `log Σ_j e^(s_ij)`; the backward recomputes the probabilities from it
//! (flash-attention style) instead of keeping the `[B, H, T, T]` matrix alive.
//!
//! The CPU kernel (`attention_kernel`) runs one task per (batch, head) on the context's
//! threads; inside a task, blocks of query rows meet only the keys up to their last row (the
//! masked upper triangle is skipped by whole blocks) through single-threaded `gemm` calls.

use meshflow_placement::{Sbp, Signature};

use super::attention_kernel::{self, Geometry};
use super::nn_rows::first_order_only;
use crate::{Context, DType, Emit, Error, Op, Result, Tensor, TensorMeta, Value};

/// Causal attention of packed `qkv [B, T, 3, H, D]`, with an optional `bias [3, H, D]` (of
/// `c_attn`, added to `q`, `k` and `v` as the kernel reads them: no pass over `qkv` of its own);
/// outputs `y [B, T, H, D]` (qkv's dtype) and `lse [B, H, T]` (f64 for f64, f32 otherwise):
/// `y_t = Σ_{j ≤ t} p_tj v_j` with `p_tj = e^(s_tj − lse_t)`, `s_tj = scale · q_t · k_j`.
///
/// Signatures, per device `d` (batches and heads are independent; time is whole):
/// - `S(0)(, B) -> S(0), S(0)`: `d` attends within the batches it holds;
/// - `S(3)(, S(1)) -> S(2), S(1)`: `d` holds whole heads (tensor parallel attention);
/// - `B(, B) -> B, B`.
#[derive(Clone, Debug, PartialEq)]
pub struct CausalAttention {
    /// The factor of the scores, usually `1 / sqrt(D)`.
    pub scale: f64,
}

/// Applies [`CausalAttention`] to `qkv` (plus `bias`, when given) and returns `y` (the `lse`
/// output stays in the graph for the backward).
pub fn causal_attention(
    e: &mut dyn Emit,
    qkv: Value,
    bias: Option<Value>,
    scale: f64,
) -> Result<Value> {
    let mut inputs = vec![qkv];
    inputs.extend(bias);
    let outputs = e.emit(std::sync::Arc::new(CausalAttention { scale }), &inputs)?;
    Ok(outputs[0])
}

/// The geometry of `qkv` for `op`: the bias, when there is one, must be `[3, H, D]` of `qkv`'s
/// dtype.
fn geometry_with_bias(
    op: &'static str,
    qkv: &TensorMeta,
    bias: Option<&TensorMeta>,
    scale: f64,
) -> Result<Geometry> {
    let geometry = Geometry::of(op, qkv, scale)?;
    if let Some(bias) = bias {
        let want = geometry.bias_meta(qkv.dtype);
        if bias != &want {
            let reason = format!(
                "the bias must be {} {} for qkv {} (got {} {})",
                want.shape,
                want.dtype.name(),
                qkv.shape,
                bias.shape,
                bias.dtype.name()
            );
            return Err(Error::shape(op, &[&qkv.shape, &bias.shape], reason));
        }
    }
    Ok(geometry)
}

/// Gradient of [`CausalAttention`]: inputs `qkv, y, lse, dy` and the forward's `bias` when it
/// had one; output `dqkv [B, T, 3, H, D]` and, with the bias, `dbias [3, H, D]`: `dqkv` summed
/// over batches and positions.
///
/// Per row block, with `p` recomputed from `lse`: `dp = dy vᵀ`, `ds = p ⊙ (dp − rowsum(dy ⊙ y))`,
/// `dq = scale · ds k`, `dk = scale · dsᵀ q`, `dv = pᵀ dy` (with `q`, `k`, `v` plus the bias).
///
/// Signatures (the bias columns in parentheses): `S(0), S(0), S(0), S(0)(, B) -> S(0)(, P)`;
/// `S(3), S(2), S(1), S(2)(, S(1)) -> S(3)(, S(1))` (heads); `B, B, B, P(, B) -> P(, P)` (the
/// gradient is linear in `dy` for fixed `qkv`, `y`, `lse`: each device's addend of `dy` gives
/// an addend of `dqkv`); all `B`.
#[derive(Clone, Debug, PartialEq)]
pub struct CausalAttentionGrad {
    /// The factor of the scores of the forward.
    pub scale: f64,
}

const NAME: &str = "causal_attention";
const GRAD_NAME: &str = "causal_attention_grad";

impl Op for CausalAttention {
    fn name(&self) -> &'static str {
        "causal_attention"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        if !matches!(inputs.len(), 1 | 2) {
            return Err(Error::ArityEither { op: NAME, fewest: 1, most: 2, got: inputs.len() });
        }
        let geometry = geometry_with_bias(NAME, &inputs[0], inputs.get(1), self.scale)?;
        Ok(vec![geometry.y_meta(inputs[0].dtype), geometry.lse_meta(inputs[0].dtype)])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        crate::check_inputs(self, inputs)?;
        let geometry = Geometry::of(NAME, inputs[0].meta(), self.scale)?;
        let (y, lse) = attention_kernel::forward(ctx, &geometry, &inputs[0], inputs.get(1))?;
        Ok(vec![y, lse])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new(); // invalid metas: no signature
        }
        let split = Sbp::Split;
        let biased = inputs.len() == 2;
        let with_bias = |qkv: Sbp, bias: Sbp| if biased { vec![qkv, bias] } else { vec![qkv] };
        vec![
            Signature::broadcast(inputs.len(), 2),
            Signature::new(with_bias(split(0), Sbp::Broadcast), [split(0), split(0)]),
            Signature::new(with_bias(split(3), split(1)), [split(2), split(1)]),
        ]
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        if grads.get(1).copied().flatten().is_some() {
            return Err(Error::argument(NAME, "the lse output takes no gradient"));
        }
        let Some(dy) = grads[0] else { return Ok(vec![None; inputs.len()]) };
        let grad = CausalAttentionGrad { scale: self.scale };
        let mut operands = vec![inputs[0], outputs[0], outputs[1], dy];
        operands.extend(inputs.get(1));
        let grads = e.emit(std::sync::Arc::new(grad), &operands)?;
        Ok(grads.into_iter().map(Some).collect())
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        let (matrix, vector) = forward_flops(inputs);
        matrix + vector
    }

    fn matrix_flops(&self, inputs: &[TensorMeta]) -> u64 {
        forward_flops(inputs).0
    }
}

impl Op for CausalAttentionGrad {
    fn name(&self) -> &'static str {
        "causal_attention_grad"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        if !matches!(inputs.len(), 4 | 5) {
            let got = inputs.len();
            return Err(Error::ArityEither { op: GRAD_NAME, fewest: 4, most: 5, got });
        }
        let qkv = &inputs[0];
        let bias = inputs.get(4);
        let geometry = geometry_with_bias(GRAD_NAME, qkv, bias, self.scale)?;
        let expected =
            [geometry.y_meta(qkv.dtype), geometry.lse_meta(qkv.dtype), geometry.y_meta(qkv.dtype)];
        for (got, want) in inputs[1..4].iter().zip(&expected) {
            if got != want {
                let shapes = [&qkv.shape, &got.shape, &want.shape];
                let reason = format!(
                    "y, lse and dy must be {} {}, {} {}, {} {} (got {} {})",
                    expected[0].shape,
                    expected[0].dtype.name(),
                    expected[1].shape,
                    expected[1].dtype.name(),
                    expected[2].shape,
                    expected[2].dtype.name(),
                    got.shape,
                    got.dtype.name()
                );
                return Err(Error::shape(GRAD_NAME, &shapes, reason));
            }
        }
        Ok(std::iter::once(qkv).chain(bias).cloned().collect())
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        crate::check_inputs(self, inputs)?;
        let geometry = Geometry::of(GRAD_NAME, inputs[0].meta(), self.scale)?;
        let (qkv, y, lse, dy) = (&inputs[0], &inputs[1], &inputs[2], &inputs[3]);
        let (dqkv, dbias) =
            attention_kernel::backward(ctx, &geometry, (qkv, inputs.get(4)), (y, lse, dy))?;
        Ok([vec![dqkv], dbias.into_iter().collect()].concat())
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new(); // invalid metas: no signature
        }
        let (split, bc, partial) = (Sbp::Split, Sbp::Broadcast, Sbp::PartialSum);
        let biased = inputs.len() == 5;
        // The rows' signature, with the bias's input and output columns when there is one.
        let signature = |rows: [Sbp; 4], row_out: Sbp, (bias, bias_out): (Sbp, Sbp)| {
            let (mut ins, mut outs) = (rows.to_vec(), vec![row_out]);
            if biased {
                ins.push(bias);
                outs.push(bias_out);
            }
            Signature::new(ins, outs)
        };
        vec![
            Signature::broadcast(inputs.len(), 1 + usize::from(biased)),
            signature([split(0); 4], split(0), (bc, partial)),
            signature([split(3), split(2), split(1), split(2)], split(3), (split(1), split(1))),
            signature([bc, bc, bc, partial], partial, (bc, partial)),
        ]
    }

    fn backward(
        &self,
        _e: &mut dyn Emit,
        inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        first_order_only(GRAD_NAME, grads, inputs.len())
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        let (matrix, vector) = backward_flops(inputs);
        matrix + vector
    }

    fn matrix_flops(&self, inputs: &[TensorMeta]) -> u64 {
        backward_flops(inputs).0
    }
}

/// The forward's FLOPs on `inputs = [qkv]`, of products and of the rest: two products over the
/// score elements the blocks compute, and the softmax (max, subtract, exp, sum, scale) on the
/// causal ones. Zeros for inputs that are not a `qkv`.
fn forward_flops(inputs: &[TensorMeta]) -> (u64, u64) {
    let Some(geometry) = inputs.first().and_then(|x| Geometry::of(NAME, x, 1.0).ok()) else {
        return (0, 0);
    };
    let (computed, causal) = geometry.score_elements();
    let heads = geometry.heads_total();
    (heads * 4 * geometry.head_dim as u64 * computed, heads * 5 * causal)
}

/// The gradient's FLOPs on `inputs = [qkv, y, lse, dy]`, of products and of the rest: five
/// products over the computed score elements (scores again, dp, dq, dk, dv), the
/// probabilities and ds on the causal ones, and one dot product per row.
fn backward_flops(inputs: &[TensorMeta]) -> (u64, u64) {
    let Some(geometry) = inputs.first().and_then(|x| Geometry::of(GRAD_NAME, x, 1.0).ok()) else {
        return (0, 0);
    };
    let (computed, causal) = geometry.score_elements();
    let heads = geometry.heads_total();
    let rows = geometry.time as u64 * 2 * geometry.head_dim as u64;
    (heads * 10 * geometry.head_dim as u64 * computed, heads * (5 * causal + rows))
}

/// The dtype of the `lse` output for inputs of `dtype`: the accumulate type.
pub(crate) fn lse_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}
