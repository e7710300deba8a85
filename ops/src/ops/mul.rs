//! `mul`: z = x · y, element-wise with numpy broadcasting.

use meshflow_placement::{Sbp, Signature};

use crate::ops::{binary, sum::sum_to};
use crate::{emit1, Context, Emit, Op, Result, Tensor, TensorMeta, Value};

/// Element-wise product with broadcasting.
///
/// Signatures, per device `d`:
/// - `S(i), S(j) -> S(k)` where output axis `k` maps to input axes `i`, `j` (an input that is
///   broadcast along `k` is `B` instead): `z_d = x_d · y_d` on the slice device `d` holds;
/// - `B, B -> B`: every device computes the whole `z`;
/// - `P, B -> P`: `Σ_d x_d · y = x · y`; and `B, P -> P` likewise.
#[derive(Clone, Debug, Default)]
pub struct Mul;

/// Applies [`Mul`].
pub fn mul(e: &mut dyn Emit, x: Value, y: Value) -> Result<Value> {
    emit1(e, Mul, &[x, y])
}

impl Op for Mul {
    fn name(&self) -> &'static str {
        "mul"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        binary::infer(self.name(), inputs)
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.forward_owned(ctx, inputs.to_vec())
    }

    fn forward_owned(&self, ctx: &Context, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        crate::binary_forward!(self.name(), ctx, inputs, |x, y| x * y)
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        let (p, b) = (Sbp::PartialSum, Sbp::Broadcast);
        binary::signatures(inputs, &[[p, b, p], [b, p, p]])
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let Some(g) = grads[0] else { return Ok(vec![None, None]) };
        let (x, y) = (inputs[0], inputs[1]);
        let gx = mul(e, g, y)?;
        let gy = mul(e, g, x)?;
        let (sx, sy) = (e.meta(x).shape, e.meta(y).shape);
        Ok(vec![Some(sum_to(e, gx, &sx)?), Some(sum_to(e, gy, &sy)?)])
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        self.infer(inputs).map_or(0, |out| out[0].shape.numel() as u64)
    }
}
