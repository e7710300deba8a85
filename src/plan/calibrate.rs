//! Calibration: the cost model's `cpu` figures measured on this machine, and the simulator's
//! predicted step times for the strategies that run here (CPU devices in one process) against
//! real steps of the [`Session`] measured in the same run.
//!
//! Measured, each a few hundred milliseconds: GEMM FLOP/s at the char GPT's shapes, element-wise
//! FLOP/s (softmax, GELU, add), memory bandwidth (a 64 MB copy), the cost of one tiny kernel,
//! the in-process all-reduce's latency per hop and bandwidth (2 threads), and the fixed cost of an
//! empty session step per device count. With more devices than cores, each device gets
//! `cores / devices` of the compute and memory figures.
//!
//! Each strategy is predicted twice: with the roofline of those figures, and with every distinct
//! kernel of its program timed on this machine ([`KernelProfile`], slowed by `devices / cores`
//! when devices share cores). The second leaves the simulator only the schedule, the
//! communication and the runtime between kernels to predict.

use std::fmt;
use std::time::{Duration, Instant};

use meshflow_comm::{Communicator, Rank, ReduceOp, SharedGroup};
use meshflow_ops::ops::adamw::AdamW;
use meshflow_ops::ops::add::Add;
use meshflow_ops::ops::gelu::Gelu;
use meshflow_ops::ops::matmul::MatMul;
use meshflow_ops::ops::softmax::Softmax;
use meshflow_ops::ops::unary::Unary;
use meshflow_ops::{Context, DType, Op, Tensor as HostTensor};
use meshflow_placement::{DeviceType, Placement};

use super::cluster::{Cluster, DeviceSpec, Link};
use super::model::ModelSpec;
use super::profile::KernelProfile;
use super::{predict, predict_measured};
use crate::compile::actors::ActorConfig;
use crate::compile::CompileConfig;
use crate::nn::{Gpt, Layouts, WeightInit};
use crate::schedule::Schedule;
use crate::session::{Optimizer, Session, SessionConfig, Training};
use crate::{Error, Graph, Result};

pub use super::table::scale_table;

/// How to calibrate.
#[derive(Clone, Debug)]
pub struct CalibrationConfig {
    /// Measured steps per strategy.
    pub steps: usize,
    /// Unmeasured steps first.
    pub warmup: usize,
    /// Sequences per step.
    pub batch: usize,
    /// `(dp, tp)` meshes to run.
    pub meshes: Vec<(usize, usize)>,
}

impl Default for CalibrationConfig {
    fn default() -> Self {
        CalibrationConfig {
            steps: 5,
            warmup: 2,
            batch: 16,
            meshes: vec![(1, 1), (2, 1), (1, 2), (2, 2)],
        }
    }
}

/// This machine's figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    /// Matrix-product FLOP/s of one thread.
    pub gemm_flops: f64,
    /// Element-wise FLOP/s of one thread.
    pub vector_flops: f64,
    /// Bytes per second read plus written by a copy.
    pub memory_bandwidth: f64,
    /// Seconds one kernel costs beyond its roofline: the larger of a tiny op's call and a
    /// session's per-kernel cost (a chain of 200 tiny kernels less a chain of 1, per kernel).
    pub kernel_overhead: f64,
    /// Seconds per hop of the in-process all-reduce.
    pub hop_latency: f64,
    /// Bytes per second one member receives in the in-process all-reduce.
    pub link_bandwidth: f64,
    /// Cores available.
    pub cores: usize,
}

impl Measured {
    /// The `cpu` cluster of `devices` devices in one process on this machine.
    pub fn cluster(&self, devices: usize) -> Cluster {
        let share = (self.cores as f64 / devices as f64).min(1.0);
        let device = DeviceSpec {
            kind: "cpu".into(),
            peak_flops: self.gemm_flops * share,
            matmul_efficiency: 1.0,
            vector_flops: self.vector_flops * share,
            memory: 16e9,
            memory_bandwidth: self.memory_bandwidth * share,
            kernel_overhead: self.kernel_overhead,
            element_bytes: 4.0,
        };
        let link = Link { bandwidth: self.link_bandwidth * share, latency: self.hop_latency };
        Cluster { nodes: 1, per_node: devices, device, intra: link, inter: link }
    }
}

