//! Shared CPU machinery of the row-wise nn kernels (softmax, log_softmax, layer_norm, rms_norm,
//! cross_entropy, optimizers): the accumulate type of each float dtype, a vectorisable `exp`,
//! lane-chunked reductions, and running rows in parallel over a [`Context`]'s thread budget.
//!
//! Inner loops work on plain slices with 8 independent accumulator lanes, so the compiler turns
//! them into SIMD code; no per-element dtype dispatch happens (the dtype is matched once per call).

use std::ops::{AddAssign, MulAssign};

use half::{bf16, f16};
use num_traits::{Float, FromPrimitive, ToPrimitive, Zero};
use rayon::prelude::*;

use crate::cpu::simd::fold_chunked;
pub(crate) use crate::cpu::simd::{fold_lanes, LANES};
use crate::cpu::vectorized;
use crate::{Context, Element};

/// Elements a parallel task should at least cover, so that task overhead stays negligible.
const MIN_TASK_ELEMENTS: usize = 16 * 1024;

/// The type kernels compute in: `f32` for f32, bf16 and f16; `f64` for f64.
pub(crate) trait Accumulate:
    Float + FromPrimitive + ToPrimitive + AddAssign + MulAssign + Send + Sync + Element
{
    /// `e^x`, vectorisable (branch-free) for `f32`, the libm one for `f64`.
    fn exp_fast(self) -> Self;

    /// [`Accumulate::exp_fast`] for `self ≤ 0` (or NaN), cheaper for `f32`; `FUSED` when
    /// `mul_add` is one instruction (see `multiversion!`).
    fn exp_nonpositive<const FUSED: bool>(self) -> Self;

    /// A constant converted from `f64`.
    fn constant(value: f64) -> Self {
        Self::from_f64(value).unwrap_or_else(Self::nan)
    }
}

impl Accumulate for f32 {
    #[inline(always)]
    fn exp_fast(self) -> f32 {
        exp_f32::<false>(self)
    }

    #[inline(always)]
    fn exp_nonpositive<const FUSED: bool>(self) -> f32 {
        exp_f32_nonpositive::<FUSED>(self)
    }
}

impl Accumulate for f64 {
    #[inline(always)]
    fn exp_fast(self) -> f64 {
        self.exp()
    }

    #[inline(always)]
    fn exp_nonpositive<const FUSED: bool>(self) -> f64 {
        self.exp()
    }
}

/// A float storage type and its accumulate type.
pub(crate) trait RowFloat: Element {
    /// The type arithmetic happens in.
    type Acc: Accumulate;
    /// Widens to the accumulate type.
    fn widen(self) -> Self::Acc;
    /// Narrows from the accumulate type (round to nearest).
    fn narrow(value: Self::Acc) -> Self;
}

macro_rules! row_float_same {
    ($t:ty) => {
        impl RowFloat for $t {
            type Acc = $t;
            #[inline(always)]
            fn widen(self) -> $t {
                self
            }
            #[inline(always)]
            fn narrow(value: $t) -> $t {
                value
            }
        }
    };
}

row_float_same!(f32);
row_float_same!(f64);

macro_rules! row_float_half {
    ($t:ty) => {
        impl RowFloat for $t {
            type Acc = f32;
            #[inline(always)]
            fn widen(self) -> f32 {
                self.to_f32()
            }
            #[inline(always)]
            fn narrow(value: f32) -> $t {
                <$t>::from_f32(value)
            }
        }
    };
}

row_float_half!(bf16);
row_float_half!(f16);

/// Branch-free `e^x` for `f32` (Cephes polynomial, relative error below 2 ulp on the normal
/// range; 0 below −87.33, ∞ above 88.72; NaN stays NaN); `FUSED`: with FMA instructions.
#[inline(always)]
pub(crate) fn exp_f32<const FUSED: bool>(x: f32) -> f32 {
    let value = exp_reduced::<FUSED>(x.clamp(-87.33, 88.72));
    // Selects (blends, not branches): underflow to 0, overflow to ∞. NaN fails both
    // comparisons and stays NaN through the clamp and the polynomial.
    let value = if x < -87.33 { 0.0 } else { value };
    if x > 88.72 {
        f32::INFINITY
    } else {
        value
    }
}

