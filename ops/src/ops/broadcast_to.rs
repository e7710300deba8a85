//! `broadcast_to`: y = x repeated along broadcast axes to a target shape (numpy rules).

use meshflow_placement::{Sbp, Signature};

use crate::ops::reshape::{emit_to_shape, infer_to_shape, linear_signatures, localize_to_shape};
use crate::ops::sum::sum_to;
use crate::{Context, Emit, Op, OpRef, Result, Shape, Shard, Tensor, TensorMeta, Value};

/// Broadcast to `shape` (the logical target; [`Op::localize`] gives the per-shard target).
///
/// Signatures, per device `d`, for output axis `k`:
/// - `S(j) -> S(k)` when input axis `j` maps to `k` and is not broadcast: `y_d = bcast(x_d)`;
/// - `B -> S(k)` when `x` is broadcast along `k`: each device fills its slice from the whole `x`;
/// - `B -> B`; `P -> P` (a broadcast is linear).
#[derive(Clone, Debug)]
pub struct BroadcastTo {
    /// The target shape.
    pub shape: Shape,
}

/// Applies [`BroadcastTo`]; returns `x` itself when it already has `shape`.
pub fn broadcast_to(e: &mut dyn Emit, x: Value, shape: &Shape) -> Result<Value> {
    emit_to_shape(e, x, shape, BroadcastTo { shape: shape.clone() })
}

impl Op for BroadcastTo {
    fn name(&self) -> &'static str {
        "broadcast_to"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let fits = |x: &Shape| x.broadcasts_to(&self.shape);
        infer_to_shape(self.name(), inputs, &self.shape, fits, "does not broadcast")
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        crate::check_inputs(self, inputs)?;
        let x = &inputs[0];
        let out = crate::dispatch_any!(x.dtype(), T => {
            crate::cpu::broadcast_copy::<T>(ctx, x, &self.shape)
        })?;
        Ok(vec![out])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        let Some(mut signatures) = linear_signatures(self, inputs) else { return Vec::new() };
        let x = &inputs[0].shape;
        let lead = self.shape.rank().saturating_sub(x.rank());
        for k in 0..self.shape.rank() {
            let input = match k.checked_sub(lead) {
                Some(j) if x.dim(j) == self.shape.dim(k) => Sbp::Split(j),
                _ => Sbp::Broadcast,
            };
            signatures.push(Signature::new([input], [Sbp::Split(k)]));
        }
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
        Ok(vec![grads[0].map(|g| sum_to(e, g, &shape)).transpose()?])
    }

    fn localize(
        &self,
        _signature: &Signature,
        _inputs: &[Shard],
        outputs: &[Shard],
    ) -> Result<Option<OpRef>> {
        Ok(localize_to_shape(&self.shape, outputs, |shape| BroadcastTo { shape }))
    }
}