/// One strategy: predicted against measured.
#[derive(Clone, Debug, PartialEq)]
pub struct CalibrationRow {
    /// `dp×tp`.
    pub mesh: (usize, usize),
    /// Simulated step (roofline kernels and boxing) plus the measured empty-step cost.
    pub predicted: f64,
    /// Simulated step with measured kernel times ([`KernelProfile`]) plus the empty-step cost.
    pub profiled: f64,
    /// Distinct kernels profiled, and those that could not run on made-up inputs.
    pub kernels: (usize, usize),
    /// Of which the empty step.
    pub fixed: f64,
    /// Median measured step.
    pub measured: f64,
}

impl CalibrationRow {
    /// `(predicted − measured) / measured`.
    pub fn error(&self) -> f64 {
        (self.predicted - self.measured) / self.measured
    }

    /// `(profiled − measured) / measured`.
    pub fn profiled_error(&self) -> f64 {
        (self.profiled - self.measured) / self.measured
    }
}

/// The calibration's result.
#[derive(Clone, Debug)]
pub struct CalibrationTable {
    /// The machine's figures.
    pub measured: Measured,
    /// One row per strategy.
    pub rows: Vec<CalibrationRow>,
}

/// Measures this machine, then predicts and runs the char GPT on every mesh of `config`.
pub fn calibrate(config: &CalibrationConfig, compile: &CompileConfig) -> Result<CalibrationTable> {
    let measured = measure()?;
    let mut rows = Vec::new();
    for &(dp, tp) in &config.meshes {
        let (session_program, measured_step) = run_session(config, compile, dp, tp)?;
        let fixed = empty_step(dp * tp, 1)?;
        let cluster = measured.cluster(dp * tp);
        let prediction = predict(&session_program, &ActorConfig::default(), &cluster, false)?;
        let profile = KernelProfile::measure(&session_program, 1, Duration::from_millis(20))?;
        let slowdown = ((dp * tp) as f64 / measured.cores as f64).max(1.0);
        let profiled = predict_measured(
            &session_program,
            &ActorConfig::default(),
            &cluster,
            Some((&profile, slowdown)),
            false,
        )?;
        rows.push(CalibrationRow {
            mesh: (dp, tp),
            predicted: prediction.step_seconds + fixed,
            profiled: profiled.step_seconds + fixed,
            kernels: (profile.len(), profile.failed),
            fixed,
            measured: measured_step,
        });
    }
    Ok(CalibrationTable { measured, rows })
}

