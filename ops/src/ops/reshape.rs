//! `reshape`: the same elements, in row-major order, under another shape.

use meshflow_placement::{Sbp, Signature};

use crate::{
    emit1, Context, Emit, Error, Op, OpRef, Result, Shape, Shard, Tensor, TensorMeta, Value,
};

/// Reshape to `shape` (the logical target; [`Op::localize`] gives the per-shard target).
///
/// Signatures, per device `d`:
/// - `S(i) -> S(i)` when the input and output agree on every axis up to and including `i`: the
///   rows device `d` holds map to the same rows of the output, `y_d = reshape(x_d)`;
/// - `B -> B`; `P -> P` (a reshape is linear).
#[derive(Clone, Debug)]
pub struct Reshape {
    /// The target shape.
    pub shape: Shape,
}

/// Applies [`Reshape`]; returns `x` itself when it already has `shape`.
pub fn reshape(e: &mut dyn Emit, x: Value, shape: &Shape) -> Result<Value> {
    emit_to_shape(e, x, shape, Reshape { shape: shape.clone() })
}

impl Op for Reshape {
    fn name(&self) -> &'static str {
        "reshape"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let same_count = |x: &Shape| x.numel() == self.shape.numel();
        infer_to_shape(self.name(), inputs, &self.shape, same_count, "element counts differ")
    }

    fn forward(&self, _ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let [x] = inputs else {
            return Err(Error::Arity { op: self.name(), expected: 1, got: inputs.len() });
        };
        Ok(vec![x.reshaped(self.shape.clone())?])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        let Some(mut signatures) = linear_signatures(self, inputs) else { return Vec::new() };
        let (from, to) = (inputs[0].shape.dims(), self.shape.dims());
        let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
        signatures.extend((0..common).map(|i| Signature::new([Sbp::Split(i)], [Sbp::Split(i)])));
        signatures
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let shape = e.meta(inputs[0]).shape;
        Ok(vec![grads[0].map(|g| reshape(e, g, &shape)).transpose()?])
    }

    fn localize(
        &self,
        _signature: &Signature,
        _inputs: &[Shard],
        outputs: &[Shard],
    ) -> Result<Option<OpRef>> {
        Ok(localize_to_shape(&self.shape, outputs, |shape| Reshape { shape }))
    }
}

// ---- shared with broadcast_to: ops whose attribute is the output shape ----

/// Emits `op` on `x`, or returns `x` itself when it already has `shape`.
pub(crate) fn emit_to_shape(
    e: &mut dyn Emit,
    x: Value,
    shape: &Shape,
    op: impl Op,
) -> Result<Value> {
    if &e.meta(x).shape == shape {
        return Ok(x);
    }
    emit1(e, op, &[x])
}

/// One input whose shape `fits` the target: the output meta is the target shape, same dtype.
pub(crate) fn infer_to_shape(
    op: &'static str,
    inputs: &[TensorMeta],
    target: &Shape,
    fits: impl Fn(&Shape) -> bool,
    reason: &str,
) -> Result<Vec<TensorMeta>> {
    let [x] = inputs else {
        return Err(Error::Arity { op, expected: 1, got: inputs.len() });
    };
    if !fits(&x.shape) {
        return Err(Error::shape(op, &[&x.shape, target], reason));
    }
    Ok(vec![TensorMeta::new(target.clone(), x.dtype)])
}

/// `B -> B` and `P -> P` (the op is linear); `None` for invalid metas.
pub(crate) fn linear_signatures(op: &dyn Op, inputs: &[TensorMeta]) -> Option<Vec<Signature>> {
    op.infer(inputs).ok()?;
    let partial = Signature::new([Sbp::PartialSum], [Sbp::PartialSum]);
    Some(vec![Signature::broadcast(1, 1), partial])
}

/// The per-shard op: the same op with the local output shape, or `None` when it is the global.
pub(crate) fn localize_to_shape<O: Op>(
    global: &Shape,
    outputs: &[Shard],
    with_shape: impl FnOnce(Shape) -> O,
) -> Option<OpRef> {
    let local = outputs[0].local.shape.clone();
    (&local != global).then(|| std::sync::Arc::new(with_shape(local)) as OpRef)
}
