//! `meshflow bench <what>`: one harness for the figures meshflow is judged by, each next to the
//! reference it is compared with, measured in the same run.
//!
//! - `train`: GPT and MLP reference configs per strategy (step time, tokens or samples per
//!   second, model FLOP/s, MFU), PyTorch (`scripts/torch_train.py`) when torch is importable;
//!   `--device cuda` runs them on GPUs against PyTorch eager on GPU 0;
//! - `ops`: matmul against the `gemm` crate, row kernels against memcpy on as many threads (the
//!   kernels live in [`ops`], which the criterion bench `benches/ops.rs` times too);
//! - `comm`: every collective nccl-tests style over device threads, or over the processes of
//!   `meshflow launch --nproc-per-node N -- meshflow bench comm`, and over this machine's GPUs
//!   with NCCL when it has them (built with `--features cuda`; otherwise one line says why not);
//! - `actors`: acts/s, hop latency and the empty training step against their references;
//! - `all`: every section.
//!
//! Output: tables on stdout (progress on stderr), `--json FILE`, `--svg FILE` (scaling and busbw
//! plots) and `--compare OLD.json` (the change of every metric present in both runs).
//!
//! ```text
//! meshflow bench train --seconds 3 --json train.json --svg train.svg
//! meshflow bench train --device cuda --strategies 1 --json train-cuda.json
//! meshflow bench all --compare old.json
//! ```