/// [`exp_f32`] for `x ≤ 0` (or NaN), as softmax's `x − max`: no overflow to handle, so two
/// instructions fewer per vector; `FUSED`: with FMA instructions. Positive `x` above 88.72
/// gives garbage.
#[inline(always)]
pub(crate) fn exp_f32_nonpositive<const FUSED: bool>(x: f32) -> f32 {
    let value = exp_reduced::<FUSED>(if x < -87.33 { -87.33 } else { x });
    if x < -87.33 {
        0.0
    } else {
        value
    }
}

/// `e^x` for `x` in [−87.33, 88.72] (or NaN): `2^n · p(r)` with `x = n·ln 2 + r`; `FUSED`:
/// multiply-adds as FMA instructions.
#[inline(always)]
fn exp_reduced<const FUSED: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to the nearest integer and leaves that integer in the low bits.
    const ROUND: f32 = 12_582_912.0;
    let fma = multiply_add::<FUSED>;
    let shifted = fma(x, LOG2E, ROUND);
    let n = shifted - ROUND;
    let r = fma(n, -LN2_HIGH, x);
    let r = fma(n, -LN2_LOW, r);
    let mut p = 1.987_569_1e-4_f32;
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = fma(p, r, c);
    }
    let poly = fma(p, r * r, r + 1.0);
    let exponent = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    poly * f32::from_bits((exponent.wrapping_add(127) << 23) as u32)
}