/// Measures the machine's figures (see the module doc).
pub fn measure() -> Result<Measured> {
    let ctx = Context::single_thread();
    let shapes = [(1024, 128, 384), (1024, 128, 512), (1024, 512, 128), (512, 128, 128)];
    let mut flops = 0u64;
    let mut seconds = 0.0;
    for (m, k, n) in shapes {
        let a = HostTensor::randn([m, k], 0.0, 1.0, DType::F32, 1)?;
        let b = HostTensor::randn([k, n], 0.0, 1.0, DType::F32, 2)?;
        let op = MatMul { transpose_a: false, transpose_b: false };
        let (f, s) = op_rate(&op, &ctx, &[a, b])?;
        flops += f;
        seconds += s;
    }
    let gemm_flops = flops as f64 / seconds;
    let scores = HostTensor::randn([64, 64, 64], 0.0, 1.0, DType::F32, 3)?;
    let hidden = HostTensor::randn([1024, 512], 0.0, 1.0, DType::F32, 4)?;
    let x = HostTensor::randn([1024, 128], 0.0, 1.0, DType::F32, 5)?;
    let (f1, s1) = op_rate(&Softmax, &ctx, &[scores])?;
    let (f2, s2) = op_rate(&Unary(Gelu { tanh: false }), &ctx, &[hidden])?;
    let (f3, s3) = op_rate(&Add, &ctx, &[x.clone(), x])?;
    let vector_flops = (f1 + f2 + f3) as f64 / (s1 + s2 + s3);
    let one = HostTensor::randn([1], 0.0, 1.0, DType::F32, 6)?;
    let (_, kernel_overhead) = op_rate(&Add, &ctx, &[one.clone(), one])?;
    let (hop_latency, link_bandwidth) = all_reduce_figures()?;
    let chain = 200;
    let session_kernel = (empty_step(1, chain)? - empty_step(1, 1)?) / (chain - 1) as f64;
    Ok(Measured {
        gemm_flops,
        vector_flops,
        memory_bandwidth: copy_bandwidth(),
        kernel_overhead: kernel_overhead.max(session_kernel),
        hop_latency,
        link_bandwidth,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}

/// FLOPs of one call and its fastest seconds over ~0.1 s of calls (the least disturbed by
/// other processes: the machine is shared).
fn op_rate(op: &dyn Op, ctx: &Context, inputs: &[HostTensor]) -> Result<(u64, f64)> {
    let metas: Vec<_> = inputs.iter().map(|t| t.meta().clone()).collect();
    op.forward(ctx, inputs)?;
    let started = Instant::now();
    let mut fastest = f64::INFINITY;
    let mut calls = 0u32;
    while started.elapsed() < Duration::from_millis(100) || calls < 3 {
        let call = Instant::now();
        std::hint::black_box(op.forward(ctx, inputs)?);
        fastest = fastest.min(call.elapsed().as_secs_f64());
        calls += 1;
    }
    Ok((op.flops(&metas), fastest))
}

/// Bytes read plus written per second by a 64 MB copy (the fastest of 8).
fn copy_bandwidth() -> f64 {
    let source = vec![1u8; 64 << 20];
    let mut target = vec![0u8; 64 << 20];
    let mut fastest = f64::INFINITY;
    for _ in 0..8 {
        let started = Instant::now();
        target.copy_from_slice(std::hint::black_box(&source));
        std::hint::black_box(&target);
        fastest = fastest.min(started.elapsed().as_secs_f64());
    }
    (2 * source.len()) as f64 / fastest
}

/// Per-hop latency (1-element all-reduce over 2 threads, 2 hops) and the bytes per second one
/// member receives (a 4 MB all-reduce, less the latency).
fn all_reduce_figures() -> Result<(f64, f64)> {
    let small = all_reduce_seconds(1, 200)?;
    let elements = 1 << 20;
    let large = all_reduce_seconds(elements, 10)?;
    let bytes = (elements * 4) as f64;
    Ok((small / 2.0, bytes / (large - small).max(1e-9)))
}

fn all_reduce_seconds(elements: usize, rounds: u32) -> Result<f64> {
    let members = SharedGroup::members(vec![Rank(0), Rank(1)], Duration::from_secs(30));
    let tensor = HostTensor::zeros([elements], DType::F32);
    let results: Vec<Result<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = members
            .into_iter()
            .map(|mut member| {
                let tensor = tensor.clone();
                scope.spawn(move || -> Result<f64> {
                    member.all_reduce(&tensor, ReduceOp::Sum)?;
                    let mut fastest = f64::INFINITY;
                    for _ in 0..rounds {
                        let started = Instant::now();
                        member.all_reduce(&tensor, ReduceOp::Sum)?;
                        fastest = fastest.min(started.elapsed().as_secs_f64());
                    }
                    Ok(fastest)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Runtime("all-reduce thread panicked".into())))
            })
            .collect()
    });
    let times = results.into_iter().collect::<Result<Vec<f64>>>()?;
    Ok(times.iter().copied().fold(0.0, f64::max))
}

