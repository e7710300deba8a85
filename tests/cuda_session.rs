//! Sessions on GPUs (`SessionConfig::device`). Without a usable GPU (no driver, or a build
//! without the `cuda` feature) a session asked for one fails with the typed device error naming
//! it; on a GPU machine (`scripts/gpu-check`) the same tests train a GPT on the GPU and on the
//! CPU and compare the losses, and the ignored test times the reference GPT step. Lines that
//! start with `GPU-CHECK` are the GPU check's report.

use std::time::Instant;

use meshflow::nn::{Gpt, GptConfig, Layouts, WeightInit};
use meshflow::ops::ops::adamw::AdamW;
use meshflow::ops::{DType, Tensor as HostTensor};
use meshflow::placement::{DeviceType, Placement};
use meshflow::schedule::Schedule;
use meshflow::session::{DeviceKind, Optimizer, Session, SessionConfig, Training};
use meshflow::{Error, Graph, Tensor};

/// The model whose GPU and CPU losses are compared (small enough for the CPU run to take a
/// few seconds).
const SMALL: GptConfig = GptConfig { vocab: 64, ctx: 32, n_layer: 2, n_head: 2, d_model: 64 };
/// The reference GPT of the benchmarks (`scripts/torch_train.py --gpt 512,128,4,4,256,8`).
const REFERENCE: GptConfig =
    GptConfig { vocab: 512, ctx: 128, n_layer: 4, n_head: 4, d_model: 256 };
const BATCH: usize = 8;
const STEPS: usize = 20;

/// f32: the GPU sums in other orders than the CPU (cuBLAS tiles, tree reductions), each a few
/// f32 ulps (1.2e-7 relative) per op; the CPU strategies of `gpt_parallel.rs`, which differ the
/// same way, agree within 2e-4 after 20 AdamW steps on a smaller model; 1e-3 allows five times
/// that for this wider one and is still far below the ~0.05 a step moves the loss.
const F32_TOLERANCE: f32 = 1e-3;
/// bf16 products: both backends round the operands to bf16 (8-bit mantissa, 3.9e-3 relative)
/// the same way and accumulate in f32, but a product whose f32 sums differ in the last bit can
/// round to a neighbouring bf16 value; those one-ulp (0.4%) differences in a few activations
/// move the loss (about 4 at the start) by far less than 0.25% over 20 steps: 1e-2.
const BF16_TOLERANCE: f32 = 1e-2;

/// A GPT training session of `config` on one device of `device`, with products in `compute`.
fn gpt_session(
    config: GptConfig,
    device: DeviceKind,
    compute: DType,
) -> meshflow::Result<(Session, Tensor, Tensor)> {
    let placement = Placement::new(DeviceType::Cpu, vec![1], vec![0])?;
    let layouts = Layouts::single(placement.clone());
    let graph = Graph::new();
    let ids = graph.input("ids", [BATCH, config.ctx], DType::I64, &placement, None)?;
    let targets = graph.input("targets", [BATCH, config.ctx], DType::I64, &placement, None)?;
    let init = WeightInit { std: 0.02, seed: 7 };
    let model = Gpt::new(&graph, config, &layouts, init)?.with_compute_dtype(compute);
    let loss = model.loss(&ids, &targets)?;
    let optimizer = Optimizer::AdamW(AdamW { weight_decay: 0.1, ..AdamW::new(3e-3) });
    let training = Training::new(&loss, optimizer, Schedule::Constant);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let session_config =
        SessionConfig { device, threads_per_device: threads, ..Default::default() };
    let session = Session::new(&graph, &[&loss], Some(training), session_config)?;
    Ok((session, ids, targets))
}

/// The inputs and targets of step `step`: a deterministic token pattern.
fn batch(config: GptConfig, step: usize) -> (HostTensor, HostTensor) {
    let t = config.ctx;
    let tokens: Vec<i64> = (0..BATCH * (t + 1))
        .map(|k| ((k * 5 + step * 3 + k / 7 + (k * k) % 11) % config.vocab) as i64)
        .collect();
    let (x, y) = meshflow::data::inputs_and_targets(&tokens, BATCH, t);
    (
        HostTensor::from_vec(x, [BATCH, t]).expect("ids"),
        HostTensor::from_vec(y, [BATCH, t]).expect("targets"),
    )
}

/// One training step; the loss.
fn step(session: &mut Session, inputs: (&Tensor, &Tensor), n: usize, config: GptConfig) -> f32 {
    let (x, y) = batch(config, n);
    let fetched = session.step(&[(inputs.0, x), (inputs.1, y)]).expect("a step");
    fetched[0].to_vec::<f32>().expect("an f32 loss")[0]
}

/// The losses of `steps` steps of `config` on `device`.
fn losses(config: GptConfig, device: DeviceKind, compute: DType, steps: usize) -> Vec<f32> {
    let (mut session, ids, targets) = gpt_session(config, device, compute).expect("a session");
    (0..steps).map(|n| step(&mut session, (&ids, &targets), n, config)).collect()
}

/// True when this machine can run a session on GPU 0 (else prints why the test is skipped).
fn gpu_usable() -> bool {
    match meshflow::ops::cuda::CudaDevice::new(0) {
        Ok(_) => true,
        Err(error) => {
            eprintln!("skipped, no usable GPU: {error}");
            false
        }
    }
}