pub mod actors;
pub mod arithmetic;
pub mod comm;
pub mod gpu;
pub mod launched;
pub mod nccl;
pub mod ops;
pub mod plot;
pub mod report;
pub mod table;
pub mod torch;
pub mod train;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use crate::flags::{count, positive_number, positive_seconds};
use crate::plan::strategies::{SessionStrategy, StrategyKind};
use report::{Machine, Report, TrainFigure};
use train::{Model, StepTimes, Timing, TrainDevice, TrainRunner};

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Building, compiling or running a program failed.
    #[error(transparent)]
    Meshflow(#[from] crate::Error),
    /// A kernel or tensor failed.
    #[error(transparent)]
    Ops(#[from] crate::ops::Error),
    /// A placement was refused.
    #[error(transparent)]
    Placement(#[from] crate::placement::Error),
    /// A collective or transport failed.
    #[error(transparent)]
    Comm(#[from] crate::comm::Error),
    /// Joining the launched job failed.
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
    /// The actor runtime failed.
    #[error("actor runtime: {0}")]
    Actor(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A report could not be parsed or written.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// The PyTorch reference script failed.
    #[error("torch reference: {0}")]
    Torch(String),
    /// The SVG plot could not be drawn.
    #[error("plot: {0}")]
    Plot(String),
    /// A measuring thread panicked.
    #[error("{0} panicked")]
    Panic(String),
    /// A peer process sent an unreadable result.
    #[error("peer: {0}")]
    Peer(String),
}

/// Which section to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum What {
    /// Training steps of the reference models per strategy, against PyTorch.
    Train,
    /// Kernels against the gemm crate and memcpy.
    Ops,
    /// Collectives, nccl-tests style.
    Comm,
    /// The actor runtime and the empty training step.
    Actors,
    /// Every section.
    All,
}

/// The flags of `meshflow bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The section to run.
    #[arg(value_enum)]
    pub what: What,
    /// Timed seconds per figure (at least `--min-steps` steps each).
    #[arg(long, default_value_t = 3.0, value_parser = positive_seconds)]
    pub seconds: f64,
    /// Fewest timed steps per figure.
    #[arg(long, default_value_t = 3, value_parser = count)]
    pub min_steps: usize,
    /// Kernel threads of the single device and of PyTorch.
    #[arg(long, default_value_t = 2, value_parser = count)]
    pub threads: usize,
    /// Models to train (`gpt`, `mlp`).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [ModelArg::Gpt, ModelArg::Mlp])]
    pub models: Vec<ModelArg>,
    /// Strategies to train on: `all` (every strategy `meshflow plan --calibrate` runs, the one
    /// device with `--threads`), `1`, or sizes and options such as `dp2`, `tp2`, `dp2tp2`,
    /// `pp2mb4`, `dp2zero`, `dp2mb2`, `dp2pp2mb4`, `dp2proc2` (processes under launch).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub strategies: Vec<String>,
    /// Where `train` runs: `cpu`, or `cuda` (device rank i on GPU i, products in f32, MFU
    /// against the f32 matmul rate of GPU 0 measured in the run, PyTorch eager on GPU 0 as the
    /// reference). Without a driver or a GPU, `cuda` fails with the device's error.
    #[arg(long, value_enum, default_value_t = TrainDevice::Cpu)]
    pub device: TrainDevice,
    /// Skip the PyTorch reference.
    #[arg(long)]
    pub no_torch: bool,
    /// Rounds in which a strategy with a PyTorch counterpart (the first strategy, data
    /// parallel ones) and PyTorch take turns, `--seconds` each: a slow spell of a shared host
    /// then slows both sides of a round, and the ratio to PyTorch is the median of the rounds'.
    /// The one-process reference is one `--serve` process for all rounds (built and warmed
    /// once), so many short rounds cost little: `--rounds 10 --seconds 1`.
    #[arg(long, default_value_t = 3, value_parser = count)]
    pub rounds: usize,
    /// The PyTorch reference script.
    #[arg(long, default_value = "scripts/torch_train.py")]
    pub torch_script: PathBuf,
    /// Seconds a PyTorch reference may take past the seconds it times: to start (`import
    /// torch`, building and warming the models) and, per request, for its `--min-steps` and
    /// warm-up. A reference that takes longer is stopped and the run fails with its stderr.
    #[arg(long, default_value_t = 300.0, value_parser = positive_seconds)]
    pub torch_timeout: f64,
    /// Peak GFLOP/s for MFU (default: the gemm crate's 1024³ rate measured in this run).
    #[arg(long, value_parser = positive_number)]
    pub peak_gflops: Option<f64>,
    /// Device threads of the in-process collectives.
    #[arg(long, default_value_t = 4, value_parser = count)]
    pub ranks: usize,
    /// Largest collective size in bytes (at least 8, the table's smallest message).
    #[arg(long, default_value_t = 16 << 20, value_parser = message_bytes)]
    pub max_bytes: usize,
    /// After each figure of a strategy in this process, run a traced session of it and print
    /// where its busiest rank spends the step, per op (acts, ms per step, share, GFLOP/s);
    /// strategies across processes and GPU runs are not traced (the run says so).
    #[arg(long)]
    pub ops: bool,
    /// Write the report as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Draw step time per strategy and busbw curves as SVG.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Show the change of every metric against a saved report.
    #[arg(long, value_name = "OLD.json")]
    pub compare: Option<PathBuf>,
}

/// `--max-bytes`: at least the smallest message of the table, which is empty below it.
fn message_bytes(text: &str) -> Result<usize, String> {
    let smallest = comm::sizes(usize::MAX)[0];
    match text.parse::<usize>() {
        Ok(bytes) if bytes >= smallest => Ok(bytes),
        Ok(_) => Err(format!("must be at least {smallest}, the smallest message timed")),
        Err(_) => Err(format!("{text:?} is not a number of bytes")),
    }
}

impl BenchArgs {
    /// `--torch-timeout` as a duration (its parser keeps it within a week).
    fn torch_patience(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.torch_timeout)
    }
}

/// A model on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModelArg {
    /// The GPT reference config.
    Gpt,
    /// The MLP reference config.
    Mlp,
}

impl From<ModelArg> for Model {
    fn from(model: ModelArg) -> Self {
        match model {
            ModelArg::Gpt => Model::Gpt,
            ModelArg::Mlp => Model::Mlp,
        }
    }
}

