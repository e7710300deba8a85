//! Launches of the network ops' kernels ([`super::source_nn`]): embedding and its gradient,
//! cross-entropy and its gradient, and the norms' gradient.

use cudarc::driver::PushKernelArg;

use super::kernels::{output, pointer, scratch};
use super::spec::Spec;
use super::{downcast, launch, CudaDevice};
use crate::ops::cross_entropy::{CrossEntropy, CrossEntropyGrad};
use crate::ops::embedding::{Embedding, EmbeddingGrad, VocabShard};
use crate::ops::layer_norm::{LayerNorm, NormGrad};
use crate::ops::rms_norm::RmsNorm;
use crate::{DType, Error, Op, Result, Tensor, TensorMeta};

/// `embedding` and `embedding_grad`.
pub(super) fn embedding(
    device: &CudaDevice,
    op: &dyn Op,
    inputs: &[Tensor],
    meta: &TensorMeta,
) -> Result<Vec<Tensor>> {
    if let Some(lookup) = downcast::<Embedding>(op) {
        let (table, ids) = (&inputs[0], &inputs[1]);
        let shard = Shard::of(lookup.shard, table.dims()[0]);
        return gather(device, table, ids, shard, meta);
    }
    if let Some(grad) = downcast::<EmbeddingGrad>(op) {
        let shard = Shard::of(grad.shard, grad.rows);
        return scatter_add(device, &inputs[0], &inputs[1], shard, meta);
    }
    Err(Error::argument(op.name(), "not an embedding op the GPU backend knows"))
}

/// The rows of a table shard as the kernels take them: `(rows, offset, vocab)`.
#[derive(Clone, Copy)]
struct Shard(i64, i64, i64);

impl Shard {
    fn of(shard: Option<VocabShard>, rows: usize) -> Shard {
        let VocabShard { offset, vocab } = shard.unwrap_or(VocabShard { offset: 0, vocab: rows });
        Shard(rows as i64, offset as i64, vocab as i64)
    }
}

fn gather(
    device: &CudaDevice,
    table: &Tensor,
    ids: &Tensor,
    Shard(rows, offset, vocab): Shard,
    meta: &TensorMeta,
) -> Result<Vec<Tensor>> {
    let y = output(device, meta)?;
    if y.numel() == 0 {
        return Ok(vec![y]);
    }
    let (positions, width) = (ids.numel() as i64, table.dims()[1] as i64);
    let (tp, ip, yp) = (pointer(table)?, pointer(ids)?, pointer(&y)?);
    let function = device.function(Spec::Embedding(meta.dtype))?;
    let mut args = device.stream().launch_builder(&function);
    args.arg(&tp).arg(&ip).arg(&yp).arg(&positions).arg(&width);
    args.arg(&rows).arg(&offset).arg(&vocab);
    device.run(args, launch::elementwise(y.numel(), device.multiprocessors()))?;
    Ok(vec![y])
}

/// Scatter-add with `atomicAdd` in the accumulation type: straight into the (zero-filled)
/// output for f32 and f64, into an f32 buffer cast afterwards for bf16 and f16.
fn scatter_add(
    device: &CudaDevice,
    ids: &Tensor,
    dy: &Tensor,
    Shard(rows, offset, vocab): Shard,
    meta: &TensorMeta,
) -> Result<Vec<Tensor>> {
    let wide = accumulation(meta.dtype);
    let sums = output(device, &TensorMeta::new(meta.shape.clone(), wide))?;
    super::kernels::fill_tensor(device, &sums, 0.0)?;
    if ids.numel() > 0 && meta.shape.numel() > 0 {
        let (positions, width) = (ids.numel() as i64, meta.shape.dim(1) as i64);
        let (ip, dp, sp) = (pointer(ids)?, pointer(dy)?, pointer(&sums)?);
        let function = device.function(Spec::EmbeddingGrad(meta.dtype))?;
        let mut args = device.stream().launch_builder(&function);
        args.arg(&ip).arg(&dp).arg(&sp).arg(&positions).arg(&width);
        args.arg(&rows).arg(&offset).arg(&vocab);
        device.run(args, launch::elementwise(dy.numel(), device.multiprocessors()))?;
    }
    if wide == meta.dtype {
        return Ok(vec![sums]);
    }
    super::kernels::cast(device, &sums, meta)
}

/// The accumulation dtype of `dtype` (f64 for f64, f32 otherwise).
pub(super) fn accumulation(dtype: DType) -> DType {
    crate::ops::attention::lse_dtype(dtype)
}

