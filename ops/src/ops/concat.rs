//! `concat`: tensors joined along one axis.

use meshflow_placement::Signature;

use crate::ops::narrow::{narrow, other_axis_signatures};
use crate::{emit1, Context, Emit, Error, Op, Result, Shape, Tensor, TensorMeta, Value};

/// Joins its inputs (one dtype, equal dims except along `axis`) along `axis`.
///
/// Signatures, per device `d`: all inputs `S(i)` -> `S(i)` for `i ≠ axis`
/// (`y_d = concat(x_d…)`), all `B` -> `B`, all `P` -> `P`.
#[derive(Clone, Debug)]
pub struct Concat {
    /// The joined axis (negative counts from the end).
    pub axis: isize,
}

/// Applies [`Concat`].
pub fn concat(e: &mut dyn Emit, xs: &[Value], axis: isize) -> Result<Value> {
    emit1(e, Concat { axis }, xs)
}

impl Concat {
    fn check(&self, inputs: &[TensorMeta]) -> Result<(usize, TensorMeta)> {
        let Some(first) = inputs.first() else {
            return Err(Error::Arity { op: "concat", expected: 1, got: 0 });
        };
        let axis = first.shape.axis("concat", self.axis)?;
        let mut total = 0;
        for x in inputs {
            let fits = x.shape.rank() == first.shape.rank()
                && (0..x.shape.rank()).all(|i| i == axis || x.shape.dim(i) == first.shape.dim(i));
            if !fits || x.dtype != first.dtype {
                let shapes: Vec<Shape> = inputs.iter().map(|m| m.shape.clone()).collect();
                return Err(Error::Shape {
                    op: "concat",
                    shapes,
                    reason: format!(
                        "inputs must agree except on axis {axis} ({} vs {})",
                        x.dtype, first.dtype
                    ),
                });
            }
            total += x.shape.dim(axis);
        }
        Ok((axis, TensorMeta::new(first.shape.with_dim(axis, total), first.dtype)))
    }
}

impl Op for Concat {
    fn name(&self) -> &'static str {
        "concat"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        Ok(vec![self.check(inputs)?.1])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let metas: Vec<TensorMeta> = inputs.iter().map(|t| t.meta().clone()).collect();
        let (axis, out) = self.check(&metas)?;
        let refs: Vec<&Tensor> = inputs.iter().collect();
        let out = crate::dispatch_any!(out.dtype, T => {
            crate::cpu::layout::concat::<T>(ctx, &refs, axis, &out.shape)
        })?;
        Ok(vec![out])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new();
        }
        let Some(first) = inputs.first() else { return Vec::new() };
        let axis = first.shape.axis(self.name(), self.axis).ok();
        other_axis_signatures(first.shape.rank(), axis, inputs.len())
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let Some(g) = grads[0] else { return Ok(vec![None; inputs.len()]) };
        let axis = e.meta(g).shape.axis(self.name(), self.axis)?;
        let mut start = 0;
        let mut pieces = Vec::with_capacity(inputs.len());
        for &x in inputs {
            let len = e.meta(x).shape.dim(axis);
            pieces.push(Some(narrow(e, g, axis as isize, start, len)?));
            start += len;
        }
        Ok(pieces)
    }
}
