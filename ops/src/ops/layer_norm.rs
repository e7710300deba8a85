//! `layer_norm` over the last axis with an affine weight and bias, and its fused gradient
//! [`LayerNormGrad`].
//!
//! `y = (x − mean) · rstd · w + b` with `mean` and the biased variance over the last axis and
//! `rstd = 1 / sqrt(var + eps)`, as `torch.nn.functional.layer_norm`. Statistics are computed in
//! the accumulate type (f64 for f64, f32 otherwise). The backward recomputes them per row (the
//! row is read anyway), so the op has one output and nothing but `y` needs a gradient.

use meshflow_placement::{Sbp, Signature};
use num_traits::{Float, Zero};

use super::nn_rows::{
    first_order_only, fold_lanes, for_each_range, for_each_row, prefetch, row, sum_map,
    sum_over_rows, Accumulate, RowFloat, SharedRows, LANES,
};
use super::softmax::{checked_signatures, last_axis_input, row_signatures};
use crate::cpu::reduce::column_block_rows;
use crate::cpu::simd::multiversion;
use crate::{emit1, Context, Emit, Error, Op, Result, Tensor, TensorMeta, Value};

/// Layer normalisation over the last axis: inputs `x [..., D]`, `weight [D]`, `bias [D]`;
/// output `y [..., D]`.
///
/// Signatures, per device `d` (rows are independent, the last axis must be whole):
/// - `S(i), B, B -> S(i)` for every axis `i` but the last: each device normalises the rows it
///   holds with the whole weight and bias;
/// - `B, B, B -> B`.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNorm {
    /// Added to the variance before the square root (PyTorch's default is `1e-5`).
    pub eps: f64,
}

/// Applies [`LayerNorm`].
pub fn layer_norm(
    e: &mut dyn Emit,
    x: Value,
    weight: Value,
    bias: Value,
    eps: f64,
) -> Result<Value> {
    emit1(e, LayerNorm { eps }, &[x, weight, bias])
}

/// Gradient of [`LayerNorm`]: inputs `x, weight, dy`; outputs `dx, dweight, dbias`.
///
/// With the row statistics recomputed, `x̂ = (x − mean)·rstd` and `g = dy ⊙ w`, per row:
/// `dx = rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂))`, and over all rows `dweight = Σ dy ⊙ x̂`,
/// `dbias = Σ dy`.
pub type LayerNormGrad = NormGrad<LayerNorm>;

impl RowNorm for LayerNorm {
    const NAME: &'static str = "layer_norm";
    const GRAD_NAME: &'static str = "layer_norm_grad";
    const CENTRED: bool = true;
    // mean, centre, square-sum, scale, affine; the gradient recomputes them and adds its own.
    const FLOPS: (u64, u64) = (8, 12);

    fn eps(&self) -> f64 {
        self.eps
    }
}

// ---- shared with rms_norm: the norm op over the last axis and its fused gradient ----

/// A normalisation over the last axis with a weight (layer norm also centres and adds a bias):
/// `norm_op!` makes it an op, [`NormGrad`] is its gradient op.
pub trait RowNorm: Clone + std::fmt::Debug + Send + Sync + 'static {
    /// The op name.
    const NAME: &'static str;
    /// The gradient op's name.
    const GRAD_NAME: &'static str;
    /// Subtracts the row mean and adds a bias (layer norm), or not (rms norm).
    const CENTRED: bool;
    /// Flops per element of the op and of its gradient.
    const FLOPS: (u64, u64);

    /// Added to the variance (or mean square) before the square root.
    fn eps(&self) -> f64;

    /// The parameters after `x`: weight and bias, or weight only.
    fn parameters() -> usize {
        if Self::CENTRED {
            2
        } else {
            1
        }
    }
}

