//! `exp`: y = eˣ, element-wise.

use crate::cpu::Special;
use crate::ops::mul::mul;
use crate::ops::unary::{apply, Pointwise};
use crate::{Emit, Result, Value};

/// y = eˣ, element-wise.
///
/// Signatures, per device `d`: `S(i) -> S(i)` and `B -> B` (`y_d = exp(x_d)`).
#[derive(Clone, Debug, Default)]
pub struct Exp;

/// Applies [`Exp`].
pub fn exp(e: &mut dyn Emit, x: Value) -> Result<Value> {
    apply(e, Exp, x)
}

impl Pointwise for Exp {
    const NAME: &'static str = "exp";

    #[inline(always)]
    fn apply<A: Special, const FUSED: bool>(&self, x: A) -> A {
        x.exp()
    }

    fn gradient(&self, e: &mut dyn Emit, _x: Value, y: Value, g: Value) -> Result<Value> {
        mul(e, g, y)
    }
}
