//! What the element-wise unary ops share: a [`Pointwise`] function becomes an op through
//! [`Unary`]; a function with a fused derivative kernel also gets [`GradOf`], the op
//! `(x, g) -> g · f'(x)` its backward uses.

use std::fmt;

use meshflow_placement::{Sbp, Signature};

use crate::cpu::{Map1, Map2, Special};
use crate::{emit1, Context, Emit, Error, Op, Result, Tensor, TensorMeta, Value};

/// An element-wise function `y = f(x)` on floats.
pub trait Pointwise: Clone + fmt::Debug + Send + Sync + 'static {
    /// The op name.
    const NAME: &'static str;
    /// True when `f` is linear (`f(a + b) = f(a) + f(b)`): then `P -> P` is a signature.
    const LINEAR: bool = false;

    /// `f(x)`, computed in f32 (for f32, bf16, f16) or f64; `FUSED` as in
    /// [`crate::cpu::Map1::call`].
    fn apply<A: Special, const FUSED: bool>(&self, x: A) -> A;

    /// The gradient of `x` given the output gradient `g`, built with other ops.
    fn gradient(&self, e: &mut dyn Emit, x: Value, y: Value, g: Value) -> Result<Value>;
}

/// A [`Pointwise`] function with a fused derivative kernel.
pub trait Differentiable: Pointwise {
    /// The name of the derivative op, e.g. `gelu_grad`.
    const GRAD_NAME: &'static str;
    /// The name of `f(x + b)` with a bias along the last axis
    /// ([`crate::ops::bias_act::BiasAct`]), e.g. `bias_gelu`.
    const BIAS_NAME: &'static str;
    /// The name of its gradient ([`crate::ops::bias_act::BiasActGrad`]), e.g. `bias_gelu_grad`.
    const BIAS_GRAD_NAME: &'static str;
    /// True when `f'' = 0` almost everywhere (relu), so `GradOf` is differentiable.
    const SECOND_DERIVATIVE_ZERO: bool = false;

    /// `f'(x)`; `FUSED` as in [`Pointwise::apply`].
    fn derivative<A: Special, const FUSED: bool>(&self, x: A) -> A;
}

/// The op computing a [`Pointwise`] function element-wise.
///
/// Signatures, per device `d`: `S(i) -> S(i)` and `B -> B` (`y_d = f(x_d)`); `P -> P` when
/// `f` is linear (`Σ_d f(x_d) = f(Σ_d x_d)`).
#[derive(Clone, Debug)]
pub struct Unary<P>(pub P);

/// Applies `f` through [`Unary`].
pub fn apply<P: Pointwise>(e: &mut dyn Emit, f: P, x: Value) -> Result<Value> {
    emit1(e, Unary(f), &[x])
}

/// One float input; its meta.
pub fn infer_float(op: &'static str, inputs: &[TensorMeta]) -> Result<TensorMeta> {
    let [x] = inputs else {
        return Err(Error::Arity { op, expected: 1, got: inputs.len() });
    };
    if !x.dtype.is_float() {
        return Err(Error::dtype(op, &[x.dtype], "needs a float dtype"));
    }
    Ok(x.clone())
}

/// `S(i) -> S(i)` for every axis, `B -> B`, and `P -> P` when `linear`.
pub fn elementwise_signatures(inputs: &[TensorMeta], linear: bool) -> Vec<Signature> {
    let mut signatures = vec![Signature::broadcast(1, 1)];
    if linear {
        signatures.push(Signature::new([Sbp::PartialSum], [Sbp::PartialSum]));
    }
    let rank = inputs.first().map_or(0, |x| x.shape.rank());
    signatures.extend((0..rank).map(|i| Signature::new([Sbp::Split(i)], [Sbp::Split(i)])));
    signatures
}

impl<P: Pointwise> Op for Unary<P> {
    fn name(&self) -> &'static str {
        P::NAME
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        Ok(vec![infer_float(P::NAME, inputs)?])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.forward_owned(ctx, inputs.to_vec())
    }

    /// In `x`'s storage when nothing else holds it.
    fn forward_owned(&self, ctx: &Context, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let got = inputs.len();
        let Ok([x]) = <[Tensor; 1]>::try_from(inputs) else {
            return Err(Error::Arity { op: P::NAME, expected: 1, got });
        };
        let out = crate::dispatch_float!(P::NAME, x.dtype(), T => {
            crate::cpu::unary_owned::<T, _>(ctx, x, &Apply(&self.0))
        })?;
        Ok(vec![out])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        elementwise_signatures(inputs, P::LINEAR)
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let gradient = grads[0].map(|g| self.0.gradient(e, inputs[0], outputs[0], g));
        Ok(vec![gradient.transpose()?])
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }
}

