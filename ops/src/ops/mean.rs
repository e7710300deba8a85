//! `mean`: y = Σ x / n over some axes (keepdim or not).

use meshflow_placement::{Sbp, Signature};

use crate::cpu::{reduce_axes, Reduction};
use crate::ops::sum::{reduced_shapes, reduction_signatures, single_float};
use crate::ops::{broadcast_to::broadcast_to, mul_scalar::mul_scalar, reshape::reshape};
use crate::{emit1, Context, Emit, Error, Op, Result, Tensor, TensorMeta, Value};

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
        let x = single_float(self.name(), inputs)?;
        let (axes, _, out) = reduced_shapes(self.name(), &x.shape, &self.axes, self.keepdim)?;
        if axes.iter().any(|&a| x.shape.dim(a) == 0) {
            return Err(Error::shape(self.name(), &[&x.shape], "mean over an empty axis"));
        }
        Ok(vec![TensorMeta::new(out, x.dtype)])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let metas: Vec<TensorMeta> = inputs.iter().map(|t| t.meta().clone()).collect();
        let out = self.infer(&metas)?.remove(0).shape;
        let x = &inputs[0];
        let (axes, _, _) = reduced_shapes(self.name(), x.shape(), &self.axes, self.keepdim)?;
        let kept = crate::dispatch_float!(self.name(), x.dtype(), T => {
            reduce_axes::<T>(ctx, x, &axes, Reduction::Mean)
        })?;
        Ok(vec![kept.reshaped(out)?])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new();
        }
        let shape = &inputs[0].shape;
        let Ok((axes, _, _)) = reduced_shapes(self.name(), shape, &self.axes, self.keepdim) else {
            return vec![Signature::broadcast(1, 1)];
        };
        let mut signatures = reduction_signatures(shape, &axes, self.keepdim, None);
        signatures.push(Signature::new([Sbp::PartialSum], [Sbp::PartialSum]));
        signatures
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
