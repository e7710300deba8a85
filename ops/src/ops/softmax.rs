//! `softmax` over the last axis, numerically stable: `y = e^(x − max) / Σ e^(x − max)`, and its
//! fused gradient [`SoftmaxGrad`].

use meshflow_placement::{Sbp, Signature};
use num_traits::{Float, One, Zero};

use super::nn_rows::{
    for_each_row, for_each_row2, max, second_order, sum_map, sum_map2, Accumulate, RowFloat,
};
use crate::{emit1, Context, Emit, Error, Op, Result, Tensor, TensorMeta, Value};

/// Softmax over the last axis.
///
/// Signatures, per device `d` (rows are independent, the last axis must be whole):
/// - `S(i) -> S(i)` for every axis `i` but the last: `y_d = softmax(x_d)` on the rows `d` holds;
/// - `B -> B`: every device computes the whole `y`.
#[derive(Clone, Debug, Default)]
pub struct Softmax;

/// Applies [`Softmax`] over the last axis of `x`.
pub fn softmax(e: &mut dyn Emit, x: Value) -> Result<Value> {
    emit1(e, Softmax, &[x])
}

impl Op for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let x = last_axis_input(self.name(), inputs, 1)?;
        Ok(vec![x.clone()])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.infer(&[inputs[0].meta().clone()])?;
        let x = &inputs[0];
        let out = crate::dispatch_float!(self.name(), x.dtype(), T => rows_map::<T>(ctx, x, softmax_row::<T>))?;
        Ok(vec![out])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new(); // invalid metas: no signature
        }
        row_signatures(inputs[0].shape.rank(), 1, 1)
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        _inputs: &[Value],
        outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let Some(dy) = grads[0] else { return Ok(vec![None]) };
        Ok(vec![Some(emit1(e, SoftmaxGrad, &[outputs[0], dy])?)])
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        // max, subtract, exp, sum, scale
        5 * inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }
}

/// Gradient of [`Softmax`]: inputs `y` (the softmax output) and `dy`; `dx = y ⊙ (dy − Σ dy ⊙ y)`,
/// the sum over the last axis.
///
/// Signatures: `S(i), S(i) -> S(i)` for every axis but the last; `B, B -> B`.
#[derive(Clone, Debug, Default)]
pub struct SoftmaxGrad;

impl Op for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax_grad"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let y = last_axis_input(self.name(), inputs, 2)?;
        same_meta(self.name(), y, &inputs[1])?;
        Ok(vec![y.clone()])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.infer(&[inputs[0].meta().clone(), inputs[1].meta().clone()])?;
        let (y, dy) = (&inputs[0], &inputs[1]);
        let out = crate::dispatch_float!(self.name(), y.dtype(), T => rows_zip::<T>(ctx, y, dy, softmax_grad_row::<T>))?;
        Ok(vec![out])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new(); // invalid metas: no signature
        }
        row_signatures(inputs[0].shape.rank(), 2, 1)
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
        Ok(vec![None, None])
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        4 * inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }
}

#[inline(always)]
fn softmax_row<T: RowFloat>(x: &[T], y: &mut [T]) {
    let peak = max(x);
    let peak = if peak.is_finite() { peak } else { T::Acc::zero() };
    // A pure map (vectorises), then a lane-chunked sum of what it wrote.
    for (out, &v) in y.iter_mut().zip(x) {
        *out = T::narrow((v.widen() - peak).exp_fast());
    }
    let total = sum_map(y, |v| v);
    let scale = T::Acc::one() / total;
    for out in y.iter_mut() {
        *out = T::narrow(out.widen() * scale);
    }
}

#[inline(always)]
fn softmax_grad_row<T: RowFloat>(y: &[T], dy: &[T], dx: &mut [T]) {
    let dot = sum_map2(y, dy, |a, b| a * b);
    for ((out, &p), &g) in dx.iter_mut().zip(y).zip(dy) {
        *out = T::narrow(p.widen() * (g.widen() - dot));
    }
}

// ---- helpers shared with log_softmax (same shapes and signatures) ----

/// Checks arity, a float dtype and rank ≥ 1; returns the first input.
pub(crate) fn last_axis_input<'a>(
    op: &'static str,
    inputs: &'a [TensorMeta],
    arity: usize,
) -> Result<&'a TensorMeta> {
    if inputs.len() != arity {
        return Err(Error::Arity { op, expected: arity, got: inputs.len() });
    }
    let x = &inputs[0];
    if !x.dtype.is_float() {
        return Err(Error::dtype(op, &[x.dtype], "needs a float dtype"));
    }
    if x.shape.rank() == 0 {
        return Err(Error::Axis { op, axis: -1, shape: x.shape.clone() });
    }
    Ok(x)
}

/// Checks that `other` has the shape and dtype of `first`.
pub(crate) fn same_meta(op: &'static str, first: &TensorMeta, other: &TensorMeta) -> Result<()> {
    if first.dtype != other.dtype {
        return Err(Error::dtype(op, &[first.dtype, other.dtype], "inputs must share a dtype"));
    }
    if first.shape != other.shape {
        return Err(Error::shape(op, &[&first.shape, &other.shape], "inputs must share a shape"));
    }
    Ok(())
}

/// Row signatures of an op whose inputs and outputs all have the rows of the first input:
/// `S(i)` everywhere for every axis but the last, and all-`B`.
pub(crate) fn row_signatures(rank: usize, inputs: usize, outputs: usize) -> Vec<Signature> {
    let mut signatures = vec![Signature::broadcast(inputs, outputs)];
    signatures.extend(
        (0..rank.saturating_sub(1))
            .map(|i| Signature::new(vec![Sbp::Split(i); inputs], vec![Sbp::Split(i); outputs])),
    );
    signatures
}

/// `y_row = kernel(x_row)` over the rows (last axis) of `x`, in parallel.
pub(crate) fn rows_map<T: RowFloat>(
    ctx: &Context,
    x: &Tensor,
    kernel: fn(&[T], &mut [T]),
) -> Result<Tensor> {
    let width = x.dims().last().copied().unwrap_or(1);
    let mut out = Tensor::zeros(x.shape().clone(), x.dtype());
    let input = x.as_slice::<T>()?;
    for_each_row(ctx, input, width, out.as_mut_slice::<T>()?, width, kernel);
    Ok(out)
}

/// `z_row = kernel(x_row, y_row)` over the rows of two tensors of one shape, in parallel.
pub(crate) fn rows_zip<T: RowFloat>(
    ctx: &Context,
    x: &Tensor,
    y: &Tensor,
    kernel: fn(&[T], &[T], &mut [T]),
) -> Result<Tensor> {
    let width = x.dims().last().copied().unwrap_or(1);
    let mut out = Tensor::zeros(x.shape().clone(), x.dtype());
    let inputs = (x.as_slice::<T>()?, y.as_slice::<T>()?);
    for_each_row2(ctx, inputs, width, out.as_mut_slice::<T>()?, width, kernel);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_sum_to_one_and_match_the_definition() {
        let x = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, -1000.0, 0.0, 1000.0], [2, 3]).unwrap();
        let y = Softmax.forward(&Context::single_thread(), &[x]).unwrap();
        let y = y[0].to_vec::<f32>().unwrap();
        let total: f32 = [1.0f32, 2.0, 3.0].iter().map(|v| v.exp()).sum();
        for (got, want) in y[..3].iter().zip([1.0f32, 2.0, 3.0].map(|v| v.exp() / total)) {
            assert!((got - want).abs() < 1e-6);
        }
        assert_eq!(&y[3..], &[0.0, 0.0, 1.0]);
    }
}
