//! `pow`: z = xʸ, element-wise with numpy broadcasting.

use meshflow_placement::Signature;

use crate::ops::{add_scalar::add_scalar, binary, log::log, mul::mul, sum::sum_to};
use crate::{emit1, Context, Emit, Op, Result, Tensor, TensorMeta, Value};

/// Element-wise power with broadcasting (NaN for negative `x` and fractional `y`).
///
/// Signatures, per device `d`:
/// - `S(i), S(j) -> S(k)` where output axis `k` maps to input axes `i`, `j` (an input that is
///   broadcast along `k` is `B` instead): `z_d = x_d^y_d`;
/// - `B, B -> B`. No partial-sum signature: a power is not linear.
#[derive(Clone, Debug, Default)]
pub struct Pow;

/// Applies [`Pow`].
pub fn pow(e: &mut dyn Emit, x: Value, y: Value) -> Result<Value> {
    emit1(e, Pow, &[x, y])
}

impl Op for Pow {
    fn name(&self) -> &'static str {
        "pow"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        binary::infer(self.name(), inputs)
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.forward_owned(ctx, inputs.to_vec())
    }

    fn forward_owned(&self, ctx: &Context, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        crate::binary_forward!(self.name(), ctx, inputs, |x, y| x.powf(y))
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        binary::signatures(inputs, &[])
    }

    /// `dx = g · y · xʸ⁻¹`, `dy = g · xʸ · ln x`.
    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let Some(g) = grads[0] else { return Ok(vec![None, None]) };
        let (x, y) = (inputs[0], inputs[1]);
        let lower_exponent = add_scalar(e, y, -1.0)?;
        let lower = pow(e, x, lower_exponent)?;
        let slope = mul(e, y, lower)?;
        let gx = mul(e, g, slope)?;
        let ln = log(e, x)?;
        let scaled = mul(e, outputs[0], ln)?;
        let gy = mul(e, g, scaled)?;
        let (sx, sy) = (e.meta(x).shape, e.meta(y).shape);
        Ok(vec![Some(sum_to(e, gx, &sx)?), Some(sum_to(e, gy, &sy)?)])
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        self.infer(inputs).map_or(0, |out| out[0].shape.numel() as u64)
    }
}
