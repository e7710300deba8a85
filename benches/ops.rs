//! CPU kernel benches of meshflow-ops, with references measured in the same run. The kernels,
//! their inputs and byte counts live in `meshflow::bench::ops` (which `meshflow bench ops`
//! reports as a table); this file only times them with criterion.
//!
//! - `matmul_f32/{1,2}_threads/N`: `N×N · N×N` through `MatMul`; throughput in elements is
//!   FLOPs (`2N³`), so criterion's `Gelem/s` reads as GFLOP/s. `scripts/bench_numpy_matmul.py`
//!   runs numpy's OpenBLAS at the same sizes and prints the ratios.
//! - `rows_f32/<kernel>/{1,2}_threads`: the row kernels over a `[4096, 1024]` f32 tensor
//!   (16 MiB); throughput in bytes is what the kernel reads plus what it writes (`Kernel::bytes`:
//!   `2 × 16 MiB` for softmax, log_softmax, layer_norm, gelu (erf), relu and the scalar
//!   multiply, plus a row for the row-broadcast `add_row`, `3 × 16 MiB` for `add`). The
//!   reference `memcpy/{1,2}_threads` copies the buffer (split between the threads) under the
//!   same convention, so the GB/s figures compare directly.
//! - `train_f32/<kernel>`: the kernels of the two training steps the project measures against
//!   PyTorch, at their shapes and with 2 threads — the MLP 784-1024-1024-10 at batch 256 and the
//!   GPT (vocab 512, context 128, 4 layers, 4 heads, width 256, batch 8). Time per call.
//!
//! Run: `cargo bench -p meshflow --bench ops` (add a filter such as `-- matmul` to run a part);
//! `python3 scripts/bench_numpy_matmul.py` runs `matmul` and `rows` and prints the ratios.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use meshflow::bench::ops::{
    filled, matmul_inputs, parallel_copy, row_kernels, train_kernels, Kernel, MATMUL_BENCH_SIZES,
    ROWS, WIDTH,
};
use meshflow::ops::ops::matmul::MatMul;
use meshflow::ops::{Context, Op};

fn matmul(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul_f32");
    group.sample_size(10).warm_up_time(Duration::from_millis(500));
    for threads in [1, 2] {
        let ctx = Context::with_threads(threads);
        for n in MATMUL_BENCH_SIZES {
            let inputs = matmul_inputs(n).expect("matmul inputs");
            group.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
            group.measurement_time(Duration::from_secs(if n >= 2048 { 4 } else { 2 }));
            let id = BenchmarkId::new(format!("{threads}_threads"), n);
            group.bench_with_input(id, &inputs, |b, inputs| {
                b.iter(|| black_box(MatMul::default().forward(&ctx, inputs).expect("matmul")))
            });
        }
    }
    group.finish();
}

/// Times `kernel` on `ctx` under `id`.
fn bench_kernel(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: String,
    kernel: &Kernel,
    ctx: &Context,
) {
    group.bench_function(id, |b| {
        b.iter(|| black_box(kernel.run(ctx).unwrap_or_else(|e| panic!("{}: {e}", kernel.name))))
    });
}

fn rows(c: &mut Criterion) {
    let mut group = c.benchmark_group("rows_f32");
    group.sample_size(20).warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    let source = filled(ROWS * WIDTH, 3);
    let mut target = vec![0.0f32; ROWS * WIDTH];
    let kernels = row_kernels().expect("row kernels");
    for threads in [1, 2] {
        let ctx = Context::with_threads(threads);
        group.throughput(Throughput::Bytes((2 * ROWS * WIDTH * 4) as u64));
        group.bench_function(format!("memcpy/{threads}_threads"), |b| {
            b.iter(|| parallel_copy(threads, &source, &mut target));
        });
        for kernel in &kernels {
            group.throughput(Throughput::Bytes(kernel.bytes()));
            bench_kernel(&mut group, format!("{}/{threads}_threads", kernel.name), kernel, &ctx);
        }
    }
    black_box(&target);
    group.finish();
}

fn train(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_f32");
    group.sample_size(10).warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(1));
    let ctx = Context::with_threads(2);
    for kernel in train_kernels().expect("training kernels") {
        bench_kernel(&mut group, kernel.name.to_string(), &kernel, &ctx);
    }
    group.finish();
}

criterion_group!(benches, matmul, rows, train);
criterion_main!(benches);
