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

/// The `gemm` parallelism for a context: its whole thread budget, or none with one thread.
fn parallelism(ctx: &Context) -> Parallelism {
    match ctx.threads() {
        1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
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
    let parallelism = parallelism(ctx);
    let call = |task: Task, a: &[T], b: &[T], y: &mut [T]| {
        // SAFETY: `assert_fits` checked that every index the strides reach lies inside the slices
        // (for the batch offsets `Task` adds, too); `y` is exclusively borrowed.
        unsafe { gemm_call(task, a, b, y, parallelism) }
    };
    ctx.install(|| {
        let (a_rs, a_cs, a_bs) = p.a;
        let (b_rs, b_cs, b_bs) = p.b;
        let base =
            Task { m: p.m, n: p.n, k: p.k, a: (a_rs, a_cs), b: (b_rs, b_cs), accumulate: false };
        if !p.sum_batch && b_bs == 0 && a_bs == p.m * a_rs {
            // The weight case: stack the batches of `a` into one tall product.
            call(Task { m: p.m * p.batches, ..base }, a, b, y);
        } else if p.sum_batch && a_bs == p.k * a_cs && b_bs == p.k * b_rs {
            // Summed batches that lie along the contraction: one long product.
            call(Task { k: p.k * p.batches, ..base }, a, b, y);
        } else if !p.sum_batch && ctx.threads() > 1 && p.batches >= ctx.threads() {
            // Many independent products (attention heads): one thread each, not each one split
            // between the threads.
            let one = |(batch, y): (usize, &mut [T])| {
                let (a, b) = (&a[batch * a_bs..], &b[batch * b_bs..]);
                // SAFETY: as `call` (the batch offsets were checked by `assert_fits`).
                unsafe { gemm_call(base.clone(), a, b, y, Parallelism::None) }
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

/// One `gemm` call: `y[m, n] (+)= op(a) · op(b)` with row-major `y`.
#[derive(Clone, Debug)]
struct Task {
    m: usize,
    n: usize,
    k: usize,
    a: (usize, usize),
    b: (usize, usize),
    accumulate: bool,
}

/// # Safety
/// `a`, `b` and `y` must hold every element the strides of `task` reach.
unsafe fn gemm_call<T: Copy + One + 'static>(
    task: Task,
    a: &[T],
    b: &[T],
    y: &mut [T],
    parallelism: Parallelism,
) {
    let Task { m, n, k, a: (a_rs, a_cs), b: (b_rs, b_cs), accumulate } = task;
    let stride = |s: usize| s as isize;
    // SAFETY: forwarded from the caller; the pointers come from live slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            stride(n),
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
            parallelism,
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
