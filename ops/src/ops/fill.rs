//! `fill`: a tensor of `x`'s shape and dtype with every element set to a constant.

use meshflow_placement::{Sbp, Signature};

use crate::{emit1, Context, Emit, Error, Op, Result, Tensor, TensorMeta, Value};

/// Every element `value` (as a cast would convert it), in `x`'s shape and dtype; `x`'s values
/// are not read.
///
/// Signatures, per device `d`: `S(i) -> S(i)` and `B -> B` (`y_d = full(shape(x_d), c)`), and
/// `P -> B` (the values of `x` do not matter, only its shape).
#[derive(Clone, Debug)]
pub struct Fill {
    /// The constant.
    pub value: f64,
}

/// Applies [`Fill`].
pub fn fill(e: &mut dyn Emit, x: Value, value: f64) -> Result<Value> {
    emit1(e, Fill { value }, &[x])
}

impl Op for Fill {
    fn name(&self) -> &'static str {
        "fill"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        match inputs {
            [x] => Ok(vec![x.clone()]),
            _ => Err(Error::Arity { op: self.name(), expected: 1, got: inputs.len() }),
        }
    }

    fn forward(&self, _ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        crate::check_inputs(self, inputs)?;
        let x = &inputs[0];
        Ok(vec![Tensor::full(x.shape().clone(), self.value, x.dtype())])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new();
        }
        let mut signatures =
            vec![Signature::broadcast(1, 1), Signature::new([Sbp::PartialSum], [Sbp::Broadcast])];
        let rank = inputs[0].shape.rank();
        signatures.extend((0..rank).map(|i| Signature::new([Sbp::Split(i)], [Sbp::Split(i)])));
        signatures
    }

    fn backward(
        &self,
        _e: &mut dyn Emit,
        _inputs: &[Value],
        _outputs: &[Value],
        _grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        Ok(vec![None])
    }
}
