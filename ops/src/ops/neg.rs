//! `neg`: y = −x, element-wise.

use meshflow_placement::{Sbp, Signature};

use crate::{emit1, Context, Emit, Error, Op, Result, Tensor, TensorMeta, Value};

/// Element-wise negation.
///
/// Signatures, per device `d` (any element-wise linear op has all three):
/// - `S(i) -> S(i)`: `y_d = −x_d` on the slice of axis `i` that device `d` holds;
/// - `B -> B`: every device computes the whole `y = −x`;
/// - `P -> P`: `Σ_d −x_d = −Σ_d x_d`, so the outputs are partial sums of `y`.
#[derive(Clone, Debug, Default)]
pub struct Neg;

/// Applies [`Neg`].
pub fn neg(e: &mut dyn Emit, x: Value) -> Result<Value> {
    emit1(e, Neg, &[x])
}

impl Op for Neg {
    fn name(&self) -> &'static str {
        "neg"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let [x] = inputs else {
            return Err(Error::Arity { op: self.name(), expected: 1, got: inputs.len() });
        };
        if !x.dtype.is_float() {
            return Err(Error::dtype(self.name(), &[x.dtype], "needs a float dtype"));
        }
        Ok(vec![x.clone()])
    }

    fn forward(&self, _ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        crate::check_inputs(self, inputs)?;
        let x = &inputs[0];
        let out =
            crate::dispatch_float!(self.name(), x.dtype(), T => crate::cpu::map::<T>(x, |v| -v))?;
        Ok(vec![out])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new();
        }
        let rank = inputs[0].shape.rank();
        let mut signatures = vec![
            Signature::new([Sbp::Broadcast], [Sbp::Broadcast]),
            Signature::new([Sbp::PartialSum], [Sbp::PartialSum]),
        ];
        signatures.extend((0..rank).map(|i| Signature::new([Sbp::Split(i)], [Sbp::Split(i)])));
        signatures
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        _inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        Ok(vec![grads[0].map(|g| neg(e, g)).transpose()?])
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }
}