/// Runs the benchmark; prints the error and fails on any error.
pub fn run(args: &BenchArgs) -> ExitCode {
    match bench(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("meshflow bench: {error}");
            ExitCode::FAILURE
        }
    }
}

fn bench(args: &BenchArgs) -> Result<(), BenchError> {
    // The files named by flags are checked before minutes of measuring, not after.
    let baseline = args.compare.as_deref().map(Report::load).transpose()?;
    for path in [&args.json, &args.svg].into_iter().flatten() {
        check_destination(path)?;
    }
    let mut report = Report { machine: machine(), ..Report::default() };
    let timing = Timing { warmup: 1, min_steps: args.min_steps, seconds: args.seconds };
    let sections = |what: What| args.what == what || args.what == What::All;
    if sections(What::Comm) && !comm_section(args, &mut report)? {
        return Ok(()); // a launched rank other than 0: rank 0 reports
    }
    if sections(What::Ops) {
        let short = Timing { seconds: args.seconds / 4.0, ..timing };
        let bar = progress(ops::ticks(args.threads), "ops");
        report.ops = ops::measure(args.threads, short, |name| tick(&bar, name))?;
        bar.finish_and_clear();
        println!("{}", table::figures("ops: kernels against references", &report.ops));
    }
    if sections(What::Actors) {
        let short = Timing { seconds: args.seconds / 2.0, ..timing };
        let bar = progress(4, "actors");
        report.actors = actors::measure(short, |name| tick(&bar, name))?;
        bar.finish_and_clear();
        println!("{}", table::figures("actors: runtime against references", &report.actors));
    }
    if sections(What::Train) && !train_section(args, timing, &mut report)? {
        return Ok(());
    }
    finish(args, &report, baseline.as_ref())
}

/// An error unless the directory that is to hold `path` exists and `path` is not a directory.
fn check_destination(path: &Path) -> Result<(), BenchError> {
    if path.is_dir() {
        let source = std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            "cannot be written: it is a directory (give a file name)",
        );
        return Err(BenchError::Io { path: path.to_path_buf(), source });
    }
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    if directory.is_dir() {
        return Ok(());
    }
    let reason = format!("cannot be written: {} is not a directory", directory.display());
    let source = std::io::Error::new(std::io::ErrorKind::NotFound, reason);
    Err(BenchError::Io { path: path.to_path_buf(), source })
}

/// The comm section; false on a launched rank other than 0.
fn comm_section(args: &BenchArgs, report: &mut Report) -> Result<bool, BenchError> {
    let bar = progress(0, "comm");
    // The GPU rows run in a process of its own (not under `meshflow launch`).
    let mut gpus = None;
    match comm::measure_processes(args.max_bytes, |name| tick(&bar, name))? {
        Some(rows) if rows.is_empty() => return Ok(false),
        Some(rows) => report.comm = rows,
        None => {
            report.comm =
                comm::measure_in_process(args.ranks, args.max_bytes, |name| tick(&bar, name))?;
            gpus = Some(nccl::measure(args.max_bytes, |name| tick(&bar, name))?);
        }
    }
    bar.finish_and_clear();
    let note = gpus.as_ref().and_then(nccl::summary_line);
    if let Some(nccl::GpuRows::Measured { rows, .. }) = gpus {
        report.comm.extend(rows);
    }
    let memcpy = ops::memcpy_bandwidth(Timing { warmup: 1, min_steps: 5, seconds: 0.2 });
    println!("{}", table::comm(&report.comm, memcpy));
    if let Some(note) = note {
        println!("{note}");
    }
    Ok(true)
}

