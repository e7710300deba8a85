//! `sub`: z = x − y, element-wise with numpy broadcasting.

use meshflow_placement::{Sbp, Signature};

use crate::ops::{binary, neg::neg, sum::sum_to};
use crate::{emit1, Context, Emit, Op, Result, Tensor, TensorMeta, Value};

/// Element-wise difference with broadcasting.
///
/// Signatures, per device `d`:
/// - `S(i), S(j) -> S(k)` where output axis `k` maps to input axes `i`, `j` (an input that is
///   broadcast along `k` is `B` instead): `z_d = x_d − y_d` on the slice device `d` holds;
/// - `B, B -> B`: every device computes the whole `z`;
/// - `P, P -> P`: `Σ_d (x_d − y_d) = x − y`.
#[derive(Clone, Debug, Default)]
pub struct Sub;

/// Applies [`Sub`].
pub fn sub(e: &mut dyn Emit, x: Value, y: Value) -> Result<Value> {
    emit1(e, Sub, &[x, y])
}

impl Op for Sub {
    fn name(&self) -> &'static str {
        "sub"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        binary::infer(self.name(), inputs)
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.forward_owned(ctx, inputs.to_vec())
    }

    fn forward_owned(&self, ctx: &Context, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        crate::binary_forward!(self.name(), ctx, inputs, |x, y| x - y)
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        let partial = Sbp::PartialSum;
        binary::signatures(inputs, &[[partial, partial, partial]])
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let Some(g) = grads[0] else { return Ok(vec![None, None]) };
        let (x, y) = (e.meta(inputs[0]).shape, e.meta(inputs[1]).shape);
        let gx = sum_to(e, g, &x)?;
        let minus = neg(e, g)?;
        Ok(vec![Some(gx), Some(sum_to(e, minus, &y)?)])
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        self.infer(inputs).map_or(0, |out| out[0].shape.numel() as u64)
    }
}
