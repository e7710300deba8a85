//! The CPU kernel behind [`super::matmul`]: strided (batched) products through the `gemm` crate,
//! on the context's thread budget. f32 and f64 run natively; bf16 and f16 are widened to f32,
//! multiplied with f32 accumulation and rounded back.

use gemm::Parallelism;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use num_traits::One;
use rayon::prelude::*;

use crate::{Context, DType, Error, Result, Tensor, TensorMeta};

/// One (batched) product `y_b = op(a_b) · op(b_b)` described by strides, in elements.
#[derive(Clone, Debug)]
pub(crate) struct Product {
    /// Number of batches (1 for 2-D operands).
    pub batches: usize,
    /// Rows of the result.
    pub m: usize,
    /// Columns of the result.
    pub n: usize,
    /// The contracted size.
    pub k: usize,
    /// `op(a)`: row stride, column stride, batch stride (0 when shared by every batch).
    pub a: (usize, usize, usize),
    /// `op(b)`: row stride, column stride, batch stride (0 when shared by every batch).
    pub b: (usize, usize, usize),
    /// Sum the batches into one `[m, n]` result instead of stacking them.
    pub sum_batch: bool,
}

/// Runs `product` on `inputs = [a, b]` into a new tensor of `out`'s meta.
pub(crate) fn run_product(
    ctx: &Context,
    op: &'static str,
    product: &Product,
    inputs: &[Tensor],
    out: TensorMeta,
) -> Result<Tensor> {
    let (a, b) = (&inputs[0], &inputs[1]);
    // gemm overwrites every element unless nothing is contracted (then the zeros are the answer).
    let mut y = if product.k == 0 {
        Tensor::zeros(out.shape, out.dtype)
    } else {
        Tensor::for_overwrite(ctx, out.shape, out.dtype)
    };
    match out.dtype {
        DType::F32 => {
            gemm_strided::<f32>(ctx, product, a.as_slice()?, b.as_slice()?, y.as_mut_slice()?)
        }
        DType::F64 => {
            gemm_strided::<f64>(ctx, product, a.as_slice()?, b.as_slice()?, y.as_mut_slice()?)
        }
        DType::BF16 => {
            let (a, b) = (widen(a.as_slice::<bf16>()?), widen(b.as_slice::<bf16>()?));
            let mut wide = vec![0.0f32; y.numel()];
            gemm_strided(ctx, product, &a, &b, &mut wide);
            y.as_mut_slice::<bf16>()?.convert_from_f32_slice(&wide);
        }
        DType::F16 => {
            let (a, b) = (widen(a.as_slice::<f16>()?), widen(b.as_slice::<f16>()?));
            let mut wide = vec![0.0f32; y.numel()];
            gemm_strided(ctx, product, &a, &b, &mut wide);
            y.as_mut_slice::<f16>()?.convert_from_f32_slice(&wide);
        }
        other => return Err(Error::dtype(op, &[other], "needs a float dtype")),
    }
    Ok(y)
}

fn widen<H: HalfFloatSliceExt + ?Sized>(values: &H) -> Vec<f32> {
    values.to_f32_vec()
}

/// `y` (zeroed, contiguous `[batches or 1, m, n]`) receives the product.
fn gemm_strided<T: Copy + One + Send + Sync + 'static>(
    ctx: &Context,
    p: &Product,
    a: &[T],
    b: &[T],
    y: &mut [T],
) {
    if p.m == 0 || p.n == 0 || p.k == 0 || p.batches == 0 {
        return; // an empty result, or an empty sum: the zeros are the answer
    }
    assert_fits(p, a.len(), b.len(), y.len());
    let slot = ctx.enter_product();
    let threads = slot.threads();
    let call = |task: Task, a: &[T], b: &[T], y: &mut [T]| {
        if threads > 1 && task.m * task.n * task.k >= gemm::get_threading_threshold() {
            return split_call(threads, task, a, b, y);
        }
        // SAFETY: `assert_fits` checked that every index the strides reach lies inside the slices
        // (for the batch offsets `Task` adds, too); `y` is exclusively borrowed.
        unsafe { gemm_call(task, a, b, y.as_mut_ptr()) }
    };
    ctx.install(|| {
        let (a_rs, a_cs, a_bs) = p.a;
        let (b_rs, b_cs, b_bs) = p.b;
        let base = Task {
            m: p.m,
            n: p.n,
            k: p.k,
            a: (a_rs, a_cs),
            b: (b_rs, b_cs),
            y_rs: p.n,
            accumulate: false,
        };
        if !p.sum_batch && b_bs == 0 && a_bs == p.m * a_rs {
            // The weight case: stack the batches of `a` into one tall product.
            call(Task { m: p.m * p.batches, ..base }, a, b, y);
        } else if p.sum_batch && a_bs == p.k * a_cs && b_bs == p.k * b_rs {
            // Summed batches that lie along the contraction: one long product.
            call(Task { k: p.k * p.batches, ..base }, a, b, y);
        } else if !p.sum_batch && threads > 1 && p.batches >= threads {
            // Many independent products (attention heads): one thread each, not each one split
            // between the threads.
            let one = |(batch, y): (usize, &mut [T])| {
                let (a, b) = (&a[batch * a_bs..], &b[batch * b_bs..]);
                // SAFETY: as `call` (the batch offsets were checked by `assert_fits`).
                unsafe { gemm_call(base.clone(), a, b, y.as_mut_ptr()) }
            };
            y[..p.batches * p.m * p.n].par_chunks_mut(p.m * p.n).enumerate().for_each(one);
        } else {
            for batch in 0..p.batches {
                let (a, b) = (&a[batch * a_bs..], &b[batch * b_bs..]);
                if p.sum_batch {
                    call(Task { accumulate: batch > 0, ..base }, a, b, y);
                } else {
                    call(base.clone(), a, b, &mut y[batch * p.m * p.n..]);
                }
            }
        }
    });
}

