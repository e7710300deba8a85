//! `add_scalar`: y = x + c, element-wise.

use crate::cpu::Special;
use crate::ops::unary::{apply, Pointwise};
use crate::{Emit, Result, Value};

/// Adds the constant `value`.
///
/// Signatures, per device `d`: `S(i) -> S(i)` and `B -> B` (`y_d = x_d + c`); not `P -> P`
/// (each addend would add `c`).
#[derive(Clone, Debug)]
pub struct AddScalar {
    /// The constant.
    pub value: f64,
}

/// Applies [`AddScalar`].
pub fn add_scalar(e: &mut dyn Emit, x: Value, value: f64) -> Result<Value> {
    apply(e, AddScalar { value }, x)
}

impl Pointwise for AddScalar {
    const NAME: &'static str = "add_scalar";

    #[inline(always)]
    fn apply<A: Special, const FUSED: bool>(&self, x: A) -> A {
        x + A::constant(self.value)
    }

    fn gradient(&self, _e: &mut dyn Emit, _x: Value, _y: Value, g: Value) -> Result<Value> {
        Ok(g)
    }
}