/// `a·b + c`: one rounding with an FMA instruction when `FUSED` (only in code compiled for
/// FMA, where `mul_add` is that instruction; elsewhere it is a libm call), else two.
#[inline(always)]
pub(crate) fn multiply_add<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FUSED {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `Σ f(x_i)` in the accumulate type, with independent lanes so that it vectorises
/// ([`fold_chunked`]).
#[inline(always)]
pub(crate) fn sum_map<T: RowFloat>(xs: &[T], f: impl Fn(T::Acc) -> T::Acc) -> T::Acc {
    fold_chunked(xs, T::Acc::zero(), |x: T| f(x.widen()), |a, b| a + b)
}

/// Writes `y_i = f(x_i)` and returns `Σ y_i` (summed in the accumulate type before narrowing),
/// lane-chunked as [`sum_map`]: one pass that both maps and reduces.
#[inline(always)]
pub(crate) fn map_sum<T: RowFloat>(xs: &[T], ys: &mut [T], f: impl Fn(T::Acc) -> T::Acc) -> T::Acc {
    let mut lanes = [T::Acc::zero(); LANES];
    let ys = &mut ys[..xs.len()];
    let (chunks, tail) = xs.as_chunks::<LANES>();
    let (outs, out_tail) = ys.as_chunks_mut::<LANES>();
    for (chunk, out) in chunks.iter().zip(outs) {
        for lane in 0..LANES {
            let value = f(chunk[lane].widen());
            out[lane] = T::narrow(value);
            lanes[lane] += value;
        }
    }
    let mut total = fold_lanes(lanes, |a, b| a + b);
    for (&x, out) in tail.iter().zip(out_tail) {
        let value = f(x.widen());
        *out = T::narrow(value);
        total += value;
    }
    total
}

/// `Σ f(x_i, y_i)` over two equally long slices, lane-chunked as [`sum_map`].
#[inline(always)]
pub(crate) fn sum_map2<T: RowFloat>(
    xs: &[T],
    ys: &[T],
    f: impl Fn(T::Acc, T::Acc) -> T::Acc,
) -> T::Acc {
    let mut lanes = [T::Acc::zero(); LANES];
    let ys = &ys[..xs.len()];
    let (x_chunks, x_tail) = xs.as_chunks::<LANES>();
    let (y_chunks, y_tail) = ys.as_chunks::<LANES>();
    for (x, y) in x_chunks.iter().zip(y_chunks) {
        for lane in 0..LANES {
            lanes[lane] += f(x[lane].widen(), y[lane].widen());
        }
    }
    let mut total = fold_lanes(lanes, |a, b| a + b);
    for (&x, &y) in x_tail.iter().zip(y_tail) {
        total += f(x.widen(), y.widen());
    }
    total
}

/// The largest element (−∞ for an empty slice), lane-chunked. A NaN may or may not be
/// returned when `xs` holds one (each lane is a plain `max` instruction); callers pass every
/// element through `exp` afterwards, where a NaN poisons the row anyway.
#[inline(always)]
pub(crate) fn max<T: RowFloat>(xs: &[T]) -> T::Acc {
    let pick = |a: T::Acc, b: T::Acc| if a > b { a } else { b };
    fold_chunked(xs, T::Acc::neg_infinity(), |x: T| x.widen(), pick)
}

/// Asks the CPU to start loading `values` into its L2 cache, one hint per 64-byte line: row
/// kernels prefetch the next row while they compute on this one, so the read overlaps the
/// arithmetic (the hardware prefetcher stops at each 4 KiB page, one row of 1024 f32s).
#[inline(always)]
pub(crate) fn prefetch<T>(values: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let start = values.as_ptr().cast::<i8>();
        for offset in (0..std::mem::size_of_val(values)).step_by(64) {
            // SAFETY: a prefetch is a hint that never faults; the address lies inside `values`.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(start.wrapping_add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
}

/// Row `index` of `values` (rows of `width`), or an empty slice past the end.
#[inline(always)]
pub(crate) fn row<T>(values: &[T], width: usize, index: usize) -> &[T] {
    values.get(index * width..(index + 1) * width).unwrap_or_default()
}

/// Rows of `width` elements per task: enough work per task, and at least one task per thread.
pub(crate) fn rows_per_task(ctx: &Context, rows: usize, width: usize) -> usize {
    let by_size = MIN_TASK_ELEMENTS.div_ceil(width.max(1));
    let by_threads = rows.div_ceil(ctx.threads() * 4).max(1);
    by_size.max(by_threads).min(rows.max(1))
}

/// Runs `kernel(input_rows, output_rows)` over tasks of whole rows, in parallel within `ctx`'s
/// budget: `input` holds rows of `in_width`, `output` rows of `out_width`, and each call gets
/// the same rows of both. The kernel loops over its rows itself, so that a
/// [`multiversion!`](crate::cpu::simd::multiversion) row loop dispatches once per task.
pub(crate) fn for_each_row<I: Sync, O: Send>(
    ctx: &Context,
    input: &[I],
    in_width: usize,
    output: &mut [O],
    out_width: usize,
    kernel: impl Fn(&[I], &mut [O]) + Sync,
) {
    let rows = output.len().checked_div(out_width).unwrap_or(0);
    if rows == 0 || in_width == 0 {
        return;
    }
    let per_task = rows_per_task(ctx, rows, in_width);
    if ctx.threads() == 1 || per_task >= rows {
        kernel(input, output);
        return;
    }
    ctx.install(|| {
        input
            .par_chunks(per_task * in_width)
            .zip(output.par_chunks_mut(per_task * out_width))
            .for_each(|(input, output)| kernel(input, output));
    });
}

/// [`for_each_row`] over two inputs of one shape: `kernel(a_rows, b_rows, output_rows)`.
pub(crate) fn for_each_row2<I: Sync, O: Send>(
    ctx: &Context,
    (a, b): (&[I], &[I]),
    in_width: usize,
    output: &mut [O],
    out_width: usize,
    kernel: impl Fn(&[I], &[I], &mut [O]) + Sync,
) {
    let rows = a.len().checked_div(in_width).unwrap_or(0);
    if rows == 0 || out_width == 0 {
        return;
    }
    let per_task = rows_per_task(ctx, rows, in_width);
    if ctx.threads() == 1 || per_task >= rows {
        kernel(a, b, output);
        return;
    }
    let chunk = per_task * in_width;
    ctx.install(|| {
        a.par_chunks(chunk)
            .zip(b.par_chunks(chunk))
            .zip(output.par_chunks_mut(per_task * out_width))
            .for_each(|((a, b), output)| kernel(a, b, output));
    });
}

/// The backward of a fused gradient op of `inputs` inputs: no gradient flows back, and asking it
/// for one (a second-order gradient) is an error naming `op`.
pub(crate) fn first_order_only(
    op: &'static str,
    grads: &[Option<crate::Value>],
    inputs: usize,
) -> crate::Result<Vec<Option<crate::Value>>> {
    if grads.iter().any(Option::is_some) {
        return Err(crate::Error::argument(
            op,
            "second-order gradients of this fused gradient op are not implemented",
        ));
    }
    Ok(vec![None; inputs])
}

/// Runs `kernel(row_index_range)` over tasks covering `rows` and adds up what each returns, in
/// parallel within `ctx`'s budget.
pub(crate) fn sum_over_rows<R: Send>(
    ctx: &Context,
    rows: usize,
    width: usize,
    kernel: impl Fn(std::ops::Range<usize>) -> R + Sync,
    add: impl Fn(R, R) -> R + Sync,
) -> Option<R> {
    if rows == 0 {
        return None;
    }
    let per_task = rows_per_task(ctx, rows, width);
    let tasks = rows.div_ceil(per_task);
    let range = |t: usize| t * per_task..((t + 1) * per_task).min(rows);
    let task = |t: usize| vectorized(|| kernel(range(t)));
    if ctx.threads() == 1 || tasks == 1 {
        return (0..tasks).map(task).reduce(&add);
    }
    ctx.install(|| (0..tasks).into_par_iter().map(task).reduce_with(&add))
}

/// Runs `task(row_range)` over tasks covering `rows`, in parallel within `ctx`'s budget.
pub(crate) fn for_each_range(
    ctx: &Context,
    rows: usize,
    width: usize,
    task: impl Fn(std::ops::Range<usize>) + Sync,
) {
    sum_over_rows(ctx, rows, width, task, |(), ()| ());
}

/// A mutable slice that parallel tasks write at disjoint ranges.
pub(crate) struct SharedRows<T> {
    pointer: *mut T,
    len: usize,
}

// SAFETY: access goes through `row`, whose callers guarantee disjoint ranges.
unsafe impl<T: Send> Sync for SharedRows<T> {}

impl<T> SharedRows<T> {
    /// Wraps a slice that outlives every use of the wrapper.
    pub(crate) fn new(slice: &mut [T]) -> Self {
        SharedRows { pointer: slice.as_mut_ptr(), len: slice.len() }
    }

    /// The elements at `span`.
    ///
    /// # Safety
    /// No two live borrows may overlap, and the wrapped slice must outlive them.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn row(&self, span: std::ops::Range<usize>) -> &mut [T] {
        assert!(span.start <= span.end && span.end <= self.len, "row out of bounds");
        // SAFETY: in bounds (checked above); disjointness is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.pointer.add(span.start), span.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_matches_libm_within_two_ulp() {
        let mut worst = 0.0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let expected = x.exp();
            let relative = ((exp_f32::<false>(x) - expected) / expected).abs();
            worst = worst.max(relative);
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp_f32::<false>(-200.0), 0.0);
        assert_eq!(exp_f32::<false>(200.0), f32::INFINITY);
        for x in [-200.0f32, -87.0, -3.5, -1e-3, 0.0] {
            assert_eq!(exp_f32_nonpositive::<false>(x), exp_f32::<false>(x));
            let fused = exp_f32_nonpositive::<true>(x);
            assert!((fused - exp_f32::<false>(x)).abs() <= 2.5e-7 * exp_f32::<false>(x), "{x}");
        }
        assert!(exp_f32_nonpositive::<false>(f32::NAN).is_nan());
        assert_eq!(exp_f32::<false>(0.0), 1.0);
        assert!(exp_f32::<false>(f32::NAN).is_nan());
    }

    #[test]
    fn lane_reductions_match_plain_sums() {
        let xs: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let plain: f32 = xs.iter().map(|x| x * x).sum();
        assert!((sum_map(&xs, |x| x * x) - plain).abs() < 1e-3);
        assert_eq!(max(&xs), 15.0);
        let dot: f32 = xs.iter().map(|x| x * 2.0).sum();
        assert!((sum_map2(&xs, &xs, |a, b| a + b) - dot).abs() < 1e-3);
    }

    #[test]
    fn rows_run_in_parallel_and_sums_add_up() {
        let ctx = Context::with_threads(2);
        let input: Vec<f32> = (0..64 * 1000).map(|i| i as f32).collect();
        let mut output = vec![0.0f32; 1000];
        for_each_row(&ctx, &input, 64, &mut output, 1, |rows, out| {
            for (row, out) in rows.chunks(64).zip(out) {
                *out = row[0];
            }
        });
        assert!(output.iter().enumerate().all(|(i, &v)| v == (i * 64) as f32));
        let total = sum_over_rows(&ctx, 1000, 64, |range| range.len(), |a, b| a + b);
        assert_eq!(total, Some(1000));
    }
}