/// Implements [`Op`] for a [`RowNorm`] type: inputs `x` and its parameters, row signatures
/// with broadcast parameters, and the gradient through [`NormGrad`].
macro_rules! norm_op {
    ($op:ty) => {
        impl $crate::Op for $op {
            fn name(&self) -> &'static str {
                <$op as $crate::ops::layer_norm::RowNorm>::NAME
            }

            fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
                $crate::ops::layer_norm::infer_norm(self, inputs)
            }

            fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
                $crate::check_inputs(self, inputs)?;
                Ok(vec![$crate::ops::layer_norm::run_forward(self, ctx, inputs)?])
            }

            fn signatures(&self, inputs: &[TensorMeta]) -> Vec<meshflow_placement::Signature> {
                $crate::ops::layer_norm::norm_signatures(self, inputs)
            }

            fn backward(
                &self,
                e: &mut dyn Emit,
                inputs: &[Value],
                _outputs: &[Value],
                grads: &[Option<Value>],
            ) -> Result<Vec<Option<Value>>> {
                $crate::ops::layer_norm::emit_grad(self, e, inputs, grads)
            }

            fn flops(&self, inputs: &[TensorMeta]) -> u64 {
                let per_element = <$op as $crate::ops::layer_norm::RowNorm>::FLOPS.0;
                per_element * inputs.first().map_or(0, |x| x.shape.numel() as u64)
            }
        }
    };
}
pub(crate) use norm_op;

norm_op!(LayerNorm);

/// Output meta of a [`RowNorm`]: `x` of rank ≥ 1, `[D]` parameters of its dtype, a valid eps.
pub(crate) fn infer_norm<N: RowNorm>(norm: &N, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
    let x = last_axis_input(N::NAME, inputs, 1 + N::parameters())?;
    check_params(N::NAME, x, &inputs[1..])?;
    check_eps(N::NAME, norm.eps())?;
    Ok(vec![x.clone()])
}

/// The forward kernel of a [`RowNorm`].
pub(crate) fn run_forward<N: RowNorm>(
    norm: &N,
    ctx: &Context,
    inputs: &[Tensor],
) -> Result<Tensor> {
    crate::dispatch_float!(N::NAME, inputs[0].dtype(), T => norm_forward::<T>(ctx, inputs, norm.eps(), N::CENTRED))
}

/// `S(i), B.. -> S(i)` for every axis `i` but the last, and all-`B`; none for invalid metas.
pub(crate) fn norm_signatures<N: RowNorm + Op>(norm: &N, inputs: &[TensorMeta]) -> Vec<Signature> {
    let mut roles = vec![Some(Sbp::Broadcast); 1 + N::parameters()];
    roles[0] = None;
    checked_signatures(norm, inputs, || row_signatures(inputs[0].shape.rank(), &roles, &[None]))
}

/// The backward of a [`RowNorm`]: one [`NormGrad`] giving `dx` and the parameter gradients.
pub(crate) fn emit_grad<N: RowNorm>(
    norm: &N,
    e: &mut dyn Emit,
    inputs: &[Value],
    grads: &[Option<Value>],
) -> Result<Vec<Option<Value>>> {
    let Some(dy) = grads[0] else { return Ok(vec![None; inputs.len()]) };
    let grad = NormGrad(norm.clone());
    let grads = e.emit(std::sync::Arc::new(grad), &[inputs[0], inputs[1], dy])?;
    Ok(grads.into_iter().map(Some).collect())
}

/// The fused gradient of a [`RowNorm`]: inputs `x, weight, dy`; outputs `dx, dweight` and, when
/// centred, `dbias`.
///
/// Signatures: `S(i), B, S(i) -> S(i), P(, P)` for every axis `i` but the last (the parameter
/// gradients are sums over rows, so each device holds an addend); all-`B`.
#[derive(Clone, Debug, PartialEq)]
pub struct NormGrad<N>(pub N);

impl<N: RowNorm> Op for NormGrad<N> {
    fn name(&self) -> &'static str {
        N::GRAD_NAME
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let x = last_axis_input(self.name(), inputs, 3)?;
        check_params(self.name(), x, &inputs[1..2])?;
        check_eps(self.name(), self.0.eps())?;
        check_dy(self.name(), x, &inputs[2])?;
        Ok([vec![x.clone()], vec![inputs[1].clone(); N::parameters()]].concat())
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        crate::check_inputs(self, inputs)?;
        let eps = self.0.eps();
        crate::dispatch_float!(self.name(), inputs[0].dtype(), T => norm_backward::<T>(ctx, inputs, eps, N::CENTRED))
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        let mut outputs = vec![Some(Sbp::PartialSum); 1 + N::parameters()];
        outputs[0] = None;
        let rows = [None, Some(Sbp::Broadcast), None];
        checked_signatures(self, inputs, || row_signatures(inputs[0].shape.rank(), &rows, &outputs))
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

    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        N::FLOPS.1 * inputs.first().map_or(0, |x| x.shape.numel() as u64)
    }
}

