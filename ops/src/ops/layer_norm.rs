//! `layer_norm` over the last axis with an affine weight and bias, and its fused gradient
//! [`LayerNormGrad`].
//!
//! `y = (x − mean) · rstd · w + b` with `mean` and the biased variance over the last axis and
//! `rstd = 1 / sqrt(var + eps)`, as `torch.nn.functional.layer_norm`. Statistics are computed in
//! the accumulate type (f64 for f64, f32 otherwise). The backward recomputes them per row (the
//! row is read anyway), so the op has one output and nothing but `y` needs a gradient.

use meshflow_placement::{Sbp, Signature};
use num_traits::{Float, Zero};

use super::nn_rows::{
    for_each_row, second_order, sum_map, sum_over_rows, Accumulate, RowFloat, SharedRows,
};
use super::softmax::last_axis_input;
use crate::{emit1, Context, Emit, Error, Op, Result, Tensor, TensorMeta, Value};

/// Layer normalisation over the last axis: inputs `x [..., D]`, `weight [D]`, `bias [D]`;
/// output `y [..., D]`.
///
/// Signatures, per device `d` (rows are independent, the last axis must be whole):
/// - `S(i), B, B -> S(i)` for every axis `i` but the last: each device normalises the rows it
///   holds with the whole weight and bias;
/// - `B, B, B -> B`.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNorm {
    /// Added to the variance before the square root (PyTorch's default is `1e-5`).
    pub eps: f64,
}

/// Applies [`LayerNorm`].
pub fn layer_norm(
    e: &mut dyn Emit,
    x: Value,
    weight: Value,
    bias: Value,
    eps: f64,
) -> Result<Value> {
    emit1(e, LayerNorm { eps }, &[x, weight, bias])
}

impl Op for LayerNorm {
    fn name(&self) -> &'static str {
        "layer_norm"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let x = last_axis_input(self.name(), inputs, 3)?;
        check_params(self.name(), x, &inputs[1..])?;
        check_eps(self.name(), self.eps)?;
        Ok(vec![x.clone()])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let metas: Vec<TensorMeta> = inputs.iter().map(|t| t.meta().clone()).collect();
        self.infer(&metas)?;
        let y = crate::dispatch_float!(self.name(), inputs[0].dtype(), T => norm_forward::<T>(ctx, inputs, self.eps, true))?;
        Ok(vec![y])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new(); // invalid metas: no signature
        }
        norm_signatures(inputs[0].shape.rank(), 3)
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let Some(dy) = grads[0] else { return Ok(vec![None, None, None]) };
        let op = LayerNormGrad { eps: self.eps };
        let grads = e.emit(std::sync::Arc::new(op), &[inputs[0], inputs[1], dy])?;
        Ok(grads.into_iter().map(Some).collect())
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        // mean, centre, square-sum, scale, affine
        8 * inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }
}

/// Gradient of [`LayerNorm`]: inputs `x, weight, dy`; outputs `dx, dweight, dbias`.
///
/// With the row statistics recomputed, `x̂ = (x − mean)·rstd` and `g = dy ⊙ w`, per row:
/// `dx = rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂))`, and over all rows `dweight = Σ dy ⊙ x̂`,
/// `dbias = Σ dy`.
///
/// Signatures: `S(i), B, S(i) -> S(i), P, P` for every axis `i` but the last (the parameter
/// gradients are sums over rows, so each device holds an addend); all-`B`.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNormGrad {
    /// The forward's `eps`.
    pub eps: f64,
}

impl Op for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer_norm_grad"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let x = last_axis_input(self.name(), inputs, 3)?;
        check_params(self.name(), x, &inputs[1..2])?;
        check_eps(self.name(), self.eps)?;
        check_dy(self.name(), x, &inputs[2])?;
        Ok(vec![x.clone(), inputs[1].clone(), inputs[1].clone()])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let metas: Vec<TensorMeta> = inputs.iter().map(|t| t.meta().clone()).collect();
        self.infer(&metas)?;
        crate::dispatch_float!(self.name(), inputs[0].dtype(), T => norm_backward::<T>(ctx, inputs, self.eps, true))
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new(); // invalid metas: no signature
        }
        norm_grad_signatures(inputs[0].shape.rank(), true)
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
        12 * inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }
}

