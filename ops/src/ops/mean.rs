//! `mean`: y = Σ x / n over some axes (keepdim or not).

use meshflow_placement::Signature;

use crate::cpu::Reduction;
use crate::ops::sum::{
    checked_reduction_signatures, infer_reduction, reduced_shapes, run_reduction,
};
use crate::ops::{broadcast_to::broadcast_to, mul_scalar::mul_scalar, reshape::reshape};
use crate::{emit1, Context, Emit, Op, Result, Tensor, TensorMeta, Value};

/// Mean over `axes` (negative counts from the end; an empty list reduces every axis).
///
/// Signatures, per device `d`:
/// - `S(i) -> S(j)` when axis `i` is kept (`j` is where it lands): `y_d = mean(x_d)`;
/// - `B -> B`; `P -> P` (a mean is linear).
///
/// A split reduced axis has no signature: each shard would divide by its local count (use
/// `sum` then a scale by the global count instead).
#[derive(Clone, Debug, Default)]
pub struct Mean {
    /// The reduced axes.
    pub axes: Vec<isize>,
    /// Keep reduced axes as size 1.
    pub keepdim: bool,
}

/// Applies [`Mean`].
pub fn mean(e: &mut dyn Emit, x: Value, axes: &[isize], keepdim: bool) -> Result<Value> {
    emit1(e, Mean { axes: axes.to_vec(), keepdim }, &[x])
}

impl Op for Mean {
    fn name(&self) -> &'static str {
        "mean"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        infer_reduction(self.name(), inputs, (&self.axes, self.keepdim), true)
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        run_reduction(self, ctx, inputs, (&self.axes, self.keepdim), Reduction::Mean)
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        checked_reduction_signatures(self, inputs, (&self.axes, self.keepdim), None, true)
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let Some(g) = grads[0] else { return Ok(vec![None]) };
        let shape = e.meta(inputs[0]).shape;
        let (axes, kept, _) = reduced_shapes(self.name(), &shape, &self.axes, self.keepdim)?;
        let count: usize = axes.iter().map(|&a| shape.dim(a)).product();
        let g = reshape(e, g, &kept)?;
        let scaled = mul_scalar(e, g, 1.0 / count as f64)?;
        Ok(vec![Some(broadcast_to(e, scaled, &shape)?)])
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }
}
