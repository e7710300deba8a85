//! `meshflow plan`: the flags and what the subcommand prints.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use meshflow_placement::select::Strategy as Selection;
use meshflow_placement::DeviceType;

use super::calibrate::{calibrate, CalibrationConfig};
use super::cluster::{Cluster, Overrides};
use super::model::{ModelSpec, Strategy, Workload};
use super::report::{plan, PlanReport};
use crate::compile::CompileConfig;
use crate::{Error, Result};

/// Compile a model for a described cluster without running it; predict its step time.
#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// The cluster: NODESxDEVICES:KIND (kinds: h100, a100, cpu).
    #[arg(long, default_value = "1x8:h100")]
    pub cluster: String,
    /// The model: char, gpt2 (124M) or 1.3b.
    #[arg(long, default_value = "gpt2")]
    pub model: String,
    /// Data-parallel size (default: the devices left by --tp and --pp, which must divide them).
    #[arg(long, value_parser = crate::flags::count)]
    pub dp: Option<usize>,
    /// Tensor-parallel size.
    #[arg(long, default_value_t = 1, value_parser = crate::flags::count)]
    pub tp: usize,
    /// Pipeline stages, each a dp × tp mesh of its own devices (use with --micro-batches).
    #[arg(long, default_value_t = 1, value_parser = crate::flags::count)]
    pub pp: usize,
    /// Let signature selection choose every layout on a flat mesh of all devices.
    #[arg(long)]
    pub auto: bool,
    /// Sequences per step (global batch).
    #[arg(long, default_value_t = 8, value_parser = crate::flags::count)]
    pub batch: usize,
    /// Micro-batches per step.
    #[arg(long, default_value_t = 1, value_parser = crate::flags::count)]
    pub micro_batches: usize,
    /// Write the simulated step's Chrome trace (Perfetto) here.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Intra-node bandwidth per direction, GB/s.
    #[arg(long)]
    pub intra_bandwidth: Option<f64>,
    /// Intra-node latency per hop, µs.
    #[arg(long)]
    pub intra_latency: Option<f64>,
    /// Inter-node bandwidth per device, GB/s.
    #[arg(long)]
    pub inter_bandwidth: Option<f64>,
    /// Inter-node latency per hop, µs.
    #[arg(long)]
    pub inter_latency: Option<f64>,
    /// Device peak, TFLOP/s.
    #[arg(long)]
    pub tflops: Option<f64>,
    /// Device memory, GB.
    #[arg(long)]
    pub memory_gb: Option<f64>,
    /// Device memory bandwidth, GB/s.
    #[arg(long)]
    pub hbm_bandwidth: Option<f64>,
    /// Fraction of peak that matrix products reach.
    #[arg(long)]
    pub matmul_efficiency: Option<f64>,
    /// Greedy signature selection instead of the search.
    #[arg(long)]
    pub greedy: bool,
    /// Instead of one plan: predict the strategies that run here (CPU devices) and compare
    /// with real steps of the session.
    #[arg(long)]
    pub calibrate: bool,
    /// Measured steps per strategy and round when calibrating.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Calibration rounds: the one-process strategies take turns, `--steps` steps each, and
    /// each row measures the median of its rounds' medians.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Calibrate only the strategies whose name contains this text (e.g. `pp2`, `ZeRO`,
    /// `processes`).
    #[arg(long, value_name = "TEXT")]
    pub only: Option<String>,
    /// Internal: one launched worker of a calibration across processes (its request as JSON).
    #[arg(long, hide = true, value_name = "REQUEST")]
    pub calibrate_worker: Option<String>,
    /// Instead of one plan: the table of GPT-2 and 1.3B on 8, 64 and 512 devices of --cluster's
    /// kind (markdown).
    #[arg(long)]
    pub table: bool,
}

/// Runs `meshflow plan`.
pub fn run(args: &PlanArgs) -> ExitCode {
    match execute(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("meshflow plan: {error}");
            ExitCode::FAILURE
        }
    }
}

fn execute(args: &PlanArgs) -> Result<()> {
    let compile = compile_config(args);
    if let Some(request) = &args.calibrate_worker {
        return super::processes::worker(request);
    }
    if args.calibrate {
        let mut config = CalibrationConfig {
            steps: args.steps,
            rounds: args.rounds,
            binary: std::env::current_exe().ok(),
            ..CalibrationConfig::default()
        };
        if let Some(only) = &args.only {
            config.strategies.retain(|strategy| strategy.to_string().contains(only.as_str()));
        }
        let table = calibrate(&config, &compile)?;
        print!("{table}");
        return Ok(());
    }
    let cluster = cluster(args)?;
    if let Some(path) = args.trace.as_deref().filter(|path| path.is_dir()) {
        // Checked before the planning, which takes minutes on a large cluster.
        return Err(Error::Data(format!(
            "--trace {}: is a directory, give a file",
            path.display()
        )));
    }
    if args.table {
        print!("{}", super::calibrate::scale_table(&cluster, &compile)?);
        return Ok(());
    }
    let workload = workload(args, &cluster)?;
    let report = plan(&workload, &cluster, &compile, args.trace.is_some())?;
    print!("{report}");
    write_trace(args, &report)
}

fn compile_config(args: &PlanArgs) -> CompileConfig {
    let strategy = if args.greedy { Selection::Greedy } else { Selection::Search };
    CompileConfig { strategy, ..CompileConfig::default() }
}