// ---- shared with rms_norm ----

pub(crate) fn check_eps(op: &'static str, eps: f64) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(Error::argument(op, format!("eps must be finite and ≥ 0, got {eps}")))
    }
}

/// Every parameter is `[D]` with `x`'s dtype.
pub(crate) fn check_params(op: &'static str, x: &TensorMeta, params: &[TensorMeta]) -> Result<()> {
    let width = x.shape.dims()[x.shape.rank() - 1];
    for p in params {
        if p.dtype != x.dtype {
            return Err(Error::dtype(op, &[x.dtype, p.dtype], "weight and bias take x's dtype"));
        }
        if p.shape.dims() != [width] {
            return Err(Error::shape(op, &[&x.shape, &p.shape], "weight and bias must be [D]"));
        }
    }
    Ok(())
}

/// `dy` has `x`'s shape and dtype.
pub(crate) fn check_dy(op: &'static str, x: &TensorMeta, dy: &TensorMeta) -> Result<()> {
    if dy != x {
        return Err(Error::shape(op, &[&x.shape, &dy.shape], "dy must have x's shape and dtype"));
    }
    Ok(())
}

pub(crate) fn norm_signatures(rank: usize, inputs: usize) -> Vec<Signature> {
    let mut signatures = vec![Signature::broadcast(inputs, 1)];
    for i in 0..rank.saturating_sub(1) {
        let mut ins = vec![Sbp::Broadcast; inputs];
        ins[0] = Sbp::Split(i);
        signatures.push(Signature::new(ins, [Sbp::Split(i)]));
    }
    signatures
}

/// Grad signatures: inputs `x, w, dy`; outputs `dx, dw (, db)`.
pub(crate) fn norm_grad_signatures(rank: usize, with_bias: bool) -> Vec<Signature> {
    let (inputs, outputs) = (3, if with_bias { 3 } else { 2 });
    let mut signatures = vec![Signature::broadcast(inputs, outputs)];
    for i in 0..rank.saturating_sub(1) {
        let mut ins = vec![Sbp::Split(i); inputs];
        ins[1] = Sbp::Broadcast;
        let mut outs = vec![Sbp::PartialSum; outputs];
        outs[0] = Sbp::Split(i);
        signatures.push(Signature::new(ins, outs));
    }
    signatures
}

/// Per-row statistics of layer norm (`centred`) or rms norm: `(mean, rstd)`.
#[inline(always)]
fn row_stats<T: RowFloat>(x: &[T], eps: T::Acc, centred: bool) -> (T::Acc, T::Acc) {
    let width = T::Acc::constant(x.len() as f64);
    let mean = if centred { sum_map(x, |v| v) / width } else { T::Acc::zero() };
    let var = sum_map(x, |v| (v - mean) * (v - mean)) / width;
    (mean, (var + eps).sqrt().recip())
}

/// Forward of layer norm (`centred`, with bias) or rms norm (no mean, no bias): `y`.
pub(crate) fn norm_forward<T: RowFloat>(
    ctx: &Context,
    inputs: &[Tensor],
    eps: f64,
    centred: bool,
) -> Result<Tensor> {
    let x = inputs[0].as_slice::<T>()?;
    let weight = inputs[1].as_slice::<T>()?;
    let bias = if centred { Some(inputs[2].as_slice::<T>()?) } else { None };
    let width = weight.len();
    let mut y = Tensor::zeros(inputs[0].shape().clone(), inputs[0].dtype());
    let eps = T::Acc::constant(eps);
    let kernel = |x_row: &[T], y_row: &mut [T]| {
        let stats = row_stats(x_row, eps, centred);
        match bias {
            Some(bias) => affine_row(x_row, y_row, stats, weight, bias),
            None => scale_row(x_row, y_row, stats.1, weight),
        }
    };
    for_each_row(ctx, x, width, y.as_mut_slice::<T>()?, width, kernel);
    Ok(y)
}

#[inline(always)]
fn affine_row<T: RowFloat>(
    x: &[T],
    y: &mut [T],
    (mean, rstd): (T::Acc, T::Acc),
    weight: &[T],
    bias: &[T],
) {
    let params = weight.iter().zip(bias);
    for ((out, &v), (&w, &b)) in y.iter_mut().zip(x).zip(params) {
        *out = T::narrow((v.widen() - mean) * rstd * w.widen() + b.widen());
    }
}

