//! `meshflow bench ops`: kernels of meshflow-ops against references measured in the same run.
//!
//! - matmul `N×N · N×N` through the [`MatMul`] op, in GFLOP/s (`2N³` per call), against the
//!   `gemm` crate called directly on the same buffers (the kernel library's ceiling: what is left
//!   is the op's own overhead);
//! - softmax and layer norm over a `[4096, 1024]` f32 tensor, in GB/s (bytes read plus written,
//!   `2 × 16 MiB`), against `memcpy` of the same buffer counted the same way.
//!
//! [`gemm_peak`] is the FLOP/s that MFU divides by when no `--peak-gflops` is given.

use std::hint::black_box;

use gemm::Parallelism;

use crate::ops::ops::layer_norm::LayerNorm;
use crate::ops::ops::matmul::MatMul;
use crate::ops::ops::softmax::Softmax;
use crate::ops::{Context, Op, Tensor};

use super::report::Figure;
use super::train::{time_steps, Timing};
use super::BenchError;

const ROWS: usize = 4096;
const WIDTH: usize = 1024;

/// Matmul sizes of the table.
pub const MATMUL_SIZES: [usize; 3] = [256, 512, 1024];

/// Deterministic values in `[-0.5, 0.5)`.
fn filled(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let bits = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
            bits as f32 / 16_777_216.0 - 0.5
        })
        .collect()
}

fn tensor(shape: &[usize], seed: u32) -> Result<Tensor, BenchError> {
    let len = shape.iter().product();
    Ok(Tensor::from_vec(filled(len, seed), shape.to_vec())?)
}

/// Seconds per call of `run` (median).
fn seconds_per_call(timing: Timing, mut run: impl FnMut()) -> f64 {
    let times = time_steps::<BenchError>(
        timing,
        || {
            run();
            Ok(())
        },
        || {},
    );
    times.map(|t| t.median).unwrap_or(f64::NAN)
}

/// GFLOP/s of `n³` matmuls with the `gemm` crate on `threads` threads (row-major, no op layer).
pub fn gemm_reference(n: usize, threads: usize, timing: Timing) -> f64 {
    let (a, b) = (filled(n * n, 1), filled(n * n, 2));
    let mut c = vec![0.0f32; n * n];
    let parallelism = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
    let context = Context::with_threads(threads);
    let stride = n as isize;
    let seconds = context.install(|| {
        seconds_per_call(timing, || {
            // SAFETY: `a`, `b` and `c` each hold `n·n` elements; row stride `n`, column stride
            // 1 stay inside them.
            unsafe {
                gemm::gemm(
                    n,
                    n,
                    n,
                    c.as_mut_ptr(),
                    1,
                    stride,
                    false,
                    a.as_ptr(),
                    1,
                    stride,
                    b.as_ptr(),
                    1,
                    stride,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
            black_box(&mut c);
        })
    });
    2.0 * (n as f64).powi(3) / seconds / 1e9
}

/// The f32 GEMM peak of this machine on `threads` threads, FLOP/s: the best of the `gemm`
/// crate at 1024³.
pub fn gemm_peak(threads: usize, timing: Timing) -> f64 {
    gemm_reference(1024, threads, timing) * 1e9
}

/// GFLOP/s of the [`MatMul`] op at `n³` on `threads` threads.
pub fn matmul_op(n: usize, threads: usize, timing: Timing) -> Result<f64, BenchError> {
    let context = Context::with_threads(threads);
    let inputs = [tensor(&[n, n], 1)?, tensor(&[n, n], 2)?];
    let mut failure = None;
    let seconds = seconds_per_call(timing, || {
        if let Err(e) = MatMul::default().forward(&context, &inputs).map(black_box) {
            failure = Some(e);
        }
    });
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(2.0 * (n as f64).powi(3) / seconds / 1e9),
    }
}

/// GB/s of `memcpy` of a `[4096, 1024]` f32 buffer (read plus write).
pub fn memcpy_bandwidth(timing: Timing) -> f64 {
    let source = filled(ROWS * WIDTH, 3);
    let mut target = vec![0.0f32; ROWS * WIDTH];
    let seconds = seconds_per_call(timing, || {
        black_box(&mut target).copy_from_slice(black_box(&source));
    });
    (2 * ROWS * WIDTH * 4) as f64 / seconds / 1e9
}

/// GB/s of a row kernel (`softmax` or `layer_norm`) over `[4096, 1024]` (read plus write).
pub fn row_kernel(name: &str, threads: usize, timing: Timing) -> Result<f64, BenchError> {
    let context = Context::with_threads(threads);
    let x = tensor(&[ROWS, WIDTH], 4)?;
    let (op, inputs): (Box<dyn Op>, Vec<Tensor>) = match name {
        "softmax" => (Box::new(Softmax), vec![x]),
        _ => {
            (Box::new(LayerNorm { eps: 1e-5 }), vec![x, tensor(&[WIDTH], 5)?, tensor(&[WIDTH], 6)?])
        }
    };
    let mut failure = None;
    let seconds = seconds_per_call(timing, || {
        if let Err(e) = op.forward(&context, &inputs).map(black_box) {
            failure = Some(e);
        }
    });
    match failure {
        Some(e) => Err(e.into()),
        None => Ok((2 * ROWS * WIDTH * 4) as f64 / seconds / 1e9),
    }
}

/// The whole `ops` section on 1 and `threads` threads; `tick` after each figure.
pub fn measure(
    threads: usize,
    timing: Timing,
    mut tick: impl FnMut(&str),
) -> Result<Vec<Figure>, BenchError> {
    let mut figures = Vec::new();
    let mut thread_counts = vec![1, threads];
    thread_counts.dedup();
    for &t in &thread_counts {
        for n in MATMUL_SIZES {
            let name = format!("matmul {n}³ ×{t}thr");
            tick(&name);
            figures.push(Figure {
                value: matmul_op(n, t, timing)?,
                unit: "GFLOP/s".into(),
                higher_is_better: true,
                reference: "gemm crate".into(),
                reference_value: gemm_reference(n, t, timing),
                name,
            });
        }
    }
    tick("memcpy");
    let memcpy = memcpy_bandwidth(timing);
    for &t in &thread_counts {
        for kernel in ["softmax", "layer_norm"] {
            let name = format!("{kernel} [4096,1024] ×{t}thr");
            tick(&name);
            figures.push(Figure {
                value: row_kernel(kernel, t, timing)?,
                unit: "GB/s".into(),
                higher_is_better: true,
                reference: "memcpy ×1thr".into(),
                reference_value: memcpy,
                name,
            });
        }
    }
    Ok(figures)
}
