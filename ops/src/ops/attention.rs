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
//! The CPU kernel ([`super::attention_kernel`]) runs one task per (batch, head) on the context's
//! threads; inside a task, blocks of query rows meet only the keys up to their last row (the
//! masked upper triangle is skipped by whole blocks) through single-threaded `gemm` calls.

use meshflow_placement::{Sbp, Signature};

use super::attention_kernel::{self, Geometry};
use super::nn_rows::first_order_only;
use crate::{Context, DType, Emit, Error, Op, Result, Tensor, TensorMeta, Value};

/// Causal attention of packed `qkv [B, T, 3, H, D]`; outputs `y [B, T, H, D]` (qkv's dtype) and
/// `lse [B, H, T]` (f64 for f64, f32 otherwise): `y_t = Σ_{j ≤ t} p_tj v_j` with
/// `p_tj = e^(s_tj − lse_t)`, `s_tj = scale · q_t · k_j`.
///
/// Signatures, per device `d` (batches and heads are independent; time is whole):
/// - `S(0) -> S(0), S(0)`: `d` attends within the batches it holds;
/// - `S(3) -> S(2), S(1)`: `d` holds whole heads (tensor parallel attention);
/// - `B -> B, B`.
#[derive(Clone, Debug, PartialEq)]
pub struct CausalAttention {
    /// The factor of the scores, usually `1 / sqrt(D)`.
    pub scale: f64,
}

/// Applies [`CausalAttention`] to `qkv` and returns `y` (the `lse` output stays in the graph
/// for the backward).
pub fn causal_attention(e: &mut dyn Emit, qkv: Value, scale: f64) -> Result<Value> {
    let outputs = e.emit(std::sync::Arc::new(CausalAttention { scale }), &[qkv])?;
    Ok(outputs[0])
}

/// Gradient of [`CausalAttention`]: inputs `qkv, y, lse, dy`; output `dqkv [B, T, 3, H, D]`.
///
/// Per row block, with `p` recomputed from `lse`: `dp = dy vᵀ`, `ds = p ⊙ (dp − rowsum(dy ⊙ y))`,
/// `dq = scale · ds k`, `dk = scale · dsᵀ q`, `dv = pᵀ dy`.
///
/// Signatures: `S(0), S(0), S(0), S(0) -> S(0)`; `S(3), S(2), S(1), S(2) -> S(3)` (heads);
/// `B, B, B, P -> P` (the gradient is linear in `dy` for fixed `qkv`, `y`, `lse`: each device's
/// addend of `dy` gives an addend of `dqkv`); all `B`.
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
        if inputs.len() != 1 {
            return Err(Error::Arity { op: NAME, expected: 1, got: inputs.len() });
        }
        let geometry = Geometry::of(NAME, &inputs[0], self.scale)?;
        Ok(vec![geometry.y_meta(inputs[0].dtype), geometry.lse_meta(inputs[0].dtype)])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        crate::check_inputs(self, inputs)?;
        let geometry = Geometry::of(NAME, inputs[0].meta(), self.scale)?;
        let (y, lse) = attention_kernel::forward(ctx, &geometry, &inputs[0])?;
        Ok(vec![y, lse])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new(); // invalid metas: no signature
        }
        let split = Sbp::Split;
        vec![
            Signature::broadcast(1, 2),
            Signature::new([split(0)], [split(0), split(0)]),
            Signature::new([split(3)], [split(2), split(1)]),
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
        let Some(dy) = grads[0] else { return Ok(vec![None]) };
        let grad = CausalAttentionGrad { scale: self.scale };
        let dqkv = e.emit(std::sync::Arc::new(grad), &[inputs[0], outputs[0], outputs[1], dy])?;
        Ok(vec![Some(dqkv[0])])
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
        if inputs.len() != 4 {
            return Err(Error::Arity { op: GRAD_NAME, expected: 4, got: inputs.len() });
        }
        let qkv = &inputs[0];
        let geometry = Geometry::of(GRAD_NAME, qkv, self.scale)?;
        let expected =
            [geometry.y_meta(qkv.dtype), geometry.lse_meta(qkv.dtype), geometry.y_meta(qkv.dtype)];
        for (got, want) in inputs[1..].iter().zip(&expected) {
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
        Ok(vec![qkv.clone()])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        crate::check_inputs(self, inputs)?;
        let geometry = Geometry::of(GRAD_NAME, inputs[0].meta(), self.scale)?;
        let [qkv, y, lse, dy] = inputs else {
            return Err(Error::Arity { op: GRAD_NAME, expected: 4, got: inputs.len() });
        };
        Ok(vec![attention_kernel::backward(ctx, &geometry, qkv, (y, lse, dy))?])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new(); // invalid metas: no signature
        }
        let (split, bc) = (Sbp::Split, Sbp::Broadcast);
        vec![
            Signature::broadcast(4, 1),
            Signature::new([split(0); 4], [split(0)]),
            Signature::new([split(3), split(2), split(1), split(2)], [split(3)]),
            Signature::new([bc, bc, bc, Sbp::PartialSum], [Sbp::PartialSum]),
        ]
    }

    fn backward(
        &self,
        _e: &mut dyn Emit,
        _inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        first_order_only(GRAD_NAME, grads, 4)
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
