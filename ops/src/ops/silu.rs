//! `silu`: y = x · σ(x), element-wise (also called swish).

use crate::cpu::Special;
use crate::ops::unary::{apply, grad_of, Differentiable, Pointwise};
use crate::{Emit, Result, Value};

/// Sigmoid-weighted linear unit.
///
/// Signatures, per device `d`: `S(i) -> S(i)` and `B -> B` (`y_d = silu(x_d)`).
/// Backward: `silu_grad(x, g) = g · σ(x)(1 + x(1 − σ(x)))`, one fused kernel.
#[derive(Clone, Debug, Default)]
pub struct Silu;

/// Applies [`Silu`].
pub fn silu(e: &mut dyn Emit, x: Value) -> Result<Value> {
    apply(e, Silu, x)
}

fn sigmoid<A: Special>(x: A) -> A {
    (A::one() + (-x).exp()).recip()
}

impl Pointwise for Silu {
    const NAME: &'static str = "silu";

    #[inline(always)]
    fn apply<A: Special, const FUSED: bool>(&self, x: A) -> A {
        x * sigmoid(x)
    }

    fn gradient(&self, e: &mut dyn Emit, x: Value, _y: Value, g: Value) -> Result<Value> {
        grad_of(e, Silu, x, g)
    }
}

impl Differentiable for Silu {
    const GRAD_NAME: &'static str = "silu_grad";
    const BIAS_NAME: &'static str = "bias_silu";
    const BIAS_GRAD_NAME: &'static str = "bias_silu_grad";

    #[inline(always)]
    fn derivative<A: Special, const FUSED: bool>(&self, x: A) -> A {
        let s = sigmoid(x);
        s * (A::one() + x * (A::one() - s))
    }
}
