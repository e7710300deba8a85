//! `softmax` over the last axis, numerically stable: `y = e^(x − max) / Σ e^(x − max)`, its
//! fused gradient [`SoftmaxGrad`], and what it shares with `log_softmax`: [`LastAxis`], the op
//! implementation `last_axis_op!` derives from it, and the gradient op [`RowGrad`].

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
///
/// Backward: [`SoftmaxGrad`], `dx = y ⊙ (dy − Σ dy ⊙ y)` with the sum over the last axis.
#[derive(Clone, Debug, Default)]
pub struct Softmax;

/// Applies [`Softmax`] over the last axis of `x`.
pub fn softmax(e: &mut dyn Emit, x: Value) -> Result<Value> {
    emit1(e, Softmax, &[x])
}

/// Gradient of [`Softmax`]: inputs `y` (the softmax output) and `dy`.
pub type SoftmaxGrad = RowGrad<Softmax>;

impl LastAxis for Softmax {
    const NAME: &'static str = "softmax";
    const GRAD_NAME: &'static str = "softmax_grad";
    // max, subtract, exp, sum, scale; the gradient: product, sum, subtract, scale.
    const FLOPS: (u64, u64) = (5, 4);

    fn rows(ctx: &Context, x: &Tensor) -> Result<Tensor> {
        crate::dispatch_float!(Self::NAME, x.dtype(), T => rows_map::<T>(ctx, x, softmax_row_fast::<T>))
    }

    fn grad_rows(ctx: &Context, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
        crate::dispatch_float!(Self::GRAD_NAME, y.dtype(), T => rows_zip::<T>(ctx, y, dy, softmax_grad_row::<T>))
    }
}

/// [`softmax_row`] in AVX2 + FMA code where the CPU has it. The feature boundary sits on the
/// row function itself: a kernel handed down as `impl Fn` is not reliably inlined into a
/// `#[target_feature]` loop further out (the exp loop stayed 4-wide SSE that way).
#[inline(always)]
fn softmax_row_fast<T: RowFloat>(x: &[T], y: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::simd::has_x86_v3() {
        // SAFETY: the CPU has the features `softmax_row_v3` is compiled for (checked above).
        return unsafe { softmax_row_v3(x, y) };
    }
    softmax_row(x, y)
}

/// # Safety
/// The CPU must have AVX2, FMA and BMI2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
unsafe fn softmax_row_v3<T: RowFloat>(x: &[T], y: &mut [T]) {
    softmax_row(x, y)
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

// ---- shared with log_softmax: the row-wise op over the last axis and its fused gradient ----

/// A function applied to each row (the last axis) whose gradient is computed from its output `y`
/// and `dy` row by row: softmax and log_softmax. `last_axis_op!` makes it an op, [`RowGrad`]
/// is its gradient op.
pub trait LastAxis: Clone + std::fmt::Debug + Default + Send + Sync + 'static {
    /// The op name.
    const NAME: &'static str;
    /// The gradient op's name.
    const GRAD_NAME: &'static str;
    /// Flops per element of the op and of its gradient.
    const FLOPS: (u64, u64);

    /// `y`, row by row, in parallel within `ctx`'s budget.
    fn rows(ctx: &Context, x: &Tensor) -> Result<Tensor>;

    /// `dx` from `y` and `dy`, row by row.
    fn grad_rows(ctx: &Context, y: &Tensor, dy: &Tensor) -> Result<Tensor>;
}

/// Implements [`Op`] for a [`LastAxis`] type: one float input of rank ≥ 1, row signatures, and
/// the gradient through [`RowGrad`].
macro_rules! last_axis_op {
    ($op:ty) => {
        impl $crate::Op for $op {
            fn name(&self) -> &'static str {
                <$op as $crate::ops::softmax::LastAxis>::NAME
            }

            fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
                Ok(vec![$crate::ops::softmax::last_axis_input(self.name(), inputs, 1)?.clone()])
            }

            fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
                $crate::check_inputs(self, inputs)?;
                Ok(vec![<$op as $crate::ops::softmax::LastAxis>::rows(ctx, &inputs[0])?])
            }

            fn signatures(&self, inputs: &[TensorMeta]) -> Vec<meshflow_placement::Signature> {
                $crate::ops::softmax::checked_row_signatures(self, inputs, 1)
            }

            fn backward(
                &self,
                e: &mut dyn Emit,
                _inputs: &[Value],
                outputs: &[Value],
                grads: &[Option<Value>],
            ) -> Result<Vec<Option<Value>>> {
                let Some(dy) = grads[0] else { return Ok(vec![None]) };
                let grad = $crate::ops::softmax::RowGrad(self.clone());
                Ok(vec![Some(emit1(e, grad, &[outputs[0], dy])?)])
            }

            fn flops(&self, inputs: &[TensorMeta]) -> u64 {
                let per_element = <$op as $crate::ops::softmax::LastAxis>::FLOPS.0;
                per_element * inputs.first().map_or(0, |x| x.shape.numel() as u64)
            }
        }
    };
}
pub(crate) use last_axis_op;

last_axis_op!(Softmax);

/// The fused gradient of a [`LastAxis`] op: inputs `y` (its output) and `dy`; output `dx`.
///
/// Signatures: `S(i), S(i) -> S(i)` for every axis but the last; `B, B -> B`.
#[derive(Clone, Debug, Default)]
pub struct RowGrad<K>(pub K);

impl<K: LastAxis> Op for RowGrad<K> {
    fn name(&self) -> &'static str {
        K::GRAD_NAME
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let y = last_axis_input(self.name(), inputs, 2)?;
        same_meta(self.name(), y, &inputs[1])?;
        Ok(vec![y.clone()])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        crate::check_inputs(self, inputs)?;
        Ok(vec![K::grad_rows(ctx, &inputs[0], &inputs[1])?])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        checked_row_signatures(self, inputs, 2)
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
        K::FLOPS.1 * inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }
}

/// [`row_signatures`] of `op` with `inputs` inputs and one output; none for invalid metas.
pub(crate) fn checked_row_signatures(
    op: &dyn Op,
    metas: &[TensorMeta],
    inputs: usize,
) -> Vec<Signature> {
    if op.infer(metas).is_err() {
        return Vec::new(); // invalid metas: no signature
    }
    row_signatures(metas[0].shape.rank(), inputs, 1)
}

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
    kernel: impl Fn(&[T], &mut [T]) + Sync,
) -> Result<Tensor> {
    let width = x.dims().last().copied().unwrap_or(1);
    let mut out = Tensor::for_overwrite(ctx, x.shape().clone(), x.dtype());
    let input = x.as_slice::<T>()?;
    for_each_row(ctx, input, width, out.as_mut_slice::<T>()?, width, kernel);
    Ok(out)
}

/// `z_row = kernel(x_row, y_row)` over the rows of two tensors of one shape, in parallel.
pub(crate) fn rows_zip<T: RowFloat>(
    ctx: &Context,
    x: &Tensor,
    y: &Tensor,
    kernel: impl Fn(&[T], &[T], &mut [T]) + Sync,
) -> Result<Tensor> {
    let width = x.dims().last().copied().unwrap_or(1);
    let mut out = Tensor::for_overwrite(ctx, x.shape().clone(), x.dtype());
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
