//! `narrow`: the slice `start..start + len` of one axis (and [`Pad`], its gradient).

use meshflow_placement::{Sbp, Signature};

use crate::{emit1, Context, Element, Emit, Error, Op, Result, Shape, Tensor, TensorMeta, Value};

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

impl AxisWindow for Narrow {
    const NAME: &'static str = "narrow";

    fn gradient(&self, e: &mut dyn Emit, shape: &Shape, g: Value) -> Result<Value> {
        let (axis, _) = self.window(shape)?;
        let pad = Pad { axis: axis as isize, start: self.start, total: shape.dim(axis) };
        emit1(e, pad, &[g])
    }

    fn window(&self, shape: &Shape) -> Result<(usize, Shape)> {
        let axis = shape.axis("narrow", self.axis)?;
        if self.start + self.len > shape.dim(axis) {
            let slice = format!("slice {}..{} of axis {axis}", self.start, self.start + self.len);
            return Err(Error::shape("narrow", &[shape], slice));
        }
        Ok((axis, shape.with_dim(axis, self.len)))
    }

    fn axis(&self) -> isize {
        self.axis
    }

    fn copy<T: Element>(&self, ctx: &Context, x: &Tensor, axis: usize) -> Result<Tensor> {
        crate::cpu::layout::narrow::<T>(ctx, x, axis, self.start, self.len)
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

impl AxisWindow for Pad {
    const NAME: &'static str = "pad";

    fn gradient(&self, e: &mut dyn Emit, shape: &Shape, g: Value) -> Result<Value> {
        let len = shape.dim(self.window(shape)?.0);
        narrow(e, g, self.axis, self.start, len)
    }

    fn window(&self, shape: &Shape) -> Result<(usize, Shape)> {
        let axis = shape.axis("pad", self.axis)?;
        if self.start + shape.dim(axis) > self.total {
            let reason = format!("does not fit at {} in {}", self.start, self.total);
            return Err(Error::shape("pad", &[shape], reason));
        }
        Ok((axis, shape.with_dim(axis, self.total)))
    }

    fn axis(&self) -> isize {
        self.axis
    }

    fn copy<T: Element>(&self, _ctx: &Context, x: &Tensor, axis: usize) -> Result<Tensor> {
        crate::cpu::layout::pad::<T>(x, axis, self.start, self.total)
    }
}

// ---- what narrow and pad share ----

/// An op on one input that changes the size of one axis: [`Narrow`] cuts a window out of it,
/// [`Pad`] places the input as a window of a larger zero tensor.
trait AxisWindow: Clone + std::fmt::Debug + Send + Sync + 'static {
    /// The op name.
    const NAME: &'static str;

    /// The axis attribute (negative counts from the end).
    fn axis(&self) -> isize;

    /// The gradient of an input of `shape` given the output gradient `g`: the other op.
    fn gradient(&self, e: &mut dyn Emit, shape: &Shape, g: Value) -> Result<Value>;

    /// The resolved axis and the output shape for an input of `shape`.
    fn window(&self, shape: &Shape) -> Result<(usize, Shape)>;

    /// The kernel along the resolved `axis`.
    fn copy<T: Element>(&self, ctx: &Context, x: &Tensor, axis: usize) -> Result<Tensor>;
}

/// Implements [`Op`] for an [`AxisWindow`] type.
macro_rules! window_op {
    ($op:ty) => {
        impl Op for $op {
            fn name(&self) -> &'static str {
                <$op as AxisWindow>::NAME
            }

            fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
                let [x] = inputs else {
                    return Err(Error::Arity { op: self.name(), expected: 1, got: inputs.len() });
                };
                Ok(vec![TensorMeta::new(self.window(&x.shape)?.1, x.dtype)])
            }

            fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
                crate::check_inputs(self, inputs)?;
                let x = &inputs[0];
                let (axis, _) = self.window(x.shape())?;
                Ok(vec![crate::dispatch_any!(x.dtype(), T => self.copy::<T>(ctx, x, axis))?])
            }

            fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
                if self.infer(inputs).is_err() {
                    return Vec::new();
                }
                let shape = &inputs[0].shape;
                other_axis_signatures(shape.rank(), shape.axis(self.name(), self.axis()).ok(), 1)
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
                Ok(vec![Some(self.gradient(e, &shape, g)?)])
            }
        }
    };
}
window_op!(Narrow);
window_op!(Pad);
