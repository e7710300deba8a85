//! `rsqrt`: y = 1/√x, element-wise.

use crate::cpu::Special;
use crate::ops::unary::{apply, Pointwise};
use crate::ops::{mul::mul, mul_scalar::mul_scalar, pow_scalar::pow_scalar};
use crate::{Emit, Result, Value};

/// y = 1/√x, element-wise.
///
/// Signatures, per device `d`: `S(i) -> S(i)` and `B -> B` (`y_d = rsqrt(x_d)`).
#[derive(Clone, Debug, Default)]
pub struct Rsqrt;

/// Applies [`Rsqrt`].
pub fn rsqrt(e: &mut dyn Emit, x: Value) -> Result<Value> {
    apply(e, Rsqrt, x)
}

impl Pointwise for Rsqrt {
    const NAME: &'static str = "rsqrt";

    #[inline(always)]
    fn apply<A: Special, const FUSED: bool>(&self, x: A) -> A {
        x.sqrt().recip()
    }

    fn gradient(&self, e: &mut dyn Emit, _x: Value, y: Value, g: Value) -> Result<Value> {
        let cube = pow_scalar(e, y, 3.0)?;
        let scaled = mul_scalar(e, cube, -0.5)?;
        mul(e, g, scaled)
    }
}