/// The train section; false on a rank of a launched job (its figure went to the launcher).
fn train_section(
    args: &BenchArgs,
    timing: Timing,
    report: &mut Report,
) -> Result<bool, BenchError> {
    let mut strategies = Vec::new();
    for text in &args.strategies {
        strategies.extend(parse_strategies(text, args.threads)?);
    }
    let (peak, source) = peak(args, &strategies)?;
    report.peak_flops = peak;
    report.peak_source = source;
    if launched::is_launched_rank() {
        // A rank of `train_figure`'s launched job: rank 0 prints the figure.
        for model in args.models.iter().copied().map(Model::from) {
            for strategy in &strategies {
                launched::rank(model, *strategy, timing, peak)?;
            }
        }
        return Ok(false);
    }
    for model in args.models.iter().copied().map(Model::from) {
        for (index, strategy) in strategies.iter().enumerate() {
            // PyTorch's counterparts: one process for the first strategy, DDP for data parallel
            // (over gloo: on the CPU only).
            let mut references = Vec::new();
            if index == 0 && !args.no_torch {
                references.push(None);
            }
            let cpu = args.device.is_cpu();
            if strategy.kind() == StrategyKind::Data && !args.no_torch && cpu {
                references.push(Some(*strategy));
            }
            let (mut ours, theirs) = paired_figures(args, model, *strategy, &references, peak)?;
            let traceable = strategy.processes == 1 && cpu;
            if args.ops && traceable {
                let bar = progress(0, "ops");
                tick(&bar, &format!("tracing {} on {}", model.name(), strategy.label()));
                ours.ops = Some(train::ops_profile(model, *strategy, args.device, OPS_STEPS)?);
                bar.finish_and_clear();
            } else if args.ops {
                // Across processes only rank 0's process could be traced; on a GPU an act's
                // trace is its kernels' enqueueing, not their run.
                let why = if cpu {
                    format!("runs across {} processes", strategy.processes)
                } else {
                    format!("runs on {}, where acts only enqueue", args.device.name())
                };
                eprintln!(
                    "meshflow bench: --ops traces CPU sessions in this process; {} on {} {why} \
                     and has no per-op table",
                    model.name(),
                    strategy.label(),
                );
            }
            report.train.push(ours);
            report.torch.extend(theirs);
        }
    }
    println!("{}", table::train(report));
    Ok(true)
}

/// Traced steps of `--ops` (after [`train::OPS_WARMUP`] untraced ones).
const OPS_STEPS: usize = 10;

/// The FLOP/s MFU divides by, and where it comes from: `--peak-gflops`, else measured in this
/// run on the device `train` runs on. On GPUs every device the strategies need is opened first
/// ([`gpu::open`]), so no driver, no GPU or too few GPUs is the device's typed error before
/// anything is timed; the sessions then open their own.
fn peak(args: &BenchArgs, strategies: &[SessionStrategy]) -> Result<(f64, String), BenchError> {
    let gpu = match args.device {
        TrainDevice::Cuda => Some(gpu::open(strategies)?),
        TrainDevice::Cpu => None,
    };
    Ok(match (args.peak_gflops, gpu) {
        (Some(gflops), _) => (gflops * 1e9, "--peak-gflops".to_string()),
        (None, Some(gpu)) => {
            let short = Timing { warmup: 2, min_steps: 10, seconds: 0.5 };
            (gpu::matmul_peak(&gpu, short)?, gpu::peak_source(&gpu))
        }
        (None, None) => {
            let short = Timing { warmup: 1, min_steps: 3, seconds: 0.5 };
            let peak = ops::gemm_peak(args.threads, short);
            (peak, format!("gemm crate 1024³ ×{}thr, measured in this run", args.threads))
        }
    })
}

