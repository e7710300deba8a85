//! `to_layout`: the same logical value on another placement and/or with another SBP.
//!
//! The op itself is the identity on every shard; the move happens on its input edge, where the
//! compiler inserts the boxing from the producer's layout to the one this node's signature asks
//! for (collectives within a placement, point-to-point copies between placements). Pipeline
//! stages are placements joined by `to_placement`; `to_sbp` pins a layout where the user wants it.

use meshflow_ops::{
    Context, Emit, Error as OpsError, Op, Result as OpsResult, Tensor as HostTensor, TensorMeta,
    Value,
};
use meshflow_placement::{Placement, Sbp, Signature};

/// Moves a value from `source` to `target` (equal for `to_sbp`).
#[derive(Clone, Debug)]
pub struct ToLayout {
    /// Where the input lives.
    pub source: Placement,
    /// Where the output lives.
    pub target: Placement,
}

impl Op for ToLayout {
    fn name(&self) -> &'static str {
        if self.source == self.target {
            "to_sbp"
        } else {
            "to_placement"
        }
    }

    fn infer(&self, inputs: &[TensorMeta]) -> OpsResult<Vec<TensorMeta>> {
        match inputs {
            [x] => Ok(vec![x.clone()]),
            _ => Err(OpsError::Arity { op: self.name(), expected: 1, got: inputs.len() }),
        }
    }

    fn forward(&self, _ctx: &Context, inputs: &[HostTensor]) -> OpsResult<Vec<HostTensor>> {
        meshflow_ops::check_inputs(self, inputs)?;
        Ok(vec![inputs[0].clone()])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        let Ok(metas) = self.infer(inputs) else {
            return Vec::new();
        };
        let mut signatures = vec![
            Signature::new([Sbp::Broadcast], [Sbp::Broadcast]),
            Signature::new([Sbp::PartialSum], [Sbp::PartialSum]),
        ];
        let splits =
            (0..metas[0].shape.rank()).map(|i| Signature::new([Sbp::Split(i)], [Sbp::Split(i)]));
        signatures.extend(splits);
        signatures
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        _inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> OpsResult<Vec<Option<Value>>> {
        let back = ToLayout { source: self.target.clone(), target: self.source.clone() };
        let grad = match grads[0] {
            Some(g) => Some(meshflow_ops::emit1(e, back, &[g])?),
            None => None,
        };
        Ok(vec![grad])
    }

    fn output_placement(&self) -> Option<&Placement> {
        Some(&self.target)
    }
}
