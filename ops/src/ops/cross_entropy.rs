//! `cross_entropy`: sparse (integer-target) cross-entropy with a fused log-softmax, averaged over
//! positions, as `torch.nn.functional.cross_entropy(logits, targets)`:
//! `loss = (1/N) Σ_i (logsumexp(logits_i) − logits_i[targets_i])`; and its gradient
//! [`CrossEntropyGrad`]: `dlogits_i = (softmax(logits_i) − onehot(targets_i)) · dloss / N`.
//!
//! Sharded over positions, each device divides its local sum by the *global* `N` (its
//! [`Op::localize`] sets [`CrossEntropy::positions`]), so the per-device losses are exact partial
//! sums of the logical mean.

use std::sync::Arc;

use meshflow_placement::{Sbp, Signature};
use num_traits::{Float, ToPrimitive, Zero};

use super::nn_rows::{
    first_order_only, for_each_range, max, sum_map, sum_over_rows, Accumulate, RowFloat, SharedRows,
};
use crate::cpu::simd::multiversion;
use crate::{
    emit1, Context, DType, Emit, Error, Op, OpRef, Result, Shard, Tensor, TensorMeta, Value,
};

/// Mean sparse cross-entropy: inputs `logits [..., C]` (float), `targets [...]` (i64, in
/// `0..C`); output a scalar of the logits' dtype.
///
/// Signatures, per device `d`:
/// - `S(i), S(i) -> P` for every axis `i` of `targets`: `loss_d = Σ_{i ∈ d} ℓ_i / N` with the
///   global `N` (localized), so `Σ_d loss_d = loss`;
/// - `B, B -> B`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CrossEntropy {
    /// The number of positions to divide by; `None`: the number of targets given (the logical
    /// op). Set to the global count on a shard.
    pub positions: Option<usize>,
}

/// Applies [`CrossEntropy`] (mean over positions).
pub fn cross_entropy(e: &mut dyn Emit, logits: Value, targets: Value) -> Result<Value> {
    emit1(e, CrossEntropy::default(), &[logits, targets])
}

impl Op for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        check_inputs(self.name(), inputs, 2, self.positions)?;
        Ok(vec![TensorMeta::new([], inputs[0].dtype)])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let metas = [inputs[0].meta().clone(), inputs[1].meta().clone()];
        self.infer(&metas)?;
        let targets = checked_targets(self.name(), &inputs[0], &inputs[1])?;
        let scale = divisor(self.positions, targets.len());
        let loss = crate::dispatch_float!(self.name(), inputs[0].dtype(), T => loss_sum::<T>(ctx, &inputs[0], targets, scale))?;
        Ok(vec![loss])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new(); // invalid metas: no signature
        }
        let (b, p) = (Sbp::Broadcast, Sbp::PartialSum);
        let mut signatures = vec![Signature::new([b, b], [b])];
        let rank = inputs[1].shape.rank();
        signatures.extend((0..rank).map(|i| Signature::new([Sbp::Split(i), Sbp::Split(i)], [p])));
        signatures
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let Some(dloss) = grads[0] else { return Ok(vec![None, None]) };
        let op = CrossEntropyGrad { positions: self.positions };
        Ok(vec![Some(emit1(e, op, &[inputs[0], inputs[1], dloss])?), None])
    }

    fn localize(
        &self,
        signature: &Signature,
        inputs: &[Shard],
        _outputs: &[Shard],
    ) -> Result<Option<OpRef>> {
        Ok(global_positions(signature, inputs).map(|positions| {
            Arc::new(CrossEntropy { positions: Some(self.positions.unwrap_or(positions)) }) as OpRef
        }))
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        4 * inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }
}

/// Gradient of [`CrossEntropy`]: inputs `logits`, `targets`, `dloss` (scalar); output
/// `dlogits = (softmax(logits) − onehot(targets)) · dloss / N`.
///
/// Signatures: `S(i), S(i), B -> S(i)` for every axis `i` of `targets` (localized with the
/// global `N`); `B, B, P -> P` (linear in `dloss`); `B, B, B -> B`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CrossEntropyGrad {
    /// As [`CrossEntropy::positions`].
    pub positions: Option<usize>,
}