pub(crate) fn check_eps(op: &'static str, eps: f64) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(Error::argument(op, format!("eps must be finite and ≥ 0, got {eps}")))
    }
}

/// Every parameter is `[D]` with `x`'s dtype.
pub(crate) fn check_params(op: &'static str, x: &TensorMeta, params: &[TensorMeta]) -> Result<()> {
    let width = x.shape.dims()[x.shape.rank() - 1];
    for p in params {
        if p.dtype != x.dtype {
            return Err(Error::dtype(op, &[x.dtype, p.dtype], "weight and bias take x's dtype"));
        }
        if p.shape.dims() != [width] {
            return Err(Error::shape(op, &[&x.shape, &p.shape], "weight and bias must be [D]"));
        }
    }
    Ok(())
}

/// `dy` has `x`'s shape and dtype.
pub(crate) fn check_dy(op: &'static str, x: &TensorMeta, dy: &TensorMeta) -> Result<()> {
    if dy != x {
        return Err(Error::shape(op, &[&x.shape, &dy.shape], "dy must have x's shape and dtype"));
    }
    Ok(())
}

/// Per-row statistics of layer norm (`centred`) or rms norm: `(mean, rstd)`.
#[inline(always)]
fn row_stats<T: RowFloat>(x: &[T], eps: T::Acc, centred: bool) -> (T::Acc, T::Acc) {
    let width = T::Acc::constant(x.len() as f64);
    let mean = if centred { sum_map(x, |v| v) / width } else { T::Acc::zero() };
    let var = sum_map(x, |v| (v - mean) * (v - mean)) / width;
    (mean, (var + eps).sqrt().recip())
}

/// Forward of layer norm (`centred`, with bias) or rms norm (no mean, no bias): `y`.
pub(crate) fn norm_forward<T: RowFloat>(
    ctx: &Context,
    inputs: &[Tensor],
    eps: f64,
    centred: bool,
) -> Result<Tensor> {
    let x = inputs[0].as_slice::<T>()?;
    let weight = inputs[1].as_slice::<T>()?;
    let bias = if centred { Some(inputs[2].as_slice::<T>()?) } else { None };
    let width = weight.len();
    let mut y = Tensor::for_overwrite(ctx, inputs[0].shape().clone(), inputs[0].dtype());
    let eps = T::Acc::constant(eps);
    let kernel = |x: &[T], y: &mut [T]| norm_rows(x, y, weight, bias, eps);
    for_each_row(ctx, x, width, y.as_mut_slice::<T>()?, width, kernel);
    Ok(y)
}

multiversion! {
    /// Normalises each row of `x` (rows as wide as `weight`) into `y`: centred with a bias when
    /// there is one (layer norm), scaled only when not (rms norm).
    fn norm_rows<T: RowFloat>(
        x: &[T],
        y: &mut [T],
        weight: &[T],
        bias: Option<&[T]>,
        eps: T::Acc,
    ) {
        let width = weight.len();
        let rows = x.chunks_exact(width).zip(y.chunks_exact_mut(width));
        for (index, (x_row, y_row)) in rows.enumerate() {
            prefetch(row(x, width, index + 1));
            let stats = row_stats(x_row, eps, bias.is_some());
            match bias {
                Some(bias) => affine_row(x_row, y_row, stats, weight, bias),
                None => scale_row(x_row, y_row, stats.1, weight),
            }
        }
    }
}

