//! `bias_gelu` (and `bias_relu`, `bias_silu`): `y = f(x + b)` with a bias `b` along the last
//! axis, the add and the activation of a linear layer in one pass; and its gradient in one pass,
//! `dx = g · f'(x + b)` with the bias gradient `db = Σ_rows dx` summed as `dx` is written.
//!
//! The unfused chain is an `add` (reading and writing the product's output), the activation,
//! and in the backward the activation's gradient followed by a `sum` that reads `dx` again.
//! Every one of those passes is bound by memory on the CPU (the GPT's `[1024, 1024]` c_fc
//! output is 4 MB, and an element-wise pass runs at the host's shared bandwidth whatever the
//! thread count), so the fused ops keep two passes of four.
//!
//! `x + b` is computed in the compute type (f32 for bf16 and f16): in f32 and f64, `y`, `dx` and
//! `db` equal the unfused chain's bit for bit (`db` adds in `sum`'s order, for rows of up to
//! 16 Ki elements, where `sum` folds blocks of rows); bf16 and f16 skip the unfused chain's
//! rounding of `x + b` to the narrow dtype.

use std::sync::Arc;

use rayon::prelude::*;

use meshflow_placement::{Sbp, Signature};

use crate::cpu::reduce::ROW_BLOCKS;
use crate::cpu::FloatElement;
use crate::ops::nn_rows::{first_order_only, for_each_range, for_each_row, SharedRows};
use crate::ops::softmax::{checked_signatures, last_axis_input, row_signatures};
use crate::ops::unary::Differentiable;
use crate::{Context, Emit, Error, Op, Result, Tensor, TensorMeta, Value};

/// `y = f(x + b)`: `x [..., C]`, a bias `b [C]` of `x`'s dtype.
///
/// Signatures, per device `d`: `B, B -> B`; `S(i), B -> S(i)` for every axis `i` but the last
/// (`y_d = f(x_d + b)`); `S(last), S(0) -> S(last)` (the columns of `x` with their biases: a
/// column-parallel layer). No partial sums: `f` is not linear.
#[derive(Clone, Debug)]
pub struct BiasAct<P>(pub P);

/// Applies [`BiasAct`]: `f(x + b)`.
pub fn bias_act<P: Differentiable>(e: &mut dyn Emit, f: P, x: Value, b: Value) -> Result<Value> {
    crate::emit1(e, BiasAct(f), &[x, b])
}

/// Checks that `b` is `[C]` for `x [..., C]` (rank ≥ 1), in `x`'s dtype.
fn check_bias(op: &'static str, x: &TensorMeta, b: &TensorMeta) -> Result<()> {
    let width = x.shape.dims()[x.shape.rank() - 1];
    if b.dtype != x.dtype {
        return Err(Error::dtype(op, &[x.dtype, b.dtype], "the bias takes x's dtype"));
    }
    if b.shape.dims() != [width] {
        return Err(Error::shape(op, &[&x.shape, &b.shape], "the bias must be [C] for x [..., C]"));
    }
    Ok(())
}

/// The signature of a column-parallel layer: rows of `x` (and `g`) split on the last axis, the
/// bias (and its gradient) on its only one.
fn column_signature(rank: usize, inputs: &[bool], outputs: &[bool]) -> Signature {
    let sbp = |row: &bool| if *row { Sbp::Split(rank - 1) } else { Sbp::Split(0) };
    Signature::new(
        inputs.iter().map(sbp).collect::<Vec<_>>(),
        outputs.iter().map(sbp).collect::<Vec<_>>(),
    )
}

