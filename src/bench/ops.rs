//! The CPU kernels meshflow is measured on, in one place: `meshflow bench ops` reports them as
//! a table against references measured in the same run, and the criterion bench
//! (`benches/ops.rs`) times the same kernels on the same inputs.
//!
//! - matmul `N×N · N×N` through the [`MatMul`] op, in GFLOP/s (`2N³` per call), against the
//!   `gemm` crate called directly on the same buffers (the kernel library's ceiling: what is left
//!   is the op's own overhead) — [`MATMUL_SIZES`] in the table, [`MATMUL_BENCH_SIZES`] in
//!   criterion;
//! - the row kernels ([`row_kernels`]: softmax, log_softmax, layer_norm, gelu, relu, the scalar
//!   multiply, the row-broadcast add and the add) over a `[4096, 1024]` f32 tensor, in GB/s of
//!   what a call reads plus what it writes ([`Kernel::bytes`]), against `memcpy` of the buffer
//!   on as many threads ([`parallel_copy`]) counted the same way;
//! - the kernels of the two training steps the project measures against PyTorch
//!   ([`train_kernels`]), at their shapes: time per call (criterion only).
//!
//! [`gemm_peak`] is the FLOP/s that MFU divides by when no `--peak-gflops` is given.

use std::hint::black_box;

use gemm::Parallelism;

use crate::ops::ops::adamw::AdamW;
use crate::ops::ops::add::Add;
use crate::ops::ops::attention::{CausalAttention, CausalAttentionGrad};
use crate::ops::ops::cross_entropy::{CrossEntropy, CrossEntropyGrad};
use crate::ops::ops::embedding::EmbeddingGrad;
use crate::ops::ops::gelu::Gelu;
use crate::ops::ops::layer_norm::{LayerNorm, NormGrad};
use crate::ops::ops::log_softmax::LogSoftmax;
use crate::ops::ops::matmul::MatMul;
use crate::ops::ops::mul_scalar::MulScalar;
use crate::ops::ops::relu::Relu;
use crate::ops::ops::skip_layer_norm::{SkipLayerNorm, SkipLayerNormGrad};
use crate::ops::ops::softmax::{RowGrad, Softmax};
use crate::ops::ops::sum::Sum;
use crate::ops::ops::unary::{GradOf, Unary};
use crate::ops::{Context, Op, Tensor};

use super::report::Figure;
use super::train::{time_steps, Timing};
use super::BenchError;

/// Rows of the row kernels' input.
pub const ROWS: usize = 4096;
/// Width of the row kernels' input.
pub const WIDTH: usize = 1024;

/// Matmul sizes of the `meshflow bench ops` table.
pub const MATMUL_SIZES: [usize; 3] = [256, 512, 1024];
/// Matmul sizes of the criterion bench (the table's and one larger).
pub const MATMUL_BENCH_SIZES: [usize; 4] = [256, 512, 1024, 2048];

/// One kernel to measure: its name, the op and its inputs.
pub struct Kernel {
    /// Its name (criterion's benchmark id, the table's row).
    pub name: &'static str,
    /// The op.
    pub op: Box<dyn Op>,
    /// Its inputs.
    pub inputs: Vec<Tensor>,
}

impl Kernel {
    fn new(name: &'static str, op: impl Op + 'static, inputs: Vec<Tensor>) -> Self {
        Kernel { name, op: Box::new(op), inputs }
    }

    /// Bytes one call reads plus writes: its inputs and one output of its first input's size.
    pub fn bytes(&self) -> u64 {
        let size = |t: &Tensor| (t.numel() * t.dtype().size()) as u64;
        let read: u64 = self.inputs.iter().map(size).sum();
        read + self.inputs.first().map_or(0, size)
    }

    /// One call on `context`: the op's outputs.
    pub fn run(&self, context: &Context) -> Result<Vec<Tensor>, BenchError> {
        Ok(self.op.forward(context, &self.inputs)?)
    }
}

/// Deterministic values in `[-0.5, 0.5)`.
pub fn filled(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let bits = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
            bits as f32 / 16_777_216.0 - 0.5
        })
        .collect()
}

/// An f32 tensor of [`filled`] values.
pub fn tensor(shape: &[usize], seed: u32) -> Result<Tensor, BenchError> {
    let len = shape.iter().product();
    Ok(Tensor::from_vec(filled(len, seed), shape.to_vec())?)
}

/// Class indices `0..vocab` for `len` rows.
fn ids(len: usize, vocab: usize) -> Result<Tensor, BenchError> {
    let values: Vec<i64> = (0..len).map(|i| ((i * 7919) % vocab) as i64).collect();
    Ok(Tensor::from_vec(values, [len])?)
}