/// Forward of `skip_layer_norm` ([`super::skip_layer_norm`]): inputs `x, y, bias, w, b`;
/// outputs `s = x + (y + bias)` (rounded as the two adds round) and `layer_norm(s)`.
pub(crate) fn skip_norm_forward<T: RowFloat>(
    ctx: &Context,
    inputs: &[Tensor],
    eps: f64,
) -> Result<Vec<Tensor>> {
    let [x, y, bias, weight, norm_bias] = inputs else {
        return Err(Error::Arity { op: "skip_layer_norm", expected: 5, got: inputs.len() });
    };
    let (xs, ys) = (x.as_slice::<T>()?, y.as_slice::<T>()?);
    let (bias, weight, norm_bias) =
        (bias.as_slice::<T>()?, weight.as_slice::<T>()?, norm_bias.as_slice::<T>()?);
    let width = weight.len();
    let rows = xs.len() / width.max(1);
    let mut sum = Tensor::for_overwrite(ctx, x.shape().clone(), x.dtype());
    let mut normed = Tensor::for_overwrite(ctx, x.shape().clone(), x.dtype());
    let (sum_all, normed_all) =
        (SharedRows::new(sum.as_mut_slice::<T>()?), SharedRows::new(normed.as_mut_slice::<T>()?));
    let eps = T::Acc::constant(eps);
    for_each_range(ctx, rows, width, |range| {
        let span = range.start * width..range.end * width;
        // SAFETY: tasks cover disjoint row ranges, so each row of both outputs has one writer.
        let (sum, normed) = unsafe { (sum_all.row(span.clone()), normed_all.row(span.clone())) };
        let inputs = SkipRows { x: &xs[span.clone()], y: &ys[span], bias };
        skip_norm_rows(inputs, (sum, normed), (weight, norm_bias), eps);
    });
    Ok(vec![sum, normed])
}

/// Rows of `x` and `y` (as wide as `bias`) of a `skip_layer_norm` task.
struct SkipRows<'a, T> {
    x: &'a [T],
    y: &'a [T],
    bias: &'a [T],
}

multiversion! {
    /// Each row's `s = x + (y + bias)` into `sum` and its layer norm into `normed`, the row of
    /// `s` read back from cache.
    fn skip_norm_rows<T: RowFloat>(
        inputs: SkipRows<'_, T>,
        outputs: (&mut [T], &mut [T]),
        parameters: (&[T], &[T]),
        eps: T::Acc,
    ) {
        let ((sum, normed), (weight, norm_bias)) = (outputs, parameters);
        let width = weight.len();
        let rows = inputs.x.chunks_exact(width).zip(inputs.y.chunks_exact(width));
        let outputs = sum.chunks_exact_mut(width).zip(normed.chunks_exact_mut(width));
        for ((x, y), (s, n)) in rows.zip(outputs) {
            for (((s, &x), &y), &b) in s.iter_mut().zip(x).zip(y).zip(inputs.bias) {
                *s = T::narrow(x.widen() + T::narrow(y.widen() + b.widen()).widen());
            }
            let stats = row_stats(s, eps, true);
            affine_row(s, n, stats, weight, norm_bias);
        }
    }
}

#[inline(always)]
fn affine_row<T: RowFloat>(
    x: &[T],
    y: &mut [T],
    (mean, rstd): (T::Acc, T::Acc),
    weight: &[T],
    bias: &[T],
) {
    let params = weight.iter().zip(bias);
    for ((out, &v), (&w, &b)) in y.iter_mut().zip(x).zip(params) {
        *out = T::narrow((v.widen() - mean) * rstd * w.widen() + b.widen());
    }
}

#[inline(always)]
fn scale_row<T: RowFloat>(x: &[T], y: &mut [T], rstd: T::Acc, weight: &[T]) {
    for ((out, &v), &w) in y.iter_mut().zip(x).zip(weight) {
        *out = T::narrow(v.widen() * rstd * w.widen());
    }
}

/// Backward of layer norm (`centred`; outputs dx, dw, db) or rms norm (dx, dw); inputs x, w, dy.
pub(crate) fn norm_backward<T: RowFloat>(
    ctx: &Context,
    inputs: &[Tensor],
    eps: f64,
    centred: bool,
) -> Result<Vec<Tensor>> {
    let gradient = RowsGradient { weight: inputs[1].as_slice::<T>()?, eps, centred, skip: false };
    let (dx, sums) = gradient.run(ctx, &inputs[0], inputs[2].as_slice::<T>()?, None)?;
    let width = gradient.weight.len();
    let parameters = if centred { 2 } else { 1 };
    let mut outputs = vec![dx];
    outputs.extend(sums.chunks_exact(width).take(parameters).map(narrowed::<T>));
    Ok(outputs)
}