/// `f(x)` of a [`Pointwise`] function, called by name in the vectorised element loop.
struct Apply<'a, P>(&'a P);

impl<P: Pointwise, A: Special> Map1<A> for Apply<'_, P> {
    #[inline(always)]
    fn call<const FUSED: bool>(&self, x: A) -> A {
        self.0.apply::<A, FUSED>(x)
    }
}

/// `g · f'(x)` of a [`Differentiable`] function, called by name in the vectorised element loop.
struct Derivative<'a, P>(&'a P);

impl<P: Differentiable, A: Special> Map2<A> for Derivative<'_, P> {
    #[inline(always)]
    fn call<const FUSED: bool>(&self, x: A, g: A) -> A {
        g * self.0.derivative::<A, FUSED>(x)
    }
}

/// `dx = g · f'(x)` in one kernel.
///
/// Signatures, per device `d`: `S(i), S(i) -> S(i)` and `B, B -> B`
/// (`dx_d = g_d · f'(x_d)`); `B, P -> P` (linear in `g`).
#[derive(Clone, Debug)]
pub struct GradOf<P>(pub P);

/// Applies [`GradOf`]: `g · f'(x)`.
pub fn grad_of<P: Differentiable>(e: &mut dyn Emit, f: P, x: Value, g: Value) -> Result<Value> {
    emit1(e, GradOf(f), &[x, g])
}

impl<P: Differentiable> Op for GradOf<P> {
    fn name(&self) -> &'static str {
        P::GRAD_NAME
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let [x, g] = inputs else {
            return Err(Error::Arity { op: P::GRAD_NAME, expected: 2, got: inputs.len() });
        };
        if x != g || !x.dtype.is_float() {
            return Err(Error::Shape {
                op: P::GRAD_NAME,
                shapes: vec![x.shape.clone(), g.shape.clone()],
                reason: format!(
                    "needs x and g of one shape and float dtype ({}, {})",
                    x.dtype, g.dtype
                ),
            });
        }
        Ok(vec![x.clone()])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.forward_owned(ctx, inputs.to_vec())
    }

    /// In the storage of `x` (or else `g`) when nothing else holds it.
    fn forward_owned(&self, ctx: &Context, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let metas: Vec<TensorMeta> = inputs.iter().map(|t| t.meta().clone()).collect();
        self.infer(&metas)?;
        let shape = metas[0].shape.clone();
        let [x, g] = <[Tensor; 2]>::try_from(inputs).map_err(|inputs| Error::Arity {
            op: P::GRAD_NAME,
            expected: 2,
            got: inputs.len(),
        })?;
        let out = crate::dispatch_float!(P::GRAD_NAME, x.dtype(), T => {
            crate::cpu::binary_owned::<T, _>(ctx, x, g, &shape, &Derivative(&self.0))
        })?;
        Ok(vec![out])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        let (b, p) = (Sbp::Broadcast, Sbp::PartialSum);
        let mut signatures = vec![Signature::broadcast(2, 1), Signature::new([b, p], [p])];
        let rank = inputs.first().map_or(0, |x| x.shape.rank());
        signatures.extend(
            (0..rank).map(|i| Signature::new([Sbp::Split(i), Sbp::Split(i)], [Sbp::Split(i)])),
        );
        signatures
    }

    /// `d/dg = f'(x)·gg` (this op again); `d/dx = g·f''(x)·gg` is supported only when `f'' = 0`.
    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let Some(gg) = grads[0] else { return Ok(vec![None, None]) };
        if !P::SECOND_DERIVATIVE_ZERO {
            return Err(Error::argument(
                P::GRAD_NAME,
                format!("the second derivative of {} is not available", P::NAME),
            ));
        }
        Ok(vec![None, Some(grad_of(e, self.0.clone(), inputs[0], gg)?)])
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        inputs.first().map_or(0, |x| 2 * x.shape.numel() as u64)
    }
}
