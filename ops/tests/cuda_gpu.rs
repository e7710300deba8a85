//! The GPU half of `scripts/gpu-check`: every op on the GPU against the CPU backend, the caching
//! allocator in steady state, and matrix-product throughput. Each test returns early (printing
//! why) where no GPU is usable, so it also passes in CI.
//!
//! On the GPU machine: `cuda_gpu-* --include-ignored --nocapture --test-threads=1`; lines that
//! start with `GPU-CHECK` are the report (`run.sh` collects them).

#![cfg(feature = "cuda")]

use std::collections::BTreeSet;
use std::time::Instant;

use half::{bf16, f16};
use meshflow_ops::cuda::table::KERNELS;
use meshflow_ops::cuda::{self, CudaDevice};
use meshflow_ops::eager::Tape;
use meshflow_ops::ops::{
    adamw, add, add_scalar, attention, bias_act, broadcast_to, cast, concat, cross_entropy, div,
    dropout, embedding, exp, fill, gelu, layer_norm, log, log_softmax, masked_fill, matmul, max,
    mean, mul, mul_scalar, narrow, neg, permute, pow, pow_scalar, relu, reshape, rms_norm, rsqrt,
    sgd, sigmoid, silu, skip_layer_norm, softmax, split, sqrt, sub, sum, tanh, where_select,
};
use meshflow_ops::{Context, DType, Result, Shape, Tensor, Value};

fn device() -> Option<CudaDevice> {
    match CudaDevice::new(0) {
        Ok(device) => Some(device),
        Err(error) => {
            eprintln!("skipped, no usable GPU: {error}");
            None
        }
    }
}

/// Deterministic values in [-1, 1).
fn values(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..count)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn leaf(tape: &mut Tape, dims: &[usize], seed: u64) -> Value {
    let count = dims.iter().product();
    tape.leaf(Tensor::from_vec(values(count, seed), dims.to_vec()).expect("a leaf"))
}

/// A leaf of deterministic values cast to `dtype`.
fn input(tape: &mut Tape, dims: &[usize], seed: u64, dtype: DType) -> Result<Value> {
    let values = leaf(tape, dims, seed);
    cast::cast(tape, values, dtype)
}

/// Sums `v` to a scalar (all axes).
fn total(tape: &mut Tape, v: Value) -> Result<Value> {
    sum::sum(tape, v, &[], false)
}