impl<P: Differentiable> Op for BiasAct<P> {
    fn name(&self) -> &'static str {
        P::BIAS_NAME
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let x = last_axis_input(P::BIAS_NAME, inputs, 2)?;
        check_bias(P::BIAS_NAME, x, &inputs[1])?;
        Ok(vec![x.clone()])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.forward_owned(ctx, inputs.to_vec())
    }

    /// In `x`'s storage when nothing else holds it (the gradient keeps `x`, so in training it
    /// writes fresh storage).
    fn forward_owned(&self, ctx: &Context, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        crate::check_inputs(self, &inputs)?;
        let [x, b] = <[Tensor; 2]>::try_from(inputs).map_err(|inputs| Error::Arity {
            op: P::BIAS_NAME,
            expected: 2,
            got: inputs.len(),
        })?;
        let out = crate::dispatch_float!(P::BIAS_NAME, x.dtype(), T => {
            activate::<T, P>(ctx, &self.0, x, &b)
        })?;
        Ok(vec![out])
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        checked_signatures(self, inputs, || {
            let rank = inputs[0].shape.rank();
            let mut signatures = row_signatures(rank, &[None, Some(Sbp::Broadcast)], &[None]);
            signatures.push(column_signature(rank, &[true, false], &[true]));
            signatures
        })
    }

    fn backward(
        &self,
        e: &mut dyn Emit,
        inputs: &[Value],
        _outputs: &[Value],
        grads: &[Option<Value>],
    ) -> Result<Vec<Option<Value>>> {
        let Some(g) = grads[0] else { return Ok(vec![None, None]) };
        let grad = BiasActGrad(self.0.clone());
        let outputs = e.emit(Arc::new(grad), &[inputs[0], inputs[1], g])?;
        Ok(outputs.into_iter().map(Some).collect())
    }

    /// The add and the activation's one flop per element.
    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        inputs.first().map_or(0, |x| 2 * x.shape.numel() as u64)
    }
}

/// The gradient of [`BiasAct`]: inputs `x, b, g`; outputs `dx = g · f'(x + b)` and
/// `db = Σ dx` over every axis but the last.
///
/// Signatures, per device `d`: `B, B, B -> B, B`; `S(i), B, S(i) -> S(i), P` for every axis `i`
/// but the last (each device sums its own rows: an addend of `db`); `S(last), S(0), S(last) ->
/// S(last), S(0)`; `B, B, P -> P, P` (both outputs are linear in `g`).
#[derive(Clone, Debug)]
pub struct BiasActGrad<P>(pub P);

impl<P: Differentiable> Op for BiasActGrad<P> {
    fn name(&self) -> &'static str {
        P::BIAS_GRAD_NAME
    }

    fn infer(&self, inputs: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
        let x = last_axis_input(P::BIAS_GRAD_NAME, inputs, 3)?;
        check_bias(P::BIAS_GRAD_NAME, x, &inputs[1])?;
        if &inputs[2] != x {
            let reason = "g must have x's shape and dtype";
            return Err(Error::shape(P::BIAS_GRAD_NAME, &[&x.shape, &inputs[2].shape], reason));
        }
        Ok(vec![x.clone(), inputs[1].clone()])
    }

    fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.forward_owned(ctx, inputs.to_vec())
    }

    /// `dx` in `g`'s storage when nothing else holds it.
    fn forward_owned(&self, ctx: &Context, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        crate::check_inputs(self, &inputs)?;
        crate::dispatch_float!(P::BIAS_GRAD_NAME, inputs[0].dtype(), T => {
            gradient::<T, P>(ctx, &self.0, inputs)
        })
    }

    fn signatures(&self, inputs: &[TensorMeta]) -> Vec<Signature> {
        checked_signatures(self, inputs, || {
            let rank = inputs[0].shape.rank();
            let (b, p) = (Sbp::Broadcast, Sbp::PartialSum);
            let rows = [None, Some(b), None];
            let mut signatures = row_signatures(rank, &rows, &[None, Some(p)]);
            signatures.push(column_signature(rank, &[true, false, true], &[true, false]));
            signatures.push(Signature::new([b, b, p], [p, p]));
            signatures
        })
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

    /// The add, the derivative (counted as one), the product with `g` and the column sum.
    fn flops(&self, inputs: &[TensorMeta]) -> u64 {
        inputs.first().map_or(0, |x| 4 * x.shape.numel() as u64)
    }
}

