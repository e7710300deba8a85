//! `adamw`: one fused AdamW update, exactly as `torch.optim.AdamW` (non-amsgrad) computes it:
//!
//! ```text
//! p ← p · (1 − lr·wd)                     decoupled weight decay
//! m ← lerp(m, g, 1 − β1)                  = β1·m + (1 − β1)·g
//! v ← β2·v + (1 − β2)·g²
//! p ← p − (lr / (1 − β1^t)) · m / (sqrt(v) / sqrt(1 − β2^t) + eps)
//! ```
//!
//! with the step count `t` starting at 1. Inputs `param, grad, m, v`; outputs the new
//! `param, m, v`. Arithmetic happens in the accumulate type (f32 for f32/bf16/f16).

use std::sync::Arc;

use meshflow_placement::{Sbp, Signature};
use num_traits::Float;

use super::nn_rows::{for_each_range, Accumulate, RowFloat, SharedRows};
use crate::cpu::simd::multiversion;
use crate::{Context, Emit, Error, Result, Tensor, TensorMeta, Value};

/// AdamW hyper-parameters and the step count of this update.
///
/// Signatures (element-wise, nothing is summed): `S(i), S(i), S(i), S(i) -> S(i), S(i), S(i)`
/// for every axis `i` (each device updates its slice of the parameter: ZeRO-style sharding),
/// and all-`B`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment (PyTorch default 0.9).
    pub beta1: f64,
    /// Decay of the second moment (PyTorch default 0.999).
    pub beta2: f64,
    /// Added to the denominator (PyTorch default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay (PyTorch default 0.01).
    pub weight_decay: f64,
    /// The step count `t` of this update, from 1.
    pub step: u64,
}

impl AdamW {
    /// PyTorch's defaults with learning rate `lr`, at step 1.
    pub fn new(lr: f64) -> Self {
        AdamW { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 1 }
    }
}

/// Applies one [`AdamW`] update; returns `[param, m, v]`.
pub fn adamw(
    e: &mut dyn Emit,
    config: AdamW,
    [param, grad, m, v]: [Value; 4],
) -> Result<Vec<Value>> {
    e.emit(Arc::new(config), &[param, grad, m, v])
}

/// The scalars of one update, in the accumulate type.
#[derive(Clone, Copy)]
struct Scalars<A> {
    decay: A,
    lerp: A,
    beta2: A,
    one_minus_beta2: A,
    bias2_sqrt: A,
    eps: A,
    step_size: A,
}

impl AdamW {
    fn scalars<A: Accumulate>(&self) -> Scalars<A> {
        let t = self.step as f64;
        let bias1 = 1.0 - self.beta1.powf(t);
        let bias2 = 1.0 - self.beta2.powf(t);
        Scalars {
            decay: A::constant(1.0 - self.lr * self.weight_decay),
            lerp: A::constant(1.0 - self.beta1),
            beta2: A::constant(self.beta2),
            one_minus_beta2: A::constant(1.0 - self.beta2),
            bias2_sqrt: A::constant(bias2.sqrt()),
            eps: A::constant(self.eps),
            step_size: A::constant(-(self.lr / bias1)),
        }
    }
}

impl Update for AdamW {
    const NAME: &'static str = "adamw";
    const ARITY: (usize, usize) = (4, 3);
    const FLOPS: u64 = 14;

    fn check(&self) -> Result<()> {
        let finite = [self.lr, self.beta1, self.beta2, self.eps, self.weight_decay];
        if finite.iter().any(|v| !v.is_finite()) || self.step == 0 {
            return Err(Error::argument(Self::NAME, format!("bad hyper-parameters {self:?}")));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return Err(Error::argument(Self::NAME, "betas must lie in [0, 1)"));
        }
        Ok(())
    }

    fn run<T: RowFloat>(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let s = self.scalars::<T::Acc>();
        let [p, g, m, v] = [0, 1, 2, 3].map(|i| inputs[i].as_slice::<T>());
        let (p, g, m, v) = (p?, g?, m?, v?);
        let mut outputs = [0, 2, 3]
            .map(|i| Tensor::for_overwrite(ctx, inputs[i].shape().clone(), inputs[i].dtype()));
        let [p_out, m_out, v_out] = &mut outputs;
        let (p_all, m_all, v_all) = (
            SharedRows::new(p_out.as_mut_slice::<T>()?),
            SharedRows::new(m_out.as_mut_slice::<T>()?),
            SharedRows::new(v_out.as_mut_slice::<T>()?),
        );
        for_each_range(ctx, p.len(), 1, |range| {
            // SAFETY: tasks cover disjoint element ranges, so each element has one writer.
            let new = unsafe {
                [p_all.row(range.clone()), m_all.row(range.clone()), v_all.row(range.clone())]
            };
            let r = range;
            let old = [&p[r.clone()], &g[r.clone()], &m[r.clone()], &v[r]];
            update_elements(&s, old, new);
        });
        Ok(outputs.into())
    }

