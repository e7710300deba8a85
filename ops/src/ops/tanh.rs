//! `tanh`: y = tanh x, element-wise.

use crate::cpu::Special;
use crate::ops::unary::{apply, Pointwise};
use crate::ops::{add_scalar::add_scalar, mul::mul, neg::neg};
use crate::{Emit, Result, Value};

/// y = tanh x, element-wise.
///
/// Signatures, per device `d`: `S(i) -> S(i)` and `B -> B` (`y_d = tanh(x_d)`).
#[derive(Clone, Debug, Default)]
pub struct Tanh;

/// Applies [`Tanh`].
pub fn tanh(e: &mut dyn Emit, x: Value) -> Result<Value> {
    apply(e, Tanh, x)
}

impl Pointwise for Tanh {
    const NAME: &'static str = "tanh";

    #[inline(always)]
    fn apply<A: Special, const FUSED: bool>(&self, x: A) -> A {
        x.tanh()
    }

    fn gradient(&self, e: &mut dyn Emit, _x: Value, y: Value, g: Value) -> Result<Value> {
        let square = mul(e, y, y)?;
        let slope = add_scalar(e, square, -1.0)?;
        let negative = mul(e, g, slope)?;
        neg(e, negative)
    }
}
