//! `rms_norm` over the last axis with a weight, and its fused gradient [`RmsNormGrad`].
//!
//! `y = x · rstd · w` with `rstd = 1 / sqrt(mean(x²) + eps)` over the last axis, as
//! `torch.nn.functional.rms_norm`. The backward recomputes `rstd` per row.

use std::sync::Arc;

use meshflow_placement::Signature;

use super::layer_norm::{
    check_dy, check_eps, check_params, norm_backward, norm_forward, norm_grad_signatures,
    norm_signatures,
};
use super::nn_rows::second_order;
use super::softmax::last_axis_input;
use crate::{emit1, Context, Emit, Op, Result, Tensor, TensorMeta, Value};

/// RMS normalisation over the last axis: inputs `x [..., D]`, `weight [D]`; output `y [..., D]`.
///
/// Signatures, per device `d` (rows are independent, the last axis must be whole):
/// - `S(i), B -> S(i)` for every axis `i` but the last: each device normalises its rows;
/// - `B, B -> B`.
#[derive(Clone, Debug, PartialEq)]
pub struct RmsNorm {
    /// Added to the mean square before the square root.
    pub eps: f64,
}

/// Applies [`RmsNorm`].
pub fn rms_norm(e: &mut dyn Emit, x: Value, weight: Value, eps: f64) -> Result<Value> {
    emit1(e, RmsNorm { eps }, &[x, weight])
}

impl Op for RmsNorm {
    fn name(&self) -> &'static str {
        "rms_norm"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let x = last_axis_input(self.name(), inputs, 2)?;
        check_params(self.name(), x, &inputs[1..])?;
        check_eps(self.name(), self.eps)?;
        Ok(vec![x.clone()])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let metas: Vec<TensorMeta> = inputs.iter().map(|t| t.meta().clone()).collect();
        self.infer(&metas)?;
        let y = crate::dispatch_float!(self.name(), inputs[0].dtype(), T => norm_forward::<T>(ctx, inputs, self.eps, false))?;
        Ok(vec![y])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new(); // invalid metas: no signature
        }
        norm_signatures(inputs[0].shape.rank(), 2)
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let Some(dy) = grads[0] else { return Ok(vec![None, None]) };
        let grads = e.emit(Arc::new(RmsNormGrad { eps: self.eps }), &[inputs[0], inputs[1], dy])?;
        Ok(grads.into_iter().map(Some).collect())
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        5 * inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }
}

/// Gradient of [`RmsNorm`]: inputs `x, weight, dy`; outputs `dx, dweight`.
///
/// With `rstd` recomputed, `x̂ = x·rstd` and `g = dy ⊙ w`, per row `dx = rstd · (g − x̂ · mean(g ⊙ x̂))`, and over
/// all rows `dweight = Σ dy ⊙ x̂`.
///
/// Signatures: `S(i), B, S(i) -> S(i), P` for every axis `i` but the last; all-`B`.
#[derive(Clone, Debug, PartialEq)]
pub struct RmsNormGrad {
    /// The forward's `eps`.
    pub eps: f64,
}

impl Op for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms_norm_grad"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let x = last_axis_input(self.name(), inputs, 3)?;
        check_params(self.name(), x, &inputs[1..2])?;
        check_eps(self.name(), self.eps)?;
        check_dy(self.name(), x, &inputs[2])?;
        Ok(vec![x.clone(), inputs[1].clone()])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let metas: Vec<TensorMeta> = inputs.iter().map(|t| t.meta().clone()).collect();
        self.infer(&metas)?;
        crate::dispatch_float!(self.name(), inputs[0].dtype(), T => norm_backward::<T>(ctx, inputs, self.eps, false))
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new(); // invalid metas: no signature
        }
        norm_grad_signatures(inputs[0].shape.rank(), false)
    }

    fn backward(
        &self,
        _e: &mut dyn Emit,
        _inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        if grads.iter().any(Option::is_some) {
            return Err(second_order(self.name()));
        }
        Ok(vec![None; 3])
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        9 * inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }
}