/// One single-threaded `gemm` call: `y[m, n] (+)= op(a) · op(b)` with `y`'s rows `y_rs` apart.
#[derive(Clone, Debug)]
struct Task {
    m: usize,
    n: usize,
    k: usize,
    a: (usize, usize),
    b: (usize, usize),
    y_rs: usize,
    accumulate: bool,
}

/// A pointer that tasks on several threads write at disjoint regions.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: the regions written through it are disjoint (see `split_call`).
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The element `offset` places on.
    ///
    /// # Safety
    /// `offset` must lie inside the allocation the pointer came from.
    unsafe fn at(self, offset: usize) -> *mut T {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.add(offset) }
    }
}

/// `task` split into one single-threaded product per thread along an output axis (rows or
/// columns of `y`, in multiples of 16), chosen by [`split_by_columns`]. The threads meet once,
/// at the end; `gemm`'s own threading splits the work again for every block of the
/// contraction, packing in parallel first, and so made the threads meet twice per block (MLP
/// step, A/B in one binary: 16.3 -> 13.1 ms and 13.7 -> 12.3 ms).
fn split_call<T: Copy + One + Send + Sync + 'static>(
    threads: usize,
    task: Task,
    a: &[T],
    b: &[T],
    y: &mut [T],
) {
    let by_columns = split_by_columns(&task, threads);
    let len = if by_columns { task.n } else { task.m };
    let chunk = len.div_ceil(threads).next_multiple_of(16);
    let parts = len.div_ceil(chunk);
    let y = Shared(y.as_mut_ptr());
    let one = |part: usize| {
        let start = part * chunk;
        let size = chunk.min(len - start);
        let (a_offset, b_offset, y_offset, piece) = if by_columns {
            (0, start * task.b.1, start, Task { n: size, ..task.clone() })
        } else {
            (start * task.a.0, 0, start * task.y_rs, Task { m: size, ..task.clone() })
        };
        // SAFETY: each part writes its own rows or columns of `y`; offsets lie inside the
        // buffers (checked by `assert_fits` for the whole task).
        unsafe { gemm_call(piece, &a[a_offset..], &b[b_offset..], y.at(y_offset)) }
    };
    (0..parts).into_par_iter().for_each(one);
}

/// True when `task` is better split by columns of `y` than by rows. `gemm` computes a row-major
/// `y` as `yᵀ = bᵀ·aᵀ`: it packs the part of `b` a thread gets into panels of 64 columns of `y`
/// and reads each thread's rows of `a` in place, once per panel, unless `a`'s rows are strided
/// (`a` transposed, as in a weight gradient `gᵀ·x`): then it packs all of the part of `a` it
/// gets, too.
/// - `a` read in place: by columns only when each thread still gets [`WIDE_PIECE`] columns. A
///   narrower piece reads its rows of `a` for too few panels: in the GPT step (per shape, two
///   runs each), `g·W` of c_fc and of c_attn (`y [1024, 256]`) took 0.5-0.7 ms more per 4 calls
///   split by columns than by rows, the attention projection's `[1024, 256]` products 0.45 ms
///   more per 8; the `[1024, 1024]` outputs and c_proj's `x·Wᵀ` were level either way.
/// - `a` packed: along the longer side of `y`. Split by columns each thread packs all of the
///   strided `a`, by rows half of it (c_fc's `gᵀ·x`, `y [1024, 256]`: 11.7 ms per 4 calls by
///   columns, 8.9 by rows).
///
/// An axis too short to give each of the `threads` 16 lines, when the other is longer, would
/// leave threads idle (an MLP's 10 logits): then the other axis.
fn split_by_columns(task: &Task, threads: usize) -> bool {
    let a_packed = task.a.1 != 1;
    let columns_first = if a_packed { task.n >= task.m } else { task.n >= WIDE_PIECE * threads };
    let (first, second) = if columns_first { (task.n, task.m) } else { (task.m, task.n) };
    let keep_first = first >= 16 * threads || first >= second;
    columns_first == keep_first
}