/// A CPU program that runs every op of the table (the gradient ops through `gradients`).
fn program(tape: &mut Tape, dtype: DType) -> Result<()> {
    let x32 = leaf(tape, &[4, 8], 1);
    let x = cast::cast(tape, x32, dtype)?;
    let bias = input(tape, &[8], 2, dtype)?;
    let positive = exp::exp(tape, x)?;
    let mut terms = Vec::new();
    for f in [log::log, sqrt::sqrt, rsqrt::rsqrt] {
        terms.push(f(tape, positive)?);
    }
    for f in [sigmoid::sigmoid, tanh::tanh, relu::relu, silu::silu, neg::neg] {
        terms.push(f(tape, x)?);
    }
    terms.push(gelu::gelu(tape, x, false)?);
    terms.push(gelu::gelu(tape, x, true)?);
    for tanh in [false, true] {
        terms.push(bias_act::bias_act(tape, gelu::Gelu { tanh }, x, bias)?);
    }
    terms.push(bias_act::bias_act(tape, silu::Silu, x, bias)?);
    terms.push(bias_act::bias_act(tape, relu::Relu, x, bias)?);
    terms.push(add_scalar::add_scalar(tape, x, 0.5)?);
    terms.push(mul_scalar::mul_scalar(tape, x, -3.0)?);
    terms.push(pow_scalar::pow_scalar(tape, x, 2.0)?);
    terms.push(pow_scalar::pow_scalar(tape, positive, 1.5)?);
    terms.push(add::add(tape, x, bias)?);
    terms.push(sub::sub(tape, bias, x)?);
    terms.push(mul::mul(tape, x, bias)?);
    terms.push(div::div(tape, x, positive)?);
    terms.push(pow::pow(tape, positive, x)?);
    let wide = broadcast_to::broadcast_to(tape, bias, &Shape::from([3, 4, 8]))?;
    terms.push(sum::sum(tape, wide, &[0], false)?);
    terms.push(permute::transpose(tape, x, 0, 1)?);
    let window = narrow::narrow(tape, x, 1, 2, 5)?;
    terms.push(concat::concat(tape, &[window, x], 1)?);
    let parts = split::split(tape, x, 0, &[1, 3])?;
    terms.extend(parts);
    terms.push(reshape::reshape(tape, x, &Shape::from([8, 4]))?);
    terms.push(mean::mean(tape, x, &[-1], true)?);
    terms.push(max::max(tape, x, &[1], false)?);
    terms.push(softmax::softmax(tape, x)?);
    terms.push(log_softmax::log_softmax(tape, x)?);
    let long_rows = input(tape, &[3, 2000], 3, dtype)?;
    terms.push(softmax::softmax(tape, long_rows)?);
    let weight = input(tape, &[8], 4, dtype)?;
    terms.push(layer_norm::layer_norm(tape, x, weight, bias, 1e-5)?);
    terms.push(rms_norm::rms_norm(tape, x, weight, 1e-6)?);
    // The residual junction: a composite of add and layer_norm on the GPU.
    let branch = input(tape, &[4, 8], 13, dtype)?;
    let junction = skip_layer_norm::skip_layer_norm(tape, (x, branch), bias, (weight, bias), 1e-5)?;
    terms.extend(junction);
    let w = input(tape, &[8, 6], 5, dtype)?;
    terms.push(matmul::matmul(tape, x, w)?);
    terms.push(matmul::matmul_transposed(tape, w, x, true, true)?);
    let batched = input(tape, &[2, 4, 8], 6, dtype)?;
    terms.push(matmul::matmul(tape, batched, w)?);
    // qkv [B 2, T 4, 3, H 2, D 2] projected from `batched`, so the gradient op runs too.
    let project = input(tape, &[8, 12], 12, dtype)?;
    let packed = matmul::matmul(tape, batched, project)?;
    let qkv = reshape::reshape(tape, packed, &Shape::from([2, 4, 3, 2, 2]))?;
    terms.push(attention::causal_attention(tape, qkv, None, 0.5)?);
    let attention_bias = input(tape, &[3, 2, 2], 14, dtype)?;
    terms.push(attention::causal_attention(tape, qkv, Some(attention_bias), 0.5)?);
    let larger = larger_terms(tape, dtype)?;
    terms.extend(larger.terms);
    terms.extend(reductions(tape, dtype)?);
    let table = input(tape, &[10, 8], 7, dtype)?;
    let ids = tape.leaf(Tensor::from_vec(vec![3i64, 0, 9, 3], [4]).expect("ids"));
    let embedded = embedding::embedding(tape, table, ids)?;
    let logits = matmul::matmul_transposed(tape, embedded, table, false, true)?;
    terms.push(cross_entropy::cross_entropy(tape, logits, ids)?);
    let mask = tape.leaf(Tensor::from_bytes(&[1, 0, 0, 1, 1, 0, 1, 0], [8], DType::Bool)?);
    terms.push(masked_fill::masked_fill(tape, x, mask, -7.0)?);
    let y = neg::neg(tape, x)?;
    terms.push(where_select::where_select(tape, mask, x, y)?);
    terms.push(dropout::dropout(tape, x, 0.25, 11)?);
    let step = tape.leaf(Tensor::from_vec(vec![7i64], []).expect("a step"));
    terms.push(dropout::dropout_at_step(tape, x, step, 0.5, 11)?);
    terms.push(fill::fill(tape, x, 2.5)?);
    let sums = terms.into_iter().map(|t| total(tape, t)).collect::<Result<Vec<_>>>()?;
    let mut loss = sums[0];
    for &s in &sums[1..] {
        loss = add::add(tape, loss, s)?;
    }
    let one = tape.leaf(Tensor::scalar(1.0, DType::F32));
    let ones = cast::cast(tape, one, dtype)?;
    let mut wrt = vec![x32, w, table, batched, weight, bias];
    wrt.extend(larger.leaves);
    let grads = tape.gradients(&[loss], &[ones], &wrt)?;
    let (param, grad) = (w, grads[1].expect("w reaches the loss"));
    let zeros = fill::fill(tape, param, 0.0)?;
    let config =
        adamw::AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step: 1 };
    adamw::adamw(tape, config, [param, grad, zeros, zeros])?;
    let config = sgd::Sgd { lr: 1e-2, momentum: 0.9, dampening: 0.0, weight_decay: 0.0, step: 1 };
    sgd::sgd(tape, config, [param, grad, zeros])?;
    Ok(())
}

