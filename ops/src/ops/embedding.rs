//! `embedding`: gathers rows of a table `[V, D]` by `i64` ids of any shape (`y[..., :] =
//! table[ids[...], :]`), and its gradient [`EmbeddingGrad`], a scatter-add into `[V, D]`.
//!
//! Vocab-parallel: when the table is split on its rows (`S(0)`), each device holds rows
//! `[offset, offset + V_d)`; [`Op::localize`] gives its op a [`VocabShard`], and ids outside the
//! shard produce zero rows, so the per-device outputs are partial sums of the logical output.

use std::sync::Arc;

use meshflow_placement::{Sbp, Signature};

use super::nn_rows::SharedRows;
use crate::{
    emit1, Context, DType, Emit, Error, Op, OpRef, Result, Shard, Tensor, TensorMeta, Value,
};

/// Where a device's table shard sits in the vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VocabShard {
    /// The first id the shard holds.
    pub offset: usize,
    /// The size of the whole vocabulary (ids must lie below it).
    pub vocab: usize,
}

/// Embedding lookup: inputs `table [V, D]` (float), `ids [...]` (i64); output `[..., D]`.
///
/// Signatures, per device `d`:
/// - `B, S(i) -> S(i)` for every axis `i` of `ids`: each device looks up the ids it holds;
/// - `S(1), B -> S(r)` (`r` = rank of `ids`, the output's last axis): each device gathers its
///   columns of every row;
/// - `S(0), B -> P`: vocab-parallel; device `d` holds rows `[o_d, o_d + V_d)` and outputs
///   `table_d[id − o_d]` for ids in its range and zeros elsewhere, so `Σ_d y_d = y`
///   (localized with a [`VocabShard`]);
/// - `P, B -> P`: the lookup is linear in the table;
/// - `B, B -> B`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Embedding {
    /// Set on a vocab-split shard; `None` on the logical op and unsplit tables.
    pub shard: Option<VocabShard>,
}

/// Applies [`Embedding`]: rows of `table` at `ids`.
pub fn embedding(e: &mut dyn Emit, table: Value, ids: Value) -> Result<Value> {
    emit1(e, Embedding::default(), &[table, ids])
}

impl Op for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let [table, ids] = inputs else {
            return Err(Error::Arity { op: self.name(), expected: 2, got: inputs.len() });
        };
        check_ids(self.name(), ids)?;
        if !table.dtype.is_float() {
            return Err(Error::dtype(self.name(), &[table.dtype], "the table needs a float dtype"));
        }
        let [rows, width] = table.shape.dims() else {
            let shapes = [&table.shape, &ids.shape];
            return Err(Error::shape(self.name(), &shapes, "the table must be [V, D]"));
        };
        check_shard(self.name(), self.shard, *rows)?;
        let mut dims = ids.shape.dims().to_vec();
        dims.push(*width);
        Ok(vec![TensorMeta::new(dims, table.dtype)])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let metas = [inputs[0].meta().clone(), inputs[1].meta().clone()];
        let out = self.infer(&metas)?.remove(0);
        let (table, ids) = (&inputs[0], inputs[1].as_slice::<i64>()?);
        let rows = Rows::new(self.name(), table.dims()[0], self.shard, ids)?;
        let y = crate::dispatch_float!(self.name(), table.dtype(), T => gather::<T>(ctx, table, &rows, out))?;
        Ok(vec![y])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new(); // invalid metas: no signature
        }
        let rank = inputs[1].shape.rank();
        let (b, p) = (Sbp::Broadcast, Sbp::PartialSum);
        let sig = |table: Sbp, ids: Sbp, y: Sbp| Signature::new([table, ids], [y]);
        let mut signatures = vec![
            sig(b, b, b),
            sig(Sbp::Split(1), b, Sbp::Split(rank)),
            sig(Sbp::Split(0), b, p),
            sig(p, b, p),
        ];
        signatures.extend((0..rank).map(|i| sig(b, Sbp::Split(i), Sbp::Split(i))));
        signatures
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let Some(dy) = grads[0] else { return Ok(vec![None, None]) };
        let rows = e.meta(inputs[0]).shape.dim(0);
        let op = EmbeddingGrad { rows, shard: self.shard };
        Ok(vec![Some(emit1(e, op, &[inputs[1], dy])?), None])
    }

    fn localize(
        &self,
        signature: &Signature,
        inputs: &[Shard],
        _outputs: &[Shard],
    ) -> Result<Option<OpRef>> {
        if signature.inputs.first() != Some(&Sbp::Split(0)) {
            return Ok(None);
        }
        let table = &inputs[0];
        let shard = VocabShard { offset: table.offset[0], vocab: table.logical.dim(0) };
        Ok(Some(Arc::new(Embedding { shard: Some(shard) })))
    }
}

