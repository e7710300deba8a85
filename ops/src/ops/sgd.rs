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

use num_traits::Zero;

use super::adamw::{update_op, Update};
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
        let decay = T::Acc::constant(self.weight_decay);
        let momentum = T::Acc::constant(self.momentum);
        let keep = T::Acc::constant(1.0 - self.dampening);
        let step = T::Acc::constant(-self.lr);
        let (with_momentum, first) = (self.momentum != 0.0, self.step == 1);
        let mut outputs = [0, 2]
            .map(|i| Tensor::for_overwrite(ctx, inputs[i].shape().clone(), inputs[i].dtype()));
        let [p_out, b_out] = &mut outputs;
        let p_all = SharedRows::new(p_out.as_mut_slice::<T>()?);
        let b_all = SharedRows::new(b_out.as_mut_slice::<T>()?);
        for_each_range(ctx, p.len(), 1, |range| {
            // SAFETY: tasks cover disjoint element ranges, so each element has one writer.
            let (p_new, b_new) = unsafe { (p_all.row(range.clone()), b_all.row(range.clone())) };
            for (k, i) in range.enumerate() {
                let pi = p[i].widen();
                let mut d = g[i].widen();
                if !decay.is_zero() {
                    d += decay * pi;
                }
                let mut buffer = b[i].widen();
                if with_momentum {
                    buffer = if first { d } else { buffer * momentum + keep * d };
                    d = buffer;
                }
                p_new[k] = T::narrow(pi + step * d);
                b_new[k] = T::narrow(buffer);
            }
        });
        Ok(outputs.into())
    }
}

update_op!(Sgd);