/// The two `n × n` operands of the matmul figures.
pub fn matmul_inputs(n: usize) -> Result<[Tensor; 2], BenchError> {
    Ok([tensor(&[n, n], 1)?, tensor(&[n, n], 2)?])
}

/// The row kernels over a `[4096, 1024]` f32 tensor (see the module doc).
pub fn row_kernels() -> Result<Vec<Kernel>, BenchError> {
    let x = tensor(&[ROWS, WIDTH], 4)?;
    let y = tensor(&[ROWS, WIDTH], 7)?;
    let (weight, bias) = (tensor(&[WIDTH], 5)?, tensor(&[WIDTH], 6)?);
    let one = || vec![x.clone()];
    Ok(vec![
        Kernel::new("softmax", Softmax, one()),
        Kernel::new("log_softmax", LogSoftmax, one()),
        Kernel::new("layer_norm", LayerNorm { eps: 1e-5 }, vec![x.clone(), weight, bias.clone()]),
        Kernel::new("gelu", Unary(Gelu { tanh: false }), one()),
        Kernel::new("relu", Unary(Relu), one()),
        Kernel::new("mul_scalar", Unary(MulScalar { value: 0.5 }), one()),
        Kernel::new("add_row", Add, vec![x.clone(), bias]),
        Kernel::new("add", Add, vec![x, y]),
    ])
}

fn product(transpose_a: bool, transpose_b: bool) -> MatMul {
    MatMul { transpose_a, transpose_b }
}

/// The kernels of the two training steps measured against PyTorch: the MLP 784-1024-1024-10 at
/// batch 256 (the middle layer's forward and backward products, bias add and its gradient, relu
/// and its gradient, the loss, AdamW over its 1.9 M parameters) and the GPT (vocab 512, context
/// 128, 4 heads, width 256, batch 8: one layer's kernels, the loss and embedding gradient, AdamW
/// over one layer's weights).
pub fn train_kernels() -> Result<Vec<Kernel>, BenchError> {
    let mut kernels = mlp_kernels()?;
    kernels.extend(gpt_kernels()?);
    Ok(kernels)
}

fn mlp_kernels() -> Result<Vec<Kernel>, BenchError> {
    let (batch, hidden) = (256, 1024);
    let activation = tensor(&[batch, hidden], 11)?;
    let weight = tensor(&[hidden, hidden], 12)?;
    let grad = tensor(&[batch, hidden], 13)?;
    let params = 784 * hidden + hidden * hidden + hidden * 10;
    let state = |seed| tensor(&[params], seed);
    let (a, w, g) = (activation, weight, grad);
    Ok(vec![
        Kernel::new("mlp/matmul_x_w", product(false, false), vec![a.clone(), w.clone()]),
        Kernel::new("mlp/matmul_dy_wt", product(false, true), vec![g.clone(), w]),
        Kernel::new("mlp/matmul_xt_dy", product(true, false), vec![a.clone(), g.clone()]),
        Kernel::new(
            "mlp/matmul_in_784",
            product(false, false),
            vec![tensor(&[batch, 784], 14)?, tensor(&[784, hidden], 15)?],
        ),
        Kernel::new("mlp/add_bias", Add, vec![a.clone(), tensor(&[hidden], 16)?]),
        Kernel::new("mlp/sum_rows", Sum { axes: vec![0], keepdim: false }, vec![g.clone()]),
        Kernel::new("mlp/relu", Unary(Relu), vec![a.clone()]),
        Kernel::new("mlp/relu_grad", GradOf(Relu), vec![a, g]),
        Kernel::new(
            "mlp/cross_entropy",
            CrossEntropy::default(),
            vec![tensor(&[batch, 10], 17)?, ids(batch, 10)?],
        ),
        Kernel::new(
            "mlp/adamw",
            AdamW::new(1e-3),
            vec![state(18)?, state(19)?, state(20)?, state(21)?],
        ),
    ])
}