/// `model` on `strategy` and PyTorch's figures for each of `references` (`None`: one process,
/// `Some`: DDP of that strategy), timed in `args.rounds` rounds that take turns (one round
/// without references, or when python3 cannot import torch), each figure merged over its rounds
/// ([`StepTimes::merged`]).
fn paired_figures(
    args: &BenchArgs,
    model: Model,
    strategy: SessionStrategy,
    references: &[Option<SessionStrategy>],
    peak: f64,
) -> Result<(TrainFigure, Vec<report::TorchFigure>), BenchError> {
    let mut sources = Vec::new();
    for reference in references {
        match Reference::start(args, model, *reference)? {
            Some(source) => sources.push(source),
            None => {
                sources.clear();
                break;
            }
        }
    }
    let rounds = if sources.is_empty() { 1 } else { args.rounds.max(1) };
    let mut runner = None;
    let mut ours = Vec::new();
    // Per reference, the figures of each round (a script reports one or more figures per run).
    let mut theirs: Vec<Vec<Vec<report::TorchFigure>>> = vec![Vec::new(); sources.len()];
    for round in 0..rounds {
        let label =
            if rounds > 1 { format!(" (round {} of {rounds})", round + 1) } else { "".into() };
        ours.push(train_figure(args, model, strategy, peak, &mut runner, &label)?);
        for (source, figures) in sources.iter_mut().zip(theirs.iter_mut()) {
            figures.push(source.figures(args, model, &label)?);
        }
    }
    let torch = theirs.into_iter().flat_map(merge_torch).collect();
    Ok((merge_train(ours, peak), torch))
}

/// Where a PyTorch reference's figures come from.
enum Reference {
    /// The one-process script, served ([`torch::Server`]): started once, asked every round.
    Served(torch::Server),
    /// DDP of a data-parallel strategy over gloo (`scripts/torch_ddp.py`, one process per
    /// device), run anew every round.
    Ddp(SessionStrategy),
}

impl Reference {
    /// The reference for `strategy` (`None`: one process), ready to time; `None` when python3
    /// cannot import torch (or, on `--device cuda`, torch sees no GPU), which is reported.
    fn start(
        args: &BenchArgs,
        model: Model,
        strategy: Option<SessionStrategy>,
    ) -> Result<Option<Reference>, BenchError> {
        let source = match strategy {
            None => {
                let bar = progress(0, "PyTorch reference");
                tick(&bar, &format!("starting PyTorch {} ×{}thr", model.name(), args.threads));
                let threads = (args.threads, args.min_steps);
                let on = (args.device, args.torch_patience());
                let server = torch::Server::start(&args.torch_script, &[model], threads, on)?;
                bar.finish_and_clear();
                server.map(Reference::Served)
            }
            Some(strategy) => torch::available(args.device, args.torch_patience())?
                .then_some(Reference::Ddp(strategy)),
        };
        if source.is_none() {
            let why = match args.device {
                TrainDevice::Cpu => "python3 cannot import torch",
                TrainDevice::Cuda => "python3 cannot import torch, or torch sees no GPU",
            };
            eprintln!("meshflow bench: PyTorch reference skipped ({why})");
        }
        Ok(source)
    }

    /// One round's figures of `model` (`round`: the progress bar's label).
    fn figures(
        &mut self,
        args: &BenchArgs,
        model: Model,
        round: &str,
    ) -> Result<Vec<report::TorchFigure>, BenchError> {
        let bar = progress(0, "PyTorch reference");
        let figures = match self {
            Reference::Served(server) => {
                let on = match args.device {
                    TrainDevice::Cpu => format!(" ×{}thr", args.threads),
                    device => format!(" on {}", device.name()),
                };
                tick(&bar, &format!("PyTorch {}{on}{round}", model.name()));
                server.time(model, args.seconds)?
            }
            Reference::Ddp(strategy) => {
                let script = args.torch_script.with_file_name("torch_ddp.py");
                let processes = format!(" DDP {} processes", strategy.dp);
                tick(&bar, &format!("PyTorch {}{processes}{round}", model.name()));
                let world = Some(strategy.dp);
                let figures = torch::measure(
                    &script,
                    &[model],
                    strategy.threads,
                    (args.seconds, args.min_steps),
                    world,
                    (args.device, args.torch_patience()),
                )?;
                figures.ok_or_else(|| {
                    BenchError::Torch(format!("{}: torch no longer importable", script.display()))
                })?
            }
        };
        bar.finish_and_clear();
        Ok(figures)
    }
}

