//! `split`: one tensor cut along an axis into pieces of given sizes.

use meshflow_placement::Signature;

use crate::ops::{concat::concat, fill::fill, narrow::other_axis_signatures};
use crate::{Context, Emit, Error, Op, Result, Shape, Tensor, TensorMeta, Value};

/// Cuts `x` along `axis` into consecutive pieces of `sizes` (which sum to the axis length).
///
/// Signatures, per device `d`: `S(i) -> S(i)…` for `i ≠ axis` (`y_k,d = split(x_d)_k`),
/// `B -> B…`, `P -> P…`.
#[derive(Clone, Debug)]
pub struct Split {
    /// The cut axis (negative counts from the end).
    pub axis: isize,
    /// Length of each piece along `axis`.
    pub sizes: Vec<usize>,
}

/// Applies [`Split`].
pub fn split(e: &mut dyn Emit, x: Value, axis: isize, sizes: &[usize]) -> Result<Vec<Value>> {
    e.emit(std::sync::Arc::new(Split { axis, sizes: sizes.to_vec() }), &[x])
}

impl Split {
    fn check(&self, shape: &Shape) -> Result<usize> {
        let axis = shape.axis("split", self.axis)?;
        if self.sizes.iter().sum::<usize>() != shape.dim(axis) || self.sizes.is_empty() {
            return Err(Error::shape(
                "split",
                &[shape],
                format!("sizes {:?} do not cover axis {axis}", self.sizes),
            ));
        }
        Ok(axis)
    }
}

impl Op for Split {
    fn name(&self) -> &'static str {
        "split"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let [x] = inputs else {
            return Err(Error::Arity { op: self.name(), expected: 1, got: inputs.len() });
        };
        let axis = self.check(&x.shape)?;
        Ok(self
            .sizes
            .iter()
            .map(|&n| TensorMeta::new(x.shape.with_dim(axis, n), x.dtype))
            .collect())
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        crate::check_inputs(self, inputs)?;
        let x = &inputs[0];
        let axis = self.check(x.shape())?;
        let mut start = 0;
        let mut outputs = Vec::with_capacity(self.sizes.len());
        for &len in &self.sizes {
            outputs.push(crate::dispatch_any!(x.dtype(), T => {
                crate::cpu::layout::narrow::<T>(ctx, x, axis, start, len)
            })?);
            start += len;
        }
        Ok(outputs)
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new();
        }
        let shape = &inputs[0].shape;
        let axis = shape.axis(self.name(), self.axis).ok();
        let n = self.sizes.len();
        other_axis_signatures(shape.rank(), axis, 1)
            .into_iter()
            .map(|s| Signature::new(s.inputs.clone(), vec![s.outputs[0]; n]))
            .collect()
    }

    /// The pieces' gradients joined again; a piece without one contributes zeros.
    fn backward(
        &self,
        e: &mut dyn Emit,
        _inputs: &[Value],
        outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        if grads.iter().all(Option::is_none) {
            return Ok(vec![None]);
        }
        let mut pieces = Vec::with_capacity(grads.len());
        for (&out, grad) in outputs.iter().zip(grads) {
            pieces.push(match grad {
                Some(g) => *g,
                None => fill(e, out, 0.0)?,
            });
        }
        Ok(vec![Some(concat(e, &pieces, self.axis)?)])
    }
}