    /// In place when the parameter and both moments are uniquely owned: 7 streams of memory
    /// traffic (read p, g, m, v; write p, m, v over the lines just read) instead of 10 (the
    /// fresh outputs' lines are read for ownership before they are written).
    fn run_owned<T: RowFloat>(&self, ctx: &Context, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let [mut p, g, mut m, mut v] = state_inputs::<4>(inputs)?;
        if !(p.is_unique() && m.is_unique() && v.is_unique()) {
            return self.run::<T>(ctx, &[p, g, m, v]);
        }
        let s = self.scalars::<T::Acc>();
        let grad = g.as_slice::<T>()?;
        let (p_all, m_all, v_all) = (
            SharedRows::new(p.as_mut_slice::<T>()?),
            SharedRows::new(m.as_mut_slice::<T>()?),
            SharedRows::new(v.as_mut_slice::<T>()?),
        );
        for_each_range(ctx, grad.len(), 1, |range| {
            // SAFETY: tasks cover disjoint element ranges, so each element has one writer.
            let state = unsafe {
                [p_all.row(range.clone()), m_all.row(range.clone()), v_all.row(range.clone())]
            };
            update_in_place(&s, &grad[range], state);
        });
        Ok(vec![p, m, v])
    }
}

multiversion! {
    /// The update of equal-length slices: `old = [param, grad, m, v]`, `new = [param, m, v]`,
    /// compiled for the widest vectors the CPU has (with 16 lanes it is bound by memory, not
    /// by sqrt/div).
    fn update_elements<T: RowFloat>(s: &Scalars<T::Acc>, old: [&[T]; 4], new: [&mut [T]; 3]) {
        let [p, g, m, v] = old;
        let [p_new, m_new, v_new] = new;
        let old = p.iter().zip(g).zip(m.iter().zip(v));
        let new = p_new.iter_mut().zip(m_new.iter_mut().zip(v_new.iter_mut()));
        for ((p_new, (m_new, v_new)), ((&pi, &gi), (&mi, &vi))) in new.zip(old) {
            (*p_new, *m_new, *v_new) = update_element(s, [pi, gi, mi, vi]);
        }
    }
}

multiversion! {
    /// The update of `state = [param, m, v]` in place from `grad` (equal lengths), compiled
    /// like [`update_elements`].
    fn update_in_place<T: RowFloat>(s: &Scalars<T::Acc>, grad: &[T], state: [&mut [T]; 3]) {
        let [p, m, v] = state;
        let state = p.iter_mut().zip(m.iter_mut().zip(v.iter_mut()));
        for ((p, (m, v)), &g) in state.zip(grad) {
            (*p, *m, *v) = update_element(s, [*p, g, *m, *v]);
        }
    }
}

/// One element's update: `[param, grad, m, v]` to the new `(param, m, v)`.
#[inline(always)]
fn update_element<T: RowFloat>(s: &Scalars<T::Acc>, [p, g, m, v]: [T; 4]) -> (T, T, T) {
    let (p, g) = (p.widen() * s.decay, g.widen());
    let m = lerp(m.widen(), g, s.lerp);
    let v = v.widen() * s.beta2 + s.one_minus_beta2 * g * g;
    let denom = v.sqrt() / s.bias2_sqrt + s.eps;
    (T::narrow(p + s.step_size * (m / denom)), T::narrow(m), T::narrow(v))
}

/// `torch.lerp(start, end, weight)` as its CPU kernel computes it.
#[inline(always)]
fn lerp<A: Accumulate>(start: A, end: A, weight: A) -> A {
    if weight < A::constant(0.5) {
        start + weight * (end - start)
    } else {
        end - (end - start) * (A::one() - weight)
    }
}

// ---- shared with sgd ----

/// A fused optimizer update: float tensors of one shape in (parameter, gradient, state), the
/// new parameter and state out, element by element.
pub(crate) trait Update: Clone + std::fmt::Debug + Send + Sync + 'static {
    /// The op name.
    const NAME: &'static str;
    /// Numbers of inputs and outputs.
    const ARITY: (usize, usize);
    /// Flops per element.
    const FLOPS: u64;

    /// Checks the hyper-parameters.
    fn check(&self) -> Result<()>;

    /// The kernel.
    fn run<T: RowFloat>(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>>;

    /// The kernel on inputs it may update in place (see [`crate::Op::forward_owned`]).
    fn run_owned<T: RowFloat>(&self, ctx: &Context, inputs: Vec<Tensor>) -> Result<Vec<Tensor>>;
}

