//! `rms_norm` over the last axis with a weight, and its fused gradient [`RmsNormGrad`].
//!
//! `y = x · rstd · w` with `rstd = 1 / sqrt(mean(x²) + eps)` over the last axis, as
//! `torch.nn.functional.rms_norm`. The backward recomputes `rstd` per row.

use super::layer_norm::{norm_op, NormGrad, RowNorm};
use crate::{emit1, Context, Emit, Result, Tensor, TensorMeta, Value};

/// RMS normalisation over the last axis: inputs `x [..., D]`, `weight [D]`; output `y [..., D]`.
///
/// Signatures, per device `d` (rows are independent, the last axis must be whole):
/// - `S(i), B -> S(i)` for every axis `i` but the last: each device normalises its rows;
/// - `B, B -> B`.
#[derive(Clone, Debug, PartialEq)]
pub struct RmsNorm {
    /// Added to the mean square before the square root.
    pub eps: f64,
}

/// Applies [`RmsNorm`].
pub fn rms_norm(e: &mut dyn Emit, x: Value, weight: Value, eps: f64) -> Result<Value> {
    emit1(e, RmsNorm { eps }, &[x, weight])
}

/// Gradient of [`RmsNorm`]: inputs `x, weight, dy`; outputs `dx, dweight`.
///
/// With `rstd` recomputed, `x̂ = x·rstd` and `g = dy ⊙ w`, per row
/// `dx = rstd · (g − x̂ · mean(g ⊙ x̂))`, and over all rows `dweight = Σ dy ⊙ x̂`.
pub type RmsNormGrad = NormGrad<RmsNorm>;

impl RowNorm for RmsNorm {
    const NAME: &'static str = "rms_norm";
    const GRAD_NAME: &'static str = "rms_norm_grad";
    const CENTRED: bool = false;
    const FLOPS: (u64, u64) = (5, 9);

    fn eps(&self) -> f64 {
        self.eps
    }
}

norm_op!(RmsNorm);
