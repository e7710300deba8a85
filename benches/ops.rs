//! CPU kernel benches of meshflow-ops, with references measured in the same run.
//!
//! - `matmul_f32/{1,2}_threads/N`: `N×N · N×N` through [`MatMul`]; throughput in elements is
//!   FLOPs (`2N³`), so criterion's `Gelem/s` reads as GFLOP/s. `scripts/bench_numpy_matmul.py`
//!   runs numpy's OpenBLAS at the same sizes and prints the ratios.
//! - `rows_f32/{memcpy,softmax,layer_norm}/{1,2}_threads`: a `[4096, 1024]` f32 tensor (16 MiB);
//!   throughput in bytes is what the kernel reads plus what it writes (`2 × 16 MiB`; the same
//!   convention for the memcpy reference, a `copy_from_slice` of the buffer), so the GB/s figures
//!   compare directly.
//!
//! Run: `cargo bench --bench ops` (add a filter such as `-- matmul` to run a part).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use meshflow_ops::ops::layer_norm::LayerNorm;
use meshflow_ops::ops::matmul::MatMul;
use meshflow_ops::ops::softmax::Softmax;
use meshflow_ops::{Context, Op, Tensor};

const ROWS: usize = 4096;
const WIDTH: usize = 1024;

fn filled(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0
                - 0.5
        })
        .collect()
}

fn tensor(shape: &[usize], seed: u32) -> Tensor {
    let len = shape.iter().product();
    Tensor::from_vec(filled(len, seed), shape.to_vec()).expect("bench tensor")
}

fn matmul(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul_f32");
    group.sample_size(10).warm_up_time(Duration::from_millis(500));
    for threads in [1, 2] {
        let ctx = Context::with_threads(threads);
        for n in [256, 512, 1024, 2048] {
            let inputs = [tensor(&[n, n], 1), tensor(&[n, n], 2)];
            group.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
            group.measurement_time(Duration::from_secs(if n >= 2048 { 6 } else { 3 }));
            let id = BenchmarkId::new(format!("{threads}_threads"), n);
            group.bench_with_input(id, &inputs, |b, inputs| {
                b.iter(|| black_box(MatMul::default().forward(&ctx, inputs).expect("matmul")))
            });
        }
    }
    group.finish();
}

fn rows(c: &mut Criterion) {
    let mut group = c.benchmark_group("rows_f32");
    group.sample_size(20).measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Bytes(2 * (ROWS * WIDTH * 4) as u64));
    let source = filled(ROWS * WIDTH, 3);
    let mut target = vec![0.0f32; ROWS * WIDTH];
    group.bench_function("memcpy/1_threads", |b| {
        b.iter(|| target.copy_from_slice(black_box(&source)));
    });
    black_box(&target);
    let x = tensor(&[ROWS, WIDTH], 4);
    let (weight, bias) = (tensor(&[WIDTH], 5), tensor(&[WIDTH], 6));
    for threads in [1, 2] {
        let ctx = Context::with_threads(threads);
        let softmax_inputs = [x.clone()];
        group.bench_function(format!("softmax/{threads}_threads"), |b| {
            b.iter(|| black_box(Softmax.forward(&ctx, &softmax_inputs).expect("softmax")))
        });
        let norm_inputs = [x.clone(), weight.clone(), bias.clone()];
        let norm = LayerNorm { eps: 1e-5 };
        group.bench_function(format!("layer_norm/{threads}_threads"), |b| {
            b.iter(|| black_box(norm.forward(&ctx, &norm_inputs).expect("layer_norm")))
        });
    }
    group.finish();
}

criterion_group!(benches, matmul, rows);
criterion_main!(benches);