/// One figure of a strategy's rounds (the last round's loss).
fn merge_train(rounds: Vec<TrainFigure>, peak: f64) -> TrainFigure {
    let times: Vec<StepTimes> = rounds.iter().map(|f| f.times.clone()).collect();
    let mut rounds = rounds;
    let last = rounds.pop().expect("paired_figures times at least one round");
    match StepTimes::merged(&times) {
        // Several rounds: the figure of their merged times (one round is `last` as it is).
        Some(times) if !times.rounds.is_empty() => {
            train_figure_of(last.model, (last.strategy, last.device), times, peak, last.loss)
        }
        _ => last,
    }
}

/// One figure per figure of the script, merged over the rounds (each round's script run reports
/// the same figures in the same order).
fn merge_torch(rounds: Vec<Vec<report::TorchFigure>>) -> Vec<report::TorchFigure> {
    let Some(first) = rounds.first() else { return Vec::new() };
    (0..first.len())
        .map(|index| {
            let same: Vec<StepTimes> =
                rounds.iter().filter_map(|r| r.get(index)).map(|f| f.times.clone()).collect();
            let figure = first[index].clone();
            let times = StepTimes::merged(&same).unwrap_or_else(|| figure.times.clone());
            report::TorchFigure { times, ..figure }
        })
        .collect()
}

/// Times one model on one strategy (in this process, with the session kept in `runner` from
/// round to round, or over launched processes when the strategy has several).
pub fn train_figure(
    args: &BenchArgs,
    model: Model,
    strategy: SessionStrategy,
    peak: f64,
    runner: &mut Option<TrainRunner>,
    round: &str,
) -> Result<TrainFigure, BenchError> {
    let bar = progress(0, "train");
    let label = format!("{} on {}{round}", model.name(), strategy.label());
    if strategy.processes > 1 {
        tick(&bar, &format!("{label} (launched processes)"));
        let figure = launched::figure(args, model, strategy, peak);
        bar.finish_and_clear();
        return figure;
    }
    if runner.is_none() {
        tick(&bar, &format!("compiling {label}"));
        *runner = Some(TrainRunner::on_device(model, strategy, args.device)?);
    }
    let runner = runner.as_mut().expect("built above");
    tick(&bar, &label);
    let timing = Timing { warmup: 1, min_steps: args.min_steps, seconds: args.seconds };
    let figure = figure_of(model, strategy, timing, peak, runner, || bar.inc(1));
    bar.finish_and_clear();
    figure
}

/// Times `runner` (`model` on `strategy`) under `timing`, calling `tick` after every step.
pub fn figure_of(
    model: Model,
    strategy: SessionStrategy,
    timing: Timing,
    peak: f64,
    runner: &mut TrainRunner,
    tick: impl FnMut(),
) -> Result<TrainFigure, BenchError> {
    let mut loss = f32::NAN;
    let times = train::time_steps(timing, || runner.step().map(|l| loss = l), tick)?;
    let device = runner.device();
    Ok(train_figure_of(model, (strategy, device), times, peak, loss))
}

/// The figure of `model` on `strategy` and a device from its step times: rates from the median
/// step.
fn train_figure_of(
    model: Model,
    (strategy, device): (SessionStrategy, TrainDevice),
    times: StepTimes,
    peak: f64,
    loss: f32,
) -> TrainFigure {
    let flops = model.step_flops();
    TrainFigure {
        model,
        strategy,
        items_per_second: model.items_per_step() as f64 / times.median,
        flops_per_second: flops / times.median,
        mfu: arithmetic::mfu(flops, times.median, peak),
        times,
        loss,
        device,
        ops: None,
    }
}

