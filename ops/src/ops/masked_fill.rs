//! `masked_fill`: y = mask ? c : x, element-wise, the mask broadcast to `x` (causal masks).

use meshflow_placement::{Sbp, Signature};

use crate::cpu::{BroadcastPlan, FloatElement};
use crate::ops::where_select::split_of;
use crate::{emit1, Context, DType, Emit, Error, Op, Result, Shape, Tensor, TensorMeta, Value};

/// Sets `x` to `value` (may be ±∞) where the bool `mask` (broadcast to `x`'s shape) is true.
///
/// Signatures, per device `d`:
/// - `S(k), S|B -> S(k)` (the mask split on its matching axis or `B` where it is broadcast):
///   `y_d = masked_fill(x_d, m_d)`;
/// - `B, B -> B`; `P, B -> P` only when `value` is 0 (each addend would otherwise add `c`).
#[derive(Clone, Debug)]
pub struct MaskedFill {
    /// The value put where the mask is true.
    pub value: f64,
}

/// Applies [`MaskedFill`].
pub fn masked_fill(e: &mut dyn Emit, x: Value, mask: Value, value: f64) -> Result<Value> {
    emit1(e, MaskedFill { value }, &[x, mask])
}

impl Tensor {
    /// The `[n, n]` bool mask of a causal attention: true above the diagonal (`j > i`), where
    /// the scores are to be set to −∞.
    pub fn causal_mask(n: usize) -> Tensor {
        let data: Vec<u8> = (0..n * n).map(|k| u8::from(k % n > k / n)).collect();
        let bytes = Tensor::from_bytes(&data, [n, n], DType::Bool);
        bytes.expect("n·n bytes for an [n, n] bool tensor")
    }
}

impl Op for MaskedFill {
    fn name(&self) -> &'static str {
        "masked_fill"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let [x, mask] = inputs else {
            return Err(Error::Arity { op: self.name(), expected: 2, got: inputs.len() });
        };
        if !x.dtype.is_float() || mask.dtype != DType::Bool {
            return Err(Error::dtype(
                self.name(),
                &[x.dtype, mask.dtype],
                "needs a float x and a bool mask",
            ));
        }
        if !mask.shape.broadcasts_to(&x.shape) {
            return Err(Error::shape(
                self.name(),
                &[&x.shape, &mask.shape],
                "mask does not broadcast to x",
            ));
        }
        Ok(vec![x.clone()])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let metas: Vec<TensorMeta> = inputs.iter().map(|t| t.meta().clone()).collect();
        self.infer(&metas)?;
        let out = crate::dispatch_float!(self.name(), inputs[0].dtype(), T => {
            fill_masked::<T>(ctx, &inputs[0], &inputs[1], self.value)
        })?;
        Ok(vec![out])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new();
        }
        let (b, p) = (Sbp::Broadcast, Sbp::PartialSum);
        let mut signatures = vec![Signature::broadcast(2, 1)];
        if self.value == 0.0 {
            signatures.push(Signature::new([p, b], [p]));
        }
        let (x, mask) = (&inputs[0].shape, &inputs[1].shape);
        for k in (0..x.rank()).filter(|&k| x.dim(k) > 1) {
            signatures.push(Signature::new([Sbp::Split(k), split_of(mask, x, k)], [Sbp::Split(k)]));
        }
        signatures
    }

    /// `dx = masked_fill(g, mask, 0)`; no gradient for the mask.
    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let Some(g) = grads[0] else { return Ok(vec![None, None]) };
        Ok(vec![Some(masked_fill(e, g, inputs[1], 0.0)?), None])
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }
}

fn fill_masked<T: FloatElement>(
    ctx: &Context,
    x: &Tensor,
    mask: &Tensor,
    value: f64,
) -> Result<Tensor> {
    let mut out = x.clone();
    if out.numel() == 0 {
        return Ok(out);
    }
    let m = mask.as_slice::<u8>()?;
    let fill = T::from_acc(T::acc_from_f64(value));
    let shape: Shape = x.shape().clone();
    let plan = BroadcastPlan::new(&[mask.shape()], &shape);
    let step = plan.row_step(0);
    plan.for_each_row(ctx, out.as_mut_slice::<T>()?, |dst, start| {
        for (j, d) in dst.iter_mut().enumerate() {
            if m[start[0] + j * step] != 0 {
                *d = fill;
            }
        }
    });
    Ok(out)
}