/// `[dx, db]` from `[x, b, g]`: blocks of whole rows write their rows of `dx` and return their
/// column sums, added up in block order.
fn gradient<T: FloatElement, P: Differentiable>(
    ctx: &Context,
    f: &P,
    inputs: Vec<Tensor>,
) -> Result<Vec<Tensor>> {
    let [x, b, g] = <[Tensor; 3]>::try_from(inputs).map_err(|inputs| Error::Arity {
        op: P::BIAS_GRAD_NAME,
        expected: 3,
        got: inputs.len(),
    })?;
    let width = b.numel();
    let bias: Vec<T::Acc> = b.as_slice::<T>()?.iter().map(|v| v.to_acc()).collect();
    let rows = x.numel().checked_div(width).unwrap_or(0);
    let xs = x.as_slice::<T>()?;
    // In `g`'s storage when nothing else holds it: each task then reads its rows of `g` from
    // the rows it writes.
    let (mut dx, g) = if g.is_unique() {
        (g, None)
    } else {
        (Tensor::for_overwrite(ctx, g.shape().clone(), g.dtype()), Some(g))
    };
    let gs = g.as_ref().map(|g| g.as_slice::<T>()).transpose()?;
    let dx_all = SharedRows::new(dx.as_mut_slice::<T>()?);
    // The rows in `sum`'s blocks, each summed in row order and the blocks added in order, so
    // `db` is what `sum` over the rows of this `dx` gives, whatever the thread count.
    let block_rows = rows.div_ceil(ROW_BLOCKS).max(1);
    let block = |index: usize| {
        let span = index * block_rows * width..((index + 1) * block_rows).min(rows) * width;
        // SAFETY: blocks cover disjoint row ranges, so each row of dx has one writer.
        let out = unsafe { dx_all.row(span.clone()) };
        let mut sums = vec![T::Acc::default(); width];
        let rows = GradRows { x: &xs[span.clone()], bias: &bias };
        match gs {
            Some(gs) => grad_rows(f, rows, &gs[span], out, &mut sums),
            None => grad_rows_in_place(f, rows, out, &mut sums),
        }
        sums
    };
    let blocks = rows.div_ceil(block_rows);
    let partials: Vec<Vec<T::Acc>> = if ctx.threads() == 1 || blocks <= 1 {
        (0..blocks).map(block).collect()
    } else {
        ctx.install(|| (0..blocks).into_par_iter().map(block).collect())
    };
    let mut sums = vec![T::Acc::default(); width];
    for partial in partials {
        sums.iter_mut().zip(partial).for_each(|(s, v)| *s = *s + v);
    }
    let db: Vec<T> = sums.into_iter().map(T::from_acc).collect();
    Ok(vec![dx, Tensor::from_vec(db, [width])?])
}

/// `f(x + b)` over tasks of whole rows, in `x`'s storage when it holds it alone.
fn activate<T: FloatElement, P: Differentiable>(
    ctx: &Context,
    f: &P,
    mut x: Tensor,
    b: &Tensor,
) -> Result<Tensor> {
    let bias: Vec<T::Acc> = b.as_slice::<T>()?.iter().map(|v| v.to_acc()).collect();
    let width = bias.len();
    if x.is_unique() {
        let values = x.as_mut_slice::<T>()?;
        let rows = values.len().checked_div(width).unwrap_or(0);
        let all = SharedRows::new(values);
        for_each_range(ctx, rows, width, |range| {
            // SAFETY: tasks cover disjoint row ranges.
            let rows = unsafe { all.row(range.start * width..range.end * width) };
            activate_rows_in_place(f, &bias, rows);
        });
        return Ok(x);
    }
    let mut y = Tensor::for_overwrite(ctx, x.shape().clone(), x.dtype());
    let kernel = |x: &[T], y: &mut [T]| activate_rows(f, &bias, x, y);
    for_each_row(ctx, x.as_slice::<T>()?, width, y.as_mut_slice::<T>()?, width, kernel);
    Ok(y)
}