/// The strategies `text` names: `all` ([`SessionStrategy::every`]), `1` (one device with
/// `threads` threads), or sizes and options in any order: `dpN`, `tpN`, `ppN`, `mbN`
/// (micro-batches), `zero`, `procN` (processes), e.g. `dp2tp2`, `pp2mb4`, `dp2zero`,
/// `dp2proc2` (one thread per device); case, `×`, `x` and `_ - , + /` between the parts are
/// ignored (`DP2×TP2`). Every part must be one of those, at most once, with a size of at least
/// 1: `dp3y`, `dp2dp4` and `dp0` are errors, not `dp3`, `dp2` and nothing.
pub fn parse_strategies(text: &str, threads: usize) -> Result<Vec<SessionStrategy>, BenchError> {
    let lower = text.to_ascii_lowercase().replace(['×', 'x', '_', '-', ' ', ',', '+', '/'], "");
    let single = |s: SessionStrategy| match s.devices() {
        1 => SessionStrategy { threads, ..s },
        _ => s,
    };
    match lower.as_str() {
        "all" => return Ok(SessionStrategy::every().into_iter().map(single).collect()),
        "1" => return Ok(vec![SessionStrategy::single(threads)]),
        _ => {}
    }
    let parts = strategy_parts(&lower).map_err(|reason| {
        BenchError::Meshflow(crate::Error::Graph(format!(
            "unknown strategy {text:?}: {reason}; use all, 1, or dpN, tpN, ppN, mbN, zero, \
             procN together (dp2tp2, pp2mb4, dp2zero, dp2proc2)"
        )))
    })?;
    let size = |name: &str| parts.iter().find(|(part, _)| *part == name).map_or(1, |&(_, n)| n);
    let strategy = SessionStrategy {
        pp: size("pp"),
        micro_batches: size("mb"),
        zero: parts.iter().any(|(part, _)| *part == "zero"),
        processes: size("proc"),
        ..SessionStrategy::mesh(size("dp"), size("tp"))
    };
    Ok(vec![single(strategy)])
}

/// The parts of a lower-case strategy text without separators: `(name, size)` for `dpN`,
/// `tpN`, `ppN`, `mbN`, `procN` and `("zero", 0)`; an error names the first part that is not
/// one of them, is repeated, or has size 0.
fn strategy_parts(text: &str) -> Result<Vec<(&'static str, usize)>, String> {
    const SIZED: [&str; 5] = ["dp", "tp", "pp", "mb", "proc"];
    let mut parts: Vec<(&'static str, usize)> = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let part = if let Some(after) = rest.strip_prefix("zero") {
            rest = after;
            ("zero", 0)
        } else {
            let Some(&name) = SIZED.iter().find(|name| rest.starts_with(**name)) else {
                return Err(format!("{rest:?} does not start with a known part"));
            };
            let after = &rest[name.len()..];
            let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            let size: usize = after[..digits]
                .parse()
                .map_err(|_| format!("{name} needs a size (such as {name}2)"))?;
            if size == 0 {
                return Err(format!("{name}0: sizes start at 1"));
            }
            rest = &after[digits..];
            (name, size)
        };
        if parts.iter().any(|(seen, _)| *seen == part.0) {
            return Err(format!("{} is given twice", part.0));
        }
        parts.push(part);
    }
    if parts.is_empty() {
        return Err("it is empty".to_string());
    }
    Ok(parts)
}

fn finish(args: &BenchArgs, report: &Report, baseline: Option<&Report>) -> Result<(), BenchError> {
    if let Some(path) = &args.json {
        report.save(path)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.svg {
        plot::draw(report, path)?;
        println!("wrote {}", path.display());
    }
    if let (Some(path), Some(old)) = (&args.compare, baseline) {
        println!("\nchange against {}:", path.display());
        println!("{}", report::format_changes(&report::compare(old, report)));
    }
    Ok(())
}

fn machine() -> Machine {
    let load_average = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok());
    Machine {
        cores: std::thread::available_parallelism().map(usize::from).unwrap_or(1),
        load_average,
        started_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    }
}

fn progress(length: u64, prefix: &str) -> ProgressBar {
    let bar = if length == 0 { ProgressBar::new_spinner() } else { ProgressBar::new(length) };
    let template = "{spinner} {prefix} [{elapsed}] {wide_msg} {pos}";
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.set_prefix(prefix.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

fn tick(bar: &ProgressBar, message: &str) {
    bar.set_message(message.to_string());
}