impl Op for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "cross_entropy_grad"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        check_inputs(self.name(), inputs, 3, self.positions)?;
        let dloss = &inputs[2];
        if dloss.dtype != inputs[0].dtype || dloss.shape.rank() != 0 {
            let shapes = [&inputs[0].shape, &dloss.shape];
            return Err(Error::shape(
                self.name(),
                &shapes,
                "dloss must be a scalar of the logits' dtype",
            ));
        }
        Ok(vec![inputs[0].clone()])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let metas: Vec<TensorMeta> = inputs.iter().map(|t| t.meta().clone()).collect();
        self.infer(&metas)?;
        let targets = checked_targets(self.name(), &inputs[0], &inputs[1])?;
        let scale = divisor(self.positions, targets.len());
        let dlogits = crate::dispatch_float!(self.name(), inputs[0].dtype(), T => grad::<T>(ctx, &inputs[0], targets, &inputs[2], scale))?;
        Ok(vec![dlogits])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new(); // invalid metas: no signature
        }
        let (b, p) = (Sbp::Broadcast, Sbp::PartialSum);
        let mut signatures = vec![Signature::new([b, b, b], [b]), Signature::new([b, b, p], [p])];
        let rank = inputs[1].shape.rank();
        signatures.extend(
            (0..rank).map(|i| Signature::new([Sbp::Split(i), Sbp::Split(i), b], [Sbp::Split(i)])),
        );
        signatures
    }

    fn backward(
        &self,
        _e: &mut dyn Emit,
        _inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        first_order_only(self.name(), grads, 3)
    }

    fn localize(
        &self,
        signature: &Signature,
        inputs: &[Shard],
        _outputs: &[Shard],
    ) -> Result<Option<OpRef>> {
        Ok(global_positions(signature, inputs).map(|positions| {
            let positions = Some(self.positions.unwrap_or(positions));
            Arc::new(CrossEntropyGrad { positions }) as OpRef
        }))
    }

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        5 * inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }
}

/// The logical number of positions, when the signature splits them.
fn global_positions(signature: &Signature, inputs: &[Shard]) -> Option<usize> {
    let split = matches!(signature.inputs.get(1), Some(Sbp::Split(_)));
    split.then(|| inputs[1].logical.numel())
}

/// `1 / N`: `positions`, or the `local` count of the logical op (not 0: [`check_inputs`]).
fn divisor(positions: Option<usize>, local: usize) -> f64 {
    1.0 / positions.unwrap_or(local) as f64
}

/// Checks the arity, dtypes and shapes of `logits` and `targets`, and that there is a mean to
/// take: `positions` (the global count of a shard, `None` for the logical op: the targets') may
/// not be 0. PyTorch answers NaN for an empty batch; here it is an error at build time. A shard
/// with no targets of a non-empty batch is fine (its partial sum is 0).
fn check_inputs(
    op: &'static str,
    inputs: &[TensorMeta],
    arity: usize,
    positions: Option<usize>,
) -> Result<()> {
    if inputs.len() != arity {
        return Err(Error::Arity { op, expected: arity, got: inputs.len() });
    }
    let (logits, targets) = (&inputs[0], &inputs[1]);
    if !logits.dtype.is_float() || targets.dtype != DType::I64 {
        let reason = "needs float logits and i64 targets";
        return Err(Error::dtype(op, &[logits.dtype, targets.dtype], reason));
    }
    let dims = logits.shape.dims();
    let shapes = [&logits.shape, &targets.shape];
    if dims.is_empty() || dims[..dims.len() - 1] != *targets.shape.dims() {
        return Err(Error::shape(op, &shapes, "logits must be [..., C] and targets [...]"));
    }
    if dims[dims.len() - 1] == 0 {
        return Err(Error::shape(op, &shapes, "no classes"));
    }
    if positions.unwrap_or(targets.shape.numel()) == 0 {
        let reason = "no positions to average over (the mean loss of an empty batch)";
        return Err(Error::shape(op, &shapes, reason));
    }
    Ok(())
}

