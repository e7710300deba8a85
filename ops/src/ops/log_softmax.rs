//! `log_softmax` over the last axis, numerically stable: `y = x − max − ln Σ e^(x − max)`, and
//! its fused gradient [`LogSoftmaxGrad`].

use num_traits::Float;

use super::nn_rows::{max, prefetch, row, sum_map, Accumulate, RowFloat};
use super::softmax::{last_axis_op, nonpositive_shift, rows_map, rows_zip, LastAxis, RowGrad};
use crate::cpu::simd::multiversion;
use crate::{emit1, Context, Emit, Result, Tensor, TensorMeta, Value};

/// Log-softmax over the last axis.
///
/// Signatures, per device `d` (rows are independent, the last axis must be whole):
/// - `S(i) -> S(i)` for every axis `i` but the last: `y_d = log_softmax(x_d)`;
/// - `B -> B`: every device computes the whole `y`.
///
/// Backward: [`LogSoftmaxGrad`], `dx = dy − e^y · Σ dy` with the sum over the last axis.
#[derive(Clone, Debug, Default)]
pub struct LogSoftmax;

/// Applies [`LogSoftmax`] over the last axis of `x`.
pub fn log_softmax(e: &mut dyn Emit, x: Value) -> Result<Value> {
    emit1(e, LogSoftmax, &[x])
}

/// Gradient of [`LogSoftmax`]: inputs `y` (the log-softmax output) and `dy`.
pub type LogSoftmaxGrad = RowGrad<LogSoftmax>;

impl LastAxis for LogSoftmax {
    const NAME: &'static str = "log_softmax";
    const GRAD_NAME: &'static str = "log_softmax_grad";
    const FLOPS: (u64, u64) = (5, 4);

    fn rows(ctx: &Context, x: &Tensor) -> Result<Tensor> {
        crate::dispatch_float!(Self::NAME, x.dtype(), T => rows_map::<T>(ctx, x, log_softmax_rows::<T>))
    }

    fn grad_rows(ctx: &Context, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
        crate::dispatch_float!(Self::GRAD_NAME, y.dtype(), T => rows_zip::<T>(ctx, y, dy, log_softmax_grad_rows::<T>))
    }
}

last_axis_op!(LogSoftmax);

multiversion! {
    /// [`log_softmax_row`] over each row of `width` elements.
    fn log_softmax_rows<T: RowFloat>(x: &[T], y: &mut [T], width: usize) {
        let rows = x.chunks_exact(width).zip(y.chunks_exact_mut(width));
        for (index, (x_row, y_row)) in rows.enumerate() {
            prefetch(row(x, width, index + 1));
            log_softmax_row::<T, FUSED>(x_row, y_row);
        }
    }
}

multiversion! {
    /// [`log_softmax_grad_row`] over each row of `width` elements.
    fn log_softmax_grad_rows<T: RowFloat>(y: &[T], dy: &[T], dx: &mut [T], width: usize) {
        let rows = y.chunks_exact(width).zip(dy.chunks_exact(width));
        for ((y, dy), dx) in rows.zip(dx.chunks_exact_mut(width)) {
            log_softmax_grad_row(y, dy, dx);
        }
    }
}

#[inline(always)]
fn log_softmax_row<T: RowFloat, const FUSED: bool>(x: &[T], y: &mut [T]) {
    let peak = nonpositive_shift(max(x));
    let total = sum_map(x, |v| (v - peak).exp_nonpositive::<FUSED>());
    let shift = peak + total.ln();
    for (out, &v) in y.iter_mut().zip(x) {
        *out = T::narrow(v.widen() - shift);
    }
}

#[inline(always)]
fn log_softmax_grad_row<T: RowFloat>(y: &[T], dy: &[T], dx: &mut [T]) {
    let total = sum_map(dy, |g| g);
    for ((out, &v), &g) in dx.iter_mut().zip(y).zip(dy) {
        *out = T::narrow(g.widen() - v.widen().exp_fast() * total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Op;

    #[test]
    fn log_softmax_is_log_of_softmax_even_for_huge_logits() {
        let x = Tensor::from_vec(vec![1.0f64, 2.0, 3.0, 1e4, 0.0, -1e4], [2, 3]).unwrap();
        let y = LogSoftmax.forward(&Context::single_thread(), &[x]).unwrap();
        let y = y[0].to_vec::<f64>().unwrap();
        let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((y[0] - (1.0 - lse)).abs() < 1e-12);
        assert!((y[2] - (3.0 - lse)).abs() < 1e-12);
        assert_eq!(y[3], 0.0);
        assert_eq!(y[5], -2e4);
    }
}
