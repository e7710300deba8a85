//! `gelu`: y = x · Φ(x), element-wise, exact (erf) or with the tanh approximation.

use crate::cpu::Special;
use crate::ops::unary::{apply, grad_of, Differentiable, Pointwise};
use crate::{Emit, Result, Value};

/// Gaussian error linear unit, as `torch.nn.functional.gelu(x, approximate=…)`:
/// exact `0.5·x·(1 + erf(x/√2))`, or `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` when `tanh`.
///
/// Signatures, per device `d`: `S(i) -> S(i)` and `B -> B` (`y_d = gelu(x_d)`).
/// Backward: `gelu_grad(x, g) = g · gelu'(x)`, one fused kernel.
#[derive(Clone, Debug, Default)]
pub struct Gelu {
    /// Use the tanh approximation.
    pub tanh: bool,
}

/// Applies [`Gelu`].
pub fn gelu(e: &mut dyn Emit, x: Value, tanh: bool) -> Result<Value> {
    apply(e, Gelu { tanh }, x)
}

const CUBIC: f64 = 0.044715;

/// `√(2/π)·(x + 0.044715·x³)`.
fn inner<A: Special>(x: A) -> A {
    A::constant((2.0 / std::f64::consts::PI).sqrt()) * (x + A::constant(CUBIC) * x * x * x)
}

impl Pointwise for Gelu {
    const NAME: &'static str = "gelu";

    fn apply<A: Special>(&self, x: A) -> A {
        let half = A::constant(0.5);
        if self.tanh {
            half * x * (A::one() + inner(x).tanh())
        } else {
            half * x * (A::one() + (x * A::FRAC_1_SQRT_2()).erf())
        }
    }

    fn gradient(&self, e: &mut dyn Emit, x: Value, _y: Value, g: Value) -> Result<Value> {
        grad_of(e, self.clone(), x, g)
    }
}

impl Differentiable for Gelu {
    const GRAD_NAME: &'static str = "gelu_grad";

    fn derivative<A: Special>(&self, x: A) -> A {
        let half = A::constant(0.5);
        if self.tanh {
            let t = inner(x).tanh();
            let slope = A::constant((2.0 / std::f64::consts::PI).sqrt())
                * (A::one() + A::constant(3.0 * CUBIC) * x * x);
            half * (A::one() + t) + half * x * (A::one() - t * t) * slope
        } else {
            let cdf = half * (A::one() + (x * A::FRAC_1_SQRT_2()).erf());
            let pdf =
                (-half * x * x).exp() * A::constant(1.0 / (2.0 * std::f64::consts::PI).sqrt());
            cdf + x * pdf
        }
    }
}