/// Terms on larger shapes, and the leaves their gradients need: row kernels with rows longer
/// than a block, attention with several warps per row, the norms' column pass with several
/// chunks, and an embedding gradient where many positions add into one row (atomics).
struct Larger {
    terms: Vec<Value>,
    leaves: Vec<Value>,
}

fn larger_terms(tape: &mut Tape, dtype: DType) -> Result<Larger> {
    // Attention: qkv [B 2, T 40, 3, H 2, D 8] projected from a differentiated input.
    let sequence = leaf(tape, &[2, 40, 8], 21);
    let wide = cast::cast(tape, sequence, dtype)?;
    let project = input(tape, &[8, 48], 22, dtype)?;
    let packed = matmul::matmul(tape, wide, project)?;
    let qkv = reshape::reshape(tape, packed, &Shape::from([2, 40, 3, 2, 8]))?;
    let attended = attention::causal_attention(tape, qkv, None, 0.35)?;
    // Norms over 300 rows of 48 (the column pass runs in many chunks).
    let rows32 = leaf(tape, &[300, 48], 23);
    let rows = cast::cast(tape, rows32, dtype)?;
    let (weight, bias) = (input(tape, &[48], 24, dtype)?, input(tape, &[48], 25, dtype)?);
    let normed = layer_norm::layer_norm(tape, rows, weight, bias, 1e-5)?;
    let scaled = rms_norm::rms_norm(tape, rows, weight, 1e-6)?;
    // Cross-entropy over 64 rows of 1500 classes; an embedding of 200 positions into 50 rows.
    let logits32 = leaf(tape, &[64, 1500], 26);
    let logits = cast::cast(tape, logits32, dtype)?;
    let targets: Vec<i64> = (0..64).map(|i| (i * 37 % 1500) as i64).collect();
    let targets = tape.leaf(Tensor::from_vec(targets, [64]).expect("targets"));
    let loss = cross_entropy::cross_entropy(tape, logits, targets)?;
    let table32 = leaf(tape, &[50, 16], 27);
    let table = cast::cast(tape, table32, dtype)?;
    let ids: Vec<i64> = (0..200).map(|i| (i * 7 % 50) as i64).collect();
    let ids = tape.leaf(Tensor::from_vec(ids, [10, 20]).expect("ids"));
    let embedded = embedding::embedding(tape, table, ids)?;
    // Weighted by fixed values, so the gradients that flow back are not uniform.
    let mut terms = vec![loss];
    for (seed, term) in [(31, attended), (32, normed), (33, scaled), (34, embedded)] {
        let dims = tape.tensor(term).dims().to_vec();
        let weights = input(tape, &dims, seed, dtype)?;
        terms.push(mul::mul(tape, term, weights)?);
    }
    Ok(Larger { terms, leaves: vec![sequence, rows32, logits32, table32] })
}

/// Reductions of every plan shape (`cuda::reduce`): column passes split into chunks (a bias
/// gradient over 2·700 rows), row passes over long rows in chunks, scattered axes, a whole
/// tensor, and size-one axes; each is also summed into the loss, so `sum` runs on them again.
fn reductions(tape: &mut Tape, dtype: DType) -> Result<Vec<Value>> {
    let tokens = input(tape, &[2, 700, 48], 41, dtype)?;
    let long = input(tape, &[3, 30000], 42, dtype)?;
    let scattered = input(tape, &[6, 50, 7], 43, dtype)?;
    let ones = input(tape, &[5, 1, 3], 44, dtype)?;
    Ok(vec![
        sum::sum(tape, tokens, &[0, 1], false)?,
        mean::mean(tape, tokens, &[0, 1], true)?,
        max::max(tape, tokens, &[1], false)?,
        sum::sum(tape, long, &[1], false)?,
        mean::mean(tape, long, &[], false)?,
        max::max(tape, long, &[0, 1], true)?,
        mean::mean(tape, scattered, &[0, 2], false)?,
        sum::sum(tape, scattered, &[0, 1], false)?,
        sum::sum(tape, ones, &[1], false)?,
        max::max(tape, ones, &[0, 1], false)?,
    ])
}