/// Gradient of [`Embedding`] with respect to the table: inputs `ids [...]` (i64) and
/// `dy [..., D]`; output `[rows, D]` with `out[id] = Σ dy[positions of id]` (a scatter-add).
///
/// Signatures, per device `d`:
/// - `S(i), S(i) -> P` for every axis `i` of `ids`: each device scatters its positions;
/// - `B, S(r) -> S(1)`: each device scatters its columns;
/// - `B, B -> S(0)`: each device keeps the rows of its vocab shard (localized with a
///   [`VocabShard`] and its number of rows);
/// - `B, P -> P`: linear in `dy`;
/// - `B, B -> B`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbeddingGrad {
    /// Rows of the output (the table's `V`, or `V_d` on a vocab shard).
    pub rows: usize,
    /// Set on a vocab-split shard.
    pub shard: Option<VocabShard>,
}

impl Op for EmbeddingGrad {
    fn name(&self) -> &'static str {
        "embedding_grad"
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let [ids, dy] = inputs else {
            return Err(Error::Arity { op: self.name(), expected: 2, got: inputs.len() });
        };
        check_ids(self.name(), ids)?;
        if !dy.dtype.is_float() {
            return Err(Error::dtype(self.name(), &[dy.dtype], "dy needs a float dtype"));
        }
        let (dims, id_dims) = (dy.shape.dims(), ids.shape.dims());
        if dims.len() != id_dims.len() + 1 || &dims[..id_dims.len()] != id_dims {
            let shapes = [&ids.shape, &dy.shape];
            return Err(Error::shape(self.name(), &shapes, "dy must be [...ids shape, D]"));
        }
        check_shard(self.name(), self.shard, self.rows)?;
        Ok(vec![TensorMeta::new([self.rows, dims[dims.len() - 1]], dy.dtype)])
    }

    fn forward(&self, _ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let metas = [inputs[0].meta().clone(), inputs[1].meta().clone()];
        let out = self.infer(&metas)?.remove(0);
        let (ids, dy) = (inputs[0].as_slice::<i64>()?, &inputs[1]);
        let rows = Rows::new(self.name(), self.rows, self.shard, ids)?;
        let y =
            crate::dispatch_float!(self.name(), dy.dtype(), T => scatter_add::<T>(dy, &rows, out))?;
        Ok(vec![y])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        if self.infer(inputs).is_err() {
            return Vec::new(); // invalid metas: no signature
        }
        let rank = inputs[0].shape.rank();
        let (b, p) = (Sbp::Broadcast, Sbp::PartialSum);
        let sig = |ids: Sbp, dy: Sbp, y: Sbp| Signature::new([ids, dy], [y]);
        let mut signatures = vec![
            sig(b, b, b),
            sig(b, Sbp::Split(rank), Sbp::Split(1)),
            sig(b, b, Sbp::Split(0)),
            sig(b, p, p),
        ];
        signatures.extend((0..rank).map(|i| sig(Sbp::Split(i), Sbp::Split(i), p)));
        signatures
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        // Linear in dy: the gradient of Σ out ⊙ c with respect to dy gathers c at the ids.
        let Some(c) = grads[0] else { return Ok(vec![None, None]) };
        Ok(vec![None, Some(emit1(e, Embedding { shard: self.shard }, &[c, inputs[0]])?)])
    }

    fn localize(
        &self,
        signature: &Signature,
        _inputs: &[Shard],
        outputs: &[Shard],
    ) -> Result<Option<OpRef>> {
        if signature.outputs.first() != Some(&Sbp::Split(0)) {
            return Ok(None);
        }
        let out = &outputs[0];
        let shard = VocabShard { offset: out.offset[0], vocab: out.logical.dim(0) };
        Ok(Some(Arc::new(EmbeddingGrad { rows: out.local.shape.dim(0), shard: Some(shard) })))
    }
}