/// `cross_entropy` (two passes: per-row losses, then one block sums them) and its gradient.
pub(super) fn cross_entropy(
    device: &CudaDevice,
    op: &dyn Op,
    inputs: &[Tensor],
    meta: &TensorMeta,
) -> Result<Vec<Tensor>> {
    let (logits, targets) = (&inputs[0], &inputs[1]);
    let classes = logits.dims().last().copied().unwrap_or(1) as i64;
    let rows = targets.numel();
    let positions = if let Some(loss) = downcast::<CrossEntropy>(op) {
        loss.positions
    } else if let Some(grad) = downcast::<CrossEntropyGrad>(op) {
        grad.positions
    } else {
        return Err(Error::argument(op.name(), "not a cross-entropy op the GPU backend knows"));
    };
    let scale = 1.0 / positions.unwrap_or(rows).max(1) as f64;
    let y = output(device, meta)?;
    let (lp, tp, yp, row_total) = (pointer(logits)?, pointer(targets)?, pointer(&y)?, rows as i64);
    let shape = launch::rows(rows, classes as usize);
    if inputs.len() == 3 {
        if rows == 0 {
            return Ok(vec![y]);
        }
        let dp = pointer(&inputs[2])?;
        let function = device.function(Spec::CrossEntropyGrad(meta.dtype))?;
        let mut args = device.stream().launch_builder(&function);
        args.arg(&lp).arg(&tp).arg(&dp).arg(&yp).arg(&row_total).arg(&classes).arg(&scale);
        device.run(args, shape)?;
        return Ok(vec![y]);
    }
    let losses = scratch(device, rows.max(1), accumulation(meta.dtype))?;
    let sp = pointer(&losses)?;
    if rows > 0 {
        let function = device.function(Spec::CrossEntropyRows(meta.dtype))?;
        let mut args = device.stream().launch_builder(&function);
        args.arg(&lp).arg(&tp).arg(&sp).arg(&row_total).arg(&classes);
        device.run(args, shape)?;
    }
    let function = device.function(Spec::BlockTotal(meta.dtype))?;
    let mut args = device.stream().launch_builder(&function);
    args.arg(&sp).arg(&yp).arg(&row_total).arg(&scale);
    let one_block = launch::Launch { grid: 1, block: launch::MAX_BLOCK, shared_bytes: 0 };
    device.run(args, one_block)?;
    Ok(vec![y])
}

/// `layer_norm_grad` and `rms_norm_grad`: `dx` and the row statistics per row, then the
/// weight's (and bias's) gradient as column sums in two deterministic passes.
pub(super) fn norm_grad(
    device: &CudaDevice,
    op: &dyn Op,
    inputs: &[Tensor],
    metas: &[TensorMeta],
) -> Result<Vec<Tensor>> {
    let (eps, centred) = if let Some(grad) = downcast::<NormGrad<LayerNorm>>(op) {
        (grad.0.eps, true)
    } else if let Some(grad) = downcast::<NormGrad<RmsNorm>>(op) {
        (grad.0.eps, false)
    } else {
        return Err(Error::argument(op.name(), "not a norm gradient the GPU backend knows"));
    };
    let dtype = metas[0].dtype;
    let results = metas.iter().map(|meta| output(device, meta)).collect::<Result<Vec<_>>>()?;
    let (x, w, dy) = (&inputs[0], &inputs[1], &inputs[2]);
    let cols = w.numel();
    let rows = x.numel().checked_div(cols).unwrap_or(0);
    if rows == 0 || cols == 0 {
        for result in &results[1..] {
            super::kernels::fill_tensor(device, result, 0.0)?;
        }
        return Ok(results);
    }
    let stats = scratch(device, 2 * rows, accumulation(dtype))?;
    let (xp, wp, dp, sp) = (pointer(x)?, pointer(w)?, pointer(dy)?, pointer(&stats)?);
    let (row_total, col_total) = (rows as i64, cols as i64);
    let function = device.function(Spec::NormGradRows(dtype, centred))?;
    let mut args = device.stream().launch_builder(&function);
    let dxp = pointer(&results[0])?;
    args.arg(&xp).arg(&wp).arg(&dp).arg(&dxp).arg(&sp).arg(&row_total).arg(&col_total).arg(&eps);
    device.run(args, launch::rows(rows, cols))?;
    let (shape, chunks) = launch::norm_columns(rows, cols, device.multiprocessors());
    let partial = scratch(device, chunks * 2 * cols, accumulation(dtype))?;
    let (pp, chunk_total) = (pointer(&partial)?, chunks as i64);
    let function = device.function(Spec::NormColumns(dtype))?;
    let mut args = device.stream().launch_builder(&function);
    args.arg(&xp).arg(&dp).arg(&sp).arg(&pp).arg(&row_total).arg(&col_total).arg(&chunk_total);
    device.run(args, shape)?;
    let outputs = (results.len() - 1) * cols;
    let dwp = pointer(&results[1])?;
    let dbp = results.get(2).map_or(Ok(dwp), pointer)?;
    let function = device.function(Spec::NormFinish(dtype))?;
    let mut args = device.stream().launch_builder(&function);
    let output_total = outputs as i64;
    args.arg(&pp).arg(&dwp).arg(&dbp).arg(&col_total).arg(&chunk_total).arg(&output_total);
    device.run(args, launch::elementwise(outputs, device.multiprocessors()))?;
    Ok(results)
}