#[test]
fn a_session_on_a_gpu_without_one_is_a_typed_error_naming_it() {
    if gpu_usable() {
        return; // a GPU machine: the tests below use it.
    }
    let error = gpt_session(SMALL, DeviceKind::Cuda, DType::F32).err().expect("no GPU here");
    match &error {
        Error::Ops(meshflow::ops::Error::Device { device, reason }) => {
            assert_eq!(device, "cuda:0");
            assert!(!reason.is_empty(), "the reason says what is missing");
        }
        other => panic!("expected the device error, got {other}"),
    }
    assert!(error.to_string().contains("cuda:0"), "{error}");
    let mixed = DeviceKind::Each(vec![meshflow::ops::Device::Cuda(3)]);
    let error = gpt_session(SMALL, mixed, DType::F32).err().expect("no GPU 3 here");
    assert!(
        matches!(&error, Error::Ops(meshflow::ops::Error::Device { device, .. }) if device == "cuda:3"),
        "{error}"
    );
}

#[test]
fn a_cpu_session_is_unchanged_by_the_device_setting() {
    let explicit = losses(SMALL, DeviceKind::Each(vec![meshflow::ops::Device::Cpu]), DType::F32, 3);
    let default = losses(SMALL, DeviceKind::Cpu, DType::F32, 3);
    assert_eq!(explicit, default);
    assert!(explicit.iter().all(|loss| loss.is_finite() && *loss > 3.0), "{explicit:?}");
}

/// `STEPS` losses on GPU 0, checking that steps after the third allocate no device memory.
fn gpu_losses(compute: DType) -> Vec<f32> {
    let (mut session, ids, targets) =
        gpt_session(SMALL, DeviceKind::Cuda, compute).expect("a GPU session");
    let allocations = |session: &Session| {
        let stats = session.gpu_pool_stats().expect("allocator counters");
        assert_eq!(stats.len(), 1, "one GPU rank");
        stats[0].1.allocations
    };
    let mut losses = Vec::new();
    let mut warm = 0;
    for n in 0..STEPS {
        losses.push(step(&mut session, (&ids, &targets), n, SMALL));
        if n == 2 {
            warm = allocations(&session);
        }
    }
    let after = allocations(&session);
    println!(
        "GPU-CHECK gpt {compute} device allocations: {warm} after 3 steps, {after} after {STEPS}"
    );
    assert_eq!(after, warm, "steady-state steps take every device buffer from the cache");
    losses
}

/// Compares `STEPS` GPU losses with the CPU's within `tolerance` and prints the report line.
fn compare_with_cpu(compute: DType, tolerance: f32) {
    let started = Instant::now();
    let gpu = gpu_losses(compute);
    let gpu_seconds = started.elapsed().as_secs_f64();
    let cpu = losses(SMALL, DeviceKind::Cpu, compute, STEPS);
    let worst = gpu.iter().zip(&cpu).map(|(g, c)| (g - c).abs()).fold(0.0f32, f32::max);
    println!(
        "GPU-CHECK gpt losses {compute} {STEPS} steps: max |gpu - cpu| = {worst:.2e} \
         (tolerance {tolerance:.0e}); first {:.4}/{:.4}, last {:.4}/{:.4}; gpu run {gpu_seconds:.1} s",
        gpu[0],
        cpu[0],
        gpu[STEPS - 1],
        cpu[STEPS - 1]
    );
    assert!(worst <= tolerance, "{compute}: gpu {gpu:?} vs cpu {cpu:?}");
    assert!(gpu[STEPS - 1] < gpu[0] - 0.3, "the loss fell on the GPU: {gpu:?}");
}

#[test]
fn gpt_on_a_gpu_trains_like_the_cpu_in_f32() {
    if gpu_usable() {
        compare_with_cpu(DType::F32, F32_TOLERANCE);
    }
}

#[test]
fn gpt_on_a_gpu_trains_like_the_cpu_in_bf16() {
    if gpu_usable() {
        compare_with_cpu(DType::BF16, BF16_TOLERANCE);
    }
}

/// The reference GPT's step time on GPU 0 (median of 20 steps after 3 warm-up steps; each step
/// ends with the loss on the host, so the GPU has finished its work). Run by the GPU check.
#[test]
#[ignore = "a timing for scripts/gpu-check: needs a GPU"]
fn gpt_reference_step_time_on_a_gpu() {
    if !gpu_usable() {
        return;
    }
    for compute in [DType::F32, DType::BF16] {
        let (mut session, ids, targets) =
            gpt_session(REFERENCE, DeviceKind::Cuda, compute).expect("a session");
        let inputs = (&ids, &targets);
        let first = step(&mut session, inputs, 0, REFERENCE);
        for n in 1..3 {
            step(&mut session, inputs, n, REFERENCE);
        }
        let mut times: Vec<f64> = (3..3 + STEPS)
            .map(|n| {
                let started = Instant::now();
                step(&mut session, inputs, n, REFERENCE);
                started.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2] * 1e3;
        let last = step(&mut session, inputs, 3 + STEPS, REFERENCE);
        println!(
            "GPU-CHECK gpt step meshflow {compute} {median:.3} ms (loss {first:.3} -> {last:.3})"
        );
        assert!(last.is_finite() && last < first, "{compute}: {first} -> {last}");
    }
}
