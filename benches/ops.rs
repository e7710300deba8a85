//! CPU kernel benches of meshflow-ops, with references measured in the same run.
//!
//! - `matmul_f32/{1,2}_threads/N`: `N×N · N×N` through [`MatMul`]; throughput in elements is
//!   FLOPs (`2N³`), so criterion's `Gelem/s` reads as GFLOP/s. `scripts/bench_numpy_matmul.py`
//!   runs numpy's OpenBLAS at the same sizes and prints the ratios.
//! - `rows_f32/<kernel>/{1,2}_threads`: kernels over a `[4096, 1024]` f32 tensor (16 MiB);
//!   throughput in bytes is what the kernel reads plus what it writes (`2 × 16 MiB` for softmax,
//!   log_softmax, layer_norm, gelu (erf), relu and the scalar multiply, `3 × 16 MiB` for `add`, `2 × 16 MiB` plus a row
//!   for the row-broadcast `add_row`). The reference `memcpy/{1,2}_threads` copies the buffer
//!   (split between the threads) under the same convention, so the GB/s figures compare directly.
//! - `train_f32/<kernel>`: the kernels of the two training steps the project measures against
//!   PyTorch, at their shapes and with 2 threads — the MLP 784-1024-1024-10 at batch 256 and the
//!   GPT (vocab 512, context 128, 4 layers, 4 heads, width 256, batch 8). Time per call.
//!
//! Run: `cargo bench -p meshflow --bench ops` (add a filter such as `-- matmul` to run a part);
//! `python3 scripts/bench_numpy_matmul.py` runs `matmul` and `rows` and prints the ratios.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use meshflow_ops::ops::adamw::AdamW;
use meshflow_ops::ops::add::Add;
use meshflow_ops::ops::cross_entropy::{CrossEntropy, CrossEntropyGrad};
use meshflow_ops::ops::embedding::EmbeddingGrad;
use meshflow_ops::ops::gelu::Gelu;
use meshflow_ops::ops::layer_norm::{LayerNorm, NormGrad};
use meshflow_ops::ops::log_softmax::LogSoftmax;
use meshflow_ops::ops::matmul::MatMul;
use meshflow_ops::ops::mul_scalar::MulScalar;
use meshflow_ops::ops::relu::Relu;
use meshflow_ops::ops::softmax::{RowGrad, Softmax};
use meshflow_ops::ops::sum::Sum;
use meshflow_ops::ops::unary::{GradOf, Unary};
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

fn ids(len: usize, vocab: usize) -> Tensor {
    let values: Vec<i64> = (0..len).map(|i| ((i * 7919) % vocab) as i64).collect();
    Tensor::from_vec(values, [len]).expect("bench ids")
}