fn check_ids(op: &'static str, ids: &TensorMeta) -> Result<()> {
    if ids.dtype == DType::I64 {
        Ok(())
    } else {
        Err(Error::dtype(op, &[ids.dtype], "ids must be i64"))
    }
}

fn check_shard(op: &'static str, shard: Option<VocabShard>, rows: usize) -> Result<()> {
    match shard {
        Some(s) if s.offset + rows > s.vocab => Err(Error::argument(
            op,
            format!(
                "shard rows {}..{} exceed the vocabulary {}",
                s.offset,
                s.offset + rows,
                s.vocab
            ),
        )),
        _ => Ok(()),
    }
}

/// The local row of every id (`None`: outside this shard, contributes zeros).
struct Rows {
    local: Vec<Option<usize>>,
}

impl Rows {
    /// Checks every id against the vocabulary and maps it into the shard.
    fn new(op: &'static str, rows: usize, shard: Option<VocabShard>, ids: &[i64]) -> Result<Rows> {
        let VocabShard { offset, vocab } = shard.unwrap_or(VocabShard { offset: 0, vocab: rows });
        let mut local = Vec::with_capacity(ids.len());
        for (position, &id) in ids.iter().enumerate() {
            let Some(id) = usize::try_from(id).ok().filter(|&id| id < vocab) else {
                let reason =
                    format!("id {id} at position {position} is outside the vocabulary 0..{vocab}");
                return Err(Error::Value { op, reason });
            };
            local.push(id.checked_sub(offset).filter(|&row| row < rows));
        }
        Ok(Rows { local })
    }
}

fn gather<T: crate::Element>(
    ctx: &Context,
    table: &Tensor,
    rows: &Rows,
    out: TensorMeta,
) -> Result<Tensor> {
    let width = table.dims()[1];
    let source = table.as_slice::<T>()?;
    // Every row is written unless some id lies outside this shard (those rows stay zero).
    let mut y = if rows.local.iter().all(Option::is_some) {
        Tensor::for_overwrite(ctx, out.shape, out.dtype)
    } else {
        Tensor::zeros(out.shape, out.dtype)
    };
    let target = SharedRows::new(y.as_mut_slice::<T>()?);
    let task = |range: std::ops::Range<usize>| {
        for (position, row) in rows.local[range.clone()].iter().enumerate() {
            let Some(row) = row else { continue };
            let at = (range.start + position) * width;
            // SAFETY: tasks cover disjoint position ranges, so each output row has one writer.
            let dst = unsafe { target.row(at..at + width) };
            dst.copy_from_slice(&source[row * width..(row + 1) * width]);
        }
    };
    super::nn_rows::for_each_range(ctx, rows.local.len(), width, task);
    Ok(y)
}

fn scatter_add<T: super::nn_rows::RowFloat>(
    dy: &Tensor,
    rows: &Rows,
    out: TensorMeta,
) -> Result<Tensor> {
    let width = out.shape.dim(1);
    let source = dy.as_slice::<T>()?;
    let mut sums = vec![<T::Acc as num_traits::Zero>::zero(); out.shape.numel()];
    for (position, row) in rows.local.iter().enumerate() {
        let Some(row) = row else { continue };
        let src = &source[position * width..(position + 1) * width];
        for (sum, &v) in sums[row * width..(row + 1) * width].iter_mut().zip(src) {
            *sum += v.widen();
        }
    }
    let narrowed: Vec<T> = sums.into_iter().map(T::narrow).collect();
    Tensor::from_vec(narrowed, out.shape)
}
