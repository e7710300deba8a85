//! `log`: y = ln x, element-wise.

use crate::cpu::Special;
use crate::ops::div::div;
use crate::ops::unary::{apply, Pointwise};
use crate::{Emit, Result, Value};

/// y = ln x, element-wise.
///
/// Signatures, per device `d`: `S(i) -> S(i)` and `B -> B` (`y_d = log(x_d)`).
#[derive(Clone, Debug, Default)]
pub struct Log;

/// Applies [`Log`].
pub fn log(e: &mut dyn Emit, x: Value) -> Result<Value> {
    apply(e, Log, x)
}

impl Pointwise for Log {
    const NAME: &'static str = "log";

    #[inline(always)]
    fn apply<A: Special, const FUSED: bool>(&self, x: A) -> A {
        x.ln()
    }

    fn gradient(&self, e: &mut dyn Emit, x: Value, _y: Value, g: Value) -> Result<Value> {
        div(e, g, x)
    }
}