fn gpt_kernels() -> Result<Vec<Kernel>, BenchError> {
    let (tokens, width, vocab) = (8 * 128, 256, 512);
    let x = tensor(&[tokens, width], 31)?;
    let hidden = tensor(&[tokens, 4 * width], 32)?;
    let scores = tensor(&[8, 4, 128, 128], 33)?;
    let logits = tensor(&[tokens, vocab], 34)?;
    let (weight, bias) = (tensor(&[width], 39)?, tensor(&[width], 40)?);
    let branch = tensor(&[tokens, width], 48)?;
    let params = 12 * width * width;
    let state = |seed| tensor(&[params], seed);
    let scalar = Tensor::from_vec(vec![1.0f32], Vec::<usize>::new())?;
    let gelu = Gelu { tanh: false };
    // The fused attention of the GPT's 4 heads of 64: its forward's outputs are the backward's
    // inputs, as in the step.
    let qkv = tensor(&[8, 128, 3, 4, 64], 45)?;
    let attention = CausalAttention { scale: 0.125 };
    let mut attended = attention.forward(&Context::default(), std::slice::from_ref(&qkv))?;
    let (Some(lse), Some(y)) = (attended.pop(), attended.pop()) else {
        let missing = "causal_attention: expected the outputs y and lse".to_string();
        return Err(BenchError::Meshflow(crate::Error::Graph(missing)));
    };
    let attention_grad = CausalAttentionGrad { scale: 0.125 };
    let dy = tensor(&[8, 128, 4, 64], 46)?;
    // With c_attn's bias, as the GPT runs it.
    let qkv_bias = tensor(&[3, 4, 64], 49)?;
    let biased_inputs = [qkv.clone(), qkv_bias.clone()];
    let biased = attention.forward(&Context::default(), &biased_inputs)?;
    let biased_grad_inputs =
        vec![qkv.clone(), biased[0].clone(), biased[1].clone(), dy.clone(), qkv_bias];
    Ok(vec![
        Kernel::new(
            "gpt/matmul_qkv",
            product(false, false),
            vec![x.clone(), tensor(&[width, 3 * width], 35)?],
        ),
        Kernel::new(
            "gpt/matmul_mlp_dx",
            product(false, true),
            vec![hidden.clone(), tensor(&[width, 4 * width], 36)?],
        ),
        Kernel::new("gpt/matmul_mlp_dw", product(true, false), vec![x.clone(), hidden.clone()]),
        Kernel::new(
            "gpt/attention_scores",
            product(false, true),
            vec![tensor(&[32, 128, 64], 37)?, tensor(&[32, 128, 64], 38)?],
        ),
        Kernel::new("gpt/causal_attention", attention.clone(), vec![qkv.clone()]),
        Kernel::new("gpt/causal_attention_bias", attention, biased_inputs.to_vec()),
        Kernel::new("gpt/causal_attention_grad", attention_grad.clone(), vec![qkv, y, lse, dy]),
        Kernel::new("gpt/causal_attention_bias_grad", attention_grad, biased_grad_inputs),
        Kernel::new("gpt/gelu", Unary(gelu.clone()), vec![hidden.clone()]),
        // c_fc's bias gradient: the gradient of its 1024 tokens summed over them.
        Kernel::new("gpt/sum_rows", Sum { axes: vec![0], keepdim: false }, vec![hidden.clone()]),
        Kernel::new("gpt/gelu_grad", GradOf(gelu), vec![hidden.clone(), hidden]),
        Kernel::new("gpt/softmax", Softmax, vec![scores.clone()]),
        Kernel::new("gpt/softmax_grad", RowGrad(Softmax), vec![scores.clone(), scores]),
        Kernel::new(
            "gpt/layer_norm",
            LayerNorm { eps: 1e-5 },
            vec![x.clone(), weight.clone(), bias.clone()],
        ),
        Kernel::new(
            "gpt/layer_norm_grad",
            NormGrad(LayerNorm { eps: 1e-5 }),
            vec![x.clone(), weight.clone(), x.clone()],
        ),
        Kernel::new(
            "gpt/cross_entropy",
            CrossEntropy::default(),
            vec![logits.clone(), ids(tokens, vocab)?],
        ),
        Kernel::new(
            "gpt/cross_entropy_grad",
            CrossEntropyGrad::default(),
            vec![logits, ids(tokens, vocab)?, scalar],
        ),
        Kernel::new(
            "gpt/embedding_grad",
            EmbeddingGrad { rows: vocab, shard: None },
            vec![ids(tokens, vocab)?, x.clone()],
        ),
        Kernel::new("gpt/add_residual", Add, vec![x.clone(), x.clone()]),
        // A residual junction unfused (`add_bias`, `add_residual`, `layer_norm`; backward
        // `layer_norm_grad`, `add_residual`, `sum_rows_256`) and fused.
        Kernel::new("gpt/add_bias", Add, vec![x.clone(), tensor(&[width], 47)?]),
        Kernel::new("gpt/sum_rows_256", Sum { axes: vec![0], keepdim: false }, vec![x.clone()]),
        Kernel::new(
            "gpt/skip_layer_norm",
            SkipLayerNorm { eps: 1e-5 },
            vec![x.clone(), branch.clone(), tensor(&[width], 47)?, weight.clone(), bias.clone()],
        ),
        Kernel::new(
            "gpt/skip_layer_norm_grad",
            SkipLayerNormGrad { eps: 1e-5 },
            vec![x.clone(), weight.clone(), branch.clone(), x],
        ),
        Kernel::new(
            "gpt/adamw",
            AdamW::new(1e-3),
            vec![state(41)?, state(42)?, state(43)?, state(44)?],
        ),
    ])
}

