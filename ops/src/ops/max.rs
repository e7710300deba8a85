//! `max`: y = max x over some axes (keepdim or not); its gradient flows to the first position
//! holding the maximum (the argmax), through [`MaxGrad`].

use meshflow_placement::{Sbp, Signature};

use crate::cpu::{BroadcastPlan, FloatElement, Reduction};
use crate::ops::reshape::reshape;
use crate::ops::sum::{
    checked_reduction_signatures, infer_reduction, reduced_shapes, run_reduction,
};
use crate::{emit1, Context, Emit, Error, Op, Result, Shape, Tensor, TensorMeta, Value};

/// Maximum over `axes` (negative counts from the end; an empty list reduces every axis).
///
/// Signatures, per device `d`: `S(i) -> S(j)` when axis `i` is kept (`y_d = max(x_d)`) and
/// `B -> B`. A split reduced axis has none (the max of the maxima needs a max-reduce, not a sum),
/// and neither has `P`.
#[derive(Clone, Debug, Default)]
pub struct Max {
    /// The reduced axes.
    pub axes: Vec<isize>,
    /// Keep reduced axes as size 1.
    pub keepdim: bool,
}

/// Applies [`Max`].
pub fn max(e: &mut dyn Emit, x: Value, axes: &[isize], keepdim: bool) -> Result<Value> {
    emit1(e, Max { axes: axes.to_vec(), keepdim }, &[x])
}

impl Op for Max {
    fn name(&self) -> &'static str {
        "max"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        infer_reduction(self.name(), inputs, (&self.axes, self.keepdim), true)
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        run_reduction(self, ctx, inputs, (&self.axes, self.keepdim), Reduction::Max)
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        checked_reduction_signatures(self, inputs, (&self.axes, self.keepdim), None, false)
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let Some(g) = grads[0] else { return Ok(vec![None]) };
        let shape = e.meta(inputs[0]).shape;
        let (_, kept, _) = reduced_shapes(self.name(), &shape, &self.axes, self.keepdim)?;
        let y = reshape(e, outputs[0], &kept)?;
        let g = reshape(e, g, &kept)?;
        Ok(vec![Some(emit1(e, MaxGrad, &[inputs[0], y, g])?)])
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }
}

/// `dx` of a max: `(x, y, g) -> dx` where `y` and `g` have the keep-dim shape of the max;
/// `dx` is `g` at the first position (row-major) of each group where `x == y`, 0 elsewhere.
///
/// Signatures, per device `d`: `S(i), S(i), S(i) -> S(i)` on axes where `y` is not reduced
/// (size > 1 in `y`), `B, B, B -> B`, and `B, B, P -> P` (linear in `g`).
#[derive(Clone, Debug, Default)]
pub struct MaxGrad;

impl Op for MaxGrad {
    fn name(&self) -> &'static str {
        "max_grad"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let [x, y, g] = inputs else {
            return Err(Error::Arity { op: self.name(), expected: 3, got: inputs.len() });
        };
        let same_rank = y.shape.rank() == x.shape.rank() && y.shape.broadcasts_to(&x.shape);
        if !same_rank || y != g || x.dtype != y.dtype || !x.dtype.is_float() {
            return Err(Error::shape(
                self.name(),
                &[&x.shape, &y.shape, &g.shape],
                format!(
                    "needs y and g of x's keep-dim reduced shape ({}, {}, {})",
                    x.dtype, y.dtype, g.dtype
                ),
            ));
        }
        Ok(vec![x.clone()])
    }

    fn forward(&self, _ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let metas: Vec<TensorMeta> = inputs.iter().map(|t| t.meta().clone()).collect();
        self.infer(&metas)?;
        let out = crate::dispatch_float!(self.name(), inputs[0].dtype(), T => {
            route::<T>(&inputs[0], &inputs[1], &inputs[2])
        })?;
        Ok(vec![out])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new();
        }
        let (b, p) = (Sbp::Broadcast, Sbp::PartialSum);
        let mut signatures = vec![Signature::broadcast(3, 1), Signature::new([b, b, p], [p])];
        let kept = &inputs[1].shape;
        for i in 0..kept.rank() {
            if kept.dim(i) > 1 {
                let s = Sbp::Split(i);
                signatures.push(Signature::new([s, s, s], [s]));
            }
        }
        signatures
    }

    fn backward(
        &self,
        _e: &mut dyn Emit,
        _inputs: &[Value],
        _outputs: &[Value],
        _grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        Err(Error::argument(self.name(), "the second derivative of max is not available"))
    }
}

/// Puts `g[o]` at the first `i` of group `o` with `x[i] == y[o]`.
fn route<T: FloatElement>(x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Tensor> {
    let (xs, ys, gs) = (x.as_slice::<T>()?, y.as_slice::<T>()?, g.as_slice::<T>()?);
    let mut out = Tensor::zeros(x.shape().clone(), x.dtype());
    if x.numel() == 0 {
        return Ok(out);
    }
    let dx = out.as_mut_slice::<T>()?;
    let plan = BroadcastPlan::new(&[y.shape()], x.shape());
    let (row, step) = (plan.row_len(), plan.row_step(0));
    let mut taken = vec![false; ys.len()];
    for (r, &start) in plan.row_starts(0, plan.rows()).iter().enumerate() {
        for k in 0..row {
            let (o, i) = (start + k * step, r * row + k);
            if !taken[o] && xs[i] == ys[o] {
                dx[i] = gs[o];
                taken[o] = true;
            }
        }
    }
    Ok(out)
}

/// The keep-dim shape of `shape` reduced over `axes` (helper for callers building `MaxGrad`).
pub fn kept_shape(shape: &Shape, axes: &[isize]) -> Result<Shape> {
    Ok(reduced_shapes("max", shape, axes, true)?.1)
}
