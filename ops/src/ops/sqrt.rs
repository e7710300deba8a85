//! `sqrt`: y = √x, element-wise.

use crate::cpu::Special;
use crate::ops::unary::{apply, Pointwise};
use crate::ops::{div::div, mul_scalar::mul_scalar};
use crate::{Emit, Result, Value};

/// y = √x, element-wise.
///
/// Signatures, per device `d`: `S(i) -> S(i)` and `B -> B` (`y_d = sqrt(x_d)`).
#[derive(Clone, Debug, Default)]
pub struct Sqrt;

/// Applies [`Sqrt`].
pub fn sqrt(e: &mut dyn Emit, x: Value) -> Result<Value> {
    apply(e, Sqrt, x)
}

impl Pointwise for Sqrt {
    const NAME: &'static str = "sqrt";

    #[inline(always)]
    fn apply<A: Special, const FUSED: bool>(&self, x: A) -> A {
        x.sqrt()
    }

    fn gradient(&self, e: &mut dyn Emit, _x: Value, y: Value, g: Value) -> Result<Value> {
        let quotient = div(e, g, y)?;
        mul_scalar(e, quotient, 0.5)
    }
}