/// Elements as f64, whatever the dtype.
fn as_f64(tensor: &Tensor) -> Vec<f64> {
    match tensor.dtype() {
        DType::F32 => tensor.to_vec::<f32>().expect("f32").into_iter().map(f64::from).collect(),
        DType::F64 => tensor.to_vec::<f64>().expect("f64"),
        DType::BF16 => tensor.to_vec::<bf16>().expect("bf16").into_iter().map(f64::from).collect(),
        DType::F16 => tensor.to_vec::<f16>().expect("f16").into_iter().map(f64::from).collect(),
        DType::I64 => tensor.to_vec::<i64>().expect("i64").into_iter().map(|v| v as f64).collect(),
        DType::I32 => tensor.to_vec::<i32>().expect("i32").into_iter().map(f64::from).collect(),
        DType::U8 | DType::Bool => {
            tensor.to_vec::<u8>().expect("u8").into_iter().map(f64::from).collect()
        }
    }
}

/// Largest error relative to `1 + |expected|`.
fn worst_error(gpu: &Tensor, cpu: &Tensor) -> f64 {
    let (a, b) = (as_f64(gpu), as_f64(cpu));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| match (x.is_nan(), y.is_nan()) {
            (true, true) => 0.0,
            (false, false) => (x - y).abs() / (1.0 + y.abs()),
            _ => f64::INFINITY,
        })
        .fold(0.0, f64::max)
}

/// The largest error allowed relative to `1 + |cpu|`, by output dtype. Both backends compute
/// half-precision ops in f32 from the same inputs and round once at the end, so most outputs
/// differ by at most one ulp of the dtype (bf16 3.9e-3, f16 4.9e-4) from summation order; the
/// GPU's attention also rounds its probabilities and score gradients to the dtype between its
/// products (as eager frameworks do), a few ulps more over `T` terms: bf16 3e-2, f16 4e-3.
/// f32: cuBLAS and tree reductions sum in other orders (a few ulps per op over up to 1500
/// terms): 2e-4. f64, integers and bool (copies, masks, dropout's bit-equal mask): 1e-9.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 3e-2,
        DType::F16 => 4e-3,
        DType::F32 => 2e-4,
        _ => 1e-9,
    }
}

/// Runs every recorded node of `tape` on the device; returns the op names that ran and failures.
fn replay(device: &CudaDevice, tape: &Tape) -> (BTreeSet<&'static str>, Vec<String>) {
    let mut seen = BTreeSet::new();
    let mut failures = Vec::new();
    for node in tape.nodes() {
        let name = node.op.name();
        seen.insert(name);
        let run = || -> Result<Vec<Tensor>> {
            let inputs: Vec<Tensor> = node
                .inputs
                .iter()
                .map(|&v| device.to_device(tape.tensor(v)))
                .collect::<Result<_>>()?;
            device.forward(&*node.op, &inputs)?.iter().map(cuda::to_host).collect()
        };
        match run() {
            Err(error) => failures.push(format!("{name}: {error}")),
            Ok(outputs) => {
                for (gpu, &value) in outputs.iter().zip(&node.outputs) {
                    let cpu = tape.tensor(value);
                    let error = worst_error(gpu, cpu);
                    if error > tolerance(cpu.dtype()) {
                        failures.push(format!(
                            "{name} {:?} {}: error {error:.2e}",
                            cpu.dtype(),
                            cpu.shape()
                        ));
                    }
                }
            }
        }
    }
    (seen, failures)
}

/// The CPU half runs anywhere: the program builds in every dtype and reaches every op of the
/// table, so the GPU run cannot fail on the program itself.
#[test]
fn the_cpu_program_reaches_every_op() {
    let mut seen = BTreeSet::new();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let mut tape = Tape::new(Context::with_threads(2));
        program(&mut tape, dtype).expect("the CPU program runs");
        seen.extend(tape.nodes().iter().map(|node| node.op.name()));
    }
    let unseen: Vec<&str> = KERNELS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !seen.contains(name) && !cuda::table::GRAPH_OPS.contains(name))
        .collect();
    assert!(unseen.is_empty(), "the program misses {unseen:?}");
}