/// The targets, each checked to lie in `0..C`.
fn checked_targets<'a>(
    op: &'static str,
    logits: &Tensor,
    targets: &'a Tensor,
) -> Result<&'a [i64]> {
    let classes = logits.dims()[logits.dims().len() - 1];
    let values = targets.as_slice::<i64>()?;
    if let Some((position, bad)) =
        values.iter().enumerate().find(|(_, &t)| t < 0 || t as u64 >= classes as u64)
    {
        let reason =
            format!("target {bad} at position {position} is outside the classes 0..{classes}");
        return Err(Error::Value { op, reason });
    }
    Ok(values)
}

/// `logsumexp(row) − row[target]` in the accumulate type.
#[inline(always)]
fn row_loss<T: RowFloat>(row: &[T], target: usize) -> T::Acc {
    let peak = max(row);
    let peak = if peak.is_finite() { peak } else { T::Acc::zero() };
    let total = sum_map(row, |v| (v - peak).exp_fast());
    peak + total.ln() - row[target].widen()
}

fn loss_sum<T: RowFloat>(
    ctx: &Context,
    logits: &Tensor,
    targets: &[i64],
    scale: f64,
) -> Result<Tensor> {
    let classes = logits.dims()[logits.dims().len() - 1];
    let rows = logits.as_slice::<T>()?;
    let partial = |range: std::ops::Range<usize>| {
        let span = range.start * classes..range.end * classes;
        loss_rows(&rows[span], &targets[range], classes)
    };
    let total = sum_over_rows(ctx, targets.len(), classes, partial, |a, b| a + b).unwrap_or(0.0);
    let loss = T::narrow(T::Acc::constant(total * scale));
    Tensor::from_vec(vec![loss], [])
}

fn grad<T: RowFloat>(
    ctx: &Context,
    logits: &Tensor,
    targets: &[i64],
    dloss: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let classes = logits.dims()[logits.dims().len() - 1];
    let factor =
        T::Acc::constant(dloss.as_slice::<T>()?[0].widen().to_f64().unwrap_or(f64::NAN) * scale);
    let mut out = Tensor::for_overwrite(ctx, logits.shape().clone(), logits.dtype());
    let rows = logits.as_slice::<T>()?;
    let target = SharedRows::new(out.as_mut_slice::<T>()?);
    let task = |range: std::ops::Range<usize>| {
        let span = range.start * classes..range.end * classes;
        // SAFETY: tasks cover disjoint row ranges, so each output row has one writer.
        let dst = unsafe { target.row(span.clone()) };
        grad_rows(&rows[span], &targets[range], classes, factor, dst);
    };
    for_each_range(ctx, targets.len(), classes, task);
    Ok(out)
}

multiversion! {
    /// `Σ_i row_loss(row_i, target_i)` over rows of `classes`, in f64 (vectorised: the rows'
    /// `exp` runs 16 or 8 lanes wide instead of 4).
    fn loss_rows<T: RowFloat>(rows: &[T], targets: &[i64], classes: usize) -> f64 {
        if classes == 0 {
            return f64::NAN; // no class to predict: the log of an empty sum
        }
        let rows = rows.chunks_exact(classes).zip(targets);
        rows.map(|(row, &target)| row_loss(row, target as usize).to_f64().unwrap_or(f64::NAN))
            .sum()
    }
}

multiversion! {
    /// [`grad_row`] of each row of `classes` elements of `rows` into `dst`.
    fn grad_rows<T: RowFloat>(
        rows: &[T],
        targets: &[i64],
        classes: usize,
        factor: T::Acc,
        dst: &mut [T],
    ) {
        if classes == 0 {
            return;
        }
        let pairs = rows.chunks_exact(classes).zip(dst.chunks_exact_mut(classes));
        for ((row, dst), &target) in pairs.zip(targets) {
            grad_row(row, target as usize, factor, dst);
        }
    }
}

/// `dst = (softmax(row) − onehot(target)) · factor`.
#[inline(always)]
fn grad_row<T: RowFloat>(row: &[T], target: usize, factor: T::Acc, dst: &mut [T]) {
    let peak = max(row);
    let peak = if peak.is_finite() { peak } else { T::Acc::zero() };
    let scale = sum_map(row, |v| (v - peak).exp_fast()).recip() * factor;
    for (out, &v) in dst.iter_mut().zip(row) {
        *out = T::narrow((v.widen() - peak).exp_fast() * scale);
    }
    dst[target] = T::narrow(dst[target].widen() - factor);
}