/// The `[D]` tensor of column sums, narrowed to `T`.
fn narrowed<T: RowFloat>(sums: &[T::Acc]) -> Tensor {
    let values: Vec<T> = sums.iter().map(|&v| T::narrow(v)).collect();
    let width = values.len();
    Tensor::from_vec(values, [width]).expect("a [D] vector holds D values")
}

/// Backward of `skip_layer_norm` ([`super::skip_layer_norm`]): inputs `s, w, dn` and, when the
/// sum `s` itself has a gradient, `ds`; outputs the gradient of the sum (the layer norm's `dx`
/// plus `ds`), `dw`, `db` of the norm and its column sums (the gradient of the branch's bias).
pub(crate) fn skip_norm_backward<T: RowFloat>(
    ctx: &Context,
    inputs: &[Tensor],
    eps: f64,
) -> Result<Vec<Tensor>> {
    let gradient =
        RowsGradient { weight: inputs[1].as_slice::<T>()?, eps, centred: true, skip: true };
    let residual = inputs.get(3).map(|ds| ds.as_slice::<T>()).transpose()?;
    let (dx, sums) = gradient.run(ctx, &inputs[0], inputs[2].as_slice::<T>()?, residual)?;
    let width = gradient.weight.len();
    let mut outputs = vec![dx];
    outputs.extend(sums.chunks_exact(width).map(narrowed::<T>));
    Ok(outputs)
}

/// A norm's backward over whole rows: the parameters and what the rows compute.
struct RowsGradient<'a, T: RowFloat> {
    weight: &'a [T],
    eps: f64,
    /// Layer norm (centred, with a bias) or rms norm.
    centred: bool,
    /// `skip_layer_norm`: a residual gradient may be added to `dx`, whose column sums follow the
    /// parameters' sums.
    skip: bool,
}

/// What a task of rows returns: the parameters' column sums and, with `skip`, the column sums
/// of `dx` per block of [`column_block_rows`] (the part of each block the task holds).
struct TaskSums<A> {
    parameters: Vec<A>,
    blocks: Vec<BlockSums<A>>,
}

/// The column sums of `dx` over the rows of block `block` that one task holds, folded in row
/// order from zero; `whole` when those are all of the block's rows.
struct BlockSums<A> {
    block: usize,
    whole: bool,
    sums: Vec<A>,
}

impl<T: RowFloat> RowsGradient<'_, T> {
    /// `dx` and the column sums: `[Σ dy ⊙ x̂, Σ dy]`, then with `skip` `Σ dx` (after `residual`
    /// is added). Zero sums for no rows.
    ///
    /// `Σ dx` adds the rows as `sum` over them does: each block of [`column_block_rows`] folded
    /// in row order, the blocks in order. A block that two tasks share is folded again from the
    /// rows of `dx` once they are written.
    fn run(
        &self,
        ctx: &Context,
        x: &Tensor,
        dy: &[T],
        residual: Option<&[T]>,
    ) -> Result<(Tensor, Vec<T::Acc>)> {
        let xs = x.as_slice::<T>()?;
        let width = self.weight.len();
        let rows = xs.len() / width.max(1);
        let block_rows = column_block_rows(rows, width);
        let mut dx = Tensor::for_overwrite(ctx, x.shape().clone(), x.dtype());
        let dx_all = SharedRows::new(dx.as_mut_slice::<T>()?);
        let eps = T::Acc::constant(self.eps);
        let partial = |range: std::ops::Range<usize>| {
            let span = range.start * width..range.end * width;
            // SAFETY: tasks cover disjoint row ranges, so each row of dx has one writer.
            let dx_rows = unsafe { dx_all.row(span.clone()) };
            let residual = residual.map(|r| &r[span.clone()]);
            let rows_in =
                NormRows { x: &xs[span.clone()], dy: &dy[span], weight: self.weight, eps };
            let blocks = RowBlocks { first: range.start, size: block_rows, rows };
            norm_backward_rows(rows_in, dx_rows, (self.centred, self.skip), (residual, blocks))
        };
        let add = |mut a: TaskSums<T::Acc>, b: TaskSums<T::Acc>| {
            a.parameters.iter_mut().zip(b.parameters).for_each(|(s, v)| *s += v);
            a.blocks.extend(b.blocks);
            a
        };
        let Some(task_sums) = sum_over_rows(ctx, rows, width, partial, add) else {
            let blocks = 2 + usize::from(self.skip);
            return Ok((dx, vec![T::Acc::zero(); blocks * width]));
        };
        let mut sums = task_sums.parameters;
        if self.skip {
            sums.extend(column_sums(dx.as_slice::<T>()?, width, block_rows, task_sums.blocks));
        }
        Ok((dx, sums))
    }
}