/// Copies `source` into `target`, split between `threads` scoped threads (the caller copies the
/// first part): the reference of the row kernels on as many threads.
pub fn parallel_copy(threads: usize, source: &[f32], target: &mut [f32]) {
    let chunk = source.len().div_ceil(threads.max(1)).max(1);
    let mut parts = target.chunks_mut(chunk).zip(source.chunks(chunk));
    let Some((first_target, first_source)) = parts.next() else { return };
    std::thread::scope(|scope| {
        for (t, s) in parts {
            scope.spawn(move || t.copy_from_slice(black_box(s)));
        }
        first_target.copy_from_slice(black_box(first_source));
    });
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

/// Median seconds per call of `kernel` on `context`.
pub fn kernel_seconds(
    kernel: &Kernel,
    context: &Context,
    timing: Timing,
) -> Result<f64, BenchError> {
    let mut failure = None;
    let seconds = seconds_per_call(timing, || {
        if let Err(e) = kernel.run(context).map(black_box) {
            failure = Some(e);
        }
    });
    failure.map_or(Ok(seconds), Err)
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

/// The f32 GEMM peak of this machine on `threads` threads, FLOP/s: the `gemm` crate at 1024³,
/// the best of `PEAK_WINDOWS` windows that share `timing`'s seconds. One window's median was
/// the peak before, and a slow spell of a shared host during it put the MFU of a step timed in
/// a faster spell at 144 %.
pub fn gemm_peak(threads: usize, timing: Timing) -> f64 {
    let window = Timing { seconds: timing.seconds / PEAK_WINDOWS as f64, ..timing };
    let rates = (0..PEAK_WINDOWS).map(|_| gemm_reference(1024, threads, window));
    rates.fold(0.0, f64::max) * 1e9
}

/// Windows of [`gemm_peak`].
const PEAK_WINDOWS: usize = 5;

/// GFLOP/s of the [`MatMul`] op at `n³` on `threads` threads.
pub fn matmul_op(n: usize, threads: usize, timing: Timing) -> Result<f64, BenchError> {
    let kernel = Kernel::new("matmul", MatMul::default(), matmul_inputs(n)?.to_vec());
    let seconds = kernel_seconds(&kernel, &Context::with_threads(threads), timing)?;
    Ok(2.0 * (n as f64).powi(3) / seconds / 1e9)
}

/// GB/s of `memcpy` of a `[4096, 1024]` f32 buffer on one thread (read plus write).
pub fn memcpy_bandwidth(timing: Timing) -> f64 {
    parallel_memcpy_bandwidth(1, timing)
}

/// GB/s of `memcpy` of a `[4096, 1024]` f32 buffer split between `threads` threads.
pub fn parallel_memcpy_bandwidth(threads: usize, timing: Timing) -> f64 {
    let source = filled(ROWS * WIDTH, 3);
    let mut target = vec![0.0f32; ROWS * WIDTH];
    let seconds = seconds_per_call(timing, || parallel_copy(threads, &source, &mut target));
    black_box(&target);
    (2 * ROWS * WIDTH * 4) as f64 / seconds / 1e9
}

/// How many times [`measure`] ticks on 1 and `threads` threads.
pub fn ticks(threads: usize) -> u64 {
    let per_thread_count = MATMUL_SIZES.len() + 1 + 8;
    (per_thread_count * if threads > 1 { 2 } else { 1 }) as u64
}

/// The whole `ops` section on 1 and `threads` threads; `tick` before each figure.
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
    let kernels = row_kernels()?;
    for &t in &thread_counts {
        tick(&format!("memcpy ×{t}thr"));
        let memcpy = parallel_memcpy_bandwidth(t, timing);
        let context = Context::with_threads(t);
        for kernel in &kernels {
            let name = format!("{} [4096,1024] ×{t}thr", kernel.name);
            tick(&name);
            let seconds = kernel_seconds(kernel, &context, timing)?;
            figures.push(Figure {
                value: kernel.bytes() as f64 / seconds / 1e9,
                unit: "GB/s".into(),
                higher_is_better: true,
                reference: format!("memcpy ×{t}thr"),
                reference_value: memcpy,
                name,
            });
        }
    }
    Ok(figures)
}