/// The `N` inputs of an update as an array (the arity was checked with the metas).
pub(crate) fn state_inputs<const N: usize>(inputs: Vec<Tensor>) -> Result<[Tensor; N]> {
    let got = inputs.len();
    inputs.try_into().map_err(|_| Error::Arity { op: "optimizer update", expected: N, got })
}

/// Output metas of an [`Update`]: its state shapes, after checking inputs and hyper-parameters.
pub(crate) fn infer_update<U: Update>(
    update: &U,
    inputs: &[TensorMeta],
) -> Result<Vec<TensorMeta>> {
    check_state(U::NAME, inputs, U::ARITY.0)?;
    update.check()?;
    Ok(vec![inputs[0].clone(); U::ARITY.1])
}

/// Checks the inputs and runs the kernel of an [`Update`] for their dtype.
pub(crate) fn run_update<U: Update>(
    update: &U,
    ctx: &Context,
    inputs: &[Tensor],
) -> Result<Vec<Tensor>> {
    let metas: Vec<TensorMeta> = inputs.iter().map(|t| t.meta().clone()).collect();
    infer_update(update, &metas)?;
    crate::dispatch_float!(U::NAME, inputs[0].dtype(), T => update.run::<T>(ctx, inputs))
}

/// [`run_update`] on inputs the kernel may update in place.
pub(crate) fn run_update_owned<U: Update>(
    update: &U,
    ctx: &Context,
    inputs: Vec<Tensor>,
) -> Result<Vec<Tensor>> {
    let metas: Vec<TensorMeta> = inputs.iter().map(|t| t.meta().clone()).collect();
    infer_update(update, &metas)?;
    let dtype = inputs[0].dtype();
    crate::dispatch_float!(U::NAME, dtype, T => update.run_owned::<T>(ctx, inputs))
}

/// Element-wise signatures of an [`Update`]; none for invalid metas.
pub(crate) fn update_signatures<U: Update>(update: &U, inputs: &[TensorMeta]) -> Vec<Signature> {
    if infer_update(update, inputs).is_err() {
        return Vec::new(); // invalid metas: no signature
    }
    elementwise_signatures(inputs[0].shape.rank(), U::ARITY.0, U::ARITY.1)
}

/// Implements `Op` for an [`Update`] type: element-wise signatures, no gradient.
macro_rules! update_op {
    ($op:ty) => {
        impl $crate::Op for $op {
            fn name(&self) -> &'static str {
                <$op as $crate::ops::adamw::Update>::NAME
            }

            fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
                $crate::ops::adamw::infer_update(self, inputs)
            }

            fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
                $crate::ops::adamw::run_update(self, ctx, inputs)
            }

            fn forward_owned(&self, ctx: &Context, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
                $crate::ops::adamw::run_update_owned(self, ctx, inputs)
            }

            fn signatures(&self, inputs: &[TensorMeta]) -> Vec<meshflow_placement::Signature> {
                $crate::ops::adamw::update_signatures(self, inputs)
            }

            fn backward(
                &self,
                _e: &mut dyn Emit,
                _inputs: &[Value],
                _outputs: &[Value],
                grads: &[Option<Value>],
            ) -> Result<Vec<Option<Value>>> {
                let inputs = <$op as $crate::ops::adamw::Update>::ARITY.0;
                $crate::ops::adamw::not_differentiable(self.name(), grads, inputs)
            }

            fn flops(&self, inputs: &[TensorMeta]) -> u64 {
                let per_element = <$op as $crate::ops::adamw::Update>::FLOPS;
                per_element * inputs.first().map_or(0, |x| x.shape.numel() as u64)
            }
        }
    };
}
pub(crate) use update_op;

update_op!(AdamW);

/// Every input is a float tensor of one shape and dtype.
pub(crate) fn check_state(op: &'static str, inputs: &[TensorMeta], arity: usize) -> Result<()> {
    if inputs.len() != arity {
        return Err(Error::Arity { op, expected: arity, got: inputs.len() });
    }
    let first = &inputs[0];
    if !first.dtype.is_float() || inputs.iter().any(|t| t.dtype != first.dtype) {
        let dtypes: Vec<_> = inputs.iter().map(|t| t.dtype).collect();
        return Err(Error::dtype(op, &dtypes, "parameter and state need one float dtype"));
    }
    if inputs.iter().any(|t| t.shape != first.shape) {
        let shapes: Vec<_> = inputs.iter().map(|t| &t.shape).collect();
        return Err(Error::shape(op, &shapes, "parameter and state need one shape"));
    }
    Ok(())
}

