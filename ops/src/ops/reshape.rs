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
    if &e.meta(x).shape == shape {
        return Ok(x);
    }
    emit1(e, Reshape { shape: shape.clone() }, &[x])
}

impl Op for Reshape {
    fn name(&self) -> &'static str {
        "reshape"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let [x] = inputs else {
            return Err(Error::Arity { op: self.name(), expected: 1, got: inputs.len() });
        };
        if x.shape.numel() != self.shape.numel() {
            return Err(Error::shape(
                self.name(),
                &[&x.shape, &self.shape],
                "element counts differ",
            ));
        }
        Ok(vec![TensorMeta::new(self.shape.clone(), x.dtype)])
    }

    fn forward(&self, _ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let [x] = inputs else {
            return Err(Error::Arity { op: self.name(), expected: 1, got: inputs.len() });
        };
        Ok(vec![x.reshaped(self.shape.clone())?])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new();
        }
        let mut signatures =
            vec![Signature::broadcast(1, 1), Signature::new([Sbp::PartialSum], [Sbp::PartialSum])];
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
        let local = outputs[0].local.shape.clone();
        Ok((local != self.shape).then(|| std::sync::Arc::new(Reshape { shape: local }) as OpRef))
    }
}