fn matmul(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul_f32");
    group.sample_size(10).warm_up_time(Duration::from_millis(500));
    for threads in [1, 2] {
        let ctx = Context::with_threads(threads);
        for n in [256, 512, 1024, 2048] {
            let inputs = [tensor(&[n, n], 1), tensor(&[n, n], 2)];
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

/// Copies `source` into `target`, split between `threads` scoped threads (the caller copies the
/// first part).
fn parallel_copy(threads: usize, source: &[f32], target: &mut [f32]) {
    let chunk = source.len().div_ceil(threads);
    let mut parts = target.chunks_mut(chunk).zip(source.chunks(chunk));
    let Some((first_target, first_source)) = parts.next() else { return };
    std::thread::scope(|scope| {
        for (t, s) in parts {
            scope.spawn(move || t.copy_from_slice(black_box(s)));
        }
        first_target.copy_from_slice(black_box(first_source));
    });
}

fn rows(c: &mut Criterion) {
    let mut group = c.benchmark_group("rows_f32");
    group.sample_size(20).warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    let bytes = (ROWS * WIDTH * 4) as u64;
    let source = filled(ROWS * WIDTH, 3);
    let mut target = vec![0.0f32; ROWS * WIDTH];
    let x = tensor(&[ROWS, WIDTH], 4);
    let y = tensor(&[ROWS, WIDTH], 7);
    let (weight, bias) = (tensor(&[WIDTH], 5), tensor(&[WIDTH], 6));
    for threads in [1, 2] {
        let ctx = Context::with_threads(threads);
        let name = |kernel: &str| format!("{kernel}/{threads}_threads");
        group.throughput(Throughput::Bytes(2 * bytes));
        group.bench_function(name("memcpy"), |b| {
            b.iter(|| parallel_copy(threads, &source, &mut target));
        });
        let mut run = |kernel: &str, op: &dyn Op, inputs: &[Tensor]| {
            group.bench_function(name(kernel), |b| {
                b.iter(|| black_box(op.forward(&ctx, inputs).unwrap_or_else(|e| panic!("{e}"))))
            });
        };
        run("softmax", &Softmax, std::slice::from_ref(&x));
        run("log_softmax", &LogSoftmax, std::slice::from_ref(&x));
        run("layer_norm", &LayerNorm { eps: 1e-5 }, &[x.clone(), weight.clone(), bias.clone()]);
        run("gelu", &Unary(Gelu { tanh: false }), std::slice::from_ref(&x));
        run("relu", &Unary(Relu), std::slice::from_ref(&x));
        run("mul_scalar", &Unary(MulScalar { value: 0.5 }), std::slice::from_ref(&x));
        run("add_row", &Add, &[x.clone(), bias.clone()]);
        group.throughput(Throughput::Bytes(3 * bytes));
        group.bench_function(name("add"), |b| {
            let inputs = [x.clone(), y.clone()];
            b.iter(|| black_box(Add.forward(&ctx, &inputs).expect("add")))
        });
    }
    black_box(&target);
    group.finish();
}

/// One training-step kernel: a name, the op and its inputs.
type Case = (&'static str, Box<dyn Op>, Vec<Tensor>);

fn product(transpose_a: bool, transpose_b: bool) -> Box<dyn Op> {
    Box::new(MatMul { transpose_a, transpose_b })
}

/// The MLP 784-1024-1024-10 at batch 256: the middle layer's forward and backward products,
/// bias add and its gradient, relu and its gradient, the loss, and AdamW over its 1.9 M params.
fn mlp_cases() -> Vec<Case> {
    let (batch, hidden) = (256, 1024);
    let activation = tensor(&[batch, hidden], 11);
    let weight = tensor(&[hidden, hidden], 12);
    let grad = tensor(&[batch, hidden], 13);
    let params = 784 * hidden + hidden * hidden + hidden * 10;
    let state = |seed| tensor(&[params], seed);
    vec![
        ("mlp/matmul_x_w", product(false, false), vec![activation.clone(), weight.clone()]),
        ("mlp/matmul_dy_wt", product(false, true), vec![grad.clone(), weight.clone()]),
        ("mlp/matmul_xt_dy", product(true, false), vec![activation.clone(), grad.clone()]),
        (
            "mlp/matmul_in_784",
            product(false, false),
            vec![tensor(&[batch, 784], 14), tensor(&[784, hidden], 15)],
        ),
        ("mlp/add_bias", Box::new(Add), vec![activation.clone(), tensor(&[hidden], 16)]),
        ("mlp/sum_rows", Box::new(Sum { axes: vec![0], keepdim: false }), vec![grad.clone()]),
        ("mlp/relu", Box::new(Unary(Relu)), vec![activation.clone()]),
        ("mlp/relu_grad", Box::new(GradOf(Relu)), vec![activation.clone(), grad.clone()]),
        (
            "mlp/cross_entropy",
            Box::new(CrossEntropy::default()),
            vec![tensor(&[batch, 10], 17), ids(batch, 10)],
        ),
        ("mlp/adamw", Box::new(AdamW::new(1e-3)), vec![state(18), state(19), state(20), state(21)]),
    ]
}

/// The GPT (vocab 512, context 128, 4 heads, width 256, batch 8): per-layer kernels at the
/// shapes of one layer, the loss and embedding gradient, and AdamW over one layer's weights.
fn gpt_cases() -> Vec<Case> {
    let (tokens, width, vocab) = (8 * 128, 256, 512);
    let x = tensor(&[tokens, width], 31);
    let hidden = tensor(&[tokens, 4 * width], 32);
    let scores = tensor(&[8, 4, 128, 128], 33);
    let logits = tensor(&[tokens, vocab], 34);
    let norm = LayerNorm { eps: 1e-5 };
    let params = 12 * width * width;
    let state = |seed| tensor(&[params], seed);
    let scalar = Tensor::from_vec(vec![1.0f32], Vec::<usize>::new()).expect("scalar");
    vec![
        ("gpt/matmul_qkv", product(false, false), vec![x.clone(), tensor(&[width, 3 * width], 35)]),
        (
            "gpt/matmul_mlp_dx",
            product(false, true),
            vec![hidden.clone(), tensor(&[width, 4 * width], 36)],
        ),
        ("gpt/matmul_mlp_dw", product(true, false), vec![x.clone(), hidden.clone()]),
        (
            "gpt/attention_scores",
            product(false, true),
            vec![tensor(&[32, 128, 64], 37), tensor(&[32, 128, 64], 38)],
        ),
        ("gpt/gelu", Box::new(Unary(Gelu { tanh: false })), vec![hidden.clone()]),
        (
            "gpt/gelu_grad",
            Box::new(GradOf(Gelu { tanh: false })),
            vec![hidden.clone(), hidden.clone()],
        ),
        ("gpt/softmax", Box::new(Softmax), vec![scores.clone()]),
        ("gpt/softmax_grad", Box::new(RowGrad(Softmax)), vec![scores.clone(), scores.clone()]),
        (
            "gpt/layer_norm",
            Box::new(norm.clone()),
            vec![x.clone(), tensor(&[width], 39), tensor(&[width], 40)],
        ),
        (
            "gpt/layer_norm_grad",
            Box::new(NormGrad(LayerNorm { eps: norm.eps })),
            vec![x.clone(), tensor(&[width], 39), x.clone()],
        ),
        (
            "gpt/cross_entropy",
            Box::new(CrossEntropy::default()),
            vec![logits.clone(), ids(tokens, vocab)],
        ),
        (
            "gpt/cross_entropy_grad",
            Box::new(CrossEntropyGrad::default()),
            vec![logits.clone(), ids(tokens, vocab), scalar],
        ),
        (
            "gpt/embedding_grad",
            Box::new(EmbeddingGrad { rows: vocab, shard: None }),
            vec![ids(tokens, vocab), x.clone()],
        ),
        ("gpt/add_residual", Box::new(Add), vec![x.clone(), x.clone()]),
        ("gpt/adamw", Box::new(AdamW::new(1e-3)), vec![state(41), state(42), state(43), state(44)]),
    ]
}

fn train(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_f32");
    group.sample_size(10).warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(1));
    let ctx = Context::with_threads(2);
    for (name, op, inputs) in mlp_cases().into_iter().chain(gpt_cases()) {
        group
            .bench_function(name, |b| b.iter(|| black_box(op.forward(&ctx, &inputs).expect(name))));
    }
    group.finish();
}

criterion_group!(benches, matmul, rows, train);
criterion_main!(benches);