crate::cpu::simd::multiversion! {
    /// `y = f(x + b)` over whole rows as wide as `bias`.
    fn activate_rows<T: FloatElement, P: Differentiable>(
        f: &P,
        bias: &[T::Acc],
        x: &[T],
        y: &mut [T],
    ) {
        for (x, y) in x.chunks_exact(bias.len()).zip(y.chunks_exact_mut(bias.len())) {
            for ((&x, &b), y) in x.iter().zip(bias).zip(y.iter_mut()) {
                *y = T::from_acc(f.apply::<T::Acc, FUSED>(x.to_acc() + b));
            }
        }
    }
}

crate::cpu::simd::multiversion! {
    /// [`activate_rows`] in place.
    fn activate_rows_in_place<T: FloatElement, P: Differentiable>(
        f: &P,
        bias: &[T::Acc],
        xy: &mut [T],
    ) {
        for row in xy.chunks_exact_mut(bias.len()) {
            for (v, &b) in row.iter_mut().zip(bias) {
                *v = T::from_acc(f.apply::<T::Acc, FUSED>(v.to_acc() + b));
            }
        }
    }
}

/// Rows of `x` and the bias (widened) of a gradient task.
struct GradRows<'a, T: FloatElement> {
    x: &'a [T],
    bias: &'a [T::Acc],
}

crate::cpu::simd::multiversion! {
    /// `dx = g · f'(x + b)` over whole rows, each stored value also added to `sums`.
    fn grad_rows<T: FloatElement, P: Differentiable>(
        f: &P,
        rows: GradRows<'_, T>,
        g: &[T],
        dx: &mut [T],
        sums: &mut [T::Acc],
    ) {
        let width = rows.bias.len();
        let lines = rows.x.chunks_exact(width).zip(g.chunks_exact(width));
        for ((x, g), dx) in lines.zip(dx.chunks_exact_mut(width)) {
            grad_line::<T, P, FUSED>(f, x, rows.bias, g, dx, sums);
        }
    }
}

crate::cpu::simd::multiversion! {
    /// [`grad_rows`] with `g` in `dx`'s storage: each element is read, then overwritten.
    fn grad_rows_in_place<T: FloatElement, P: Differentiable>(
        f: &P,
        rows: GradRows<'_, T>,
        g_dx: &mut [T],
        sums: &mut [T::Acc],
    ) {
        let width = rows.bias.len();
        for (x, g_dx) in rows.x.chunks_exact(width).zip(g_dx.chunks_exact_mut(width)) {
            let values = x.iter().zip(rows.bias).zip(g_dx.iter_mut());
            for (((&x, &b), d), s) in values.zip(sums.iter_mut()) {
                let value = derivative_times::<T, P, FUSED>(f, x, b, *d);
                *d = value;
                *s = *s + value.to_acc();
            }
        }
    }
}

/// One row of [`grad_rows`]: `dx[c] = g[c] · f'(x[c] + b[c])`, `sums[c] += dx[c]` (the value
/// as stored, so a narrow dtype's bias gradient sums what its `dx` holds).
#[inline(always)]
fn grad_line<T: FloatElement, P: Differentiable, const FUSED: bool>(
    f: &P,
    x: &[T],
    bias: &[T::Acc],
    g: &[T],
    dx: &mut [T],
    sums: &mut [T::Acc],
) {
    let values = x.iter().zip(bias).zip(g);
    for ((((&x, &b), &g), d), s) in values.zip(dx.iter_mut()).zip(sums.iter_mut()) {
        let value = derivative_times::<T, P, FUSED>(f, x, b, g);
        *d = value;
        *s = *s + value.to_acc();
    }
}

/// `g · f'(x + b)`, stored as `T`.
#[inline(always)]
fn derivative_times<T: FloatElement, P: Differentiable, const FUSED: bool>(
    f: &P,
    x: T,
    b: T::Acc,
    g: T,
) -> T {
    T::from_acc(g.to_acc() * f.derivative::<T::Acc, FUSED>(x.to_acc() + b))
}
