//! Reductions over axes (sum, mean, max), accumulated in the compute type of the dtype.

use num_traits::Float;

use crate::cpu::simd::{fold_chunked, multiversion};
use crate::cpu::{for_chunks, FloatElement};
use crate::{Context, Result, Shape, Tensor};

/// What a reduction computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// The sum.
    Sum,
    /// The sum divided by the number of reduced elements.
    Mean,
    /// The largest element.
    Max,
}

/// Columns one task of a column-parallel reduction owns: contiguous reads of 256 bytes (four
/// cache lines) per row, and a 256-wide bias gradient still splits over 4 tasks.
const COLUMN_BLOCK: usize = 64;

/// Reduces `x` over `axes` (sorted, distinct, in range) and returns the keep-dim result.
pub fn reduce_axes<T: FloatElement>(
    ctx: &Context,
    x: &Tensor,
    axes: &[usize],
    reduction: Reduction,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let mut kept = dims.clone();
    for &axis in axes {
        kept[axis] = 1;
    }
    let is_max = reduction == Reduction::Max;
    let src = x.as_slice::<T>()?;
    let mut current: Option<Vec<T::Acc>> = None;
    let mut shape = dims.clone();
    for (first, last) in axis_groups(axes).into_iter().rev() {
        let outer: usize = shape[..first].iter().product();
        let size: usize = shape[first..=last].iter().product();
        let inner: usize = shape[last + 1..].iter().product();
        let next = match &current {
            None => reduce_one(ctx, src, (outer, size, inner), T::to_acc, is_max),
            Some(values) => reduce_one(ctx, values, (outer, size, inner), |v| v, is_max),
        };
        current = Some(next);
        for dim in &mut shape[first..=last] {
            *dim = 1;
        }
    }
    let mut values = current.unwrap_or_else(|| src.iter().map(|&v| v.to_acc()).collect());
    if reduction == Reduction::Mean {
        let count: usize = axes.iter().map(|&a| dims[a]).product();
        let scale = T::acc_from_f64(1.0 / count as f64);
        values.iter_mut().for_each(|v| *v = *v * scale);
    }
    let mut out = Tensor::zeros(Shape::new(kept), T::DTYPE);
    T::store(&values, out.as_mut_slice::<T>()?);
    Ok(out)
}

/// Runs of consecutive axes, as `(first, last)` pairs.
fn axis_groups(axes: &[usize]) -> Vec<(usize, usize)> {
    let mut groups: Vec<(usize, usize)> = Vec::new();
    for &axis in axes {
        match groups.last_mut() {
            Some((_, last)) if *last + 1 == axis => *last = axis,
            _ => groups.push((axis, axis)),
        }
    }
    groups
}

/// Reduces the middle axis of an `(outer, size, inner)` view of `src`.
fn reduce_one<I: Copy + Sync, A: Float + Send + Sync>(
    ctx: &Context,
    src: &[I],
    (outer, size, inner): (usize, usize, usize),
    widen: impl Fn(I) -> A + Sync + Send,
    is_max: bool,
) -> Vec<A> {
    let start = if is_max { A::neg_infinity() } else { A::zero() };
    let combine = move |a: A, b: A| if is_max { a.max(b) } else { a + b };
    let mut out = vec![start; outer * inner];
    if out.is_empty() {
        return out;
    }
    if inner == 1 {
        if size == 0 {
            return out; // every row is empty: the starting value is the answer
        }
        for_chunks(ctx, &mut out, size, |first, chunk| {
            fold_rows(chunk, &src[first * size..], size, &widen, start, &combine);
        });
        return out;
    }
    // Fewer outer groups than row blocks: too few to spread over the threads by group. The
    // threshold is a constant, not the thread count, so that the order of the sums is too.
    if outer < ROW_BLOCKS {
        return reduce_columns(ctx, src, (outer, size, inner), widen, start, combine);
    }
    let mut rows: Vec<&mut [A]> = out.chunks_mut(inner).collect();
    for_chunks(ctx, &mut rows, size * inner, |first, chunk| {
        for (i, acc) in chunk.iter_mut().enumerate() {
            let base = (first + i) * size * inner;
            for k in 0..size {
                let row = &src[base + k * inner..base + (k + 1) * inner];
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a = combine(*a, widen(v));
                }
            }
        }
    });
    out
}

