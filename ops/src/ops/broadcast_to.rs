//! `broadcast_to`: y = x repeated along broadcast axes to a target shape (numpy rules).

use meshflow_placement::{Sbp, Signature};

use crate::ops::sum::sum_to;
use crate::{
    emit1, Context, Emit, Error, Op, OpRef, Result, Shape, Shard, Tensor, TensorMeta, Value,
};

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
    if &e.meta(x).shape == shape {
        return Ok(x);
    }
    emit1(e, BroadcastTo { shape: shape.clone() }, &[x])
}

impl Op for BroadcastTo {
    fn name(&self) -> &'static str {
        "broadcast_to"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let [x] = inputs else {
            return Err(Error::Arity { op: self.name(), expected: 1, got: inputs.len() });
        };
        if !x.shape.broadcasts_to(&self.shape) {
            return Err(Error::shape(self.name(), &[&x.shape, &self.shape], "does not broadcast"));
        }
        Ok(vec![TensorMeta::new(self.shape.clone(), x.dtype)])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let metas: Vec<TensorMeta> = inputs.iter().map(|t| t.meta().clone()).collect();
        self.infer(&metas)?;
        let x = &inputs[0];
        let out = crate::dispatch_any!(x.dtype(), T => {
            crate::cpu::broadcast_copy::<T>(ctx, x, &self.shape)
        })?;
        Ok(vec![out])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new();
        }
        let mut signatures =
            vec![Signature::broadcast(1, 1), Signature::new([Sbp::PartialSum], [Sbp::PartialSum])];
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
        let local = outputs[0].local.shape.clone();
        let op = BroadcastTo { shape: local.clone() };
        Ok((local != self.shape).then(|| std::sync::Arc::new(op) as OpRef))
    }
}