/// The cluster of the flags.
pub fn cluster(args: &PlanArgs) -> Result<Cluster> {
    let overrides = Overrides {
        intra_bandwidth: args.intra_bandwidth,
        intra_latency: args.intra_latency,
        inter_bandwidth: args.inter_bandwidth,
        inter_latency: args.inter_latency,
        tflops: args.tflops,
        memory_gb: args.memory_gb,
        hbm_bandwidth: args.hbm_bandwidth,
        matmul_efficiency: args.matmul_efficiency,
    };
    let parsed: Cluster = args.cluster.parse().map_err(|e| Error::Graph(format!("{e}")))?;
    parsed.with(&overrides).map_err(|e| Error::Graph(format!("{e}")))
}

fn workload(args: &PlanArgs, cluster: &Cluster) -> Result<Workload> {
    let devices = cluster.devices();
    let strategy = if args.auto {
        Strategy::Auto { devices }
    } else {
        let (tp, pp) = (args.tp, args.pp);
        // The flags refuse sizes of 0; this guards a `PlanArgs` built in code.
        if tp == 0 || pp == 0 || args.dp == Some(0) {
            return Err(Error::Graph(format!(
                "dp {} × tp {tp} × pp {pp}: every size must be at least 1",
                args.dp.map_or("(default)".to_string(), |dp| dp.to_string())
            )));
        }
        // Saturating: a product past 2^64 is more than any cluster, the check below.
        let model_parallel = tp.saturating_mul(pp);
        let dp = match args.dp {
            Some(dp) => dp,
            // The default fills the cluster; a remainder would idle devices unasked. More
            // than the cluster is the size check's error below (with dp 1).
            None if devices.is_multiple_of(model_parallel) || model_parallel > devices => {
                (devices / model_parallel).max(1)
            }
            None => {
                let dp = devices / model_parallel;
                return Err(Error::Graph(format!(
                    "tp {tp} × pp {pp} does not divide the {devices} devices of {}: give --dp \
                     to plan on fewer of them (--dp {dp} uses {})",
                    args.cluster,
                    dp * tp * pp
                )));
            }
        };
        let needed = dp.checked_mul(tp).and_then(|n| n.checked_mul(pp));
        if needed.is_none_or(|needed| needed > devices) {
            let needed = needed.map_or("more than 2^64".to_string(), |n| n.to_string());
            return Err(Error::Graph(format!(
                "dp {dp} × tp {tp} × pp {pp} needs {needed} devices, the cluster has {devices}"
            )));
        }
        Strategy::Mesh { dp, tp, pp }
    };
    let device = if cluster.device.kind == "cpu" { DeviceType::Cpu } else { DeviceType::Cuda };
    let model: ModelSpec = args.model.parse()?;
    let pieces = u32::try_from(args.micro_batches)
        .map_err(|_| Error::Graph(format!("{} micro-batches are too many", args.micro_batches)))?;
    Ok(Workload { model, strategy, batch: args.batch, pieces, device })
}

fn write_trace(args: &PlanArgs, report: &PlanReport) -> Result<()> {
    let (Some(path), Some(trace)) = (&args.trace, &report.prediction.trace) else {
        return Ok(());
    };
    std::fs::write(path, trace).map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
    println!("trace: {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        plan: PlanArgs,
    }

    fn strategy(flags: &[&str]) -> Result<Strategy> {
        let args = Cli::try_parse_from([&["plan"], flags].concat()).expect("flags").plan;
        let cluster = cluster(&args)?;
        workload(&args, &cluster).map(|w| w.strategy)
    }

    #[test]
    fn the_default_dp_fills_the_cluster_or_names_the_remainder() {
        let mesh = |dp, tp, pp| Strategy::Mesh { dp, tp, pp };
        assert_eq!(strategy(&["--tp", "2"]).unwrap(), mesh(4, 2, 1));
        assert_eq!(strategy(&["--tp", "2", "--pp", "2"]).unwrap(), mesh(2, 2, 2));
        // Fewer devices than the cluster's only when asked for.
        assert_eq!(strategy(&["--tp", "3", "--dp", "2"]).unwrap(), mesh(2, 3, 1));
        let error = strategy(&["--tp", "3"]).unwrap_err().to_string();
        assert!(error.contains("tp 3 × pp 1 does not divide the 8 devices"), "{error}");
        assert!(error.contains("--dp 2 uses 6"), "{error}");
        // Sizes of 0 are refused by the flags (an empty batch predicted a step of 0 tokens, 0
        // micro-batches planned as 1, tp or pp 0 as 1).
        for flags in ["--batch", "--micro-batches", "--tp", "--pp", "--dp"].map(|flag| [flag, "0"])
        {
            let error = Cli::try_parse_from([&["plan"], &flags[..]].concat()).err();
            let error = error.expect("refused").to_string();
            assert!(error.contains(flags[0]) && error.contains("at least 1"), "{flags:?}: {error}");
        }
        // A `PlanArgs` built in code with a size of 0 gets an error, not a division by 0.
        let mut args = Cli::try_parse_from(["plan"]).expect("flags").plan;
        args.tp = 0;
        let error = workload(&args, &cluster(&args).unwrap()).expect_err("refused").to_string();
        assert!(error.contains("must be at least 1"), "{error}");
        for flags in [&["--tp", "4", "--dp", "4"][..], &["--tp", "16"]] {
            let error = strategy(flags).unwrap_err().to_string();
            assert!(error.contains("needs 16 devices, the cluster has 8"), "{flags:?}: {error}");
        }
        // Sizes whose product overflows are refused too (it wrapped in a release build).
        let huge = (1u64 << 62).to_string();
        for flags in [&["--tp", "4", "--dp", &huge][..], &["--tp", &huge, "--pp", "8"]] {
            let error = strategy(flags).unwrap_err().to_string();
            assert!(error.contains("needs more than 2^64 devices"), "{flags:?}: {error}");
        }
    }
}
