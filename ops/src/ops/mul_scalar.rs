//! `mul_scalar`: y = c · x, element-wise.

use crate::cpu::Special;
use crate::ops::unary::{apply, Pointwise};
use crate::{Emit, Result, Value};

/// Multiplies by the constant `value`.
///
/// Signatures, per device `d`: `S(i) -> S(i)`, `B -> B` (`y_d = c·x_d`) and `P -> P`
/// (`Σ_d c·x_d = c·x`).
#[derive(Clone, Debug)]
pub struct MulScalar {
    /// The constant.
    pub value: f64,
}

/// Applies [`MulScalar`].
pub fn mul_scalar(e: &mut dyn Emit, x: Value, value: f64) -> Result<Value> {
    apply(e, MulScalar { value }, x)
}

impl Pointwise for MulScalar {
    const NAME: &'static str = "mul_scalar";
    const LINEAR: bool = true;

    #[inline(always)]
    fn apply<A: Special, const FUSED: bool>(&self, x: A) -> A {
        x * A::constant(self.value)
    }

    fn gradient(&self, e: &mut dyn Emit, _x: Value, _y: Value, g: Value) -> Result<Value> {
        mul_scalar(e, g, self.value)
    }
}
