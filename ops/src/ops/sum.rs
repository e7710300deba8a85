//! `sum`: y = Σ x over some axes (keepdim or not), and [`sum_to`], the reduction of a broadcast
//! gradient back to an input's shape.

use meshflow_placement::{Sbp, Signature};

use crate::cpu::{reduce_axes, Reduction};
use crate::ops::{broadcast_to::broadcast_to, reshape::reshape};
use crate::{emit1, Context, Emit, Error, Op, Result, Shape, Tensor, TensorMeta, Value};

/// Sum over `axes` (negative counts from the end; an empty list reduces every axis, as torch).
///
/// Signatures, per device `d`:
/// - `S(i) -> P` when axis `i` is reduced: `Σ_d sum(x_d) = sum(x)`;
/// - `S(i) -> S(j)` when axis `i` is kept (`j` is where it lands in the output):
///   `y_d = sum(x_d)`;
/// - `B -> B`; `P -> P` (a sum is linear).
#[derive(Clone, Debug, Default)]
pub struct Sum {
    /// The reduced axes.
    pub axes: Vec<isize>,
    /// Keep reduced axes as size 1.
    pub keepdim: bool,
}

/// Applies [`Sum`].
pub fn sum(e: &mut dyn Emit, x: Value, axes: &[isize], keepdim: bool) -> Result<Value> {
    emit1(e, Sum { axes: axes.to_vec(), keepdim }, &[x])
}

/// `x` summed over the axes along which `shape` was broadcast to `x`'s shape, so the result has
/// `shape`: the gradient of a broadcast. Returns `x` itself when the shapes agree.
pub fn sum_to(e: &mut dyn Emit, x: Value, shape: &Shape) -> Result<Value> {
    let from = e.meta(x).shape;
    if &from == shape {
        return Ok(x);
    }
    if !shape.broadcasts_to(&from) {
        return Err(Error::shape("sum_to", &[&from, shape], "target does not broadcast to source"));
    }
    let lead = from.rank() - shape.rank();
    let axes: Vec<isize> = (0..from.rank())
        .filter(|&i| i < lead || (shape.dim(i - lead) == 1 && from.dim(i) != 1))
        .map(|i| i as isize)
        .collect();
    let reduced = if axes.is_empty() { x } else { sum(e, x, &axes, true)? };
    reshape(e, reduced, shape)
}

/// Validated reduction: the sorted axes, the keep-dim shape and the output shape.
pub fn reduced_shapes(
    op: &'static str,
    shape: &Shape,
    axes: &[isize],
    keepdim: bool,
) -> Result<(Vec<usize>, Shape, Shape)> {
    let axes = if axes.is_empty() { (0..shape.rank()).collect() } else { shape.axes(op, axes)? };
    let mut kept = shape.dims().to_vec();
    for &axis in &axes {
        kept[axis] = 1;
    }
    let out: Vec<usize> = if keepdim {
        kept.clone()
    } else {
        (0..shape.rank()).filter(|i| !axes.contains(i)).map(|i| shape.dim(i)).collect()
    };
    Ok((axes, Shape::new(kept), Shape::new(out)))
}

/// The split signatures of a reduction: kept axes map to their output axis; reduced axes give
/// `reduced` (partial sum for `sum`) when `Some`, and no signature when `None`.
pub fn reduction_signatures(
    shape: &Shape,
    axes: &[usize],
    keepdim: bool,
    reduced: Option<Sbp>,
) -> Vec<Signature> {
    let mut signatures = vec![Signature::broadcast(1, 1)];
    for i in 0..shape.rank() {
        if axes.contains(&i) {
            if let Some(sbp) = reduced {
                signatures.push(Signature::new([Sbp::Split(i)], [sbp]));
            }
        } else {
            let j = if keepdim { i } else { i - axes.iter().filter(|&&a| a < i).count() };
            signatures.push(Signature::new([Sbp::Split(i)], [Sbp::Split(j)]));
        }
    }
    signatures
}

/// Checks arity and float dtype of a one-input reduction and returns the input meta.
pub fn single_float<'a>(op: &'static str, inputs: &'a [TensorMeta]) -> Result<&'a TensorMeta> {
    let [x] = inputs else {
        return Err(Error::Arity { op, expected: 1, got: inputs.len() });
    };
    if !x.dtype.is_float() {
        return Err(Error::dtype(op, &[x.dtype], "needs a float dtype"));
    }
    Ok(x)
}

/// What `sum`, `mean` and `max` share: the output meta of a reduction of one float input over
/// `axes`; with `nonempty`, reducing an axis of size 0 is an error (no mean or max of nothing).
pub(crate) fn infer_reduction(
    op: &'static str,
    inputs: &[TensorMeta],
    (axes, keepdim): (&[isize], bool),
    nonempty: bool,
) -> Result<Vec<TensorMeta>> {
    let x = single_float(op, inputs)?;
    let (axes, _, out) = reduced_shapes(op, &x.shape, axes, keepdim)?;
    if nonempty && axes.iter().any(|&a| x.shape.dim(a) == 0) {
        return Err(Error::shape(op, &[&x.shape], "reduces an empty axis"));
    }
    Ok(vec![TensorMeta::new(out, x.dtype)])
}

/// The forward of a reduction op (checked with its `infer`): the kernel, then the output shape.
pub(crate) fn run_reduction(
    op: &dyn Op,
    ctx: &Context,
    inputs: &[Tensor],
    (axes, keepdim): (&[isize], bool),
    reduction: Reduction,
) -> Result<Vec<Tensor>> {
    let out = crate::check_inputs(op, inputs)?.remove(0).shape;
    let x = &inputs[0];
    let (axes, _, _) = reduced_shapes(op.name(), x.shape(), axes, keepdim)?;
    let kept = crate::dispatch_float!(op.name(), x.dtype(), T => {
        reduce_axes::<T>(ctx, x, &axes, reduction)
    })?;
    Ok(vec![kept.reshaped(out)?])
}

/// The signatures of a reduction op: [`reduction_signatures`] with `reduced` for split reduced
/// axes, plus `P -> P` when the reduction is `linear`; none for invalid metas.
pub(crate) fn checked_reduction_signatures(
    op: &dyn Op,
    inputs: &[TensorMeta],
    (axes, keepdim): (&[isize], bool),
    reduced: Option<Sbp>,
    linear: bool,
) -> Vec<Signature> {
    if op.infer(inputs).is_err() {
        return Vec::new();
    }
    let shape = &inputs[0].shape;
    let Ok((axes, _, _)) = reduced_shapes(op.name(), shape, axes, keepdim) else {
        return vec![Signature::broadcast(1, 1)];
    };
    let mut signatures = reduction_signatures(shape, &axes, keepdim, reduced);
    if linear {
        signatures.push(Signature::new([Sbp::PartialSum], [Sbp::PartialSum]));
    }
    signatures
}

impl Op for Sum {
    fn name(&self) -> &'static str {
        "sum"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        infer_reduction(self.name(), inputs, (&self.axes, self.keepdim), false)
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        run_reduction(self, ctx, inputs, (&self.axes, self.keepdim), Reduction::Sum)
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        let reduced = Some(Sbp::PartialSum);
        checked_reduction_signatures(self, inputs, (&self.axes, self.keepdim), reduced, true)
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
        let (_, kept, _) = reduced_shapes(self.name(), &shape, &self.axes, self.keepdim)?;
        let g = reshape(e, g, &kept)?;
        Ok(vec![Some(broadcast_to(e, g, &shape)?)])
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }
}
