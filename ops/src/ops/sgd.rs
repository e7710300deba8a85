//! `sgd`: one fused SGD-with-momentum update, as `torch.optim.SGD` (nesterov off, maximize off):
//!
//! ```text
//! d ← g + wd·p
//! b ← d                           at the first step (t = 1)
//! b ← μ·b + (1 − dampening)·d     afterwards
//! p ← p − lr·b                    (p ← p − lr·d when μ = 0; b is then passed through)
//! ```
//!
//! Inputs `param, grad, buffer`; outputs the new `param, buffer`.

use std::sync::Arc;

use super::adamw::{state_inputs, update_op, Update};
use super::nn_rows::{for_each_range, Accumulate, RowFloat, SharedRows};
use crate::{Context, Emit, Error, Result, Tensor, TensorMeta, Value};

/// SGD hyper-parameters and the step count of this update.
///
/// Signatures (element-wise): `S(i), S(i), S(i) -> S(i), S(i)` for every axis `i`, and all-`B`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor μ (0 disables the buffer).
    pub momentum: f64,
    /// Dampening of the gradient added to the buffer after the first step.
    pub dampening: f64,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
    /// The step count `t` of this update, from 1 (step 1 initialises the buffer).
    pub step: u64,
}

impl Sgd {
    /// Plain SGD with learning rate `lr` (no momentum, dampening or decay), at step 1.
    pub fn new(lr: f64) -> Self {
        Sgd { lr, momentum: 0.0, dampening: 0.0, weight_decay: 0.0, step: 1 }
    }
}

/// Applies one [`Sgd`] update; returns `[param, buffer]`.
pub fn sgd(e: &mut dyn Emit, config: Sgd, [param, grad, buffer]: [Value; 3]) -> Result<Vec<Value>> {
    e.emit(Arc::new(config), &[param, grad, buffer])
}

impl Update for Sgd {
    const NAME: &'static str = "sgd";
    const ARITY: (usize, usize) = (3, 2);
    const FLOPS: u64 = 6;

    fn check(&self) -> Result<()> {
        let values = [self.lr, self.momentum, self.dampening, self.weight_decay];
        if values.iter().any(|v| !v.is_finite()) || self.step == 0 {
            return Err(Error::argument(Self::NAME, format!("bad hyper-parameters {self:?}")));
        }
        Ok(())
    }

    fn run<T: RowFloat>(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let [p, g, b] = [0, 1, 2].map(|i| inputs[i].as_slice::<T>());
        let (p, g, b) = (p?, g?, b?);
        let rule = Rule::<T::Acc>::of(self);
        let mut outputs = [0, 2]
            .map(|i| Tensor::for_overwrite(ctx, inputs[i].shape().clone(), inputs[i].dtype()));
        let [p_out, b_out] = &mut outputs;
        let p_all = SharedRows::new(p_out.as_mut_slice::<T>()?);
        let b_all = SharedRows::new(b_out.as_mut_slice::<T>()?);
        for_each_range(ctx, p.len(), 1, |range| {
            // SAFETY: tasks cover disjoint element ranges, so each element has one writer.
            let (p_new, b_new) = unsafe { (p_all.row(range.clone()), b_all.row(range.clone())) };
            for (k, i) in range.enumerate() {
                (p_new[k], b_new[k]) = rule.element(p[i], g[i], b[i]);
            }
        });
        Ok(outputs.into())
    }

    /// In place when the parameter and the buffer are uniquely owned (5 streams of memory
    /// traffic instead of 7).
    fn run_owned<T: RowFloat>(&self, ctx: &Context, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let [mut p, g, mut b] = state_inputs::<3>(inputs)?;
        if !(p.is_unique() && b.is_unique()) {
            return self.run::<T>(ctx, &[p, g, b]);
        }
        let rule = Rule::<T::Acc>::of(self);
        let grad = g.as_slice::<T>()?;
        let p_all = SharedRows::new(p.as_mut_slice::<T>()?);
        let b_all = SharedRows::new(b.as_mut_slice::<T>()?);
        for_each_range(ctx, grad.len(), 1, |range| {
            // SAFETY: tasks cover disjoint element ranges, so each element has one writer.
            let (p, b) = unsafe { (p_all.row(range.clone()), b_all.row(range.clone())) };
            for ((p, b), &g) in p.iter_mut().zip(b.iter_mut()).zip(&grad[range]) {
                (*p, *b) = rule.element(*p, g, *b);
            }
        });
        Ok(vec![p, b])
    }
}

/// The scalars of one update, in the accumulate type, and its per-element rule.
struct Rule<A> {
    decay: A,
    momentum: A,
    keep: A,
    step: A,
    with_momentum: bool,
    first: bool,
}

impl<A: Accumulate> Rule<A> {
    fn of(sgd: &Sgd) -> Self {
        Rule {
            decay: A::constant(sgd.weight_decay),
            momentum: A::constant(sgd.momentum),
            keep: A::constant(1.0 - sgd.dampening),
            step: A::constant(-sgd.lr),
            with_momentum: sgd.momentum != 0.0,
            first: sgd.step == 1,
        }
    }

    /// One element: `(param, grad, buffer)` to the new `(param, buffer)`.
    #[inline(always)]
    fn element<T: RowFloat<Acc = A>>(&self, p: T, g: T, b: T) -> (T, T) {
        let p = p.widen();
        let mut d = g.widen();
        if !self.decay.is_zero() {
            d += self.decay * p;
        }
        let mut buffer = b.widen();
        if self.with_momentum {
            buffer = if self.first { d } else { buffer * self.momentum + self.keep * d };
            d = buffer;
        }
        (T::narrow(p + self.step * d), T::narrow(buffer))
    }
}

update_op!(Sgd);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::adamw::tests::{address, state};
    use crate::{DType, Op};

    #[test]
    fn owned_unique_state_is_updated_in_place_bit_for_bit() {
        let ctx = Context::with_threads(2);
        let first = Sgd { momentum: 0.9, dampening: 0.1, weight_decay: 0.01, ..Sgd::new(0.1) };
        for sgd in [first.clone(), Sgd { step: 2, ..first }, Sgd::new(0.5)] {
            for dtype in [DType::F32, DType::BF16] {
                let inputs = state(70_001, dtype, 3);
                let expected = sgd.forward(&ctx, &inputs).expect("out of place");
                let copy = |t: &Tensor| Tensor::from_bytes(t.bytes()?, t.shape().clone(), dtype);
                let copies = inputs.iter().map(copy).collect::<Result<Vec<_>>>().expect("copy");
                let before = [address(&copies[0]), address(&copies[2])];
                let shared = sgd.forward_owned(&ctx, inputs.clone()).expect("shared");
                let unique = sgd.forward_owned(&ctx, copies).expect("in place");
                for j in 0..2 {
                    let case = format!("{sgd:?} {dtype} out.{j}");
                    assert_eq!(expected[j].bytes().unwrap(), shared[j].bytes().unwrap(), "{case}");
                    assert_eq!(expected[j].bytes().unwrap(), unique[j].bytes().unwrap(), "{case}");
                    assert_eq!(address(&unique[j]), before[j], "{case} reuses its input");
                }
                let again = sgd.forward(&ctx, &inputs).expect("inputs intact");
                assert_eq!(again[0].bytes().unwrap(), expected[0].bytes().unwrap(), "{dtype}");
            }
        }
    }
}