/// The fewest columns of `y` a thread's piece keeps when products with `a` read in place are
/// split by columns ([`split_by_columns`]).
const WIDE_PIECE: usize = 384;

/// # Safety
/// `a`, `b` and `y` must hold every element the strides of `task` reach.
unsafe fn gemm_call<T: Copy + One + 'static>(task: Task, a: &[T], b: &[T], y: *mut T) {
    let Task { m, n, k, a: (a_rs, a_cs), b: (b_rs, b_cs), y_rs, accumulate } = task;
    let stride = |s: usize| s as isize;
    // SAFETY: forwarded from the caller; the pointers come from live slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y,
            1,
            stride(y_rs),
            accumulate,
            a.as_ptr(),
            stride(a_cs),
            stride(a_rs),
            b.as_ptr(),
            stride(b_cs),
            stride(b_rs),
            T::one(),
            T::one(),
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// Panics (a broken internal invariant: shapes were inferred before) when the strides of `p`
/// reach past the end of a buffer.
fn assert_fits(p: &Product, a_len: usize, b_len: usize, y_len: usize) {
    let last = |(rs, cs, bs): (usize, usize, usize), rows: usize, cols: usize| {
        (p.batches - 1) * bs + (rows - 1) * rs + (cols - 1) * cs
    };
    let y_rows = if p.sum_batch { p.m } else { p.m * p.batches };
    assert!(last(p.a, p.m, p.k) < a_len, "matmul: lhs buffer too short for {p:?}");
    assert!(last(p.b, p.k, p.n) < b_len, "matmul: rhs buffer too short for {p:?}");
    assert!(y_rows * p.n <= y_len, "matmul: output buffer too short for {p:?}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::matmul::{MatMul, MatMulSumBatch};
    use crate::Op;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        Tensor::randn(shape.to_vec(), 0.0, 1.0, DType::F32, seed).expect("randn")
    }

    /// The products of `op` on one thread and split between two agree.
    fn split_equals_one_thread(op: &dyn Op, a: &Tensor, b: &Tensor) {
        let inputs = [a.clone(), b.clone()];
        let one = op.forward(&Context::single_thread(), &inputs).expect("one thread").remove(0);
        let two = op.forward(&Context::with_threads(2), &inputs).expect("two threads").remove(0);
        let (one, two) = (one.as_slice::<f32>().expect("f32"), two.as_slice::<f32>().expect("f32"));
        assert_eq!(one.len(), two.len());
        let worst = one.iter().zip(two).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-3, "{op:?} {:?} x {:?}: differs by {worst}", a.shape(), b.shape());
        assert!(one.iter().any(|&x| x != 0.0), "a product of random operands is not all zeros");
    }

    #[test]
    fn products_split_along_the_axis_measured_faster() {
        let task = |m, n, a_column_stride| Task {
            m,
            n,
            k: 256,
            a: (256, a_column_stride),
            b: (1, 256),
            y_rs: n,
            accumulate: false,
        };
        // x·Wᵀ and g·W read a in place: split by columns while each thread keeps 384...
        assert!(split_by_columns(&task(1024, 768, 1), 2));
        assert!(!split_by_columns(&task(1024, 512, 1), 2));
        assert!(!split_by_columns(&task(1024, 256, 1), 2));
        assert!(split_by_columns(&task(1024, 1536, 1), 4));
        // ... and by columns when the rows are too few for 16 per thread.
        assert!(split_by_columns(&task(20, 256, 1), 2));
        // Too few columns for 16 per thread: by rows.
        assert!(!split_by_columns(&task(256, 10, 1), 2));
        assert!(!split_by_columns(&task(256, 48, 1), 4));
        // gᵀ·x packs a strided a: along the longer side of y.
        assert!(!split_by_columns(&task(768, 256, 768), 2));
        assert!(split_by_columns(&task(256, 1024, 256), 2));
    }

    #[test]
    fn products_split_between_threads_equal_one_thread_products() {
        // Above gemm's threading threshold, with sizes that are not multiples of 16, split by
        // columns and (a transposed `a` with n < m) by rows, in every transpose layout.
        let (m, k) = (134, 90);
        for n in [300, 80] {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let a = random(&if ta { [k, m] } else { [m, k] }, 1);
                let b = random(&if tb { [n, k] } else { [k, n] }, 2);
                split_equals_one_thread(&MatMul { transpose_a: ta, transpose_b: tb }, &a, &b);
            }
        }
        // The weight case (batches stacked into one tall product) and summed batches.
        split_equals_one_thread(&MatMul::default(), &random(&[3, 70, k], 3), &random(&[k, 130], 4));
        let sum = MatMulSumBatch { transpose_a: true, transpose_b: false };
        split_equals_one_thread(&sum, &random(&[3, 70, 150], 5), &random(&[3, 70, 140], 6));
    }
}