/// The fastest session step of a chain of `kernels` tiny kernels on `devices` devices.
fn empty_step(devices: usize, kernels: usize) -> Result<f64> {
    let placement = Placement::line(DeviceType::Cpu, devices)?;
    let graph = Graph::new();
    let x = graph.input("x", [devices], DType::F32, &placement, None)?;
    let mut y = x.mul_scalar(2.0)?;
    for _ in 1..kernels {
        y = y.mul_scalar(1.0)?;
    }
    let config = SessionConfig { devices, ..SessionConfig::default() };
    let mut session = Session::new(&graph, &[&y], None, config)?;
    let feed = HostTensor::zeros([devices], DType::F32);
    session.step(&[(&x, feed.clone())])?;
    let mut fastest = f64::INFINITY;
    for _ in 0..30 {
        let started = Instant::now();
        session.step(&[(&x, feed.clone())])?;
        fastest = fastest.min(started.elapsed().as_secs_f64());
    }
    Ok(fastest)
}

/// Runs the char GPT on a `[dp, tp]` mesh; returns its program and median step seconds.
fn run_session(
    config: &CalibrationConfig,
    compile: &CompileConfig,
    dp: usize,
    tp: usize,
) -> Result<(crate::compile::Program, f64)> {
    let model = ModelSpec::CHAR.config;
    let placement = Placement::grid(DeviceType::Cpu, &[dp, tp])?;
    let layouts =
        Layouts { placement: placement.clone(), data_axis: Some(0), tensor_axis: Some(1) };
    let graph = Graph::new();
    let (batch, ctx) = (config.batch, model.ctx);
    let ids = graph.input("ids", [batch, ctx], DType::I64, &placement, Some(layouts.batch()))?;
    let targets =
        graph.input("targets", [batch, ctx], DType::I64, &placement, Some(layouts.batch()))?;
    let gpt = Gpt::new(&graph, model, &layouts, WeightInit { std: 0.02, seed: 1 })?;
    let loss = gpt.loss(&ids, &targets)?;
    let optimizer = Optimizer::AdamW(AdamW::new(1e-3));
    let training = Training::new(&loss, optimizer, Schedule::Constant);
    let session_config =
        SessionConfig { devices: dp * tp, compile: compile.clone(), ..SessionConfig::default() };
    let mut session = Session::new(&graph, &[&loss], Some(training), session_config)?;
    let tokens: Vec<i64> =
        (0..batch * ctx).map(|k| ((k * 7 + k / 13) % model.vocab) as i64).collect();
    let feed = HostTensor::from_vec(tokens, [batch, ctx])?;
    let mut step = || session.step(&[(&ids, feed.clone()), (&targets, feed.clone())]);
    for _ in 0..config.warmup {
        step()?;
    }
    let mut times = Vec::new();
    for _ in 0..config.steps.max(1) {
        let started = Instant::now();
        step()?;
        times.push(started.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok((session.program().clone(), times[times.len() / 2]))
}

impl fmt::Display for CalibrationTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.measured;
        writeln!(
            f,
            "this machine ({} cores): GEMM {:.1} GFLOP/s, element-wise {:.2} GFLOP/s, copy {:.1} GB/s, \
             kernel {:.2} µs, all-reduce hop {:.1} µs, {:.2} GB/s",
            m.cores,
            m.gemm_flops / 1e9,
            m.vector_flops / 1e9,
            m.memory_bandwidth / 1e9,
            m.kernel_overhead * 1e6,
            m.hop_latency * 1e6,
            m.link_bandwidth / 1e9
        )?;
        writeln!(
            f,
            "| char GPT, batch 16 (median of steps) | measured ms | roofline ms | error | \
             profiled kernels ms | error | of which empty step ms | kernels profiled (failed) |"
        )?;
        writeln!(f, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")?;
        for row in &self.rows {
            writeln!(
                f,
                "| dp{} × tp{} | {:.2} | {:.2} | {:+.1}% | {:.2} | {:+.1}% | {:.2} | {} ({}) |",
                row.mesh.0,
                row.mesh.1,
                row.measured * 1e3,
                row.predicted * 1e3,
                row.error() * 100.0,
                row.profiled * 1e3,
                row.profiled_error() * 100.0,
                row.fixed * 1e3,
                row.kernels.0,
                row.kernels.1,
            )?;
        }
        Ok(())
    }
}
