//! `gelu`: y = x · Φ(x), element-wise, exact (erf) or with the tanh approximation.

use std::any::TypeId;

use crate::cpu::Special;
use crate::ops::nn_rows::{exp_f32, multiply_add};
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
#[inline(always)]
fn inner<A: Special>(x: A) -> A {
    A::constant((2.0 / std::f64::consts::PI).sqrt()) * (x + A::constant(CUBIC) * x * x * x)
}

impl Pointwise for Gelu {
    const NAME: &'static str = "gelu";

    #[inline(always)]
    fn apply<A: Special, const FUSED: bool>(&self, x: A) -> A {
        if self.tanh {
            // 0.5·(1 + tanh(u)) = σ(2u): one exp and a division, no cancellation near −1.
            x * sigmoid::<A, FUSED>(inner(x) + inner(x))
        } else {
            A::constant(0.5) * x * (A::one() + erf::<A, FUSED>(x * A::FRAC_1_SQRT_2()))
        }
    }

    fn gradient(&self, e: &mut dyn Emit, x: Value, _y: Value, g: Value) -> Result<Value> {
        grad_of(e, self.clone(), x, g)
    }
}

impl Differentiable for Gelu {
    const GRAD_NAME: &'static str = "gelu_grad";
    const BIAS_NAME: &'static str = "bias_gelu";
    const BIAS_GRAD_NAME: &'static str = "bias_gelu_grad";

    #[inline(always)]
    fn derivative<A: Special, const FUSED: bool>(&self, x: A) -> A {
        if self.tanh {
            // d/dx x·σ(2u) = σ + 2x·σ·(1 − σ)·u'.
            let s = sigmoid::<A, FUSED>(inner(x) + inner(x));
            let slope = A::constant((2.0 / std::f64::consts::PI).sqrt())
                * (A::one() + A::constant(3.0 * CUBIC) * x * x);
            s + (x + x) * s * (A::one() - s) * slope
        } else {
            let half = A::constant(0.5);
            let cdf = half * (A::one() + erf::<A, FUSED>(x * A::FRAC_1_SQRT_2()));
            let pdf = exp::<A, FUSED>(-half * x * x)
                * A::constant(1.0 / (2.0 * std::f64::consts::PI).sqrt());
            cdf + x * pdf
        }
    }
}

/// `1 / (1 + e^(−x))`.
#[inline(always)]
fn sigmoid<A: Special, const FUSED: bool>(x: A) -> A {
    A::one() / (A::one() + exp::<A, FUSED>(-x))
}

/// `e^x`: the branch-free polynomial [`exp_f32`] for f32 (so the loop vectorises), libm's for
/// f64; `FUSED` as in [`Pointwise::apply`].
#[inline(always)]
fn exp<A: Special, const FUSED: bool>(x: A) -> A {
    match as_f32(x) {
        Some(v) => from_f32(exp_f32::<FUSED>(v)),
        None => x.exp(),
    }
}

/// `erf(x)`: the branch-free rational [`erf_f32`] for f32, libm's for f64 (the rational one is
/// only f32-accurate); `FUSED` as in [`Pointwise::apply`].
#[inline(always)]
fn erf<A: Special, const FUSED: bool>(x: A) -> A {
    match as_f32(x) {
        Some(v) => from_f32(erf_f32::<FUSED>(v)),
        None => x.erf(),
    }
}

/// `x` when `A` is f32 (decided at compile time: the match folds away).
#[inline(always)]
fn as_f32<A: Special>(x: A) -> Option<f32> {
    if TypeId::of::<A>() == TypeId::of::<f32>() {
        x.to_f32()
    } else {
        None
    }
}

/// `v` as `A`, which [`as_f32`] found to be f32.
#[inline(always)]
fn from_f32<A: Special>(v: f32) -> A {
    A::from(v).unwrap_or_else(A::nan)
}

/// Branch-free `erf` for f32: Eigen's rational approximation `x·P(x²)/Q(x²)` on `[−4, 4]`
/// (within an ulp of ±1 outside), relative error below 5e-7 (4 ulp); NaN stays NaN. `FUSED`:
/// the polynomials' multiply-adds as FMA instructions (a third fewer vector instructions:
/// `gelu` over `[4096, 1024]`, 2 threads, 1.28 -> 0.94 ms).
#[inline(always)]
pub(crate) fn erf_f32<const FUSED: bool>(x: f32) -> f32 {
    const NUMERATOR: [f32; 7] = [
        -2.726_142_3e-10,
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_6e-3,
        -1.609_603_3e-2,
    ];
    const DENOMINATOR: [f32; 5] =
        [-1.456_607_2e-5, -2.133_740_6e-4, -1.682_827e-3, -7.373_329_2e-3, -1.426_474e-2];
    let x = x.clamp(-4.0, 4.0); // NaN stays NaN
    let square = x * x;
    let fma = multiply_add::<FUSED>;
    let numerator = NUMERATOR.iter().fold(0.0, |p, &c| fma(p, square, c));
    let denominator = DENOMINATOR.iter().fold(0.0, |q, &c| fma(q, square, c));
    x * numerator / denominator
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both roundings of the polynomials: multiply then add, and one FMA.
    fn erf_f32_matches_libm_within_five_ulp_with<const FUSED: bool>() {
        let mut worst = 0.0f64;
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            let expected = Special::erf(f64::from(x));
            let got = f64::from(erf_f32::<FUSED>(x));
            let relative = (got - expected).abs() / expected.abs().max(1e-30);
            worst = worst.max(relative);
        }
        assert!(worst < 6e-7, "worst relative error {worst}, fused {FUSED}");
        assert!((erf_f32::<FUSED>(10.0) - 1.0).abs() <= f32::EPSILON);
        assert!((erf_f32::<FUSED>(-10.0) + 1.0).abs() <= f32::EPSILON);
        assert!(erf_f32::<FUSED>(f32::NAN).is_nan());
    }

    #[test]
    fn erf_f32_matches_libm_within_five_ulp() {
        erf_f32_matches_libm_within_five_ulp_with::<false>();
        erf_f32_matches_libm_within_five_ulp_with::<true>();
    }

    fn f32_gelu_and_its_derivative_track_f64_with<const FUSED: bool>() {
        for (tanh, i) in [false, true].into_iter().flat_map(|t| (-800..=800).map(move |i| (t, i))) {
            let gelu = Gelu { tanh };
            let x = i as f32 * 0.01;
            let value = gelu.apply::<f32, FUSED>(x);
            let slope = gelu.derivative::<f32, FUSED>(x);
            let want = gelu.apply::<f64, false>(f64::from(x));
            let want_slope = gelu.derivative::<f64, false>(f64::from(x));
            assert!((f64::from(value) - want).abs() < 2e-6 * (1.0 + want.abs()), "gelu({x})");
            let message = format!("gelu'({x}), tanh {tanh}, fused {FUSED}");
            assert!((f64::from(slope) - want_slope).abs() < 2e-6, "{message}");
        }
    }

    #[test]
    fn f32_gelu_and_its_derivative_track_f64() {
        f32_gelu_and_its_derivative_track_f64_with::<false>();
        f32_gelu_and_its_derivative_track_f64_with::<true>();
    }
}
