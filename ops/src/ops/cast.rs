//! `cast`: y = x converted to another dtype, element-wise.

use meshflow_placement::{Sbp, Signature};

use crate::cpu::convert::convert;
use crate::{emit1, Context, DType, Emit, Error, Op, Result, Tensor, TensorMeta, Value};

/// Conversion to `dtype` (Rust `as` semantics; to bool is `x != 0`).
///
/// Signatures, per device `d`: `S(i) -> S(i)` and `B -> B` (`y_d = cast(x_d)`); `P -> P` only
/// between float dtypes (`Σ_d cast(x_d) = cast(Σ_d x_d)` up to rounding).
#[derive(Clone, Debug)]
pub struct Cast {
    /// The target dtype.
    pub dtype: DType,
}

/// Applies [`Cast`]; returns `x` itself when it already has `dtype`.
pub fn cast(e: &mut dyn Emit, x: Value, dtype: DType) -> Result<Value> {
    if e.meta(x).dtype == dtype {
        return Ok(x);
    }
    emit1(e, Cast { dtype }, &[x])
}

impl Tensor {
    /// This tensor converted to `dtype` (a new tensor; the same one when the dtype agrees).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        convert(self, dtype)
    }
}

impl Op for Cast {
    fn name(&self) -> &'static str {
        "cast"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let [x] = inputs else {
            return Err(Error::Arity { op: self.name(), expected: 1, got: inputs.len() });
        };
        Ok(vec![TensorMeta::new(x.shape.clone(), self.dtype)])
    }

    fn forward(&self, _ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let [x] = inputs else {
            return Err(Error::Arity { op: self.name(), expected: 1, got: inputs.len() });
        };
        Ok(vec![convert(x, self.dtype)?])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new();
        }
        let mut signatures = vec![Signature::broadcast(1, 1)];
        if inputs[0].dtype.is_float() && self.dtype.is_float() {
            signatures.push(Signature::new([Sbp::PartialSum], [Sbp::PartialSum]));
        }
        let rank = inputs[0].shape.rank();
        signatures.extend((0..rank).map(|i| Signature::new([Sbp::Split(i)], [Sbp::Split(i)])));
        signatures
    }

    /// The gradient is cast back to the input's dtype; none flows to a non-float input.
    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let from = e.meta(inputs[0]).dtype;
        if !from.is_float() || !self.dtype.is_float() {
            return Ok(vec![None]);
        }
        Ok(vec![grads[0].map(|g| cast(e, g, from)).transpose()?])
    }
}