#[inline(always)]
fn scale_row<T: RowFloat>(x: &[T], y: &mut [T], rstd: T::Acc, weight: &[T]) {
    for ((out, &v), &w) in y.iter_mut().zip(x).zip(weight) {
        *out = T::narrow(v.widen() * rstd * w.widen());
    }
}

/// Backward of layer norm (`centred`; outputs dx, dw, db) or rms norm (dx, dw); inputs x, w, dy.
pub(crate) fn norm_backward<T: RowFloat>(
    ctx: &Context,
    inputs: &[Tensor],
    eps: f64,
    centred: bool,
) -> Result<Vec<Tensor>> {
    let x = inputs[0].as_slice::<T>()?;
    let weight = inputs[1].as_slice::<T>()?;
    let dy = inputs[2].as_slice::<T>()?;
    let eps = T::Acc::constant(eps);
    let width = weight.len();
    let rows = x.len() / width.max(1);
    let mut dx = Tensor::zeros(inputs[0].shape().clone(), inputs[0].dtype());
    let dx_all = SharedRows::new(dx.as_mut_slice::<T>()?);
    let partial = |range: std::ops::Range<usize>| {
        let mut sums = vec![T::Acc::zero(); 2 * width];
        for r in range {
            let span = r * width..(r + 1) * width;
            // SAFETY: tasks cover disjoint row ranges, so each row of dx has one writer.
            let dx_row = unsafe { dx_all.row(span.clone()) };
            let (mean, rstd) = row_stats(&x[span.clone()], eps, centred);
            let row = NormRow { x: &x[span.clone()], dy: &dy[span], weight, mean, rstd };
            row.backward(dx_row, &mut sums, centred);
        }
        sums
    };
    let add = |mut a: Vec<T::Acc>, b: Vec<T::Acc>| {
        a.iter_mut().zip(b).for_each(|(s, v)| *s += v);
        a
    };
    let sums = sum_over_rows(ctx, rows, width, partial, add)
        .unwrap_or_else(|| vec![T::Acc::zero(); 2 * width]);
    let narrow = |s: &[T::Acc]| s.iter().map(|&v| T::narrow(v)).collect::<Vec<T>>();
    let mut outputs = vec![dx, Tensor::from_vec(narrow(&sums[..width]), [width])?];
    if centred {
        outputs.push(Tensor::from_vec(narrow(&sums[width..]), [width])?);
    }
    Ok(outputs)
}

/// One row of the norm backward.
struct NormRow<'a, T: RowFloat> {
    x: &'a [T],
    dy: &'a [T],
    weight: &'a [T],
    mean: T::Acc,
    rstd: T::Acc,
}

impl<T: RowFloat> NormRow<'_, T> {
    /// Writes `dx` and adds `dy ⊙ x̂` to `sums[..D]` and `dy` to `sums[D..]`.
    #[inline(always)]
    fn backward(&self, dx: &mut [T], sums: &mut [T::Acc], centred: bool) {
        let (mean, rstd) = (self.mean, self.rstd);
        let width = T::Acc::constant(self.x.len() as f64);
        let (mut g_sum, mut gx_sum) = (T::Acc::zero(), T::Acc::zero());
        let (dw, db) = sums.split_at_mut(self.x.len());
        for i in 0..self.x.len() {
            let xhat = (self.x[i].widen() - mean) * rstd;
            let d = self.dy[i].widen();
            let g = d * self.weight[i].widen();
            g_sum += g;
            gx_sum += g * xhat;
            dw[i] += d * xhat;
            db[i] += d;
        }
        let g_mean = if centred { g_sum / width } else { T::Acc::zero() };
        let gx_mean = gx_sum / width;
        let inputs = self.x.iter().zip(self.dy).zip(self.weight);
        for (out, ((&x, &d), &w)) in dx.iter_mut().zip(inputs) {
            let xhat = (x.widen() - mean) * rstd;
            *out = T::narrow(rstd * (d.widen() * w.widen() - g_mean - xhat * gx_mean));
        }
    }
}
