//! `sigmoid`: y = 1 / (1 + e⁻ˣ), element-wise.

use crate::cpu::Special;
use crate::ops::unary::{apply, Pointwise};
use crate::ops::{mul::mul, sub::sub};
use crate::{Emit, Result, Value};

/// y = 1 / (1 + e⁻ˣ), element-wise.
///
/// Signatures, per device `d`: `S(i) -> S(i)` and `B -> B` (`y_d = sigmoid(x_d)`).
#[derive(Clone, Debug, Default)]
pub struct Sigmoid;

/// Applies [`Sigmoid`].
pub fn sigmoid(e: &mut dyn Emit, x: Value) -> Result<Value> {
    apply(e, Sigmoid, x)
}

impl Pointwise for Sigmoid {
    const NAME: &'static str = "sigmoid";

    #[inline(always)]
    fn apply<A: Special, const FUSED: bool>(&self, x: A) -> A {
        (A::one() + (-x).exp()).recip()
    }

    fn gradient(&self, e: &mut dyn Emit, _x: Value, y: Value, g: Value) -> Result<Value> {
        let square = mul(e, y, y)?;
        let slope = sub(e, y, square)?;
        mul(e, g, slope)
    }
}