/// The `inner > 1` case with fewer than [`ROW_BLOCKS`] outer groups. Rows of up to
/// [`PARTIAL_COLUMNS`] columns go in [`ROW_BLOCKS`] blocks of consecutive rows, each folded
/// into a partial row of its own (contiguous reads, the partial in L1), and the partials are
/// folded in order; neither the blocks nor this path's choice depend on the thread count, so
/// the result does not either. Tasks that each owned 64 columns instead read 256 bytes of every
/// row, rows 4 KiB apart: the GPT's c_fc bias gradient (`[1024, 1024]` over its rows, 2
/// threads, criterion `gpt/sum_rows`, three runs each in turn) took 107-157 µs that way and
/// 62-80 µs by row blocks; the MLP's `[256, 1024]` (`mlp/sum_rows`) 25-27 µs and 20-25. Wider
/// rows go by column ranges, so that the partials stay small.
fn reduce_columns<I: Copy + Sync, A: Float + Send + Sync>(
    ctx: &Context,
    src: &[I],
    (outer, size, inner): (usize, usize, usize),
    widen: impl Fn(I) -> A + Sync + Send,
    start: A,
    combine: impl Fn(A, A) -> A + Sync + Send,
) -> Vec<A> {
    let mut out = vec![start; outer * inner];
    let block_rows = column_block_rows(size, inner);
    // One set of partial rows for every outer group (refilled per group), not one allocation
    // each.
    let mut partials = if inner > PARTIAL_COLUMNS {
        Vec::new()
    } else {
        vec![start; size.div_ceil(block_rows) * inner]
    };
    for (o, acc) in out.chunks_mut(inner).enumerate() {
        let base = o * size * inner;
        if inner > PARTIAL_COLUMNS {
            let mut blocks: Vec<&mut [A]> = acc.chunks_mut(COLUMN_BLOCK).collect();
            for_chunks(ctx, &mut blocks, size * COLUMN_BLOCK, |first, chunk| {
                for (b, columns) in chunk.iter_mut().enumerate() {
                    let src = &src[base + (first + b) * COLUMN_BLOCK..];
                    fold_columns(columns, src, size, inner, &widen, &combine);
                }
            });
            continue;
        }
        partials.fill(start);
        let mut rows: Vec<&mut [A]> = partials.chunks_mut(inner).collect();
        for_chunks(ctx, &mut rows, block_rows * inner, |first, chunk| {
            for (b, partial) in chunk.iter_mut().enumerate() {
                let row = (first + b) * block_rows;
                let src = &src[base + row * inner..];
                fold_columns(partial, src, block_rows.min(size - row), inner, &widen, &combine);
            }
        });
        for partial in partials.chunks(inner) {
            for (a, &p) in acc.iter_mut().zip(partial) {
                *a = combine(*a, p);
            }
        }
    }
    out
}

/// The rows that a sum over the rows of `[rows, width]` (`width > 1`) folds, in order, into each
/// partial, before it adds the partials in order ([`reduce_columns`]; all of them for rows
/// wider than [`PARTIAL_COLUMNS`]). A fused kernel that sums its columns the same way gives
/// `sum`'s bits (`skip_layer_norm_grad`).
pub(crate) fn column_block_rows(rows: usize, width: usize) -> usize {
    if width > PARTIAL_COLUMNS {
        rows.max(1)
    } else {
        rows.div_ceil(ROW_BLOCKS).max(1)
    }
}

/// Blocks of rows a column reduction folds separately ([`reduce_columns`]): 4, 8, 16 and 32
/// measured; 8 was the fastest on both the GPT's and the MLP's bias gradients.
pub(crate) const ROW_BLOCKS: usize = 8;

/// The widest rows [`reduce_columns`] folds by row blocks: 8 partial rows of 16 Ki f32 are
/// 512 KiB.
const PARTIAL_COLUMNS: usize = 16 << 10;

multiversion! {
    /// `columns[j] = combine(columns[j], widen(src[k * stride + j]))` for the `rows` rows `k`
    /// in order, compiled for the widest vectors the CPU has (a closure handed to
    /// [`for_chunks`] ran this loop 4 lanes wide: `perf annotate`).
    fn fold_columns<I: Copy, A: Float, W: Fn(I) -> A, C: Fn(A, A) -> A>(
        columns: &mut [A],
        src: &[I],
        rows: usize,
        stride: usize,
        widen: &W,
        combine: &C,
    ) {
        for k in 0..rows {
            let row = &src[k * stride..k * stride + columns.len()];
            for (a, &v) in columns.iter_mut().zip(row) {
                *a = combine(*a, widen(v));
            }
        }
    }
}

multiversion! {
    /// `out[i]` = row `i` of `src` (rows of `size`) folded from `start` in lanes
    /// ([`fold_chunked`]), compiled for the widest vectors the CPU has. Before, each row folded in 8 lanes in the baseline build (SSE2); f32 on 1
    /// thread, best of 20: `max` over the last axis of `[4096, 1024]` 1,424 -> 700 µs, of
    /// `[1024, 256]` 87 -> 32 µs; `sum` of `[1024, 256]` 19.1 -> 14.5 µs, of `[8192, 50]`
    /// 52.7 -> 36.9 µs; `sum` of `[4096, 1024]` level (27 GB/s, memory).
    fn fold_rows<I: Copy, A: Float, W: Fn(I) -> A, C: Fn(A, A) -> A>(
        out: &mut [A],
        src: &[I],
        size: usize,
        widen: &W,
        start: A,
        combine: &C,
    ) {
        for (o, row) in out.iter_mut().zip(src.chunks_exact(size)) {
            *o = fold_chunked(row, start, widen, combine);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_fold_every_element_in_lanes_and_tail() {
        // Rows shorter than the lanes, a whole number of lanes, and lanes with a tail, through
        // a one-thread context and a two-thread one.
        for size in [1, 5, 16, 17, 47, 100] {
            let rows = 37;
            let values: Vec<f32> =
                (0..rows * size).map(|v| ((v * 29 % 41) as f32 - 20.0) / 8.0).collect();
            let x = Tensor::from_vec(values.clone(), Shape::new(vec![rows, size])).expect("x");
            for ctx in [Context::single_thread(), Context::with_threads(2)] {
                let sums = reduce_axes::<f32>(&ctx, &x, &[1], Reduction::Sum).expect("sum");
                let maxima = reduce_axes::<f32>(&ctx, &x, &[1], Reduction::Max).expect("max");
                let (sums, maxima) =
                    (sums.as_slice::<f32>().unwrap(), maxima.as_slice::<f32>().unwrap());
                for (r, row) in values.chunks(size).enumerate() {
                    let sum: f64 = row.iter().map(|&v| f64::from(v)).sum();
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    assert!(
                        (f64::from(sums[r]) - sum).abs() < 1e-4,
                        "row {r} of {size}: sum {} != {sum}",
                        sums[r]
                    );
                    assert_eq!(maxima[r], max, "row {r} of {size}");
                }
            }
        }
    }
}
