//! `skip_layer_norm`: the residual junction of a pre-norm transformer in one pass, OneFlow's
//! fused op of that name. `s = x + (y + bias)` (the residual stream `x`, a branch's product `y`
//! and that branch's bias) and `n = layer_norm(s)` with the next norm's weight and bias; and its
//! gradient [`SkipLayerNormGrad`] in one pass too.
//!
//! Unfused, each junction is three passes over `[rows, D]` (the bias add, the residual add, the
//! norm) and its gradient three more (the norm's gradient, the add of the gradient that reached
//! the sum directly, the bias gradient's column sums). Each is bound by memory on the CPU, as
//! `bias_act`'s module text says, and the fused ops read and write about half as much: the
//! sum is written once and normalised from cache, and the gradient is added and summed as the
//! norm's `dx` is written.
//!
//! In f32 and f64, `s`, `n` and the gradients of `x`, `y`, the weight, the norm's bias and the
//! branch's bias equal the unfused chain's bit for bit (the bias gradient adds its rows in
//! `sum`'s blocks, `cpu::reduce::column_block_rows`).
//! bf16 and f16 round `y + bias` and then `s`, as the two adds do.

use std::sync::Arc;

use meshflow_placement::{Sbp, Signature};

use super::layer_norm::{check_eps, check_params, skip_norm_backward, skip_norm_forward};
use super::nn_rows::first_order_only;
use super::softmax::{checked_signatures, last_axis_input, row_signatures};
use super::sum::sum_to;
use crate::{Context, Emit, Error, Op, Result, Tensor, TensorMeta, Value};

/// `s = x + (y + bias)` and `n = layer_norm(s; weight, norm_bias, eps)`: inputs `x [..., D]`,
/// `y` of `x`'s shape and dtype, and `bias`, `weight`, `norm_bias`, each `[D]`; outputs `s`
/// and `n`, each of `x`'s meta.
///
/// Signatures, per device `d` (rows are independent, the last axis must be whole):
/// - `S(i), S(i), B, B, B -> S(i), S(i)` for every axis `i` but the last;
/// - all `B`.
///
/// No partial sums: a norm is not linear, so a row-parallel product's partial `y` is reduced
/// (boxing) before the junction, as it is before an unfused bias add.
#[derive(Clone, Debug, PartialEq)]
pub struct SkipLayerNorm {
    /// Added to the variance before the square root (PyTorch's default is `1e-5`).
    pub eps: f64,
}

/// Applies [`SkipLayerNorm`]: returns `[s, n]`.
pub fn skip_layer_norm(
    e: &mut dyn Emit,
    (x, y): (Value, Value),
    bias: Value,
    (weight, norm_bias): (Value, Value),
    eps: f64,
) -> Result<Vec<Value>> {
    e.emit(Arc::new(SkipLayerNorm { eps }), &[x, y, bias, weight, norm_bias])
}

/// An error unless `other` has the meta of `x`, naming what `other` is.
fn same_as_x(op: &'static str, x: &TensorMeta, other: &TensorMeta, what: &str) -> Result<()> {
    if other.dtype != x.dtype {
        return Err(Error::dtype(op, &[x.dtype, other.dtype], format!("{what} takes x's dtype")));
    }
    if other.shape != x.shape {
        let reason = format!("{what} must have x's shape");
        return Err(Error::shape(op, &[&x.shape, &other.shape], &reason));
    }
    Ok(())
}

impl Op for SkipLayerNorm {
    fn name(&self) -> &'static str {
        "skip_layer_norm"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let x = last_axis_input(self.name(), inputs, 5)?;
        same_as_x(self.name(), x, &inputs[1], "y (the branch)")?;
        check_params(self.name(), x, &inputs[2..])?;
        check_eps(self.name(), self.eps)?;
        Ok(vec![x.clone(), x.clone()])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        crate::check_inputs(self, inputs)?;
        crate::dispatch_float!(self.name(), inputs[0].dtype(), T => skip_norm_forward::<T>(ctx, inputs, self.eps))
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        let b = Some(Sbp::Broadcast);
        checked_signatures(self, inputs, || {
            row_signatures(inputs[0].shape.rank(), &[None, None, b, b, b], &[None, None])
        })
    }

    /// The sum's gradient `ds` (from its other readers) and the norm's `dn` meet in one
    /// [`SkipLayerNormGrad`]; `x` and `y` both get their sum, the bias its column sums. With no
    /// `dn`, `ds` passes through and the bias gradient is its column sums.
    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        match (grads[0], grads[1]) {
            (None, None) => Ok(vec![None; 5]),
            (Some(ds), None) => {
                let bias = e.meta(inputs[2]).shape;
                let db = sum_to(e, ds, &bias)?;
                Ok(vec![Some(ds), Some(ds), Some(db), None, None])
            }
            (ds, Some(dn)) => {
                let mut operands = vec![outputs[0], inputs[3], dn];
                operands.extend(ds);
                let grad = SkipLayerNormGrad { eps: self.eps };
                let g = e.emit(Arc::new(grad), &operands)?;
                Ok(vec![Some(g[0]), Some(g[0]), Some(g[3]), Some(g[1]), Some(g[2])])
            }
        }
    }

    /// The two adds and the norm's eight flops per element.
    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        10 * inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }
}

/// The gradient of [`SkipLayerNorm`]: inputs `s, weight, dn` and optionally `ds` (the gradient
/// that reached the sum from its other readers); outputs `dsum = layer_norm_grad(dn) (+ ds)`
/// (the gradient of both `x` and `y`), `dweight = Σ dn ⊙ ŝ`, `dnorm_bias = Σ dn` and
/// `dbias = Σ dsum`, the sums over every axis but the last.
///
/// Signatures: `S(i), B, S(i)(, S(i)) -> S(i), P, P, P` for every axis `i` but the last (each
/// device sums its own rows: addends); all `B`.
#[derive(Clone, Debug, PartialEq)]
pub struct SkipLayerNormGrad {
    /// The forward's eps.
    pub eps: f64,
}

impl Op for SkipLayerNormGrad {
    fn name(&self) -> &'static str {
        "skip_layer_norm_grad"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        if !matches!(inputs.len(), 3 | 4) {
            let (op, got) = (self.name(), inputs.len());
            return Err(Error::ArityEither { op, fewest: 3, most: 4, got });
        }
        let s = last_axis_input(self.name(), inputs, inputs.len())?;
        check_params(self.name(), s, &inputs[1..2])?;
        check_eps(self.name(), self.eps)?;
        same_as_x(self.name(), s, &inputs[2], "dn (the norm's gradient)")?;
        if let Some(ds) = inputs.get(3) {
            same_as_x(self.name(), s, ds, "ds (the sum's gradient)")?;
        }
        Ok(vec![s.clone(), inputs[1].clone(), inputs[1].clone(), inputs[1].clone()])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        crate::check_inputs(self, inputs)?;
        crate::dispatch_float!(self.name(), inputs[0].dtype(), T => skip_norm_backward::<T>(ctx, inputs, self.eps))
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        let (b, p) = (Some(Sbp::Broadcast), Some(Sbp::PartialSum));
        let rows: &[Option<Sbp>] =
            if inputs.len() == 4 { &[None, b, None, None] } else { &[None, b, None] };
        checked_signatures(self, inputs, || {
            row_signatures(inputs[0].shape.rank(), rows, &[None, p, p, p])
        })
    }

    fn backward(
        &self,
        _e: &mut dyn Emit,
        inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        first_order_only(self.name(), grads, inputs.len())
    }

    /// The norm gradient's twelve flops per element, the add and the column sum.
    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        14 * inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }
}
