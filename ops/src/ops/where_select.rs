//! `where`: z = cond ? x : y, element-wise with numpy broadcasting of all three.

use meshflow_placement::{Sbp, Signature};

use crate::cpu::BroadcastPlan;
use crate::ops::{fill::fill, sum::sum_to};
use crate::{
    emit1, Context, DType, Element, Emit, Error, Op, Result, Shape, Tensor, TensorMeta, Value,
};

/// Picks `x` where `cond` (bool) is true and `y` elsewhere; `x` and `y` share a dtype.
///
/// Signatures, per device `d`:
/// - `S|B, S|B, S|B -> S(k)` for output axis `k` (each input split on its matching axis, or `B`
///   where it is broadcast): `z_d = where(c_d, x_d, y_d)`;
/// - `B, B, B -> B`; `B, P, P -> P` (`Σ_d where(c, x_d, y_d) = where(c, x, y)`).
#[derive(Clone, Debug, Default)]
pub struct Where;

/// Applies [`Where`].
pub fn where_select(e: &mut dyn Emit, cond: Value, x: Value, y: Value) -> Result<Value> {
    emit1(e, Where, &[cond, x, y])
}

impl Where {
    fn check(inputs: &[TensorMeta]) -> Result<TensorMeta> {
        let [c, x, y] = inputs else {
            return Err(Error::Arity { op: "where", expected: 3, got: inputs.len() });
        };
        if c.dtype != DType::Bool || x.dtype != y.dtype {
            return Err(Error::dtype("where", &[c.dtype, x.dtype, y.dtype], "needs bool, T, T"));
        }
        let xy = Shape::broadcast("where", &x.shape, &y.shape)?;
        Ok(TensorMeta::new(Shape::broadcast("where", &c.shape, &xy)?, x.dtype))
    }
}

/// The SBP of an input of shape `input` when the output (shape `out`) is split on `axis`.
pub fn split_of(input: &Shape, out: &Shape, axis: usize) -> Sbp {
    match (axis + input.rank()).checked_sub(out.rank()) {
        Some(j) if input.dim(j) == out.dim(axis) => Sbp::Split(j),
        _ => Sbp::Broadcast,
    }
}

impl Op for Where {
    fn name(&self) -> &'static str {
        "where"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        Ok(vec![Self::check(inputs)?])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let metas: Vec<TensorMeta> = inputs.iter().map(|t| t.meta().clone()).collect();
        let out = Self::check(&metas)?;
        let out = crate::dispatch_any!(out.dtype, T => {
            select::<T>(ctx, &inputs[0], &inputs[1], &inputs[2], &out.shape)
        })?;
        Ok(vec![out])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new();
        }
        let (b, p) = (Sbp::Broadcast, Sbp::PartialSum);
        let mut signatures = vec![Signature::broadcast(3, 1), Signature::new([b, p, p], [p])];
        let Ok(out) = Self::check(inputs) else { return signatures };
        for k in (0..out.shape.rank()).filter(|&k| out.shape.dim(k) > 1) {
            let sbps: Vec<Sbp> = inputs.iter().map(|m| split_of(&m.shape, &out.shape, k)).collect();
            signatures.push(Signature::new(sbps, [Sbp::Split(k)]));
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
        let Some(g) = grads[0] else { return Ok(vec![None, None, None]) };
        if !e.meta(g).dtype.is_float() {
            return Ok(vec![None, None, None]);
        }
        let zeros = fill(e, g, 0.0)?;
        let gx = where_select(e, inputs[0], g, zeros)?;
        let gy = where_select(e, inputs[0], zeros, g)?;
        let (sx, sy) = (e.meta(inputs[1]).shape, e.meta(inputs[2]).shape);
        Ok(vec![None, Some(sum_to(e, gx, &sx)?), Some(sum_to(e, gy, &sy)?)])
    }
}

fn select<T: Element>(
    ctx: &Context,
    cond: &Tensor,
    x: &Tensor,
    y: &Tensor,
    shape: &Shape,
) -> Result<Tensor> {
    let mut out = Tensor::zeros(shape.clone(), x.dtype());
    if out.numel() == 0 {
        return Ok(out);
    }
    let (c, xs, ys) = (cond.as_slice::<u8>()?, x.as_slice::<T>()?, y.as_slice::<T>()?);
    let plan = BroadcastPlan::new(&[cond.shape(), x.shape(), y.shape()], shape);
    let steps = [plan.row_step(0), plan.row_step(1), plan.row_step(2)];
    plan.for_each_row(ctx, out.as_mut_slice::<T>()?, |dst, start| {
        for (j, d) in dst.iter_mut().enumerate() {
            let pick = c[start[0] + j * steps[0]] != 0;
            *d = if pick { xs[start[1] + j * steps[1]] } else { ys[start[2] + j * steps[2]] };
        }
    });
    Ok(out)
}