/// `S(i)` everywhere for every axis, and all-`B`.
pub(crate) fn elementwise_signatures(rank: usize, inputs: usize, outputs: usize) -> Vec<Signature> {
    let mut signatures = vec![Signature::broadcast(inputs, outputs)];
    signatures.extend(
        (0..rank)
            .map(|i| Signature::new(vec![Sbp::Split(i); inputs], vec![Sbp::Split(i); outputs])),
    );
    signatures
}

/// Optimizer updates are not differentiated: no gradient flows to their inputs.
pub(crate) fn not_differentiable(
    op: &'static str,
    grads: &[Option<Value>],
    inputs: usize,
) -> Result<Vec<Option<Value>>> {
    if grads.iter().any(Option::is_some) {
        return Err(Error::argument(op, "an optimizer update has no gradient"));
    }
    Ok(vec![None; inputs])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{DType, Op};

    /// Parameter, gradient and moments of `n` elements (`v` non-negative), as `dtype`.
    pub(crate) fn state(n: usize, dtype: DType, count: usize) -> Vec<Tensor> {
        (0..count as u64)
            .map(|seed| {
                let t = Tensor::randn(vec![n], 0.0, 1.0, DType::F32, seed + 7).expect("randn");
                let mut values = t.to_vec::<f32>().expect("f32");
                if seed == 3 {
                    values.iter_mut().for_each(|x| *x = *x * *x);
                }
                match dtype {
                    DType::BF16 => {
                        let values: Vec<half::bf16> =
                            values.into_iter().map(half::bf16::from_f32).collect();
                        Tensor::from_vec(values, [n]).expect("bf16")
                    }
                    _ => Tensor::from_vec(values, [n]).expect("f32"),
                }
            })
            .collect()
    }

    /// Where a tensor's bytes live.
    pub(crate) fn address(t: &Tensor) -> usize {
        t.bytes().expect("host").as_ptr() as usize
    }

    #[test]
    fn owned_unique_state_is_updated_in_place_bit_for_bit() {
        let ctx = Context::with_threads(2);
        let adam = AdamW { step: 3, weight_decay: 0.1, ..AdamW::new(1e-2) };
        for dtype in [DType::F32, DType::BF16] {
            // 100_003 elements: several tasks and a tail that is no multiple of the vector width.
            let inputs = state(100_003, dtype, 4);
            let expected = adam.forward(&ctx, &inputs).expect("out of place");
            let owned: Vec<Tensor> = inputs
                .iter()
                .map(|t| t.reshaped(t.shape().clone()))
                .collect::<Result<_>>()
                .expect("view");
            // The views share storage with `inputs`: the update must not write them in place.
            let shared = adam.forward_owned(&ctx, owned).expect("shared");
            let copies: Vec<Tensor> = inputs
                .iter()
                .map(|t| Tensor::from_bytes(t.bytes().unwrap(), t.shape().clone(), dtype))
                .collect::<Result<_>>()
                .expect("copy");
            let before = [0, 2, 3].map(|i| address(&copies[i]));
            let unique = adam.forward_owned(&ctx, copies).expect("in place");
            for (j, ((e, s), u)) in expected.iter().zip(&shared).zip(&unique).enumerate() {
                assert_eq!(e.bytes().unwrap(), s.bytes().unwrap(), "{dtype} shared out.{j}");
                assert_eq!(e.bytes().unwrap(), u.bytes().unwrap(), "{dtype} in place out.{j}");
                assert_eq!(address(u), before[j], "{dtype} out.{j} reuses its input");
                assert_ne!(address(s), address(&inputs[[0, 2, 3][j]]), "{dtype} out.{j} is fresh");
            }
            let again = adam.forward(&ctx, &inputs).expect("inputs intact");
            assert_eq!(again[0].bytes().unwrap(), expected[0].bytes().unwrap(), "{dtype}");
        }
    }

    #[test]
    fn owned_update_checks_its_inputs() {
        let ctx = Context::single_thread();
        let mut inputs = state(8, DType::F32, 4);
        inputs[3] = Tensor::zeros([9], DType::F32);
        let error = AdamW::new(1e-3).forward_owned(&ctx, inputs).expect_err("shapes differ");
        assert!(error.to_string().contains("adamw"), "{error}");
        let error = AdamW::new(1e-3).forward_owned(&ctx, Vec::new()).expect_err("no inputs");
        assert!(error.to_string().contains("adamw"), "{error}");
    }
}