/// `Σ dx` over the rows from the tasks' block sums: each block's whole sum, or (for a block the
/// tasks split) its rows of `dx` folded again in order; the blocks added in order from zero.
fn column_sums<T: RowFloat>(
    dx: &[T],
    width: usize,
    block_rows: usize,
    mut parts: Vec<BlockSums<T::Acc>>,
) -> Vec<T::Acc> {
    let rows = dx.len() / width.max(1);
    parts.retain(|part| part.whole);
    parts.sort_by_key(|part| part.block);
    let mut parts = parts.into_iter().peekable();
    let mut total = vec![T::Acc::zero(); width];
    for block in 0..rows.div_ceil(block_rows) {
        let sums = match parts.next_if(|part| part.block == block) {
            Some(part) => part.sums,
            None => {
                let mut sums = vec![T::Acc::zero(); width];
                let rows = block * block_rows..((block + 1) * block_rows).min(rows);
                for row in dx[rows.start * width..rows.end * width].chunks_exact(width) {
                    sums.iter_mut().zip(row).for_each(|(s, v)| *s += v.widen());
                }
                sums
            }
        };
        total.iter_mut().zip(sums).for_each(|(t, s)| *t += s);
    }
    total
}

/// Where a task's rows lie among the blocks of a column sum: its first row, the rows per block
/// and the rows of the whole tensor.
#[derive(Clone, Copy)]
struct RowBlocks {
    first: usize,
    size: usize,
    rows: usize,
}

/// Rows of the norm backward: `x` and `dy` hold whole rows as wide as `weight`.
struct NormRows<'a, T: RowFloat> {
    x: &'a [T],
    dy: &'a [T],
    weight: &'a [T],
    eps: T::Acc,
}

multiversion! {
    /// Writes `dx` of every row and returns `[Σ dy ⊙ x̂, Σ dy]` over the rows (`2·D` sums);
    /// with `skip`, adds `residual` (when given) to each row of `dx` as it is written, and
    /// returns the column sums of `dx` per block of rows ([`BlockSums`]).
    fn norm_backward_rows<T: RowFloat>(
        rows: NormRows<'_, T>,
        dx: &mut [T],
        mode: (bool, bool),
        skip_inputs: (Option<&[T]>, RowBlocks),
    ) -> TaskSums<T::Acc> {
        let ((centred, skip), (residual, blocks)) = (mode, skip_inputs);
        let width = rows.weight.len();
        let mut parameters = vec![T::Acc::zero(); 2 * width];
        let mut block_sums: Vec<BlockSums<T::Acc>> = Vec::new();
        let inputs = rows.x.chunks_exact(width).zip(rows.dy.chunks_exact(width));
        for (index, ((x, dy), dx)) in inputs.zip(dx.chunks_exact_mut(width)).enumerate() {
            let (mean, rstd) = row_stats(x, rows.eps, centred);
            let row = NormRow { x, dy, weight: rows.weight, mean, rstd };
            row.backward(dx, &mut parameters, centred);
            if !skip {
                continue;
            }
            let at = blocks.first + index;
            let (block, offset) = (at / blocks.size, at % blocks.size);
            if index == 0 || offset == 0 {
                let sums = vec![T::Acc::zero(); width];
                block_sums.push(BlockSums { block, whole: offset == 0, sums });
            }
            let Some(last) = block_sums.last_mut() else { continue };
            match residual {
                Some(residual) => {
                    let residual = &residual[index * width..(index + 1) * width];
                    for ((d, &r), c) in dx.iter_mut().zip(residual).zip(last.sums.iter_mut()) {
                        *d = T::narrow(d.widen() + r.widen());
                        *c += d.widen();
                    }
                }
                None => dx.iter().zip(last.sums.iter_mut()).for_each(|(d, c)| *c += d.widen()),
            }
        }
        // The task's last block is whole only if the task reaches that block's end.
        let end = blocks.first + rows.x.len() / width.max(1);
        if let Some(last) = block_sums.last_mut() {
            let block_end = ((last.block + 1) * blocks.size).min(blocks.rows);
            last.whole &= end == block_end;
        }
        TaskSums { parameters, blocks: block_sums }
    }
}

