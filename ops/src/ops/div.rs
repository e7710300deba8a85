//! `div`: z = x / y, element-wise with numpy broadcasting.

use meshflow_placement::{Sbp, Signature};

use crate::ops::{binary, mul::mul, neg::neg, sum::sum_to};
use crate::{emit1, Context, Emit, Op, Result, Tensor, TensorMeta, Value};

/// Element-wise quotient with broadcasting.
///
/// Signatures, per device `d`:
/// - `S(i), S(j) -> S(k)` where output axis `k` maps to input axes `i`, `j` (an input that is
///   broadcast along `k` is `B` instead): `z_d = x_d / y_d` on the slice device `d` holds;
/// - `B, B -> B`: every device computes the whole `z`;
/// - `P, B -> P`: `Σ_d x_d / y = x / y` (not `B, P`: a quotient is not linear in `y`).
#[derive(Clone, Debug, Default)]
pub struct Div;

/// Applies [`Div`].
pub fn div(e: &mut dyn Emit, x: Value, y: Value) -> Result<Value> {
    emit1(e, Div, &[x, y])
}

impl Op for Div {
    fn name(&self) -> &'static str {
        "div"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        binary::infer(self.name(), inputs)
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.forward_owned(ctx, inputs.to_vec())
    }

    fn forward_owned(&self, ctx: &Context, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        crate::binary_forward!(self.name(), ctx, inputs, |x, y| x / y)
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        let (p, b) = (Sbp::PartialSum, Sbp::Broadcast);
        binary::signatures(inputs, &[[p, b, p]])
    }

    /// `dx = g / y`, `dy = −g · z / y` with `z = x / y`.
    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let Some(g) = grads[0] else { return Ok(vec![None, None]) };
        let (x, y) = (inputs[0], inputs[1]);
        let gx = div(e, g, y)?;
        let gz = mul(e, g, outputs[0])?;
        let quotient = div(e, gz, y)?;
        let gy = neg(e, quotient)?;
        let (sx, sy) = (e.meta(x).shape, e.meta(y).shape);
        Ok(vec![Some(sum_to(e, gx, &sx)?), Some(sum_to(e, gy, &sy)?)])
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        self.infer(inputs).map_or(0, |out| out[0].shape.numel() as u64)
    }
}
