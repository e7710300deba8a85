//! `relu`: y = max(x, 0), element-wise.

use crate::cpu::Special;
use crate::ops::unary::{apply, grad_of, Differentiable, Pointwise};
use crate::{Emit, Result, Value};

/// Rectified linear unit.
///
/// Signatures, per device `d`: `S(i) -> S(i)` and `B -> B` (`y_d = relu(x_d)`).
/// Backward: `relu_grad(x, g) = g · [x > 0]`, one fused kernel.
#[derive(Clone, Debug, Default)]
pub struct Relu;

/// Applies [`Relu`].
pub fn relu(e: &mut dyn Emit, x: Value) -> Result<Value> {
    apply(e, Relu, x)
}

impl Pointwise for Relu {
    const NAME: &'static str = "relu";

    #[inline(always)]
    fn apply<A: Special, const FUSED: bool>(&self, x: A) -> A {
        if x > A::zero() {
            x
        } else {
            A::zero()
        }
    }

    fn gradient(&self, e: &mut dyn Emit, x: Value, _y: Value, g: Value) -> Result<Value> {
        grad_of(e, Relu, x, g)
    }
}

impl Differentiable for Relu {
    const GRAD_NAME: &'static str = "relu_grad";
    const BIAS_NAME: &'static str = "bias_relu";
    const BIAS_GRAD_NAME: &'static str = "bias_relu_grad";
    const SECOND_DERIVATIVE_ZERO: bool = true;

    #[inline(always)]
    fn derivative<A: Special, const FUSED: bool>(&self, x: A) -> A {
        if x > A::zero() {
            A::one()
        } else {
            A::zero()
        }
    }
}
