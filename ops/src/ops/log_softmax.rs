//! `log_softmax` over the last axis, numerically stable: `y = x − max − ln Σ e^(x − max)`, and
//! its fused gradient [`LogSoftmaxGrad`].

use meshflow_placement::Signature;
use num_traits::{Float, Zero};

use super::nn_rows::{max, second_order, sum_map, Accumulate, RowFloat};
use super::softmax::{last_axis_input, row_signatures, rows_map, rows_zip, same_meta};
use crate::{emit1, Context, Emit, Op, Result, Tensor, TensorMeta, Value};

/// Log-softmax over the last axis.
///
/// Signatures, per device `d` (rows are independent, the last axis must be whole):
/// - `S(i) -> S(i)` for every axis `i` but the last: `y_d = log_softmax(x_d)`;
/// - `B -> B`: every device computes the whole `y`.
#[derive(Clone, Debug, Default)]
pub struct LogSoftmax;

/// Applies [`LogSoftmax`] over the last axis of `x`.
pub fn log_softmax(e: &mut dyn Emit, x: Value) -> Result<Value> {
    emit1(e, LogSoftmax, &[x])
}

impl Op for LogSoftmax {
    fn name(&self) -> &'static str {
        "log_softmax"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        Ok(vec![last_axis_input(self.name(), inputs, 1)?.clone()])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.infer(&[inputs[0].meta().clone()])?;
        let x = &inputs[0];
        let out = crate::dispatch_float!(self.name(), x.dtype(), T => rows_map::<T>(ctx, x, log_softmax_row::<T>))?;
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
        Ok(vec![Some(emit1(e, LogSoftmaxGrad, &[outputs[0], dy])?)])
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        5 * inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }
}

/// Gradient of [`LogSoftmax`]: inputs `y` (the log-softmax output) and `dy`;
/// `dx = dy − e^y · Σ dy`, the sum over the last axis.
///
/// Signatures: `S(i), S(i) -> S(i)` for every axis but the last; `B, B -> B`.
#[derive(Clone, Debug, Default)]
pub struct LogSoftmaxGrad;

impl Op for LogSoftmaxGrad {
    fn name(&self) -> &'static str {
        "log_softmax_grad"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let y = last_axis_input(self.name(), inputs, 2)?;
        same_meta(self.name(), y, &inputs[1])?;
        Ok(vec![y.clone()])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.infer(&[inputs[0].meta().clone(), inputs[1].meta().clone()])?;
        let (y, dy) = (&inputs[0], &inputs[1]);
        let out = crate::dispatch_float!(self.name(), y.dtype(), T => rows_zip::<T>(ctx, y, dy, log_softmax_grad_row::<T>))?;
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
fn log_softmax_row<T: RowFloat>(x: &[T], y: &mut [T]) {
    let peak = max(x);
    let peak = if peak.is_finite() { peak } else { T::Acc::zero() };
    let total = sum_map(x, |v| (v - peak).exp_fast());
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
