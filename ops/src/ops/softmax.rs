//! `softmax` over the last axis, numerically stable: `y = e^(x − max) / Σ e^(x − max)`, its
//! fused gradient [`SoftmaxGrad`], and what it shares with `log_softmax`: [`LastAxis`], the op
//! implementation `last_axis_op!` derives from it, and the gradient op [`RowGrad`].

use meshflow_placement::{Sbp, Signature};
use num_traits::One;

use super::nn_rows::{
    first_order_only, for_each_row, for_each_row2, map_sum, max, prefetch, row, sum_map2,
    Accumulate, RowFloat,
};
use crate::cpu::simd::multiversion;
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
        crate::dispatch_float!(Self::NAME, x.dtype(), T => rows_map::<T>(ctx, x, softmax_rows::<T>))
    }

    fn grad_rows(ctx: &Context, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
        crate::dispatch_float!(Self::GRAD_NAME, y.dtype(), T => rows_zip::<T>(ctx, y, dy, softmax_grad_rows::<T>))
    }
}

multiversion! {
    /// [`softmax_row`] over each row of `width` elements.
    fn softmax_rows<T: RowFloat>(x: &[T], y: &mut [T], width: usize) {
        let rows = x.chunks_exact(width).zip(y.chunks_exact_mut(width));
        for (index, (x_row, y_row)) in rows.enumerate() {
            prefetch(row(x, width, index + 1));
            softmax_row::<T, FUSED>(x_row, y_row);
        }
    }
}

multiversion! {
    /// [`softmax_grad_row`] over each row of `width` elements.
    fn softmax_grad_rows<T: RowFloat>(y: &[T], dy: &[T], dx: &mut [T], width: usize) {
        let rows = y.chunks_exact(width).zip(dy.chunks_exact(width));
        for ((y, dy), dx) in rows.zip(dx.chunks_exact_mut(width)) {
            softmax_grad_row(y, dy, dx);
        }
    }
}

/// One row: the max (a read pass), then `e^(x − max)` written to `y` while summed, then `y`
/// scaled by the reciprocal of the sum. Rows are short enough to stay in L1 between passes,
/// so memory sees one read of `x` and one write of `y`.
#[inline(always)]
fn softmax_row<T: RowFloat, const FUSED: bool>(x: &[T], y: &mut [T]) {
    let peak = nonpositive_shift(max(x));
    let total = map_sum(x, y, |v| (v - peak).exp_nonpositive::<FUSED>());
    let scale = T::Acc::one() / total;
    for out in y.iter_mut() {
        *out = T::narrow(out.widen() * scale);
    }
}

/// The row maximum as the shift that makes every `x − shift` ≤ 0 (or NaN, where the row holds
/// NaN or +∞, whose results are NaN as in PyTorch); 0 for a row of −∞ (whose `e^(x − 0)` are 0,
/// so the result is NaN too).
#[inline(always)]
pub(crate) fn nonpositive_shift<A: Accumulate>(peak: A) -> A {
    if peak == A::neg_infinity() {
        A::zero()
    } else {
        peak
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
        first_order_only(self.name(), grads, 2)
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        K::FLOPS.1 * inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }
}

/// [`row_signatures`] of an op whose `inputs` inputs and one output are all rows; none for
/// invalid metas.
pub(crate) fn checked_row_signatures(
    op: &dyn Op,
    metas: &[TensorMeta],
    inputs: usize,
) -> Vec<Signature> {
    let rows = vec![None; inputs];
    checked_signatures(op, metas, || row_signatures(metas[0].shape.rank(), &rows, &[None]))
}

/// `signatures()` when `op` accepts `metas`, none otherwise (the one check every signature
/// function of a row op starts with).
pub(crate) fn checked_signatures(
    op: &dyn Op,
    metas: &[TensorMeta],
    signatures: impl FnOnce() -> Vec<Signature>,
) -> Vec<Signature> {
    match op.infer(metas) {
        Ok(_) => signatures(),
        Err(_) => Vec::new(), // invalid metas: no signature
    }
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

/// Signatures of a row-wise op over inputs of rank `rank`: all-`B`, and for every axis `i` but
/// the last, each input and output that is `None` (holding rows) split on `i` while the others
/// take the SBP given (a broadcast weight, a partial-sum weight gradient).
pub(crate) fn row_signatures(
    rank: usize,
    inputs: &[Option<Sbp>],
    outputs: &[Option<Sbp>],
) -> Vec<Signature> {
    let mut signatures = vec![Signature::broadcast(inputs.len(), outputs.len())];
    let place = |roles: &[Option<Sbp>], i| -> Vec<Sbp> {
        roles.iter().map(|role| role.unwrap_or(Sbp::Split(i))).collect()
    };
    signatures.extend(
        (0..rank.saturating_sub(1)).map(|i| Signature::new(place(inputs, i), place(outputs, i))),
    );
    signatures
}

/// `kernel(x_rows, y_rows, width)` over tasks of whole rows (last axis) of `x`, in parallel;
/// `y` is the output.
pub(crate) fn rows_map<T: RowFloat>(
    ctx: &Context,
    x: &Tensor,
    kernel: impl Fn(&[T], &mut [T], usize) + Sync,
) -> Result<Tensor> {
    let width = x.dims().last().copied().unwrap_or(1);
    let mut out = Tensor::for_overwrite(ctx, x.shape().clone(), x.dtype());
    let input = x.as_slice::<T>()?;
    let rows = |x: &[T], y: &mut [T]| kernel(x, y, width);
    for_each_row(ctx, input, width, out.as_mut_slice::<T>()?, width, rows);
    Ok(out)
}

/// `kernel(x_rows, y_rows, z_rows, width)` over tasks of whole rows of two tensors of one shape,
/// in parallel; `z` is the output.
pub(crate) fn rows_zip<T: RowFloat>(
    ctx: &Context,
    x: &Tensor,
    y: &Tensor,
    kernel: impl Fn(&[T], &[T], &mut [T], usize) + Sync,
) -> Result<Tensor> {
    let width = x.dims().last().copied().unwrap_or(1);
    let mut out = Tensor::for_overwrite(ctx, x.shape().clone(), x.dtype());
    let inputs = (x.as_slice::<T>()?, y.as_slice::<T>()?);
    let rows = |x: &[T], y: &[T], z: &mut [T]| kernel(x, y, z, width);
    for_each_row2(ctx, inputs, width, out.as_mut_slice::<T>()?, width, rows);
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
