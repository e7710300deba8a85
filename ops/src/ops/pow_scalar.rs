//! `pow_scalar`: y = xᵖ for a constant exponent, element-wise.

use crate::cpu::Special;
use crate::ops::unary::{apply, Pointwise};
use crate::ops::{mul::mul, mul_scalar::mul_scalar};
use crate::{Emit, Result, Value};

/// Raises to the constant power `exponent` (NaN for negative `x` and a fractional exponent).
///
/// Signatures, per device `d`: `S(i) -> S(i)` and `B -> B` (`y_d = x_dᵖ`).
#[derive(Clone, Debug)]
pub struct PowScalar {
    /// The exponent.
    pub exponent: f64,
}

/// Applies [`PowScalar`].
pub fn pow_scalar(e: &mut dyn Emit, x: Value, exponent: f64) -> Result<Value> {
    apply(e, PowScalar { exponent }, x)
}

impl Pointwise for PowScalar {
    const NAME: &'static str = "pow_scalar";

    #[inline(always)]
    fn apply<A: Special, const FUSED: bool>(&self, x: A) -> A {
        if self.exponent == 2.0 {
            x * x
        } else {
            x.powf(A::constant(self.exponent))
        }
    }

    /// `dx = g · p · xᵖ⁻¹`.
    fn gradient(&self, e: &mut dyn Emit, x: Value, _y: Value, g: Value) -> Result<Value> {
        if self.exponent == 0.0 {
            return mul_scalar(e, g, 0.0);
        }
        let lower = pow_scalar(e, x, self.exponent - 1.0)?;
        let slope = mul_scalar(e, lower, self.exponent)?;
        mul(e, g, slope)
    }
}
