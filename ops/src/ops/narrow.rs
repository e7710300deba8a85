//! `narrow`: the slice `start..start + len` of one axis (and [`Pad`], its gradient).

use meshflow_placement::{Sbp, Signature};

use crate::{emit1, Context, Emit, Error, Op, Result, Shape, Tensor, TensorMeta, Value};

/// Elements `start..start + len` along `axis` (negative counts from the end), like
/// `torch.narrow`.
///
/// Signatures, per device `d`: `S(i) -> S(i)` for `i ≠ axis` (`y_d = narrow(x_d)`), `B -> B`,
/// `P -> P` (a slice is linear).
#[derive(Clone, Debug)]
pub struct Narrow {
    /// The sliced axis.
    pub axis: isize,
    /// First index kept.
    pub start: usize,
    /// Number of indices kept.
    pub len: usize,
}

/// Applies [`Narrow`].
pub fn narrow(e: &mut dyn Emit, x: Value, axis: isize, start: usize, len: usize) -> Result<Value> {
    emit1(e, Narrow { axis, start, len }, &[x])
}

/// Signatures of an op that changes one axis only: splits on the others, `B`, `P`.
pub fn other_axis_signatures(rank: usize, axis: Option<usize>, arity: usize) -> Vec<Signature> {
    let mut signatures = vec![
        Signature::broadcast(arity, 1),
        Signature::new(vec![Sbp::PartialSum; arity], [Sbp::PartialSum]),
    ];
    for i in (0..rank).filter(|&i| Some(i) != axis) {
        signatures.push(Signature::new(vec![Sbp::Split(i); arity], [Sbp::Split(i)]));
    }
    signatures
}

fn single<'a>(op: &'static str, inputs: &'a [TensorMeta]) -> Result<&'a TensorMeta> {
    match inputs {
        [x] => Ok(x),
        _ => Err(Error::Arity { op, expected: 1, got: inputs.len() }),
    }
}

impl Narrow {
    fn check(&self, shape: &Shape) -> Result<(usize, Shape)> {
        let axis = shape.axis("narrow", self.axis)?;
        if self.start + self.len > shape.dim(axis) {
            return Err(Error::shape(
                "narrow",
                &[shape],
                format!("slice {}..{} of axis {axis}", self.start, self.start + self.len),
            ));
        }
        Ok((axis, shape.with_dim(axis, self.len)))
    }
}

impl Op for Narrow {
    fn name(&self) -> &'static str {
        "narrow"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let x = single(self.name(), inputs)?;
        Ok(vec![TensorMeta::new(self.check(&x.shape)?.1, x.dtype)])
    }

    fn forward(&self, _ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        crate::check_inputs(self, inputs)?;
        let x = &inputs[0];
        let (axis, _) = self.check(x.shape())?;
        let out = crate::dispatch_any!(x.dtype(), T => {
            crate::cpu::layout::narrow::<T>(x, axis, self.start, self.len)
        })?;
        Ok(vec![out])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new();
        }
        let shape = &inputs[0].shape;
        other_axis_signatures(shape.rank(), shape.axis(self.name(), self.axis).ok(), 1)
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
        let (axis, _) = self.check(&shape)?;
        let pad = Pad { axis: axis as isize, start: self.start, total: shape.dim(axis) };
        Ok(vec![Some(emit1(e, pad, &[g])?)])
    }
}

/// `x` placed at `start` along `axis` of a zero tensor with `total` indices there: the gradient
/// of [`Narrow`].
///
/// Signatures, per device `d`: `S(i) -> S(i)` for `i ≠ axis`, `B -> B`, `P -> P`.
#[derive(Clone, Debug)]
pub struct Pad {
    /// The padded axis.
    pub axis: isize,
    /// Where `x` starts.
    pub start: usize,
    /// Size of the axis in the output.
    pub total: usize,
}

impl Pad {
    fn check(&self, shape: &Shape) -> Result<(usize, Shape)> {
        let axis = shape.axis("pad", self.axis)?;
        if self.start + shape.dim(axis) > self.total {
            return Err(Error::shape(
                "pad",
                &[shape],
                format!("does not fit at {} in {}", self.start, self.total),
            ));
        }
        Ok((axis, shape.with_dim(axis, self.total)))
    }
}

impl Op for Pad {
    fn name(&self) -> &'static str {
        "pad"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let x = single(self.name(), inputs)?;
        Ok(vec![TensorMeta::new(self.check(&x.shape)?.1, x.dtype)])
    }

    fn forward(&self, _ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        crate::check_inputs(self, inputs)?;
        let x = &inputs[0];
        let (axis, _) = self.check(x.shape())?;
        let out = crate::dispatch_any!(x.dtype(), T => {
            crate::cpu::layout::pad::<T>(x, axis, self.start, self.total)
        })?;
        Ok(vec![out])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new();
        }
        let shape = &inputs[0].shape;
        other_axis_signatures(shape.rank(), shape.axis(self.name(), self.axis).ok(), 1)
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let Some(g) = grads[0] else { return Ok(vec![None]) };
        let len =
            e.meta(inputs[0]).shape.dims().get(self.check(&e.meta(inputs[0]).shape)?.0).copied();
        Ok(vec![Some(narrow(e, g, self.axis, self.start, len.unwrap_or(0))?)])
    }
}