/// One row of the norm backward.
struct NormRow<'a, T: RowFloat> {
    x: &'a [T],
    dy: &'a [T],
    weight: &'a [T],
    mean: T::Acc,
    rstd: T::Acc,
}

impl<T: RowFloat> NormRow<'_, T> {
    /// Writes `dx` and adds `dy ⊙ x̂` to `sums[..D]` and `dy` to `sums[D..]`. One pass gathers
    /// those and the row's `Σ dy ⊙ w` and `Σ dy ⊙ w ⊙ x̂` (in lanes), a second writes `dx`: three
    /// passes over the row were two here (`layer_norm_grad` of the GPT, `[1024, 256]`, 2 threads:
    /// 166 -> 144 µs).
    #[inline(always)]
    fn backward(&self, dx: &mut [T], sums: &mut [T::Acc], centred: bool) {
        let (mean, rstd) = (self.mean, self.rstd);
        let len = self.x.len();
        let width = T::Acc::constant(len as f64);
        let (dw, db) = sums.split_at_mut(len);
        let zero = T::Acc::zero();
        let (mut g_lanes, mut gx_lanes) = ([zero; LANES], [zero; LANES]);
        // Array chunks with the lane index known at compile time (a closure taking the lane as
        // an argument ran slower: `[1024, 256]` on one thread 197 -> 184 µs this way). The two
        // lane sums still go through the stack on every chunk (`perf annotate`): a lead.
        let len_whole = len - len % LANES;
        let (xs, _) = self.x.as_chunks::<LANES>();
        let (dys, _) = self.dy.as_chunks::<LANES>();
        let (ws, _) = self.weight.as_chunks::<LANES>();
        let (dws, _) = dw.as_chunks_mut::<LANES>();
        let (dbs, _) = db.as_chunks_mut::<LANES>();
        let inputs = xs.iter().zip(dys).zip(ws);
        for (((x, dy), w), (dw, db)) in inputs.zip(dws.iter_mut().zip(dbs)) {
            for lane in 0..LANES {
                let (d, xhat) = (dy[lane].widen(), (x[lane].widen() - mean) * rstd);
                dw[lane] += d * xhat;
                db[lane] += d;
                let gw = d * w[lane].widen();
                g_lanes[lane] += gw;
                gx_lanes[lane] += gw * xhat;
            }
        }
        for j in len_whole..len {
            let (d, xhat) = (self.dy[j].widen(), (self.x[j].widen() - mean) * rstd);
            dw[j] += d * xhat;
            db[j] += d;
            let gw = d * self.weight[j].widen();
            g_lanes[0] += gw;
            gx_lanes[0] += gw * xhat;
        }
        let g_sum = fold_lanes(g_lanes, |a, b| a + b);
        let gx_sum = fold_lanes(gx_lanes, |a, b| a + b);
        let g_mean = if centred { g_sum / width } else { T::Acc::zero() };
        let gx_mean = gx_sum / width;
        let inputs = self.x.iter().zip(self.dy).zip(self.weight);
        for (out, ((&x, &d), &w)) in dx.iter_mut().zip(inputs) {
            let xhat = (x.widen() - mean) * rstd;
            *out = T::narrow(rstd * (d.widen() * w.widen() - g_mean - xhat * gx_mean));
        }
    }
}