#[test]
fn every_op_on_the_gpu_matches_the_cpu() {
    let Some(device) = device() else { return };
    println!("GPU-CHECK device {device:?}");
    let mut all_seen = BTreeSet::new();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let mut tape = Tape::new(Context::with_threads(4));
        program(&mut tape, dtype).expect("the CPU program runs");
        let started = Instant::now();
        let (seen, failures) = replay(&device, &tape);
        let first = device.pool_stats();
        let (_, again) = replay(&device, &tape);
        let second = device.pool_stats();
        println!(
            "GPU-CHECK ops {dtype:?}: {} nodes, {} ops, {} failures, {:.2}s; allocations {} then {} more ({} reuses)",
            tape.nodes().len(),
            seen.len(),
            failures.len(),
            started.elapsed().as_secs_f64(),
            first.allocations,
            second.allocations - first.allocations,
            second.reuses
        );
        for failure in &failures {
            println!("GPU-CHECK FAIL {failure}");
        }
        assert!(failures.is_empty() && again.is_empty(), "{dtype:?}: {failures:?}");
        assert_eq!(second.allocations, first.allocations, "a repeated pass allocates nothing new");
        all_seen.extend(seen);
    }
    let unseen: Vec<&str> = KERNELS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !all_seen.contains(name) && !cuda::table::GRAPH_OPS.contains(name))
        .collect();
    println!("GPU-CHECK ops not exercised: {unseen:?}");
    println!("GPU-CHECK ops native on the GPU: all {} (no host fallback exists)", KERNELS.len());
    let refusal = device.product_refusal();
    println!("GPU-CHECK ops products: {:?} {refusal:?}", device.product_paths());
    assert!(unseen.is_empty(), "the program misses {unseen:?}");
}

/// Seconds per call of `run` (after warm-up), timed around a synchronised batch.
fn seconds_per_call(device: &CudaDevice, mut run: impl FnMut()) -> f64 {
    for _ in 0..3 {
        run();
    }
    device.synchronize().expect("warm-up");
    let mut calls = 0;
    let started = Instant::now();
    while calls < 10 || started.elapsed().as_secs_f64() < 1.0 {
        run();
        calls += 1;
        if calls % 10 == 0 {
            device.synchronize().expect("a batch");
        }
    }
    device.synchronize().expect("the last batch");
    started.elapsed().as_secs_f64() / calls as f64
}

#[test]
#[ignore = "a benchmark: run on the GPU machine with --include-ignored"]
fn matmul_throughput() {
    let Some(device) = device() else { return };
    let product = meshflow_ops::ops::matmul::MatMul::default();
    for (dtype, sizes) in [(DType::BF16, [4096usize, 8192]), (DType::F32, [4096, 8192])] {
        for n in sizes {
            let host = Tensor::from_vec(values(n * n, n as u64), [n, n]).expect("operand");
            let operand = meshflow_ops::Op::forward(
                &meshflow_ops::ops::cast::Cast { dtype },
                &Context::with_threads(8),
                &[host],
            )
            .expect("cast")
            .remove(0);
            let a = device.to_device(&operand).expect("upload");
            let inputs = [a.clone(), a];
            let seconds = seconds_per_call(&device, || {
                drop(device.forward(&product, &inputs).expect("matmul"));
            });
            let tflops = 2.0 * (n as f64).powi(3) / seconds / 1e12;
            println!("GPU-CHECK matmul meshflow {} {n} {tflops:.1} TFLOP/s", dtype.name());
            let refusal = device.product_refusal();
            println!("GPU-CHECK matmul paths so far: {:?} {refusal:?}", device.product_paths());
            if dtype == DType::BF16 && n == 8192 {
                // The classic cuBLAS call on the same operands, for comparison with cuBLASLt.
                device.set_cublaslt(false);
                let seconds = seconds_per_call(&device, || {
                    drop(device.forward(&product, &inputs).expect("matmul"));
                });
                device.set_cublaslt(true);
                let tflops = 2.0 * (n as f64).powi(3) / seconds / 1e12;
                println!("GPU-CHECK matmul meshflow-classic bf16 {n} {tflops:.1} TFLOP/s");
            }
        }
    }
}
